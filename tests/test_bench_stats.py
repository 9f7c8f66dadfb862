"""The benchmarks' intervals on simulated measurements whose truth is known: ratios over several
processes a variant (`common.replicated_ratio`) and a mean over a few runs (`common.mean_interval`)."""

import numpy as np
import pytest

from benchmarks.common import mean_interval, replicated_ratio


def measurements(rng, true_ratio, processes, cycles, process_sd, noise_sd=0.02, drift_sd=0.2):
    """Step times [process, cycle] of two variants: the machine's drift shared by every process
    of a cycle, a speed of each process' own for all its cycles, and noise per block."""
    drift = rng.normal(0, drift_sd, cycles)

    def variant(scale):
        own = rng.normal(0, process_sd, (processes, 1))
        return scale * np.exp(drift + own + rng.normal(0, noise_sd, (processes, cycles)))

    return variant(true_ratio), variant(1.0)


def covered(true_ratio, r):
    return r["ci_low"] <= true_ratio <= r["ci_high"]


def test_the_interval_includes_each_process_own_speed():
    rng = np.random.default_rng(0)
    trials, over_processes, over_cycles = 100, 0, 0
    for t in range(trials):
        a, b = measurements(rng, 1.1, processes=4, cycles=30, process_sd=0.05)
        over_processes += covered(1.1, replicated_ratio([(1, a), (-1, b)], iters=500, seed=t))
        # the same runs with each cycle's processes pooled first: an interval over cycles only
        pooled = [(1, np.exp(np.log(a).mean(0, keepdims=True)))]
        pooled.append((-1, np.exp(np.log(b).mean(0, keepdims=True))))
        over_cycles += covered(1.1, replicated_ratio(pooled, iters=500, seed=t))
    # a bootstrap over 4 processes is somewhat narrow ((n - 1) / n of their variance): not 95%
    assert over_processes / trials >= 0.75
    assert over_cycles / trials <= 0.3  # what one process a variant could not show


def test_without_process_effects_the_drift_cancels_and_the_interval_is_near_nominal():
    rng = np.random.default_rng(1)
    trials, hits, widths = 100, 0, []
    for t in range(trials):
        a, b = measurements(rng, 0.8, processes=3, cycles=30, process_sd=0.0)
        r = replicated_ratio([(1, a), (-1, b)], iters=500, seed=t)
        hits += covered(0.8, r)
        widths.append(r["ci_high"] / r["ci_low"])
    assert hits / trials >= 0.85
    # the 20% drift from cycle to cycle is paired out: only the 2% noise per block is left
    assert np.median(widths) < 1.02


def test_a_ratio_of_ratios_and_its_inputs_checked():
    rng = np.random.default_rng(2)
    a, b = measurements(rng, 1.3, processes=2, cycles=20, process_sd=0.0, noise_sd=0.001)
    c, d = measurements(rng, 1.2, processes=2, cycles=20, process_sd=0.0, noise_sd=0.001)
    r = replicated_ratio([(1, a), (-1, b), (-1, c), (1, d)])
    assert r["estimate"] == pytest.approx(1.3 / 1.2, rel=2e-3)
    assert r["ci_low"] <= r["estimate"] <= r["ci_high"]
    assert (r["cycles"], r["processes"]) == (20, 2)
    with pytest.raises(ValueError, match="same non-zero number of cycles"):
        replicated_ratio([(1, a), (-1, b[:, :10])])


def test_a_mean_over_three_runs_covers_the_truth_as_often_as_it_says():
    # bench_e2e's cold runs: a share of about 9% that moves by about half a point from run to run
    rng = np.random.default_rng(3)
    trials = 2000
    runs = rng.normal(0.09, 0.005, (trials, 3))
    hits = [mean_interval(r) for r in runs]
    coverage = np.mean([h["ci_low"] <= 0.09 <= h["ci_high"] for h in hits])
    assert 0.93 <= coverage <= 0.97  # a normal (z) interval over three covers about 81%
    sem = runs.std(axis=1, ddof=1) / np.sqrt(3)
    z = np.mean(np.abs(runs.mean(axis=1) - 0.09) <= 1.96 * sem)
    assert z < 0.85
    r = mean_interval([0.081, 0.082, 0.088])
    assert r["estimate"] == pytest.approx(0.08366667)
    # hand-computed: t(0.975, 2) = 4.3027, sd 0.0037859, so the half-width is 0.0094049
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.0742618, 0.0930716), abs=1e-6)
    assert r["n"] == 3
    with pytest.raises(ValueError, match="at least two"):
        mean_interval([0.08])
