"""The task suite: build it from the families, store it as JSONL, load it back, score responses against it.

A task row is {"id": "<family>-<index>", "family", "prompt", "gold", "split": "train" | "eval"}.
`python -m align.tasks build --out data` rewrites data/tasks/{train,eval}.jsonl and the SFT set built from
the reference answers, data/sft/{train,eval}.jsonl.
"""

import argparse
import random
import sys
from pathlib import Path

from align.data import iter_jsonl, write_jsonl
from align.errors import AlignError, DataError
from align.tasks.families import FAMILIES

REQUIRED_KEYS = ("id", "family", "prompt", "gold", "split")
SPLITS = ("train", "eval")


def get_family(name: str):
    if name not in FAMILIES:
        raise DataError(f"unknown task family {name!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def score_response(family: str, response: str, gold: dict) -> float:
    """The gold score of `response` in [0, 1]; empty or whitespace-only responses score 0."""
    scorer = get_family(family).score
    if not response or not response.strip():
        return 0.0
    try:
        score = scorer(response, gold)
    except KeyError as err:
        raise DataError(f"gold for task family {family!r} lacks the key {err.args[0]!r}") from None
    return min(1.0, max(0.0, float(score)))


def _generate_unique(name: str, rng: random.Random, n: int, seen: set[str]) -> list[dict]:
    """`n` tasks of one family whose prompts are not in `seen` (which is updated)."""
    generate, tasks = FAMILIES[name].generate, []
    # Generous, but bounded: a family whose template space is smaller than n must fail loudly, not spin.
    for _ in range(100 * n + 1000):
        if len(tasks) == n:
            return tasks
        task = generate(rng)
        if task["prompt"] not in seen:
            seen.add(task["prompt"])
            tasks.append(task)
    if len(tasks) == n:
        return tasks
    raise DataError(f"task family {name!r} produced only {len(tasks)} distinct prompts, fewer than {n}; "
                    "lower n_per_family")


def build_suite(seed: int = 0, n_per_family: int = 100, eval_fraction: float = 0.2) -> tuple[list[dict], list[dict]]:
    """(train, eval) task rows: `n_per_family` distinct prompts per family, the last `eval_fraction` held out.

    Each family draws from its own rng seeded by (seed, family name), so adding a family leaves the others'
    tasks unchanged. Prompts are unique across the whole suite, which makes train and eval disjoint.
    """
    if n_per_family < 1:
        raise DataError(f"n_per_family must be at least 1, got {n_per_family}")
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = round(n_per_family * eval_fraction)
    width = max(4, len(str(n_per_family - 1)))
    train, evaluation, seen = [], [], set()
    for name in FAMILIES:
        rng = random.Random(f"{seed}:{name}")
        for index, task in enumerate(_generate_unique(name, rng, n_per_family, seen)):
            split = "eval" if index >= n_per_family - n_eval else "train"
            row = {"id": f"{name}-{index:0{width}d}", "family": name, "prompt": task["prompt"],
                   "gold": task["gold"], "split": split}
            (evaluation if split == "eval" else train).append(row)
    return train, evaluation


def load_tasks(path) -> list[dict]:
    """Task rows from a JSONL file; blank lines are skipped, anything malformed raises DataError with its line."""
    return [_check_row(row, f"{path}:{lineno}") for lineno, row in iter_jsonl(path)]


def _check_row(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a task row must be a JSON object, got {type(row).__name__}")
    for key in REQUIRED_KEYS:
        if key not in row:
            raise DataError(f"{where}: task row lacks the key {key!r}")
    if row["family"] not in FAMILIES:
        raise DataError(f"{where}: unknown task family {row['family']!r}; known families: {', '.join(FAMILIES)}")
    if not isinstance(row["gold"], dict):
        raise DataError(f"{where}: 'gold' must be a JSON object")
    if row["split"] not in SPLITS:
        raise DataError(f"{where}: 'split' must be one of {', '.join(SPLITS)}, got {row['split']!r}")
    return row


def reference_messages(row: dict) -> list[dict]:
    """The task as a two-turn chat whose assistant turn is the reference answer: one SFT example."""
    reference = get_family(row["family"]).reference(row["gold"])
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": reference}]


def sft_rows(tasks: list[dict]) -> list[dict]:
    return [{"messages": reference_messages(row), "family": row["family"], "id": row["id"]} for row in tasks]


def write_suite(out, seed: int = 0, n_per_family: int = 100, eval_fraction: float = 0.2) -> dict[str, int]:
    """(Re)write <out>/tasks/{train,eval}.jsonl and <out>/sft/{train,eval}.jsonl; returns rows per file."""
    out = Path(out)
    train, evaluation = build_suite(seed, n_per_family, eval_fraction)
    files = {
        out / "tasks" / "train.jsonl": train,
        out / "tasks" / "eval.jsonl": evaluation,
        out / "sft" / "train.jsonl": sft_rows(train),
        out / "sft" / "eval.jsonl": sft_rows(evaluation),
    }
    for path, rows in files.items():
        write_jsonl(rows, path, sort_keys=True)
    return {str(path): len(rows) for path, rows in files.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m align.tasks", description="Build the gold-checked task suite.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="write tasks/{train,eval}.jsonl and sft/{train,eval}.jsonl")
    build.add_argument("--out", default="data", help="data directory (default: data)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--n_per_family", "--n-per-family", type=int, default=100)
    build.add_argument("--eval_fraction", "--eval-fraction", type=float, default=0.2)
    args = parser.parse_args(argv)
    try:
        counts = write_suite(args.out, args.seed, args.n_per_family, args.eval_fraction)
    except AlignError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path, count in counts.items():
        print(f"{count:6d} rows  {path}")
    return 0
