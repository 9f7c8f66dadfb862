"""The report's sections, one builder each: figures already computed (metrics.json, run
records) in, document blocks out. No statistics and no decisions here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlora_pipeline.config.schema import PipelineConfig
from qlora_pipeline.evaluation.evaluate import SHIPPED
from qlora_pipeline.files import read_json, seed_dir, sha256_dir
from qlora_pipeline.reporting import gate
from qlora_pipeline.reporting.document import Block
from qlora_pipeline.reporting.figures import METHODS, MODELS
from qlora_pipeline.tracking.perf import git_commit


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def config_diff(qlora: Any, lora: Any) -> list[tuple[str, str, str]]:
    """The settings in which the two arms differ: (key, QLoRA value, LoRA value)."""
    q, lo = gate.flatten(qlora), gate.flatten(lora)
    every = set(q) | set(lo)
    keys = sorted(
        k
        for k in every
        if q.get(k, "—") != lo.get(k, "—")
        and k != "name"
        and not any(other.startswith(k + ".") for other in every)  # a block set on one side only
    )
    return [(k, str(q.get(k, "—")), str(lo.get(k, "—"))) for k in keys]


def _lora_text(lora: dict | None) -> str:
    if not lora:
        return "n/a"
    extras = [name for key, name in (("use_rslora", "rsLoRA"), ("use_dora", "DoRA")) if lora[key]]
    if lora["init"] != "default":
        extras.append(f"init {lora['init']}")
    return f"r={lora['r']}, alpha={lora['alpha']}" + "".join(f", {x}" for x in extras)


def export_blocks(exports_dir: Path | None) -> list[Block]:
    """The merged-export section: parity of the merged model and drift from what was trained."""
    found = {
        m: read_json(exports_dir / m / "export.json")
        for m in METHODS
        if exports_dir is not None and (exports_dir / m / "export.json").is_file()
    }
    if not found:
        return []

    def cells(figures: dict | None) -> str:
        if figures is None:
            return "—"
        return f"{figures['max_abs_over_max_logit']:.4f} / {figures['top1_agreement']:.3f}"

    rows = [
        ("merged vs base + adapter (unmerged, bf16)", "merged_vs_unmerged"),
        ("merged vs the model as trained and evaluated", "merged_vs_as_trained"),
        ("adapter on the original bf16 base vs as trained", "bf16_base_plus_adapter_vs_as_trained"),
    ]
    tolerance = next(iter(found.values()))["tolerance"]
    return [
        Block("h2", "Merged export"),
        Block(
            "table",
            headers=("logits: max |Δ| / max |logit|  /  top-1 agreement", *found),
            rows=tuple((label, *(cells(found[m].get(key)) for m in found)) for label, key in rows),
        ),
        Block(
            "p",
            "`qlora-pipeline export` dequantizes the 4-bit base to bf16 (QLoRA), merges the adapter "
            "and saves one safetensors model. Parity tolerance: max |Δ| ≤ "
            f"{tolerance['max_abs_over_max_logit']} of the largest logit and top-1 agreement ≥ "
            f"{tolerance['top1_agreement']}, on {next(iter(found.values()))['prompts']} test "
            "prompts. The last row is the drift of moving a QLoRA adapter onto the original bf16 "
            "weights instead of the dequantized ones it was trained against.",
        ),
    ]


def _figure(record: dict[str, Any], key: str, digits: int = 1) -> str:
    value = record.get(key)
    return "n/a" if value is None else f"{value:.{digits}f}"


def performance_blocks(
    runs: dict[str, dict], trains: dict[str, dict], metrics: dict[str, Any]
) -> list[Block]:
    """Memory and speed of the shipped seed's two trainings: deterministic footprints, and the
    measured figures of the runs that produced these outputs (`runs`: each arm's run record; they
    differ per machine and are never hashed)."""
    mb = 2**20
    rows: list[tuple[str, ...]] = [
        (
            "base weights",
            *(
                f"4-bit {q['quant_type']}{' + DQ' if q['double_quant'] else ''}"
                if (q := trains[m]["quantization"])
                else trains[m]["base_dtype"]
                for m in METHODS
            ),
        ),
        ("compute dtype", *(str(trains[m].get("compute_dtype")) for m in METHODS)),
        (
            "optimizer",
            *(
                trains[m]["optimizer"]
                + (
                    ""
                    if trains[m]["optimizer_paging"]
                    or not trains[m]["optimizer"].startswith("paged")
                    else " (no paging on CPU)"
                )
                for m in METHODS
            ),
        ),
        ("LoRA adapter", *(_lora_text(trains[m].get("lora")) for m in METHODS)),
        (
            "gradient checkpointing",
            *("on" if trains[m].get("gradient_checkpointing") else "off" for m in METHODS),
        ),
        (
            "trainable / total params",
            *(
                f"{trains[m]['trainable_params']:,} / {trains[m]['total_params']:,}"
                for m in METHODS
            ),
        ),
        (
            "base footprint in training (MB)",
            *(_fmt(trains[m]["base_footprint_bytes"] / mb, 2) for m in METHODS),
        ),
        ("model footprint at eval (MB)", *(_fmt(metrics["footprint_mb"][m], 2) for m in METHODS)),
        (
            "steps; first → final loss",
            *(
                f"{trains[m]['steps']}; {_fmt(trains[m]['first_loss'])} → "
                f"{_fmt(trains[m]['final_loss'])}"
                for m in METHODS
            ),
        ),
        ("measured on", *(str(runs[m].get("device", "n/a")) for m in METHODS)),
        (
            "peak memory in training (MB)",
            *(
                _figure(runs[m], "peak_cuda_allocated_mb", 0) + " CUDA"
                if "peak_cuda_allocated_mb" in runs[m]
                else _figure(runs[m], "peak_rss_mb", 0) + " RSS"
                for m in METHODS
            ),
        ),
        ("tokens/s", *(_figure(runs[m], "tokens_per_s", 0) for m in METHODS)),
        ("training time (s)", *(_figure(runs[m], "train_s") for m in METHODS)),
        (
            "train stage wall time (s)",
            *(_figure(runs[m], "wall_s") for m in METHODS),
        ),
    ]
    return [
        Block("h2", "Memory and speed"),
        Block("table", headers=("", "QLoRA", "LoRA"), rows=tuple(rows)),
        Block(
            "p",
            f"Base model footprint: {_fmt(metrics['footprint_mb']['base'], 2)} MB. Footprints and "
            "losses are properties of the outputs; peak memory, tokens/s and times were measured "
            "when the stage last ran here (run records in the runs folder), so they differ per "
            "machine and are kept out of DVC's hashes. Peak RSS is the whole process, so on a tiny "
            "model it is dominated by the libraries. Paged optimizers page only on CUDA.",
        ),
        Block("img", "loss_curves.png"),
    ]


def environment_rows(runs: dict[str, dict]) -> tuple[tuple[str, str], ...]:
    """The environment the model stages ran in (from their run records)."""
    env = next(
        (runs[s]["environment"] for s in sorted(runs, key=lambda s: not s.startswith("train@"))),
        None,
    )
    if env is None:
        return (("environment", "no run record here (the stages ran elsewhere)"),)
    det = ", ".join(f"{k}={v}" for k, v in env["determinism"].items())
    return (
        (
            "device",
            f"{env['device']} ({env['accelerator']}, torch kernels {env['cpu_capability']}, {env['threads']} threads)",
        ),
        ("determinism settings", det or "none"),
        ("python, torch", f"{env['python']}, {env['torch']}"),
        ("libraries", ", ".join(f"{k} {v}" for k, v in env["libraries"].items())),
        ("config sha256", env["config_sha256"][:16] + "…"),
    )


def settings_blocks(cfg: PipelineConfig, trains: dict[str, dict]) -> list[Block]:
    """What differs between the arms: the dtypes of the models as loaded for training (read off
    the modules, so an unintended difference shows), then the config keys."""
    loaded = {m: trains[m].get("loaded_dtypes") or {} for m in METHODS}
    parts = sorted(set(loaded["qlora"]) | set(loaded["lora"]))
    rows = [
        (
            part,
            loaded["qlora"].get(part, "—"),
            loaded["lora"].get(part, "—"),
            "differs" if loaded["qlora"].get(part) != loaded["lora"].get(part) else "same",
        )
        for part in parts
    ]
    return [
        Block("h2", "What differs between the two arms"),
        Block("table", headers=("loaded model, by part", "QLoRA", "LoRA", ""), rows=tuple(rows)),
        Block(
            "table",
            headers=("config key (methods.*)", "QLoRA", "LoRA"),
            rows=tuple(config_diff(cfg.methods["qlora"], cfg.methods["lora"])),
        ),
        Block(
            "p",
            "The first table is read off the models as loaded for training. With "
            f"train.upcast_non_quantized={cfg.train.upcast_non_quantized} both arms get one "
            "precision policy, so only the linear weights should differ (4-bit vs 16-bit). "
            "Everything else is shared: data, seed, data order, LoRA settings (train.lora), "
            "schedule and evaluation.",
        ),
    ]


def shipped_blocks(tasks: dict[str, dict[str, Any]]) -> list[Block]:
    """What ships (the first seed's adapter), scored with the same harness settings, and each
    form's drift from the QLoRA model as trained, paired on the same items."""
    rows = []
    for task, t in tasks.items():
        shipped = t["shipped"]
        for m, label in SHIPPED.items():
            if m not in shipped:
                continue
            drift = shipped[m].get("drift")
            rows.append(
                (
                    task,
                    label,
                    f"{shipped[m]['value']:.3f} ± {_fmt(shipped[m]['stderr'])}",
                    "—"
                    if m == "qlora"
                    else _interval(drift)
                    if drift
                    else f"{shipped[m]['value'] - shipped['qlora']['value']:+.3f} (other arm)",
                )
            )
    seed = next(iter(tasks.values()))["shipped"]["seed"]
    return [
        Block("h2", f"What ships (seed {seed})"),
        Block(
            "table",
            headers=("task", "artifact", "score", "drift from QLoRA as trained [95% CI]"),
            rows=tuple(rows),
        ),
        Block(
            "p",
            f"The adapters of the first training seed ({seed}) ship. The same harness settings "
            "for every artifact. Drift: paired bootstrap over the same test items. LoRA is the "
            "other arm (its difference is that seed's quality gap).",
        ),
    ]


def _interval(d: dict[str, float]) -> str:
    return f"{d['estimate']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def gap_text(t: dict[str, Any]) -> str:
    return f"{t['gap']:+.3f} [{t['gap_ci_low']:+.3f}, {t['gap_ci_high']:+.3f}]"


def _seeds(seeds: list[int]) -> str:
    return ", ".join(str(s) for s in seeds)


def noise_floor_text(t: dict[str, Any]) -> str:
    """The noise floor in one line: each arm against itself under another training seed."""
    if t.get("noise_floor") is None:
        return "noise floor: not measured (one training seed; set seeds to two or more)"
    parts = [
        f"{label} seed {d['seeds'][1]} vs {d['seeds'][0]} {_interval(d)}"
        for arm, label in (("qlora", "QLoRA"), ("lora", "LoRA"))
        for d in t["same_arm"][arm]
    ]
    return f"noise floor (same arm, another seed): |Δ| up to {t['noise_floor']:.3f}; " + "; ".join(
        parts
    )


def quality_blocks(metrics: dict[str, Any]) -> list[Block]:
    """Scores of base and both arms (pooled over seeds), the gap, retention, and the change
    against the accepted run."""
    tasks = metrics["tasks"]
    seeds = metrics["seeds"]
    return [
        Block("h2", "Quality"),
        Block(
            "table",
            headers=(
                "task (metric, n)",
                "base",
                "QLoRA",
                "LoRA",
                "QLoRA − LoRA [95% CI]",
                "retention [95% CI]",
                "Δ vs accepted (QLoRA / LoRA)",
            ),
            rows=tuple(
                (
                    f"{task} ({t['metric']}, n={t['n']})",
                    *(f"{t[m]:.3f} ± {_fmt(t[f'{m}_stderr'])}" for m in MODELS),
                    gap_text(t),
                    retention_text(t),
                    f"{_signed(t['qlora_vs_accepted'])} / {_signed(t['lora_vs_accepted'])}",
                )
                for task, t in tasks.items()
            ),
        ),
        Block(
            "p",
            f"QLoRA and LoRA are pooled over the training seeds ({_seeds(seeds)}): each item's "
            "score averaged over seeds. Scores are mean ± standard error. Intervals: paired "
            "bootstrap over test items (2000 resamples). Retention = (QLoRA − base) / (LoRA − "
            "base), defined only when LoRA's gain is significant. Accepted run: "
            f"{metrics['accepted']}.",
        ),
    ]


def seed_blocks(metrics: dict[str, Any]) -> list[Block]:
    """The gap per training seed, and the noise floor: each arm against itself under another
    seed. A gap inside the noise floor is not a difference between the methods."""
    rows = [
        (
            task,
            str(s["seed"]),
            f"{s['qlora']:.3f}",
            f"{s['lora']:.3f}",
            _interval(s["gap"]),
            _fmt(s["mcnemar"]["p_value"]) if s["mcnemar"] else "n/a (not 0/1)",
        )
        for task, t in metrics["tasks"].items()
        for s in t["per_seed"]
    ]
    floor = [
        (task, label, f"{d['seeds'][1]} vs {d['seeds'][0]}", _interval(d))
        for task, t in metrics["tasks"].items()
        for arm, label in (("qlora", "QLoRA"), ("lora", "LoRA"))
        for d in t["same_arm"][arm]
    ]
    blocks = [
        Block("h2", "Seeds and the noise floor"),
        Block(
            "table",
            headers=("task", "seed", "QLoRA", "LoRA", "QLoRA − LoRA [95% CI]", "McNemar p"),
            rows=tuple(rows),
        ),
    ]
    if floor:
        blocks.append(
            Block(
                "table",
                headers=("task", "arm against itself", "seeds", "Δ [95% CI]"),
                rows=tuple(floor),
            )
        )
    blocks.append(
        Block(
            "p",
            "Both arms train once per seed; a seed sets the LoRA init and the data order, shared "
            "by the two arms of that seed. The second table is the noise floor: the same method "
            "trained again with another seed, scored on the same items. A QLoRA − LoRA gap no "
            "larger than it is not evidence of a difference between the methods. McNemar: exact "
            "two-sided test of the seed's QLoRA vs LoRA on the items where exactly one is right."
            if floor
            else "One training seed: no noise floor. Set `seeds` to two or more to measure it.",
        )
    )
    return blocks


def gate_blocks(metrics: dict[str, Any], enforce: bool) -> list[Block]:
    """Every gate condition: estimate, interval, rule, verdict."""
    return [
        Block("h2", f"Quality gate: {metrics['verdict']}"),
        Block(
            "table",
            headers=("task", "condition", "estimate [95% CI]", "rule", "verdict"),
            rows=tuple(condition_row(c) for c in metrics["conditions"]),
        ),
        Block(
            "p",
            "Each condition is decided on its 95% interval, never on the point estimate: a "
            "required gain must hold at the interval's lower bound, and a drop fails only when "
            "the whole interval is below the tolerated margin. Gains and the QLoRA − LoRA gap are "
            "pooled over seeds; the accepted and anchor runs are compared with the QLoRA adapter "
            "that ships. "
            + ("Enforced: `qlora-pipeline run` exits 3 on FAIL." if enforce else "Not enforced.")
            + f" Anchor for cumulative drift: {metrics.get('anchor', 'n/a')}.",
        ),
    ]


def protocol_blocks(metrics: dict[str, Any]) -> list[Block]:
    return [
        Block("h2", "Evaluation protocol"),
        Block(
            "table",
            headers=("what", "value"),
            rows=protocol_rows(metrics.get("protocol") or {}, metrics.get("test_set")),
        ),
    ]


def _too_long(manifest: dict[str, Any]) -> str:
    dropped = manifest["counts"]["test"].get("longer_than_context_dropped", 0)
    if not dropped:
        return ""
    return f"; {dropped} test items longer than the model's context ({manifest['context']} tokens) not evaluated"


def lineage_blocks(
    cfg: PipelineConfig,
    manifest: dict[str, Any],
    adapters_dir: Path,
    metrics: dict[str, Any],
    runs: dict[str, dict],
) -> list[Block]:
    """Where the figures come from: commit, data, adapters, accepted run, environment."""
    return [
        Block("h2", "Lineage and environment"),
        Block(
            "table",
            headers=("what", "value"),
            rows=(
                ("git commit", git_commit(Path.cwd())),
                (
                    "data",
                    f"{manifest['source']['name']} ({manifest['format']}, template "
                    f"{manifest['template']}); prepared data key {manifest['cache_key'][:16]}…"
                    + _too_long(manifest),
                ),
                *(
                    (
                        f"adapter {m} seed {s}",
                        f"sha256 {sha256_dir(seed_dir(adapters_dir / m, s))[:16]}…",
                    )
                    for s in cfg.seeds
                    for m in METHODS
                ),
                ("accepted run compared with", metrics["accepted"]),
                (
                    "seed (data, bootstrap, lm-eval); training seeds",
                    f"{cfg.seed}; {_seeds(cfg.seeds)}",
                ),
                ("CPU kernels", f"{cfg.runtime.cpu_kernels}, {cfg.runtime.threads} threads"),
                *environment_rows(runs),
            ),
        ),
        Block(
            "p",
            "dvc.lock records the exact hashes of data, params, adapters, exports and evaluations "
            "behind this report; with pinned CPU kernels (runtime.cpu_kernels) they are the same "
            "on other CPUs (see the README: what reproducible means here).",
        ),
    ]


def retention_text(t: dict[str, Any]) -> str:
    if t["retention"] is None or t["retention"] != t["retention"]:
        return "undefined (LoRA gain not significant)"
    dropped = t.get("retention_dropped") or 0
    return (
        f"{_fmt(t['retention'], 2)} [{_fmt(t['retention_ci_low'], 2)}, "
        f"{_fmt(t['retention_ci_high'], 2)}]"
        + (f" ({dropped} resamples dropped)" if dropped else "")
    )


def condition_row(c: dict[str, Any]) -> tuple[str, ...]:
    if c["estimate"] is None:
        figures = "n/a"
    else:
        figures = f"{c['estimate']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
    rule = (
        "not gated (threshold null)"
        if c["threshold"] is None
        else f"{c['rule']} {c['threshold']:+.3f}"
    )
    note = f" ({c['note']})" if c["note"] else ""
    return (c["task"], c["condition"] + note, figures, rule, c["verdict"])


def verdict_blocks(metrics: dict[str, Any], task: str, runs: dict[str, dict]) -> list[Block]:
    """The verdict banner and the headline numbers: what a reader needs first."""
    t = metrics["tasks"][task]
    fp = metrics["footprint_mb"]
    speed = [float(runs[m].get("tokens_per_s") or 0.0) for m in METHODS]
    seeds = t["seeds"]
    lines = [
        f"QLoRA − LoRA on {task}: {gap_text(t)}"
        + (
            f" pooled over seeds {_seeds(seeds)}; per seed "
            + ", ".join(f"{s['gap']['estimate']:+.3f}" for s in t["per_seed"])
            if len(seeds) > 1
            else f" (seed {seeds[0]})"
        ),
        noise_floor_text(t),
        f"retention: {retention_text(t)}",
        f"QLoRA / LoRA model footprint: {fp['qlora'] / fp['lora']:.2f}",
    ]
    if all(speed):
        lines.append(f"QLoRA / LoRA training tokens/s: {speed[0] / speed[1]:.2f} (this machine)")
    reasons = metrics["reasons"]
    return [
        Block(
            "verdict",
            f"Quality gate: {metrics['verdict']}"
            + (": " + "; ".join(reasons) if reasons else " — every condition holds"),
        ),
        Block("list", rows=tuple((line,) for line in lines)),
    ]


def protocol_rows(protocol: dict[str, Any], test_set: str | None) -> tuple[tuple[str, str], ...]:
    """The evaluation protocol as table rows: harness, settings, and each task's identity."""
    rows = [
        ("lm-eval", str(protocol.get("lm_eval", "n/a"))),
        ("template", str(protocol.get("template", "n/a"))),
        (
            "batch size, limit, max_gen_toks",
            f"{protocol.get('batch_size')}, {protocol.get('limit')}, {protocol.get('max_gen_toks')}",
        ),
        ("gen_kwargs", str(protocol.get("gen_kwargs"))),
        ("items longer than the context", str(protocol.get("long_items", "n/a"))),
        ("test set sha256", (test_set or "n/a")[:16] + "…"),
    ]
    for name, t in (protocol.get("tasks") or {}).items():
        rows.append(
            (
                f"task {name}",
                f"v{t['version']}, {t['num_fewshot']}-shot, {t['output_type']}, "
                f"config sha256 {t['config_sha256'][:12]}…",
            )
        )
    return tuple(rows)
