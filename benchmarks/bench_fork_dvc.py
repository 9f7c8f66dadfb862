"""DVC's own time around a stage in a child of the fork server, the server as it runs and with
each of its preparations for DVC undone, side by side in one invocation.

The fork server imports torch, transformers, peft, bitsandbytes, lm-eval and DVC, then forks a
child per `dvc repro` and per stage command. What it does for the `dvc` children, each undone
in one variant:
  - `gc.freeze()` after its imports: without it a full collection in a child walks every object
    the imports made (and writes to their pages);
  - `dvc_cli.warm()`: the modules DVC imports only as it runs, its argument parser, and dvc.lock
    read with the safe C parser when DVC rewrites it (`dvc_cli.lock_fast_path`). Undone, the
    server imports what it imported before and the children read dvc.lock round trip;
  - `dvc_cli.commands_in_fork()`: DVC's child runs the stage command in a fork of itself. Undone
    ("via a shell"), it starts it as DVC does, through a shell, as a new `qlora-pipeline`
    interpreter that hands it to the server (`forkserver.delegate`).
Real fork servers, one per variant, each run `dvc repro --force --single-item quant-report` (its
command in the same server, as in a flow run) in a scratch copy of the project (the committed
dvc.lock, `models/base` from this checkout: run `make run` first), alternating in rounds. DVC's
time is the request's wall time less the command's own (its run record): DVC's work around it
(collecting the stage, hashing, the run cache, rewriting dvc.lock) and the command's start.

Prints medians and each variant against the server as it runs, DVC's time and the command's own
(geometric mean over rounds, 95% paired-bootstrap interval), writes
benchmarks/results/fork_dvc.json.

    .venv/bin/python benchmarks/bench_fork_dvc.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import AS_RUN, ROOT, paired_ratio, scratch_copy, side_by_side, write_results

sys.path.insert(0, str(ROOT / "src"))
STAGE = "quant-report"
SERVE = (
    "from qlora_pipeline.forkserver import serve; "
    "signal.signal(signal.SIGTERM, lambda *_: os._exit(0)); serve(sys.argv[1], sys.argv[2])"
)
# what the server imported of DVC before `dvc_cli.warm`
IMPORTED_BEFORE = (
    "dvc.cli.parser dvc.repo.reproduce dvc.repo.checkout dvc.stage dvc.dvcfile dvc.rwlock "
    "dvc.lock dvc.scm dvc.cachemgr dvc.data_cloud dvc.utils.strictyaml dvc_data.hashfile.db.local"
)
VARIANTS = {  # how each server starts: `python -c <this> SOCKET PINNED`
    AS_RUN: None,  # `python -m qlora_pipeline.forkserver`, as the flow starts it
    "not frozen": "import gc; gc.freeze = lambda: None",
    "not warmed": (
        "import importlib; from qlora_pipeline.tracking import dvc_cli; "
        "dvc_cli.lock_fast_path = lambda: None; "
        f"dvc_cli.warm = lambda: [importlib.import_module(m) for m in {IMPORTED_BEFORE!r}.split()]"
        " + [dvc_cli.commands_in_fork()]"
    ),
    "via a shell": (
        "from qlora_pipeline.tracking import dvc_cli; dvc_cli.commands_in_fork = lambda: None"
    ),
}


def server(variant: str, folder: Path, pinned: str) -> tuple[subprocess.Popen, str]:
    """A fork server started as `variant` says, and its address."""
    socket = str(folder / variant.replace(" ", "-"))
    undo = VARIANTS[variant]
    how = ["-m", "qlora_pipeline.forkserver"]
    if undo is not None:
        how = ["-c", f"import os, signal, sys; {undo}; {SERVE}"]
    proc = subprocess.Popen(
        [sys.executable, *how, socket, pinned],
        env={**os.environ, "PYTHONHASHSEED": "0"},
        stdin=subprocess.DEVNULL,
    )
    return proc, f"{pinned}@{proc.pid}@{socket}"


def repro(address: str, project: Path) -> dict[str, float]:
    from qlora_pipeline.forkserver import ENV, dvc
    from qlora_pipeline.tracking.dvc import stage_env

    t0 = time.perf_counter()
    code = dvc(
        address,
        ["repro", "-q", "--force", "--single-item", STAGE],
        str(project),
        stage_env({ENV: address}),
        True,
    )
    total = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"dvc repro {STAGE} failed ({code})")
    command = json.loads((project / "runs" / f"{STAGE}.json").read_text())["wall_s"]
    return {"dvc": total - command, "command": command}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="requests per variant")
    args = parser.parse_args()
    if not (ROOT / "models/base/model.safetensors").is_file():
        raise SystemExit("models/base is missing: run `make run` first")

    import numpy as np

    from qlora_pipeline.config.schema import load_params
    from qlora_pipeline.forkserver import pins

    runtime = load_params(ROOT / "params.yaml").runtime
    pinned = pins(runtime.cpu_kernels, runtime.threads)
    names = list(VARIANTS)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as sockets:
        project = Path(tmp)
        scratch_copy(project)
        shutil.copy2(ROOT / "dvc.lock", project / "dvc.lock")
        shutil.copytree(ROOT / "models/base", project / "models/base")
        subprocess.run(["git", "init", "-q"], cwd=project, check=True)
        servers = {v: server(v, Path(sockets), pinned) for v in names}
        try:  # the warm-up: the servers' imports, DVC's state database
            runs = side_by_side(names, args.rounds, lambda v: repro(servers[v][1], project))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait()
    keys = ("dvc", "command")
    med = {v: {k: statistics.median(x[k] for x in runs[v]) for k in keys} for v in names}
    ratios = {  # each variant against the server as run, DVC's time and the command's
        k: {
            v: paired_ratio(
                np.array([x[k] for x in runs[v]]), np.array([x[k] for x in runs[AS_RUN]])
            )
            for v in names
            if v != AS_RUN
        }
        for k in keys
    }

    def vs(k: str, v: str) -> str:
        r = ratios[k].get(v)
        return f"{r['estimate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if r else ""

    print(f"{'server':<13}{'DVC around the stage (s)':>26}{'/ as run':>20}", end="")
    print(f"{'its command (s)':>17}{'/ as run':>20}")
    for v in names:
        print(f"{v:<13}{med[v]['dvc']:>26.2f}{vs('dvc', v):>20}", end="")
        print(f"{med[v]['command']:>17.2f}{vs('command', v):>20}")
    write_results(
        ROOT / "benchmarks" / "results" / "fork_dvc.json",
        {
            "stage": STAGE,
            "rounds": args.rounds,
            "median_s": med,
            "over_as_run": ratios,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
