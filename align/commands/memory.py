"""`align memory --model SPEC_OR_SHAPE --method M --lora|--qlora|--full --batch N --max_length L [--gpu G]`: peak GPU
memory of a training run, estimated before it starts (the formulas are in align/memory.py)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from align.commands.parser import ArgumentParser
from align.memory import (GPUS, METHODS, MODES, SHAPES, Estimate, Shape, estimate, layer_bytes, recommend, render,
                          resolve_shape)


def main(argv: list[str]) -> None:
    """`align memory --model SPEC_OR_SHAPE --method M --lora|--qlora|--full --batch N --max_length L ...`"""
    parser = ArgumentParser(prog="align memory", description="Estimate peak GPU memory of a training run before it starts.")
    parser.add_argument("--model", required=True, help=f"A local model directory or a shape: {', '.join(SHAPES)}.")
    parser.add_argument("--method", choices=METHODS, default="sft")
    mode = parser.add_mutually_exclusive_group()
    helps = {"lora": "LoRA on bf16 weights (the default).", "qlora": "LoRA on 4-bit NF4 weights (load_in_4bit).",
             "full": "Full fine-tuning."}
    for name in MODES:
        mode.add_argument(f"--{name}", dest="mode", action="store_const", const=name, help=helps[name])
    parser.set_defaults(mode="lora")
    parser.add_argument("--batch", type=int, default=8, help="Per-GPU micro-batch: sequences (sft, rlhf) or pairs.")
    parser.add_argument("--max_length", type=int, default=1024, help="Tokens per sequence (prompt + completion).")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward.")
    parser.add_argument("--gpu", choices=sorted(GPUS), default=None, help="Say which accelerate config fits.")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_dropout", type=float, default=0.0, help="As in training (LoraArgs): none by default.")
    parser.add_argument("--no_precompute_ref", action="store_true", help="DPO: reference forward every step.")
    parser.add_argument("--json", action="store_true", help="Print the terms as JSON.")
    args = parser.parse_args(argv)
    name, shape = resolve_shape(args.model)
    est, advice = estimate_for_cli(name, shape, args)
    if args.json:
        print(json.dumps({**asdict(est), "peak": est.peak, "needs": Estimate.needs(est.peak), "advice": advice}))
    else:
        print(render(est, args.gpu, advice))


def estimate_for_cli(name: str, shape: Shape, args: argparse.Namespace) -> tuple[Estimate, list[str]]:
    kwargs = dict(method=args.method, mode=args.mode, batch=args.batch, max_length=args.max_length, dtype=args.dtype,
                  lora_r=args.lora_r, lora_dropout=args.lora_dropout, precompute_ref=not args.no_precompute_ref,
                  model=name)
    est = estimate(shape, gradient_checkpointing=args.gradient_checkpointing, **kwargs)
    variants = []
    if not args.gradient_checkpointing:
        variants.append(("with gradient_checkpointing: true (~30% slower)",
                         estimate(shape, gradient_checkpointing=True, **kwargs)))
    if args.mode == "lora":
        variants.append(("with QLoRA (load_in_4bit: true) and gradient checkpointing",
                         estimate(shape, gradient_checkpointing=True, **dict(kwargs, mode="qlora"))))
    advice = recommend(est, GPUS[args.gpu], layer_bytes(shape, args.dtype), variants) if args.gpu else []
    return est, advice
