"""Benchmark: reuse pairs labeled on an OLD model version to train the next one, with and without importance weights.

    python bench/iw_reuse.py                        # default sizes (budget below), embedded SmolLM2-135M-Instruct
    python bench/iw_reuse.py --quick                # ~12 CPU-minutes: a first, underpowered look
    python bench/iw_reuse.py --quick --model tiny   # ~25 CPU-s, tiny random model: plumbing only, NOT efficacy (CI)
    python bench/iw_reuse.py --preset old_new --arms union,auto --threads 1 --workers 2
                                                    # the harm check of `weighting_scheme: auto` (README): old >> new

The old_new preset is the harm check of `auto` on a real model: every train prompt is used (420 old, 40 new), 32
pairs per optimizer step in every arm, all 140 eval prompts x 2 samples, 5 seeds; auto against union as a TOST at
±0.03 gold (the 90% t-interval of the paired difference inside ±0.03). auto is decided once, by train_dpo's own pilot
fits (stage "auto's decision"), with its guards lowered so that it decides at all (the results say so); when it
chooses none its arm IS union's runs. `--size FIELD=VALUE` overrides any size; `--workers N` runs the arm runs in N
processes; every stage and run is cached, so a run cut short (e.g. by `timeout`) resumes where it stopped.

Stages (cached under --work_dir, keyed by their settings; a re-run resumes): v1 = SFT of the base model; old pairs =
2 samples (T=1, untruncated) from v1 per "old" train prompt, labeled by 3 simulated annotators (GoldJudge), exported
from the store with their generation log-probs (both-bad pairs dropped); v2 = v1 after one DPO round on them; new
pairs = v2 samples on a few "new" prompts, plus one fresh v2 pair per old prompt for the oracle. Then v3 = DPO from
v2 (reference v2) in each arm x seed (seeds vary data order, LoRA init and the evaluation samples):
  new_only | union (old + new, unweighted) | auto | sequence | tempered | length_normalized | wpo | mixture | oracle.
Weights: the project's `dataset_weights` (static target v2, clip 5, mean 1), fed one cached v2 scoring of the pool
rather than re-scoring it in each of the 25 weighted runs (tests/test_bench_iw.py checks that both give the same
weights); they go into the `weight` column, so each run's weights.json holds the ESS/N it trained with. tempered: the
largest alpha in ALPHAS with ESS/N >= 0.5. mixture: gen_logps_by_version, from scoring the old responses under v2
and the new ones under v1. Evaluation at several steps per run, in process (a train_dpo callback): the policy samples
the held-out prompts (T=1); gold = mean gold score; win vs v2 = P(r > r_v2) + P(tie)/2 against v2's samples drawn
with the same seed; KL(pi||v2) = mean of log pi(y) - log v2(y) over those samples (nats per sequence; v2 = the same
model with the adapter disabled, via score_completions). Gold and win are interpolated linearly along each run's
trajectory (which starts at v2: KL 0, win 0.5) at the largest KL grid point every run reaches, never extrapolated.
They get 95% t-intervals over seeds and paired differences against union. Fixed-step numbers are shown for contrast.

Budget, default mode, one thread (--threads 1, the default): CPU-seconds measured by the --quick run on this 2-core
machine (bench/results/iw_reuse_quick.json), scaled to the default sizes; wall ~ CPU-s on an idle core.
  | stage                              | default size                                     | CPU-s  |
  | v1 SFT                             | 12 steps x 8 sequences  (quick: 4 steps, 39 s)   |   ~105 |
  | old pairs from v1 + labels         | 63 prompts x 2 samples  (quick: 21, 30 s)        |    ~90 |
  | v2 DPO on the old pairs            | 12 steps x 4 pairs      (quick: 4 steps, 29 s)   |    ~75 |
  | new + oracle pairs from v2         | (14 + 63) x 2 samples   (quick: 35, 52 s)        |   ~120 |
  | scores, weights, v2 eval samples   | ~40 pairs; 5 seeds x 14 samples (quick: 38 s)    |   ~100 |
  | 8 arms x 5 seeds                   | 6 steps x 2 pairs + 3 evals x 14 samples, ~65 s  |  ~2600 |
  | total                              | (quick: 12.5 CPU-min, 20 min wall on the shared machine) | ~52 min |
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("new_only", "union", "auto", "sequence", "tempered", "length_normalized", "wpo", "mixture", "oracle")
SCHEMES = ("sequence", "tempered", "length_normalized", "wpo", "mixture")
ALPHAS = (1.0, 0.5, 0.25, 0.1, 0.05, 0.02, 0.01)
KL_GRID = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


@dataclass(frozen=True)
class Sizes:
    sft_steps: int = 12
    n_old: int = 63            # old prompts (one v1 pair each), balanced over the 7 families
    n_new: int = 14            # new prompts (one v2 pair each)
    gen_tokens: int = 32       # max_new_tokens when sampling pairs
    v2_steps: int = 12
    v2_batch: int = 4
    v2_lr: float = 5e-4
    arm_steps: int = 6
    arm_batch: int = 2
    arm_lr: float = 1e-3       # high LoRA rate (constant schedule): the policy must move within a few steps
    eval_at: tuple = (2, 4, 6)
    eval_per_family: int = 2
    eval_samples: int = 1      # samples per eval prompt
    eval_tokens: int = 32
    seeds: int = 5
    beta: float = 0.1
    clip: float = 5.0
    arm_accum: int = 1         # gradient accumulation of every arm (pairs per optimizer step = arm_batch x arm_accum)
    oracle_pairs: bool = True  # also sample fresh v2 pairs on the old prompts (the oracle arm's data)
    auto_steps: int = 40       # weighting_auto_steps of the auto arm's pilot fits (the shipped default: 40)
    auto_min_new: int = 50     # weighting_auto_min_new (shipped: 50); below it auto falls back to none
    auto_min_ratio: float = 10.0  # weighting_auto_min_ratio (shipped: 10)

    SHARED = ("sft_steps", "n_old", "n_new", "gen_tokens", "v2_steps", "v2_batch", "v2_lr", "beta", "oracle_pairs")


DEFAULT = Sizes()
QUICK = Sizes(sft_steps=4, n_old=21, n_new=14, gen_tokens=24, v2_steps=4, v2_batch=4, arm_steps=4, arm_lr=2e-3,
              eval_at=(2, 4), eval_per_family=1, eval_tokens=24, seeds=2, auto_steps=2, auto_min_new=4,
              auto_min_ratio=1.0)
# Old >> new on 2 shared CPU cores: every train prompt used once (420 old, 40 new; ~half the pairs are both-bad and
# dropped), 32 pairs per optimizer step in every arm (what `weighting_min_batch` gives weighted runs anyway), all 140
# eval prompts x 2 samples. auto's guards are LOWERED (shipped: 50 new pairs, 10 old per new; the CPU cannot afford
# 500+ old pairs and the pilots on them) so that its pilots decide; its pilot fits are 2 steps, not 40.
OLD_NEW = Sizes(n_old=420, n_new=40, arm_steps=4, arm_batch=8, arm_accum=4, arm_lr=5e-4, eval_at=(2, 4),
                eval_per_family=0, eval_samples=2, seeds=5, oracle_pairs=False, auto_steps=2, auto_min_new=12,
                auto_min_ratio=8.0)
PRESETS = {"default": DEFAULT, "quick": QUICK, "old_new": OLD_NEW}


@dataclass
class Bench:
    sizes: Sizes
    model: str                 # model spec, or "tiny"
    shared: Path               # shared stages (keyed by the shared settings)
    work: Path                 # weights, v2 eval and arm runs (keyed by all settings)
    data_seed: int = 0

    @property
    def tiny(self) -> bool:
        return self.model == "tiny"

    def p(self, *parts: str) -> Path:
        return self.shared.joinpath(*parts)

    def w(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)


def key(data: dict) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]


def read(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def recipe(config: str, **overrides: Any) -> tuple:
    """The shipped recipe YAML with `--key value` overrides, parsed by the project's config parser."""
    from align.config import DPO_CONFIG, SFT_CONFIG, parse_config

    argv = ["--config", str(ROOT / "recipes" / "configs" / config)]
    for name, value in overrides.items():
        text = "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        argv += [f"--{name}", text]
    return parse_config(SFT_CONFIG if config.startswith("sft") else DPO_CONFIG, argv)


def judge(b: Bench):
    from align.judges import GoldJudge

    # A random tiny model's answers score near 0, so most pairs would be both-bad (dropped): make them ties instead.
    return GoldJudge(both_bad_threshold=0.0) if b.tiny else GoldJudge()


# ---- shared stages -----------------------------------------------------------------------------------------------


def stage_base(b: Bench) -> None:
    from align.models import save_tiny_model

    save_tiny_model(b.p("tiny-base"), seed=b.data_seed)


def base_spec(b: Bench) -> str:
    return str(b.p("tiny-base")) if b.tiny else b.model


def stage_v1(b: Bench) -> None:
    from align.trainers.sft import train_sft

    s = b.sizes
    train_sft(*recipe("sft/smollm2_lora.yaml", model=base_spec(b), output_dir=b.p("v1"), max_steps=s.sft_steps,
                      train_file=ROOT / "data/sft/train.jsonl", eval_file=None, save_steps=s.sft_steps,
                      logging_steps=1, eval_steps=0, seed=b.data_seed, name="v1", report_to="none"))


def split_prompts(b: Bench) -> tuple[list[dict], list[dict]]:
    """(old, new) train prompts: disjoint, balanced over families, shuffled by the data seed."""
    from align.tasks import load_tasks

    by_family: dict[str, list[dict]] = {}
    for task in load_tasks(ROOT / "data/tasks/train.jsonl"):
        by_family.setdefault(task["family"], []).append(task)
    rng = random.Random(f"iw_reuse:{b.data_seed}")
    for tasks in by_family.values():
        rng.shuffle(tasks)
    order = [t for i in range(max(map(len, by_family.values()))) for t in
             (tasks[i] for tasks in by_family.values() if i < len(tasks))]
    s = b.sizes
    return order[: s.n_old], order[s.n_old: s.n_old + s.n_new]


def label(b: Bench, spec: str, prompts: list[dict], seed: int) -> tuple[str, list[dict]]:
    """Sample two responses per prompt from `spec` into the store, label them (simulated), export decided/tie rows."""
    from align import store as st
    from align.sampling import generate_to_store
    from align.generation import SamplingSettings
    from align.simulate import simulate

    settings = SamplingSettings(temperature=1.0, max_new_tokens=b.sizes.gen_tokens, seed=seed)
    with st.connect(f"sqlite:///{b.p('store.db')}") as store:
        name = generate_to_store(store, spec, prompts, 2, settings, batch_size=32)["version"]
        simulate(store, judge(b), annotators=3, seed=b.data_seed)
        rows = st.export_preferences(store, model_versions=[name], source="simulated")
    return name, rows


def keep_trainable(rows: list[dict]) -> tuple[list[dict], int]:
    kept = [r for r in rows if r["label"] != "both_bad"]
    return kept, len(rows) - len(kept)


def check_pairs(rows: list[dict], what: str) -> None:
    from align.errors import AlignError

    if not rows:
        raise AlignError(f"no {what} left to train on: every pair was labeled both-bad; use more prompts")


def stage_old(b: Bench) -> None:
    from align.data import write_jsonl

    old_prompts, _ = split_prompts(b)
    name, rows = label(b, str(b.p("v1")), old_prompts, seed=b.data_seed)
    kept, dropped = keep_trainable(rows)
    check_pairs(kept, "old pairs")
    write_jsonl(kept, b.p("old.jsonl"))
    write(b.p("old.json"), {"version": name, "pairs": len(rows), "both_bad_dropped": dropped})


def stage_v2(b: Bench) -> None:
    from align.trainers.dpo import train_dpo

    s = b.sizes
    train_dpo(*recipe("dpo/smollm2_lora.yaml", model=b.p("v1"), train_file=b.p("old.jsonl"), eval_file=None,
                      output_dir=b.p("v2"), max_steps=s.v2_steps, per_device_train_batch_size=s.v2_batch,
                      gradient_accumulation_steps=1, learning_rate=s.v2_lr, beta=s.beta, warmup_steps=0,
                      logging_steps=1, eval_steps=0, save_steps=s.v2_steps, seed=b.data_seed, name="v2",
                      report_to="none", precompute_ref=False))


def stage_new(b: Bench) -> None:
    """v2 pairs on the new prompts (the small fresh set) and on the old prompts (the oracle's extra data)."""
    from align.data import write_jsonl

    old_prompts, new_prompts = split_prompts(b)
    extra = old_prompts if b.sizes.oracle_pairs else []
    name, rows = label(b, str(b.p("v2")), new_prompts + extra, seed=b.data_seed + 1)
    kept, dropped = keep_trainable(rows)
    check_pairs(kept, "v2 pairs")
    new_texts = {t["prompt"] for t in new_prompts}
    new = [r for r in kept if r["prompt"][-1]["content"] in new_texts]
    check_pairs(new, "new pairs")
    write_jsonl(new, b.p("new.jsonl"))
    if b.sizes.oracle_pairs:
        write_jsonl(new + [r for r in kept if r["prompt"][-1]["content"] not in new_texts], b.p("oracle.jsonl"))
    write(b.p("new.json"), {"version": name, "pairs": len(rows), "both_bad_dropped": dropped, "new_pairs": len(new)})


def score_file(spec: str, path: Path, with_collision: bool, rows: Optional[list[int]] = None) -> dict[str, list]:
    """score_pairs of a preference file's rows (all, or the given indices) under a model: float64 lists."""
    from align.config import ModelArgs
    from align.models import load_model
    from align.preference import PreferenceCollator, load_preferences, score_pairs, tokenize_pairs

    model, tokenizer = load_model(ModelArgs(model=spec, dtype="float32"))
    full = tokenize_pairs(load_preferences(path), tokenizer)[0]
    full = full if rows is None else [full[i] for i in rows]
    scores = score_pairs(model, full, PreferenceCollator(tokenizer.pad_token_id), 8, with_collision=with_collision)
    return {k: v.tolist() for k, v in scores.items()}


def loadable(old: list[dict], new: list[dict], path: Path) -> tuple[list[dict], list[dict]]:
    """(old, new) without the pairs the loader drops (an empty response, two identical ones), written to `path` as
    old + new: row i of the file is then pair i of every scoring, weighting and training run on it."""
    from align.data import write_jsonl
    from align.preference import load_preferences

    write_jsonl(old + new, path)
    kept = {int(r.where.rsplit(":", 1)[1]) - 1 for r in load_preferences(path).rows}
    old, new = [r for i, r in enumerate(old) if i in kept], [r for j, r in enumerate(new) if len(old) + j in kept]
    write_jsonl(old + new, path)
    return old, new


def stage_scores(b: Bench) -> None:
    """The pool (old + new) scored under v2 (the static target, with WPO's collision terms) and its new responses
    under v1, so each response has its log-prob under both samplers (mixture); plus a consistency check."""
    from align.data import read_jsonl, write_jsonl

    old, new = read_jsonl(b.p("old.jsonl")), read_jsonl(b.p("new.jsonl"))
    v1, v2 = read(b.p("old.json"))["version"], read(b.p("new.json"))["version"]
    old, new = loadable(old, new, b.p("pool.jsonl"))
    target = score_file(str(b.p("v2")), b.p("pool.jsonl"), with_collision=True)
    new_idx = list(range(len(old), len(old) + len(new)))
    under_v1 = score_file(str(b.p("v1")), b.p("pool.jsonl"), False, new_idx) if new_idx else {}
    rows, drift = old + new, []
    for i, row in enumerate(rows):
        t = [target["chosen_logps"][i], target["rejected_logps"][i]]
        stored = [row["gen_chosen_logps"], row["gen_rejected_logps"]]
        if i < len(old):
            row["gen_logps_by_version"] = {v1: stored, v2: t}
        else:
            j = i - len(old)
            row["gen_logps_by_version"] = {v1: [under_v1["chosen_logps"][j], under_v1["rejected_logps"][j]], v2: stored}
            drift += [abs(a - c) for a, c in zip(t, stored)]
    write_jsonl(rows, b.p("pool.jsonl"))
    write(b.p("scores.json"), {"target_v2": target, "consistency_max_abs_nats": max(drift, default=0.0),
                               "pool_old": len(old), "pool_new": len(new)})


SHARED_STAGES: list[tuple[str, str, Callable[[Bench], None]]] = [
    ("tiny base model", "tiny-base/config.json", stage_base),
    ("v1 SFT", "v1/version.json", stage_v1),
    ("old pairs (v1) + labels", "old.json", stage_old),
    ("v2 DPO on the old pairs", "v2/version.json", stage_v2),
    ("new + oracle pairs (v2) + labels", "new.json", stage_new),
    ("scores (pool under v2, new under v1)", "scores.json", stage_scores),
]


# ---- per-setting stages: weights, v2's evaluation samples ---------------------------------------------------------


def scheme_weights(pset: Any, cached: dict, scheme: str, alpha: float, clip: float) -> Any:
    """The project's dataset_weights, with the cached v2 scores standing in for the static-target scoring pass."""
    import torch

    from align.config import WeightingArgs
    from align.trainers.weights import dataset_weights

    scores = {k: torch.tensor(v, dtype=torch.float64) for k, v in cached.items()}
    weighting = WeightingArgs(weighting_scheme=scheme, weighting_alpha=alpha, weighting_clip=clip)
    return dataset_weights(pset, [], weighting, lambda features, with_collision: scores)[0]


def stage_weights(b: Bench) -> None:
    from align.data import read_jsonl, write_jsonl
    from align.preference import load_preferences
    from align.trainers.weights import report

    pset, rows = load_preferences(b.p("pool.jsonl")), read_jsonl(b.p("pool.jsonl"))
    cached = read(b.p("scores.json"))["target_v2"]
    alpha = next((a for a in ALPHAS if scheme_weights(pset, cached, "tempered", a, b.sizes.clip)
                  .diagnostics["weights/ess_frac"] >= 0.5), ALPHAS[-1])
    chosen = {}
    for scheme in SCHEMES:
        result = scheme_weights(pset, cached, scheme, alpha if scheme == "tempered" else 1.0, b.sizes.clip)
        b.w("weights", scheme).mkdir(parents=True, exist_ok=True)
        report(result, pset, b.w("weights", scheme))  # the project's weights.json + weights.png, per scheme
        write_jsonl([{**r, "weight": float(w)} for r, w in zip(rows, result.weights)], b.w("data", f"{scheme}.jsonl"))
        chosen[scheme] = {k: v for k, v in result.diagnostics.items() if isinstance(v, (int, float, str))}
    write(b.w("weights.json"), {"tempered_alpha": alpha, "diagnostics": chosen})


def stage_auto(b: Bench) -> None:
    """`weighting_scheme: auto` decided as `align dpo` decides it: train_dpo from v2 on the pool, whose pilot fits
    (align.trainers.pilot) choose the scheme, for one 1-pair step (the training itself is the arms' job). The choice
    is made once (pilot seed = the data seed) and its weights go into the `weight` column of the auto arm's data."""
    from align.data import read_jsonl, write_jsonl
    from align.trainers.dpo import train_dpo

    s, out = b.sizes, b.w("auto-decision")
    shutil.rmtree(out, ignore_errors=True)
    train_dpo(*recipe("dpo/smollm2_lora.yaml", model=b.p("v2"), train_file=b.p("pool.jsonl"), eval_file=None,
                      output_dir=out, max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                      learning_rate=s.arm_lr, lr_scheduler_type="constant", warmup_steps=0, beta=s.beta,
                      logging_steps=1, eval_steps=0, save_steps=1, seed=b.data_seed, name="v3-auto-decision",
                      report_to="none", precompute_ref=False, weighting_scheme="auto", weighting_clip=s.clip,
                      weighting_min_batch=0, weighting_auto_steps=s.auto_steps,
                      weighting_auto_min_new=s.auto_min_new, weighting_auto_min_ratio=s.auto_min_ratio,
                      interference_samples=0, interference_per_family=0))
    saved = read(out / "weights.json")
    rows = read_jsonl(b.p("pool.jsonl"))
    write_jsonl([{**r, "weight": float(w)} for r, w in zip(rows, saved["weights"])], b.w("data", "auto.jsonl"))
    diag = saved["diagnostics"]
    for heavy in ("checkpoints", "adapter"):
        shutil.rmtree(out / heavy, ignore_errors=True)
    write(b.w("auto.json"), {"auto": diag.get("auto"), "worth": diag.get("worth"),
                             "ess_frac": diag["weights/ess_frac"], "unweighted": len(set(saved["weights"])) == 1})


def auto_choice(b: Bench) -> Optional[dict]:
    return read(b.w("auto.json")) if b.w("auto.json").exists() else None


def arm_file(b: Bench, arm: str) -> Path:
    return {"new_only": b.p("new.jsonl"), "union": b.p("pool.jsonl"), "oracle": b.p("oracle.jsonl")}.get(
        arm, b.w("data", f"{arm}.jsonl"))


def eval_tasks(b: Bench) -> list[dict]:
    from align.evaluate import stratified
    from align.tasks import load_tasks

    tasks = load_tasks(ROOT / "data/tasks/eval.jsonl")
    return tasks if b.sizes.eval_per_family == 0 else stratified(tasks, b.sizes.eval_per_family)  # 0: all of them


def eval_settings(b: Bench, seed: int):
    from align.generation import SamplingSettings

    return SamplingSettings(temperature=1.0, max_new_tokens=b.sizes.eval_tokens, seed=10_000 + seed)


def sample_eval(model: Any, tokenizer: Any, tasks: list[dict], settings: Any, n: int) -> tuple[list, list, list[float]]:
    """(samples in (prompt, sample) order, encoded prompts, gold rewards) of the model on the eval tasks."""
    from align.data import as_messages, prompt_ids
    from align.generation import sample_responses
    from align.tasks import score_response

    prompts = [as_messages(t["prompt"]) for t in tasks]
    samples = [s for batch in sample_responses(model, tokenizer, prompts, n, settings, batch_size=32) for s in batch]
    samples.sort(key=lambda s: (s.prompt_index, s.sample_index))
    rewards = [score_response(tasks[s.prompt_index]["family"], s.text, tasks[s.prompt_index]["gold"]) for s in samples]
    return samples, [prompt_ids(tokenizer, p) for p in prompts], rewards


def v2_eval(b: Bench, seed: int) -> dict:
    """v2's samples on the eval prompts with seed `seed` (cached, one file per seed): the trajectory's start and the
    win-rate opponent of every arm run with that seed."""
    from align.config import ModelArgs
    from align.models import load_model

    path = b.w("v2_eval", f"s{seed}.json")
    if not path.exists():
        model, tokenizer = load_model(ModelArgs(model=str(b.p("v2")), dtype="float32"))
        _, _, rewards = sample_eval(model, tokenizer, eval_tasks(b), eval_settings(b, seed), b.sizes.eval_samples)
        write(path, {"rewards": rewards, "gold": statistics.fmean(rewards)})
    return read(path)


WORK_STAGES = [("importance weights", "weights.json", stage_weights),
               ("auto's decision (pilot fits)", "auto.json", stage_auto)]


# ---- arm runs ------------------------------------------------------------------------------------------------------


def win_rate(rewards: list[float], baseline: list[float]) -> float:
    """P(r > r_v2) + P(tie)/2 over paired samples (same prompt, same sample index)."""
    return statistics.fmean(1.0 if r > q + 1e-9 else 0.5 if abs(r - q) <= 1e-9 else 0.0
                            for r, q in zip(rewards, baseline))


def policy_point(model: Any, tokenizer: Any, tasks: list[dict], settings: Any, n: int, baseline: list[float]) -> dict:
    """Gold reward, win rate vs v2 and KL(pi || v2) from the policy's own samples (v2 = adapter disabled)."""
    import torch

    from align.generation import score_completions

    rng = torch.get_rng_state()  # sampling reseeds torch: keep the training run's random stream untouched
    model = getattr(model, "module", model)
    samples, prompts, rewards = sample_eval(model, tokenizer, tasks, settings, n)
    ref = []
    with model.disable_adapter():
        for i in range(0, len(samples), 8):
            part = samples[i: i + 8]
            ref += score_completions(model, [prompts[s.prompt_index] for s in part], [s.token_ids for s in part],
                                     None, tokenizer.pad_token_id)[0]
    model.train()
    torch.set_rng_state(rng)
    kl = [s.logp - math.fsum(r) for s, r in zip(samples, ref)]
    return {"kl": statistics.fmean(kl), "gold": statistics.fmean(rewards), "win": win_rate(rewards, baseline),
            "length": statistics.fmean(len(s.token_ids) for s in samples)}


class Trajectory:
    """train_dpo callback: evaluates the live policy at the chosen steps."""

    def __init__(self, steps: tuple, evaluate: Callable[[Any], dict]):
        self.steps, self.evaluate, self.points, self.model = set(steps), evaluate, [], None

    def on_train_begin(self, model: Any) -> None:
        self.model = model

    def on_log(self, step: int, metrics: dict) -> None:
        if step in self.steps:
            self.points.append({"step": step, **self.evaluate(self.model), "kl_ref_proxy": metrics.get("kl/ref")})


def run_arm(b: Bench, arm: str, seed: int, tokenizer: Any) -> dict:
    from align.trainers.dpo import train_dpo

    out = b.w("runs", f"{arm}-s{seed}")
    if (out / "trajectory.json").exists():
        return read(out / "trajectory.json")
    shutil.rmtree(out, ignore_errors=True)  # an interrupted run restarts: its evaluations were not saved
    s, v2 = b.sizes, v2_eval(b, seed)
    tasks, settings = eval_tasks(b), eval_settings(b, seed)
    track = Trajectory(s.eval_at, lambda m: policy_point(m, tokenizer, tasks, settings, s.eval_samples, v2["rewards"]))
    started, cpu = time.time(), time.process_time()
    train_dpo(*recipe("dpo/smollm2_lora.yaml", model=b.p("v2"), train_file=arm_file(b, arm), eval_file=None,
                      output_dir=out, max_steps=s.arm_steps, per_device_train_batch_size=s.arm_batch,
                      gradient_accumulation_steps=s.arm_accum, learning_rate=s.arm_lr, lr_scheduler_type="constant",
                      warmup_steps=0, beta=s.beta, logging_steps=1, eval_steps=0, save_steps=s.arm_steps,
                      save_total_limit=1, seed=seed, name=f"v3-{arm}-s{seed}", report_to="none",
                      precompute_ref=False, weighting_scheme="none", interference_samples=0,
                      interference_per_family=0), callbacks=[track])  # the bench measures v3 itself
    diag = read(out / "weights.json")["diagnostics"]
    v1 = read(b.p("old.json"))["version"]
    result = {"arm": arm, "seed": seed, "wall_s": round(time.time() - started, 1),
              "cpu_s": round(time.process_time() - cpu, 1),
              "trajectory": [{"step": 0, "kl": 0.0, "gold": v2["gold"], "win": 0.5}] + track.points,
              "ess_frac": diag["weights/ess_frac"], "ess_frac_old": diag.get(f"weights/ess_frac/{v1}"),
              "pairs": diag["weights/n"]}
    for heavy in ("checkpoints", "adapter"):  # 40 runs x (LoRA + optimizer state) would fill the disk
        shutil.rmtree(out / heavy, ignore_errors=True)
    write(out / "trajectory.json", result)
    return result


# ---- matched-KL analysis (pure functions) ------------------------------------------------------------------------


def value_at_kl(points: list[dict], target: float, key: str) -> Optional[float]:
    """points[key] linearly interpolated at KL = target where the trajectory (in step order) first reaches it;
    None when it never does (no extrapolation)."""
    points = sorted(points, key=lambda p: p["step"])
    if points and points[0]["kl"] >= target:
        return points[0][key]
    for prev, cur in zip(points, points[1:]):
        if cur["kl"] >= target > prev["kl"]:
            f = (target - prev["kl"]) / (cur["kl"] - prev["kl"])
            return prev[key] + f * (cur[key] - prev[key])
    return None


def common_kl(trajectories: list[list[dict]], grid: tuple = KL_GRID) -> Optional[float]:
    """The largest grid KL that every trajectory reaches (None if some run never reaches the smallest)."""
    if not trajectories:
        return None
    reach = min(max(p["kl"] for p in t) for t in trajectories)
    return max((k for k in grid if k <= reach), default=None)


def mean_ci(values: list[Optional[float]]) -> dict:
    """Mean and 95% t-interval half-width over the non-missing values (n, and NaN half-width when n < 2)."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": None, "ci": None, "n": 0}
    if len(xs) < 2:
        return {"mean": xs[0], "ci": math.nan, "n": 1}
    df = len(xs) - 1
    t = T95[df] if df in T95 else 1.96 if df > 30 else T95[max(k for k in T95 if k < df)]  # conservative between rows
    return {"mean": statistics.fmean(xs), "ci": t * statistics.stdev(xs) / math.sqrt(len(xs)), "n": len(xs)}


EQUIV_MARGIN = 0.03  # gold: auto is "equivalent" to union when the 90% CI of the paired difference lies inside ±this


def equivalence(diffs: list[Optional[float]], margin: float = EQUIV_MARGIN, alpha: float = 0.05) -> dict:
    """TOST of paired differences against ±margin: two one-sided t-tests (H0: mean <= -margin; H0: mean >= margin),
    p = the larger p; equivalent when p < alpha, i.e. when the (1 - 2 alpha) = 90% t-interval lies inside ±margin.
    `half_width` is that interval's half-width, `margin_shown` the smallest margin these data would establish."""
    from scipy import stats

    xs = [d for d in diffs if d is not None and math.isfinite(d)]
    n = len(xs)
    out: dict = {"n": n, "margin": margin, "alpha": alpha}
    if n < 2:
        return {**out, "mean": xs[0] if xs else None, "equivalent": False,
                "verdict": "cannot tell (fewer than 2 seeds)"}
    mean, sd, df = statistics.fmean(xs), statistics.stdev(xs), n - 1
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(1 - alpha, df)) * se
    if se > 0:
        p_low = float(stats.t.sf((mean + margin) / se, df))   # H0: mean <= -margin
        p_high = float(stats.t.cdf((mean - margin) / se, df))  # H0: mean >= +margin
    else:  # every seed gave the same difference
        p_low, p_high = float(mean <= -margin), float(mean >= margin)
    lo, hi = mean - half, mean + half
    equivalent = max(p_low, p_high) < alpha
    ci = f"90% CI [{lo:+.3f}, {hi:+.3f}]"
    if equivalent:
        verdict = f"EQUIVALENT within ±{margin:g} ({ci}, TOST p = {max(p_low, p_high):.2g})"
    elif lo >= margin or hi <= -margin:
        verdict = f"DIFFERENT by more than {margin:g} ({ci})"
    else:
        verdict = (f"equivalence NOT established ({ci} reaches beyond ±{margin:g}; TOST p = {max(p_low, p_high):.2g}; "
                   f"these seeds would establish ±{max(abs(lo), abs(hi)):.3f})")
    return {**out, "mean": mean, "sd": sd, "se": se, "half_width": half, "ci90": [lo, hi], "p_lower": p_low,
            "p_upper": p_high, "p": max(p_low, p_high), "equivalent": equivalent,
            "margin_shown": max(abs(lo), abs(hi)), "verdict": verdict}


def crossing_step(points: list[dict], target: float) -> Optional[int]:
    """The first evaluated step whose KL reaches `target` (None if none does): how far into training a matched-KL
    comparison looks."""
    return next((p["step"] for p in sorted(points, key=lambda p: p["step"]) if p["step"] > 0 and p["kl"] >= target),
                None)


def paired(a: dict, b: dict) -> list[Optional[float]]:
    """Per-seed differences a - b where both exist."""
    return [a[s] - b[s] for s in a if a[s] is not None and b.get(s) is not None]


def summarize(runs: dict[str, dict[int, dict]]) -> dict:
    """Per arm: ESS/N, gold and win at the common KL (and the next grid point), final-step numbers; paired
    differences against union."""
    trajectories = [r["trajectory"] for by_seed in runs.values() for r in by_seed.values()]
    k1 = common_kl(trajectories)
    k2 = min((k for k in KL_GRID if k1 is None or k > k1), default=None)
    final = max(p["step"] for t in trajectories for p in t)

    def per_seed(arm: str, fn: Callable[[dict], Optional[float]]) -> dict:
        return {seed: fn(r) for seed, r in runs[arm].items()}

    at = lambda k, key: (lambda r: None if k is None else value_at_kl(r["trajectory"], k, key))  # noqa: E731
    last = lambda key: (lambda r: next((p[key] for p in r["trajectory"] if p["step"] == final), None))  # noqa: E731
    table = {}
    for arm in runs:
        cols = {"gold_k1": per_seed(arm, at(k1, "gold")), "win_k1": per_seed(arm, at(k1, "win")),
                "gold_k2": per_seed(arm, at(k2, "gold")), "gold_final": per_seed(arm, last("gold")),
                "win_final": per_seed(arm, last("win")), "kl_final": per_seed(arm, last("kl"))}
        row = {name: mean_ci(list(v.values())) for name, v in cols.items()}
        row["_cols"] = cols
        row["ess_frac"] = statistics.fmean(r["ess_frac"] for r in runs[arm].values())
        old = [r["ess_frac_old"] for r in runs[arm].values() if r.get("ess_frac_old") is not None]
        row["ess_frac_old"] = statistics.fmean(old) if old else None
        row["pairs"] = next(iter(runs[arm].values()))["pairs"]
        row["cross_steps"] = [None if k1 is None else crossing_step(r["trajectory"], k1) for r in runs[arm].values()]
        row["same_as_union"] = any(r.get("same_as_union") for r in runs[arm].values())
        table[arm] = row
    if "union" in table:
        for arm, row in table.items():
            for name in ("gold_k1", "gold_k2", "gold_final"):
                row[f"d_{name}"] = mean_ci(paired(row["_cols"][name], table["union"]["_cols"][name]))
            if arm != "union":
                row["equiv_k1"] = equivalence(paired(row["_cols"]["gold_k1"], table["union"]["_cols"]["gold_k1"]))
    for row in table.values():
        row.pop("_cols")
    return {"kl_common": k1, "kl_next": k2, "final_step": final, "arms": table}


def verdicts(summary: dict) -> list[str]:
    """Plain-language reading of the paired differences at the common KL (95% CI excludes 0, or it does not)."""
    arms, k = summary["arms"], summary["kl_common"]
    if k is None or "union" not in arms:
        return ["No common KL point: some run never moved away from v2; only fixed-step numbers are available."]

    def word(d: dict, better: str, worse: str, same: str) -> str:
        if d["mean"] is None or d["ci"] is None or not math.isfinite(d["ci"]):
            return f"cannot tell (too few seeds): {same}"
        text = better if d["mean"] - d["ci"] > 0 else worse if d["mean"] + d["ci"] < 0 else same
        return f"{text} (Δ gold {d['mean']:+.3f} ± {d['ci']:.3f})"

    lines = [f"At matched KL(π‖v2) = {k:g} nats (reached by every run), paired over seeds against union:"]
    if "auto" in arms:
        a = arms["auto"]
        same = " — auto chose unweighted reuse, so its runs ARE union's: equivalent by construction, not by " \
               "measurement" if a.get("same_as_union") else ""
        lines.append(f"- HARM CHECK auto vs union (TOST, ±{EQUIV_MARGIN:g} gold): {a['equiv_k1']['verdict']}{same}")
    if "new_only" in arms:
        d = arms["new_only"]["d_gold_k1"]
        flipped = {**d, "mean": None if d["mean"] is None else -d["mean"]}
        lines.append("- H1 reuse: union vs new_only: " + word(
            flipped, "reusing old pairs HELPS", "reusing old pairs HURTS", "no detectable difference (CI includes 0)"))
    for arm in SCHEMES:
        if arm in arms:
            lines.append(f"- H2 {arm}: " + word(arms[arm]["d_gold_k1"], "BEATS unweighted reuse",
                                               "is WORSE than unweighted reuse",
                                               "does NOT beat unweighted reuse (CI includes 0)"))
    if "oracle" in arms:
        lines.append("- oracle (fresh v2 pairs instead of old): " + word(arms["oracle"]["d_gold_k1"],
                     "beats union", "is worse than union", "no detectable difference from union"))
    return lines


def fmt(c: Optional[dict], digits: int = 3, signed: bool = False) -> str:
    if not c or c["mean"] is None:
        return "not reached"
    ci = f" ± {c['ci']:.{digits}f}" if math.isfinite(c["ci"]) else ""
    return f"{c['mean']:{'+' if signed else ''}.{digits}f}{ci}"


def markdown_table(summary: dict) -> str:
    k1, k2, n = (summary["kl_common"] or "–"), summary["kl_next"], summary["final_step"]
    head = (f"| arm | pairs | ESS/N (all / old) | gold @KL={k1} | Δ gold vs union @KL={k1} "
            f"| 90% CI of Δ (TOST ±{EQUIV_MARGIN:g}) | win vs v2 @KL={k1} "
            f"| Δ gold vs union @KL={k2} (seeds reaching) | gold @step {n} | Δ gold vs union @step {n} "
            f"| KL @step {n} |")
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    for arm, r in summary["arms"].items():
        old = "–" if r["ess_frac_old"] is None else f"{r['ess_frac_old']:.2f}"
        d = lambda name: fmt(r.get(name), signed=True)  # noqa: E731
        e = r.get("equiv_k1")
        tost = "–" if not e or "ci90" not in e else (
            f"[{e['ci90'][0]:+.3f}, {e['ci90'][1]:+.3f}] {'equivalent' if e['equivalent'] else 'not shown'}")
        lines.append(f"| {arm} | {r['pairs']} | {r['ess_frac']:.2f} / {old} | {fmt(r['gold_k1'])} | {d('d_gold_k1')} "
                     f"| {tost} | {fmt(r['win_k1'])} | {d('d_gold_k2')} ({r['gold_k2']['n']}) | {fmt(r['gold_final'])} "
                     f"| {d('d_gold_final')} | {fmt(r['kl_final'], 2)} |")
    return "\n".join(lines)


# ---- orchestration -----------------------------------------------------------------------------------------------


def run_stages(b: Bench, stages: list, root: Callable[..., Path], ran: list) -> None:
    """Run the stages whose marker is missing; their wall and CPU seconds accumulate in <work>/timings.json."""
    for name, marker, func in stages:
        if func is stage_base and not b.tiny or root(marker).exists():
            continue
        print(f"[iw_reuse] {name} ...", flush=True)
        wall, cpu = time.time(), time.process_time()
        func(b)
        timings = read(b.w("timings.json")) if b.w("timings.json").exists() else {}
        timings[name] = {"wall_s": round(time.time() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}
        write(b.w("timings.json"), timings)
        ran.append(name)
        print(f"[iw_reuse] {name}: {timings[name]['wall_s']:.0f} s wall, {timings[name]['cpu_s']:.0f} CPU-s",
              flush=True)


def hardware() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{gpu}; load average at start {os.getloadavg()[0]:.1f}")


def auto_lines(b: Bench, summary: dict, info: dict) -> list[str]:
    """What auto decided and why, whether the shipped guards would have let it decide, where the matched-KL point
    falls in training, and what the harm check can and cannot show."""
    s, lines = b.sizes, []
    n_old, n_new = info["pool"]["old"], info["pool"]["new"]
    k1 = summary["kl_common"]
    steps = sorted({x for r in summary["arms"].values() for x in r["cross_steps"] if x is not None})
    if k1 is not None:
        own = [r for r in summary["arms"].values() if not r["same_as_union"]]  # auto's copies of union are not runs
        counts = {st: sum(x == st for r in own for x in r["cross_steps"]) for st in steps}
        per_step = s.arm_batch * s.arm_accum
        where = ", ".join(f"step {st} ({n} runs, {st * per_step} pairs seen)" for st, n in counts.items())
        lines.append(f"- The matched KL {k1:g} is first reached at: {where} (evaluations at steps "
                     f"{', '.join(map(str, s.eval_at))}).")
    auto = info.get("auto")
    if auto and auto.get("auto"):
        rec = auto["auto"]
        lines.append(f"- auto chose **{rec['choice']}**: {rec['reason']}.")
        if rec.get("scores"):
            lines.append("- auto's candidates, held-out log-likelihood gain over none (nats/pair ± SE): " + "; ".join(
                f"{c} {v['gain']:+.4f} ± {v['se']:.4f}" + (f" (α {v['alpha']:.2f})" if c == "tempered" else "")
                for c, v in rec["scores"].items() if c != "none") + (
                f"; per-version trust {rec['trust']}" if rec.get("trust") else ""))
        shipped = shipped_fallback(n_old, n_new)
        if (s.auto_min_new, s.auto_min_ratio) != (50, 10.0):
            lines.append(f"- auto's guards were LOWERED for this run (weighting_auto_min_new {s.auto_min_new}, "
                         f"weighting_auto_min_ratio {s.auto_min_ratio:g}; pilot fits of {s.auto_steps} steps). "
                         + (f"With the shipped guards auto would have fallen back to none here ({shipped}), i.e. "
                            "trained exactly as union." if shipped else
                            "The shipped guards would have let it decide too."))
        e = summary["arms"].get("auto", {}).get("equiv_k1")
        if summary["arms"].get("auto", {}).get("same_as_union"):
            lines.append("- What this can show: auto chose none, so on these data auto IS union (Δ = 0 in every seed, "
                         "by construction): it cannot harm here. It measures nothing about what a weighting auto did "
                         "not choose would cost, and it cannot show that weighting helps (bench/iw_sim.py tests that).")
        elif e and "half_width" in e:
            lines.append(f"- What this can show: with {e['n']} seeds the 90% CI half-width of auto − union is "
                         f"{e['half_width']:.3f} gold, so equivalence at ±{e['margin']:g} "
                         f"{'IS' if e['equivalent'] else 'is NOT'} established. It cannot show that weighting helps "
                         "(that needs far more pairs and seeds: bench/iw_sim.py is the test of benefit).")
    return lines


def shipped_fallback(n_old: int, n_new: int) -> str:
    """Why the SHIPPED guards (50 new pairs, 10 old per new) would make auto fall back to none ('' if not)."""
    from align.reuse import too_little_evidence

    return too_little_evidence(n_old, n_new, "v2")


def write_results(b: Bench, mode: str, results_dir: Path, summary: dict, runs: dict, ran: list,
                  started: float, command: str, hw: str) -> None:
    scores = read(b.p("scores.json"))
    info = {"old": read(b.p("old.json")), "new": read(b.p("new.json")), "weights": read(b.w("weights.json")),
            "consistency_max_abs_nats": scores["consistency_max_abs_nats"], "auto": auto_choice(b),
            "pool": {"old": scores.get("pool_old"), "new": scores.get("pool_new")}}
    lines = verdicts(summary) + auto_lines(b, summary, info)
    caveat = ("PLUMBING CHECK ONLY: a tiny random model answers with random bytes and no pair is both-bad; these "
              "numbers say nothing about whether weighting helps." if b.tiny else None)
    data = {"mode": mode, "command": command, "date": dt.datetime.now().isoformat(timespec="seconds"),
            "hardware": hw, "wall_minutes": round((time.time() - started) / 60, 1), "sizes": asdict(b.sizes),
            "model": b.model, "caveat": caveat, "verdicts": lines, "summary": summary, "info": info,
            "stage_timings": read(b.w("timings.json")) if b.w("timings.json").exists() else {},
            "ran_now": ran, "runs": {a: {str(s): r for s, r in by.items()} for a, by in runs.items()}}
    results_dir.mkdir(parents=True, exist_ok=True)
    write(results_dir / f"iw_reuse_{mode}.json", data)
    w = info["weights"]["diagnostics"]
    v1 = info["old"]["version"]
    md = [f"# iw_reuse ({mode})", "", f"`{command}`", "", f"{data['date']}, {hw}; {data['wall_minutes']} min wall.", ""]
    md += [f"**{caveat}**", ""] if caveat else []
    if summary.get("seeds_left_out"):
        done = sorted(next(iter(runs.values())))
        md += [f"**Results so far: {len(done)} of {b.sizes.seeds} seeds (seed {', '.join(map(str, done))}); left "
               f"out, not every arm finished: seed {', '.join(map(str, summary['seeds_left_out']))}.**", ""]
    md += [markdown_table(summary), "",
           f"Gold = mean gold reward of the policy's samples on {len(eval_tasks(b))} held-out prompts × "
           f"{b.sizes.eval_samples} (T=1); KL = KL(π‖v2) in nats per sequence; ± = 95% t-interval over "
           f"{len(next(iter(runs.values())))} seeds; Δ = paired difference against union; the TOST column is the "
           f"90% t-interval of Δ "
           f"(equivalent when inside ±{EQUIV_MARGIN:g}). {b.sizes.arm_batch * b.sizes.arm_accum} pairs per optimizer "
           f"step in every arm. Pool trained on: {info['pool']['old']} old (v1) and {info['pool']['new']} new (v2) "
           f"pairs (pairs with an empty or two identical responses dropped). Old pairs (v1): "
           f"{info['old']['pairs'] - info['old']['both_bad_dropped']} trainable of {info['old']['pairs']}; "
           f"per-token KL(v1‖v2) on the old responses {w['sequence'].get(f'kl/per_token/{v1}', math.nan):.3f} nats; "
           f"tempered α = {info['weights']['tempered_alpha']}; stored vs re-scored v2 log-probs differ by at most "
           f"{info['consistency_max_abs_nats']:.1e} nats.", ""] + lines + [""]
    (results_dir / f"iw_reuse_{mode}.md").write_text("\n".join(md))


def claim(b: Bench, name: str) -> bool:
    """True for the one process that creates the claim `name` (os.mkdir is atomic)."""
    b.w("claims").mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(b.w("claims", name))
        return True
    except FileExistsError:
        return False


def work_in_parallel(b: Bench, seeds: list[int], arms: list[str], tokenizer: Any, parent: int = 0) -> None:
    """A worker of --workers: arm runs, each taken by whichever worker claims it first, seed by seed; the auto arm's
    runs wait for auto's decision (made meanwhile by the parent) and go first once it is made, so that a run cut
    short leaves complete (union, auto) pairs of seeds. None when auto chose unweighted reuse (its runs are union's).
    v2's evaluation of a seed is sampled once, by the first worker that needs it. A worker whose parent is gone
    stops."""
    taken: set = set()
    while True:
        if parent and os.getppid() != parent:
            return
        choice = auto_choice(b)
        if choice is not None and choice["unweighted"] and "union" in arms:
            taken |= {(seed, "auto") for seed in seeds}
        pending = [(seed, arm) for seed in seeds for arm in arms if (seed, arm) not in taken]
        if not pending:
            return
        ready = [j for j in pending if j[1] == "auto"] if choice is not None else []
        ready += [j for j in pending if j[1] != "auto"]
        if not ready:  # only auto runs are left and auto has not decided yet
            time.sleep(10)
            continue
        seed, arm = ready[0]
        taken.add((seed, arm))
        if not claim(b, f"{arm}-s{seed}"):
            continue
        if claim(b, f"v2-s{seed}"):
            v2_eval(b, seed)
        while not b.w("v2_eval", f"s{seed}.json").exists():  # another worker is still sampling it
            if parent and os.getppid() != parent:
                return
            time.sleep(5)
        result = run_arm(b, arm, seed, tokenizer)
        print(f"[iw_reuse] worker {os.getpid()}: {arm} seed {seed} ({result['cpu_s']:.0f} CPU-s)", flush=True)


def override_sizes(sizes: Sizes, items: list[str]) -> Sizes:
    """`--size field=value` overrides, typed by the field's default (tuples: comma-separated ints)."""
    changes: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in Sizes.__dataclass_fields__:
            raise ValueError(f"--size {item}: expected FIELD=VALUE with FIELD one of {', '.join(asdict(sizes))}")
        current = getattr(sizes, name)
        try:
            if isinstance(current, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                value: Any = text.lower() in ("true", "1")
            elif isinstance(current, tuple):
                value = tuple(int(x) for x in text.split(",") if x)
            else:
                value = type(current)(text)
        except ValueError:
            raise ValueError(f"--size {item}: {text!r} is not a valid {type(current).__name__}") from None
        changes[name] = value
    return replace(sizes, **changes)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench/iw_reuse.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Small sizes: minutes on the embedded model.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="Sizes: default, quick (= --quick) or old_new (old >> new pairs; auto's harm check).")
    parser.add_argument("--size", action="append", default=[], metavar="FIELD=VALUE",
                        help="Override one size (repeatable), e.g. --size n_old=200 --size eval_at=2,4.")
    parser.add_argument("--only_seeds", default=None,
                        help="Run only these seeds (e.g. 0,2) and write no results: for parallel processes on a shared "
                             "cache; a last call without it summarises every seed.")
    parser.add_argument("--name", default=None, help="Results name: bench/results/iw_reuse_<name>.{md,json}.")
    parser.add_argument("--workers", type=int, default=1,
                        help="Arm runs (and v2's evaluations) in this many processes of --threads threads each; the "
                             "shared stages run first, in this one.")
    parser.add_argument("--cached_only", action="store_true",
                        help="Train and sample nothing: summarise the seeds whose runs of every arm have finished "
                             "(results so far, e.g. after a run was cut short); the others are named as left out.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Base model spec, or 'tiny' (plumbing only).")
    parser.add_argument("--seeds", type=int, default=None, help="Override the number of seeds.")
    parser.add_argument("--arms", default=",".join(ARMS), help="Comma-separated subset of: " + ", ".join(ARMS))
    parser.add_argument("--data_seed", type=int, default=0, help="Prompt split, sampling and labels of shared stages.")
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "bench" / "iw_reuse"), help="Cache (resumable).")
    parser.add_argument("--results_dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads. 1 by default: on a busy machine a second thread mostly spin-waits.")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    preset = args.preset or ("quick" if args.quick else "default")
    sizes = PRESETS[preset]
    sizes = replace(sizes, seeds=args.seeds or sizes.seeds)
    if args.model == "tiny":  # a random 2-layer model: move it fast enough that the KL interpolation is exercised
        sizes = replace(sizes, v2_lr=0.05, arm_lr=0.3)
    try:
        sizes = override_sizes(sizes, args.size)
    except ValueError as e:
        parser.error(str(e))
    import torch

    torch.set_num_threads(args.threads)
    arms = [a for a in ARMS if a in args.arms.split(",")]  # union before auto: auto may reuse union's runs
    unknown = set(a for a in args.arms.split(",") if a) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}")
    if "oracle" in arms and not sizes.oracle_pairs:
        parser.error("the oracle arm needs oracle_pairs (this preset does not sample fresh v2 pairs on old prompts)")
    only = None if args.only_seeds is None else {int(x) for x in args.only_seeds.split(",") if x}
    cache = preset + ("_tiny" if args.model == "tiny" else "")
    mode = args.name or cache
    shared_key = key({"model": args.model, "data_seed": args.data_seed, **{k: getattr(sizes, k) for k in Sizes.SHARED}})
    shared = Path(args.work_dir) / f"{cache}-{shared_key}"
    b = Bench(sizes, args.model, shared, shared / f"arms-{key({**asdict(sizes), 'seeds': None})}", args.data_seed)
    started, hw, ran = time.time(), hardware(), []
    command = "python bench/iw_reuse.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"[iw_reuse] {mode}: work dir {b.work}", flush=True)
    b.work.mkdir(parents=True, exist_ok=True)
    if args.cached_only:
        stages = SHARED_STAGES + [st for st in WORK_STAGES if st[2] is not stage_auto or "auto" in arms]
        missing = [name for name, marker, func in stages if not (b.p if (name, marker, func) in SHARED_STAGES
                                                                  else b.w)(marker).exists()
                   and not (func is stage_base and not b.tiny)]
        if missing:
            parser.error(f"--cached_only: stage(s) not run yet in {b.work}: {', '.join(missing)}")
    run_stages(b, SHARED_STAGES, b.p, ran)
    run_stages(b, [st for st in WORK_STAGES if st[2] is not stage_auto], b.w, ran)

    from align.models import load_tokenizer

    tokenizer = load_tokenizer(str(b.p("v2")))
    runs: dict[str, dict[int, dict]] = {}
    seeds = [seed for seed in range(sizes.seeds) if only is None or seed in only]
    if args.worker:
        work_in_parallel(b, seeds, arms, tokenizer, parent=int(os.environ.get("IW_REUSE_PARENT", "0")))
        return {}
    procs = []
    if args.workers > 1:  # the workers start on v2's evaluations and the other arms while auto's pilots run here
        shutil.rmtree(b.w("claims"), ignore_errors=True)  # claims of an interrupted earlier call
        argv_list = list(argv if argv is not None else sys.argv[1:])
        worker = [sys.executable, __file__, *argv_list, "--worker", "--threads", "1"]
        env = {**os.environ, "IW_REUSE_PARENT": str(os.getpid())}
        procs = [subprocess.Popen(worker, env=env) for _ in range(args.workers)]
    try:
        if "auto" in arms:
            run_stages(b, [st for st in WORK_STAGES if st[2] is stage_auto], b.w, ran)
        codes = [proc.wait() for proc in procs]
    except BaseException:
        for proc in procs:
            proc.terminate()
        raise
    if any(codes):
        raise SystemExit(f"iw_reuse: a worker failed (exit codes {codes})")
    auto_same = bool((auto_choice(b) or {}).get("unweighted"))
    left_out = []
    for seed in range(sizes.seeds):
        if only is not None and seed not in only:
            continue
        needed = [a for a in arms if not (a == "auto" and auto_same and "union" in arms)]
        if args.cached_only and not all(b.w("runs", f"{a}-s{seed}", "trajectory.json").exists() for a in needed):
            left_out.append(seed)
            continue
        for arm in arms:
            if arm == "auto" and auto_same and "union" in runs:  # auto chose none: same data, weights and seed
                runs["auto"] = runs.get("auto", {})
                runs["auto"][seed] = {**runs["union"][seed], "arm": "auto", "same_as_union": True}
                continue
            done = b.w("runs", f"{arm}-s{seed}", "trajectory.json").exists()
            runs.setdefault(arm, {})[seed] = result = run_arm(b, arm, seed, tokenizer)
            ran += [] if done else [f"{arm}-s{seed}"]
            points = ", ".join(f"step {p['step']} KL {p['kl']:.2f} gold {p['gold']:.2f}" for p in result["trajectory"])
            print(f"[iw_reuse] {arm} seed {seed} ({result['cpu_s']:.0f} CPU-s): {points}", flush=True)
    if only is not None:
        print(f"[iw_reuse] seeds {sorted(only)} done; run again without --only_seeds to summarise", flush=True)
        return {}
    if not runs:
        parser.error(f"--cached_only: no seed has finished runs of every arm ({', '.join(arms)}) in {b.work}")
    summary = summarize(runs)
    summary["seeds_left_out"] = left_out
    write_results(b, mode, Path(args.results_dir), summary, runs, ran, started, command, hw)
    print("\n" + (read(Path(args.results_dir) / f"iw_reuse_{mode}.json")["caveat"] or ""))
    print(markdown_table(summary) + "\n\n" + "\n".join(verdicts(summary)))
    print(f"\nwrote {Path(args.results_dir) / f'iw_reuse_{mode}.json'} and .md", flush=True)
    return summary


if __name__ == "__main__":
    main()
