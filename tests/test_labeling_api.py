"""The labeling app over HTTP: a launched server on a free port, driven by `gradio_client` (one Client per
browser tab, logged in through the app's /login, whose sessions live in the store), the JSON API, plus the load
benchmark. Screen outputs are read by name through `ItemView.of`."""

from __future__ import annotations

import random
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import delete, select, update

from align.store import Assignment, LeaseSlot, Pair, Vote, add_user, connect, get_pair, make_pairs
from tests.db import fill_store

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client
from gradio_client.exceptions import AppError, AuthenticationError

ROOT = Path(__file__).resolve().parents[1]
USERS = {"alice": "annotator", "bob": "annotator", "rita": "reviewer", "ada": "admin"}
VOTE = ("slightly", [], [], "")  # strength, reasons for A, reasons for B, rationale


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One launched app for the module over a store of 3 prompts x 2 samples: 3 pairs, 2 votes each."""
    from labeling.app import build_app, close_app, launch_app

    url = f"sqlite:///{tmp_path_factory.mktemp('api') / 'store.db'}"
    with connect(url) as store:
        info = fill_store(store, n_prompts=3, samples=2)
        make_pairs(store, info["version_id"], votes_required=2)
        for name, role in USERS.items():
            add_user(store, name, f"pw-{name}-0123", role)
    demo = build_app(url, release_grace=0)
    demo.test_url, demo.store_url, demo.clients = launch_app(demo, port=free_port(), block=False, quiet=True), url, {}
    yield demo
    close_app(demo)


@pytest.fixture
def app(server):
    """The module's app with an empty vote log and no leases: each test starts from unlabeled pairs."""
    with connect(server.store_url) as store, store.write() as session:
        session.execute(delete(Vote))
        session.execute(delete(Assignment))
        session.execute(update(LeaseSlot).values(state="open", annotator=None, expires_at=None))
        session.execute(update(Pair).values(is_gold=False, gold_choice=None))
    return server


def view(outputs) -> "ItemView":
    from labeling.app import ItemView

    return ItemView.of(outputs)


def client(app, name: str, new_tab: bool = False) -> Client:
    """A logged-in session of `name`: the same one for the module unless `new_tab` (another browser tab)."""
    if new_tab or name not in app.clients:
        app.clients[name] = Client(app.test_url, auth=(name, f"pw-{name}-0123"), verbose=False)
    return app.clients[name]


def rows(app, **where) -> list[Vote]:
    with connect(app.store_url) as store, store.read() as session:
        query = select(Vote).order_by(Vote.id)
        for key, value in where.items():
            query = query.where(getattr(Vote, key) == value)
        return list(session.scalars(query))


def left_side(app, item) -> str:
    """Which response ("a"/"b") the screen showed on the left, read from the texts the API returned."""
    with connect(app.store_url) as store:
        pair = get_pair(store, int(item[0]))
    return "a" if pair["response_a"]["text"] in view(item).left else "b"


def test_login_is_required(app):
    with pytest.raises(AuthenticationError):
        Client(app.test_url, verbose=False)
    with pytest.raises(ValueError, match="Could not login"):  # gradio_client's error for a refused password
        Client(app.test_url, auth=("alice", "wrong"), verbose=False)
    anonymous = httpx.post(f"{app.test_url}gradio_api/call/next", json={"data": []})
    assert anonymous.status_code == 401
    assert client(app, "alice").predict(api_name="/load")[0].startswith("**align labeling** · signed in as **alice**")


def test_refresh_and_second_tab_get_the_same_leased_pair(app):
    tab1 = client(app, "alice")
    first = tab1.predict(api_name="/next")
    assert first[0] is not None and "question 0" in view(first).prompt
    assert tab1.predict(api_name="/next")[0] == first[0]
    assert client(app, "alice", new_tab=True).predict(api_name="/load")[1] == first[0]  # /load: the header, then the item
    assert client(app, "bob").predict(api_name="/next")[0] is not None


def test_vote_stores_the_choice_in_response_order_and_the_side_shown(app):
    alice = client(app, "alice")
    item = alice.predict(api_name="/next")
    left = left_side(app, item)
    after = alice.predict(item[0], *VOTE, api_name="/vote_right")
    assert view(after).status == "Saved: B (right) better." and after[0] != item[0]
    [vote] = rows(app, kind="vote")
    assert vote.annotator == "alice" and vote.pair_id == item[0]
    assert vote.left == left and vote.choice == ("b" if left == "a" else "a")
    with pytest.raises(AppError, match="rationale"):
        alice.predict(after[0], "much", [], [], "", api_name="/vote_left")
    alice.predict(after[0], "much", ["correct"], [], "A is right", api_name="/vote_left")
    vote = rows(app, kind="vote")[-1]
    shown_left = left_side(app, after)
    assert vote.strength == 2 and vote.rationale == "A is right" and vote.left == shown_left
    assert vote.reasons == {shown_left: ["correct"], "b" if shown_left == "a" else "a": []}


def test_votes_for_pairs_not_leased_to_the_user_are_rejected(app):
    alice, bob = client(app, "alice"), client(app, "bob")
    mine, theirs = alice.predict(api_name="/next"), bob.predict(api_name="/next")
    assert mine[0] != theirs[0]  # a live lease counts as a vote to come: bob gets the emptiest other pair
    unleased = theirs[0]
    with pytest.raises(AppError, match="not leased to you"):
        alice.predict(unleased, *VOTE, api_name="/vote_left")
    with pytest.raises(AppError, match="not leased to you"):
        alice.predict(unleased, api_name="/skip")
    alice.predict(mine[0], *VOTE, api_name="/vote_left")
    with pytest.raises(AppError, match="not leased"):  # the same vote again (a second tab, a double click)
        alice.predict(mine[0], *VOTE, api_name="/vote_left")
    assert len(rows(app, kind="vote")) == 1


def test_two_annotators_overlap_k_times_and_never_see_a_pair_twice(app):
    seen: dict[str, list[int]] = {"alice": [], "bob": []}
    clients = {name: client(app, name) for name in seen}
    items = {name: c.predict(api_name="/next") for name, c in clients.items()}
    for _ in range(4):
        for name, c in clients.items():
            pair_id = items[name][0]
            if pair_id is None:
                continue
            assert pair_id not in seen[name]
            seen[name].append(pair_id)
            items[name] = c.predict(pair_id, *VOTE, api_name="/vote_tie")
    assert sorted(seen["alice"]) == sorted(seen["bob"]) == [1, 2, 3]
    assert "Nothing left" in view(items["alice"]).status
    votes = rows(app, kind="vote")
    assert len(votes) == 6
    for pair_id in (1, 2, 3):  # counterbalanced: the two annotators of a pair saw opposite sides
        assert {v.left for v in votes if v.pair_id == pair_id} == {"a", "b"}


def test_undo_skip_and_flag(app):
    alice = client(app, "alice")
    first = alice.predict(api_name="/next")
    second = alice.predict(first[0], *VOTE, api_name="/vote_left")
    back = alice.predict(second[0], api_name="/undo")
    assert back[0] == first[0] and view(back).status.startswith("Undone")
    [vote] = rows(app, kind="vote")
    [undo] = rows(app, kind="undo")
    assert undo.supersedes_id == vote.id  # nothing deleted: the vote row is still there, superseded
    skipped = alice.predict(back[0], api_name="/skip")
    assert view(skipped).status == "Skipped." and skipped[0] != first[0]
    with pytest.raises(AppError, match="choose why"):
        alice.predict(skipped[0], None, "", api_name="/flag")
    flagged = alice.predict(skipped[0], "broken", "answer cut off", api_name="/flag")
    assert flagged[0] not in (first[0], skipped[0])
    [flag] = rows(app, kind="flag")
    assert flag.flag_reason == "broken: answer cut off"
    assert [v.kind for v in rows(app, annotator="alice")] == ["vote", "undo", "skip", "flag"]


def test_reviewer_endpoints_refuse_annotators(app, tmp_path):
    alice = client(app, "alice")
    item = alice.predict(api_name="/next")
    alice.predict(item[0], *VOTE, api_name="/vote_left")
    alice.predict(alice.predict(api_name="/next")[0], "unsafe", "", api_name="/flag")
    for endpoint, args in (("/dashboard", ()), ("/export", ()), ("/review_pair", (1,)), ("/set_gold", (1, "a"))):
        with pytest.raises(AppError, match="reviewer or admin"):
            alice.predict(*args, api_name=endpoint)
    for name in ("rita", "ada"):
        reviewer = client(app, name)
        summary = reviewer.predict(api_name="/dashboard")[0]
        assert "1 votes" in summary and "Position bias" in summary
        exported = Path(reviewer.predict(True, api_name="/export"))  # with pairs that lack votes
        assert len(exported.read_text().splitlines()) == 1
        assert Path(reviewer.predict(False, api_name="/export")).read_text() == ""  # complete pairs: none yet
        review = reviewer.predict(item[0], api_name="/review_pair")
        assert "model version v0" in review and "| alice | vote |" in review
    assert "gold item" in client(app, "ada").predict(item[0], "a", api_name="/set_gold")


def api_session(app, name: str) -> httpx.Client:
    """A program's session: POST /login, then the JSON API with the cookie."""
    session = httpx.Client(base_url=app.test_url, timeout=30)
    login = session.post("/login", data={"username": name, "password": f"pw-{name}-0123"})
    assert login.status_code == 200 and login.json()["success"] is True
    return session


def test_json_api_named_fields_and_guarantees(app):
    app.clients.pop("bob", None)  # bob logs out everywhere below: no module-wide tab of his survives
    alice, bob = api_session(app, "alice"), api_session(app, "bob")
    item = alice.get("/api/v1/item").json()
    assert set(item) == {"pair_id", "prompt", "responses", "shown_order", "progress", "message"}
    assert item["prompt"] == [{"role": "user", "content": "question 0"}]
    with connect(app.store_url) as store:
        pair = get_pair(store, item["pair_id"])
    texts = {side: pair[f"response_{side}"]["text"] for side in "ab"}
    assert [r["position"] for r in item["responses"]] == ["left", "right"]
    assert [r["text"] for r in item["responses"]] == [texts[side] for side in item["shown_order"]]
    assert alice.get("/api/v1/item").json()["pair_id"] == item["pair_id"]  # a refresh: the same pair
    refused = alice.post("/api/v1/vote", json={"pair_id": item["pair_id"], "choice": "left", "strength": "much"})
    assert refused.status_code == 409 and refused.json() == {"error": "please give a rationale for a 'much better' vote"}
    too_long = alice.post("/api/v1/vote", json={"pair_id": item["pair_id"], "choice": "left", "rationale": "é" * 2049})
    assert too_long.json()["error"] == "the rationale is too long (4098 bytes); the limit is 4096 bytes"
    done = alice.post("/api/v1/vote", json={"pair_id": item["pair_id"], "choice": "right"}).json()
    [vote] = rows(app, annotator="alice")
    assert vote.id == done["event_id"] and vote.choice == item["shown_order"][1] and vote.left == item["shown_order"][0]
    assert done["next"]["pair_id"] not in (None, item["pair_id"])
    assert bob.post("/api/v1/vote", json={"pair_id": item["pair_id"], "choice": "left"}).status_code == 409
    assert httpx.get(f"{app.test_url}api/v1/item").status_code == 401
    # The token works as a bearer token too; logout ends every session of the user.
    token = httpx.post(f"{app.test_url}login", data={"username": "bob", "password": "pw-bob-0123"}).json()["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{app.test_url}api/v1/item", headers=bearer).json()["pair_id"] is not None
    assert bob.post("/api/v1/logout").json()["sessions_ended"] >= 2  # this one, the bearer one, earlier tabs
    time.sleep(2.1)  # the per-process session cache (2 s) runs out
    assert httpx.get(f"{app.test_url}api/v1/item", headers=bearer).status_code == 401


def test_the_gradio_queue_polls_every_10_ms_not_every_1_ms(app):
    """Gradio's default (a look for new events every 1 ms) cost each idle app process ~45 ms of CPU a second."""
    from labeling.server import PROGRESS_POLL_SECONDS, QUEUE_POLL_SECONDS

    assert (QUEUE_POLL_SECONDS, PROGRESS_POLL_SECONDS) == (0.01, 0.05)
    assert app._queue.sleep_when_free == QUEUE_POLL_SECONDS
    assert app._queue.progress_update_sleep_when_free == PROGRESS_POLL_SECONDS


def test_every_response_carries_the_content_security_policy(app):
    for response in (httpx.get(f"{app.test_url}login"), httpx.get(app.test_url),
                     api_session(app, "alice").get("/"), httpx.get(f"{app.test_url}config")):
        policy = response.headers["content-security-policy"]
        assert "img-src 'self' data: blob:" in policy and "default-src 'self'" in policy
    page = httpx.get(app.test_url)
    assert page.status_code == 303 and page.headers["location"] == "login"  # no session: the login form


def test_failed_logins_are_throttled_with_a_message(app):
    """Five wrong passwords lock the account: the right one is refused too, with the wait on the screen."""
    from align.store import LoginThrottle

    for _ in range(5):
        wrong = httpx.post(f"{app.test_url}login", data={"username": "ada", "password": "not her password"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "Wrong name or password."
    locked = httpx.post(f"{app.test_url}login", data={"username": "ada", "password": "pw-ada-0123"},
                        headers={"Accept": "text/html"})
    assert locked.status_code == 429 and "Too many failed logins; try again in 2 s." in locked.text
    with connect(app.store_url) as store, store.write() as session:
        assert session.get(LoginThrottle, "account:ada").failures == 5
        session.execute(delete(LoginThrottle))


def test_errors_reach_the_screen_as_messages(app):
    alice = client(app, "alice")
    item = alice.predict(api_name="/next")
    with pytest.raises(AppError, match="the rationale is too long \\(5000 bytes\\); the limit is 4096 bytes"):
        alice.predict(item[0], "slightly", [], [], "x" * 5000, api_name="/vote_left")
    with pytest.raises(AppError, match="the flag note is too long"):
        alice.predict(item[0], "broken", "y" * 4097, api_name="/flag")


def test_load_benchmark_loses_and_duplicates_nothing(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import labeling_load
    finally:
        sys.path.remove(str(ROOT / "bench"))
    result = labeling_load.run_load(n_annotators=4, duration=3.0, think=0.2, db=f"sqlite:///{tmp_path / 'l.db'}",
                                    in_process=True)
    assert result["acked"] > 0 and result["failed"] == 0
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["over_k"] == 0
    assert result["stored"] == result["acked"]


def test_load_benchmark_starts_annotators_in_their_steady_state():
    """Annotators reading 10-30 s (think 20) vote 3 times a minute in the steady state. Starting them all at once
    gives 2.54 in the first minute (a ramp); the benchmark's stationary start gives the steady 3."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import labeling_load
    finally:
        sys.path.remove(str(ROOT / "bench"))

    def votes_in_a_minute(first) -> float:
        rng, total = random.Random(0), 0
        for _ in range(4000):
            moment = first(rng)
            while moment < 60:
                total, moment = total + 1, moment + rng.uniform(10, 30)
        return total / 4000

    assert votes_in_a_minute(lambda rng: labeling_load.first_pause(rng, 20.0)) == pytest.approx(3.0, abs=0.05)
    assert votes_in_a_minute(lambda rng: rng.uniform(10, 30)) == pytest.approx(2.54, abs=0.05)


def test_side_by_side_tab_streams_two_models_and_takes_the_vote(tmp_path, tiny_model_dir):
    from align.generation import SamplingSettings
    from align.store import Response
    from labeling.app import build_app, close_app, launch_app
    from labeling.compare import TransformersResponder

    url = f"sqlite:///{tmp_path / 'store.db'}"
    with connect(url) as store:
        add_user(store, "alice", "pw-alice-0123", "annotator")
    responders = [TransformersResponder(str(tiny_model_dir), name=name) for name in ("tiny-a", "tiny-b")]
    demo = build_app(url, responders=responders, sampling=SamplingSettings(temperature=1.0, max_new_tokens=5))
    try:
        alice = Client(launch_app(demo, port=free_port(), block=False, quiet=True), auth=("alice", "pw-alice-0123"),
                       verbose=False)
        left, right, pair_id, status = alice.predict("Name a colour.", api_name="/compare")
        assert pair_id is not None and status.startswith("Both answers are in")
        assert "tiny-a" not in left + right + status  # model names stay hidden
        saved, cleared = alice.predict(pair_id, "slightly", "", api_name="/compare_vote_left")
        assert saved.startswith("Saved: A (left) better") and cleared is None
        with pytest.raises(AppError, match="not leased"):
            alice.predict(pair_id, "slightly", "", api_name="/compare_vote_left")
    finally:
        close_app(demo)
    with connect(url) as store, store.read() as session:
        [vote] = session.scalars(select(Vote).where(Vote.kind == "vote")).all()
        pair = session.get(Pair, vote.pair_id)
        answers = [session.get(Response, pair.response_a_id), session.get(Response, pair.response_b_id)]
    assert vote.choice == vote.left and vote.left == pair.rule_params["shown_left"]["alice"]
    assert pair.rule_params["models"] == ["tiny-a", "tiny-b"]
    assert all(r.completion_token_ids and len(r.token_logps) == len(r.completion_token_ids) for r in answers)
