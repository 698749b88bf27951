"""Paired differences with Student-t intervals: the statistic of the mini Table 2 (paired by seed) and of
``generator.tas_effect --versus`` (paired by sample)."""
from __future__ import annotations

import math
import statistics
from typing import Sequence

__all__ = ["t_quantile", "paired_interval"]


def t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom (scipy.stats.t)."""
    from scipy.stats import t as student_t

    return float(student_t.ppf(probability, df))


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> dict:
    """The paired-difference summary of one metric over seeds: {"n", "mean", "std" (n - 1), "half_width",
    "low", "high", "t"}: the two-sided ``confidence`` t-interval ``mean ± t(1 - a/2, n - 1) std / sqrt(n)``.
    NaN (written null) where it cannot be computed: a NaN difference, or fewer than two seeds for the spread."""
    values = [float(v) for v in differences]
    n = len(values)
    nan = {"n": n, "mean": math.nan, "std": math.nan, "half_width": math.nan, "low": math.nan, "high": math.nan,
           "t": math.nan}
    if n == 0 or any(math.isnan(v) for v in values):
        return nan
    mean = statistics.fmean(values)
    if n < 2:
        return {**nan, "mean": mean}
    std = statistics.stdev(values)
    t = t_quantile(0.5 + confidence / 2, n - 1)
    half = t * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "half_width": half, "low": mean - half, "high": mean + half, "t": t}
