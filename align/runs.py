"""What every training run leaves in its directory.

    DIR/config.yaml      the resolved config (every key, after overrides)
    DIR/metrics.jsonl    one JSON object per logging step (plus TensorBoard under DIR/tensorboard)
    DIR/checkpoints/     resumable trainer checkpoints
    DIR/adapter/         the LoRA adapter and tokenizer (DIR/merged/ for full fine-tuning or --merge)
    DIR/version.json     the model-version record the store registers (base, adapter hash, data hash, parent)
    DIR/README.md        a model card
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from align.config import TrainArgs, to_dict
from align.data import files_sha256, write_atomically
from align.errors import AlignError
from align.interference import InterferenceCheck
from align.models import base_revision, portable_spec, resolve_model, tokenizer_fingerprint
from align.overfit import GapTracker, callback as overfit_callback
from align.publish import check_tracker, hub_repo

if TYPE_CHECKING:
    from transformers import TrainerCallback

    from align.config import ModelArgs, PreferenceDataArgs
    from align.preference import PreferenceSet

log = logging.getLogger(__name__)


RUN_MARKER = ".align-run"  # written into every run directory, so a directory is known to be ours


def is_run_dir(path: Path) -> bool:
    """A directory align made for a run (runs from before the marker: a version.json or checkpoints/)."""
    return (path / RUN_MARKER).is_file() or (path / "version.json").is_file() or (path / "checkpoints").is_dir()


def prepare_output_dir(path: str | Path, resume: bool) -> Path:
    """Create the run directory, refuse to overwrite a previous run unless resuming, check it is writable.

    A directory that is not empty and is not an align run (a project folder, say) is refused, never written into.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise AlignError(f"output directory {out} is a file, not a directory; choose another --output_dir")
    if out.is_dir() and not is_run_dir(out):
        found = sorted(p.name for p in out.iterdir())
        if found:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise AlignError(f"output directory {out} is not empty and is not an align run (it holds {shown}); "
                             "choose a new or empty --output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # The ranks of a distributed run prepare the directory together: marked first, so that another rank sees
        # a run rather than a stranger's files, and one probe file per process.
        (out / RUN_MARKER).touch()
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise AlignError(f"output directory {out} is not writable ({exc.strerror})") from None
    if not resume and (last_checkpoint(out) is not None or (out / "version.json").exists()):
        raise AlignError(f"{out} already holds a run; pass --resume to continue it, or choose another --output_dir")
    set_aside_lost_metrics(out, last_checkpoint(out) if resume else None)
    return out


def guard_run(train_fn: Callable) -> Callable:
    """Decorate a `train_*(..., TrainArgs, ...)` function that returns its run directory.

    `--resume` on a finished run (one with a version.json) is a no-op that says so: nothing is trained, nothing
    rewritten. A run that fails before its first training step, in a directory that was new or empty, leaves that
    directory as it found it (removed, or emptied), so nothing that looks like a result stays behind. Once training
    has started, the metrics and checkpoints stay (they say what went wrong, and `--resume` continues from a
    checkpoint); a failed run never has a version.json."""

    @functools.wraps(train_fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        train = next(a for a in (*args, *kwargs.values()) if isinstance(a, TrainArgs))
        out = Path(train.output_dir)
        if train.resume and reached_its_end(out, train):
            log.warning("%s is a finished run (its version.json records the steps asked for): --resume has nothing "
                        "to do; nothing was trained or rewritten", out)
            return out
        existed = out.exists()
        fresh = not existed or (out.is_dir() and not any(out.iterdir()))
        try:
            return train_fn(*args, **kwargs)
        except BaseException:
            from accelerate import PartialState

            if fresh and out.is_dir() and PartialState().is_main_process and not _trained(out):
                _remove_contents(out)
                if not existed:
                    out.rmdir()
            raise

    return run


def reached_its_end(out: Path, train: Any) -> bool:
    """Whether the run in `out` finished with at least the training `train` asks for (a larger max_steps or
    num_train_epochs continues a finished run from its last checkpoint)."""
    path = out / "version.json"
    if not path.is_file():
        return False
    try:
        version = json.loads(path.read_text())
    except ValueError:
        return False
    done, config = version.get("metrics", {}).get("global_step"), version.get("config", {})
    if train.max_steps > 0:
        return isinstance(done, int) and done >= train.max_steps
    return config.get("max_steps") == -1 and config.get("num_train_epochs", 0) >= train.num_train_epochs


def _trained(out: Path) -> bool:
    if (out / "checkpoints").is_dir() or (out / "version.json").exists():
        return True
    try:
        return any(row.get("step", 0) > 0 for row in read_metrics(out / "metrics.jsonl"))
    except ValueError:  # a torn last line: training had started
        return True


def _remove_contents(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def set_aside_lost_metrics(out: Path, checkpoint: Optional[Path]) -> None:
    """A run restarts from its last checkpoint (or from scratch): rows that an interrupted attempt logged after that
    point will be logged again, so they move from metrics.jsonl to metrics.discarded.jsonl. The curves keep one row
    per step and nothing is deleted. Main process only."""
    from accelerate import PartialState

    path = out / "metrics.jsonl"
    if not path.is_file() or not PartialState().is_main_process:
        return
    restart = int(checkpoint.name.split("-")[-1]) if checkpoint is not None else -1
    rows = read_metrics(path)
    lost = [r for r in rows if r.get("step", 0) > restart]
    if not lost:
        return
    with open(out / "metrics.discarded.jsonl", "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in lost)
    write_atomically(path, (json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= restart))


def last_checkpoint(out: str | Path) -> Optional[Path]:
    """The newest complete, undamaged trainer checkpoint in DIR/checkpoints, or None. A damaged one (a file torn
    by a full disk or a copy cut short) is passed over for the one before it, with a warning naming the file."""
    ckpt_dir = Path(out) / "checkpoints"
    if not ckpt_dir.is_dir():
        return None
    done = [p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    for ckpt in sorted(done, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        if problem not in _warned:
            _warned.add(problem)
            log.warning("checkpoint %s is damaged: %s; using the checkpoint before it", ckpt.name, problem)
    return None


_warned: set[str] = set()


def checkpoint_problem(ckpt: Path) -> Optional[str]:
    """The first file of a checkpoint that cannot be whole, as 'PATH (why)', or None. Cheap: headers and zip
    directories are read, not the tensors."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(p for p in ckpt.iterdir() if p.is_file()):
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), "pt"):  # checks the header covers the file exactly
                    pass
            elif f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix in (".bin", ".pt", ".pth", ".pkl"):
                with open(f, "rb") as handle:
                    is_zip = handle.read(2) == b"PK"
                if is_zip:  # torch.save's format keeps its index at the end: a torn file has none
                    zipfile.ZipFile(f).close()
        except (OSError, ValueError, SafetensorError, zipfile.BadZipFile) as exc:
            return f"{f} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return None


def mean_loss(losses: Sequence[tuple[int, float]]) -> float:
    """Mean training loss per step from logged (step, mean loss since the previous row) pairs, the rows of an
    interrupted attempt included; rows whose loss was not finite (skipped steps) are left out."""
    total = weight = 0.0
    previous = 0
    for step, loss in losses:
        if loss is not None and math.isfinite(loss):
            total += loss * (step - previous)
            weight += step - previous
        previous = step
    return total / weight if weight else math.nan


def logged_losses(log_history: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) rows of a transformers Trainer's log history (restored from the checkpoint on resume)."""
    return [(row["step"], row["loss"]) for row in log_history if "loss" in row and "step" in row]


def dir_sha256(path: str | Path) -> str:
    """Hash of a saved model's weight and config files (stable across machines)."""
    digest = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.suffix in (".safetensors", ".json") and f.name != "README.md":
            digest.update(f.name.encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """The project's one JSON-file writer: indented, sorted keys, atomic, strict JSON (NaN and infinities, an
    undefined metric, are written as null, which every reader parses)."""
    text = json.dumps(finite_or_none(data), indent=2, sort_keys=True, default=str, allow_nan=False)
    write_atomically(path, [text + "\n"])


def finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_version(out: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write version.json: the immutable identity of the model this run produced."""
    record = {"created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **record}
    write_json(out / "version.json", record)
    return record


# The hub id of each embedded alias's weights, for the model card's base_model.
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def card_metadata(version: dict[str, Any]) -> dict[str, Any]:
    """The Hub's YAML header of a model card: base_model (a hub id only), library_name, tags, datasets."""
    base = HUB_IDS.get(version["base_model"], version["base_model"])
    adapter = Path(str(version.get("adapter_path", ""))).name == "adapter"
    meta: dict[str, Any] = {}
    if base.count("/") == 1 and not Path(base).exists():
        meta["base_model"] = base
    meta["library_name"] = "peft" if adapter else "transformers"
    meta["tags"] = ["align", version["method"], "trl"] + (["lora"] if adapter else [])
    hub_dataset = (version.get("data") or {}).get("hub_dataset")
    if hub_dataset:
        meta["datasets"] = [hub_dataset]
    meta["pipeline_tag"] = "text-classification" if version["method"] == "reward" else "text-generation"
    return meta


def write_model_card(out: Path, version: dict[str, Any], metrics: dict[str, Any], command: str) -> None:
    import yaml

    data = version.get("data") or {}
    lines = [
        "---",
        yaml.safe_dump(card_metadata(version), sort_keys=False).strip(),
        "---",
        "",
        f"# {version['name']}",
        "",
        f"Trained by align ({version['method']}) from `{version['parent'] or version['base_model']}`.",
        "",
    ]
    if data.get("described"):
        lines += [f"Data: {data['described']}" + (f"; dropped {data['dropped']}" if data.get("dropped") else "") + ".", ""]
    lines += [
        "| field | value |",
        "|---|---|",
    ]
    for key in ("base_model", "base_revision", "parent", "adapter_hash", "data_hash", "created_at"):
        lines.append(f"| {key} | `{version.get(key)}` |")
    lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    lines += ["", "## Reproduce", "", "```", command, "```", "", "The full resolved config is in `config.yaml`.", ""]
    (out / "README.md").write_text("\n".join(lines))


def metrics_callback(path: str | Path) -> "TrainerCallback":
    """A trainer callback appending each logged dict to a JSONL file (main process only)."""
    from transformers import TrainerCallback

    class MetricsJsonl(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                row = {"step": state.global_step, "epoch": state.epoch, **logs}
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row, default=float) + "\n")

    return MetricsJsonl()


def print_run_summary(out: Path) -> None:
    """Print what a training run saved (main process only: other ranks have nothing to say)."""
    from accelerate import PartialState  # deferred: accelerate imports torch

    if not PartialState().is_main_process:
        return
    version = json.loads((out / "version.json").read_text())
    metrics = version.get("metrics", {})
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"run {version['name']} ({version['method']}) saved to {out}")
    print(f"  model: {version['adapter_path']}")
    print(f"  metrics: {shown}")
    for key in ("stop_reason", "overfit_alarm", "interference_warning"):  # align.overfit, align.interference
        if isinstance(metrics.get(key), str):
            print(f"  {key.replace('_', ' ')}: {metrics[key]}")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def command_line() -> str:
    import shlex
    import sys

    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.argv[0]), *sys.argv[1:]])


def lineage(model_spec: str, revision: Optional[str] = None) -> dict[str, Any]:
    """The version.json fields that say where a run started: base weights, parent version name and spec.

    `parent` is the starting model's version name (a run directory's own name, else the spec itself, which
    is the name base models are registered under); `parent_spec` is where to load it from.
    """
    resolved = resolve_model(model_spec, revision)
    return {
        "base_model": resolved.base,
        "base_revision": base_revision(resolved),
        "parent": version_name(model_spec),
        "parent_spec": portable_spec(model_spec),
    }


def version_name(model_spec: str) -> str:
    """The model-version name of a spec: a training run's recorded name, else the (portable) spec."""
    version_file = Path(model_spec).expanduser() / "version.json"
    if version_file.is_file():
        return json.loads(version_file.read_text())["name"]
    return portable_spec(model_spec)


def record_run(
    out: Path,
    *,
    method: str,
    name: Optional[str],
    model_spec: str,
    revision: Optional[str],
    model_dir: Path,
    data_files: tuple,
    config: dict[str, Any],
    metrics: dict[str, Any],
    tokenizer: Any,
    command: Optional[str] = None,
    data: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Write version.json and the model card, as every training run does; return the version record. `data`: what
    was read (the detected format, rows read, rows dropped and why, the data hash), recorded as version["data"]."""
    version = write_version(
        out,
        {
            "name": name or out.resolve().name,
            "method": method,
            **lineage(model_spec, revision),
            "adapter_path": str(model_dir.resolve()),
            "adapter_hash": dir_sha256(model_dir),
            "data_hash": data["hash"] if data and data.get("hash") else files_sha256(*data_files),
            **({"data": data} if data else {}),
            "config": config,
            "metrics": metrics,
            **tokenizer_fingerprint(tokenizer),
        },
    )
    write_model_card(out, version, metrics, command or command_line())
    return version


# ---- what every training run shares -------------------------------------------------------------------------------


def cpu_autocast(train: TrainArgs) -> bool:
    """`mixed_precision: bf16` without CUDA: transformers' Trainer (SFT, RLHF) autocasts on the CPU only with use_cpu."""
    import torch

    return train.mixed_precision == "bf16" and not torch.cuda.is_available()


def checkpointing_option(enabled: bool) -> dict[str, bool]:
    """transformers' TrainingArguments option for activation checkpointing, under the name this release reads:
    5.25 renamed `gradient_checkpointing` to `activation_checkpointing` (the old name still works, with a warning at
    every run); older releases know only the old one."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def enable_checkpointing(model: Any, use_reentrant: bool) -> None:
    """Turn activation checkpointing on in a transformers model (or a PEFT model around one), by the method this
    release has (5.25 renamed gradient_checkpointing_enable, which now warns)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def preflight(train: TrainArgs) -> Optional[str]:
    """Checks that must fail before any training: the tracker's package, the hub (token and network)."""
    check_tracker(train.report_to)
    return hub_repo(train)


def stage_interference(accelerator: Any, args: Any, model_spec: str, method: str, tokenizer: Any,
                       sft_weight: Optional[float] = None) -> Optional[Any]:
    """The stage-interference check (align/interference.py), on the main process, where the whole model is there
    to run (not under FSDP or ZeRO-3, whose shards only the prepared model can gather)."""
    from accelerate.utils import DistributedType  # deferred: accelerate and interference import torch

    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded or not accelerator.is_main_process:
        return None
    check = InterferenceCheck(args, model_spec, method, tokenizer, sft_weight)
    return check if check.enabled else None


def trainer_callbacks(train: TrainArgs, out: Path, has_eval: bool, main_process: bool = True,
                      gaps: Optional[GapTracker] = None) -> list:
    """The callbacks of a transformers-Trainer run (SFT, RLHF): metrics.jsonl (+ TensorBoard); with evaluation, the
    overfitting alarm and early stopping (align.overfit). The non-finite guard and the overfitting callback come
    first: they add train/skipped_steps and eval_gap to the logs the metrics callback writes."""
    from align.trainers.finite import non_finite_callback  # deferred: imports torch

    found = [non_finite_callback(train.learning_rate), metrics_callback(out / "metrics.jsonl")]
    if has_eval and train.eval_steps > 0:
        patience = train.early_stopping_patience
        found.insert(1, overfit_callback(gaps if gaps is not None else GapTracker(train.overfit_window), patience))
    if train.report_to == "tensorboard" and main_process:
        from torch.utils.tensorboard import SummaryWriter  # deferred: torch and transformers take seconds
        from transformers.integrations import TensorBoardCallback

        found.append(TensorBoardCallback(tb_writer=SummaryWriter(str(out / "tensorboard"))))
    return found


def data_metrics(pset: "PreferenceSet", counts: dict[str, int], prefix: str = "data") -> dict[str, int]:
    return {f"{prefix}/pairs": len(pset.rows), f"{prefix}/ties": sum(r.label == "tie" for r in pset.rows),
            f"{prefix}/both_bad_dropped": pset.both_bad_dropped, **{f"{prefix}/{k}": v for k, v in counts.items()},
            **{f"{prefix}/dropped_{k}": v for k, v in pset.dropped.items()}}


def write_run_record(out: Path, method: str, model_args: "ModelArgs", model_dir: Path, data_args: "PreferenceDataArgs",
                     configs: Sequence[Any], metrics: dict, tokenizer: Any, command: Optional[str],
                     data: Optional[dict] = None) -> None:
    """version.json and the model card for a preference run (DPO or reward); pushed when push_to_hub is on."""
    record_run(out, method=method, name=configs[-1].name, model_spec=model_args.model, revision=model_args.revision,
                    model_dir=model_dir, data_files=(data_args.train_file, data_args.eval_file),
                    config=to_dict(*configs), metrics=metrics, tokenizer=tokenizer, command=command, data=data)
