"""Evaluation batch size: the evaluate stage's work at several `eval.batch_size`s, side by side.

One process, pinned to params.yaml's CPU kernels and threads, runs
`qlora_pipeline.evaluation.evaluate.evaluate` (what `qlora-pipeline evaluate MODEL` runs: load,
lm-eval's generation over the test set, scoring, writing) on the default run's outputs, once per
batch size per round, the sizes in turn, every other round in reverse order. Per size: the median
time and the time against the configured size, paired per round (geometric mean, 95% bootstrap
interval), and whether every generated answer and score is the same bytes as at the configured
size (a batch size that changes answers is not a speed setting).

Needs the default run's outputs (`make run`). Prints a table and writes
benchmarks/results/eval.json.

    .venv/bin/python benchmarks/bench_eval.py [--sizes 8,16,32,64,200] [--rounds 6] [--model qlora]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, paired_ratio, write_results

sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's bars, a dozen per round


def outputs_digest(folder: Path) -> str:
    """sha256 over the answers and scores the evaluation wrote: every per-sample file, and the
    tasks of each metrics.json (its protocol records the batch size itself)."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.name.startswith("samples_"):
            h.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
        elif path.name == "metrics.json":
            tasks = json.loads(path.read_text(encoding="utf-8"))["tasks"]
            h.update(json.dumps(tasks, sort_keys=True).encode())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="8,16,32,64,200", help="batch sizes (default %(default)s)")
    p.add_argument("--rounds", type=int, default=6, help="rounds (default %(default)s)")
    p.add_argument(
        "--model",
        default="qlora",
        choices=("base", "qlora", "qlora_on_bf16", "merged", "lora"),
        help="which evaluation (default %(default)s: both training seeds of the 4-bit arm)",
    )
    args = p.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    os.chdir(ROOT)
    from qlora_pipeline.config.schema import load_params
    from qlora_pipeline.runtime import pin_cpu, setup_logging, setup_torch

    cfg = load_params(Path("params.yaml"))
    if not Path(cfg.paths.data, "test.jsonl").is_file() or not Path(cfg.paths.adapters).is_dir():
        sys.exit("needs the default run's outputs: run `make run`")
    pin_cpu(cfg.runtime.cpu_kernels, cfg.runtime.threads)
    setup_logging(logging.WARNING)
    from qlora_pipeline.evaluation.evaluate import evaluate

    configured = cfg.eval.batch_size
    if configured not in sizes:
        sizes.append(configured)
    times: dict[int, list[float]] = {b: [] for b in sizes}
    digests: dict[int, set[str]] = {b: set() for b in sizes}
    paths = cfg.paths
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for b in sizes if r % 2 == 0 else sizes[::-1]:
                sized = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, batch_size=b))
                out = Path(tmp) / f"r{r}-b{b}"
                setup_torch(cfg.seed)  # as each stage process starts
                t = time.perf_counter()
                evaluate(
                    sized, args.model, paths.base, paths.data, paths.adapters, out, paths.exports
                )
                times[b].append(time.perf_counter() - t)
                digests[b].add(outputs_digest(out))
            print(f"round {r + 1}: " + ", ".join(f"{b}: {times[b][-1]:.2f} s" for b in sizes))
    reference = digests[configured]
    rows = {}
    for b in sizes:
        ratio = paired_ratio(np.array(times[b]), np.array(times[configured]))
        rows[b] = {
            "median_s": float(np.median(times[b])),
            "times_s": times[b],
            "vs_configured": ratio,
            "same_outputs_as_configured": digests[b] == reference and len(reference) == 1,
        }
    print(f"evaluate {args.model}, {args.rounds} rounds; configured eval.batch_size={configured}")
    print(f"{'batch':>6s}{'median s':>10s}{'vs configured [95% CI]':>28s}{'same outputs':>14s}")
    for b, row in rows.items():
        x = row["vs_configured"]
        span = f"{x['estimate']:.3f} [{x['ci_low']:.3f}, {x['ci_high']:.3f}]"
        print(
            f"{b:6d}{row['median_s']:10.2f}{span:>28s}"
            f"{'yes' if row['same_outputs_as_configured'] else 'NO':>14s}"
        )
    write_results(
        ROOT / "benchmarks/results/eval.json",
        {"model": args.model, "rounds": args.rounds, "configured": configured, "sizes": rows},
    )


if __name__ == "__main__":
    main()
