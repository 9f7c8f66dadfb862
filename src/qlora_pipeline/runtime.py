"""Process-wide set-up shared by every step: CPU kernels, threads, seeds, quiet libraries, memory.

Reproducibility is set here, before torch is imported. On a CPU, the bytes a run produces depend on
which kernels the math libraries pick, and they pick by the instruction sets the CPU offers
(AVX2, AVX-512, AVX512-BF16, AMX). `runtime.cpu_kernels=portable` (the default) pins every library
to the AVX2 kernels any x86-64 CPU of the last decade has, so the same commit, config and data give
the same bytes on every such machine (`runtime.cpu_kernels`: `avx2`, the default, or `compatible`):

| library | what is pinned | why |
|---|---|---|
| PyTorch (ATen) | `ATEN_CPU_CAPABILITY=avx2` | vectorized kernels (softmax, cross-entropy, AdamW, bf16 gemm) differ per ISA |
| oneDNN | `ONEDNN_MAX_CPU_ISA=AVX2` and `torch.backends.mkldnn.enabled=False` | bf16 matmuls go to oneDNN's AVX512-BF16/AMX kernels, whose blocking depends on the CPU |
| MKL | `MKL_CBWR=AVX2,STRICT` (`avx2`) or `COMPATIBLE` (`compatible`), `MKL_DYNAMIC=FALSE` | fp32 gemm kernels differ per ISA; STRICT also makes gemm independent of the thread count |
| bitsandbytes | its AVX512-BF16 repacking off on every 4-bit layer (`pin_bnb_kernels`) | it checks the CPU itself (cpuid), not an environment variable |
| threads | `runtime.threads` (default 2), also for OpenMP and MKL | the split of work is fixed, whatever the machine's core count |
| Python | `PYTHONHASHSEED=0` (the CLI re-executes itself once) | peft writes `target_modules` from a set: the order follows the string hash seed |

MKL on AMD: Intel documents CNR branches other than AUTO and COMPATIBLE for Intel processors only;
on an AMD CPU, `MKL_CBWR=AVX2` silently runs MKL's AUTO branch. So `avx2` gives the same bytes on
every Intel CPU with AVX2 or newer (and every library but MKL's fp32 gemm is pinned on AMD too);
`compatible` uses the SSE2 branch Intel documents for "Intel and compatible" processors, at about
2.5x the fp32 gemm time (benchmarks/bench_cpu_kernels.py). `native` leaves the libraries to pick
the fastest kernels for this CPU: results are then repeatable on one machine only.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import warnings
from typing import Any

from qlora_pipeline.errors import PipelineError

log = logging.getLogger("qlora_pipeline")

CPU_KERNELS = ("avx2", "compatible", "native")
PORTABLE_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2,STRICT",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
}
MKL_BRANCH = {"avx2": "AVX2,STRICT", "compatible": "COMPATIBLE"}
MODE_ENV = "QLORA_PIPELINE_CPU_KERNELS"  # what this process pinned, for the loaders and children
DETERMINISM_ENV = (*PORTABLE_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHASHSEED", MODE_ENV)


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
    # The train stage says it itself, naming the stage and what runs instead.
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    # peft reads transformers' deprecated alias; nothing of ours to change.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    # lm-eval warns whenever it is handed a loaded model, which is how evaluate calls it.
    logging.getLogger("lm_eval.models.huggingface").addFilter(_loaded_model_notice)


def _loaded_model_notice(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not message.startswith(("`pretrained` model kwarg is not", "Passed an already-init"))


def pin_cpu(cpu_kernels: str, threads: int) -> None:
    """Pin the CPU kernels and thread count of this process (and of the processes it starts).

    Must run before torch is imported: the math libraries read these settings once.

    Raises:
        PipelineError: torch was already imported with other kernels, or the CPU lacks AVX2.
    """
    if cpu_kernels not in CPU_KERNELS:
        raise PipelineError(
            f"config key 'runtime.cpu_kernels': got {cpu_kernels!r}, expected one of {', '.join(CPU_KERNELS)}"
        )
    wanted = (
        {**PORTABLE_ENV, "MKL_CBWR": MKL_BRANCH[cpu_kernels]} if cpu_kernels != "native" else {}
    )
    if threads > 0:
        wanted.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    imported = "torch" in sys.modules
    os.environ.update(wanted)
    os.environ[MODE_ENV] = cpu_kernels
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    if cpu_kernels == "native":
        return
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        why = (
            "torch was imported before the CPU kernels were pinned"
            if imported
            else "this CPU has no AVX2"
        )
        raise PipelineError(
            f"runtime.cpu_kernels={cpu_kernels} needs torch's AVX2 kernels, got {capability}: {why}; "
            "use runtime.cpu_kernels=native (results then depend on the CPU)"
        )


def portable() -> bool:
    """True when this process runs pinned, portable CPU kernels (the default; see `pin_cpu`)."""
    return os.environ.get(MODE_ENV, "avx2") != "native"


def pin_bnb_kernels(model: Any) -> Any:
    """Keep bitsandbytes' 4-bit layers on the kernels every CPU runs.

    On a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights for its own inference kernel on
    the first eval-mode forward, keeps them packed (absmax rounded to bf16) and trains on them
    afterwards. An AVX2 CPU never does, and neither does a run resumed after that forward, so the
    repacking is off in training (bitwise resume) and everywhere with portable kernels.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def setup_torch(seed: int) -> None:
    """Seeds for Python's random, numpy and torch (what `transformers.set_seed` seeds, without
    importing transformers' trainer: ~5 s a process); tokenizers single-threaded."""
    import random

    import numpy as np
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices, CUDA included


def peak_memory_mb() -> dict[str, float]:
    """Peak memory of this process: CUDA max allocated when on a GPU, and max RSS always."""
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.cuda.is_available():
        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


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
