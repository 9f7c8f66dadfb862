"""Process-wide set-up shared by every step: CPU kernels, threads, seeds, quiet libraries, memory.

Reproducibility is set here, before torch is imported. On a CPU, the bytes a run produces depend on
which kernels the math libraries pick, and they pick by the instruction sets the CPU offers
(AVX2, AVX-512, AVX512-BF16, AMX) and, for MKL, by its vendor. `runtime.cpu_kernels=avx2` (the
default) pins every library to the AVX2 kernels any x86-64 CPU of the last decade has, Intel's or
AMD's, so the same commit, config and data give the same bytes on every such machine:

| library | what is pinned | why |
|---|---|---|
| PyTorch (ATen) | `ATEN_CPU_CAPABILITY=avx2` | vectorized kernels (softmax, cross-entropy, AdamW, bf16 gemm) differ per ISA |
| oneDNN | `ONEDNN_MAX_CPU_ISA=AVX2` and `torch.backends.mkldnn.enabled=False` | bf16 matmuls go to oneDNN's AVX512-BF16/AMX kernels, whose blocking depends on the CPU |
| MKL | `MKL_CBWR=AVX2,STRICT`, `MKL_DYNAMIC=FALSE`, and its Intel code path on any vendor (`mkl_intel_dispatch`) | fp32 gemm kernels differ per ISA and vendor; STRICT also makes gemm independent of the thread count |
| bitsandbytes | its AVX512-BF16 repacking off on every 4-bit layer (`pin_bnb_kernels`) | it checks the CPU itself (cpuid), not an environment variable |
| threads | `runtime.threads` (default 2), also for OpenMP and MKL | the split of work is fixed, whatever the machine's core count |
| Python | `PYTHONHASHSEED=0` (the CLI re-executes itself once) | peft writes `target_modules` from a set: the order follows the string hash seed |

`native` leaves the libraries to pick the fastest kernels for this CPU (bf16 compute): results are
then repeatable on one machine only.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from qlora_pipeline.errors import PipelineError

log = logging.getLogger("qlora_pipeline")

CPU_KERNELS = ("avx2", "native")
PORTABLE_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2,STRICT",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
}
# MKL picks its code path by CPU vendor first: on a CPU that is not Intel's it runs its AUTO branch
# (AVX-512 kernels on an AVX-512 AMD CPU) whatever MKL_CBWR asks, since Intel documents the other
# reproducibility branches for Intel processors only. It asks these two functions; torch links MKL
# statically but exports them and calls them through the PLT, so a library defining them, loaded
# into the global symbol scope before torch, answers for them. MKL then runs the AVX2 branch asked
# for, the kernels every AVX2 CPU runs: the same bytes on AMD as on Intel.
INTEL_DISPATCH_C = """\
int mkl_serv_intel_cpu_true(void) { return 1; }
int mkl_serv_intel_cpu(void) { return 1; }
"""
MKL_CBWR_BRANCH = 1  # mkl_cbwr.h: asks mkl_cbwr_get for the branch in use
MKL_CBWR_NAMES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 10: "AVX2", 12: "AVX512", 14: "AVX512_E1"}
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
    wanted = dict(PORTABLE_ENV) if cpu_kernels != "native" else {}
    if threads > 0:
        wanted.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    imported = "torch" in sys.modules
    os.environ.update(wanted)
    os.environ[MODE_ENV] = cpu_kernels
    unpinned_mkl = None if cpu_kernels == "native" else mkl_intel_dispatch()
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
    branch = mkl_branch()
    if branch not in (None, "AVX2"):
        log.warning(
            "MKL runs its %s branch, not AVX2, on this %s CPU (%s): fp32 results repeat on this "
            "machine but differ from other CPUs' and from the committed reference run",
            branch,
            cpu_vendor() or "unknown",
            unpinned_mkl or "torch was imported before the CPU kernels were pinned",
        )


def cpu_info(field: str, path: Path = Path("/proc/cpuinfo")) -> str:
    """The first CPU's `field` in /proc/cpuinfo ("vendor_id", "model name", ...) on Linux; ""
    elsewhere or when it has none."""
    pattern = rf"^{re.escape(field)}\s*:\s*(.*?)\s*$"
    try:
        found = re.search(pattern, path.read_text(encoding="utf-8"), re.M)
    except OSError:
        return ""
    return found.group(1) if found else ""


def cpu_vendor() -> str:
    """The CPU's vendor string (GenuineIntel, AuthenticAMD, ...) on Linux; "" elsewhere."""
    return cpu_info("vendor_id")


def mkl_intel_dispatch() -> str | None:
    """Make MKL take its Intel code path on an x86-64 CPU of another vendor (see INTEL_DISPATCH_C).

    Builds the two-function library once with the C compiler (`$CC`, else `cc`), cached by content
    under $XDG_CACHE_HOME/qlora-pipeline (else ~/.cache, else the temp folder), and loads it before
    torch. A library every stage loads must be one nobody else could have put there: a folder or
    library that is not this user's, or that others may write, is passed over. Returns None when
    done or not needed, else why it could not be (MKL then keeps its vendor's path; `pin_cpu`
    says so).
    """
    if platform.machine() not in ("x86_64", "AMD64") or cpu_vendor() in ("", "GenuineIntel"):
        return None
    name = f"mkl-intel-dispatch-{hashlib.sha256(INTEL_DISPATCH_C.encode()).hexdigest()[:12]}.so"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    compiler = os.environ.get("CC") or "cc"
    why = "no cache folder to build it in"
    for folder in (
        cache / "qlora-pipeline",
        Path(tempfile.gettempdir()) / f"qlora-pipeline-{os.getuid()}",
    ):
        library = folder / name
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not _private(folder) or (library.exists() and not _private(library)):
                why = f"{library}: not this user's, or writable by others"
                continue
            if not library.exists():
                if shutil.which(compiler) is None:
                    return "no C compiler to build its Intel-dispatch library: install one (cc), or set CC"
                _build_shared_library(INTEL_DISPATCH_C, library, compiler)
            ctypes.CDLL(str(library), mode=os.RTLD_GLOBAL)
            return None
        except subprocess.CalledProcessError as err:
            return f"building its Intel-dispatch library failed: {err.stderr.strip()[:200]}"
        except OSError as err:
            why = f"could not build or load {library}: {err.strerror or err}"
    return why


def _private(path: Path) -> bool:
    """True when `path` is this user's and nobody else may write it."""
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _build_shared_library(source: str, library: Path, compiler: str) -> None:
    """Compile `source` into `library`, atomically (processes may build it at the same time)."""
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        (Path(tmp) / "lib.c").write_text(source)
        subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-o", "lib.so", "lib.c"],
            cwd=tmp,
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(Path(tmp) / "lib.so", library)


def mkl_branch() -> str | None:
    """The reproducibility branch MKL runs in this process (AUTO, AVX2, ...), as MKL itself reports
    it; None where torch has no MKL (e.g. ARM builds)."""
    import torch

    try:
        get = ctypes.CDLL(
            str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")
        ).mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.restype = ctypes.c_int
    code = get(MKL_CBWR_BRANCH)
    return MKL_CBWR_NAMES.get(code, str(code))


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


# glibc's mallopt parameters (malloc.h) and what `keep_freed_memory` sets both to
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_KEEP_BYTES = 256 * 2**20


def keep_freed_memory(limit: int = HEAP_KEEP_BYTES) -> bool:
    """On a CPU with glibc: serve allocations under `limit` bytes from the heap and keep up to
    `limit` of freed memory there, for the next step to reuse. By default glibc maps a large
    block anew (and faults in and zeroes its pages) unless an earlier free of that size raised
    its adaptive threshold, so a training step's buffers came fresh from the kernel or not by
    each process' history: LoRA steps were about 6% slower and varied more from process to
    process (benchmarks/RESULTS.md, bench_train). Not on a GPU machine, where a model's large
    host copies are freed after loading and should go back to the system. True when set."""
    from qlora_pipeline.modeling.device import device

    if device() != "cpu":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, limit))


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
