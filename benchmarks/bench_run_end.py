"""A warm no-op `qlora-pipeline run` as it runs and with each of two changes to its end undone,
side by side in one invocation.

  - `cli.end`: a command line ends with `os._exit` once its exit handlers ran and its output is
    flushed, not with the interpreter's teardown of every module it imported. Undone, it exits
    as Python does.
  - `api.TEMPORARY_SETTINGS`: no flow-run heartbeats on the temporary server; Prefect's flow
    engine joined its heartbeat thread, which sleeps in 1 s steps, at the end of every flow run.
    Undone, Prefect's default (a heartbeat every 180 s).
A warm no-op (every stage up to date) is where a run's fixed costs show alone; the same end is
paid by every run. Each variant is its own `qlora-pipeline run` process in one scratch copy of
this checkout (its outputs, DVC cache and Prefect database: run `make run` first), in rotating
order over `--rounds` rounds after a warm-up round. Wall time from start to exit.

Prints medians and each variant against the run as it is (mean paired difference in seconds,
95% paired-bootstrap interval), writes benchmarks/results/run_end.json.

    .venv/bin/python benchmarks/bench_run_end.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import AS_RUN, ROOT, cli_run, project_env, seconds_against, side_by_side, write_results

sys.path.insert(0, str(ROOT / "src"))
VARIANTS = {  # what each variant runs first (`common.cli_run`); None: the CLI as it is
    AS_RUN: None,
    "teardown": "from qlora_pipeline import cli; cli.end = sys.exit",
    "heartbeats": "from pipelines import api; api.TEMPORARY_SETTINGS.clear()",
}


def timed(variant: str, project: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(
        cli_run(VARIANTS[variant]),
        cwd=project,
        env=project_env(project),
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or "Running stage" in proc.stdout:
        raise SystemExit(f"{variant}: not a warm no-op (exit {proc.returncode}):\n{proc.stderr}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="runs per variant")
    args = parser.parse_args()
    if not (ROOT / "reports" / "metrics.json").is_file() or not (ROOT / "models").is_dir():
        raise SystemExit("no outputs here: run `make run` first")

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".venv", ".git"))
        subprocess.run(["git", "init", "-q"], cwd=project, check=True)
        # the warm-up run of each also has DVC hash the copied outputs once
        walls = side_by_side(list(VARIANTS), args.rounds, lambda v: timed(v, project))
    diffs = seconds_against(walls, AS_RUN)
    write_results(
        ROOT / "benchmarks" / "results" / "run_end.json",
        {"rounds": args.rounds, "wall_s": walls, "minus_as_run_s": diffs},
    )


if __name__ == "__main__":
    main()
