"""Logins for the labeling app: scrypt password hashes (standard library), sessions stored in the database (any
app process serves any login), and throttling of failed logins per account and per address, with backoff."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from align.errors import AlignError, DataError
from align.store.clock import utc, utcnow
from align.store.db import Store
from align.store.schema import ROLES, LoginSession, LoginThrottle, User

# scrypt cost: n=2**14, r=8 takes ~16 MiB and a few tens of ms: cheap for a login, expensive for guessing.
SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES = 2**14, 8, 1, 32
MIN_PASSWORD_LENGTH = 10


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """"scrypt$n$r$p$salt$key" (base64): the parameters travel with the hash, so they can be raised later."""
    salt = os.urandom(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=KEY_BYTES)
    return "$".join(["scrypt", str(n), str(r), str(p), b64(salt), b64(key)])


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        expected = base64.b64decode(key)
        actual = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except ValueError:  # a malformed stored hash never matches
        return False
    return scheme == "scrypt" and hmac.compare_digest(actual, expected)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@functools.cache
def decoy_hash() -> str:
    """Checked against when the user does not exist, so a wrong name costs as long as a wrong password."""
    return hash_password("decoy")


def add_user(store: Store, name: str, password: str, role: str = "annotator", *,
             min_length: int = MIN_PASSWORD_LENGTH, target: int | None = None) -> int:
    """Add a login; the password needs `min_length` characters (10 by default). `target`: votes asked of them."""
    if not name:
        raise DataError("a user needs a name")
    if len(password or "") < min_length:
        raise DataError(f"the password of {name!r} is too short: it needs at least {min_length} characters")
    if role not in ROLES:
        raise DataError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if target is not None and target < 1:
        raise DataError(f"the target of {name!r} must be a positive number of votes, got {target}")
    user = User(name=name, password_hash=hash_password(password), role=role, created_at=utcnow(), target=target)
    try:
        with store.write() as session:
            session.add(user)
            session.flush()
            return user.id
    except IntegrityError as error:
        raise AlignError(f"user {name!r} already exists") from error


def set_target(store: Store, name: str, target: int | None) -> None:
    """Set (or with None, clear) how many votes this annotator is asked for."""
    if target is not None and target < 1:
        raise DataError(f"the target of {name!r} must be a positive number of votes, got {target}")
    with store.write() as session:
        user = session.scalars(select(User).where(User.name == name)).one_or_none()
        if user is None:
            raise DataError(f"no user {name!r}")
        user.target = target


def verify_user(store: Store, name: str, password: str) -> str | None:
    """The user's role if the password is right, else None (also for an unknown name). Slow on purpose (scrypt):
    servers call it off their event loop."""
    with store.read() as session:
        user = session.scalars(select(User).where(User.name == name)).one_or_none()
    if user is None:
        check_password(password, decoy_hash())
        return None
    return user.role if check_password(password, user.password_hash) else None


# ---- sessions ------------------------------------------------------------------------------------------------


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def start_session(store: Store, name: str, hours: float = 12.0, now: datetime | None = None) -> str:
    """A new login token for `name`, valid for `hours`; expired sessions are cleared on the way."""
    now = utc(now) or utcnow()
    token = secrets.token_urlsafe(32)
    with store.write() as session:
        session.execute(delete(LoginSession).where(LoginSession.expires_at <= now))
        session.add(LoginSession(token_hash=token_hash(token), user_name=name, created_at=now,
                                 expires_at=now + timedelta(hours=hours)))
    return token


def session_account(store: Store, token: str | None, now: datetime | None = None) -> tuple[str, str, int | None] | None:
    """(user name, role, target) of a live session token, else None: one query for the app's every request."""
    if not token:
        return None
    now = utc(now) or utcnow()
    with store.read() as session:
        row = session.execute(
            select(LoginSession.user_name, User.role, User.target)
            .join(User, User.name == LoginSession.user_name)
            .where(LoginSession.token_hash == token_hash(token), LoginSession.expires_at > now)
        ).first()
    return (row[0], row[1], row[2]) if row else None


def end_sessions(store: Store, name: str) -> int:
    """Log the user out everywhere: every session of theirs ends; returns how many."""
    with store.write() as session:
        return session.execute(delete(LoginSession).where(LoginSession.user_name == name)).rowcount


# ---- throttling of failed logins -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ThrottlePolicy:
    """After `account_failures` failed logins on one account (or `address_failures` from one address) within
    `window` seconds, that key is refused for `base_seconds`, doubling with each further failure up to
    `max_seconds`. A right password clears its account's count."""

    account_failures: int = 5
    address_failures: int = 20
    base_seconds: float = 2.0
    max_seconds: float = 900.0
    window: float = 900.0

    def limit(self, key: str) -> int:
        return self.account_failures if key.startswith("account:") else self.address_failures


def throttle_keys(name: str, address: str | None) -> list[str]:
    keys = [f"account:{name[:200]}"]
    if address:
        keys.append(f"address:{address[:64]}")
    return keys


def login_wait(store: Store, keys: list[str], now: datetime | None = None) -> float:
    """Seconds until these keys may try again (0: now)."""
    now = utc(now) or utcnow()
    with store.read() as session:
        locked = session.scalars(select(LoginThrottle.locked_until).where(LoginThrottle.key.in_(keys))).all()
    return max([(until - now).total_seconds() for until in locked if until is not None and until > now], default=0.0)


def record_failure(store: Store, keys: list[str], policy: ThrottlePolicy, now: datetime | None = None) -> None:
    now = utc(now) or utcnow()
    insert = postgresql.insert if store.dialect == "postgresql" else sqlite.insert
    with store.write() as session:
        rows = [{"key": key, "failures": 0, "last_failure_at": now, "locked_until": None} for key in sorted(keys)]
        session.execute(insert(LoginThrottle.__table__).on_conflict_do_nothing(), rows)
        for row in session.scalars(select(LoginThrottle).where(LoginThrottle.key.in_(keys)).with_for_update()):
            fresh = (now - row.last_failure_at).total_seconds() > policy.window
            row.failures = 1 if fresh else row.failures + 1
            row.last_failure_at = now
            over = row.failures - policy.limit(row.key)
            if over >= 0:
                wait = min(policy.max_seconds, policy.base_seconds * 2 ** min(over, 30))
                row.locked_until = now + timedelta(seconds=wait)


def clear_failures(store: Store, key: str) -> None:
    with store.write() as session:
        session.execute(delete(LoginThrottle).where(LoginThrottle.key == key))
