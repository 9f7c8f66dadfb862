"""The report step: quality gap, memory and speed, side by side, as Markdown, HTML and metrics.json.

The document is built once as a list of blocks and rendered twice (Markdown and a self-contained
HTML page with the plots embedded), so the two never disagree.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qlora_pipeline.config.schema import PipelineConfig
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.evaluation.evaluate import SHIPPED
from qlora_pipeline.files import atomic_dir, atomic_write_text, read_json, sha256_dir, write_json
from qlora_pipeline.reporting import gate, plots
from qlora_pipeline.reporting.history import accepted_metrics, anchor_rev, items_at, items_csv
from qlora_pipeline.reporting.stats import (
    is_binary,
    mcnemar,
    paired_bootstrap,
    paired_difference,
    unpaired_difference,
)
from qlora_pipeline.runtime import log
from qlora_pipeline.tracking.perf import git_commit, read_records

MODELS = ("base", "qlora", "lora")
METHODS = ("qlora", "lora")


@dataclass
class Block:
    kind: str  # h1 | h2 | p | table | img | verdict (the PASS/FAIL banner) | list
    text: str = ""
    headers: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            out.append(("#" if b.kind == "h1" else "##") + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "img":
            out.append(f"![{Path(b.text).stem}]({Path(b.text).name})")
        elif b.kind == "verdict":
            out.append(f"> **{b.text}**")
        elif b.kind == "list":
            out.extend(f"- {r[0]}" for r in b.rows)
        elif b.kind == "table":
            out.append("| " + " | ".join(b.headers) + " |")
            out.append("|" + "|".join("---" for _ in b.headers) + "|")
            out.extend("| " + " | ".join(r) + " |" for r in b.rows)
        out.append("")
    return "\n".join(out)


def inline(text: str) -> str:
    """Escaped text with Markdown's `code` spans as <code>: no raw Markdown in the page."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def to_html(blocks: list[Block], title: str, folder: Path) -> str:
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            body.append(f"<{b.kind}>{inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{inline(b.text)}</p>")
        elif b.kind == "verdict":
            state = "pass" if "PASS" in b.text.split(":", 2)[1] else "fail"
            body.append(f'<div class="verdict {state}">{inline(b.text)}</div>')
        elif b.kind == "list":
            body.append("<ul>" + "".join(f"<li>{inline(r[0])}</li>" for r in b.rows) + "</ul>")
        elif b.kind == "img":
            data = base64.b64encode((folder / Path(b.text).name).read_bytes()).decode()
            body.append(
                f'<img alt="{html.escape(Path(b.text).stem)}" src="data:image/png;base64,{data}">'
            )
        elif b.kind == "table":
            head = "".join(f"<th>{inline(h)}</th>" for h in b.headers)
            rows = "".join(
                "<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in b.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:72rem;margin:1.5rem auto;padding:0 1rem;"
        "color:#222}table{border-collapse:collapse;margin:1rem 0;width:100%;table-layout:auto;"
        "font-size:.85rem}td,th{border:1px solid #ccc;padding:.25rem .45rem;text-align:right;"
        "overflow-wrap:anywhere}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%;display:block;margin:1rem 0}code{background:#f3f3f3;padding:0 .2rem}"
        ".verdict{font-size:1.3rem;font-weight:600;padding:.8rem 1rem;border-radius:.4rem;"
        "margin:1rem 0}.pass{background:#e3f6e5;border:2px solid #2e7d32}"
        ".fail{background:#fde8e8;border:2px solid #c62828}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def per_sample_scores(eval_dir: Path, task: str, key: str) -> np.ndarray:
    """Per-item scores of `key` ("metric,filter") from the harness' samples, by document id.

    A task with several filters (gsm8k: strict and flexible extraction) logs one sample row per
    filter and item; only the rows of the key's filter are taken, so they never mix.
    """
    metric, _, filt = key.partition(",")
    path = eval_dir / f"samples_{task}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    rows = [r for r in rows if r.get("filter", filt) == filt]
    rows.sort(key=lambda r: r["doc_id"])
    return np.array([float(r[metric]) for r in rows])


def versus(
    scores: np.ndarray, value: float, stderr: float | None, past: dict | None, items: Any, seed: int
) -> dict[str, Any] | None:
    """QLoRA now minus QLoRA in a past run: paired over the same items when the past run's
    per-item scores are there (same test set), else unpaired from the two standard errors."""
    if past is None:
        return None
    if items is not None and len(items) == len(scores):
        return {**paired_difference(scores, items, seed=seed), "paired": True}
    return {
        **unpaired_difference(value, stderr or 0.0, past["qlora"], past.get("qlora_stderr") or 0.0),
        "paired": False,
    }


def _read_curve(path: Path) -> tuple[list[float], list[float]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    steps, losses = [], []
    for line in lines:
        step, loss, *_ = line.split(",")
        steps.append(float(step))
        losses.append(float(loss))
    return steps, losses


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


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


def task_figures(
    scores: dict[str, np.ndarray],
    res: dict[str, dict],
    seed: int,
    past: dict[str, tuple[dict | None, Any]],
) -> dict[str, Any]:
    """Per-task statistics: scores; gains, gap and retention with paired-bootstrap intervals;
    McNemar when the metric is 0/1 per item; the change against the accepted and anchor runs.

    Args:
        past: {"accepted" | "anchor": (that run's figures for this task or None, its per-item
            QLoRA scores or None)}.
    """
    stats = paired_bootstrap(scores["base"], scores["qlora"], scores["lora"], seed=seed)
    binary = is_binary(scores["qlora"]) and is_binary(scores["lora"])
    figures: dict[str, Any] = {
        "metric": res["base"]["metric"],
        "n": res["base"]["n"],
        **{m: res[m]["value"] for m in MODELS},
        **{f"{m}_stderr": res[m]["stderr"] for m in MODELS},
        **stats,
        "mcnemar": mcnemar(scores["qlora"], scores["lora"]) if binary else None,
    }
    accepted = past["accepted"][0]
    for m in METHODS:
        figures[f"{m}_vs_accepted"] = (
            figures[m] - accepted[m] if accepted is not None and m in accepted else None
        )
    for name, (run, items) in past.items():
        figures[f"vs_{name}"] = versus(
            scores["qlora"], figures["qlora"], figures["qlora_stderr"], run, items, seed
        )
    return figures


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


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def build_report(
    cfg: PipelineConfig,
    data_dir: str | Path,
    adapters_dir: str | Path,
    eval_dir: str | Path,
    out_dir: str | Path,
    exports_dir: str | Path | None = None,
) -> dict:
    """Write metrics.json, scores.csv and the plots (DVC outputs: the same bytes on every
    machine), then the documents report.md and report.html (`write_documents`).

    Returns:
        The content of `metrics.json`.
    """
    data_dir, adapters_dir, eval_dir = Path(data_dir), Path(adapters_dir), Path(eval_dir)
    out_dir = Path(out_dir)
    evals, trains = {}, {}
    for m in MODELS:
        path = eval_dir / m / "metrics.json"
        if not path.is_file():
            raise PipelineError(f"{path}: not found; run the evaluate stage for '{m}' first")
        evals[m] = read_json(path)
    for m in METHODS:
        path = adapters_dir / m / "train_metrics.json"
        if not path.is_file():
            raise PipelineError(f"{path}: not found; run the train stage for '{m}' first")
        trains[m] = read_json(path)
    shipped = {  # the other shipped forms of the QLoRA adapter, when evaluated (optional stages)
        m: read_json(eval_dir / m / "metrics.json")
        for m in ("qlora_on_bf16", "merged")
        if (eval_dir / m / "metrics.json").is_file()
    }
    evaluated = {**evals, **shipped}
    protocol, test_set = evals["base"].get("protocol"), evals["base"].get("test_set")
    for m, e in evaluated.items():
        changes = gate.protocol_changes(e.get("protocol") or {}, protocol or {})
        if changes or e.get("test_set") != test_set:
            raise PipelineError(
                f"{eval_dir / m / 'metrics.json'}: evaluated under another protocol or test set "
                f"than base ({'; '.join(changes) or 'test set'}); rerun the evaluate stages"
            )
    metrics_path = out_dir / "metrics.json"
    past_runs = {}
    for name, rev in (
        ("accepted", cfg.report.accepted_rev),
        ("anchor", cfg.report.anchor_rev or anchor_rev(metrics_path, protocol or {})),
    ):
        found, where = gate.comparable_accepted(
            *(
                accepted_metrics(rev, metrics_path)
                if rev is not None or name == "accepted"
                else (None, "no accepted run under this evaluation protocol yet")
            ),
            protocol or {},
            test_set or "",
            cfg.report.allow_protocol_change,
        )
        same_items = found is not None and found.get("test_set") == test_set
        past_runs[name] = (
            found,
            where,
            items_at(rev, out_dir / "items.csv") if same_items and rev is not None else None,
        )
    accepted_from = past_runs["accepted"][1]

    tasks: dict[str, dict[str, Any]] = {}
    items: dict[str, dict[str, np.ndarray]] = {}
    keys: dict[str, str] = {}
    for task in cfg.eval.tasks:
        res = {m: evaluated[m]["tasks"][task] for m in evaluated}
        keys[task] = res["base"]["metric"]
        items[task] = {m: per_sample_scores(eval_dir / m, task, keys[task]) for m in evaluated}
        past = {
            name: (
                (run or {}).get("tasks", {}).get(task),
                None if run_items is None else run_items.get((task, keys[task]), {}).get("qlora"),
            )
            for name, (run, _, run_items) in past_runs.items()
        }
        tasks[task] = task_figures(items[task], res, cfg.seed, past)
        for m in shipped:  # score, and drift from QLoRA as trained on the same items [interval]
            drift = paired_difference(items[task][m], items[task]["qlora"], seed=cfg.seed)
            tasks[task].update(
                {m: res[m]["value"], f"{m}_stderr": res[m]["stderr"], f"{m}_drift": drift}
            )
    verdict, reasons, found_conditions = gate.check(tasks, cfg.report.gate)
    metrics = {
        "tasks": tasks,
        "verdict": verdict,
        "reasons": reasons,
        "conditions": found_conditions,
        "gate": dataclasses.asdict(cfg.report.gate),
        "accepted": accepted_from,
        "anchor": past_runs["anchor"][1],
        "protocol": protocol,
        "test_set": test_set,
        "footprint_mb": {m: e["footprint_bytes"] / 2**20 for m, e in evaluated.items()},
        "optimizer": {m: trains[m]["optimizer"] for m in METHODS},
        "compute_dtype": {m: trains[m].get("compute_dtype") for m in METHODS},
    }
    with atomic_dir(out_dir) as tmp:
        curves = {m: _read_curve(adapters_dir / m / "loss.csv") for m in METHODS}
        plots.loss_curves(curves, tmp / "loss_curves.png")
        plots.scores(
            {t: {m: (v[m], v[f"{m}_stderr"] or 0.0) for m in MODELS} for t, v in tasks.items()},
            tmp / "scores.png",
        )
        plots.gap_bars(
            {t: (v["gap"], v["gap_ci_low"], v["gap_ci_high"]) for t, v in tasks.items()},
            cfg.report.gate.max_drop_vs_lora,
            tmp / "gap.png",
        )
        atomic_write_text(tmp / "scores.csv", scores_csv(tasks))
        atomic_write_text(tmp / "items.csv", items_csv(items, keys))
        write_json(tmp / "metrics.json", metrics)
    write_documents(
        cfg, data_dir, adapters_dir, out_dir, Path(exports_dir) if exports_dir else None
    )
    log.info("report: quality gate %s -> %s", verdict, out_dir / "report.md")
    for reason in reasons:
        log.warning("report: gate: %s", reason)
    return metrics


def _stage_figure(runs: dict[str, dict], stage: str, key: str, digits: int = 1) -> str:
    value = runs.get(stage, {}).get(key)
    return "n/a" if value is None else f"{value:.{digits}f}"


def performance_blocks(
    runs: dict[str, dict], trains: dict[str, dict], metrics: dict[str, Any]
) -> list[Block]:
    """Memory and speed: deterministic footprints, and the measured figures of the runs that
    produced these outputs (from the run records; they differ per machine and are never hashed)."""
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
        ("measured on", *(str(runs.get(f"train@{m}", {}).get("device", "n/a")) for m in METHODS)),
        (
            "peak memory in training (MB)",
            *(
                _stage_figure(runs, f"train@{m}", "peak_cuda_allocated_mb", 0) + " CUDA"
                if "peak_cuda_allocated_mb" in runs.get(f"train@{m}", {})
                else _stage_figure(runs, f"train@{m}", "peak_rss_mb", 0) + " RSS"
                for m in METHODS
            ),
        ),
        ("tokens/s", *(_stage_figure(runs, f"train@{m}", "tokens_per_s", 0) for m in METHODS)),
        ("training time (s)", *(_stage_figure(runs, f"train@{m}", "train_s") for m in METHODS)),
        (
            "train stage wall time (s)",
            *(_stage_figure(runs, f"train@{m}", "wall_s") for m in METHODS),
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
        (runs[s]["environment"] for s in ("train@qlora", "report", *sorted(runs)) if s in runs),
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


def write_documents(
    cfg: PipelineConfig,
    data_dir: Path,
    adapters_dir: Path,
    out_dir: Path,
    exports_dir: Path | None,
    runs_dir: Path | None = None,
) -> None:
    """Render report.md and report.html from the written figures and the run records.

    Not DVC outputs: they show machine-specific figures (timings, memory, device). The flow
    renders them again at the end of every run, so they show the latest run records.
    """
    metrics = read_json(out_dir / "metrics.json")
    trains = {m: read_json(adapters_dir / m / "train_metrics.json") for m in METHODS}
    manifest = read_json(data_dir / "manifest.json")
    runs = read_records(runs_dir or cfg.paths.runs)
    tasks, verdict = metrics["tasks"], metrics["verdict"]
    g = cfg.report.gate
    first_name = cfg.eval.tasks[0]
    blocks: list[Block] = [
        Block("h1", cfg.report.title),
        *verdict_blocks(metrics, first_name, runs),
        Block("h2", "Quality"),
        Block(
            "table",
            headers=(
                "task (metric, n)",
                "base",
                "QLoRA",
                "LoRA",
                "QLoRA − LoRA [95% CI]",
                "McNemar p",
                "retention [95% CI]",
                "Δ vs accepted (QLoRA / LoRA)",
            ),
            rows=tuple(
                (
                    f"{task} ({t['metric']}, n={t['n']})",
                    *(f"{t[m]:.3f} ± {_fmt(t[f'{m}_stderr'])}" for m in MODELS),
                    f"{t['gap']:+.3f} [{t['gap_ci_low']:+.3f}, {t['gap_ci_high']:+.3f}]",
                    _fmt(t["mcnemar"]["p_value"]) if t["mcnemar"] else "n/a (not 0/1)",
                    retention_text(t),
                    f"{_signed(t['qlora_vs_accepted'])} / {_signed(t['lora_vs_accepted'])}",
                )
                for task, t in tasks.items()
            ),
        ),
        Block(
            "p",
            "Scores are mean ± standard error from lm-eval. Intervals: paired bootstrap over "
            "test items (2000 resamples). McNemar: exact two-sided test of QLoRA vs LoRA on the "
            "items where exactly one is right. Retention = (QLoRA − base) / (LoRA − base), defined "
            f"only when LoRA's gain is significant. Accepted run: {metrics['accepted']}.",
        ),
        *shipped_blocks(tasks),
        Block("img", "gap.png"),
        Block("img", "scores.png"),
        Block("h2", f"Quality gate: {verdict}"),
        Block(
            "table",
            headers=("task", "condition", "estimate [95% CI]", "rule", "verdict"),
            rows=tuple(condition_row(c) for c in metrics["conditions"]),
        ),
        Block(
            "p",
            "Each condition is decided on its 95% interval, never on the point estimate: a "
            "required gain must hold at the interval's lower bound, and a drop fails only when "
            "the whole interval is below the tolerated margin. "
            + ("Enforced: `qlora-pipeline run` exits 3 on FAIL." if g.enforce else "Not enforced.")
            + f" Anchor for cumulative drift: {metrics.get('anchor', 'n/a')}.",
        ),
        *performance_blocks(runs, trains, metrics),
        *export_blocks(exports_dir),
        *settings_blocks(cfg, trains),
        Block("h2", "Evaluation protocol"),
        Block(
            "table",
            headers=("what", "value"),
            rows=protocol_rows(metrics.get("protocol") or {}, metrics.get("test_set")),
        ),
        Block("h2", "Lineage and environment"),
        Block(
            "table",
            headers=("what", "value"),
            rows=(
                ("git commit", git_commit(Path.cwd())),
                (
                    "data",
                    f"{manifest['source']['name']} ({manifest['format']}, template "
                    f"{manifest['template']}); prepared data key {manifest['cache_key'][:16]}…",
                ),
                *(
                    (f"adapter {m}", f"sha256 {sha256_dir(adapters_dir / m)[:16]}…")
                    for m in METHODS
                ),
                ("accepted run compared with", metrics["accepted"]),
                ("seed", str(cfg.seed)),
                ("CPU kernels", f"{cfg.runtime.cpu_kernels}, {cfg.runtime.threads} threads"),
                *environment_rows(runs),
            ),
        ),
        Block(
            "p",
            "dvc.lock records the exact hashes of data, params, adapters, exports and evaluations "
            "behind this report; with pinned CPU kernels (runtime.cpu_kernels) they are the same on other CPUs "
            "(see the README: what reproducible means here).",
        ),
    ]
    atomic_write_text(out_dir / "report.md", to_markdown(blocks))
    atomic_write_text(out_dir / "report.html", to_html(blocks, cfg.report.title, out_dir))


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
    """What ships, scored with the same harness settings, and each form's drift from the QLoRA
    model as trained, paired on the same items."""
    rows = []
    for task, t in tasks.items():
        for m, label in SHIPPED.items():
            if m not in t:
                continue
            drift = t.get(f"{m}_drift")
            rows.append(
                (
                    task,
                    label,
                    f"{t[m]:.3f} ± {_fmt(t[f'{m}_stderr'])}",
                    "—"
                    if m == "qlora"
                    else f"{drift['estimate']:+.3f} [{drift['ci_low']:+.3f}, {drift['ci_high']:+.3f}]"
                    if drift
                    else f"{t[m] - t['qlora']:+.3f} (other arm)",
                )
            )
    return [
        Block("h2", "What ships"),
        Block(
            "table",
            headers=("task", "artifact", "score", "drift from QLoRA as trained [95% CI]"),
            rows=tuple(rows),
        ),
        Block(
            "p",
            "The same harness settings for every artifact. Drift: paired bootstrap over the same "
            "test items. LoRA is the other arm (its difference is the quality gap above).",
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
    speed = [float(runs.get(f"train@{m}", {}).get("tokens_per_s") or 0.0) for m in METHODS]
    lines = [
        f"QLoRA − LoRA on {task}: {t['gap']:+.3f} [{t['gap_ci_low']:+.3f}, {t['gap_ci_high']:+.3f}]",
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


def scores_csv(tasks: dict[str, dict[str, Any]]) -> str:
    """Plot data for `dvc plots show`: one row per task and model."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["task", "model", "score", "ci_low", "ci_high"])
    for task, t in tasks.items():
        for m in MODELS:
            half = 1.96 * (t[f"{m}_stderr"] or 0.0)
            writer.writerow([task, m, t[m], t[m] - half, t[m] + half])
    return buf.getvalue()
