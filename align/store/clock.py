"""Time helpers: the store keeps naive UTC datetimes on every backend."""

from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def utc(moment: datetime | None) -> datetime | None:
    """Convert an aware datetime to naive UTC; a naive one is taken to be UTC already."""
    if moment is None or moment.tzinfo is None:
        return moment
    return moment.astimezone(timezone.utc).replace(tzinfo=None)
