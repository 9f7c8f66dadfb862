"""Data: sources, record formats, templates, cleaning, splits, contamination, packing, caching,
and one clear line for every kind of bad input with earlier outputs left untouched."""

from __future__ import annotations

import itertools
import json
import random

import pyarrow as pa
import pytest
import torch
import yaml
from conftest import ROOT, conf_default
from datasets import load_from_disk
from omegaconf import OmegaConf

from qlora_pipeline.config.schema import DataConfig
from qlora_pipeline.data import clean, pack, sources, templates
from qlora_pipeline.data.formats import to_conversation
from qlora_pipeline.data.prepare import IGNORE_INDEX, prepare, tokenize_batch
from qlora_pipeline.data.skills import SKILLS, example
from qlora_pipeline.data.synthetic import generate
from qlora_pipeline.errors import PipelineError

ALPACA = [
    {"instruction": f"sort {a} {b} {c}", "input": "", "output": " ".join(sorted([a, b, c]))}
    for a, b, c in zip(
        "qwertyuiopasdfghjklzxcvbnm",
        "mnbvcxzlkjhgfdsapoiuytrewq",
        "plokijuhygtfrdeswaqzxcvbnm",
        strict=True,
    )
]


def local_cfg(path, **kwargs) -> DataConfig:
    base = {"name": "t", "source": "local", "path": str(path), "dedupe": True, "shuffle": True}
    base.update(frozen_test=None)
    base.update(val_fraction=0.1, test_fraction=0.1, max_length=64)
    base.update(kwargs)
    return conf_default("data", **base)


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- the synthetic task -------------------------------------------------------------------------


def test_skills_answer_correctly():
    rng = random.Random(1)
    assert SKILLS["reverse"].answer("k d a") == "a d k"
    assert SKILLS["upper"].answer("k d a") == "K D A"
    assert SKILLS["sort"].answer("k d a") == "a d k"
    assert SKILLS["add"].answer("7 plus 8") == "1 5"
    instruction, answer = example("add", rng, 3)
    a, b = instruction.removeprefix("add ").split(" and ")
    assert int(answer.replace(" ", "")) == int(a) + int(b)


def test_synthetic_is_deterministic_balanced_and_held_out():
    cfg = conf_default("data.synthetic", n_train=400, n_val=40, n_test=80)
    first, second = generate(cfg, seed=3), generate(cfg, seed=3)
    assert first == second
    assert generate(cfg, seed=4) != first
    assert [len(first[s]) for s in ("train", "val", "test")] == [400, 40, 80]
    held = {r["instruction"] for r in first["val"] + first["test"]}
    assert len(held) == 120
    assert not held & {r["instruction"] for r in first["train"]}
    for skill in cfg.skills:
        assert sum(r["instruction"].startswith(skill) for r in first["test"]) == 20


def test_prepared_dataset_matches_manifest(tiny_data):
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    ds = load_from_disk(str(tiny_data / "dataset"))
    for split in ("train", "val", "test"):
        assert len(ds[split]) == manifest["splits"][split]["rows"]
    test_rows = [json.loads(line) for line in (tiny_data / "test.jsonl").read_text().splitlines()]
    assert len(test_rows) == manifest["splits"]["test"]["rows"]
    assert test_rows[0]["prompt"].startswith("<s>Q: ") and test_rows[0]["prompt"].endswith("\nA:")
    assert manifest["template"] == "qa" and manifest["contamination"]["test"]["contaminated"] == 0
    assert (tiny_data / "token_lengths.png").stat().st_size > 1000


# --- tokenization and templates ----------------------------------------------------------------


def test_tokenize_masks_prompt_and_appends_eos(tiny_tokenizer):
    segments = templates.render(
        [("user", "sort c a b"), ("assistant", "a b c")], "qa", tiny_tokenizer
    )
    assert segments == [("<s>Q: sort c a b\nA:", False), (" a b c\n</s>", True)]
    out = tokenize_batch([segments], tiny_tokenizer, 64, "response")
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert out["length"][0] == len(ids) and ids[0] == tiny_tokenizer.bos_token_id
    assert ids[-1] == tiny_tokenizer.eos_token_id and ids.count(tiny_tokenizer.eos_token_id) == 1
    n_prompt = len(tiny_tokenizer.encode(segments[0][0], add_special_tokens=False))
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tiny_tokenizer.decode(ids[n_prompt:-1]) == " a b c\n"
    everything = tokenize_batch([segments], tiny_tokenizer, 64, "all")
    assert IGNORE_INDEX not in everything["labels"][0]
    cut = tokenize_batch([segments], tiny_tokenizer, 5, "response")
    assert len(cut["input_ids"][0]) == 5 and cut["length"][0] > 5 and cut["trained"] == [False]


def test_tokenizing_ignores_padding_and_truncation_an_earlier_call_left_set(tiny_tokenizer):
    """A fast tokenizer keeps the padding and truncation of its last padded call in its Rust
    backend (evaluation and collators make such calls); the rows must not take them on."""
    segments = [[("<s>Q: sort c a b\nA:", False), (" a b c\n</s>", True)], [("<s>Q:", False)]]
    expected = [
        [i for t, _ in rows for i in tiny_tokenizer.encode(t, add_special_tokens=False)]
        for rows in segments
    ]
    tiny_tokenizer(
        ["a much longer text than the other", "a"], padding=True, truncation=True, max_length=4
    )
    backend = tiny_tokenizer.backend_tokenizer
    assert backend.padding is not None and backend.truncation is not None  # the fault is set
    out = tokenize_batch(segments, tiny_tokenizer, 64, "all")
    assert out["input_ids"] == expected and out["length"] == [len(e) for e in expected]


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_template_is_used_when_the_tokenizer_has_one(tiny_tokenizer):
    tok = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    assert templates.resolve("auto", tok) == "qa"
    with pytest.raises(PipelineError, match=r"data\.template': the tokenizer has no chat template"):
        templates.resolve("chat_template", tok)
    tok.chat_template = CHAT_TEMPLATE
    assert templates.resolve("auto", tok) == "chat_template"
    conversation = [("user", "hi"), ("assistant", "yo"), ("user", "sort b a"), ("assistant", "a b")]
    segments = templates.render(conversation, "chat_template", tok)
    assert segments == [
        ("<s><|user|>hi<|assistant|>", False),
        ("yo</s>", True),
        ("<|user|>sort b a<|assistant|>", False),
        ("a b</s>", True),
    ]
    assert (
        templates.eval_prompt(segments)
        == "<s><|user|>hi<|assistant|>yo</s><|user|>sort b a<|assistant|>"
    )


@pytest.mark.parametrize("family", ["llama3", "qwen2.5"])
def test_multi_turn_chat_with_real_templates_whose_end_of_turn_is_not_eos(tiny_tokenizer, family):
    """Two assistant turns with the real template of a family whose end-of-turn token is not the
    tokenizer's EOS: each response ends with EOS (the model learns to stop), every other byte is
    the template's own rendering, and the evaluation prompt is everything before the last one."""
    tok = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = (ROOT / f"tests/assets/chat_templates/{family}.jinja").read_text()
    eos = tok.eos_token
    conversation = [
        ("user", "reverse a b"),
        ("assistant", "b a"),
        ("user", "sort c a b"),
        ("assistant", "a b c"),
    ]
    segments = templates.render(conversation, "chat_template", tok)
    assert [is_response for _, is_response in segments] == [False, True, False, True]
    assert all(text.endswith(eos) for text, is_response in segments if is_response)
    messages = [{"role": r, "content": c} for r, c in conversation]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert "".join(text for text, _ in segments).replace(eos, "") == rendered.replace(eos, "")
    assert "b a" in segments[1][0] and "a b c" in segments[3][0]
    before_last = tok.apply_chat_template(messages[:3], tokenize=False, add_generation_prompt=True)
    assert templates.eval_prompt(segments).replace(eos, "") == before_last.replace(eos, "")


def test_record_formats_and_column_mapping():
    assert to_conversation(
        {"instruction": "i", "input": "x", "output": "o", "system": "s"}, "r", "alpaca"
    ) == [
        ("system", "s"),
        ("user", "i\n\nx"),
        ("assistant", "o"),
    ]
    assert to_conversation(
        {"q": "i", "a": "o"}, "r", "alpaca", {"instruction": "q", "output": "a"}
    ) == [
        ("user", "i"),
        ("assistant", "o"),
    ]
    assert to_conversation({"prompt": "p", "completion": "c"}, "r", "prompt_completion") == [
        ("user", "p"),
        ("assistant", "c"),
    ]
    assert to_conversation({"text": "t"}, "r", "text") == [("text", "t")]
    sharegpt = yaml.safe_load((ROOT / "conf/data/sharegpt.yaml").read_text())
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert to_conversation(
        row, "r", "chat", sharegpt["columns"], sharegpt["message_keys"], sharegpt["roles"]
    ) == [("user", "q"), ("assistant", "a")]


def test_every_file_type_and_a_folder_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": r["instruction"], "output": r["output"]} for r in ALPACA[:5]]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.csv").write_text(
        "instruction,output\n" + "".join(f'"{r["instruction"]}","{r["output"]}"\n' for r in rows)
    )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        got = sources.read_file(tmp_path / f"a.{suffix}")
        assert got.rows == rows, suffix
        assert got.sources[0]["sha256"] and got.sources[0]["rows"] == 5
    assert sources.read_file(tmp_path / "a.jsonl").where[1] == f"{tmp_path / 'a.jsonl'}:2"
    assert len(sources.read_local(tmp_path).rows) == 20
    assert len(sources.read_local(tmp_path, "*.csv").rows) == 5


def test_hub_source_offline_error_names_the_dataset_and_local_folder_works(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        PipelineError, match=r"hub dataset 'nobody/no-such-set' split 'train': not reachable"
    ):
        sources.read_hub("nobody/no-such-set", None, "train", None)
    write_jsonl(tmp_path / "train.jsonl", ALPACA[:3])
    got = sources.read_hub(str(tmp_path), None, "train", None)
    assert got.rows == ALPACA[:3] and got.sources[0]["fingerprint"]


# --- cleaning, splits, contamination, length policy ----------------------------------------------


def test_cleaning_counts_every_filter_and_splits_by_ratio(tmp_path, tiny_tokenizer):
    rows = list(ALPACA)
    rows += [{"instruction": "  ", "output": "x"}, {"instruction": "a", "output": "\n"}]  # empty
    rows += [dict(ALPACA[0]), dict(ALPACA[1])]  # exact duplicates
    rows += [
        {"instruction": ALPACA[2]["instruction"].upper() + " !", "output": ALPACA[2]["output"]}
    ]
    rows += [{"instruction": "sort " + "z " * 80, "output": "z"}]  # too long
    write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    m = prepare(
        local_cfg(tmp_path / "d.jsonl", length_policy="drop", max_samples=18),
        tiny_tokenizer,
        0,
        out,
    )
    c = m["counts"]
    assert c["train"]["read"] == len(rows) and c["train"]["empty_dropped"] == 2
    assert (c["train"]["exact_duplicates"], c["train"]["normalized_duplicates"]) == (2, 1)
    assert c["val"]["from_train"] == c["test"]["from_train"] == 3  # 27 unique rows, 10% each
    assert c["train"]["max_samples_dropped"] == 3
    too_long = sum(c[s]["too_long_dropped"] for s in ("train", "val", "test"))
    assert too_long == 1
    assert sum(m["splits"][s]["rows"] for s in ("train", "val", "test")) == 18 + 6 - 1
    again = prepare(
        local_cfg(tmp_path / "d.jsonl", length_policy="drop", max_samples=18),
        tiny_tokenizer,
        0,
        tmp_path / "o2",
    )
    assert again["splits"] == m["splits"]  # deterministic from the seed
    other = prepare(
        local_cfg(tmp_path / "d.jsonl", length_policy="drop", max_samples=18),
        tiny_tokenizer,
        1,
        tmp_path / "o3",
    )
    assert other["splits"]["test"]["content_sha256"] != m["splits"]["test"]["content_sha256"]


def test_given_splits_and_contamination_check(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "train.jsonl", ALPACA[:20])
    leaked = [dict(ALPACA[0]), dict(ALPACA[1])]
    write_jsonl(tmp_path / "test.jsonl", [*leaked, *ALPACA[20:24]])
    splits = {"train": "train.jsonl", "test": "test.jsonl"}
    cfg = local_cfg(tmp_path, splits=splits)
    cfg.contamination.ngram = 3
    m = prepare(cfg, tiny_tokenizer, 0, tmp_path / "out")
    assert m["counts"]["test"]["read"] == 6 and m["counts"]["val"]["from_train"] == 2
    assert m["contamination"]["test"]["contaminated"] == 2
    assert m["contamination"]["test"]["max_overlap"] == 1.0
    cfg.contamination.drop = True
    m = prepare(cfg, tiny_tokenizer, 0, tmp_path / "out")
    assert m["splits"]["test"]["rows"] == 4 and m["counts"]["test"]["contaminated_dropped"] == 2
    answers = [
        json.loads(x)["answer"] for x in (tmp_path / "out/test.jsonl").read_text().splitlines()
    ]
    assert answers == [r["output"] for r in ALPACA[20:24]]


def test_dedupe_and_contamination_units():
    a = [("user", "Sort b a"), ("assistant", "a b")]
    b = [("user", "sort  b a!"), ("assistant", "a b")]
    keep, counts = clean.dedupe([a, a, b])
    assert keep == [0] and counts == {"exact_duplicates": 1, "normalized_duplicates": 1}
    assert clean.dedupe([a, a, b], drop=False)[0] == [0, 1, 2]
    overlaps, flagged = clean.contamination(
        [a], [b, [("user", "x y z"), ("assistant", "w")]], 3, 0.5
    )
    assert overlaps == [1.0, 0.0] and flagged == [True, False]


# --- packing -----------------------------------------------------------------------------------


def test_packing_keeps_examples_separate(tiny_base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (7, 12, 5, 9, 20)]
    packed = pack.pack(pa.array(examples), pa.array(examples), 30)
    rows = pa.table(packed).to_pylist()
    assert [len(r["input_ids"]) for r in rows] == [24, 29]
    assert [t for r in rows for t in r["input_ids"]] == [t for e in examples for t in e]
    assert rows[0]["labels"][7] == IGNORE_INDEX and rows[0]["position_ids"][7:9] == [0, 1]
    batch = pack.PackedCollator(0)(rows)
    assert batch["input_ids"].shape == (2, 29) and "attention_mask" not in batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        leaky = model(input_ids=batch["input_ids"]).logits
        offsets = [(0, 0), (0, 7), (0, 19), (1, 0), (1, 9)]
        for (row, start), e in zip(offsets, examples, strict=True):
            alone = model(input_ids=torch.tensor([e])).logits[0]
            torch.testing.assert_close(
                logits[row, start : start + len(e)], alone, atol=1e-4, rtol=1e-4
            )
        assert (leaky[0, 7:19] - logits[0, 7:19]).abs().max() > 0.1  # the check can fail
    assert pack.padding_waste([7, 12, 5, 9, 20], 30) == pytest.approx(1 - 53 / 150)
    assert pack.padding_waste([7, 12, 5, 9, 20], 30, packed=True) == pytest.approx(1 - 53 / 60)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_batch_padding_is_that_of_every_batch_drawn_with_replacement(batch):
    lengths = [1, 2, 5, 5, 9]
    batches = list(itertools.product(lengths, repeat=batch))  # each equally likely
    real = sum(sum(b) for b in batches)
    computed = sum(batch * max(b) for b in batches)  # padded to its longest row
    assert pack.batch_padding(lengths, batch) == pytest.approx(1 - real / computed, abs=1e-12)


def test_packing_is_suggested_for_long_tailed_rows_not_for_the_default_data(tiny_cfg, tiny_data):
    from qlora_pipeline.data.prepare import row_lengths
    from qlora_pipeline.training.train import packing_hint

    default = row_lengths(load_from_disk(str(tiny_data / "dataset"))["train"])
    assert packing_hint(default, tiny_cfg.train.batch_size, tiny_cfg.data.max_length) is None
    rng = random.Random(0)  # most rows short, one in five long: nearly every batch pads to one
    long_tailed = [
        rng.randint(15, 19) if rng.random() < 0.8 else rng.randint(60, 128) for _ in range(2000)
    ]
    hint = packing_hint(long_tailed, 16, 128)
    assert hint is not None and "data.packing=true" in hint
    padding = int(hint.split("about ")[1].split("%")[0])
    assert 60 <= padding <= 80  # a batch of 16: ~97% hold a long row, mean length ~35


def test_packed_dataset_trains_through_the_trainer_collator(tmp_path, tiny_tokenizer):
    from qlora_pipeline.training.train import collator

    write_jsonl(tmp_path / "d.jsonl", ALPACA)
    m = prepare(local_cfg(tmp_path / "d.jsonl", packing=True), tiny_tokenizer, 0, tmp_path / "out")
    train = load_from_disk(str(tmp_path / "out/dataset"))["train"]
    assert m["packing"]["rows"] == len(train) < m["packing"]["examples"] == 20
    assert m["packing"]["padding_waste_packed"] < m["packing"]["padding_waste_unpacked"]
    batch = collator(tiny_tokenizer)([train[0], train[1]])
    assert set(batch) == {"input_ids", "labels", "position_ids"}


# --- caching and atomic outputs ----------------------------------------------------------------


def test_unchanged_source_is_a_cache_hit_and_a_change_is_not(tmp_path, tiny_tokenizer):
    src = tmp_path / "d.jsonl"
    write_jsonl(src, ALPACA)
    out = tmp_path / "out"
    first = prepare(local_cfg(src), tiny_tokenizer, 0, out)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert prepare(local_cfg(src), tiny_tokenizer, 0, out) == first
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    write_jsonl(src, ALPACA[:-1])
    changed = prepare(local_cfg(src), tiny_tokenizer, 0, out)
    assert changed["cache_key"] != first["cache_key"]
    assert (
        prepare(local_cfg(src, max_length=48), tiny_tokenizer, 0, out)["cache_key"]
        != changed["cache_key"]
    )


BAD_INPUTS = {
    "malformed-json": (
        "bad.jsonl",
        b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output"\n',
        {},
        r"bad\.jsonl:2: malformed JSON \(Expecting ':' delimiter at column 30\); expected one JSON object per line$",
    ),
    "missing-column": (
        "bad.jsonl",
        b'{"instruction": "a", "answer": "b"}\n',
        {},
        r"bad\.jsonl:1: missing column 'output' for format 'alpaca'; the row has columns \['answer', 'instruction'\]$",
    ),
    "missing-mapped-column": (
        "bad.csv",
        b"q,a\nx,y\n",
        {"columns": {"instruction": "question", "output": "a"}},
        r"bad\.csv:2: missing column 'question' \(mapped from 'instruction' by data\.columns\)",
    ),
    "wrong-type": (
        "bad.jsonl",
        b'{"instruction": "a", "output": 3}\n',
        {},
        r"bad\.jsonl:1: column 'output' must be a string, got int 3$",
    ),
    "wrong-chat-type": (
        "bad.jsonl",
        b'{"messages": [{"role": "human", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
        {"format": "chat"},
        r"bad\.jsonl:1: messages\[0\]: unknown role 'human'; expected one of system, user, assistant",
    ),
    "not-an-object": (
        "bad.jsonl",
        b"[1, 2]\n",
        {},
        r"bad\.jsonl:1: expected a JSON object \(a record\), got list$",
    ),
    "empty-file": ("bad.jsonl", b"", {}, r"bad\.jsonl: empty file$"),
    "blank-lines-only": (
        "bad.jsonl",
        b"\n \n",
        {},
        r"bad\.jsonl: no records \(only blank lines\)$",
    ),
    "empty-after-filtering": (
        "bad.jsonl",
        b'{"instruction": " ", "output": "b"}\n{"instruction": "a", "output": ""}\n' * 3,
        {},
        r"bad\.jsonl: no rows left in split 'train' after filtering .*\"empty_dropped\": 6",
    ),
    "non-utf8": (
        "bad.jsonl",
        b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n',
        {},
        r"bad\.jsonl:2: not UTF-8 \(byte 0xe9 at offset 20\); re-encode the file as UTF-8$",
    ),
    "unknown-file-type": (
        "bad.txt",
        b"hello\n",
        {},
        r"bad\.txt: unknown file type '\.txt'; expected one of \.jsonl, \.json, \.csv, \.parquet$",
    ),
    "file-not-found": (None, None, {}, r"nope\.jsonl: file not found$"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_leaves_earlier_output(tmp_path, tiny_tokenizer, case):
    name, content, overrides, expected = BAD_INPUTS[case]
    good = tmp_path / "good.jsonl"
    write_jsonl(good, ALPACA)
    out = tmp_path / "prepared"
    prepare(local_cfg(good), tiny_tokenizer, 0, out)
    before = snapshot(out)
    path = tmp_path / (name or "nope.jsonl")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PipelineError, match=expected) as err:
        prepare(local_cfg(path, **overrides), tiny_tokenizer, 0, out)
    assert "\n" not in str(err.value)
    assert snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_cli_bad_input_and_unknown_format_exit_nonzero_with_one_line(
    tmp_path, tiny_cfg, tiny_base, capsys
):
    from qlora_pipeline.cli import main

    params = OmegaConf.to_container(OmegaConf.structured(tiny_cfg))
    params["paths"]["data"] = str(tmp_path / "prepared")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    params["data"].update(source="local", path=str(bad), synthetic=None)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert main(["--params", str(path), "prepare"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {bad}:2: malformed JSON (Expecting value at column 1); expected one JSON object per line"
    ]
    params["data"]["format"] = "alpacca"
    path.write_text(yaml.safe_dump(params))
    assert main(["--params", str(path), "prepare"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: config key 'data.format': got 'alpacca', expected one of alpaca, chat, prompt_completion, text"
    ]
    assert not (tmp_path / "prepared").exists()


# --- the frozen evaluation set ------------------------------------------------------------------


def test_a_frozen_test_set_is_reused_and_new_data_only_grows_train(tmp_path, tiny_tokenizer):
    from qlora_pipeline.data import frozen
    from qlora_pipeline.data.prepare import clean_splits, read_source

    rows = [{"instruction": f"echo {i}", "output": f"{i}"} for i in range(200)]
    write_jsonl(tmp_path / "v1.jsonl", rows)
    cfg = local_cfg(tmp_path / "v1.jsonl", frozen_test=str(tmp_path / "frozen.jsonl"))
    first, _, _ = clean_splits(cfg, 0, read_source(cfg, 0))
    frozen.write(tmp_path / "frozen.jsonl", first["test"])  # what freeze-test writes
    assert frozen.read(tmp_path / "frozen.jsonl")[0] == first["test"]

    # unchanged data: the same three splits with the frozen set as without it
    again, counts, _ = clean_splits(cfg, 0, read_source(cfg, 0), first["test"])
    assert again == first and counts["test"] == {"frozen": 20}

    # new data: the old rows (the frozen items among them), 100 new rows and one more copy of a
    # frozen item. The test split stays the frozen one; no frozen item is left in train or val
    # (20 dropped as frozen-test copies, the extra copy as a duplicate); train and val grow.
    copy = {"instruction": first["test"][0][0][1], "output": first["test"][0][1][1]}
    write_jsonl(
        tmp_path / "v2.jsonl",
        [*rows, *[{"instruction": f"new {i}", "output": "x"} for i in range(100)], copy],
    )
    cfg2 = local_cfg(tmp_path / "v2.jsonl", frozen_test=cfg.frozen_test)
    grown, counts, _ = clean_splits(cfg2, 0, read_source(cfg2, 0), first["test"])
    assert grown["test"] == first["test"]
    assert counts["train"]["frozen_test_copies_dropped"] == 20
    assert counts["train"]["duplicates_dropped"] == 1
    frozen_items = {json.dumps(x) for x in first["test"]}
    assert not frozen_items & {json.dumps(x) for x in grown["train"] + grown["val"]}
    assert len(grown["train"]) + len(grown["val"]) == 301 - 20 - 1
    assert len(grown["val"]) > len(first["val"]) and len(grown["train"]) > len(first["train"])

    # prepare reads the file: the manifest names it, lm-eval's test.jsonl is its items
    manifest = prepare(cfg2, tiny_tokenizer, 0, tmp_path / "out")
    assert (
        manifest["frozen_test"]["sha256"]
        == sources.read_file(tmp_path / "frozen.jsonl").sources[0]["sha256"]
    )
    lines = (tmp_path / "out/test.jsonl").read_text().splitlines()
    answers = [json.loads(line)["answer"] for line in lines]
    assert answers == [x[-1][1] for x in first["test"]]
    assert manifest["counts"]["train"]["frozen_test_copies_dropped"] == 20


def test_a_malformed_frozen_set_is_one_line_naming_the_row(tmp_path):
    from qlora_pipeline.data import frozen

    (tmp_path / "frozen.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "a"}]}\n{"text": 1}\n'
    )
    with pytest.raises(PipelineError, match=r"frozen.jsonl:2: a frozen test item must be"):
        frozen.read(tmp_path / "frozen.jsonl")


def test_test_items_longer_than_the_context_are_dropped_and_counted(tmp_path, tiny_tokenizer):
    rows = [{"instruction": f"echo {i}", "output": f"{i}"} for i in range(60)]
    rows += [{"instruction": f"long {i}", "output": " ".join(["word"] * 400)} for i in range(20)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = local_cfg(tmp_path / "d.jsonl", test_fraction=0.5, val_fraction=0.1)
    manifest = prepare(cfg, tiny_tokenizer, 0, tmp_path / "out", context=128)
    dropped = manifest["counts"]["test"]["longer_than_context_dropped"]
    test_rows = (tmp_path / "out/test.jsonl").read_text().splitlines()
    assert dropped > 0 and len(test_rows) == manifest["splits"]["test"]["rows"]
    assert all("word word" not in json.loads(r)["answer"] for r in test_rows)
    assert manifest["context"] == 128
    with pytest.raises(PipelineError) as err:
        prepare(
            local_cfg(tmp_path / "d.jsonl", max_length=512),
            tiny_tokenizer,
            0,
            tmp_path / "x",
            context=128,
        )
    assert str(err.value) == (
        "config key 'data.max_length': 512 is above the model's context "
        "(max_position_embeddings 128); use at most 128"
    )
    assert not (tmp_path / "x").exists()
