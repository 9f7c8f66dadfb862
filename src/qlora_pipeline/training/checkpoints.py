"""Checkpoints that appear atomically, rotation, resume, and per-step metrics.

`transformers.Trainer` writes a checkpoint folder piece by piece (weights, optimizer, scheduler, RNG
states, trainer state), so a crash can leave half of one. Here every checkpoint is written into a
staging folder and renamed into place when complete: a `checkpoint-N` folder is always whole, and
resuming from the newest one restores optimizer, scheduler, RNG and data position.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import ProgressCallback, Trainer, TrainerCallback

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.runtime import peak_memory_mb
from qlora_pipeline.tracking.perf import drop_steps_after, note_step

_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(folder: str | Path) -> list[Path]:
    """The complete checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def rotate(folder: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


class CheckpointingTrainer(Trainer):
    """A Trainer whose checkpoints are renamed into place only once complete; keeps the last N."""

    def __init__(self, *args: Any, keep_checkpoints: int = 2, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.keep_checkpoints = keep_checkpoints

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        final = Path(str(self.args.output_dir))
        staging = final / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = str(final)
        name = f"checkpoint-{self.state.global_step}"
        if (final / name).exists():
            shutil.rmtree(final / name)
        os.rename(staging / name, final / name)
        shutil.rmtree(staging, ignore_errors=True)
        rotate(final, self.keep_checkpoints)


class NonFiniteLoss(PipelineError):
    pass


class StepLog(TrainerCallback):
    """Appends one JSON line per logged step (loss, lr, grad norm, eval loss) and stops training
    on a NaN or inf loss before anything else is saved. Tokens/s and peak memory per step go to
    the stage's performance record (tracking/perf.py): they differ per machine, the log must not."""

    KEYS = ("loss", "learning_rate", "grad_norm", "eval_loss")

    def __init__(self, path: Path):
        self.path = path
        self.clock = time.perf_counter()
        self.tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # On resume, drop the lines of steps after the checkpoint: they are about to be redone.
        if self.path.exists():
            kept = [r for r in read_steps(self.path) if r["step"] <= state.global_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        drop_steps_after(state.global_step)
        self.clock, self.tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        logs = logs or {}
        row: dict[str, Any] = {"step": state.global_step}
        row.update({k: float(logs[k]) for k in self.KEYS if k in logs})
        if len(row) == 1:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        if "loss" in row:
            speed = (tokens - self.tokens) / max(now - self.clock, 1e-9)
            note_step({"step": state.global_step, "tokens_per_s": speed, **peak_memory_mb()})
            self.clock, self.tokens = now, tokens
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        loss = row.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss} at step {state.global_step}")


class LossProgress(ProgressCallback):
    """transformers' progress bar with the latest loss beside it, instead of a printed dict per
    logged step (`train.logging_steps` is 1: hundreds of lines a stage; steps.jsonl has them)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{float(logs['loss']):.3f}", refresh=False)


def read_steps(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]
