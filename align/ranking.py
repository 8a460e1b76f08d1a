"""K-way rankings (issue 21 item 2, the part below the app): one annotator orders K responses to one prompt, ties
allowed; the ranking is one event, expanded into pairwise votes for export and scored for agreement.

A ranking is given as `ranks`: one rank per response, in the order the responses were shown, 1 = best, equal ranks =
a tie ("these two are as good as each other").

Expansion. The K(K−1)/2 pairs of one ranking are not independent: under Plackett–Luce a full ranking of K items is
K−1 successive choices, so it carries the information of K−1 comparisons, not K(K−1)/2. Each expanded pair therefore
gets weight 2/K: the pairs of one ranking sum to K−1, and K = 2 gives one pair of weight 1, exactly a pairwise vote.
Tied responses expand into tie votes (the losses have a tie term); nothing is dropped.

Agreement: Kendall's W over the annotators who ranked the same K responses, with mid-ranks for ties and the tie
correction, W = 12·S / (m²(n³ − n) − m·Σ_j T_j), S = Σ_i (R_i − R̄)², T_j = Σ_groups (t³ − t) of annotator j.
W = 1: every annotator gave the same order; W = 0: no agreement beyond chance.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Sequence

from align.errors import DataError

MIN_K, MAX_K = 3, 5


def check_ranks(ranks: Sequence[int], k: int | None = None) -> list[int]:
    """Ranks as dense integers from 1 (ties share a rank); a clear error for anything else."""
    ranks = [int(r) for r in ranks]
    if k is not None and len(ranks) != k:
        raise DataError(f"a ranking of {k} responses needs {k} ranks, got {len(ranks)}")
    if not MIN_K <= len(ranks) <= MAX_K:
        raise DataError(f"a ranking orders {MIN_K} to {MAX_K} responses, got {len(ranks)}")
    if min(ranks) != 1 or sorted(set(ranks)) != list(range(1, max(ranks) + 1)):
        raise DataError(f"ranks must be 1, 2, ... without gaps (equal ranks for ties), got {ranks}")
    return ranks


def expand(response_ids: Sequence[int], ranks: Sequence[int]) -> list[dict]:
    """The pairwise votes of one ranking: {a, b, choice (a | b | tie), weight}, a before b in shown order."""
    ranks = check_ranks(ranks, len(response_ids))
    weight = 2.0 / len(ranks)
    out = []
    for i, j in itertools.combinations(range(len(ranks)), 2):
        choice = "tie" if ranks[i] == ranks[j] else ("a" if ranks[i] < ranks[j] else "b")
        out.append({"a": response_ids[i], "b": response_ids[j], "choice": choice, "weight": weight})
    return out


def mid_ranks(ranks: Sequence[int]) -> list[float]:
    """Dense ranks with ties (1, 1, 2) as the average positions they occupy (1.5, 1.5, 3)."""
    order = sorted(set(ranks))
    counts = Counter(ranks)
    start, position = 1, {}
    for r in order:
        position[r] = start + (counts[r] - 1) / 2
        start += counts[r]
    return [position[r] for r in ranks]


def kendalls_w(rankings: Sequence[Sequence[int]]) -> float:
    """Kendall's W of m annotators' rankings of the same n responses (rows in the same response order)."""
    m = len(rankings)
    if m < 2:
        raise DataError("Kendall's W needs at least two rankings of the same responses")
    n = len(rankings[0])
    if any(len(r) != n for r in rankings):
        raise DataError("every ranking must rank the same responses")
    rows = [mid_ranks(check_ranks(r)) for r in rankings]
    sums = [sum(col) for col in zip(*rows)]
    mean = sum(sums) / n
    s = sum((x - mean) ** 2 for x in sums)
    ties = sum(t ** 3 - t for r in rankings for t in Counter(r).values())
    denominator = m * m * (n ** 3 - n) - m * ties
    return 12.0 * s / denominator if denominator > 0 else 1.0  # every annotator tied everything: nothing to disagree on
