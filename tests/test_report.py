"""Statistics of the report against scipy and hand-computed values, the quality gate, the
accepted-run history, and rendering."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import yaml
from conftest import ROOT, conf_default

from qlora_pipeline.config.schema import GateConfig
from qlora_pipeline.reporting import gate
from qlora_pipeline.reporting.document import Block, to_html, to_markdown
from qlora_pipeline.reporting.figures import per_sample_scores, task_figures
from qlora_pipeline.reporting.history import accepted_metrics, items_csv, read_items
from qlora_pipeline.reporting.sections import (
    config_diff,
    noise_floor_text,
    retention_text,
    seed_blocks,
)
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
    assert "<code>x</code>" in to_html(
        [Block("p", "run `x` now")], "T", tmp_path
    )  # no raw Markdown


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


def _figures(base: np.ndarray, qlora: np.ndarray, lora: np.ndarray, **past) -> dict:
    """A task's figures as the report computes them from per-item scores (one training seed)."""
    past = {
        "accepted": past.get("accepted", (None, None)),
        "anchor": past.get("anchor", (None, None)),
    }
    return task_figures(base, {"qlora": [qlora], "lora": [lora]}, [0], "exact_match,strict", past)


def _hits(n_right: int, n: int = 200) -> np.ndarray:
    return np.r_[np.ones(n_right), np.zeros(n - n_right)]


BASE = np.zeros(200)
TRAINED = _hits(150)  # 0.75
_NO_PAST: dict = {"accepted": (None, None), "anchor": (None, None)}


def _verdicts(figures: dict, gate_cfg: GateConfig | None = None) -> dict[str, str]:
    found = gate.conditions({"t": figures}, gate_cfg or conf_default("report.gate"))
    return {c["condition"]: c["verdict"] for c in found}


def test_the_gate_does_not_fail_on_a_one_item_difference():
    """One item fewer right than the accepted run (paired, n=200) is noise: PASS."""
    accepted = {"qlora": 0.75, "qlora_stderr": 0.03}
    figures = _figures(BASE, _hits(149), TRAINED, accepted=(accepted, TRAINED))
    assert figures["vs_accepted"]["paired"] and figures["vs_accepted"]["estimate"] == pytest.approx(
        -0.005
    )
    verdict, reasons, _ = gate.check({"t": figures}, conf_default("report.gate"))
    assert (verdict, reasons) == ("PASS", [])


def test_the_gate_fails_on_a_stated_drop_against_the_accepted_run():
    """-10 points on n=200, paired on the same items: significantly worse, FAIL."""
    figures = _figures(BASE, _hits(130), _hits(130), accepted=({"qlora": 0.75}, TRAINED))
    verdict, reasons, _ = gate.check({"t": figures}, conf_default("report.gate"))
    assert verdict == "FAIL"
    assert reasons == [
        "t: QLoRA vs accepted QLoRA: -0.100 "
        f"[{figures['vs_accepted']['ci_low']:+.3f}, {figures['vs_accepted']['ci_high']:+.3f}], "
        "upper bound ≥ +0.000 does not hold"
    ]
    assert figures["vs_accepted"]["ci_high"] < 0


def test_the_gate_fails_an_untrained_adapter():
    """No gain over base: the gain's interval is [0, 0], below the required lower bound."""
    verdicts = _verdicts(_figures(BASE, BASE.copy(), TRAINED))
    assert verdicts["QLoRA gain over base"] == "FAIL" and verdicts["LoRA gain over base"] == "PASS"


def test_the_gate_catches_slow_drift_past_the_cumulative_budget():
    """4 points below the accepted run is within noise (items lost and won), but the 11 points
    lost since the anchor run are beyond max_cumulative_drop (0.05) even at the interval's edge."""
    now = np.zeros(200)
    now[:120], now[140:148] = 1, 1  # 128 right
    figures = _figures(
        BASE, now, now, accepted=({"qlora": 0.68}, _hits(136)), anchor=({"qlora": 0.75}, TRAINED)
    )
    assert figures["vs_accepted"]["estimate"] == pytest.approx(-0.04)
    assert figures["vs_anchor"]["estimate"] == pytest.approx(-0.11)
    verdicts = _verdicts(figures)
    assert verdicts["QLoRA vs accepted QLoRA"] == "PASS"
    assert verdicts["QLoRA vs anchor QLoRA (cumulative drift)"] == "FAIL"
    assert (
        _verdicts(figures, conf_default("report.gate", max_cumulative_drop=None))[
            "QLoRA vs anchor QLoRA (cumulative drift)"
        ]
        == "n/a"
    )


def test_the_accepted_runs_shipped_score_is_read_in_either_layout():
    """Unpaired, the shipped QLoRA is compared: `shipped.qlora` in runs with training seeds,
    the task's `qlora` figure in runs from before them (one seed, the one that shipped)."""
    now = _hits(140)
    old = _figures(BASE, now, now, accepted=({"qlora": 0.75, "qlora_stderr": 0.03}, None))
    new = _figures(
        BASE,
        now,
        now,
        accepted=({"qlora": 0.1, "shipped": {"qlora": {"value": 0.75, "stderr": 0.03}}}, None),
    )
    assert old["vs_accepted"] == new["vs_accepted"]
    assert old["vs_accepted"]["estimate"] == pytest.approx(0.70 - 0.75)


def test_without_per_item_scores_the_comparison_is_unpaired_and_wider():
    paired = _figures(
        BASE, _hits(149), TRAINED, accepted=({"qlora": 0.75, "qlora_stderr": 0.0306}, TRAINED)
    )
    unpaired = _figures(
        BASE, _hits(149), TRAINED, accepted=({"qlora": 0.75, "qlora_stderr": 0.0306}, None)
    )
    assert not unpaired["vs_accepted"]["paired"]
    width = lambda d: d["ci_high"] - d["ci_low"]  # noqa: E731
    assert width(unpaired["vs_accepted"]) > 3 * width(paired["vs_accepted"])


def test_retention_is_undefined_when_lora_gain_is_not_significant():
    lora = _hits(2)  # 1% over a base of 0: an interval that includes 0
    figures = _figures(BASE, _hits(1), lora)
    assert figures["lora_gain_ci_low"] <= 0 and figures["retention"] != figures["retention"]
    verdicts = _verdicts(figures, conf_default("report.gate", min_retention=0.9))
    assert verdicts["retention"] == "n/a"  # not gated on an undefined ratio
    c = next(
        c
        for c in gate.conditions({"t": figures}, conf_default("report.gate"))
        if c["condition"] == "retention"
    )
    assert "undefined" in c["note"]
    assert retention_text(figures).startswith("undefined")


def test_non_inferiority_uses_the_lower_bound():
    """A point estimate inside the margin still fails when the interval reaches past it."""
    lora = _hits(150)
    qlora = np.r_[np.ones(140), np.zeros(60)]  # -0.05: its lower bound is below -0.05
    verdicts = _verdicts(_figures(BASE, qlora, lora))
    assert verdicts["QLoRA − LoRA (non-inferiority)"] == "FAIL"
    assert _verdicts(_figures(BASE, lora.copy(), lora))["QLoRA − LoRA (non-inferiority)"] == "PASS"


def _flip(scores: np.ndarray, items: range) -> np.ndarray:
    out = scores.copy()
    out[list(items)] = 1 - out[list(items)]
    return out


def test_seeds_give_the_gap_per_seed_pooled_and_the_noise_floor():
    """Two seeds: each seed's gap on its own pair, the pooled gap on item means over seeds, and
    the noise floor from each arm against itself (hand-counted flips)."""
    q0, lo0 = _hits(150), _hits(140)
    q1 = _flip(q0, range(140, 146))  # 6 right items wrong: −0.030 against seed 0
    lo1 = _flip(lo0, range(140, 150))  # 10 wrong items right: +0.050
    t = task_figures(
        BASE, {"qlora": [q0, q1], "lora": [lo0, lo1]}, [3, 8], "exact_match,strict", _NO_PAST
    )
    assert [s["seed"] for s in t["per_seed"]] == [3, 8]
    assert [s["gap"]["estimate"] for s in t["per_seed"]] == pytest.approx([0.05, -0.03])
    assert t["gap"] == pytest.approx((0.05 - 0.03) / 2)  # pooled: item means over seeds
    assert t["qlora"] == pytest.approx((0.75 + 0.72) / 2) and t["lora"] == pytest.approx(0.725)
    floor = {arm: d[0] for arm, d in t["same_arm"].items()}
    assert floor["qlora"]["seeds"] == [3, 8] and floor["qlora"]["estimate"] == pytest.approx(-0.03)
    assert floor["lora"]["estimate"] == pytest.approx(0.05)
    assert floor["lora"]["ci_low"] > 0  # 10 items, all one way: significant
    assert t["noise_floor"] == pytest.approx(0.05)
    assert t["shipped"]["seed"] == 3 and t["shipped"]["qlora"]["value"] == pytest.approx(0.75)
    assert t["per_seed"][0]["mcnemar"]["a_only"] == 10  # McNemar per seed, on 0/1 scores
    assert "LoRA seed 8 vs 3 +0.050" in noise_floor_text(t)
    text = to_markdown(seed_blocks({"tasks": {"t": t}}))
    assert "| t | LoRA | 8 vs 3 | +0.050 [" in text and "| t | 8 | 0.720 | 0.750 | -0.030 [" in text


def test_one_seed_has_no_noise_floor_and_says_so():
    t = _figures(BASE, TRAINED, TRAINED)
    assert t["noise_floor"] is None and t["same_arm"] == {"qlora": [], "lora": []}
    assert noise_floor_text(t).startswith("noise floor: not measured (one training seed")
    assert "Set `seeds` to two or more" in to_markdown(seed_blocks({"tasks": {"t": t}}))


def test_gate_only_checks_the_gated_tasks():
    good = _figures(BASE, TRAINED, TRAINED)
    bad = _figures(BASE, BASE.copy(), TRAINED)
    tasks = {"t": good, "u": bad}
    assert gate.check(tasks, conf_default("report.gate", tasks=["t"]))[0] == "PASS"
    assert gate.check(tasks, conf_default("report.gate"))[0] == "FAIL"
    assert gate.check(tasks, conf_default("report.gate", tasks=["v"]))[1] == [
        "v: evaluated: not evaluated"
    ]


def test_per_item_scores_keep_each_filter_apart(tmp_path):
    """gsm8k-style samples: one row per item and filter; each key reads only its filter."""
    rows = [
        {"doc_id": d, "filter": f, "exact_match": float(f == "strict" and d == 0)}
        for d in (1, 0)
        for f in ("strict", "flexible")
    ]
    (tmp_path / "samples_t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert per_sample_scores(tmp_path, "t", "exact_match,strict").tolist() == [1.0, 0.0]
    assert per_sample_scores(tmp_path, "t", "exact_match,flexible").tolist() == [0.0, 0.0]


def test_items_csv_round_trips_keyed_by_task_and_metric():
    items = {"t": {"base": np.zeros(3), "qlora": np.array([1.0, 0.0, 1.0])}}
    read = read_items(items_csv(items, {"t": "exact_match,strict"}))
    assert list(read) == [("t", "exact_match,strict")]
    assert read[("t", "exact_match,strict")]["qlora"].tolist() == [1.0, 0.0, 1.0]


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
    params["paths"]["output_roots"] = [str(tmp_path.parent)]  # a report outside the project
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["--params", str(tmp_path / "params.yaml"), "gate"]
    assert main(args) == 2
    assert "metrics.json: not found; run the report stage first" in capsys.readouterr().err
    (tmp_path / "metrics.json").write_text(json.dumps({"verdict": "FAIL", "reasons": ["t: x"]}))
    assert main(args) == 1
    assert capsys.readouterr().out.strip() == "quality gate: FAIL (t: x)"
    (tmp_path / "metrics.json").write_text(json.dumps({"verdict": "PASS", "reasons": []}))
    assert main(args) == 0


def test_the_loss_plot_data_is_one_column_per_arm_by_step():
    from qlora_pipeline.reporting.report import loss_csv

    text = loss_csv(
        {"qlora": ([1.0, 2.0, 3.0], [2.5, 1.5, 1.25]), "lora": ([1.0, 3.0], [2.0, 1.0])}
    )
    assert text == "step,qlora,lora\n1,2.5,2.0\n2,1.5,\n3,1.25,1.0\n"
