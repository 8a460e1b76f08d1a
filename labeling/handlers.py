"""What the labeling app does, without Gradio: login and roles, the queue, votes, skips, flags, undo, progress.

Every public method takes the logged-in user's name (the app reads it from `gr.Request.username`) and checks
the user's role in the store itself, so hidden buttons are never the only guard. Rules:
- the queue is the store's lease table: `lease_next_pair` hands each pair to k annotators, a refresh gets the
  same pair back, and a vote, skip or flag for a pair not leased to the user is rejected;
- the left/right order is fixed in the database when a pair is first leased to an annotator, never sent by the
  client: a hash of the pair sets the order of its first annotator and each later annotator gets the opposite
  order of the one before (counterbalancing); the order shown is stored with every event (`left`);
- a vote, skip or flag and the next lease are one transaction of a few statements (`Labeling.answer`), and a
  pair's texts are cached per process (they never change), so a vote costs little server CPU;
- screen choices (left/right) are mapped back to response order (a/b) before anything is stored.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from pathlib import Path
from time import monotonic
from typing import Any

from sqlalchemy import bindparam, case, func, select, text

from align.errors import AlignError, DataError
from align.store import (
    Assignment,
    Pair,
    Store,
    User,
    Vote,
    export_preferences,
    get_pair,
    lease_next_pair,
    release_lease,
    set_gold,
    undo_last_vote,
    verify_user,
    write_jsonl,
)
from align.store.clock import utcnow
from align.store.leases import Lease, cached_assignment_mode, finish_live_lease, lease_in, shown_order
from align.store.schema import Prompt, Response
from align.store.slots import lock_annotator
from align.store.votes import append_leased_event, check_event, human_vote_count, in_effect
from labeling.render import bidi, prompt_markdown, safe_markdown

SCREEN_CHOICES = ("left", "right", "tie", "both_bad")
STRENGTHS = {"slightly": 1, "much": 2}
FLAG_REASONS = ("unsafe", "private data", "broken")
REASON_TAGS = (
    "correct", "helpful", "clear", "well formatted",
    "incorrect", "unhelpful", "unsafe", "ignores instructions", "too long",
)
ANNOTATE_ROLES = ("annotator", "reviewer", "admin")
REVIEW_ROLES = ("reviewer", "admin")
RATIONALE_RULES = ("strong", "both_bad")


class LabelingError(AlignError):
    """A refused action, with a message for the annotator."""


class PermissionDenied(LabelingError):
    """The user is not logged in, unknown, or lacks the role."""


class Rejected(LabelingError):
    """The action is invalid now: pair not leased, rationale missing, nothing to undo, ..."""


@dataclass(frozen=True)
class LabelingConfig:
    guidelines_version: str = "v1"
    lease_seconds: int = 600
    # When a rationale is required: "strong" (a "much better" vote), "both_bad"; empty: never.
    rationale_required: frozenset[str] = frozenset(RATIONALE_RULES)
    # Seconds the project-wide progress count may be stale (it scans every pair; every screen shows it).
    progress_ttl: float = 5.0
    # Seconds a user's role is trusted before it is read again (every call checks it).
    role_ttl: float = 5.0
    # Longest rationale or flag note accepted, in bytes of UTF-8 (the dashboard sends them to every reviewer).
    max_text_bytes: int = 4096

    def __post_init__(self) -> None:
        unknown = set(self.rationale_required) - set(RATIONALE_RULES)
        if unknown:
            raise AlignError(f"unknown rationale rule(s) {sorted(unknown)}; expected some of {RATIONALE_RULES}")
        if self.lease_seconds < 10:
            raise AlignError(f"lease_seconds must be at least 10, got {self.lease_seconds}")


@dataclass
class Progress:
    mine_today: int = 0
    mine_total: int = 0
    pairs_done: int = 0
    pairs_total: int = 0
    target: int | None = None  # votes asked of this annotator

    @property
    def target_reached(self) -> bool:
        return self.target is not None and self.mine_total >= self.target

    def markdown(self) -> str:
        share = f" ({100 * self.pairs_done / self.pairs_total:.0f}%)" if self.pairs_total else ""
        goal = f" of your target {self.target}" if self.target is not None else ""
        return (
            f"**You:** {self.mine_today} today · {self.mine_total} in all{goal}  \n"
            f"**Project:** {self.pairs_done} of {self.pairs_total} pairs have all their votes{share}"
        )


class PairText:
    """A pair's prompt and responses, which never change once stored: cached per process (`Labeling.pair_text`);
    the display markdown is rendered on first use, once per process."""

    def __init__(self, pair_id: int, messages: list[dict[str, Any]], responses: dict[str, tuple[int, str]]):
        self.pair_id, self.responses = pair_id, responses
        self.messages = [{"role": str(m.get("role", "")), "content": str(m.get("content", ""))} for m in messages]
        self._markdown: dict[str, str] = {}

    @functools.cached_property
    def prompt_markdown(self) -> str:
        return prompt_markdown(self.messages)

    def markdown(self, side: str) -> str:
        """Response `side` ("a" or "b") as safe display markdown."""
        if side not in self._markdown:
            self._markdown[side] = bidi(safe_markdown(self.responses[side][1]))
        return self._markdown[side]


@dataclass
class Item:
    """One screen: a pair (or none left), with the sides in screen order; `left_is` ("a" or "b") is the response
    on the left. The display markdown (prompt, left, right) is rendered only when read (the JSON API never does)."""

    pair_id: int | None
    left_is: str | None = None
    progress: Progress = field(default_factory=Progress)
    message: str = ""
    text: PairText | None = None

    @property
    def right_is(self) -> str | None:
        return None if self.left_is is None else "b" if self.left_is == "a" else "a"

    @property
    def prompt(self) -> str:
        return self.text.prompt_markdown if self.text else ""

    @property
    def left(self) -> str:
        return self.text.markdown(self.left_is) if self.text else ""

    @property
    def right(self) -> str:
        return self.text.markdown(self.right_is) if self.text else ""

    @property
    def messages(self) -> list[dict[str, str]]:
        """The prompt's messages, raw."""
        return self.text.messages if self.text else []

    @property
    def responses(self) -> list[dict[str, Any]]:
        """The responses in screen order, raw: position, response ("a"/"b"), id, text."""
        if not self.text:
            return []
        return [{"position": position, "response": side, "id": self.text.responses[side][0],
                 "text": self.text.responses[side][1]}
                for position, side in (("left", self.left_is), ("right", self.right_is))]

    def as_json(self) -> dict[str, Any]:
        """Named fields for programs (see the README's JSON API section): raw texts, not display markdown."""
        responses = self.responses
        return {
            "pair_id": self.pair_id,
            "prompt": self.messages,
            "responses": responses,
            "shown_order": [r["response"] for r in responses],
            "progress": {"mine_today": self.progress.mine_today, "mine_total": self.progress.mine_total,
                         "target": self.progress.target, "pairs_done": self.progress.pairs_done,
                         "pairs_total": self.progress.pairs_total},
            "message": self.message,
        }


GUIDELINES_DIR = Path(__file__).parent / "guidelines"


def load_guidelines(version: str | None = None, directory: Path = GUIDELINES_DIR) -> tuple[str, str]:
    """(version, markdown) of labeling/guidelines/<version>.md; without a version, the newest (v1, v2, ...)."""
    found = {path.stem: path for path in directory.glob("v*.md") if path.stem[1:].isdigit()}
    if not found:
        raise AlignError(f"no guidelines in {directory} (expected files like v1.md)")
    if version is None:
        version = max(found, key=lambda stem: int(stem[1:]))
    if version not in found:
        raise AlignError(f"no guidelines version {version!r}; have {', '.join(sorted(found))}")
    return version, found[version].read_text(encoding="utf-8")


def to_response_choice(screen_choice: str, left: str) -> str:
    """Map a screen choice (left/right/tie/both_bad) to response order (a/b/tie/both_bad)."""
    if screen_choice not in SCREEN_CHOICES:
        raise Rejected(f"unknown choice {screen_choice!r}; expected one of {', '.join(SCREEN_CHOICES)}")
    right = "b" if left == "a" else "a"
    return {"left": left, "right": right}.get(screen_choice, screen_choice)


PAIR_TEXT_CACHE = 4096  # pairs whose texts each process keeps (a few MB)
SOFT_COMMIT = text("SET LOCAL synchronous_commit TO OFF")


@functools.cache
def mine_statement():
    """(effective human votes of :who, those answered since :midnight)."""
    today = func.coalesce(func.sum(case((Vote.answered_at >= bindparam("midnight"), 1), else_=0)), 0)
    return select(func.count(Vote.id), today).where(
        Vote.annotator == bindparam("who"), Vote.kind == "vote", Vote.source == "human", in_effect()
    )


@functools.cache
def pair_text_statement():
    """A pair's prompt and both responses, one query."""
    a, b = Response.__table__.alias("response_a"), Response.__table__.alias("response_b")
    return (
        select(Prompt.text.label("prompt"), Prompt.messages, a.c.id.label("a_id"), a.c.text.label("a_text"),
               b.c.id.label("b_id"), b.c.text.label("b_text"))
        .select_from(Pair)
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .join(a, a.c.id == Pair.response_a_id)
        .join(b, b.c.id == Pair.response_b_id)
        .where(Pair.id == bindparam("pair"))
    )


class Labeling:
    """The app's logic over one store. Thread-safe: it keeps no per-user state in memory beyond a few seconds'
    cache of roles and of the project-wide progress count."""

    def __init__(self, store: Store, config: LabelingConfig | None = None):
        self.store = store
        self.config = config or LabelingConfig()
        self._progress_lock = threading.Lock()
        self._project_cache: tuple[float, tuple[int, int]] | None = None
        # user -> (when read, (role, target)); a dict write is atomic
        self._roles: dict[str, tuple[float, tuple[str, int | None]]] = {}
        # SQLite has one writer at a time, and a writer that finds the database locked sleeps in growing steps
        # (1, 2, 5, 10, 25 ms...). Queueing this process's writers on a mutex wakes each one as soon as the
        # previous commits, which keeps vote latency flat under load. PostgreSQL locks rows and needs none.
        self.writing = threading.Lock() if store.dialect == "sqlite" else contextlib.nullcontext()
        self._texts: OrderedDict[int, PairText] = OrderedDict()  # pair id -> texts, least recently used first
        self._texts_lock = threading.Lock()

    # ---- identity -------------------------------------------------------------------------------------------

    def authenticate(self, name: str, password: str) -> bool:
        """Gradio's auth= callable: the user exists and the password is right."""
        return bool(name) and verify_user(self.store, name, password) is not None

    def role(self, user: str | None) -> str:
        if not user:
            raise PermissionDenied("log in first")
        return self.account(user)[0]

    def account(self, user: str) -> tuple[str, int | None]:
        """(role, target) of the user, cached for `config.role_ttl` seconds."""
        now = monotonic()
        cached = self._roles.get(user)
        if cached is not None and now - cached[0] < self.config.role_ttl:
            return cached[1]
        with self.store.read() as session:
            row = session.execute(select(User.role, User.target).where(User.name == user)).first()
        if row is None:
            raise PermissionDenied(f"unknown user {user!r}")
        self._roles[user] = (now, (row[0], row[1]))
        return row[0], row[1]

    def remember_account(self, user: str, role: str, target: int | None) -> None:
        """The role and target of a user just read with their login (server.Logins), for `account`."""
        self._roles[user] = (monotonic(), (role, target))

    def require(self, user: str | None, roles: tuple[str, ...]) -> str:
        role = self.role(user)
        if role not in roles:
            raise PermissionDenied(f"{user!r} has the role {role}; this needs {' or '.join(roles)}")
        return role

    # ---- the queue ------------------------------------------------------------------------------------------

    def next_item(self, user: str | None, message: str = "") -> Item:
        """The pair leased to the user (the same one on a refresh or in a second tab), or a new lease: one
        transaction (the user's progress, the lease)."""
        self.require(user, ANNOTATE_ROLES)
        with self.writing, self.store.write() as session:
            if self.store.dialect == "postgresql":
                # A lease alone is soft state (after a crash the pair is simply offered again): no need to wait
                # for the WAL to reach the disk. Votes do wait.
                session.execute(SOFT_COMMIT)
            lock_annotator(session, user)
            progress, lease = self.lease_for(session, user)
        return self.item(user, lease, progress, message)

    def lease_for(self, session, user: str) -> tuple[Progress, Lease | None]:
        """In the caller's transaction (after `lock_annotator`): the user's progress and, unless they reached their
        target, their lease (held, handed on or new)."""
        progress = self.progress(user, session)
        if progress.target_reached:
            return progress, None
        now = utcnow()
        mode = cached_assignment_mode(self.store, session)
        return progress, lease_in(session, user, now, now + timedelta(seconds=self.config.lease_seconds), mode)

    def item(self, user: str, lease: Lease | None, progress: Progress, message: str = "") -> Item:
        if lease is None:
            if progress.target_reached:
                done = f"You reached your target of {progress.target} votes. Thank you!"
            else:
                done = "Nothing left to label for you right now. Thank you!"
            return Item(None, progress=progress, message=" ".join(m for m in (message, done) if m))
        left = lease.left or self.shown(user, lease.pair_id)[0]
        return Item(lease.pair_id, left_is=left, progress=progress, message=message,
                    text=self.pair_text(lease.pair_id))

    def pair_text(self, pair_id: int) -> PairText:
        """The pair's prompt and responses, from this process's cache (they never change) or one query."""
        with self._texts_lock:
            text = self._texts.get(pair_id)
            if text is not None:
                self._texts.move_to_end(pair_id)
                return text
        with self.store.read() as session:
            row = session.execute(pair_text_statement(), {"pair": pair_id}).first()
        if row is None:
            raise Rejected(f"no pair with id {pair_id}")
        messages = row.messages or [{"role": "user", "content": row.prompt}]
        text = PairText(pair_id, messages, {"a": (row.a_id, row.a_text), "b": (row.b_id, row.b_text)})
        with self._texts_lock:
            self._texts[pair_id] = text
            while len(self._texts) > PAIR_TEXT_CACHE:
                self._texts.popitem(last=False)
        return text

    def shown(self, user: str, pair_id: int) -> tuple[str, datetime | None]:
        """(response shown on the left, when the pair was shown) for this user, recomputed from the database: for
        leases made before schema v6, which did not store the side (`Assignment.shown_left`)."""
        with self.store.read() as session:
            pair = session.get(Pair, pair_id)
            if pair is None:
                raise Rejected(f"no pair with id {pair_id}")
            fixed = ((pair.rule_params or {}).get("shown_left") or {}).get(user)
            rows = session.execute(
                select(Assignment.annotator, Assignment.leased_at)
                .where(Assignment.pair_id == pair_id)
                .order_by(Assignment.id)
            ).all()
        names = [name for name, _ in rows]
        rank = names.index(user) if user in names else len(names)
        shown_at = rows[rank][1] if user in names else None
        return (fixed if fixed in ("a", "b") else shown_order(pair_id, rank)), shown_at

    def release(self, user: str) -> int:
        """Give back every pair leased to the user (tab closed, logout); returns how many."""
        with self.store.read() as session:
            pair_ids = session.scalars(
                select(Assignment.pair_id).where(Assignment.annotator == user, Assignment.status == "active")
            ).all()
        with self.writing:
            return sum(release_lease(self.store, user, pair_id) for pair_id in pair_ids)

    # ---- answers --------------------------------------------------------------------------------------------

    def vote(self, user: str | None, pair_id: Any, screen_choice: str, *details: Any, **options: Any) -> int:
        """Record a vote on the leased pair (the arguments of `vote_and_next`: strength, reasons left and right,
        rationale); returns the vote's id."""
        return self.vote_and_next(user, pair_id, screen_choice, *details, lease_next=False, **options)[0]

    def vote_and_next(
        self,
        user: str | None,
        pair_id: Any,
        screen_choice: str,
        strength: str | int = "slightly",
        reasons_left: list[str] | None = None,
        reasons_right: list[str] | None = None,
        rationale: str | None = "",
        message: str = "",
        lease_next: bool = True,
    ) -> tuple[int, Item | None]:
        """Record a vote on the leased pair and lease the next one, in one transaction: (the vote's id, the next
        item with `message`; None without `lease_next`)."""
        self.require(user, ANNOTATE_ROLES)
        if screen_choice not in SCREEN_CHOICES:
            raise Rejected(f"unknown choice {screen_choice!r}; expected one of {', '.join(SCREEN_CHOICES)}")
        level = STRENGTHS.get(strength, strength) if isinstance(strength, str) else strength
        if level not in (1, 2):
            raise Rejected(f"strength must be one of {', '.join(STRENGTHS)}, got {strength!r}")
        if screen_choice in ("tie", "both_bad"):
            level = 1  # strength grades a preference; a tie or both-bad has none
        rationale = self.limited("rationale", rationale)
        self.check_rationale(screen_choice, level, rationale)
        reasons = self.check_reasons(reasons_left, reasons_right)

        def event(left: str) -> dict[str, Any]:
            right = "b" if left == "a" else "a"
            return {"choice": to_response_choice(screen_choice, left), "strength": level,
                    "rationale": rationale or None,
                    "reasons": {left: reasons[0], right: reasons[1]} if any(reasons) else None}

        return self.answer(user, pair_id, "vote", event, message, lease_next)

    def limited(self, what: str, text: Any) -> str:
        """The stripped text, refused with a message when longer than `config.max_text_bytes`."""
        text = str(text or "").strip()
        size = len(text.encode("utf-8", "replace"))
        if size > self.config.max_text_bytes:
            raise Rejected(f"the {what} is too long ({size} bytes); the limit is {self.config.max_text_bytes} bytes")
        return text

    def check_rationale(self, screen_choice: str, level: int, rationale: str) -> None:
        rules = self.config.rationale_required
        if rationale:
            return
        if "both_bad" in rules and screen_choice == "both_bad":
            raise Rejected("please say in the rationale why both responses are bad")
        if "strong" in rules and level == 2:
            raise Rejected("please give a rationale for a 'much better' vote")

    @staticmethod
    def check_reasons(left: list[str] | None, right: list[str] | None) -> tuple[list[str], list[str]]:
        picked = (list(left or []), list(right or []))
        unknown = {tag for side in picked for tag in side} - set(REASON_TAGS)
        if unknown:
            raise Rejected(f"unknown reason tag(s) {sorted(unknown)}")
        return picked

    def skip(self, user: str | None, pair_id: Any) -> int:
        return self.skip_and_next(user, pair_id, lease_next=False)[0]

    def skip_and_next(self, user: str | None, pair_id: Any, message: str = "",
                      lease_next: bool = True) -> tuple[int, Item | None]:
        self.require(user, ANNOTATE_ROLES)
        return self.answer(user, pair_id, "skip", lambda left: {}, message, lease_next)

    def flag(self, user: str | None, pair_id: Any, reason: str | None, note: str | None = "") -> int:
        """Flag the leased pair for reviewers (unsafe, private data, broken) and move on."""
        return self.flag_and_next(user, pair_id, reason, note, lease_next=False)[0]

    def flag_and_next(self, user: str | None, pair_id: Any, reason: str | None, note: str | None = "",
                      message: str = "", lease_next: bool = True) -> tuple[int, Item | None]:
        self.require(user, ANNOTATE_ROLES)
        if reason not in FLAG_REASONS:
            raise Rejected(f"choose why you flag this item: {', '.join(FLAG_REASONS)}")
        note = self.limited("flag note", note)
        flag_reason = f"{reason}: {note}" if note else reason
        # A flag is no answer: the lease is given back (released) and the slot opens for someone else; the flagger
        # never gets the pair again (the queue passes over pairs they voted on, skipped or flagged).
        return self.answer(user, pair_id, "flag", lambda left: {"flag_reason": flag_reason}, message, lease_next)

    def answer(self, user: str, pair_id: Any, kind: str, event, message: str = "",
               lease_next: bool = True) -> tuple[int, Item | None]:
        """One transaction: end the user's live lease of the pair (refused if there is none), append the event
        (`event(left)` gives its kind-specific columns), move the pair's slot, and lease the next pair."""
        try:
            pair_id = int(pair_id)
        except (TypeError, ValueError):
            raise Rejected("no pair on screen; reload the page") from None
        now = utcnow()
        progress = lease = None
        try:
            with self.writing, self.store.write() as session:
                lock_annotator(session, user)
                held = finish_live_lease(session, pair_id, user, "released" if kind == "flag" else "done", now)
                if held is None:
                    raise Rejected(
                        f"pair {pair_id} is not leased to you (the lease expired, or you answered it in another "
                        "tab); reload to get your current pair"
                    )
                left = held.left or self.shown(user, pair_id)[0]
                row = {"pair_id": pair_id, "annotator": user, "kind": kind, "choice": None, "strength": None,
                       "rationale": None, "reasons": None, "left": left,
                       "guidelines_version": self.config.guidelines_version, "shown_at": held.leased_at,
                       "answered_at": now, "supersedes_id": None, "flag_reason": None, "source": "human",
                       "created_at": now, **event(left)}
                check_event(kind, user, row["choice"], row["strength"] or 1, left, None)
                event_id = append_leased_event(session, row)
                if lease_next:
                    progress, lease = self.lease_for(session, user)
        except DataError as error:  # e.g. a NUL character in the rationale
            raise Rejected(str(error)) from error
        return event_id, (self.item(user, lease, progress, message) if lease_next else None)

    def undo(self, user: str | None, current_pair_id: Any = None) -> int:
        """Take back the user's last vote or skip (a superseding event); its pair is shown again next."""
        self.require(user, ANNOTATE_ROLES)
        with self.writing:
            undo_id = undo_last_vote(self.store, user, lease_seconds=self.config.lease_seconds)
        if undo_id is None:
            raise Rejected("nothing to undo")
        with self.store.read() as session:
            undone_pair = session.scalar(select(Vote.pair_id).where(Vote.id == undo_id))
        try:
            current = int(current_pair_id)
        except (TypeError, ValueError):
            current = None
        if current is not None and current != undone_pair:
            # Hand the pair on screen back, so the queue shows the undone pair now, not after it.
            with self.writing:
                release_lease(self.store, user, current)
        return undo_id

    # ---- progress -------------------------------------------------------------------------------------------

    def progress(self, user: str, session=None) -> Progress:
        """The user's votes today and in all (in `session` if given, so a vote just made counts), the project's."""
        params = {"who": user, "midnight": datetime.combine(utcnow().date(), time())}
        if session is None:
            with self.store.read() as session:
                total, today_count = session.execute(mine_statement(), params).one()
        else:
            total, today_count = session.execute(mine_statement(), params).one()
        done, pairs = self.project_progress()
        return Progress(mine_today=int(today_count), mine_total=int(total), pairs_done=done, pairs_total=pairs,
                        target=self.account(user)[1])

    def project_progress(self) -> tuple[int, int]:
        """(pairs with all their votes, pairs), cached for `config.progress_ttl` seconds."""
        now = monotonic()
        with self._progress_lock:
            if self._project_cache is not None and now - self._project_cache[0] < self.config.progress_ttl:
                return self._project_cache[1]
        with self.store.read() as session:
            counts = (
                session.scalar(select(func.count(Pair.id)).where(human_vote_count() >= Pair.votes_required)) or 0,
                session.scalar(select(func.count(Pair.id))) or 0,
            )
        with self._progress_lock:
            self._project_cache = (now, counts)
        return counts

    # ---- reviewers ------------------------------------------------------------------------------------------

    def export(self, user: str | None, directory: str | Path, incomplete: bool = False) -> Path:
        """What `align export` writes: the preference rows as JSONL, for download; complete pairs only unless
        `incomplete`."""
        self.require(user, REVIEW_ROLES)
        stamp = utcnow().strftime("%Y%m%d-%H%M%S")
        rows = export_preferences(self.store, complete_only=not incomplete)
        return write_jsonl(rows, Path(directory) / f"preferences-{stamp}.jsonl")

    def review_pair(self, user: str | None, pair_id: Any) -> str:
        """Everything about one pair for adjudication: both responses with their versions, every event."""
        self.require(user, REVIEW_ROLES)
        try:
            pair = get_pair(self.store, int(pair_id))
        except (TypeError, ValueError, DataError):
            raise Rejected(f"no pair with id {pair_id!r}") from None
        from labeling.dashboard import pair_events, response_versions  # dashboard imports this module

        versions = response_versions(self.store, pair["response_a"]["id"], pair["response_b"]["id"])
        gold = f" · gold: **{pair['gold_choice']}**" if pair["is_gold"] else ""
        title = (f"### Pair {pair['pair_id']} (rule {safe_markdown(pair['rule'])}, {pair['votes_required']} votes "
                 f"required{gold})")
        lines = [title, "**Prompt**", prompt_markdown(pair["prompt"])]
        for side in ("a", "b"):
            lines += ["---", f"**Response {side}** (model version {safe_markdown(versions[side])})",
                      safe_markdown(pair[f"response_{side}"]["text"])]
        lines.append("---")
        lines += ["**Events**", pair_events(self.store, pair["pair_id"])]
        return "\n\n".join(lines)

    def set_gold(self, user: str | None, pair_id: Any, choice: str) -> str:
        self.require(user, REVIEW_ROLES)
        try:
            set_gold(self.store, int(pair_id), choice)
        except (TypeError, ValueError, DataError) as error:
            raise Rejected(str(error)) from None
        return f"pair {int(pair_id)} is now a gold item with answer {choice}"


class Sessions:
    """Which browser sessions each user has open, so closing one of two tabs does not take the other's lease.

    When a user's last session closes, `on_last_closed(user)` runs after `grace` seconds unless a session of
    theirs opened meanwhile: a page refresh closes the old session just before the new one opens.
    """

    def __init__(self, on_last_closed, grace: float = 15.0):
        self.on_last_closed = on_last_closed
        self.grace = grace
        self.open: dict[str, set[str]] = {}
        self.lock = threading.Lock()

    def opened(self, user: str, session: str) -> None:
        with self.lock:
            self.open.setdefault(user, set()).add(session)

    def closed(self, user: str, session: str) -> None:
        with self.lock:
            self.open.get(user, set()).discard(session)
            if self.open.get(user):
                return
        if self.grace <= 0:
            self.release_if_gone(user)
            return
        timer = threading.Timer(self.grace, self.release_if_gone, args=(user,))
        timer.daemon = True
        timer.start()

    def release_if_gone(self, user: str) -> None:
        with self.lock:
            if self.open.get(user):
                return
            self.open.pop(user, None)
        self.on_last_closed(user)
