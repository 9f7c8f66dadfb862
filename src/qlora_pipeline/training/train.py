"""The train step: ONE function for QLoRA and LoRA. The method config decides how the base is
loaded (4-bit NF4 + double quant, or bf16) and which optimizer runs; everything else is shared."""

from __future__ import annotations

import csv
import io
import math
import shutil
import time
from pathlib import Path
from typing import Any

from qlora_pipeline.config.schema import PipelineConfig
from qlora_pipeline.data.pack import IGNORE_INDEX, PackedCollator
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import atomic_dir, atomic_write_text, write_json
from qlora_pipeline.modeling.load import attach_lora, load_base, load_tokenizer
from qlora_pipeline.runtime import device_name, log, peak_memory_mb


def collator(columns: list[str], tokenizer: Any) -> Any:
    """Packed rows (with position_ids, see data/pack.py) or plain rows padded per batch."""
    from transformers import DataCollatorForSeq2Seq

    if "position_ids" in columns:
        return PackedCollator(tokenizer.pad_token_id)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)


def training_arguments(cfg: PipelineConfig, method_name: str, output_dir: Path) -> Any:
    """Trainer arguments; identical for both methods except the optimizer the method names."""
    import torch
    from transformers import TrainingArguments

    t, method = cfg.train, cfg.methods[method_name]
    compute = method.quantization.compute_dtype if method.quantization else method.base_dtype
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=method.optimizer,
        bf16=compute == "bfloat16",
        fp16=compute == "float16",
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=t.logging_steps,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
    )


def loss_csv(log_history: list[dict]) -> str:
    """The loss curve as CSV (step, loss, learning_rate, grad_norm) for DVC plots and the report."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "loss", "learning_rate", "grad_norm"])
    for entry in log_history:
        if "loss" in entry:
            writer.writerow(
                [entry["step"], entry["loss"], entry.get("learning_rate"), entry.get("grad_norm")]
            )
    return buf.getvalue()


def train(
    cfg: PipelineConfig,
    method_name: str,
    base_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
) -> dict:
    """Fine-tune LoRA adapters on the prepared train split with `cfg.methods[method_name]`.

    Args:
        cfg: the validated pipeline config.
        method_name: a key of `cfg.methods` (qlora or lora).
        base_dir: the bootstrap output (model folder or pointer).
        data_dir: the prepare output.
        out_dir: gets the adapter (safetensors), `train_metrics.json` and `loss.csv`, atomically.

    Returns:
        The training metrics written to `train_metrics.json`.
    """
    import torch
    from datasets import load_from_disk
    from transformers import Trainer

    if method_name not in cfg.methods:
        raise PipelineError(f"unknown method '{method_name}'; configured: {sorted(cfg.methods)}")
    method = cfg.methods[method_name]
    dataset_dir = Path(data_dir) / "dataset"
    if not dataset_dir.is_dir():
        raise PipelineError(f"{dataset_dir}: not found; run the prepare stage first")
    trust = cfg.model.trust_remote_code
    tokenizer = load_tokenizer(base_dir, trust)
    t0 = time.perf_counter()
    model = load_base(base_dir, method, trust)
    base_footprint = model.get_memory_footprint()
    model = attach_lora(model, cfg.train.lora, method, cfg.seed)
    trainable, total = model.get_nb_trainable_parameters()
    train_set = load_from_disk(str(dataset_dir))["train"]

    paging = method.optimizer.startswith("paged") and torch.cuda.is_available()
    if method.optimizer.startswith("paged") and not paging:
        log.warning(
            "train[%s]: %s needs CUDA to page optimizer state; on CPU bitsandbytes runs it as plain "
            "AdamW (32-bit state)",
            method_name,
            method.optimizer,
        )
    quant = method.quantization
    log.info(
        "train[%s]: base %s, %d trainable / %d params, %d steps x batch %d on %s",
        method_name,
        f"4-bit {quant.quant_type}{' + double quant' if quant.double_quant else ''}"
        if quant
        else method.base_dtype,
        trainable,
        total,
        cfg.train.max_steps,
        cfg.train.batch_size,
        device_name(),
    )
    with atomic_dir(out_dir) as tmp:
        trainer = Trainer(
            model=model,
            args=training_arguments(cfg, method_name, tmp / "_trainer"),
            train_dataset=train_set,
            data_collator=collator(train_set.column_names, tokenizer),
            processing_class=tokenizer,  # counts non-padding tokens when rows are packed
        )
        t_train = time.perf_counter()
        result = trainer.train()
        train_s = time.perf_counter() - t_train
        shutil.rmtree(tmp / "_trainer", ignore_errors=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        history = trainer.state.log_history
        losses = [e["loss"] for e in history if "loss" in e]
        tokens = int(trainer.state.num_input_tokens_seen)
        metrics = {
            "method": method_name,
            "base_dtype": method.base_dtype,
            "quantization": None
            if quant is None
            else {
                "quant_type": quant.quant_type,
                "double_quant": quant.double_quant,
                "compute_dtype": quant.compute_dtype,
            },
            "optimizer": method.optimizer,
            "optimizer_paging": paging,
            "device": device_name(),
            "steps": int(trainer.state.global_step),
            "trainable_params": int(trainable),
            "total_params": int(total),
            "base_footprint_bytes": int(base_footprint),
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "train_loss": result.training_loss,
            "tokens": tokens,
            "tokens_per_s": tokens / train_s,
            "train_s": train_s,
            "wall_s": time.perf_counter() - t0,
            **peak_memory_mb(),
        }
        if not losses or not all(math.isfinite(x) for x in losses):
            raise PipelineError(f"train[{method_name}]: loss is NaN or inf; lower train.lr")
        atomic_write_text(tmp / "loss.csv", loss_csv(history))
        write_json(tmp / "train_metrics.json", metrics)
    log.info(
        "train[%s]: loss %.3f -> %.3f, %.0f tokens/s, peak RSS %.0f MB -> %s",
        method_name,
        metrics["first_loss"],
        metrics["final_loss"],
        metrics["tokens_per_s"],
        metrics["peak_rss_mb"],
        out_dir,
    )
    return metrics
