"""`align sft --config FILE [--key value ...]`: the typed configs of align.config, then align.trainers.sft."""

from __future__ import annotations

from align.config import SFT_CONFIG, parse_config
from align.runs import print_run_summary
from align.trainers.sft import train_sft


def main(argv: list[str]) -> None:
    print_run_summary(train_sft(*parse_config(SFT_CONFIG, argv, prog="align sft")))
