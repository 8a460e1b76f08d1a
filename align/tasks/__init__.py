"""Task suite with gold checks: prompt families whose answers a program can score.

    from align.tasks import FAMILIES, build_suite, score_response
    train, evaluation = build_suite(seed=0)
    score_response(train[0]["family"], "85", train[0]["gold"])  # a float in [0, 1]

Standard library only (no torch), so scoring is cheap to import anywhere.
"""

from align.tasks.families import FAMILIES, Family
from align.tasks.suite import (
    build_suite,
    load_tasks,
    main,
    reference_messages,
    score_response,
    sft_rows,
    write_jsonl,
    write_suite,
)

__all__ = [
    "FAMILIES",
    "Family",
    "build_suite",
    "load_tasks",
    "main",
    "reference_messages",
    "score_response",
    "sft_rows",
    "write_jsonl",
    "write_suite",
]
