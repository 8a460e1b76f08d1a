"""K-way ranking events in the store, their export as weighted pairwise preference rows, and their agreement.

    rid = add_ranking(store, prompt_id, [r1, r2, r3, r4], ranks=[2, 1, 2, 3], annotator="alice")
    rows = export_rankings(store)        # TRL preference rows, `weight` = 2/K, ties labelled "tie"
    agreement = ranking_agreement(store)  # Kendall's W per ranked set of responses, and the mean

How a ranking expands and why each pair weighs 2/K: align/ranking.py.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from types import SimpleNamespace
from typing import Any, Optional, Sequence

from sqlalchemy import select

from align.errors import AlignError
from align.ranking import MAX_K, MIN_K, check_ranks, expand, kendalls_w
from align.store.db import Store
from align.store.export import Verdict, load_by_id, preference_row
from align.store.pairs import prompt_messages
from align.store.schema import Meta, ModelVersion, Prompt, Ranking, Response
from align.store.votes import check_source


def add_ranking(store: Store, prompt_id: int, response_ids: Sequence[int], ranks: Sequence[int], annotator: str,
                source: str = "human", shown_at: Optional[datetime] = None,
                guidelines_version: Optional[str] = None) -> int:
    """Store one ranking event (responses in shown order, one rank each); return its id. The responses must be
    K distinct responses (3 to 5) to this prompt."""
    check_source(source)
    ranks = check_ranks(ranks, len(response_ids))
    if len(set(response_ids)) != len(response_ids):
        raise AlignError(f"a ranking shows each response once, got {list(response_ids)}")
    with store.write() as session:
        found = dict(session.execute(select(Response.id, Response.prompt_id)
                                     .where(Response.id.in_(list(response_ids)))).tuples().all())
        wrong = [r for r in response_ids if found.get(r) != prompt_id]
        if wrong:
            raise AlignError(f"response(s) {wrong} are not responses to prompt {prompt_id}")
        event = Ranking(prompt_id=prompt_id, response_ids=list(response_ids), ranks=ranks, annotator=annotator,
                        source=source, shown_at=shown_at, guidelines_version=guidelines_version)
        session.add(event)
        session.flush()
        return event.id


def rankings(store: Store, source: Optional[str] = None) -> list[Ranking]:
    query = select(Ranking).order_by(Ranking.id)
    if source is not None:
        query = query.where(Ranking.source == source)
    with store.read() as session:
        found = list(session.scalars(query))
        session.expunge_all()
        return found


def _pair_orders(events: Sequence[Ranking]) -> dict[tuple[int, int], list[str]]:
    """Per unordered pair of responses (low id first), every ranking's verdict on it: a (low wins), b or tie."""
    out: dict[tuple[int, int], list[str]] = defaultdict(list)
    for event in events:
        for vote in expand(event.response_ids, event.ranks):
            a, b, choice = vote["a"], vote["b"], vote["choice"]
            if a > b:
                a, b, choice = b, a, {"a": "b", "b": "a"}.get(choice, choice)
            out[(a, b)].append(choice)
    return out


def export_rankings(store: Store, source: Optional[str] = None) -> list[dict[str, Any]]:
    """One preference row per expanded pair of each ranking, in `align export`'s format, plus `weight` (2/K),
    `ranking_id`, `annotator` and `label_agreement` (the share of all rankings of that pair that agree)."""
    events = rankings(store, source)
    if not events:
        return []
    orders = _pair_orders(events)
    with store.read() as session:
        responses = load_by_id(session, Response, {r for e in events for r in e.response_ids})
        prompts = load_by_id(session, Prompt, {e.prompt_id for e in events})
        names = dict(session.execute(select(ModelVersion.id, ModelVersion.name)).tuples().all())
        rows = []
        for event in events:
            for vote in expand(event.response_ids, event.ranks):
                key = tuple(sorted((vote["a"], vote["b"])))
                same = orders[key]
                mine = vote["choice"] if vote["a"] == key[0] else {"a": "b", "b": "a"}.get(vote["choice"], "tie")
                verdict = Verdict(choice=vote["choice"], agreement=same.count(mine) / len(same), margin=1.0,
                                  n_votes=len(same))
                row = preference_row(SimpleNamespace(id=None), prompts[event.prompt_id], responses[vote["a"]],
                                     responses[vote["b"]], verdict, names)
                rows.append({**row, "weight": vote["weight"], "ranking_id": event.id, "annotator": event.annotator})
    return rows


def ranking_agreement(store: Store, source: Optional[str] = None) -> dict[str, Any]:
    """Kendall's W for each set of responses ranked by two or more annotators (rows reordered to one response
    order), and their mean; sets ranked once are counted, not scored."""
    groups: dict[tuple[int, ...], list[Ranking]] = defaultdict(list)
    for event in rankings(store, source):
        groups[tuple(sorted(event.response_ids))].append(event)
    per_set = []
    for key, events in groups.items():
        latest = {e.annotator: e for e in events}  # an annotator's last ranking of the set counts
        if len(latest) < 2:
            continue
        aligned = [[e.ranks[e.response_ids.index(r)] for r in key] for e in latest.values()]
        per_set.append({"responses": list(key), "annotators": len(latest), "w": kendalls_w(aligned)})
    mean = sum(s["w"] for s in per_set) / len(per_set) if per_set else None
    return {"sets": per_set, "mean_w": mean, "ranked_once": sum(len({e.annotator for e in v}) < 2
                                                                for v in groups.values()),
            "k_range": [MIN_K, MAX_K]}


# ---- the project's setting and the ranking queue -----------------------------------------------------------------

RANKING_KEY = "ranking_k"  # in the meta table: 0 (absent) = pairwise only, the default; 3..5 = K-way rankings too


def ranking_k(store: Store) -> int:
    with store.read() as session:
        value = session.scalar(select(Meta.value).where(Meta.key == RANKING_KEY))
    return int(value) if value and value.isdigit() else 0


def set_ranking_k(store: Store, k: int) -> None:
    """Turn K-way ranking on for this project (every app process on the store) with K responses, or off with 0."""
    if k != 0 and not MIN_K <= k <= MAX_K:
        raise AlignError(f"--ranking_k must be 0 (pairwise only) or {MIN_K} to {MAX_K}, got {k}")
    with store.write() as session:
        row = session.get(Meta, RANKING_KEY)
        if row is None:
            session.add(Meta(key=RANKING_KEY, value=str(k)))
        else:
            row.value = str(k)


def next_ranking(store: Store, annotator: str, k: int) -> Optional[dict[str, Any]]:
    """The next prompt for `annotator` to rank: one with at least k responses that they have not ranked, the
    least-ranked first; its first k responses in an order shuffled per (annotator, prompt), which is stored with
    the ranking. {prompt_id, prompt (messages), response_ids, texts}, or None when nothing is left."""
    import random

    from sqlalchemy import func

    with store.read() as session:
        counts = select(Response.prompt_id, func.count(Response.id).label("n")).group_by(Response.prompt_id).subquery()
        done = select(Ranking.prompt_id).where(Ranking.annotator == annotator)
        times = select(Ranking.prompt_id, func.count(Ranking.id).label("r")).group_by(Ranking.prompt_id).subquery()
        prompt_id = session.scalar(
            select(counts.c.prompt_id).outerjoin(times, times.c.prompt_id == counts.c.prompt_id)
            .where(counts.c.n >= k, counts.c.prompt_id.not_in(done))
            .order_by(func.coalesce(times.c.r, 0), counts.c.prompt_id).limit(1))
        if prompt_id is None:
            return None
        responses = list(session.scalars(select(Response).where(Response.prompt_id == prompt_id)
                                         .order_by(Response.id).limit(k)))
        prompt = session.get(Prompt, prompt_id)
        shown = list(responses)
        random.Random(f"{annotator}:{prompt_id}").shuffle(shown)
        return {"prompt_id": prompt_id, "prompt": prompt_messages(prompt), "response_ids": [r.id for r in shown],
                "texts": [r.text for r in shown]}


def parse_order(text: str, k: int) -> list[int]:
    """Typed order, best first, letters for the shown responses: "B A=C D" or "B > A = C > D" (= is a tie) ->
    ranks per shown response, e.g. [2, 1, 2, 3]."""
    groups = [g for g in text.upper().replace(">", " ").replace(" = ", "=").replace("= ", "=").replace(" =", "=")
              .split() if g]
    letters = [chr(ord("A") + i) for i in range(k)]
    ranks: dict[str, int] = {}
    for rank, group in enumerate(groups, 1):
        for letter in group.split("="):
            if letter not in letters:
                raise AlignError(f"unknown response {letter!r} in the order; use the letters {', '.join(letters)}")
            if letter in ranks:
                raise AlignError(f"response {letter} appears twice in the order")
            ranks[letter] = rank
    missing = [x for x in letters if x not in ranks]
    if missing:
        raise AlignError(f"the order leaves out {', '.join(missing)}: rank every response (= for ties)")
    return [ranks[x] for x in letters]
