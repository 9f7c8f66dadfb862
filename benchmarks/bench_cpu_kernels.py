"""What reproducibility costs: CPU kernel modes side by side, in one invocation.

Each mode runs in its own process (the kernels are chosen before torch is imported), in rounds
that alternate the modes, so machine noise hits all of them alike. Workloads:
  - pretrain step: the default tiny Llama (3.67M params), batch 32 x 32 tokens, forward + backward
    + AdamW, in the dtype each mode computes in (native: bf16 autocast; pinned: fp32);
  - bf16 linear: 1024x256 @ 256x768 forward + backward in bf16, the op pinned modes avoid;
  - fp32 linear: the same in fp32 (MKL sgemm under each mode's CNR branch).
Prints a table and writes benchmarks/results/cpu_kernels.json.

    .venv/bin/python benchmarks/bench_cpu_kernels.py [--rounds 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

MODES = ("native", "avx2")

CHILD = r"""
import json, sys, time
from qlora_pipeline.runtime import cpu_vendor, mkl_branch, pin_cpu
mode, steps = sys.argv[1], int(sys.argv[2])
pin_cpu(mode, 2)
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)

def per_call(fn, n):
    for _ in range(2):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1000

def linear(dtype):
    x = torch.randn(1024, 256, dtype=dtype, requires_grad=True)
    w = torch.randn(768, 256, dtype=dtype, requires_grad=True)
    return lambda: torch.nn.functional.linear(x, w).sum().backward()

cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
model = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, 512, (32, 32))
bf16 = mode == "native"

def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()

out = {
    "pretrain_step_ms": per_call(step, steps),
    "bf16_linear_ms": per_call(linear(torch.bfloat16), 3 if mode != "native" else 20),
    "fp32_linear_ms": per_call(linear(torch.float32), 20),
    "torch_kernels": torch.backends.cpu.get_cpu_capability(),
    "mkl_branch": mkl_branch(),
    "cpu_vendor": cpu_vendor(),
}
print("RESULT " + json.dumps(out))
"""


def run(mode: str, steps: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(steps)], capture_output=True, text=True, check=True
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="pretrain steps timed per round")
    args = p.parse_args()
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else reversed(MODES):
            results[mode].append(run(mode, args.steps))
    keys = ("pretrain_step_ms", "bf16_linear_ms", "fp32_linear_ms")
    summary = {
        m: {k: statistics.median(x[k] for x in rows) for k in keys}
        | {k: rows[0][k] for k in ("torch_kernels", "mkl_branch", "cpu_vendor")}
        for m, rows in results.items()
    }
    base = summary["native"]["pretrain_step_ms"]
    print(
        f"{'mode':<11} {'kernels':<8} {'MKL':<10} {'pretrain step ms':>17} {'vs native':>9} {'bf16 linear ms':>15} {'fp32 linear ms':>15}"
    )
    for m, s in summary.items():
        print(
            f"{m:<11} {s['torch_kernels']:<8} {s['mkl_branch'] or '-':<10} {s['pretrain_step_ms']:>17.1f} {s['pretrain_step_ms'] / base:>8.2f}x "
            f"{s['bf16_linear_ms']:>15.1f} {s['fp32_linear_ms']:>15.2f}"
        )
    out = Path(__file__).parent / "results" / "cpu_kernels.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {"rounds": args.rounds, "steps": args.steps, "median": summary, "raw": results},
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
