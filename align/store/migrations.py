"""Explicit, versioned schema migrations.

The schema version lives in `meta.schema_version`. An empty database gets the current models' tables and
SCHEMA_VERSION; an older one runs MIGRATIONS[v] for each missing version v in one transaction; a newer one is
refused, because this code would misread it.

To change the schema: edit the models in schema.py, bump SCHEMA_VERSION to N, and add `N: upgrade_to_vN` below,
where `upgrade_to_vN(connection)` moves a v(N-1) database to vN (ALTER TABLE, backfills), e.g.
`connection.execute(text("ALTER TABLE vote ADD COLUMN ms_on_task INTEGER"))`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from sqlalchemy import Connection, inspect, select, text, update

from align.errors import AlignError
from align.store.db import Store, first_line
from align.store.clock import utcnow
from align.store.schema import Assignment, Base, LeaseSlot, Meta, Pair, Vote
from align.store.votes import in_effect

SCHEMA_VERSION = 6


def upgrade_to_v2(connection: Connection) -> None:
    """The labeling queue's slots (schema.LeaseSlot), filled in from the votes and live leases already stored:
    per pair, its effective human voters fill the first slots, live leases of others hold the next, the rest are
    open."""
    Base.metadata.tables["lease_slot"].create(connection)
    now = utcnow()
    voters: dict[int, list[str]] = defaultdict(list)
    counted = select(Vote.pair_id, Vote.annotator).where(Vote.kind == "vote", Vote.source == "human", in_effect())
    for pair_id, annotator in connection.execute(counted.order_by(Vote.id)):
        voters[pair_id].append(annotator)
    holders: dict[int, list[tuple[str, object]]] = defaultdict(list)
    live = select(Assignment.pair_id, Assignment.annotator, Assignment.lease_expires_at).where(
        Assignment.status == "active", Assignment.lease_expires_at > now
    )
    for pair_id, annotator, expires in connection.execute(live.order_by(Assignment.id)):
        holders[pair_id].append((annotator, expires))
    rows = []
    for pair_id, required in connection.execute(select(Pair.id, Pair.votes_required).order_by(Pair.id)):
        taken = [(name, "filled", None) for name in voters[pair_id]]
        taken += [(name, "held", expires) for name, expires in holders[pair_id] if name not in voters[pair_id]]
        for k in range(required):
            name, state, expires = taken[k] if k < len(taken) else (None, "open", None)
            rows.append({"pair_id": pair_id, "slot": k, "state": state, "annotator": name, "expires_at": expires})
    for start in range(0, len(rows), 2000):
        connection.execute(LeaseSlot.__table__.insert(), rows[start : start + 2000])


def upgrade_to_v3(connection: Connection) -> None:
    """Logins in the database (sessions, failed-login throttling) and per-annotator targets."""
    Base.metadata.tables["login_session"].create(connection, checkfirst=True)
    Base.metadata.tables["login_throttle"].create(connection, checkfirst=True)
    if "target" not in {column["name"] for column in inspect(connection).get_columns("user")}:
        connection.execute(text('ALTER TABLE "user" ADD COLUMN target INTEGER'))


def upgrade_to_v4(connection: Connection) -> None:
    """K-way ranking events (schema.Ranking, align.ranking)."""
    Base.metadata.tables["ranking"].create(connection, checkfirst=True)


def upgrade_to_v5(connection: Connection) -> None:
    """Generation jobs queued from the labeling app (schema.GenerationJob, align.store.jobs)."""
    Base.metadata.tables["generation_job"].create(connection, checkfirst=True)


def upgrade_to_v6(connection: Connection) -> None:
    """The side shown on the left, stored with each lease (Assignment.shown_left; older leases keep NULL and the
    app recomputes their side as before), and an index for the slot an annotator holds."""
    if "shown_left" not in {column["name"] for column in inspect(connection).get_columns("assignment")}:
        connection.execute(text("ALTER TABLE assignment ADD COLUMN shown_left VARCHAR(1)"))
    held_by = next(index for index in LeaseSlot.__table__.indexes if index.name == "ix_lease_slot_held_by")
    held_by.create(connection, checkfirst=True)


# MIGRATIONS[v] upgrades a database from version v-1 to v, inside the caller's transaction.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: upgrade_to_v2, 3: upgrade_to_v3, 4: upgrade_to_v4,
                                                   5: upgrade_to_v5, 6: upgrade_to_v6}


def ensure_schema(store: Store) -> int:
    """Create or upgrade the schema of `store` to SCHEMA_VERSION; return the version found before (0 if empty)."""
    with store.write() as session:
        # Two processes opening a fresh database at once must not both create it.
        store.lock(session, "schema")
        connection = session.connection()
        found = schema_version(connection, store.url)
        if found is None:
            Base.metadata.create_all(connection)
            connection.execute(Meta.__table__.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            return 0
        if found > SCHEMA_VERSION:
            raise AlignError(f"database schema v{found} is newer than this align (v{SCHEMA_VERSION}); upgrade align")
        for version in range(found + 1, SCHEMA_VERSION + 1):
            run_migration(connection, version, store.url)
        if found < SCHEMA_VERSION:
            connection.execute(
                update(Meta).where(Meta.key == "schema_version").values(value=str(SCHEMA_VERSION))
            )
        return found


def schema_version(connection: Connection, url: str) -> int | None:
    """The recorded schema version, or None for a database without any align tables."""
    tables = set(inspect(connection).get_table_names())
    if "meta" not in tables:
        ours = tables & set(Base.metadata.tables)
        if ours:
            names = ", ".join(sorted(ours))
            raise AlignError(f"{url} has align tables ({names}) but no schema version; not an align store?")
        return None
    value = connection.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar_one_or_none()
    if value is None or not value.isdigit():
        raise AlignError(f"{url} has no valid schema_version in its meta table (found {value!r})")
    return int(value)


def run_migration(connection: Connection, version: int, url: str) -> None:
    migration = MIGRATIONS.get(version)
    if migration is None:
        raise AlignError(f"no migration to schema v{version} for {url}; this align cannot upgrade it")
    try:
        migration(connection)
    except Exception as error:  # any failure aborts the whole upgrade: the transaction rolls back
        raise AlignError(f"migrating {url} to schema v{version} failed: {first_line(error)}") from error
