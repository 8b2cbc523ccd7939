"""Small statistics for comparing trained variants: means with 95% intervals over seeds, and paired differences.

Two kinds of interval are reported, because they answer different questions:

* over seeds (`mean_ci` of per-seed accuracies, Student t): how much a result moves when everything random is
  redrawn (reader, data, initialisation, training order). With 3 seeds it is wide (t = 4.30).
* over test samples (`paired_sample_ci`, normal): how precisely the trained models' difference is measured on the
  test set, pooling the samples of every seed; it ignores training variance, so it is the narrower one.
"""

import math

# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30; larger df use the normal 1.96.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the half-width factor of a two-sided 95% interval with `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"df={df} must be >= 1.")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(values) -> dict:
    """Mean and two-sided 95% Student-t interval of `values` (e.g. one accuracy per seed).

    Returns:
        `{"mean", "low", "high", "half_width", "n"}`; with one value the interval is undefined (`None`).
    """
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value.")
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "low": None, "high": None, "half_width": None, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half, "n": n}


def paired_sample_ci(a, b) -> dict:
    """Mean of the per-sample differences `a[i] - b[i]` (e.g. 0/1 correctness of two models on the same test
    samples, pooled over seeds) with a normal 95% interval.

    Returns:
        `{"mean", "low", "high", "half_width", "n"}`.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}.")
    return mean_ci_normal([float(x) - float(y) for x, y in zip(a, b)])


def mean_ci_normal(values) -> dict:
    """Mean and normal-approximation 95% interval (1.96 standard errors) of many `values`."""
    values = [float(v) for v in values]
    n = len(values)
    if n < 2:
        raise ValueError(f"mean_ci_normal needs at least two values, got {n}.")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half, "n": n}


def format_ci(ci: dict, scale: float = 100.0, digits: int = 1) -> str:
    """`"mean [low, high]"` (scaled, e.g. to percent); `"mean"` alone when the interval is undefined."""
    mean = f"{scale * ci['mean']:.{digits}f}"
    if ci.get("low") is None:
        return mean
    return f"{mean} [{scale * ci['low']:.{digits}f}, {scale * ci['high']:.{digits}f}]"


__all__ = ["format_ci", "mean_ci", "mean_ci_normal", "paired_sample_ci", "t_quantile_975"]
