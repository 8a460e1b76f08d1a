"""`align generate`: sample responses with provenance into the store (resumable), then make pairs of them.

    align generate --model SPEC_OR_VERSION --prompts FILE --n 4 --temperature 1.0 --max_new_tokens 64 --seed 0 --db URL
"""

from __future__ import annotations

from align import store as st
from align.commands.parser import DEFAULT_DB, ArgumentParser
from align.errors import AlignError
from align.generation import SamplingSettings
from align.prompts import resolve_prompts
from align.sampling import generate_to_store


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="align generate", description="Sample responses with provenance into the store.")
    parser.add_argument("--model", required=True, help="Model spec (alias, path, run dir, hub id) or a stored version name.")
    parser.add_argument("--prompts", required=True, help="JSONL of prompts (task rows, {'prompt': ...} or "
                        "{'messages': [...]}), or tasks:train / tasks:eval (the shipped task suite).")
    parser.add_argument("--db", default=DEFAULT_DB, help="Store URL: sqlite:///path.db or postgresql://...")
    parser.add_argument("--n", type=int, default=4, help="Samples per prompt.")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0, help="< 1 truncates sampling (bad for importance weights).")
    parser.add_argument("--top_k", type=int, default=0, help="> 0 truncates sampling (bad for importance weights).")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=16, help="Sequences sampled at once; 0: from memory.")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="hf: transformers' batched generate; "
                        "vllm: vLLM (the 'vllm' extra, CUDA only), log-probs re-scored teacher-forced.")
    parser.add_argument("--per_family", type=int, default=None,
                        help="Use only the first N prompts of each task family (a balanced subset of a task file).")
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N prompts (after --per_family).")
    parser.add_argument("--pairs", default="random_iid", help="Pairing rule (random_iid, all_pairs) or none.")
    parser.add_argument("--votes_required", type=int, default=3, help="Votes each new pair needs.")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise AlignError("--n must be at least 1")
    settings = SamplingSettings(args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.seed)
    rows = resolve_prompts(args.prompts, args.per_family, args.limit)
    with st.connect(args.db) as store:
        summary = generate_to_store(store, args.model, rows, args.n, settings, args.batch_size,
                                    None if args.pairs == "none" else args.pairs, args.votes_required,
                                    engine=args.engine)
    print(f"{summary['version']}: {summary['generated']} responses generated, {summary['skipped']} already stored, "
          f"{summary['prompts']} prompts, {summary['pairs']} pairs")
