"""The process set-up of a stage that is not about reproducibility: how glibc serves memory."""

import subprocess
import sys

import pytest
import torch

WHERE_A_BLOCK_COMES_FROM = r"""
import ctypes, sys
if sys.argv[1] == "kept":
    from qlora_pipeline.runtime import keep_freed_memory
    assert keep_freed_memory()
else:
    import torch  # what the other process imported too
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
address = libc.malloc(64 << 20)  # above glibc's adaptive mmap threshold's 32 MiB ceiling
for line in open("/proc/self/maps"):
    fields = line.split()
    low, high = (int(x, 16) for x in fields[0].split("-"))
    if low <= address < high:
        print(fields[5] if len(fields) > 5 else "anonymous mapping")
"""


def where_a_block_comes_from(mode: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", WHERE_A_BLOCK_COMES_FROM, mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_stage_on_a_cpu_serves_large_blocks_from_the_heap():
    assert where_a_block_comes_from("default") == "anonymous mapping"  # glibc maps it anew
    assert where_a_block_comes_from("kept") == "[heap]"  # and keeps it for the next step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_machine_glibc_keeps_its_defaults():
    from qlora_pipeline.runtime import keep_freed_memory

    assert keep_freed_memory() is False
