"""The `align` command: one subcommand per arrow of the flywheel, one module per subcommand in this package.

Each module has `main(argv)`, parses its arguments with `align.commands.parser.ArgumentParser` (or, for the training
commands, the typed configs of `align.config`) and calls the library. Errors the user can fix (AlignError) print one
line and exit 2; anything else prints one line and exits 1; `--debug` anywhere shows the traceback.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
import warnings
from typing import Callable, Optional

from align import __version__
from align.errors import AlignError

# name -> one-line help; the module align.commands.<name> does the work. Modules import lazily: `align --help`
# stays fast.
COMMANDS: dict[str, str] = {
    "sft": "Supervised fine-tuning (LoRA by default) on chat data.",
    "demo": "Run the main job on the embedded model (what `make demo` runs).",
    "generate": "Sample responses with provenance (token ids, log-probs) into the store.",
    "export": "Export labeled pairs (TRL preference format), SFT or unpaired rows.",
    "rescore": "Re-score stored responses with their model; check log-probs agree.",
    "dpo": "DPO with LoRA on preference pairs (ties, soft labels, importance weights).",
    "reward": "Train a reward model (scalar head + LoRA) on preference pairs.",
    "rlhf": "RLHF with LoRA (RLOO or GRPO) against a reward model, with a reward-hacking monitor.",
    "weights": "Importance weights and ESS/N per source version, without training.",
    "memory": "Estimate peak GPU memory of a run and which accelerate config fits.",
    "label": "Run the pairwise labeling app (login, queue, dashboard); --simulate JUDGE.",
    "users": "Add or list logins of the labeling app (align users add NAME --role ...).",
    "eval": "Compare model versions on prompts: win rates, gold, KL, failures -> HTML report.",
    "report": "Turn training runs into an HTML report (curves, weights, monitor, lineage).",
}


def command(name: str) -> Callable[[list[str]], None]:
    """The `main(argv)` of a subcommand."""
    return importlib.import_module(f"align.commands.{name}").main


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: align <command> [--config FILE] [--key value ...] [--debug]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, help_ in COMMANDS.items()]
    lines += ["", "`align <command> --help` lists every option of a command.", "Add --debug to see tracebacks."]
    return "\n".join(lines)


def run_guarded(func: Callable[[list[str]], None], argv: list[str]) -> int:
    """Run a command, turning errors into one line on stderr and an exit code."""
    debug = "--debug" in argv or os.environ.get("ALIGN_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # transformers 5.25 deprecates a model property that TRL and PEFT still read at every run: nothing a user can change
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
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
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command '{name}'{hint} (align --help lists them)", file=sys.stderr)
        return 2
    return run_guarded(command(name), rest)
