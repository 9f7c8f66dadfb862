"""How long a stage waits for a free slot of the Prefect concurrency limit, with and without
`pipelines.flow.hold_slot`'s pause, side by side in one invocation.

Each variant runs in its own process, with its own temporary Prefect server (SQLite) as `run`
starts one: a flow submits `--tasks` tasks one after the other, each started once the previous one
completed (as a stage waits for the one it depends on) and each holding a slot of a one-slot
limit for a few milliseconds through `hold_slot`. What a stage loses is the time from submitting
its task to having the slot, the pause included (it is part of the cost).
Variants alternate in rounds so the machine's noise hits both alike.

Prints a table (median and worst wait, and how many waits took over a second: the client's 2 s
retry after a "database is locked" 503) and writes benchmarks/results/slot_wait.json.

    .venv/bin/python benchmarks/bench_slot_wait.py [--tasks 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, write_results

CHILD = r"""
import json, sys, time
from prefect import flow, get_client, task
from pipelines.flow import hold_slot

pause, n = float(sys.argv[1]), int(sys.argv[2])

@task
def stage(submitted: float) -> float:
    with hold_slot("bench-slot-wait", pause):
        waited = time.perf_counter() - submitted
        time.sleep(0.01)
    return waited

@flow
def chain() -> list[float]:
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name("bench-slot-wait", 1)
    waits, previous = [], None
    for _ in range(n):
        future = stage.submit(time.perf_counter(), wait_for=[previous] if previous else None)
        waits.append(future.result())
        previous = future
    return waits

print("RESULT " + json.dumps(chain()))
"""


def run_variant(pause: float, tasks: int) -> list[float]:
    with tempfile.TemporaryDirectory() as home:
        env = {
            **os.environ,
            "PREFECT_HOME": home,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "1",  # as `run`
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]),
        }
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(pause), str(tasks)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"pause {pause}: failed\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from pipelines.flow import SLOT_PAUSE_S

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", type=int, default=8, help="tasks per flow (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="flows per variant (default %(default)s)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/slot_wait.json"))
    args = p.parse_args()
    variants = {"no pause": 0.0, f"pause {SLOT_PAUSE_S:g} s (hold_slot)": SLOT_PAUSE_S}
    waits: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for name, pause in variants.items():
            got = run_variant(pause, args.tasks)
            waits[name] += got[1:]  # the first task has no predecessor to race with
            print(f"round {r + 1} {name:24s} " + " ".join(f"{w:.2f}" for w in got))
    rows = {
        name: {
            "median_s": statistics.median(w),
            "max_s": max(w),
            "over_1s": sum(x > 1 for x in w),
            "waits": len(w),
        }
        for name, w in waits.items()
    }
    print(f"{'variant':26s}{'median s':>10s}{'max s':>8s}{'waits > 1 s':>14s}")
    for name, row in rows.items():
        print(
            f"{name:26s}{row['median_s']:10.3f}{row['max_s']:8.2f}"
            f"{row['over_1s']:>9d} of {row['waits']}"
        )
    write_results(
        Path(args.out),
        {"tasks": args.tasks, "rounds": args.rounds, "variants": rows},
    )


if __name__ == "__main__":
    main()
