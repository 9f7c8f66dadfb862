"""The quality gate and the previously accepted run it compares with."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

from qlora_pipeline.config.schema import GateConfig
from qlora_pipeline.errors import PipelineError


def accepted_metrics(rev: str | None, path: str | Path) -> tuple[dict[str, Any] | None, str]:
    """The report's `metrics.json` as committed at git revision `rev`, and where it came from.

    Commit `reports/` (with `dvc.lock`) when you accept a run: that commit's metrics are then the
    baseline the next report compares with. Returns (None, reason) when there is none.
    """
    if rev is None:
        return None, "comparison off (report.accepted_rev: null)"
    path = Path(path).resolve()
    where = next(p for p in path.parents if p.exists())
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=where,
            capture_output=True,
            text=True,
        )
        root = Path(top.stdout.strip())
        if top.returncode != 0 or not path.is_relative_to(root):
            return None, "not in a git repository"
        rel = path.relative_to(root).as_posix()
        shown = subprocess.run(
            ["git", "show", f"{rev}:{rel}"], cwd=root, capture_output=True, text=True
        )
        commit = subprocess.run(
            ["git", "rev-parse", "--short", rev], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return None, "git is not available"
    if shown.returncode != 0:
        return None, f"no {rel} at {rev} (no accepted run yet)"
    try:
        return json.loads(shown.stdout), f"{rel} at {rev} ({commit.stdout.strip()})"
    except json.JSONDecodeError:
        return None, f"{rel} at {rev} is not valid JSON"


def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"a.b.c": value}."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def protocol_changes(current: dict[str, Any], accepted: dict[str, Any]) -> list[str]:
    """Where two evaluation protocols differ, as `key: accepted → current` (empty: the same)."""
    a, b = flat(accepted), flat(current)
    return [
        f"{k}: {a.get(k, '—')} → {b.get(k, '—')}"
        for k in sorted(set(a) | set(b))
        if a.get(k, "—") != b.get(k, "—")
    ]


def comparable_accepted(
    accepted: dict[str, Any] | None,
    accepted_from: str,
    protocol: dict[str, Any],
    test_set: str,
    allow_change: bool,
) -> tuple[dict[str, Any] | None, str]:
    """The accepted run if its scores can be compared with this run's, and what was compared.

    Raises:
        PipelineError: the accepted run was evaluated under another protocol and
            `report.allow_protocol_change` is off.
    """
    if accepted is None:
        return None, accepted_from
    if "protocol" not in accepted:
        return (
            None,
            f"{accepted_from}: records no evaluation protocol (made before protocols were recorded); not compared",
        )
    changes = protocol_changes(protocol, accepted["protocol"])
    if changes and not allow_change:
        raise PipelineError(
            f"the accepted run ({accepted_from}) was evaluated under another protocol "
            f"({'; '.join(changes)}); scores are not comparable. Set "
            "report.allow_protocol_change=true to compare anyway, or report.accepted_rev=null"
        )
    notes = [accepted_from]
    if changes:
        notes.append(
            f"protocol changed, compared anyway (report.allow_protocol_change): {'; '.join(changes)}"
        )
    if accepted.get("test_set") != test_set:
        notes.append(
            "another test set: the Δ is unpaired (different items), not a paired comparison"
        )
    return accepted, "; ".join(notes)


def check(tasks: dict[str, dict[str, Any]], gate: GateConfig) -> tuple[str, list[str]]:
    """PASS or FAIL, and one reason per failed condition (empty when PASS).

    Args:
        tasks: per-task figures as in metrics.json (`qlora_gain`, `lora_gain`, `retention`, `gap`,
            `qlora_vs_accepted`: None when there is no accepted run).
        gate: the thresholds.
    """
    reasons = []
    for task in gate.tasks or list(tasks):
        if task not in tasks:
            reasons.append(f"{task}: not evaluated")
            continue
        t = tasks[task]
        for arm, label in (("qlora", "QLoRA"), ("lora", "LoRA")):
            if t[f"{arm}_gain"] < gate.min_gain_over_base:
                reasons.append(
                    f"{task}: {label} gain over base {t[f'{arm}_gain']:+.3f} "
                    f"< min_gain_over_base {gate.min_gain_over_base}"
                )
        retention = t["retention"]
        if retention is None or math.isnan(retention) or retention < gate.min_retention:
            shown = (
                "undefined" if retention is None or math.isnan(retention) else f"{retention:.3f}"
            )
            reasons.append(f"{task}: retention {shown} < min_retention {gate.min_retention}")
        if t["gap"] < -gate.max_drop_vs_lora:
            reasons.append(
                f"{task}: QLoRA trails LoRA by {-t['gap']:.3f} > max_drop_vs_lora "
                f"{gate.max_drop_vs_lora}"
            )
        delta = t.get("qlora_vs_accepted")
        if delta is not None and delta < gate.min_gain_vs_accepted:
            reasons.append(
                f"{task}: QLoRA vs accepted {delta:+.3f} < min_gain_vs_accepted "
                f"{gate.min_gain_vs_accepted}"
            )
    return ("FAIL" if reasons else "PASS"), reasons


def read_verdict(metrics_path: Path) -> tuple[str, list[str]]:
    """The verdict and reasons a written report recorded.

    Raises:
        PipelineError: no report yet.
    """
    if not metrics_path.is_file():
        raise PipelineError(f"{metrics_path}: not found; run the report stage first")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    return metrics["verdict"], metrics.get("reasons", [])


def verdict_of(metrics_path: Path) -> int:
    """Print a written report's verdict and reasons; 0 on PASS, 1 on FAIL.

    Raises:
        PipelineError: no report yet.
    """
    verdict, reasons = read_verdict(metrics_path)
    print(f"quality gate: {verdict}" + (f" ({'; '.join(reasons)})" if reasons else ""))
    return 0 if verdict == "PASS" else 1
