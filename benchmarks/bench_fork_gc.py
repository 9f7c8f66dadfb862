"""DVC's own time around a stage in a child of the fork server, with the server's objects frozen
out of the garbage collector (`gc.freeze()`, as it runs) and without, side by side in one
invocation.

The fork server imports torch, transformers, peft, bitsandbytes, lm-eval and DVC, then forks a
child per `dvc repro` and per stage command. Without the freeze, a full collection in a child
walks every object the imports made (and writes to their pages). Two real fork servers, one
started with `gc.freeze` made a no-op, each run `dvc repro --force --single-item quant-report`
(its command in the same server, as in a flow run) in a scratch copy of the project (the
committed dvc.lock, `models/base` from this checkout: run `make run` first), alternating in
rounds. DVC's time is the request's wall time less the command's own (its run record): DVC's
work around it (collecting the stage, hashing, the run cache, rewriting dvc.lock) and the
command's start.

Prints medians and not-frozen/frozen (geometric mean over rounds, 95% paired-bootstrap interval),
writes benchmarks/results/fork_gc.json.

    .venv/bin/python benchmarks/bench_fork_gc.py [--rounds 6]
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

from common import ROOT, paired_ratio, scratch_copy, write_results

sys.path.insert(0, str(ROOT / "src"))
STAGE = "quant-report"
VARIANTS = ("not frozen", "frozen")
NO_FREEZE = (  # the server as `python -m qlora_pipeline.forkserver` runs it, gc.freeze a no-op
    "import gc, os, signal, sys; gc.freeze = lambda: None; "
    "from qlora_pipeline.forkserver import serve; "
    "signal.signal(signal.SIGTERM, lambda *_: os._exit(0)); serve(sys.argv[1], sys.argv[2])"
)


def server(frozen: bool, folder: Path, pinned: str) -> tuple[subprocess.Popen, str]:
    """A fork server (frozen: exactly as the flow starts one) and its address."""
    socket = str(folder / ("frozen" if frozen else "plain"))
    how = ["-m", "qlora_pipeline.forkserver"] if frozen else ["-c", NO_FREEZE]
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
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as sockets:
        project = Path(tmp)
        scratch_copy(project)
        shutil.copy2(ROOT / "dvc.lock", project / "dvc.lock")
        shutil.copytree(ROOT / "models/base", project / "models/base")
        subprocess.run(["git", "init", "-q"], cwd=project, check=True)
        servers = {v: server(v == "frozen", Path(sockets), pinned) for v in VARIANTS}
        try:
            for v in VARIANTS:  # warm-up: the servers' imports, DVC's state database
                repro(servers[v][1], project)
            for r in range(args.rounds):
                for v in VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS)):
                    runs[v].append(repro(servers[v][1], project))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait()
    keys = ("dvc", "command")
    med = {v: {k: statistics.median(x[k] for x in runs[v]) for k in keys} for v in VARIANTS}
    ratio = paired_ratio(
        np.array([x["dvc"] for x in runs["not frozen"]]),
        np.array([x["dvc"] for x in runs["frozen"]]),
    )
    print(f"{'variant':<12}{'DVC around the stage (s)':>26}{'its command (s)':>17}")
    for v in VARIANTS:
        print(f"{v:<12}{med[v]['dvc']:>26.2f}{med[v]['command']:>17.2f}")
    lo, hi = ratio["ci_low"], ratio["ci_high"]
    print(f"not frozen / frozen: {ratio['estimate']:.2f} [{lo:.2f}, {hi:.2f}]")
    write_results(
        ROOT / "benchmarks" / "results" / "fork_gc.json",
        {
            "stage": STAGE,
            "rounds": args.rounds,
            "median_s": med,
            "not_frozen_over_frozen": ratio,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
