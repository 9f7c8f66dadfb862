"""Memory planner: will this fine-tune fit on that GPU, before anything is loaded?

From a model's `config.json` (Llama-style decoder: Llama, Mistral, Qwen2, ...), estimate the
memory of one training process: base weights (NF4 4-bit + double-quant constants for QLoRA, the
base dtype for LoRA), the LoRA adapter with its gradients and optimizer state, activations with and
without gradient checkpointing, and the logits. Estimates, not measurements: the test checks the
weights and adapter against measured footprints of real (tiny) models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BLOCK = 64  # bitsandbytes 4-bit block size: one absmax per 64 weights
DQ_BLOCK = 256  # double quantization: the absmax values quantized to 8 bits in blocks of 256
GIB = 2**30
OPTIMIZER_BYTES = {"adamw_torch": 8.0, "paged_adamw_32bit": 8.0, "paged_adamw_8bit": 2.0}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Shape:
        config = {**config, **config.get("text_config", {})}
        heads = config["num_attention_heads"]
        return cls(
            vocab=config["vocab_size"],
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            tied=bool(config.get("tie_word_embeddings", False)),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        h, q, kv, i = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def params(self) -> dict[str, int]:
        linear = self.layers * sum(a * b for a, b in self.linear_shapes().values())
        return {
            "linear": linear,
            "embed": self.vocab * self.hidden,
            "lm_head": 0 if self.tied else self.vocab * self.hidden,
            "norms": (2 * self.layers + 1) * self.hidden,
        }


def four_bit_bytes(n: int, double_quant: bool) -> float:
    """Bytes of `n` weights in bitsandbytes 4-bit: packed nibbles plus the block constants."""
    blocks = n / BLOCK
    if double_quant:  # 8-bit absmax per block + fp32 scale per 256 absmax + the fp32 offset
        return n / 2 + blocks + blocks / DQ_BLOCK * 4 + 4
    return n / 2 + blocks * 4


def adapter_params(shape: Shape, r: int, targets: tuple[str, ...] = LINEARS) -> int:
    return shape.layers * sum(
        r * (a + b) for name, (a, b) in shape.linear_shapes().items() if name in targets
    )


def estimate(
    config: dict[str, Any],
    method: str,
    seq_len: int,
    batch: int,
    r: int = 16,
    optimizer: str = "paged_adamw_32bit",
    double_quant: bool = True,
    base_bytes: int = 2,
) -> dict[str, float]:
    """Bytes per component for one training process. `method` is qlora or lora."""
    shape = Shape.from_config(config)
    p = shape.params()
    other = p["embed"] + p["lm_head"] + p["norms"]
    if method == "qlora":
        load = four_bit_bytes(p["linear"], double_quant) + other * base_bytes
        # prepare_model_for_kbit_training upcasts every non-quantized parameter to fp32
        weights = four_bit_bytes(p["linear"], double_quant) + other * 4
    else:
        load = weights = (p["linear"] + other) * base_bytes
    n_adapter = adapter_params(shape, r)
    tokens = seq_len * batch
    h, i = shape.hidden, shape.intermediate
    qkv = (shape.heads + 2 * shape.kv_heads) * shape.head_dim
    # bf16 tensors kept for backward per token and layer (SDPA attention: no seq^2 term):
    # norms' inputs, q/k/v, attention output, MLP inputs, gate/up/activation, down input, residuals.
    per_layer_token = 2 * (6 * h + qkv + shape.heads * shape.head_dim + 4 * i)
    activations = tokens * shape.layers * per_layer_token
    checkpointed = tokens * shape.layers * 2 * h + tokens * per_layer_token
    logits = tokens * shape.vocab * (2 + 4 + 4)  # bf16 logits, fp32 upcast for the loss, its grad
    return {
        "params": float(sum(p.values())),
        "weights_at_load": load,
        "weights": weights,
        "adapter_params": float(n_adapter),
        "adapter": n_adapter * 4.0,
        "gradients": n_adapter * 4.0,
        "optimizer": n_adapter * OPTIMIZER_BYTES[optimizer],
        "activations": float(activations),
        "activations_checkpointed": float(checkpointed),
        "logits": float(logits),
    }


def plan_table(
    config: dict[str, Any],
    seq_len: int,
    batch: int,
    gpu_gb: float,
    r: int,
    optimizer: str,
    methods: tuple[str, ...] = ("qlora", "lora"),
) -> tuple[str, dict[str, dict[str, float]]]:
    """A printable table (GiB per component, per method, with and without checkpointing) and the
    numbers behind it. "fits" allows 10% for the CUDA context and allocator fragmentation."""
    results = {m: estimate(config, m, seq_len, batch, r, optimizer) for m in methods}
    totals = {}
    for m, e in results.items():
        fixed = e["weights"] + e["adapter"] + e["gradients"] + e["optimizer"] + e["logits"]
        totals[m] = (fixed + e["activations"], fixed + e["activations_checkpointed"])
    unit, div = ("GiB", GIB) if max(t[0] for t in totals.values()) >= GIB else ("MiB", 2**20)
    rows = [
        ("parameters (M)", "params", 1e6),
        ("base weights in training", "weights", div),
        ("LoRA adapter (fp32)", "adapter", div),
        ("adapter gradients", "gradients", div),
        (f"optimizer state ({optimizer})", "optimizer", div),
        ("activations", "activations", div),
        ("activations, checkpointed", "activations_checkpointed", div),
        ("logits + loss", "logits", div),
    ]
    lines = [f"{unit:<34}" + "".join(f"{m:>12}" for m in methods)]
    lines += [
        f"{name:<34}" + "".join(f"{results[m][key] / scale:>12.3f}" for m in methods)
        for name, key, scale in rows
    ]
    for k, label in ((0, "total"), (1, "total, checkpointed")):
        lines.append(f"{label:<34}" + "".join(f"{totals[m][k] / div:>12.3f}" for m in methods))
        fits = ["yes" if totals[m][k] * 1.1 <= gpu_gb * GIB else "no" for m in methods]
        lines.append(f"{f'fits in {gpu_gb:g} GB (+10%)':<34}" + "".join(f"{f:>12}" for f in fits))
    for m in methods:
        results[m]["total"], results[m]["total_checkpointed"] = totals[m]
    return "\n".join(lines), results


def load_model_config(model: str | None, cfg: Any) -> tuple[dict[str, Any], str]:
    """The config.json of `model` (folder, file or hub id), or of the configured base model."""
    import json
    from pathlib import Path

    from qlora_pipeline.errors import PipelineError

    if model is None:
        source = cfg.model.path if cfg.model.source == "pretrained" else cfg.paths.base
    else:
        source = model
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    if model is None and cfg.model.source == "bootstrap":
        raise PipelineError(f"{path}: not found; run the bootstrap stage first, or pass --model")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source).to_dict(), source
    except OSError as e:
        raise PipelineError(
            f"model '{source}': no config.json here and not reachable on the hub "
            f"({str(e).splitlines()[0]})"
        ) from None
