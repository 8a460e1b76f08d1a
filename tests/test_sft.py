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


@pytest.mark.parametrize("padding_free,bf16", [(False, False), (True, False), (True, True)])
def test_sft_loss_over_labelled_tokens_equals_trl(tiny_model_dir, tmp_path, padding_free, bf16):
    """Our SFT loss (the head over the assistant tokens only) equals TRL's fused-head loss on the same batch, with
    and without a token count from gradient accumulation, and so do every LoRA gradient; under CPU bf16 autocast
    (`mixed_precision: bf16`) to bf16 round-off."""
    import contextlib

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from align import packing
    from align.config import LoraArgs, ModelArgs
    from align.logprobs import plain_head
    from align.models import apply_lora, load_model
    from align.trainers.sft import sft_trainer_class

    model, tokenizer = load_model(ModelArgs(model=str(tiny_model_dir)))
    model = apply_lora(model, LoraArgs(lora_r=4, lora_alpha=8))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    rows = [{"input_ids": list(range(5 + i, 25 + 3 * i)), "labels": [-100] * (6 + i) + list(range(11 + 2 * i, 25 + 3 * i))}
            for i in range(3)]
    if padding_free:
        packing.use_packed_attention(model)
    trainer = sft_trainer_class()(model=model, args=SFTConfig(output_dir=str(tmp_path), report_to="none", bf16=False,
                                                               padding_free=padding_free, max_length=None),
                                  train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)(rows)
    assert plain_head(trainer.model) is not None  # ours is the chunked path, not TRL's loss again
    results = {}
    for name, compute in (("ours", trainer.compute_loss), ("trl", lambda *a, **k: SFTTrainer.compute_loss(trainer, *a, **k))):
        for count in (None, torch.tensor(50)):
            trainer.model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = compute(trainer.model, dict(batch), num_items_in_batch=count)
            loss.backward()
            results[name, count is None] = (loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                                            if p.grad is not None})
    for count in (True, False):
        (ours, our_grads), (theirs, their_grads) = results["ours", count], results["trl", count]
        torch.testing.assert_close(ours, theirs, rtol=1e-2 if bf16 else 1e-5, atol=1e-6)
        assert our_grads.keys() == their_grads.keys() and our_grads
        for n, g in their_grads.items():
            scale = float(g.abs().max())
            torch.testing.assert_close(our_grads[n], g, rtol=5e-2 if bf16 else 1e-4, atol=(5e-2 if bf16 else 1e-5) * scale)
    assert not torch.equal(results["ours", True][0], results["ours", False][0])  # the token count is used
