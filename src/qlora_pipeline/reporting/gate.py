"""The quality gate: decisions on intervals, and whether the accepted run is comparable."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from qlora_pipeline.config.schema import GateConfig
from qlora_pipeline.errors import PipelineError


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dataclasses / dicts as {"a.b.c": value}."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def protocol_changes(current: dict[str, Any], accepted: dict[str, Any]) -> list[str]:
    """Where two evaluation protocols differ, as `key: accepted → current` (empty: the same)."""
    a, b = flatten(accepted), flatten(current)
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
    # A task added or dropped is not a change for the tasks both runs have: compare those.
    common = set(protocol.get("tasks", {})) & set(accepted["protocol"].get("tasks", {}))
    if not common:
        return None, f"{accepted_from}: no evaluation task in common; not compared"

    def shared(p: dict[str, Any]) -> dict[str, Any]:
        return {**p, "tasks": {k: v for k, v in p.get("tasks", {}).items() if k in common}}

    changes = protocol_changes(shared(protocol), shared(accepted["protocol"]))
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
        return (
            None,
            f"{accepted_from}: evaluated on another evaluation set; not compared (a reset of "
            "the evaluation set restarts the comparisons)",
        )
    return accepted, "; ".join(notes)


def _condition(
    task: str,
    name: str,
    figures: dict[str, float] | None,
    rule: str,
    threshold: float | None,
    holds: bool | None,
    note: str = "",
) -> dict[str, Any]:
    """One gate condition: estimate, interval, the rule on the interval, threshold, verdict."""
    figures = figures or {}
    return {
        "task": task,
        "condition": name,
        "estimate": figures.get("estimate"),
        "ci_low": figures.get("ci_low"),
        "ci_high": figures.get("ci_high"),
        "rule": rule,
        "threshold": threshold,
        "verdict": "n/a" if holds is None else ("PASS" if holds else "FAIL"),
        "note": note,
    }


def _interval(t: dict[str, Any], key: str) -> dict[str, float]:
    return {"estimate": t[key], "ci_low": t[f"{key}_ci_low"], "ci_high": t[f"{key}_ci_high"]}


def conditions(tasks: dict[str, dict[str, Any]], gate: GateConfig) -> list[dict[str, Any]]:
    """Every gate condition on every gated task, each decided on its 95% interval, never on the
    point estimate alone: a difference the interval cannot tell from noise neither passes a
    required gain nor fails a tolerated drop.

    Args:
        tasks: per-task figures as in metrics.json (gains, gap and retention with intervals;
            `vs_accepted` / `vs_anchor`: {estimate, ci_low, ci_high, paired} or None).
        gate: the thresholds.
    """
    out = []
    for task in gate.tasks or list(tasks):
        if task not in tasks:
            out.append(_condition(task, "evaluated", None, "task was evaluated", None, False))
            continue
        t = tasks[task]
        for arm, label in (("qlora", "QLoRA"), ("lora", "LoRA")):
            gain = _interval(t, f"{arm}_gain")
            out.append(
                _condition(
                    task,
                    f"{label} gain over base",
                    gain,
                    "lower bound ≥",
                    gate.min_gain_over_base,
                    gain["ci_low"] >= gate.min_gain_over_base,
                )
            )
        gap = _interval(t, "gap")
        out.append(
            _condition(
                task,
                "QLoRA − LoRA (non-inferiority)",
                gap,
                "lower bound ≥",
                0.0 - gate.max_drop_vs_lora,
                gap["ci_low"] >= -gate.max_drop_vs_lora,
            )
        )
        retention = _interval(t, "retention")
        defined = not math.isnan(retention["estimate"])
        out.append(
            _condition(
                task,
                "retention",
                retention if defined else None,
                "lower bound ≥",
                gate.min_retention,
                None
                if gate.min_retention is None or not defined
                else retention["ci_low"] >= gate.min_retention,
                "" if defined else "undefined: LoRA's gain over base is not significantly positive",
            )
        )
        for key, name, margin in (
            ("vs_accepted", "QLoRA vs accepted QLoRA", gate.max_drop_vs_accepted),
            ("vs_anchor", "QLoRA vs anchor QLoRA (cumulative drift)", gate.max_cumulative_drop),
        ):
            d = t.get(key)
            holds = None if d is None or margin is None else d["ci_high"] >= -margin
            note = "" if d is None else ("paired, same items" if d["paired"] else "unpaired")
            out.append(
                _condition(
                    task,
                    name,
                    d,
                    "upper bound ≥",
                    None if margin is None else 0.0 - margin,
                    holds,
                    note or "no comparable run",
                )
            )
    return out


def check(
    tasks: dict[str, dict[str, Any]], gate: GateConfig
) -> tuple[str, list[str], list[dict[str, Any]]]:
    """PASS or FAIL, one reason per failed condition (empty when PASS), and every condition."""
    found = conditions(tasks, gate)
    reasons = [
        f"{c['task']}: {c['condition']}: "
        + (
            "not evaluated"
            if c["condition"] == "evaluated"
            else f"{c['estimate']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}], "
            f"{c['rule']} {c['threshold']:+.3f} does not hold"
        )
        for c in found
        if c["verdict"] == "FAIL"
    ]
    return ("FAIL" if reasons else "PASS"), reasons, found


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
