"""Model versions in the store: register a training run's version.json or a model spec, find and load them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from align.errors import AlignError, DataError
from align.models import base_revision, load_tokenizer, portable_spec, resolve_model, tokenizer_fingerprint
from align.store.clock import utcnow
from align.store.db import Store, insert_ignoring_conflicts
from align.store.schema import ModelVersion
from align.store.undo import note_added

VERSION_FIELDS = (
    "base_model", "base_revision", "adapter_path", "adapter_hash", "tokenizer_hash", "chat_template_hash",
    "method", "data_hash",
)


def register_model_version(store: Store, version_json: dict[str, Any] | str | os.PathLike[str]) -> int:
    """Record a training run's version.json (a dict, the file, or its run directory); return the version's id.

    Idempotent by name: the same name with the same adapter_hash returns the existing id; a different hash under
    an existing name is an error, because a version is immutable.
    """
    info = load_version_json(version_json)
    name, base_model = info.get("name"), info.get("base_model")
    if not name or not base_model:
        raise DataError("version.json needs a 'name' and a 'base_model'")
    row = {field: info.get(field) for field in VERSION_FIELDS}
    row.update(name=name, training_config=info.get("config"), created_at=utcnow())
    with store.write() as session:
        row["parent_id"] = parent_id(session, info.get("parent"), name)
        insert_ignoring_conflicts(session, ModelVersion, [row], key=("name",))
        stored = session.scalars(select(ModelVersion).where(ModelVersion.name == name)).one()
        if stored.adapter_hash != row["adapter_hash"]:
            raise AlignError(
                f"model version {name!r} is already registered with adapter_hash {stored.adapter_hash!r}, "
                f"not {row['adapter_hash']!r}; give the new run its own name"
            )
        note_added("model_version", [stored.id])
        return stored.id


def load_version_json(version_json: dict[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    if isinstance(version_json, dict):
        return version_json
    path = Path(version_json)
    if path.is_dir():
        path = path / "version.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read model version file {path}: {error}") from error
    if not isinstance(info, dict):
        raise DataError(f"{path} must hold a JSON object")
    return info


def parent_id(session: Session, parent: str | int | None, child: str) -> int | None:
    if parent is None:
        return None
    column = ModelVersion.id if isinstance(parent, int) else ModelVersion.name
    found = session.scalars(select(ModelVersion.id).where(column == parent)).one_or_none()
    if found is None:
        raise AlignError(f"parent version {parent!r} of {child!r} is not registered; register it first")
    return found


def get_model_version(store: Store, name_or_id: str | int) -> ModelVersion:
    """The version with this name (str) or id (int); AlignError listing the known names if there is none."""
    column = ModelVersion.id if isinstance(name_or_id, int) else ModelVersion.name
    with store.read() as session:
        found = session.scalars(select(ModelVersion).where(column == name_or_id)).one_or_none()
        if found is not None:
            return found
        names = session.scalars(select(ModelVersion.name).order_by(ModelVersion.id)).all()
    known = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") if names else "none registered"
    raise AlignError(f"unknown model version {name_or_id!r}; known: {known}")


# ---- model specs ---------------------------------------------------------------------------------------------


def ensure_registered(store: Store, spec: str) -> tuple[int, str]:
    """Register the model behind a spec (and, for a training run, its parents first); return (id, name).

    A spec may also be the name of a version already in the store.
    """
    known = find_version(store, spec)
    if known is not None:
        return known.id, known.name
    path = Path(spec).expanduser()
    if (path / "version.json").is_file():
        info = load_version_json(path)
        if info.get("parent_spec"):
            ensure_registered(store, info["parent_spec"])
        return register_model_version(store, info), info["name"]
    resolved = resolve_model(spec)
    name = portable_spec(spec)
    record = {
        "name": name,
        "method": "base",
        "base_model": resolved.base,
        "base_revision": base_revision(resolved),
        **tokenizer_fingerprint(load_tokenizer(resolved)),
    }
    return register_model_version(store, record), name


def find_version(store: Store, name: str) -> ModelVersion | None:
    """The version registered under this name, or None."""
    with store.read() as session:
        return session.scalars(select(ModelVersion).where(ModelVersion.name == name)).one_or_none()


def loadable_spec(version: ModelVersion) -> str:
    """Where to load a registered version from: its saved model (an adapter or merged directory is itself a
    model spec), else, for a base version, its base model."""
    if version.adapter_path and Path(version.adapter_path).exists():
        return version.adapter_path
    if version.method == "base":
        return version.base_model
    raise AlignError(f"model version {version.name!r} was trained at {version.adapter_path}, which no longer exists here")
