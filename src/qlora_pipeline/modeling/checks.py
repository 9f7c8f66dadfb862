"""What a pretrained base must be before any stage uses it, checked when its files first exist
(the bootstrap stage): weights in safetensors, no model code unless allowed, a tokenizer that fits
the model, and shapes the 4-bit kernels of this machine can run. Each problem is one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_pipeline.errors import PipelineError

PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# What the later stages load from a hub snapshot: configuration, tokenizer, safetensors weights
# (never the pickle copies many repositories also hold: gigabytes the pipeline would not load).
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]
CONVERT_HINT = (
    'convert once, in an environment you trust with that file: `python -c "from transformers '
    "import AutoModelForCausalLM as M; M.from_pretrained('{src}', use_safetensors=False)"
    ".save_pretrained('{src}-safetensors')\"` and point model.path at the new folder"
)


def is_local(path: str) -> bool:
    """A folder path rather than a hub id: it exists, or it is spelled like a path."""
    return Path(path).exists() or path.startswith(("/", "./", "../", "~"))


def local_files(path: str, revision: str | None) -> Path:
    """The folder holding the model's files: `path` itself, or the hub snapshot of `path` at
    `revision` (downloaded once into the Hugging Face cache, which later stages read).

    Raises:
        PipelineError: naming model.path when the folder is missing or the hub has no such model.
    """
    if is_local(path):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise PipelineError(f"config key 'model.path': no folder {path!r}")
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated, bad revision: all one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(
            f"config key 'model.path': {path!r} is not a local folder, and the hub (or its "
            f"local cache) has no such model at revision {revision or 'main'}: {reason}"
        ) from None


def check_weights(folder: Path, shown: str) -> None:
    """safetensors weights only: pickle files can run code when loaded.

    Raises:
        PipelineError: no weights, or only pickle ones (with how to convert them).
    """
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    if pickles:
        raise PipelineError(
            f"{shown}: only pickle weights ({', '.join(pickles[:3])}), which can run code when "
            f"loaded; the pipeline loads safetensors only. {CONVERT_HINT.format(src=shown)}"
        )
    raise PipelineError(f"{shown}: no model weights (*.safetensors) in this folder")


def read_config(folder: Path, shown: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise PipelineError(f"{shown}: no config.json; expected a transformers model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{shown}/config.json: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise PipelineError(f"{shown}/config.json: expected a JSON object")
    return config


def check_code(config: dict[str, Any], shown: str, trust_remote_code: bool) -> None:
    """A model whose architecture this transformers does not have runs the model's own Python
    files: refused unless model.trust_remote_code is on.

    Raises:
        PipelineError: the model needs its own code and it is not allowed.
    """
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING or trust_remote_code:
        return
    if config.get("auto_map"):
        raise PipelineError(
            f"{shown}: model_type {model_type!r} runs the model's own code (auto_map in "
            "config.json), refused by default; set model.trust_remote_code=true only if you "
            "trust that code"
        )
    raise PipelineError(f"{shown}: unknown model_type {model_type!r} for this transformers")


def check_tokenizer(tokenizer: Any, vocab_size: int, shown: str) -> str | None:
    """The tokenizer must fit the model: every id it makes indexes the embedding, and padding
    needs a pad token (the EOS token when there is none: padded positions are masked out).

    Returns:
        A note when EOS stands in for the pad token, else None.

    Raises:
        PipelineError: more token ids than embedding rows, or neither a pad nor an EOS token.
    """
    if len(tokenizer) > vocab_size:
        raise PipelineError(
            f"{shown}: the tokenizer has {len(tokenizer)} tokens but the model's embeddings have "
            f"{vocab_size} rows (config.json vocab_size); use the tokenizer made for this model"
        )
    if tokenizer.pad_token is not None:
        return None
    if tokenizer.eos_token is None:
        raise PipelineError(
            f"{shown}: the tokenizer has neither a pad token nor an EOS token; add one "
            "(tokenizer.add_special_tokens) and save the tokenizer with the model"
        )
    return f"the tokenizer has no pad token: padding with its EOS token {tokenizer.eos_token!r}"


def repack_problems(shapes: dict[str, tuple[int, int]], block_n: int = 32) -> list[str]:
    """Linear layers (name -> (out, in) features) that bitsandbytes' CPU kernel for AVX512-BF16
    cannot repack: it needs out features divisible by `block_n` and even in features."""
    return [
        f"{name} ({out}x{inp})" for name, (out, inp) in shapes.items() if out % block_n or inp % 2
    ]


def check_cpu_4bit(model: Any) -> None:
    """On a CPU whose bitsandbytes repacks 4-bit weights for inference (AVX512-BF16, native
    kernels), every 4-bit layer must have shapes that repacking supports; otherwise its assertion
    would stop evaluation after training.

    Raises:
        PipelineError: naming the first layers that do not fit, and what runs instead.
    """
    shapes = {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if getattr(m, "support_avx512bf16_for_cpu", False)
    }
    bad = repack_problems(shapes)
    if bad:
        raise PipelineError(
            f"bitsandbytes' 4-bit CPU kernel of this CPU (AVX512-BF16) needs out features "
            f"divisible by 32 and even in features; {len(bad)} layers are not: "
            f"{', '.join(bad[:3])}; run with runtime.cpu_kernels=avx2 (never repacks) or on a GPU"
        )


def check_pretrained(path: str, revision: str | None, trust_remote_code: bool) -> dict[str, Any]:
    """Every check of a pretrained base that its files allow, before anything loads it.

    Returns:
        Facts recorded in base.json: context length, vocabulary, architecture, pad-token note.
    """
    from transformers import AutoTokenizer

    folder = local_files(path, revision)
    config = read_config(folder, path)
    check_code(config, path, trust_remote_code)
    check_weights(folder, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PipelineError(
            f"{path}: its tokenizer does not load ({str(e).splitlines()[0]})"
        ) from None
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not isinstance(vocab, int):
        raise PipelineError(f"{path}/config.json: no vocab_size")
    note = check_tokenizer(tokenizer, vocab, path)
    return {
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "vocab_size": vocab,
        "max_position_embeddings": config.get("max_position_embeddings"),
        "pad_token": note,
    }
