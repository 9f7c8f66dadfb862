"""What the benchmarks share (the tests copy projects with `scratch_copy` too)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def write_results(out: Path, results: dict) -> None:
    """`results` as JSON at `out`, after the command that measured them and the machine (this
    CPU's model unless `results` names another, e.g. the GPU)."""
    sys.path.insert(0, str(ROOT / "src"))
    from qlora_pipeline.tracking.perf import cpu_model

    command = " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"command": command, "machine": cpu_model(), **results}, indent=1) + "\n"
    )
    print(f"wrote {out}")


def paired_ratio(a: Any, b: Any) -> dict[str, float]:
    """The geometric mean of a/b over paired measurements (numpy arrays), with a 95%
    paired-bootstrap interval (`reporting.stats.paired_difference` on the logs)."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "src"))
    from qlora_pipeline.reporting.stats import paired_difference

    d = paired_difference(np.log(a), np.log(b))
    return {k: math.exp(v) for k, v in d.items()} | {"cycles": len(a)}
