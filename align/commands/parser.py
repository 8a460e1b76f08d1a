"""The one argument parser of every `align` command: it raises instead of exiting, and takes snake_case flags.

argparse's own `error()` prints the usage and calls `sys.exit(2)`; ours raises ConfigError, which the CLI turns into
one line on stderr and exit code 2 (and which tests and recipes can catch). Flags are snake_case everywhere
(`--max_new_tokens`); a kebab-case spelling (`--max-new-tokens`) is accepted as a hidden alias.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any, Optional, Sequence

from align.errors import ConfigError

DEFAULT_DB = "sqlite:///runs/store.db"  # the store every command opens unless --db names another


class RaisingParser:
    """Mixin for argparse parsers (also transformers' HfArgumentParser): errors raise ConfigError."""

    prog: str

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{self.prog}: {message}")

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None):  # noqa: D102
        return super().parse_known_args(None if args is None else snake_case_flags(args), namespace)


class ArgumentParser(RaisingParser, argparse.ArgumentParser):
    """argparse.ArgumentParser that raises ConfigError and accepts kebab-case aliases of its snake_case flags."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def snake_case_flags(argv: Sequence[str]) -> list[str]:
    """`--max-new-tokens 8` and `--max-new-tokens=8` -> `--max_new_tokens ...`; values and `--` stay as they are."""
    out = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            token = f"--{name.replace('-', '_')}{eq}{value}"
        out.append(token)
    return out


def optional_float(text: str) -> Optional[float]:
    """A number, or `none` (off): spelled as configs spell an unset value."""
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None


def comma_list(text: Optional[str]) -> Optional[list[str]]:
    """`a, b,c` -> ['a', 'b', 'c']; empty or None -> None."""
    items = [part.strip() for part in (text or "").split(",") if part.strip()]
    return items or None
