"""Supervised fine-tuning on chat data, loss on assistant tokens only.

TRL's SFTTrainer runs the loop (checkpoints, resume, evaluation, Accelerate, DDP/FSDP/DeepSpeed).
We own the tokenisation: TRL's assistant-only loss needs `{% generation %}` markers that most chat
templates (SmolLM2's included) lack, so we hand it `input_ids` plus `assistant_masks`, which it
turns into labels.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from align import runs
from align.config import LoraArgs, ModelArgs, SFTDataArgs, TrainArgs, save_config, to_dict
from align.data import SFTSet, data_record, load_sft, open_split, template_markers, tokenize_sft_row
from align.errors import DataError
from align.logprobs import plain_head, score_tokens
from align.models import apply_lora, load_model, resolve_dtype, save_trained
from align.overfit import GapTracker
from align.packing import attention_implementation, restore_attention, sequence_packing_attention
from align.publish import finish_tracker, push

log = logging.getLogger(__name__)


def build_dataset(sft_set: SFTSet, tokenizer: Any, max_length: int):
    """Tokenise the rows (memory-mapped Arrow, not Python lists); drop (and count) rows whose assistant tokens were all
    truncated away, count the truncated ones. Returns (dataset, counts)."""
    from datasets import Dataset, concatenate_datasets

    markers = template_markers(tokenizer)
    chunks, lengths, useful = [], [], []
    for start in range(0, len(sft_set.rows), 1024):  # compact Arrow chunks, never one Python list of every row
        part = [tokenize_sft_row(row, tokenizer, max_length, markers) for row in sft_set.rows[start:start + 1024]]
        lengths += [len(r["input_ids"]) for r in part]
        useful += [any(r["assistant_masks"]) for r in part]
        chunks.append(Dataset.from_dict({k: [r[k] for r in part] for k in ("input_ids", "assistant_masks")}))
    tokenized = concatenate_datasets(chunks) if len(chunks) > 1 else chunks[0]
    keep = [i for i, ok in enumerate(useful) if ok]
    counts = {"rows": len(tokenized), "truncated": sum(n >= max_length for n in lengths),
              "dropped_beyond_max_length": len(tokenized) - len(keep)}
    if not keep:
        raise DataError(f"{sft_set.name}: no conversation has an assistant turn within max_length={max_length} tokens")
    if counts["dropped_beyond_max_length"]:
        log.warning("%s: dropped %d conversations whose response lies beyond max_length=%d", sft_set.name,
                    counts["dropped_beyond_max_length"], max_length)
    if counts["truncated"]:
        log.warning("%s: truncated %d row(s) to max_length=%d tokens", sft_set.name, counts["truncated"], max_length)
    return (tokenized.select(keep) if len(keep) < len(tokenized) else tokenized), counts


def trainer_args(train: TrainArgs, model_args: ModelArgs, has_eval: bool, out: Path,
                 data_args: Optional[SFTDataArgs] = None, padding_free: Optional[bool] = None) -> Any:
    """Our config, translated once into TRL's SFTConfig (so TRL's names stay out of our configs). `padding_free`:
    what the model's attention allows (`padding_free_batches`); None: as configured."""
    from trl import SFTConfig

    evaluate = has_eval and train.eval_steps > 0
    dtype = resolve_dtype(model_args.dtype)
    return SFTConfig(
        output_dir=str(out / "checkpoints"),
        max_steps=train.max_steps,
        num_train_epochs=train.num_train_epochs,
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler_type,
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        logging_steps=train.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=train.eval_steps if evaluate else None,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        load_best_model_at_end=evaluate and train.early_stopping_patience > 0,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        **runs.checkpointing_option(train.gradient_checkpointing),
        bf16=dtype == torch.bfloat16 or train.mixed_precision == "bf16",  # bf16: autocast over float32 weights
        use_cpu=runs.cpu_autocast(train),  # transformers asks for it to autocast bf16 on a CPU
        fp16=dtype == torch.float16,
        seed=train.seed,
        data_seed=train.seed,
        # TensorBoard is our own callback (writing to DIR/tensorboard); wandb and trackio are transformers'.
        report_to=[train.report_to] if train.report_to in ("wandb", "trackio") else "none",
        run_name=out.resolve().name,
        dataloader_pin_memory=torch.cuda.is_available(),
        dataloader_num_workers=train.dataloader_num_workers,
        packing=bool(data_args and data_args.packing),
        padding_free=bool(data_args and data_args.padding_free) if padding_free is None else padding_free,
        # Rows are already truncated by build_dataset; packing needs the length it packs to.
        max_length=data_args.max_length if data_args and data_args.packing else None,
        dataset_num_proc=None,
    )


def sft_trainer_class() -> Any:
    """TRL's SFTTrainer, its loss taken over the labelled tokens only.

    TRL's fused LM head scores every position off Triton devices (CPU included: prompt tokens and, in padded
    batches, padding too) and computes each token's entropy and top-1 hit for its logs. Here the head runs over
    the assistant tokens only, through `align.logprobs.score_tokens` (chunked, no (B, T, V) logits): the same loss,
    sum of -log p over the labelled tokens / TRL's token count, to float round-off (tests/test_sft.py). Whatever
    else TRL's loss supports (label smoothing, a compute_loss_func, DFT, MoE auxiliary losses, a head that is not a
    plain linear layer, a head sharded by FSDP or ZeRO-3) goes to TRL's own compute_loss. The `entropy` and
    `mean_token_accuracy` logs are TRL's only.
    """
    from trl import SFTTrainer

    class AlignSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if (return_outputs or self.compute_loss_func is not None or self.label_smoother is not None
                    or self.aux_loss_enabled or self.args.loss_type != "nll" or plain_head(model) is None
                    or self.is_deepspeed_enabled or self.is_fsdp_enabled):  # sharded heads: TRL gathers them
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            forward = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "labels")}
            scored = score_tokens(model, inputs["input_ids"], inputs["labels"], inputs.get("attention_mask"),
                                  chunked=True, **forward)
            count = scored.mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -scored.logps.sum() / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as Trainer.compute_loss
            if self.model.training:  # TRL's running token count (the num_tokens log)
                seen = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(
                    inputs["position_ids"].shape[1], device=loss.device)
                self._total_train_tokens += self.accelerator.gather_for_metrics(seen).sum().item() // self._tp_size
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

    return AlignSFTTrainer


def padding_free_batches(model: Any, data_args: SFTDataArgs) -> tuple[bool, Optional[str]]:
    """(padding_free for TRL, the attention implementation to restore after training or None).

    TRL's padding-free collator concatenates a micro-batch into one row with restarting position ids; the model must
    then attend each sequence alone. SDPA is switched to "align_packed", which does that span by span (exact, no
    N x N mask; align/packing.py), flash-attention and flex attention do it themselves. Other kernels: padded rows
    (packing, which TRL always runs padding-free, keeps transformers' block mask)."""
    if not (data_args.padding_free or data_args.packing):
        return False, None
    ok, previous = sequence_packing_attention(model)
    if not ok and data_args.padding_free:
        log.warning("padding_free: %s's attention (%s) cannot attend packed sequences without a full mask; using "
                    "padded batches", type(model).__name__, attention_implementation(model))
    return ok and data_args.padding_free, previous


@runs.guard_run
def train_sft(
    model_args: ModelArgs,
    lora_args: LoraArgs,
    data_args: SFTDataArgs,
    train: TrainArgs,
    command: Optional[str] = None,
    extra_callbacks: Sequence[Any] = (),
) -> Path:
    """Run SFT end to end and return the run directory. `extra_callbacks` are transformers TrainerCallbacks."""
    from accelerate import PartialState
    from transformers import set_seed
    state = PartialState()
    repo = runs.preflight(train)  # push_to_hub: token and network checked before any training
    with state.main_process_first():  # one rank probes and creates the run directory
        out = runs.prepare_output_dir(train.output_dir, train.resume)
    train_set = load_sft(open_split(data_args, "train"), data_args.max_train_samples, data_args.max_length)
    eval_source = open_split(data_args, "eval")
    eval_set = load_sft(eval_source, data_args.max_eval_samples, data_args.max_length) if eval_source else None
    model, tokenizer = load_model(model_args)
    train_ds, counts = build_dataset(train_set, tokenizer, data_args.max_length)
    eval_ds = build_dataset(eval_set, tokenizer, data_args.max_length)[0] if eval_set else None
    set_seed(train.seed)  # the LoRA init is random: same seed, same run
    if lora_args.use_lora:
        model = apply_lora(model, lora_args)
    if state.is_main_process:
        save_config(out / "config.yaml", model_args, lora_args, data_args, train)

    padding_free, attention = padding_free_batches(model, data_args)
    gaps = GapTracker(train.overfit_window)
    trainer = sft_trainer_class()(
        model=model,
        args=trainer_args(train, model_args, eval_ds is not None, out, data_args, padding_free),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=runs.trainer_callbacks(train, out, eval_ds is not None, state.is_main_process, gaps) + list(extra_callbacks),
    )
    checkpoint = runs.last_checkpoint(out) if train.resume else None
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    # Not result.training_loss: after a resume that averages the resumed steps only.
    metrics: dict[str, Any] = {"train_loss": runs.mean_loss(runs.logged_losses(trainer.state.log_history)),
                               "global_step": result.global_step}
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    finish_tracker(train.report_to)
    metrics.update(gaps.summary())
    restore_attention(trainer.model, attention)  # the saved config names the model's own kernel
    # Every rank: gathers the full weights when they are sharded (FSDP2, ZeRO-3).
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.is_world_process_zero():
        return out
    model_dir = save_trained(trainer.model, tokenizer, out, model_args.model, train.merge, state_dict=state_dict)
    data = data_record(data_args, train_set, eval_set, counts)
    runs.record_run(out, method="sft", name=train.name, model_spec=model_args.model, revision=model_args.revision,
                    model_dir=model_dir, data_files=(data_args.train_file, data_args.eval_file),
                    config=to_dict(model_args, lora_args, data_args, train), metrics=metrics, tokenizer=tokenizer,
                    command=command, data=data)
    if repo:
        push(out, model_dir, repo)
    return out
