"""Reward model on a tiny model: trains (LoRA body + score head), held-out metrics, reward_stats.json, and
load_reward_model + score give back the rewards the trained model produced."""

import json
import math

import pytest
import torch

from align.config import WeightingArgs
from align.errors import ConfigError
from align.runs import read_metrics
from align.trainers.reward import expected_calibration_error, load_reward_model, score, train_reward
from tests.helpers import load_tokenizer, pair_rows, reward_configs, write_pairs


class RewardProbe:
    """Snapshots trainable parameters, and scores the first pairs with the in-memory model at the end."""

    def __init__(self, rows, tokenizer):
        self.rows, self.tokenizer = rows, tokenizer

    def on_train_begin(self, model):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, model):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.eval()
        self.rewards = score(model, self.tokenizer, [r["prompt"] for r in self.rows], [r["chosen"] for r in self.rows])
        model.train()


def test_reward_model_trains_saves_and_loads(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    rows = pair_rows(tokenizer, n=10)
    rows[0]["margin"] = 2.0
    rows[1]["label"] = "tie"
    train_file = write_pairs(tmp_path / "train.jsonl", rows)
    eval_file = write_pairs(tmp_path / "eval.jsonl", pair_rows(tokenizer, n=6, offset=40))
    out = tmp_path / "rm"
    probe = RewardProbe(rows[:4], tokenizer)
    train_reward(*reward_configs(tiny_model_dir, train_file, eval_file, out), callbacks=[probe])

    assert [n for n in probe.before if torch.equal(probe.before[n], probe.after[n])] == []
    assert any("score" in n for n in probe.before)  # the head is trained, not only LoRA

    metrics = read_metrics(out / "metrics.jsonl")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    final = [m for m in metrics if "eval_accuracy" in m][-1]
    assert 0 <= final["eval_accuracy"] <= 1 and 0 <= final["eval_ece"] <= 1
    assert any(k.startswith("eval_accuracy/agreement_") for k in final)

    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["n"] == 20 and stats["std"] > 0
    version = json.loads((out / "version.json").read_text())
    assert version["method"] == "reward" and "eval_accuracy" in version["metrics"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    model, tok, loaded_stats = load_reward_model(out)
    assert loaded_stats == stats
    prompts, chosen = [r["prompt"] for r in rows[:4]], [r["chosen"] for r in rows[:4]]
    raw = score(model, tok, prompts, chosen, batch_size=3)
    assert raw == pytest.approx(probe.rewards, abs=1e-5)  # the same rewards as the model had in training
    normalised = score(model, tok, prompts, chosen, stats=loaded_stats)
    assert normalised == pytest.approx([(r - stats["mean"]) / stats["std"] for r in raw], abs=1e-5)
    # Over the whole training set the normalised rewards have mean 0 and std 1.
    every = score(model, tok, [r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows],
                  stats=loaded_stats)
    assert torch.tensor(every).mean().item() == pytest.approx(0.0, abs=1e-4)
    assert torch.tensor(every).std().item() == pytest.approx(1.0, abs=1e-3)


def test_expected_calibration_error_by_hand():
    assert expected_calibration_error(torch.zeros(4)) == pytest.approx(0.0)  # p = 0.5 both ways: calibrated
    # p = σ(log 3) = 0.75 but the labelled response always wins: pairs (0.75, 1) and (0.25, 0), each off by 0.25.
    assert expected_calibration_error(torch.full((5,), math.log(3))) == pytest.approx(0.25)
    assert math.isnan(expected_calibration_error(torch.zeros(0)))


def test_dynamic_weighting_is_refused_for_reward_models(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    train_file = write_pairs(tmp_path / "train.jsonl", pair_rows(tokenizer, n=4))
    model, lora, data, reward, _, train = reward_configs(tiny_model_dir, train_file, train_file, tmp_path / "rm")
    weighting = WeightingArgs(weighting_scheme="sequence", weighting_target="dynamic")
    with pytest.raises(ConfigError, match="dynamic applies to DPO"):
        train_reward(model, lora, data, reward, weighting, train)


def test_reward_stats_of_a_large_set_come_from_a_seeded_sample_of_its_pairs(tiny_model_dir, tmp_path, monkeypatch):
    import align.trainers.reward as reward_module

    assert reward_module.stats_subset(3, max_pairs=5) == [0, 1, 2]
    subset = reward_module.stats_subset(10, max_pairs=4)
    assert len(subset) == 4 == len(set(subset)) and subset == sorted(subset) and max(subset) < 10
    assert reward_module.stats_subset(10, max_pairs=4) == subset  # seeded
    monkeypatch.setattr(reward_module, "STATS_MAX_PAIRS", 4)
    tokenizer = load_tokenizer(tiny_model_dir)
    rows = pair_rows(tokenizer, n=10)
    out = tmp_path / "rm"
    train_reward(*reward_configs(tiny_model_dir, write_pairs(tmp_path / "train.jsonl", rows), "none", out))
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["n"] == 8
    model, tok, _ = load_reward_model(out)
    picked = [rows[i] for i in reward_module.stats_subset(10, max_pairs=4)]
    rewards = torch.tensor(score(model, tok, [r["prompt"] for r in picked] * 2,
                                 [r["chosen"] for r in picked] + [r["rejected"] for r in picked]), dtype=torch.float64)
    assert stats["mean"] == pytest.approx(rewards.mean().item(), abs=1e-4)
    assert stats["std"] == pytest.approx(rewards.std().item(), abs=1e-4)
