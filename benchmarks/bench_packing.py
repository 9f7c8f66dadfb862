"""Packing against per-batch padding, in the pipeline's own training, side by side.

`data.packing=true` packs train examples into rows of `data.max_length` tokens with exact
boundaries (positions restart at each example, transformers builds a block-diagonal causal mask;
a test checks packed logits equal each example run alone). Without it the collator pads each
batch to its longest row. Which is faster depends on the data (how much per-batch padding there is
to save) and on the attention kernel (a block-diagonal mask, dense on a CPU, against the plain
causal one). This measures it, for both arms:

  padded qlora / lora   the data as the run prepares it, batch `train.batch_size`
  packed qlora / lora   the same data packed, at the batch of packed rows that holds as many
                        examples (so as many real tokens) a step as the padded batch

The data is prepared twice from the composed config (conf/, with the data overrides given), with
the default run's base tokenizer; everything else is the default run's training (params.yaml). The
variants run in the baton harness (`baton.py`): `--replicas` processes each, one training at a
time, ratios per cycle with 95% two-stage bootstrap intervals over the cycles and the processes
(`common.replicated_ratio`). Tokens/s counts non-padding tokens.

Needs the base of the default run (`make run`). Prints a table and writes
benchmarks/results/packing.json (or --out). On a long-tailed mix of the default data and GSM8K
(`long_tail_data.py`): `make bench-packing-long-tail GSM8K=<folder with its train.jsonl>`.

    .venv/bin/python benchmarks/bench_packing.py [--steps 300] [--block 10] [--out F] [data.OVERRIDE ...]
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from baton import parser, per_cycle, race, total
from common import ROOT, replicated_ratio, write_results

sys.path.insert(0, str(ROOT / "src"))

ARMS = ("qlora", "lora")


def prepare_both(overrides: list[str], work: Path) -> tuple[dict, dict, int, dict]:
    """The data prepared padded and packed into `work`; both manifests, the run's batch, and the
    token lengths of the train rows kept (the manifest's are before truncation or dropping)."""
    import datasets

    from qlora_pipeline.data.prepare import length_stats, prepare, row_lengths
    from qlora_pipeline.modeling.load import base_context, load_tokenizer
    from qlora_pipeline.tracking.dvc import compose

    datasets.disable_progress_bars()  # two small preparations: no bars to read
    _, cfg = compose(ROOT, overrides)
    base, trust = ROOT / cfg.paths.base, cfg.model.trust_remote_code
    tokenizer, context = load_tokenizer(base, trust), base_context(base, trust)
    manifests = {
        name: prepare(
            dataclasses.replace(cfg.data, packing=packing),
            tokenizer,
            cfg.seed,
            work / name,
            context,
        )
        for name, packing in (("padded", False), ("packed", True))
    }
    kept = length_stats(
        row_lengths(datasets.load_from_disk(str(work / "padded" / "dataset"))["train"])
    )
    return manifests["padded"], manifests["packed"], cfg.train.batch_size, kept


def main() -> None:
    p = parser(__doc__)
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks/results/packing.json",
        help="the JSON results file (default %(default)s)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides of the data section (data=..., data.KEY=...): which data to prepare",
    )
    args = p.parse_args()
    other = [o for o in args.overrides if not o.lstrip("+~").startswith("data")]
    if other:
        sys.exit(f"error: {other[0]}: only data overrides (data=..., data.KEY=...) apply here")
    if not (ROOT / "models/base").is_dir():
        sys.exit("needs models/base: run `make run` (or `dvc repro bootstrap`)")
    os.chdir(ROOT)  # data.path and friends are relative to the project
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        padded, packed, batch, lengths = prepare_both(args.overrides, work)
        examples, rows = packed["packing"]["examples"], packed["packing"]["rows"]
        packed_batch = max(1, round(batch * rows / examples))
        specs = [
            (f"{layout} {arm}", "pipeline", given)
            for arm in ARMS
            for layout, given in (
                ("padded", {"data": str(work / "padded")}),
                ("packed", {"data": str(work / "packed"), "batch": packed_batch}),
            )
        ]
        runs = race(specs, args.steps, args.block, work, args.replicas)

    rows_out = {}
    for v, procs in runs.items():
        wall, steps, tokens = (total(procs, k) for k in ("wall", "steps", "tokens"))
        rows_out[v] = {
            "batch": packed_batch if v.startswith("packed") else batch,
            "step_ms": 1000 * wall / steps,
            "tokens_per_step": tokens / steps,
            "tokens_per_s": tokens / wall,
            "peak_rss_mb": max(p["peak_rss_mb"] for p in procs),
            "blocks": [p["blocks"] for p in procs],
        }

    def speed(v: str, clock: str) -> np.ndarray:
        return per_cycle(runs[v], lambda x: x["tokens"] / x[clock])

    ratios = {
        clock: {
            arm: replicated_ratio(
                [(1, speed(f"packed {arm}", clock)), (-1, speed(f"padded {arm}", clock))]
            )
            for arm in ARMS
        }
        for clock in ("wall", "cpu")
    }
    print(
        f"data: {padded['source']['name']}, {examples} train examples of {lengths['min']}-"
        f"{lengths['max']} tokens (mean {lengths['mean']}); packed into {rows} rows of <= "
        f"{packed['packing']['length']} (padding to that length: "
        f"{packed['packing']['padding_waste_unpacked']:.0%} unpacked, "
        f"{packed['packing']['padding_waste_packed']:.0%} packed)"
    )
    print(f"{'variant':14s}{'batch':>7s}{'ms/step':>9s}{'tokens/step':>13s}{'tokens/s':>10s}")
    for v, r in rows_out.items():
        print(
            f"{v:14s}{r['batch']:7d}{r['step_ms']:9.1f}{r['tokens_per_step']:13.1f}"
            f"{r['tokens_per_s']:10.0f}"
        )
    n = ratios["wall"][ARMS[0]]["cycles"]
    print(
        f"tokens/s, packed/padded, paired per cycle of {args.block} steps over {n} cycles and "
        f"{args.replicas} processes a variant:"
    )
    for clock, by_arm in ratios.items():
        print(
            f"  {clock:4s} "
            + ", ".join(
                f"{arm} {r['estimate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                for arm, r in by_arm.items()
            )
        )
    write_results(
        args.out,
        {
            "steps": args.steps,
            "block": args.block,
            "replicas": args.replicas,
            "overrides": args.overrides,
            "data": {
                "name": padded["source"]["name"],
                "train_lengths": lengths,
                "packing": packed["packing"],
            },
            "variants": rows_out,
            **{f"{clock}_packed_over_padded_tokens_per_s": r for clock, r in ratios.items()},
        },
    )


if __name__ == "__main__":
    main()
