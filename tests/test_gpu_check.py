"""bench/gpu_check.sh's CPU-checkable parts: argument parsing, the dry run and the wheel step's command (the check
itself needs a GPU machine)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_dry_run_lists_every_step_within_ten_minutes(tmp_path):
    """All ten commands, in order, each with a time limit; the limits add up to at most the 10-minute budget; the
    results file goes where --out says; nothing runs (no results file is written)."""
    out = tmp_path / "res" / "gpu_check.md"
    done = run("--dry-run", "--out", str(out), "--wheels", str(tmp_path / "wheels"))
    assert done.returncode == 0, done.stderr
    steps = re.findall(r"^\[([a-z0-9-]+)\] limit (\d+) s", done.stdout, flags=re.M)
    assert [name for name, _ in steps] == ["install", "packing", "throughput-sft", "throughput-dpo", "throughput-reward",
                                           "generation", "fsdp2", "zero3", "qlora", "memory"]
    assert sum(int(limit) for _, limit in steps) <= 600
    assert f"results to {out}" in done.stdout and "run --download-wheels" in done.stdout
    assert "--config_file recipes/accelerate/fsdp2.yaml -m align dpo" in done.stdout
    assert "(needs deepspeed)" in done.stdout and "(needs bitsandbytes)" in done.stdout
    assert "--shape qwen2.5-0.5b" in done.stdout and not out.exists()


def test_only_minutes_and_bad_arguments():
    """--only picks steps; --minutes scales the limits; an unknown argument, step or a bad number exits 2 with one
    line naming it."""
    done = run("--dry-run", "--only", "memory,fsdp2", "--minutes", "5")
    assert done.returncode == 0
    assert re.findall(r"^\[([a-z0-9-]+)\]", done.stdout, flags=re.M) == ["fsdp2", "memory"]
    assert "[fsdp2] limit 29 s" in done.stdout  # 300 s · 9/93
    for args, message in ((["--bogus"], "unknown argument: --bogus"), (["--only", "gpu"], "unknown step 'gpu'"),
                          (["--minutes", "ten"], "--minutes must be a whole number"), (["--wheels"], "--wheels needs")):
        failed = run("--dry-run", *args)
        assert failed.returncode == 2 and message in failed.stderr


def test_wheel_step_downloads_the_versions_this_checkout_uses(tmp_path):
    """The companion step's dry run prints the pip download of trl, peft and datasets into the given folder, pinned
    to the versions installed here (what the tests ran against), and downloads nothing."""
    import datasets
    import peft
    import trl

    done = run("--download-wheels", str(tmp_path / "w"), "--dry-run")
    assert done.returncode == 0 and not (tmp_path / "w").exists()
    assert f"pip download --dest {tmp_path / 'w'} --only-binary=:all:" in done.stdout
    for name, module in (("trl", trl), ("peft", peft), ("datasets", datasets)):
        assert f"{name}=={module.__version__}" in done.stdout


def test_packing_check_runs_and_passes_on_cpu():
    """The GPU check's padding-free step, on the tests' tiny model in float32: packed equals padded for DPO pairs and
    SFT rows (values and gradients), fewer tokens computed, and the kernel it reports is the CPU one."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from packing_check import main

    r = main(["--shape", "tiny", "--repeats", "1"])
    assert r["passed"] and r["kernel"] == "SDPA span by span" and r["dtype"] == "float32"
    for name in ("dpo", "sft"):
        assert r[name]["values_max_rel"] < 1e-5 and r[name]["grads_rel"] < 1e-5
        assert r[name]["tokens"][1] < r[name]["tokens"][0]
