"""Reward model: any causal LM with a scalar head, trained on preference pairs (Bradley–Terry).

The model is `AutoModelForSequenceClassification(num_labels=1)` built from the causal LM's weights: the reward is
the head's output at the last non-padding token. LoRA adapts the body and the `score` head is fully trained
(peft `modules_to_save`). The loss is align.losses.reward_pairwise_loss: -log σ(r_c - r_r - m) with the margin m =
margin_scale · the `margin` column, Davidson's tie term for ties, optional centering, and per-example weights from
the same weighting config as DPO (static target: the causal LM the run starts from, i.e. the policy RLHF will
train, scored once before training).

Held-out metrics: accuracy, accuracy by annotator-agreement bucket, expected calibration error of σ(r_c - r_r).
Artefacts as every run, plus DIR/reward_stats.json: mean and std of the rewards over the training set (a seeded
sample of 512 pairs of a larger one), which `score` uses to return normalised rewards. `load_reward_model(run_dir)`
loads it all back for RLHF and eval.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from align import runs
from align.config import LoraArgs, ModelArgs, PreferenceDataArgs, RewardArgs, TrainArgs, WeightingArgs, save_config
from align.data import as_messages, data_record, prompt_ids
from align.errors import ConfigError, ModelError
from align.losses import reward_example_losses, reward_pairwise_loss
from align.memory import auto_batch
from align.models import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_model, save_trained
from align.packing import packed_rewards, preference_collator, restore_attention
from align.preference import PreferenceCollator, load_pair_sets, response_text, score_pairs, tokenize_sets
from align.publish import push
from align.trainers.loop import Task, open_run, train_loop
from align.trainers.weights import dataset_weights, report, scalar_diagnostics, weighted_batch

log = logging.getLogger(__name__)

AGREEMENT_BUCKETS = ((0.0, 0.6), (0.6, 0.8), (0.8, 1.0001))  # label_agreement ranges for held-out accuracy


def load_sequence_classifier(spec: str, revision: Optional[str], dtype: str, pad_token_id: int) -> Any:
    """The causal LM of `spec` (adapters merged, like align.models.load_model) with a fresh scalar head."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSequenceClassification

    from transformers.utils import logging as hf_logging

    resolved = resolve_model(spec, revision)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is new by design: skip transformers' "score.weight MISSING" report
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolved.path, num_labels=1, dtype=resolve_dtype(dtype), revision=resolved.revision)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {spec} as a sequence classifier: {str(exc).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    for adapter in resolved.adapters:
        # A causal-LM adapter on a classifier body: load it task-agnostic, or peft asks for generation methods.
        config = PeftConfig.from_pretrained(adapter)
        config.task_type = None
        model = PeftModel.from_pretrained(model, adapter, config=config).merge_and_unload()
    model.requires_grad_(True)  # peft froze the merged base; LoRA (if any) freezes it again on top
    model.config.pad_token_id = pad_token_id  # the head reads the last token that is not padding
    return model


def apply_reward_lora(model: Any, args: LoraArgs) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules="all-linear" if targets == ["all-linear"] else targets,
                        task_type="SEQ_CLS", modules_to_save=["score"])
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ModelError(f"cannot apply LoRA to {targets}: {str(exc).splitlines()[0]}") from None


def pair_rewards(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the 2B rows (or the packed row, align/packing.py) -> (r_chosen, r_rejected), (B,) float32."""
    if "segments" in batch:
        return packed_rewards(model, batch)
    rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).float()
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


class RewardObjective:
    """loss(model, batch) and eval_step(model, batch) for the loop (see align.trainers.loop.Task)."""

    def __init__(self, args: RewardArgs):
        self.args = args

    def margin(self, batch: dict) -> Optional[torch.Tensor]:
        return batch["margin"] * self.args.margin_scale if self.args.margin_scale else None

    def __call__(self, model: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r_c, r_r = pair_rewards(model, batch)
        return reward_pairwise_loss(r_c, r_r, margin=self.margin(batch), is_tie=batch["is_tie"],
                                    weights=batch["weight"], center_coef=self.args.center_coef,
                                    tie_nu=self.args.tie_nu)

    def eval_step(self, model: Any, batch: dict) -> dict[str, torch.Tensor]:
        r_c, r_r = pair_rewards(model, batch)
        losses = reward_example_losses(r_c, r_r, margin=self.margin(batch), is_tie=batch["is_tie"],
                                       tie_nu=self.args.tie_nu)
        return {"loss": losses, "r_chosen": r_c, "r_rejected": r_r, "is_tie": batch["is_tie"].float(),
                "agreement": batch["label_agreement"]}

    @staticmethod
    def eval_summary(v: dict[str, torch.Tensor]) -> dict[str, float]:
        decided = v["is_tie"] == 0
        diff = (v["r_chosen"] - v["r_rejected"])[decided]
        wins = (diff > 0).float()
        out = {"loss": float(v["loss"].mean()), "accuracy": float(wins.mean()) if wins.numel() else math.nan,
               "margin": float(diff.mean()) if diff.numel() else math.nan, "ece": expected_calibration_error(diff),
               "rewards/chosen": float(v["r_chosen"].mean()), "rewards/rejected": float(v["r_rejected"].mean())}
        agreement = v["agreement"][decided]
        for lo, hi in AGREEMENT_BUCKETS:
            inside = (agreement >= lo) & (agreement < hi)
            if bool(inside.any()):
                out[f"accuracy/agreement_{lo:.1f}-{min(hi, 1.0):.1f}"] = float(wins[inside].mean())
        return out


def expected_calibration_error(diff: torch.Tensor, bins: int = 10) -> float:
    """ECE of p = σ(r_c - r_r) as the probability that the labelled-chosen response wins.

    Every outcome is "chosen won", so each pair is counted both ways, (p, 1) and (1 - p, 0); otherwise ECE would
    just be the mean of 1 - p. Equal-width bins on [0, 1]; Σ_bins (n_b / n)·|mean p - mean outcome|.
    """
    if diff.numel() == 0:
        return math.nan
    p = torch.sigmoid(diff.double())
    probs, outcomes = torch.cat([p, 1 - p]), torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    which = (probs * bins).long().clamp_max(bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if bool(inside.any()):
            ece += float(inside.double().mean()) * abs(float(probs[inside].mean() - outcomes[inside].mean()))
    return ece


def _weights(train_set, full, model_args, weighting, collator, batch_size, accelerator):
    """Static weights: the target is the causal LM the run starts from (loaded only when a scheme needs it)."""
    def score(feats: Sequence[dict], with_collision: bool) -> dict[str, torch.Tensor]:
        causal, _ = load_model(model_args, device=str(accelerator.device))  # freed on return, before the classifier
        return score_pairs(causal, feats, collator, batch_size, accelerator, with_collision)

    return dataset_weights(train_set, full, weighting, score)[0]


# Pairs whose responses give the normalisation stats: the mean of 2 x 512 rewards is within about 0.03 std of the
# whole set's, while scoring every pair of a large set costs a forward pass over all of it.
STATS_MAX_PAIRS = 512


def stats_subset(n: int, max_pairs: Optional[int] = None, seed: int = 0) -> list[int]:
    """Indices of the training pairs reward_stats scores: all of them up to `max_pairs` (STATS_MAX_PAIRS), else a
    seeded sample of that many."""
    max_pairs = STATS_MAX_PAIRS if max_pairs is None else max_pairs
    if n <= max_pairs:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_pairs))


def reward_stats(model: Any, features: Sequence[dict], collator: PreferenceCollator, batch_size: int,
                 accelerator: Any) -> dict[str, float]:
    """Mean and std of the rewards of the training responses (chosen and rejected), for normalisation: of every
    pair up to STATS_MAX_PAIRS, else of a seeded sample of that many (stats_subset)."""
    def fn(m: Any, batch: dict) -> dict[str, torch.Tensor]:
        r_c, r_r = pair_rewards(m, batch)
        return {"chosen": r_c, "rejected": r_r}

    features = [features[i] for i in stats_subset(len(features))]
    scores = score_pairs(model, features, collator, batch_size, accelerator, fn=fn)
    rewards = torch.cat([scores["chosen"], scores["rejected"]])
    std = float(rewards.std()) if rewards.numel() > 1 else 1.0
    return {"mean": float(rewards.mean()), "std": std if std > 0 else 1.0, "n": int(rewards.numel())}


@runs.guard_run
def train_reward(
    model_args: ModelArgs, lora_args: LoraArgs, data_args: PreferenceDataArgs, reward_args: RewardArgs,
    weighting: WeightingArgs, train: TrainArgs, command: Optional[str] = None, callbacks: Sequence[Any] = (),
) -> Path:
    """Train a reward model end to end and return the run directory."""
    if weighting.weighting_target == "dynamic":
        raise ConfigError("weighting_target: dynamic applies to DPO; a reward model's target is the policy of the "
                          "next RLHF round, so recompute static weights per round instead")
    configs = (model_args, lora_args, data_args, reward_args, weighting, train)
    repo = runs.preflight(train)
    accelerator, out = open_run(train, resolve_dtype(model_args.dtype))
    train_set, eval_set = load_pair_sets(data_args, reward_args.both_bad)
    tokenizer = load_tokenizer(model_args.model, model_args.chat_template)
    collator = PreferenceCollator(tokenizer.pad_token_id)
    full, features, counts, eval_features = tokenize_sets(train_set, eval_set, tokenizer, data_args,
                                                          strict_ids=weighting.weighting_scheme not in ("none", "auto"))
    weights = _weights(train_set, full, model_args, weighting, collator, train.per_device_eval_batch_size,
                       accelerator)
    for feature, w in zip(features, weights.weights.tolist()):
        feature["weight"] = w
    model = load_sequence_classifier(model_args.model, model_args.revision, model_args.dtype, tokenizer.pad_token_id)
    model.to(accelerator.device)
    batches, attention = preference_collator(model, tokenizer.pad_token_id, reward_args.padding_free)
    if lora_args.use_lora:
        model = apply_reward_lora(model, lora_args)
    if accelerator.is_main_process:
        save_config(out / "config.yaml", *configs)
    report(weights, train_set, out if accelerator.is_main_process else None)

    objective = RewardObjective(reward_args)
    start = {**runs.data_metrics(train_set, counts), **scalar_diagnostics(weights.diagnostics)}
    task = Task(features, batches, objective, eval_features, objective.eval_step, objective.eval_summary)
    train = weighted_batch(train, weights, weighting, accelerator.num_processes, len(features))
    if train.auto_batch:  # after weighted_batch: the global batch it sets is kept
        train = auto_batch(accelerator, model, task, train, "reward", data_args.max_length or 1024)
    start["weights/pairs_per_step"] = (train.per_device_train_batch_size * accelerator.num_processes
                                       * train.gradient_accumulation_steps)
    metrics, prepared = train_loop(accelerator, model, task, train, out, start_metrics=start, callbacks=callbacks)
    stats = reward_stats(model, features, batches, train.per_device_eval_batch_size, accelerator)
    restore_attention(accelerator.unwrap_model(prepared), attention)
    metrics.update({"reward_mean": stats["mean"], "reward_std": stats["std"],
                    **{k: start[k] for k in ("weights/ess_frac", "data/both_bad_dropped")}})
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(prepared)  # every rank: gathers FSDP2/ZeRO-3 shards
    if accelerator.is_main_process:
        runs.write_json(out / "reward_stats.json", stats)
        model_dir = save_trained(accelerator.unwrap_model(prepared), tokenizer, out, model_args.model, train.merge,
                                 state_dict=state_dict)
        runs.write_run_record(out, "reward", model_args, model_dir, data_args, configs, metrics, tokenizer, command,
                         data_record(data_args, train_set, eval_set, counts))
        if repo:
            push(out, model_dir, repo)
    accelerator.wait_for_everyone()
    return out


# --- using a trained reward model -------------------------------------------------------------------------------------


def load_reward_model(run_dir: str | Path, device: Optional[str] = None) -> tuple[Any, Any, dict[str, float]]:
    """(model in eval mode, tokenizer, stats {mean, std, n}) of a reward run directory; `device` as in load_model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = Path(run_dir)
    if not (run / "reward_stats.json").is_file():
        raise ModelError(f"{run} is not a finished reward-model run (no reward_stats.json)")
    stats = json.loads((run / "reward_stats.json").read_text())
    dtype = json.loads((run / "version.json").read_text())["config"].get("dtype", "auto")
    if (run / "merged").is_dir():
        model = AutoModelForSequenceClassification.from_pretrained(run / "merged", dtype=resolve_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    else:
        from peft import PeftModel

        adapter = run / "adapter"
        tokenizer = AutoTokenizer.from_pretrained(adapter)
        base_spec = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = load_sequence_classifier(base_spec, None, dtype, tokenizer.pad_token_id)
        model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    device = resolve_device(device)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer, stats


def score(
    model: Any, tokenizer: Any, prompts_messages: Sequence[Any], responses: Sequence[Any], batch_size: int = 8,
    stats: Optional[dict[str, float]] = None,
) -> list[float]:
    """Rewards of responses to prompts, tokenised as training does without stored ids (text + eos), normalised as
    (r - mean) / std with `stats` (from load_reward_model; None: raw rewards). Prompts are strings or messages;
    responses strings or one assistant message."""
    if len(prompts_messages) != len(responses):
        raise ValueError(f"{len(prompts_messages)} prompts but {len(responses)} responses")
    seqs = []
    for i, (prompt, response) in enumerate(zip(prompts_messages, responses)):
        text = response_text(response, "response", f"response {i}")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(prompt_ids(tokenizer, as_messages(prompt)) + ids)
    device = next(model.parameters()).device
    rewards: list[float] = []
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            width = max(map(len, chunk))
            input_ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in chunk], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
            rewards += model(input_ids=input_ids, attention_mask=mask).logits.squeeze(-1).float().tolist()
    if stats is None:
        return rewards
    return [(r - stats["mean"]) / stats["std"] for r in rewards]
