"""The preference store on SQLite and PostgreSQL: schema and migrations, idempotent adds, pairs, the vote log,
leases, users, and concurrent writers in separate processes."""

from __future__ import annotations

import json
import multiprocessing
import random
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, inspect, select, text, update

from align.errors import AlignError, DataError
from align.store import (
    SCHEMA_VERSION,
    Pair,
    Prompt,
    Response,
    Vote,
    add_prompts,
    add_responses,
    add_user,
    add_vote,
    connect,
    effective_votes,
    existing_sample_keys,
    get_model_version,
    has_live_lease,
    lease_next_pair,
    make_pairs,
    migrations,
    open_pairs,
    register_model_version,
    release_lease,
    undo_last_vote,
    verify_user,
)
from align.store.db import parse_url
from align.store.leases import set_assignment_mode, slot_states
from align.store.schema import Assignment, LoginSession, Meta
from align.store.users import (
    ThrottlePolicy,
    clear_failures,
    end_sessions,
    login_wait,
    record_failure,
    session_account,
    start_session,
    throttle_keys,
)
from tests.db import BACKENDS, fill_store

T0 = datetime(2025, 1, 1, 12, 0, 0)


def count(store, model) -> int:
    with store.read() as session:
        return session.scalar(select(func.count()).select_from(model))


# ---- opening, schema, migrations -----------------------------------------------------------------------------


def test_schema_created_and_version_recorded(store):
    with store.read() as session:
        tables = set(inspect(session.connection()).get_table_names())
        version = session.scalar(select(Meta.value).where(Meta.key == "schema_version"))
    expected = {"meta", "model_version", "prompt", "response", "pair", "vote", "assignment", "user"}
    assert expected <= tables
    assert version == str(SCHEMA_VERSION)


def test_reopening_keeps_data(store_url):
    with connect(store_url) as store:
        add_prompts(store, [{"prompt": "kept"}])
    with connect(store_url) as store:
        assert add_prompts(store, [{"prompt": "kept"}]) == [1]


def test_sqlite_bare_path_settings(tmp_path):
    path = tmp_path / "nested" / "dir" / "store.db"
    with connect(str(path)) as store:
        assert path.exists()
        with store.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_urls_are_normalised_and_bad_ones_name_the_url_without_password(tmp_path):
    assert parse_url("postgresql://u:p@h/db").drivername == "postgresql+psycopg"
    assert parse_url("postgres://u:p@h/db").drivername == "postgresql+psycopg"
    assert parse_url("runs/x.db").drivername == "sqlite"
    with pytest.raises(AlignError, match=r"unsupported store URL mysql://u:\*\*\*@h/db"):
        connect("mysql://u:secret@h/db")
    with pytest.raises(AlignError, match=r"cannot open store .*127\.0\.0\.1:1/db") as caught:
        connect("postgresql://u:secret@127.0.0.1:1/db")
    assert "secret" not in str(caught.value)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(AlignError, match="garbage.db"):
        connect(garbage)


def set_schema_version(url: str, version: int) -> None:
    with connect(url) as store, store.write() as session:
        session.execute(update(Meta).where(Meta.key == "schema_version").values(value=str(version)))


def test_migration_from_older_version(store_url, monkeypatch):
    connect(store_url).close()

    def add_note_column(connection):
        connection.execute(text("ALTER TABLE prompt ADD COLUMN note VARCHAR(20)"))

    new = migrations.SCHEMA_VERSION + 1
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", new)
    monkeypatch.setattr(migrations, "MIGRATIONS", {new: add_note_column})
    with connect(store_url) as store, store.read() as session:
        columns = {c["name"] for c in inspect(session.connection()).get_columns("prompt")}
        assert "note" in columns
        assert session.scalar(select(Meta.value).where(Meta.key == "schema_version")) == str(new)


def test_failed_migration_rolls_back(store_url, monkeypatch):
    connect(store_url).close()

    def half_done(connection):
        connection.execute(text("ALTER TABLE prompt ADD COLUMN note VARCHAR(20)"))
        raise RuntimeError("boom")

    new = migrations.SCHEMA_VERSION + 1
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", new)
    monkeypatch.setattr(migrations, "MIGRATIONS", {new: half_done})
    with pytest.raises(AlignError, match=f"to schema v{new} failed: boom"):
        connect(store_url)
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", new - 1)
    with connect(store_url) as store, store.read() as session:
        assert "note" not in {c["name"] for c in inspect(session.connection()).get_columns("prompt")}
        assert session.scalar(select(Meta.value).where(Meta.key == "schema_version")) == str(new - 1)


def test_migration_to_v2_fills_the_queue_slots_from_votes_and_leases(store_url):
    """A v1 store (no slots) with votes, a skip, a live and an expired lease gets slots that say the same."""
    with connect(store_url) as store:
        filled = fill_store(store, n_prompts=3, samples=2)
        first, second, third = make_pairs(store, filled["version_id"], votes_required=3)
        add_vote(store, first, "ann", "a")
        add_vote(store, first, "bob", "b")
        add_vote(store, first, "gpt", "a", source="sim:gpt")  # simulated: no slot
        add_vote(store, second, "ann", None, kind="skip")
        with store.write() as session:
            session.execute(text("DROP TABLE lease_slot"))
            now = datetime.now(timezone.utc).replace(tzinfo=None)
            session.add(Assignment(pair_id=second, annotator="cat", leased_at=now,
                                   lease_expires_at=now + timedelta(minutes=5)))
            session.add(Assignment(pair_id=third, annotator="dan", leased_at=now - timedelta(hours=1),
                                   lease_expires_at=now - timedelta(minutes=50)))
    set_schema_version(store_url, 1)
    with connect(store_url) as store:
        assert slot_states(store, first) == [("filled", "ann"), ("filled", "bob"), ("open", None)]
        assert slot_states(store, second) == [("held", "cat"), ("open", None), ("open", None)]
        assert slot_states(store, third) == [("open", None)] * 3
        assert lease_next_pair(store, "ann") == third  # breadth-first: third's first slot comes before first's


def test_newer_schema_is_refused(store_url):
    connect(store_url).close()
    set_schema_version(store_url, SCHEMA_VERSION + 1)
    expected = f"database schema v{SCHEMA_VERSION + 1} is newer than this align \\(v{SCHEMA_VERSION}\\); upgrade align"
    with pytest.raises(AlignError, match=expected):
        connect(store_url)


# ---- model versions, prompts, responses ----------------------------------------------------------------------


def test_model_versions(store, tmp_path):
    base = register_model_version(store, {"name": "base", "base_model": "tiny", "parent": None})
    info = {"name": "v1", "base_model": "tiny", "adapter_hash": "h1", "parent": "base", "config": {"lr": 1e-4}}
    (tmp_path / "version.json").write_text(json.dumps(info))
    first = register_model_version(store, tmp_path)
    assert register_model_version(store, info) == first
    found = get_model_version(store, "v1")
    assert (found.id, found.parent_id, found.training_config) == (first, base, {"lr": 1e-4})
    assert get_model_version(store, first).name == "v1"
    with pytest.raises(AlignError, match="already registered with adapter_hash 'h1'"):
        register_model_version(store, {**info, "adapter_hash": "h2"})
    with pytest.raises(AlignError, match="parent version 'nope'"):
        register_model_version(store, {"name": "v2", "base_model": "tiny", "parent": "nope"})
    with pytest.raises(AlignError, match="unknown model version 'v9'; known: base, v1"):
        get_model_version(store, "v9")


def test_add_prompts_is_idempotent(store):
    rows = [
        {"prompt": "2+2?", "family": "math", "gold": 4, "split": "train", "id": "ext-1", "tags": ["easy"]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    ]
    ids = add_prompts(store, rows)
    # The same prompt written as a single user message is the same prompt.
    again = add_prompts(store, [{"messages": [{"role": "user", "content": "2+2?"}]}, rows[1], rows[1]])
    assert again == [ids[0], ids[1], ids[1]]
    assert count(store, Prompt) == 2
    with pytest.raises(DataError, match="prompt row 1 needs"):
        add_prompts(store, [{"text": "wrong key"}])


def test_add_responses_is_idempotent_and_resumable(store):
    filled = fill_store(store, n_prompts=2, samples=3)
    assert add_responses(store, filled["rows"]) == filled["response_ids"]
    assert count(store, Response) == 6
    # top_k None and 0 both mean "off": the same sample, not a new one.
    same = dict(filled["rows"][0], top_k=0)
    assert add_responses(store, [same]) == filled["response_ids"][:1]
    with store.read() as session:
        stored = session.get(Response, filled["response_ids"][0])
    assert (stored.logp, stored.sample_logp, stored.length) == (-1.75, -0.875, 3)
    settings = {"temperature": 0.7, "top_p": 0.9, "top_k": None, "max_new_tokens": 8}
    done = existing_sample_keys(store, filled["version_id"], 0, settings)
    assert done == {(p, k) for p in filled["prompt_ids"] for k in range(3)}
    assert existing_sample_keys(store, filled["version_id"], 1, settings) == set()
    assert existing_sample_keys(store, filled["version_id"], 0, {**settings, "temperature": 1.0}) == set()
    with pytest.raises(DataError, match="response row 1 lacks seed"):
        add_responses(store, [{k: v for k, v in filled["rows"][0].items() if k != "seed"}])


# ---- pairs ---------------------------------------------------------------------------------------------------


def pair_members(store, pair_ids):
    with store.read() as session:
        pairs = session.scalars(select(Pair).where(Pair.id.in_(pair_ids))).all()
        responses = {r.id: r for r in session.scalars(select(Response))}
    return [(p, responses[p.response_a_id], responses[p.response_b_id]) for p in pairs]


def test_random_iid_pairs_are_disjoint_independent_samples(store):
    filled = fill_store(store, n_prompts=3, samples=5)
    pair_ids = make_pairs(store, filled["version_id"], seed=7)
    assert len(pair_ids) == 3 * 2  # 5 samples per prompt: two pairs, one left over
    assert make_pairs(store, filled["version_id"], seed=7) == pair_ids
    used = []
    for pair, a, b in pair_members(store, pair_ids):
        assert a.prompt_id == b.prompt_id == pair.prompt_id
        assert a.model_version_id == b.model_version_id and a.sample_index != b.sample_index
        assert pair.rule == "random_iid" and pair.rule_params["seed"] == 7 and pair.votes_required == 3
        assert {a.id, b.id} <= set(pair.rule_params["candidate_ids"])
        used += [a.id, b.id]
    assert len(used) == len(set(used))
    # A sixth sample per prompt pairs with the leftover; nothing already paired is reused.
    rows = [dict(filled["rows"][0], prompt_id=p, sample_index=5, text=f"late {p}") for p in filled["prompt_ids"]]
    add_responses(store, rows)
    more = make_pairs(store, filled["version_id"], seed=7)
    assert len(more) == 9 and set(pair_ids) < set(more)
    used = [r.id for _, a, b in pair_members(store, more) for r in (a, b)]
    assert len(used) == len(set(used)) == 18


def test_random_iid_shuffle_depends_on_seed(tmp_path):
    layouts = []
    for seed in (0, 1, 0):
        with connect(tmp_path / f"s{seed}-{len(layouts)}.db") as store:
            filled = fill_store(store, n_prompts=1, samples=8)
            members = pair_members(store, make_pairs(store, filled["version_id"], seed=seed))
            layouts.append(sorted((a.id, b.id) for _, a, b in members))
    assert layouts[0] == layouts[2] != layouts[1]


def test_all_pairs(store):
    filled = fill_store(store, n_prompts=2, samples=4)
    pair_ids = make_pairs(store, rule="all_pairs", votes_required=1, prompt_ids=filled["prompt_ids"][:1])
    assert len(pair_ids) == 6
    assert make_pairs(store, rule="all_pairs", votes_required=1, prompt_ids=filled["prompt_ids"][:1]) == pair_ids
    with pytest.raises(AlignError, match="unknown pair rule 'best'"):
        make_pairs(store, rule="best")


# ---- votes ---------------------------------------------------------------------------------------------------


@pytest.fixture
def pairs(store):
    filled = fill_store(store, n_prompts=3, samples=2)
    return make_pairs(store, filled["version_id"])


def test_votes_are_append_only_and_undo_supersedes(store, pairs):
    first = add_vote(store, pairs[0], "ann", "a", strength=2, rationale="clearer", left="b",
                     reasons={"a": ["correct"], "b": ["wrong"]})
    second = add_vote(store, pairs[1], "ann", "tie")
    assert [v.id for v in effective_votes(store)] == [first, second]
    undo = undo_last_vote(store, "ann")
    assert [v.id for v in effective_votes(store)] == [first]
    assert count(store, Vote) == 3
    with store.read() as session:
        undo_row, original = session.get(Vote, undo), session.get(Vote, second)
    assert (undo_row.kind, undo_row.supersedes_id, undo_row.choice) == ("undo", second, None)
    assert (original.kind, original.choice) == ("vote", "tie")  # untouched
    # The undone pair is leased back to the annotator, to be answered again.
    assert lease_next_pair(store, "ann") == pairs[1]
    again = add_vote(store, pairs[1], "ann", "b")
    assert {v.id for v in effective_votes(store)} == {first, again}
    assert undo_last_vote(store, "ann") is not None
    assert undo_last_vote(store, "ann") is not None
    assert undo_last_vote(store, "ann") is None
    assert effective_votes(store) == []


def test_vote_validation_and_edits(store, pairs):
    for bad, message in [
        ({"choice": "left"}, "unknown choice 'left'"),
        ({"choice": "a", "strength": 3}, "strength must be 1"),
        ({"choice": "a", "left": "x"}, "left must be"),
        ({"choice": "a", "kind": "maybe"}, "unknown vote kind"),
        ({"choice": "a", "source": "robot"}, "unknown vote source"),
        ({"choice": None, "kind": "undo"}, "undo needs supersedes_id"),
    ]:
        with pytest.raises(DataError, match=message):
            add_vote(store, pairs[0], "ann", **bad)
    with pytest.raises(DataError, match="no pair with id 999"):
        add_vote(store, 999, "ann", "a")
    first = add_vote(store, pairs[0], "ann", "a")
    with pytest.raises(DataError, match=f"already answered pair {pairs[0]} \\(event {first}\\)"):
        add_vote(store, pairs[0], "ann", "b")
    with pytest.raises(DataError, match="not one of 'bob'"):
        add_vote(store, pairs[0], "bob", "b", supersedes_id=first)
    edit = add_vote(store, pairs[0], "ann", "b", supersedes_id=first)
    assert [(v.id, v.choice) for v in effective_votes(store)] == [(edit, "b")]
    with pytest.raises(DataError, match="already undone or edited"):
        add_vote(store, pairs[0], "ann", None, kind="undo", supersedes_id=first)
    flag = add_vote(store, pairs[0], "ann", None, kind="flag", flag_reason="prompt is unsafe")
    assert [v.id for v in effective_votes(store)] == [edit] and flag > edit
    with pytest.raises(DataError, match="only a vote or skip can be edited"):
        add_vote(store, pairs[0], "ann", "a", supersedes_id=flag)


def test_effective_votes_filters_and_open_pairs(store, pairs):
    add_vote(store, pairs[0], "ann", "a")
    add_vote(store, pairs[0], "bob", "b")
    add_vote(store, pairs[0], "gpt", "a", source="sim:gpt")
    add_vote(store, pairs[1], "ann", None, kind="skip")
    assert len(effective_votes(store)) == 3
    assert len(effective_votes(store, source="human")) == 2
    assert [v.annotator for v in effective_votes(store, source="simulated")] == ["gpt"]
    assert len(effective_votes(store, annotators=["ann"], pair_ids=[pairs[0]])) == 1
    assert effective_votes(store, since=datetime.now() + timedelta(hours=24)) == []
    # Simulated votes do not use up the human quota; the annotator's answered and skipped pairs are left out.
    assert open_pairs(store) == [pairs[1], pairs[2], pairs[0]]
    assert open_pairs(store, annotator="ann") == [pairs[2]]
    assert open_pairs(store, limit=1) == [pairs[1]]
    add_vote(store, pairs[0], "cat", "a")
    assert pairs[0] not in open_pairs(store)


# ---- leases --------------------------------------------------------------------------------------------------


def test_lease_is_returned_again_until_it_expires(store, pairs):
    first = lease_next_pair(store, "ann", lease_seconds=60, now=T0)
    assert lease_next_pair(store, "ann", lease_seconds=60, now=T0 + timedelta(seconds=30)) == first
    assert has_live_lease(store, "ann", first, now=T0 + timedelta(seconds=80))  # renewed at +30s
    assert not has_live_lease(store, "ann", first, now=T0 + timedelta(seconds=91))
    assert release_lease(store, "ann", first)
    assert not has_live_lease(store, "ann", first, now=T0)
    assert not release_lease(store, "ann", first)


def test_leases_give_k_votes_and_nobody_sees_a_pair_twice(store):
    filled = fill_store(store, n_prompts=2, samples=2)
    (pair,) = make_pairs(store, filled["version_id"], prompt_ids=filled["prompt_ids"][:1], votes_required=2)
    assert lease_next_pair(store, "ann", now=T0) == pair
    assert lease_next_pair(store, "bob", now=T0) == pair
    assert lease_next_pair(store, "cat", now=T0) is None  # two live leases fill the pair's two slots
    add_vote(store, pair, "ann", "a")
    assert not has_live_lease(store, "ann", pair, now=T0)
    assert lease_next_pair(store, "ann", now=T0) is None  # answered: never again
    # bob walks away; once his lease expires cat gets the slot.
    later = T0 + timedelta(seconds=601)
    assert lease_next_pair(store, "cat", now=later) == pair
    add_vote(store, pair, "cat", "b")
    assert lease_next_pair(store, "bob", now=later) is None  # full: two votes
    assert lease_next_pair(store, "dan", now=later) is None


def test_depth_first_mode_completes_pairs_one_after_another(store):
    filled = fill_store(store, n_prompts=3, samples=2)
    first, second, third = make_pairs(store, filled["version_id"], votes_required=2)
    assert [lease_next_pair(store, name, now=T0) for name in ("ann", "bob")] == [first, second]  # breadth-first
    set_assignment_mode(store, "depth_first")
    assert [lease_next_pair(store, name, now=T0) for name in ("cat", "dan", "eve")] == [first, second, third]
    with pytest.raises(AlignError, match="unknown assignment mode 'sideways'"):
        set_assignment_mode(store, "sideways")


def test_expired_lease_is_handed_on_and_slots_follow_every_event(store):
    filled = fill_store(store, n_prompts=2, samples=2)
    first, second = make_pairs(store, filled["version_id"], votes_required=2)
    assert lease_next_pair(store, "ann", now=T0) == first
    assert lease_next_pair(store, "bob", now=T0, lease_seconds=3600) == second
    # ann's lease expires: the next annotator gets her slot before any open slot.
    later = T0 + timedelta(seconds=601)
    assert lease_next_pair(store, "cat", now=later) == first
    assert slot_states(store, first) == [("held", "cat"), ("open", None)]
    assert lease_next_pair(store, "ann", now=later) == first  # she may still take its other slot
    add_vote(store, first, "cat", "a")
    add_vote(store, second, "bob", None, kind="skip")
    assert slot_states(store, first) == [("filled", "cat"), ("held", "ann")]
    assert slot_states(store, second) == [("open", None), ("open", None)]
    undo_last_vote(store, "cat")  # the vote's slot is leased back to cat
    assert slot_states(store, first) == [("held", "cat"), ("held", "ann")]
    assert lease_next_pair(store, "cat") == first
    add_vote(store, first, "cat", "b")
    add_vote(store, first, "gpt", "a", source="sim:gpt")  # a simulated judge takes no slot
    assert release_lease(store, "ann", first)
    assert slot_states(store, first) == [("filled", "cat"), ("open", None)]
    # bob skipped second: he gets first's open slot; second goes to the next two.
    assert [lease_next_pair(store, name) for name in ("bob", "dan", "eve")] == [first, second, second]
    assert lease_next_pair(store, "fay") is None


def test_labeling_session_until_done(store):
    filled = fill_store(store, n_prompts=6, samples=2)
    pair_ids = make_pairs(store, filled["version_id"], votes_required=2)
    annotators = ["ann", "bob", "cat"]
    while True:
        leased = [(name, lease_next_pair(store, name)) for name in annotators]
        leased = [(name, pair) for name, pair in leased if pair is not None]
        if not leased:
            break
        for name, pair in leased:
            add_vote(store, pair, name, random.choice(["a", "b", "tie"]))
    votes = effective_votes(store)
    assert len(votes) == 2 * len(pair_ids)
    assert len({(v.pair_id, v.annotator) for v in votes}) == len(votes)


# ---- users ---------------------------------------------------------------------------------------------------


def test_users(store):
    add_user(store, "ann", "correct horse battery", "annotator")
    add_user(store, "root", "s3cret-s3cret", role="admin")
    assert verify_user(store, "ann", "correct horse battery") == "annotator"
    assert verify_user(store, "root", "s3cret-s3cret") == "admin"
    assert verify_user(store, "ann", "wrong") is None
    assert verify_user(store, "nobody", "correct horse battery") is None
    with store.read() as session:
        stored = session.scalar(text('SELECT password_hash FROM "user" WHERE name = \'ann\''))
    assert stored.startswith("scrypt$16384$8$1$") and "correct horse battery" not in stored
    with pytest.raises(AlignError, match="user 'ann' already exists"):
        add_user(store, "ann", "again-again-again")
    with pytest.raises(DataError, match="unknown role 'god'"):
        add_user(store, "zed", "pw-long-enough", role="god")


def test_passwords_need_ten_characters_by_default(store):
    with pytest.raises(DataError, match="the password of 'ann' is too short: it needs at least 10 characters"):
        add_user(store, "ann", "123456789")
    add_user(store, "ann", "1234", min_length=4)
    assert verify_user(store, "ann", "1234") == "annotator"


def test_sessions_expire_and_end_everywhere(store):
    add_user(store, "ann", "correct horse battery")
    first = start_session(store, "ann", hours=12, now=T0)
    second = start_session(store, "ann", hours=1, now=T0)
    assert session_account(store, first, now=T0 + timedelta(hours=11))[0] == "ann"
    assert session_account(store, second, now=T0 + timedelta(minutes=61)) is None  # expired
    assert session_account(store, "not a token", now=T0) is None and session_account(store, None) is None
    with store.read() as session:
        assert first not in {row.token_hash for row in session.scalars(select(LoginSession))}  # only hashes
    assert end_sessions(store, "ann") == 2
    assert session_account(store, first, now=T0) is None


def test_failed_logins_back_off_per_key(store):
    policy = ThrottlePolicy(account_failures=3, address_failures=5, base_seconds=2, max_seconds=60, window=600)
    account, address = throttle_keys("ann", "10.0.0.1")
    for k in range(3):
        assert login_wait(store, [account, address], now=T0) == 0
        record_failure(store, [account, address], policy, now=T0)
    assert login_wait(store, [account], now=T0) == 2  # the third failure locks the account for 2 s
    assert login_wait(store, [address], now=T0) == 0  # the address may fail 5 times
    record_failure(store, [account, address], policy, now=T0 + timedelta(seconds=3))
    assert login_wait(store, [account], now=T0 + timedelta(seconds=3)) == 4  # doubled
    for k in range(6):
        record_failure(store, [account, address], policy, now=T0 + timedelta(seconds=4))
    assert login_wait(store, [account], now=T0 + timedelta(seconds=4)) == 60  # capped
    assert login_wait(store, [address], now=T0 + timedelta(seconds=4)) == 60  # 10 failures: 2 * 2**5, capped
    clear_failures(store, account)
    assert login_wait(store, [account], now=T0 + timedelta(seconds=4)) == 0
    # A failure long after the last one starts the count again.
    record_failure(store, [address], policy, now=T0 + timedelta(hours=2))
    assert login_wait(store, [address], now=T0 + timedelta(hours=2, seconds=1)) == 0


# ---- concurrent writers in separate processes ----------------------------------------------------------------

SPAWN = multiprocessing.get_context("spawn")


def label_worker(url, annotator, max_votes, barrier):
    """Lease and vote until nothing is left (or max_votes), in its own process with its own Store."""
    with connect(url) as store:
        barrier.wait()
        for _ in range(max_votes):
            pair = lease_next_pair(store, annotator)
            if pair is None:
                break
            add_vote(store, pair, annotator, random.choice(["a", "b", "tie", "both_bad"]))


def response_worker(url, rows, results, barrier):
    with connect(url) as store:
        barrier.wait()
        results.put(sorted(add_responses(store, rows)))


def run_processes(target, args_list):
    """Start one process per argument tuple (plus a shared barrier, so they all write at once) and wait."""
    barrier = SPAWN.Barrier(len(args_list))
    processes = [SPAWN.Process(target=target, args=(*args, barrier)) for args in args_list]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * len(processes)


def test_eight_processes_voting_lose_nothing_and_duplicate_nothing(store_url):
    """8 processes lease and vote at once: 25 pairs wanting 8 votes each get exactly 200 votes, 10 pairs wanting
    3 get exactly 30 (no pair over-assigned), and no annotator votes on a pair twice."""
    with connect(store_url) as store:
        filled = fill_store(store, n_prompts=35, samples=2)
        eights = make_pairs(store, filled["version_id"], votes_required=8, prompt_ids=filled["prompt_ids"][:25])
        threes = make_pairs(store, filled["version_id"], votes_required=3, prompt_ids=filled["prompt_ids"][25:])
    assert (len(eights), len(threes)) == (25, 10)
    run_processes(label_worker, [(store_url, f"worker{i}", 100) for i in range(8)])
    with connect(store_url) as store:
        votes = effective_votes(store)
        assert count(store, Vote) == len(votes) == 200 + 30
        assert len({(v.pair_id, v.annotator) for v in votes}) == len(votes)
        per_pair = Counter(v.pair_id for v in votes)
        assert sum(per_pair[p] for p in eights) == 200 and {per_pair[p] for p in eights} == {8}
        assert sum(per_pair[p] for p in threes) == 30 and {per_pair[p] for p in threes} == {3}


def test_concurrent_add_responses_create_no_duplicates(store_url):
    with connect(store_url) as store:
        filled = fill_store(store, n_prompts=10, samples=1)
    rows = [dict(filled["rows"][0], prompt_id=p, sample_index=k, text=f"{p}/{k}")
            for p in filled["prompt_ids"] for k in range(1, 6)]
    results = SPAWN.Queue()
    jobs = [(store_url, random.Random(i).sample(rows, len(rows)), results) for i in range(4)]
    run_processes(response_worker, jobs)
    returned = [results.get(timeout=10) for _ in jobs]
    assert all(ids == returned[0] for ids in returned) and len(returned[0]) == 50
    with connect(store_url) as store:
        assert count(store, Response) == 10 + 50


def test_migration_to_v6_adds_the_shown_side_and_the_held_slot_index(store_url):
    """A v5 store (no assignment.shown_left, no ix_lease_slot_held_by) gets both; its old leases keep NULL."""
    with connect(store_url) as store:
        filled = fill_store(store, n_prompts=1, samples=2)
        [pair] = make_pairs(store, filled["version_id"], votes_required=2)
        assert lease_next_pair(store, "ann") == pair
        with store.write() as session:
            session.execute(text("DROP INDEX ix_lease_slot_held_by"))
            session.execute(text("ALTER TABLE assignment DROP COLUMN shown_left"))
    set_schema_version(store_url, 5)
    with connect(store_url) as store, store.read() as session:
        inspector = inspect(session.connection())
        assert "shown_left" in {c["name"] for c in inspector.get_columns("assignment")}
        assert "ix_lease_slot_held_by" in {i["name"] for i in inspector.get_indexes("lease_slot")}
        assert session.scalars(select(Assignment.shown_left)).all() == [None]
        assert session.scalar(select(Meta.value).where(Meta.key == "schema_version")) == str(SCHEMA_VERSION)


@pytest.mark.parametrize("store_url", [b for b in BACKENDS if b.id == "postgresql"], indirect=True)
def test_postgres_connections_are_pinged_only_after_sitting_idle(store, monkeypatch):
    """No ping (a round trip) per transaction; a connection idle past PING_AFTER_IDLE_SECONDS is pinged, and a dead
    one is replaced before use instead of failing the request. (PostgreSQL only: SQLite has no server connection.)"""
    assert store.dialect == "postgresql"
    from align.store import db

    pings = []
    real_ping = store.engine.dialect.do_ping
    monkeypatch.setattr(store.engine.dialect, "do_ping", lambda connection: pings.append(1) or real_ping(connection))
    for _ in range(3):
        with store.read() as session:
            session.execute(text("SELECT 1"))
    assert pings == []
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.0)
    with store.read() as session:
        session.execute(text("SELECT 1"))
    assert pings == [1]
    with store.read() as session:  # kill this connection from the server side; the next checkout replaces it
        pid = session.execute(text("SELECT pg_backend_pid()")).scalar()
    from sqlalchemy import create_engine

    other = create_engine(store.engine.url, isolation_level="AUTOCOMMIT")  # not a connection of the pool
    with other.connect() as admin:
        assert admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
    other.dispose()
    with store.read() as session:
        assert session.execute(text("SELECT pg_backend_pid()")).scalar() != pid
