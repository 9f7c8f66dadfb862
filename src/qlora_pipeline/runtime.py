"""Process-wide set-up shared by every step: threads, seeds, quiet libraries, memory readings."""

from __future__ import annotations

import logging
import os
import resource
import warnings

log = logging.getLogger("qlora_pipeline")


def setup_logging(level: int = logging.INFO) -> None:
    """One named logger for the pipeline; noisy third-party loggers turned down."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    for name in ("bitsandbytes", "lm_eval", "datasets", "transformers", "httpx", "peft"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # bitsandbytes tries a hub kernel for the CPU 4-bit gemm on import and falls back; no hub here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")


def setup_torch(threads: int, seed: int) -> None:
    """Deterministic, single-process torch: fixed thread count and all seeds."""
    import torch
    from transformers import set_seed

    if threads > 0:
        torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_seed(seed)


def peak_memory_mb() -> dict[str, float]:
    """Peak memory of this process: CUDA max allocated when on a GPU, and max RSS always."""
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.cuda.is_available():
        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = [
        "torch",
        "transformers",
        "peft",
        "bitsandbytes",
        "datasets",
        "lm_eval",
        "prefect",
        "dvc",
    ]
    out = {}
    for name in names:
        try:
            out[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            out[name] = "missing"
    return out
