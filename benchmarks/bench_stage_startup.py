"""What a stage's own process costs, against the flow's fork server, side by side in one invocation.

Every stage command used to import torch, transformers, peft, bitsandbytes and lm-eval anew. The
flow now runs them in a fork server (`qlora_pipeline.forkserver`) that imported those once. This
runs the same stage commands both ways, alternating in rounds so machine noise hits both alike, in
a scratch copy of the project with a small config:
  - `bootstrap` with 60 pre-training steps (start-up plus ~12 s of compute: a slower child shows),
  - `prepare` on unchanged data (a cache hit: almost nothing but start-up),
  - `evaluate base` (start-up, model load, lm-eval on 40 items).
Prints a table (medians, seconds of wall time per command) and writes
benchmarks/results/stage_startup.json.

    .venv/bin/python benchmarks/bench_stage_startup.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, scratch_copy

SMALL = [  # the default tiny Llama (3.67M parameters), fewer pre-training steps, less data
    "model.bootstrap.steps=60",
    "data.synthetic.n_train=2000",
    "data.synthetic.n_val=20",
    "data.synthetic.n_test=40",
    "eval.batch_size=40",
]
COMMANDS = (
    ("bootstrap", ["bootstrap"]),
    ("prepare (cache hit)", ["prepare"]),
    ("evaluate base", ["evaluate", "base"]),
)


def timed(project: Path, args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_pipeline", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    from qlora_pipeline.forkserver import ENV, serving

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    raw: dict[str, dict[str, list[float]]] = {
        name: {"own process": [], "fork server": []} for name, _ in COMMANDS
    }
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        scratch_copy(project)
        timed(project, ["compose", *SMALL], env)
        for _, command in COMMANDS:  # outputs exist once, so every timed run does the same work
            timed(project, command, env)
        with serving("avx2", 2) as address:
            served = {**env, ENV: address}
            timed(project, ["prepare"], served)  # waits for the server's imports: not counted
            for _ in range(args.rounds):
                for name, command in COMMANDS:
                    raw[name]["own process"].append(timed(project, command, env))
                    raw[name]["fork server"].append(timed(project, command, served))
    median = {
        name: {way: statistics.median(v) for way, v in ways.items()} for name, ways in raw.items()
    }
    print(f"{'command':<22}{'own process s':>15}{'fork server s':>15}{'saved s':>10}")
    for name, m in median.items():
        own, fork = m["own process"], m["fork server"]
        print(f"{name:<22}{own:>15.2f}{fork:>15.2f}{own - fork:>10.2f}")
    out = ROOT / "benchmarks/results/stage_startup.json"
    out.write_text(
        json.dumps({"rounds": args.rounds, "median_s": median, "raw_s": raw}, indent=2) + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
