"""The Gradio labeling app (DESIGN §1): annotators compare two responses, reviewers watch quality.

`build_app(store_url) -> gr.Blocks` and `launch_app(demo)` are in labeling.app (imports Gradio); the logic is in
labeling.handlers (no Gradio), the metrics in labeling.dashboard, safe rendering in labeling.render, and live
side-by-side generation in labeling.compare.
"""


def build_app(*args, **kwargs):
    """See labeling.app.build_app (imported lazily: Gradio is slow to import)."""
    from labeling.app import build_app as build

    return build(*args, **kwargs)


__all__ = ["build_app"]
