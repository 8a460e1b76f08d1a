"""Explicit, versioned schema migrations.

The schema version lives in `meta.schema_version`. An empty database gets the current models' tables and
SCHEMA_VERSION; an older one runs MIGRATIONS[v] for each missing version v in one transaction; a newer one is
refused, because this code would misread it.

To change the schema: edit the models in schema.py, bump SCHEMA_VERSION to N, and add `N: upgrade_to_vN` below,
where `upgrade_to_vN(connection)` moves a v(N-1) database to vN (ALTER TABLE, backfills), e.g.
`connection.execute(text("ALTER TABLE vote ADD COLUMN ms_on_task INTEGER"))`.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, inspect, select, update

from align.errors import AlignError
from align.store.db import Store, first_line
from align.store.schema import Base, Meta

SCHEMA_VERSION = 1

# MIGRATIONS[v] upgrades a database from version v-1 to v, inside the caller's transaction.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}


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
