"""bench/throughput.py: the turn-taking clock, the parity checks, and each method end to end on the tiny shape (CPU).

No timing assertions: which side is faster is what the benchmark measures, not something a test may assume."""

import json
import math
import threading
from pathlib import Path

import pytest
import torch

from tests.bench import load_bench

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings(  # TRL's own deprecation noise on CPU
    "ignore:`gradient_checkpointing_(en|dis)able` is deprecated:FutureWarning",
    "ignore:'pin_memory' argument is set as true:UserWarning")


tp = load_bench("throughput")


# ---- taking turns ----------------------------------------------------------------------------------------------------


def test_sides_alternate_step_by_step_and_never_overlap():
    turns = tp.Turns(("a", "b"), cuda=False)
    events, running = [], []

    def side(name, steps):
        def body():
            for _ in range(steps):
                running.append(name)
                assert running == [name], "two sides ran at once"
                events.append(name)
                running.remove(name)
                turns.step_done(name)
        return body

    turns.run({"a": side("a", 3), "b": side("b", 5)})
    assert events == ["a", "b", "a", "b", "a", "b", "b", "b"]  # in turns; b runs on alone once a is done
    assert [len(turns.times[n]) for n in "ab"] == [3, 5]
    assert all(t >= 0 for n in "ab" for t in turns.times[n])


def test_a_failing_side_is_reported_and_the_other_finishes():
    turns = tp.Turns(("a", "b"), cuda=False)
    done = threading.Event()

    def fails():
        turns.step_done("a")
        raise ValueError("boom")

    def finishes():
        for _ in range(3):
            turns.step_done("b")
        done.set()

    with pytest.raises(RuntimeError, match="the a side failed: ValueError"):
        turns.run({"a": fails, "b": finishes})
    assert done.is_set()


# ---- parity ----------------------------------------------------------------------------------------------------------


def test_parity_checks_per_method():
    tol = tp.TOLERANCE["float32"]
    dpo = tp.parity("dpo", {"loss": math.log(2), "logps/chosen": -120.0}, {"loss": 0.69315, "logps/chosen": -120.02},
                    tol)
    assert dpo["pass"] and [c["against"] for c in dpo["checks"]] == ["TRL", "log 2", "TRL"]
    moved = tp.parity("dpo", {"loss": 0.60, "logps/chosen": -120.0}, {"loss": 0.60, "logps/chosen": -120.0}, tol)
    assert not moved["pass"]  # equal, but not log 2: the policy was not the reference at step 1
    reward = tp.parity("reward", {"loss": 0.70, "rewards/chosen": 0.2, "rewards/rejected": 0.0},
                       {"loss": 0.70, "mean_reward": 0.3}, tol)
    assert not reward["pass"] and reward["checks"][1]["ours"] == pytest.approx(0.1)  # different heads
    assert not tp.parity("sft", {"loss": 5.5}, {}, tol)["pass"]  # a missing value never passes


# ---- end to end ------------------------------------------------------------------------------------------------------


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ["sft", "dpo", "reward"])
def test_tiny_run_end_to_end(method, tmp_path, keep_threads):
    argv = ["--method", method, "--shape", "tiny", "--batch", "2", "--warmup", "1", "--steps", "2",
            "--lengths", "30,60", "--max_length", "64", "--results_dir", str(tmp_path / "results")]
    result = tp.main(argv)

    saved = json.loads((tmp_path / "results" / f"throughput_{method}_tiny_cpu.json").read_text())
    assert (tmp_path / "results" / f"throughput_{method}_tiny_cpu.md").read_text().startswith("# throughput")
    assert saved["command"] == "python bench/throughput.py " + " ".join(argv) and saved["versions"]["trl"]
    assert saved["parity"]["pass"], saved["parity"]
    assert saved["data"]["same_tokens"] and saved["data"]["tokens_per_step"] > 0
    for side in ("ours", "trl"):
        assert len(saved[side]["step_s_all"]) == 3  # warm-up + timed steps
        for key in ("step_s", "samples_per_s", "tokens_per_s"):
            assert math.isfinite(saved[side][key]) and saved[side][key] > 0
        assert "mfu" not in saved[side] and "peak_memory_gib" not in saved[side]  # CPU: ratios only
    assert saved["ratio"] == pytest.approx(saved["ours"]["samples_per_s"] / saved["trl"]["samples_per_s"])
    assert saved["ratio"] == pytest.approx(result["ratio"])
    checks = {(c["name"], c["against"]) for c in saved["parity"]["checks"]}
    expected = {"sft": {("loss", "TRL")}, "dpo": {("loss", "TRL"), ("loss", "log 2"), ("logps/chosen", "TRL")},
                "reward": {("loss", "TRL"), ("mean reward", "TRL")}}[method]
    assert checks == expected
    if method == "dpo":  # our reference pass is timed and charged to our steps
        ours = saved["ours"]
        assert ours["reference_pass_s"] > 0 and ours["charged_per_step_s"] == ours["reference_pass_s"]
        assert ours["samples_per_s"] == pytest.approx(2 / (ours["step_s"] + ours["reference_pass_s"]))


def test_rlhf_says_it_is_not_benchmarked(capsys):
    with pytest.raises(SystemExit) as exit_:
        tp.main(["--method", "rlhf"])
    assert exit_.value.code == 2 and "rlhf is not benchmarked yet" in capsys.readouterr().err
