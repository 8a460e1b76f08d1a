"""A small Accelerate training loop shared by DPO and the reward model (SFT stays on TRL's trainer).

A method plugs in a `Task`: its data, a collator, a loss `(model, batch) -> (loss, metrics)` and, optionally, a
per-example evaluation step. The loop owns the rest, driven by `TrainArgs`: AdamW on the trainable parameters,
warm-up + schedule (transformers' `get_scheduler`), gradient accumulation, clipping, bf16 autocast when the
model is bf16, metrics to DIR/metrics.jsonl (+ TensorBoard), checkpoints in DIR/checkpoints/checkpoint-N that
`align.runs.last_checkpoint` finds, resume, periodic evaluation and early stopping.

It runs unchanged under `accelerate launch` (DDP): metrics are averaged across ranks, evaluation outputs are
gathered, and only the main process writes files.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from align import runs
from align.config import TrainArgs
from align.overfit import GapTracker
from align.publish import Tracker
from align.trainers.finite import NonFiniteGuard, diverged_weights, trainable_nonfinite

log = logging.getLogger(__name__)

Metrics = dict[str, torch.Tensor]


@dataclass
class Task:
    """What a training method hands the loop.

    loss(model, batch) -> (scalar loss, {name: 0-d tensor}); eval_step(model, batch) -> {name: (B,) tensor} per
    example (gathered over ranks), eval_summary({name: (N,) tensor}) -> {name: float}. `state` is an object with
    state_dict()/load_state_dict() saved in checkpoints (e.g. a running normaliser), or None.
    """

    train_data: Sequence[dict]
    collate: Callable[[list[dict]], dict]
    loss: Callable[[Any, dict], tuple[torch.Tensor, Metrics]]
    eval_data: Sequence[dict] = ()
    eval_step: Optional[Callable[[Any, dict], Metrics]] = None
    eval_summary: Optional[Callable[[Metrics], dict[str, float]]] = None
    state: Any = None


def make_accelerator(train: TrainArgs, dtype: torch.dtype) -> Any:
    """An Accelerator: bf16 autocast for bf16 models or `mixed_precision: bf16`; a seeded sampler so data order is a function of
    (seed, epoch) alone, which makes resuming exact."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from accelerate.state import AcceleratorState

    bf16 = train.mixed_precision == "bf16" or (train.mixed_precision == "auto" and dtype == torch.bfloat16)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", "no") != ("bf16" if bf16 else "no"):
        # One process may train several runs (tests, notebooks, the demo): Accelerate keeps its precision in a
        # process-wide state, which must be dropped (not the distributed one) before another precision is asked.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision="bf16" if bf16 else "no",
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
    )


def open_run(train: TrainArgs, dtype: torch.dtype) -> tuple[Any, Path]:
    """The Accelerator and the run directory (created once, by the main process first), with seeds set."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(train, dtype)
    with accelerator.main_process_first():
        out = runs.prepare_output_dir(train.output_dir, train.resume)
    set_seed(train.seed)
    return accelerator, out


class MetricsLogger:
    """Rows to DIR/metrics.jsonl and TensorBoard scalars, from the main process only."""

    def __init__(self, out: Path, accelerator: Any, report_to: str):
        self.main = accelerator.is_main_process
        self.path = out / "metrics.jsonl"
        self.writer = None
        self.tracker = None
        if self.main and report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))
        elif self.main and report_to in ("wandb", "trackio"):
            self.tracker = Tracker(report_to, out)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.main:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **clean}, default=str) + "\n")
        scalars = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.tracker is not None:
            self.tracker.log(scalars, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.tracker is not None:
            self.tracker.close()


def _groups(batches: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Micro-batches grouped per optimizer step; the last group of an epoch may be shorter."""
    group: list[dict] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _reduce(accelerator: Any, rows: list[Metrics]) -> dict[str, float]:
    """Mean of each metric over micro-batches and ranks, NaN-aware: NaN (e.g. accuracy of an all-tie batch) and
    absent values (grad_norm exists on a step's last micro-batch only) are skipped."""
    keys = sorted(set().union(*rows))
    nan = torch.tensor(math.nan)
    local = torch.stack([torch.stack([r.get(k, nan).detach().float().cpu().reshape(()) for k in keys])
                         for r in rows]).nanmean(0)
    everywhere = accelerator.gather(local.to(accelerator.device).unsqueeze(0))  # (ranks, K)
    return {k: float(v) for k, v in zip(keys, everywhere.nanmean(0))}


def _save_trainable_only(accelerator: Any) -> None:
    """Checkpoints keep the trainable weights only (a LoRA checkpoint is megabytes, not the whole base model);
    resuming loads them with strict=False over the freshly loaded base."""

    def hook(models, weights, output_dir):
        for model, state in zip(models, weights):
            keep = {name for name, p in model.named_parameters() if p.requires_grad}
            for key in [k for k in state if k not in keep]:
                del state[key]

    accelerator.register_save_state_pre_hook(hook)


def save_checkpoint(accelerator: Any, out: Path, step: int, epoch: float, limit: int,
                    losses: Sequence[tuple[int, float]] = ()) -> None:
    """`losses`: the (step, loss) pairs logged so far, so a resumed run's train_loss covers every step."""
    path = out / "checkpoints" / f"checkpoint-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        # Written last: last_checkpoint() only trusts directories that have it, so a crash mid-save is ignored.
        runs.write_json(path / "trainer_state.json", {"global_step": step, "epoch": epoch,
                                                      "losses": [list(pair) for pair in losses]})
        done = sorted((p for p in path.parent.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                      key=lambda p: int(p.name.split("-")[-1]))
        for old in done[:-limit] if limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resume_step(accelerator: Any, out: Path) -> tuple[int, list[tuple[int, float]]]:
    """Load the last checkpoint's state (weights, optimizer, scheduler, RNG, task state); return its step and the
    (step, loss) pairs logged up to it."""
    ckpt = runs.last_checkpoint(out)
    if ckpt is None:
        log.warning("resume: no checkpoint in %s/checkpoints; starting from step 0", out)
        return 0, []
    from accelerate.utils import DistributedType

    # DeepSpeed's loader takes load_module_strict; the others take strict.
    strict = {"load_module_strict": False} if accelerator.distributed_type == DistributedType.DEEPSPEED else {"strict": False}
    accelerator.load_state(str(ckpt), **strict)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    step = int(state["global_step"])
    log.info("resumed from %s (step %d)", ckpt, step)
    return step, [(int(s), float(v)) for s, v in state.get("losses", [])]


def evaluate(accelerator: Any, model: Any, task: Task, loader: Any) -> dict[str, float]:
    """Run task.eval_step over the eval set, gather per-example values across ranks, summarise."""
    model.eval()
    collected: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for batch in loader:
            values = accelerator.gather_for_metrics(task.eval_step(model, batch))
            for key, value in values.items():
                collected.setdefault(key, []).append(value.detach().float().cpu())
    model.train()
    summary = task.eval_summary({k: torch.cat(v) for k, v in collected.items()})
    return {f"eval_{k}": float(v) for k, v in summary.items()}


def _optimizer_step(accelerator, model, task, group, optimizer, scheduler, max_grad_norm, guard=None,
                    step=0) -> list[Metrics]:
    """Forward/backward over one step's micro-batches (gradients synchronised on the last one), then update,
    unless `guard` (a NonFiniteGuard) finds the loss or the gradient norm not finite on any rank."""
    rows = []
    for i, batch in enumerate(group):
        last = i == len(group) - 1
        # Tell Accelerate which micro-batch ends the step: DeepSpeed's engine steps inside backward() otherwise.
        accelerator.gradient_state._set_sync_gradients(last)
        with nullcontext() if last else accelerator.no_sync(model):
            loss, metrics = task.loss(model, batch)
            accelerator.backward(loss / len(group))
        rows.append({"loss": loss.detach(), **metrics})
    # max_grad_norm 0 turns clipping off, but the norm is still measured (and logged): the guard needs it.
    norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                       max_grad_norm if max_grad_norm > 0 else math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2
    rows[-1]["grad_norm"] = norm.detach() if torch.is_tensor(norm) else torch.tensor(float(norm))
    rows[-1]["learning_rate"] = torch.tensor(scheduler.get_last_lr()[0])
    local = torch.stack([r["loss"].float().reshape(()) for r in rows]).mean().to(accelerator.device)
    loss_value = float(accelerator.reduce(local, reduction="mean"))  # every rank decides on the same numbers
    if guard is None or guard.check(step, float(rows[-1]["grad_norm"]), loss_value):
        optimizer.step()
    if guard is not None:
        rows[-1]["train/skipped_steps"] = torch.tensor(float(guard.skipped))
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return rows


def check_weights(accelerator: Any, model: Any, step: int, learning_rate: float) -> None:
    """Stop before a checkpoint or the final save if any rank holds a non-finite trainable weight."""
    bad = trainable_nonfinite(model)
    count = accelerator.reduce(torch.tensor(float(len(bad)), device=accelerator.device), reduction="sum")
    if float(count) > 0:
        raise diverged_weights(bad or ["a parameter shard of another process"], step, learning_rate)


def _setup(accelerator: Any, model: Any, task: Task, train: TrainArgs) -> tuple:
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    if train.gradient_checkpointing:
        from accelerate.utils import DistributedType

        # PEFT under ZeRO-3 crashes with non-reentrant checkpointing (TRL forces reentrant there too); reentrant
        # needs inputs that require grad when the embeddings are frozen.
        reentrant = accelerator.distributed_type == DistributedType.DEEPSPEED
        runs.enable_checkpointing(model, use_reentrant=reentrant)
        if reentrant and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.learning_rate,
                                  weight_decay=train.weight_decay)
    # A generator of its own: starting an iterator draws a seed from it, and from the global RNG otherwise, so a
    # run resumed mid-epoch (a new iterator) would draw different dropout masks from then on than the original.
    workers = train.dataloader_num_workers
    loader = DataLoader(list(task.train_data), batch_size=train.per_device_train_batch_size, shuffle=True,
                        collate_fn=task.collate, num_workers=workers, generator=torch.Generator().manual_seed(train.seed))
    eval_loader = None
    if task.eval_data and task.eval_step is not None:
        eval_loader = DataLoader(list(task.eval_data), batch_size=train.per_device_eval_batch_size,
                                 collate_fn=task.collate, num_workers=workers)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    eval_loader = accelerator.prepare(eval_loader) if eval_loader is not None else None
    steps_per_epoch = max(1, math.ceil(len(loader) / train.gradient_accumulation_steps))
    total = train.max_steps if train.max_steps > 0 else max(1, math.ceil(train.num_train_epochs * steps_per_epoch))
    warmup = int(train.warmup_steps * total) if train.warmup_steps < 1 else int(train.warmup_steps)
    # Not prepared: we step it exactly once per optimizer step, whatever the number of processes.
    scheduler = get_scheduler(train.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    accelerator.register_for_checkpointing(scheduler)
    if task.state is not None:
        accelerator.register_for_checkpointing(task.state)
    _save_trainable_only(accelerator)
    return model, optimizer, loader, eval_loader, scheduler, steps_per_epoch, total


def train_loop(
    accelerator: Any, model: Any, task: Task, train: TrainArgs, out: Path,
    start_metrics: Optional[dict[str, Any]] = None, callbacks: Sequence[Any] = (),
) -> tuple[dict[str, Any], Any]:
    """Train to max_steps (or num_train_epochs); return (final metrics: train_loss, global_step, eval_*, the
    overfitting alarm's eval_gap / overfit_alarm / stop_reason (align.overfit), the prepared model). Save from `accelerator.get_state_dict(prepared)` called on every rank: under FSDP2 or
    ZeRO-3 only the prepared model can gather the shards.

    `callbacks` may define on_train_begin(model), on_log(step, metrics), on_train_end(model).
    """
    from tqdm.auto import tqdm

    model, optimizer, loader, eval_loader, scheduler, per_epoch, total = _setup(accelerator, model, task, train)
    step, losses = resume_step(accelerator, out) if train.resume else (0, [])
    logger = MetricsLogger(out, accelerator, train.report_to)
    if start_metrics:
        logger.log(start_metrics, step)
    _call(callbacks, "on_train_begin", model)
    progress = tqdm(total=total, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    pending: list[Metrics] = []
    final: dict[str, Any] = {}
    gaps = GapTracker(train.overfit_window)
    best, best_step, bad_evals, epoch, stop = math.inf, None, 0, step // per_epoch, False
    logged_at = step
    guard = NonFiniteGuard(train.learning_rate)
    while step < total and not stop:
        loader.set_epoch(epoch)
        skip = (step % per_epoch) * train.gradient_accumulation_steps  # only non-zero right after a resume
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for group in _groups(batches, train.gradient_accumulation_steps):
            pending += _optimizer_step(accelerator, model, task, group, optimizer, scheduler, train.max_grad_norm,
                                       guard, step + 1)
            step += 1
            progress.update(1)
            done = step >= total
            evaluating = eval_loader is not None and ((train.eval_steps and step % train.eval_steps == 0) or done)
            if step % train.logging_steps == 0 or done or evaluating:  # an evaluation's gap needs the train loss
                metrics = {**_reduce(accelerator, pending), "epoch": round(step / per_epoch, 4)}
                losses.append((step, metrics["loss"]))
                gaps.add_train(metrics["loss"], step - logged_at)
                logged_at = step
                progress.set_postfix(loss=f"{metrics['loss']:.4f}")
                logger.log(metrics, step)
                _call(callbacks, "on_log", step, metrics)
                pending = []
            if evaluating:
                final = evaluate(accelerator, model, task, eval_loader)
                loss = final.get("eval_loss", math.nan)
                logger.log({**final, **gaps.add_eval(step, loss)}, step)
                best, best_step, bad_evals = (loss, step, 0) if loss < best else (best, best_step, bad_evals + 1)
                stop = 0 < train.early_stopping_patience <= bad_evals
                if stop:
                    gaps.early_stop(step, bad_evals, best, best_step)
            if done or stop:
                guard.finish(step)
            if step % train.save_steps == 0 or done or stop:
                check_weights(accelerator, model, step, train.learning_rate)
                save_checkpoint(accelerator, out, step, step / per_epoch, train.save_total_limit, losses)
            if done or stop:
                break
        epoch += 1
    progress.close()
    logger.close()
    _call(callbacks, "on_train_end", accelerator.unwrap_model(model))
    return {"train_loss": runs.mean_loss(losses), "global_step": step, **final, **gaps.summary()}, model


def _call(callbacks: Sequence[Any], name: str, *args: Any) -> None:
    for callback in callbacks:
        if hasattr(callback, name):
            getattr(callback, name)(*args)
