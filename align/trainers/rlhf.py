"""Online RL against a trained reward model, with a LoRA policy: RLOO (default) or GRPO, both TRL trainers.

Per step: sample `num_generations` completions per prompt from the policy (HF generate, or vLLM), score them with
the reward model, subtract the KL penalty to the reference, and take a policy-gradient step on the advantages.

- Reward: the reward model's output normalised with the mean/std it saved over its training set
  (align.trainers.reward.score), minus `length_penalty` per completion token. RLOO then baselines each completion
  with the mean of the other completions of its prompt; GRPO with its group's mean, scaled by the group's std.
- KL: the reference is the starting model, i.e. the policy with its LoRA adapter disabled (align.models merges any
  SFT adapter into the base first). RLOO subtracts β·Σ_t log(π/π_ref) from each sequence's reward; GRPO adds
  β·k3 per token to the loss. `kl_target` turns on an adaptive β (AdaptiveKLController below).
- Evaluation: every `eval_steps` steps (and before the first and after the last) greedy answers to a stratified
  held-out subset of task prompts are scored by their gold checks (`eval/gold_reward`, `eval/gold/<family>`), by
  the training reward model (`eval/proxy_reward`) and by an optional held-out judge reward model.
- The reward-hacking monitor (align/monitor.py) watches all of it.

PPO with a value head is not offered: TRL removed PPOTrainer, and RLOO/GRPO reach PPO's quality on LLM alignment
without a value model to train and hold in memory (Ahmadian et al. 2024).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

from transformers import Trainer, TrainerCallback

from align import runs
from align.config import (LoraArgs, ModelArgs, MonitorArgs, PromptDataArgs, RLHFArgs, TrainArgs, save_config,
                          to_dict)
from align.data import as_messages
from align.errors import ConfigError, DataError
from align.evaluate import answer_tasks, gold_summary, stratified
from align.generation import SamplingSettings, vllm_missing
from align.models import apply_lora, load_model, resolve_dtype, save_trained
from align.monitor import RewardHackingMonitor, push_audit_pairs, rollout_stats
from align.prompts import read_prompts
from align.publish import push
from align.tasks import load_tasks, score_response
from align.trainers.reward import load_reward_model, score

log = logging.getLogger(__name__)


# ---- data ----------------------------------------------------------------------------------------------------------


def prompt_dataset(path: str, limit: Optional[int]):
    """Prompts as TRL's conversational prompt-only format, plus `family` and `gold` (JSON text, "" if none)
    so the reward function can score rollouts with the task's gold check."""
    from datasets import Dataset

    rows = read_prompts(path)[:limit]
    if not rows:
        raise DataError(f"{path}: no prompts")
    return Dataset.from_list([
        {"prompt": as_messages(r.get("messages") or r["prompt"]), "family": r.get("family") or "",
         "gold": json.dumps(r["gold"]) if r.get("gold") is not None else ""}
        for r in rows
    ])


def completion_text(completion: Any) -> str:
    """TRL passes conversational completions as [{"role": "assistant", "content": ...}]."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


# ---- reward --------------------------------------------------------------------------------------------------------


class RewardFunction:
    """TRL `reward_funcs` callable: normalised reward-model score minus the length penalty.

    Also logs what the monitor watches (align.monitor.rollout_stats) and offers the batch to the monitor.
    """

    __name__ = "reward_model"  # TRL names the logged reward after it: rewards/reward_model/mean

    def __init__(self, model: Any, tokenizer: Any, stats: dict, length_penalty: float = 0.0, batch_size: int = 16,
                 monitor: Any = None):
        self.model, self.tokenizer, self.stats = model, tokenizer, stats
        self.length_penalty, self.batch_size, self.monitor = length_penalty, batch_size, monitor

    def proxy(self, prompts: Sequence[Any], texts: Sequence[str]) -> list[float]:
        return score(self.model, self.tokenizer, prompts, texts, self.batch_size, stats=self.stats)

    def __call__(self, prompts, completions, completion_ids, family=None, gold=None, log_metric=None,
                 trainer_state=None, **kwargs) -> list[float]:
        texts = [completion_text(c) for c in completions]
        proxy = self.proxy(prompts, texts)
        rewards = [p - self.length_penalty * len(ids) for p, ids in zip(proxy, completion_ids)]
        gold_scores = [score_response(f, t, json.loads(g)) if f and g else None
                       for f, g, t in zip(family or [""] * len(texts), gold or [""] * len(texts), texts)]
        if log_metric is not None:
            for key, value in rollout_stats(completion_ids, proxy, gold_scores).items():
                log_metric(key, value)
        if self.monitor is not None:
            step = trainer_state.global_step if trainer_state is not None else 0
            self.monitor.observe(prompts, texts, proxy, completion_ids, step)
        return rewards


# ---- callbacks -----------------------------------------------------------------------------------------------------


class AdaptiveKLController(TrainerCallback):
    """Steers the trainer's β toward a per-token KL target (Ziegler et al. 2019, §2.2, proportional control):

        e = clip(KL / KL_target - 1, -0.2, 0.2);   β ← β · (1 + e · n / horizon)

    with n the completions sampled since the last update. TRL reads `trainer.beta` at every step (RLOO: in the
    reward penalty; GRPO: in the loss), so setting it takes effect at the next generation. β is logged as
    `kl/beta` and restored from the log history on resume.
    """

    def __init__(self, target: float, horizon: int, samples_per_step: int):
        self.target, self.horizon, self.samples_per_step = target, horizon, samples_per_step
        self.trainer: Any = None
        self._last_step = 0

    @staticmethod
    def next_beta(beta: float, kl: float, target: float, n: int, horizon: int) -> float:
        error = min(max(kl / target - 1.0, -0.2), 0.2)
        return beta * (1.0 + error * n / horizon)

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_step = state.global_step
        for row in reversed(state.log_history):
            if "kl/beta" in row:
                self.trainer.beta = row["kl/beta"]
                break

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "kl" not in logs or logs["kl"] is None:
            return
        n = (state.global_step - self._last_step) * self.samples_per_step
        self._last_step = state.global_step
        self.trainer.beta = self.next_beta(self.trainer.beta, float(logs["kl"]), self.target, n, self.horizon)
        logs["kl/beta"] = self.trainer.beta
        if state.log_history:
            state.log_history[-1]["kl/beta"] = self.trainer.beta


class GoldEvaluator:
    """Greedy answers to held-out tasks, scored by their gold checks, the training reward model and a judge."""

    def __init__(self, tasks: list[dict], tokenizer: Any, max_new_tokens: int, batch_size: int,
                 reward: Optional[RewardFunction] = None, judge: Optional[RewardFunction] = None):
        self.tasks, self.tokenizer, self.batch_size = tasks, tokenizer, batch_size
        self.settings = SamplingSettings(temperature=0.0, max_new_tokens=max_new_tokens)
        self.reward, self.judge = reward, judge
        self.last_rewards: list[float] = []

    def __call__(self, model: Any) -> dict[str, float]:
        was_training = model.training
        rows = answer_tasks(model, self.tokenizer, self.tasks, self.settings, self.batch_size)
        if was_training:
            model.train()
        summary = gold_summary(rows)
        self.last_rewards = [r["reward"] for r in rows]  # per task, in task order: paired across evaluations
        metrics = {"eval/gold_reward": summary.pop("all"), **{f"eval/gold/{k}": v for k, v in summary.items()}}
        texts = [r["response"] for r in rows]
        metrics["eval/length"] = statistics.fmean(len(self.tokenizer(t, add_special_tokens=False)["input_ids"])
                                                  for t in texts)
        prompts = [t["prompt"] for t in self.tasks]
        for key, fn in (("eval/proxy_reward", self.reward), ("eval/judge_reward", self.judge)):
            if fn is not None:
                metrics[key] = statistics.fmean(fn.proxy(prompts, texts))
        return metrics


class GoldEvalCallback(TrainerCallback):
    """Runs the GoldEvaluator before training, every `every` steps, and logs it as its own row (Trainer.log).

    With `keep_best` (a directory), it also keeps the trainable weights (the LoRA adapter, or the whole model
    without LoRA) of the evaluation with the highest gold reward so far, in memory and in that directory, so a
    resumed run still has them: `rollback(model)` loads them back (keep_policy).
    """

    def __init__(self, evaluator: GoldEvaluator, every: int, keep_best: Optional[Path] = None,
                 beyond_noise: bool = False):
        self.evaluator, self.every, self.keep_best, self.beyond_noise = evaluator, every, keep_best, beyond_noise
        self.start_rewards: Optional[list[float]] = None  # per task, at step 0: what a kept policy must beat
        self.trainer: Any = None
        self.last: tuple[int, dict] = (-1, {})
        self.best: Optional[tuple[int, dict]] = None  # (step, metrics) of the best gold evaluation
        self.best_weights: dict[str, Any] = {}

    def run(self, step: int, model: Any) -> dict[str, float]:
        metrics = self.evaluator(model)
        rewards = list(self.evaluator.last_rewards)
        if self.start_rewards is None:
            self.start_rewards = rewards
            if self.keep_best is not None and (self.trainer is None or self.trainer.is_world_process_zero()):
                self.keep_best.mkdir(parents=True, exist_ok=True)
                runs.write_json(self.keep_best / "start.json", {"step": step, "rewards": rewards})
        elif self.beyond_noise:
            metrics["eval/gold_gain_low"] = gain_low(rewards, self.start_rewards)
        self.last = (step, metrics)
        control = self.trainer.control
        should_log = control.should_log  # logging resets it, and the step's training row must still be logged
        # The base Trainer.log: TRL's override would fold its pending training metrics into this row.
        Trainer.log(self.trainer, dict(metrics))
        control.should_log = should_log
        qualifies = not self.beyond_noise or metrics.get("eval/gold_gain_low", 1.0) > 0  # the start always does
        if self.keep_best is not None and qualifies and (
                self.best is None or metrics["eval/gold_reward"] > self.best[1]["eval/gold_reward"]):
            self._keep(step, metrics, model)
        return metrics

    def _keep(self, step: int, metrics: dict, model: Any) -> None:
        from safetensors.torch import save_file

        self.best = (step, dict(metrics))
        self.best_weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if self.trainer is None or self.trainer.is_world_process_zero():
            self.keep_best.mkdir(parents=True, exist_ok=True)
            save_file({n: t.contiguous().cpu() for n, t in self.best_weights.items()},
                      str(self.keep_best / "weights.safetensors"))
            runs.write_json(self.keep_best / "best.json", {"step": step, "metrics": metrics})

    def _restore(self, step: int) -> None:
        """A resumed run: the best evaluation up to its checkpoint, from disk (a later one was not saved)."""
        from safetensors.torch import load_file

        saved = self.keep_best / "best.json" if self.keep_best is not None else None
        start = self.keep_best / "start.json" if self.keep_best is not None else None
        if start is not None and start.is_file():
            self.start_rewards = json.loads(start.read_text())["rewards"]
        if saved is not None and saved.is_file():
            best = json.loads(saved.read_text())
            if best["step"] <= step:
                self.best = (best["step"], best["metrics"])
                self.best_weights = load_file(str(self.keep_best / "weights.safetensors"))

    def rollback(self, model: Any) -> Optional[int]:
        """Load the kept weights into `model`; return their step (None when nothing is kept)."""
        import torch

        if self.best is None or not self.best_weights:
            return None
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.best_weights.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        return self.best[0]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.run(0, model)
        else:
            self._restore(state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self.run(state.global_step, model)


@contextlib.contextmanager
def bf16_rollouts(model: Any):
    """Sample under bf16 autocast with the frozen base weights held in bf16 meanwhile; the float32 ones come back after.

    On a CPU under `mixed_precision: bf16`, TRL's log-prob passes run under autocast but its generate() does not, so
    rollouts were sampled in float32, from a policy whose numerics differ from the one trained. Under autocast
    alone each generated token would cast every frozen weight to bf16 again; cast once, the same bf16 weights
    feed the same matmuls (the samples are those of plain autocast), 1.15x faster than float32 sampling on 2 cores
    (bench/levers.py `rollouts`). The output head stays as it is (often tied to the input embeddings, which
    autocast does not touch), and so do the trainable LoRA weights."""
    import torch

    head = model.get_output_embeddings()
    frozen = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
              and not m.weight.requires_grad and m.weight.dtype == torch.float32]
    kept = [w.data for w in frozen]
    try:
        for weight in frozen:
            weight.data = weight.data.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        for weight, data in zip(frozen, kept):
            weight.data = data


def sampling_in_bf16(trainer_cls: type) -> type:
    """`trainer_cls` whose rollouts are sampled under bf16_rollouts (CPU runs under `mixed_precision: bf16`)."""

    class Trainer(trainer_cls):  # type: ignore[misc, valid-type]
        def _generate_single_turn(self, *args, **kwargs):
            with bf16_rollouts(self.model):
                return super()._generate_single_turn(*args, **kwargs)

    Trainer.__name__ = Trainer.__qualname__ = trainer_cls.__name__
    return Trainer


def gain_low(rewards: Sequence[float], start: Sequence[float], seed: int = 0) -> float:
    """The lower end of the 95% paired bootstrap interval over tasks of the mean gold gain over the starting policy:
    above 0 when an evaluation beats the start beyond noise (keep_policy best_beyond_noise)."""
    from align.report.stats import bootstrap

    return bootstrap([r - s for r, s in zip(rewards, start, strict=True)], seed=seed)[0]


# ---- the run -------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def completion_tokens_only():
    """Score only the completion tokens in TRL's fused LM head on a CPU; yield whether that is in effect.

    RLOO's and GRPO's log-prob passes (old, reference, loss) project hidden states onto the vocabulary in tiles
    (TRL's fused LM head). With Triton (CUDA, XPU) only the completion tokens are projected; elsewhere TRL projects
    every position, prompt and padding included, so that tile shapes stay fixed for compilers (Neuron). Eager CPU
    code has nothing to recompile, so here the CPU takes the completion-only path too: the same log-probs, about
    6x fewer rows through the vocabulary (an RLOO step of the README's RLHF run 35 s -> 25 s on 2 cores;
    bench/levers.py `rloo_logps`). TRL picks the path with a private function; if a TRL release renames it, this
    changes nothing (tests/test_rlhf.py notices)."""
    import trl.trainer.utils as trl_utils

    chooses = getattr(trl_utils, "_use_triton", None)
    if not callable(chooses):
        yield False
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or chooses(device)
    try:
        yield True
    finally:
        trl_utils._use_triton = chooses


def trainer_config(rl: RLHFArgs, train: TrainArgs, model_args: ModelArgs, out: Path) -> Any:
    """Our config, translated once into TRL's RLOOConfig or GRPOConfig."""
    import torch

    from trl import GRPOConfig, RLOOConfig

    dtype = resolve_dtype(model_args.dtype)
    common = dict(
        output_dir=str(out / "checkpoints"), max_steps=train.max_steps, num_train_epochs=train.num_train_epochs,
        per_device_train_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps, learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler_type, warmup_steps=train.warmup_steps, weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm, logging_steps=train.logging_steps, save_strategy="steps",
        save_steps=train.save_steps, save_total_limit=train.save_total_limit,
        **runs.checkpointing_option(train.gradient_checkpointing),
        bf16=dtype == torch.bfloat16 or train.mixed_precision == "bf16", use_cpu=runs.cpu_autocast(train),
        fp16=dtype == torch.float16, seed=train.seed, data_seed=train.seed,
        # TensorBoard is our own callback (DIR/tensorboard); wandb and trackio are transformers'.
        report_to=[train.report_to] if train.report_to in ("wandb", "trackio") else "none", run_name=out.resolve().name,
        dataloader_pin_memory=torch.cuda.is_available(), dataloader_num_workers=train.dataloader_num_workers,
        num_generations=rl.num_generations, max_completion_length=rl.max_new_tokens, temperature=rl.temperature,
        top_p=1.0, top_k=0, beta=rl.beta, use_vllm=rl.engine == "vllm", remove_unused_columns=False, log_completions=False,
    )
    if rl.engine == "vllm":
        common["vllm_mode"] = "colocate"
    return (RLOOConfig if rl.algorithm == "rloo" else GRPOConfig)(**common)


def check_setup(rl: RLHFArgs, monitor: MonitorArgs, train: TrainArgs) -> int:
    """Refuse what cannot run, before loading anything; return the completions per optimizer step (all processes)."""
    from accelerate import PartialState

    missing = vllm_missing() if rl.engine == "vllm" else None
    if missing:
        raise ConfigError(missing)
    if monitor.audit_db and not (monitor.monitor and monitor.monitor_top_k):
        raise ConfigError("audit_db needs the monitor on (monitor: true) and monitor_top_k > 0")
    if train.early_stopping_patience:
        raise ConfigError("early_stopping_patience applies to eval-loss runs; RLHF stops on the monitor (monitor_stop)")
    per_step = train.per_device_train_batch_size * train.gradient_accumulation_steps * PartialState().num_processes
    if per_step % rl.num_generations:
        raise ConfigError(
            f"per_device_train_batch_size × gradient_accumulation_steps × processes = {per_step} completions per "
            f"step must be a multiple of num_generations ({rl.num_generations}): each prompt's group is sampled together")
    return per_step


def load_reward(run_dir: str, device: Any, rl: RLHFArgs, monitor: Any = None) -> RewardFunction:
    model, tokenizer, stats = load_reward_model(run_dir, device=str(device))
    return RewardFunction(model, tokenizer, stats, rl.length_penalty, rl.reward_batch_size, monitor)


@runs.guard_run
def train_rlhf(
    model_args: ModelArgs, lora_args: LoraArgs, data_args: PromptDataArgs, rl: RLHFArgs, monitor_args: MonitorArgs,
    train: TrainArgs, command: Optional[str] = None, extra_callbacks: Sequence[Any] = (),
) -> Path:
    """Run RLHF end to end and return the run directory."""
    from accelerate import PartialState
    from trl import GRPOTrainer, RLOOTrainer

    samples_per_step = check_setup(rl, monitor_args, train)
    if rl.keep_policy != "last" and not data_args.eval_prompts_file:
        log.warning("keep_policy %s does nothing here: it chooses among gold evaluations (eval_prompts_file); "
                    "the run saves its last policy", rl.keep_policy)
    repo = runs.preflight(train)
    configs = (model_args, lora_args, data_args, rl, monitor_args, train)
    out = runs.prepare_output_dir(train.output_dir, train.resume)
    device = PartialState().device

    dataset = prompt_dataset(data_args.prompts_file, data_args.max_prompts)
    model, tokenizer = load_model(model_args)
    interference = runs.stage_interference(PartialState(), rl, model_args.model, "rlhf", tokenizer)
    if interference is not None:
        interference.start(model)  # the starting model, before any adapter
    monitor = RewardHackingMonitor(monitor_args, out) if monitor_args.monitor else None
    reward = load_reward(rl.reward_model, device, rl, monitor)
    reference = None
    if not lora_args.use_lora and rl.beta > 0:
        reference = copy.deepcopy(model).eval()  # TRL would rebuild the reference from the base path, not these weights
    if lora_args.use_lora:
        model = apply_lora(model, lora_args)
    PartialState().wait_for_everyone()
    if PartialState().is_main_process:
        save_config(out / "config.yaml", *configs)

    own_callbacks: list = []
    controller = None
    if rl.kl_target is not None:
        controller = AdaptiveKLController(rl.kl_target, rl.kl_horizon, samples_per_step)
        own_callbacks.append(controller)
    if monitor is not None:
        own_callbacks.append(monitor)
    evaluation = None
    if data_args.eval_prompts_file:
        tasks = stratified(load_tasks(data_args.eval_prompts_file), rl.eval_per_family)
        judge = load_reward(rl.judge_reward_model, device, rl) if rl.judge_reward_model else None
        evaluator = GoldEvaluator(tasks, tokenizer, rl.max_new_tokens, train.per_device_eval_batch_size, reward, judge)
        evaluation = GoldEvalCallback(evaluator, train.eval_steps,
                                      None if rl.keep_policy == "last" else out / "best_policy",
                                      beyond_noise=rl.keep_policy == "best_beyond_noise")
        own_callbacks.append(evaluation)

    trainer_cls = RLOOTrainer if rl.algorithm == "rloo" else GRPOTrainer
    if runs.cpu_autocast(train) and rl.engine == "hf":
        trainer_cls = sampling_in_bf16(trainer_cls)
    trainer = trainer_cls(
        model=model, reward_funcs=reward, args=trainer_config(rl, train, model_args, out), train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=own_callbacks + runs.trainer_callbacks(train, out, has_eval=False) + list(extra_callbacks),
    )
    for callback in (controller, evaluation):
        if callback is not None:
            callback.trainer = trainer
    if reference is not None:
        trainer.ref_model = trainer.accelerator.prepare_model(reference, evaluation_mode=True)

    checkpoint = runs.last_checkpoint(out) if train.resume else None
    with completion_tokens_only():
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics = final_metrics(trainer, result, evaluation)
    if monitor is not None:
        metrics.update({"monitor/flagged": int(monitor.flagged), "monitor/flags": len(monitor.flags)})
    flagged = monitor is not None and monitor.flagged
    if evaluation is not None and (rl.keep_policy in ("best", "best_beyond_noise")
                                   or (rl.keep_policy == "best_if_flagged" and flagged)):
        metrics.update(rollback(trainer, evaluation, metrics))
    if not trainer.is_world_process_zero():
        return out
    if evaluation is not None:
        runs.write_json(out / "eval_final.json", metrics)
    model_dir = save_trained(trainer.model, tokenizer, out, model_args.model, train.merge)
    if interference is not None:
        metrics.update(interference.finish(trainer.model, out))
    runs.record_run(out, method="rlhf", name=train.name, model_spec=model_args.model, revision=model_args.revision,
                    model_dir=model_dir, data_files=(data_args.prompts_file, data_args.eval_prompts_file),
                    config=to_dict(*configs), metrics=metrics, tokenizer=tokenizer, command=command)
    if monitor_args.audit_db:
        push_audit(monitor_args, monitor, out, model_args, rl, trainer.model, tokenizer, reference, train.seed)
    if repo:
        push(out, model_dir, repo)
    return out


def rollback(trainer: Any, evaluation: GoldEvalCallback, metrics: dict[str, Any]) -> dict[str, Any]:
    """keep_policy: the policy of the best gold evaluation replaces the last one before it is saved; the returned
    metrics describe the kept policy and name what was dropped."""
    last_step, last = evaluation.last
    step = evaluation.rollback(trainer.model)
    if step is None or step == last_step:
        return {"policy/kept_step": last_step}
    kept = evaluation.best[1]
    log.warning("keep_policy: saving the policy of step %d (gold %.3f), not of step %d (gold %.3f)", step,
                kept["eval/gold_reward"], last_step, last.get("eval/gold_reward", float("nan")))
    dropped = {f"policy/dropped/{k.split('/', 1)[1]}": v for k, v in last.items()
               if k in ("eval/gold_reward", "eval/proxy_reward")}
    kept_kl = {}
    if "kl" in metrics:  # the KL logged at the kept step: 0 at the start, unknown where that step logged none
        dropped["policy/dropped/kl"] = metrics["kl"]
        logged = [row["kl"] for row in trainer.state.log_history if row.get("step") == step and "kl" in row]
        kept_kl["kl"] = logged[-1] if logged else 0.0 if step == 0 else None
    return {**kept, **kept_kl, **dropped, "policy/kept_step": step}


def final_metrics(trainer: Any, result: Any, evaluation: Optional[GoldEvalCallback]) -> dict[str, Any]:
    """Training summary, the last logged KL/reward/β, and the gold evaluation at the start and at the end."""
    metrics: dict[str, Any] = {"train_loss": runs.mean_loss(runs.logged_losses(trainer.state.log_history)),
                               "global_step": result.global_step}
    for key in ("kl", "reward", "kl/beta", "monitor/proxy", "monitor/gold", "monitor/length"):
        found = [row[key] for row in trainer.state.log_history if row.get(key) is not None]
        if found:
            metrics[key] = found[-1]
    if evaluation is not None:
        history = trainer.state.log_history
        start = next((row for row in history if row.get("step") == 0 and "eval/gold_reward" in row), {})
        metrics.update({f"{k}_start": v for k, v in start.items() if k.startswith("eval/") and "/gold/" not in k})
        step, last = evaluation.last
        if step != trainer.state.global_step:
            last = evaluation.run(trainer.state.global_step, trainer.model)
        metrics.update(last)
    return metrics


def push_audit(monitor_args: MonitorArgs, monitor: Any, out: Path, model_args: ModelArgs, rl: RLHFArgs,
               model: Any, tokenizer: Any, reference: Any, seed: int) -> None:
    settings = SamplingSettings(temperature=rl.temperature, max_new_tokens=rl.max_new_tokens, seed=seed)
    samples = monitor.top_samples()
    if reference is not None or not hasattr(model, "disable_adapter"):
        pairs = push_audit_pairs(monitor_args.audit_db, out, samples, model_args.model, settings, reference,
                                 tokenizer if reference is not None else None, monitor_args.audit_votes_required)
    else:
        with model.disable_adapter():  # the LoRA policy with its adapter off is the reference
            pairs = push_audit_pairs(monitor_args.audit_db, out, samples, model_args.model, settings, model, tokenizer,
                                     monitor_args.audit_votes_required)
    log.info("pushed %d audit pairs to %s", len(pairs), monitor_args.audit_db)
