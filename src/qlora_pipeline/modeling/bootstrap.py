"""The offline default base: a byte-level BPE tokenizer and a small Llama, pre-trained briefly on a
generated corpus. Deterministic from the seed; DVC caches the result, so a second run reuses it."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any

from qlora_pipeline.config.schema import BootstrapConfig, ModelConfig
from qlora_pipeline.data.skills import SKILLS, prose_line
from qlora_pipeline.files import atomic_dir, write_json
from qlora_pipeline.modeling.checks import check_pretrained
from qlora_pipeline.modeling.load import compute_dtype
from qlora_pipeline.runtime import log
from qlora_pipeline.tracking.perf import note

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
_FILLER = [
    "the",
    "a",
    "one",
    "small",
    "big",
    "red",
    "blue",
    "cat",
    "dog",
    "bird",
    "tree",
    "house",
    "river",
    "stone",
    "sat",
    "ran",
    "saw",
    "found",
    "near",
    "on",
    "under",
    "over",
    "and",
    "then",
    "it",
    "was",
    "is",
    "by",
    "with",
    "from",
]


def corpus_lines(n: int, seed: int, length: int = 3) -> list[str]:
    """Generate `n` pre-training lines: filler, copies and the skills stated in prose.

    Every line starts with a space so words, letters and digits are single `Ġ`-prefixed tokens,
    as they are inside prompts.
    """
    rng = random.Random(seed)
    skills = list(SKILLS)
    lines = []
    for _ in range(n):
        u = rng.random()
        if u < 0.10:
            words = rng.choices(_FILLER, k=rng.randint(4, 10))
            line = " ".join(words) + " ."
        elif u < 0.25:
            s = " ".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))
            line = f"{s} , {s}"
        else:
            line = prose_line(rng.choice(skills), rng, length)
        lines.append(" " + line)
    return lines


def build_tokenizer(lines: list[str], vocab_size: int):  # -> PreTrainedTokenizerFast
    """Train a byte-level BPE tokenizer on `lines` (no post-processor: BOS is added explicitly)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def build_model(cfg: BootstrapConfig, tokenizer):  # -> LlamaForCausalLM
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def pack(token_ids: list[list[int]], seq_len: int) -> list[list[int]]:
    """Concatenate tokenized lines and cut them into blocks of `seq_len` (the tail is dropped)."""
    flat = [t for ids in token_ids for t in ids]
    return [flat[i : i + seq_len] for i in range(0, len(flat) - seq_len + 1, seq_len)]


def bootstrap(model_cfg: ModelConfig, seed: int, out_dir: str | Path) -> dict:
    """Write the base model folder: the tiny model built and pre-trained here, or a pointer.

    Args:
        model_cfg: `model` section. source=bootstrap builds the tiny model; source=pretrained
            checks the model (modeling/checks.py) and writes only `base.json`, naming the hub id
            / folder that later steps load and what the checks found.
        seed: seeds the corpus, the initialisation and the data order.
        out_dir: the folder written (atomically).

    Returns:
        The content of `base.json`.
    """
    info: dict[str, Any]
    if model_cfg.source == "pretrained":
        assert model_cfg.path is not None  # the schema requires it
        facts = check_pretrained(model_cfg.path, model_cfg.revision, model_cfg.trust_remote_code)
        if facts["pad_token"]:
            log.info("%s: %s", model_cfg.path, facts["pad_token"])
        info = {
            "source": "pretrained",
            "name": model_cfg.name,
            "path": model_cfg.path,
            "revision": model_cfg.revision,
            "checked": facts,
        }
        with atomic_dir(out_dir) as tmp:
            write_json(tmp / "base.json", info)
        log.info("base model is %s (loaded by the later steps)", model_cfg.path)
        return info

    import torch
    from datasets import Dataset
    from transformers import ProgressCallback, Trainer, TrainingArguments, default_data_collator

    from qlora_pipeline.training.checkpoints import LossProgress

    cfg = model_cfg.bootstrap
    assert cfg is not None
    t0 = time.perf_counter()
    lines = corpus_lines(cfg.corpus_lines, seed)
    tokenizer = build_tokenizer(lines, cfg.vocab_size)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = [[bos, *tokenizer.encode(line, add_special_tokens=False), eos] for line in lines]
    blocks = pack(ids, cfg.seq_len)
    needed = cfg.steps * cfg.batch_size
    log.info(
        "bootstrap: %d corpus lines -> %d blocks of %d tokens (%d needed for %d steps)",
        len(lines),
        len(blocks),
        cfg.seq_len,
        needed,
        cfg.steps,
    )
    dataset = Dataset.from_dict({"input_ids": blocks, "labels": blocks})

    torch.manual_seed(seed)
    model = build_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "bootstrap: pre-training a %.2fM-parameter Llama for %d steps", n_params / 1e6, cfg.steps
    )
    with atomic_dir(out_dir) as tmp:
        args = TrainingArguments(
            output_dir=str(tmp / "_trainer"),
            max_steps=cfg.steps,
            per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.lr,
            adam_beta2=0.95,
            weight_decay=0.01,
            warmup_steps=0.05,
            lr_scheduler_type="cosine",
            max_grad_norm=1.0,
            bf16=compute_dtype("bfloat16") == "bfloat16",  # fp32 with portable CPU kernels
            use_cpu=not torch.cuda.is_available(),
            seed=seed,
            data_seed=seed,
            logging_steps=max(1, cfg.steps // 20),
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=dataset, data_collator=default_data_collator
        )
        trainer.remove_callback(ProgressCallback)  # a bar with the loss, not a dict per log
        trainer.add_callback(LossProgress())
        result = trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(tmp / "_trainer", ignore_errors=True)
        info = {
            "source": "bootstrap",
            "name": model_cfg.name,
            "path": None,
            "parameters": n_params,
            "pretrain_steps": cfg.steps,
            "final_loss": losses[-1] if losses else None,
        }
        note(train_runtime_s=result.metrics.get("train_runtime"))
        write_json(tmp / "base.json", info)
    log.info(
        "bootstrap: final pre-training loss %.3f in %.0f s -> %s",
        info["final_loss"] or float("nan"),
        time.perf_counter() - t0,
        out_dir,
    )
    return info
