"""Paired statistics on per-sample scores of the same test items."""

from __future__ import annotations

import math

import numpy as np


def paired_bootstrap(
    base: np.ndarray,
    qlora: np.ndarray,
    lora: np.ndarray,
    iters: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Bootstrap over test items (resampled jointly for the three models).

    Returns the QLoRA−LoRA gap, each arm's gain over base, and the retention ratio (QLoRA gain
    over base ÷ LoRA gain over base), each with a (1 − alpha) percentile interval. Resamples where
    LoRA gains nothing are dropped for the ratio and counted (`retention_dropped`). Retention is
    defined only when LoRA's gain is significantly positive (its interval's lower bound > 0);
    otherwise it is NaN, not a ratio of noise.
    """
    n = len(base)
    if not (len(qlora) == len(lora) == n) or n == 0:
        raise ValueError("per-sample scores must be non-empty and of equal length")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(iters, n))
    b, q, lo = base[idx].mean(1), qlora[idx].mean(1), lora[idx].mean(1)
    gap = q - lo
    ok = (lo - b) != 0
    ratio = (q[ok] - b[ok]) / (lo[ok] - b[ok])
    lo_q, hi_q = 100 * alpha / 2, 100 * (1 - alpha / 2)
    lora_gain = lora.mean() - base.mean()
    out = {
        "gap": float(qlora.mean() - lora.mean()),
        "gap_ci_low": float(np.percentile(gap, lo_q)),
        "gap_ci_high": float(np.percentile(gap, hi_q)),
    }
    for arm, resampled, scores in (("qlora", q, qlora), ("lora", lo, lora)):
        out[f"{arm}_gain"] = float(scores.mean() - base.mean())
        out[f"{arm}_gain_ci_low"] = float(np.percentile(resampled - b, lo_q))
        out[f"{arm}_gain_ci_high"] = float(np.percentile(resampled - b, hi_q))
    defined = out["lora_gain_ci_low"] > 0 and ratio.size > 0
    nan = float("nan")
    out.update(
        retention=float((qlora.mean() - base.mean()) / lora_gain) if defined else nan,
        retention_ci_low=float(np.percentile(ratio, lo_q)) if defined else nan,
        retention_ci_high=float(np.percentile(ratio, hi_q)) if defined else nan,
        retention_dropped=int(iters - ok.sum()),
        confidence=1 - alpha,
        iters=iters,
    )
    return out


def paired_difference(
    new: np.ndarray, old: np.ndarray, iters: int = 2000, seed: int = 0, alpha: float = 0.05
) -> dict[str, float]:
    """mean(new) − mean(old) on the same items, with a paired-bootstrap percentile interval."""
    if len(new) != len(old) or len(new) == 0:
        raise ValueError("paired scores must be non-empty and of equal length")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(new), size=(iters, len(new)))
    diff = new[idx].mean(1) - old[idx].mean(1)
    return {
        "estimate": float(new.mean() - old.mean()),
        "ci_low": float(np.percentile(diff, 100 * alpha / 2)),
        "ci_high": float(np.percentile(diff, 100 * (1 - alpha / 2))),
    }


def unpaired_difference(
    new: float, new_se: float, old: float, old_se: float, alpha: float = 0.05
) -> dict[str, float]:
    """new − old for independent samples (no per-item pairing): normal interval from the two
    standard errors. Wider than the paired one; the fallback when the items cannot be paired."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - alpha / 2)
    half = z * math.sqrt(new_se**2 + old_se**2)
    return {"estimate": new - old, "ci_low": new - old - half, "ci_high": new - old + half}


def is_binary(scores: np.ndarray) -> bool:
    """Accuracy-type per-sample scores: every value is 0 or 1."""
    return bool(np.isin(scores, (0.0, 1.0)).all())


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict[str, float | int]:
    """Exact McNemar test on paired 0/1 outcomes of two models on the same items.

    Only discordant items count: `a_only` (a right, b wrong) and `b_only` (b right, a wrong).
    Under the null hypothesis that both are equally accurate, a_only ~ Binomial(a_only + b_only,
    1/2); the p-value is the two-sided exact binomial tail, min(1, 2 * P[X <= min(a_only, b_only)]).
    """
    if len(a) != len(b) or not (is_binary(a) and is_binary(b)):
        raise ValueError("McNemar needs paired 0/1 scores of equal length")
    a_only = int(((a == 1) & (b == 0)).sum())
    b_only = int(((a == 0) & (b == 1)).sum())
    n = a_only + b_only
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2 * tail)}
