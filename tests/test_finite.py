"""Non-finite training: a learning rate typed as 1e4 stops every loop with one line naming the step and the likely
cause, a bad step or two is skipped and counted, and no model with non-finite weights is ever saved."""

import math

import pytest
import torch

from align.commands import main as cli_main
from align.config import DPOArgs, TrainArgs
from align.errors import AlignError
from align.runs import read_metrics
from align.trainers.dpo import train_dpo
from align.trainers.finite import NonFiniteGuard, TrainingDiverged
from align.trainers.loop import Task, make_accelerator, train_loop
from align.trainers.reward import train_reward
from align.trainers.sft import train_sft
from tests.helpers import collate, DATA, dpo_configs, mse, reward_configs, sft_configs



QUICK_DPO = DPOArgs(interference_samples=0, interference_per_family=0)  # interference: not measured here

def assert_nothing_saved(out):
    assert not (out / "version.json").exists() and not (out / "adapter").exists() and not (out / "merged").exists()


def test_sft_stops_at_a_learning_rate_typo(tiny_model_dir, chat_files, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"training stopped at step \d+: .*learning rate 10000 is far too high"):
        train_sft(*sft_configs(tiny_model_dir, chat_files, out, learning_rate=1e4, max_steps=6, save_steps=10))
    assert_nothing_saved(out)
    rows = [m for m in read_metrics(out / "metrics.jsonl") if "train/skipped_steps" in m]
    assert rows[-1]["train/skipped_steps"] >= 1  # the bad steps were skipped (and counted) before stopping


def test_dpo_stops_naming_the_step_not_the_data(tiny_model_dir, data_files, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    expected = r"training stopped at step 5: 4 steps in a row .*learning rate 10000"
    with pytest.raises(TrainingDiverged, match=expected) as caught:
        train_dpo(*dpo_configs(tiny_model_dir, data_files, dpo=QUICK_DPO, out=out, learning_rate=1e4, max_steps=6))
    assert "dataset rows" not in str(caught.value)
    assert_nothing_saved(out)
    skipped = [m["train/skipped_steps"] for m in read_metrics(out / "metrics.jsonl") if "train/skipped_steps" in m]
    assert skipped == [0, 1, 2, 3]  # steps 2, 3 and 4 skipped; step 5 would have been the fourth in a row


def test_reward_stops_and_saves_nothing(tiny_model_dir, tmp_path):
    from tests.helpers import load_tokenizer, pair_rows, write_pairs

    tokenizer = load_tokenizer(tiny_model_dir)
    train_file = write_pairs(tmp_path / "train.jsonl", pair_rows(tokenizer, n=8))
    eval_file = write_pairs(tmp_path / "eval.jsonl", pair_rows(tokenizer, n=4, offset=40))
    out = tmp_path / "rm"
    configs = reward_configs(tiny_model_dir, train_file, eval_file, out)
    configs[-1].learning_rate = 1e6
    with pytest.raises(TrainingDiverged, match="learning rate 1e\\+06"):
        train_reward(*configs)
    assert_nothing_saved(out) and not (out / "reward_stats.json").exists()


def test_cli_exits_non_zero_with_one_line(tiny_model_dir, chat_files, tmp_path, capsys):
    train, eval_ = chat_files
    code = cli_main(["sft", "--model", str(tiny_model_dir), "--train_file", str(train), "--eval_file", "none",
                     "--output_dir", str(tmp_path / "run"), "--max_steps", "6", "--learning_rate", "1e4",
                     "--per_device_train_batch_size", "4", "--max_length", "64", "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
    line = err[err.index("error:"):].splitlines()[0]  # progress bars share stderr
    assert line.startswith("error: training stopped at step") and "learning rate 10000" in line, line
    assert_nothing_saved(tmp_path / "run")


def _loop(out, loss, **overrides):
    kwargs = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=2, learning_rate=0.05,
                  lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_steps=2, report_to="none", seed=3)
    train = TrainArgs(**{**kwargs, **overrides})
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    out.mkdir(exist_ok=True)
    metrics, _ = train_loop(make_accelerator(train, torch.float32), model, Task(DATA, collate, loss), train, out)
    return model, metrics


def test_one_bad_batch_is_skipped_and_counted(tmp_path):
    calls = []

    def nan_at_step_2(model, batch):
        calls.append(1)
        loss, metrics = mse(model, batch)
        return (loss * math.nan if len(calls) == 2 else loss), metrics

    model, metrics = _loop(tmp_path / "run", nan_at_step_2, max_steps=5)
    assert metrics["global_step"] == 5 and math.isfinite(metrics["train_loss"])
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["train/skipped_steps"] == 1
    assert sum(r["loss"] is None for r in rows) == 1  # the skipped step's loss is logged as null, not NaN


def test_a_run_that_never_recovers_stops_after_three_skips(tmp_path):
    calls = []

    def nan_from_step_3(model, batch):
        calls.append(1)
        loss, metrics = mse(model, batch)
        return (loss * math.nan if len(calls) >= 3 else loss), metrics

    with pytest.raises(TrainingDiverged, match=r"step 6: 4 steps in a row .*learning rate 0.05 may be too high"):
        _loop(tmp_path / "run", nan_from_step_3, max_steps=8)
    assert_nothing_saved(tmp_path / "run")


def test_guard_counts_in_a_row():
    guard = NonFiniteGuard(1e-4, max_bad_steps=2)
    assert guard.check(1, 1.0, 0.5) and not guard.check(2, math.nan) and not guard.check(3, 1.0, math.inf)
    assert guard.check(4, 2.0) and guard.skipped == 2 and guard.in_a_row == 0
    guard.check(5, math.nan), guard.check(6, math.nan)
    with pytest.raises(AlignError, match="step 7: 3 steps in a row"):
        guard.check(7, math.nan)


def test_save_refuses_non_finite_weights(tiny_model_dir, tmp_path):
    from align.config import ModelArgs
    from align.models import load_model, save_trained

    model, tokenizer = load_model(ModelArgs(model=str(tiny_model_dir)))
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = math.inf
    with pytest.raises(TrainingDiverged, match="weights that are not finite"):
        save_trained(model, tokenizer, tmp_path, str(tiny_model_dir), merge=False)
    assert not (tmp_path / "merged").exists()


def test_rlhf_stops_and_saves_nothing(tiny_model_dir, reward_run, prompts_file, tmp_path):  # noqa: F811
    from align.config import MonitorArgs
    from align.trainers.rlhf import train_rlhf
    from tests.helpers import rlhf_configs

    out = tmp_path / "rl"
    configs = rlhf_configs(tiny_model_dir, reward_run, prompts_file, out, monitor=MonitorArgs(monitor=False),
                           max_steps=6, learning_rate=1e4, save_steps=10)
    configs[2].eval_prompts_file = None  # no gold evaluation: the loop is what is tested
    with pytest.raises(TrainingDiverged, match="learning rate 10000"):
        train_rlhf(*configs)
    assert_nothing_saved(out)
