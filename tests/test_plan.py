"""The memory planner against measured footprints of real (tiny) models, and a known model size."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from conftest import ROOT, conf_default, copy_project, run_cli

from qlora_pipeline.modeling.load import attach_lora, load_base
from qlora_pipeline.modeling.plan import GIB, KNOWN, Recipe, estimate, plan_table, recipe

LLAMA_32_1B = KNOWN["llama-3.2-1b"]  # meta-llama/Llama-3.2-1B config.json (the shape fields)


# The QLoRA paper's Guanaco recipe (artidoro/qlora scripts/finetune_guanaco_{7,13,33,65}b.sh): NF4 +
# double quantization, bf16, LoRA r=64 on all linear layers with dropout 0.05 and cast to bf16
# (qlora.py), embeddings and lm_head bf16, batch 4 of at most 16 + 512 tokens, gradient
# checkpointing, paged AdamW 32-bit.
PAPER = Recipe(
    seq_len=528,
    batch=4,
    r=64,
    dropout=0.05,
    adapter_bytes=2,
    other_bytes=2,
    checkpointing=True,
    optimizer="paged_adamw_32bit",
)


def test_parameter_count_of_a_known_model():
    est = estimate(LLAMA_32_1B, Recipe(seq_len=2048, batch=1, quantized=False))
    assert est["params"] == pytest.approx(1.236e9, rel=0.01)
    assert estimate(KNOWN["llama-65b"], PAPER)["params"] == pytest.approx(65.2e9, rel=0.01)


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
    est = estimate(config, recipe(tiny_cfg.methods[method], tiny_cfg.train, 32, 4))
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


def test_the_configured_targets_quantization_and_dtypes_are_what_is_planned(tiny_cfg):
    """Fewer targets, no double quantization, a bf16 adapter: each moves its own line."""
    lora = dataclasses.replace(tiny_cfg.train.lora, target_modules=["q_proj", "v_proj"])
    train = dataclasses.replace(tiny_cfg.train, lora=lora)
    q = tiny_cfg.methods["qlora"]
    plain = dataclasses.replace(
        q, quantization=dataclasses.replace(q.quantization, double_quant=False)
    )
    full = estimate(LLAMA_32_1B, recipe(q, tiny_cfg.train, 512, 1))
    two = estimate(LLAMA_32_1B, recipe(q, train, 512, 1))
    shape = LLAMA_32_1B
    h, kv = shape["hidden_size"], shape["num_key_value_heads"] * shape["head_dim"]
    assert two["adapter_params"] == 16 * tiny_cfg.train.lora.r * ((h + h) + (h + kv))
    assert two["adapter_params"] < full["adapter_params"]
    no_dq = estimate(LLAMA_32_1B, recipe(plain, tiny_cfg.train, 512, 1))
    linears = 16 * (2 * h * h + 2 * h * kv + 3 * h * shape["intermediate_size"])
    bits = lambda e: e["linear_weights"] * 8 / linears  # noqa: E731
    assert bits(full) == pytest.approx(4.127, abs=0.001)  # NF4 + DQ, blocks of 64 and 256
    assert bits(no_dq) == pytest.approx(4.5, abs=0.001)
    bf16 = estimate(LLAMA_32_1B, recipe(q, tiny_cfg.train, 512, 1, adapter_bytes=2))
    assert bf16["adapter"] == full["adapter"] / 2 and bf16["optimizer"] == full["optimizer"]


@pytest.mark.parametrize(
    ("model", "gpu", "expected"),
    [
        ("llama-7b", 24, "fits"),
        ("llama-13b", 24, "fits"),
        ("llama-33b", 24, "fits with paging"),  # the paper: 33B on a 24 GB consumer GPU
        ("llama-65b", 48, "fits with paging"),  # the paper's headline: 65B on one 48 GB GPU
        ("llama-65b", 40, "does not fit"),
    ],
)
def test_the_papers_recipes_fit_the_gpus_the_paper_trained_them_on(model, gpu, expected):
    _, numbers = plan_table(KNOWN[model], {"qlora": PAPER}, gpu)
    q = numbers["qlora"]
    assert q["verdict"] == expected
    if expected == "fits with paging":
        assert 0 < q["paged"] < q["optimizer"]  # some of the optimizer state sits in CPU RAM
        assert q["peak_worst"] - q["optimizer"] <= q["budget"] < q["peak_worst"]


def test_paging_needs_a_paged_optimizer_and_lora_needs_the_4_bit_base():
    torch_adam = dataclasses.replace(PAPER, optimizer="adamw_torch")
    bf16_lora = dataclasses.replace(PAPER, quantized=False)
    _, numbers = plan_table(KNOWN["llama-65b"], {"qlora": torch_adam, "lora": bf16_lora}, 48)
    assert numbers["qlora"]["verdict"] == numbers["lora"]["verdict"] == "does not fit"
    # the 65B base in bf16 alone is over 120 GiB
    assert numbers["lora"]["linear_weights"] > 120 * GIB


def test_typical_batches_need_less_than_the_worst_case():
    est = estimate(KNOWN["llama-7b"], dataclasses.replace(PAPER, typical_len=200))
    assert est["activations_typical"] == pytest.approx(est["activations_worst"] * 200 / 528)
    assert est["peak_typical"] < est["peak_worst"]


def test_the_table_says_how_much_is_paged_and_offers_checkpointing(tmp_path):
    table, numbers = plan_table(
        KNOWN["llama-65b"],
        {"qlora": Recipe(seq_len=528, batch=4, r=64, checkpointing=False)},
        48,
    )
    paged = numbers["qlora"]["checkpointed"]["paged"] / GIB
    assert table.splitlines()[0].split() == ["GiB", "qlora"]
    assert table.splitlines()[-1] == (
        "qlora: does not fit; with gradient checkpointing: "
        f"fits with paging, {paged:.2f} GiB paged to CPU RAM"
    )


def test_plan_command_on_the_papers_65b_shape(tmp_path):
    """The issue's command: the 65B recipe on one 48 GB GPU (this pipeline's fp32 adapter)."""
    proc = run_cli(
        ROOT,
        "-m",
        "qlora_pipeline",
        "plan",
        "--model",
        "llama-65b",
        *("--seq-len", "528", "--batch", "4", "--r", "64", "--gpu-gb", "48", "--checkpointing"),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "llama-65b:"
    assert re.fullmatch(r"qlora: fits with paging, \d+\.\d\d GiB paged to CPU RAM", lines[-2])
    assert lines[-1] == "lora: does not fit"


def test_run_refuses_a_config_that_cannot_fit_the_gpu(tmp_path):
    """The OOM preflight: one line naming the keys, the planner's table, exit 2, and nothing
    started or written (params.yaml unchanged, no output, no stage record)."""
    copy_project(tmp_path)
    before = (tmp_path / "params.yaml").read_bytes()
    proc = run_cli(
        tmp_path, "-m", "qlora_pipeline", "run", "orchestration.gpu_memory_gb=0.001", "seed=3"
    )
    assert proc.returncode == 2, proc.stderr
    first, *rest = proc.stderr.splitlines()
    assert first.startswith("error: qlora/lora cannot fit the GPU: ")
    assert "orchestration.gpu_memory_gb" in first and "data.max_length" in first
    assert rest[0] == "qlora-pipeline plan, model.bootstrap:" and rest[-1].startswith(
        "lora: does not fit"
    )
    assert "Traceback" not in proc.stderr and "prefect" not in proc.stderr.lower()
    assert (tmp_path / "params.yaml").read_bytes() == before
    assert not any((tmp_path / d).exists() for d in ("models", "runs", "reports", "data/prepared"))


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_estimate_matches_a_real_size_random_model_on_gpu(tmp_path, method):
    """A real-size random-init Llama (1B shape) trained for a step on CUDA: peak memory within
    10% of the planner's checkpointed worst case."""
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
    est = estimate(LLAMA_32_1B, recipe(m, conf_default("train"), 2048, 4, checkpointing=True))
    assert torch.cuda.max_memory_allocated() == pytest.approx(est["peak_worst"], rel=0.10)
