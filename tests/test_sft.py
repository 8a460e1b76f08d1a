"""SFT on a tiny model: trains, changes every trainable parameter, saves artefacts, resumes."""

import json

import pytest
import torch
from transformers import TrainerCallback

from align.errors import AlignError
from align.runs import read_metrics
from align.trainers.sft import train_sft
from tests.helpers import sft_configs as configs


class ParamSnapshot(TrainerCallback):
    """Records trainable parameters at the start and end of training."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_sft_trains_and_saves(tiny_model_dir, chat_files, tmp_path):
    out = tmp_path / "run"
    snap = ParamSnapshot()
    train_sft(*configs(tiny_model_dir, chat_files, out), extra_callbacks=[snap])

    assert snap.before.keys() == snap.after.keys() and len(snap.before) > 0
    unchanged = [n for n in snap.before if torch.equal(snap.before[n], snap.after[n])]
    assert unchanged == []

    metrics = read_metrics(out / "metrics.jsonl")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert any("eval_loss" in m for m in metrics)
    # The overfitting alarm's gap, at steps 2 and 4: eval loss minus the mean training loss since the last eval.
    evals = list({m["step"]: m for m in metrics if "eval_loss" in m}.values())  # the final evaluate() repeats step 4
    assert [m["step"] for m in evals] == [2, 4]
    for m, window in zip(evals, (losses[0:2], losses[2:4])):
        assert m["eval_train_loss"] == pytest.approx(sum(window) / 2, rel=1e-6)
        assert m["eval_gap"] == pytest.approx(m["eval_loss"] - sum(window) / 2, rel=1e-6)

    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "config.yaml").is_file() and (out / "README.md").is_file()
    version = json.loads((out / "version.json").read_text())
    assert version["method"] == "sft" and version["name"] == "run"
    assert version["base_model"] == str(tiny_model_dir.resolve())
    assert len(version["adapter_hash"]) == 16 and len(version["data_hash"]) == 16
    assert version["metrics"]["global_step"] == 4
    assert version["metrics"]["eval_gap"] == pytest.approx(evals[-1]["eval_gap"])


def test_resume_continues_from_checkpoint(tiny_model_dir, chat_files, tmp_path):
    out = tmp_path / "run"
    train_sft(*configs(tiny_model_dir, chat_files, out, max_steps=2))
    with pytest.raises(AlignError, match="already holds a run; pass --resume"):
        train_sft(*configs(tiny_model_dir, chat_files, out, max_steps=4))

    train_sft(*configs(tiny_model_dir, chat_files, out, max_steps=4, resume=True))
    steps = [m["step"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    # Steps 1-2 from the first run, 3-4 from the resumed one: nothing retrained, nothing skipped.
    assert steps == [1, 2, 3, 4]
    assert json.loads((out / "version.json").read_text())["metrics"]["global_step"] == 4


def test_full_fine_tuning_saves_merged_model(tiny_model_dir, chat_files, tmp_path):
    out = tmp_path / "full"
    model, lora, data, train = configs(tiny_model_dir, chat_files, out, max_steps=1)
    lora.use_lora = False
    train_sft(model, lora, data, train)
    assert (out / "merged" / "model.safetensors").is_file()
    assert not (out / "adapter").exists()
