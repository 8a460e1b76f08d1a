"""`align label` (the labeling app) and `align users` (its logins).

    align users add alice --role annotator --db runs/store.db     # password prompted, or read from stdin
    align users list --db runs/store.db
    align label --db runs/store.db --host 127.0.0.1 --port 7860
    align label --db runs/store.db --compare runs/v1 runs/v2      # adds the live side-by-side tab
    align label --simulate JUDGE ...                               # a simulated judge instead (align.simulate)
"""

from __future__ import annotations

import argparse
import getpass
import sys

from align.errors import AlignError

DEFAULT_DB = "sqlite:///runs/store.db"  # the same default as align generate / export


class Parser(argparse.ArgumentParser):
    """argparse that raises AlignError (one line, exit 2 through the CLI) instead of exiting itself."""

    def error(self, message: str) -> None:
        raise AlignError(f"{self.prog}: {message}")


def label_parser() -> Parser:
    parser = Parser(prog="align label", description="Run the pairwise labeling app (login required).")
    parser.add_argument("--db", default=DEFAULT_DB, help="store: a SQLite path or a postgresql:// URL")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--guidelines", default=None, help="guidelines version (labeling/guidelines/vN.md); "
                        "default: the newest")
    parser.add_argument("--lease-seconds", type=int, default=600, help="how long a pair stays reserved")
    parser.add_argument("--rationale", default="strong,both_bad",
                        help="when a rationale is required, comma-separated: strong (a much-better vote), both_bad; "
                        "or none (default: strong,both_bad)")
    parser.add_argument("--compare", nargs=2, metavar=("MODEL_A", "MODEL_B"),
                        help="two model specs (or run directories) for the live side-by-side tab")
    parser.add_argument("--compare-names", nargs=2, metavar=("NAME_A", "NAME_B"),
                        help="model version names to store the side-by-side answers under (default: the specs)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="side-by-side answer length limit")
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


def cmd_label(argv: list[str]) -> None:
    if "--simulate" in argv:  # a different mode: a named judge labels the queue (align.simulate)
        from align.simulate import main as simulate_main

        return simulate_main(argv)
    args = label_parser().parse_args(argv)
    from align.generation import SamplingSettings
    from labeling.app import build_app, launch_app

    responders = None
    if args.compare:
        from labeling.compare import TransformersResponder

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


def users_parser() -> Parser:
    parser = Parser(prog="align users", description="Manage logins of the labeling app.")
    commands = parser.add_subparsers(dest="action", required=True, parser_class=Parser)
    add = commands.add_parser("add", help="add a user; the password is prompted (or read from stdin)")
    add.add_argument("name")
    add.add_argument("--role", choices=("annotator", "reviewer", "admin"), default="annotator")
    add.add_argument("--db", default=DEFAULT_DB)
    listing = commands.add_parser("list", help="list users and roles")
    listing.add_argument("--db", default=DEFAULT_DB)
    return parser


def read_password(name: str) -> str:
    """From a prompt on a terminal (asked twice), else the first line of stdin (scripts, CI)."""
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            raise AlignError("the passwords differ; nothing was changed")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise AlignError(f"empty password for {name!r}; give one on the prompt or on stdin")
    return password


def cmd_users(argv: list[str]) -> None:
    args = users_parser().parse_args(argv)
    from sqlalchemy import select

    from align.store import User, add_user, connect

    with connect(args.db) as store:
        if args.action == "add":
            add_user(store, args.name, read_password(args.name), role=args.role)
            print(f"added {args.role} {args.name!r} to {store.url}")
        else:
            with store.read() as session:
                users = session.execute(select(User.name, User.role).order_by(User.name)).all()
            for name, role in users:
                print(f"{name}\t{role}")
            if not users:
                print(f"no users in {store.url}; add one with: align users add NAME --role admin --db ...")
