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


def scores(values: dict[str, tuple[float, float]], metric: str, path: Path) -> Path:
    """One bar per model with a 95% interval (±1.96 stderr)."""
    fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=110)
    names = list(values)
    ax.bar(
        names,
        [values[n][0] for n in names],
        yerr=[1.96 * values[n][1] for n in names],
        color=[COLORS.get(n, "#555555") for n in names],
        capsize=6,
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(metric)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Score per model (95% interval)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
