"""Comparisons built from SFT demonstrations, for a reward model: more prompts than sampling can afford.

A reward model trained on a few dozen sampled prompts learns those prompts, not what makes an answer right: on the
demo's data it ranked 406 held-out decided pairs at 0.53-0.56 (README, "What was tried for the reward model").
Demonstrations (a prompt with a reference answer, the SFT data) give two more kinds of comparison for free:

    reference   the prompt's demonstration against each of the model's samples for that prompt
    mismatched  the prompt's demonstration against the demonstration of another prompt of the same task family:
                an answer of the right form to the wrong question, which teaches the model to read the prompt
    off_task    the prompt's demonstration against the demonstration of a prompt of another family: an answer of
                the wrong kind (a refusal of a harmless request, a JSON object where a sentence was asked for).
                Without them the model sees refusals of harmless requests only among the refusal family's
                prompts; it scored one to a word-count prompt above a right answer, and RLHF against it learned
                to refuse every word-count prompt (README, "What was tried")

Both are candidates, not labels: annotators vote on them like on any pair (here the simulated ones, through
`label_candidates`), so a mismatched answer that happens to be right too (two refusals of two harmful requests)
comes back a tie and teaches nothing wrong.

    from align.demonstrations import demonstration_candidates, label_candidates
    rows = label_candidates(demonstration_candidates(tasks, samples, seed=0), GoldJudge(), annotators=3, seed=0)
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Optional, Sequence

from align.simulate import annotator_names, vote
from align.store.export import aggregate
from align.tasks import reference_messages


def demonstration_candidates(tasks: Sequence[dict], samples: Optional[dict[str, Sequence[str]]] = None,
                             seed: int = 0, mismatched: int = 1, off_task: int = 1) -> list[dict]:
    """Candidate pairs {prompt, a, b, family, gold, kind} from task rows (prompt, family, gold; align.tasks).

    `samples` maps a prompt's text to the model's answers for it: one `reference` candidate per distinct answer.
    Every task also gets `mismatched` candidates against other tasks' references of its family and `off_task` ones
    against references of tasks of other families (drawn with `seed`; none where there is no such task). The
    demonstration is always `a`; who is shown left is the annotator's draw."""
    rng = random.Random(seed)
    references = {t["prompt"]: reference_messages(t)[-1]["content"] for t in tasks}
    by_family: dict[str, list[dict]] = {}
    families_of: dict[str, set[str]] = {}  # a reference text -> the families with a task that has it
    for t in tasks:
        by_family.setdefault(t["family"], []).append(t)
        families_of.setdefault(references[t["prompt"]], set()).add(t["family"])
    outside: dict[str, list[dict]] = {}  # a family -> the tasks of the others, built once (not once per task)
    candidates = []
    for t in tasks:
        reference = references[t["prompt"]]
        base = {"prompt": [{"role": "user", "content": t["prompt"]}], "a": reference, "family": t["family"],
                "gold": t["gold"]}
        for text in sorted(set((samples or {}).get(t["prompt"], ()))):
            if text != reference:
                candidates.append({**base, "b": text, "kind": "reference"})
        others = [o for o in by_family[t["family"]] if references[o["prompt"]] != reference]
        for other in rng.sample(others, min(mismatched, len(others))):
            candidates.append({**base, "b": references[other["prompt"]], "kind": "mismatched"})
        if t["family"] not in outside and off_task:
            outside[t["family"]] = [o for o in tasks if o["family"] != t["family"]]
        strangers = outside.get(t["family"], [])
        if families_of[reference] - {t["family"]}:  # another family has this very answer: not a stranger's
            strangers = [o for o in strangers if references[o["prompt"]] != reference]
        for other in rng.sample(strangers, min(off_task, len(strangers))):
            candidates.append({**base, "b": references[other["prompt"]], "kind": "off_task"})
    return candidates


def label_candidates(candidates: Sequence[dict], judge, annotators: int = 3, seed: int = 0) -> list[dict]:
    """Preference rows (the columns `align export` writes for the text: prompt, chosen, rejected, label, margin,
    label_agreement, n_votes, family, gold) from `annotators` votes of a judge with `decide` (align.judges.GoldJudge)
    on each candidate, aggregated as the store aggregates votes (ties and both-bad majorities keep their label)."""
    scores_a = judge.score(candidates, [c["a"] for c in candidates])
    scores_b = judge.score(candidates, [c["b"] for c in candidates])
    rows = []
    for c, reward_a, reward_b in zip(candidates, scores_a, scores_b):
        key = hashlib.sha256(json.dumps([c["prompt"], c["a"], c["b"]], ensure_ascii=False).encode()).hexdigest()[:16]
        verdict = aggregate([vote(judge, name, key, reward_a, reward_b, seed)[1:]
                             for name in annotator_names(judge, annotators)])
        chosen, rejected = (c["b"], c["a"]) if verdict.choice == "b" else (c["a"], c["b"])
        rows.append({
            "prompt": c["prompt"],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "label": "chosen" if verdict.choice in ("a", "b") else verdict.choice,
            "margin": verdict.margin, "label_agreement": verdict.agreement, "n_votes": verdict.n_votes,
            "family": c["family"], "gold": json.dumps(c["gold"], ensure_ascii=False), "kind": c["kind"],
        })
    return rows
