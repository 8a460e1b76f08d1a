"""`align report RUN_DIR... --out DIR`: training runs into OUT/report.html (self-contained), report.json and
summary.md: training curves, weighting diagnostics, monitor flags, lineage; no sampling.
"""

from __future__ import annotations

import json
from pathlib import Path

from align.commands.parser import ArgumentParser
from align.errors import AlignError
from align.report import artifacts, write_report
from align.runs import command_line


def build_runs_report(run_dirs: list[str]) -> dict:
    """The report of training runs: curves, weights diagnostics, monitor flags, lineage, final metrics."""
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
    return report


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="align report", description="Turn training runs into a report (training "
                                     "curves, weighting diagnostics, monitor flags, lineage; no sampling).")
    parser.add_argument("runs", nargs="+", help="Training run directories (each with version.json).")
    parser.add_argument("--out", required=True, help="Output directory.")
    args = parser.parse_args(argv)
    report = build_runs_report(args.runs)
    report["command"] = command_line()
    path = write_report(report, args.out)
    print(f"wrote {path} (+ report.json, summary.md)")
