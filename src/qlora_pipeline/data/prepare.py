"""The prepare step: source rows -> conversations -> cleaned, split, checked, templated, tokenized
(labels masked to the responses), optionally packed -> `datasets` on disk, `test.jsonl` for
lm-eval, `manifest.json` and a token-length histogram. Written atomically; keyed by a hash of the
source content, the data config, the tokenizer and this code, so an unchanged source is a cache hit.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

from qlora_pipeline.config.schema import DataConfig
from qlora_pipeline.data import clean, formats, frozen, pack, sources, templates
from qlora_pipeline.data.synthetic import generate
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.files import atomic_dir, read_json, sha256_text, write_json
from qlora_pipeline.runtime import log

IGNORE_INDEX = pack.IGNORE_INDEX
SPLITS = ("train", "val", "test")
TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels")
BATCH = 2000  # examples per tokenizer call
CODE_DIR = Path(__file__).parent


def _int_list() -> Any:
    from datasets import Sequence, Value

    return Sequence(Value("int32"))


def describe(cfg: DataConfig) -> str:
    if cfg.source == "synthetic":
        return "synthetic data"
    return f"{cfg.path}" if cfg.source == "local" else f"hub dataset '{cfg.path}'"


def read_source(cfg: DataConfig, seed: int) -> dict[str, sources.Rows]:
    """Raw rows per given split (always `train`; `val` / `test` when the source has them)."""
    if cfg.source == "synthetic":
        assert cfg.synthetic is not None
        try:
            generated = generate(cfg.synthetic, seed)
        except ValueError as e:
            raise PipelineError(f"config key 'data.synthetic': {e}") from None
        return {
            name: sources.Rows(
                rows=list(rows),
                where=[f"synthetic[{name}]:row {i}" for i in range(len(rows))],
                sources=[{"synthetic": name, "sha256": sha256_text(json.dumps(rows))}],
            )
            for name, rows in generated.items()
        }
    assert cfg.path is not None
    if cfg.source == "local":
        if not cfg.splits:
            return {"train": sources.read_local(cfg.path)}
        return {name: sources.read_local(cfg.path, pattern) for name, pattern in cfg.splits.items()}
    given = cfg.splits or {"train": "train"}
    return {
        name: sources.read_hub(cfg.path, cfg.hub_config, split, cfg.revision)
        for name, split in given.items()
    }


def to_conversations(cfg: DataConfig, rows: sources.Rows) -> list[formats.Conversation]:
    return [
        formats.to_conversation(row, where, cfg.format, cfg.columns, cfg.message_keys, cfg.roles)
        for row, where in zip(rows.rows, rows.where, strict=True)
    ]


def code_hash() -> str:
    return sha256_text(
        "".join(p.read_text(encoding="utf-8") for p in sorted(CODE_DIR.glob("*.py")))
    )


def tokenizer_hash(tokenizer: Any) -> str:
    spec = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token],
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return sha256_text(json.dumps(spec))


def cache_key(
    cfg: DataConfig,
    seed: int,
    raw: dict[str, sources.Rows],
    tokenizer: Any,
    frozen_test: dict | None = None,
) -> str:
    """Hash of the source content, the frozen evaluation set's (if any), the data config, the
    seed, the tokenizer and this code."""
    return sha256_text(
        json.dumps(
            {
                "data": dataclasses.asdict(cfg),
                "seed": seed,
                "sources": {name: rows.sources for name, rows in sorted(raw.items())},
                "frozen_test": frozen_test,
                "tokenizer": tokenizer_hash(tokenizer),
                "code": code_hash(),
            },
            sort_keys=True,
        )
    )


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added (the texts carry BOS/EOS themselves)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):  # Rust, no offsets: fastest
        # The backend keeps the padding and truncation of the tokenizer's last call that asked for
        # them (an evaluation's, a collator's); the tokenizer's own calls reset them, this one must.
        backend.no_padding()
        backend.no_truncation()
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def content_hash(ds: Any) -> str:
    """sha256 of a split's token ids and labels (arrow buffers, so 100k rows hash in a blink)."""
    import hashlib

    h = hashlib.sha256()
    for name in ("input_ids", "labels"):
        for array in pack.flat_list(ds.data.column(name)):
            h.update(array.tobytes())
    return h.hexdigest()


def tokenize_batch(
    segments: list[list[templates.Segment]], tokenizer: Any, max_length: int, loss_on: str
) -> dict[str, list]:
    """Segments of many examples -> input_ids, attention_mask, labels, length, trained.

    Each segment is encoded on its own (as generation sees the prompt) and the pieces joined;
    labels are -100 outside the responses when loss_on=response. Rows are cut to `max_length`;
    `length` is the uncut token count, `trained` whether any label survived the cut.
    """
    encoded = iter(encode(tokenizer, [text for example in segments for text, _ in example]))
    out: dict[str, list] = {
        "input_ids": [],
        "attention_mask": [],
        "labels": [],
        "length": [],
        "trained": [],
    }
    for example in segments:
        ids: list[int] = []
        labels: list[int] = []
        for _, is_response in example:
            piece = next(encoded)
            ids += piece
            labels += piece if is_response or loss_on == "all" else [IGNORE_INDEX] * len(piece)
        out["length"].append(len(ids))
        out["input_ids"].append(ids[:max_length])
        out["attention_mask"].append([1] * min(len(ids), max_length))
        out["labels"].append(labels[:max_length])
        out["trained"].append(any(x != IGNORE_INDEX for x in labels[:max_length]))
    return out


def row_lengths(ds: Any) -> list[int]:
    import pyarrow.compute as pc

    return pc.list_value_length(ds.data.column("input_ids")).to_pylist()


def length_stats(lengths: list[int]) -> dict[str, float]:
    import numpy as np

    if not lengths:
        return {}
    a = np.asarray(lengths)
    return {
        "min": int(a.min()),
        "mean": round(float(a.mean()), 2),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "max": int(a.max()),
    }


def length_histogram(lengths: dict[str, list[int]], max_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.2))
    top = max(max(max(v, default=0) for v in lengths.values()), max_length)
    edges = np.linspace(0, top + 1, min(top + 2, 61))
    for name, values in lengths.items():
        counts, _ = np.histogram(values, bins=edges)
        ax.stairs(counts, edges, fill=True, alpha=0.5, label=f"{name} ({len(values)})")
    ax.axvline(max_length, color="black", linestyle="--", linewidth=1, label="max_length")
    ax.set_xlabel("tokens per example (before truncation)")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _select(items: list, keep: list[int]) -> list:
    return [items[i] for i in keep]


def clean_splits(
    cfg: DataConfig,
    seed: int,
    raw: dict[str, sources.Rows],
    frozen_test: list[formats.Conversation] | None = None,
) -> tuple[dict[str, list[formats.Conversation]], dict[str, dict[str, int]], dict[str, Any]]:
    """Parse, drop empty rows, dedupe, shuffle, cut missing splits by ratio, cap, and check
    contamination. Returns conversations per split, counts per split, contamination figures.

    With `frozen_test` (the frozen evaluation set, `data/frozen.py`), that is the test split: the
    source's own test rows are not read, no test rows are cut from train, and train/val rows
    equal to a frozen test item are dropped (counted as `frozen_test_copies_dropped`)."""
    counts: dict[str, dict[str, int]] = {}
    splits: dict[str, list[formats.Conversation]] = {}
    if frozen_test is not None:
        raw = {name: rows for name, rows in raw.items() if name != "test"}
        splits["test"] = frozen_test
        counts["test"] = {"frozen": len(frozen_test)}
    for name, rows in raw.items():
        conversations = to_conversations(cfg, rows)
        c = counts[name] = {"read": len(conversations)}
        conversations = [x for x in conversations if not formats.is_empty(x)]
        c["empty_dropped"] = c["read"] - len(conversations)
        keep, dupes = clean.dedupe(conversations, drop=cfg.dedupe)
        splits[name] = _select(conversations, keep)
        c.update(dupes)
        c["duplicates_dropped"] = len(conversations) - len(keep)
    rng = random.Random(seed)
    if cfg.shuffle:
        rng.shuffle(splits["train"])
    pool = len(splits["train"])  # missing splits are cut from train, deduplicated as one pool
    if frozen_test is not None:  # after `pool`: unchanged data gives the splits it gave unfrozen
        frozen_keys = {clean.exact_key(x) for x in frozen_test}
        for name in [n for n in ("train", "val") if n in splits]:
            kept = [x for x in splits[name] if clean.exact_key(x) not in frozen_keys]
            counts[name]["frozen_test_copies_dropped"] = len(splits[name]) - len(kept)
            splits[name] = kept
    for name, fraction in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
        if name not in splits:
            n = max(1, round(pool * fraction)) if pool > 2 else 0
            splits[name], splits["train"] = splits["train"][:n], splits["train"][n:]
            counts[name] = {"from_train": n}
    if cfg.max_samples is not None and len(splits["train"]) > cfg.max_samples:
        counts["train"]["max_samples_dropped"] = len(splits["train"]) - cfg.max_samples
        splits["train"] = splits["train"][: cfg.max_samples]
    c_cfg = cfg.contamination
    figures: dict[str, Any] = {
        "ngram": c_cfg.ngram,
        "threshold": c_cfg.threshold,
        "drop": c_cfg.drop,
    }
    for name in ("val", "test"):
        overlaps, flagged = clean.contamination(
            splits["train"], splits[name], c_cfg.ngram, c_cfg.threshold
        )
        figures[name] = {
            "examples": len(overlaps),
            "contaminated": sum(flagged),
            "fraction": round(sum(flagged) / len(flagged), 4) if flagged else 0.0,
            "max_overlap": round(max(overlaps, default=0.0), 4),
            "mean_overlap": round(sum(overlaps) / len(overlaps), 4) if overlaps else 0.0,
        }
        if c_cfg.drop and not (name == "test" and frozen_test is not None):  # frozen: kept
            splits[name] = [x for x, bad in zip(splits[name], flagged, strict=True) if not bad]
            counts[name]["contaminated_dropped"] = sum(flagged)
    return splits, counts, figures


def tokenize_split(
    cfg: DataConfig, conversations: list[formats.Conversation], template: str, tokenizer: Any
) -> tuple[
    Any, list[formats.Conversation], list[list[templates.Segment]], dict[str, int], list[int]
]:
    """Tokenized rows of one split after the length policy (a `datasets.Dataset`), the
    conversations and segments kept, counts, and the uncut token lengths of every row."""
    from datasets import Dataset, Features
    from tqdm.auto import tqdm

    segments = [templates.render(x, template, tokenizer) for x in conversations]
    columns: dict[str, list] = {}
    for start in tqdm(range(0, len(segments), BATCH), desc="tokenize", unit="batch", leave=False):
        part = tokenize_batch(
            segments[start : start + BATCH], tokenizer, cfg.max_length, cfg.loss_on
        )
        for name, values in part.items():
            columns.setdefault(name, []).extend(values)
    lengths = columns["length"]
    if cfg.length_policy == "drop":
        keep = [i for i, n in enumerate(lengths) if n <= cfg.max_length]
        counts = {"too_long_dropped": len(lengths) - len(keep)}
    else:
        keep = [i for i, ok in enumerate(columns["trained"]) if ok]
        counts = {
            "truncated": sum(n > cfg.max_length for n in lengths),
            "no_response_left_dropped": len(lengths) - len(keep),
        }
    if len(keep) < len(lengths):
        segments, conversations = _select(segments, keep), _select(conversations, keep)
    ds = Dataset.from_dict(
        {name: _select(columns[name], keep) for name in TOKEN_COLUMNS},
        features=Features({name: _int_list() for name in TOKEN_COLUMNS}),
    )
    return ds, conversations, segments, counts, lengths


def fit_context(
    conversations: list[formats.Conversation], template: str, tokenizer: Any, context: int
) -> tuple[list[formats.Conversation], int]:
    """Evaluation items the model can see whole (prompt and answer within `context` tokens), and
    how many were dropped: an item cut to fit would be scored on a prompt or an answer it never
    saw (lm-eval would stop on it with an assertion)."""
    texts = ["".join(t for t, _ in templates.render(x, template, tokenizer)) for x in conversations]
    keep = [i for i, ids in enumerate(encode(tokenizer, texts)) if len(ids) <= context]
    return _select(conversations, keep), len(conversations) - len(keep)


def write_test_jsonl(path: Path, conversations: list, segments: list, eos: str) -> None:
    """lm-eval rows: `prompt` (everything before the last response), `answer` (its content, for
    exact match) and `target` (the response text as trained, EOS removed, for log-likelihood)."""
    with open(path, "w", encoding="utf-8") as f:
        for conversation, segs in zip(conversations, segments, strict=True):
            role, content = conversation[-1]
            row = (
                {"text": content}
                if role == "text"
                else {
                    "prompt": templates.eval_prompt(segs),
                    "answer": content,
                    "target": segs[-1][0].replace(eos, ""),
                }
            )
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def prepare(
    cfg: DataConfig, tokenizer: Any, seed: int, out_dir: str | Path, context: int | None = None
) -> dict:
    """Write the prepared dataset folder (atomically) and return its manifest.

    Args:
        cfg: `data` section.
        tokenizer: the base model's tokenizer.
        seed: seeds generation, shuffling and splitting.
        context: the base model's context (`max_position_embeddings`): `data.max_length` may not
            exceed it, and test items longer than it are dropped and counted.
        out_dir: gets `dataset/` (datasets.save_to_disk), `test.jsonl`, `manifest.json` and
            `token_lengths.png`. Left untouched when anything fails.

    Raises:
        PipelineError: one line naming the file and row, the config key, or what is empty.
    """
    import pyarrow as pa
    from datasets import Dataset, DatasetDict

    out_dir = Path(out_dir)
    if context is not None and cfg.max_length > context:
        raise PipelineError(
            f"config key 'data.max_length': {cfg.max_length} is above the model's context "
            f"(max_position_embeddings {context}); use at most {context}"
        )
    raw = read_source(cfg, seed)
    frozen_test, frozen_source = None, None
    if cfg.frozen_test and Path(cfg.frozen_test).is_file():
        frozen_test, frozen_source = frozen.read(cfg.frozen_test)
    key = cache_key(cfg, seed, raw, tokenizer, frozen_source)
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file() and (out_dir / "dataset").is_dir():
        previous = read_json(manifest_path)
        if previous.get("cache_key") == key:
            log.info("prepare: cache hit (%s unchanged) -> %s", describe(cfg), out_dir)
            return previous
    template = templates.resolve(cfg.template, tokenizer)
    splits, counts, contamination = clean_splits(cfg, seed, raw, frozen_test)
    if context is not None:
        splits["test"], dropped = fit_context(splits["test"], template, tokenizer, context)
        counts["test"]["longer_than_context_dropped"] = dropped
        if dropped:
            log.warning(
                "prepare: %d test items are longer than the model's context (%d tokens) and are "
                "not evaluated (manifest: counts.test.longer_than_context_dropped)",
                dropped,
                context,
            )
    datasets: dict[str, Dataset] = {}
    segments: dict[str, list] = {}
    lengths: dict[str, list[int]] = {}
    for name in SPLITS:
        if not splits[name]:
            raise PipelineError(
                f"{describe(cfg)}: no rows left in split '{name}' after filtering "
                f"({json.dumps(counts.get(name, {}))}); check the data and data.* filters"
            )
        ds, splits[name], segments[name], length_counts, lengths[name] = tokenize_split(
            cfg, splits[name], template, tokenizer
        )
        counts[name].update(length_counts)
        if len(ds) == 0:
            raise PipelineError(
                f"{describe(cfg)}: no rows left in split '{name}' after the length policy "
                f"({json.dumps(length_counts)}); raise data.max_length"
            )
        datasets[name] = ds
        counts[name]["rows"] = len(ds)
    kept_lengths = row_lengths(datasets["train"])
    packing = {
        "enabled": cfg.packing,
        "length": cfg.max_length,
        "padding_waste_unpacked": round(pack.padding_waste(kept_lengths, cfg.max_length), 4),
        "padding_waste_packed": round(
            pack.padding_waste(kept_lengths, cfg.max_length, packed=True), 4
        ),
    }
    if cfg.packing:
        table = datasets["train"].data
        packed = pack.pack(table.column("input_ids"), table.column("labels"), cfg.max_length)
        datasets["train"] = Dataset(pa.table(packed))
        packing.update(examples=len(kept_lengths), rows=len(datasets["train"]))
    manifest: dict[str, Any] = {
        "cache_key": key,
        "source": {
            "kind": cfg.source,
            "name": describe(cfg),
            "files": {name: rows.sources for name, rows in raw.items()},
        },
        "frozen_test": frozen_source,  # the frozen evaluation set the test split is, if any
        "format": cfg.format,
        "template": template,
        "seed": seed,
        "loss_on": cfg.loss_on,
        "max_length": cfg.max_length,
        "context": context,  # the model's; longer test items are dropped (counts.test)
        "length_policy": cfg.length_policy,
        "counts": counts,
        "token_lengths": {name: length_stats(v) for name, v in lengths.items()},
        "contamination": contamination,
        "packing": packing,
        "splits": {
            name: {
                "rows": len(datasets[name]),
                "content_sha256": content_hash(datasets[name]),
            }
            for name in SPLITS
        },
    }
    with atomic_dir(out_dir) as tmp:
        DatasetDict(datasets).save_to_disk(str(tmp / "dataset"))
        write_test_jsonl(
            tmp / "test.jsonl", splits["test"], segments["test"], tokenizer.eos_token or ""
        )
        length_histogram(lengths, cfg.max_length, tmp / "token_lengths.png")
        write_json(tmp / "manifest.json", manifest)
    log.info(
        "prepare: %s -> %s (train %d%s, val %d, test %d rows; template %s)",
        describe(cfg),
        out_dir,
        manifest["splits"]["train"]["rows"],
        " packed" if cfg.packing else "",
        manifest["splits"]["val"]["rows"],
        manifest["splits"]["test"]["rows"],
        template,
    )
    return manifest
