"""The train step: ONE function for QLoRA and LoRA. The method config decides how the base is
loaded (4-bit NF4 + double quant, or bf16) and which optimizer runs; everything else is shared."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

from qlora_pipeline.config.schema import PipelineConfig
from qlora_pipeline.data.pack import (
    IGNORE_INDEX,
    PackedCollator,
    batch_padding,
    groups,
    packing_gain,
)
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.files import (
    atomic_dir,
    atomic_write_text,
    read_json,
    seed_dir,
    sha256_text,
    write_json,
)
from qlora_pipeline.modeling.device import device
from qlora_pipeline.modeling.load import (
    attach_lora,
    base_source,
    dtype_summary,
    load_base,
    load_tokenizer,
    method_compute_dtype,
)
from qlora_pipeline.runtime import log, pin_bnb_kernels
from qlora_pipeline.tracking.perf import note


def training_arguments(cfg: PipelineConfig, method_name: str, seed: int, output_dir: Path) -> Any:
    """Trainer arguments; identical for both methods except the optimizer the method names. The
    training seed sets the data order too, so the two arms of one seed see the same batches."""
    import torch
    from transformers import TrainingArguments

    t, method = cfg.train, cfg.methods[method_name]
    compute = method_compute_dtype(method)
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=method.optimizer,
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5's name for it
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=compute == "bfloat16",
        fp16=compute == "float16",
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        data_seed=seed,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must reach the log, where it stops training
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=None,  # rotation is ours, after the atomic rename (checkpoints.py)
        report_to=list(t.report_to) or "none",
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
    )


def collator(tokenizer: Any) -> Any:
    """Packed rows (with position_ids, see data/pack.py) or plain rows, padded per batch."""
    from transformers import DataCollatorForSeq2Seq

    plain = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    packed = PackedCollator(tokenizer.pad_token_id)

    def collate(rows: list[dict[str, Any]]) -> Any:
        return packed(rows) if "position_ids" in rows[0] else plain(rows)

    return collate


# Padded batches computing this many times the tokens per real token that packed rows would: from
# there on, packing trained faster on a CPU (bench_packing, benchmarks/RESULTS.md: its dense
# block-diagonal mask costs 8 to 19% beyond the tokens it computes).
PACKING_PAYS = 1.2


def packing_hint(lengths: list[int], batch: int, length: int) -> str | None:
    """One line suggesting `data.packing` when unpacked train rows of these `lengths`, padded
    per batch of `batch`, would compute PACKING_PAYS times the tokens rows packed to `length`
    would; else None."""
    gain = packing_gain(lengths, batch, length)
    if gain < PACKING_PAYS:
        return None
    per_row = len(lengths) / len(groups(lengths, length))
    return (
        f"padded batches of {batch} here are about {batch_padding(lengths, batch):.0%} padding, "
        f"and packed rows would compute {gain:.1f}x fewer tokens: consider data.packing=true "
        f"(train.batch_size then counts rows of about {per_row:.1f} examples; "
        "benchmarks/RESULTS.md)"
    )


def loss_csv(steps: list[dict[str, Any]]) -> str:
    """The training curve as CSV for DVC plots and the report."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    columns = ["step", "loss", "learning_rate", "grad_norm"]
    writer.writerow(columns)
    for row in steps:
        if "loss" in row:
            writer.writerow([row.get(c) for c in columns])
    return buf.getvalue()


def run_fingerprint(cfg: PipelineConfig, method_name: str, seed: int, data_dir: Path) -> str:
    """What a checkpoint belongs to: checkpoints of another config or data are not resumed."""
    manifest = read_json(data_dir / "manifest.json")
    return sha256_text(
        json.dumps(
            {
                "model": dataclasses.asdict(cfg.model),
                "data": manifest["cache_key"],
                "method": dataclasses.asdict(cfg.methods[method_name]),
                "train": dataclasses.asdict(cfg.train),
                "seed": seed,
            },
            sort_keys=True,
        )
    )


def checkpoint_folder(
    cfg: PipelineConfig, method_name: str, seed: int, data_dir: Path, folder: Path
) -> Path:
    """`folder`, emptied if it holds checkpoints of another run, with this run's fingerprint."""
    fingerprint = run_fingerprint(cfg, method_name, seed, data_dir)
    run_file = folder / "run.json"
    if folder.exists() and (
        not run_file.is_file() or read_json(run_file).get("fingerprint") != fingerprint
    ):
        log.warning(
            "train[%s]: %s holds another run's checkpoints; starting over", method_name, folder
        )
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(run_file, {"method": method_name, "fingerprint": fingerprint})
    return folder


def train(
    cfg: PipelineConfig,
    method_name: str,
    seed: int,
    base_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    checkpoint_dir: str | Path | None = None,
) -> dict:
    """Fine-tune LoRA adapters on the prepared train split with `cfg.methods[method_name]`.

    Checkpoints go to `checkpoint_dir` (default `paths.checkpoints/<method>/seed<N>`) every
    `train.save_steps`; running again after a crash resumes from the newest one and reaches the same
    adapter. They are deleted once the adapter is written.

    Args:
        cfg: the validated pipeline config.
        method_name: a key of `cfg.methods` (qlora or lora).
        seed: the training seed (one of `cfg.seeds`): LoRA init and data order.
        base_dir: the bootstrap output (model folder or pointer).
        data_dir: the prepare output.
        out_dir: gets the adapter (safetensors), `train_metrics.json`, `steps.jsonl` and
            `loss.csv`, atomically.
        checkpoint_dir: where checkpoints live while training.

    Returns:
        The training metrics written to `train_metrics.json`.
    """
    import torch
    from datasets import load_from_disk
    from transformers import ProgressCallback

    from qlora_pipeline.data.prepare import row_lengths
    from qlora_pipeline.training.checkpoints import (
        CheckpointingTrainer,
        LossProgress,
        NonFiniteLoss,
        StepLog,
        checkpoints,
        read_steps,
    )

    if method_name not in cfg.methods:
        raise PipelineError(f"unknown method '{method_name}'; configured: {sorted(cfg.methods)}")
    method, t = cfg.methods[method_name], cfg.train
    label = f"{method_name} seed {seed}"
    data_dir = Path(data_dir)
    dataset_dir = data_dir / "dataset"
    if not dataset_dir.is_dir():
        raise PipelineError(f"{dataset_dir}: not found; run the prepare stage first")
    folder = checkpoint_folder(
        cfg,
        method_name,
        seed,
        data_dir,
        Path(checkpoint_dir or seed_dir(Path(cfg.paths.checkpoints) / method_name, seed)),
    )
    trust = cfg.model.trust_remote_code
    tokenizer = load_tokenizer(base_dir, trust)
    t0 = time.perf_counter()
    model = load_base(base_dir, method, trust)
    base_footprint = model.get_memory_footprint()
    qlora_quant = cfg.methods["qlora"].quantization
    assert qlora_quant is not None  # the schema requires it
    model = attach_lora(
        model,
        t.lora,
        method,
        seed,
        t.gradient_checkpointing,
        base_source(base_dir)[0],
        upcast=t.upcast_non_quantized,
        skip_modules=qlora_quant.skip_modules,
    )
    loaded = dtype_summary(model)
    trainable, total = model.get_nb_trainable_parameters()
    pin_bnb_kernels(model)  # an eval mid-training must not repack: bitwise resume
    splits = load_from_disk(str(dataset_dir))
    if "position_ids" not in splits["train"].column_names:  # not packed
        hint = packing_hint(row_lengths(splits["train"]), t.batch_size, cfg.data.max_length)
        if hint:
            log.info("train[%s]: %s", label, hint)

    paging = method.optimizer.startswith("paged") and torch.cuda.is_available()
    if method.optimizer.startswith("paged") and not paging:
        log.warning(
            "train[%s]: %s needs CUDA to page optimizer state; on CPU bitsandbytes runs it as plain "
            "AdamW (32-bit state)",
            label,
            method.optimizer,
        )
    quant = method.quantization
    saved = checkpoints(folder) if t.save_steps else []
    resume = saved[-1] if saved else None
    log.info(
        "train[%s]: base %s, %d trainable / %d params, %d steps x batch %d on %s%s",
        label,
        f"4-bit {quant.quant_type}{' + double quant' if quant.double_quant else ''}"
        if quant
        else method.base_dtype,
        trainable,
        total,
        t.max_steps,
        t.batch_size,
        device(),
        f"; resuming from {resume}" if resume else "",
    )
    steps_path = folder / "steps.jsonl"
    if resume is None:
        steps_path.unlink(missing_ok=True)
    trainer = CheckpointingTrainer(
        model=model,
        args=training_arguments(cfg, method_name, seed, folder),
        train_dataset=splits["train"],
        eval_dataset=splits["val"] if t.eval_steps else None,
        data_collator=collator(tokenizer),
        processing_class=tokenizer,  # counts non-padding tokens when rows are packed
        callbacks=[StepLog(steps_path)],
        keep_checkpoints=t.keep_checkpoints,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossProgress())
    t_train, cpu_train = time.perf_counter(), time.process_time()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except NonFiniteLoss as e:
        kept = checkpoints(folder)
        raise PipelineError(
            f"train[{label}]: {e}; stopped. "
            + (f"Last good checkpoint kept: {kept[-1]}" if kept else "No checkpoint yet")
            + "; lower train.lr or train.max_grad_norm"
        ) from None
    train_s, train_cpu_s = time.perf_counter() - t_train, time.process_time() - cpu_train
    steps = read_steps(steps_path)
    losses = [r["loss"] for r in steps if "loss" in r]
    evals = [r["eval_loss"] for r in steps if "eval_loss" in r]
    tokens = int(trainer.state.num_input_tokens_seen)
    metrics = {
        "method": method_name,
        "seed": seed,
        "base_dtype": method.base_dtype,
        "compute_dtype": method_compute_dtype(method),
        "quantization": None if quant is None else dataclasses.asdict(quant),
        "lora": dataclasses.asdict(t.lora),
        "optimizer": method.optimizer,
        "optimizer_paging": paging,
        "gradient_checkpointing": t.gradient_checkpointing,
        "loaded_dtypes": loaded,
        "steps": int(trainer.state.global_step),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "base_footprint_bytes": int(base_footprint),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "final_eval_loss": evals[-1] if evals else None,
        "train_loss": result.training_loss,
        "tokens": tokens,
    }
    # where and how fast it ran: the stage's performance record, never the hashed adapter folder
    note(
        device=device(),
        resumed_from_step=int(resume.name.split("-")[1]) if resume else None,
        tokens_per_s=tokens / train_s,
        train_s=train_s,
        train_cpu_s=train_cpu_s,  # all threads: what a busy machine does not inflate
        step_wall_s=time.perf_counter() - t0,
    )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        shutil.copyfile(steps_path, tmp / "steps.jsonl")
        atomic_write_text(tmp / "loss.csv", loss_csv(steps))
        write_json(tmp / "train_metrics.json", metrics)
    shutil.rmtree(folder, ignore_errors=True)  # the adapter is the output now
    log.info(
        "train[%s]: loss %.3f -> %.3f, %.0f tokens/s -> %s",
        label,
        metrics["first_loss"],
        metrics["final_loss"],
        tokens / train_s,
        out_dir,
    )
    return metrics
