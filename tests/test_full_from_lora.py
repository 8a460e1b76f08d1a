"""Full fine-tuning (use_lora: false) starting from a LoRA run directory or an adapter directory: the adapter is
merged and every parameter of the merged model trains, in SFT, DPO and reward."""

import pytest
import torch
from transformers import TrainerCallback

from align.config import DPOArgs, LoraArgs, ModelArgs, PreferenceDataArgs, RewardArgs, SFTDataArgs, TrainArgs, WeightingArgs
from tests.helpers import write


class LoopSnapshot:
    """Every parameter (not only trainable ones) at the start and end of the own loop."""

    def on_train_begin(self, model):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = sum(p.requires_grad for p in model.parameters())

    def on_train_end(self, model):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


class TrainerSnapshot(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        LoopSnapshot.on_train_begin(self, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        LoopSnapshot.on_train_end(self, model)


def train(out, steps):
    return TrainArgs(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, eval_steps=0, save_steps=10, report_to="none", seed=0, warmup_steps=0)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    from align.trainers.sft import train_sft

    root = tmp_path_factory.mktemp("full-from-lora")
    chat = write(root / "chat.jsonl", [{"prompt": f"What is {i} + {i}?", "completion": str(2 * i)} for i in range(8)])
    pairs = write(root / "pairs.jsonl", [{"prompt": f"What is {i} + {i}?", "chosen": str(2 * i), "rejected": f"{i}?"}
                                         for i in range(8)])
    run = train_sft(ModelArgs(model=str(tiny_model_dir)), LoraArgs(lora_r=2, lora_alpha=4),
                    SFTDataArgs(train_file=str(chat), eval_file=None, max_length=64), train(root / "lora", 1))
    return run, chat, pairs


def assert_all_changed(snap):
    assert snap.trainable == len(snap.before) > 0  # every parameter trainable: nothing left frozen by the merge
    unchanged = [n for n in snap.before if torch.equal(snap.before[n], snap.after[n])]
    assert unchanged == []


@pytest.mark.parametrize("start", ["run", "adapter"])
def test_sft_full_from_lora(start, lora_run, tmp_path):
    from align.trainers.sft import train_sft

    run, chat, _ = lora_run
    snap = TrainerSnapshot()
    spec = run if start == "run" else run / "adapter"
    out = train_sft(ModelArgs(model=str(spec)), LoraArgs(use_lora=False),
                    SFTDataArgs(train_file=str(chat), eval_file=None, max_length=64), train(tmp_path / "full", 2),
                    extra_callbacks=[snap])
    assert_all_changed(snap)
    assert (out / "merged" / "model.safetensors").is_file()


def test_dpo_full_from_lora(lora_run, tmp_path):
    from align.trainers.dpo import train_dpo

    run, _, pairs = lora_run
    snap = LoopSnapshot()
    train_dpo(ModelArgs(model=str(run)), LoraArgs(use_lora=False),
              PreferenceDataArgs(train_file=str(pairs), max_length=64, max_prompt_length=32), DPOArgs(),
              WeightingArgs(), train(tmp_path / "dpo", 2), callbacks=[snap])
    assert_all_changed(snap)


def test_reward_full_from_lora(lora_run, tmp_path):
    from align.trainers.reward import train_reward

    run, _, pairs = lora_run
    snap = LoopSnapshot()
    train_reward(ModelArgs(model=str(run / "adapter")), LoraArgs(use_lora=False),
                 PreferenceDataArgs(train_file=str(pairs), max_length=64, max_prompt_length=32), RewardArgs(),
                 WeightingArgs(), train(tmp_path / "reward", 2), callbacks=[snap])
    assert_all_changed(snap)
