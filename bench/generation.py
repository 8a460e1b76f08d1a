"""Benchmark: `align generate`'s batched sampling against a naive per-prompt HF generate loop (issue #8).

    python bench/generation.py                      # the embedded SmolLM2-135M-Instruct, on a GPU if there is one
    python bench/generation.py --threads 2          # CPU: read the ratio, not the target
    python bench/generation.py --model tiny         # a random 2-layer model: plumbing only (the test runs it)

Each side produces the same provenance for every prompt of the task suite: n sampled responses, their token ids and
per-token log-probs from a teacher-forced pass.
- `naive`: one `model.generate` of n samples per prompt, then that prompt's teacher-forced pass;
- `ours`: `align.generation.sample_responses`, what `align generate` runs, batch_size sequences at a time;
- `ours+static`: the same with transformers' static KV cache (`cache="static"`).
Both sides seed each generate call from (seed, first prompt index) and stop at end of turn, so they draw from the
same distribution and count the tokens they actually generated. After a warm-up the sides run in turns, whole prompt
set by whole prompt set, for --rounds rounds, in rotating order. Exactness: every `ours` response is re-scored alone
(as `align rescore` does) and its stored log-probs must agree within 1e-4 (float32); the log-probs the sampler drew
from (generate's scores) are compared with the stored ones too. Figures and how to read them: bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("naive", "ours", "ours+static", "ours+vllm")
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}  # per token, nats: a re-score in another batch shape differs by this


# ---- the sides ----------------------------------------------------------------------------------------------------


def naive_side(model: Any, tokenizer: Any, prompts: list, n: int, settings: Any) -> list:
    """The plain HF way: one prompt at a time, n samples by num_return_sequences, then its teacher-forced pass."""
    import torch

    from align.data import prompt_ids
    from align.generation import Sample, _completion, _eos_ids, generate_kwargs, score_completions

    eos_ids, pad = _eos_ids(model, tokenizer), tokenizer.pad_token_id
    device = next(model.parameters()).device
    samples = []
    for i, messages in enumerate(prompts):
        ids = prompt_ids(tokenizer, messages)
        torch.manual_seed(settings.seed * 1_000_003 + i)  # sample_responses' seed for a chunk starting at prompt i
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids], device=device),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                 **generate_kwargs(settings, n, pad, eos_ids))
        cut = [_completion(row, eos_ids, pad) for row in out[:, len(ids):].tolist()]
        raw, sampled = score_completions(model, [ids] * n, [c for c, _ in cut], settings, pad)
        samples += [Sample(i, j, c, tokenizer.decode(c, skip_special_tokens=True), reason, q, r)
                    for j, ((c, reason), r, q) in enumerate(zip(cut, raw, sampled))]
    return samples


def our_side(model: Any, tokenizer: Any, prompts: list, n: int, settings: Any, batch_size: int,
             cache: str = "dynamic", engine: str = "hf") -> list:
    from align.generation import sample_responses

    return [s for batch in sample_responses(model, tokenizer, prompts, n, settings, batch_size, cache=cache,
                                            engine=engine) for s in batch]


# ---- checks -------------------------------------------------------------------------------------------------------


def rescore_gap(model: Any, tokenizer: Any, prompts: list, samples: list, settings: Any) -> float:
    """Largest |stored - recomputed| per-token log-prob (raw and sampling), each response re-scored on its own."""
    from align.data import prompt_ids
    from align.generation import score_completions

    worst = 0.0
    for s in samples:
        raw, sampled = score_completions(model, [prompt_ids(tokenizer, prompts[s.prompt_index])], [s.token_ids],
                                         settings, tokenizer.pad_token_id)
        worst = max([worst, *(abs(a - b) for a, b in zip(raw[0], s.token_logps)),
                     *(abs(a - b) for a, b in zip(sampled[0], s.sample_token_logps))])
    return worst


def sampler_gap(model: Any, tokenizer: Any, prompts: list, n: int, settings: Any, batch_size: int,
                cache: str) -> Optional[float]:
    """Largest |log-prob the sampler drew from - stored sampling log-prob| over the first batch: the left-padded,
    batched (and with a static cache, preallocated) decode samples from the distribution we store. None if greedy."""
    import torch

    if settings.temperature == 0:
        return None
    generate, scores = model.generate, []

    def with_scores(**kwargs):  # the very call sample_responses makes, asked for its processed scores too
        out = generate(**kwargs, output_scores=True, return_dict_in_generate=True)
        scores.append(out.scores)
        return out.sequences

    model.generate = with_scores  # an instance attribute: shadows the method until deleted
    try:
        samples = our_side(model, tokenizer, prompts[:max(1, batch_size // n)], n, settings, batch_size, cache)
    finally:
        del model.generate
    (steps,) = scores
    return max((abs(torch.log_softmax(steps[t][j].float(), -1)[token].item() - s.sample_token_logps[t])
                for j, s in enumerate(samples) for t, token in enumerate(s.token_ids)), default=0.0)


# ---- taking turns -------------------------------------------------------------------------------------------------


def measure(runs: dict[str, Callable[[list], list]], prompts: list, warm: list, rounds: int,
            cuda: bool) -> tuple[dict[str, list[float]], dict[str, list], dict[str, list[float]]]:
    """A warm-up call of every side on `warm`, then `rounds` rounds in which each side samples the whole prompt set
    once, the order rotating each round so that drift of the machine hits all sides alike."""
    import torch

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for run in runs.values():
        run(warm)
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}  # process CPU time: robust on a shared machine
    samples: dict[str, list] = {}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            samples[name] = runs[name](prompts)  # the same samples every round: every call is seeded
            sync()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        print(f"[generation] round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
              flush=True)
    return times, samples, cpu


def same_share(samples: list, reference: list) -> float:
    """The share of (prompt, sample) whose token ids equal the reference side's."""
    theirs = {(s.prompt_index, s.sample_index): s.token_ids for s in reference}
    return sum(theirs.get((s.prompt_index, s.sample_index)) == s.token_ids for s in samples) / len(samples)


def side_result(times: list[float], samples: list, naive: Optional[list], cpu: list[float]) -> dict:
    seconds = statistics.median(times)
    tokens = sum(len(s.token_ids) for s in samples)
    out = {"seconds": seconds, "seconds_all": times, "cpu_seconds": statistics.median(cpu), "cpu_seconds_all": cpu,
           "tokens_per_cpu_s": tokens / statistics.median(cpu), "responses": len(samples), "new_tokens": tokens,
           "responses_per_s": len(samples) / seconds, "tokens_per_s": tokens / seconds,
           "mean_length": tokens / len(samples),
           "stopped_share": sum(s.finish_reason == "stop" for s in samples) / len(samples)}
    if naive is not None:  # with batch_size == n each chunk is one prompt, seeded as naive's: the same samples
        out["same_samples_as_naive"] = same_share(samples, naive)
    return out


# ---- results ------------------------------------------------------------------------------------------------------


def fmt(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:,.0f}" if abs(value) >= 10**digits else f"{value:.{digits}g}"


def markdown(r: dict) -> str:
    sides, s = r["sides"], r["settings"]
    names = list(sides)
    ratio = lambda name, key: fmt(sides[name][key] / sides["naive"][key]) if "naive" in sides else ""  # noqa: E731
    rows = [(f"time for all {s['prompts']} prompts, median of {s['rounds']} (s)", lambda k: fmt(sides[k]["seconds"])),
            ("**responses/s**", lambda k: fmt(sides[k]["responses_per_s"])),
            ("**ratio to naive** (responses/s)", lambda k: f"**{ratio(k, 'responses_per_s')}**"),
            ("new tokens/s", lambda k: fmt(sides[k]["tokens_per_s"])),
            ("ratio to naive (new tokens/s)", lambda k: ratio(k, "tokens_per_s")),
            ("**ratio to naive (new tokens per CPU-second)**", lambda k: f"**{ratio(k, 'tokens_per_cpu_s')}**"),
            ("responses; new tokens", lambda k: f"{sides[k]['responses']}; {sides[k]['new_tokens']:,}"),
            ("mean response length (tokens)", lambda k: fmt(sides[k]["mean_length"])),
            ("ended at end of turn (%)", lambda k: fmt(100 * sides[k]["stopped_share"])),
            ("same samples as naive (%)", lambda k: fmt(sides[k].get("same_samples_as_naive") and
                                                         100 * sides[k]["same_samples_as_naive"]) if k != "naive"
             else "-"),
            ("same samples as ours (%)", lambda k: fmt(100 * sides[k]["same_samples_as_ours"])
             if "same_samples_as_ours" in sides[k] else "-")]
    lines = [f"| | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|",
             *(f"| {label} | {' | '.join(cell(k) for k in names)} |" for label, cell in rows), ""]
    for name, e in r["exactness"].items():
        lines.append(f"Exactness, {name}: **{'PASS' if e['pass'] else 'FAIL'}**: stored per-token log-probs against "
                     f"each response re-scored alone, max |Δ| = {e['rescore_max_abs']:.2e} nats; against the "
                     f"sampler's own scores (first batch), max |Δ| = {fmt(e['sampler_max_abs'])} "
                     f"(tolerance {e['tolerance']:g}).")
    if r["device"] == "cpu":
        lines += ["", "CPU run: the issue's target (≥5× naive) is about a GPU; read these as CPU figures only."]
    if r.get("caveat"):
        lines += ["", r["caveat"]]
    return "\n".join(lines)


def write_results(r: dict, results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"generation_{r['model_name']}_{r['device']}"
    stem.with_suffix(".json").write_text(json.dumps(r, indent=1, default=str))
    s = r["settings"]
    md = [f"# generation: {r['model_name']}, {r['device']}", "", f"`{r['command']}`", "",
          f"{r['date']}, {r['hardware']}; " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()
                                                          if k != "torch") + ".", "",
          markdown(r), "",
          f"{s['prompts']} prompts of the task suite (tasks:train, {s['per_family']} per family) × {s['n']} samples, "
          f"max_new_tokens {s['max_new_tokens']}, temperature {s['temperature']}, top_p {s['top_p']}, top_k "
          f"{s['top_k']}, seed {s['seed']}, {s['dtype']}; ours: batch_size {s['batch_size']} sequences "
          f"({s['per_batch']} prompts per generate call); one warm-up call per side, then {s['rounds']} rounds in "
          f"rotating order. Every side returns token ids and teacher-forced per-token log-probs (with_logps).", ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    return stem


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench/generation.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="A model spec, or `tiny` (the tests' random 2-layer model).")
    parser.add_argument("--prompts", type=int, default=28, help="Prompts from tasks:train, balanced over families.")
    parser.add_argument("--n", type=int, default=4, help="Samples per prompt.")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=16, help="Ours: sequences per generate call "
                        "(align generate's default); 0: from memory (align.generation.generation_batch_size).")
    parser.add_argument("--rounds", type=int, default=3, help="Timed passes over the prompt set per side.")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sides", default="naive,ours,ours+static", help=f"Comma-separated, from {', '.join(SIDES)}.")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU that has it, else float32.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine).")
    parser.add_argument("--results_dir", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or set(sides) - set(SIDES):
        parser.error(f"--sides: choose from {', '.join(SIDES)}")
    if min(args.prompts, args.n, args.max_new_tokens, args.rounds) < 1 or args.batch_size < 0:
        parser.error("--prompts, --n, --max_new_tokens and --rounds must be >= 1, --batch_size >= 0")
    for name, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("TQDM_DISABLE", "1")):
        os.environ.setdefault(name, value)
    import torch
    import transformers

    from align.prompts import resolve_prompts
    from align.config import ModelArgs
    from align.data import as_messages
    from align.generation import SamplingSettings
    from align.models import load_model, save_tiny_model

    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    from iw_reuse import hardware  # noqa: E402 - the sibling benchmark's hardware line

    torch.set_num_threads(args.threads)
    hw = hardware()  # before the run: its load average is the machine's, not ours
    cuda = torch.cuda.is_available()
    device = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-") if cuda else "cpu"
    per_family = math.ceil(args.prompts / 7)  # the suite's 7 families
    rows = resolve_prompts("tasks:train", per_family=per_family, limit=args.prompts)
    prompts = [as_messages(row["prompt"]) for row in rows]
    settings = SamplingSettings(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    with contextlib.ExitStack() as stack:
        spec = args.model
        if spec == "tiny":
            spec = str(save_tiny_model(stack.enter_context(tempfile.TemporaryDirectory(prefix="generation-"))))
        print(f"[generation] loading {args.model} on {device} ...", flush=True)
        model, tokenizer = load_model(ModelArgs(model=spec, dtype=args.dtype), device="cuda" if cuda else None)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    n, b = args.n, args.batch_size
    if b == 0:
        from align.data import prompt_ids
        from align.generation import generation_batch_size

        longest = max(len(prompt_ids(tokenizer, p)) for p in prompts)
        b = generation_batch_size(model, longest, args.max_new_tokens, n)
        print(f"[generation] batch from memory: {b} sequences per generate call", flush=True)
    runs = {"naive": lambda p: naive_side(model, tokenizer, p, n, settings),
            "ours": lambda p: our_side(model, tokenizer, p, n, settings, b),
            "ours+static": lambda p: our_side(model, tokenizer, p, n, settings, b, cache="static"),
            "ours+vllm": lambda p: our_side(model, tokenizer, p, n, settings, b, engine="vllm")}
    runs = {name: runs[name] for name in sides}
    print(f"[generation] {len(prompts)} prompts × {n} samples, {', '.join(runs)} in turns, {args.rounds} rounds ...",
          flush=True)
    # The warm-up: one small call per side (at most 16 sequences), not a whole batch from memory, which can be the
    # whole prompt set and would double the run for nothing measured.
    times, samples, cpu = measure(runs, prompts, prompts[:max(1, min(b, 16) // n)], args.rounds, cuda)
    tolerance = TOLERANCE.get(dtype, TOLERANCE["bfloat16"])
    exactness = {}
    for name in (k for k in runs if k != "naive"):
        cache = "static" if name.endswith("static") else "dynamic"
        gap = rescore_gap(model, tokenizer, prompts, samples[name], settings)
        drawn = None if name == "ours+vllm" else sampler_gap(model, tokenizer, prompts, n, settings, b, cache)
        exactness[name] = {"rescore_max_abs": gap, "sampler_max_abs": drawn, "tolerance": tolerance,
                           "pass": gap < tolerance and (drawn is None or drawn < tolerance)}
    naive = samples.get("naive")
    r = {"model": args.model, "model_name": re.sub(r"[^A-Za-z0-9.-]+", "-", Path(args.model).name), "device": device,
         "command": "python bench/generation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
         "date": dt.datetime.now().isoformat(timespec="seconds"), "hardware": hw,
         "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
         "settings": {"prompts": len(prompts), "per_family": per_family, "n": n, "max_new_tokens": args.max_new_tokens,
                      "batch_size": b, "per_batch": max(1, b // n), "rounds": args.rounds, "threads": args.threads,
                      "dtype": dtype, **settings.as_dict()},
         "sides": {name: side_result(times[name], samples[name], None if name == "naive" else naive, cpu[name])
                   for name in runs},
         "exactness": exactness,
         "caveat": "PLUMBING CHECK ONLY: a tiny random model's speeds say nothing about a real one."
         if args.model == "tiny" else None}
    if "ours" in samples and "ours+static" in samples:  # the same seeds and batches: only the cache differs
        r["sides"]["ours+static"]["same_samples_as_ours"] = same_share(samples["ours+static"], samples["ours"])
    if naive is not None:
        r["ratios"] = {name: r["sides"][name]["responses_per_s"] / r["sides"]["naive"]["responses_per_s"]
                       for name in runs if name != "naive"}
        r["ratio"] = r["ratios"].get("ours")
    stem = write_results(r, Path(args.results_dir))
    print(markdown(r))
    print(f"\nwrote {stem}.json and .md", flush=True)
    return r


if __name__ == "__main__":
    main()
