"""The statistics every study reports, on scipy: paired differences with t-intervals, Holm's correction, bootstrap
intervals for a spread, McNemar's test on per-image predictions, a per-seed slope, and the verdict rule that turns
an interval into "agrees / disagrees / inconclusive" with a claim stated before the runs.

Runs are paired by seed: with the same seed every config sees the same data order (and the same training subset),
so ``treatment[s] - control[s]`` removes the data's share of the seed-to-seed noise (initial weights still differ
between architectures, so how much pairing helps varies; the paired test is valid either way).  Differences are in accuracy *points*
(percent) wherever the caller passes accuracies times 100.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _st

ALPHA = 0.05
DIRECTIONS = ("greater", "less", "equal", "no_less", "no_greater")


@dataclass
class Paired:
    """Mean of ``treatment - control`` over paired seeds, its 95% t-interval and a two-sided p-value."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    p: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_dict(self) -> dict:
        return {**asdict(self), "half_width": self.half_width}


def paired(treatment, control, confidence: float = 1 - ALPHA) -> Paired:
    """Paired t-interval of ``treatment - control`` (equal-length sequences, same seed at the same position)."""
    a, b = np.asarray(treatment, float), np.asarray(control, float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}; pair runs by seed")
    d = a - b
    n = len(d)
    if n < 2:
        return Paired(n, float(d.mean()) if n else math.nan, math.nan, math.nan, math.nan, math.nan)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return Paired(n, mean, 0.0, mean, mean, 1.0 if mean == 0 else 0.0)
    low, high = _st.t.interval(confidence, n - 1, loc=mean, scale=sd / math.sqrt(n))
    return Paired(n, mean, sd, float(low), float(high), float(_st.ttest_1samp(d, 0.0).pvalue))


def welch(a, b, confidence: float = 1 - ALPHA) -> Paired:
    """Difference of means ``mean(a) - mean(b)`` of two independent samples (e.g. one claim's per-seed differences
    in two studies), Welch's t-interval and two-sided p (scipy); ``n`` is len(a) + len(b), ``sd`` NaN."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return Paired(len(a) + len(b), math.nan, math.nan, math.nan, math.nan, math.nan)
    test = _st.ttest_ind(a, b, equal_var=False)
    ci = test.confidence_interval(confidence)
    return Paired(len(a) + len(b), float(a.mean() - b.mean()), math.nan, float(ci.low), float(ci.high),
                  float(test.pvalue))


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down; monotone; capped at 1), NaN kept as NaN."""
    p = np.asarray(pvalues, float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    m = len(q)
    if not m:
        return out
    order = np.argsort(q)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * q[order])
    res = np.empty(m)
    res[order] = np.minimum(adjusted, 1.0)
    out[ok] = res
    return out


def verdict(low: float, high: float, p_adjusted: float, direction: str, margin: float = 0.0,
            alpha: float = ALPHA) -> str:
    """The pre-registered decision rule for a claim about a difference (treatment - control).

    * ``greater`` / ``less``: *disagrees* when the interval lies inside [-margin, margin] (an effect too small to
      matter, when a margin is given: this comes first, so a significant effect smaller than the margin does not
      read as support), or when it is significant on the other side; *agrees* when the Holm-adjusted p < alpha
      and the interval lies on the claimed side of 0; else *inconclusive*.
    * ``equal`` (within ``margin`` either way): *agrees* when the interval lies inside [-margin, margin];
      *disagrees* when it lies entirely outside; else *inconclusive*.
    * ``no_less`` / ``no_greater`` (one-sided: not worse / not better by more than ``margin``): *agrees* when the
      interval's lower end is above -margin / its upper end below +margin; *disagrees* when the whole interval is
      beyond that bound; else *inconclusive*.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is invalid: use one of {DIRECTIONS}")
    if any(math.isnan(v) for v in (low, high)):
        return "inconclusive"
    if direction == "no_less":
        return "agrees" if low > -margin else "disagrees" if high < -margin else "inconclusive"
    if direction == "no_greater":
        return "agrees" if high < margin else "disagrees" if low > margin else "inconclusive"
    if direction == "equal":
        if -margin <= low and high <= margin:
            return "agrees"
        if low > margin or high < -margin:
            return "disagrees"
        return "inconclusive"
    sign = 1 if direction == "greater" else -1
    lo, hi = sorted((sign * low, sign * high))
    significant = not math.isnan(p_adjusted) and p_adjusted < alpha
    if (margin > 0 and -margin <= lo and hi <= margin) or (significant and hi < 0):
        return "disagrees"
    if significant and lo > 0:
        return "agrees"
    return "inconclusive"


def bootstrap_sd(values, confidence: float = 1 - ALPHA, seed: int = 0, resamples: int = 9999):
    """(sd, low, high): the seed standard deviation with a percentile bootstrap interval."""
    x = np.asarray(values, float)
    sd = float(x.std(ddof=1)) if len(x) > 1 else math.nan
    if len(x) < 3:
        return sd, math.nan, math.nan
    res = _st.bootstrap((x,), lambda v, axis: v.std(ddof=1, axis=axis), confidence_level=confidence,
                        n_resamples=resamples, method="percentile", random_state=np.random.default_rng(seed))
    return sd, float(res.confidence_interval.low), float(res.confidence_interval.high)


def bootstrap_sd_difference(a, b, confidence: float = 1 - ALPHA, seed: int = 0, resamples: int = 9999):
    """(sd(a) - sd(b), low, high), resampling seeds jointly (a and b paired by seed)."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    diff = float(x.std(ddof=1) - y.std(ddof=1)) if len(x) > 1 else math.nan
    if len(x) < 3:
        return diff, math.nan, math.nan
    res = _st.bootstrap((x, y), lambda u, v, axis: u.std(ddof=1, axis=axis) - v.std(ddof=1, axis=axis),
                        paired=True, confidence_level=confidence, n_resamples=resamples, method="percentile",
                        random_state=np.random.default_rng(seed))
    return diff, float(res.confidence_interval.low), float(res.confidence_interval.high)


def pitman_morgan(a, b) -> float:
    """Two-sided p of the Pitman-Morgan test that paired samples ``a`` and ``b`` (paired by seed) have equal
    variances: var(a) = var(b) exactly when a - b and a + b are uncorrelated, so it is the t-test of that
    correlation (n - 2 degrees of freedom).  NaN below 3 pairs."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.shape} vs {y.shape}; pair runs by seed")
    d, s = x - y, x + y
    if len(x) < 3 or d.std() == 0 or s.std() == 0:
        return math.nan
    return float(_st.pearsonr(d, s).pvalue)


def mcnemar(correct_a, correct_b) -> dict:
    """Exact McNemar test of two models on the same images: ``correct_*`` are per-image booleans."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape:
        raise ValueError("McNemar needs the two models' predictions on the same images")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    p = float(_st.binomtest(only_a, n, 0.5).pvalue) if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p": p, "acc_a": float(a.mean()), "acc_b": float(b.mean())}


def slope_interval(per_seed: dict, confidence: float = 1 - ALPHA) -> Paired:
    """Least-squares slope of y on x fitted per seed ({seed: (x, y)}), then a t-interval over the seeds' slopes:
    the seed, not the layer, is the unit of replication."""
    slopes = [float(_st.linregress(np.asarray(x, float), np.asarray(y, float)).slope)
              for x, y in per_seed.values() if len(x) >= 2]
    return paired(slopes, np.zeros(len(slopes)), confidence)


def empirical_p(observed: float, null_draws) -> float:
    """One-sided p-value of ``observed`` against draws from a null: (1 + #{draw >= observed}) / (1 + draws)."""
    draws = np.asarray(null_draws, float)
    return float((1 + (draws >= observed).sum()) / (1 + len(draws)))
