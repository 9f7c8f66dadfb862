"""Export: merge an adapter into a bf16 base and save one standalone model (safetensors + tokenizer).

For QLoRA the 4-bit base is dequantized to bf16 first, so the merged weights are the ones the
adapter was trained against. The merged model's logits are checked against base + adapter
(unmerged) within a stated tolerance, and the drift of the alternatives is measured: the merged
export vs the 4-bit base + adapter it was trained with, and the same adapter applied to the
original bf16 base instead of the dequantized one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_pipeline.config.schema import PipelineConfig
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.files import atomic_dir, write_json
from qlora_pipeline.modeling.device import inputs_for, placement, to_host
from qlora_pipeline.modeling.load import (
    compute_dtype,
    load_adapted,
    load_base,
    load_tokenizer,
    torch_dtype,
)
from qlora_pipeline.runtime import log

# The merged model must reproduce base + adapter (unmerged, same bf16 base) to this tolerance.
# Merging rounds W + scale * B @ A to bf16 once (relative step 2^-8): logits move by about that,
# and near-tied top-1 predictions (often on prompt positions) can flip.
TOLERANCE = {"max_abs_over_max_logit": 0.05, "top1_agreement": 0.95}
N_PROMPTS = 32


def prompts(data_dir: Path, n: int = N_PROMPTS) -> list[str]:
    path = data_dir / "test.jsonl"
    if not path.is_file():
        raise PipelineError(f"{path}: not found; run the prepare stage first")
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]
    return [r.get("prompt") or r["text"] for r in rows[:n]]


def logits(model: Any, tokenizer: Any, texts: list[str]) -> tuple[Any, Any]:
    """Logits of real prompts, compared on the host (modeling/device.py): at every non-padding
    position, and at each prompt's last position (the prediction of the answer's first token)."""
    import torch

    tokenizer.padding_side = "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = to_host(model(**inputs_for(model, batch)).logits)
    mask = batch["attention_mask"].bool()
    last = batch["attention_mask"].sum(1) - 1
    return out[mask], out[torch.arange(out.shape[0]), last]


def compare(a: tuple[Any, Any], b: tuple[Any, Any]) -> dict[str, float]:
    """How far logits `a` are from reference logits `b`: max and mean |Δ| over every position;
    top-1 agreement on the answer's first token (prompt positions predict random letters, whose
    near-tied logits flip on any rounding)."""
    diff = (a[0] - b[0]).abs()
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_abs_over_max_logit": float(diff.max() / b[0].abs().max()),
        "top1_agreement": float((a[1].argmax(-1) == b[1].argmax(-1)).float().mean()),
    }


def export(
    cfg: PipelineConfig,
    method_name: str,
    base_dir: str | Path,
    adapter_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
) -> dict:
    """Merge `adapter_dir` into the bf16 (dequantized, for QLoRA) base, verify, save atomically.

    Returns:
        The content of `export.json` (tolerance, parity and drift figures).

    Raises:
        PipelineError: the merged model misses the tolerance (nothing is written).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    method = cfg.methods[method_name]
    trust = cfg.model.trust_remote_code
    tokenizer = load_tokenizer(base_dir, trust)
    texts = prompts(Path(data_dir))
    as_trained = load_adapted(base_dir, method, adapter_dir, trust)
    reference = logits(as_trained, tokenizer, texts)
    del as_trained

    base = load_base(base_dir, method, trust)
    if method.quantization is not None:
        base = base.dequantize()
    saved_dtype = torch_dtype(method.base_dtype)  # what ships; computed in compute_dtype()
    base = base.to(dtype=torch_dtype(compute_dtype(method.base_dtype)))
    unmerged = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    unmerged_logits = logits(unmerged, tokenizer, texts)
    drift = None
    if method.quantization is not None:
        original = PeftModel.from_pretrained(
            load_base(base_dir, cfg.methods["lora"], trust), str(adapter_dir)
        ).eval()
        drift = compare(logits(original, tokenizer, texts), reference)

    with atomic_dir(out_dir) as tmp:
        merged = unmerged.merge_and_unload().to(dtype=saved_dtype)  # W + BA rounded once
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        # verify the artifact itself, as a user will load it: no peft, no quantization
        shipped = AutoModelForCausalLM.from_pretrained(
            str(tmp),
            dtype=torch_dtype(compute_dtype(method.base_dtype)),
            use_safetensors=True,
            **placement(),
        ).eval()
        merged_logits = logits(shipped, tokenizer, texts)
        parity = compare(merged_logits, unmerged_logits)
        result: dict[str, Any] = {
            "method": method_name,
            "prompts": len(texts),
            "tolerance": TOLERANCE,
            "merged_vs_unmerged": parity,
            "merged_vs_as_trained": compare(merged_logits, reference),
        }
        if drift is not None:
            result["bf16_base_plus_adapter_vs_as_trained"] = drift
        if (
            parity["max_abs_over_max_logit"] > TOLERANCE["max_abs_over_max_logit"]
            or parity["top1_agreement"] < TOLERANCE["top1_agreement"]
        ):
            raise PipelineError(
                f"export[{method_name}]: merged logits differ from base + adapter beyond "
                f"tolerance ({json.dumps(parity)}; tolerance {json.dumps(TOLERANCE)})"
            )
        write_json(tmp / "export.json", result)
    log.info(
        "export[%s]: merged model -> %s (parity max |Δ| %.2g of max logit; vs as trained: top-1 "
        "agreement %.3f)",
        method_name,
        out_dir,
        parity["max_abs_over_max_logit"],
        result["merged_vs_as_trained"]["top1_agreement"],
    )
    return result
