"""Loading the base model for either method, attaching LoRA, reloading a saved adapter.

One code path: the method config decides whether the base is loaded in 4-bit (QLoRA) or in
`base_dtype` (LoRA). A hub id and a local folder load the same way; safetensors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlora_pipeline.config.schema import LoraConfig, MethodConfig, QuantizationConfig
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.files import read_json
from qlora_pipeline.modeling.checks import check_cpu_4bit
from qlora_pipeline.modeling.device import placement


def fsdp_active() -> bool:
    """True inside `accelerate launch` with an FSDP config."""
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def torch_dtype(name: str) -> Any:
    import torch

    return {
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "float32": torch.float32,
        "uint8": torch.uint8,
    }[name]


def base_source(base_dir: str | Path) -> tuple[str, str | None]:
    """Where the base weights live: the bootstrapped folder itself, or the hub id / path it names."""
    base_dir = Path(base_dir)
    info_path = base_dir / "base.json"
    if not info_path.is_file():
        raise PipelineError(f"{info_path}: not found; run the bootstrap stage first")
    info = read_json(info_path)
    if info["source"] == "bootstrap":
        return str(base_dir), None
    return str(info["path"]), info.get("revision")


def base_context(base_dir: str | Path, trust_remote_code: bool = False) -> int | None:
    """The base model's context length (`max_position_embeddings`; None when it has none)."""
    from transformers import AutoConfig

    source, revision = base_source(base_dir)
    config = AutoConfig.from_pretrained(
        source, revision=revision, trust_remote_code=trust_remote_code
    )
    return getattr(config, "max_position_embeddings", None)


def load_tokenizer(base_dir: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    source, revision = base_source(base_dir)
    tok = AutoTokenizer.from_pretrained(
        source, revision=revision, trust_remote_code=trust_remote_code
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def compute_dtype(name: str) -> str:
    """The dtype a configured 16-bit compute dtype really runs in.

    With pinned CPU kernels (`runtime.cpu_kernels=avx2`, see runtime.py) a CPU computes in
    float32: torch has no AVX2 kernel for bf16 matmuls, only a scalar fallback about 60x slower
    than fp32 (measured: benchmarks/bench_cpu_kernels.py). Weights keep their bf16 values (loading
    bf16 into fp32 is exact); only activations and accumulation are fp32. GPUs and native CPU
    kernels compute in the configured dtype.
    """
    import torch

    from qlora_pipeline.runtime import portable

    if name in ("bfloat16", "float16") and portable() and not torch.cuda.is_available():
        return "float32"
    return name


def method_compute_dtype(method: MethodConfig) -> str:
    """The dtype an arm really computes in: its 4-bit compute dtype, or its base dtype."""
    return compute_dtype(
        method.quantization.compute_dtype if method.quantization else method.base_dtype
    )


def bnb_config(q: QuantizationConfig) -> Any:
    """The QLoRA quantization: 4-bit weights (NF4 by default), optional double quantization,
    the storage dtype of the packed weights (bfloat16 for FSDP), and modules left unquantized."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute_dtype(q.compute_dtype)),
        bnb_4bit_quant_storage=torch_dtype(q.quant_storage),
        llm_int8_skip_modules=list(q.skip_modules) or None,
    )


def load_base(base_dir: str | Path, method: MethodConfig, trust_remote_code: bool = False) -> Any:
    """Load the frozen base model as `method` wants it (4-bit for QLoRA, `base_dtype` otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.runtime import pin_bnb_kernels, portable

    source, revision = base_source(base_dir)
    kwargs: dict[str, Any] = {
        "revision": revision,
        "dtype": torch_dtype(compute_dtype(method.base_dtype)),
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code,
    }
    if method.quantization is not None:
        kwargs["quantization_config"] = bnb_config(method.quantization)
    if fsdp_active():  # FSDP places the shards; every tensor must have the storage dtype
        if method.quantization is not None:
            kwargs["dtype"] = torch_dtype(method.quantization.quant_storage)
    else:
        kwargs.update(placement(quantized=method.quantization is not None))
    model: Any = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if portable():
        return pin_bnb_kernels(model)
    if not torch.cuda.is_available():
        check_cpu_4bit(model)  # native CPU kernels: bitsandbytes may repack for inference
    return model


def linear_names(model: Any) -> list[str]:
    """Leaf names of the linear layers LoRA can target (bitsandbytes 4-bit ones included)."""
    import torch

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name
    }
    return sorted(names)


def upcast_non_quantized(model: Any, skip_modules: list[str]) -> None:
    """Cast to fp32 what `prepare_model_for_kbit_training` casts in the 4-bit arm: every 16-bit
    parameter except the weights of the linear layers the 4-bit arm quantizes (all but
    `skip_modules`). Applied to the unquantized arm, the two arms then differ only in those
    weights: 4-bit in one, 16-bit in the other."""
    import torch

    for name, module in model.named_modules():
        quantizable = isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in (
            skip_modules
        )
        for pname, param in module.named_parameters(recurse=False):
            if param.dtype in (torch.float16, torch.bfloat16) and not (
                quantizable and pname == "weight"
            ):
                param.data = param.data.float()


def dtype_summary(model: Any) -> dict[str, str]:
    """The dtypes of a loaded model by part: what really runs, not what the config says."""
    import torch

    parts: dict[str, set[str]] = {}

    def add(part: str, value: str) -> None:
        parts.setdefault(part, set()).add(value)

    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        for pname, param in module.named_parameters(recurse=False):
            dtype = str(param.dtype).removeprefix("torch.")
            if "lora_" in name:
                add("LoRA adapter weights", dtype)
            elif param.__class__.__name__ == "Params4bit":
                add("linear weights", f"4-bit {param.quant_type}")
            elif isinstance(module, torch.nn.Embedding):
                add("embeddings", dtype)
            elif "norm" in type(module).__name__.lower():
                add("norms", dtype)
            elif isinstance(module, torch.nn.Linear) and leaf == "lm_head":
                add("lm_head", dtype)
            elif isinstance(module, torch.nn.Linear):
                add("linear weights" if pname == "weight" else "linear biases", dtype)
            else:
                add("other", dtype)
    return {part: ", ".join(sorted(values)) for part, values in sorted(parts.items())}


def attach_lora(
    model: Any,
    lora: LoraConfig,
    method: MethodConfig,
    seed: int,
    gradient_checkpointing: bool = False,
    base_path: str | None = None,
    upcast: bool = True,
    skip_modules: tuple[str, ...] | list[str] = ("lm_head",),
) -> Any:
    """Wrap `model` with trainable LoRA adapters; k-bit preparation for a quantized base.

    `upcast` (train.upcast_non_quantized) applies one precision policy to both arms: fp32 for
    everything the 4-bit arm does not quantize (embeddings, norms, `skip_modules`), as
    `prepare_model_for_kbit_training` does for the 4-bit arm, or no upcast in either arm.

    The seed is set right before `get_peft_model`, so both methods start from the same adapter init.
    `lora.init=loftq` (quantized methods only) then re-initializes the adapters with peft's LoftQ
    from the full-precision weights in `base_path`, so they start by absorbing the quantization
    error.
    """
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    target = lora.target_modules
    if target != "all-linear":
        existing = linear_names(model)
        unknown = sorted(set(target) - set(existing))
        if unknown:
            raise PipelineError(
                f"config key 'train.lora.target_modules': no linear layer named {unknown}; "
                f"the model has {existing}"
            )
    gc_kwargs = {"use_reentrant": False}
    quantized = method.quantization is not None
    if quantized and upcast and not fsdp_active():  # FSDP: no fp32 upcast (one dtype)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs,
        )
    else:
        if upcast and not quantized:
            upcast_non_quantized(model, list(skip_modules))
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target if target == "all-linear" else list(target),
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights="gaussian" if lora.init == "gaussian" else True,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise PipelineError(f"config key 'train.lora.target_modules': {e}") from None
    if lora.init == "loftq":
        from peft import replace_lora_weights_loftq

        replace_lora_weights_loftq(peft_model, model_path=base_path)
    return peft_model


def require_adapter(adapter_dir: str | Path) -> Path:
    """`adapter_dir`, if it holds a saved adapter (checked before any base is loaded)."""
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise PipelineError(f"{adapter_dir}: no adapter here; run the train stage first")
    return Path(adapter_dir)


def attach_saved(base: Any, adapter_dir: str | Path) -> Any:
    """A saved adapter on a loaded base, in eval mode. `.unload()` gives the bare base back, so
    one loaded base serves several adapters (the seeds of an arm) without loading it again."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(require_adapter(adapter_dir)))
    model.eval()
    return model


def load_adapted(
    base_dir: str | Path,
    method: MethodConfig,
    adapter_dir: str | Path,
    trust_remote_code: bool = False,
) -> Any:
    """Base loaded as `method` wants it plus the saved adapter: what ships, ready for inference."""
    require_adapter(adapter_dir)
    return attach_saved(load_base(base_dir, method, trust_remote_code), adapter_dir)
