"""Report statistics on hand-computed cases: win rates, bootstrap intervals, Bradley–Terry, KL."""

import numpy as np
import pytest

from align.report import stats


def test_win_rate_counts_ties_half():
    outcomes = [stats.outcome(a, b) for a, b in [(1, 0), (1, 0), (1, 0), (0.5, 0.5), (0, 1)]]
    assert outcomes == [1.0, 1.0, 1.0, 0.5, 0.0]
    assert stats.win_rate(outcomes) == pytest.approx(0.7)
    summary = stats.win_rate_summary(outcomes, n_boot=500, seed=0)
    assert (summary["wins"], summary["ties"], summary["losses"], summary["n"]) == (3, 1, 1, 5)


def test_prompt_outcome_averages_all_sample_pairs():
    # a's samples [1, 0] against b's [0.5]: one win, one loss -> 0.5; against [0, 0]: 2 wins + 2 ties -> 0.75
    assert stats.prompt_outcome([1, 0], [0.5]) == 0.5
    assert stats.prompt_outcome([1, 0], [0, 0]) == 0.75


def test_bootstrap_interval_contains_estimate_shrinks_and_is_deterministic():
    rng = np.random.default_rng(1)
    small = rng.choice([0.0, 0.5, 1.0], size=40, p=[0.3, 0.1, 0.6])
    large = np.tile(small, 25)  # same mean, 25 times the prompts
    lo_s, hi_s = stats.bootstrap(small, seed=0)
    lo_l, hi_l = stats.bootstrap(large, seed=0)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3  # width ~ 1/sqrt(n): 5 times narrower
    assert stats.bootstrap(small, seed=0) == (lo_s, hi_s)
    assert stats.bootstrap(small, seed=1) != (lo_s, hi_s)
    assert stats.bootstrap([1.0, 1.0, 1.0]) == (1.0, 1.0)
    with pytest.raises(ValueError):
        stats.win_rate([])


def test_bradley_terry_recovers_known_order():
    true = np.array([1.5, -0.5, 0.5, -1.5])  # strengths of items 0..3: order 0 > 2 > 1 > 3
    rng = np.random.default_rng(0)
    groups = []
    for _ in range(300):  # "prompts", each comparing every pair once
        group = []
        for i in range(4):
            for j in range(i + 1, 4):
                p = 1 / (1 + np.exp(-(true[i] - true[j])))
                group.append((i, j, float(rng.random() < p)))
        groups.append(group)
    fit = stats.bradley_terry_bootstrap(groups, 4, n_boot=50, seed=0)
    assert fit["rank"] == [1, 3, 2, 4]
    scores = np.array(fit["scores"])
    assert abs(scores.mean()) < 1e-9
    assert np.allclose(scores, true - true.mean(), atol=0.3)
    assert all(lo <= s <= hi for lo, s, hi in zip(fit["low"], fit["scores"], fit["high"]))


def test_bradley_terry_stays_finite_when_one_item_always_wins():
    scores = stats.bradley_terry([(0, 1, 1.0)] * 20, 2)
    assert np.all(np.isfinite(scores)) and scores[0] > scores[1]
    tied = stats.bradley_terry([(0, 1, 0.5)] * 10, 2)
    assert np.allclose(tied, 0, atol=1e-6)


def test_kl_estimate():
    est = stats.kl_estimate([-2.0, -4.0, -6.0], [-3.0, -4.5, -6.5], lengths=[2, 4, 4], n_boot=200)
    assert est["kl"] == pytest.approx(2.0 / 3)
    assert est["kl_per_token"] == pytest.approx(2.0 / 10)
    assert est["low"] <= est["kl"] <= est["high"] and est["n"] == 3
    same = stats.kl_estimate([-1.0, -2.0], [-1.0, -2.0])
    assert same["kl"] == 0.0 and same["stderr"] == 0.0


def test_cluster_bootstrap_resamples_whole_groups():
    from align.report.stats import bootstrap, cluster_bootstrap

    values = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    # groups of one: the ordinary bootstrap, draw for draw
    assert cluster_bootstrap([[v] for v in values], n_boot=500, seed=3) == bootstrap(values, n_boot=500, seed=3)
    # the same outcomes where each prompt's pairs agree: fewer independent units, a wider interval
    grouped = [[1.0] * 4, [0.0] * 4, [1.0] * 4, [1.0] * 4, [0.0] * 4]
    flat = [v for g in grouped for v in g]
    low, high = cluster_bootstrap(grouped, n_boot=2000, seed=0)
    flat_low, flat_high = bootstrap(flat, n_boot=2000, seed=0)
    assert high - low > 1.5 * (flat_high - flat_low)
    # unequal groups: the pooled mean, not the mean of group means ({[1, 1, 1], [0]} can only give 0, 3/4 or 1)
    low, high = cluster_bootstrap([[1.0, 1.0, 1.0], [0.0]], n_boot=400, seed=1)
    assert (low, high) == (0.0, 1.0)
    with pytest.raises(ValueError):
        cluster_bootstrap([])
