"""Statistics of the report against scipy and hand-computed values, the quality gate, the
accepted-run history, and rendering."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import yaml
from conftest import ROOT

from qlora_pipeline.config.schema import GateConfig
from qlora_pipeline.reporting import gate
from qlora_pipeline.reporting.gate import accepted_metrics
from qlora_pipeline.reporting.report import Block, config_diff, to_html, to_markdown
from qlora_pipeline.reporting.stats import mcnemar, paired_bootstrap


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


def test_mcnemar_matches_scipy_exact_binomial_test():
    from scipy.stats import binomtest

    rng = np.random.default_rng(3)
    for n, p_a, p_b in ((200, 0.75, 0.73), (40, 0.5, 0.8), (15, 0.9, 0.9)):
        a = (rng.random(n) < p_a).astype(float)
        b = (rng.random(n) < p_b).astype(float)
        out = mcnemar(a, b)
        assert out["a_only"] == int(((a == 1) & (b == 0)).sum())
        assert out["b_only"] == int(((a == 0) & (b == 1)).sum())
        expected = binomtest(out["a_only"], out["a_only"] + out["b_only"], 0.5).pvalue
        assert out["p_value"] == pytest.approx(expected, rel=1e-12)
    # by hand: 1 vs 7 discordant items -> 2 * (1 + 8) / 2**8
    a = np.r_[np.ones(1), np.zeros(7), np.ones(5)]
    b = np.r_[np.zeros(1), np.ones(7), np.ones(5)]
    assert mcnemar(a, b) == {"a_only": 1, "b_only": 7, "p_value": pytest.approx(18 / 256)}
    assert mcnemar(a, a)["p_value"] == 1.0
    with pytest.raises(ValueError):
        mcnemar(np.array([0.5]), np.array([1.0]))


def test_paired_bootstrap_interval_matches_scipy():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(7)
    base = (rng.random(300) < 0.1).astype(float)
    lora = (rng.random(300) < 0.7).astype(float)
    qlora = np.where(rng.random(300) < 0.9, lora, 1 - lora)
    ours = paired_bootstrap(base, qlora, lora, iters=20000, seed=0)

    def scipy_interval(data, statistic):
        return bootstrap(
            data,
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=20000,
            method="percentile",
            random_state=1,
        ).confidence_interval

    theirs = scipy_interval((qlora, lora), lambda q, lo, axis: q.mean(axis) - lo.mean(axis))
    assert ours["gap_ci_low"] == pytest.approx(theirs.low, abs=0.006)
    assert ours["gap_ci_high"] == pytest.approx(theirs.high, abs=0.006)
    ratio = scipy_interval(
        (base, qlora, lora),
        lambda b, q, lo, axis: (q.mean(axis) - b.mean(axis)) / (lo.mean(axis) - b.mean(axis)),
    )
    assert ours["retention_ci_low"] == pytest.approx(ratio.low, abs=0.01)
    assert ours["retention_ci_high"] == pytest.approx(ratio.high, abs=0.01)


FIGURES = {
    "qlora": 0.75,
    "lora": 0.74,
    "qlora_gain": 0.75,
    "lora_gain": 0.74,
    "retention": 1.01,
    "gap": 0.01,
    "qlora_vs_accepted": None,
}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, None),
        ({"lora_gain": 0.2}, "t: LoRA gain over base +0.200 < min_gain_over_base 0.5"),
        ({"retention": 0.8}, "t: retention 0.800 < min_retention 0.9"),
        ({"retention": float("nan")}, "t: retention undefined < min_retention 0.9"),
        ({"gap": -0.08}, "t: QLoRA trails LoRA by 0.080 > max_drop_vs_lora 0.05"),
        ({"qlora_vs_accepted": -0.02}, "t: QLoRA vs accepted -0.020 < min_gain_vs_accepted 0.0"),
        ({"qlora_vs_accepted": 0.0}, None),
    ],
)
def test_gate_names_each_failed_condition(change, reason):
    verdict, reasons = gate.check({"t": {**FIGURES, **change}}, GateConfig())
    assert (verdict, reasons) == (("PASS", []) if reason is None else ("FAIL", [reason]))


def test_gate_only_checks_the_gated_tasks():
    tasks = {"t": FIGURES, "u": {**FIGURES, "retention": 0.1}}
    assert gate.check(tasks, GateConfig(tasks=["t"]))[0] == "PASS"
    assert gate.check(tasks, GateConfig())[0] == "FAIL"
    assert gate.check(tasks, GateConfig(tasks=["v"]))[1] == ["v: not evaluated"]


def _git(cwd, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def test_accepted_metrics_come_from_the_git_history(tmp_path):
    metrics = tmp_path / "reports" / "metrics.json"
    _git(tmp_path, "init", "-q")
    assert accepted_metrics("HEAD", metrics) == (
        None,
        "no reports/metrics.json at HEAD (no accepted run yet)",
    )
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"tasks": {"t": {"qlora": 0.5}}}))
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "accept")
    metrics.write_text(json.dumps({"tasks": {"t": {"qlora": 0.9}}}))  # the new, unaccepted run
    found, where = accepted_metrics("HEAD", metrics)
    assert found == {"tasks": {"t": {"qlora": 0.5}}} and where.startswith(
        "reports/metrics.json at HEAD ("
    )
    assert accepted_metrics(None, metrics)[0] is None
    assert (
        accepted_metrics("HEAD", tmp_path.parent / "elsewhere.json")[1] == "not in a git repository"
    )


def test_config_diff_is_the_quantization_block_only():
    from qlora_pipeline.tracking.dvc import compose

    _, cfg = compose(ROOT, [])
    diff = config_diff(cfg.methods["qlora"], cfg.methods["lora"])
    assert ("quantization.quant_type", "nf4", "—") in diff
    assert ("quantization.double_quant", "True", "—") in diff
    assert all(key.startswith("quantization.") for key, _, _ in diff)
    _, cfg = compose(ROOT, ["methods.lora.optimizer=adamw_torch"])
    diff = config_diff(cfg.methods["qlora"], cfg.methods["lora"])
    assert ("optimizer", "paged_adamw_32bit", "adamw_torch") in diff


def test_gate_command_exits_nonzero_on_fail(tmp_path, capsys):
    from qlora_pipeline.cli import main

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"]["report"] = str(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["--params", str(tmp_path / "params.yaml"), "gate"]
    assert main(args) == 2
    assert "metrics.json: not found; run the report stage first" in capsys.readouterr().err
    (tmp_path / "metrics.json").write_text(json.dumps({"verdict": "FAIL", "reasons": ["t: x"]}))
    assert main(args) == 1
    assert capsys.readouterr().out.strip() == "quality gate: FAIL (t: x)"
    (tmp_path / "metrics.json").write_text(json.dumps({"verdict": "PASS", "reasons": []}))
    assert main(args) == 0
