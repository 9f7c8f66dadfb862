"""The baton harness of the training benchmarks: variants side by side, one training at a time.

Each variant runs in `--replicas` processes of its own (peak RSS only grows within a process).
They live side by side but only one trains at a time: it holds a baton, passed round by `race`
every `block` steps (cycles, every other one in reverse order), and a block's time counts only
while its process holds it. So this machine's drift in speed, which moves one variant's step time
by up to 25% within minutes, hits all of them alike block by block, and ratios can be taken per
cycle, paired; with several processes a variant, a process' own speed, which all its cycles
share, shows in the intervals too (`common.replicated_ratio`).

A variant runs the pipeline's own training (`qlora_pipeline.training.train.train`, as the train
stage runs it) or the stock recipe (transformers' Trainer + PEFT + bitsandbytes as their docs show
it), on the default run's base and data (`make run`) unless told otherwise, pinned to the CPU
kernels and threads of params.yaml. Tokens counted are non-padding tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import numpy as np
from common import ROOT

CHILD = r"""
import json, os, resource, sys, time
from pathlib import Path
from qlora_pipeline.config.schema import load_params
from qlora_pipeline.runtime import pin_cpu

recipe, method, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
given = json.loads(sys.argv[5])  # what differs from the default run's base, data and train
block, go, done = int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])  # the baton's pipes
cfg = load_params("params.yaml")
pin_cpu(cfg.runtime.cpu_kernels, cfg.runtime.threads)
if recipe == "pipeline":  # as a stage sets its process up (cli); stock keeps glibc's defaults
    from qlora_pipeline.runtime import keep_freed_memory
    keep_freed_memory()
cfg.train.max_steps, cfg.train.eval_steps, cfg.train.save_steps = steps, None, None
base, data, seed = cfg.paths.base, cfg.paths.data, cfg.seeds[0]
base, data = given.get("base", base), given.get("data", data)
cfg.train.batch_size = given.get("batch", cfg.train.batch_size)
cfg.train.lora.r = given.get("r", cfg.train.lora.r)
cfg.train.gradient_checkpointing = given.get("checkpointing", cfg.train.gradient_checkpointing)

import torch  # noqa: E402
from qlora_pipeline.modeling.plan import OPTIMIZER_BYTES  # noqa: E402

cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.reset_peak_memory_stats()

def accounting(footprint, trainable, item, optimizer):
    return footprint + trainable * (2 * item + OPTIMIZER_BYTES[optimizer])

import transformers  # noqa: E402

class Baton(transformers.TrainerCallback):
    # Train only while holding the baton; every `block` steps hand it back with the block's
    # wall and CPU time, steps and non-padding tokens (the last callback, after all others).

    def take(self, state):
        if not os.read(go, 1):
            sys.exit("the benchmark went away")
        time.sleep(0.05)  # the last holder's idle OpenMP threads stop spinning
        self.t, self.c = time.perf_counter(), time.process_time()
        self.step, self.tokens = state.global_step, state.num_input_tokens_seen

    def give(self, state, end=False):
        if cuda:
            torch.cuda.synchronize()
        os.write(done, (json.dumps({
            "wall": time.perf_counter() - self.t, "cpu": time.process_time() - self.c,
            "steps": state.global_step - self.step,
            "tokens": int(state.num_input_tokens_seen - self.tokens), "end": end,
        }) + "\n").encode())

    def on_train_begin(self, args, state, control, **kwargs):
        self.take(state)

    def on_step_end(self, args, state, control, **kwargs):
        end = state.global_step >= state.max_steps
        if end or state.global_step % block == 0:
            self.give(state, end)
            if end:  # the rest (saving, exit) waits until every variant has trained
                os.read(go, 1)
            else:
                self.take(state)

_train = transformers.Trainer.train

def train_with_baton(self, *args, **kwargs):  # the same hook into both recipes' Trainer
    self.add_callback(Baton())
    return _train(self, *args, **kwargs)

transformers.Trainer.train = train_with_baton

if recipe == "pipeline":
    from qlora_pipeline.training.train import train
    m = train(cfg, method, seed, base, data, out / "adapter", out / "checkpoints")
    item = 2 if m["loaded_dtypes"]["LoRA adapter weights"] == "bfloat16" else 4
    result = {
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
    if q:  # its default would turn checkpointing on in this arm only: the config's setting
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
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
            use_cpu=not cuda, bf16=cuda and dtype == torch.bfloat16,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
            include_num_input_tokens_seen="non_padding"),
        train_dataset=train_set,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )
    trainer.train()
    result = {"tensor_bytes": accounting(footprint, trainable, 4, arm.optimizer)}
result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
print("RESULT " + json.dumps(result))
"""


class Variant:
    """One process of a variant: it loads, then trains a block of steps each time it is handed
    the baton (`run_block`), and reports the block. `name`: "<label> <method>", e.g. "stock
    qlora"; `replica`: which of the variant's processes."""

    def __init__(
        self, name: str, recipe: str, given: dict, steps: int, block: int, work: Path, replica: int
    ) -> None:
        method = name.split()[-1]
        self.name, self.blocks, self.ended = name, [], False
        self.dir = work / f"{name.replace(' ', '-')}-{replica}"
        self.dir.mkdir()
        go_read, self.go = os.pipe()
        done, done_write = os.pipe()
        self.reports = os.fdopen(done)
        with open(self.dir / "stdout", "w") as stdout, open(self.dir / "stderr", "w") as stderr:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-c", CHILD, recipe, method, str(steps), str(self.dir)),
                    *(json.dumps(given), str(block), str(go_read), str(done_write)),
                ],
                cwd=ROOT,
                env={**os.environ, "PYTHONHASHSEED": "0", "TQDM_DISABLE": "1"},
                stdout=stdout,
                stderr=stderr,
                pass_fds=(go_read, done_write),
            )
        os.close(go_read)
        os.close(done_write)

    def fail(self) -> NoReturn:
        self.proc.wait()
        sys.exit(f"{self.name}: failed\n{(self.dir / 'stderr').read_text()[-3000:]}")

    def run_block(self) -> dict:
        try:
            os.write(self.go, b"g")
        except BrokenPipeError:
            self.fail()
        line = self.reports.readline()
        if not line:
            self.fail()
        self.blocks.append(json.loads(line))
        self.ended = self.blocks[-1]["end"]
        return self.blocks[-1]

    def result(self) -> dict:
        if self.proc.wait() != 0:
            self.fail()
        lines = (self.dir / "stdout").read_text().splitlines()
        return json.loads(next(x for x in reversed(lines) if x.startswith("RESULT "))[7:])


def race(
    specs: list[tuple[str, str, dict]], steps: int, block: int, work: Path, replicas: int = 1
) -> dict[str, list[dict]]:
    """The variants `specs` (name, recipe: "pipeline" or "stock", what differs from the default
    run: base, data, batch, r, checkpointing), each in `replicas` processes, side by side, passing
    the baton round every `block` steps, every other cycle in reverse order; per variant, each of
    its processes' blocks and result."""
    variants = [
        Variant(name, recipe, given, steps, block, work, k)
        for k in range(replicas)
        for name, recipe, given in specs
    ]
    try:
        cycle = 0
        while not all(v.ended for v in variants):
            for v in variants[:: -1 if cycle % 2 else 1]:
                v.run_block()
            cycle += 1
            timed: dict[str, list[str]] = {name: [] for name, _, _ in specs}
            for v in variants:
                timed[v.name].append(f"{1000 * v.blocks[-1]['wall'] / v.blocks[-1]['steps']:.1f}")
            print(
                f"cycle {cycle:3d} ms/step: "
                + ", ".join(f"{n} {'/'.join(t)}" for n, t in timed.items())
            )
        for v in variants:  # the release: each saves and exits
            os.write(v.go, b"g")
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in specs}
        for v in variants:
            runs[v.name].append({**v.result(), "blocks": v.blocks})
        return runs
    finally:
        for v in variants:
            v.proc.kill()


def parser(
    doc: str | None, replicas: int | None = 3, replicas_default: str = "%(default)s"
) -> argparse.ArgumentParser:
    """A benchmark's command line with the harness' options: --steps, --block, --replicas
    (`replicas` its default; `replicas_default` says it in the help where the script decides)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps (default %(default)s)")
    p.add_argument(
        "--block",
        type=int,
        default=10,
        help="steps a variant trains each time it holds the baton (default %(default)s)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=replicas,
        help="processes per variant: the intervals then include a process' own speed, which "
        f"all its cycles share (default {replicas_default})",
    )
    return p


def timed(run: dict) -> list[dict]:
    """A process' blocks that count: all but the first cycle's (warm-up), unless it is the only one."""
    return run["blocks"][1:] if len(run["blocks"]) > 1 else run["blocks"]


def per_cycle(runs: list[dict], value: Callable[[dict], float]) -> np.ndarray:
    """`value` of each timed block of a variant's processes `runs`: an array [process, cycle]
    (`common.replicated_ratio`)."""
    return np.array([[value(b) for b in timed(run)] for run in runs])


def total(runs: list[dict], key: str) -> float:
    """A variant's `key` ("wall", "cpu", "steps", "tokens") summed over its processes' timed
    blocks."""
    return sum(b[key] for run in runs for b in timed(run))
