"""Every `align` command shown in the README exists, and every option it uses is one that command accepts."""

import re
import shlex
from functools import lru_cache

import pytest

from tests.helpers import ROOT, run_cli


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("align "):
                commands.append(line)
    return commands


@lru_cache(maxsize=None)
def help_text(prefix: tuple[str, ...]) -> str:
    code, out, err = run_cli(*prefix, "--help")  # in-process: a subprocess per command adds only start-up time
    assert code == 0, f"`align {' '.join(prefix)} --help` failed: {err[-500:]}"
    return out


def help_prefix(words: list[str]) -> tuple[str, ...]:
    """The words whose --help documents this command line's options (modes and sub-commands have their own)."""
    if words[1] == "users":
        return tuple(words[1:3])  # align users add NAME
    if words[1] == "label" and "--simulate" in words:
        return ("label", "--simulate", words[words.index("--simulate") + 1])
    return (words[1],)


def test_readme_shows_align_commands():
    assert len(readme_commands()) >= 8


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_is_valid(line):
    words = shlex.split(line)
    assert words[0] == "align"
    if words[1] in ("--version", "--help"):
        return
    out = help_text(help_prefix(words))
    for option in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
        assert option in out, f"`{line}` uses {option}, which `align {' '.join(help_prefix(words))} --help` does not list"
