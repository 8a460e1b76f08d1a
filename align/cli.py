"""The `align` command: one subcommand per arrow of the flywheel.

Each subcommand is a function taking its argv. Errors the user can fix (AlignError) print one line
and exit 2; anything else prints one line and exits 1; `--debug` anywhere shows the traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Callable, Optional

from align import __version__
from align.errors import AlignError

# name -> (module:function taking argv, one-line help). Modules import lazily: `align --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "sft": ("align.cli:cmd_sft", "Supervised fine-tuning (LoRA by default) on chat data."),
    "demo": ("align.demo:main", "Run the main job on the embedded model (what `make demo` runs)."),
    "generate": ("align.collect:generate_main", "Sample responses with provenance (token ids, log-probs) into the store."),
    "export": ("align.collect:export_main", "Export labeled pairs (TRL preference format), SFT or unpaired rows."),
    "rescore": ("align.collect:rescore_main", "Re-score stored responses with their model; check log-probs agree."),
    "dpo": ("align.trainers.dpo:main", "DPO with LoRA on preference pairs (ties, soft labels, importance weights)."),
    "reward": ("align.trainers.reward:main", "Train a reward model (scalar head + LoRA) on preference pairs."),
    "rlhf": ("align.trainers.rlhf:main", "RLHF with LoRA (RLOO or GRPO) against a reward model, with a reward-hacking monitor."),
    "weights": ("align.trainers.weights:main", "Importance weights and ESS/N per source version, without training."),
    "memory": ("align.memory:main", "Estimate peak GPU memory of a run and which accelerate config fits."),
    "label": ("align.label_cli:cmd_label", "Run the pairwise labeling app (login, queue, dashboard); --simulate JUDGE."),
    "users": ("align.label_cli:cmd_users", "Add or list logins of the labeling app (align users add NAME --role ...)."),
    "eval": ("align.eval_cli:eval_main", "Compare model versions on prompts: win rates, gold, KL, failures -> HTML report."),
    "report": ("align.eval_cli:report_main", "Turn training runs into an HTML report (curves, weights, monitor, lineage)."),
}


def cmd_sft(argv: list[str]) -> None:
    from align.config import SFT_CONFIG, parse_config
    from align.trainers.sft import train_sft

    model, lora, data, train = parse_config(SFT_CONFIG, argv, prog="align sft")
    print_run_summary(train_sft(model, lora, data, train))


def print_run_summary(out) -> None:
    """Print what a training run saved (main process only: other ranks have nothing to say)."""
    import json

    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    version = json.loads((out / "version.json").read_text())
    metrics = version.get("metrics", {})
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"run {version['name']} ({version['method']}) saved to {out}")
    print(f"  model: {version['adapter_path']}")
    print(f"  metrics: {shown}")
    for key in ("stop_reason", "overfit_alarm", "interference_warning"):  # align.overfit, align.interference
        if isinstance(metrics.get(key), str):
            print(f"  {key.replace('_', ' ')}: {metrics[key]}")


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: align <command> [--config FILE] [--key value ...] [--debug]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`align <command> --help` lists every option of a command.", "Add --debug to see tracebacks."]
    return "\n".join(lines)


def run_guarded(func: Callable[[list[str]], None], argv: list[str]) -> int:
    """Run a command, turning errors into one line on stderr and an exit code."""
    debug = "--debug" in argv or os.environ.get("ALIGN_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        func(argv)
    except AlignError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence for the CLI
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: {type(exc).__name__}: {first} (run again with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(f"align {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command '{name}'{hint} (align --help lists them)", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    return run_guarded(getattr(importlib.import_module(module), func), rest)


if __name__ == "__main__":
    sys.exit(main())
