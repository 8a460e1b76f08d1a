"""bench/levers.py on the tiny model: both settings run and give the same log-probs."""

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
            re.finditer(r"^(dpo_step|gen_logps|rloo_logps)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)×\s+([\d.e+-]+)$", result.stdout, re.M)}
    assert set(rows) == {"dpo_step", "gen_logps", "rloo_logps"}, result.stdout
    for on, off, ratio, diff in rows.values():  # times print with 4 decimals: too coarse to recheck the ratio
        assert float(on) > 0 and float(off) > 0 and float(ratio) > 0 and float(diff) < 1e-4
