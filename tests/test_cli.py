"""The align command: version, help listing every field, one-line errors with exit code 2.

One test starts `python -m align` as a real process (the entry point); the others run the same `main` in-process,
where a subprocess would add only its start-up time.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from align.errors import ConfigError
from tests.helpers import ROOT, run_cli


def run_align(*args):
    code, out, err = run_cli(*args)
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def test_version_and_help_from_a_real_process():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "align", "--version"], capture_output=True, text=True, cwd=ROOT,
                            env=env)
    assert result.returncode == 0 and result.stdout.strip().startswith("align ")
    out = run_align("--help").stdout
    assert "sft" in out


def test_sft_help_lists_every_field():
    import dataclasses

    from align.config import SFT_CONFIG

    out = run_align("sft", "--help").stdout
    for dtype in SFT_CONFIG:
        for f in dataclasses.fields(dtype):
            assert f"--{f.name}" in out, f.name


def assert_one_line_error(result, pattern):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], result.stderr


def test_misspelt_config_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rat: 0.1\n")
    assert_one_line_error(run_align("sft", "--config", str(cfg)), "unknown config key 'learning_rat'")


def test_unknown_command():
    result = run_align("sfft")
    assert result.returncode == 2 and "did you mean 'sft'" in result.stderr


@pytest.mark.parametrize(
    "setup, args, pattern",
    [
        ("missing", ["--train_file", "{tmp}/nope.jsonl"], "data file not found"),
        ("malformed", ["--train_file", "{tmp}/bad.jsonl"], "bad.jsonl:2: malformed JSON"),
        ("nocolumn", ["--train_file", "{tmp}/nocol.jsonl"], "nocol.jsonl: cannot tell the SFT format from the columns question"),
        ("empty", ["--train_file", "{tmp}/empty.jsonl"], "empty.jsonl: no rows"),
        ("model", ["--model", "{tmp}/no-model"], "model path does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, tiny_model_dir, setup, args, pattern):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n{oops\n")
    (tmp_path / "nocol.jsonl").write_text('{"question": "x"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "good.jsonl").write_text(json.dumps(good) + "\n")
    base = ["sft", "--model", str(tiny_model_dir), "--train_file", str(tmp_path / "good.jsonl"), "--eval_file", "none",
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]
    result = run_align(*base, *[a.format(tmp=tmp_path) for a in args])
    assert_one_line_error(result, pattern)


def test_unwritable_output_dir(tmp_path, tiny_model_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_align("sft", "--model", str(tiny_model_dir), "--output_dir", str(blocker / "run"), "--max_steps", "1")
    assert_one_line_error(result, "is not writable")


def test_debug_shows_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rat"):  # --debug lets the exception (and its traceback) through
        run_align("sft", "--config", str(cfg), "--debug")
