"""Leases: which annotator is looking at which pair, so that k annotators (not more) label each pair.

A pair's load is its effective human votes plus the live leases of other annotators. `lease_next_pair` hands out
the pair with the lowest load below `votes_required` that the annotator has not answered, so every pair gets k
independent votes and nobody sees a pair twice. All of it runs under one lock (BEGIN IMMEDIATE on SQLite, an
advisory lock on PostgreSQL), so two annotators asking at once cannot both take a pair's last slot.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from align.store.clock import utc, utcnow
from align.store.db import Store
from align.store.schema import Assignment, Pair
from align.store.votes import answered_by, human_vote_count


def lease_next_pair(store: Store, annotator: str, lease_seconds: int = 600, now: datetime | None = None) -> int | None:
    """The pair this annotator should label next, leased to them for `lease_seconds`; None when nothing is open.

    An annotator who still holds a live lease gets that pair again (a page refresh), with the lease renewed.
    """
    now = utc(now) or utcnow()
    expires = now + timedelta(seconds=lease_seconds)
    with store.write() as session:
        store.lock(session, "lease")
        current = live_lease(session, annotator, now)
        if current is not None:
            current.lease_expires_at = expires
            return current.pair_id
        pair_id = pick_open_pair(session, annotator, now)
        if pair_id is not None:
            renew_lease(session, pair_id, annotator, now, expires)
        return pair_id


def live_lease(session: Session, annotator: str, now: datetime) -> Assignment | None:
    query = (
        select(Assignment)
        .where(Assignment.annotator == annotator, Assignment.status == "active", Assignment.lease_expires_at > now)
        .order_by(Assignment.leased_at, Assignment.id)
    )
    return session.scalars(query.limit(1)).first()


def pick_open_pair(session: Session, annotator: str, now: datetime) -> int | None:
    others_leases = (
        select(func.count(Assignment.id))
        .where(
            Assignment.pair_id == Pair.id,
            Assignment.annotator != annotator,
            Assignment.status == "active",
            Assignment.lease_expires_at > now,
        )
        .scalar_subquery()
    )
    load = human_vote_count() + others_leases
    query = select(Pair.id).where(load < Pair.votes_required, ~answered_by(annotator)).order_by(load, Pair.id)
    return session.scalars(query.limit(1)).first()


def renew_lease(session: Session, pair_id: int, annotator: str, now: datetime, expires: datetime) -> None:
    """Make (pair, annotator)'s single assignment row an active lease until `expires`. Callers hold the lease lock."""
    row = session.scalars(
        select(Assignment).where(Assignment.pair_id == pair_id, Assignment.annotator == annotator)
    ).one_or_none()
    if row is None:
        session.add(Assignment(pair_id=pair_id, annotator=annotator, leased_at=now, lease_expires_at=expires))
    else:
        row.status, row.leased_at, row.lease_expires_at = "active", now, expires
    session.flush()


def release_lease(store: Store, annotator: str, pair_id: int) -> bool:
    """Give a leased pair back unanswered (the annotator may be offered it again); True if a lease was active."""
    with store.write() as session:
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
