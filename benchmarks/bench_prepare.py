"""Benchmark the prepare step on generated alpaca-style rows (not a test; prints a table).

    .venv/bin/python benchmarks/bench_prepare.py [--rows 100000] [--max-length 256]

Rows are word salad of realistic lengths (instruction 4-40 words, optional input, output 2-80 words)
with 2% empty rows and 3% duplicates, tokenized by the tiny bootstrap BPE tokenizer (512 tokens, so
about 1.5 tokens per word). Each configuration runs on a fresh output folder (no cache hit).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def generate_rows(n: int, seed: int = 0) -> list[dict[str, str]]:

    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(5000)
    ]

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choices(vocab, k=rng.randint(lo, hi)))

    rows = []
    for _ in range(n):
        r = rng.random()
        if r < 0.02:
            rows.append({"instruction": " ", "input": "", "output": words(2, 5)})
        elif r < 0.05 and rows:
            rows.append(dict(rng.choice(rows)))
        else:
            extra = words(3, 30) if rng.random() < 0.4 else ""
            rows.append({"instruction": words(4, 40), "input": extra, "output": words(2, 80)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--rows", type=int, default=100_000, help="rows to generate (default %(default)s)"
    )
    p.add_argument("--max-length", type=int, default=1024, help="data.max_length")
    args = p.parse_args()

    import dataclasses

    from qlora_pipeline.data.prepare import prepare
    from qlora_pipeline.modeling.bootstrap import build_tokenizer, corpus_lines
    from qlora_pipeline.runtime import setup_logging
    from qlora_pipeline.tracking.dvc import compose

    setup_logging()
    tokenizer = build_tokenizer(corpus_lines(20000, 0), 512)
    work = Path(tempfile.mkdtemp(prefix="bench_prepare-"))
    src = work / "rows.jsonl"
    t = time.perf_counter()
    with open(src, "w", encoding="utf-8") as f:
        for row in generate_rows(args.rows):
            f.write(json.dumps(row) + "\n")
    print(
        f"generated {args.rows} rows ({src.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s"
    )

    root = Path(__file__).resolve().parents[1]
    local = compose(root, ["data=local", f"data.path={src}"])[1].data  # conf/data/local.yaml
    results = []
    for packing, repeat in ((False, False), (False, True), (True, False)):
        cfg = dataclasses.replace(
            local,
            name="bench",
            source="local",
            path=str(src),
            dedupe=True,
            shuffle=True,
            max_length=args.max_length,
            packing=packing,
            frozen_test=None,
        )
        t = time.perf_counter()
        manifest = prepare(cfg, tokenizer, 0, work / f"out-{packing}")
        label = "cache hit" if repeat else ("packed" if packing else "unpacked")
        results.append((label, manifest, time.perf_counter() - t))

    print()
    header = f"{'run':>10} {'rows in':>8} {'train rows':>10} {'seconds':>8} {'rows/s':>8} {'pad waste':>9}"
    print(header)
    print("-" * len(header))
    for label, m, seconds in results:
        packed = label == "packed"
        waste = m["packing"]["padding_waste_packed" if packed else "padding_waste_unpacked"]
        train_rows = m["packing"]["rows"] if packed else m["splits"]["train"]["rows"]
        print(
            f"{label:>10} {args.rows:>8} {train_rows:>10} {seconds:>8.1f} "
            f"{args.rows / seconds:>8.0f} {waste:>9.1%}"
        )
    counts = results[0][1]["counts"]["train"]
    print(f"\ntrain filters: {json.dumps(counts)}")
    print(f"outputs under {work}")


if __name__ == "__main__":
    main()
