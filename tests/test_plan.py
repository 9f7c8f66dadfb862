"""The memory planner against measured footprints of real (tiny) models, and a known model size."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import conf_default

from qlora_pipeline.modeling.load import attach_lora, load_base
from qlora_pipeline.modeling.plan import estimate, plan_table

LLAMA_32_1B = {  # meta-llama/Llama-3.2-1B config.json (the shape fields)
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "tie_word_embeddings": True,
}


def test_parameter_count_of_a_known_model():
    assert estimate(LLAMA_32_1B, "lora", 2048, 1)["params"] == pytest.approx(1.236e9, rel=0.01)


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_weights_and_adapter_match_measured_tiny_footprints(
    tiny_cfg, tiny_base, method, monkeypatch
):
    """The planner models the configured dtypes (bf16 on a GPU): load as configured, which the
    native CPU mode does (pinned kernels compute in fp32); nothing runs, only footprints count."""
    from peft import prepare_model_for_kbit_training

    from qlora_pipeline.runtime import MODE_ENV

    monkeypatch.setenv(MODE_ENV, "native")

    config = json.loads((tiny_base / "config.json").read_text())
    est = estimate(config, method, 32, 4, r=tiny_cfg.train.lora.r)
    model = load_base(tiny_base, tiny_cfg.methods[method])
    assert est["weights_at_load"] == pytest.approx(model.get_memory_footprint(), rel=0.15)
    if method == "qlora":
        prepared = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        assert est["weights"] == pytest.approx(prepared.get_memory_footprint(), rel=0.15)
        assert est["weights"] > est["weights_at_load"]  # non-quantized params go to fp32
    peft_model = attach_lora(
        load_base(tiny_base, tiny_cfg.methods[method]),
        tiny_cfg.train.lora,
        tiny_cfg.methods[method],
        0,
    )
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert est["adapter_params"] == trainable
    adapter_bytes = sum(
        p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad
    )
    assert est["adapter"] == pytest.approx(adapter_bytes, rel=0.15)


def test_plan_table_says_whether_it_fits():
    table, numbers = plan_table(LLAMA_32_1B, 2048, 4, 24, 16, "paged_adamw_32bit")
    assert table.splitlines()[0].split() == ["GiB", "qlora", "lora"]
    fits = [line.split()[-2:] for line in table.splitlines() if line.startswith("fits in 24 GB")]
    assert fits == [["no", "no"], ["yes", "yes"]]  # only with gradient checkpointing
    q, lo = numbers["qlora"], numbers["lora"]
    assert q["weights"] < lo["weights"] and q["total_checkpointed"] < q["total"]
    assert q["optimizer"] == 2 * q["adapter"]  # two fp32 Adam moments per adapter weight


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_estimate_matches_a_real_size_random_model_on_gpu(tmp_path, method):
    """A real-size random-init Llama (1B shape) trained for a step on CUDA: peak memory within
    15% of the checkpointed estimate."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**LLAMA_32_1B)).to(torch.bfloat16).save_pretrained(tmp_path)
    (tmp_path / "base.json").write_text(json.dumps({"source": "bootstrap"}))
    m = conf_default(f"methods.{method}")
    lora = conf_default("train.lora")
    model = attach_lora(load_base(tmp_path, m), lora, m, 0, gradient_checkpointing=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, 128256, (4, 2048), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    est = estimate(LLAMA_32_1B, method, 2048, 4)
    total = sum(
        est[k]
        for k in (
            "weights",
            "adapter",
            "gradients",
            "optimizer",
            "logits",
            "activations_checkpointed",
        )
    )
    assert torch.cuda.max_memory_allocated() == pytest.approx(total, rel=0.15)
