"""The quant-report: per-layer NF4/FP4 error of the frozen base and the bits per parameter the
4-bit weights really take, measured on the saved weights before any forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import conf_default

from qlora_pipeline.modeling.device import to_host
from qlora_pipeline.modeling.load import compute_dtype
from qlora_pipeline.modeling.quantstats import THEORY_BITS, quant_report, write_quant_report
from qlora_pipeline.reporting.document import to_markdown
from qlora_pipeline.reporting.quantization import quantization_blocks

LOADED = compute_dtype("bfloat16")  # what the loader hands bitsandbytes (fp32 on pinned CPUs)


@pytest.fixture(scope="module")
def report(tiny_base):
    return quant_report(tiny_base, ("nf4", True), ["lm_head"], LOADED)


def test_every_quantized_layer_is_measured_in_every_variant(report):
    # 2 decoder layers x (q, k, v, o, gate, up, down); lm_head is skipped, as QLoRA skips it
    assert len(report["layers"]) == 14 and not any("lm_head" in n for n in report["layers"])
    assert all(set(v) == {"nf4+dq", "nf4", "fp4+dq", "fp4"} for v in report["layers"].values())
    assert {True: pytest.approx(4.127, abs=5e-4), False: 4.5} == THEORY_BITS
    s = report["summary"]
    assert s["nf4"]["bits_per_param"] == s["fp4"]["bits_per_param"] == 4.5  # 32-bit absmax / 64
    # double quantization: 8-bit absmax and one fp32 constant per 256 blocks (a partial last
    # group of blocks costs a little more in layers this small)
    assert 4.127 <= s["nf4+dq"]["bits_per_param"] < 4.135
    # NF4's levels suit normally distributed weights better than FP4's (the QLoRA paper); double
    # quantization hardly moves the error
    assert s["nf4"]["rel_mse"] < 0.8 * s["fp4"]["rel_mse"]
    assert s["nf4+dq"]["rel_mse"] == pytest.approx(s["nf4"]["rel_mse"], rel=0.05)
    worst = [w["rel_mse"] for w in report["worst_layers"]]
    assert worst == sorted(worst, reverse=True) and worst[0] == max(
        layer["nf4+dq"]["rel_mse"] for layer in report["layers"].values()
    )


def test_the_measured_error_is_what_the_qlora_loader_quantizes(report, tiny_base):
    """The 4-bit base as training loads it (transformers + bitsandbytes), dequantized: its error
    against the saved weights is the report's, layer for layer."""
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    saved = load_file(tiny_base / "model.safetensors")
    from qlora_pipeline.modeling.load import load_base

    model = load_base(tiny_base, conf_default("methods.qlora"))
    for name, module in model.named_modules():
        if type(module).__name__ != "Linear4bit":
            continue
        w = saved[f"{name}.weight"].float()
        back = to_host(bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state))
        rel = float((w - back).pow(2).sum() / w.pow(2).sum())
        assert rel == pytest.approx(report["layers"][name]["nf4+dq"]["rel_mse"], rel=1e-6), name


def test_the_stage_writes_its_figures_and_the_report_shows_them(tiny_base, tmp_path):
    written = write_quant_report(tiny_base, ("fp4", False), ["lm_head"], LOADED, tmp_path / "q")
    assert written["configured"] == "fp4" and (tmp_path / "q/quantization.json").is_file()
    text = to_markdown(quantization_blocks(tmp_path / "q"))
    assert (
        "## Quantization of the frozen base" in text and "| **fp4** (configured) | 4.500 |" in text
    )
    assert "layers fp4 hurts most" in text and quantization_blocks(tmp_path / "none") == []
    assert torch.isfinite(torch.tensor(written["summary"]["fp4"]["sqnr_db"]))
