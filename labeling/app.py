"""The Gradio labeling app: annotate pairs, read the guidelines, compare two models live, review (reviewers).

    demo = build_app("runs/store.db")
    launch_app(demo, host="127.0.0.1", port=7860)

All logic lives in `labeling.handlers.Labeling`; this module wires components to it, and `labeling.server` serves
it (database logins, security headers, the JSON API). Every handler reads the user from `gr.Request.username`
(set from the session cookie) and the handlers check roles themselves, so calling an endpoint directly is no way
around the UI. Events that only touch the database run without a concurrency limit (the store serialises
writers); live generation shares a small budget. An annotating screen's outputs travel as an `ItemView`.
(No `from __future__ import annotations` here: Gradio finds `gr.Request` parameters by their annotation.)
"""

import functools
import json
import logging
import secrets
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, field, fields
from typing import Any

import gradio as gr

from align.generation import SamplingSettings
from align.jobs import JobWorker
from align.store import connect
from align.store.rankings import ranking_k
from labeling.handlers import (
    FLAG_REASONS,
    REASON_TAGS,
    REVIEW_ROLES,
    SCREEN_CHOICES,
    STRENGTHS,
    Item,
    Labeling,
    LabelingConfig,
    LabelingError,
    Sessions,
    load_guidelines,
)
from labeling.candidates import Candidates, candidates_tab_body, wire_candidates
from labeling.ranking import rank_tab_body, wire_rank
from labeling.render import safe_markdown
from labeling.server import ServerSettings, create_server, serve

log = logging.getLogger(__name__)

render_stream = safe_markdown.__wrapped__

# Keyboard shortcuts: key -> elem_id of the button it clicks. Keys are ignored while a text field has focus.
SHORTCUTS = {"1": "vote-left", "2": "vote-right", "3": "vote-tie", "4": "vote-both-bad", "s": "skip-button",
             "f": "flag-button", "u": "undo-button"}
BUTTON_IDS = {"left": "vote-left", "right": "vote-right", "tie": "vote-tie", "both_bad": "vote-both-bad"}
BUTTON_LABELS = {"left": "A is better [1]", "right": "B is better [2]", "tie": "Tie [3]", "both_bad": "Both bad [4]"}
SAVED = {"left": "A (left) better", "right": "B (right) better", "tie": "tie", "both_bad": "both bad"}

SHORTCUT_SCRIPT = """
<script>
(() => {
  if (window.__alignShortcuts) return;
  window.__alignShortcuts = true;
  const KEYS = __KEYS__;
  const TEXT_TYPES = new Set(["text", "search", "email", "password", "number", "url", "tel", "date",
                              "datetime-local", "month", "time", "week"]);
  function typing(el) {
    if (!el) return false;
    if (el.isContentEditable) return true;
    const tag = el.tagName;
    if (tag === "TEXTAREA" || tag === "SELECT") return true;
    return tag === "INPUT" && TEXT_TYPES.has((el.getAttribute("type") || "text").toLowerCase());
  }
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat || event.isComposing) return;
    if (typing(document.activeElement) || typing(event.target)) return;
    const id = KEYS[(event.key || "").toLowerCase()];
    if (!id) return;
    let button = document.getElementById(id);
    if (button && button.tagName !== "BUTTON") button = button.querySelector("button") || button;
    if (!button || button.disabled || button.offsetParent === null) return;  // absent, busy, or another tab
    event.preventDefault();
    button.click();
  });
})();
</script>
""".replace("__KEYS__", json.dumps(SHORTCUTS))

# Drag ordering of the Rank tab: a static file the app serves (labeling/static), not inline code.
RANK_DRAG_SCRIPT = '<script src="align-static/rank_drag.js" defer></script>'

CSS = """
.response-pane { padding: 4px 8px; }
.prompt-pane { background: var(--background-fill-secondary); border-radius: 8px; padding: 8px 12px; }
/* Code keeps a light background in both themes: Pygments' inline colours are chosen for one. */
.response-pane pre, .prompt-pane pre, .response-pane code, .prompt-pane code {
  background: #f6f8fa !important; color: #1f2328 !important; }
.response-pane pre, .prompt-pane pre { padding: 8px; border-radius: 6px; overflow-x: auto; }
.rank-chips { display: flex; gap: 8px; padding: 4px 0; }
.rank-chip { cursor: grab; user-select: none; min-width: 2.2em; text-align: center; padding: 6px 10px;
  border: 1px solid var(--border-color-primary); border-radius: 6px; background: var(--background-fill-secondary);
  font-weight: 600; }
.rank-chip.dragging { opacity: 0.4; }
"""
# Inline $...$ and display $$...$$ maths (KaTeX, bundled with Gradio: nothing is fetched).
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]

AUTH_MESSAGE = "Log in with the name and password your admin created with: align users add."


def build_app(
    store_url: str,
    *,
    guidelines_version: str | None = None,
    lease_seconds: int = 600,
    rationale_required: Sequence[str] = ("strong", "both_bad"),
    responders: Sequence[Any] | None = None,
    sampling: SamplingSettings | None = None,
    release_grace: float = 15.0,
    max_text_bytes: int = 4096,
    job_worker: bool = False,
) -> gr.Blocks:
    """The app over the store at `store_url`. `responders`: two `labeling.compare.Responder`s enable the live
    side-by-side tab. `job_worker`: run the generation jobs reviewers queue (the Candidates tab) in a background
    thread of this process (`align label` does; any one process on the store may). Launch it with `launch_app`
    (login, keyboard shortcuts and styles are launch options)."""
    version, guidelines = load_guidelines(guidelines_version)
    store = connect(store_url)
    config = LabelingConfig(version, lease_seconds, frozenset(rationale_required), max_text_bytes=max_text_bytes)
    labeling = Labeling(store, config)
    k = ranking_k(store)  # 0: pairwise only (the default); 3..5: the Rank tab too (align label --ranking_k K)
    sessions = Sessions(labeling.release, grace=release_grace)
    worker = JobWorker(labeling.store).start() if job_worker else None
    candidates = Candidates(labeling, worker)
    if responders is not None and len(responders) != 2:
        raise ValueError("side-by-side mode needs exactly two responders")

    with gr.Blocks(title="align · labeling", analytics_enabled=False) as demo:
        with gr.Row():
            header = gr.Markdown()
            logout = gr.Button("Log out", size="sm", scale=0, elem_id="logout-button")
        guidelines_md = f"*Guidelines {version}* (stored with every vote)\n\n{guidelines}"
        with gr.Tabs():
            with gr.Tab("Annotate", id="annotate"):
                with gr.Row():
                    with gr.Column(scale=4):
                        item = annotate_tab()
                    with gr.Column(scale=1, min_width=240):
                        with gr.Accordion("Guidelines", open=True, elem_id="guidelines-beside"):
                            gr.Markdown(guidelines_md, max_height=900)
            with gr.Tab("Guidelines", id="guidelines"):
                gr.Markdown(guidelines_md)
            with gr.Tab("Rank", id="rank", visible=k > 0) as rank_tab:  # K-way ranking: a project setting
                rank = rank_tab_body(k) if k else {}
            with gr.Tab("Compare live", id="compare", visible=False) as compare_tab:
                compare = compare_tab_body()
            with gr.Tab("Dashboard", id="dashboard", visible=False) as dashboard_tab:
                board = dashboard_tab_body()
            with gr.Tab("Candidates", id="candidates", visible=False) as candidates_tab:
                new_pairs = candidates_tab_body()
        screens = Screens(item, compare, board, header, logout, dashboard_tab, compare_tab, candidates_tab)
        wire(demo, labeling, sessions, screens, responders,
             sampling or SamplingSettings(temperature=0.7, max_new_tokens=256))
        fast = {"concurrency_limit": None, "show_progress": "hidden"}
        if k:
            wire_rank(labeling, rank, rank_tab, k, guarded, fast)
        wire_candidates(candidates, new_pairs, candidates_tab, guarded, table, fast)

    demo.labeling, demo.sessions, demo.candidates = labeling, sessions, candidates  # for launch_app and tests
    return demo


def annotate_tab() -> dict[str, Any]:
    c: dict[str, Any] = {}
    c["progress"] = gr.Markdown(elem_id="progress")
    # The whole conversation, every turn: no height limit, so the last user turn is never cut off.
    c["prompt"] = gr.Markdown(elem_id="prompt", elem_classes="prompt-pane", latex_delimiters=LATEX)
    with gr.Row(equal_height=True):
        for side, title in (("left", "A"), ("right", "B")):
            with gr.Column():
                gr.Markdown(f"#### Response {title}")
                c[side] = gr.Markdown(elem_id=f"response-{side}", elem_classes="response-pane", max_height=520,
                                      latex_delimiters=LATEX)
    # Strength and rationale come before the choice: a click on a choice sends them with it.
    with gr.Row():
        c["strength"] = gr.Radio(list(STRENGTHS), value="slightly", label="How much better?", elem_id="strength")
        c["rationale"] = gr.Textbox(label="Rationale (required for 'much better' and 'both bad')", lines=2,
                                    elem_id="rationale", scale=3, rtl=False)
    with gr.Row():
        for choice in SCREEN_CHOICES:
            c[f"vote_{choice}"] = gr.Button(BUTTON_LABELS[choice], elem_id=BUTTON_IDS[choice],
                                            variant="primary" if choice in ("left", "right") else "secondary")
    with gr.Row():
        c["reasons_left"] = gr.CheckboxGroup(list(REASON_TAGS), label="About A (optional)", elem_id="reasons-left")
        c["reasons_right"] = gr.CheckboxGroup(list(REASON_TAGS), label="About B (optional)", elem_id="reasons-right")
    with gr.Row():
        c["skip"] = gr.Button("Skip [s]", elem_id="skip-button", size="sm")
        c["undo"] = gr.Button("Undo last [u]", elem_id="undo-button", size="sm")
        c["reload"] = gr.Button("Reload item", elem_id="reload-button", size="sm")
    with gr.Row():
        c["flag_reason"] = gr.Radio(list(FLAG_REASONS), label="Flag as", elem_id="flag-reason")
        c["flag_note"] = gr.Textbox(label="Flag note (optional)", elem_id="flag-note", scale=2)
        c["flag"] = gr.Button("Flag [f]", elem_id="flag-button", variant="stop", size="sm", scale=0)
    c["status"] = gr.Markdown(elem_id="status")
    c["pair_id"] = gr.Number(visible=False, precision=0)
    return c


def compare_tab_body() -> dict[str, Any]:
    c: dict[str, Any] = {}
    gr.Markdown("Two model versions answer your prompt; their names stay hidden. Vote when both are done.")
    c["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id="compare-prompt")
    c["generate"] = gr.Button("Generate both answers", variant="primary", elem_id="compare-generate")
    with gr.Row(equal_height=True):
        c["left"] = gr.Markdown(elem_id="compare-left", elem_classes="response-pane", max_height=520)
        c["right"] = gr.Markdown(elem_id="compare-right", elem_classes="response-pane", max_height=520)
    with gr.Row():
        for choice in SCREEN_CHOICES:
            c[f"vote_{choice}"] = gr.Button(BUTTON_LABELS[choice].split(" [")[0], elem_id=f"compare-{choice}")
    with gr.Row():
        c["strength"] = gr.Radio(list(STRENGTHS), value="slightly", label="How much better?")
        c["rationale"] = gr.Textbox(label="Rationale", lines=1, scale=3)
    c["status"] = gr.Markdown()
    c["pair_id"] = gr.Number(visible=False, precision=0)
    return c


def dashboard_tab_body() -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row():
        c["refresh"] = gr.Button("Refresh", size="sm", scale=0)
        c["page"] = gr.Number(label="Page (annotators, kappa and flags tables)", value=1, precision=0, minimum=1,
                              scale=0, min_width=200, elem_id="dashboard-page")
    c["summary"] = gr.Markdown()
    c["annotators"] = gr.Dataframe(label="Annotators: votes, position bias, speed, gold accuracy")
    c["cohen"] = gr.Dataframe(label="Cohen's kappa per annotator pair")
    c["leaderboard"] = gr.Dataframe(label="Model versions (Bradley–Terry, 95% bootstrap interval)")
    c["flags"] = gr.Dataframe(label="Flagged items to adjudicate")
    with gr.Row():
        c["review_id"] = gr.Number(label="Pair id", precision=0, scale=1, elem_id="review-pair-id")
        c["review"] = gr.Button("Show pair", size="sm", scale=0, elem_id="review-button")
        c["gold_choice"] = gr.Radio(["a", "b", "tie", "both_bad"], label="Gold answer", scale=2)
        c["set_gold"] = gr.Button("Make gold item", size="sm", scale=0)
    c["review_md"] = gr.Markdown(elem_id="review-md")
    with gr.Row():
        c["export"] = gr.Button("Export preferences (JSONL)", size="sm", scale=0)
        c["incomplete"] = gr.Checkbox(label="Also pairs without all their votes", value=False, scale=0)
        c["export_file"] = gr.File(label="Export", interactive=False)
    return c


def guarded(fn: Callable) -> Callable:
    """Turn refusals into a message for the user (gr.Error) instead of a crash."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LabelingError as error:
            raise gr.Error(str(error), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as error:  # a failure of ours: still a message on screen, never an empty one
            log.exception("labeling handler %s failed", fn.__name__)
            raise gr.Error(f"The server could not do that ({type(error).__name__}); please try again in a moment.",
                           print_exception=False) from None

    return wrapper


@dataclass
class ItemView:
    """What one annotating screen shows, field by field; Gradio sends it as `astuple(view)` in this order (the
    outputs of /load, /next, /vote_*, /skip, /flag, /undo after the header). `ItemView.of(outputs)` reads a
    gradio_client result back into named fields."""

    pair_id: int | None
    prompt: str
    left: str
    right: str
    progress: str
    status: str
    strength: str = "slightly"
    reasons_left: list[str] = field(default_factory=list)
    reasons_right: list[str] = field(default_factory=list)
    rationale: str = ""
    flag_reason: str | None = None
    flag_note: str = ""

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def of_item(cls, item: Item) -> "ItemView":
        return cls(item.pair_id, item.prompt or "*Nothing to label right now.*", item.left, item.right,
                   item.progress.markdown(), item.message)

    @classmethod
    def of(cls, outputs: Sequence[Any]) -> "ItemView":
        values = list(outputs)[-len(fields(cls)):]
        return cls(*values)


def item_values(item: Item) -> tuple:
    return astuple(ItemView.of_item(item))


@dataclass
class Screens:
    """The components `wire` connects: the annotate, compare and dashboard tabs' dicts, and the page chrome."""

    item: dict[str, Any]
    compare: dict[str, Any]
    board: dict[str, Any]
    header: Any
    logout: Any
    dashboard_tab: Any
    compare_tab: Any
    candidates_tab: Any


def wire(demo, labeling: Labeling, sessions: Sessions, ui: Screens, responders, sampling: SamplingSettings) -> None:
    c, header = ui.item, ui.header
    item_outputs = [c[k] for k in ItemView.keys()]
    fast = {"concurrency_limit": None, "show_progress": "hidden"}

    def on_load(request: gr.Request):
        user = request.username
        role = labeling.role(user)
        if request.session_hash:
            sessions.opened(user, request.session_hash)
        title = f"**align labeling** · signed in as **{safe_markdown(user)}** ({role})"
        return (title, gr.Tab(visible=role in REVIEW_ROLES), gr.Tab(visible=responders is not None),
                gr.Tab(visible=role in REVIEW_ROLES), *item_values(labeling.next_item(user)))

    demo.load(guarded(on_load), None, [header, ui.dashboard_tab, ui.compare_tab, ui.candidates_tab, *item_outputs],
              api_name="load", **fast)

    def on_next(request: gr.Request):
        return item_values(labeling.next_item(request.username))

    c["reload"].click(guarded(on_next), None, item_outputs, api_name="next", **fast)

    def make_vote(choice: str):
        def on_vote(pair_id, strength, reasons_left, reasons_right, rationale, request: gr.Request):
            _, item = labeling.vote_and_next(request.username, pair_id, choice, strength, reasons_left, reasons_right,
                                             rationale, message=f"Saved: {SAVED[choice]}.")
            return item_values(item)
        return on_vote

    vote_inputs = [c["pair_id"], c["strength"], c["reasons_left"], c["reasons_right"], c["rationale"]]
    for choice in SCREEN_CHOICES:
        c[f"vote_{choice}"].click(guarded(make_vote(choice)), vote_inputs, item_outputs, api_name=f"vote_{choice}",
                                  **fast)

    def on_skip(pair_id, request: gr.Request):
        return item_values(labeling.skip_and_next(request.username, pair_id, "Skipped.")[1])

    def on_flag(pair_id, reason, note, request: gr.Request):
        return item_values(labeling.flag_and_next(request.username, pair_id, reason, note,
                                                  "Flagged for review. Thank you.")[1])

    def on_undo(pair_id, request: gr.Request):
        labeling.undo(request.username, pair_id)
        return item_values(labeling.next_item(request.username, "Undone: here is that pair again."))

    c["skip"].click(guarded(on_skip), [c["pair_id"]], item_outputs, api_name="skip", **fast)
    c["flag"].click(guarded(on_flag), [c["pair_id"], c["flag_reason"], c["flag_note"]], item_outputs,
                    api_name="flag", **fast)
    c["undo"].click(guarded(on_undo), [c["pair_id"]], item_outputs, api_name="undo", **fast)

    def on_logout(request: gr.Request):
        if request.username:
            labeling.release(request.username)

    ui.logout.click(on_logout, None, None, api_visibility="private", **fast).then(
        None, None, None, js="() => { window.location.href = window.location.pathname.replace(/\\/$/, '') + '/logout'; }"
    )

    def on_unload(request: gr.Request):
        if request.username and request.session_hash:
            sessions.closed(request.username, request.session_hash)

    demo.unload(on_unload)
    wire_dashboard(labeling, ui.board, ui.dashboard_tab, fast)
    wire_compare(labeling, ui.compare, responders, sampling, fast)


def wire_dashboard(labeling: Labeling, board, dashboard_tab, fast) -> None:
    from labeling.dashboard import build_dashboard, summary_markdown

    def on_dashboard(page, request: gr.Request):
        labeling.require(request.username, REVIEW_ROLES)
        try:
            index = max(int(page or 1), 1) - 1
        except (TypeError, ValueError):
            index = 0
        data = build_dashboard(labeling.store, page=index)
        paging = (f"\n\nTables: page {data['page'] + 1} of {data['pages']} · {data['flags_total']} flags in all "
                  "(notes cut short; **Show pair** gives the whole note)")
        return (summary_markdown(data) + paging, table(data["annotator_rows"]), table(data["cohen_rows"]),
                table(data["leaderboard"]), table(data["flags"]))

    outputs = [board["summary"], board["annotators"], board["cohen"], board["leaderboard"], board["flags"]]
    board["refresh"].click(guarded(on_dashboard), [board["page"]], outputs, api_name="dashboard", **fast)
    board["page"].submit(guarded(on_dashboard), [board["page"]], outputs, api_visibility="private", **fast)
    dashboard_tab.select(guarded(on_dashboard), [board["page"]], outputs, api_visibility="private", **fast)

    def on_export(incomplete, request: gr.Request):
        return str(labeling.export(request.username, tempfile.mkdtemp(prefix="align-export-"), bool(incomplete)))

    def on_review(pair_id, request: gr.Request):
        return labeling.review_pair(request.username, pair_id)

    def on_gold(pair_id, choice, request: gr.Request):
        message = labeling.set_gold(request.username, pair_id, choice)
        return f"{message}\n\n{labeling.review_pair(request.username, pair_id)}"

    board["export"].click(guarded(on_export), [board["incomplete"]], board["export_file"], api_name="export", **fast)
    board["review"].click(guarded(on_review), [board["review_id"]], board["review_md"], api_name="review_pair",
                          **fast)
    board["set_gold"].click(guarded(on_gold), [board["review_id"], board["gold_choice"]], board["review_md"],
                            api_name="set_gold", **fast)


def table(rows: list[dict[str, Any]]):
    import pandas as pd

    frame = pd.DataFrame(rows)
    return frame.round(3) if not frame.empty else pd.DataFrame({"": ["none yet"]})


def wire_compare(labeling: Labeling, cmp, responders, sampling: SamplingSettings, fast) -> None:
    from dataclasses import replace

    from labeling.compare import compare_stream

    def on_generate(prompt, request: gr.Request):
        if responders is None:
            raise gr.Error("side-by-side mode is off (start the app with --compare MODEL_A MODEL_B)")
        settings = replace(sampling, seed=secrets.randbelow(2**31))
        try:
            for frame in compare_stream(labeling, request.username, prompt, tuple(responders), settings):
                status = "Both answers are in: vote below." if frame.done else "Generating…"
                # Uncached: a stream renders a growing text many times, each version once.
                yield render_stream(frame.left), render_stream(frame.right), frame.pair_id, status
        except LabelingError as error:
            raise gr.Error(str(error), print_exception=False) from None

    cmp["generate"].click(on_generate, [cmp["prompt"]], [cmp["left"], cmp["right"], cmp["pair_id"], cmp["status"]],
                          api_name="compare", concurrency_limit=2, concurrency_id="llm")

    def make_vote(choice: str):
        def on_vote(pair_id, strength, rationale, request: gr.Request):
            labeling.vote(request.username, pair_id, choice, strength, [], [], rationale)
            return f"Saved: {SAVED[choice]}. Type another prompt to go on.", None
        return on_vote

    for choice in SCREEN_CHOICES:
        cmp[f"vote_{choice}"].click(guarded(make_vote(choice)), [cmp["pair_id"], cmp["strength"], cmp["rationale"]],
                                    [cmp["status"], cmp["pair_id"]], api_name=f"compare_vote_{choice}", **fast)


def launch_app(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    *,
    block: bool = True,
    quiet: bool = False,
    max_threads: int = 64,
    settings: ServerSettings | None = None,
) -> str:
    """Serve the app (database logins, security headers, JSON API; see labeling.server); returns its URL. With
    block=False the server runs in a background thread until `close_app`."""
    app = server_app(demo, settings)
    if block:
        serve(app, host, port, block=True, max_threads=max_threads)
        return f"http://{host}:{port}/"
    demo.serving = serve(app, host, port, block=False, max_threads=max_threads)
    return demo.serving.url


def server_app(demo: gr.Blocks, settings: ServerSettings | None = None):
    """The FastAPI app that serves `demo` with keyboard shortcuts and styles."""
    return create_server(demo, settings, head=SHORTCUT_SCRIPT + RANK_DRAG_SCRIPT, css=CSS, auth_message=AUTH_MESSAGE)


def close_app(demo: gr.Blocks) -> None:
    serving = getattr(demo, "serving", None)
    if serving is not None:
        serving.stop()
    if demo.candidates.worker is not None:
        demo.candidates.worker.stop()
    demo.close()
    demo.labeling.store.close()
