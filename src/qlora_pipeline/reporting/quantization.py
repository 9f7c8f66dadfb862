"""The report's section on what 4-bit quantization does to the frozen base (the quant-report
stage's figures: modeling/quantstats.py)."""

from __future__ import annotations

from pathlib import Path

from qlora_pipeline.files import read_json
from qlora_pipeline.reporting.document import Block


def quantization_blocks(quant_dir: Path | None) -> list[Block]:
    """Bits per parameter measured against the theory, the error of each variant, and the layers
    the configured variant hurts most; nothing when the stage has not run."""
    path = quant_dir / "quantization.json" if quant_dir else None
    if path is None or not path.is_file():
        return []
    q = read_json(path)
    mine = q["configured"]
    summary = q["summary"]
    return [
        Block("h2", "Quantization of the frozen base"),
        Block(
            "table",
            headers=(
                "variant",
                "bits / param",
                "theory",
                "relative MSE",
                "SQNR (dB)",
                "max abs error",
            ),
            rows=tuple(
                (
                    f"**{v}** (configured)" if v == mine else v,
                    f"{s['bits_per_param']:.3f}",
                    f"{s['theory_bits_per_param']:.3f}",
                    f"{s['rel_mse']:.2e}",
                    f"{s['sqnr_db']:.1f}",
                    f"{s['max_abs']:.3g}",
                )
                for v, s in summary.items()
            ),
        ),
        Block(
            "p",
            f"Measured on the {len(q['layers'])} linear layers QLoRA quantizes "
            f"({summary[mine]['params']:,} weights, block {q['blocksize']}), quantized and "
            "dequantized by bitsandbytes from the saved bf16 weights before any forward pass. "
            "Bits count the packed codes and their quantization constants; the theory is "
            "4 + 32/64 = 4.5 without double quantization and 4 + 8/64 + 32/(64·256) = 4.127 with "
            "it. Relative MSE is ‖W − Q(W)‖² / ‖W‖², weighted by layer size.",
        ),
        Block(
            "table",
            headers=(f"layers {mine} hurts most", "relative MSE", "SQNR (dB)", "max abs error"),
            rows=tuple(
                (
                    f"`{w['layer']}`",
                    f"{w['rel_mse']:.2e}",
                    f"{w['sqnr_db']:.1f}",
                    f"{w['max_abs']:.3g}",
                )
                for w in q["worst_layers"]
            ),
        ),
    ]
