"""`align demo` (`make demo`): the whole flywheel on the embedded SmolLM2-135M-Instruct, CPU only (align/demo.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from align.commands.parser import ArgumentParser
from align.demo import BASE_MODEL, SIZES, WEIGHTING_SCHEMES, Demo, default_precision, run

STEP_OVERRIDES = ("sft_steps", "dpo_steps", "reward_steps", "rlhf_steps")


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="align demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="Demo directory (re-running resumes it); default: demo, or "
                        "demo-full for --size full.")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="small: under 15 minutes on 2 CPU cores, the install included; full: a bigger run for a GPU.")
    parser.add_argument("--model", default=BASE_MODEL, help="Base model (v0): the embedded alias, a path or a hub id.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weighting", default="auto", choices=WEIGHTING_SCHEMES,
                        help="Importance-weighting scheme for v0's pairs in the DPO stage (auto: chosen by evidence).")
    parser.add_argument("--mixed_precision", choices=("auto", "bf16", "no"), default=None,
                        help="Training steps' precision (default: bf16 autocast on a CPU with native bf16, else auto).")
    for field in STEP_OVERRIDES:
        parser.add_argument(f"--{field}", type=int, default=None, help=f"Override the size's {field}.")
    args = parser.parse_args(argv)
    changed = {f: getattr(args, f) for f in STEP_OVERRIDES if getattr(args, f) is not None}
    out = Path(args.out or ("demo" if args.size == "small" else f"demo-{args.size}"))
    run(Demo(out, replace(SIZES[args.size], **changed), args.size, args.model, args.seed, args.weighting,
             precision=args.mixed_precision or default_precision()))
