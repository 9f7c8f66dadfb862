"""Plots for the report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"base": "#888888", "qlora": "#1f77b4", "lora": "#ff7f0e"}


def loss_curves(curves: dict[str, tuple[list[float], list[float]]], path: Path) -> Path:
    """Training loss per step, the methods overlaid."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for name, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=name, color=COLORS.get(name))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
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


def gap_bars(gaps: dict[str, tuple[float, float, float]], margin: float, path: Path) -> Path:
    """QLoRA − LoRA per task with its paired-bootstrap interval; the zero line is parity and the
    dashed line the gate's non-inferiority margin (the interval's lower bound must stay right of
    it)."""
    names = list(gaps)
    fig, ax = plt.subplots(figsize=(6.0, 1.2 + 0.6 * len(names)), dpi=110)
    values = [gaps[n][0] for n in names]
    errors = [[gaps[n][0] - gaps[n][1] for n in names], [gaps[n][2] - gaps[n][0] for n in names]]
    colors = [COLORS["qlora"] if v >= 0 else COLORS["lora"] for v in values]
    ax.barh(names, values, xerr=errors, color=colors, capsize=5, height=0.5)
    ax.axvline(0, color="black", linewidth=1)
    ax.axvline(-margin, color="#c62828", linestyle="--", linewidth=1.2, label="gate margin")
    ax.legend(fontsize=8, loc="lower right")
    span = max(0.05, margin, *(abs(x) for row in gaps.values() for x in row)) * 1.2
    ax.set_xlim(-span, span)
    ax.set_xlabel("QLoRA − LoRA (95% paired-bootstrap interval)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Quality gap per task")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
