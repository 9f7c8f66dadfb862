"""Training speed and memory: the pipeline's QLoRA and LoRA against a stock recipe, side by side.

Four variants, each run in its own process (peak RSS only grows within a process), the variants
alternating in rounds so the machine's noise hits all of them alike:

  pipeline qlora / lora  `qlora_pipeline.training.train.train` as the train stage runs it
                         (our Trainer subclass, collator, step log and probes)
  stock qlora / lora     transformers' Trainer + PEFT + bitsandbytes as their docs show it:
                         BitsAndBytesConfig (NF4, double quantization), prepare_model_for_kbit_
                         training, LoraConfig(target_modules="all-linear"); the default causal-LM
                         collator with padding (DataCollatorForLanguageModeling), no packing, no
                         other settings

Same base model (models/base) and data (data/prepared, the train split), same batch size, steps,
learning rate, optimizer, LoRA rank and seed, and the same CPU-kernel mode and threads as the
pipeline (runtime.pin_cpu from params.yaml, before torch is imported): on pinned CPU kernels both
recipes compute in fp32 (torch has no AVX2 bf16 matmul). Tokens/s counts non-padding tokens
(`include_num_input_tokens_seen="non_padding"`, a measurement, not a setting of the recipe).
Memory: peak RSS of the variant's process, and the tensors of the training by accounting (base
weights as loaded, adapter, its gradients, optimizer state).

Needs the base and prepared data of the default run (`make run`, or `dvc repro prepare`). Prints a
table (medians over rounds) and writes benchmarks/results/train.json.

    .venv/bin/python benchmarks/bench_train.py [--steps 150] [--rounds 2]
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

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("pipeline qlora", "pipeline lora", "stock qlora", "stock lora")

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from qlora_pipeline.config.schema import load_params
from qlora_pipeline.runtime import pin_cpu

recipe, method, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
cfg = load_params("params.yaml")
pin_cpu(cfg.runtime.cpu_kernels, cfg.runtime.threads)
cfg.train.max_steps, cfg.train.eval_steps, cfg.train.save_steps = steps, None, None
base, data, seed = cfg.paths.base, cfg.paths.data, cfg.seeds[0]

import torch  # noqa: E402
from qlora_pipeline.modeling.plan import OPTIMIZER_BYTES  # noqa: E402

def accounting(footprint, trainable, item, optimizer):
    return footprint + trainable * (2 * item + OPTIMIZER_BYTES[optimizer])

if recipe == "pipeline":
    from qlora_pipeline.tracking import perf
    from qlora_pipeline.training.train import train
    m = train(cfg, method, seed, base, data, out / "adapter", out / "checkpoints")
    notes = perf._notes
    item = 2 if m["loaded_dtypes"]["LoRA adapter weights"] == "bfloat16" else 4
    result = {
        "train_s": notes["train_s"], "tokens": m["tokens"], "steps": m["steps"],
        "tensor_bytes": accounting(m["base_footprint_bytes"], m["trainable_params"], item,
                                   m["optimizer"]),
    }
else:
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                              DataCollatorForLanguageModeling, Trainer, TrainingArguments)
    from qlora_pipeline.modeling.load import compute_dtype, torch_dtype
    arm = cfg.methods[method]
    q = arm.quantization
    dtype = torch_dtype(compute_dtype(q.compute_dtype if q else arm.base_dtype))
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.pad_token or tok.eos_token
    kwargs = {"dtype": dtype}
    if q:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    footprint = model.get_memory_footprint()
    if q:
        model = prepare_model_for_kbit_training(model)
    lora = cfg.train.lora
    model = get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable, _ = model.get_nb_trainable_parameters()
    train_set = load_from_disk(f"{data}/dataset")["train"].remove_columns(["labels"])
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out / "stock"), per_device_train_batch_size=cfg.train.batch_size,
            max_steps=steps, learning_rate=cfg.train.lr, optim=arm.optimizer, seed=seed,
            logging_steps=10, report_to="none", save_strategy="no", disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            include_num_input_tokens_seen="non_padding"),
        train_dataset=train_set,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )
    t0 = time.perf_counter()
    trainer.train()
    result = {
        "train_s": time.perf_counter() - t0, "tokens": int(trainer.state.num_input_tokens_seen),
        "steps": trainer.state.global_step,
        "tensor_bytes": accounting(footprint, trainable, 4, arm.optimizer),
    }
result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(result))
"""


def run_variant(variant: str, steps: int) -> dict:
    recipe, method = variant.split()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONHASHSEED": "0", "TQDM_DISABLE": "1"}
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, recipe, method, str(steps), tmp],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{variant}: failed\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from qlora_pipeline.tracking.perf import cpu_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="training steps (default %(default)s)")
    p.add_argument(
        "--rounds", type=int, default=2, help="runs of each variant (default %(default)s)"
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/train.json"))
    args = p.parse_args()
    if not (ROOT / "data/prepared/dataset").is_dir() or not (ROOT / "models/base").is_dir():
        sys.exit("needs models/base and data/prepared: run `make run` (or `dvc repro prepare`)")
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS:
            runs[v].append(run_variant(v, args.steps))
            last = runs[v][-1]
            print(f"round {r + 1} {v:15s} {1000 * last['train_s'] / last['steps']:7.1f} ms/step")
    rows = {}
    for v, rs in runs.items():
        rows[v] = {
            "step_ms": statistics.median(1000 * x["train_s"] / x["steps"] for x in rs),
            "tokens_per_s": statistics.median(x["tokens"] / x["train_s"] for x in rs),
            "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in rs),
            "tensor_mb": rs[0]["tensor_bytes"] / 2**20,
            "runs": rs,
        }
    ratio = {
        recipe: rows[f"{recipe} qlora"]["step_ms"] / rows[f"{recipe} lora"]["step_ms"]
        for recipe in ("pipeline", "stock")
    }
    header = (
        f"{'variant':16s}{'ms/step':>9s}{'tokens/s':>10s}{'peak RSS MB':>13s}{'tensors MB':>12s}"
    )
    print(header)
    for v, row in rows.items():
        print(
            f"{v:16s}{row['step_ms']:9.1f}{row['tokens_per_s']:10.0f}"
            f"{row['peak_rss_mb']:13.0f}{row['tensor_mb']:12.2f}"
        )
    print(
        f"QLoRA/LoRA step time: pipeline {ratio['pipeline']:.2f}, stock {ratio['stock']:.2f} "
        f"(pipeline/stock ratio {ratio['pipeline'] / ratio['stock']:.2f}); per token the "
        f"pipeline's QLoRA runs at {rows['pipeline qlora']['tokens_per_s'] / rows['stock qlora']['tokens_per_s']:.2f}x "
        f"the stock recipe's"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "command": "benchmarks/bench_train.py " + " ".join(sys.argv[1:]),
                "machine": cpu_model(),
                "steps": args.steps,
                "rounds": args.rounds,
                "variants": rows,
                "qlora_over_lora_step_time": ratio,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
