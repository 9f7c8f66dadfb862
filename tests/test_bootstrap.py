"""The offline base: tokenizer, Llama config and determinism."""

from __future__ import annotations

import json

from conftest import conf_default

from qlora_pipeline.files import sha256_file
from qlora_pipeline.modeling.bootstrap import bootstrap, corpus_lines, pack


def test_corpus_is_deterministic_and_states_the_skills():
    lines = corpus_lines(400, seed=5)
    assert lines == corpus_lines(400, seed=5) and lines != corpus_lines(400, seed=6)
    assert all(line.startswith(" ") for line in lines)
    for phrase in ("backwards is", "in caps is", "in order is", "plus"):
        assert any(phrase in line for line in lines)


def test_pack_cuts_fixed_blocks():
    assert pack([[1, 2, 3], [4, 5], [6, 7, 8]], 3) == [[1, 2, 3], [4, 5, 6]]


def test_tokenizer_keeps_letters_and_digits_single_tokens(tiny_tokenizer):
    for text in (" k d a", " K D A", " 1 5"):
        assert len(tiny_tokenizer.encode(text, add_special_tokens=False)) == len(text.split())
    assert tiny_tokenizer.encode("<s>", add_special_tokens=False) == [tiny_tokenizer.bos_token_id]


def test_tiny_base_is_a_llama_with_block_aligned_dims(tiny_base, tiny_cfg):
    config = json.loads((tiny_base / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["hidden_size"] % 128 == 0 and config["intermediate_size"] % 128 == 0
    assert (tiny_base / "model.safetensors").is_file()
    assert not list(tiny_base.glob("*.bin")) and not list(tiny_base.glob("*.pt"))
    info = json.loads((tiny_base / "base.json").read_text())
    assert info["final_loss"] < 2.0  # pre-training learned the corpus (uniform would be ~5.9)


def test_bootstrap_is_deterministic(tmp_path):
    cfg = conf_default(
        "model",
        name="t",
        bootstrap=conf_default(
            "model.bootstrap",
            vocab_size=384,
            hidden_size=128,
            intermediate_size=128,
            num_layers=1,
            num_heads=2,
            num_kv_heads=2,
            corpus_lines=600,
            steps=5,
            batch_size=4,
            seq_len=16,
        ),
    )
    bootstrap(cfg, 11, tmp_path / "a")
    bootstrap(cfg, 11, tmp_path / "b")
    assert sha256_file(tmp_path / "a/model.safetensors") == sha256_file(
        tmp_path / "b/model.safetensors"
    )
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (
        tmp_path / "b/tokenizer.json"
    ).read_bytes()
