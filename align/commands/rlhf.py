"""`align rlhf --config FILE [--key value ...]`: the typed configs of align.config, then align.trainers.rlhf."""

from __future__ import annotations

from align.config import RLHF_CONFIG, parse_config
from align.runs import print_run_summary
from align.trainers.rlhf import train_rlhf


def main(argv: list[str]) -> None:
    print_run_summary(train_rlhf(*parse_config(RLHF_CONFIG, argv, prog="align rlhf")))
