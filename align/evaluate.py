"""Answer task prompts with a model and score the answers with the tasks' gold checks."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import TYPE_CHECKING, Sequence

from align.data import as_messages
from align.generation import SamplingSettings, sample_responses
from align.tasks import score_response

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def answer_tasks(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    tasks: Sequence[dict],
    settings: SamplingSettings = SamplingSettings(temperature=0.0, max_new_tokens=48),
    batch_size: int = 16,
) -> list[dict]:
    """One answer per task (greedy by default), with its gold reward: rows of task + response + reward."""
    prompts = [as_messages(t["prompt"]) for t in tasks]
    rows: list[dict] = [{} for _ in tasks]
    for batch in sample_responses(model, tokenizer, prompts, 1, settings, batch_size=batch_size, with_logps=False):
        for sample in batch:
            task = tasks[sample.prompt_index]
            reward = score_response(task["family"], sample.text, task["gold"])
            rows[sample.prompt_index] = {**task, "response": sample.text, "reward": reward, "finish_reason": sample.finish_reason}
    return rows


def gold_summary(rows: Sequence[dict]) -> dict[str, float]:
    """Mean gold reward per family and overall ("all")."""
    by_family: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        by_family[row["family"]].append(row["reward"])
    summary = {family: statistics.fmean(values) for family, values in sorted(by_family.items())}
    summary["all"] = statistics.fmean(row["reward"] for row in rows) if rows else float("nan")
    return summary


def stratified(tasks: Sequence[dict], per_family: int) -> list[dict]:
    """The first `per_family` tasks of each family, in suite order (a fixed, balanced subset)."""
    counts: dict[str, int] = defaultdict(int)
    picked = []
    for task in tasks:
        if counts[task["family"]] < per_family:
            counts[task["family"]] += 1
            picked.append(task)
    return picked
