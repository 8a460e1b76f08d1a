"""Helpers that several test files share (fixtures live in conftest.py): the CLI run in-process, data writers."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from align.config import (DPOArgs, LoraArgs, ModelArgs, MonitorArgs, PreferenceDataArgs, PromptDataArgs, RewardArgs,
                          RLHFArgs, SFTDataArgs, TrainArgs, WeightingArgs)
from align.generation import SamplingSettings
from align.trainers.loop import Task, make_accelerator, train_loop

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, stdin: str = "") -> tuple[int, str, str]:
    """`align ARGS` in this process: (exit code, stdout, stderr). `--help` exits 0 the way argparse does."""
    from align.commands import main

    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's --help
                code = exc.code if isinstance(exc.code, int) else 0
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


def load_tokenizer(model_dir):
    # The tiny tokenizer's byte vocabulary is built from a set: always use the saved copy, never a fresh one.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def pair_rows(tokenizer, n=8, versions=("v1", "v2"), gen=True, offset=0):
    """n pairs in `align export`'s format: stored token ids (text + eos), fake generation log-probs."""
    rows = []
    for i in range(offset, offset + n):
        chosen, rejected = f"{i} + {i} = {2 * i}.", f"I think it is {3 * i + 1}, maybe."
        row = {
            "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "chosen_token_ids": tokenizer(chosen, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
            "rejected_token_ids": tokenizer(rejected, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
            "label_agreement": 0.5 + 0.5 * ((i % 4) / 3),
            "gen_model_version": versions[i % len(versions)],
            "pair_id": f"p{i}",
        }
        if gen:
            row["gen_chosen_logps"] = -40.0 - (i % 5)
            row["gen_rejected_logps"] = -60.0 + 2 * (i % 3)
        rows.append(row)
    return rows


def write_pairs(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_chat_rows(path: Path, n: int, offset: int = 0) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]}
        for i in range(offset, offset + n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SETTINGS = SamplingSettings(temperature=1.0, max_new_tokens=6, seed=0)


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def write(path, rows):
    """JSON Lines, or (by extension) JSON, CSV, Parquet through datasets; a folder name without one: save_to_disk."""
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        ds = datasets.Dataset.from_list(rows)
        {".csv": ds.to_csv, ".parquet": ds.to_parquet}.get(path.suffix, ds.save_to_disk)(str(path))
    return path


def version(out):
    return json.loads((out / "version.json").read_text())


def train_args(out, **kw):
    return TrainArgs(output_dir=str(out), max_steps=1, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                     learning_rate=1e-3, logging_steps=1, eval_steps=0, save_steps=10, report_to="none", seed=0, **kw)


def run_pairs(method, model_dir, out, **data):
    from align.trainers.dpo import train_dpo
    from align.trainers.reward import train_reward

    common = (ModelArgs(model=str(model_dir)), LoraArgs(lora_r=2, lora_alpha=4),
              PreferenceDataArgs(max_length=96, max_prompt_length=64, **data))
    if method == "dpo":
        return train_dpo(*common, DPOArgs(), WeightingArgs(), train_args(out))
    return train_reward(*common, RewardArgs(), WeightingArgs(), train_args(out))


def sft_configs(tiny_model_dir, chat_files, out, **train_overrides):
    train, eval_ = chat_files
    train_kwargs = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, eval_steps=2, save_steps=2, report_to="none", seed=0,
    )
    train_kwargs.update(train_overrides)
    return (
        ModelArgs(model=str(tiny_model_dir)),
        LoraArgs(lora_r=4, lora_alpha=8, lora_dropout=0.0),
        SFTDataArgs(train_file=str(train), eval_file=str(eval_), max_length=64),
        TrainArgs(**train_kwargs),
    )


def dpo_configs(tiny_model_dir, data_files, out, dpo=None, weighting=None, **train_overrides):
    train_file, eval_file = data_files
    train_kwargs = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                        learning_rate=1e-2, logging_steps=1, eval_steps=2, save_steps=2, report_to="none", seed=0)
    train_kwargs.update(train_overrides)
    return (
        ModelArgs(model=str(tiny_model_dir)),
        LoraArgs(lora_r=4, lora_alpha=8, lora_dropout=0.0),
        PreferenceDataArgs(train_file=str(train_file), eval_file=str(eval_file), max_length=128, max_prompt_length=64),
        dpo or DPOArgs(),
        weighting or WeightingArgs(),
        TrainArgs(**train_kwargs),
    )


def reward_configs(tiny_model_dir, train_file, eval_file, out, **overrides):
    return (
        ModelArgs(model=str(tiny_model_dir)),
        LoraArgs(lora_r=4, lora_alpha=8, lora_dropout=0.0),
        PreferenceDataArgs(train_file=str(train_file), eval_file=str(eval_file), max_length=128, max_prompt_length=64),
        RewardArgs(margin_scale=0.5, center_coef=0.01),
        WeightingArgs(),
        TrainArgs(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                  learning_rate=1e-2, logging_steps=1, eval_steps=0, save_steps=10, report_to="none", seed=0,
                  **overrides),
    )


def rlhf_configs(tiny_model_dir, reward_run, prompts_file, out, rl=None, monitor=None, **train):
    defaults = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                    warmup_steps=0, lr_scheduler_type="constant", logging_steps=1, eval_steps=2, save_steps=1,
                    report_to="none", seed=0)
    return (
        ModelArgs(model=str(tiny_model_dir)),
        LoraArgs(lora_r=4, lora_alpha=8, lora_dropout=0.0),
        PromptDataArgs(prompts_file=str(prompts_file), eval_prompts_file=str(ROOT / "data" / "tasks" / "eval.jsonl")),
        rl or RLHFArgs(reward_model=str(reward_run), num_generations=2, max_new_tokens=6, eval_per_family=1,
                       kl_target=0.01, kl_horizon=20, length_penalty=0.01),
        monitor or MonitorArgs(),
        TrainArgs(**{**defaults, **train}),
    )


DATA = [{"index": i, "x": [float(i), 1.0, (-1.0) ** i], "y": 0.5 * i - 1.0} for i in range(10)]


def collate(features):
    return {"index": torch.tensor([f["index"] for f in features]),
            "x": torch.tensor([f["x"] for f in features]), "y": torch.tensor([f["y"] for f in features])}


def mse(model, batch):
    err = model(batch["x"]).squeeze(-1) - batch["y"]
    return (err**2).mean(), {"abs_err": err.abs().mean().detach()}


_BUILT: dict = {}  # one fixture report per test session, shared with tests/test_report_browser.py


def hash_embed(texts):
    """A cheap stand-in for the sentence embedder: normalised character-bigram counts."""
    out = np.zeros((len(texts), 64))
    for i, t in enumerate(texts):
        for a, b in zip(t, t[1:]):
            out[i, (ord(a) * 31 + ord(b)) % 64] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def build_fixture_report(tmp_path_factory, tiny_model_dir) -> tuple[Path, dict, str, list[str]]:
    """Two tiny-model versions sampled on 6 task prompts, judged by gold: (report.html, report dict, db url, names)."""
    if "report" in _BUILT:
        return _BUILT["report"]
    from align import store as st
    from align.models import save_tiny_model
    from align.prompts import resolve_prompts
    from align.report import write_report
    from align.report.compare import EvalSpec, run_eval

    root = tmp_path_factory.mktemp("eval")
    other = save_tiny_model(root / "tiny-seed1", seed=1)
    rows = resolve_prompts("tasks:eval", per_family=1, limit=6)
    url = f"sqlite:///{root / 'store.db'}"
    spec = EvalSpec(models=[str(tiny_model_dir), str(other)], prompt_rows=rows, judges=["gold"], n=1,
                    settings=SamplingSettings(temperature=1.0, max_new_tokens=12, seed=0), n_boot=200,
                    prompt_source="tasks:eval")
    with st.connect(url) as store:
        report = run_eval(store, spec, embed=hash_embed)
    report["title"] = "align eval: two tiny models"
    html = write_report(report, root / "out")
    _BUILT["report"] = (html, json.loads((root / "out" / "report.json").read_text()), url, spec.models)
    return _BUILT["report"]


class Final:
    def on_train_end(self, model):
        self.params = [p.detach().clone() for p in model.parameters()]


def run_toy_loop(out, **overrides):
    """The shared training loop on the toy regression (DATA, collate, mse): (final parameters, metrics)."""
    kwargs = dict(output_dir=str(out), max_steps=7, per_device_train_batch_size=2, learning_rate=0.05,
                  lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_steps=3, report_to="none",
                  seed=3)
    kwargs.update(overrides)
    train = TrainArgs(**kwargs)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    final = Final()
    out.mkdir(exist_ok=True)
    metrics, _ = train_loop(make_accelerator(train, torch.float32), model, Task(DATA, collate, mse), train, out,
                            callbacks=[final])
    return final.params, metrics


def completion_logps_by_hand(model, prompt_ids, ids):
    """log p of each completion token, one unpadded forward."""
    full = torch.tensor([prompt_ids + ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=full).logits[0].float(), -1)
    return [float(logps[len(prompt_ids) - 1 + t, ids[t]]) for t in range(len(ids))]
