"""Statistics of the report against hand-computed values, and rendering."""

from __future__ import annotations

import numpy as np
import pytest

from qlora_pipeline.reporting.report import Block, to_html, to_markdown
from qlora_pipeline.reporting.stats import paired_bootstrap


def test_paired_bootstrap_point_estimates_and_interval():
    base = np.zeros(100)
    lora = np.r_[np.ones(80), np.zeros(20)]
    qlora = np.r_[np.ones(70), np.zeros(30)]
    out = paired_bootstrap(base, qlora, lora, iters=4000, seed=0)
    assert out["gap"] == pytest.approx(-0.10)
    assert out["retention"] == pytest.approx(70 / 80)
    # Paired items: qlora is a subset of lora's hits, so the gap's sd is sqrt(p(1-p)/n), p=0.1.
    half_width = 1.96 * np.sqrt(0.1 * 0.9 / 100)
    assert out["gap_ci_low"] == pytest.approx(-0.10 - half_width, abs=0.02)
    assert out["gap_ci_high"] == pytest.approx(-0.10 + half_width, abs=0.02)
    assert out["retention_ci_low"] < 70 / 80 < out["retention_ci_high"] <= 1.0


def test_paired_bootstrap_identical_models_have_zero_gap():
    rng = np.random.default_rng(1)
    lora = (rng.random(50) < 0.6).astype(float)
    out = paired_bootstrap(np.zeros(50), lora.copy(), lora, seed=0)
    assert out["gap"] == out["gap_ci_low"] == out["gap_ci_high"] == 0.0
    assert out["retention"] == 1.0


def test_paired_bootstrap_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        paired_bootstrap(np.zeros(3), np.zeros(3), np.zeros(4))


def test_markdown_and_html_render_the_same_blocks(tmp_path):
    blocks = [
        Block("h1", "T"),
        Block("p", "a < b"),
        Block("table", headers=("x", "y"), rows=(("1", "2"),)),
    ]
    md = to_markdown(blocks)
    assert "# T" in md and "| x | y |" in md and "| 1 | 2 |" in md
    page = to_html(blocks, "T", tmp_path)
    assert "<h1>T</h1>" in page and "a &lt; b" in page and "<td>1</td>" in page
