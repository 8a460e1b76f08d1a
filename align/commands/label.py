"""`align label`: the pairwise labeling app (login required), or simulated annotators with `--simulate JUDGE`.

    align label --db runs/store.db --host 127.0.0.1 --port 7860
    align label --db runs/store.db --compare runs/v1 runs/v2      # adds the live side-by-side tab
    align label --simulate gold --db runs/store.db                 # a simulated judge instead (align.simulate)
"""

from __future__ import annotations

import signal

from align import store as st
from align.commands.parser import DEFAULT_DB, ArgumentParser
from align.errors import AlignError
from align.generation import SamplingSettings
from align.judges import GoldJudge
from align.simulate import simulate as simulated_votes
from align.store.leases import set_assignment_mode
from align.store.rankings import set_ranking_k


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
    add_server_arguments(parser)
    return parser


def add_server_arguments(parser: ArgumentParser) -> None:
    """Serving options: processes, nginx, logins, limits (labeling.server, labeling.workers)."""
    parser.add_argument("--workers", type=int, default=1,
                        help="app processes on one store (ports PORT.. or, with --nginx, PORT+1..); default 1")
    parser.add_argument("--nginx", action="store_true",
                        help="run nginx (Debian's package) on PORT in front of the workers; "
                        "config: labeling/deploy/nginx.conf")
    parser.add_argument("--session_hours", type=float, default=12.0, help="a login lasts this long (default 12)")
    parser.add_argument("--max_text_bytes", type=int, default=4096,
                        help="longest rationale or flag note accepted, in bytes (default 4096)")
    parser.add_argument("--assignment_mode", choices=("breadth_first", "depth_first"), default=None,
                        help="queue order for the whole project, stored in the store: breadth_first (every pair "
                        "its first vote first) or depth_first (complete pairs one after another); default: as set")
    parser.add_argument("--ranking_k", type=int, default=None,
                        help="K-way ranking for the whole project, stored in the store: 3 to 5 responses per ranking "
                        "(a Rank tab beside Annotate), 0: pairwise only (the default); default: as set")
    parser.add_argument("--jobs", choices=("on", "off"), default="on",
                        help="run the generation jobs reviewers queue in the Candidates tab in a background thread of "
                        "each app process (a job runs in exactly one); off: another `align label` on the store runs "
                        "them (default on)")
    parser.add_argument("--trusted_proxy", action="append", default=None,
                        help="address whose X-Real-IP header is believed (default: 127.0.0.1 and ::1)")


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
    from labeling.server import ServerSettings  # deferred: fastapi and gradio take seconds to import
    from labeling.workers import Workers, WorkerSpec, serve_worker  # deferred: gradio, as labeling.server

    if args.assignment_mode:
        with st.connect(args.db) as store:
            set_assignment_mode(store, args.assignment_mode)
    if args.ranking_k is not None:
        with st.connect(args.db) as store:
            set_ranking_k(store, args.ranking_k)
    settings = ServerSettings(session_hours=args.session_hours,
                              trusted_proxies=tuple(args.trusted_proxy or ("127.0.0.1", "::1")))
    spec = WorkerSpec(
        args.db,
        build={"guidelines_version": args.guidelines, "lease_seconds": args.lease_seconds,
               "rationale_required": rationale_rules(args.rationale), "max_text_bytes": args.max_text_bytes,
               "job_worker": args.jobs == "on",
               "sampling": SamplingSettings(temperature=args.temperature, max_new_tokens=args.max_new_tokens)},
        settings=settings,
        compare=tuple(zip(args.compare, args.compare_names or args.compare)) if args.compare else None,
        device=args.device,
    )
    if args.workers == 1 and not args.nginx:
        print(f"labeling app on http://{args.host}:{args.port}; Ctrl-C stops it", flush=True)
        serve_worker(spec, args.host, args.port)
        return None

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # `kill` stops the workers and nginx too, as Ctrl-C does
    workers = Workers(spec, args.workers, args.port, args.host, nginx=args.nginx)
    print(f"labeling app on {workers.url} ({args.workers} processes on ports "
          f"{', '.join(map(str, workers.ports))}{', nginx in front' if args.nginx else ''}); Ctrl-C stops it",
          flush=True)
    try:
        workers.wait()
    finally:
        workers.stop()
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
