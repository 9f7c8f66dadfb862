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

    Returns the QLoRA−LoRA gap and the retention ratio (QLoRA gain over base ÷ LoRA gain over base),
    each with a (1 − alpha) percentile interval. Resamples where LoRA gains nothing are skipped
    for the ratio.
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
        "retention": float((qlora.mean() - base.mean()) / lora_gain) if lora_gain else float("nan"),
        "retention_ci_low": float(np.percentile(ratio, lo_q)) if ratio.size else float("nan"),
        "retention_ci_high": float(np.percentile(ratio, hi_q)) if ratio.size else float("nan"),
        "confidence": 1 - alpha,
        "iters": iters,
    }
    return out


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
