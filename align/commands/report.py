"""`align report RUN_DIR... --out DIR`: training runs into OUT/report.html (self-contained), report.json and
summary.md: training curves, weighting diagnostics, monitor flags, lineage; no sampling.
"""

from __future__ import annotations

import json
from pathlib import Path

from align.commands.parser import ArgumentParser
from align.errors import AlignError
from align.report import artifacts, write_report
from align.report.credit import run_credit
from align.runs import command_line


def build_runs_report(run_dirs: list[str], credit_pairs: int = 3) -> dict:
    """The report of training runs: curves, weights diagnostics, monitor flags, lineage, final metrics, and the
    token-level credit of `credit_pairs` pairs of each run's preference data."""
    runs = []
    for raw in run_dirs:
        run = Path(raw).expanduser()
        if not (run / "version.json").is_file():
            raise AlignError(f"{raw} is not a finished training run (no version.json)")
        runs.append(run)
    if not runs:
        raise AlignError("give at least one run directory")
    versions = []
    for run in runs:
        info = json.loads((run / "version.json").read_text())
        versions.append({"name": info.get("name") or run.name, "method": info.get("method"),
                         "parent": info.get("parent"), "base_model": info.get("base_model"), "samples": None})
    report = {"kind": "runs", "title": f"align report: {len(runs)} training run(s)", "versions": versions,
              "notes": {}}
    artifacts.add_run_dir_sections(report, runs)
    if credit_pairs > 0:
        add_credit(report, runs, versions, credit_pairs)
    return report


def add_credit(report: dict, runs: list[Path], versions: list[dict], k: int) -> None:
    """Token-level credit of each run (align.report.credit): a policy against its parent, a reward model's drops."""
    credit: dict = {"per_version": {}, "skipped": {}}
    for run, row in zip(runs, versions):
        found = run_credit(run, k)
        if isinstance(found, str):
            credit["skipped"][row["name"]] = found
        elif found["kind"] == "reward":
            credit["reward_model"] = {**found, "run": row["name"]}
        else:
            credit["per_version"][row["name"]] = found
    if credit["per_version"] or "reward_model" in credit:
        report["credit"] = credit
    else:
        report["notes"]["credit"] = "; ".join(credit["skipped"].values()) or "no run with pairs"


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="align report", description="Turn training runs into a report (training "
                                     "curves, weighting diagnostics, monitor flags, lineage; no sampling).")
    parser.add_argument("runs", nargs="+", help="Training run directories (each with version.json).")
    parser.add_argument("--out", required=True, help="Output directory.")
    parser.add_argument("--credit_pairs", type=int, default=3,
                        help="Pairs of each run's preference data whose tokens are coloured by credit; 0: off.")
    args = parser.parse_args(argv)
    report = build_runs_report(args.runs, args.credit_pairs)
    report["command"] = command_line()
    path = write_report(report, args.out)
    print(f"wrote {path} (+ report.json, summary.md)")
