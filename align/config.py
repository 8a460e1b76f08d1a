"""Typed configs: one dataclass per concern, loaded from YAML with `--key value` overrides.

The convention is HfArgumentParser's (and TRL's): a flat YAML whose keys are the fields of a few
dataclasses, passed with `--config`, and any field overridable on the command line. What we add:
an unknown key (in the YAML or on the command line) is an error that names it and suggests the
nearest valid key, and YAML values are type-checked, because YAML bypasses argparse's `choices`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from align.commands.parser import RaisingParser
from align.data import parse_columns
from align.errors import ConfigError, DataError
from align.weighting import SCHEME_NAMES


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its help text (shown by `align <command> --help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


class Validated:
    """Mixin: checks `Literal` choices and `Optional` types after construction, from YAML or code."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f.name, hints[f.name], getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Range checks; subclasses override and raise ConfigError."""


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def coerce(name: str, hint: Any, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
            return None  # `--eval_file none` on the command line
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(name, inner, value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [coerce(name, args[0], v) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            converted = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be {'an integer' if hint is int else 'a number'}, got {value!r}") from None
        if hint is int and isinstance(value, float) and value != converted:
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if hint is float and not math.isfinite(converted):  # nan passes every range check; inf means nothing here
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return converted
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


# --------------------------------------------------------------------------------------------
# Shared concerns
# --------------------------------------------------------------------------------------------


@dataclass
class ModelArgs(Validated):
    _argument_group_name = "model"

    model: str = option(
        "smollm2-135m-instruct",
        "Model spec: the alias smollm2-135m-instruct (embedded, offline), a local model or adapter "
        "directory, a training run directory, or a Hugging Face hub id.",
    )
    revision: Optional[str] = option(None, "Hub revision (branch, tag or commit) for hub ids.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "Weights dtype. auto: bfloat16 on a GPU that supports it, else float32."
    )
    attn_implementation: Optional[str] = option(None, "Attention kernel, e.g. sdpa or flash_attention_2.")
    load_in_4bit: bool = option(
        False, "QLoRA: load the base weights in 4-bit NF4 (bitsandbytes, CUDA only); train a LoRA adapter on top."
    )
    chat_template: Optional[str] = option(
        None, "Chat template for a tokenizer without one (or to replace its own): chatml, a .jinja file, or the "
        "template text. none: the tokenizer's own, else ChatML (named in the log)."
    )


@dataclass
class LoraArgs(Validated):
    _argument_group_name = "lora"

    use_lora: bool = option(True, "Train a LoRA adapter (peft). false: full fine-tuning.")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = option(
        0.0, "Dropout on the LoRA input (peft's and TRL's default: none; > 0 costs a mask per adapted layer, about a "
        "tenth of a CPU step, and makes the DPO policy differ from its reference at step 0).")
    lora_target_modules: list[str] = option(
        ["all-linear"], "Modules to adapt: all-linear, or names such as q_proj,v_proj."
    )

    def validate(self) -> None:
        _positive("lora_r", self.lora_r)
        _positive("lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


def scheduler_names() -> list[str]:
    """Learning-rate schedules stepped once per optimizer step with no extra arguments (transformers' names);
    the others need a metric (reduce_lr_on_plateau, greedy) or scheduler kwargs our configs do not carry."""
    from transformers import SchedulerType

    needs_more = {"reduce_lr_on_plateau", "greedy", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                  "warmup_stable_decay"}
    return [t.value for t in SchedulerType if t.value not in needs_more]


@dataclass
class TrainArgs(Validated):
    """The optimisation loop shared by every training recipe."""

    _argument_group_name = "training"

    output_dir: str = option("runs/sft", "Run directory: adapter, checkpoints, metrics, version.json.")
    max_steps: int = option(-1, "Optimizer steps; -1 means num_train_epochs decides.")
    num_train_epochs: float = option(1.0, "Passes over the training data (when max_steps is -1).")
    per_device_train_batch_size: int = option(8, "Sequences per device per micro-batch.")
    per_device_eval_batch_size: int = option(8, "Sequences per device per evaluation batch.")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    learning_rate: float = option(2e-4, "Peak learning rate (LoRA tolerates ~10x full fine-tuning's).")
    lr_scheduler_type: str = option("cosine", "Learning-rate schedule (transformers names).")
    warmup_steps: float = option(0.03, "Warm-up: a step count, or a fraction of all steps when < 1.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    logging_steps: int = option(10, "Log metrics every N optimizer steps.")
    eval_steps: int = option(50, "Evaluate every N steps (0: only at the end).")
    save_steps: int = option(50, "Checkpoint every N steps.")
    save_total_limit: int = option(2, "Checkpoints kept on disk.")
    early_stopping_patience: int = option(0, "Stop after N evaluations without eval-loss improvement; 0: off.")
    overfit_window: int = option(
        3, "Overfitting alarm: warn when the eval − train loss gap has widened this many evaluations in a row; 0: off."
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in backward (less memory, ~30% slower).")
    auto_batch: bool = option(
        False, "DPO, reward: the largest per-device micro-batch that fits the GPU (align memory's estimate, then a "
        "probe step), with gradient accumulation keeping per_device_train_batch_size x gradient_accumulation_steps."
    )
    mixed_precision: Literal["auto", "bf16", "no"] = option(
        "auto", "Training-step precision (DPO, reward, SFT, RLHF). auto: bf16 autocast when the weights are bf16 (the "
        "GPU default). bf16: bf16 autocast over float32 weights too (GPUs; CPUs with AVX512-BF16 or AMX), the reference "
        "pass under the same autocast (loss log 2 at step 0); losses, importance weights and stored log-probs stay "
        "float32. no: never."
    )
    seed: int = option(42, "Random seed (data order, LoRA init, dropout).")
    resume: bool = option(False, "Resume from the last checkpoint in output_dir.")
    merge: bool = option(False, "Also save the base model with the adapter merged in (output_dir/merged).")
    name: Optional[str] = option(None, "Model-version name recorded in version.json (default: output_dir's name).")
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = option(
        "tensorboard", "Tracker for metrics besides metrics.jsonl: none, tensorboard, wandb (pip install "
        "'align[wandb]') or trackio (pip install 'align[trackio]')."
    )
    dataloader_num_workers: int = option(0, "Processes that collate batches in the background (0: the main one).")
    push_to_hub: bool = option(False, "Upload the saved model and its model card to the Hugging Face hub at the end.")
    hub_model_id: Optional[str] = option(None, "Hub repository for push_to_hub (default: output_dir's name).")

    def validate(self) -> None:
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            _positive(key, getattr(self, key))
        _positive("learning_rate", self.learning_rate)
        _positive("num_train_epochs", self.num_train_epochs)
        _positive("max_grad_norm", self.max_grad_norm, allow_zero=True)  # 0: no clipping
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        _positive("warmup_steps", self.warmup_steps, allow_zero=True)
        if self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps):
            raise ConfigError(f"warmup_steps must be a fraction < 1 or a whole number of steps, got {self.warmup_steps}")
        schedules = scheduler_names()
        if self.lr_scheduler_type not in schedules:
            raise ConfigError(f"lr_scheduler_type: {self.lr_scheduler_type!r} is not one of {', '.join(schedules)}")
        _positive("logging_steps", self.logging_steps)
        _positive("save_steps", self.save_steps)
        _positive("eval_steps", self.eval_steps, allow_zero=True)
        _positive("early_stopping_patience", self.early_stopping_patience, allow_zero=True)
        _positive("overfit_window", self.overfit_window, allow_zero=True)
        _positive("dataloader_num_workers", self.dataloader_num_workers, allow_zero=True)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps must be -1 or > 0, got {self.max_steps}")


@dataclass
class DataSourceArgs(Validated):
    """Where training data comes from (align/data.py reads it all through `datasets`)."""

    dataset_name: Optional[str] = option(
        None, "A Hugging Face hub dataset id (or a local dataset folder) to read instead of train_file/eval_file.")
    dataset_config: Optional[str] = option(None, "The hub dataset's configuration (subset) name.")
    dataset_split: str = option("train", "Split (or slice, e.g. train[:1000]) of dataset_name to train on.")
    dataset_eval_split: Optional[str] = option(
        None, "Split (or slice) of dataset_name to evaluate on (none: no evaluation set).")
    dataset_revision: Optional[str] = option(None, "Hub revision (branch, tag or commit) of dataset_name.")
    columns: Optional[str] = option(
        None, "Map the data's column names onto align's: NAME=COLUMN,... e.g. prompt=question,chosen=good,rejected=bad.")

    def validate(self) -> None:
        try:
            parse_columns(self.columns)
        except DataError as exc:
            raise ConfigError(str(exc)) from None


@dataclass
class SFTDataArgs(DataSourceArgs):
    _argument_group_name = "data"

    train_file: str = option(
        "data/sft/train.jsonl", "SFT data: a JSON/JSONL/CSV/Parquet file or glob, or a save_to_disk folder; messages, "
        "prompt/completion, text, ShareGPT or Alpaca rows (data/README.md).")
    eval_file: Optional[str] = option("data/sft/eval.jsonl", "Held-out data in any such format (none: no eval).")
    max_length: int = option(512, "Longest tokenised conversation kept; longer ones are truncated (counted).")
    max_train_samples: Optional[int] = option(None, "Use only the first N training rows (quick runs).")
    max_eval_samples: Optional[int] = option(None, "Use only the first N evaluation rows.")
    packing: bool = option(False, "Pack several rows into each max_length sequence (TRL's best-fit packing).")
    padding_free: bool = option(
        True, "Padding-free batches: a micro-batch's rows concatenated into one sequence with position ids, no pad "
        "tokens, each row attending only to itself (exact; SDPA span by span on CPU, flash_attention_2 or flex "
        "attention where chosen; other kernels fall back to padded rows). false: padded rows.")

    def validate(self) -> None:
        super().validate()
        _positive("max_length", self.max_length)


SFT_CONFIG = (ModelArgs, LoraArgs, SFTDataArgs, TrainArgs)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def field_names(dataclass_types: typing.Sequence[type]) -> dict[str, type]:
    """Every config key, mapped to the dataclass that owns it."""
    owners: dict[str, type] = {}
    for dtype in dataclass_types:
        for f in dataclasses.fields(dtype):
            if f.name in owners:
                raise RuntimeError(f"config key {f.name} is defined by both {owners[f.name].__name__} and {dtype.__name__}")
            owners[f.name] = dtype
    return owners


def unknown_key_error(key: str, known: typing.Iterable[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}' {where}{hint}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw.decode("utf-8")) or {}
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}: not valid YAML at column {mark.column + 1}" if mark else ": not valid YAML"
        problem = getattr(exc, "problem", None)
        raise ConfigError(f"{path}{where}{f' ({problem})' if problem else ''}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to read") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def parse_config(
    dataclass_types: typing.Sequence[type], argv: Optional[list[str]] = None, prog: Optional[str] = None
) -> tuple:
    """Build the dataclasses from `--config FILE` and `--key value` overrides (command line wins).

    Returns one instance per dataclass type, in order.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    owners = field_names(dataclass_types)
    parser = _parser_class()(dataclass_types, prog=prog, allow_abbrev=False)
    parser.add_argument("--config", type=str, default=None, help="YAML file of config keys (see recipes/configs).")

    values: dict[str, Any] = {}
    config_path = _pop_config_path(argv)
    if config_path is not None:
        for key, value in load_yaml(config_path).items():
            if key not in owners:
                raise unknown_key_error(key, owners, f"in {config_path}")
            values[key] = value
    parser.set_defaults(**values)

    namespace, remaining = parser.parse_known_args(argv)
    for token in remaining:
        if token.startswith("--"):
            raise unknown_key_error(token[2:].split("=")[0].replace("-", "_"), owners, "on the command line")
        raise ConfigError(f"unexpected argument '{token}' (options are written --key value)")
    parsed = vars(namespace)
    parsed.pop("config", None)
    instances = []
    for dtype in dataclass_types:
        kwargs = {f.name: parsed[f.name] for f in dataclasses.fields(dtype) if f.init}
        instances.append(dtype(**kwargs))
    return tuple(instances)


def _parser_class() -> type:
    from transformers import HfArgumentParser  # deferred: transformers takes seconds to import

    class Parser(RaisingParser, HfArgumentParser):  # one clear line instead of argparse's usage dump
        pass

    return Parser


def _pop_config_path(argv: list[str]) -> Optional[str]:
    for i, token in enumerate(argv):
        if token == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file path")
            return argv[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def to_dict(*configs: Any) -> dict[str, Any]:
    """Flatten config instances into one YAML-ready mapping (the resolved config of a run)."""
    out: dict[str, Any] = {}
    for cfg in configs:
        out.update(dataclasses.asdict(cfg))
    return out


def save_config(path: str | Path, *configs: Any) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(*configs), sort_keys=False))


# --------------------------------------------------------------------------------------------
# Preference training: DPO and the reward model (align/trainers/dpo.py, align/trainers/reward.py)
# --------------------------------------------------------------------------------------------


@dataclass
class PreferenceDataArgs(DataSourceArgs):
    _argument_group_name = "data"

    train_file: str = option(
        "data/preferences/train.jsonl", "Preference data: a JSON/JSONL/CSV/Parquet file or glob, or a save_to_disk "
        "folder; TRL standard or conversational pairs, explicit or implicit prompt, UltraFeedback, Anthropic HH "
        "(data/README.md)."
    )
    eval_file: Optional[str] = option(None, "Held-out preference data in any such format (none: no eval).")
    max_length: int = option(1024, "Longest prompt + completion in tokens; longer completions are cut (and counted).")
    max_prompt_length: int = option(512, "Longest prompt in tokens; longer prompts keep their last tokens (counted).")
    max_train_samples: Optional[int] = option(None, "Use only the first N training rows (quick runs).")
    max_eval_samples: Optional[int] = option(None, "Use only the first N evaluation rows.")

    def validate(self) -> None:
        super().validate()
        _positive("max_length", self.max_length)
        _positive("max_prompt_length", self.max_prompt_length)
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")


@dataclass
class InterferenceArgs(Validated):
    """Stage interference (align/interference.py): DPO and RLHF measure what they cost the SFT stage."""

    interference_samples: int = option(
        32, "Held-out SFT conversations whose assistant-token loss is measured before and after training (0: off)."
    )
    interference_sft_file: Optional[str] = option(
        "auto", "Their chat JSONL; auto: the eval (else train) file of the nearest SFT run in the starting model's "
        "lineage, else data/sft/eval.jsonl."
    )
    interference_per_family: int = option(
        1, "Held-out task prompts per family whose greedy answers' gold reward is measured before and after (0: off)."
    )
    interference_max_loss_increase: float = option(
        0.05, "Warn when the held-out SFT loss rises by more than this (nats/token); the remedy named is sft_weight."
    )
    interference_max_gold_drop: float = option(0.05, "Warn when the gold reward falls by more than this.")

    def validate_interference(self) -> None:
        for key in ("interference_samples", "interference_per_family", "interference_max_loss_increase",
                    "interference_max_gold_drop"):
            _positive(key, getattr(self, key), allow_zero=True)


@dataclass
class DPOArgs(InterferenceArgs):
    _argument_group_name = "dpo"

    beta: float = option(0.1, "KL strength β: implicit reward = β·(log π - log π_ref).")
    loss_type: Literal["sigmoid", "ipo", "robust", "hinge"] = option(
        "sigmoid", "DPO-family loss (align/losses.py): sigmoid (DPO), ipo, robust (cDPO), hinge (SLiC)."
    )
    label_smoothing: float = option(0.0, "robust only: probability ε that a label is flipped.")
    sft_weight: float = option(0.0, "Weight of an SFT term (per-token NLL of chosen, non-tie pairs); 0: off.")
    tie_nu: float = option(1.0, "Davidson tie parameter ν > 0 for pairs labelled tie (larger: ties likelier a priori).")
    both_bad: Literal["drop", "tie"] = option(
        "drop", "Pairs labelled both_bad: drop them (counted, logged) or train them as ties."
    )
    precompute_ref: bool = option(True, "Reference log-probs in one no-grad pass before training, not every step.")
    padding_free: bool = option(
        True, "One packed row per micro-batch: no padding, and each prompt computed once for chosen and rejected "
        "(exact; align/packing.py). false: padded rows, prompt + chosen and prompt + rejected."
    )
    use_soft_labels: bool = option(
        False, "robust only: label_agreement is the probability that chosen is preferred (per-pair ε)."
    )

    def validate(self) -> None:
        self.validate_interference()
        _positive("beta", self.beta)
        _positive("tie_nu", self.tie_nu)
        _positive("sft_weight", self.sft_weight, allow_zero=True)
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if (self.label_smoothing or self.use_soft_labels) and self.loss_type != "robust":
            raise ConfigError("label_smoothing and use_soft_labels need loss_type: robust")


@dataclass
class WeightingArgs(Validated):
    _argument_group_name = "weighting"

    weighting_scheme: Literal[(*SCHEME_NAMES, "auto")] = option(
        "auto", "Importance weights for pairs sampled by older versions (align/weighting.py). auto (align/reuse.py): "
        "none, tempered, length_normalized or per-version trust, whichever short pilot fits show raises the held-out "
        "log-likelihood of the target's own pairs; none, saying why, with too few of those or of old pairs. none: the "
        "`weight` column of the data if present, else 1. sequence and mixture: kept, but they lost to unweighted "
        "reuse in bench/iw_sim.py (README)."
    )
    weighting_alpha: float = option(1.0, "Tempering exponent α for tempered and mixture (0: unweighted, 1: plain IS).")
    weighting_clip: Optional[float] = option(5.0, "Truncate weights at c (≥ 1) after normalising to mean 1; none: off.")
    weighting_target: Literal["static", "dynamic"] = option(
        "static", "static: target = the starting policy, scored once before training. dynamic (DPO only): the current "
        "policy each step, detached, normalised by a running dataset mean."
    )

    weighting_new_version: Optional[str] = option(
        None, "auto: the version whose pairs the target model sampled (held out to validate on); none: the version "
        "whose generation log-probs equal the target's."
    )
    weighting_min_batch: int = option(
        32, "When pairs carry unequal weights, raise gradient_accumulation_steps so each optimizer step sees at least "
        "this many pairs (AdamW washes out the weights of tiny steps); 0: off."
    )
    weighting_auto_steps: int = option(40, "auto: optimizer steps of each pilot fit (candidates × 2 folds, plus 2 "
                                           "fits for per-version trust): the budget auto spends before training.")
    weighting_auto_min_new: int = option(50, "auto: fewest pairs of the target's own version to validate on; fewer: "
                                             "none.")
    weighting_auto_min_ratio: float = option(10.0, "auto: fewest old pairs per new pair for weighting to pay; fewer: "
                                                   "none.")

    def validate(self) -> None:
        _positive("weighting_alpha", self.weighting_alpha, allow_zero=True)
        _positive("weighting_auto_steps", self.weighting_auto_steps)
        _positive("weighting_min_batch", self.weighting_min_batch, allow_zero=True)
        _positive("weighting_auto_min_new", self.weighting_auto_min_new)
        _positive("weighting_auto_min_ratio", self.weighting_auto_min_ratio, allow_zero=True)
        if self.weighting_target == "dynamic" and self.weighting_scheme == "auto":
            raise ConfigError("weighting_target dynamic needs a named weighting_scheme, not auto (auto decides once, "
                              "before training, against the static target)")
        if self.weighting_clip is not None and self.weighting_clip < 1:
            raise ConfigError(f"weighting_clip must be >= 1 (weights have mean 1), got {self.weighting_clip}")


DPO_CONFIG = (ModelArgs, LoraArgs, PreferenceDataArgs, DPOArgs, WeightingArgs, TrainArgs)


@dataclass
class RewardArgs(Validated):
    _argument_group_name = "reward"

    margin_scale: float = option(0.0, "Margin m = margin_scale · the `margin` column in -log σ(r_c - r_r - m); 0: off.")
    center_coef: float = option(0.0, "Centering coefficient η: adds η·(r_c + r_r)², keeping rewards near 0; 0: off.")
    tie_nu: float = option(1.0, "Davidson tie parameter ν > 0 for pairs labelled tie.")
    both_bad: Literal["drop", "tie"] = option("drop", "Pairs labelled both_bad: drop them (counted) or train as ties.")
    padding_free: bool = option(
        True, "One packed row per micro-batch: no padding, and each prompt computed once for chosen and rejected "
        "(exact; align/packing.py). false: padded rows, prompt + chosen and prompt + rejected."
    )

    def validate(self) -> None:
        _positive("margin_scale", self.margin_scale, allow_zero=True)
        _positive("center_coef", self.center_coef, allow_zero=True)
        _positive("tie_nu", self.tie_nu)


REWARD_CONFIG = (ModelArgs, LoraArgs, PreferenceDataArgs, RewardArgs, WeightingArgs, TrainArgs)


# --------------------------------------------------------------------------------------------
# RLHF: online RL against a trained reward model (align/trainers/rlhf.py, align/monitor.py)
# --------------------------------------------------------------------------------------------


@dataclass
class PromptDataArgs(Validated):
    _argument_group_name = "data"

    prompts_file: str = option(
        "data/tasks/train.jsonl", "Prompt JSONL: task rows ({\"prompt\", \"family\", \"gold\"}), chat rows "
        "({\"messages\"}) or {\"prompt\": text}."
    )
    eval_prompts_file: Optional[str] = option(
        "data/tasks/eval.jsonl", "Held-out task rows for the periodic gold evaluation (none: no gold evaluation)."
    )
    max_prompts: Optional[int] = option(None, "Use only the first N training prompts (quick runs).")

    def validate(self) -> None:
        if self.max_prompts is not None:
            _positive("max_prompts", self.max_prompts)


@dataclass
class RLHFArgs(InterferenceArgs):
    _argument_group_name = "rlhf"

    algorithm: Literal["rloo", "grpo"] = option(
        "rloo", "rloo: REINFORCE leave-one-out, KL folded into the reward (TRL RLOOTrainer). grpo: group-normalised "
        "advantages, KL added to the loss (TRL GRPOTrainer)."
    )
    reward_model: str = option("runs/reward-smollm2", "Reward-model run directory (what `align reward` wrote).")
    beta: float = option(
        0.05, "KL coefficient to the reference (the starting model); the start value when kl_target is set."
    )
    kl_target: Optional[float] = option(
        None, "Adaptive KL: steer beta so the logged per-token KL approaches this value (Ziegler et al. 2019); "
        "none: beta stays fixed."
    )
    kl_horizon: int = option(1000, "Adaptive KL horizon in samples: how fast beta moves toward the target.")
    num_generations: int = option(4, "Completions sampled per prompt (RLOO/GRPO baselines are per prompt group).")
    max_new_tokens: int = option(64, "Longest completion in tokens.")
    temperature: float = option(1.0, "Sampling temperature of the rollouts.")
    length_penalty: float = option(
        0.0, "Subtracted from the normalised reward per completion token (0: off); counters length hacking."
    )
    reward_batch_size: int = option(16, "Sequences per reward-model forward.")
    eval_per_family: int = option(
        4, "Held-out prompts per task family in each gold evaluation (run every eval_steps steps and at the end)."
    )
    judge_reward_model: Optional[str] = option(
        None, "A second, held-out reward-model run: its reward on the evaluation answers is logged as "
        "eval/judge_reward and watched by the monitor (none: off)."
    )
    keep_policy: Literal["last", "best_if_flagged", "best", "best_beyond_noise"] = option(
        "last", "Which policy the run saves: last; best_if_flagged: when the reward-hacking monitor flagged the run, "
        "the policy of the gold evaluation with the highest gold reward (the earliest on ties; the starting policy "
        "counts); best: that policy always (checkpoint selection on the evaluation prompts: compare the saved model "
        "on other prompts); best_beyond_noise: the best of the evaluations that beat the starting policy beyond noise "
        "(the 95 percent paired bootstrap interval over prompts of the gain, eval/gold_gain_low, above 0), else the "
        "starting policy: the best of a few noisy evaluations is often no better on other prompts. Metrics name the "
        "step kept (policy/kept_step). Needs eval_prompts_file."
    )
    engine: Literal["hf", "vllm"] = option(
        "hf", "What samples the rollouts: hf (transformers' generate) or vllm (TRL's colocate mode; the 'vllm' extra "
        "and a CUDA GPU). The log-probs the loss uses are the policy's own, teacher-forced, either way; the gold "
        "evaluations always use hf.")

    def validate(self) -> None:
        self.validate_interference()
        _positive("beta", self.beta, allow_zero=True)
        if self.kl_target is not None:
            _positive("kl_target", self.kl_target)
            if self.beta == 0:
                raise ConfigError("kl_target needs a start beta > 0 (beta 0 turns the reference model off)")
        _positive("kl_horizon", self.kl_horizon)
        if self.num_generations < 2:
            raise ConfigError(
                f"num_generations must be >= 2 (the baseline is the other samples), got {self.num_generations}")
        _positive("max_new_tokens", self.max_new_tokens)
        _positive("temperature", self.temperature)
        _positive("length_penalty", self.length_penalty, allow_zero=True)
        _positive("reward_batch_size", self.reward_batch_size)
        _positive("eval_per_family", self.eval_per_family)


@dataclass
class MonitorArgs(Validated):
    """Reward-hacking monitor (align/monitor.py): flags, and optionally stops, runs that game the reward."""

    _argument_group_name = "monitor"

    monitor: bool = option(True, "Watch the run for reward hacking; flags go to metrics and DIR/monitor.json.")
    monitor_stop: bool = option(False, "Stop training when the monitor raises a flag.")
    monitor_window: int = option(5, "Evaluations in the proxy-vs-gold trend window.")
    monitor_min_rho: float = option(
        0.8, "Flag when, over the window, Spearman ρ(step, proxy) ≥ this and ρ(step, gold or judge) ≤ -this ..."
    )
    monitor_min_drop: float = option(
        0.05, "... and gold (or judge) fell at least this much over the window (least-squares fit, its own units)."
    )
    monitor_kl_budget: Optional[float] = option(None, "Flag when the logged per-token KL passes this (none: off).")
    monitor_length_ratio: Optional[float] = option(
        2.5, "Flag when the mean completion length reaches this multiple of its starting value (none: off)."
    )
    monitor_repetition_increase: Optional[float] = option(
        0.3, "Flag when the share of repeated 3-grams rises this much above its starting value (none: off)."
    )
    monitor_family_drop: Optional[float] = option(
        None, "Flag when one task family's held-out gold falls this far below its first evaluation, whatever the "
        "overall gold does (none: off). Set it above one prompt's share of a family (1 / eval_per_family)."
    )
    monitor_top_k: int = option(8, "Highest-reward samples kept for inspection (DIR/monitor.json) and audit.")
    audit_db: Optional[str] = option(
        None, "Store URL: push the top-k samples, each paired with a reference-model sample on the same prompt, "
        "as pairs of rule 'audit' for humans to label (none: off)."
    )
    audit_votes_required: int = option(3, "Votes required on each audit pair.")

    def validate(self) -> None:
        if self.monitor_window < 3:
            raise ConfigError(f"monitor_window must be >= 3 (a trend needs three points), got {self.monitor_window}")
        if not 0 < self.monitor_min_rho <= 1:
            raise ConfigError(f"monitor_min_rho must be in (0, 1], got {self.monitor_min_rho}")
        _positive("monitor_min_drop", self.monitor_min_drop, allow_zero=True)
        for key in ("monitor_kl_budget", "monitor_repetition_increase", "monitor_family_drop"):
            if getattr(self, key) is not None:
                _positive(key, getattr(self, key))
        if self.monitor_length_ratio is not None and self.monitor_length_ratio <= 1:
            raise ConfigError(f"monitor_length_ratio must be > 1, got {self.monitor_length_ratio}")
        _positive("monitor_top_k", self.monitor_top_k, allow_zero=True)
        _positive("audit_votes_required", self.audit_votes_required)


RLHF_CONFIG = (ModelArgs, LoraArgs, PromptDataArgs, RLHFArgs, MonitorArgs, TrainArgs)
