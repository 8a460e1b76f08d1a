"""K-way rankings: expansion into weighted pairwise votes (ties kept) and Kendall's W, on hand-computed values."""

import pytest

from align.errors import DataError
from align.ranking import expand, kendalls_w, mid_ranks


def test_expansion_weights_sum_to_k_minus_one_and_ties_stay_ties():
    votes = expand([10, 11, 12, 13], [2, 1, 2, 3])
    assert [(v["a"], v["b"], v["choice"]) for v in votes] == [
        (10, 11, "b"), (10, 12, "tie"), (10, 13, "a"), (11, 12, "a"), (11, 13, "a"), (12, 13, "a")]
    assert all(v["weight"] == pytest.approx(0.5) for v in votes)
    assert sum(v["weight"] for v in votes) == pytest.approx(3.0)  # K - 1 independent choices
    assert sum(v["weight"] for v in expand([1, 2, 3], [1, 2, 3])) == pytest.approx(2.0)


def test_bad_rankings_are_refused_with_a_reason():
    with pytest.raises(DataError, match="without gaps"):
        expand([1, 2, 3], [1, 3, 3])
    with pytest.raises(DataError, match="3 to 5 responses"):
        expand([1, 2], [1, 2])
    with pytest.raises(DataError, match="needs 4 ranks"):
        expand([1, 2, 3, 4], [1, 2, 3])


def test_kendalls_w_by_hand():
    assert kendalls_w([[1, 2, 3, 4]] * 3) == pytest.approx(1.0)
    assert kendalls_w([[1, 2, 3, 4], [4, 3, 2, 1]]) == pytest.approx(0.0)
    # rank sums 4, 6, 8 around 6: S = 8; W = 12·8 / (3²·(3³ − 3)) = 96 / 216
    assert kendalls_w([[1, 2, 3], [1, 3, 2], [2, 1, 3]]) == pytest.approx(96 / 216)
    # ties: mid-ranks (1.5, 1.5, 3) and (1, 2, 3); S = 6.5; T = 2³ − 2 = 6; W = 78 / (4·24 − 2·6)
    assert mid_ranks([1, 1, 2]) == [1.5, 1.5, 3.0]
    assert kendalls_w([[1, 1, 2], [1, 2, 3]]) == pytest.approx(78 / 84)
    with pytest.raises(DataError, match="at least two"):
        kendalls_w([[1, 2, 3]])


def test_rankings_in_the_store_export_weighted_pairs_and_kendalls_w(store):
    from align.errors import AlignError
    from align.store.rankings import add_ranking, export_rankings, ranking_agreement
    from tests.db import fill_store

    filled = fill_store(store, n_prompts=2, samples=4)
    prompt, other = filled["prompt_ids"]
    r = filled["response_ids"][:4]  # the four responses to the first prompt
    add_ranking(store, prompt, r, [1, 2, 3, 4], "alice")
    add_ranking(store, prompt, [r[3], r[2], r[1], r[0]], [4, 2, 3, 1], "bob")  # shown reversed; swaps r1 and r2
    with pytest.raises(AlignError, match="not responses to prompt"):
        add_ranking(store, other, r[:3], [1, 2, 3], "carol")
    with pytest.raises(DataError, match="without gaps"):
        add_ranking(store, prompt, r[:3], [1, 1, 3], "carol")
    rows = export_rankings(store)
    assert len(rows) == 12 and all(row["weight"] == pytest.approx(0.5) for row in rows)  # 2 x C(4,2), 2/K each
    alice = [row for row in rows if row["annotator"] == "alice"]
    texts = {rid: t["text"] for rid, t in zip(filled["response_ids"], filled["rows"])}
    assert [(row["chosen"][0]["content"], row["rejected"][0]["content"]) for row in alice][:3] == [
        (texts[r[0]], texts[r[1]]), (texts[r[0]], texts[r[2]]), (texts[r[0]], texts[r[3]])]
    # r1 vs r2: alice says r1 wins, bob says r2 wins; every other pair both agree
    split = [row for row in rows if {row["chosen_response_id"], row["rejected_response_id"]} == {r[1], r[2]}]
    assert len(split) == 2 and all(row["label_agreement"] == 0.5 for row in split)
    assert all(row["label_agreement"] == 1.0 for row in rows if row not in split)
    agreement = ranking_agreement(store)
    # aligned ranks: alice (1, 2, 3, 4), bob (1, 3, 2, 4): rank sums 2, 5, 5, 8; S = 18; W = 12·18 / (4·60)
    assert agreement["sets"][0]["w"] == pytest.approx(216 / 240) and agreement["mean_w"] == pytest.approx(0.9)


def test_align_export_rankings_adds_weighted_rows(tmp_path):
    import json

    from align.store import connect
    from align.store.rankings import add_ranking
    from tests.db import fill_store
    from tests.helpers import run_cli

    url = f"sqlite:///{tmp_path / 'store.db'}"
    with connect(url) as store:
        filled = fill_store(store, n_prompts=1, samples=3)
        add_ranking(store, filled["prompt_ids"][0], filled["response_ids"], [1, 1, 2], "alice")
    code, out, err = run_cli("export", "--db", url, "--out", str(tmp_path / "p.jsonl"), "--rankings", "--incomplete")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["tie", "chosen", "chosen"] and {r["weight"] for r in rows} == {2 / 3}
    code, _, err = run_cli("export", "--db", url, "--out", str(tmp_path / "q.jsonl"), "--rankings", "--kind", "sft")
    assert code != 0 and "--rankings applies to --kind preferences" in err


def test_typed_orders_and_the_ranking_queue(tmp_path):
    from align.errors import AlignError
    from align.store import connect
    from align.store.rankings import (add_ranking, next_ranking, parse_order, ranking_k, set_ranking_k)
    from tests.db import fill_store

    assert parse_order("B A=C D", 4) == [2, 1, 2, 3] and parse_order("c > a = b", 3) == [2, 2, 1]
    for bad, why in (("A B", "leaves out C"), ("A B B C", "appears twice"), ("A B E", "unknown response 'E'")):
        with pytest.raises(AlignError, match=why):
            parse_order(bad, 3)
    with connect(f"sqlite:///{tmp_path / 's.db'}") as store:
        assert ranking_k(store) == 0  # pairwise only unless the project turns ranking on
        set_ranking_k(store, 3)
        assert ranking_k(store) == 3
        with pytest.raises(AlignError, match="0 \\(pairwise only\\) or 3 to 5"):
            set_ranking_k(store, 7)
        filled = fill_store(store, n_prompts=2, samples=3)
        first = next_ranking(store, "alice", 3)
        assert first["prompt_id"] == filled["prompt_ids"][0]
        assert sorted(first["response_ids"]) == filled["response_ids"][:3]
        assert next_ranking(store, "alice", 3) == first  # same prompt, same shown order until it is ranked
        add_ranking(store, first["prompt_id"], first["response_ids"], [1, 2, 3], "alice")
        assert next_ranking(store, "alice", 3)["prompt_id"] == filled["prompt_ids"][1]
        assert next_ranking(store, "bob", 3)["prompt_id"] == filled["prompt_ids"][1]  # the least-ranked prompt first
        assert next_ranking(store, "alice", 4) is None  # no prompt has 4 responses
