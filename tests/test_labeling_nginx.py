"""Two app processes on one store behind nginx (Debian's package, the shipped config), started the documented way
(`align label --workers 2 --nginx`), with annotators voting at once through nginx (the page's protocol via
gradio_client, and the JSON API) and straight at each process: every pair gets exactly its k votes, nobody
answers a pair twice, and a login made on one process works on the other."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from align.store import Pair, Vote, add_user, connect, make_pairs
from align.store.votes import in_effect
from labeling.workers import free_port_range, stop_process_group
from tests.db import fill_store

ROOT = Path(__file__).resolve().parents[1]
K = 3


def nginx_or_skip() -> None:
    if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
        return
    if os.environ.get("ALIGN_REQUIRE_NGINX") == "1":
        pytest.fail("ALIGN_REQUIRE_NGINX=1 but nginx is not installed (apt-get install nginx)")
    pytest.skip("nginx is not installed")


def login(base: str, name: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=60)
    response = client.post("/login", data={"username": name, "password": f"pw-{name}-0123"})
    assert response.status_code == 200, response.text
    return client


def json_voter(client: httpx.Client, name: str, done: list, errors: list) -> None:
    try:
        item = client.get("/api/v1/item").json()
        while item["pair_id"] is not None:
            reply = client.post("/api/v1/vote", json={"pair_id": item["pair_id"], "choice": "left"})
            assert reply.status_code == 200, reply.text
            done.append((name, item["pair_id"]))
            item = reply.json()["next"]
    except Exception as error:  # reported by the test thread
        errors.append(f"{name}: {error!r}")


def page_voter(base: str, name: str, done: list, errors: list) -> None:
    from gradio_client import Client

    try:
        client = Client(base, auth=(name, f"pw-{name}-0123"), verbose=False)
        item = client.predict(api_name="/next")
        while item[0] is not None:
            pair_id = int(item[0])
            item = client.predict(pair_id, "slightly", [], [], "", api_name="/vote_right")
            done.append((name, pair_id))
    except Exception as error:
        errors.append(f"{name}: {error!r}")


def test_two_processes_behind_nginx_keep_the_lease_guarantees(store_url, tmp_path):
    nginx_or_skip()
    names = [f"ann{i}" for i in range(8)]
    with connect(store_url) as store:
        info = fill_store(store, n_prompts=10, samples=2)
        pairs = make_pairs(store, info["version_id"], votes_required=K)
        for name in names:
            add_user(store, name, f"pw-{name}-0123")
    base_port = free_port_range(2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "align", "label", "--db", store_url, "--workers", "2", "--nginx",
         "--port", str(base_port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        first_line = server.stdout.readline()
        assert "2 processes on ports" in first_line, server.stderr.read()[-3000:]
        proxy = f"http://127.0.0.1:{base_port}/"
        workers = [f"http://127.0.0.1:{base_port + 1}/", f"http://127.0.0.1:{base_port + 2}/"]
        # A login made on one process is good on the other: sessions live in the database.
        one = login(workers[0], "ann0")
        other = httpx.Client(base_url=workers[1], cookies=one.cookies, timeout=60)
        assert other.get("/api/v1/item").json()["pair_id"] in pairs
        assert one.get("/api/v1/item").json()["pair_id"] == other.get("/api/v1/item").json()["pair_id"]
        # Eight annotators at once: two on each process directly, four through nginx (two by the page's own
        # protocol, which needs a session to stay on one process, two by the JSON API).
        done: list[tuple[str, int]] = []
        errors: list[str] = []
        threads = [threading.Thread(target=json_voter, args=(c, n, done, errors)) for c, n in
                   ((one, "ann0"), (login(workers[0], "ann1"), "ann1"), (login(workers[1], "ann2"), "ann2"),
                    (login(workers[1], "ann3"), "ann3"), (login(proxy, "ann4"), "ann4"),
                    (login(proxy, "ann5"), "ann5"))]
        threads += [threading.Thread(target=page_voter, args=(proxy, n, done, errors)) for n in ("ann6", "ann7")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert errors == []
        assert httpx.get(f"{proxy}login").headers["server"] == "nginx"
    finally:
        stop_process_group(server)
    with connect(store_url) as store, store.read() as session:
        votes = session.execute(select(Vote.pair_id, Vote.annotator).where(Vote.kind == "vote", in_effect())).all()
        required = dict(session.execute(select(Pair.id, Pair.votes_required)).all())
    assert len(done) == len(votes) == K * len(pairs)  # every acknowledged vote stored, nothing more
    assert sorted(done) == sorted((annotator, pair_id) for pair_id, annotator in votes)
    assert len(set(votes)) == len(votes)  # nobody answered a pair twice
    assert Counter(pair_id for pair_id, _ in votes) == {pair_id: required[pair_id] for pair_id in pairs}
    assert server.returncode == 0
    for port in (base_port, base_port + 1, base_port + 2):  # stopping the command stops nginx and the workers
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
