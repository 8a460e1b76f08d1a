"""`align users`: add or list the logins of the labeling app.

    align users add alice --role annotator --db runs/store.db     # password prompted, or read from stdin
    align users list --db runs/store.db
"""

from __future__ import annotations

import getpass
import sys

from sqlalchemy import select

from align.commands.parser import DEFAULT_DB, ArgumentParser
from align.errors import AlignError
from align.store import User, add_user, connect


def users_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="align users", description="Manage logins of the labeling app.")
    commands = parser.add_subparsers(dest="action", required=True, parser_class=ArgumentParser)
    add = commands.add_parser("add", help="add a user; the password is prompted (or read from stdin)")
    add.add_argument("name")
    add.add_argument("--role", choices=("annotator", "reviewer", "admin"), default="annotator")
    add.add_argument("--min_password_length", type=int, default=10, help="refuse shorter passwords (default 10)")
    add.add_argument("--target", type=int, default=None, help="votes asked of this annotator (default: none)")
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


def main(argv: list[str]) -> None:
    args = users_parser().parse_args(argv)
    with connect(args.db) as store:
        if args.action == "add":
            add_user(store, args.name, read_password(args.name), role=args.role,
                     min_length=args.min_password_length, target=args.target)
            print(f"added {args.role} {args.name!r} to {store.url}")
        else:
            with store.read() as session:
                users = session.execute(select(User.name, User.role).order_by(User.name)).all()
            for name, role in users:
                print(f"{name}\t{role}")
            if not users:
                print(f"no users in {store.url}; add one with: align users add NAME --role admin --db ...")
