"""What the benchmarks share (the tests copy projects with `scratch_copy` too)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
AS_RUN = "as run"  # the variant a side-by-side benchmark measures the others against


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


def replicated_ratio(
    terms: list[tuple[int, Any]], iters: int = 2000, seed: int = 0, alpha: float = 0.05
) -> dict[str, float]:
    """A ratio of geometric means measured in several processes per variant over paired cycles:
    exp(sum of sign x mean log), for `terms` of (sign +1 or -1, an array [process, cycle] of a
    variant's positive measurements; every term the same cycles). E.g. [(+1, a), (-1, b)] is
    a/b and [(+1, a), (-1, b), (-1, c), (+1, d)] is (a/b)/(c/d).

    Its 95% interval is a two-stage bootstrap: each draw resamples the cycles (the same ones for
    every term: they are paired) and, within each term, its processes. A process' own speed
    (its memory layout, where the kernel put its threads) is shared by all its cycles, so
    resampling cycles alone, as `paired_ratio` does, leaves it out of the interval. With one
    process per variant the interval is over cycles only; with few, it is somewhat narrow
    (a bootstrap over n processes scales their variance by (n - 1) / n)."""
    import numpy as np

    logs = [(sign, np.log(np.asarray(x, dtype=float))) for sign, x in terms]
    cycles = {x.shape[1] for _, x in logs}
    if len(cycles) != 1 or 0 in cycles:
        raise ValueError("every term needs the same non-zero number of cycles")
    (n,) = cycles
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, n, size=(iters, 1, n))
    total = np.zeros(iters)
    for sign, x in logs:
        procs = rng.integers(0, x.shape[0], size=(iters, x.shape[0], 1))
        total += sign * x[procs, draw].mean(axis=(1, 2))
    estimate = sum(sign * x.mean() for sign, x in logs)
    low, high = np.percentile(total, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    processes = min(x.shape[0] for _, x in logs)
    return {
        "estimate": math.exp(estimate),
        "ci_low": math.exp(low),
        "ci_high": math.exp(high),
        "cycles": n,
        "processes": processes,
    }


def mean_interval(values: Any, alpha: float = 0.05) -> dict[str, float]:
    """The mean of independent measurements (e.g. one a run) with its 95% Student-t interval.
    For a handful of runs: a bootstrap over three values could not reach beyond their range,
    and a normal interval would be too narrow (about 80% coverage with three)."""
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if x.size < 2:
        raise ValueError("an interval needs at least two measurements")
    mean, sem = float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))
    half = float(stats.t.ppf(1 - alpha / 2, x.size - 1)) * sem
    return {"estimate": mean, "ci_low": mean - half, "ci_high": mean + half, "n": int(x.size)}


def side_by_side(names: list[str], rounds: int, measure: Callable[[str], T]) -> dict[str, list[T]]:
    """`measure(name)` for each variant once as a warm-up (dropped), then in `rounds` rounds, the
    order rotating so that each variant goes first as often (the machine's drift hits all)."""
    for name in names:
        measure(name)
    runs: dict[str, list[T]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            runs[name].append(measure(name))
    return runs


def seconds_against(walls: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    """Each variant's mean paired difference to `base` in seconds, with a 95% paired-bootstrap
    interval (`reporting.stats.paired_difference`), and a table of them with the medians."""
    import statistics

    import numpy as np

    sys.path.insert(0, str(ROOT / "src"))
    from qlora_pipeline.reporting.stats import paired_difference

    diffs = {
        v: paired_difference(np.array(w), np.array(walls[base]))
        for v, w in walls.items()
        if v != base
    }
    width = max(len(v) for v in walls) + 2
    print(f"{'variant':<{width}}{'median (s)':>12}{f'- {base} (s)':>26}")
    for v, w in walls.items():
        d = diffs.get(v)
        vs = f"{d['estimate']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]" if d else ""
        print(f"{v:<{width}}{statistics.median(w):>12.2f}{vs:>26}")
    return diffs


def project_env(project: Path) -> dict[str, str]:
    """The environment `qlora-pipeline` runs with in the scratch checkout `project`: its own
    PREFECT_HOME, this interpreter's bin folder first on PATH, the checkout's `pipelines` first on
    the import path (as `python -m` finds it from there, `python -c` too)."""
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect"), "PYTHONUNBUFFERED": "1"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env["PYTHONPATH"] = str(project)
    return env


def cli_run(patch: str | None) -> list[str]:
    """`qlora-pipeline run` as `python -m qlora_pipeline run`, or with `patch` (Python statements
    that undo or try a change) executed first: `python -c "<patch>; <the CLI's main>" run`."""
    if patch is None:
        return [sys.executable, "-m", "qlora_pipeline", "run"]
    code = f"import sys; {patch}; from qlora_pipeline.cli import main; main()"
    return [sys.executable, "-c", code, "run"]
