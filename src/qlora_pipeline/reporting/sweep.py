"""The sweep report: one row per point (quality gap [interval], retention, noise floor, memory,
speed, adapter size) and quality against memory with the Pareto front marked, as Markdown and a
self-contained HTML page.

Memory is what the configuration costs, by tensor accounting of the shipped QLoRA training: the
base weights as trained, the adapter, its gradients and the optimizer state (plus the measured
CUDA peak on a GPU). Not process RSS: on a CPU that is mostly the libraries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_pipeline.files import atomic_dir
from qlora_pipeline.modeling.plan import OPTIMIZER_BYTES
from qlora_pipeline.reporting import plots
from qlora_pipeline.reporting.document import Block, to_html, to_markdown
from qlora_pipeline.reporting.sections import gap_text, retention_text

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
MB = 2**20


def training_bytes(train: dict[str, Any]) -> dict[str, int]:
    """Bytes of each tensor group of one training (its train_metrics.json): the base as trained
    (measured footprint), the trainable adapter in its dtype, its gradients, the optimizer's
    state per trainable parameter, and their total."""
    n = int(train["trainable_params"])
    item = ITEMSIZE[train["loaded_dtypes"]["LoRA adapter weights"]]
    parts = {
        "weights": int(train["base_footprint_bytes"]),
        "adapter": n * item,
        "gradients": n * item,
        "optimizer": int(n * OPTIMIZER_BYTES[train["optimizer"]]),
    }
    return parts | {"total": sum(parts.values())}


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """For each (memory, quality): True when no other point has at most its memory and at
    least its quality, and is better in one of them (the Pareto front: less memory, more
    quality)."""
    return [
        not any(
            m2 <= m and q2 >= q and (m2 < m or q2 > q)
            for j, (m2, q2) in enumerate(points)
            if j != i
        )
        for i, (m, q) in enumerate(points)
    ]


def _mb(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x / MB:.{digits}f}"


def point_cells(r: dict[str, Any], on_front: bool) -> tuple[str, ...]:
    """One point's row of the sweep table."""
    f, mem = r["figures"], r["memory"]
    return (
        r["name"],
        " ".join(r["label"]) or "-",
        f"{f['qlora']:.3f} ± {1.96 * f['qlora_stderr']:.3f}",
        f"{f['lora']:.3f}",
        gap_text(f),
        retention_text(f),
        "n/a" if f.get("noise_floor") is None else f"{f['noise_floor']:.3f}",
        r["verdict"],
        _mb(mem["total"]),
        _mb(mem["weights"]) + " / " + _mb(mem["adapter"] + mem["gradients"] + mem["optimizer"]),
        "—" if r.get("peak_cuda_mb") is None else f"{r['peak_cuda_mb']:.0f}",
        "—" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:.0f}",
        f"{r['adapter_bytes'] / 1024:.0f}",
        "yes" if on_front else "",
    )


def search_blocks(search: dict[str, Any] | None, rows: list[dict[str, Any]]) -> list[Block]:
    """What Optuna found (its own Pareto solutions, optimization_results.yaml), by point."""
    if not search:
        return []
    by_values = {
        (round(r["figures"]["qlora"], 9), round(r["memory"]["total"] / MB, 9)): r["name"]
        for r in rows
    }
    found = [
        by_values.get((round(s["values"][0], 9), round(s["values"][1], 9)), "?")
        for s in search.get("solutions", [])
    ]
    return [
        Block("h2", "Search"),
        Block(
            "p",
            f"Hydra's Optuna sweeper (NSGA-II, seeded; objectives: QLoRA score up, memory down) "
            f"ran {len(rows)} trials. Its Pareto solutions (optimization_results.yaml): "
            f"{', '.join(sorted(set(found))) or 'none'}.",
        ),
    ]


def sweep_blocks(rows: list[dict[str, Any]], title: str) -> list[Block]:
    task = rows[0]["task"]
    front = pareto([(r["memory"]["total"], r["figures"]["qlora"]) for r in rows])
    table = tuple(point_cells(r, on) for r, on in zip(rows, front, strict=True))
    best = [r["name"] for r, on in zip(rows, front, strict=True) if on]
    return [
        Block("h1", title),
        Block(
            "p",
            f"{len(rows)} points, each its own DVC experiment (`qlora-pipeline experiments`, "
            f"`dvc exp show`); figures of {task}, QLoRA against the bf16 LoRA baseline trained "
            "on the same data. Pareto front (no other point has less memory and more QLoRA "
            f"quality): {', '.join(best)}.",
        ),
        Block(
            "table",
            headers=(
                "point",
                "overrides",
                "QLoRA [95%]",
                "LoRA",
                "gap QLoRA − LoRA [95% CI]",
                "retention [95% CI]",
                "noise floor",
                "verdict",
                "memory MB",
                "base / adapter+grads+optimizer MB",
                "CUDA peak MB",
                "tokens/s",
                "adapter KB",
                "Pareto",
            ),
            rows=table,
        ),
        Block("img", "pareto.png"),
        Block(
            "p",
            "Memory: tensor accounting of the shipped QLoRA training (base weights as trained, "
            "adapter, gradients, optimizer state), not process RSS, which on a CPU is mostly the "
            "libraries; CUDA peak is measured on a GPU. tokens/s: the QLoRA training as measured "
            "when the point computed it (— when DVC restored it from its run cache). A gap "
            "whose interval lies within the noise floor is no difference.",
        ),
    ]


def write_sweep_report(
    rows: list[dict[str, Any]], out_dir: Path, name: str, search: dict[str, Any] | None = None
) -> Path:
    """sweep.md, sweep.html (the plot embedded), pareto.png and sweep.json (the rows, with
    memory and the overrides that vary) into `out_dir`, all or nothing, and Optuna's
    optimization_results.yaml after a search; the Markdown's path."""
    import yaml

    from qlora_pipeline.tracking.sweep import varying

    labels = varying([r["overrides"] for r in rows])
    rows = [
        r | {"memory": training_bytes(r["train"]), "label": label}
        for r, label in zip(rows, labels, strict=True)
    ]
    with atomic_dir(out_dir) as tmp:
        plots.pareto(
            [(r["memory"]["total"] / MB, r["figures"]["qlora"]) for r in rows],
            [1.96 * r["figures"]["qlora_stderr"] for r in rows],
            [r["name"] for r in rows],
            pareto([(r["memory"]["total"], r["figures"]["qlora"]) for r in rows]),
            tmp / "pareto.png",
        )
        blocks = sweep_blocks(rows, f"Sweep {name}") + search_blocks(search, rows)
        if search:
            (tmp / "optimization_results.yaml").write_text(yaml.safe_dump(search))
        (tmp / "sweep.md").write_text(to_markdown(blocks), encoding="utf-8")
        (tmp / "sweep.html").write_text(to_html(blocks, f"Sweep {name}", tmp), encoding="utf-8")
        (tmp / "sweep.json").write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    return out_dir / "sweep.md"
