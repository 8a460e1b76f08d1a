"""DPO with LoRA: tie-aware, per-example weighted preference losses, importance weights for reused pairs.

The policy is the starting model plus a fresh LoRA adapter; the reference is the same model with the adapter
disabled, which is exactly the starting model (align.models merges earlier adapters into the base on load), so
no frozen copy is kept. Reference log-probs are computed either once before training (precompute_ref) or in
each step under `disable_adapter()`. Full fine-tuning has no adapter to disable and always precomputes.

Losses come from align.losses (sigmoid, ipo, robust, hinge; tie rows use Davidson's tie term; optional SFT term).
Per-example weights enter through the `weight` column: computed by the weighting config, or read from the file.
Metrics: loss, rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}, weights/ess_frac (at step 0)
and kl/ref: the mean over chosen responses of log π(y_c) - log π_ref(y_c). That is a cheap KL proxy, not
KL(π‖π_ref) itself (the chosen responses are samples of the labelled data, not of π), but it tracks drift.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from align import runs
from align.config import DPOArgs, LoraArgs, ModelArgs, PreferenceDataArgs, TrainArgs, WeightingArgs, save_config
from align.data import data_record
from align.losses import dpo_example_losses, implicit_rewards, preference_loss, sft_loss, weighted_mean
from align.memory import auto_batch
from align.models import (apply_lora, load_model, resolve_dtype, save_trained)
from align.packing import preference_collator, restore_attention
from align.preference import completion_logps, load_pair_sets, score_pairs, tokenize_sets
from align.publish import push
from align.trainers.loop import Task, open_run, train_loop
from align.trainers.pilot import LoraPilot
from align.trainers.weights import DynamicWeights, dataset_weights, report, scalar_diagnostics, weighted_batch
from align.weighting import SCHEMES

log = logging.getLogger(__name__)


class DPOObjective:
    """loss(model, batch) and eval_step(model, batch) for the loop (see align.trainers.loop.Task)."""

    def __init__(self, args: DPOArgs, weighting: WeightingArgs, accelerator: Any = None):
        self.args = args
        self.accelerator = accelerator
        self.dynamic = None
        if weighting.weighting_target == "dynamic":
            self.dynamic = DynamicWeights(weighting.weighting_scheme, weighting.weighting_alpha,
                                          weighting.weighting_clip, accelerator)
        # WPO's dynamic weight also moves its collision term, so both sides need it.
        self.need_collision = self.dynamic is not None and SCHEMES[weighting.weighting_scheme].needs_collision

    def reference(self, model: Any, batch: dict) -> dict[str, torch.Tensor]:
        if "ref_chosen_logps" in batch:
            return {k.removeprefix("ref_"): v for k, v in batch.items() if k.startswith("ref_")}
        peft_model = self.accelerator.unwrap_model(model) if self.accelerator else model
        with torch.no_grad(), peft_model.disable_adapter():  # the adapter off = the starting model
            return completion_logps(peft_model, batch, self.need_collision)

    def _loss_args(self, batch: dict) -> dict[str, Any]:
        soft = self.args.use_soft_labels
        return {"label_smoothing": 0.0 if soft else self.args.label_smoothing,
                "soft_label": batch["soft_label"] if soft else None}

    def __call__(self, model: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a = self.args
        policy = completion_logps(model, batch, self.need_collision)
        ref = self.reference(model, batch)
        weights = batch["weight"] if self.dynamic is None else self.dynamic(batch["weight"], policy, ref)
        loss, metrics = preference_loss(
            a.loss_type, policy["chosen_logps"], policy["rejected_logps"], ref["chosen_logps"], ref["rejected_logps"],
            a.beta, is_tie=batch["is_tie"], weights=weights, tie_nu=a.tie_nu, **self._loss_args(batch),
        )
        if a.sft_weight:
            # SFT on chosen responses of decided pairs only: a tie's (or both-bad's) "chosen" is not a target.
            nll = sft_loss(policy["chosen_logps"], policy["chosen_lengths"])
            decided = weights.detach() * (~batch["is_tie"]).to(weights.dtype)
            loss = loss + a.sft_weight * weighted_mean(nll, decided)
        metrics["kl/ref"] = (policy["chosen_logps"] - ref["chosen_logps"]).detach().mean()
        if self.dynamic is not None:
            metrics["weights/mean"] = weights.mean()
            metrics["weights/collapsed"] = torch.tensor(float(self.dynamic.collapsed))
        return loss, metrics

    def eval_step(self, model: Any, batch: dict) -> dict[str, torch.Tensor]:
        """Per-example values (unweighted: held-out data needs no correction)."""
        a = self.args
        policy = completion_logps(model, batch)
        ref = self.reference(model, batch)
        args = (policy["chosen_logps"], policy["rejected_logps"], ref["chosen_logps"], ref["rejected_logps"], a.beta)
        losses = dpo_example_losses(a.loss_type, *args, is_tie=batch["is_tie"], tie_nu=a.tie_nu,
                                    **self._loss_args(batch))
        h_chosen, h_rejected = implicit_rewards(*args)
        return {"loss": losses, "h_chosen": h_chosen, "h_rejected": h_rejected, "is_tie": batch["is_tie"].float(),
                "logps_chosen": policy["chosen_logps"], "logps_rejected": policy["rejected_logps"],
                "kl": policy["chosen_logps"] - ref["chosen_logps"]}

    @staticmethod
    def eval_summary(v: dict[str, torch.Tensor]) -> dict[str, float]:
        decided = v["is_tie"] == 0
        wins = (v["h_chosen"] > v["h_rejected"]).float()[decided]
        return {"loss": v["loss"].mean(), "rewards/chosen": v["h_chosen"].mean(),
                "rewards/rejected": v["h_rejected"].mean(), "rewards/margins": (v["h_chosen"] - v["h_rejected"]).mean(),
                "rewards/accuracies": wins.mean() if wins.numel() else math.nan,
                "logps/chosen": v["logps_chosen"].mean(), "logps/rejected": v["logps_rejected"].mean(),
                "kl/ref": v["kl"].mean()}


def attach_reference(features: list[dict], scores: dict[str, torch.Tensor]) -> None:
    """Store reference outputs as per-pair columns (ref_chosen_logps, ...), which the collator carries."""
    for name, values in scores.items():
        if name.endswith(("_logps", "_log_collision")):
            for feature, value in zip(features, values.tolist()):
                feature[f"ref_{name}"] = value


def _same_ids(a: Sequence[dict], b: Sequence[dict]) -> bool:
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    return all(x[k] == y[k] for x, y in zip(a, b) for k in keys)


@runs.guard_run
def train_dpo(
    model_args: ModelArgs, lora_args: LoraArgs, data_args: PreferenceDataArgs, dpo_args: DPOArgs,
    weighting: WeightingArgs, train: TrainArgs, command: Optional[str] = None, callbacks: Sequence[Any] = (),
) -> Path:
    """Run DPO end to end and return the run directory. `callbacks`: see align.trainers.loop.train_loop."""
    configs = (model_args, lora_args, data_args, dpo_args, weighting, train)
    repo = runs.preflight(train)
    accelerator, out = open_run(train, resolve_dtype(model_args.dtype))
    train_set, eval_set = load_pair_sets(data_args, dpo_args.both_bad)
    model, tokenizer = load_model(model_args, device=str(accelerator.device))
    collator, attention = preference_collator(model, tokenizer.pad_token_id, dpo_args.padding_free,
                                              dpo_args.label_smoothing)
    full, features, counts, eval_features = tokenize_sets(train_set, eval_set, tokenizer, data_args,
                                                          strict_ids=weighting.weighting_scheme not in ("none", "auto"))
    interference = runs.stage_interference(accelerator, dpo_args, model_args.model, "dpo", tokenizer, dpo_args.sft_weight)
    if interference is not None:
        interference.start(model)  # the starting model, before any adapter

    def score(feats: Sequence[dict], with_collision: bool) -> dict[str, torch.Tensor]:
        return score_pairs(model, feats, collator, train.per_device_eval_batch_size, accelerator, with_collision)

    # Static target = the starting model = the reference: score it before the adapter exists.
    def make_pilot(scores: dict[str, torch.Tensor]) -> LoraPilot:  # weighting auto's evidence: short DPO fits
        return LoraPilot(model, full, scores, collator, dpo_args.beta, lora_args, weighting.weighting_auto_steps,
                         train.learning_rate, train.per_device_eval_batch_size, train.seed)

    weights, target = dataset_weights(train_set, full, weighting, score, make_pilot)
    for feature, w in zip(features, weights.weights.tolist()):
        feature["weight"] = w
    objective = DPOObjective(dpo_args, weighting, accelerator)
    if dpo_args.precompute_ref or not lora_args.use_lora:
        # The reference runs in the policy's precision (under its autocast), so that policy == reference at step 0
        # gives exactly log 2; the weights' target above was scored without autocast, in float32 where the weights are.
        autocast = accelerator.mixed_precision == "bf16"
        reusable = not autocast and target is not None and _same_ids(full, features) and (
            not objective.need_collision or "chosen_log_collision" in target)
        with accelerator.autocast() if autocast else contextlib.nullcontext():
            attach_reference(features, target if reusable else score(features, objective.need_collision))
            if eval_features:
                attach_reference(eval_features, score(eval_features, False))
    if lora_args.use_lora:
        model = apply_lora(model, lora_args)
    if accelerator.is_main_process:
        save_config(out / "config.yaml", *configs)
    report(weights, train_set, out if accelerator.is_main_process else None)

    start = {**runs.data_metrics(train_set, counts), **scalar_diagnostics(weights.diagnostics)}
    task = Task(features, collator, objective, eval_features, objective.eval_step, objective.eval_summary,
                state=objective.dynamic)
    train = weighted_batch(train, weights, weighting, accelerator.num_processes, len(features))
    if train.auto_batch:  # after weighted_batch: the global batch it sets is kept
        train = auto_batch(accelerator, model, task, train, "dpo", data_args.max_length or 1024)
    start["weights/pairs_per_step"] = (train.per_device_train_batch_size * accelerator.num_processes
                                       * train.gradient_accumulation_steps)
    metrics, prepared = train_loop(accelerator, model, task, train, out, start_metrics=start, callbacks=callbacks)
    restore_attention(accelerator.unwrap_model(prepared), attention)
    metrics.update({k: start[k] for k in ("weights/ess_frac", "data/both_bad_dropped")})
    if "auto" in weights.diagnostics:
        metrics["weighting_auto"] = {k: weights.diagnostics["auto"][k] for k in ("choice", "reason")}
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(prepared)  # every rank: gathers FSDP2/ZeRO-3 shards
    if accelerator.is_main_process:
        model_dir = save_trained(accelerator.unwrap_model(prepared), tokenizer, out, model_args.model, train.merge,
                                 state_dict=state_dict)
        if interference is not None:
            metrics.update(interference.finish(accelerator.unwrap_model(prepared), out))
        runs.write_run_record(out, "dpo", model_args, model_dir, data_args, configs, metrics, tokenizer, command,
                         data_record(data_args, train_set, eval_set, counts))
        if repo:
            push(out, model_dir, repo)
    accelerator.wait_for_everyone()
    return out
