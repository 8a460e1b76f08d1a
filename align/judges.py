"""Judges of responses: the tasks' gold checks (also the simulated annotators' judge) and a trained reward model."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

from align.errors import AlignError
from align.tasks import FAMILIES, score_response


@dataclass(frozen=True)
class GoldJudge:
    """The tasks' gold checks as a judge: `score` gives each response its gold reward in [0, 1] (align eval), and
    `decide` turns two rewards into the vote of a noisy simulated annotator (align label --simulate, align.simulate):

        both bad   if max(r_a, r_b) < both_bad_threshold
        tie        if |r_a - r_b| < tie_threshold
        else       P(a) = sigmoid((r_a - r_b) / temperature + position_bias * (+1 if a is shown left else -1))

    Strength is "much" (2) when |r_a - r_b| > 0.5, else "slightly" (1).
    """

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

    def check(self, prompts: Sequence[dict]) -> None:
        """Every prompt must belong to a task family with a gold check; else name the family that has none."""
        for p in prompts:
            family = p.get("family")
            if family not in FAMILIES:
                shown = "no task family" if family is None else f"task family {family!r}"
                raise AlignError(f"the gold judge cannot score {shown} (prompt {p['text'][:60]!r}): gold checks exist "
                                 f"for {', '.join(FAMILIES)}; use --judge reward:RUN_DIR for other prompts")
            if not isinstance(p.get("gold"), dict):
                raise AlignError(f"the gold judge cannot score family {family!r}: prompt {p['text'][:60]!r} has no "
                                 "gold reference (a JSON object)")

    def score(self, prompts: Sequence[dict], texts: Sequence[str]) -> list[float]:
        return [score_response(p["family"], t, p["gold"]) for p, t in zip(prompts, texts)]


class RewardJudge:
    name = "reward"

    def __init__(self, run_dir: str, batch_size: int = 8):
        from align.trainers.reward import load_reward_model  # deferred: torch; the gold judge needs none

        if not run_dir:
            raise AlignError("the reward judge needs a reward-model run directory: --judge reward:RUN_DIR")
        self.run_dir = run_dir
        self.model, self.tokenizer, self.stats = load_reward_model(run_dir, device="auto")
        self.batch_size = batch_size

    def check(self, prompts: Sequence[dict]) -> None:  # a reward model scores any prompt
        return None

    def score(self, prompts: Sequence[dict], texts: Sequence[str]) -> list[float]:
        return self.score_messages([p["messages"] for p in prompts], list(texts))

    def score_messages(self, prompts: Sequence, responses: Sequence) -> list[float]:
        """Normalised rewards; prompts as text or messages, responses as text or one assistant message."""
        from align.trainers.reward import score  # deferred: torch (see __init__)

        return score(self.model, self.tokenizer, prompts, responses, self.batch_size, self.stats)
