"""Memory planner: will this fine-tune fit on that GPU, before anything is loaded?

From a model's `config.json` (Llama-style decoder: Llama, Mistral, Qwen2, ...) and a `Recipe` (the
configured arm, or the command line's), estimate the GPU memory of one training process: the
linears (4-bit with or without double quantization, or the base dtype), the non-quantized
weights in their training dtype, the LoRA adapter on its targets in its dtype, gradients and
optimizer state, activations (checkpointed or not) and logits at the worst-case length and at a
typical one. A paged optimizer's state can be evicted to CPU RAM under pressure: "fits with
paging" says how much. `run` refuses a config that cannot fit (`preflight`). Estimates, not
measurements: tests check the weights and adapter against measured footprints of real (tiny)
models, and the verdicts against the QLoRA paper's own recipes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

BLOCK = 64  # bitsandbytes 4-bit block size: one absmax per 64 weights
DQ_BLOCK = 256  # double quantization: the absmax values quantized to 8 bits in blocks of 256
GIB = 2**30
HEADROOM = 1.1  # 10% of the GPU for the CUDA context and the allocator's fragmentation
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BYTES_NAME = {4: "fp32", 2: "bf16"}
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


@dataclass(frozen=True)
class Recipe:
    """What one fine-tuning process keeps on the GPU: the shape of its batches and the dtypes,
    quantization, adapter and optimizer it trains with (`recipe` reads them from the config)."""

    seq_len: int  # the worst case: every row of a batch at this length (the peak)
    batch: int
    typical_len: int | None = None  # a batch of typical rows (`group_by_length` batches)
    r: int = 16
    targets: tuple[str, ...] = LINEARS
    quantized: bool = True  # 4-bit linears (QLoRA) or linears in the base dtype (LoRA)
    double_quant: bool = True
    base_bytes: int = 2  # the base dtype: LoRA's linears, and what the layers compute in
    other_bytes: int = 4  # embeddings, norms, lm_head in training: fp32 when upcast
    adapter_bytes: int = 4  # LoRA weights and their gradients: fp32 (peft's default) or bf16
    dropout: float = 0.0  # LoRA dropout keeps a dropped copy of each target's input
    optimizer: str = "paged_adamw_32bit"
    checkpointing: bool = True

    @property
    def paged(self) -> bool:
        """A paged optimizer keeps its state in unified memory: evicted to CPU RAM under GPU
        memory pressure (the long batches' activations), paged back in for the step."""
        return self.optimizer.startswith("paged_")


def recipe(method: Any, train: Any, seq_len: int, batch: int, **changes: Any) -> Recipe:
    """The recipe a configured arm (`methods.<name>`, `train`) trains with; `changes` on top
    (the command line's --r, --optimizer, ...)."""
    q = method.quantization
    targets = train.lora.target_modules
    base = DTYPE_BYTES[method.base_dtype]
    fields: dict[str, Any] = {
        "seq_len": seq_len,
        "batch": batch,
        "r": train.lora.r,
        "targets": LINEARS
        if targets == "all-linear"
        else tuple(t for t in LINEARS if t in targets),
        "quantized": q is not None,
        "double_quant": bool(q and q.double_quant),
        "base_bytes": DTYPE_BYTES[q.compute_dtype] if q else base,
        "other_bytes": 4 if train.upcast_non_quantized else base,
        "dropout": train.lora.dropout,
        "optimizer": method.optimizer,
        "checkpointing": train.gradient_checkpointing,
    }
    return Recipe(**{**fields, **{k: v for k, v in changes.items() if v is not None}})


def estimate(config: dict[str, Any], rec: Recipe) -> dict[str, float]:
    """Bytes per component of one training process, at the worst-case length and (when the
    recipe has one) the typical length."""
    shape = Shape.from_config(config)
    p = shape.params()
    other = p["embed"] + p["lm_head"] + p["norms"]
    if rec.quantized:
        linear = four_bit_bytes(p["linear"], rec.double_quant)
    else:
        linear = p["linear"] * rec.base_bytes
    n_adapter = adapter_params(shape, rec.r, rec.targets)
    adapter = n_adapter * rec.adapter_bytes
    out = {
        "params": float(sum(p.values())),
        "weights_at_load": linear + other * rec.base_bytes,
        "linear_weights": linear,
        "other_weights": float(other * rec.other_bytes),
        "weights": linear + other * rec.other_bytes,
        "adapter_params": float(n_adapter),
        "adapter": float(adapter),
        "gradients": float(adapter),
        "optimizer": n_adapter * OPTIMIZER_BYTES[rec.optimizer],
    }
    fixed = out["weights"] + out["adapter"] + out["gradients"] + out["optimizer"]
    for key, length in (("worst", rec.seq_len), ("typical", rec.typical_len)):
        if length is None:
            continue
        out[f"activations_{key}"] = activation_bytes(shape, rec, length * rec.batch)
        # the logits in lm_head's dtype, their fp32 upcast for the loss, and its gradient
        out[f"logits_{key}"] = float(length * rec.batch * shape.vocab * (rec.other_bytes + 8))
        out[f"peak_{key}"] = fixed + out[f"activations_{key}"] + out[f"logits_{key}"]
    return out


def activation_bytes(shape: Shape, rec: Recipe, tokens: int) -> float:
    """What the backward pass needs kept, for `tokens` tokens (SDPA attention: no seq² term).

    Per layer and token, in the compute dtype: the norms' inputs, q/k/v, the attention output,
    the MLP's inputs, gate/up/activation, the down projection's input and the residuals; each
    target's r-wide LoRA intermediate, and its dropped input when LoRA dropout is on. With
    gradient checkpointing only each layer's input is kept, plus one layer recomputed."""
    h, i = shape.hidden, shape.intermediate
    qkv = (shape.heads + 2 * shape.kv_heads) * shape.head_dim
    linear = shape.linear_shapes()
    per_token = 6 * h + qkv + shape.heads * shape.head_dim + 4 * i + rec.r * len(rec.targets)
    if rec.dropout > 0:
        per_token += sum(linear[t][0] for t in rec.targets)
    per_token *= rec.base_bytes
    if rec.checkpointing:
        return float(tokens * (shape.layers * h * rec.base_bytes + per_token))
    return float(tokens * shape.layers * per_token)


def verdict(numbers: dict[str, float], rec: Recipe, gpu_gib: float) -> tuple[str, float]:
    """Does the worst case fit `gpu_gib` less 10% (the CUDA context, the allocator's
    fragmentation)? "fits"; with a paged optimizer, "fits with paging" when the peak fits once
    as much optimizer state as needed is evicted to CPU RAM (the bytes paged, second); else
    "does not fit"."""
    budget = gpu_gib * GIB / HEADROOM
    over = numbers["peak_worst"] - budget
    if over <= 0:
        return "fits", 0.0
    if rec.paged and over <= numbers["optimizer"]:
        return "fits with paging", over
    return "does not fit", over


def plan_table(
    config: dict[str, Any], recipes: dict[str, Recipe], gpu_gib: float
) -> tuple[str, dict[str, dict[str, Any]]]:
    """A printable table (GiB per component, one column per method) ending in each method's
    verdict, and the numbers behind it (with `verdict` and `paged`). A recipe without gradient
    checkpointing also gets the checkpointed peak and verdict (`checkpointed`), as a way out."""
    results: dict[str, dict[str, Any]] = {m: estimate(config, rec) for m, rec in recipes.items()}
    first = next(iter(recipes.values()))
    big = max(e["peak_worst"] for e in results.values()) >= GIB
    unit, div = ("GiB", GIB) if big else ("MiB", 2**20)

    def named(label: Callable[[Recipe], str]) -> str:
        names = [label(rec) for rec in recipes.values()]
        return names[0] if len(set(names)) == 1 else "/".join(names)

    worst = f"{first.batch} x {first.seq_len} tokens"
    mode = "checkpointed" if first.checkpointing else "no checkpointing"
    rows: list[tuple[str, str]] = [
        (f"linear weights ({named(quant_name)})", "linear_weights"),
        (
            f"embeddings, norms, lm_head ({named(lambda r: BYTES_NAME[r.other_bytes])})",
            "other_weights",
        ),
        (f"LoRA adapter, r={first.r} ({named(lambda r: BYTES_NAME[r.adapter_bytes])})", "adapter"),
        ("adapter gradients", "gradients"),
        (f"optimizer state ({named(lambda r: r.optimizer)})", "optimizer"),
        (f"activations, {worst} ({mode})", "activations_worst"),
        (f"logits + loss, {worst}", "logits_worst"),
        ("peak, worst case", "peak_worst"),
    ]
    if first.typical_len is not None:
        typical = f"{first.batch} x {first.typical_len} tokens"
        rows += [
            (f"activations, {typical} (typical)", "activations_typical"),
            ("peak, typical batch", "peak_typical"),
        ]
    if not first.checkpointing:
        for m, rec in recipes.items():
            results[m]["checkpointed"] = estimate(config, replace(rec, checkpointing=True))
        rows.append(("peak, worst case, checkpointed", "checkpointed.peak_worst"))
    rows.append((f"GPU {gpu_gib:g} GiB, less 10%", "budget"))
    for m, rec in recipes.items():
        results[m]["budget"] = gpu_gib * GIB / HEADROOM
        results[m]["verdict"], results[m]["paged"] = verdict(results[m], rec, gpu_gib)
        if "checkpointed" in results[m]:
            ckpt = results[m]["checkpointed"]
            ckpt["verdict"], ckpt["paged"] = verdict(ckpt, rec, gpu_gib)

    def value(m: str, key: str) -> float:
        numbers = results[m]
        for part in key.split("."):
            numbers = numbers[part]
        return float(numbers) / div  # type: ignore[arg-type]

    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{unit:<{width}}" + "".join(f"{m:>14}" for m in recipes)]
    lines.append(
        f"{'parameters (M)':<{width}}"
        + "".join(f"{results[m]['params'] / 1e6:>14.1f}" for m in recipes)
    )
    lines += [
        f"{name:<{width}}" + "".join(f"{value(m, key):>14.3f}" for m in recipes)
        for name, key in rows
    ]
    for m in recipes:
        line = f"{m}: {said(results[m])}"
        if "checkpointed" in results[m] and results[m]["verdict"] == "does not fit":
            line += f"; with gradient checkpointing: {said(results[m]['checkpointed'])}"
        lines.append(line)
    return "\n".join(lines), results


def said(numbers: dict[str, Any]) -> str:
    if numbers["verdict"] == "fits with paging":
        return f"fits with paging, {numbers['paged'] / GIB:.2f} GiB paged to CPU RAM"
    return str(numbers["verdict"])


def quant_name(rec: Recipe) -> str:
    if not rec.quantized:
        return BYTES_NAME[rec.base_bytes]
    return "4-bit + double quant" if rec.double_quant else "4-bit"


def _llama(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, Any]:
    return {
        "vocab_size": 32000,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
    }


# Shapes by name, so that `plan --model llama-65b` works offline: the LLaMA (1) models of the QLoRA
# paper's Guanaco recipes, and Llama-3.2-1B. The shape fields of their config.json files.
KNOWN = {
    "llama-7b": _llama(4096, 11008, 32, 32),
    "llama-13b": _llama(5120, 13824, 40, 40),
    "llama-33b": _llama(6656, 17920, 60, 52),
    "llama-65b": _llama(8192, 22016, 80, 64),
    "llama-3.2-1b": {  # meta-llama/Llama-3.2-1B
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
    },
}


def bootstrap_config(b: Any) -> dict[str, Any]:
    """The config.json shape fields of the model the bootstrap stage will build."""
    return {
        "vocab_size": b.vocab_size,
        "hidden_size": b.hidden_size,
        "intermediate_size": b.intermediate_size,
        "num_hidden_layers": b.num_layers,
        "num_attention_heads": b.num_heads,
        "num_key_value_heads": b.num_kv_heads,
        "tie_word_embeddings": False,
    }


def load_model_config(model: str | None, cfg: Any) -> tuple[dict[str, Any], str]:
    """The config.json of `model` (a name of `KNOWN`, a folder, a file or a hub id), or of the
    configured base model (the bootstrap's shape from the config before it is built)."""
    from qlora_pipeline.errors import PipelineError

    if model in KNOWN:
        return KNOWN[model], model
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
        return bootstrap_config(cfg.model.bootstrap), "model.bootstrap"
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source).to_dict(), source
    except OSError as e:
        raise PipelineError(
            f"model '{source}': no config.json here and not reachable on the hub "
            f"({str(e).splitlines()[0]})"
        ) from None


def configured_recipes(
    cfg: Any, seq_len: int | None = None, batch: int | None = None, **changes: Any
) -> dict[str, Recipe]:
    """Each configured arm's recipe: rows of `data.max_length` tokens (the worst case), batches
    of `train.batch_size`, then `changes`."""
    return {
        name: recipe(
            method,
            cfg.train,
            seq_len or cfg.data.max_length,
            batch or cfg.train.batch_size,
            **changes,
        )
        for name, method in cfg.methods.items()
    }


def prepared_median_length(data_dir: Path) -> int | None:
    """The median training row's tokens of the prepared data (its manifest), if prepared."""
    manifest = data_dir / "manifest.json"
    if not manifest.is_file():
        return None
    return round(json.loads(manifest.read_text(encoding="utf-8"))["token_lengths"]["train"]["p50"])


def visible_gpu_gib() -> float | None:
    """The smallest GPU's memory in GiB as `nvidia-smi` reports it (no torch import, no CUDA
    context); None without one."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
    proc = subprocess.run(query, capture_output=True, text=True, check=False)
    sizes = [float(v) for v in proc.stdout.split()] if proc.returncode == 0 else []
    return min(sizes) / 1024 if sizes else None  # MiB


def preflight(cfg: Any) -> tuple[str, str] | None:
    """The OOM preflight of a run: None when every arm fits the configured GPU
    (`orchestration.gpu_memory_gb`, else the visible one; nothing to check on CPU), else one
    line saying which arm cannot fit and the planner's table."""
    gpu = cfg.orchestration.gpu_memory_gb or visible_gpu_gib()
    if not gpu:
        return None
    config, source = load_model_config(None, cfg)
    table, numbers = plan_table(config, configured_recipes(cfg), gpu)
    refused = [m for m, n in numbers.items() if n["verdict"] == "does not fit"]
    if not refused:
        return None
    worst = max(numbers[m]["peak_worst"] for m in refused)
    line = (
        f"{'/'.join(refused)} cannot fit the GPU: {worst / GIB:.3g} GiB at the worst case "
        f"(train.batch_size {cfg.train.batch_size} x data.max_length {cfg.data.max_length}) vs "
        f"{gpu:g} GiB less 10% (orchestration.gpu_memory_gb); lower either, or turn on "
        "train.gradient_checkpointing"
    )
    return line, f"qlora-pipeline plan, {source}:\n{table}"
