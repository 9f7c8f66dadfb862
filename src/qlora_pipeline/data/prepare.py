"""The prepare step: records -> prompt/response text -> token ids with labels masked to the
response -> `datasets` on disk, `test.jsonl` for lm-eval, and `manifest.json`."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from qlora_pipeline.config.schema import DataConfig
from qlora_pipeline.data.synthetic import generate
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import atomic_dir, sha256_file, sha256_text, write_json
from qlora_pipeline.runtime import log

IGNORE_INDEX = -100
SPLITS = ("train", "val", "test")


def read_jsonl(path: str | Path, fields: tuple[str, str]) -> list[dict[str, str]]:
    """Read instruction/response records from a JSONL file; one clear error per bad line."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PipelineError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise PipelineError(f"{path}:{lineno}: expected a JSON object")
            missing = [k for k in fields if k not in row]
            if missing:
                raise PipelineError(
                    f"{path}:{lineno}: missing field(s) {missing}; the row has {sorted(row)}"
                )
            for k in fields:
                if not isinstance(row[k], str):
                    raise PipelineError(f"{path}:{lineno}: field '{k}' must be a string")
            records.append({"instruction": row[fields[0]], "output": row[fields[1]]})
    if not records:
        raise PipelineError(f"{path}: no records")
    return records


def split_records(
    records: list[dict[str, str]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[dict[str, str]]]:
    """Shuffle from `seed` and cut into train/val/test (each at least one row)."""
    if len(records) < 3:
        raise PipelineError(f"need at least 3 records to split, got {len(records)}")
    rows = list(records)
    random.Random(seed).shuffle(rows)
    n_test = max(1, round(len(rows) * test_fraction))
    n_val = max(1, round(len(rows) * val_fraction))
    return {
        "test": rows[:n_test],
        "val": rows[n_test : n_test + n_val],
        "train": rows[n_test + n_val :],
    }


def render(template: str, bos: str, record: dict[str, str]) -> tuple[str, str]:
    """The prompt text (BOS included, as lm-eval sees it) and the response text (space-led)."""
    return bos + template.format(instruction=record["instruction"]), " " + record["output"]


def tokenize(
    tokenizer: Any, prompt: str, response: str, max_length: int, loss_on: str
) -> tuple[dict[str, list[int]], int]:
    """Token ids of prompt+response+EOS, cut to `max_length`, and the uncut length.

    Labels are -100 on the prompt when loss_on=response. Prompt and response are encoded
    separately, exactly as generation sees the prompt.
    """
    p = tokenizer.encode(prompt, add_special_tokens=False)
    r = [*tokenizer.encode(response + "\n", add_special_tokens=False), tokenizer.eos_token_id]
    ids = p + r
    labels = ([IGNORE_INDEX] * len(p) if loss_on == "response" else list(p)) + r
    n = min(len(ids), max_length)
    features = {"input_ids": ids[:n], "attention_mask": [1] * n, "labels": labels[:n]}
    return features, len(ids)


def load_records(cfg: DataConfig, seed: int) -> tuple[dict[str, list[dict[str, str]]], dict]:
    """Records per split, and a description of the source for the manifest."""
    if cfg.source == "synthetic":
        assert cfg.synthetic is not None
        try:
            splits = generate(cfg.synthetic, seed)
        except ValueError as e:
            raise PipelineError(f"config key 'data.synthetic': {e}") from None
        return splits, {"source": "synthetic", "skills": list(cfg.synthetic.skills)}
    assert cfg.path is not None
    records = read_jsonl(cfg.path, (cfg.instruction_field, cfg.response_field))
    return split_records(records, cfg.val_fraction, cfg.test_fraction, seed), {
        "source": "jsonl",
        "path": str(cfg.path),
        "sha256": sha256_file(cfg.path),
    }


def prepare(cfg: DataConfig, tokenizer: Any, seed: int, out_dir: str | Path) -> dict:
    """Write the prepared dataset folder (atomically) and return its manifest.

    Args:
        cfg: `data` section.
        tokenizer: the base model's tokenizer.
        seed: seeds generation and splitting.
        out_dir: gets `dataset/` (datasets.save_to_disk), `test.jsonl`, `manifest.json`.
    """
    from datasets import Dataset, DatasetDict

    splits, source = load_records(cfg, seed)
    bos = tokenizer.bos_token or ""
    columns: dict[str, Dataset] = {}
    stats: dict[str, dict] = {}
    for name in SPLITS:
        rows, lengths = [], []
        for record in splits[name]:
            prompt, response = render(cfg.template, bos, record)
            features, length = tokenize(tokenizer, prompt, response, cfg.max_length, cfg.loss_on)
            rows.append({**record, "prompt": prompt, "response": response, **features})
            lengths.append(length)
        truncated = sum(n > cfg.max_length for n in lengths)
        stats[name] = {
            "rows": len(rows),
            "truncated": truncated,
            "tokens_max": max(lengths),
            "tokens_mean": sum(lengths) / len(lengths),
            "content_sha256": sha256_text(json.dumps(splits[name], sort_keys=True)),
        }
        columns[name] = Dataset.from_list(rows)
    manifest = {
        "source": source,
        "seed": seed,
        "template": cfg.template,
        "loss_on": cfg.loss_on,
        "max_length": cfg.max_length,
        "splits": stats,
    }
    with atomic_dir(out_dir) as tmp:
        DatasetDict(columns).save_to_disk(str(tmp / "dataset"))
        with open(tmp / "test.jsonl", "w", encoding="utf-8") as f:
            for record in splits["test"]:
                prompt, _ = render(cfg.template, bos, record)
                f.write(json.dumps({"prompt": prompt, "answer": record["output"]}) + "\n")
        write_json(tmp / "manifest.json", manifest)
    log.info(
        "prepare: %s -> %s (train %d, val %d, test %d rows)",
        source["source"],
        out_dir,
        stats["train"]["rows"],
        stats["val"]["rows"],
        stats["test"]["rows"],
    )
    return manifest
