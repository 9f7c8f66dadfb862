"""What 4-bit quantization does to the frozen base, layer by layer: NF4 and FP4, with and without
double quantization, measured on the saved bf16 weights before any forward pass (bitsandbytes
repacks weights for its CPU kernels on the first inference; nothing here runs one).

Per layer: relative MSE ||W - Q(W)||^2 / ||W||^2, SQNR in dB, max |error|, and the bits per
parameter the packed weights and their quantization constants really take, against the theory:
4 + 32/64 = 4.5 without double quantization, 4 + 8/64 + 32/(64*256) = 4.127 with it (block 64).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qlora_pipeline.files import atomic_dir, write_json
from qlora_pipeline.runtime import log

BLOCKSIZE = 64  # transformers' bnb_4bit blocksize; double quantization nests 256 of its constants
VARIANTS = (("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False))
THEORY_BITS = {True: 4 + 8 / BLOCKSIZE + 32 / (BLOCKSIZE * 256), False: 4 + 32 / BLOCKSIZE}


def variant_name(quant_type: str, double_quant: bool) -> str:
    return f"{quant_type}{'+dq' if double_quant else ''}"


def _bits(tensor: Any) -> int:
    return int(tensor.numel() * tensor.element_size() * 8)


def storage_bits(packed: Any, state: Any) -> int:
    """Bits the quantized weight takes: packed 4-bit codes, its absmax per block and, with double
    quantization, the absmax and offset of the 8-bit absmax (the 16-entry code book is shared)."""
    bits = _bits(packed) + _bits(state.absmax)
    if state.nested:
        bits += _bits(state.state2.absmax) + 32  # the fp32 offset
    return bits


def layer_error(weight: Any, quant_type: str, double_quant: bool) -> dict[str, float]:
    """Quantize one weight as QLoRA loads it and measure the error of the round trip."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        weight, blocksize=BLOCKSIZE, quant_type=quant_type, compress_statistics=double_quant
    )
    w = weight.float()
    err = w - bnbf.dequantize_4bit(packed, state).float()
    power, noise = float(w.pow(2).sum()), float(err.pow(2).sum())
    return {
        "rel_mse": noise / power,
        "sqnr_db": 10 * math.log10(power / noise) if noise > 0 else math.inf,
        "max_abs": float(err.abs().max()),
        "bits_per_param": storage_bits(packed, state) / weight.numel(),
        "params": int(weight.numel()),
    }


def quantized_weights(base_dir: Path, skip_modules: list[str], dtype: str) -> dict[str, Any]:
    """The weights QLoRA quantizes: every linear layer of the model but `skip_modules`, read from
    the safetensors files (the model is built on the meta device only to name its layers) and
    cast to `dtype`, the dtype the loader hands bitsandbytes (float32 with pinned CPU kernels:
    an exact upcast of bf16, but the quantization constants then round differently)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    names = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in skip_modules
    }
    weights = {}
    for path in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle has no __iter__)
                if key in names:
                    weights[key] = f.get_tensor(key).to(getattr(torch, dtype))
    return dict(sorted(weights.items()))


def summarize(layers: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per variant over all layers: parameter-weighted relative MSE and bits per parameter, the
    SQNR of that MSE, the largest error, and the theory's bits."""
    out = {}
    for quant_type, dq in VARIANTS:
        v = variant_name(quant_type, dq)
        rows = [layer[v] for layer in layers.values()]
        n = sum(r["params"] for r in rows)
        rel = sum(r["rel_mse"] * r["params"] for r in rows) / n
        out[v] = {
            "rel_mse": rel,
            "sqnr_db": -10 * math.log10(rel),
            "max_abs": max(r["max_abs"] for r in rows),
            "bits_per_param": sum(r["bits_per_param"] * r["params"] for r in rows) / n,
            "theory_bits_per_param": THEORY_BITS[dq],
            "params": n,
        }
    return out


def quant_report(
    base_dir: str | Path, configured: tuple[str, bool], skip: list[str], dtype: str
) -> dict:
    """Every variant on every quantized layer of the base (weights in `dtype`), the summary, and
    the layers the configured variant hurts most (highest relative MSE)."""
    weights = quantized_weights(Path(base_dir), skip, dtype)
    layers = {
        name.removesuffix(".weight"): {
            variant_name(q, dq): layer_error(w, q, dq) for q, dq in VARIANTS
        }
        for name, w in weights.items()
    }
    mine = variant_name(*configured)
    worst = sorted(layers, key=lambda name: -layers[name][mine]["rel_mse"])[:5]
    return {
        "blocksize": BLOCKSIZE,
        "weights_dtype": dtype,
        "configured": mine,
        "summary": summarize(layers),
        "worst_layers": [{"layer": name, **layers[name][mine]} for name in worst],
        "layers": layers,
    }


def write_quant_report(
    base_dir: str | Path,
    configured: tuple[str, bool],
    skip: list[str],
    dtype: str,
    out_dir: str | Path,
) -> dict:
    """The quant-report stage: `quantization.json` in `out_dir` (written atomically)."""
    report = quant_report(base_dir, configured, skip, dtype)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "quantization.json", report)
    s = report["summary"][report["configured"]]
    log.info(
        "quant-report: %s over %d layers: %.3f bits/param (theory %.3f), SQNR %.1f dB -> %s",
        report["configured"],
        len(report["layers"]),
        s["bits_per_param"],
        s["theory_bits_per_param"],
        s["sqnr_db"],
        out_dir,
    )
    return report
