"""Training speed and memory: the pipeline's QLoRA and LoRA against a stock recipe, side by side.

Four variants in the baton harness (`baton.py`): each in `--replicas` processes of its own (peak
RSS only grows within a process), one training at a time, a baton passed round every `--block`
steps, so this machine's drift in speed (up to 25% within minutes) hits all four alike block by
block; the ratios are taken per cycle, paired, with two-stage bootstrap intervals over the cycles
(the first, warm-up, left out) and the processes (`common.replicated_ratio`):

  pipeline qlora / lora  `qlora_pipeline.training.train.train` as the train stage runs it
                         (our Trainer subclass, collator, step log and probes), in a process
                         set up as a stage's (`runtime.keep_freed_memory`)
  stock qlora / lora     transformers' Trainer + PEFT + bitsandbytes as their docs show it:
                         BitsAndBytesConfig (NF4, double quantization), prepare_model_for_kbit_
                         training, LoraConfig(target_modules="all-linear"); the default causal-LM
                         collator with padding (DataCollatorForLanguageModeling), no packing, no
                         other settings; glibc's malloc as it comes

Same base model (models/base) and data (data/prepared, the train split), same batch size, steps,
learning rate, optimizer, LoRA rank and seed, and the same CPU-kernel mode and threads as the
pipeline (runtime.pin_cpu from params.yaml, before torch is imported): on pinned CPU kernels both
recipes compute in fp32 (torch has no AVX2 bf16 matmul). Tokens/s counts non-padding tokens
(`include_num_input_tokens_seen="non_padding"`, a measurement, not a setting of the recipe).
Memory: peak RSS of the variant's process, and the tensors of the training by accounting (base
weights as loaded, adapter, its gradients, optimizer state).

Needs the base and prepared data of the default run (`make run`, or `dvc repro prepare`). Prints a
table (totals over the timed blocks, paired ratios with intervals) and writes
benchmarks/results/train.json.

    .venv/bin/python benchmarks/bench_train.py [--steps 300] [--block 10] [--replicas 6]

Six processes a variant (24 in all, about 650 MB of RAM each, about 20 minutes on 2 cores): with
three, the intervals (about +-6%) were wider than the 5% band the QLoRA/LoRA ratio is held to.

The GPU figures (`make bench-gpu`): `--shape llama-1b` or `llama-8b` trains a real-size
random-init Llama of that shape on random rows of `--seq-len` tokens (no padding), batch
`--batch`, rank `--r`, gradient checkpointing on, one process a variant (all of them hold
their model on the GPU at once); each variant's CUDA peak
(`torch.cuda.max_memory_allocated`, a process each) is printed beside the memory planner's
worst case for the same recipe, with the MFU (frozen base: 4 x params FLOPs per token, plus
6 x adapter params). `--shape tiny --steps 4 --block 2` smoke-tests that path on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from baton import parser, per_cycle, race, total
from common import ROOT, replicated_ratio, write_results

sys.path.insert(0, str(ROOT / "src"))
from qlora_pipeline.modeling.plan import KNOWN

VARIANTS = ("pipeline qlora", "pipeline lora", "stock qlora", "stock lora")

# Real-size random-init Llama shapes for the GPU figures (config.json fields); `tiny` smoke-tests
# the same path on a CPU in seconds.
SHAPES = {
    "tiny": {
        "vocab_size": 384,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    },
    "llama-1b": KNOWN["llama-3.2-1b"],
    "llama-8b": {  # meta-llama/Llama-3.1-8B
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
}
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}  # bf16


def synthetic(shape: str, seq_len: int, rows: int, work: Path) -> tuple[Path, Path]:
    """A random-init Llama of `shape` (bf16 safetensors, the default base's tokenizer) and
    `rows` random rows of exactly `seq_len` tokens, all of them trained on (no padding)."""
    import torch
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    base, data = work / "base", work / "data"
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq_len, 2048))
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(base, safe_serialization=True)
    del model
    AutoTokenizer.from_pretrained(ROOT / "models/base").save_pretrained(base)
    (base / "base.json").write_text(json.dumps({"source": "bootstrap"}))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (rows + 8, seq_len), generator=g).tolist()
    columns = {"input_ids": ids, "attention_mask": [[1] * seq_len] * len(ids), "labels": ids}
    split = Dataset.from_dict(columns)
    DatasetDict(
        train=split.select(range(rows)), val=split.select(range(rows, rows + 8))
    ).save_to_disk(str(data / "dataset"))
    (data / "manifest.json").write_text(json.dumps({"cache_key": f"{shape}-{seq_len}-{rows}"}))
    return base, data


def planned_peak(shape: str, method: str, seq_len: int, batch: int, r: int, ckpt: bool) -> float:
    """The memory planner's worst case for this variant's recipe (the configured arm)."""
    from qlora_pipeline.config.schema import load_params
    from qlora_pipeline.modeling.plan import estimate, recipe

    cfg = load_params(ROOT / "params.yaml")
    rec = recipe(cfg.methods[method], cfg.train, seq_len, batch, r=r, checkpointing=ckpt)
    return estimate(SHAPES[shape], rec)["peak_worst"]


def train_flops_per_token(shape: str, r: int) -> float:
    """A frozen base: forward 2N and input gradients 2N per token (no weight gradients), plus
    the adapter's forward, input and weight gradients (6 per adapter parameter); recomputation
    under checkpointing is not counted (the MFU convention)."""
    from qlora_pipeline.modeling.plan import Shape, adapter_params

    s = Shape.from_config(SHAPES[shape])
    n = sum(s.params().values()) - s.vocab * s.hidden  # the embedding lookup is no matmul
    return 4.0 * n + 6.0 * adapter_params(s, r)


def main() -> None:
    p = parser(
        __doc__,
        replicas=None,
        replicas_default="6; 1 with --shape, where every process holds its model on the one GPU",
    )
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        help="a random-init Llama of this shape on random full-length rows, instead of the "
        "default run's base and data (the GPU figures: llama-1b, llama-8b)",
    )
    p.add_argument("--seq-len", type=int, default=2048, help="with --shape (default %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="with --shape (default %(default)s)")
    p.add_argument("--r", type=int, default=16, help="with --shape: LoRA rank (%(default)s)")
    p.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --shape: gradient checkpointing (default on)",
    )
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for the MFU")
    p.add_argument("--out", help="default: benchmarks/results/train[-SHAPE].json")
    args = p.parse_args()
    args.replicas = args.replicas or (1 if args.shape else 6)
    out = Path(
        args.out or ROOT / f"benchmarks/results/train{'-' + args.shape if args.shape else ''}.json"
    )
    if not (ROOT / "data/prepared/dataset").is_dir() or not (ROOT / "models/base").is_dir():
        sys.exit("needs models/base and data/prepared: run `make run` (or `dvc repro prepare`)")
    with tempfile.TemporaryDirectory() as work:
        shape: dict = {}
        if args.shape:
            base, data = synthetic(args.shape, args.seq_len, args.steps * args.batch, Path(work))
            shape = {
                "base": str(base),
                "data": str(data),
                "batch": args.batch,
                "r": args.r,
                "checkpointing": args.checkpointing,
            }
        specs = [(v, v.split()[0], shape) for v in VARIANTS]
        runs = race(specs, args.steps, args.block, Path(work), args.replicas)
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if gpu and k in gpu), None)

    rows = {}
    for v, procs in runs.items():
        rows[v] = {
            "step_ms": 1000 * total(procs, "wall") / total(procs, "steps"),
            "process_step_ms": [1000 * total([p], "wall") / total([p], "steps") for p in procs],
            "cpu_step_ms": 1000 * total(procs, "cpu") / total(procs, "steps"),
            "tokens_per_s": total(procs, "tokens") / total(procs, "wall"),
            "peak_rss_mb": max(p["peak_rss_mb"] for p in procs),
            "tensor_mb": procs[0]["tensor_bytes"] / 2**20,
            "cuda_peak_mb": procs[0]["cuda_peak_mb"] and max(p["cuda_peak_mb"] for p in procs),
            "blocks": [p["blocks"] for p in procs],
        }
        if args.shape:
            method = v.split()[1]
            rows[v]["planned_mb"] = (
                planned_peak(
                    args.shape, method, args.seq_len, args.batch, args.r, args.checkpointing
                )
                / 2**20
            )
            if peak:
                flops = train_flops_per_token(args.shape, args.r) * rows[v]["tokens_per_s"]
                rows[v]["mfu"] = flops / (peak * 1e12)

    # Paired per cycle (a cycle runs a block of each process back to back), over the processes of
    # each variant too; on the wall clock and on the process' CPU time (all threads), which time
    # stolen by other work does not inflate.
    def compare(clock: str) -> tuple[dict, dict]:
        def step(v: str) -> np.ndarray:
            return per_cycle(runs[v], lambda b: b[clock] / b["steps"])

        def speed(v: str) -> np.ndarray:
            return per_cycle(runs[v], lambda b: b["tokens"] / b[clock])

        ratio = {
            r: replicated_ratio([(1, step(f"{r} qlora")), (-1, step(f"{r} lora"))])
            for r in ("pipeline", "stock")
        }
        ratio["pipeline_over_stock"] = replicated_ratio(
            [
                (1, step("pipeline qlora")),
                (-1, step("pipeline lora")),
                (-1, step("stock qlora")),
                (1, step("stock lora")),
            ]
        )
        per_token = {
            m: replicated_ratio([(1, speed(f"pipeline {m}")), (-1, speed(f"stock {m}"))])
            for m in ("qlora", "lora")
        }
        return ratio, per_token

    clocks = {"wall": compare("wall"), "cpu": compare("cpu")}
    header = (
        f"{'variant':16s}{'ms/step':>9s}{'CPU ms/step':>13s}{'tokens/s':>10s}{'peak RSS MB':>13s}"
        f"{'tensors MB':>12s}"
    )
    if gpu:
        header += f"{'CUDA peak MB':>14s}{'planned MB':>12s}{'MFU':>7s}"
    print(header)
    for v, row in rows.items():
        line = (
            f"{v:16s}{row['step_ms']:9.1f}{row['cpu_step_ms']:13.1f}{row['tokens_per_s']:10.0f}"
            f"{row['peak_rss_mb']:13.0f}{row['tensor_mb']:12.2f}"
        )
        if gpu:
            line += f"{row['cuda_peak_mb']:14.0f}{row.get('planned_mb', float('nan')):12.0f}"
            line += f"{row.get('mfu', float('nan')):7.3f}"
        print(line + "   processes: " + "/".join(f"{x:.1f}" for x in row["process_step_ms"]))

    def span(x: dict) -> str:
        return f"{x['estimate']:.3f} [{x['ci_low']:.3f}, {x['ci_high']:.3f}]"

    n = clocks["wall"][0]["pipeline"]["cycles"]
    print(
        f"paired per cycle of {args.block} steps: geometric mean [95% interval] over {n} cycles "
        f"and {args.replicas} processes a variant (two-stage bootstrap)"
    )
    for clock, (ratio, per_token) in clocks.items():
        print(
            f"  {clock:4s} QLoRA/LoRA step time: pipeline {span(ratio['pipeline'])}, stock "
            f"{span(ratio['stock'])}; pipeline/stock {span(ratio['pipeline_over_stock'])}\n"
            f"       tokens/s, pipeline/stock: QLoRA {span(per_token['qlora'])}, "
            f"LoRA {span(per_token['lora'])}"
        )
    write_results(
        out,
        {
            **({"machine": gpu} if gpu else {}),
            "steps": args.steps,
            "block": args.block,
            "replicas": args.replicas,
            "shape": args.shape
            and {
                "name": args.shape,
                "seq_len": args.seq_len,
                "batch": args.batch,
                "r": args.r,
                "checkpointing": args.checkpointing,
            },
            "variants": rows,
            **{
                f"{clock}_{name}": value
                for clock, (ratio, per_token) in clocks.items()
                for name, value in (
                    ("qlora_over_lora_step_time", ratio),
                    ("pipeline_over_stock_tokens_per_s", per_token),
                )
            },
        },
    )


if __name__ == "__main__":
    main()
