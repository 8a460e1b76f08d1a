"""Building pairs of responses to label, and reading one pair for display."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from align.errors import AlignError, DataError
from align.store.clock import utcnow
from align.store.db import Store, chunks, insert_ignoring_conflicts
from align.store.schema import VOTE_CHOICES, Pair, Prompt, Response
from align.store.slots import add_slots

PAIR_RULES = ("random_iid", "all_pairs")


def make_pairs(
    store: Store,
    model_version_id: int | None = None,
    rule: str = "random_iid",
    seed: int = 0,
    votes_required: int = 3,
    prompt_ids: Sequence[int] | None = None,
) -> list[int]:
    """Pair the stored responses of each prompt (of one version, or of all); return the ids of all pairs of `rule`
    among those responses, old and new, in id order, so calling it again changes nothing and returns the same.

    random_iid: responses from one sampler (version + decoding settings) are shuffled (deterministically by
    `seed`) and paired disjointly, (r0, r1), (r2, r3), ...: two independent samples per pair, which is what the
    importance weights assume. Responses already in a random_iid pair are left out, so new samples added later
    are paired among themselves. all_pairs: every unordered pair of the prompt's responses.
    """
    if rule not in PAIR_RULES:
        raise AlignError(f"unknown pair rule {rule!r}; expected one of {', '.join(PAIR_RULES)}")
    if votes_required < 1:
        raise AlignError(f"votes_required must be at least 1, got {votes_required}")
    with store.write() as session:
        responses = candidate_responses(session, model_version_id, prompt_ids)
        existing = existing_pairs(session, {r.prompt_id for r in responses})
        build = random_iid_rows if rule == "random_iid" else all_pairs_rows
        rows = []
        for group_key, group in group_responses(responses, rule).items():
            rows += build(group, group_key, existing, seed)
        for row in rows:
            row.update(rule=rule, votes_required=votes_required, is_gold=False, created_at=utcnow())
        insert_ignoring_conflicts(session, Pair, rows, key=("response_a_id", "response_b_id"))
        wanted = {r.id for r in responses}
        found = existing_pairs(session, {r.prompt_id for r in responses})
        add_slots(session, [(p.id, p.votes_required) for p in found if p.rule == rule])
    return sorted(p.id for p in found if p.rule == rule and {p.response_a_id, p.response_b_id} <= wanted)


def candidate_responses(
    session: Session, model_version_id: int | None, prompt_ids: Sequence[int] | None
) -> list[Response]:
    query = select(Response).order_by(Response.id)
    if model_version_id is not None:
        query = query.where(Response.model_version_id == model_version_id)
    if prompt_ids is None:
        return list(session.scalars(query))
    found: list[Response] = []
    for chunk in chunks(sorted(set(prompt_ids))):
        found += session.scalars(query.where(Response.prompt_id.in_(chunk)))
    return sorted(found, key=lambda r: r.id)


def existing_pairs(session: Session, prompt_ids: set[int]) -> list[Pair]:
    found: list[Pair] = []
    for chunk in chunks(sorted(prompt_ids)):
        found += session.scalars(select(Pair).where(Pair.prompt_id.in_(chunk)))
    return found


def group_responses(responses: list[Response], rule: str) -> dict[tuple, list[Response]]:
    """random_iid pairs only samples from the same sampler; all_pairs takes the prompt's whole candidate set."""
    groups: dict[tuple, list[Response]] = defaultdict(list)
    for r in responses:
        if rule == "random_iid":
            key = (r.prompt_id, r.model_version_id, r.temperature, r.top_p, r.top_k, r.max_new_tokens)
        else:
            key = (r.prompt_id,)
        groups[key].append(r)
    return groups


def random_iid_rows(group: list[Response], key: tuple, existing: list[Pair], seed: int) -> list[dict[str, Any]]:
    paired = {i for p in existing if p.rule == "random_iid" for i in (p.response_a_id, p.response_b_id)}
    free = [r.id for r in group if r.id not in paired]
    # A string seed makes the shuffle reproducible across processes and Python versions.
    random.Random(f"{seed}/{key}").shuffle(free)
    params = {"seed": seed, "model_version_id": key[1], "candidate_ids": sorted(free)}
    taken = {frozenset((p.response_a_id, p.response_b_id)) for p in existing}
    rows = []
    for a, b in zip(free[0::2], free[1::2], strict=False):  # an odd one out waits for the next round
        if frozenset((a, b)) not in taken:
            rows.append({"prompt_id": key[0], "response_a_id": a, "response_b_id": b, "rule_params": params})
    return rows


def all_pairs_rows(group: list[Response], key: tuple, existing: list[Pair], seed: int) -> list[dict[str, Any]]:
    ids = sorted(r.id for r in group)
    params = {"candidate_ids": ids}
    taken = {frozenset((p.response_a_id, p.response_b_id)) for p in existing}
    return [
        {"prompt_id": key[0], "response_a_id": a, "response_b_id": b, "rule_params": params}
        for a, b in itertools.combinations(ids, 2)
        if frozenset((a, b)) not in taken
    ]


def get_pair(store: Store, pair_id: int) -> dict[str, Any]:
    """What a labeling screen needs: the prompt as messages and both responses (a and b in stored order)."""
    with store.read() as session:
        pair = session.get(Pair, pair_id)
        if pair is None:
            raise DataError(f"no pair with id {pair_id}")
        prompt = session.get(Prompt, pair.prompt_id)
        response_a = session.get(Response, pair.response_a_id)
        response_b = session.get(Response, pair.response_b_id)
    return {
        "pair_id": pair.id,
        "prompt_id": prompt.id,
        "prompt": prompt_messages(prompt),
        "family": prompt.family,
        "response_a": {"id": response_a.id, "text": response_a.text},
        "response_b": {"id": response_b.id, "text": response_b.text},
        "rule": pair.rule,
        "votes_required": pair.votes_required,
        "is_gold": pair.is_gold,
        "gold_choice": pair.gold_choice,
    }


def prompt_messages(prompt: Prompt) -> list[dict[str, str]]:
    return prompt.messages or [{"role": "user", "content": prompt.text}]


def set_gold(store: Store, pair_id: int, gold_choice: str) -> None:
    """Mark a pair as an annotator-QA gold item whose right answer is `gold_choice`."""
    if gold_choice not in VOTE_CHOICES:
        raise DataError(f"unknown gold choice {gold_choice!r}; expected one of {', '.join(VOTE_CHOICES)}")
    with store.write() as session:
        done = session.execute(update(Pair).where(Pair.id == pair_id).values(is_gold=True, gold_choice=gold_choice))
        if done.rowcount == 0:
            raise DataError(f"no pair with id {pair_id}")
