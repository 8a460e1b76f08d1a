"""Reviewer metrics: who voted how much, agreement, position bias, speed, gold accuracy, flags, and a leaderboard.

The statistics are pure functions on plain lists, tested on hand-computed values; `load_votes` and
`build_dashboard` read the store. Conventions:
- labels are in response order (a, b, tie, both_bad); agreement is computed on them, never on screen sides;
- the ordinal strength scale runs -2 (a much better) .. -1 (a slightly) .. 0 (tie) .. 1 .. 2 (b much better);
  both-bad votes have no place on it and count as missing there;
- "without ties" leaves out every pair of judgments in which either is a tie or both-bad (MT-bench convention).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import aliased

from align.store import ModelVersion, Pair, Response, Store, Vote
from align.store.votes import in_effect

CATEGORIES = ("a", "b", "tie", "both_bad")
UNDECIDED = ("tie", "both_bad")


# ---- agreement ---------------------------------------------------------------------------------------------


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters' labels on the same items: (p_o - p_e) / (1 - p_e); nan if undefined."""
    if len(first) != len(second):
        raise ValueError("both raters must label the same items")
    n = len(first)
    if n == 0:
        return math.nan
    observed = sum(x == y for x, y in zip(first, second)) / n
    count_1, count_2 = Counter(first), Counter(second)
    expected = sum(count_1[c] * count_2[c] for c in count_1) / (n * n)
    if expected == 1.0:
        return math.nan  # both raters used one and the same label throughout: chance explains everything
    return (observed - expected) / (1 - expected)


def fleiss_kappa(table: Sequence[Sequence[float]]) -> float:
    """Fleiss' kappa from an items x categories table of counts (how many raters put item i in category j).

    Items may have different numbers of raters (each needs at least 2): P_i = sum_j n_ij (n_ij - 1) /
    (n_i (n_i - 1)), p_j = sum_i n_ij / sum_i n_i; with a fixed n this is Fleiss (1971) exactly.
    """
    rows = [list(map(float, row)) for row in table if sum(row) >= 2]
    if not rows:
        return math.nan
    totals = [sum(row) for row in rows]
    agreement = [sum(c * (c - 1) for c in row) / (n * (n - 1)) for row, n in zip(rows, totals)]
    shares = [sum(column) / sum(totals) for column in zip(*rows)]
    p_bar, p_e = sum(agreement) / len(agreement), sum(p * p for p in shares)
    if p_e == 1.0:
        return math.nan
    return (p_bar - p_e) / (1 - p_e)


def krippendorff_alpha_ordinal(units: Sequence[Sequence[float]]) -> float:
    """Krippendorff's alpha with the ordinal metric; each unit lists the values it got (missing ones left out).

    Coincidences: each unit with m >= 2 values adds 1/(m-1) for every ordered pair of its values. With n_c the
    marginal of value c and n their sum, the ordinal distance is d(c, k) = (sum_{g=c..k} n_g - (n_c + n_k)/2)^2
    and alpha = 1 - (n - 1) * sum_ck o_ck d(c, k) / sum_ck n_c n_k d(c, k).
    """
    coincidences: dict[tuple[float, float], float] = defaultdict(float)
    for unit in units:
        m = len(unit)
        if m < 2:
            continue
        for i, j in itertools.permutations(range(m), 2):
            coincidences[unit[i], unit[j]] += 1 / (m - 1)
    marginals: dict[float, float] = defaultdict(float)
    for (c, _), weight in coincidences.items():
        marginals[c] += weight
    values = sorted(marginals)
    n = sum(marginals.values())
    if len(values) < 2:
        return math.nan  # one value everywhere: no variation to agree on
    position = {v: i for i, v in enumerate(values)}
    cumulative = np.cumsum([marginals[v] for v in values])

    def distance(c: float, k: float) -> float:
        lo, hi = sorted((position[c], position[k]))
        between = cumulative[hi] - (cumulative[lo - 1] if lo > 0 else 0.0)
        return (between - (marginals[c] + marginals[k]) / 2) ** 2

    observed = sum(w * distance(c, k) for (c, k), w in coincidences.items())
    expected = sum(marginals[c] * marginals[k] * distance(c, k) for c in values for k in values)
    return 1 - (n - 1) * observed / expected


def raw_agreement(units: Sequence[Sequence[Hashable]], ignore_ties: bool = False) -> tuple[float, int]:
    """Share of agreeing pairs of judgments within items, and how many pairs were compared."""
    agree = total = 0
    for unit in units:
        for x, y in itertools.combinations(unit, 2):
            if ignore_ties and (x in UNDECIDED or y in UNDECIDED):
                continue
            total += 1
            agree += x == y
    return (agree / total if total else math.nan), total


def ordinal_score(choice: str, strength: int | None) -> int | None:
    """A vote on the -2..2 scale (negative: a better); None for both-bad."""
    if choice == "tie":
        return 0
    if choice in ("a", "b"):
        return (strength or 1) * (-1 if choice == "a" else 1)
    return None


# ---- rates and intervals -----------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (nan, nan) when n is 0."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


# ---- Bradley-Terry -----------------------------------------------------------------------------------------


def bradley_terry(
    comparisons: Sequence[tuple[str, str, float]], prior: float = 0.1, iterations: int = 10_000, tol: float = 1e-10
) -> dict[str, float]:
    """Strengths p_i (geometric mean 1) from (model_1, model_2, outcome for model_1 in [0, 1]) comparisons.

    Ties are half a win for each side. Hunter's (2004) MM update p_i <- W_i / sum_j n_ij / (p_i + p_j), with
    `prior` pseudo-ties between every two models, so a model that won (or lost) everything stays finite.
    """
    models, first, second, outcome = encode(comparisons)
    strength = fit_counts(len(models), first, second, outcome, prior, iterations, tol)
    return dict(zip(models, strength))


def encode(comparisons: Sequence[tuple[str, str, float]]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    models = sorted({m for a, b, _ in comparisons for m in (a, b)})
    index = {m: i for i, m in enumerate(models)}
    first = np.array([index[a] for a, _, _ in comparisons], dtype=int)
    second = np.array([index[b] for _, b, _ in comparisons], dtype=int)
    return models, first, second, np.array([o for _, _, o in comparisons], dtype=float)


def fit_counts(k: int, first: np.ndarray, second: np.ndarray, outcome: np.ndarray, prior: float,
               iterations: int, tol: float, weight: np.ndarray | None = None) -> np.ndarray:
    """MM fit from comparison arrays; `weight` counts each comparison (a bootstrap resample) or 1 each."""
    weight = np.ones(len(first)) if weight is None else weight
    games = np.full((k, k), prior, dtype=float)
    np.fill_diagonal(games, 0.0)
    wins = games.sum(axis=1) / 2
    np.add.at(games, (first, second), weight)
    np.add.at(games, (second, first), weight)
    np.add.at(wins, first, weight * outcome)
    np.add.at(wins, second, weight * (1 - outcome))
    strength = np.ones(k)
    for _ in range(iterations):
        denominator = (games / (strength[:, None] + strength[None, :])).sum(axis=1)
        updated = np.where(denominator > 0, wins / np.maximum(denominator, 1e-300), strength)
        updated = np.maximum(updated, 1e-300)
        updated /= np.exp(np.mean(np.log(updated)))
        if np.max(np.abs(np.log(updated) - np.log(strength))) < tol:
            return updated
        strength = updated
    return strength


def rating(strength: float) -> float:
    """Elo-like scale used by arena leaderboards: 400 points per factor of 10 in odds, centred on 1000."""
    return 1000 + 400 * math.log10(strength)


def leaderboard(
    comparisons: Sequence[tuple[str, str, float]], n_boot: int = 200, seed: int = 0, prior: float = 0.1
) -> list[dict[str, Any]]:
    """Bradley-Terry ratings with 95% percentile intervals from resampling the comparisons, best first."""
    if not comparisons:
        return []
    models, first, second, outcome = encode(comparisons)
    point = fit_counts(len(models), first, second, outcome, prior, 10_000, 1e-10)
    rng = np.random.default_rng(seed)
    boots = np.array([
        # A multinomial draw of counts is the same as resampling the comparisons with replacement.
        fit_counts(len(models), first, second, outcome, prior, 2000, 1e-8,
                   weight=rng.multinomial(len(comparisons), np.full(len(comparisons), 1 / len(comparisons))))
        for _ in range(n_boot)
    ]).reshape(n_boot, len(models))
    played = Counter(m for a, b, _ in comparisons for m in (a, b))
    rows = []
    for i, model in enumerate(models):
        if n_boot:
            low, high = np.percentile(1000 + 400 * np.log10(boots[:, i]), [2.5, 97.5])
        else:
            low, high = math.nan, math.nan
        rows.append({"model": model, "rating": rating(point[i]), "ci_low": float(low), "ci_high": float(high),
                     "comparisons": played[model]})
    return sorted(rows, key=lambda row: -row["rating"])


# ---- reading the store -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VoteRow:
    pair_id: int
    annotator: str
    choice: str
    strength: int | None
    left: str | None
    seconds: float | None  # answered_at - shown_at
    day: str
    is_gold: bool
    gold_choice: str | None
    version_a: str
    version_b: str


def load_votes(store: Store, source: str = "human") -> list[VoteRow]:
    """The effective votes of one source with what the metrics need about their pairs."""
    response_a, response_b = aliased(Response), aliased(Response)
    version_a, version_b = aliased(ModelVersion), aliased(ModelVersion)
    query = (
        select(Vote, Pair.is_gold, Pair.gold_choice, version_a.name, version_b.name)
        .join(Pair, Pair.id == Vote.pair_id)
        .join(response_a, response_a.id == Pair.response_a_id)
        .join(response_b, response_b.id == Pair.response_b_id)
        .join(version_a, version_a.id == response_a.model_version_id)
        .join(version_b, version_b.id == response_b.model_version_id)
        .where(Vote.kind == "vote", Vote.source == source, in_effect())
        .order_by(Vote.id)
    )
    with store.read() as session:
        rows = session.execute(query).all()
    return [
        VoteRow(
            pair_id=vote.pair_id, annotator=vote.annotator, choice=vote.choice, strength=vote.strength,
            left=vote.left, day=vote.answered_at.date().isoformat(), is_gold=bool(is_gold), gold_choice=gold,
            seconds=(vote.answered_at - vote.shown_at).total_seconds() if vote.shown_at else None,
            version_a=name_a, version_b=name_b,
        )
        for vote, is_gold, gold, name_a, name_b in rows
    ]


PAGE_SIZE = 50  # rows per dashboard table page: a page stays small however many flags or annotators there are
NOTE_CHARS = 300  # a flag note is cut to this many characters in the table (the review screen shows it whole)


def load_flags(store: Store, page: int = 0, page_size: int = PAGE_SIZE) -> tuple[list[dict[str, Any]], int]:
    """One page of the flags in effect, newest first, with notes cut short; and how many flags there are."""
    where = (Vote.kind == "flag", in_effect())
    query = select(Vote).where(*where).order_by(Vote.id.desc()).offset(max(page, 0) * page_size).limit(page_size)
    with store.read() as session:
        flags = list(session.scalars(query))
        total = session.scalar(select(func.count(Vote.id)).where(*where)) or 0
    rows = [{"pair": f.pair_id, "annotator": f.annotator, "reason": cut(f.flag_reason or "", NOTE_CHARS),
             "when": f.answered_at.strftime("%Y-%m-%d %H:%M")} for f in flags]
    return rows, total


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def response_versions(store: Store, response_a: int, response_b: int) -> dict[str, str]:
    with store.read() as session:
        found = dict(session.execute(
            select(Response.id, ModelVersion.name)
            .join(ModelVersion, ModelVersion.id == Response.model_version_id)
            .where(Response.id.in_([response_a, response_b]))
        ).tuples().all())
    return {"a": found.get(response_a, "?"), "b": found.get(response_b, "?")}


def pair_events(store: Store, pair_id: int) -> str:
    """Every labeling event on a pair, as a markdown table (for adjudication)."""
    from labeling.render import safe_markdown

    with store.read() as session:
        events = list(session.scalars(select(Vote).where(Vote.pair_id == pair_id).order_by(Vote.id)))
    if not events:
        return "No events yet."
    lines = ["| id | annotator | kind | choice | strength | left | undoes | reason / rationale |",
             "|---|---|---|---|---|---|---|---|"]
    for e in events:
        note = (e.flag_reason or e.rationale or "").replace("|", "/").replace("\n", " ")
        cells = [e.id, e.annotator, e.kind, e.choice or "", e.strength or "", e.left or "", e.supersedes_id or "",
                 note]
        lines.append("| " + " | ".join(safe_markdown(str(c)) for c in cells) + " |")
    return "\n".join(lines)


# ---- the dashboard -----------------------------------------------------------------------------------------


def by_pair(votes: Sequence[VoteRow]) -> dict[int, list[VoteRow]]:
    grouped: dict[int, list[VoteRow]] = defaultdict(list)
    for vote in votes:
        grouped[vote.pair_id].append(vote)
    return grouped


def agreement_summary(votes: Sequence[VoteRow]) -> dict[str, Any]:
    units = [group for group in by_pair(votes).values() if len(group) >= 2]
    labels = [[v.choice for v in group] for group in units]
    with_ties, n_with = raw_agreement(labels)
    without_ties, n_without = raw_agreement(labels, ignore_ties=True)
    table = [[sum(v.choice == c for v in group) for c in CATEGORIES] for group in units]
    scores = [[s for v in group if (s := ordinal_score(v.choice, v.strength)) is not None] for group in units]
    return {
        "items": len(units), "raw": with_ties, "raw_pairs": n_with, "raw_no_ties": without_ties,
        "raw_no_ties_pairs": n_without, "fleiss": fleiss_kappa(table), "alpha": krippendorff_alpha_ordinal(scores),
    }


def cohen_table(votes: Sequence[VoteRow]) -> list[dict[str, Any]]:
    labels: dict[str, dict[int, str]] = defaultdict(dict)
    for vote in votes:
        labels[vote.annotator][vote.pair_id] = vote.choice
    rows = []
    for first, second in itertools.combinations(sorted(labels), 2):
        shared = sorted(labels[first].keys() & labels[second].keys())
        if shared:
            kappa = cohen_kappa([labels[first][p] for p in shared], [labels[second][p] for p in shared])
            rows.append({"annotator 1": first, "annotator 2": second, "shared pairs": len(shared),
                         "cohen kappa": kappa})
    return rows


def annotator_table(votes: Sequence[VoteRow]) -> list[dict[str, Any]]:
    """Per annotator: votes, left-choice rate with its Wilson interval, median seconds, gold accuracy."""
    rows = []
    for annotator, mine in sorted(group_by(votes, lambda v: v.annotator).items()):
        decided = [v for v in mine if v.choice in ("a", "b") and v.left]
        lefts = sum(v.choice == v.left for v in decided)
        low, high = wilson_interval(lefts, len(decided))
        seconds = [v.seconds for v in mine if v.seconds is not None]
        gold = [v for v in mine if v.is_gold and v.gold_choice]
        rows.append({
            "annotator": annotator, "votes": len(mine),
            "left rate": lefts / len(decided) if decided else math.nan, "left CI low": low, "left CI high": high,
            "median s/vote": statistics.median(seconds) if seconds else math.nan,
            "gold votes": len(gold),
            "gold accuracy": sum(v.choice == v.gold_choice for v in gold) / len(gold) if gold else math.nan,
        })
    return rows


def group_by(items, key) -> dict[Any, list]:
    grouped: dict[Any, list] = defaultdict(list)
    for item in items:
        grouped[key(item)].append(item)
    return grouped


def version_comparisons(votes: Sequence[VoteRow]) -> list[tuple[str, str, float]]:
    """One comparison per vote on a pair of two different model versions (ties and both-bad: half each)."""
    outcome = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}
    return [(v.version_a, v.version_b, outcome[v.choice]) for v in votes if v.version_a != v.version_b]


def build_dashboard(store: Store, n_boot: int = 200, page: int = 0, page_size: int = PAGE_SIZE) -> dict[str, Any]:
    """Everything the dashboard tab shows, as plain numbers and row dicts; the annotator and flag tables hold
    page `page` (0-based) of `page_size` rows, and `pages` says how many pages the longer of the two has."""
    votes = load_votes(store)
    decided = [v for v in votes if v.choice in ("a", "b") and v.left]
    lefts = sum(v.choice == v.left for v in decided)
    seconds = [v.seconds for v in votes if v.seconds is not None]
    comparisons = version_comparisons(votes)
    page = max(int(page), 0)
    annotators = annotator_table(votes)
    flags, flags_total = load_flags(store, page, page_size)
    return {
        "votes": len(votes),
        "annotators": len({v.annotator for v in votes}),
        "per_day": sorted(Counter(v.day for v in votes).items()),
        "agreement": agreement_summary(votes),
        "position": {"left": lefts, "decided": len(decided), "interval": wilson_interval(lefts, len(decided))},
        "median_seconds": statistics.median(seconds) if seconds else math.nan,
        "annotator_rows": annotators[page * page_size : (page + 1) * page_size],
        "cohen_rows": cohen_table(votes)[page * page_size : (page + 1) * page_size],
        "flags": flags,
        "flags_total": flags_total,
        "page": page,
        "pages": max(1, math.ceil(max(len(annotators), flags_total) / page_size)),
        "leaderboard": leaderboard(comparisons, n_boot=n_boot, seed=stable_seed(comparisons)),
        "ranking": ranking_summary(store),
    }


def ranking_summary(store: Store) -> dict[str, Any] | None:
    """Agreement on K-way rankings (Kendall's W per set of responses ranked by 2+ annotators, and the mean), for a
    project with ranking on or rankings stored; None for a pairwise-only project."""
    from align.store.rankings import ranking_agreement, ranking_k

    agreement = ranking_agreement(store)
    k = ranking_k(store)
    if not k and not agreement["sets"] and not agreement["ranked_once"]:
        return None
    return {**agreement, "k": k}


def stable_seed(comparisons: Sequence[tuple[str, str, float]]) -> int:
    """A bootstrap seed fixed by the data, so refreshing an unchanged dashboard shows the same intervals."""
    return int.from_bytes(hashlib.blake2b(repr(comparisons).encode(), digest_size=4).digest(), "little")


def fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def summary_markdown(board: dict[str, Any]) -> str:
    agreement, position = board["agreement"], board["position"]
    low, high = position["interval"]
    rate = position["left"] / position["decided"] if position["decided"] else math.nan
    days = ", ".join(f"{day}: {n}" for day, n in board["per_day"][-14:]) or "none yet"
    votes = (f"**{board['votes']} votes** by {board['annotators']} annotators · median "
             f"{fmt(board['median_seconds'], 1)} s per vote")
    agreement_line = (
        f"**Agreement** on {agreement['items']} pairs with 2+ votes: raw {fmt(agreement['raw'])} "
        f"({agreement['raw_pairs']} judgment pairs), without ties {fmt(agreement['raw_no_ties'])} "
        f"({agreement['raw_no_ties_pairs']}) · Fleiss' κ {fmt(agreement['fleiss'])} · "
        f"Krippendorff's α (ordinal, −2..2) {fmt(agreement['alpha'])}"
    )
    position_line = (
        f"**Position bias:** left chosen in {position['left']} of {position['decided']} decided votes = "
        f"{fmt(rate)} (95% Wilson CI {fmt(low)}–{fmt(high)}; 0.5 is no bias)"
    )
    lines = [votes, f"**Votes per day:** {days}", "", agreement_line, "", position_line]
    ranking = board.get("ranking")
    if ranking is not None:
        shown = f"K = {ranking['k']}" if ranking["k"] else "ranking now off"
        lines += ["", f"**Rankings** ({shown}): Kendall's W {fmt(ranking['mean_w'])} (mean over "
                  f"{len(ranking['sets'])} sets of responses ranked by 2+ annotators; 1 = the same order, 0 = no "
                  f"agreement) · sets ranked once: {ranking['ranked_once']}"]
    return "\n".join(lines)
