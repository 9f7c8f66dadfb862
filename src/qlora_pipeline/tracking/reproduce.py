"""`qlora-pipeline reproduce REV`: run a recorded run again from nothing and say whether it gave
the same bytes.

The run is recomputed in a clean workspace (a git worktree of the revision: its params.yaml as
recorded, no outputs, no prepared-data cache), every stage forced with DVC's run cache off, so
nothing recorded is restored. DVC-tracked inputs (the frozen evaluation set) come from this
checkout's DVC cache. Then the outputs' hashes in the new dvc.lock are compared with the recorded
one: identical, or which outputs moved, how the environment differs, and how far the scores moved
against the recorded noise floor.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.tracking.workspace import add


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def resolve(root: Path, name: str, report_dir: str) -> str:
    """The commit of a git revision or of a DVC experiment's name.

    Raises:
        PipelineError: it is neither.
    """
    found = _git(root, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}")
    if found.returncode == 0:
        return found.stdout.strip()
    from qlora_pipeline.tracking.experiments import entries

    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if shown.returncode == 0:
        for row in entries(json.loads(shown.stdout), f"{report_dir}/summary.json"):
            if row["name"] == name and row["rev"] != "workspace":
                return str(row["rev"])
    raise PipelineError(
        f"{name}: neither a git revision nor a DVC experiment (`qlora-pipeline experiments`)"
    )


def workspace(root: Path, sha: str) -> Path:
    """A clean git worktree of `sha` under .dvc/tmp/reproduce/, sharing this checkout's DVC cache
    for its DVC-tracked inputs; it holds no output."""
    return add(root, sha, root / ".dvc" / "tmp" / "reproduce" / sha[:12])


def output_hashes(lock_text: str) -> dict[str, str]:
    """Every stage output of a dvc.lock and its hash."""
    lock = yaml.safe_load(lock_text) or {}
    return {
        out["path"]: str(out.get("md5") or out.get("hash"))
        for stage in (lock.get("stages") or {}).values()
        for out in stage.get("outs") or []
    }


def environment_changes(recorded: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: was -> now` for every field of the run records' environment that differs."""
    return [
        f"{k}: {recorded.get(k)} -> {new.get(k)}"
        for k in sorted(set(recorded) | set(new))
        if recorded.get(k) != new.get(k)
    ]


def score_moves(recorded: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How far each task's QLoRA, LoRA and gap moved, against the recorded noise floor."""
    lines = []
    for task, was in recorded.items():
        if not isinstance(was, dict) or not isinstance(new.get(task), dict):
            continue
        now, floor = new[task], was.get("noise_floor")
        for key in ("qlora", "lora", "gap"):
            if was.get(key) is None or now.get(key) is None:
                continue
            delta = now[key] - was[key]
            against = (
                "no noise floor (one seed)"
                if not floor
                else f"{abs(delta) / floor:.2f}x the noise floor {floor:.3f}"
            )
            lines.append(
                f"{task} {key}: {was[key]:.4f} -> {now[key]:.4f} ({delta:+.4f}, {against})"
            )
    return lines


def compare(root: Path, sha: str, work: Path, runs_dir: str, report_dir: str) -> tuple[bool, str]:
    """Whether the recomputed outputs are the recorded ones, and what to say."""
    recorded = output_hashes(_git(root, "show", f"{sha}:dvc.lock").stdout)
    new = output_hashes((work / "dvc.lock").read_text(encoding="utf-8"))
    moved = sorted(p for p in recorded.keys() | new.keys() if recorded.get(p) != new.get(p))
    if not moved:
        return True, f"identical: all {len(recorded)} outputs of {sha[:7]} recomputed bitwise"
    lines = [
        f"different: {len(moved)} of {len(recorded)} outputs of {sha[:7]} moved: {', '.join(moved)}"
    ]
    was_run = _git(root, "show", f"{sha}:{runs_dir}/bootstrap.json").stdout
    now_run = work / runs_dir / "bootstrap.json"
    if was_run and now_run.is_file():
        env = environment_changes(
            json.loads(was_run).get("environment", {}),
            json.loads(now_run.read_text(encoding="utf-8")).get("environment", {}),
        )
        lines.append("environment: " + ("; ".join(env) if env else "the same"))
    was_summary = _git(root, "show", f"{sha}:{report_dir}/summary.json").stdout
    now_summary = work / report_dir / "summary.json"
    if was_summary and now_summary.is_file():
        lines += score_moves(json.loads(was_summary), json.loads(now_summary.read_text()))
    return False, "\n".join(lines)
