"""Logins for the labeling app, with scrypt password hashes from the standard library."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from align.errors import AlignError, DataError
from align.store.clock import utcnow
from align.store.db import Store
from align.store.schema import ROLES, User

# scrypt cost: n=2**14, r=8 takes ~16 MiB and a few tens of ms: cheap for a login, expensive for guessing.
SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES = 2**14, 8, 1, 32


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


def add_user(store: Store, name: str, password: str, role: str = "annotator") -> int:
    if not name:
        raise DataError("a user needs a name")
    if not password:
        raise DataError(f"user {name!r} needs a non-empty password")
    if role not in ROLES:
        raise DataError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    user = User(name=name, password_hash=hash_password(password), role=role, created_at=utcnow())
    try:
        with store.write() as session:
            session.add(user)
            session.flush()
            return user.id
    except IntegrityError as error:
        raise AlignError(f"user {name!r} already exists") from error


def verify_user(store: Store, name: str, password: str) -> str | None:
    """The user's role if the password is right, else None (also for an unknown name)."""
    with store.read() as session:
        user = session.scalars(select(User).where(User.name == name)).one_or_none()
    if user is None:
        check_password(password, decoy_hash())
        return None
    return user.role if check_password(password, user.password_hash) else None
