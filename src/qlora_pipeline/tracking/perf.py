"""Per-run records: what a stage cost and where it ran, kept out of everything DVC hashes.

A stage's outputs must be the same bytes on every machine, so wall times, tokens/s, memory, the
device, the date and the environment never go into them. Each stage instead writes
`<paths.runs>/<stage>.json` (git-tracked beside the report, not a DVC output), and the report shows
them. Steps add figures with `note()`; the CLI writes the record once the step returned.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from qlora_pipeline.files import read_json, write_json
from qlora_pipeline.runtime import (
    DETERMINISM_ENV,
    cpu_info,
    library_versions,
    mkl_branch,
    peak_memory_mb,
)

_notes: dict[str, Any] = {}


def note(**figures: Any) -> None:
    """Add volatile figures (timings, speed, memory) to this process' stage record."""
    _notes.update(figures)


def note_step(row: dict[str, Any]) -> None:
    """Add one training step's speed and memory to this process' stage record."""
    _notes.setdefault("steps", []).append(row)


def drop_steps_after(step: int) -> None:
    """On resume: forget the step rows that are about to be redone."""
    if "steps" in _notes:
        _notes["steps"] = [r for r in _notes["steps"] if r["step"] <= step]


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC", ...), else what `platform` knows of it."""
    return cpu_info("model name") or platform.processor() or platform.machine()


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or Path.cwd(), capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def config_hash(params: Path) -> str:
    """sha256 of the composed config the stages read (params.yaml)."""
    return hashlib.sha256(params.read_bytes()).hexdigest() if params.is_file() else "none"


def fingerprint(params: Path) -> dict[str, Any]:
    """The environment a stage ran in: enough to tell two runs' machines and stacks apart."""
    import torch

    cuda = torch.version.cuda if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerator": f"CUDA {cuda}" if cuda else "cpu",
        "device": torch.cuda.get_device_name() if cuda else cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_branch": mkl_branch(),  # as MKL reports it: AVX2 with pinned kernels on any vendor
        "threads": torch.get_num_threads(),
        "determinism": {k: os.environ[k] for k in DETERMINISM_ENV if k in os.environ},
        "libraries": library_versions(),
        "git_commit": git_commit(),
        "config_sha256": config_hash(params),
        "platform": platform.platform(),
    }


def write_record(perf_dir: str | Path, stage: str, params: Path, started: float) -> Path:
    """Write `<perf_dir>/<stage>.json`: wall time, peak memory, the notes and the fingerprint."""
    wall = time.perf_counter() - started
    now = datetime.now(timezone.utc)
    record = {
        "stage": stage,
        "started_at": (now - timedelta(seconds=wall)).isoformat(timespec="milliseconds"),
        "finished_at": now.isoformat(timespec="milliseconds"),
        "wall_s": wall,
        **peak_memory_mb(),
        "forked": False,  # True: run in the flow's fork server (qlora_pipeline.forkserver)
        **_notes,
        "environment": fingerprint(params),
        "command": " ".join(sys.argv[1:]),
    }
    return write_json(Path(perf_dir) / f"{stage}.json", record)


def read_records(perf_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every stage record in `perf_dir`, by stage name (empty when none ran here yet)."""
    folder = Path(perf_dir)
    if not folder.is_dir():
        return {}
    out = {}
    for path in sorted(folder.glob("*.json")):
        try:
            out[path.stem] = read_json(path)
        except (OSError, json.JSONDecodeError):
            continue
    return out
