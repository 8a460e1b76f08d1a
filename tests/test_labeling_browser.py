"""One real labeling session in headless Debian chromium (Playwright): log in, vote once by click and once by
keyboard shortcut, check the stored rows (choice in response order + the side shown), prove that hostile
prompts and responses execute nothing, and save a screenshot (also to docs/labeling_app.png for the README).

Skipped when Playwright or chromium is missing, unless ALIGN_REQUIRE_BROWSER=1 (CI), which makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
from sqlalchemy import select

from align.store import (
    Vote,
    add_prompts,
    add_responses,
    add_user,
    connect,
    get_pair,
    make_pairs,
    register_model_version,
)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000  # generous: CI machines have 2 cores

PALINDROME = "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces."
GOOD = (
    "Normalise the text, then compare it with its reverse:\n\n```python\ndef is_palindrome(text: str) -> bool:\n"
    "    cleaned = \"\".join(text.lower().split())\n    return cleaned == cleaned[::-1]\n```\n\n"
    "`is_palindrome(\"Never odd or even\")` returns **True**."
)
NAIVE = (
    "Compare the string with its reverse:\n\n```python\ndef is_palindrome(s):\n    return s == s[::-1]\n```\n\n"
    "Note: this version is *case-sensitive* and counts spaces, so `\"Never odd or even\"` gives False."
)
HOSTILE_PROMPT = "Summarise <script>window.__xss = 1; alert('prompt')</script> [this](javascript:window.__xss=1)"
HOSTILE_A = "Sure <img src=x onerror=\"window.__xss=1;alert('a')\"> and [click me](javascript:alert('link'))"
HOSTILE_B = "Here: <svg onload=\"window.__xss=1\"></svg> `<b onmouseover=alert(1)>` <iframe src=\"javascript:alert(2)\">"


def find_chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def browser_or_skip():
    required = os.environ.get("ALIGN_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (pip install 'playwright>=1.45,<2')"
        pytest.fail(reason) if required else pytest.skip(reason)
    chromium = find_chromium()
    if chromium is None:
        reason = "chromium is not installed (apt-get install chromium)"
        pytest.fail(reason) if required else pytest.skip(reason)
    return sync_playwright, chromium


def make_store(url: str) -> None:
    """Pair 1: an ordinary item; pair 2: hostile markup (added one after the other, so the ids are in order)."""
    with connect(url) as store:
        version = register_model_version(store, {"name": "v0", "base_model": "tiny", "adapter_hash": "v0"})
        for prompt, texts in ((PALINDROME, (GOOD, NAIVE)), (HOSTILE_PROMPT, (HOSTILE_A, HOSTILE_B))):
            [prompt_id] = add_prompts(store, [{"prompt": prompt}])
            add_responses(store, [
                {"prompt_id": prompt_id, "model_version_id": version, "seed": 0, "sample_index": k,
                 "max_new_tokens": 64, "text": text}
                for k, text in enumerate(texts)
            ])
            make_pairs(store, version, rule="all_pairs", votes_required=1, prompt_ids=[prompt_id])
        add_user(store, "alice", "pw-alice-0123", "annotator")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shown_left(store_url: str, pair_id: int, left_text: str) -> str:
    """Which response the page showed on the left, by matching the rendered text to the stored ones."""
    with connect(store_url) as store:
        pair = get_pair(store, pair_id)
    first_words = " ".join(pair["response_a"]["text"].split()[:2])
    return "a" if left_text.strip().startswith(first_words) else "b"


@pytest.mark.browser
def test_labeling_session_in_chromium(tmp_path):
    sync_playwright, chromium = browser_or_skip()
    from labeling.app import build_app, close_app, launch_app

    url = f"sqlite:///{tmp_path / 'store.db'}"
    make_store(url)
    demo = build_app(url, release_grace=0)
    app_url = launch_app(demo, port=free_port(), block=False, quiet=True)
    dialogs: list[str] = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.goto(app_url)
            page.locator("input[type=password]").wait_for()
            page.locator("input").first.fill("alice")
            page.locator("input[type=password]").fill("pw-alice-0123")
            page.get_by_role("button", name="Log in").click()

            # Pair 1: a normal item. Vote "B is better" by clicking.
            wait_for_text(page, "#response-left", "is_palindrome")
            assert not page.get_by_role("tab", name="Dashboard").is_visible()  # annotators get no dashboard
            left_1 = shown_left(url, 1, page.inner_text("#response-left"))
            screenshot = tmp_path / "labeling_app.png"
            page.screenshot(path=str(screenshot), full_page=True)
            if os.environ.get("ALIGN_UPDATE_DOCS") == "1":  # refresh the README's screenshot on request only
                shutil.copyfile(screenshot, ROOT / "docs" / "labeling_app.png")
            page.locator("#vote-right").click()
            wait_for_text(page, "#status", "Saved: B (right) better.")

            # Pair 2: hostile content renders as text and runs nothing.
            wait_for_text(page, "#prompt", "Summarise")
            page.wait_for_timeout(1000)  # time for an onerror/onload handler to fire, were there one
            assert "<script>" in page.inner_text("#prompt")
            assert "onerror" in page.inner_text("#response-left") + page.inner_text("#response-right")
            assert page.locator("#response-left img, #response-right img, #response-right svg[onload]").count() == 0
            assert page.locator("a[href^='javascript']").count() == 0
            assert page.evaluate("window.__xss") is None and dialogs == []
            left_2 = shown_left(url, 2, page.inner_text("#response-left"))

            # Digits typed into the rationale are text, not votes; outside a text box "1" votes A (left).
            page.locator("#rationale textarea").fill("")
            page.locator("#rationale textarea").press_sequentially("3 1 4")
            page.wait_for_timeout(500)
            assert page.inner_text("#status").strip() == "Saved: B (right) better."
            page.locator("#prompt").click()
            page.keyboard.press("1")
            wait_for_text(page, "#status", "Saved: A (left) better.")
            assert page.evaluate("window.__xss") is None and dialogs == []
            browser.close()
    finally:
        close_app(demo)

    with connect(url) as store, store.read() as session:
        votes = list(session.scalars(select(Vote).where(Vote.kind == "vote").order_by(Vote.id)))
    assert [(v.pair_id, v.left) for v in votes] == [(1, left_1), (2, left_2)]
    assert votes[0].choice == ("b" if left_1 == "a" else "a")  # B (right) better, in response order
    assert votes[1].choice == left_2 and votes[1].rationale == "3 1 4"  # A (left) better, typed rationale kept
    assert screenshot.stat().st_size > 10_000


def wait_for_text(page, selector: str, text: str) -> None:
    page.wait_for_function(
        "([sel, text]) => { const el = document.querySelector(sel); return el && el.innerText.includes(text); }",
        arg=[selector, text],
    )


SECOND_PROMPT = "Name one planet in the solar system and say why it is interesting."


@pytest.mark.browser
def test_two_annotators_at_once_dashboard_and_export(tmp_path):
    """Two annotators logged in at the same time each vote once by click and once by keyboard; the store holds all
    four votes with the side each was shown, the dashboard computes their agreement, and the export carries them."""
    sync_playwright, chromium = browser_or_skip()
    from labeling.app import build_app, close_app, launch_app
    from labeling.dashboard import build_dashboard

    from align.store import export_preferences

    url = f"sqlite:///{tmp_path / 'store.db'}"
    with connect(url) as store:
        version = register_model_version(store, {"name": "v0", "base_model": "tiny", "adapter_hash": "v0"})
        for prompt, texts in ((PALINDROME, (GOOD, NAIVE)), (SECOND_PROMPT, ("Saturn: its rings.", "Mars."))):
            [prompt_id] = add_prompts(store, [{"prompt": prompt}])
            add_responses(store, [{"prompt_id": prompt_id, "model_version_id": version, "seed": 0, "sample_index": k,
                                   "max_new_tokens": 64, "text": text} for k, text in enumerate(texts)])
            make_pairs(store, version, rule="all_pairs", votes_required=2, prompt_ids=[prompt_id])
        add_user(store, "alice", "pw-alice-0123", "annotator")
        add_user(store, "bob", "pw-bob-0123", "annotator")
    demo = build_app(url, release_grace=0)
    app_url = launch_app(demo, port=free_port(), block=False, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            pages = {name: login(browser, app_url, name) for name in ("alice", "bob")}  # both sessions open at once
            vote(pages["alice"], "click")
            vote(pages["bob"], "key")
            vote(pages["alice"], "key")
            vote(pages["bob"], "click")
            browser.close()
    finally:
        close_app(demo)

    with connect(url) as store:
        with store.read() as session:
            votes = list(session.scalars(select(Vote).where(Vote.kind == "vote").order_by(Vote.id)))
        board = build_dashboard(store)
        rows = export_preferences(store)
    assert sorted((v.annotator, v.pair_id) for v in votes) == [("alice", 1), ("alice", 2), ("bob", 1), ("bob", 2)]
    assert all(v.left in ("a", "b") for v in votes)
    # A click on "B (right)" stores the response shown on the right; key 1 stores the one shown on the left.
    right = {"a": "b", "b": "a"}
    for v, how in zip(votes, ("click", "key", "key", "click")):
        assert v.choice == (right[v.left] if how == "click" else v.left), (v.annotator, how)
    assert board["agreement"]["items"] == 2 and board["annotators"] == 2
    assert [(r["annotator 1"], r["annotator 2"], r["shared pairs"]) for r in board["cohen_rows"]] == [("alice", "bob", 2)]
    assert sorted(r["n_votes"] for r in rows) == [2, 2]


def login(browser, app_url: str, name: str):
    page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(app_url)
    page.locator("input[type=password]").wait_for()
    page.locator("input").first.fill(name)
    page.locator("input[type=password]").fill(f"pw-{name}-0123")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_function("() => { const el = document.querySelector('#prompt'); return el && el.innerText.trim().length > 0; }")
    return page


def vote(page, how: str) -> None:
    """Vote on the pair on screen: "click" B (right), or key 1 (A, left) outside any text box."""
    if how == "click":
        page.locator("#vote-right").click()
        wait_for_text(page, "#status", "Saved: B (right) better.")
    else:
        page.locator("#prompt").click()
        page.keyboard.press("1")
        wait_for_text(page, "#status", "Saved: A (left) better.")


class Canary:
    """A local HTTP server that records every request: the page must never make one to it."""

    def __init__(self):
        import http.server
        import threading

        self.requests: list[str] = []
        canary = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                canary.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.browser
def test_images_in_model_output_and_rationales_are_never_fetched(tmp_path):
    """Markdown images (inline, reference, HTML) in a prompt, in responses and in an annotator's rationale reach
    neither the annotator's nor the reviewer's browser as requests; a script that tries anyway is stopped by the
    Content-Security-Policy. The same screen shows right-to-left text right to left and renders inline maths."""
    sync_playwright, chromium = browser_or_skip()
    from labeling.app import build_app, close_app, launch_app

    canary = Canary()
    leak = f"{canary.url}/leak"
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with connect(url) as store:
        version = register_model_version(store, {"name": "v0", "base_model": "tiny", "adapter_hash": "v0"})
        [prompt_id] = add_prompts(store, [{"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"First turn ![p]({leak}/prompt.png)"},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "LAST TURN: what is $x^2$ for x = 3?"},
        ]}])
        add_responses(store, [
            {"prompt_id": prompt_id, "model_version_id": version, "seed": 0, "sample_index": k, "max_new_tokens": 64,
             "text": text}
            for k, text in enumerate((
                f"مرحبا بالعالم، هذه إجابة باللغة العربية ![a]({leak}/a.png) and $x^2 = 9$",
                f"Answer ![b][r] <img src=\"{leak}/html.png\">\n\n[r]: {leak}/ref.png",
            ))
        ])
        [pair_id] = make_pairs(store, version, rule="all_pairs", votes_required=1, prompt_ids=[prompt_id])
        add_user(store, "alice", "pw-alice-0123", "annotator")
        add_user(store, "rita", "pw-rita-0123", "reviewer")
    demo = build_app(url, release_grace=0)
    app_url = launch_app(demo, port=free_port(), block=False, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = login(browser, app_url, "alice")
            wait_for_text(page, "#response-left", "image")
            assert "LAST TURN" in page.inner_text("#prompt")  # the whole conversation, the last turn too
            assert f"{leak}/prompt.png" in page.inner_text("#prompt")  # shown as text
            arabic = "#response-left" if "مرحبا" in page.inner_text("#response-left") else "#response-right"
            direction = page.eval_on_selector(f"{arabic} [dir=auto] p", "el => getComputedStyle(el).direction")
            assert direction == "rtl"
            assert page.locator("#prompt .katex").count() >= 1 and page.locator(f"{arabic} .katex").count() >= 1
            # Code and maths aside, nothing on the page loads from elsewhere, even when a script asks for it.
            page.evaluate(f"() => {{ const img = new Image(); img.src = '{leak}/script.png';"
                          "document.body.appendChild(img); }")
            page.locator("#rationale textarea").fill(f"see ![r]({leak}/rationale.png) <img src=\"{leak}/r2.png\">")
            page.locator("#vote-left").click()
            wait_for_text(page, "#status", "Saved")
            reviewer = login(browser, app_url, "rita")
            reviewer.get_by_role("tab", name="Dashboard").click()
            reviewer.locator("#review-pair-id input").fill(str(pair_id))
            reviewer.locator("#review-button").click()
            wait_for_text(reviewer, "#review-md", f"{leak}/rationale.png")  # the rationale, its image as text
            shown = reviewer.inner_text("#review-md")
            assert "see [image: r]" in shown and f'<img src="{leak}/r2.png">' in shown and "LAST TURN" in shown
            browser.close()
    finally:
        close_app(demo)
        canary.close()
    assert canary.requests == []


@pytest.mark.browser
def test_k_way_ranking_in_chromium(tmp_path):
    """A project with K-way ranking on (K = 4): two annotators rank the same four answers in the Rank tab, one
    with a tie, by typing the order; the store holds two ranking events with the order each was shown, the export
    expands them into 12 pairwise rows weighted 2/K, and Kendall's W is what their ranks give by hand."""
    sync_playwright, chromium = browser_or_skip()
    from labeling.app import build_app, close_app, launch_app

    from align.store.rankings import export_rankings, ranking_agreement, rankings, set_ranking_k

    url = f"sqlite:///{tmp_path / 'store.db'}"
    answers = ["Mercury is closest to the Sun.", "Venus is the hottest planet.", "Mars has the tallest volcano.",
               "Hostile <img src=x onerror=\"window.__xss=1\"> answer."]
    with connect(url) as store:
        version = register_model_version(store, {"name": "v0", "base_model": "tiny", "adapter_hash": "v0"})
        [prompt_id] = add_prompts(store, [{"prompt": SECOND_PROMPT}])
        ids = add_responses(store, [{"prompt_id": prompt_id, "model_version_id": version, "seed": 0, "sample_index": k,
                                     "max_new_tokens": 64, "text": text} for k, text in enumerate(answers)])
        add_user(store, "alice", "pw-alice-0123", "annotator")
        add_user(store, "bob", "pw-bob-0123", "annotator")
        set_ranking_k(store, 4)
    demo = build_app(url, release_grace=0)
    app_url = launch_app(demo, port=free_port(), block=False, quiet=True)
    # Each annotator puts Mars first, Venus = Mercury next (alice) or Venus then Mercury (bob), the hostile one last.
    wanted = {"alice": [[ids[2]], [ids[1], ids[0]], [ids[3]]], "bob": [[ids[2]], [ids[1]], [ids[0]], [ids[3]]]}
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            for name in ("alice", "bob"):
                page = login(browser, app_url, name)
                page.get_by_role("tab", name="Rank").click()
                page.wait_for_function(  # every pane shows an answer (not Gradio's "processing" overlay)
                    "(words) => ['A', 'B', 'C', 'D'].every(x => { const el = document.querySelector('#rank-' + x); "
                    "return el && words.some(w => el.innerText.includes(w)) && !el.innerText.includes('processing'); })",
                    arg=[a.split()[0] for a in answers])
                shown = {letter: page.inner_text(f"#rank-{letter}") for letter in "ABCD"}
                letter_of = {rid: next(x for x, t in shown.items() if answers[ids.index(rid)].split()[0] in t)
                             for rid in ids}
                order = " ".join("=".join(letter_of[rid] for rid in group) for group in wanted[name])
                page.locator("#rank-order textarea, #rank-order input").first.fill(order)
                page.locator("#rank-submit").click()
                wait_for_text(page, "#rank-status", f"Saved ranking {order}.")
                wait_for_text(page, "#rank-status", "All ranked.")
                assert page.evaluate("window.__xss") is None
            browser.close()
    finally:
        close_app(demo)

    with connect(url) as store:
        events = rankings(store)
        rows = export_rankings(store)
        agreement = ranking_agreement(store)
    assert [e.annotator for e in events] == ["alice", "bob"]
    for event in events:  # the ranks, read back through the order each annotator was shown
        by_id = dict(zip(event.response_ids, event.ranks))
        groups = wanted[event.annotator]
        assert [by_id[g[0]] for g in groups] == list(range(1, len(groups) + 1))
        assert all(by_id[r] == by_id[g[0]] for g in groups for r in g)
    assert len(rows) == 12 and {r["weight"] for r in rows} == {0.5}
    assert sum(r["label"] == "tie" for r in rows) == 1  # alice's Venus = Mercury
    # aligned ranks (Mercury, Venus, Mars, hostile): alice mid-ranks (2.5, 2.5, 1, 4), bob (3, 2, 1, 4)
    # rank sums 5.5, 4.5, 2, 8 around 5: S = 0.25 + 0.25 + 9 + 9 = 18.5; T = 2³ − 2 = 6 for alice
    assert agreement["sets"][0]["w"] == pytest.approx(12 * 18.5 / (4 * 60 - 2 * 6))


@pytest.mark.browser
def test_k_way_ranking_by_drag_in_chromium(tmp_path):
    """K = 3: the annotator drags the chips into order (the app's static script, allowed by its CSP, types the order
    it gives), saves, and the stored ranking is the dragged order; a new item starts from the order shown."""
    sync_playwright, chromium = browser_or_skip()
    from labeling.app import build_app, close_app, launch_app

    from align.store.rankings import rankings, set_ranking_k

    url = f"sqlite:///{tmp_path / 'store.db'}"
    answers = ["Mercury is closest to the Sun.", "Venus is the hottest planet.", "Mars has the tallest volcano."]
    with connect(url) as store:
        version = register_model_version(store, {"name": "v0", "base_model": "tiny", "adapter_hash": "v0"})
        prompt_ids = add_prompts(store, [{"prompt": SECOND_PROMPT}, {"prompt": PALINDROME}])
        ids = add_responses(store, [{"prompt_id": prompt_ids[0], "model_version_id": version, "seed": 0,
                                     "sample_index": k, "max_new_tokens": 64, "text": text}
                                    for k, text in enumerate(answers)])
        add_responses(store, [{"prompt_id": prompt_ids[1], "model_version_id": version, "seed": 0, "sample_index": k,
                               "max_new_tokens": 64, "text": f"answer {k}"} for k in range(3)])
        add_user(store, "alice", "pw-alice-0123", "annotator")
        set_ranking_k(store, 3)
    demo = build_app(url, release_grace=0)
    app_url = launch_app(demo, port=free_port(), block=False, quiet=True)
    errors: list[str] = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = login(browser, app_url, "alice")
            page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
            page.get_by_role("tab", name="Rank").click()
            page.wait_for_function(
                "(words) => ['A', 'B', 'C'].every(x => { const el = document.querySelector('#rank-' + x); "
                "return el && words.some(w => el.innerText.includes(w)); })", arg=[a.split()[0] for a in answers])
            chips = "() => Array.from(document.querySelectorAll('#rank-drag .rank-chip')).map(c => c.innerText)"
            page.wait_for_function(f"() => ({chips})().join('') === 'ABC'")
            shown = {letter: page.inner_text(f"#rank-{letter}") for letter in "ABC"}
            letter_of = {word: next(x for x, t in shown.items() if word in t) for word in ("Mars", "Venus", "Mercury")}
            # Wanted: Mars, Venus, Mercury. Mercury onto the first chip's left half (before it), then each in turn
            # to the empty end of the row, whatever the shuffled order was.
            page.drag_and_drop(f"#rank-chip-{letter_of['Mercury']}", "#rank-drag .rank-chip >> nth=0",
                               target_position={"x": 2, "y": 5})
            assert page.evaluate(chips)[0] == letter_of["Mercury"]
            row = page.locator("#rank-drag .rank-chips").bounding_box()
            for word in ("Mars", "Venus", "Mercury"):
                page.drag_and_drop(f"#rank-chip-{letter_of[word]}", "#rank-drag .rank-chips",
                                   target_position={"x": row["width"] - 5, "y": row["height"] / 2})
            order = " ".join(letter_of[w] for w in ("Mars", "Venus", "Mercury"))
            assert page.evaluate(chips) == order.split()
            box = page.locator("#rank-order textarea, #rank-order input").first
            assert box.input_value() == order
            page.locator("#rank-submit").click()
            wait_for_text(page, "#rank-status", f"Saved ranking {order}.")
            page.wait_for_function("() => document.querySelector('#rank-prompt').innerText.includes('palindrome')")
            page.wait_for_function(f"() => ({chips})().join('') === 'ABC'")  # the next item starts afresh
            assert box.input_value() == ""
            browser.close()
    finally:
        close_app(demo)
    assert errors == []
    with connect(url) as store:
        [event] = rankings(store)
    by_id = dict(zip(event.response_ids, event.ranks))
    assert [by_id[ids[2]], by_id[ids[1]], by_id[ids[0]]] == [1, 2, 3]  # Mars, Venus, Mercury


@pytest.mark.browser
def test_reviewer_queues_live_candidates_in_chromium(tmp_path, tiny_model_dir):
    """The Candidates tab: a bad model spec is a one-line message on the reviewer's screen; a good request queues a
    job that the app's worker runs, and the jobs table (refreshing itself) shows it done. Annotators never see the
    tab."""
    sync_playwright, chromium = browser_or_skip()
    from labeling.app import build_app, close_app, launch_app

    url = f"sqlite:///{tmp_path / 'store.db'}"
    make_store(url)
    with connect(url) as store:
        add_user(store, "rita", "pw-rita-0123", "reviewer")
    demo = build_app(url, release_grace=0, job_worker=True)
    app_url = launch_app(demo, port=free_port(), block=False, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            alice = login(browser, app_url, "alice")
            assert alice.get_by_role("tab", name="Candidates").count() == 0
            page = login(browser, app_url, "rita")
            page.get_by_role("tab", name="Candidates").click()
            models = page.locator("#candidates-models input").first
            models.fill("no-such-model")
            models.press("Enter")
            page.locator("#candidates-submit").click()
            page.get_by_text("model 'no-such-model': unknown model").first.wait_for()
            page.locator("#candidates-models button[aria-label*='Remove'], #candidates-models .token-remove").first.click()
            models.fill(str(tiny_model_dir))
            models.press("Enter")
            page.locator("#candidates-temperature input").fill("0.8")
            page.locator("#candidates-submit").click()
            wait_for_text(page, "#candidates-status", "Queued job 1")
            wait_for_text(page, "#candidates-jobs", "done")  # the table refreshes itself (every 5 s) while open
            page.locator("#candidates-refresh").click()
            jobs = page.inner_text("#candidates-jobs")
            assert "done" in jobs and "T=0.8" in jobs and "4/4" in jobs  # 2 prompts x 2 samples
            browser.close()
    finally:
        close_app(demo)
    with connect(url) as store, store.read() as session:
        from align.store import Response

        sampled = session.scalars(select(Response).where(Response.temperature == 0.8)).all()
    assert len(sampled) == 4 and all(r.token_logps and r.completion_token_ids for r in sampled)
