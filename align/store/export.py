"""Aggregating effective votes per pair and exporting TRL-format datasets (preference, SFT, unpaired/KTO).

Ties and both-bad majorities are kept with their own `label`, never turned into a win (DESIGN §3).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from align.data import write_jsonl  # noqa: F401  (re-exported: the store's writer is the project's one)
from align.errors import AlignError
from align.store.db import Store, chunks
from align.store.pairs import prompt_messages
from align.store.schema import ModelVersion, Pair, Prompt, Response
from align.store.versions import get_model_version
from align.store.votes import effective_votes_query


@dataclass(frozen=True)
class Verdict:
    """The aggregate of one pair's votes. `choice` is in response order: a, b, tie or both_bad."""

    choice: str
    agreement: float  # share of the votes in the largest group
    margin: float  # mean strength (1 slightly, 2 much) of the votes for `choice`; 0.0 if none voted it
    n_votes: int


def aggregate(votes: Sequence[tuple[str, int | None]]) -> Verdict:
    """Majority of (choice, strength) votes. When the largest groups are even, the result is the cautious one:
    both_bad if it is among them, else tie (an even a/b split is no preference, never a win)."""
    counts = Counter(choice for choice, _ in votes)
    top = max(counts.values())
    leaders = [choice for choice, n in counts.items() if n == top]
    if len(leaders) == 1:
        choice = leaders[0]
    else:
        choice = "both_bad" if "both_bad" in leaders else "tie"
    strengths = [strength or 1 for voted, strength in votes if voted == choice]
    margin = sum(strengths) / len(strengths) if strengths else 0.0
    return Verdict(choice=choice, agreement=top / len(votes), margin=margin, n_votes=len(votes))


def export_preferences(
    store: Store,
    *,
    model_versions: Sequence[str | int] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    annotators: Sequence[str] | None = None,
    source: str | None = None,
    min_agreement: float = 0.0,
    complete_only: bool = False,
) -> list[dict[str, Any]]:
    """One row per pair with effective votes, in TRL's conversational preference format plus provenance.

    Filters: `model_versions` (names or ids; both responses must come from them), `since`/`until` (vote
    answered_at), `annotators`, `source` ("human", "simulated", or an exact "sim:<judge>"), `min_agreement`,
    `complete_only` (pairs with at least their `votes_required` matching votes; `align export` and the app's
    export button set it unless asked for every pair).
    label is "chosen" for a decided pair, else "tie"/"both_bad" with chosen/rejected = responses a/b as stored.
    """
    if not 0 <= min_agreement <= 1:  # also refuses nan, which every comparison would let through
        raise AlignError(f"min_agreement must be a share between 0 and 1, got {min_agreement}")
    allowed = None if model_versions is None else {get_model_version(store, v).id for v in model_versions}
    query = effective_votes_query(annotators=annotators, source=source, since=since, until=until)
    with store.read() as session:
        votes_by_pair: dict[int, list[tuple[str, int | None]]] = defaultdict(list)
        for vote in session.scalars(query):
            votes_by_pair[vote.pair_id].append((vote.choice, vote.strength))
        pairs = load_by_id(session, Pair, votes_by_pair)
        response_ids = {i for p in pairs.values() for i in (p.response_a_id, p.response_b_id)}
        responses = load_by_id(session, Response, response_ids)
        prompts = load_by_id(session, Prompt, {p.prompt_id for p in pairs.values()})
        version_names = dict(session.execute(select(ModelVersion.id, ModelVersion.name)).tuples().all())
    rows = []
    for pair_id in sorted(votes_by_pair):
        pair = pairs[pair_id]
        a, b = responses[pair.response_a_id], responses[pair.response_b_id]
        if allowed is not None and not {a.model_version_id, b.model_version_id} <= allowed:
            continue
        if complete_only and len(votes_by_pair[pair_id]) < pair.votes_required:
            continue
        verdict = aggregate(votes_by_pair[pair_id])
        if verdict.agreement < min_agreement:
            continue
        rows.append(preference_row(pair, prompts[pair.prompt_id], a, b, verdict, version_names))
    return rows


def load_by_id(session: Session, model: type, ids: Iterable[int]) -> dict[int, Any]:
    found: dict[int, Any] = {}
    for chunk in chunks(sorted(ids)):
        found.update({row.id: row for row in session.scalars(select(model).where(model.id.in_(chunk)))})
    return found


def preference_row(
    pair: Pair, prompt: Prompt, a: Response, b: Response, verdict: Verdict, version_names: dict[int, str]
) -> dict[str, Any]:
    chosen, rejected = (b, a) if verdict.choice == "b" else (a, b)
    chosen_version, rejected_version = version_names[chosen.model_version_id], version_names[rejected.model_version_id]
    return {
        "prompt": prompt_messages(prompt),
        "chosen": [{"role": "assistant", "content": chosen.text}],
        "rejected": [{"role": "assistant", "content": rejected.text}],
        "label": "chosen" if verdict.choice in ("a", "b") else verdict.choice,
        "margin": verdict.margin,
        "label_agreement": verdict.agreement,
        "n_votes": verdict.n_votes,
        # Sums of per-token log-probs: under the raw model at temperature 1 (what importance weights compare
        # against) and under the distribution actually sampled from.
        "gen_chosen_logps": chosen.logp,
        "gen_rejected_logps": rejected.logp,
        "gen_chosen_sample_logps": chosen.sample_logp,
        "gen_rejected_sample_logps": rejected.sample_logp,
        "chosen_token_ids": chosen.completion_token_ids,
        "rejected_token_ids": rejected.completion_token_ids,
        # Null for a pair across two versions: see the per-side columns.
        "gen_model_version": chosen_version if chosen_version == rejected_version else None,
        "gen_chosen_model_version": chosen_version,
        "gen_rejected_model_version": rejected_version,
        "chosen_response_id": chosen.id,
        "rejected_response_id": rejected.id,
        "pair_id": pair.id,
        "prompt_id": prompt.id,
        "family": prompt.family,
        # JSON-encoded: gold checks differ in type between tasks, and one column must have one type to load.
        "gold": None if prompt.gold is None else json.dumps(prompt.gold, ensure_ascii=False),
    }


def to_trl(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter]:
    """Native preference rows -> plain TRL conversational preferences (prompt, chosen, rejected) for decided pairs
    only, and the count of rows left out by label. TRL's trainers read every row as "chosen beats rejected", so a tie
    or a both-bad pair would be trained as a win."""
    left_out = Counter(row["label"] for row in rows if row["label"] != "chosen")
    kept = [{"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
            for row in rows if row["label"] == "chosen"]
    return kept, left_out


def export_sft(store: Store, **filters: Any) -> list[dict[str, Any]]:
    """{"messages": prompt + [assistant: the majority-preferred response]} for each decided pair, each response
    once. Filters as export_preferences."""
    rows, seen = [], set()
    for row in export_preferences(store, **filters):
        if row["label"] == "chosen" and row["chosen_response_id"] not in seen:
            seen.add(row["chosen_response_id"])
            rows.append({"messages": row["prompt"] + row["chosen"]})
    return rows


def export_unpaired(store: Store, **filters: Any) -> list[dict[str, Any]]:
    """KTO-style {"prompt", "completion", "label": bool}: a decided pair gives chosen True and rejected False, a
    both-bad pair gives both False; a tie says nothing about either response on its own, so it gives no rows.
    Filters as export_preferences."""
    rows = []
    for row in export_preferences(store, **filters):
        if row["label"] == "tie":
            continue
        good = row["label"] == "chosen"
        rows.append({"prompt": row["prompt"], "completion": row["chosen"], "label": good})
        rows.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    return rows



def to_dataset(rows: list[dict[str, Any]]):
    """The rows as a `datasets.Dataset` (imported here: datasets is slow to import)."""
    import datasets

    return datasets.Dataset.from_list(rows)
