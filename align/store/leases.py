"""Leases: which annotator is looking at which pair, so that k annotators (not more) label each pair.

Every pair has `votes_required` slots (slots.py) that are open, held by a lease or filled by a vote. An annotator
asking for work gets, in order: the slot they hold already (a page refresh; the lease is renewed), a slot whose
lease expired (its holder walked away: the pair is handed on), or the first open slot in queue order, always of a
pair they have not answered. Queue order is a project setting (`assignment_mode`): breadth-first gives every pair
its first vote before any pair its second; depth-first completes pairs one after another, so agreement figures
appear early. Each lookup walks a partial index from its start, so a lease costs O(log pairs), not a scan.
A lease is two statements (`lease_in`): one UPDATE takes the slot (held, expired or open, chosen by COALESCE over
three index lookups), one upsert records it in `assignment` with the side shown on the left, fixed at the first
lease, so the side stored with a vote is the side that was shown even when leases race.

Concurrency: on PostgreSQL the slot is taken with `FOR UPDATE SKIP LOCKED` (two annotators asking at once take
different slots; nobody waits on a global lock) and one annotator's own requests are serialised by an advisory
lock on their name. On SQLite each lease is one short BEGIN IMMEDIATE transaction. Either way k slots mean at
most k votes through leases, and a vote, skip or release moves its slot in the same transaction as the event.
The `assignment` table keeps one row per (pair, annotator) with the lease's times, for the app's checks.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Integer, String, bindparam, case, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from align.errors import AlignError
from align.store.clock import utc, utcnow
from align.store.db import Store
from align.store.schema import ASSIGNMENT_MODES, Assignment, LeaseSlot, Meta, Pair, Vote
from align.store.slots import claim_slot, dialect, lock_annotator, open_slot, slot_of
from align.store.votes import ANSWER_KINDS, in_effect, is_superseded, reopen_vote_slot

MODE_KEY = "assignment_mode"  # in the meta table: a project setting, shared by every app process
QUEUE_ORDER = {
    "breadth_first": (LeaseSlot.slot, LeaseSlot.pair_id),
    "depth_first": (LeaseSlot.pair_id, LeaseSlot.slot),
}


@dataclass(frozen=True)
class Lease:
    """A pair leased to an annotator: which response they see on the left ("a" or "b"; None on a lease made before
    schema v6, whose side the app recomputes) and when the lease (re)started."""

    pair_id: int
    left: str | None
    leased_at: datetime


def shown_order(pair_id: int, rank: int) -> str:
    """Which response ("a" or "b") goes left for the pair's `rank`-th annotator (0-based, in lease order).

    A hash of the pair id (blake2b: stable across processes, unlike hash()) picks the first annotator's order,
    so across pairs "a" is left half the time; each later annotator gets the opposite of the one before.
    """
    first = hashlib.blake2b(f"pair:{pair_id}".encode(), digest_size=8).digest()[0] & 1
    return "a" if (first + rank) % 2 == 0 else "b"


def lease_next_pair(
    store: Store, annotator: str, lease_seconds: int = 600, now: datetime | None = None, mode: str | None = None
) -> int | None:
    """The pair this annotator should label next, leased to them for `lease_seconds`; None when nothing is open.

    An annotator who still holds a lease gets that pair again (a page refresh), with the lease renewed. `mode`
    overrides the project's assignment mode (see `set_assignment_mode`).
    """
    now = utc(now) or utcnow()
    with store.write() as session:
        if store.dialect == "postgresql":
            # A lease is soft state: should the server crash right after this commit, the pair is simply offered
            # again. So its commit need not wait for the WAL to reach the disk (votes do wait).
            session.execute(text("SET LOCAL synchronous_commit TO OFF"))
        lock_annotator(session, annotator)
        lease = lease_in(session, annotator, now, now + timedelta(seconds=lease_seconds),
                         mode or cached_assignment_mode(store, session))
    return None if lease is None else lease.pair_id


def lease_in(session: Session, annotator: str, now: datetime, expires: datetime, mode: str) -> Lease | None:
    """Inside the caller's transaction (which has called `lock_annotator`): lease the annotator's next pair until
    `expires`, in two statements. One UPDATE takes the slot: the one the annotator holds already (a refresh), else
    an expired one of a pair they have not answered (oldest first), else the first open one in queue order
    (`mode`); the other records the lease in `assignment` and fixes the side shown."""
    pair_id = session.execute(
        queue_statement(dialect(session), mode), {"who": annotator, "now": now, "until": expires}
    ).scalar()
    if pair_id is None:
        return None
    return record_lease(session, pair_id, annotator, now, expires)


def record_lease(session: Session, pair_id: int, annotator: str, now: datetime, expires: datetime,
                 left: str | None = None) -> Lease:
    """Make (pair, annotator)'s single assignment row an active lease until `expires`. A first lease fixes the side
    shown: `left` if given (side-by-side pairs), else by the annotator's rank among the pair's leases (see
    `shown_order`); a renewal keeps it."""
    first = shown_order(pair_id, 0) == "b"  # 0 or 1: the parity the pair's first annotator starts from
    row = session.execute(
        assignment_statement(dialect(session)),
        {"pair": pair_id, "who": annotator, "now": now, "until": expires, "left": left, "first": int(first)},
    ).one()
    return Lease(pair_id, row.shown_left, row.leased_at)


# ---- the statements of the hot path, built once (building a statement costs more than running it) -----------

_SLOT, _ASSIGNMENT = LeaseSlot.__table__, Assignment.__table__


def answered_by(slot) -> ColumnElement[bool]:
    """The annotator (:who) has a vote, skip or flag in effect on `slot`'s pair."""
    return (
        select(Vote.id)
        .where(Vote.pair_id == slot.c.pair_id, Vote.annotator == bindparam("who"), Vote.kind != "undo", in_effect())
        .exists()
    )


@functools.cache
def queue_statement(dialect_name: str, mode: str):
    """UPDATE lease_slot SET held by :who until :until WHERE id = COALESCE(held, expired, open) RETURNING pair_id.
    The three candidates are uncorrelated subqueries, each one index lookup; COALESCE stops at the first found.
    On PostgreSQL the expired and open ones skip rows other transactions are taking."""
    held, expired, waiting = (_SLOT.alias(name) for name in ("held_slot", "expired_slot", "open_slot"))
    locking = {"skip_locked": True} if dialect_name == "postgresql" else None
    candidates = [
        select(held.c.id).where(held.c.annotator == bindparam("who"), held.c.state == "held")
        .order_by(held.c.expires_at, held.c.id),
        select(expired.c.id).where(expired.c.state == "held", expired.c.expires_at <= bindparam("now"),
                                   ~answered_by(expired)).order_by(expired.c.expires_at, expired.c.id),
        select(waiting.c.id).where(waiting.c.state == "open", ~answered_by(waiting))
        .order_by(*(getattr(waiting.c, column.key) for column in QUEUE_ORDER[mode])),
    ]
    subqueries = []
    for i, query in enumerate(candidates):
        query = query.limit(1)
        if dialect_name == "postgresql":
            query = query.with_for_update(**(locking if i else {}))
        subqueries.append(query.scalar_subquery())
    return (
        update(_SLOT)
        .where(_SLOT.c.id == func.coalesce(*subqueries))
        .values(state="held", annotator=bindparam("who"), expires_at=bindparam("until"))
        .returning(_SLOT.c.pair_id)
    )


@functools.cache
def assignment_statement(dialect_name: str):
    """INSERT the lease ... ON CONFLICT (pair, annotator) DO UPDATE (a renewal) RETURNING shown_left, leased_at. A new
    row's side: :left, else the parity of (:first + the number of earlier leases of the pair)."""
    earlier = _ASSIGNMENT.alias("earlier")
    rank = select(func.count()).select_from(earlier).where(earlier.c.pair_id == bindparam("pair")).scalar_subquery()
    side = case(((rank + bindparam("first", type_=Integer)) % 2 == 0, "a"), else_="b")
    insert = postgresql.insert if dialect_name == "postgresql" else sqlite.insert
    statement = insert(_ASSIGNMENT).values(
        pair_id=bindparam("pair"), annotator=bindparam("who"), leased_at=bindparam("now"),
        lease_expires_at=bindparam("until"), status="active",
        shown_left=func.coalesce(bindparam("left", type_=String), side),
    )
    return statement.on_conflict_do_update(
        index_elements=["pair_id", "annotator"],
        set_={"status": "active", "leased_at": statement.excluded.leased_at,
              "lease_expires_at": statement.excluded.lease_expires_at},
    ).returning(_ASSIGNMENT.c.shown_left, _ASSIGNMENT.c.leased_at)


@functools.cache
def finish_statement():
    """End :who's live lease of :pair with :status (done: answered; released: given back) RETURNING its side and
    start; no row when there is no live lease."""
    return (
        update(_ASSIGNMENT)
        .where(_ASSIGNMENT.c.pair_id == bindparam("pair"), _ASSIGNMENT.c.annotator == bindparam("who"),
               _ASSIGNMENT.c.status == "active", _ASSIGNMENT.c.lease_expires_at > bindparam("now"))
        .values(status=bindparam("new_status"))
        .returning(_ASSIGNMENT.c.shown_left, _ASSIGNMENT.c.leased_at)
    )


def finish_live_lease(session: Session, pair_id: int, annotator: str, status: str, now: datetime) -> Lease | None:
    """In the caller's transaction: end the annotator's live lease of the pair (`status` done or released); the
    lease as it was, or None when they hold no live lease of it (expired, answered in another tab, never leased)."""
    row = session.execute(
        finish_statement(), {"pair": pair_id, "who": annotator, "now": now, "new_status": status}
    ).first()
    return None if row is None else Lease(pair_id, row.shown_left, row.leased_at)


def lease_pair(store: Store, pair_id: int, annotator: str, lease_seconds: int = 600,
               now: datetime | None = None, left: str | None = None) -> None:
    """Lease one given pair to an annotator (side-by-side mode leases the pair it just created, with the side it
    put on the left)."""
    now = utc(now) or utcnow()
    expires = now + timedelta(seconds=lease_seconds)
    with store.write() as session:
        lock_annotator(session, annotator)
        claim_slot(session, pair_id, annotator, "held", now, expires)
        record_lease(session, pair_id, annotator, now, expires, left)


def release_lease(store: Store, annotator: str, pair_id: int) -> bool:
    """Give a leased pair back unanswered (the annotator may be offered it again); True if a lease was active."""
    with store.write() as session:
        open_slot(session, pair_id, annotator, "held")
        done = session.execute(
            update(Assignment)
            .where(Assignment.pair_id == pair_id, Assignment.annotator == annotator, Assignment.status == "active")
            .values(status="released")
        )
        return done.rowcount > 0


def has_live_lease(store: Store, annotator: str, pair_id: int, now: datetime | None = None) -> bool:
    now = utc(now) or utcnow()
    query = select(Assignment.id).where(
        Assignment.pair_id == pair_id,
        Assignment.annotator == annotator,
        Assignment.status == "active",
        Assignment.lease_expires_at > now,
    )
    with store.read() as session:
        return session.scalars(query).first() is not None


def undo_last_vote(store: Store, annotator: str, lease_seconds: int = 600, now: datetime | None = None) -> int | None:
    """Take back the annotator's latest vote or skip still in effect; return the undo event's id, or None if
    there is nothing to undo (or a concurrent undo got there first). The pair is leased back to the annotator,
    so `lease_next_pair` shows it again next."""
    now = utc(now) or utcnow()
    with store.write() as session:
        lock_annotator(session, annotator)
        query = select(Vote).where(Vote.annotator == annotator, Vote.kind.in_(ANSWER_KINDS), in_effect())
        target = session.scalars(query.order_by(Vote.id.desc()).limit(1)).first()
        if target is None:
            return None
        session.get(Pair, target.pair_id, with_for_update={"key_share": True})
        if is_superseded(session, target.id):
            return None
        undo = Vote(
            pair_id=target.pair_id, annotator=annotator, kind="undo", supersedes_id=target.id,
            guidelines_version=target.guidelines_version, source=target.source,
            answered_at=utcnow(), created_at=utcnow(),
        )
        session.add(undo)
        session.flush()
        reopen_vote_slot(session, target)
        expires = now + timedelta(seconds=lease_seconds)
        claim_slot(session, target.pair_id, annotator, "held", now, expires)
        record_lease(session, target.pair_id, annotator, now, expires)
        return undo.id


# ---- the project's assignment mode -------------------------------------------------------------------------


def assignment_mode(session: Session) -> str:
    value = session.scalar(select(Meta.value).where(Meta.key == MODE_KEY))
    return value if value in ASSIGNMENT_MODES else "breadth_first"


MODE_TTL = 5.0  # seconds an app process trusts the assignment mode it read before reading it again


def cached_assignment_mode(store: Store, session: Session) -> str:
    """The project's assignment mode, read at most every MODE_TTL seconds per store (a change made by another
    process applies within that time; one made through this store at once)."""
    cached = getattr(store, "_assignment_mode", None)
    if cached is not None and time.monotonic() - cached[0] < MODE_TTL:
        return cached[1]
    mode = assignment_mode(session)
    store._assignment_mode = (time.monotonic(), mode)
    return mode


def set_assignment_mode(store: Store, mode: str) -> None:
    """Set the queue order for every app process on this store: breadth_first (default) or depth_first."""
    if mode not in ASSIGNMENT_MODES:
        raise AlignError(f"unknown assignment mode {mode!r}; expected one of {', '.join(ASSIGNMENT_MODES)}")
    with store.write() as session:
        row = session.get(Meta, MODE_KEY)
        if row is None:
            session.add(Meta(key=MODE_KEY, value=mode))
        else:
            row.value = mode
    store._assignment_mode = (time.monotonic(), mode)


def slot_states(store: Store, pair_id: int) -> list[tuple[str, str | None]]:
    """(state, annotator) of each of the pair's slots, in slot order: for checks and the review screen."""
    with store.read() as session:
        rows = session.execute(
            select(LeaseSlot.state, LeaseSlot.annotator).where(LeaseSlot.pair_id == pair_id).order_by(LeaseSlot.slot)
        ).all()
    return [tuple(row) for row in rows]


__all__ = [
    "QUEUE_ORDER", "Lease", "assignment_mode", "cached_assignment_mode", "finish_live_lease", "has_live_lease",
    "lease_in", "lease_next_pair", "lease_pair", "record_lease", "release_lease",
    "set_assignment_mode", "shown_order", "slot_of", "slot_states", "undo_last_vote",
]
