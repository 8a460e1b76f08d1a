"""The numbers of a report: pairwise win rates with bootstrap intervals, Bradley–Terry, KL estimates.

Outcomes are from the first version's side: 1 win, 0.5 tie, 0 loss. With several samples per prompt, a prompt's
outcome is the mean over every (sample of a, sample of b) comparison, so each prompt weighs the same. Intervals
are percentile bootstraps over prompts (the unit that was sampled), deterministic for a given seed.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

LEVEL = 0.95


def outcome(score_a: float, score_b: float) -> float:
    """1 if a scored higher, 0.5 on a tie, 0 if b scored higher."""
    return 1.0 if score_a > score_b else 0.5 if score_a == score_b else 0.0


def prompt_outcome(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Mean outcome of a against b over all pairs of their samples for one prompt."""
    if not scores_a or not scores_b:
        raise ValueError("both versions need at least one scored sample for the prompt")
    return float(np.mean([outcome(x, y) for x in scores_a for y in scores_b]))


def win_rate(outcomes: Sequence[float]) -> float:
    """Mean outcome: wins count 1, ties half. 3 wins, 1 tie, 1 loss -> 0.7."""
    if len(outcomes) == 0:
        raise ValueError("no outcomes: the versions share no judged prompt")
    return float(np.mean(outcomes))


def bootstrap(values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean, n_boot: int = 1000,
              seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` over resampled `values` (with replacement)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("cannot bootstrap an empty sample")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, data.size, size=(n_boot, data.size))
    stats = np.array([stat(data[row]) for row in idx]) if stat is not np.mean else data[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def cluster_bootstrap(groups: Sequence[Sequence[float]], n_boot: int = 1000, seed: int = 0,
                      level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled mean of `groups` (e.g. the pairs of one prompt), resampling whole
    groups: values within a group are not independent, and resampling them one by one would narrow the interval."""
    sums = np.array([float(np.sum(g)) for g in groups], dtype=np.float64)
    sizes = np.array([len(g) for g in groups], dtype=np.float64)
    if not sizes.sum():
        raise ValueError("cannot bootstrap an empty sample")
    idx = np.random.default_rng(seed).integers(0, sizes.size, size=(n_boot, sizes.size))
    stats = sums[idx].sum(axis=1) / np.maximum(sizes[idx].sum(axis=1), 1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def win_rate_summary(outcomes: Sequence[float], n_boot: int = 1000, seed: int = 0) -> dict:
    """{win_rate, low, high, n, wins, ties, losses}; wins/ties/losses count prompts whose outcome is 1/0.5/0
    (a prompt with several samples may fall between them, counted in none)."""
    arr = np.asarray(outcomes, dtype=np.float64)
    low, high = bootstrap(arr, n_boot=n_boot, seed=seed)
    return {"win_rate": win_rate(arr), "low": low, "high": high, "n": int(arr.size),
            "wins": int((arr == 1).sum()), "ties": int((arr == 0.5).sum()), "losses": int((arr == 0).sum())}


# ---- Bradley–Terry ---------------------------------------------------------------------------------------------


def bradley_terry(comparisons: Sequence[tuple[int, int, float]], n_items: int, prior: float = 0.5,
                  iters: int = 2000, tol: float = 1e-10) -> np.ndarray:
    """Log-strengths (mean 0) of a Bradley–Terry model, P(i beats j) = σ(s_i - s_j), fit by Hunter's MM updates.

    `comparisons` are (i, j, outcome of i) with ties as 0.5. `prior` adds that many virtual ties between every
    pair, which keeps strengths finite when one item wins everything and barely moves them otherwise.
    """
    wins = np.zeros((n_items, n_items))
    for i, j, out in comparisons:
        wins[i, j] += out
        wins[j, i] += 1.0 - out
    wins += prior / 2 * (1 - np.eye(n_items))
    games = wins + wins.T
    total_wins = wins.sum(axis=1)
    p = np.ones(n_items)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = np.where(denom > 0, total_wins / np.maximum(denom, 1e-300), p)
        new = np.maximum(new, 1e-300)
        new /= np.exp(np.log(new).mean())  # fix the scale: geometric mean 1
        if np.max(np.abs(np.log(new) - np.log(p))) < tol:
            p = new
            break
        p = new
    scores = np.log(p)
    return scores - scores.mean()


def bradley_terry_bootstrap(groups: Sequence[Sequence[tuple[int, int, float]]], n_items: int, n_boot: int = 200,
                            seed: int = 0, level: float = LEVEL) -> dict:
    """Fit on all comparisons and on bootstrap resamples of `groups` (one group per prompt).

    Returns {scores, low, high, rank, rank_low, rank_high}: ranks are 1 = strongest; rank intervals come from
    the ranks of each resample.
    """
    if not groups:
        raise ValueError("no comparisons to fit")
    flat = [c for g in groups for c in g]
    scores = bradley_terry(flat, n_items)
    rng = np.random.default_rng(seed)
    boot_scores, boot_ranks = [], []
    for _ in range(n_boot):
        pick = rng.integers(0, len(groups), size=len(groups))
        s = bradley_terry([c for k in pick for c in groups[k]], n_items, iters=300)
        boot_scores.append(s)
        boot_ranks.append(ranks(s))
    tail = (1 - level) / 2 * 100
    bs, br = np.array(boot_scores), np.array(boot_ranks)
    return {"scores": scores.tolist(), "low": np.percentile(bs, tail, axis=0).tolist(),
            "high": np.percentile(bs, 100 - tail, axis=0).tolist(), "rank": ranks(scores).tolist(),
            "rank_low": np.percentile(br, tail, axis=0).tolist(), "rank_high": np.percentile(br, 100 - tail, axis=0).tolist()}


def ranks(scores: np.ndarray) -> np.ndarray:
    """1 for the highest score; equal scores share the better rank."""
    scores = np.asarray(scores)
    return np.array([1 + int((scores > s + 1e-9).sum()) for s in scores])


# ---- KL ----------------------------------------------------------------------------------------------------------


def kl_estimate(logp_policy: Sequence[float], logp_ref: Sequence[float], lengths: Sequence[int] | None = None,
                n_boot: int = 1000, seed: int = 0) -> dict:
    """Monte Carlo KL(π_v ‖ π_ref) from samples y ~ π_v: the mean of log π_v(y) - log π_ref(y).

    Unbiased when the samples were drawn from π_v at temperature 1 (each term may be negative; the mean is not,
    in expectation). Returns {kl, low, high, stderr, n} and, given token lengths, kl_per_token = Σ diff / Σ T.
    """
    diff = np.asarray(logp_policy, dtype=np.float64) - np.asarray(logp_ref, dtype=np.float64)
    if diff.size == 0:
        raise ValueError("no samples to estimate KL from")
    low, high = bootstrap(diff, n_boot=n_boot, seed=seed)
    out = {"kl": float(diff.mean()), "low": low, "high": high, "n": int(diff.size),
           "stderr": float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else 0.0}
    if lengths is not None:
        tokens = float(np.sum(lengths))
        out["kl_per_token"] = float(diff.sum() / tokens) if tokens > 0 else 0.0
    return out


def length_summary(lengths: Sequence[int]) -> dict:
    arr = np.asarray(lengths, dtype=np.float64)
    if arr.size == 0:
        return {"n": 0}
    return {"n": int(arr.size), "mean": float(arr.mean()), "median": float(np.median(arr)),
            "p90": float(np.percentile(arr, 90)), "max": int(arr.max()), "min": int(arr.min())}
