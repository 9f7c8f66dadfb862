"""Data: the synthetic task, templating and masking, JSONL errors, atomic outputs."""

from __future__ import annotations

import json

import pytest
from datasets import load_from_disk

from qlora_pipeline.config.schema import DataConfig, SyntheticConfig
from qlora_pipeline.data.prepare import IGNORE_INDEX, prepare, read_jsonl, tokenize
from qlora_pipeline.data.skills import SKILLS, example
from qlora_pipeline.data.synthetic import generate
from qlora_pipeline.errors import PipelineError


def test_skills_answer_correctly():
    import random

    rng = random.Random(1)
    assert SKILLS["reverse"].answer("k d a") == "a d k"
    assert SKILLS["upper"].answer("k d a") == "K D A"
    assert SKILLS["sort"].answer("k d a") == "a d k"
    assert SKILLS["add"].answer("7 plus 8") == "1 5"
    instruction, answer = example("add", rng, 3)
    a, b = instruction.removeprefix("add ").split(" and ")
    assert int(answer.replace(" ", "")) == int(a) + int(b)


def test_synthetic_is_deterministic_balanced_and_held_out():
    cfg = SyntheticConfig(n_train=400, n_val=40, n_test=80)
    first, second = generate(cfg, seed=3), generate(cfg, seed=3)
    assert first == second
    assert generate(cfg, seed=4) != first
    assert [len(first[s]) for s in ("train", "val", "test")] == [400, 40, 80]
    held = {r["instruction"] for r in first["val"] + first["test"]}
    assert len(held) == 120
    assert not held & {r["instruction"] for r in first["train"]}
    for skill in cfg.skills:
        assert sum(r["instruction"].startswith(skill) for r in first["test"]) == 20


def test_tokenize_masks_prompt_and_appends_eos(tiny_tokenizer):
    features, length = tokenize(tiny_tokenizer, "<s>Q: sort c a b\nA:", " a b c", 64, "response")
    ids, labels = features["input_ids"], features["labels"]
    assert length == len(ids) and ids[0] == tiny_tokenizer.bos_token_id
    assert ids[-1] == tiny_tokenizer.eos_token_id
    n_prompt = len(tiny_tokenizer.encode("<s>Q: sort c a b\nA:", add_special_tokens=False))
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tiny_tokenizer.decode(ids[n_prompt:-1]) == " a b c\n"
    everything, _ = tokenize(tiny_tokenizer, "<s>Q: sort c a b\nA:", " a b c", 64, "all")
    assert IGNORE_INDEX not in everything["labels"]
    cut, full = tokenize(tiny_tokenizer, "<s>Q: sort c a b\nA:", " a b c", 5, "response")
    assert len(cut["input_ids"]) == 5 and full > 5


def test_prepared_dataset_matches_manifest(tiny_data):
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    ds = load_from_disk(str(tiny_data / "dataset"))
    for split in ("train", "val", "test"):
        assert len(ds[split]) == manifest["splits"][split]["rows"]
    test_rows = [json.loads(line) for line in (tiny_data / "test.jsonl").read_text().splitlines()]
    assert len(test_rows) == manifest["splits"]["test"]["rows"]
    assert test_rows[0]["prompt"].startswith("<s>Q: ") and test_rows[0]["prompt"].endswith("\nA:")
    assert test_rows[0]["prompt"] == ds["test"][0]["prompt"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output"\n',
            r"bad\.jsonl:2: malformed JSON",
        ),
        (
            '{"instruction": "a", "answer": "b"}\n',
            r"bad\.jsonl:1: missing field\(s\) \['output'\]; the row has \['answer', 'instruction'\]",
        ),
        ('{"instruction": "a", "output": 3}\n', r"bad\.jsonl:1: field 'output' must be a string"),
        ("[1, 2]\n", r"bad\.jsonl:1: expected a JSON object"),
        ("\n\n", r"bad\.jsonl: no records"),
    ],
    ids=["malformed", "missing-field", "wrong-type", "not-object", "empty"],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(PipelineError, match=expected):
        read_jsonl(path, ("instruction", "output"))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match=r"nope\.jsonl: file not found"):
        read_jsonl(tmp_path / "nope.jsonl", ("instruction", "output"))


def test_jsonl_source_prepares_and_failed_prepare_leaves_old_output(tmp_path, tiny_tokenizer):
    good = tmp_path / "good.jsonl"
    good.write_text(
        "".join(json.dumps({"q": f"sort {c} a", "a": f"a {c}"}) + "\n" for c in "bcdefghijk")
    )
    cfg = DataConfig(
        name="jsonl",
        source="jsonl",
        path=str(good),
        instruction_field="q",
        response_field="a",
        template="Q: {instruction}\nA:",
        val_fraction=0.1,
        test_fraction=0.1,
    )
    out = tmp_path / "prepared"
    manifest = prepare(cfg, tiny_tokenizer, 0, out)
    assert manifest["splits"]["train"]["rows"] == 8 and manifest["source"]["sha256"]
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "x", "a": "y"}\nnot json\n')
    cfg.path = str(bad)
    with pytest.raises(PipelineError, match=r"bad\.jsonl:2"):
        prepare(cfg, tiny_tokenizer, 0, out)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "prepared"]
