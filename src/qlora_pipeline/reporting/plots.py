"""Plots for the report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"base": "#888888", "qlora": "#1f77b4", "lora": "#ff7f0e"}


def loss_curves(curves: dict[str, tuple[list[float], list[float]]], path: Path) -> Path:
    """Training loss per step, every run overlaid: one color per method ("<method> seed <N>"), a
    solid line for the first seed and dashed lines for the others."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    first: dict[str, str] = {}
    for name, (steps, losses) in curves.items():
        method = name.split()[0]
        solid = first.setdefault(method, name) == name
        ax.plot(
            steps,
            losses,
            label=name,
            color=COLORS.get(method),
            linestyle="-" if solid else "--",
            linewidth=1.2 if solid else 0.9,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Training loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def scores(tasks: dict[str, dict[str, tuple[float, float]]], path: Path) -> Path:
    """Grouped bars: per task, one bar per model with a 95% interval (±1.96 stderr)."""
    import numpy as np

    names = list(tasks)
    models = list(next(iter(tasks.values())))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(5.2, 2.2 * len(names) + 1.5), 3.6), dpi=110)
    x = np.arange(len(names))
    for i, model in enumerate(models):
        ax.bar(
            x + (i - (len(models) - 1) / 2) * width,
            [tasks[t][model][0] for t in names],
            width,
            yerr=[1.96 * tasks[t][model][1] for t in names],
            color=COLORS.get(model, "#555555"),
            capsize=4,
            label=model,
        )
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (primary metric)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Score per task and model (95% interval)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def gap_bars(tasks: dict[str, dict[str, Any]], margin: float, path: Path) -> Path:
    """QLoRA − LoRA per task, pooled over seeds, with its paired-bootstrap interval; each seed's
    gap as a dot; the noise floor (an arm against itself under another seed) as a grey band
    around zero; the dashed line is the gate's non-inferiority margin (the interval's lower bound
    must stay right of it)."""
    names = list(tasks)
    fig, ax = plt.subplots(figsize=(6.4, 1.9 + 0.6 * len(names)), dpi=110)
    gaps = [tasks[n]["gap"] for n in names]
    errors = [
        [tasks[n]["gap"] - tasks[n]["gap_ci_low"] for n in names],
        [tasks[n]["gap_ci_high"] - tasks[n]["gap"] for n in names],
    ]
    colors = [COLORS["qlora"] if v >= 0 else COLORS["lora"] for v in gaps]
    ax.barh(names, gaps, xerr=errors, color=colors, capsize=5, height=0.5, label="pooled")
    per_seed = [
        (i, s["gap"]["estimate"]) for i, n in enumerate(names) for s in tasks[n]["per_seed"]
    ]
    if len(per_seed) > len(names):
        ax.scatter(
            [g for _, g in per_seed],
            [i - 0.15 for i, _ in per_seed],  # just below the pooled interval's whisker
            facecolor="white",
            edgecolor="black",
            marker="D",
            s=22,
            zorder=3,
            label="per seed",
        )
    floors = [tasks[n].get("noise_floor") for n in names]
    for i, floor in enumerate(floors):
        if floor is not None:
            ax.fill_betweenx(
                [i - 0.4, i + 0.4],
                -floor,
                floor,
                color="#999999",
                alpha=0.3,
                label="noise floor" if i == 0 else None,
            )
    ax.axvline(0, color="black", linewidth=1)
    ax.axvline(-margin, color="#c62828", linestyle="--", linewidth=1.2, label="gate margin")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=4, frameon=False)
    extremes = [
        abs(x)
        for n in names
        for x in (tasks[n]["gap_ci_low"], tasks[n]["gap_ci_high"], tasks[n].get("noise_floor") or 0)
    ]
    span = max(0.05, margin, *extremes, *(abs(g) for _, g in per_seed)) * 1.25
    ax.set_xlim(-span, span)
    ax.set_xlabel("QLoRA − LoRA (95% paired-bootstrap interval)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Quality gap per task, against the seed-to-seed noise floor")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def pareto(
    points: list[tuple[float, float]],
    errors: list[float],
    names: list[str],
    front: list[bool],
    path: Path,
) -> Path:
    """Quality (QLoRA score, 95% interval) against training memory (MB), one dot per sweep
    point; the Pareto front (less memory, more quality) filled and joined by a step line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for (m, q), err, name, on in zip(points, errors, names, front, strict=True):
        ax.errorbar(
            m,
            q,
            yerr=err,
            fmt="o",
            color=COLORS["qlora"],
            mfc=COLORS["qlora"] if on else "white",
            capsize=4,
            markersize=7,
        )
        ax.annotate(name, (m, q), textcoords="offset points", xytext=(6, 6), fontsize=8)
    edge = sorted(p for p, on in zip(points, front, strict=True) if on)
    if edge:
        ax.step(
            [m for m, _ in edge],
            [q for _, q in edge],
            where="post",
            color=COLORS["qlora"],
            alpha=0.5,
            label="Pareto front",
        )
        ax.legend(fontsize=8)
    ax.set_xlabel("QLoRA training memory (MB): weights, adapter, gradients, optimizer")
    ax.set_ylabel("QLoRA score (95% interval)")
    ax.grid(alpha=0.3)
    ax.set_title("Quality against memory per sweep point")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
