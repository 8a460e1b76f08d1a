"""The README's "Bring your own data" commands run (tiny model swapped in, one step), and data/README.md's examples
are the files in data/examples/."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def section_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Bring your own data", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.startswith("align ")]


def test_section_has_commands():
    assert len(section_commands()) >= 5


@pytest.mark.parametrize("line", section_commands())
def test_bring_your_own_data_command_runs(line, tiny_model_dir, tmp_path):
    words = shlex.split(line)[1:]
    words += ["--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
              "--report_to", "none", "--eval_steps", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "align", *words], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=600)
    if "--dataset_name" in words:  # a hub dataset, offline here: one line that says so and how to pass a local copy
        errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and "no network" in errors[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        return
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "version.json").read_text())
    assert record["metrics"]["global_step"] == 1
    assert record["data"]["source"] == words[words.index("--train_file") + 1]


def test_data_readme_examples_are_the_example_files():
    text = (ROOT / "data" / "README.md").read_text()
    shown = dict(re.findall(r"`data/examples/([\w.]+)`:\n```\n(.*?)```", text, flags=re.S))
    files = {p.name: p.read_text() for p in (ROOT / "data" / "examples").iterdir()}
    assert shown == files
    assert all(len(content.strip().splitlines()) == (3 if name.endswith(".csv") else 2) for name, content in files.items())
