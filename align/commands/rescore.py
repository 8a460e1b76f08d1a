"""`align rescore --db URL --sample 200`: re-score stored responses with their recorded model; check they agree."""

from __future__ import annotations

from align import store as st
from align.commands.parser import DEFAULT_DB, ArgumentParser
from align.errors import AlignError
from align.sampling import rescore


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="align rescore", description="Re-score stored responses with their recorded model.")
    parser.add_argument("--db", default=DEFAULT_DB)
    parser.add_argument("--sample", type=int, default=200, help="Responses to re-score (random sample).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=0.1, help="Largest acceptable difference, nats per sequence.")
    args = parser.parse_args(argv)
    with st.connect(args.db) as store:
        report = rescore(store, args.sample, args.seed)
    worst = 0.0
    for name, r in report.items():
        worst = max(worst, r["max_abs_diff_logp"], r["max_abs_diff_sample_logp"])
        print(f"{name}: {r['checked']} responses, max |Δ logp| = {r['max_abs_diff_logp']:.2e} nats "
              f"(sampling distribution: {r['max_abs_diff_sample_logp']:.2e})")
    if worst > args.tolerance:
        raise AlignError(f"stored log-probs differ from a re-score by up to {worst:.3f} nats (> {args.tolerance}); "
                         "the model, tokenizer or chat template changed since generation")
    print(f"consistent: every difference is under {args.tolerance} nats")
