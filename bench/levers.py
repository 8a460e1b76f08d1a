"""Benchmark: a speed lever on and off, alternating in one process, on real prompts (issue #8, "measure each lever").

    python bench/levers.py                                   # the embedded SmolLM2-135M-Instruct, CPU
    python bench/levers.py --model runs/sft-try --batch 16   # any model spec

Lever `logits_to_keep` (align.logprobs.scored_logits): the LM head and the log-softmax over the vocabulary run only
from the first position a batch scores, not over the prompt. Two places use it, each timed on and off:
- `dpo_step`: a DPO policy forward + backward over prompt+chosen and prompt+rejected rows (completion_logps), LoRA;
- `gen_logps`: generation's teacher-forced log-prob pass (score_completions), no grad.
The data are task-suite prompts in the model's chat template with random completions of `--completion` tokens. Each
round times both settings in turn after one warm-up round; the median over rounds gives the ratio. The log-probs of
the two settings are compared too (they must agree to float round-off). Since issue #19 the DPO step's "on" is the
default chunked path (`align.logprobs.score_tokens`: the head over scored tokens only, no (B, T, V) logits), so
`dpo_step` compares today's default with the full-logits path over every position.

Lever `completion_tokens_only` (align.trainers.rlhf): TRL's fused LM head, which RLOO's and GRPO's log-prob passes
run, projects only the completion tokens on a CPU rather than every position. Timed as `rloo_logps`: one such pass,
forward + backward, over left-padded prompts + completions, labels on the completions only (as TRL sets them).

Lever `bf16_rollouts` (align.trainers.rlhf): RLOO's rollouts on a CPU under `mixed_precision: bf16`, sampled under
bf16 autocast with the frozen base weights cast once, against float32 sampling (what TRL's generate ran). Timed as
`rollouts`: `--batch` sampled completions of exactly `--completion` tokens at temperature 0.7. Its last column is
the largest difference of the first token's log-probs (bf16 against float32: not round-off, by design).

Lever: greedy answers keep the log-probs of the logits they were decoded from (align.generation `SamplerLogps`),
against a second, teacher-forced pass over them (before 2026-12-06). Timed as `greedy`: `sample_responses`, as
`align eval --greedy` runs it, `--batch` prompts in one call, up to `--completion` new tokens; the values compared
are every stored per-token log-prob (equal to float round-off).
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any


@contextmanager
def logits_lever(on: bool, model=None):
    import align.logprobs as lp

    original = lp.accepts_logits_to_keep, lp.plain_head
    if not on:  # off: logits over every position, and the full-logits path rather than the chunked one
        lp.accepts_logits_to_keep = lambda model: False
        lp.plain_head = lambda model: None
    try:
        yield
    finally:
        lp.accepts_logits_to_keep, lp.plain_head = original


@dataclass
class Batch:
    tokenizer: Any
    messages: list  # the prompts as chat messages
    prompts: list[list[int]]  # the same in the model's chat template, token ids
    completions: list[list[int]]  # random completions, `--completion` tokens each


def make_batch(tokenizer, batch: int, completion: int, seed: int) -> Batch:
    from align.prompts import resolve_prompts
    from align.data import as_messages, prompt_ids

    rng = random.Random(seed)
    by_family: dict[str, list[dict]] = {}
    for row in resolve_prompts("tasks:train", per_family=-(-batch // 7)):
        by_family.setdefault(row["family"], []).append(row)
    rows = [row for group in itertools.zip_longest(*by_family.values()) for row in group if row][:batch]
    messages = [as_messages(r["prompt"]) for r in rows]
    prompts = [prompt_ids(tokenizer, m) for m in messages]
    completions = [[rng.randrange(100, len(tokenizer) - 100) for _ in range(completion)] for _ in prompts]
    return Batch(tokenizer, messages, prompts, completions)


def dpo_step(model, batch: Batch) -> tuple[float, list[float]]:
    from align.preference import PreferenceCollator, completion_logps

    features = [{"index": i, "prompt_ids": p, "chosen_ids": c, "rejected_ids": c[::-1], "is_tie": False,
                 "soft_label": None} for i, (p, c) in enumerate(zip(batch.prompts, batch.completions))]
    collated = PreferenceCollator(pad_token_id=0)(features)
    started = time.perf_counter()
    out = completion_logps(model, collated)
    (out["chosen_logps"] - out["rejected_logps"]).sigmoid().log().mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started, out["chosen_logps"].tolist()


@contextmanager
def fused_head_lever(on: bool, model=None):
    from align.trainers.rlhf import completion_tokens_only

    with completion_tokens_only() if on else nullcontext():
        yield


@contextmanager
def greedy_lever(on: bool, model=None):
    import align.generation as generation

    original = generation.sampler_logps_usable
    if not on:  # off: greedy answers re-scored teacher-forced, as before
        generation.sampler_logps_usable = lambda settings: settings.temperature > 0 and original(settings)
    try:
        yield
    finally:
        generation.sampler_logps_usable = original


@contextmanager
def rollouts_lever(on: bool, model=None):
    from align.trainers.rlhf import bf16_rollouts

    with bf16_rollouts(model) if on else nullcontext():
        yield


def left_padded(prompts, completions=None):
    """(ids, attention mask, prompt width): prompts padded on the left with 0, each followed by its completion."""
    import torch

    width = max(map(len, prompts))
    rows = [p + c for p, c in zip(prompts, completions)] if completions is not None else prompts
    ids = torch.tensor([[0] * (width - len(p)) + r for p, r in zip(prompts, rows)])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(r) for p, r in zip(prompts, rows)])
    return ids, attention, width


def rollouts(model, batch: Batch) -> tuple[float, list[float]]:
    """Sampled completions of exactly `--completion` tokens; the values: the first token's log-probs, row 0."""
    import torch

    ids, attention, _ = left_padded(batch.prompts)
    new = len(batch.completions[0])
    torch.manual_seed(0)
    started = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=new, min_new_tokens=new,
                         do_sample=True, temperature=0.7, top_k=0, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True)
    seconds = time.perf_counter() - started
    return seconds, out.scores[0][0].float().log_softmax(-1).tolist()


def rloo_logps(model, batch: Batch) -> tuple[float, list[float]]:
    """TRL's fused-head pass as RLOO runs it (`fused_lm_head=True`), forward + backward."""
    ids, attention, width = left_padded(batch.prompts, batch.completions)
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :width] = -100
    started = time.perf_counter()
    out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    out.log_probs.sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started, out.log_probs.detach().sum(-1).tolist()


def gen_logps(model, batch: Batch) -> tuple[float, list[float]]:
    from align.generation import score_completions

    started = time.perf_counter()
    raw, _ = score_completions(model, batch.prompts, batch.completions)
    return time.perf_counter() - started, [sum(r) for r in raw]


def greedy(model, batch: Batch) -> tuple[float, list[float]]:
    """Greedy answers with their stored log-probs, all prompts in one generate() call; the values: every log-prob."""
    from align.generation import SamplingSettings, sample_responses

    settings = SamplingSettings(temperature=0.0, max_new_tokens=len(batch.completions[0]))
    started = time.perf_counter()
    samples = [s for part in sample_responses(model, batch.tokenizer, batch.messages, 1, settings,
                                              batch_size=len(batch.messages)) for s in part]
    return time.perf_counter() - started, [v for s in samples for v in s.token_logps]


# measure -> (what is timed, the lever it is timed on and off)
MEASURES = {"dpo_step": (dpo_step, logits_lever), "gen_logps": (gen_logps, logits_lever),
            "rloo_logps": (rloo_logps, fused_head_lever), "rollouts": (rollouts, rollouts_lever),
            "greedy": (greedy, greedy_lever)}


def main() -> None:
    import torch

    from trl.trainer.utils import add_fused_lm_head

    from align.config import LoraArgs, ModelArgs
    from align.models import apply_lora, load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8, help="Prompts per batch (DPO: pairs).")
    parser.add_argument("--completion", type=int, default=48, help="Completion tokens per row.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measures", default=",".join(MEASURES), help="Comma-separated, of: " + ", ".join(MEASURES))
    args = parser.parse_args()
    unknown = sorted(set(args.measures.split(",")) - set(MEASURES))
    if unknown:
        parser.error(f"--measures: unknown {', '.join(unknown)}; choose from {', '.join(MEASURES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(ModelArgs(model=args.model))
    model = apply_lora(model, LoraArgs(lora_dropout=0.0))
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy"))  # as RLOOTrainer does; other calls pass
    batch = make_batch(tokenizer, args.batch, args.completion, args.seed)
    lengths = [len(p) for p in batch.prompts]
    print(f"{args.model}: batch {args.batch}, prompts {min(lengths)}-{max(lengths)} tokens, completions "
          f"{args.completion} tokens, {args.rounds} rounds after 1 warm-up")
    print(f"{'measure':<10}{'lever on (s)':>14}{'off (s)':>10}{'off/on':>8}{'max |Δ logp|':>14}")
    for name in args.measures.split(","):
        fn, lever = MEASURES[name]
        training = name in ("dpo_step", "rloo_logps")  # forward + backward; the others sample or score
        times: dict[bool, list[float]] = {True: [], False: []}
        values = {}
        for round_ in range(args.rounds + 1):
            for on in (True, False) if round_ % 2 == 0 else (False, True):
                model.train(training)
                with lever(on, model), torch.set_grad_enabled(training):
                    seconds, values[on] = fn(model, batch)
                if round_:
                    times[on].append(seconds)
        on, off = statistics.median(times[True]), statistics.median(times[False])
        diff = max(abs(a - b) for a, b in zip(values[True], values[False]))
        print(f"{name:<10}{on:>14.4f}{off:>10.4f}{off / on:>7.2f}×{diff:>14.2e}")


if __name__ == "__main__":
    main()
