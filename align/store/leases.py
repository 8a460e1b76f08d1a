"""Leases: which annotator is looking at which pair, so that k annotators (not more) label each pair.

Every pair has `votes_required` slots (slots.py) that are open, held by a lease or filled by a vote. An annotator
asking for work gets, in order: the slot they hold already (a page refresh; the lease is renewed), a slot whose
lease expired (its holder walked away: the pair is handed on), or the first open slot in queue order, always of a
pair they have not answered. Queue order is a project setting (`assignment_mode`): breadth-first gives every pair
its first vote before any pair its second; depth-first completes pairs one after another, so agreement figures
appear early. Each lookup walks a partial index from its start, so a lease costs O(log pairs), not a scan.

Concurrency: on PostgreSQL the slot is taken with `FOR UPDATE SKIP LOCKED` (two annotators asking at once take
different slots; nobody waits on a global lock) and one annotator's own requests are serialised by an advisory
lock on their name. On SQLite each lease is one short BEGIN IMMEDIATE transaction. Either way k slots mean at
most k votes through leases, and a vote, skip or release moves its slot in the same transaction as the event.
The `assignment` table keeps one row per (pair, annotator) with the lease's times, for the app's checks.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from align.errors import AlignError
from align.store.clock import utc, utcnow
from align.store.db import Store
from align.store.schema import ASSIGNMENT_MODES, Assignment, LeaseSlot, Meta, Pair, Vote
from align.store.slots import claim_slot, first_unlocked, lock_annotator, open_slot, slot_of
from align.store.votes import ANSWER_KINDS, in_effect, is_superseded, reopen_vote_slot

MODE_KEY = "assignment_mode"  # in the meta table: a project setting, shared by every app process
QUEUE_ORDER = {
    "breadth_first": (LeaseSlot.slot, LeaseSlot.pair_id),
    "depth_first": (LeaseSlot.pair_id, LeaseSlot.slot),
}


def lease_next_pair(
    store: Store, annotator: str, lease_seconds: int = 600, now: datetime | None = None, mode: str | None = None
) -> int | None:
    """The pair this annotator should label next, leased to them for `lease_seconds`; None when nothing is open.

    An annotator who still holds a lease gets that pair again (a page refresh), with the lease renewed. `mode`
    overrides the project's assignment mode (see `set_assignment_mode`).
    """
    now = utc(now) or utcnow()
    expires = now + timedelta(seconds=lease_seconds)
    with store.write() as session:
        if store.dialect == "postgresql":
            # A lease is soft state: should the server crash right after this commit, the pair is simply offered
            # again. So its commit need not wait for the WAL to reach the disk (votes do wait).
            session.execute(text("SET LOCAL synchronous_commit TO OFF"))
        lock_annotator(session, annotator)
        held = session.scalars(
            select(LeaseSlot)
            .where(LeaseSlot.annotator == annotator, LeaseSlot.state == "held")
            .order_by(LeaseSlot.expires_at, LeaseSlot.id)
            .limit(1)
            .with_for_update()
        ).first()
        slot = held or pick_slot(session, annotator, now, mode or assignment_mode(session))
        if slot is None:
            return None
        slot.state, slot.annotator, slot.expires_at = "held", annotator, expires
        renew_lease(session, slot.pair_id, annotator, now, expires)
        return slot.pair_id


def pick_slot(session: Session, annotator: str, now: datetime, mode: str) -> LeaseSlot | None:
    """A slot of a pair the annotator has not answered: an expired lease first (oldest first), else the first
    open slot in queue order."""
    answered = (
        select(Vote.id)
        .where(Vote.pair_id == LeaseSlot.pair_id, Vote.annotator == annotator, Vote.kind != "undo", in_effect())
        .exists()
    )
    expired = select(LeaseSlot).where(LeaseSlot.state == "held", LeaseSlot.expires_at <= now, ~answered)
    slot = first_unlocked(session, expired.order_by(LeaseSlot.expires_at, LeaseSlot.id))
    if slot is None:
        waiting = select(LeaseSlot).where(LeaseSlot.state == "open", ~answered)
        slot = first_unlocked(session, waiting.order_by(*QUEUE_ORDER[mode]))
    return slot


def renew_lease(session: Session, pair_id: int, annotator: str, now: datetime, expires: datetime) -> None:
    """Make (pair, annotator)'s single assignment row an active lease until `expires`."""
    row = session.scalars(
        select(Assignment).where(Assignment.pair_id == pair_id, Assignment.annotator == annotator)
    ).one_or_none()
    if row is None:
        session.add(Assignment(pair_id=pair_id, annotator=annotator, leased_at=now, lease_expires_at=expires))
    else:
        row.status, row.leased_at, row.lease_expires_at = "active", now, expires
    session.flush()


def lease_pair(store: Store, pair_id: int, annotator: str, lease_seconds: int = 600,
               now: datetime | None = None) -> None:
    """Lease one given pair to an annotator (side-by-side mode leases the pair it just created)."""
    now = utc(now) or utcnow()
    expires = now + timedelta(seconds=lease_seconds)
    with store.write() as session:
        lock_annotator(session, annotator)
        claim_slot(session, pair_id, annotator, "held", now, expires)
        renew_lease(session, pair_id, annotator, now, expires)


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
        renew_lease(session, target.pair_id, annotator, now, expires)
        return undo.id


# ---- the project's assignment mode -------------------------------------------------------------------------


def assignment_mode(session: Session) -> str:
    value = session.scalar(select(Meta.value).where(Meta.key == MODE_KEY))
    return value if value in ASSIGNMENT_MODES else "breadth_first"


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


def slot_states(store: Store, pair_id: int) -> list[tuple[str, str | None]]:
    """(state, annotator) of each of the pair's slots, in slot order: for checks and the review screen."""
    with store.read() as session:
        rows = session.execute(
            select(LeaseSlot.state, LeaseSlot.annotator).where(LeaseSlot.pair_id == pair_id).order_by(LeaseSlot.slot)
        ).all()
    return [tuple(row) for row in rows]


__all__ = [
    "QUEUE_ORDER", "assignment_mode", "has_live_lease", "lease_next_pair", "lease_pair", "release_lease",
    "renew_lease", "set_assignment_mode", "slot_of", "slot_states", "undo_last_vote",
]
