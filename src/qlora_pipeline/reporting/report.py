"""The report step: quality gap, memory and speed, side by side, as Markdown, HTML and metrics.json.

The document is built once as a list of blocks and rendered twice (Markdown and a self-contained
HTML page with the plots embedded), so the two never disagree.
"""

from __future__ import annotations

import base64
import html
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qlora_pipeline.config.schema import PipelineConfig
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import atomic_dir, atomic_write_text, read_json, sha256_dir, write_json
from qlora_pipeline.reporting import plots
from qlora_pipeline.reporting.stats import paired_bootstrap
from qlora_pipeline.runtime import library_versions, log

MODELS = ("base", "qlora", "lora")
METHODS = ("qlora", "lora")


@dataclass
class Block:
    kind: str  # h1 | h2 | p | table | img
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
        elif b.kind == "table":
            out.append("| " + " | ".join(b.headers) + " |")
            out.append("|" + "|".join("---" for _ in b.headers) + "|")
            out.extend("| " + " | ".join(r) + " |" for r in b.rows)
        out.append("")
    return "\n".join(out)


def to_html(blocks: list[Block], title: str, folder: Path) -> str:
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            body.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind == "img":
            data = base64.b64encode((folder / Path(b.text).name).read_bytes()).decode()
            body.append(
                f'<img alt="{html.escape(Path(b.text).stem)}" src="data:image/png;base64,{data}">'
            )
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;"
        "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%;display:block;margin:1rem 0}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def per_sample_scores(eval_dir: Path, task: str, metric: str) -> np.ndarray:
    """Per-item scores from the harness' samples, ordered by document id."""
    path = eval_dir / f"samples_{task}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    rows.sort(key=lambda r: r["doc_id"])
    return np.array([float(r[metric]) for r in rows])


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


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


def build_report(
    cfg: PipelineConfig,
    data_dir: str | Path,
    adapters_dir: str | Path,
    eval_dir: str | Path,
    out_dir: str | Path,
) -> dict:
    """Write report.md, report.html, metrics.json and the plots (atomically).

    Returns:
        The content of `metrics.json`.
    """
    data_dir, adapters_dir, eval_dir = Path(data_dir), Path(adapters_dir), Path(eval_dir)
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
    manifest = read_json(data_dir / "manifest.json")

    blocks: list[Block] = [Block("h1", cfg.report.title)]
    task_rows, metrics_tasks = [], {}
    for task in cfg.eval.tasks:
        res = {m: evals[m]["tasks"][task] for m in MODELS}
        metric = res["base"]["metric"]
        scores = {m: per_sample_scores(eval_dir / m, task, metric.split(",")[0]) for m in MODELS}
        stats = paired_bootstrap(scores["base"], scores["qlora"], scores["lora"], seed=cfg.seed)
        gains = {m: res[m]["value"] - res["base"]["value"] for m in METHODS}
        passed = all(g >= cfg.report.min_gain for g in gains.values())
        metrics_tasks[task] = {
            "metric": metric,
            "n": res["base"]["n"],
            **{m: res[m]["value"] for m in MODELS},
            **{f"{m}_stderr": res[m]["stderr"] for m in MODELS},
            **{f"{m}_gain": gains[m] for m in METHODS},
            **stats,
            "both_beat_base": passed,
        }
        task_rows.append(
            (
                task,
                f"{metric} (n={res['base']['n']})",
                *(f"{res[m]['value']:.3f} ± {_fmt(res[m]['stderr'])}" for m in MODELS),
                f"{stats['gap']:+.3f} [{stats['gap_ci_low']:+.3f}, {stats['gap_ci_high']:+.3f}]",
                f"{_fmt(stats['retention'], 2)} [{_fmt(stats['retention_ci_low'], 2)}, "
                f"{_fmt(stats['retention_ci_high'], 2)}]",
            )
        )
    first = metrics_tasks[cfg.eval.tasks[0]]
    verdict = "PASS" if all(t["both_beat_base"] for t in metrics_tasks.values()) else "FAIL"
    blocks += [
        Block(
            "p",
            (
                f"QLoRA keeps {_fmt(first['retention'] * 100, 0)}% of LoRA's gain over the base model "
                f"on {cfg.eval.tasks[0]} (QLoRA − LoRA = {first['gap']:+.3f}, "
                f"95% CI [{first['gap_ci_low']:+.3f}, {first['gap_ci_high']:+.3f}]). "
                f"Both beat base by ≥ {cfg.report.min_gain}: {verdict}."
            ),
        ),
        Block("h2", "Quality"),
        Block(
            "table",
            headers=(
                "task",
                "metric",
                "base",
                "QLoRA",
                "LoRA",
                "QLoRA − LoRA [95% CI]",
                "retention [95% CI]",
            ),
            rows=tuple(task_rows),
        ),
        Block(
            "p",
            "Scores are mean ± standard error from lm-eval. Intervals: paired bootstrap over "
            "test items (2000 resamples). Retention = (QLoRA − base) / (LoRA − base).",
        ),
    ]

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        curves = {m: _read_curve(adapters_dir / m / "loss.csv") for m in METHODS}
        plots.loss_curves(curves, tmp / "loss_curves.png")
        task0 = cfg.eval.tasks[0]
        plots.scores(
            {
                m: (evals[m]["tasks"][task0]["value"], evals[m]["tasks"][task0]["stderr"] or 0.0)
                for m in MODELS
            },
            evals["base"]["tasks"][task0]["metric"],
            tmp / "scores.png",
        )
        blocks.append(Block("img", "scores.png"))
        mb = 2**20
        blocks += [
            Block("h2", "Memory and speed"),
            Block(
                "table",
                headers=("", "QLoRA", "LoRA"),
                rows=(
                    (
                        "base weights",
                        *(
                            f"4-bit {q['quant_type']}{' + DQ' if q['double_quant'] else ''} (compute {q['compute_dtype']})"
                            if (q := trains[m]["quantization"])
                            else trains[m]["base_dtype"]
                            for m in METHODS
                        ),
                    ),
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
                    ("device", *(trains[m]["device"] for m in METHODS)),
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
                    (
                        "model footprint at eval (MB)",
                        *(_fmt(evals[m]["footprint_bytes"] / mb, 2) for m in METHODS),
                    ),
                    (
                        "peak memory in training (MB)",
                        *(
                            _fmt(
                                trains[m].get("peak_cuda_allocated_mb", trains[m]["peak_rss_mb"]), 0
                            )
                            + (" CUDA" if "peak_cuda_allocated_mb" in trains[m] else " RSS")
                            for m in METHODS
                        ),
                    ),
                    ("tokens/s", *(_fmt(trains[m]["tokens_per_s"], 0) for m in METHODS)),
                    ("training time (s)", *(_fmt(trains[m]["train_s"], 1) for m in METHODS)),
                    (
                        "steps; first → final loss",
                        *(
                            f"{trains[m]['steps']}; {_fmt(trains[m]['first_loss'])} → {_fmt(trains[m]['final_loss'])}"
                            for m in METHODS
                        ),
                    ),
                ),
            ),
            Block(
                "p",
                f"Base model footprint: {_fmt(evals['base']['footprint_bytes'] / mb, 2)} MB "
                f"({cfg.methods['lora'].base_dtype}). Peak RSS is the whole process, so on a tiny "
                "model it is dominated by the libraries, not the weights. Paged optimizers page "
                "only on CUDA; on CPU bitsandbytes runs them as plain AdamW.",
            ),
            Block("img", "loss_curves.png"),
        ]
        lineage_rows = [
            ("git commit", git_commit(Path.cwd())),
            (
                "data",
                f"{manifest['source']['name']} ({manifest['format']}, template "
                f"{manifest['template']}); prepared data key {manifest['cache_key'][:16]}…",
            ),
            *((f"adapter {m}", f"sha256 {sha256_dir(adapters_dir / m)[:16]}…") for m in METHODS),
            ("seed", str(cfg.seed)),
            ("libraries", ", ".join(f"{k} {v}" for k, v in library_versions().items())),
        ]
        blocks += [
            Block("h2", "Lineage"),
            Block("table", headers=("what", "value"), rows=tuple(lineage_rows)),
            Block(
                "p",
                "dvc.lock records the exact hashes of data, params and adapters behind this report.",
            ),
        ]
        metrics = {
            "tasks": metrics_tasks,
            "verdict": verdict,
            "footprint_mb": {m: evals[m]["footprint_bytes"] / mb for m in MODELS},
            "tokens_per_s": {m: trains[m]["tokens_per_s"] for m in METHODS},
            "train_s": {m: trains[m]["train_s"] for m in METHODS},
            "peak_rss_mb": {m: trains[m]["peak_rss_mb"] for m in METHODS},
        }
        atomic_write_text(tmp / "report.md", to_markdown(blocks))
        atomic_write_text(tmp / "report.html", to_html(blocks, cfg.report.title, tmp))
        write_json(tmp / "metrics.json", metrics)
    log.info("report: %s -> %s", verdict, out_dir / "report.md")
    return metrics
