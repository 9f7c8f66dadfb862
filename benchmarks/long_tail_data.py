"""A long-tailed instruction mix for bench_packing, from the default run's data and GSM8K.

The default run's examples are nearly equal in length (15 to 19 tokens), so per-batch padding
wastes little and packing cannot pay there. Instruction-tuning mixes usually have a long tail: many
short items and some long ones, each long one setting the padded length of its whole batch. This
writes one such mix as an alpaca JSONL file:

  - every train example of the default run's synthetic task (conf/: its generator, its seed);
  - every GSM8K train item (a real public dataset, MIT licence) as question -> final answer (the
    number after "####"; the worked solutions alone are longer than the tiny base's context).

Prepared with `data.length_policy=drop`, the GSM8K items longer than `data.max_length` are dropped,
so what is left of them spreads from about 50 tokens to the limit. `make bench-packing-long-tail`
writes the mix to the temporary folder (not data/raw/, a dependency of the prepare stage) and runs
bench_packing.py on it:

    .venv/bin/python benchmarks/long_tail_data.py ../shared/datasets/gsm8k /tmp/long_tail.jsonl
    .venv/bin/python benchmarks/bench_packing.py --out benchmarks/results/packing_long_tail.json \\
        data=local data.path=/tmp/long_tail.jsonl data.max_length=128 data.length_policy=drop \\
        data.dedupe=false
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import ROOT

sys.path.insert(0, str(ROOT / "src"))


def gsm8k_items(folder: Path) -> list[dict[str, str]]:
    """GSM8K's train.jsonl in `folder` as alpaca records: the question, its final answer."""
    items = []
    path = folder / "train.jsonl"
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        if "####" not in row.get("answer", ""):
            sys.exit(f"error: {path}:{n}: no '#### <final answer>' in its answer")
        items.append({"instruction": row["question"], "output": row["answer"].split("####")[-1]})
    return items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("gsm8k", type=Path, help="a folder holding GSM8K's train.jsonl")
    p.add_argument("out", type=Path, help="the JSONL file to write (its folder is created)")
    args = p.parse_args()
    if not (args.gsm8k / "train.jsonl").is_file():
        sys.exit(f"error: {args.gsm8k / 'train.jsonl'}: no such file")

    from qlora_pipeline.data.synthetic import generate
    from qlora_pipeline.files import atomic_write_text
    from qlora_pipeline.tracking.dvc import compose

    _, cfg = compose(ROOT, [])
    assert cfg.data.synthetic is not None  # the default run's data is the generated task
    short = generate(cfg.data.synthetic, cfg.seed)["train"]
    long = gsm8k_items(args.gsm8k)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in [*short, *long]))
    print(f"{args.out}: {len(short)} synthetic + {len(long)} GSM8K records")


if __name__ == "__main__":
    main()
