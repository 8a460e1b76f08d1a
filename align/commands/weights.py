"""`align weights --data PATH --model SPEC [--scheme ...] [--out DIR]`: importance weights and their diagnostics
(ESS/N per source version, weights.json, weights.png) of a preference dataset, without training; with --scheme
auto, the choice auto would make and what the old labels are still worth (align/reuse.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from align.commands.parser import ArgumentParser, optional_float
from align.config import LoraArgs, ModelArgs, TrainArgs, WeightingArgs
from align.models import DEFAULT_MODEL, load_model
from align.preference import PreferenceCollator, PreferenceSet, load_preferences, score_pairs, tokenize_pairs
from align.reuse import worth_lines
from align.trainers.pilot import LoraPilot
from align.trainers.weights import check_columns, dataset_weights, report
from align.weighting import SCHEME_NAMES, support_shares


def main(argv: list[str]) -> None:
    """`align weights --data PATH --model SPEC [--scheme ...] [--out DIR]`: weights and diagnostics, no training."""
    parser = ArgumentParser(prog="align weights", description=main.__doc__)
    parser.add_argument("--data", required=True, help="Preference JSONL (as `align export` writes it).")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Target policy: the model the next round starts from.")
    parser.add_argument("--revision", default=None, help="Hub revision for hub ids.")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--scheme", default="sequence", choices=(*SCHEME_NAMES, "auto"))
    parser.add_argument("--alpha", type=float, default=1.0, help="Tempering α (tempered, mixture).")
    parser.add_argument("--beta", type=float, default=0.1, help="auto: DPO β of the pilot fits.")
    parser.add_argument("--auto_steps", type=int, default=40, help="auto: optimizer steps of each pilot fit.")
    parser.add_argument("--new_version", default=None,
                        help="auto: the version the target sampled (default: found from the log-probs).")
    parser.add_argument("--clip", type=optional_float, default=5.0, help="Truncation c (>= 1); none: off.")
    parser.add_argument("--both_bad", default="drop", choices=["drop", "tie"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", default=None, help="Directory for weights.json and weights.png.")
    args = parser.parse_args(argv)
    weighting = WeightingArgs(weighting_scheme=args.scheme, weighting_alpha=args.alpha,
                              weighting_clip=args.clip, weighting_new_version=args.new_version,
                              weighting_auto_steps=args.auto_steps)

    pset = load_preferences(args.data, both_bad=args.both_bad)
    model = tokenizer = None
    if args.scheme not in ("none", "auto"):
        check_columns(pset, args.scheme)  # before loading a model
    if args.scheme != "none":
        model, tokenizer = load_model(ModelArgs(model=args.model, revision=args.revision, dtype=args.dtype),
                                      device="auto")
    if tokenizer is not None:
        full, _, _ = tokenize_pairs(pset, tokenizer)  # untruncated: the stored log-probs cover every token
    else:
        full = []
    collator = PreferenceCollator(tokenizer.pad_token_id) if tokenizer is not None else None

    def make_pilot(scores: dict) -> LoraPilot:  # auto's evidence: short LoRA DPO fits, as `align dpo` runs them
        return LoraPilot(model, full, scores, collator, args.beta, LoraArgs(), args.auto_steps,
                         TrainArgs().learning_rate, args.batch_size)

    result, _ = dataset_weights(
        pset, full, weighting, lambda feats, coll: score_pairs(model, feats, collator, args.batch_size,
                                                               with_collision=coll), make_pilot)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    report(result, pset, out)
    print_summary(result.diagnostics, pset, out)


def support_by_version(diag: dict, pset: PreferenceSet) -> dict[str, dict]:
    """The support map's off-support share per source version (align.weighting.support_shares); {} without a map."""
    if "map/chosen_per_token" not in diag:
        return {}
    versions = [r.gen_model_version or "unknown" for r in pset.rows]
    return support_shares(diag["map/chosen_per_token"], diag["map/rejected_per_token"], versions,
                          diag["map/off_support_threshold"], diag["map/equal_band"])


def print_summary(diag: dict, pset: PreferenceSet, out: Optional[Path]) -> None:
    print(f"weights for {diag['weights/n']} pairs of {pset.path} (scheme {diag.get('scheme')}, "
          f"alpha {diag.get('alpha', 1.0):g}, clip {diag.get('clip')})")
    if pset.both_bad_dropped:
        print(f"  both-bad pairs dropped: {pset.both_bad_dropped}")
    print(f"  ESS/N overall: {diag['weights/ess_frac']:.3f}   top-1% weight share: {diag['weights/top1pct_share']:.3f}")
    for key in sorted(k for k in diag if k.startswith("weights/ess_frac/")):
        version = key.split("/", 2)[2]
        print(f"  ESS/N {version}: {diag[key]:.3f}   (pairs {diag[f'data/share/{version}']:.0%}, "
              f"weight {diag[f'weights/share/{version}']:.0%})")
    if "kl/per_token" in diag:
        print(f"  KL(sampler ‖ target) per token: {diag['kl/per_token']:.4f} nat")
    for version, row in support_by_version(diag, pset).items():
        print(f"  outside the target's support, {version}: {row['off_support']} of {row['pairs']} pairs "
              f"({row['share']:.0%}; both responses < {diag['map/off_support_threshold']:g} nat/token under the "
              "target): drift a reweighting cannot fix; collect new pairs")
    if "warning" in diag:
        print(f"  warning: {diag['warning']}")
    if "auto" in diag:
        print(f"  auto chose {diag['auto']['choice']}: {diag['auto']['reason']}")
        for name, score in diag["auto"].get("scores", {}).items():
            print(f"    {name}: held-out log-lik {score['heldout_loglik']:.4f} ({score['gain']:+.4f} ± "
                  f"{score['se']:.4f} vs none), ESS/N of old pairs {score['ess_frac_old']:.2f}")
    if "worth" in diag:
        print("\n".join(worth_lines(diag["worth"])))
    if out is not None:
        print(f"  wrote {out / 'weights.json'} and {out / 'weights.png'}")
