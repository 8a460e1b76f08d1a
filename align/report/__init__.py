"""Evaluation reports (DESIGN §6): compare model versions, or summarise training runs, as one HTML page + JSON.

    align eval --models V1,V2 --prompts tasks:eval --per_family 5 --judge gold --db runs/store.db --out runs/eval
    align report runs/v1-sft runs/v2-dpo --out runs/report

Modules: stats (win rates, bootstrap, Bradley–Terry, KL), compare (sampling and judging through the store),
artifacts (curves, weights, monitor flags, lineage from run directories), clusters (failure grouping),
plots and html (rendering).
"""

from align.report.html import render, write_report

__all__ = ["render", "write_report"]
