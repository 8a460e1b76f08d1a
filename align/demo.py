"""`align demo` (`make demo`): the whole flywheel on the embedded SmolLM2-135M-Instruct, CPU only.

    v0  the base model samples candidates for training prompts of the task suite (full provenance, in the store)
        simulated annotators (the tasks' gold checks, with noise) vote on pairs of them
    v1  SFT on the suite's reference answers
        v1 samples a small new prompt set; simulated annotators vote
    v2  DPO from v1 on v1's pairs plus v0's pairs, importance-weighted toward v1
        a reward model on the pairs (held-out pairs measure its accuracy)
    v3  a short RLHF run (RLOO) from v2 against that reward model, with the reward-hacking monitor
        `align eval` of v0..v3 on held-out prompts: gold and reward-model scores, win rates, KL to v0, the HTML report

Each stage writes its result under the demo directory and a marker in DIR/stages/; a re-run skips the stages
already done and resumes an interrupted one (generation from the store, training from its last checkpoint), so a
failure is fixed and resumed, not restarted. Everything is seeded: the same seed gives the same demo.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from align import config as cfg, store as st
from align.config import WeightingArgs
from align.data import read_jsonl, write_jsonl
from align.demo_summary import print_summary, summary
from align.demonstrations import demonstration_candidates, label_candidates
from align.errors import AlignError
from align.generation import SamplingSettings
from align.judges import GoldJudge
from align.prompts import repo_file, resolve_prompts
from align.report import write_report
from align.report.clusters import DEFAULT as embedder
from align.report.compare import EvalSpec, run_eval
from align.runs import last_checkpoint, write_json
from align.sampling import generate_to_store
from align.simulate import simulate
from align.store import ModelVersion, Pair, Response
from align.store.versions import ensure_registered

BASE_MODEL = "smollm2-135m-instruct"
CONFIGS = {method: f"recipes/configs/{method}/smollm2_lora.yaml" for method in ("sft", "dpo", "reward", "rlhf")}
# mixture needs log-probs under every pooled version, which the demo's export does not carry
WEIGHTING_SCHEMES = [s for s in typing.get_args(typing.get_type_hints(WeightingArgs)["weighting_scheme"])
                     if s != "mixture"]


@dataclass(frozen=True)
class DemoSize:
    """How big each stage is. `small` fits 15 minutes on 2 CPU cores; `full` is for a GPU."""

    v0_per_family: int  # training prompts per task family sampled by v0
    v1_per_family: int  # new training prompts per family sampled by v1
    n: int  # v0's samples per prompt (n/2 disjoint pairs: what importance weights assume)
    max_new_tokens: int
    sft_steps: int
    dpo_steps: int
    reward_steps: int
    rlhf_steps: int
    eval_per_family: int  # held-out prompts per family in the final evaluation
    eval_n: int  # samples per held-out prompt and version (1 when greedy)
    sft_eval_samples: int = 32  # held-out SFT conversations: the overfitting alarm and the stage-interference check
    v1_n: int = 4  # v1's samples per prompt, every pair labelled: n(n-1)/2 pairs per prompt
    eval_temperature: float = 0.0  # the final evaluation: 0 is greedy (one answer per prompt, no sampling noise)
    rlhf_evaluations: int = 5  # greedy gold evaluations in the RLHF run, the start included (the monitor needs 5)
    rlhf_eval_per_family: int = 5  # held-out prompts per family in each of them (not the final evaluation's)
    # training tasks per family whose SFT demonstrations the reward model is also compared on (align.demonstrations)
    demonstrations_per_family: int = 80
    reward_learning_rate: float = 2e-3


SIZES = {
    "small": DemoSize(v0_per_family=3, v1_per_family=8, n=4, v1_n=6, max_new_tokens=48, sft_steps=36, dpo_steps=8,
                      reward_steps=52, rlhf_steps=4, rlhf_evaluations=5, rlhf_eval_per_family=3, eval_per_family=10,
                      eval_n=1, sft_eval_samples=16),
    "full": DemoSize(v0_per_family=40, v1_per_family=40, n=4, v1_n=6, max_new_tokens=128, sft_steps=300,
                     dpo_steps=200, reward_steps=300, reward_learning_rate=1e-3, rlhf_steps=150, rlhf_evaluations=11,
                     rlhf_eval_per_family=5, eval_per_family=15, eval_n=1, sft_eval_samples=140),
}


@dataclass(frozen=True)
class Demo:
    out: Path
    size: DemoSize
    size_name: str = "small"
    model: str = BASE_MODEL
    seed: int = 0
    weighting: str = "auto"  # how v0's pairs are weighted toward v1 in the DPO stage (auto: where evidence says it pays)
    both_bad_threshold: float = 0.2  # simulated annotators: both responses below this gold reward are "both bad"
    overrides: tuple[str, ...] = ()  # extra `--key value` for every training stage (tests: tiny batches)
    # every training stage's mixed_precision: bf16 autocast where the CPU computes bf16 natively (default_precision)
    precision: str = "auto"

    def path(self, name: str) -> Path:
        return self.out / name

    @property
    def db(self) -> str:
        return f"sqlite:///{self.path('store.db')}"

    def settings(self, seed_offset: int = 0, temperature: float = 1.0):
        """Sampling at temperature 1 with no truncation: what importance weights and KL estimates assume."""
        return SamplingSettings(temperature=temperature, max_new_tokens=self.size.max_new_tokens,
                                seed=self.seed + seed_offset)


# ---- stages ----------------------------------------------------------------------------------------------------------


def stage_generate_v0(demo: Demo) -> dict:
    v0_rows, _ = prompt_sets(demo)
    return _generate(demo, demo.model, v0_rows, demo.size.n)


def stage_label_v0(demo: Demo) -> dict:
    return _label(demo, version_of(demo, demo.model))


def stage_sft(demo: Demo) -> dict:
    # Held-out SFT answers every few steps: the report's overfitting alarm compares their loss with the training loss.
    return _train(demo, "sft", "v1-sft", demo.size.sft_steps, [
        "--model", demo.model, "--train_file", str(repo_file("data/sft/train.jsonl")),
        "--eval_file", str(repo_file("data/sft/eval.jsonl")), "--max_eval_samples", str(demo.size.sft_eval_samples),
        "--eval_steps", str(max(1, demo.size.sft_steps // 2)), "--save_steps", "10",
    ])


def stage_generate_v1(demo: Demo) -> dict:
    # Every pair of v1's samples is labelled (n(n-1)/2 per prompt): the current version's pairs need no weights, so
    # more comparisons of the same samples are cheap signal. v0's pairs stay disjoint, as importance weights assume.
    _, v1_rows = prompt_sets(demo)
    return _generate(demo, str(demo.path("v1-sft")), v1_rows, demo.size.v1_n, pair_rule="all_pairs")


def stage_label_v1(demo: Demo) -> dict:
    return _label(demo, "v1-sft")


def stage_export(demo: Demo) -> dict:
    """All labelled pairs, and a split by prompt for the reward model: one prompt in five is held out. The reward
    model also trains on comparisons with the SFT demonstrations of the training prompts (align.demonstrations),
    voted on by the same simulated annotators; no held-out prompt's demonstration is among them."""
    with st.connect(demo.db) as store:
        rows = st.export_preferences(store)
    if not rows:
        raise AlignError("no labelled pairs in the store")
    held_prompts = held_out_prompts(rows)
    held = [r for r in rows if _prompt_key(r["prompt"]) in held_prompts]
    train = [r for r in rows if _prompt_key(r["prompt"]) not in held_prompts]
    samples: dict[str, list[str]] = {}  # v1's and v0's answers to each training prompt
    for r in train:
        samples.setdefault(r["prompt"][-1]["content"], []).extend(r[side][-1]["content"]
                                                                  for side in ("chosen", "rejected"))
    tasks = [t for t in resolve_prompts("tasks:train", demo.size.demonstrations_per_family)
             if _prompt_key([{"role": "user", "content": t["prompt"]}]) not in held_prompts]
    judge = GoldJudge(both_bad_threshold=demo.both_bad_threshold)
    extra = label_candidates(demonstration_candidates(tasks, samples, seed=demo.seed), judge, annotators=3,
                             seed=demo.seed)
    write_jsonl(rows, demo.path("prefs.jsonl"))
    write_jsonl(train, demo.path("prefs_train.jsonl"))
    write_jsonl(held, demo.path("prefs_heldout.jsonl"))
    write_jsonl(train + extra, demo.path("prefs_reward.jsonl"))
    labels: dict[str, int] = {}
    for r in rows + extra:
        key = f"{r.get('kind') or r['gen_model_version']}:{r['label']}"
        labels[key] = labels.get(key, 0) + 1
    return {"pairs": len(rows), "reward_train": len(train) + len(extra), "reward_demonstrations": len(extra),
            "reward_heldout": len(held), "labels": labels}


def stage_dpo(demo: Demo) -> dict:
    # Not bf16 autocast on a CPU: the float32 pass that scores the pairs for the weights doubles as the reference
    # only without autocast; with it, a second pass over every pair costs more than bf16 saves on 12 steps.
    return _train(demo, "dpo", "v2-dpo", demo.size.dpo_steps, precision="auto", args=[
        "--model", str(demo.path("v1-sft")), "--train_file", str(demo.path("prefs.jsonl")), "--eval_file", "none",
        "--weighting_scheme", demo.weighting, "--eval_steps", "0", "--save_steps", "5",
        "--interference_samples", str(demo.size.sft_eval_samples),  # what DPO costs v1's SFT (the report shows it)
    ])


def stage_reward(demo: Demo) -> dict:
    return _train(demo, "reward", "reward", demo.size.reward_steps, [
        "--model", str(demo.path("v1-sft")), "--train_file", str(demo.path("prefs_reward.jsonl")),
        # its held-out accuracy is measured once, in float32, by the eval stage (prefs_heldout.jsonl)
        "--eval_file", "none", "--learning_rate", str(demo.size.reward_learning_rate), "--save_steps", "13",
    ])


def stage_rlhf(demo: Demo) -> dict:
    v0_rows, v1_rows = prompt_sets(demo)
    prompts, eval_prompts = demo.path("prompts_rlhf.jsonl"), demo.path("prompts_rlhf_eval.jsonl")
    if not prompts.exists():
        write_jsonl(v0_rows + v1_rows, prompts)
    if not eval_prompts.exists():
        write_jsonl(rlhf_eval_tasks(demo.size), eval_prompts)
    # Gold on held-out prompts of its own, 5 times: the monitor judges proxy against it, and v3 is the policy of the
    # best of those evaluations that beat the start beyond noise, else v2's (keep_policy best_beyond_noise), not the
    # last one. They are not the final evaluation's prompts, so choosing by them does not flatter v3 there.
    return _train(demo, "rlhf", "v3-rlhf", demo.size.rlhf_steps, [
        "--model", str(demo.path("v2-dpo")), "--reward_model", str(demo.path("reward")),
        "--prompts_file", str(prompts), "--eval_prompts_file", str(eval_prompts),
        "--eval_per_family", str(demo.size.rlhf_eval_per_family), "--eval_steps", str(rlhf_eval_steps(demo.size)),
        "--keep_policy", "best_beyond_noise", "--save_steps", "2",
        "--max_new_tokens", str(demo.size.max_new_tokens),
        "--interference_samples", str(demo.size.sft_eval_samples),
    ])


def rlhf_eval_tasks(size: DemoSize) -> list[dict]:
    """The RLHF run's gold-evaluation prompts: the held-out tasks after the final evaluation's, per family."""
    final = resolve_prompts("tasks:eval", size.eval_per_family)
    ids = {t["id"] for t in final}
    tasks = [t for t in resolve_prompts("tasks:eval", size.eval_per_family + size.rlhf_eval_per_family)
             if t["id"] not in ids]
    short = sorted(f for f in {t["family"] for t in final}
                   if sum(t["family"] == f for t in tasks) < size.rlhf_eval_per_family)
    if short:
        raise AlignError(f"the task suite's eval split has too few {', '.join(short)} prompts for "
                         f"{size.eval_per_family} evaluation and {size.rlhf_eval_per_family} RLHF prompts per family")
    return tasks


def rlhf_eval_steps(size: DemoSize) -> int:
    """Steps between the RLHF run's gold evaluations: `rlhf_evaluations` of them, the one before step 1 included."""
    return max(1, -(-size.rlhf_steps // max(1, size.rlhf_evaluations - 1)))


def stage_eval(demo: Demo) -> dict:
    models = [demo.model] + [str(demo.path(run)) for run in ("v1-sft", "v2-dpo", "v3-rlhf")]
    # Every version answers the same held-out prompts: the win rates are paired comparisons, prompt by prompt.
    spec = EvalSpec(
        models=models, prompt_rows=resolve_prompts("tasks:eval", demo.size.eval_per_family), judges=["gold", "reward"],
        reward_model=str(demo.path("reward")), n=demo.size.eval_n,
        settings=demo.settings(seed_offset=1000, temperature=demo.size.eval_temperature),
        heldout_pairs=read_jsonl(demo.path("prefs_heldout.jsonl")) or None, prompt_source="tasks:eval",
        seed=demo.seed, batch_size=35,  # 70 greedy answers in two generate() calls per version
    )
    with st.connect(demo.db) as store:
        report = run_eval(store, spec, embed=embedder)
    report.update(title="align demo: v0 (base) → v1 (SFT) → v2 (DPO) → v3 (RLHF)",
                  command=f"align demo --out {shlex.quote(str(demo.out))} --size {demo.size_name}")
    path = write_report(report, demo.path("report"))
    return {"report": str(path)}


STAGES: list[tuple[str, Callable[[Demo], dict]]] = [
    ("generate-v0", stage_generate_v0),
    ("label-v0", stage_label_v0),
    ("sft-v1", stage_sft),
    ("generate-v1", stage_generate_v1),
    ("label-v1", stage_label_v1),
    ("export", stage_export),
    ("dpo-v2", stage_dpo),
    ("reward", stage_reward),
    ("rlhf-v3", stage_rlhf),
    ("eval", stage_eval),
]


# ---- stage parts -----------------------------------------------------------------------------------------------------


def prompt_sets(demo: Demo) -> tuple[list[dict], list[dict]]:
    """Disjoint training prompts, balanced over task families: v0's set, then v1's new set."""
    size = demo.size
    picked = resolve_prompts("tasks:train", size.v0_per_family + size.v1_per_family)
    seen: dict[str, int] = {}
    v0, v1 = [], []
    for task in picked:
        seen[task["family"]] = seen.get(task["family"], 0) + 1
        (v0 if seen[task["family"]] <= size.v0_per_family else v1).append(task)
    return v0, v1


def version_of(demo: Demo, spec: str) -> str:
    with st.connect(demo.db) as store:
        return ensure_registered(store, spec)[1]


def _generate(demo: Demo, spec: str, rows: list[dict], n: int, pair_rule: str = "random_iid") -> dict:
    with st.connect(demo.db) as store:
        return generate_to_store(store, spec, rows, n, demo.settings(), batch_size=8 * n, pair_rule=pair_rule)


def _label(demo: Demo, version: str) -> dict:
    from sqlalchemy import select

    with st.connect(demo.db) as store:
        with store.read() as session:
            pair_ids = list(session.scalars(
                select(Pair.id).join(Response, Pair.response_a_id == Response.id)
                .join(ModelVersion, Response.model_version_id == ModelVersion.id).where(ModelVersion.name == version)
            ))
        judge = GoldJudge(both_bad_threshold=demo.both_bad_threshold)
        counts = simulate(store, judge, annotators=3, seed=demo.seed, pair_ids=pair_ids)
        labels: dict[str, int] = {}
        for row in st.export_preferences(store, model_versions=[version]):
            labels[row["label"]] = labels.get(row["label"], 0) + 1
    return {**counts, "labels": labels}


def _train(demo: Demo, method: str, name: str, steps: int, args: list[str], precision: Optional[str] = None) -> dict:
    """Run a recipe into DIR/name; an interrupted run resumes from its last checkpoint, a finished one is kept."""
    run = demo.path(name)
    if not (run / "version.json").exists():
        argv = ["--config", str(repo_file(CONFIGS[method])), "--output_dir", str(run), "--name", name,
                "--max_steps", str(steps), "--seed", str(demo.seed), "--mixed_precision", precision or demo.precision,
                *args, *demo.overrides]
        if last_checkpoint(run) is not None:
            argv.append("--resume")
        config = getattr(cfg, f"{method.upper()}_CONFIG")
        _trainer(method)(*cfg.parse_config(config, argv, prog=f"align {method}"))
    return {k: v for k, v in json.loads((run / "version.json").read_text()).get("metrics", {}).items()
            if isinstance(v, (int, float))}


def _trainer(method: str) -> Callable:
    if method == "sft":
        from align.trainers.sft import train_sft as train  # deferred: only the stage that runs loads its trainer
    elif method == "dpo":
        from align.trainers.dpo import train_dpo as train
    elif method == "reward":
        from align.trainers.reward import train_reward as train
    else:
        from align.trainers.rlhf import train_rlhf as train
    return train


def _prompt_key(prompt: Any) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def held_out_prompts(rows: list[dict], every: int = 5) -> set[str]:
    """Keys of the prompts whose pairs the reward model never trains on: one in `every` of each task family's
    prompts (at least one of a family with two or more), picked in a fixed pseudo-random order (their hashes).
    Every family is measured (a plain hash split once held out no arithmetic or refusal prompt at all), and all
    pairs of a prompt fall on one side."""
    by_family: dict[str, set[str]] = {}
    for r in rows:
        by_family.setdefault(str(r.get("family")), set()).add(_prompt_key(r["prompt"]))
    held: set[str] = set()
    for keys in by_family.values():
        count = len(keys) // every if len(keys) >= every else min(1, len(keys) - 1)
        held.update(sorted(keys)[:count])
    return held


# ---- running ---------------------------------------------------------------------------------------------------------


def native_bf16_cpu(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16); elsewhere bf16 is emulated, slower."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def default_precision() -> str:
    """bf16 autocast for the training steps on a CPU with native bf16 (1.4-1.8x less CPU per step, measured in the
    README); auto elsewhere (bf16 weights on a GPU that has them, float32 otherwise). Reference passes, importance
    weights and stored log-probs stay float32 either way (TrainArgs.mixed_precision)."""
    import torch

    return "bf16" if not torch.cuda.is_available() and native_bf16_cpu() else "auto"


def check_settings(demo: Demo) -> None:
    """A demo directory belongs to one set of settings: resuming it with others would mix two demos."""
    settings = {"size": asdict(demo.size), "model": demo.model, "seed": demo.seed, "weighting": demo.weighting,
                "both_bad_threshold": demo.both_bad_threshold, "overrides": list(demo.overrides),
                "precision": demo.precision}
    path = demo.path("demo.json")
    if path.exists():
        before = json.loads(path.read_text())
        if before != settings:
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            raise AlignError(f"{demo.out} holds a demo made with other settings ({', '.join(changed)}); "
                             f"use another --out, or delete {demo.out} to start over")
        return
    write_json(path, settings)


def run_stages(demo: Demo, stages=STAGES) -> dict[str, dict]:
    """Run the stages not done yet; return every stage's record ({"seconds", "result"})."""
    demo.out.mkdir(parents=True, exist_ok=True)
    demo.path("stages").mkdir(exist_ok=True)
    check_settings(demo)
    records = {}
    for name, func in stages:
        marker = demo.path("stages") / f"{name}.json"
        if marker.exists():
            records[name] = json.loads(marker.read_text())
            print(f"[demo] {name}: done already ({records[name]['seconds']:.0f}s), skipped", flush=True)
            continue
        print(f"[demo] {name}: running ...", flush=True)
        started, cpu = time.time(), time.process_time()
        try:
            result = func(demo)
        except AlignError as exc:
            raise AlignError(f"demo stage '{name}' failed: {exc}; fix it and run `make demo` again to resume "
                             "from this stage") from None
        except Exception as exc:
            raise AlignError(
                f"demo stage '{name}' failed ({type(exc).__name__}: {exc}); run `make demo` again to resume from "
                "this stage, or `align demo --debug` for the traceback"
            ) from exc
        # CPU seconds (all threads) next to wall seconds: on a shared machine they say what the stage itself cost
        records[name] = {"seconds": time.time() - started, "cpu_seconds": time.process_time() - cpu, "result": result}
        write_json(marker, records[name])
        print(f"[demo] {name}: done in {records[name]['seconds']:.0f}s", flush=True)
    return records


def print_next_round(demo: Demo) -> None:
    """Where the report is, and the commands of the next round with people in the loop."""
    report = demo.path("report/report.html")
    print(f"\nThe report: {report}  (open it in a browser; report.json and summary.md beside it)")
    print("\nNext round, with people in the loop:")
    print(f"  align users add alice --role annotator --db {demo.db}")
    print(f"  align label --db {demo.db} --port 7860        # vote in the browser at http://127.0.0.1:7860")
    print(f"  align generate --model {demo.path('v3-rlhf')} --prompts tasks:train --per_family 3 --n 4 "
          f"--db {demo.db}   # new candidates to label")
    print(f"  align export --db {demo.db} --out {demo.path('prefs_round2.jsonl')}")
    print(f"  align dpo --config {CONFIGS['dpo']} --model {demo.path('v3-rlhf')} "
          f"--train_file {demo.path('prefs_round2.jsonl')} --eval_file none --weighting_scheme {demo.weighting}")


def run(demo: Demo) -> dict:
    """Run (or resume) every stage, write DIR/summary.json and print the summary table; return the table."""
    records = run_stages(demo)
    table = summary(demo, records)
    write_json(demo.path("summary.json"), table)
    print_summary(table)
    print_next_round(demo)
    return table
