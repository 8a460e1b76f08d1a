"""`align label`: the pairwise labeling app (login required), or simulated annotators with `--simulate JUDGE`.

    align label --db runs/store.db --host 127.0.0.1 --port 7860
    align label --db runs/store.db --compare runs/v1 runs/v2      # adds the live side-by-side tab
    align label --simulate gold --db runs/store.db                 # a simulated judge instead (align.simulate)
"""

from __future__ import annotations

from align import store as st
from align.commands.parser import DEFAULT_DB, ArgumentParser
from align.errors import AlignError
from align.generation import SamplingSettings
from align.simulate import GoldJudge
from align.simulate import simulate as simulated_votes


def label_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="align label", description="Run the pairwise labeling app (login required).")
    parser.add_argument("--db", default=DEFAULT_DB, help="store: a SQLite path or a postgresql:// URL")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--guidelines", default=None, help="guidelines version (labeling/guidelines/vN.md); "
                        "default: the newest")
    parser.add_argument("--lease_seconds", type=int, default=600, help="how long a pair stays reserved")
    parser.add_argument("--rationale", default="strong,both_bad",
                        help="when a rationale is required, comma-separated: strong (a much-better vote), both_bad; "
                        "or none (default: strong,both_bad)")
    parser.add_argument("--compare", nargs=2, metavar=("MODEL_A", "MODEL_B"),
                        help="two model specs (or run directories) for the live side-by-side tab")
    parser.add_argument("--compare_names", nargs=2, metavar=("NAME_A", "NAME_B"),
                        help="model version names to store the side-by-side answers under (default: the specs)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="side-by-side answer length limit")
    parser.add_argument("--temperature", type=float, default=0.7, help="side-by-side sampling temperature")
    parser.add_argument("--device", default=None, help="device for side-by-side models, e.g. cuda")
    return parser


def rationale_rules(text: str) -> tuple[str, ...]:
    rules = tuple(part.strip() for part in text.split(",") if part.strip())
    if rules in ((), ("none",)):
        return ()
    unknown = [r for r in rules if r not in ("strong", "both_bad")]
    if unknown:
        raise AlignError(f"--rationale: unknown rule(s) {', '.join(unknown)}; use strong, both_bad or none")
    return rules


def main(argv: list[str]) -> None:
    if "--simulate" in argv:  # a different mode: a named judge labels the queue (align.simulate)
        return simulate(argv)
    args = label_parser().parse_args(argv)
    from labeling.app import build_app, launch_app  # deferred: gradio takes seconds to import

    responders = None
    if args.compare:
        from labeling.compare import TransformersResponder  # deferred: loads transformers

        names = args.compare_names or args.compare
        responders = [TransformersResponder(spec, name=name, device=args.device)
                      for spec, name in zip(args.compare, names)]
    demo = build_app(
        args.db, guidelines_version=args.guidelines, lease_seconds=args.lease_seconds,
        rationale_required=rationale_rules(args.rationale), responders=responders,
        sampling=SamplingSettings(temperature=args.temperature, max_new_tokens=args.max_new_tokens),
    )
    print(f"labeling app on http://{args.host}:{args.port} (store {demo.labeling.store.url}); Ctrl-C stops it",
          flush=True)
    launch_app(demo, host=args.host, port=args.port, quiet=True)
    return None


def simulate(argv: list[str]) -> None:
    """`align label --simulate gold ...`: simulated annotators vote on the open pairs (align.simulate)."""
    parser = ArgumentParser(prog="align label --simulate", description="Simulated annotators vote on pairs.")
    parser.add_argument("--simulate", required=True, choices=["gold"], help="The judge: gold (the tasks' gold scorers).")
    parser.add_argument("--db", default=DEFAULT_DB)
    parser.add_argument("--annotators", type=int, default=3, help="Independent simulated annotators per pair.")
    parser.add_argument("--judge_temperature", type=float, default=0.1, help="Noise: higher means more random votes.")
    parser.add_argument("--tie_threshold", type=float, default=0.05)
    parser.add_argument("--both_bad_threshold", type=float, default=0.2)
    parser.add_argument("--position_bias", type=float, default=0.0, help="Logit toward the left-shown response.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    judge = GoldJudge(args.simulate, args.judge_temperature, args.tie_threshold, args.both_bad_threshold, args.position_bias)
    with st.connect(args.db) as store:
        counts = simulated_votes(store, judge, args.annotators, args.seed)
    print(f"sim:{judge.name}: {counts['votes']} votes on {counts['pairs']} pairs"
          + (f"; {counts['skipped_no_gold']} pairs skipped: their prompts have no gold check" if counts["skipped_no_gold"] else ""))
