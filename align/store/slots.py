"""The labeling queue's slots: each pair has `votes_required` of them, each open, held (leased) or filled (voted).

Writes that change a pair's load (a lease, a vote, a skip, an undo, a release) move one slot between states inside
their own transaction, so the queue never needs a global lock or a count over all votes. Slots are rows, so on
PostgreSQL two writers on one pair lock different rows, and `FOR UPDATE SKIP LOCKED` lets a leaser pass a slot
another one is taking. On SQLite every write transaction is serialised by BEGIN IMMEDIATE and kept short.
This module depends only on the schema, so the vote log (votes.py) and the leases (leases.py) both use it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import Select, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from align.store.schema import LeaseSlot

# Namespace of the per-annotator PostgreSQL advisory locks (the second key is a hash of the name).
ANNOTATOR_LOCK = 0x616C_6703


def dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def lock_annotator(session: Session, annotator: str) -> None:
    """Serialise this transaction with the same annotator's other lease changes (two tabs asking at once), and
    with nobody else's. SQLite needs none: its write transactions already run one at a time."""
    if dialect(session) == "postgresql":
        key = zlib.crc32(annotator.encode()) - 2**31  # a signed 32-bit int, as the two-key form wants
        session.execute(text("SELECT pg_advisory_xact_lock(:space, :key)"), {"space": ANNOTATOR_LOCK, "key": key})


def first_unlocked(session: Session, query: Select) -> LeaseSlot | None:
    """The first row of `query`, locked; on PostgreSQL rows another transaction is taking are passed over."""
    query = query.limit(1)
    if dialect(session) == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return session.scalars(query).first()


def add_slots(session: Session, pairs: Iterable[tuple[int, int]]) -> None:
    """Give each (pair id, votes required) its open slots; pairs that have slots already keep them."""
    rows = [{"pair_id": pair_id, "slot": k, "state": "open"} for pair_id, required in pairs for k in range(required)]
    if not rows:
        return
    insert = postgresql.insert if dialect(session) == "postgresql" else sqlite.insert
    rows.sort(key=lambda row: (row["pair_id"], row["slot"]))  # one order for every writer: no deadlocks
    for start in range(0, len(rows), 2000):
        session.execute(insert(LeaseSlot.__table__).on_conflict_do_nothing(), rows[start : start + 2000])


def slot_of(session: Session, pair_id: int, annotator: str, state: str) -> LeaseSlot | None:
    query = select(LeaseSlot).where(
        LeaseSlot.pair_id == pair_id, LeaseSlot.annotator == annotator, LeaseSlot.state == state
    )
    return session.scalars(query.order_by(LeaseSlot.slot).limit(1).with_for_update()).first()


def claim_slot(
    session: Session, pair_id: int, annotator: str, state: str, now: datetime, expires: datetime | None = None
) -> LeaseSlot | None:
    """Put the annotator in a slot of this pair as `state` ("held" until `expires`, or "filled"): the slot they
    hold already, else an open one, else one whose lease expired. None when the pair is full (a vote then counts
    on top, as the store has always allowed; the app only records votes on leased pairs)."""
    slot = slot_of(session, pair_id, annotator, "held")
    if slot is None:
        free = select(LeaseSlot).where(LeaseSlot.pair_id == pair_id)
        slot = first_unlocked(session, free.where(LeaseSlot.state == "open").order_by(LeaseSlot.slot))
        if slot is None:
            expired = free.where(LeaseSlot.state == "held", LeaseSlot.expires_at <= now)
            slot = first_unlocked(session, expired.order_by(LeaseSlot.expires_at, LeaseSlot.slot))
    if slot is not None:
        slot.state, slot.annotator, slot.expires_at = state, annotator, expires
    return slot


def open_slot(session: Session, pair_id: int, annotator: str, state: str) -> bool:
    """Hand back the annotator's slot of this pair in `state` (a released lease, a skip, an undone vote)."""
    slot = slot_of(session, pair_id, annotator, state)
    if slot is None:
        return False
    slot.state, slot.annotator, slot.expires_at = "open", None, None
    return True
