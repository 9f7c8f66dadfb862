"""The report step: read the evaluations and training runs, compute the figures and the gate's
verdict (figures.py, gate.py), write the hashed outputs (metrics.json, scores.csv, items.csv,
plots), then render the documents (sections.py → report.md and report.html)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from qlora_pipeline.config.schema import PipelineConfig
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.files import (
    atomic_dir,
    atomic_write_text,
    read_json,
    seed_dir,
    write_json,
)
from qlora_pipeline.reporting import gate, plots, sections
from qlora_pipeline.reporting.document import Block, summary, to_html, to_markdown
from qlora_pipeline.reporting.figures import (
    METHODS,
    MODELS,
    per_sample_scores,
    scores_csv,
    task_figures,
)
from qlora_pipeline.reporting.history import (
    accepted_metrics,
    anchor_rev,
    items_at,
    items_csv,
    repo_root,
)
from qlora_pipeline.reporting.quantization import quantization_blocks
from qlora_pipeline.reporting.stats import paired_difference
from qlora_pipeline.runtime import log
from qlora_pipeline.tracking import registry
from qlora_pipeline.tracking.perf import read_records

OTHER_SHIPPED = ("qlora_on_bf16", "merged")  # the shipped QLoRA adapter in its other forms


def _required(path: Path, stage: str) -> dict[str, Any]:
    if not path.is_file():
        raise PipelineError(f"{path}: not found; run the {stage} stage first")
    return read_json(path)


def evaluation_dirs(cfg: PipelineConfig, eval_dir: Path) -> dict[str, Path]:
    """Every evaluation folder the report reads, by label: `base`, `qlora@<seed>`, `lora@<seed>`,
    and the other shipped forms when their (optional) stages ran."""
    found = {"base": eval_dir / "base"}
    for arm in METHODS:
        found.update({f"{arm}@{s}": seed_dir(eval_dir / arm, s) for s in cfg.seeds})
    found.update(
        {m: eval_dir / m for m in OTHER_SHIPPED if (eval_dir / m / "metrics.json").is_file()}
    )
    return found


def trained_runs(cfg: PipelineConfig, adapters_dir: Path) -> dict[str, dict[str, Any]]:
    """train_metrics.json of every arm and seed, by `<arm>@<seed>`."""
    return {
        f"{arm}@{s}": _required(
            seed_dir(adapters_dir / arm, s) / "train_metrics.json", f"train@{arm}-{s}"
        )
        for arm in METHODS
        for s in cfg.seeds
    }


def past_revs(
    cfg: PipelineConfig, metrics_path: Path, protocol: dict, test_set: str
) -> dict[str, Any]:
    """The git revisions of the accepted and anchor runs, or why there is none.

    With `report.accepted_rev: promoted` (the default) the accepted run is the version in prod
    (pinned to its registry tag at compose time; resolved here when `dvc exp run` composed the
    params) and the anchor is the first registered version under this evaluation protocol and
    set. Otherwise the accepted run is any git revision, and the anchor the oldest commit whose
    report records this protocol and set.
    """
    accepted = cfg.report.accepted_rev
    root = repo_root(metrics_path)
    from_registry = registry.is_registry_ref(accepted)
    if accepted == registry.PROMOTED and root is not None:
        accepted = registry.promoted_ref(root)
    anchor = cfg.report.anchor_rev
    if anchor is None and root is not None:
        anchor = (
            registry.first_ref_under(root, protocol, test_set)
            if from_registry
            else anchor_rev(metrics_path, protocol, test_set)
        )
    none = "no promoted version yet (`qlora-pipeline promote`)" if from_registry else None
    return {
        "accepted": (accepted, none or "comparison off (report.accepted_rev: null)"),
        "anchor": (anchor, none or "no accepted run under this protocol and evaluation set yet"),
    }


def past_runs(cfg: PipelineConfig, out_dir: Path, protocol: dict, test_set: str) -> dict[str, Any]:
    """The accepted and anchor runs: (their metrics if comparable, where from, their per-item
    scores when the test set is the same)."""
    metrics_path = out_dir / "metrics.json"
    found_runs = {}
    for name, (rev, why_none) in past_revs(cfg, metrics_path, protocol, test_set).items():
        run, where = accepted_metrics(rev, metrics_path) if rev is not None else (None, why_none)
        found, where = gate.comparable_accepted(
            run, where, protocol, test_set, cfg.report.allow_protocol_change
        )
        same_items = found is not None and found.get("test_set") == test_set
        found_runs[name] = (
            found,
            where,
            items_at(rev, out_dir / "items.csv") if same_items and rev is not None else None,
        )
    return found_runs


def build_report(
    cfg: PipelineConfig,
    data_dir: str | Path,
    adapters_dir: str | Path,
    eval_dir: str | Path,
    out_dir: str | Path,
    exports_dir: str | Path | None = None,
    quant_dir: str | Path | None = None,
) -> dict:
    """Write metrics.json, summary.json (its headline), scores.csv, items.csv and the plots (DVC outputs: the same bytes on
    every machine), then the documents report.md and report.html (`write_documents`).

    Returns:
        The content of `metrics.json`.
    """
    data_dir, adapters_dir, eval_dir = Path(data_dir), Path(adapters_dir), Path(eval_dir)
    out_dir = Path(out_dir)
    dirs = evaluation_dirs(cfg, eval_dir)
    evaluated = {label: _required(d / "metrics.json", "evaluate") for label, d in dirs.items()}
    trains = trained_runs(cfg, adapters_dir)
    protocol, test_set = evaluated["base"].get("protocol"), evaluated["base"].get("test_set")
    for label, e in evaluated.items():
        changes = gate.protocol_changes(e.get("protocol") or {}, protocol or {})
        if changes or e.get("test_set") != test_set:
            raise PipelineError(
                f"{dirs[label] / 'metrics.json'}: evaluated under another protocol or test set "
                f"than base ({'; '.join(changes) or 'test set'}); rerun the evaluate stages"
            )
    past = past_runs(cfg, out_dir, protocol or {}, test_set or "")
    first = cfg.seeds[0]
    tasks: dict[str, dict[str, Any]] = {}
    items: dict[str, dict[str, np.ndarray]] = {}
    keys: dict[str, str] = {}
    for task in cfg.eval.tasks:
        keys[task] = evaluated["base"]["tasks"][task]["metric"]
        scores = {label: per_sample_scores(d, task, keys[task]) for label, d in dirs.items()}
        arms = {arm: [scores[f"{arm}@{s}"] for s in cfg.seeds] for arm in METHODS}
        tasks[task] = task_figures(
            scores["base"],
            arms,
            cfg.seeds,
            keys[task],
            {
                name: (
                    (run or {}).get("tasks", {}).get(task),
                    None if found is None else found.get((task, keys[task]), {}).get("qlora"),
                )
                for name, (run, _, found) in past.items()
            },
            cfg.seed,
        )
        for m in OTHER_SHIPPED:  # score, and drift from QLoRA as trained on the same items
            if m in scores:
                tasks[task]["shipped"][m] = {
                    "value": evaluated[m]["tasks"][task]["value"],
                    "stderr": evaluated[m]["tasks"][task]["stderr"],
                    "drift": paired_difference(scores[m], arms["qlora"][0], seed=cfg.seed),
                }
        # what ships, per item: the next run's gate pairs with these
        items[task] = {
            "base": scores["base"],
            **{arm: arms[arm][0] for arm in METHODS},
            **{m: scores[m] for m in OTHER_SHIPPED if m in scores},
        }
    verdict, reasons, found_conditions = gate.check(tasks, cfg.report.gate)
    as_shipped = {  # the first seed's arms; the base and the other forms have one evaluation
        m: evaluated[f"{m}@{first}" if m in METHODS else m]
        for m in (*MODELS, *OTHER_SHIPPED)
        if m in METHODS or m in evaluated
    }
    metrics = {
        "tasks": tasks,
        "verdict": verdict,
        "reasons": reasons,
        "conditions": found_conditions,
        "gate": dataclasses.asdict(cfg.report.gate),
        "seeds": list(cfg.seeds),
        "accepted": past["accepted"][1],
        "anchor": past["anchor"][1],
        "protocol": protocol,
        "test_set": test_set,
        "footprint_mb": {m: e["footprint_bytes"] / 2**20 for m, e in as_shipped.items()},
        "optimizer": {m: trains[f"{m}@{first}"]["optimizer"] for m in METHODS},
        "compute_dtype": {m: trains[f"{m}@{first}"].get("compute_dtype") for m in METHODS},
    }
    curves = {
        f"{arm} seed {s}": _read_curve(seed_dir(adapters_dir / arm, s) / "loss.csv")
        for s in cfg.seeds
        for arm in METHODS
    }
    with atomic_dir(out_dir) as tmp:
        plots.loss_curves(curves, tmp / "loss_curves.png")
        atomic_write_text(
            tmp / "loss.csv", loss_csv({m: curves[f"{m} seed {first}"] for m in METHODS})
        )
        plots.scores(
            {t: {m: (v[m], v[f"{m}_stderr"] or 0.0) for m in MODELS} for t, v in tasks.items()},
            tmp / "scores.png",
        )
        plots.gap_bars(tasks, cfg.report.gate.max_drop_vs_lora, tmp / "gap.png")
        atomic_write_text(tmp / "scores.csv", scores_csv(tasks))
        atomic_write_text(tmp / "items.csv", items_csv(items, keys))
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "summary.json", summary(metrics))
    write_documents(
        cfg,
        data_dir,
        adapters_dir,
        out_dir,
        Path(exports_dir) if exports_dir else None,
        quant_dir=Path(quant_dir) if quant_dir else None,
    )
    log.info("report: quality gate %s -> %s", verdict, out_dir / "report.md")
    for reason in reasons:
        log.warning("report: gate: %s", reason)
    return metrics


def loss_csv(curves: dict[str, tuple[list[float], list[float]]]) -> str:
    """Plot data for `dvc plots show`: the shipped seed's training loss per step, a column per
    arm (empty where an arm logged no loss at that step). Written beside the report, not read
    from inside the adapters' DVC outputs: `dvc exp save` would add plot sources to git."""
    by_step: dict[float, dict[str, float]] = {}
    for arm, (steps, losses) in curves.items():
        for step, loss in zip(steps, losses, strict=True):
            by_step.setdefault(step, {})[arm] = loss
    lines = [",".join(["step", *curves])]
    lines += [
        ",".join([f"{step:g}", *(repr(row[a]) if a in row else "" for a in curves)])
        for step, row in sorted(by_step.items())
    ]
    return "\n".join(lines) + "\n"


def _read_curve(path: Path) -> tuple[list[float], list[float]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    steps, losses = [], []
    for line in lines:
        step, loss, *_ = line.split(",")
        steps.append(float(step))
        losses.append(float(loss))
    return steps, losses


def write_documents(
    cfg: PipelineConfig,
    data_dir: Path,
    adapters_dir: Path,
    out_dir: Path,
    exports_dir: Path | None,
    runs_dir: Path | None = None,
    quant_dir: Path | None = None,
) -> None:
    """Render report.md and report.html from the written figures and the run records.

    Not DVC outputs: they show machine-specific figures (timings, memory, device). The flow
    renders them again at the end of every run, so they show the latest run records.
    """
    metrics = read_json(out_dir / "metrics.json")
    first = cfg.seeds[0]
    trains = {
        m: read_json(seed_dir(adapters_dir / m, first) / "train_metrics.json") for m in METHODS
    }
    manifest = read_json(data_dir / "manifest.json")
    runs = read_records(runs_dir or cfg.paths.runs)
    shipped_runs = {m: runs.get(f"train@{m}-{first}", {}) for m in METHODS}
    blocks: list[Block] = [
        Block("h1", cfg.report.title),
        *sections.verdict_blocks(metrics, cfg.eval.tasks[0], shipped_runs),
        *sections.quality_blocks(metrics),
        *sections.seed_blocks(metrics),
        *sections.shipped_blocks(metrics["tasks"]),
        Block("img", "gap.png"),
        Block("img", "scores.png"),
        *sections.gate_blocks(metrics, cfg.report.gate.enforce),
        *sections.performance_blocks(shipped_runs, trains, metrics),
        *sections.export_blocks(exports_dir),
        *quantization_blocks(quant_dir),
        *sections.settings_blocks(cfg, trains),
        *sections.protocol_blocks(metrics),
        *sections.lineage_blocks(cfg, manifest, adapters_dir, metrics, runs),
    ]
    atomic_write_text(out_dir / "report.md", to_markdown(blocks))
    atomic_write_text(out_dir / "report.html", to_html(blocks, cfg.report.title, out_dir))
