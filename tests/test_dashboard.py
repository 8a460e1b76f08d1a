"""Reviewer metrics on hand-computed values, and the dashboard read from a store."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import pytest

from align.store import add_vote, get_pair, make_pairs, set_gold
from labeling.dashboard import (
    bradley_terry,
    build_dashboard,
    cohen_kappa,
    fleiss_kappa,
    krippendorff_alpha_ordinal,
    leaderboard,
    ordinal_score,
    rating,
    raw_agreement,
    summary_markdown,
    wilson_interval,
)
from tests.db import fill_store


def test_cohen_kappa_on_a_2x2_table():
    # 50 items: both yes 20, A yes / B no 5, A no / B yes 10, both no 15.
    # p_o = 35/50 = 0.7; A says yes 25/50, B 30/50: p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5 = 0.4.
    first = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(["a", "b"], ["a", "b"]) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa(["a", "a"], ["a", "a"]))


def test_fleiss_kappa_on_the_textbook_example():
    # Fleiss (1971) as worked on Wikipedia: 10 items, 14 raters, 5 categories; P = 0.378, P_e = 0.213, kappa 0.210.
    table = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]
    assert fleiss_kappa(table) == pytest.approx(0.2099, abs=1e-4)
    assert fleiss_kappa([[2, 0], [0, 2]]) == pytest.approx(1.0)


def test_krippendorff_alpha_ordinal_by_hand():
    # Units (two coders each): (-1,-1), (0,0), (1,1), (-1,0).
    # Coincidences: o(-1,-1)=2, o(0,0)=2, o(1,1)=2, o(-1,0)=o(0,-1)=1; marginals n(-1)=3, n(0)=3, n(1)=2, n=8.
    # Ordinal distances: d(-1,0) = (3+3 - (3+3)/2)^2 = 9; d(0,1) = (3+2 - 2.5)^2 = 6.25;
    # d(-1,1) = (3+3+2 - 2.5)^2 = 30.25.
    # Observed: sum o*d = 2 * 9 = 18. Expected: sum n_c n_k d = 2*(3*3*9 + 3*2*6.25 + 3*2*30.25) = 600.
    # alpha = 1 - (n-1) * 18 / 600 = 1 - 7*18/600 = 0.79.
    assert krippendorff_alpha_ordinal([[-1, -1], [0, 0], [1, 1], [-1, 0]]) == pytest.approx(0.79)
    assert krippendorff_alpha_ordinal([[2, 2], [-2, -2], [1]]) == pytest.approx(1.0)  # the lone value is ignored
    assert math.isnan(krippendorff_alpha_ordinal([[0, 0]]))
    assert [ordinal_score(c, s) for c, s in [("a", 2), ("a", 1), ("tie", 1), ("b", 1), ("b", 2)]] == [-2, -1, 0, 1, 2]
    assert ordinal_score("both_bad", 1) is None


def test_raw_agreement_with_and_without_ties():
    units = [["a", "a", "tie"], ["b", "a"], ["both_bad", "both_bad"]]
    # Pairs: (a,a) yes, (a,tie) no, (a,tie) no, (b,a) no, (bb,bb) yes -> 2/5; without ties: (a,a), (b,a) -> 1/2.
    assert raw_agreement(units) == (pytest.approx(0.4), 5)
    assert raw_agreement(units, ignore_ties=True) == (pytest.approx(0.5), 2)


def test_wilson_interval():
    low, high = wilson_interval(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_bradley_terry_recovers_a_known_ranking():
    # Two models: 3 wins to 1 gives odds 3, i.e. 400*log10(3) = 190.8 rating points.
    two = bradley_terry([("x", "y", 1.0)] * 3 + [("x", "y", 0.0)], prior=0.0)
    assert rating(two["x"]) - rating(two["y"]) == pytest.approx(400 * math.log10(3), abs=1e-6)
    # Four models with strengths 8:4:2:1; 60 games per pair with wins in proportion p_i / (p_i + p_j).
    true = {"m8": 8.0, "m4": 4.0, "m2": 2.0, "m1": 1.0}
    games = []
    names = list(true)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            wins = round(60 * true[first] / (true[first] + true[second]))
            games += [(first, second, 1.0)] * wins + [(first, second, 0.0)] * (60 - wins)
    fitted = bradley_terry(games, prior=0.0)
    assert sorted(fitted, key=fitted.get, reverse=True) == names
    assert fitted["m8"] / fitted["m1"] == pytest.approx(8.0, rel=0.05)
    rows = leaderboard(games, n_boot=50, seed=1)
    assert [r["model"] for r in rows] == names
    assert all(r["ci_low"] <= r["rating"] <= r["ci_high"] for r in rows) and rows[0]["comparisons"] == 180
    # Ties count half: all ties means equal strength; a clean sweep stays finite thanks to the prior.
    tied = bradley_terry([("x", "y", 0.5)] * 10)
    assert tied["x"] == pytest.approx(tied["y"])
    assert math.isfinite(rating(bradley_terry([("x", "y", 1.0)] * 5)["x"]))


def test_dashboard_from_the_store(store):
    fill_store(store, n_prompts=2, samples=1, version="v-old")
    new = fill_store(store, n_prompts=2, samples=1, version="v-new", seed=1)
    pair_ids = make_pairs(store, None, rule="all_pairs")
    assert len(pair_ids) == 2
    newer = {r for r in new["response_ids"]}
    t0 = datetime(2025, 1, 1, 12)
    plan = {  # annotator -> choices for the two pairs, as "new"/"old" wins; left always the response a
        "alice": ["new", "new"], "bob": ["new", "tie"], "carol": ["old", "new"],
    }
    for annotator, outcomes in plan.items():
        for pair_id, outcome in zip(pair_ids, outcomes):
            pair = get_pair(store, pair_id)
            a_is_new = pair["response_a"]["id"] in newer
            choice = "tie" if outcome == "tie" else ("a" if (outcome == "new") == a_is_new else "b")
            add_vote(store, pair_id, annotator, choice, strength=1, left="a", shown_at=t0,
                     answered_at=t0 + timedelta(seconds={"alice": 4, "bob": 6, "carol": 10}[annotator]))
    set_gold(store, pair_ids[0], choice_of(store, pair_ids[0], "alice"))
    add_vote(store, pair_ids[1], "dave", None, kind="flag", flag_reason="broken: empty")
    board = build_dashboard(store, n_boot=20)
    assert board["votes"] == 6 and board["annotators"] == 3
    assert board["per_day"] == [("2025-01-01", 6)]
    assert board["median_seconds"] == 6.0
    agreement = board["agreement"]
    assert agreement["items"] == 2 and agreement["raw_pairs"] == 6
    assert agreement["raw"] == pytest.approx(2 / 6)  # pair 1: only alice = bob; pair 2: only alice = carol
    rows = {row["annotator"]: row for row in board["annotator_rows"]}
    assert rows["alice"]["gold accuracy"] == 1.0 and rows["carol"]["gold accuracy"] == 0.0
    assert rows["bob"]["median s/vote"] == 6.0
    assert [f["reason"] for f in board["flags"]] == ["broken: empty"]
    assert [r["model"] for r in board["leaderboard"]] == ["v-new", "v-old"]  # 4 wins, 1 loss, 1 tie
    assert len(board["cohen_rows"]) == 3
    text = summary_markdown(board)
    assert "6 votes" in text and "Krippendorff" in text and "Wilson" in text


def choice_of(store, pair_id, annotator):
    from align.store import effective_votes

    [vote] = effective_votes(store, pair_ids=[pair_id], annotators=[annotator])
    return vote.choice


def test_dashboard_shows_kendalls_w_for_a_ranking_project(store):
    from align.store.rankings import add_ranking, set_ranking_k

    fill_store(store, n_prompts=1, samples=1)
    assert build_dashboard(store, n_boot=5)["ranking"] is None  # pairwise only: no ranking line
    assert "Kendall" not in summary_markdown(build_dashboard(store, n_boot=5))
    set_ranking_k(store, 3)
    filled = fill_store(store, n_prompts=3, samples=3, version="v-rank", seed=2)
    first, second, third = (filled["response_ids"][3 * i : 3 * i + 3] for i in range(3))
    p1, p2, p3 = filled["prompt_ids"]
    for who, ranks in (("alice", [1, 2, 3]), ("bob", [1, 3, 2]), ("carol", [2, 1, 3])):
        add_ranking(store, p1, first, ranks, who)
    add_ranking(store, p2, second, [1, 1, 2], "alice")
    add_ranking(store, p2, [second[2], second[1], second[0]], [3, 2, 1], "bob")  # shown reversed: (1, 2, 3)
    add_ranking(store, p3, third, [1, 2, 3], "alice")  # ranked once: counted, not scored
    ranking = build_dashboard(store, n_boot=5)["ranking"]
    # Set 1: rank sums 4, 6, 8 around 6, S = 8, W = 12·8 / (3²·24) = 96/216. Set 2, ties (1, 1, 2) and (1, 2, 3):
    # mid-ranks (1.5, 1.5, 3) + (1, 2, 3) = 2.5, 3.5, 6 around 4, S = 6.5, T = 6, W = 78 / (4·24 − 2·6) = 78/84.
    assert sorted(s["w"] for s in ranking["sets"]) == pytest.approx([96 / 216, 78 / 84])
    assert ranking["mean_w"] == pytest.approx((96 / 216 + 78 / 84) / 2) and ranking["ranked_once"] == 1
    text = summary_markdown(build_dashboard(store, n_boot=5))
    assert f"Kendall's W {(96 / 216 + 78 / 84) / 2:.3f}" in text and "K = 3" in text and "sets ranked once: 1" in text
