"""`align reward --config FILE [--key value ...]`: the typed configs of align.config, then align.trainers.reward."""

from __future__ import annotations

from align.config import REWARD_CONFIG, parse_config
from align.runs import print_run_summary
from align.trainers.reward import train_reward


def main(argv: list[str]) -> None:
    print_run_summary(train_reward(*parse_config(REWARD_CONFIG, argv, prog="align reward")))
