"""`align eval`: compare model versions on a prompt set; write OUT/report.html (self-contained), report.json and
summary.md.

    align eval --models smollm2-135m-instruct,runs/v1-sft --prompts tasks:eval --per_family 5 \\
        --judge gold --db runs/store.db --out runs/eval
"""

from __future__ import annotations

from align import store as st
from align.commands.parser import DEFAULT_DB, ArgumentParser, comma_list
from align.data import read_jsonl
from align.errors import AlignError
from align.generation import SamplingSettings
from align.prompts import resolve_prompts
from align.report import write_report
from align.report.compare import EvalSpec, run_eval
from align.runs import command_line


def parse_judge(value: str, reward_model: str | None) -> tuple[list[str], str | None]:
    """gold | reward:PATH | both (with --reward_model PATH, or both:PATH) -> (judges, reward model path)."""
    kind, _, path = value.partition(":")
    path = path or reward_model
    if value == "gold":
        return ["gold"], None
    if kind == "reward":
        if not path:
            raise AlignError("--judge reward needs a reward-model run directory: --judge reward:RUN_DIR")
        return ["reward"], path
    if kind == "both":
        if not path:
            raise AlignError("--judge both needs a reward-model run directory: --judge both:RUN_DIR "
                             "(or --reward_model RUN_DIR)")
        return ["gold", "reward"], path
    raise AlignError(f"unknown --judge {value!r}; use gold, reward:RUN_DIR or both:RUN_DIR")


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="align eval", description="Compare model versions on a prompt set and "
                                     "write a self-contained HTML report (plus JSON and a Markdown summary).")
    parser.add_argument("--models", required=True, type=comma_list,
                        help="Comma-separated model specs or stored version names (aliases, paths, run dirs).")
    parser.add_argument("--prompts", default="tasks:eval",
                        help="A JSONL of prompts, or tasks:eval / tasks:train (the shipped task suite).")
    parser.add_argument("--per_family", type=int, default=None, help="Keep the first N prompts of each task family.")
    parser.add_argument("--limit", type=int, default=None, help="Keep only the first N prompts (after --per_family).")
    parser.add_argument("--judge", default="gold", help="gold | reward:RUN_DIR | both (with --reward_model).")
    parser.add_argument("--reward_model", default=None, help="Reward-model run directory for --judge both.")
    parser.add_argument("--reference", default=None, help="KL reference (spec or version); default: the first model.")
    parser.add_argument("--heldout_pairs", default=None,
                        help="Preference JSONL (prompt/chosen/rejected) for reward-model accuracy; default: the "
                             "store's human-labelled pairs.")
    parser.add_argument("--db", default=DEFAULT_DB, help="Store URL (samples are stored there).")
    parser.add_argument("--out", required=True, help="Output directory.")
    parser.add_argument("--n", type=int, default=1, help="Samples per prompt and version.")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true", help="Greedy decoding (temperature 0).")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=16, help="Sequences sampled at once; 0: from memory.")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="hf: transformers' batched generate; "
                        "vllm: vLLM (the 'vllm' extra, CUDA only).")
    parser.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples for the intervals.")
    parser.add_argument("--side_by_side", type=int, default=8, help="Prompts shown side by side.")
    parser.add_argument("--no_clusters", action="store_true", help="Skip the embedding clusters of failures.")
    parser.add_argument("--credit_pairs", type=int, default=3,
                        help="Labelled pairs whose tokens are coloured by credit (log-ratio to the parent; reward "
                             "change when dropped); 0: off.")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise AlignError("--n must be at least 1")
    judges, reward_model = parse_judge(args.judge, args.reward_model)
    models = args.models or []
    rows = resolve_prompts(args.prompts, args.per_family, args.limit)
    heldout = None
    if args.heldout_pairs:
        heldout = read_jsonl(args.heldout_pairs, required=("prompt", "chosen", "rejected"))
    settings = SamplingSettings(0.0 if args.greedy else args.temperature, 1.0, 0, args.max_new_tokens, args.seed)
    spec = EvalSpec(models=models, prompt_rows=rows, judges=judges, reward_model=reward_model, settings=settings,
                    n=args.n, reference=args.reference, heldout_pairs=heldout, batch_size=args.batch_size,
                    n_boot=args.bootstrap, side_by_side=args.side_by_side, prompt_source=args.prompts, seed=args.seed,
                    credit_pairs=args.credit_pairs, engine=args.engine)
    with st.connect(args.db) as store:
        report = run_eval(store, spec, embed=None if args.no_clusters else "minilm")
    report.update(title=f"align eval: {len(models)} version(s) on {args.prompts}", command=command_line())
    path = write_report(report, args.out)
    print(f"wrote {path} (+ report.json, summary.md)")
    for judge, section in report.get("win_rates", {}).items():
        for p in section["pairs"]:
            if section["versions"].index(p["a"]) < section["versions"].index(p["b"]):
                print(f"  [{judge}] {p['a']} vs {p['b']}: win rate {p['win_rate']:.3f} "
                      f"[{p['low']:.3f}, {p['high']:.3f}] on {p['n']} prompts")
