"""DPO on a tiny model: trains, changes every trainable parameter, saves artefacts, resumes; the loss is exact at
init, zero-weight pairs contribute nothing, ties use the tie term, bad inputs fail clearly."""

import contextlib
import json
import math

import pytest
import torch

from align.config import DPOArgs, LoraArgs, ModelArgs, WeightingArgs
from align.errors import AlignError, DataError
from align.models import apply_lora, load_model
from align.preference import PreferenceCollator, load_preferences, tokenize_pairs
from align.runs import read_metrics
from align.trainers.dpo import DPOObjective, train_dpo
from tests.helpers import dpo_configs as configs, write_pairs


class ParamSnapshot:
    """Trainable parameters at the start and end of training (align.trainers.loop callbacks)."""

    def on_train_begin(self, model):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, model):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_dpo_trains_and_saves(tiny_model_dir, data_files, tmp_path):
    out = tmp_path / "run"
    snap = ParamSnapshot()
    train_dpo(*configs(tiny_model_dir, data_files, out), callbacks=[snap])

    assert snap.before.keys() == snap.after.keys() and len(snap.before) > 0
    assert [n for n in snap.before if torch.equal(snap.before[n], snap.after[n])] == []

    metrics = read_metrics(out / "metrics.jsonl")
    train_rows = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train_rows] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) for m in train_rows)
    # Hand check: at init the policy IS the reference, so h = 0 and -log σ(0) = log 2 for every pair (weights 1).
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train_rows[0]["kl/ref"] == pytest.approx(0.0, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "kl/ref"):
        assert key in train_rows[0], key
    start = metrics[0]
    assert start["step"] == 0 and start["data/both_bad_dropped"] == 1 and start["weights/ess_frac"] == 1.0
    assert any("eval_loss" in m and "eval_rewards/accuracies" in m for m in metrics)

    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "weights.png").is_file() and (out / "config.yaml").is_file() and (out / "README.md").is_file()
    assert json.loads((out / "weights.json").read_text())["diagnostics"]["weights/n"] == 11
    version = json.loads((out / "version.json").read_text())
    assert version["method"] == "dpo" and version["parent"] == str(tiny_model_dir.resolve())
    assert len(version["data_hash"]) == 16 and version["metrics"]["global_step"] == 4
    assert version["metrics"]["data/both_bad_dropped"] == 1


def test_resume_continues_from_checkpoint(tiny_model_dir, data_files, tmp_path):
    out = tmp_path / "run"
    weighting = WeightingArgs(weighting_scheme="sequence", weighting_target="dynamic")  # also checkpoints its state
    train_dpo(*configs(tiny_model_dir, data_files, out, weighting=weighting, max_steps=2, eval_steps=0))
    with pytest.raises(AlignError, match="already holds a run; pass --resume"):
        train_dpo(*configs(tiny_model_dir, data_files, out, weighting=weighting, max_steps=4))
    train_dpo(*configs(tiny_model_dir, data_files, out, weighting=weighting, max_steps=4, eval_steps=0, resume=True))
    steps = [m["step"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert steps == [1, 2, 3, 4]  # nothing retrained, nothing skipped
    assert json.loads((out / "version.json").read_text())["metrics"]["global_step"] == 4


@pytest.fixture(scope="module")
def policy_and_batch(tiny_model_dir, data_files):
    """A LoRA policy at init (B = 0, so policy == reference) and features of the training file."""
    torch.manual_seed(0)
    model, tokenizer = load_model(ModelArgs(model=str(tiny_model_dir)))
    model = apply_lora(model, LoraArgs(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    _, features, _ = tokenize_pairs(load_preferences(data_files[0]), tokenizer, 128, 64)
    return model, features, PreferenceCollator(tokenizer.pad_token_id)


def test_loss_at_init_without_precomputed_reference(policy_and_batch):
    model, features, collate = policy_and_batch
    objective = DPOObjective(DPOArgs(beta=0.1), WeightingArgs())
    loss, metrics = objective(model, collate(features[:4]))  # reference = this model under disable_adapter()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["kl/ref"].item() == 0.0


def test_tie_rows_use_the_tie_term(policy_and_batch):
    model, features, collate = policy_and_batch
    objective = DPOObjective(DPOArgs(beta=0.1, tie_nu=1.0), WeightingArgs())
    ties = [dict(f, is_tie=True) for f in features[:2]]
    # Davidson at h = 0: -log P(tie) = log((2 + ν)/ν) = log 3 for ν = 1.
    assert objective(model, collate(ties))[0].item() == pytest.approx(math.log(3), abs=1e-6)
    mixed = [ties[0], features[1]]
    loss, metrics = objective(model, collate(mixed))
    assert loss.item() == pytest.approx((math.log(3) + math.log(2)) / 2, abs=1e-6)


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@contextlib.contextmanager
def moved_lora(model):
    """Move every LoRA B off zero (policy != reference, gradients reach every LoRA matrix), then restore."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.zero_()


def test_zero_weight_pair_changes_nothing(policy_and_batch):
    model, features, collate = policy_and_batch
    objective = DPOObjective(DPOArgs(beta=0.1, sft_weight=0.5), WeightingArgs())
    good = [dict(f) for f in features[:2]]
    garbage = dict(features[2], chosen_ids=features[2]["chosen_ids"] * 3, weight=0.0)  # longer: padding changes too
    with moved_lora(model):
        with_garbage = _grads(model, objective(model, collate(good + [garbage]))[0])
        without = _grads(model, objective(model, collate(good))[0])
    # The loss is Σ w·l / B: B = 3 with the zero-weight row, 2 without it.
    for a, b in zip(with_garbage, without):
        torch.testing.assert_close(a * 3 / 2, b, rtol=1e-4, atol=1e-7)
    assert any(b.abs().sum() > 0 for b in without)


def test_soft_labels_from_annotator_agreement(policy_and_batch):
    model, features, collate = policy_and_batch
    sure = collate([dict(f, soft_label=1.0) for f in features[:3]])
    unsure = collate([dict(f, soft_label=0.5) for f in features[:3]])
    robust = DPOObjective(DPOArgs(loss_type="robust", use_soft_labels=True), WeightingArgs())
    with moved_lora(model), torch.no_grad():
        plain = DPOObjective(DPOArgs(loss_type="sigmoid"), WeightingArgs())(model, sure)[0]
        h = robust(model, unsure)[1]["rewards/margins"]  # the same margins for every row's loss below
        assert robust(model, sure)[0].item() == pytest.approx(plain.item(), abs=1e-6)  # agreement 1 = plain DPO
        # agreement 0.5: -(½ log σ(h) + ½ log σ(-h)), symmetric in h, never below log 2.
        assert robust(model, unsure)[0].item() >= math.log(2) - 1e-6
        assert abs(h.item()) > 0


def test_missing_generation_logps_fail_with_advice(tiny_model_dir, data_files, tmp_path):
    rows = [json.loads(line) for line in data_files[0].read_text().splitlines()]
    del rows[3]["gen_rejected_logps"]
    path = write_pairs(tmp_path / "train.jsonl", rows)
    model, lora, data, dpo, _, train = configs(tiny_model_dir, (path, None), tmp_path / "run")
    data.eval_file = None
    with pytest.raises(DataError) as info:
        train_dpo(model, lora, data, dpo, WeightingArgs(weighting_scheme="sequence"), train)
    assert f"{path}:4" in str(info.value) and "wpo" in str(info.value) and "align rescore" in str(info.value)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust", "hinge"])
def test_evaluation_scores_pairs_with_the_training_loss(policy_and_batch, loss_type):
    """eval_step's per-example losses average to the training loss at unit weights, ties included: both call
    align.losses.dpo_example_losses."""
    model, features, collate = policy_and_batch
    smoothing = 0.2 if loss_type == "robust" else 0.0
    objective = DPOObjective(DPOArgs(beta=0.1, loss_type=loss_type, label_smoothing=smoothing), WeightingArgs())
    batch = collate([dict(features[0], is_tie=True)] + [dict(f) for f in features[1:4]])
    with moved_lora(model), torch.no_grad():
        loss, metrics = objective(model, batch)
        values = objective.eval_step(model, batch)
    assert values["loss"].mean().item() == pytest.approx(loss.item(), rel=1e-6)
    margins = (values["h_chosen"] - values["h_rejected"]).mean()
    assert margins.item() == pytest.approx(metrics["rewards/margins"].item(), rel=1e-6)
    assert bool(values["loss"][0] != values["loss"][1])  # the tie row has its own term
