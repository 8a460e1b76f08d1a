"""ORM models of the preference store (DESIGN §3).

All timestamps are naive UTC: SQLite has no time zones, so storing naive UTC on both backends keeps comparisons
identical everywhere (`db.utc` converts inputs).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from align.store.clock import utcnow

VOTE_CHOICES = ("a", "b", "tie", "both_bad")
VOTE_KINDS = ("vote", "undo", "skip", "flag")
ROLES = ("annotator", "reviewer", "admin")
LEASE_STATUSES = ("active", "released", "done")
SLOT_STATES = ("open", "held", "filled")
ASSIGNMENT_MODES = ("breadth_first", "depth_first")
JOB_STATUSES = ("queued", "running", "done", "failed")

# The columns that identify one sample: re-running generation with the same seed and settings must hit this key.
# None is normalised away (top_k 0 = off, top_p 1.0 = off) because SQL treats NULLs as distinct in unique keys.
RESPONSE_KEY = (
    "prompt_id", "model_version_id", "seed", "sample_index", "temperature", "top_p", "top_k", "max_new_tokens",
)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Meta(Base):
    """Key/value facts about the database itself, e.g. `schema_version`."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ModelVersion(Base):
    """An immutable record of one trained (or base) model: what it is made of and where it came from."""

    __tablename__ = "model_version"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    base_model: Mapped[str] = mapped_column(String(500))
    base_revision: Mapped[str | None] = mapped_column(String(200))
    adapter_path: Mapped[str | None] = mapped_column(Text)
    adapter_hash: Mapped[str | None] = mapped_column(String(128))
    tokenizer_hash: Mapped[str | None] = mapped_column(String(128))
    chat_template_hash: Mapped[str | None] = mapped_column(String(128))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_version.id"))
    method: Mapped[str | None] = mapped_column(String(64))
    training_config: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    data_hash: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Prompt(Base):
    """A prompt, deduplicated by a hash of its canonical messages."""

    __tablename__ = "prompt"

    id: Mapped[int] = mapped_column(primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    text: Mapped[str] = mapped_column(Text)
    messages: Mapped[list[Any] | None] = mapped_column(JSON)
    source: Mapped[str | None] = mapped_column(String(200))
    source_id: Mapped[str | None] = mapped_column(String(200))
    family: Mapped[str | None] = mapped_column(String(200))
    tags: Mapped[list[Any] | None] = mapped_column(JSON)
    gold: Mapped[Any | None] = mapped_column(JSON)
    split: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Response(Base):
    """One sampled completion with its decoding settings and log-probs under both distributions."""

    __tablename__ = "response"
    __table_args__ = (UniqueConstraint(*RESPONSE_KEY, name="uq_response_sample"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompt.id"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id"), index=True)
    sample_index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    temperature: Mapped[float] = mapped_column(Float)
    top_p: Mapped[float] = mapped_column(Float)
    top_k: Mapped[int] = mapped_column(Integer)
    max_new_tokens: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    completion_token_ids: Mapped[list[Any] | None] = mapped_column(JSON)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    # Per-token log-probs under the distribution actually sampled from (temperature/top-p/top-k applied) ...
    sample_token_logps: Mapped[list[Any] | None] = mapped_column(JSON)
    # ... and under the raw model at temperature 1, which is what importance weighting compares against.
    token_logps: Mapped[list[Any] | None] = mapped_column(JSON)
    sample_logp: Mapped[float | None] = mapped_column(Float)
    logp: Mapped[float | None] = mapped_column(Float)
    length: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Pair(Base):
    """Two responses to one prompt, to be compared; `rule`/`rule_params` say how they were chosen."""

    __tablename__ = "pair"
    __table_args__ = (UniqueConstraint("response_a_id", "response_b_id", name="uq_pair_responses"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompt.id"), index=True)
    response_a_id: Mapped[int] = mapped_column(ForeignKey("response.id"))
    response_b_id: Mapped[int] = mapped_column(ForeignKey("response.id"), index=True)
    rule: Mapped[str] = mapped_column(String(64))
    rule_params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    votes_required: Mapped[int] = mapped_column(Integer, default=3)
    is_gold: Mapped[bool] = mapped_column(default=False)
    gold_choice: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Vote(Base):
    """An append-only labeling event. Rows are never updated or deleted.

    kind "vote" carries a choice; "skip" and "flag" carry none; "undo" supersedes an earlier event. A "vote" with
    `supersedes_id` is an edit. An event counts while no later event supersedes it (`supersedes_id` is unique, so
    an event is superseded at most once). `choice` is in response order (a = response_a), never screen order; `left`
    records which response was on the left of the screen.
    """

    __tablename__ = "vote"
    __table_args__ = (Index("ix_vote_pair_annotator", "pair_id", "annotator"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pair.id"))
    annotator: Mapped[str] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="vote")
    choice: Mapped[str | None] = mapped_column(String(16))
    strength: Mapped[int | None] = mapped_column(Integer)
    rationale: Mapped[str | None] = mapped_column(Text)
    reasons: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    left: Mapped[str | None] = mapped_column(String(1))
    guidelines_version: Mapped[str | None] = mapped_column(String(64))
    shown_at: Mapped[datetime | None] = mapped_column(DateTime)
    answered_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    supersedes_id: Mapped[int | None] = mapped_column(ForeignKey("vote.id"), unique=True)
    flag_reason: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(200), default="human")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Assignment(Base):
    """A lease of a pair to an annotator. One row per (pair, annotator); its status changes, unlike votes."""

    __tablename__ = "assignment"
    __table_args__ = (UniqueConstraint("pair_id", "annotator", name="uq_assignment_pair_annotator"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pair.id"), index=True)
    annotator: Mapped[str] = mapped_column(String(200), index=True)
    leased_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    lease_expires_at: Mapped[datetime] = mapped_column(DateTime)
    status: Mapped[str] = mapped_column(String(16), default="active")
    # The response shown on the left to this annotator ("a" or "b"), fixed when the pair is first leased to them,
    # so the side recorded with a vote is the side that was shown (NULL on leases made before schema v6).
    shown_left: Mapped[str | None] = mapped_column(String(1))


class LeaseSlot(Base):
    """One of a pair's `votes_required` places in the labeling queue: open, held by an annotator's lease (until
    `expires_at`), or filled by their vote. `lease_next_pair` takes the first open slot in queue order from a
    partial index (PostgreSQL: `FOR UPDATE SKIP LOCKED`), so handing out a pair never scans or locks all pairs."""

    __tablename__ = "lease_slot"
    __table_args__ = (
        UniqueConstraint("pair_id", "slot", name="uq_lease_slot_pair_slot"),
        # Breadth-first: every pair's first slot before any pair's second. Depth-first: the unique key's order.
        Index("ix_lease_slot_open", "slot", "pair_id",
              sqlite_where=text("state = 'open'"), postgresql_where=text("state = 'open'")),
        Index("ix_lease_slot_open_depth", "pair_id", "slot",
              sqlite_where=text("state = 'open'"), postgresql_where=text("state = 'open'")),
        Index("ix_lease_slot_held_expiry", "expires_at",
              sqlite_where=text("state = 'held'"), postgresql_where=text("state = 'held'")),
        Index("ix_lease_slot_annotator", "annotator", "state"),
        # The slot an annotator holds (a refresh), in the order the lease query takes it: one index probe.
        Index("ix_lease_slot_held_by", "annotator", "expires_at", "id",
              sqlite_where=text("state = 'held'"), postgresql_where=text("state = 'held'")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pair.id"))
    slot: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(8), default="open")
    annotator: Mapped[str | None] = mapped_column(String(200))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime)


class User(Base):
    """A login for the labeling app. `password_hash` is a self-describing scrypt string (see users.py)."""

    __tablename__ = "user"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    password_hash: Mapped[str] = mapped_column(String(300))
    role: Mapped[str] = mapped_column(String(16), default="annotator")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # How many votes this annotator is asked for (None: no target); the app stops handing out pairs there.
    target: Mapped[int | None] = mapped_column(Integer)


class LoginSession(Base):
    """A login of the labeling app, in the database so that any app process serves it. Only a hash of the
    token is stored: a copy of the table logs nobody in."""

    __tablename__ = "login_session"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(200), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class LoginThrottle(Base):
    """Failed logins per key ("account:NAME" or "address:IP"), shared by every app process: after a number of
    failures the key is refused until `locked_until`, each further failure doubling the wait."""

    __tablename__ = "login_throttle"

    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_failure_at: Mapped[datetime] = mapped_column(DateTime)
    locked_until: Mapped[datetime | None] = mapped_column(DateTime)


class Ranking(Base):
    """One K-way ranking event (align.ranking): an annotator ordered K responses to one prompt, ties allowed.
    `response_ids` are in the order shown on screen, `ranks` one per response in that order (1 = best, equal ranks
    = tie). Append-only like votes; export expands it into pairwise rows weighted 2/K."""

    __tablename__ = "ranking"

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompt.id"), index=True)
    response_ids: Mapped[list[Any]] = mapped_column(JSON)
    ranks: Mapped[list[Any]] = mapped_column(JSON)
    annotator: Mapped[str] = mapped_column(String(200), index=True)
    source: Mapped[str] = mapped_column(String(200), default="human")
    guidelines_version: Mapped[str | None] = mapped_column(String(64))
    shown_at: Mapped[datetime | None] = mapped_column(DateTime)
    answered_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class GenerationJob(Base):
    """A request for new candidate pairs made from the labeling app (align.store.jobs): which model versions sample
    with which settings on which prompts. One app process claims it (`claim_job`: SKIP LOCKED on PostgreSQL, a short
    write transaction on SQLite) and runs `align generate`'s code on it in a background thread; `status`, the
    progress counts and `error` are what the reviewer's screen shows."""

    __tablename__ = "generation_job"
    __table_args__ = (
        Index("ix_generation_job_queued", "id",
              sqlite_where=text("status = 'queued'"), postgresql_where=text("status = 'queued'")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    requested_by: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    models: Mapped[list[Any]] = mapped_column(JSON)  # model specs or stored version names
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)  # SamplingSettings.as_dict()
    prompts: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"source": "store" | "tasks:train" | a path, "limit": N}
    samples_per_prompt: Mapped[int] = mapped_column(Integer)
    pair_rule: Mapped[str] = mapped_column(String(32), default="random_iid")
    votes_required: Mapped[int] = mapped_column(Integer, default=3)
    done: Mapped[int] = mapped_column(Integer, default=0)  # responses sampled so far (all models)
    total: Mapped[int | None] = mapped_column(Integer)  # responses to sample, once known
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # per model: generate_to_store's summary
    error: Mapped[str | None] = mapped_column(Text)  # one line for the reviewer, never a traceback
    worker: Mapped[str | None] = mapped_column(String(200))  # host:pid/thread that claimed it
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # times claimed: 1, more after a worker went silent
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
