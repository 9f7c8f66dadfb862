"""A pretrained base is checked when its files first exist (the bootstrap stage): each problem is
one line naming the model and what is expected, and nothing is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import conf_default

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.modeling import checks
from qlora_pipeline.modeling.bootstrap import bootstrap
from qlora_pipeline.modeling.load import load_base


def _model_dir(tiny_base, tmp_path, name="m"):
    """A copy of the tiny base as a user's local pretrained folder (config, safetensors,
    tokenizer), without our base.json."""
    folder = tmp_path / name
    shutil.copytree(tiny_base, folder, ignore=shutil.ignore_patterns("base.json"))
    return folder


def _bootstrap(folder, tmp_path, trust=False):
    cfg = conf_default(
        "model",
        name="mine",
        source="pretrained",
        path=str(folder),
        bootstrap=None,
        trust_remote_code=trust,
    )
    return bootstrap(cfg, 0, tmp_path / "base")


def _config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_good_local_model_is_checked_and_recorded(tiny_base, tmp_path):
    info = _bootstrap(_model_dir(tiny_base, tmp_path), tmp_path)
    assert info["checked"]["model_type"] == "llama" and info["checked"]["pad_token"] is None
    assert info["checked"]["max_position_embeddings"] == 128
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == ["base.json"]


def _refused(folder, tmp_path, pattern, trust=False):
    with pytest.raises(PipelineError, match=pattern) as err:
        _bootstrap(folder, tmp_path, trust)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "base").exists()  # nothing written


def test_a_folder_without_weights(tiny_base, tmp_path):
    folder = _model_dir(tiny_base, tmp_path)
    (folder / "model.safetensors").unlink()
    _refused(folder, tmp_path, r"/m: no model weights \(\*\.safetensors\) in this folder$")


def test_pickle_only_weights_are_refused_with_how_to_convert(tiny_base, tmp_path):
    folder = _model_dir(tiny_base, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded: pickle can run code")
    _refused(
        folder,
        tmp_path,
        r"only pickle weights \(pytorch_model\.bin\), which can run code when loaded; .*"
        r"use_safetensors=False\)\.save_pretrained\(",
    )


def test_a_folder_without_config(tiny_base, tmp_path):
    folder = _model_dir(tiny_base, tmp_path)
    (folder / "config.json").unlink()
    _refused(folder, tmp_path, r"no config\.json; expected a transformers model folder$")


def test_a_model_that_needs_its_own_code_is_refused_unless_allowed(tiny_base, tmp_path):
    folder = _model_dir(tiny_base, tmp_path)
    _config(folder, model_type="acme_lm", auto_map={"AutoModelForCausalLM": "acme.AcmeLM"})
    _refused(folder, tmp_path, r"runs the model's own code \(auto_map.*model\.trust_remote_code")
    checks.check_code(json.loads((folder / "config.json").read_text()), "m", True)  # allowed


def test_a_tokenizer_with_more_tokens_than_the_embedding(tiny_base, tmp_path):
    folder = _model_dir(tiny_base, tmp_path)
    _config(folder, vocab_size=256)  # the tokenizer has 384
    _refused(folder, tmp_path, r"the tokenizer has 384 tokens but the model's embeddings have 256")


def test_no_pad_token_pads_with_eos_and_neither_is_refused(tiny_tokenizer):
    tok = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tok.pad_token = None
    assert "padding with its EOS token '</s>'" in checks.check_tokenizer(tok, 384, "m")
    tok.eos_token = None
    with pytest.raises(PipelineError, match="neither a pad token nor an EOS token"):
        checks.check_tokenizer(tok, 384, "m")


def test_a_hub_model_that_cannot_be_reached_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _refused(
        "acme/no-such-model",
        tmp_path,
        r"config key 'model\.path': 'acme/no-such-model' is not a local folder, and the hub "
        r"\(or its local cache\) has no such model at revision main",
    )


def test_shapes_the_cpu_repacking_kernel_cannot_run_are_one_line(tmp_path, monkeypatch):
    """On an AVX512-BF16 CPU with native kernels bitsandbytes repacks 4-bit weights for inference
    and asserts on shapes it cannot pack (out features not divisible by 32): found at load time,
    one line, instead of that assertion after training."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_pipeline import runtime

    assert checks.repack_problems({"a": (576, 576), "b": (100, 128), "c": (128, 99)}) == [
        "b (100x128)",
        "c (128x99)",
    ]
    config = LlamaConfig(
        vocab_size=384,
        hidden_size=128,
        intermediate_size=100,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    (tmp_path / "base.json").write_text(json.dumps({"source": "bootstrap"}))
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)  # such a CPU
    monkeypatch.setattr(runtime, "portable", lambda: False)  # native kernels
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        PipelineError, match=r"needs out features divisible by 32.*gate_proj \(100x128\)"
    ):
        load_base(tmp_path, conf_default("methods.qlora"))
    # what the check spares the user: bitsandbytes' own assertion on that layer
    from qlora_pipeline.modeling import load

    monkeypatch.setattr(load, "check_cpu_4bit", lambda model: None)
    gate = load_base(tmp_path, conf_default("methods.qlora")).model.layers[0].mlp.gate_proj
    with pytest.raises(AssertionError, match="N must be divisible by block_n"):
        _convert_weight_packed_for_cpu(gate.weight.data, gate.weight.quant_state)
