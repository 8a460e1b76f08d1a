"""The Rank tab: K-way ranking (issue 21 item 2), shown when the project turned it on (`align label --ranking_k K`;
pairwise stays the default and the Annotate tab is unchanged).

The annotator sees one prompt and K answers labelled A, B, C, ... (their order shuffled per annotator and prompt)
and types the order, best first, with `=` for a tie: `B A=C D`, or drags the chips A, B, C, ... into order (which
types it; `=` for ties is then typed). Enter or the button saves one ranking event with
the order shown (align.store.rankings.add_ranking); export expands it into pairwise rows weighted 2/K and the
dashboard-side agreement is Kendall's W (align.ranking). Everything shown is escaped like the Annotate tab's.
(No `from __future__ import annotations`: Gradio finds `gr.Request` parameters by their annotation.)
"""

from datetime import datetime, timezone
from typing import Any

import gradio as gr

from align.store.rankings import add_ranking, next_ranking, parse_order
from labeling.handlers import ANNOTATE_ROLES, Labeling, LabelingError
from labeling.render import bidi, prompt_markdown, safe_markdown

LETTERS = "ABCDE"


def rank_tab_body(k: int) -> dict[str, Any]:
    r: dict[str, Any] = {}
    gr.Markdown(f"Order these {k} answers, best first: drag the letters below, or type them, `=` between two that "
                "are equally good (e.g. `B A=C`), then press Enter or **Save ranking**.")
    r["prompt"] = gr.Markdown(elem_id="rank-prompt", elem_classes="prompt-pane")
    with gr.Row(equal_height=True):
        for i in range(k):
            with gr.Column(min_width=160):
                gr.Markdown(f"#### {LETTERS[i]}")
                r[f"text_{i}"] = gr.Markdown(elem_id=f"rank-{LETTERS[i]}", elem_classes="response-pane",
                                             max_height=420)
    # Chips A, B, C, ... to drag into order (labeling/static/rank_drag.js fills them and types the order below).
    r["drag"] = gr.HTML("", elem_id="rank-drag", label="Drag to order, best first")
    with gr.Row():
        r["order"] = gr.Textbox(label="Order, best first", placeholder=" ".join(LETTERS[:k]), elem_id="rank-order",
                                scale=3)
        r["submit"] = gr.Button("Save ranking", variant="primary", elem_id="rank-submit", scale=1)
    r["status"] = gr.Markdown(elem_id="rank-status")
    r["state"] = gr.JSON(visible=False)
    return r


def wire_rank(labeling: Labeling, r: dict[str, Any], rank_tab: Any, k: int, guarded, fast: dict) -> None:
    outputs = [r["prompt"], *[r[f"text_{i}"] for i in range(k)], r["status"], r["state"], r["order"]]

    def screen(user: str, message: str = "") -> tuple:
        labeling.require(user, ANNOTATE_ROLES)
        item = next_ranking(labeling.store, user, k)
        if item is None:
            return ("*Nothing to rank right now.*", *[""] * k, " ".join(m for m in (message, "All ranked. Thank you!")
                                                                          if m), None, "")
        state = {"prompt_id": item["prompt_id"], "response_ids": item["response_ids"],
                 "shown_at": datetime.now(timezone.utc).isoformat()}
        return (prompt_markdown(item["prompt"]), *[bidi(safe_markdown(t)) for t in item["texts"]], message, state, "")

    def on_open(request: gr.Request):
        return screen(request.username)

    def on_submit(state, order, request: gr.Request):
        user = request.username
        labeling.require(user, ANNOTATE_ROLES)
        if not state:
            raise LabelingError("nothing to rank: reload the tab")
        ranks = parse_order(order or "", len(state["response_ids"]))
        shown_at = datetime.fromisoformat(state["shown_at"]).replace(tzinfo=None)
        with labeling.writing:
            add_ranking(labeling.store, int(state["prompt_id"]), [int(i) for i in state["response_ids"]], ranks, user,
                        shown_at=shown_at, guidelines_version=labeling.config.guidelines_version)
        return screen(user, f"Saved ranking {order.strip()}.")

    rank_tab.select(guarded(on_open), None, outputs, api_visibility="private", **fast)
    r["submit"].click(guarded(on_submit), [r["state"], r["order"]], outputs, api_name="rank", **fast)
    r["order"].submit(guarded(on_submit), [r["state"], r["order"]], outputs, api_visibility="private", **fast)
