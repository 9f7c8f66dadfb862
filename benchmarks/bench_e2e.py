"""The default run end to end, cold and warm, its wall time split into compute and orchestration.

Runs of `qlora-pipeline run`, each in a scratch copy of the project (what a fresh clone has:
the committed dvc.lock, no outputs, no DVC cache):
  - first: a new checkout, so the run also creates Prefect's database (its migrations, once per
    checkout: PREFECT_HOME is project-local);
  - cold, `--cold` times (default 3): another new checkout each time, with the Prefect database
    the first run left (every stage computes, as after any change that invalidates them all);
    their orchestration share is given as a mean with its 95% t interval over those runs (the
    share is a ratio within a run, which the machine's drift moves little);
  - warm: the last of those checkouts again, nothing changed (DVC says every stage is up to date).
Compute is the stage commands' own time: the sum of `wall_s` of the run
records (each from the command's start in the fork server, whose libraries are already imported,
to its outputs written). Orchestration is the rest of the wall time: the CLI's start-up and
imports, composing the config, Prefect (its temporary server, flow and task runs, slot hand-overs),
DVC (status, hashing, the repro processes, cache copies) and the fork server's start.
The default `orchestration.slots` is 1, so stages do not overlap and the sum is meaningful.

Prints a table and writes benchmarks/results/e2e.json.

    .venv/bin/python benchmarks/bench_e2e.py [--cold 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, cli_run, mean_interval, project_env, scratch_copy, write_results


def timed_run(project: Path) -> tuple[float, dict[str, float]]:
    """The run's wall time and the wall time of each stage command it ran (its run records)."""
    records = project / "runs"
    before = {p: p.stat().st_mtime for p in records.glob("*.json")} if records.is_dir() else {}
    t0 = time.perf_counter()
    proc = subprocess.run(
        cli_run(None),
        cwd=project,
        env=project_env(project),
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"run failed:\n{proc.stderr[-3000:]}")
    ran = {
        p.stem: json.loads(p.read_text())["wall_s"]
        for p in records.glob("*.json")
        if before.get(p) != p.stat().st_mtime
    }
    return wall, ran


def measure(project: Path) -> dict:
    wall, ran = timed_run(project)
    compute = sum(ran.values())
    return {
        "wall_s": wall,
        "compute_s": compute,
        "orchestration_s": wall - compute,
        "orchestration_share": (wall - compute) / wall,
        "stages_run": len(ran),
        "orchestration_per_stage_s": (wall - compute) / len(ran) if ran else None,
        "stages": ran,
    }


def checkout(project: Path, prefect_home: Path | None = None) -> Path:
    """A scratch copy of the project as a git repository with the committed dvc.lock, as a
    clone has it (no outputs, no DVC cache), with `prefect_home` copied in."""
    project.mkdir()
    scratch_copy(project)
    shutil.copy2(ROOT / "dvc.lock", project / "dvc.lock")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    if prefect_home is not None:
        shutil.copytree(prefect_home, project / ".prefect")
    return project


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--cold", type=int, default=3, help="cold runs, each in a new checkout (default 3, >= 2)"
    )
    args = p.parse_args()
    if args.cold < 2:
        p.error("--cold: at least 2 (an interval needs two runs)")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        first = checkout(Path(tmp) / "first")
        rows["first"] = measure(first)
        for i in range(1, args.cold + 1):
            again = checkout(Path(tmp) / f"cold{i}", first / ".prefect")
            rows[f"cold {i}"] = measure(again)
        rows["warm"] = measure(again)
    cold = [r for label, r in rows.items() if label.startswith("cold")]
    share = mean_interval([r["orchestration_share"] for r in cold])
    per_stage = mean_interval([r["orchestration_per_stage_s"] for r in cold])
    print(
        f"{'run':7s}{'wall s':>9s}{'compute s':>11s}{'orchestration s':>17s}{'share':>7s}"
        f"{'stages':>8s}{'per stage s':>13s}"
    )
    for label, r in rows.items():
        per = r["orchestration_per_stage_s"]
        print(
            f"{label:7s}{r['wall_s']:9.1f}{r['compute_s']:11.1f}{r['orchestration_s']:17.1f}"
            f"{r['orchestration_share']:7.1%}{r['stages_run']:8d}"
            f"{'—' if per is None else f'{per:.1f}':>13s}"
        )
    print(
        f"cold, mean [95% t interval] over {share['n']} runs: orchestration share "
        f"{share['estimate']:.1%} [{share['ci_low']:.1%}, {share['ci_high']:.1%}], per stage "
        f"{per_stage['estimate']:.2f} s [{per_stage['ci_low']:.2f}, {per_stage['ci_high']:.2f}]"
    )
    write_results(
        ROOT / "benchmarks/results/e2e.json",
        {"runs": rows, "cold_share": share, "cold_per_stage_s": per_stage},
    )


if __name__ == "__main__":
    main()
