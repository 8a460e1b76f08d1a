"""`align dpo --config FILE [--key value ...]`: the typed configs of align.config, then align.trainers.dpo."""

from __future__ import annotations

from align.config import DPO_CONFIG, parse_config
from align.runs import print_run_summary
from align.trainers.dpo import train_dpo


def main(argv: list[str]) -> None:
    print_run_summary(train_dpo(*parse_config(DPO_CONFIG, argv, prog="align dpo")))
