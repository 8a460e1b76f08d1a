"""`align demo` (`make demo`): the main job on the embedded SmolLM2-135M-Instruct, CPU only.

Stages run in order, each writing its result under the demo directory; a re-run skips the stages
already done, so a failure is fixed and resumed, not restarted. Today the demo fine-tunes the model
on the task suite's reference answers (SFT) and shows held-out answers and gold rewards before and
after.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from align.errors import AlignError

SFT_CONFIG_FILE = "recipes/configs/sft/smollm2_lora.yaml"


@dataclass
class Demo:
    out: Path
    per_family: int  # held-out prompts per task family answered before and after
    sft_steps: int
    seed: int

    def path(self, name: str) -> Path:
        return self.out / name


def stage_baseline(demo: Demo) -> None:
    _answer(demo, "smollm2-135m-instruct", demo.path("answers_v0.json"))


def stage_sft(demo: Demo) -> None:
    from align.config import SFT_CONFIG, parse_config
    from align.trainers.sft import train_sft

    run = demo.path("v1-sft")
    argv = ["--config", _repo_file(SFT_CONFIG_FILE), "--output_dir", str(run), "--max_steps", str(demo.sft_steps),
            "--seed", str(demo.seed), "--name", "v1-sft", "--train_file", _repo_file("data/sft/train.jsonl"),
            "--eval_file", _repo_file("data/sft/eval.jsonl"), "--eval_steps", "0", "--save_steps", "10"]
    # A run interrupted mid-training resumes from its last checkpoint.
    resume = (run / "checkpoints").is_dir()
    train_sft(*parse_config(SFT_CONFIG, argv + (["--resume"] if resume else [])))


def stage_after(demo: Demo) -> None:
    _answer(demo, str(demo.path("v1-sft")), demo.path("answers_v1.json"))


STAGES: list[tuple[str, str, Callable[[Demo], None]]] = [
    ("baseline", "answers_v0.json", stage_baseline),
    ("sft", "v1-sft/version.json", stage_sft),
    ("after", "answers_v1.json", stage_after),
]


def _answer(demo: Demo, model_spec: str, path: Path) -> None:
    from align.config import ModelArgs
    from align.evaluate import answer_tasks, gold_summary, stratified
    from align.models import load_model
    from align.tasks import load_tasks

    tasks = stratified(load_tasks(_repo_file("data/tasks/eval.jsonl")), demo.per_family)
    model, tokenizer = load_model(ModelArgs(model=model_spec))
    rows = answer_tasks(model, tokenizer, tasks)
    _write(path, {"model": model_spec, "summary": gold_summary(rows), "rows": rows})


def _repo_file(relative: str) -> str:
    """Shipped files are found from the working directory or from the source checkout."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / relative).exists():
            return str(root / relative)
    raise AlignError(f"{relative} not found; run the demo from the repository root")


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    tmp.replace(path)


def run_stages(demo: Demo) -> None:
    demo.out.mkdir(parents=True, exist_ok=True)
    for name, marker, func in STAGES:
        if demo.path(marker).exists():
            print(f"[demo] {name}: done already, skipped")
            continue
        print(f"[demo] {name}: running ...", flush=True)
        started = time.time()
        try:
            func(demo)
        except AlignError as exc:
            raise AlignError(f"demo stage '{name}' failed: {exc}; fix it and run `make demo` again to resume") from None
        except Exception as exc:
            raise AlignError(
                f"demo stage '{name}' failed ({type(exc).__name__}: {exc}); run `make demo` again to resume, "
                "or `align demo --debug` for the traceback"
            ) from exc
        print(f"[demo] {name}: done in {time.time() - started:.0f}s", flush=True)


def print_report(demo: Demo) -> None:
    before = json.loads(demo.path("answers_v0.json").read_text())
    after = json.loads(demo.path("answers_v1.json").read_text())
    print("\nMean gold reward on held-out task prompts (greedy answers):")
    print(f"  {'family':<14}{'v0 base':>10}{'v1 SFT':>10}")
    for family, value in before["summary"].items():
        print(f"  {family:<14}{value:>10.3f}{after['summary'][family]:>10.3f}")
    print("\nHeld-out answers, before -> after:")
    seen = set()
    for b, a in zip(before["rows"], after["rows"]):
        if b["family"] in seen:
            continue
        seen.add(b["family"])
        print(f"\n  [{b['family']}] {b['prompt']}")
        print(f"    v0 ({b['reward']:.2f}): {_one_line(b['response'])}")
        print(f"    v1 ({a['reward']:.2f}): {_one_line(a['response'])}")
    print(f"\nEverything is in {demo.out}/ (the SFT run: {demo.path('v1-sft')}/).")


def _one_line(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="align demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="Demo directory (re-running resumes it).")
    parser.add_argument("--per_family", type=int, default=8, help="Held-out prompts per task family.")
    parser.add_argument("--sft_steps", type=int, default=30, help="SFT optimizer steps (batch 8; ~10 s each on 2 CPU cores).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    demo = Demo(Path(args.out), args.per_family, args.sft_steps, args.seed)
    run_stages(demo)
    print_report(demo)
