"""What the benchmarks share (the tests copy projects with `scratch_copy` too)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def scratch_copy(dst: Path) -> None:
    """What a fresh clone has: the files git tracks or would track, without the committed
    outputs (reports, run records, dvc.lock)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, files.split("\0")):
        if rel.startswith(("reports/", "runs/", "dvc.lock")) or not (ROOT / rel).is_file():
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)
