"""Votes as an append-only event log: add, undo, and the view of the votes that currently count.

Design: every action is a new `vote` row, never an UPDATE or DELETE.
- kind "vote": a judgment (choice in a/b/tie/both_bad, in response order; strength 1 = slightly, 2 = much).
- kind "skip": the annotator passed on the pair; kind "flag": the pair is broken (flag_reason says why).
- kind "undo": takes back the event named by `supersedes_id`; a "vote" with `supersedes_id` is an edit.
An event is in effect while nothing supersedes it; `supersedes_id` is unique, so each event is superseded once at
most. The votes that count ("effective votes") are the kind "vote" rows in effect.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, func, insert, select, update
from sqlalchemy.orm import Session, aliased

from align.errors import DataError
from align.store.clock import utc, utcnow
from align.store.db import Store
from align.store.schema import VOTE_CHOICES, VOTE_KINDS, Assignment, LeaseSlot, Pair, Vote
from align.store.slots import claim_slot, open_slot

ANSWER_KINDS = ("vote", "skip")  # one per annotator and pair; flags are side notes and may come on top


_LATER = aliased(Vote, name="later_vote")  # built once: aliasing per query costs more than the query itself


def in_effect() -> ColumnElement[bool]:
    """True for vote rows that no later event supersedes."""
    return ~select(_LATER.id).where(_LATER.supersedes_id == Vote.id).exists()


def source_filter(source: str | None) -> ColumnElement[bool] | None:
    """"human", "simulated" (any "sim:<judge>"), an exact source, or None for all."""
    if source is None:
        return None
    if source == "simulated":
        return Vote.source.like("sim:%")
    return Vote.source == source


def check_source(source: str) -> None:
    if source != "human" and not (source.startswith("sim:") and len(source) > 4):
        raise DataError(f"unknown vote source {source!r}; expected 'human' or 'sim:<judge name>'")


def check_event(kind: str, annotator: str, choice: str | None, strength: int, left: str | None,
                supersedes_id: int | None) -> None:
    if kind not in VOTE_KINDS:
        raise DataError(f"unknown vote kind {kind!r}; expected one of {', '.join(VOTE_KINDS)}")
    if not annotator:
        raise DataError("a vote needs an annotator name")
    if kind == "vote":
        if choice not in VOTE_CHOICES:
            raise DataError(f"unknown choice {choice!r}; expected one of {', '.join(VOTE_CHOICES)}")
        if strength not in (1, 2):
            raise DataError(f"strength must be 1 (slightly) or 2 (much), got {strength!r}")
    elif choice is not None:
        raise DataError(f"a {kind!r} event carries no choice (got {choice!r})")
    if left not in ("a", "b", None):
        raise DataError(f"left must be 'a' or 'b' (the response shown on the left), got {left!r}")
    if kind == "undo" and supersedes_id is None:
        raise DataError("an undo needs supersedes_id: the event it takes back")
    if kind in ("skip", "flag") and supersedes_id is not None:
        raise DataError(f"a {kind!r} cannot supersede an event; undo it first")


def add_vote(
    store: Store,
    pair_id: int,
    annotator: str,
    choice: str | None,
    strength: int = 1,
    rationale: str | None = None,
    reasons: dict[str, Any] | None = None,
    left: str | None = "a",
    guidelines_version: str | None = "v1",
    shown_at: datetime | None = None,
    source: str = "human",
    kind: str = "vote",
    supersedes_id: int | None = None,
    flag_reason: str | None = None,
    answered_at: datetime | None = None,
) -> int:
    """Append one labeling event in one transaction and return its id. See the module docstring for kinds."""
    check_event(kind, annotator, choice, strength, left, supersedes_id)
    check_source(source)
    with store.write() as session:
        # Lock the pair so two events of one annotator on it (a double click) are checked one after the other.
        # NO KEY UPDATE: a lease inserting an assignment (a foreign key to the pair) is not blocked by it.
        if session.get(Pair, pair_id, with_for_update={"key_share": True}) is None:
            raise DataError(f"no pair with id {pair_id}")
        target = None
        if supersedes_id is not None:
            target = check_supersedes(session, supersedes_id, pair_id, annotator, kind)
        elif kind in ANSWER_KINDS:
            check_unanswered(session, pair_id, annotator)
        vote = Vote(
            pair_id=pair_id, annotator=annotator, kind=kind, choice=choice,
            strength=strength if kind == "vote" else None, rationale=rationale, reasons=reasons,
            left=None if kind == "undo" else left, guidelines_version=guidelines_version, shown_at=utc(shown_at),
            answered_at=utc(answered_at) or utcnow(), supersedes_id=supersedes_id, flag_reason=flag_reason,
            source=source, created_at=utcnow(),
        )
        session.add(vote)
        session.flush()
        move_slot(session, vote, target)
        if kind in ANSWER_KINDS:
            finish_lease(session, pair_id, annotator)
        return vote.id


def append_leased_event(session: Session, row: dict[str, Any]) -> int:
    """In the caller's transaction, which has just ended the annotator's live lease of the pair (leases.
    finish_live_lease): append the event `row` (the columns of `add_vote`'s Vote, checked by the caller with
    `check_event`) and move the annotator's held slot: filled by a human vote, opened again by a skip or a flag.
    Two statements; the lease stands for the checks add_vote makes (nobody answers a pair twice: answering ends
    the lease, and a pair answered once is never leased again)."""
    event_id = session.execute(insert_event_statement(), row).scalar_one()
    human_vote = row["kind"] == "vote" and row["source"] == "human"
    moved = session.execute(slot_move_statement(), {
        "pair": row["pair_id"], "who": row["annotator"], "to_state": "filled" if human_vote else "open",
        "to_who": row["annotator"] if human_vote else None,
    })
    if moved.rowcount == 0 and human_vote:  # no held slot (a lease older than the slots): take a free one
        claim_slot(session, row["pair_id"], row["annotator"], "filled", row["answered_at"])
    return event_id


@functools.cache
def insert_event_statement():
    return insert(Vote.__table__).returning(Vote.__table__.c.id)


@functools.cache
def slot_move_statement():
    """UPDATE the annotator's held slot of the pair to :to_state (held by :to_who), one index lookup."""
    slots = LeaseSlot.__table__
    held = slots.alias("held_slot")
    mine = (
        select(held.c.id)
        .where(held.c.pair_id == bindparam("pair"), held.c.annotator == bindparam("who"), held.c.state == "held")
        .order_by(held.c.slot)
        .limit(1)
        .scalar_subquery()
    )
    # The outer conditions repeat the inner ones: on PostgreSQL a concurrent change to the row (another annotator
    # taking over an expired lease) is re-checked against them after the row lock is granted.
    still_mine = (slots.c.id == mine, slots.c.annotator == bindparam("who"), slots.c.state == "held")
    return update(slots).where(*still_mine).values(
        state=bindparam("to_state"), annotator=bindparam("to_who"), expires_at=None
    )


def move_slot(session: Session, event: Vote, target: Vote | None) -> None:
    """Keep the pair's queue slots in step with its effective human votes (see slots.py): a new human vote fills
    the annotator's slot, a skip hands their held slot back, an undo of a human vote reopens the slot it filled.
    An edit (vote over vote) changes nothing; simulated judges never use up the human quota."""
    now = utcnow()
    if event.kind == "vote" and event.source == "human" and (target is None or target.kind == "skip"):
        claim_slot(session, event.pair_id, event.annotator, "filled", now)
    elif event.kind == "skip":
        open_slot(session, event.pair_id, event.annotator, "held")
    elif event.kind == "undo" and target is not None:
        reopen_vote_slot(session, target)


def reopen_vote_slot(session: Session, undone: Vote) -> None:
    """An undone human vote no longer counts: its slot opens again."""
    if undone.kind == "vote" and undone.source == "human":
        open_slot(session, undone.pair_id, undone.annotator, "filled")


def check_supersedes(session: Session, target_id: int, pair_id: int, annotator: str, kind: str) -> Vote:
    target = session.get(Vote, target_id)
    if target is None or target.pair_id != pair_id or target.annotator != annotator:
        raise DataError(f"event {target_id} is not one of {annotator!r}'s events on pair {pair_id}")
    if target.kind == "undo":
        raise DataError(f"event {target_id} is an undo; record the vote again instead of undoing the undo")
    if kind == "vote" and target.kind not in ANSWER_KINDS:
        # An edit replaces the annotator's one answer; replacing a flag could leave two votes in effect.
        raise DataError(f"event {target_id} is a {target.kind!r}; only a vote or skip can be edited")
    if is_superseded(session, target_id):
        raise DataError(f"event {target_id} was already undone or edited")
    return target


def check_unanswered(session: Session, pair_id: int, annotator: str) -> None:
    query = select(Vote.id).where(
        Vote.pair_id == pair_id, Vote.annotator == annotator, Vote.kind.in_(ANSWER_KINDS), in_effect()
    )
    previous = session.scalars(query).first()
    if previous is not None:
        raise DataError(
            f"{annotator!r} already answered pair {pair_id} (event {previous}); "
            f"pass supersedes_id={previous} to change it"
        )


def is_superseded(session: Session, vote_id: int) -> bool:
    return session.scalars(select(Vote.id).where(Vote.supersedes_id == vote_id)).first() is not None


def finish_lease(session: Session, pair_id: int, annotator: str) -> None:
    session.execute(
        update(Assignment)
        .where(Assignment.pair_id == pair_id, Assignment.annotator == annotator, Assignment.status == "active")
        .values(status="done")
    )


def effective_votes_query(
    *,
    pair_ids: Sequence[int] | None = None,
    annotators: Sequence[str] | None = None,
    source: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Select[tuple[Vote]]:
    """The votes that count, filtered; since/until bound `answered_at` (since inclusive, until exclusive)."""
    query = select(Vote).where(Vote.kind == "vote", in_effect()).order_by(Vote.id)
    if pair_ids is not None:
        query = query.where(Vote.pair_id.in_(list(pair_ids)))
    if annotators is not None:
        query = query.where(Vote.annotator.in_(list(annotators)))
    if (clause := source_filter(source)) is not None:
        query = query.where(clause)
    if since is not None:
        query = query.where(Vote.answered_at >= utc(since))
    if until is not None:
        query = query.where(Vote.answered_at < utc(until))
    return query


def effective_votes(store: Store, **filters: Any) -> list[Vote]:
    """The votes that count (kind "vote", not undone or edited), oldest first; filters as effective_votes_query."""
    with store.read() as session:
        return list(session.scalars(effective_votes_query(**filters)))


def open_pairs(store: Store, annotator: str | None = None, limit: int | None = None) -> list[int]:
    """Ids of pairs with fewer effective human votes than they require, fewest votes first; with `annotator`,
    leaving out pairs that annotator already voted on, skipped or flagged."""
    votes = human_vote_count()
    query = select(Pair.id).where(votes < Pair.votes_required).order_by(votes, Pair.id)
    if annotator is not None:
        query = query.where(~answered_by(annotator))
    if limit is not None:
        query = query.limit(limit)
    with store.read() as session:
        return list(session.scalars(query))


def human_vote_count() -> ColumnElement[int]:
    """Effective human votes on the enclosing query's pair. Simulated judges label everything and do not use up
    the human quota."""
    return (
        select(func.count(Vote.id))
        .where(Vote.pair_id == Pair.id, Vote.kind == "vote", Vote.source == "human", in_effect())
        .scalar_subquery()
    )


def answered_by(annotator: str) -> ColumnElement[bool]:
    """The enclosing query's pair has a vote, skip or flag of this annotator in effect."""
    return (
        select(Vote.id)
        .where(Vote.pair_id == Pair.id, Vote.annotator == annotator, Vote.kind != "undo", in_effect())
        .exists()
    )
