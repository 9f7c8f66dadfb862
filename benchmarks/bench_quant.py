"""Bits per parameter of 4-bit weights, measured, against the theory; and the footprint against bf16.

For every variant (NF4 / FP4, with and without double quantization), bitsandbytes quantizes:
  - every linear layer QLoRA quantizes in the default base (models/base), as the quant-report
    stage does (`modeling/quantstats.py`);
  - one 2048 x 8192 layer (a 1B-class MLP projection, random normal weights, bf16), where the
    constants' share no longer depends on small shapes;
and the bits its packed codes and constants take are counted, against 4 + 8/64 + 32/(64*256) =
4.127 (double quantization, block 64) and 4 + 32/64 = 4.5 (without). The footprint ratio of the
quantized weights to bf16 is bits / 16. Then the whole default base as QLoRA loads it
(`modeling/load.load_base`) against the same model in bf16 (its embeddings and norms stay
unquantized), and the LoRA arm's base as loaded here (fp32 on pinned CPU kernels).

Needs models/base (`make run`, or `dvc repro bootstrap`). Prints a table and writes
benchmarks/results/quant.json.

    .venv/bin/python benchmarks/bench_quant.py
"""

from __future__ import annotations

import sys

from common import ROOT, write_results


def main() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from qlora_pipeline.config.schema import load_params
    from qlora_pipeline.runtime import pin_cpu

    cfg = load_params(ROOT / "params.yaml")
    pin_cpu(cfg.runtime.cpu_kernels, cfg.runtime.threads)
    import torch

    from qlora_pipeline.modeling.load import load_base
    from qlora_pipeline.modeling.quantstats import (
        THEORY_BITS,
        VARIANTS,
        layer_error,
        quant_report,
        variant_name,
    )

    base = ROOT / cfg.paths.base
    if not base.is_dir():
        sys.exit("needs models/base: run `make run` (or `dvc repro bootstrap`)")
    q = cfg.methods["qlora"].quantization
    assert q is not None
    summary = quant_report(base, (q.quant_type, q.double_quant), list(q.skip_modules), "float32")[
        "summary"
    ]
    torch.manual_seed(0)
    big = (torch.randn(8192, 2048) * 0.02).to(torch.bfloat16).float()
    large = {variant_name(t, dq): layer_error(big, t, dq) for t, dq in VARIANTS}
    models = {arm: load_base(base, cfg.methods[arm]) for arm in ("qlora", "lora")}
    footprint = {arm: m.get_memory_footprint() for arm, m in models.items()}
    lora_dtype = str(next(models["lora"].parameters()).dtype).removeprefix("torch.")
    bf16 = sum(p.numel() for p in models["lora"].parameters()) * 2
    rows = []
    print(f"{'variant':10s}{'theory':>8s}{'base linears':>14s}{'2048x8192':>11s}{'vs bf16':>9s}")
    for t, dq in VARIANTS:
        v = variant_name(t, dq)
        row = {
            "variant": v,
            "theory_bits": THEORY_BITS[dq],
            "base_bits": summary[v]["bits_per_param"],
            "base_params": summary[v]["params"],
            "large_bits": large[v]["bits_per_param"],
            "ratio_to_bf16": large[v]["bits_per_param"] / 16,
        }
        rows.append(row)
        print(
            f"{v:10s}{row['theory_bits']:8.3f}{row['base_bits']:14.3f}{row['large_bits']:11.3f}"
            f"{row['ratio_to_bf16']:9.3f}"
        )
    ratio = footprint["qlora"] / bf16
    print(
        f"whole default base: QLoRA as loaded {footprint['qlora'] / 2**20:.2f} MB, the same model "
        f"in bf16 {bf16 / 2**20:.2f} MB ({ratio:.3f}x; embeddings, norms and "
        f"{', '.join(q.skip_modules)} stay unquantized); the LoRA arm's base as loaded here "
        f"({lora_dtype}) {footprint['lora'] / 2**20:.2f} MB"
    )
    out = ROOT / "benchmarks/results/quant.json"
    write_results(
        out,
        {
            "variants": rows,
            "footprint_bytes": footprint | {"bf16": bf16},
            "lora_base_dtype_as_loaded": lora_dtype,
            "qlora_over_bf16": ratio,
        },
    )


if __name__ == "__main__":
    main()
