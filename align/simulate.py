"""Simulated annotators: vote on open pairs the way a noisy human would, from a gold scorer.

    align label --simulate gold --db URL [--annotators 3 --judge_temperature 0.1 --tie_threshold 0.05
                                          --both_bad_threshold 0.2 --position_bias 0.0 --seed 0]

The judge is Bradley–Terry over the task's gold reward r in [0, 1]:
    both bad   if max(r_a, r_b) < both_bad_threshold
    tie        if |r_a - r_b| < tie_threshold
    else       P(a) = sigmoid((r_a - r_b) / temperature + position_bias * (+1 if a is shown left else -1))
Strength is "much" (2) when |r_a - r_b| > 0.5, else "slightly" (1). Each simulated annotator sees the
pair in its own left/right order, so position bias acts the way it does for people. Votes are stored
with source "sim:<judge>" and never count toward the human vote quota.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Optional

from align.errors import AlignError
from align.tasks import score_response


@dataclass(frozen=True)
class GoldJudge:
    name: str = "gold"
    temperature: float = 0.1
    tie_threshold: float = 0.05
    both_bad_threshold: float = 0.2
    position_bias: float = 0.0  # logit added toward the left response

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise AlignError(f"judge temperature must be > 0, got {self.temperature}")

    def decide(self, reward_a: float, reward_b: float, left: str, rng: random.Random) -> tuple[str, int]:
        """(choice in {a, b, tie, both_bad}, strength in {1, 2}) for one annotator seeing `left` on the left."""
        if max(reward_a, reward_b) < self.both_bad_threshold:
            return "both_bad", 1
        gap = reward_a - reward_b
        if abs(gap) < self.tie_threshold:
            return "tie", 1
        logit = gap / self.temperature + self.position_bias * (1 if left == "a" else -1)
        p_a = 1.0 / (1.0 + math.exp(-max(min(logit, 50.0), -50.0)))
        choice = "a" if rng.random() < p_a else "b"
        return choice, 2 if abs(gap) > 0.5 else 1


def shown_left(annotator: str, pair_id: int) -> str:
    """Deterministic per (annotator, pair): which response the annotator sees on the left."""
    digest = hashlib.sha256(f"{annotator}:{pair_id}".encode()).digest()
    return "a" if digest[0] % 2 == 0 else "b"


def simulate(store, judge: GoldJudge, annotators: int = 3, seed: int = 0, pair_ids: Optional[list[int]] = None) -> dict[str, int]:
    """Have `annotators` simulated annotators vote once on every pair (that they have not voted on)."""
    from align import store as st

    source = f"sim:{judge.name}"
    names = [f"sim-{judge.name}-{i + 1}" for i in range(annotators)]
    done = {(v.annotator, v.pair_id) for v in st.effective_votes(store, source=source)}
    counts = {"votes": 0, "skipped_no_gold": 0, "pairs": 0}
    for pair in _pairs_with_text(store, pair_ids):
        if pair["family"] is None or pair["gold"] is None:
            counts["skipped_no_gold"] += 1
            continue
        counts["pairs"] += 1
        reward_a = score_response(pair["family"], pair["text_a"], pair["gold"])
        reward_b = score_response(pair["family"], pair["text_b"], pair["gold"])
        for name in names:
            if (name, pair["id"]) in done:
                continue
            rng = random.Random(f"{seed}:{name}:{pair['id']}")
            left = shown_left(name, pair["id"])
            choice, strength = judge.decide(reward_a, reward_b, left, rng)
            st.add_vote(store, pair["id"], name, choice, strength=strength, left=left, source=source,
                        rationale=f"gold reward a={reward_a:.2f} b={reward_b:.2f}")
            counts["votes"] += 1
    return counts


def _pairs_with_text(store, pair_ids: Optional[list[int]]) -> list[dict]:
    from sqlalchemy import select
    from sqlalchemy.orm import aliased

    from align.store import Pair, Prompt, Response

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
