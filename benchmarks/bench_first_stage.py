"""A fresh clone's `qlora-pipeline run` up to its first stage's command, as it runs and with each
of two changes tried on its start, side by side in one invocation.

Until the first stage can start, three processes share the two cores: the command (composing
the config, importing Prefect and the flow), the temporary Prefect server booting, and the fork
server importing torch, transformers, peft, bitsandbytes, lm-eval and DVC, which the first stage
waits for (`dvc repro` and its command run in it). The changes tried (neither is in the code;
each variant applies its own):
  - `server niced`: the temporary server at a lower CPU priority (nice 10), so that the fork
    server gets the cores first;
  - `fork server before composing`: with outputs missing, as in a fresh clone, the fork server
    started for the kernels params.yaml pins before the overrides are composed (~0.4 s), not
    after.
Each variant is its own `qlora-pipeline run` in one scratch checkout of what a fresh clone has (the
committed dvc.lock, no outputs; its Prefect database made by a warm-up round), in rotating order
over `--rounds` rounds. The time is from the command's start to DVC's `> qlora-pipeline
bootstrap` line (the first stage's command starting); then the run is killed.

Prints medians and each variant against the run as it is (mean paired difference in seconds,
95% paired-bootstrap interval), writes benchmarks/results/first_stage.json.

    .venv/bin/python benchmarks/bench_first_stage.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_e2e import checkout
from common import AS_RUN, ROOT, cli_run, project_env, seconds_against, side_by_side, write_results

sys.path.insert(0, str(ROOT / "src"))
VARIANTS = {  # what each variant runs first (`common.cli_run`); None: the CLI as it is
    AS_RUN: None,
    "server niced": (
        "import os; from pipelines import api; start = api.start; "
        "api.start = lambda: (start(), os.setpriority(os.PRIO_PROCESS, api._SERVER['proc'].pid, 10))"
    ),
    "fork server before composing": (
        "from pipelines import checks; from qlora_pipeline.forkserver import start_early; "
        "from qlora_pipeline.config.schema import load_params; prelaunch = checks.prelaunch; "
        "r = load_params('params.yaml').runtime; "
        "checks.prelaunch = lambda root, o: (start_early(r.cpu_kernels, r.threads), "
        "prelaunch(root, o))[1]"
    ),
}
FIRST = "> qlora-pipeline bootstrap"


def to_first_stage(variant: str, project: Path, limit_s: float = 120) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cli_run(VARIANTS[variant]),
        cwd=project,
        env=project_env(project),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its servers and stages in its process group
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(FIRST):
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > limit_s:
                break
        raise SystemExit(f"{variant}: no `{FIRST}` line (exit {proc.poll()})")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(project / ".dvc" / "tmp", ignore_errors=True)  # DVC's stale locks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="runs per variant")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        project = checkout(Path(tmp) / "clone")
        # the warm-up run of each also makes Prefect's database and the bytecode
        walls = side_by_side(list(VARIANTS), args.rounds, lambda v: to_first_stage(v, project))
    diffs = seconds_against(walls, AS_RUN)
    write_results(
        ROOT / "benchmarks" / "results" / "first_stage.json",
        {"rounds": args.rounds, "to_first_stage_s": walls, "minus_as_run_s": diffs},
    )


if __name__ == "__main__":
    main()
