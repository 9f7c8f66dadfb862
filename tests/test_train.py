"""Training: one code path, the method decides the base precision; loss goes down; adapters reload."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import adapter_dir, conf_default

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.modeling.device import inputs_for, to_host
from qlora_pipeline.modeling.load import attach_lora, load_adapted, load_base


def _linear_layers(model):
    return [m for name, m in model.named_modules() if name.endswith(("q_proj", "down_proj"))]


@pytest.mark.parametrize("kernels", ["native", "avx2"])
def test_qlora_base_is_nf4_double_quant_and_lora_base_is_bf16(
    tiny_cfg, tiny_base, kernels, monkeypatch
):
    """As configured with native kernels; with pinned CPU kernels the same bf16 values held in
    fp32 (exact), both arms alike, and bitsandbytes' CPU repacking off."""
    import bitsandbytes as bnb

    from qlora_pipeline.runtime import MODE_ENV

    monkeypatch.setenv(MODE_ENV, kernels)
    compute = torch.bfloat16 if kernels == "native" else torch.float32
    q = load_base(tiny_base, tiny_cfg.methods["qlora"])
    layers = _linear_layers(q)
    assert layers and all(isinstance(m, bnb.nn.Linear4bit) for m in layers)
    state = layers[0].weight.quant_state
    assert state.quant_type == "nf4"
    assert state.nested  # double quantization: the absmax constants are quantized too
    assert layers[0].compute_dtype == compute
    assert all(m.support_avx512bf16_for_cpu is False for m in layers) or kernels == "native"
    assert not isinstance(q.lm_head, bnb.nn.Linear4bit)  # lm_head stays unquantized

    lo = load_base(tiny_base, tiny_cfg.methods["lora"])
    assert all(type(m) is torch.nn.Linear and m.weight.dtype == compute for m in _linear_layers(lo))
    for m in _linear_layers(lo):  # the stored bf16 values, exactly
        assert torch.equal(m.weight.to(torch.bfloat16).to(compute), m.weight)
    assert q.get_memory_footprint() < lo.get_memory_footprint()


def test_lora_targets_all_linear_layers_with_configured_rank(tiny_cfg, tiny_base):
    model = attach_lora(
        load_base(tiny_base, tiny_cfg.methods["lora"]),
        tiny_cfg.train.lora,
        tiny_cfg.methods["lora"],
        seed=0,
    )
    wrapped = {name.split(".")[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    layer = next(m for _, m in model.named_modules() if hasattr(m, "lora_A"))
    assert layer.r["default"] == tiny_cfg.train.lora.r


def test_invalid_target_modules_fail_before_training(tiny_cfg, tiny_base):
    with pytest.raises(PipelineError, match=r"train\.lora\.target_modules"):
        attach_lora(
            load_base(tiny_base, tiny_cfg.methods["lora"]),
            conf_default("train.lora", target_modules=["nope_proj"]),
            tiny_cfg.methods["lora"],
            seed=0,
        )


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_training_lowers_loss_and_writes_outputs(trained, tiny_cfg, method):
    metrics, _ = trained[method]
    assert metrics["final_loss"] < 0.5 * metrics["first_loss"]
    out = adapter_dir(tiny_cfg, method)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not list(out.glob("*.bin"))
    saved = json.loads((out / "train_metrics.json").read_text())
    assert saved["optimizer"] == "paged_adamw_32bit" and saved["tokens"] > 0
    volatile = {"tokens_per_s", "train_s", "wall_s", "peak_rss_mb", "device", "date"}
    assert not volatile & set(saved)  # machine-specific figures live in the run record
    assert (out / "loss.csv").read_text().startswith("step,loss")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_both_methods_start_from_the_same_adapter_and_data(trained):
    (q, _), (lo, _) = trained["qlora"], trained["lora"]
    assert q["tokens"] == lo["tokens"] and q["trainable_params"] == lo["trainable_params"]
    assert (
        abs(q["first_loss"] - lo["first_loss"]) < 0.1 * lo["first_loss"]
    )  # differ by quantization only


def _logits(model, tokenizer):
    """Logits as the stages compute them (pinned CPU kernels: fp32 compute, no autocast)."""
    batch = tokenizer(
        ["<s>Q: sort c a b\nA:", "<s>Q: reverse x y z\nA:"],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    with torch.no_grad():  # on the model's device, compared on the host (a GPU machine too)
        return to_host(model(**inputs_for(model, batch)).logits)


def test_saved_lora_adapter_reloads_with_identical_logits(
    trained, tiny_cfg, tiny_base, tiny_tokenizer
):
    _, model = trained["lora"]
    model.eval()
    reloaded = load_adapted(tiny_base, tiny_cfg.methods["lora"], adapter_dir(tiny_cfg, "lora"))
    torch.testing.assert_close(
        _logits(reloaded, tiny_tokenizer), _logits(model, tiny_tokenizer), rtol=0, atol=1e-5
    )


def test_saved_qlora_adapter_reloads_deterministically_and_close_to_training(
    trained, tiny_cfg, tiny_base, tiny_tokenizer
):
    _, model = trained["qlora"]
    model.eval()
    path = adapter_dir(tiny_cfg, "qlora")
    first = _logits(load_adapted(tiny_base, tiny_cfg.methods["qlora"], path), tiny_tokenizer)
    second = _logits(load_adapted(tiny_base, tiny_cfg.methods["qlora"], path), tiny_tokenizer)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # Training upcasts norms/embeddings to fp32 (prepare_model_for_kbit_training); the shipped
    # model keeps them in bf16, so logits agree to bf16 precision, not bitwise.
    in_training = _logits(model, tiny_tokenizer)
    assert (first - in_training).abs().max() < 0.15 * in_training.abs().max()
    assert (first.argmax(-1) == in_training.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("upcast", [True, False])
def test_the_arms_differ_only_in_the_quantized_weights(tiny_cfg, tiny_base, upcast, monkeypatch):
    """Read off the loaded modules (native kernels: bf16 as configured): with one upcast policy
    for both arms, every part but the linear weights has the same dtype."""
    from qlora_pipeline.modeling.load import dtype_summary
    from qlora_pipeline.runtime import MODE_ENV

    monkeypatch.setenv(MODE_ENV, "native")
    loaded = {
        m: dtype_summary(
            attach_lora(
                load_base(tiny_base, tiny_cfg.methods[m]),
                tiny_cfg.train.lora,
                tiny_cfg.methods[m],
                0,
                upcast=upcast,
            )
        )
        for m in ("qlora", "lora")
    }
    differs = {p for p in loaded["qlora"] if loaded["qlora"][p] != loaded["lora"].get(p)}
    assert differs == {"linear weights"}
    assert loaded["qlora"]["linear weights"] == "4-bit nf4"
    assert loaded["lora"]["linear weights"] == "bfloat16"
    expected = "float32" if upcast else "bfloat16"
    assert loaded["lora"]["embeddings"] == loaded["lora"]["norms"] == expected
    assert loaded["lora"]["lm_head"] == expected
