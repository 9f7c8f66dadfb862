"""Past runs, read from git history: the accepted run and the anchor, their figures and their
per-item correctness (`reports/items.csv`, a few hundred rows kept in git beside metrics.json,
so paired comparisons work from a fresh clone with no DVC cache or remote)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def _repo_path(path: Path) -> tuple[Path, str] | None:
    """(repository root, path relative to it) of `path`, or None outside a git repository."""
    path = path.resolve()
    where = next(p for p in path.parents if p.exists())
    try:
        top = _git(where, "rev-parse", "--show-toplevel")
    except OSError:
        return None
    root = Path(top.stdout.strip())
    if top.returncode != 0 or not path.is_relative_to(root):
        return None
    return root, path.relative_to(root).as_posix()


def repo_root(path: str | Path) -> Path | None:
    """The root of the git repository holding `path`, or None."""
    found = _repo_path(Path(path))
    return None if found is None else found[0]


def accepted_metrics(rev: str | None, path: str | Path) -> tuple[dict[str, Any] | None, str]:
    """The report's `metrics.json` as committed at git revision `rev`, and where it came from.

    Commit `reports/` (with `dvc.lock`) when you accept a run: that commit's metrics are then the
    baseline the next report compares with. Returns (None, reason) when there is none.
    """
    if rev is None:
        return None, "comparison off (report.accepted_rev: null)"
    found = _repo_path(Path(path))
    if found is None:
        return None, "not in a git repository"
    root, rel = found
    shown = _git(root, "show", f"{rev}:{rel}")
    commit = _git(root, "rev-parse", "--short", rev)
    if shown.returncode != 0:
        return None, f"no {rel} at {rev} (no accepted run yet)"
    try:
        return json.loads(shown.stdout), f"{rel} at {rev} ({commit.stdout.strip()})"
    except json.JSONDecodeError:
        return None, f"{rel} at {rev} is not valid JSON"


def anchor_rev(path: str | Path, protocol: dict[str, Any], test_set: str) -> str | None:
    """The oldest commit whose `path` (reports/metrics.json) records `protocol` and the
    evaluation set `test_set`: the first accepted run under this evaluation protocol and set,
    which slow drift is measured against."""
    found = _repo_path(Path(path))
    if found is None:
        return None
    root, rel = found
    log = _git(root, "log", "--format=%H", "--", rel)
    for commit in reversed(log.stdout.split()):
        shown = _git(root, "show", f"{commit}:{rel}")
        try:
            report = json.loads(shown.stdout) if shown.returncode == 0 else {}
            if report.get("protocol") == protocol and report.get("test_set") == test_set:
                return commit
        except json.JSONDecodeError:
            continue
    return None


ITEM_MODELS = ("base", "qlora", "qlora_on_bf16", "merged", "lora")


def items_csv(items: dict[str, dict[str, np.ndarray]], metrics: dict[str, str]) -> str:
    """Per-item scores: one row per task and item, one column per evaluated model.

    Args:
        items: {task: {model: scores ordered by doc_id}}.
        metrics: {task: "metric,filter"}: the score's metric and lm-eval filter (a task with
            several filters, such as gsm8k's strict and flexible extraction, has one per row).
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    models = [m for m in ITEM_MODELS if any(m in v for v in items.values())]
    writer.writerow(["task", "metric", "doc_id", *models])
    for task, by_model in items.items():
        n = len(next(iter(by_model.values())))
        for i in range(n):
            writer.writerow(
                [
                    task,
                    metrics[task],
                    i,
                    *(f"{by_model[m][i]:g}" if m in by_model else "" for m in models),
                ]
            )
    return buf.getvalue()


def read_items(text: str) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """{(task, "metric,filter"): {model: scores by doc_id}} from items.csv text."""
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        by_model = rows.setdefault((row["task"], row["metric"]), {})
        for model in ITEM_MODELS:
            if row.get(model):
                by_model.setdefault(model, []).append(float(row[model]))
    return {k: {m: np.array(v) for m, v in by_model.items()} for k, by_model in rows.items()}


def items_at(rev: str, path: str | Path) -> dict[tuple[str, str], dict[str, np.ndarray]] | None:
    """The per-item scores `path` (reports/items.csv) held at git revision `rev`, if any."""
    found = _repo_path(Path(path))
    if found is None:
        return None
    root, rel = found
    shown = _git(root, "show", f"{rev}:{rel}")
    return read_items(shown.stdout) if shown.returncode == 0 else None
