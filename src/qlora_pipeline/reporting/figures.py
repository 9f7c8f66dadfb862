"""The report's figures, computed from per-item scores: pooled and per-seed gaps, the noise floor,
what ships and the change against past runs. Decisions only; documents are in sections.py."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from qlora_pipeline.reporting.stats import (
    is_binary,
    mcnemar,
    paired_bootstrap,
    paired_difference,
    unpaired_difference,
)

MODELS = ("base", "qlora", "lora")
METHODS = ("qlora", "lora")


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


def mean_and_stderr(scores: np.ndarray) -> dict[str, float]:
    """The mean of per-item scores and its standard error (sample sd / √n, as lm-eval's
    `mean_stderr`)."""
    n = len(scores)
    return {
        "value": float(scores.mean()),
        "stderr": float(scores.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
    }


def shipped_qlora(figures: dict[str, Any]) -> dict[str, float]:
    """A run's shipped QLoRA score {value, stderr}. Runs from before training seeds recorded it
    as the task's `qlora` figure (one seed, the one that shipped)."""
    if "shipped" in figures:
        return figures["shipped"]["qlora"]
    return {"value": figures["qlora"], "stderr": figures.get("qlora_stderr") or 0.0}


def versus(
    scores: np.ndarray, now: dict[str, float], past: dict | None, items: Any, seed: int
) -> dict[str, Any] | None:
    """The shipped QLoRA now minus the one a past run shipped: paired over the same items when
    the past run's per-item scores are there (same test set), else unpaired from the two standard
    errors."""
    if past is None:
        return None
    if items is not None and len(items) == len(scores):
        return {**paired_difference(scores, items, seed=seed), "paired": True}
    then = shipped_qlora(past)
    return {
        **unpaired_difference(now["value"], now["stderr"], then["value"], then["stderr"]),
        "paired": False,
    }


def seed_figures(arms: dict[str, list[np.ndarray]], seeds: list[int], seed: int) -> dict[str, Any]:
    """Per training seed: each arm's score and the QLoRA − LoRA gap of that seed's pair (paired
    bootstrap, McNemar when 0/1). The noise floor: each arm against itself under another seed
    (every later seed vs the first), paired on the same items; `noise_floor` is the largest
    |difference| (None with one seed)."""
    per_seed = []
    for i, s in enumerate(seeds):
        q, lo = arms["qlora"][i], arms["lora"][i]
        per_seed.append(
            {
                "seed": s,
                "qlora": float(q.mean()),
                "lora": float(lo.mean()),
                "gap": paired_difference(q, lo, seed=seed),
                "mcnemar": mcnemar(q, lo) if is_binary(q) and is_binary(lo) else None,
            }
        )
    same_arm: dict[str, list[dict[str, Any]]] = {
        arm: [
            {"seeds": [seeds[0], s], **paired_difference(runs[i], runs[0], seed=seed)}
            for i, s in enumerate(seeds[1:], 1)
        ]
        for arm, runs in arms.items()
    }
    estimates = [abs(d["estimate"]) for diffs in same_arm.values() for d in diffs]
    return {
        "seeds": list(seeds),
        "per_seed": per_seed,
        "same_arm": same_arm,
        "noise_floor": max(estimates) if estimates else None,
    }


def task_figures(
    base: np.ndarray,
    arms: dict[str, list[np.ndarray]],
    seeds: list[int],
    metric: str,
    past: dict[str, tuple[dict | None, Any]],
    seed: int = 0,
) -> dict[str, Any]:
    """Per-task statistics. The arms' scores, gains, gap and retention are pooled over training
    seeds (each item's score averaged over seeds, then a paired bootstrap over items); the gap per
    seed and the noise floor are beside them (`seed_figures`). What ships is the first seed's
    adapter: its score, and its change against the accepted and anchor runs' shipped adapter.

    Args:
        base: the base model's per-item scores.
        arms: {"qlora" | "lora": per-item scores per training seed, in `seeds` order}.
        metric: the scores' "metric,filter".
        past: {"accepted" | "anchor": (that run's figures for this task or None, its per-item
            shipped QLoRA scores or None)}.
        seed: the bootstrap's seed.
    """
    pooled = {arm: np.mean(runs, axis=0) for arm, runs in arms.items()}
    scores = {"base": base, **pooled}
    figures: dict[str, Any] = {"metric": metric, "n": len(base)}
    for m in MODELS:
        summary = mean_and_stderr(scores[m])
        figures[m], figures[f"{m}_stderr"] = summary["value"], summary["stderr"]
    figures.update(paired_bootstrap(base, pooled["qlora"], pooled["lora"], seed=seed))
    figures.update(seed_figures(arms, seeds, seed))
    figures["shipped"] = {
        "seed": seeds[0],
        **{arm: mean_and_stderr(arms[arm][0]) for arm in METHODS},
    }
    accepted = past["accepted"][0]
    for m in METHODS:
        figures[f"{m}_vs_accepted"] = (
            figures[m] - accepted[m] if accepted is not None and m in accepted else None
        )
    for name, (run, items) in past.items():
        figures[f"vs_{name}"] = versus(
            arms["qlora"][0], figures["shipped"]["qlora"], run, items, seed
        )
    return figures


def scores_csv(tasks: dict[str, dict[str, Any]]) -> str:
    """Plot data for `dvc plots show`: one row per task and model (arms pooled over seeds)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["task", "model", "score", "ci_low", "ci_high"])
    for task, t in tasks.items():
        for m in MODELS:
            half = 1.96 * (t[f"{m}_stderr"] or 0.0)
            writer.writerow([task, m, t[m], t[m] - half, t[m] + half])
    return buf.getvalue()
