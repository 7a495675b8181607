"""The statistics the studies' verdicts rest on, against values computed independently."""
import math

import numpy as np
import pytest
from scipy import stats as st

from workbench.analysis.stats import (bootstrap_sd, bootstrap_sd_difference, empirical_p, holm, mcnemar, paired, pitman_morgan, slope_interval, verdict, welch)


def test_paired_interval_matches_a_hand_computed_t_interval():
    a, b = [81.2, 80.9, 81.5, 80.7, 81.1], [80.6, 80.8, 80.9, 80.1, 80.8]
    d = np.subtract(a, b)
    half = st.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    r = paired(a, b)
    assert r.n == 5 and r.mean == pytest.approx(d.mean())
    assert (r.low, r.high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert r.p == pytest.approx(st.ttest_rel(a, b).pvalue)
    assert r.half_width == pytest.approx(half)


def test_pairing_is_what_shrinks_the_interval():
    """Seed effects shared by both arms cancel in a paired interval but not in an unpaired one."""
    seed_effect = np.array([-1.0, 0.5, 1.2, -0.7, 0.1])
    a, b = 80 + seed_effect + np.array([0.3, 0.25, 0.35, 0.3, 0.28]), 80 + seed_effect
    r = paired(a, b)
    assert r.low > 0 and r.half_width < 0.1
    unpaired = st.ttest_ind(a, b)
    assert unpaired.pvalue > 0.5  # the same data, analysed unpaired, sees nothing


def test_paired_refuses_unequal_lengths_and_handles_one_seed():
    with pytest.raises(ValueError, match="pair runs by seed"):
        paired([1, 2, 3], [1, 2])
    r = paired([1.0], [0.0])
    assert r.n == 1 and math.isnan(r.low) and verdict(r.low, r.high, r.p, "greater") == "inconclusive"


def test_holm_matches_the_step_down_definition():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    assert holm(p).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm([0.5, float("nan"), 0.9])
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == 1.0


@pytest.mark.parametrize("low, high, p, direction, margin, expected", [
    (0.2, 0.9, 0.01, "greater", 0, "agrees"),
    (-0.9, -0.2, 0.01, "greater", 0, "disagrees"),
    (-0.2, 0.9, 0.30, "greater", 0, "inconclusive"),
    (0.2, 0.9, 0.08, "greater", 0, "inconclusive"),  # right side, but not significant after Holm
    (-0.9, -0.2, 0.01, "less", 0, "agrees"),
    (-0.1, 0.1, 0.9, "greater", 0.25, "disagrees"),  # too small to matter
    (0.02, 0.10, 0.03, "greater", 0.2, "disagrees"),  # significant, but smaller than the effect that matters
    (0.02, 0.30, 0.03, "greater", 0.2, "agrees"),  # significant, and the interval reaches past the margin
    (-0.3, 0.4, 0.5, "equal", 0.5, "agrees"),
    (0.6, 1.2, 0.01, "equal", 0.5, "disagrees"),
    (0.1, 0.8, 0.04, "equal", 0.5, "inconclusive"),
    (-0.4, 0.9, 0.5, "no_less", 0.5, "agrees"),
    (-0.9, 0.2, 0.5, "no_less", 0.5, "inconclusive"),
    (-1.9, -0.6, 0.01, "no_less", 0.5, "disagrees"),
    (-0.027, 0.007, 0.3, "no_greater", 0.02, "agrees"),
    (0.03, 0.08, 0.01, "no_greater", 0.02, "disagrees"),
])
def test_verdict_rule(low, high, p, direction, margin, expected):
    assert verdict(low, high, p, direction, margin) == expected


def test_verdict_rejects_unknown_directions():
    with pytest.raises(ValueError, match="direction='better'"):
        verdict(0, 1, 0.01, "better")


def test_bootstrap_sd_brackets_the_sample_sd():
    x = [80.1, 80.9, 79.8, 80.4, 81.0, 80.2]
    sd, low, high = bootstrap_sd(x)
    assert sd == pytest.approx(np.std(x, ddof=1)) and low <= sd <= high
    diff, low, high = bootstrap_sd_difference([1, 5, 2, 6, 3], [1.0, 1.1, 0.9, 1.05, 1.0])
    assert diff > 0 and low > 0  # a much wider spread is detected
    assert math.isnan(bootstrap_sd([1.0, 2.0])[1])


def test_mcnemar_counts_discordant_pairs():
    a = np.array([1, 1, 1, 0, 0, 1, 1, 1, 1, 1], bool)
    b = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 1], bool)
    r = mcnemar(a, b)
    assert (r["only_a"], r["only_b"]) == (6, 1)
    assert r["p"] == pytest.approx(st.binomtest(6, 7, 0.5).pvalue)
    assert mcnemar(a, a)["p"] == 1.0


def test_slope_interval_uses_seeds_as_replicates():
    per_seed = {s: ([0, 1, 2, 3], [(0.1 + 0.01 * s) * b for b in range(4)]) for s in range(5)}
    r = slope_interval(per_seed)
    assert r.n == 5 and r.mean == pytest.approx(0.12) and r.low > 0
    noisy = {s: ([0, 1, 2, 3], list(np.random.default_rng(s).normal(size=4))) for s in range(5)}
    assert slope_interval(noisy).low < 0 < slope_interval(noisy).high


def test_empirical_p():
    assert empirical_p(5.0, [1, 2, 3]) == pytest.approx(1 / 4)
    assert empirical_p(0.0, [1, 2, 3]) == pytest.approx(1.0)


def test_pitman_morgan_matches_its_definition_and_rejects_only_unequal_spreads():
    rng = np.random.default_rng(0)
    common = rng.normal(size=12)
    a = common + rng.normal(scale=0.2, size=12)
    b = common + rng.normal(scale=0.2, size=12)
    # the definition: the t-test of corr(a - b, a + b) = 0 on n - 2 degrees of freedom
    d, s = a - b, a + b
    r = np.corrcoef(d, s)[0, 1]
    t = r * np.sqrt(10) / np.sqrt(1 - r ** 2)
    assert pitman_morgan(a, b) == pytest.approx(2 * st.t.sf(abs(t), 10))
    # the same spread is not rejected; a spread three times larger is, against the same seeds
    assert pitman_morgan(a, b) > 0.05
    assert pitman_morgan(3 * a, b) < 0.001
    assert math.isnan(pitman_morgan(a[:2], b[:2]))
    with pytest.raises(ValueError, match="pair runs by seed"):
        pitman_morgan(a, b[:5])


def test_welch_matches_the_textbook_interval():
    a, b = [1.0, 2.0, 4.0, 7.0], [0.5, 0.7, 0.2, 1.1, 0.9]
    out = welch(a, b)
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 5
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 4)  # Welch-Satterthwaite
    half = st.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert out.n == 9 and out.mean == pytest.approx(np.mean(a) - np.mean(b))
    assert (out.low, out.high) == pytest.approx((out.mean - half, out.mean + half))
    assert 0 < out.p < 1 and math.isnan(welch([1.0], b).mean)
