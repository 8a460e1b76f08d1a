"""Simulated annotators: vote on open pairs the way a noisy human would, from a gold scorer.

    align label --simulate gold --db URL [--annotators 3 --judge_temperature 0.1 --tie_threshold 0.05
                                          --both_bad_threshold 0.2 --position_bias 0.0 --seed 0]

The judge (align.judges.GoldJudge) is Bradley–Terry over the task's gold reward r in [0, 1], with ties, both-bad
votes, noise and a position bias. Each simulated annotator sees the pair in its own left/right order, so position bias acts the way it does for people. Votes are stored
with source "sim:<judge>" and never count toward the human vote quota.
"""

from __future__ import annotations

import hashlib
import random
from typing import Optional

from align import store as st
from align.judges import GoldJudge
from align.store import Pair, Prompt, Response


def shown_left(annotator: str, pair_id: object) -> str:
    """Deterministic per (annotator, pair): which response the annotator sees on the left."""
    digest = hashlib.sha256(f"{annotator}:{pair_id}".encode()).digest()
    return "a" if digest[0] % 2 == 0 else "b"


def annotator_names(judge: GoldJudge, annotators: int) -> list[str]:
    return [f"sim-{judge.name}-{i + 1}" for i in range(annotators)]


def vote(judge: GoldJudge, name: str, key: object, reward_a: float, reward_b: float,
         seed: int) -> tuple[str, str, int]:
    """(left, choice, strength): annotator `name`'s seeded vote on the pair `key` (a pair id, or any stable key)."""
    left = shown_left(name, key)
    choice, strength = judge.decide(reward_a, reward_b, left, random.Random(f"{seed}:{name}:{key}"))
    return left, choice, strength


def simulate(store, judge: GoldJudge, annotators: int = 3, seed: int = 0, pair_ids: Optional[list[int]] = None) -> dict[str, int]:
    """Have `annotators` simulated annotators vote once on every pair (that they have not voted on)."""
    source = f"sim:{judge.name}"
    names = annotator_names(judge, annotators)
    done = {(v.annotator, v.pair_id) for v in st.effective_votes(store, source=source)}
    counts = {"votes": 0, "skipped_no_gold": 0, "pairs": 0}
    for pair in _pairs_with_text(store, pair_ids):
        if pair["family"] is None or pair["gold"] is None:
            counts["skipped_no_gold"] += 1
            continue
        counts["pairs"] += 1
        reward_a, reward_b = judge.score([pair, pair], [pair["text_a"], pair["text_b"]])
        for name in names:
            if (name, pair["id"]) in done:
                continue
            left, choice, strength = vote(judge, name, pair["id"], reward_a, reward_b, seed)
            st.add_vote(store, pair["id"], name, choice, strength=strength, left=left, source=source,
                        rationale=f"gold reward a={reward_a:.2f} b={reward_b:.2f}")
            counts["votes"] += 1
    return counts


def _pairs_with_text(store, pair_ids: Optional[list[int]]) -> list[dict]:
    from sqlalchemy import select
    from sqlalchemy.orm import aliased

    a, b = aliased(Response), aliased(Response)
    query = (
        select(Pair.id, Prompt.family, Prompt.gold, a.text, b.text)
        .join(Prompt, Pair.prompt_id == Prompt.id)
        .join(a, Pair.response_a_id == a.id)
        .join(b, Pair.response_b_id == b.id)
        .order_by(Pair.id)
    )
    if pair_ids is not None:
        query = query.where(Pair.id.in_(pair_ids))
    with store.read() as session:
        return [dict(zip(("id", "family", "gold", "text_a", "text_b"), row)) for row in session.execute(query)]
