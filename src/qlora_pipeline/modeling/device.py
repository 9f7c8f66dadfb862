"""One device policy for every model the pipeline loads (base, 4-bit base, adapters, merged
export, evaluation): each is placed on `device()` when loaded, inputs follow the model they are
fed to, and tensors compared across models meet on the host, in float32."""

from __future__ import annotations

from typing import Any


def device() -> str:
    """Where models run: the GPU when there is one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def placement(quantized: bool = False) -> dict[str, Any]:
    """`from_pretrained` arguments that load a model onto `device()`. A 4-bit model gets a device
    map everywhere (bitsandbytes quantizes while placing). An unquantized one gets one only on a
    GPU: on a CPU it loads there anyway, and loaded through a device map a LoRA arm trained about
    9% slower a step than the stock recipe, the same model and calls (benchmarks/RESULTS.md,
    bench_train)."""
    if quantized or device() != "cpu":
        return {"device_map": {"": device()}}
    return {}


def inputs_for(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` on the device of `model`'s weights (a tokenizer makes CPU tensors)."""
    return {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}


def to_host(tensor: Any) -> Any:
    """A tensor where tensors of different models are compared: the CPU, float32."""
    return tensor.detach().float().cpu()
