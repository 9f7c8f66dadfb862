"""`qlora-pipeline experiments`: one line per run and DVC experiment, built from
`dvc exp show --json`: what changed, the scores, the gap with its interval, the verdict, and what
the configuration cost (the QLoRA footprint, the stages' time; from the run records, which stay
out of hashed outputs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.reporting.gate import flatten


def _data(entry: dict, summary_path: str) -> tuple[dict, dict]:
    data = entry.get("data") or {}
    params = flatten(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
    summary = ((data.get("metrics") or {}).get(summary_path) or {}).get("data") or {}
    return params, summary


def entries(show: list[dict], summary_path: str) -> list[dict[str, Any]]:
    """Each commit of `dvc exp show --json` and each experiment on it: name, revision, params
    (flattened params.yaml), the metrics of `summary_path`, the baseline's params, and (for an
    experiment) the commit it is based on."""
    rows = []
    for commit in show:
        base_params, summary = _data(commit, summary_path)
        name = commit.get("name") or ("workspace" if commit["rev"] == "workspace" else "")
        rows.append(
            {"name": name, "rev": commit["rev"], "params": base_params, "summary": summary}
            | {"baseline": base_params}
        )
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                params, summary = _data(rev, summary_path)
                rows.append(
                    {
                        "name": rev.get("name") or rev["rev"][:7],
                        "rev": rev["rev"],
                        "params": params,
                        "summary": summary,
                        "baseline": base_params,
                        "based_on": commit["rev"],
                    }
                )
    return rows


def shared_changes(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Per commit with two or more experiments, the changes every one of them makes (a sweep's
    fixed overrides): said once under the table, not on every line."""
    by_commit: dict[str, list[set[str]]] = {}
    for r in rows:
        if "based_on" in r:
            by_commit.setdefault(r["based_on"], []).append(set(changed(r["params"], r["baseline"])))
    return {
        rev: sorted(set.intersection(*sets))
        for rev, sets in by_commit.items()
        if len(sets) > 1 and set.intersection(*sets)
    }


def changed(params: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """`key=value` for every param that differs from the commit the experiment is based on
    (the pinned revision of a promoted run is not a choice: left out)."""
    skip = ("report.accepted_rev",)
    return [
        f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
        for k, v in params.items()
        if baseline.get(k) != v and k not in skip
    ]


def read_at(root: Path, rev: str, path: str) -> str | None:
    """A file's text at a git revision, or in the work tree for `workspace`."""
    if rev == "workspace":
        file = root / path
        return file.read_text(encoding="utf-8") if file.is_file() else None
    proc = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True
    )
    return proc.stdout if proc.returncode == 0 else None


def costs(root: Path, rev: str, runs_dir: str, report_dir: str) -> dict[str, float | None]:
    """The QLoRA footprint (metrics.json) and the summed wall time of the stages' run records
    at `rev`."""
    if rev == "workspace":
        names = [p.name for p in (root / runs_dir).glob("*.json")]
    else:
        listing = subprocess.run(
            ["git", "ls-tree", "--name-only", f"{rev}:{runs_dir}"],
            cwd=root,
            capture_output=True,
            text=True,
        )
        names = [n for n in listing.stdout.split() if n.endswith(".json")]
    wall = 0.0
    for name in names:
        text = read_at(root, rev, f"{runs_dir}/{name}")
        wall += json.loads(text).get("wall_s", 0.0) if text else 0.0
    metrics = read_at(root, rev, f"{report_dir}/metrics.json")
    footprint = json.loads(metrics).get("footprint_mb", {}).get("qlora") if metrics else None
    return {"qlora_mb": footprint, "time_s": wall or None}


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def table(rows: list[dict[str, Any]], task: str) -> str:
    """The compact table: one line per experiment."""
    header = (
        "experiment",
        "rev",
        "changed",
        "QLoRA",
        "LoRA",
        "gap [95% CI]",
        "noise",
        "verdict",
        "QLoRA MB",
        "time s",
    )
    lines = [header]
    shared = shared_changes(rows)
    for r in rows:
        t = r["summary"].get(task) or {}
        gap = (
            "—"
            if t.get("gap") is None
            else f"{t['gap']:+.3f} [{t['gap_ci_low']:+.3f}, {t['gap_ci_high']:+.3f}]"
        )
        lines.append(
            (
                r["name"],
                r["rev"][:7] if r["rev"] != "workspace" else "-",
                " ".join(
                    c
                    for c in changed(r["params"], r["baseline"])
                    if c not in shared.get(r.get("based_on", ""), ())
                )
                or "-",
                _num(t.get("qlora"), ".3f"),
                _num(t.get("lora"), ".3f"),
                gap,
                _num(t.get("noise_floor"), ".3f"),
                str(r["summary"].get("verdict", "—")),
                _num(r.get("qlora_mb"), ".1f"),
                _num(r.get("time_s"), ".0f"),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    notes = [
        f"every experiment on {rev[:7]} also changes: {' '.join(keys)}"
        for rev, keys in shared.items()
    ]
    return "\n".join(
        [
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
            for line in lines
        ]
        + notes
    )


def experiments(root: Path, task: str, runs_dir: str, report_dir: str) -> str:
    """`dvc exp show --json` as the compact table (the first evaluation task's figures)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise PipelineError(f"dvc exp show: {proc.stderr.strip().splitlines()[-1:]}")
    rows = entries(json.loads(proc.stdout), f"{report_dir}/summary.json")
    for row in rows:
        row.update(costs(root, row["rev"], runs_dir, report_dir))
    return table(rows, task)
