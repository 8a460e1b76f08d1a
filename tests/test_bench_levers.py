"""bench/levers.py on the tiny model: both settings of each lever run and give the same log-probs (bf16 rollouts:
within bf16's rounding)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lever_on_and_off_agree(tiny_model_dir):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "levers.py"), "--model", str(tiny_model_dir),
                             "--batch", "3", "--completion", "5", "--rounds", "2", "--threads", "1"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = {m.group(1): m.groups()[1:] for m in
            re.finditer(r"^(dpo_step|gen_logps|rloo_logps|rollouts|greedy)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)×\s+([\d.e+-]+)$", result.stdout, re.M)}
    assert set(rows) == {"dpo_step", "gen_logps", "rloo_logps", "rollouts", "greedy"}, result.stdout
    for name, (on, off, ratio, diff) in rows.items():  # times print with 4 decimals: too coarse to recheck the ratio
        assert float(on) > 0 and float(off) > 0 and float(ratio) > 0
        # bf16 rollouts differ from float32 ones by bf16's rounding, by design; the other levers change no value
        assert 0 < float(diff) < 0.1 if name == "rollouts" else float(diff) < 1e-4, name


def test_an_unknown_measure_is_one_clear_line():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "levers.py"), "--measures", "rollouts,nope"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        "--measures: unknown nope; choose from dpo_step, gen_logps, rloo_logps, rollouts, greedy")
