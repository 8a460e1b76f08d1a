"""Benchmark: training throughput of our recipes against plain TRL, side by side in one process (issue #8).

    python bench/throughput.py --method dpo --shape qwen2.5-0.5b   # on a GPU: what the targets are about
    python bench/throughput.py --method dpo --threads 1            # on CPU: the tiny shape; read the ratio only
    python bench/throughput.py --method sft --trl gradient_checkpointing=false   # take one TRL default out

Ours runs what `align sft|dpo|reward` runs (train_sft, train_dpo, train_reward, with their dataclass defaults);
TRL runs SFTTrainer, DPOTrainer or RewardTrainer with its default config. Both get the same model (a shape with
random weights), LoRA config, data (token ids checked equal), batch, max_length, learning rate, steps and precision.
They train in two threads that take turns, one optimizer step each (`Turns`); the median step after the warm-up
gives samples/s, non-pad tokens/s, MFU and peak memory (CUDA), and step 1's loss is checked for parity. What is
measured and how, the MFU convention, and the figures so far: bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("sft", "dpo", "reward", "rlhf")
# name -> (transformers config class, arguments); "tiny" is align.models.tiny_model, the tests' model.
SHAPES: dict[str, Optional[tuple[str, dict]]] = {
    "qwen2.5-0.5b": ("Qwen2Config", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936)),
    "qwen2.5-1.5b": ("Qwen2Config", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                         num_key_value_heads=2, intermediate_size=8960, vocab_size=151936)),
    "smollm2-135m": ("LlamaConfig", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152)),
    "tiny": None,
}
LENGTHS = {"tiny": (50, 200, 256)}  # shortest and longest sequence, max_length; other shapes: (200, 800, 1024)
FLOP_FACTOR = {"sft": 4, "dpo": 6, "reward": 4}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense
UNIT = {"sft": "sequences", "dpo": "pairs", "reward": "pairs"}
TOLERANCE = {"float32": (1e-3, 1e-3), "bfloat16": (2e-2, 1e-2)}  # (relative, absolute)
NOTED = ("gradient_checkpointing", "precompute_ref", "precompute_ref_log_probs", "bf16", "disable_dropout",
         "padding_free", "loss_type", "lr_scheduler_type", "warmup_steps", "per_device_eval_batch_size")
RLHF_NOT_YET = (
    "rlhf is not benchmarked yet: our RLHF step is TRL's RLOOTrainer step (align/trainers/rlhf.py only adds our "
    "reward function, KL controller, monitor and gold evaluation), so side by side it would time our callbacks, "
    "not a different step; it also needs a trained reward-model run, and its generation-bound steps sample "
    "different lengths on the two sides. It becomes worth measuring with the RLHF levers of issue #8.\n")


@dataclass
class Bench:
    method: str
    shape: str
    batch: int
    warmup: int
    steps: int
    lr: float
    lengths: tuple[int, int]
    max_length: int
    seed: int
    work: Path
    dtype: str  # what ModelArgs.dtype "auto" resolves to: bfloat16 on a GPU that has it, else float32
    cuda: bool
    ours: dict = field(default_factory=dict)  # --ours key=value config overrides
    trl: dict = field(default_factory=dict)  # --trl key=value


# ---- model and data -----------------------------------------------------------------------------------------------


def save_model(b: Bench) -> Path:
    """The shape with seeded random weights and the byte-level ChatML test tokenizer, as a local model directory."""
    import torch
    import transformers

    from align.models import save_tiny_model, tiny_tokenizer

    path = b.work / "model"
    if b.shape == "tiny":
        return save_tiny_model(path, seed=b.seed)
    tokenizer = tiny_tokenizer()  # 259 tokens: only byte rows of the embedding are read, the compute is the same
    name, kwargs = SHAPES[b.shape]
    config = getattr(transformers, name)(**kwargs, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(b.seed)
    with torch.device("cuda" if b.cuda else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.to(getattr(torch, b.dtype)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def matmul_params(model_dir: Path, method: str) -> int:
    """N of the MFU convention, counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # tied weights once
    embed, head = model.get_input_embeddings().weight.numel(), model.get_output_embeddings().weight.numel()
    body = total - embed - (0 if config.tie_word_embeddings else head)
    return body + (config.hidden_size if method == "reward" else head)


def synthetic_rows(b: Bench, tokenizer: Any) -> list[dict]:
    """b.batch rows of random lowercase text. One character is one token (byte-level), so each prompt + response
    sequence gets a length drawn uniformly from b.lengths."""
    from align.data import as_messages, prompt_ids

    rng = random.Random(b.seed)
    text = lambda n: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(max(1, n)))  # noqa: E731
    lo, hi = b.lengths
    rows = []
    for _ in range(b.batch):
        prompt = text(rng.randint(lo // 5, lo // 2))
        used = len(prompt_ids(tokenizer, as_messages(prompt))) + 1  # the templated prompt, and eos
        rows.append({"prompt": prompt, "chosen": text(rng.randint(lo, hi) - used),
                     "rejected": text(rng.randint(lo, hi) - used)})
    return rows


def our_data(b: Bench, rows: list[dict]) -> Path:
    """The JSONL our command reads: chat conversations (sft) or preference pairs."""
    from align.data import write_jsonl

    if b.method == "sft":
        rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
                for r in rows]
    return write_jsonl(rows, b.work / "train.jsonl")


def trl_data(b: Bench, rows: list[dict], tokenizer: Any) -> Any:
    """The same rows for TRL. Pairs get the templated prompt and plain-text responses, to which TRL appends eos:
    exactly our tokens (conversational responses would gain the template's trailing newline)."""
    from datasets import Dataset

    from align.data import as_messages

    if b.method == "sft":
        return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                   "completion": [{"role": "assistant", "content": r["chosen"]}]} for r in rows])
    return Dataset.from_list([{**r, "prompt": tokenizer.apply_chat_template(
        as_messages(r["prompt"]), tokenize=False, add_generation_prompt=True)} for r in rows])


def our_sequences(b: Bench, path: Path, tokenizer: Any) -> list[tuple]:
    """(token ids, loss mask or None) of each sequence our side trains on, from the project's tokenisers."""
    if b.method == "sft":
        from align.data import load_chat_file, tokenize_chat

        chats = [tokenize_chat(m, tokenizer, b.max_length) for m in load_chat_file(path)]
        return [(c["input_ids"], c["assistant_masks"]) for c in chats]
    from align.preference import load_preferences, tokenize_pairs

    _, features, _ = tokenize_pairs(load_preferences(path), tokenizer, b.max_length, b.max_length // 2)
    mask = lambda f, side: [0] * len(f["prompt_ids"]) + [1] * len(f[f"{side}_ids"])  # noqa: E731
    return [(f["prompt_ids"] + f[f"{side}_ids"], None if b.method == "reward" else mask(f, side))
            for f in features for side in ("chosen", "rejected")]


def trl_sequences(method: str, dataset: Any) -> list[tuple]:
    """The same view of TRL's prepared training set."""
    if method == "sft":
        return [(r["input_ids"], [int(label != -100) for label in r["labels"]]) for r in dataset]
    if method == "reward":
        return [(r[f"{side}_ids"], None) for r in dataset for side in ("chosen", "rejected")]
    return [(r["prompt_ids"] + r[f"{side}_ids"], [0] * len(r["prompt_ids"]) + [1] * len(r[f"{side}_ids"]))
            for r in dataset for side in ("chosen", "rejected")]


# ---- taking turns -------------------------------------------------------------------------------------------------


class Turns:
    """Two trainers in two threads, one optimizer step each in turn. A side calls step_done() after each step (from
    a trainer callback): it records the step's time (and on CUDA the side's memory), hands over and waits."""

    def __init__(self, names: tuple[str, ...], cuda: bool):
        self.names, self.cuda, self.turn, self.finished = names, cuda, names[0], set()
        self.cond = threading.Condition()
        self.times: dict[str, list[float]] = {n: [] for n in names}
        # Process CPU time of each step: the sides never run at once, so this is the step's own CPU time, all torch
        # threads included, and unlike wall time it hardly moves when other processes share the machine.
        self.cpu: dict[str, list[float]] = {n: [] for n in names}
        self._start_cpu: dict[str, float] = {}
        self.peaks: dict[str, list[int]] = {n: [] for n in names}
        self.resident = dict.fromkeys(names, 0)  # bytes the side holds between its steps (weights, optimizer state)
        self._start: dict[str, float] = {}
        self._allocated: dict[str, int] = {}

    def _wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == name)
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self._allocated[name] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self._start[name] = time.perf_counter()
        self._start_cpu[name] = time.process_time()

    def _hand_over(self, name: str, finished: bool = False) -> None:
        with self.cond:
            self.finished |= {name} if finished else set()
            waiting = [n for n in self.names if n != name and n not in self.finished]
            self.turn = waiting[0] if waiting else name
            self.cond.notify_all()

    def step_done(self, name: str) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            start = self._allocated[name]
            self.peaks[name].append(self.resident[name] + torch.cuda.max_memory_allocated() - start)
            self.resident[name] += torch.cuda.memory_allocated() - start
        self.times[name].append(time.perf_counter() - self._start[name])
        self.cpu[name].append(time.process_time() - self._start_cpu[name])
        self._hand_over(name)
        self._wait(name)

    def run(self, bodies: dict[str, Callable[[], None]]) -> None:
        errors: dict[str, BaseException] = {}

        def target(name: str) -> None:
            try:
                self._wait(name)
                bodies[name]()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                errors[name] = exc
            finally:
                self._hand_over(name, finished=True)

        threads = [threading.Thread(target=target, args=(n,), name=n, daemon=True) for n in self.names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for name, exc in errors.items():
            raise RuntimeError(f"the {name} side failed: {exc!r} (run with --verbose to see its output)") from exc


class LoopHook:
    """An align.trainers.loop callback (our DPO and reward model): keeps step 1's metrics, takes turns."""

    def __init__(self, turns: Turns, name: str):
        self.turns, self.name, self.first = turns, name, {}

    def on_log(self, step: int, metrics: dict) -> None:
        if step == 1:
            self.first = dict(metrics)
        self.turns.step_done(self.name)


def trainer_hook(turns: Turns, name: str) -> Any:
    """The same as a transformers TrainerCallback (our SFT and every TRL trainer)."""
    from transformers import TrainerCallback

    class Hook(TrainerCallback):
        first: dict = {}

        def on_step_end(self, args, state, control, **kwargs):
            turns.step_done(name)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step == 1 and logs and "loss" in logs:
                self.first = dict(logs)

    return Hook()


# ---- the two sides ------------------------------------------------------------------------------------------------


def our_configs(b: Bench, model_dir: Path, data: Path) -> tuple:
    """Our command's configs: the dataclass defaults, the shared settings and --ours, through parse_config."""
    from align.config import DPO_CONFIG, REWARD_CONFIG, SFT_CONFIG, parse_config

    overrides = {"model": model_dir, "train_file": data, "eval_file": None, "output_dir": b.work / "ours",
                 "max_steps": b.warmup + b.steps, "per_device_train_batch_size": b.batch, "learning_rate": b.lr,
                 "lora_r": 16, "lora_alpha": 32, "lora_target_modules": "all-linear", "max_length": b.max_length,
                 "logging_steps": 1, "save_steps": 10**9, "report_to": "none", **b.ours}
    if b.method != "sft":
        overrides.setdefault("max_prompt_length", b.max_length // 2)
    text = lambda v: "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
    argv = [token for key, value in overrides.items() for token in (f"--{key}", text(value))]
    return parse_config({"sft": SFT_CONFIG, "dpo": DPO_CONFIG, "reward": REWARD_CONFIG}[b.method], argv)


def our_side(b: Bench, configs: tuple, hook: Any, reference_s: list) -> Callable[[], None]:
    def body() -> None:
        if b.method == "sft":
            from align.trainers.sft import train_sft

            return train_sft(*configs, extra_callbacks=[hook])
        if b.method == "reward":
            from align.trainers.reward import train_reward

            return train_reward(*configs, callbacks=[hook])
        from unittest import mock

        import align.trainers.dpo as dpo

        score_pairs = dpo.score_pairs

        def timed(*args, **kwargs):  # the reference pass of precompute_ref: charged to the steps
            start, start_cpu = time.perf_counter(), time.process_time()
            out = score_pairs(*args, **kwargs)  # returns CPU tensors: the GPU has finished
            reference_s.append((time.perf_counter() - start, time.process_time() - start_cpu))
            return out

        with mock.patch.object(dpo, "score_pairs", timed):
            dpo.train_dpo(*configs, callbacks=[hook])

    return body


def trl_side(b: Bench, model_dir: Path, rows: list[dict], configs: tuple, hook: Any, seen: dict) -> Callable[[], None]:
    def body() -> None:
        import torch
        import trl
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, set_seed

        from align.models import load_tokenizer
        from align.trainers.reward import load_sequence_classifier

        tokenizer = load_tokenizer(str(model_dir))
        name = {"sft": "SFT", "dpo": "DPO", "reward": "Reward"}[b.method]
        args = getattr(trl, f"{name}Config")(
            output_dir=str(b.work / "trl"), max_steps=b.warmup + b.steps, per_device_train_batch_size=b.batch,
            learning_rate=b.lr, max_length=b.max_length, logging_steps=1, bf16=b.dtype == "bfloat16",
            report_to="none", **b.trl)
        ours = configs[1]  # our LoraArgs: the same LoRA on both sides
        targets = "all-linear" if ours.lora_target_modules == ["all-linear"] else ours.lora_target_modules
        lora = dict(r=ours.lora_r, lora_alpha=ours.lora_alpha, lora_dropout=ours.lora_dropout, target_modules=targets,
                    task_type="CAUSAL_LM")
        if b.method == "reward":
            set_seed(configs[-1].seed)  # the score head is drawn at load: from the seed our side sets first
            model = load_sequence_classifier(str(model_dir), None, b.dtype, tokenizer.pad_token_id)
            lora.update(task_type="SEQ_CLS", modules_to_save=["score"])  # as align.trainers.reward.apply_reward_lora
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, b.dtype))
        trainer = getattr(trl, f"{name}Trainer")(model=model, args=args, train_dataset=trl_data(b, rows, tokenizer),
                                                 processing_class=tokenizer, peft_config=LoraConfig(**lora),
                                                 callbacks=[hook])
        seen["sequences"] = trl_sequences(b.method, trainer.train_dataset)
        seen["config"] = {k: getattr(args, k) for k in NOTED if hasattr(args, k)}
        trainer.train()

    return body


# ---- results ------------------------------------------------------------------------------------------------------


def side_result(b: Bench, turns: Turns, name: str, tokens: int, ideal_s: Optional[float], extra_s: float = 0.0,
                extra_cpu_s: float = 0.0) -> dict:
    """Median steady-state step (plus an amortised one-off pass) -> samples/s, tokens/s, MFU, peak memory; and the
    same in CPU time (`cpu_*`). `ideal_s` is the step time at 100% MFU."""
    times = turns.times[name]
    step = statistics.median(times[b.warmup:])
    cpu = statistics.median(turns.cpu[name][b.warmup:])
    out = {"step_s": step, "charged_per_step_s": extra_s, "samples_per_s": b.batch / (step + extra_s),
           "tokens_per_s": tokens / (step + extra_s), "first_step_with_setup_s": times[0], "step_s_all": times,
           "cpu_step_s": cpu, "cpu_charged_per_step_s": extra_cpu_s, "cpu_samples_per_s": b.batch / (cpu + extra_cpu_s),
           "cpu_step_s_all": turns.cpu[name]}
    if b.cuda:
        out["peak_memory_gib"] = max(turns.peaks[name][b.warmup:]) / 2**30
    if ideal_s is not None:
        out["mfu"] = ideal_s / (step + extra_s)
    return out


def parity(method: str, ours: dict, trl: dict, tol: tuple[float, float]) -> dict:
    """Step 1's checks (bench/README.md), each {name, ours, against, value, pass}."""
    pairs = [("loss", ours.get("loss"), "TRL", trl.get("loss"))]
    if method == "dpo":
        pairs += [("loss", ours.get("loss"), "log 2", math.log(2)),
                  ("logps/chosen", ours.get("logps/chosen"), "TRL", trl.get("logps/chosen"))]
    if method == "reward":
        mean = (ours["rewards/chosen"] + ours["rewards/rejected"]) / 2 if "rewards/chosen" in ours else None
        pairs.append(("mean reward", mean, "TRL", trl.get("mean_reward")))
    checks = [{"name": n, "ours": a, "against": who, "value": c, "pass": a is not None and c is not None
               and abs(a - c) <= tol[0] * max(abs(a), abs(c)) + tol[1]} for n, a, who, c in pairs]
    return {"pass": all(c["pass"] for c in checks), "tolerance": {"relative": tol[0], "absolute": tol[1]},
            "checks": checks}


def fmt(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:,.0f}" if abs(value) >= 10**digits else f"{value:.{digits}g}"


def markdown(r: dict) -> str:
    o, t, p = r["ours"], r["trl"], r["parity"]
    ratio = lambda k: fmt(o[k] / t[k]) if o.get(k) and t.get(k) else ""  # noqa: E731
    pct = lambda side: fmt(side.get("mfu") and 100 * side["mfu"])  # noqa: E731
    rows = [(f"step time, median of {r['settings']['steps']} (s)", fmt(o["step_s"]), fmt(t["step_s"]), ""),
            ("+ reference pass, amortised (s)", fmt(o["charged_per_step_s"]), "0", ""),
            (f"**{UNIT[r['method']]}/s**", fmt(o["samples_per_s"]), fmt(t["samples_per_s"]),
             f"**{ratio('samples_per_s')}**"),
            ("non-pad tokens/s", fmt(o["tokens_per_s"]), fmt(t["tokens_per_s"]), ratio("tokens_per_s")),
            ("CPU time per step, median (s), + reference", f"{fmt(o['cpu_step_s'])} + {fmt(o['cpu_charged_per_step_s'])}",
             fmt(t["cpu_step_s"]), ""),
            (f"**{UNIT[r['method']]} per CPU-second**", fmt(o["cpu_samples_per_s"]), fmt(t["cpu_samples_per_s"]),
             f"**{ratio('cpu_samples_per_s')}**"),
            ("MFU (%)", pct(o), pct(t), ratio("mfu")),
            ("peak memory (GiB)", fmt(o.get("peak_memory_gib")), fmt(t.get("peak_memory_gib")),
             ratio("peak_memory_gib")),
            ("first step, with setup (s)", fmt(o["first_step_with_setup_s"]), fmt(t["first_step_with_setup_s"]), "")]
    checks = "; ".join(f"{c['name']}: ours {fmt(c['ours'], 6)}, {c['against']} {fmt(c['value'], 6)}"
                       + ("" if c["pass"] else " FAIL")
                       for c in p["checks"])
    lines = ["| | ours | TRL | ours / TRL |", "|---|---|---|---|", *(f"| {' | '.join(row)} |" for row in rows), "",
             f"First-step parity: **{'PASS' if p['pass'] else 'FAIL'}** ({checks}; tolerance "
             f"{p['tolerance']['relative']:g} relative + {p['tolerance']['absolute']:g}). "
             f"Same token ids on both sides: {r['data']['same_tokens']}."]
    if r["device"] == "cpu":
        lines += ["", "CPU run: read the ratio only (no MFU, no GPU memory)."]
    return "\n".join(lines)


def write_results(r: dict, results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"throughput_{r['method']}_{r['shape']}_{r['device']}"
    stem.with_suffix(".json").write_text(json.dumps(r, indent=1, default=str))
    s, d = r["settings"], r["data"]
    md = [f"# throughput: {r['method']}, {r['shape']}, {r['device']}", "", f"`{r['command']}`", "",
          f"{r['date']}, {r['hardware']}; " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()
                                                          if k != "torch") + ".", "",
          markdown(r), "",
          f"{s['batch']} {UNIT[r['method']]} per step (the same rows every step): {d['tokens_per_step']} non-pad "
          f"tokens ({d['padded_tokens_per_step']} with padding), sequences of {s['lengths'][0]}-{s['lengths'][1]} "
          f"tokens, {s['dtype']}, LoRA r {s['lora_r']} alpha {s['lora_alpha']} {s['lora_target_modules']} dropout "
          f"{s['lora_dropout']}, lr {s['lr']}; {s['warmup']} warm-up steps, then {s['steps']} timed steps per side, "
          f"in turns. MFU: {r['mfu_convention']}.", "",
          f"Other settings, each side's defaults: ours {json.dumps(r['ours']['config'], default=str)}; "
          f"TRL {json.dumps(r['trl']['config'], default=str)}.", ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    return stem


def measure(b: Bench, verbose: bool) -> dict:
    """Save the model and data, train both sides in turns, and return everything `collect` needs."""
    from align.models import load_tokenizer

    for old in ("ours", "trl"):  # a kept --work_dir: our command refuses to overwrite a finished run
        shutil.rmtree(b.work / old, ignore_errors=True)
    model_dir = save_model(b)
    tokenizer = load_tokenizer(str(model_dir))
    rows = synthetic_rows(b, tokenizer)
    data = our_data(b, rows)
    configs = our_configs(b, model_dir, data)
    turns = Turns(("trl", "ours"), b.cuda)  # TRL first: our reference pass then runs on a warm device too
    hooks = {"ours": trainer_hook(turns, "ours") if b.method == "sft" else LoopHook(turns, "ours"),
             "trl": trainer_hook(turns, "trl")}
    reference_s: list[float] = []
    seen: dict = {}
    print(f"[throughput] training both sides in turns, {b.warmup} + {b.steps} steps each ...", flush=True)
    with open(b.work / "trainers.log", "w") as log, contextlib.ExitStack() as quiet:
        if not verbose:  # the trainers' progress bars, per-step logs and deprecation warnings
            quiet.enter_context(contextlib.redirect_stdout(log))
            quiet.enter_context(contextlib.redirect_stderr(log))
        turns.run({"trl": trl_side(b, model_dir, rows, configs, hooks["trl"], seen),
                   "ours": our_side(b, configs, hooks["ours"], reference_s)})
    return {"turns": turns, "hooks": hooks, "configs": configs, "seen": seen,
            "reference_s": sum(w for w, _ in reference_s), "reference_cpu_s": sum(c for _, c in reference_s),
            "sequences": our_sequences(b, data, tokenizer), "n_params": matmul_params(model_dir, b.method)}


def collect(b: Bench, m: dict, peak: Optional[float], command: str, device: str) -> dict:
    import peft
    import torch
    import transformers
    import trl

    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    from iw_reuse import hardware  # noqa: E402 - the sibling benchmark's hardware line

    sequences, configs, hooks, n = m["sequences"], m["configs"], m["hooks"], m["n_params"]
    tokens = sum(len(ids) for ids, _ in sequences)
    ideal_s = FLOP_FACTOR[b.method] * n * tokens / (peak * 1e12) if peak else None
    r = {"method": b.method, "shape": b.shape, "device": device, "command": command,
         "date": dt.datetime.now().isoformat(timespec="seconds"), "hardware": hardware(),
         "versions": {x.__name__: x.__version__ for x in (torch, transformers, trl, peft)},
         "settings": {"batch": b.batch, "warmup": b.warmup, "steps": b.steps, "lr": b.lr, "lengths": b.lengths,
                      "max_length": b.max_length, "seed": b.seed, "dtype": b.dtype, "ours": b.ours, "trl": b.trl,
                      **{k: getattr(configs[1], k) for k in ("lora_r", "lora_alpha", "lora_dropout",
                                                              "lora_target_modules")}},
         "data": {"tokens_per_step": tokens, "same_tokens": m["seen"].get("sequences") == sequences,
                  "padded_tokens_per_step": len(sequences) * max(len(ids) for ids, _ in sequences)},
         "matmul_params": n, "peak_tflops": peak,
         "mfu_convention": (f"{FLOP_FACTOR[b.method]}·N·(non-pad tokens) FLOPs per step, N = {n:,}, against {peak:g} "
                            "TFLOP/s (see bench/README.md)" if peak else "not computed (no GPU peak known)"),
         # The reference pass covers the whole data set, one batch: amortised over one epoch, it is one step's.
         "ours": {**side_result(b, m["turns"], "ours", tokens, ideal_s, m["reference_s"], m["reference_cpu_s"]),
                  "reference_pass_s": m["reference_s"], "first_logs": hooks["ours"].first,
                  "config": {k: getattr(c, k) for c in configs for k in NOTED if hasattr(c, k)}},
         "trl": {**side_result(b, m["turns"], "trl", tokens, ideal_s), "first_logs": hooks["trl"].first,
                 "config": m["seen"].get("config", {})},
         "parity": parity(b.method, hooks["ours"].first, hooks["trl"].first, TOLERANCE.get(b.dtype, (2e-2, 1e-2)))}
    r["ratio"] = r["ours"]["samples_per_s"] / r["trl"]["samples_per_s"]
    r["ratio_cpu"] = r["ours"]["cpu_samples_per_s"] / r["trl"]["cpu_samples_per_s"]
    return r


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench/throughput.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--shape", choices=list(SHAPES), default=None, help="Default: qwen2.5-0.5b on CUDA, else tiny.")
    parser.add_argument("--batch", type=int, default=8, help="Sequences (sft) or pairs per step: the whole data set.")
    parser.add_argument("--warmup", type=int, default=3, help="Steps per side dropped before timing.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per side.")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lengths", default=None, help="MIN,MAX tokens per sequence (default 200,800; tiny 50,200).")
    parser.add_argument("--max_length", type=int, default=None, help="Default 1024 (tiny 256).")
    parser.add_argument("--seed", type=int, default=0, help="Model weights and data.")
    parser.add_argument("--peak_tflops", type=float, default=None, help="GPU peak for MFU (default: H100/H200/A100).")
    parser.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE", help="Override our config.")
    parser.add_argument("--trl", action="append", default=[], metavar="KEY=VALUE", help="Override TRL's config.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine).")
    parser.add_argument("--work_dir", default=None, help="Keep the model, data, runs and trainers.log here.")
    parser.add_argument("--results_dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--verbose", action="store_true", help="Show the trainers' output.")
    args = parser.parse_args(argv)
    if args.method == "rlhf":
        parser.exit(2, RLHF_NOT_YET)
    if min(args.warmup, args.steps, args.batch) < 1:
        parser.error("--warmup, --steps and --batch must be >= 1 (the first step holds the setup)")
    for name, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("TQDM_DISABLE", "1")):
        os.environ.setdefault(name, value)
    import torch
    import yaml

    from align.models import resolve_dtype

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    shape = args.shape or ("qwen2.5-0.5b" if cuda else "tiny")
    lo, hi, max_length = LENGTHS.get(shape, (200, 800, 1024))
    lo, hi = map(int, args.lengths.split(",")) if args.lengths else (lo, hi)
    gpu = torch.cuda.get_device_name(0) if cuda else ""
    device = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    overrides = lambda items: {k: yaml.safe_load(v) for k, v in (i.split("=", 1) for i in items)}  # noqa: E731
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="throughput-")))
        work.mkdir(parents=True, exist_ok=True)
        b = Bench(args.method, shape, args.batch, args.warmup, args.steps, args.lr, (lo, hi),
                  args.max_length or max_length, args.seed, work, str(resolve_dtype("auto")).removeprefix("torch."),
                  cuda, overrides(args.ours), overrides(args.trl))
        print(f"[throughput] {b.method}, {shape}, {b.dtype} on {device}: saving the model ...", flush=True)
        measured = measure(b, args.verbose)
    command = "python bench/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = collect(b, measured, peak, command, device)
    stem = write_results(result, Path(args.results_dir))
    print(markdown(result))
    print(f"\nours/TRL ({UNIT[b.method]}/s): {result['ratio']:.2f}x wall, {result['ratio_cpu']:.2f}x CPU time; wrote "
          f"{stem}.json and .md", flush=True)
    return result


if __name__ == "__main__":
    main()
