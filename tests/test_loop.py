"""The shared training loop on a toy regression: exact resume, gradient accumulation, checkpoint rotation."""

import json

import pytest
import torch

from align.config import TrainArgs
from align.runs import last_checkpoint, read_metrics
from align.trainers.loop import Task, make_accelerator, train_loop
from tests.helpers import DATA, collate, mse, run_toy_loop as run


def test_resume_is_exact_across_an_epoch_boundary(tmp_path):
    straight, _ = run(tmp_path / "a")
    run(tmp_path / "b", max_steps=3)  # 5 batches per epoch: stops inside epoch 0
    resumed, metrics = run(tmp_path / "b", resume=True)  # continues to step 7, in epoch 1
    assert metrics["global_step"] == 7
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [m["step"] for m in read_metrics(tmp_path / "b" / "metrics.jsonl")] == list(range(1, 8))


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    big, _ = run(tmp_path / "a", max_steps=2, per_device_train_batch_size=4)
    accumulated, _ = run(tmp_path / "b", max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    for a, b in zip(big, accumulated):
        torch.testing.assert_close(a, b)
    rows = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert all({"loss", "grad_norm", "learning_rate"} <= set(r) for r in rows)  # one row per optimizer step


def test_checkpoints_are_rotated_and_found(tmp_path):
    run(tmp_path / "a", max_steps=4, save_steps=1, save_total_limit=2)
    kept = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert kept == ["checkpoint-3", "checkpoint-4"]
    assert last_checkpoint(tmp_path / "a").name == "checkpoint-4"
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert all({"loss", "abs_err", "learning_rate", "grad_norm"} <= set(r) for r in rows)


def test_rows_logged_after_the_restart_point_are_set_aside(tmp_path):
    from align.runs import prepare_output_dir

    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)))
    prepare_output_dir(out, resume=True)  # the crashed attempt logged steps 4 and 5 after its last checkpoint
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert [m["step"] for m in read_metrics(out / "metrics.discarded.jsonl")] == [4, 5]

    fresh = tmp_path / "fresh"  # crashed before its first checkpoint: a new start sets every row aside
    fresh.mkdir()
    (fresh / ".align-run").touch()  # what prepare_output_dir marked it with
    (fresh / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/gold_reward": 0.5}) + "\n")
    prepare_output_dir(fresh, resume=False)
    assert read_metrics(fresh / "metrics.jsonl") == [] and len(read_metrics(fresh / "metrics.discarded.jsonl")) == 1


def test_overfitting_alarm_logs_the_gap_and_early_stopping_says_why(tmp_path):
    """Eval targets are the negated training targets: fitting the training data (full batches) drives eval loss
    up, so the gap widens at every evaluation; early stopping (patience 3) ends the run at step 8 and says why."""
    from align.overfit import GapTracker, gap_rows

    held_out = [{**d, "y": -d["y"]} for d in DATA]

    def eval_step(model, batch):
        return {"loss": (model(batch["x"]).squeeze(-1) - batch["y"]) ** 2}

    train = TrainArgs(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=10, learning_rate=0.005,
                      lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, eval_steps=2, save_steps=100,
                      early_stopping_patience=3, overfit_window=2, report_to="none", seed=3)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    task = Task(DATA, collate, mse, held_out, eval_step, lambda v: {"loss": v["loss"].mean()})
    metrics, _ = train_loop(make_accelerator(train, torch.float32), model, task, train, tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    gaps = gap_rows(rows)
    assert [g["step"] for g in gaps] == [2, 4, 6, 8] and metrics["global_step"] == 8  # stopped early
    # Recompute each gap by hand: eval loss minus the step-weighted mean training loss logged since the last eval.
    tracker, last_step = GapTracker(window=2), 0
    for row in rows:
        if "loss" in row:
            tracker.add_train(row["loss"], row["step"] - last_step)
            last_step = row["step"]
        if "eval_loss" in row:
            expected = tracker.add_eval(row["step"], row["eval_loss"])
            assert row["eval_gap"] == pytest.approx(expected["eval_gap"], abs=1e-6)
            assert row["eval_gap"] == pytest.approx(row["eval_loss"] - row["eval_train_loss"], abs=1e-6)
    assert all(b["eval_gap"] > a["eval_gap"] for a, b in zip(gaps, gaps[1:]))
    assert metrics["overfit_alarm"].startswith("overfitting at step 6: ")  # the second widening in a row
    assert metrics["stop_reason"].startswith("early stopping at step 8: eval_loss did not improve for 3 "
                                             "evaluation(s) (best ")
    assert metrics["stop_reason"].endswith("widening (overfitting)")
    assert metrics["eval_gap"] == pytest.approx(gaps[-1]["eval_gap"])


def test_gap_tracker_by_hand():
    from align.overfit import GapTracker

    t = GapTracker(window=2)
    t.add_train(1.0, 1)
    t.add_train(0.5, 3)  # step-weighted mean 0.625
    assert t.add_eval(4, 1.0)["eval_gap"] == pytest.approx(0.375)
    assert t.add_eval(4, 9.0)["eval_gap"] == pytest.approx(0.375)  # same step again: not a new point
    t.add_train(0.5, 4)
    assert t.add_eval(8, 1.25)["overfit/widening"] == 1 and t.alarm is None
    t.add_train(0.25, 4)
    assert t.add_eval(12, 1.5)["eval_gap"] == pytest.approx(1.25) and t.widening() == 2
    assert "widened for 2 evaluations" in t.alarm and "+0.3750 at step 4 to +1.2500" in t.alarm
    t.add_train(0.25, 4)
    assert t.add_eval(16, 0.5)["overfit/widening"] == 0  # narrowed: the streak ends, the alarm stays recorded
    assert t.summary()["eval_gap_max"] == pytest.approx(1.25)
