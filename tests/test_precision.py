"""bf16 training steps (`mixed_precision: bf16`) over float32 weights: the reference runs under the policy's autocast,
so policy == reference at step 0 still gives exactly log 2, while log-probs, losses and weights stay float32."""

import math

import pytest
import torch

from align.config import DPOArgs, TrainArgs
from align.runs import read_metrics
from align.trainers.loop import make_accelerator


def test_mixed_precision_choices():
    """auto: autocast only for bf16 weights; bf16: over float32 weights too; no: never."""
    def mode(value, dtype):
        return make_accelerator(TrainArgs(mixed_precision=value), dtype).mixed_precision

    assert mode("auto", torch.float32) == "no" and mode("auto", torch.bfloat16) == "bf16"
    assert mode("bf16", torch.float32) == "bf16" and mode("no", torch.bfloat16) == "no"


@pytest.mark.parametrize("precompute_ref", [True, False])
def test_bf16_dpo_step_zero_is_log_2_and_differs_from_float32(tiny_model_dir, tmp_path, precompute_ref):
    """Step 1 (LoRA B = 0: policy == reference): the loss is log 2 to float32 round-off under bf16 autocast, with
    the reference precomputed or computed in the step; the policy's log-probs are bf16 ones (they differ from a
    float32 run's by bf16 round-off, not more), so autocast really ran."""
    from tests.helpers import dpo_configs as configs, load_tokenizer, pair_rows, write_pairs

    from align.trainers.dpo import train_dpo

    tokenizer = load_tokenizer(tiny_model_dir)
    data = (write_pairs(tmp_path / "train.jsonl", pair_rows(tokenizer, n=8)),
            write_pairs(tmp_path / "eval.jsonl", pair_rows(tokenizer, 4, offset=50)))
    first = {}
    for precision in ("bf16", "no"):
        out = tmp_path / precision
        train_dpo(*configs(tiny_model_dir, data, out, dpo=DPOArgs(precompute_ref=precompute_ref), max_steps=1,
                           eval_steps=0, save_steps=10, mixed_precision=precision))
        first[precision] = next(r for r in read_metrics(out / "metrics.jsonl") if "loss" in r)
    assert first["bf16"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["no"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    ours, exact = first["bf16"]["logps/chosen"], first["no"]["logps/chosen"]
    assert ours != exact and ours == pytest.approx(exact, rel=2e-2)
