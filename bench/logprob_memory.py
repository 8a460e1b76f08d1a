"""Benchmark: peak memory (RSS, CPU) of a DPO policy step with and without full-vocabulary logits (issue #19).

    python bench/logprob_memory.py                       # Qwen2.5-0.5B shape with 2 layers, 2 pairs x 534 tokens
    python bench/logprob_memory.py --pairs 8             # the issue's size (about 16 GB before; mind the machine)

Each setting runs in a fresh subprocess, which builds the shape with random weights (vocabulary 151,936, tied
embeddings, LoRA r 16 on all linear layers), then times one DPO policy step: `completion_logps` forward over the 2B
rows (prompt + chosen, prompt + rejected), the sigmoid loss against fixed reference log-probs, backward. The
subprocess reports its peak resident set (ru_maxrss) after the step and before it (the model, built), so the step's
own peak is the difference. Settings:
- `full`: the full-logits path (`scored_logits` + `token_logps`: logits from the first scored position, float32);
- `chunked`: `align.logprobs.score_tokens`' chunked path, the default (no (B, T, V) tensor).
Both must give the same summed log-probs and LoRA gradients (max relative difference printed).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("full", "chunked")


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(setting: str, pairs: int, length: int, layers: int, vocab: int, threads: int, seed: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import align.logprobs as lp
    from align.config import LoraArgs
    from align.models import apply_lora
    from align.preference import completion_logps

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=896, num_hidden_layers=layers, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=vocab, tie_word_embeddings=True)
    model = apply_lora(Qwen2ForCausalLM(config), LoraArgs(lora_r=16, lora_alpha=32, lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)  # a trained adapter: gradients reach every LoRA matrix
    g = torch.Generator().manual_seed(seed)
    prompt = length // 2
    ids = torch.randint(0, vocab, (2 * pairs, length), generator=g)
    ids[pairs:, :prompt] = ids[:pairs, :prompt]  # chosen and rejected share the prompt
    labels = ids.clone()
    labels[:, :prompt] = lp.IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    before = rss_mib()
    start = time.perf_counter()
    if setting == "full":
        original = lp.plain_head
        lp.plain_head = lambda model: None  # noqa: E731 - the full-logits path
    out = completion_logps(model, batch)
    loss = -torch.nn.functional.logsigmoid(0.1 * (out["chosen_logps"] - out["rejected_logps"])).mean()
    loss.backward()
    seconds = time.perf_counter() - start
    if setting == "full":
        lp.plain_head = original
    grads = {n: p.grad.double().norm().item() for n, p in model.named_parameters() if p.grad is not None}
    return {"setting": setting, "before_mib": before, "peak_mib": rss_mib(), "seconds": seconds,
            "chosen_logps": out["chosen_logps"].tolist(), "grad_norms": grads}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--length", type=int, default=534, help="Tokens per sequence (half prompt, half completion).")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.pairs, args.length, args.layers, args.vocab, args.threads, args.seed)
    if args.child:
        print(json.dumps(child(args.child, *shape)))
        return {}
    results = {}
    for setting in SETTINGS:
        command = [sys.executable, __file__, "--child", setting, *[t for k, v in zip(
            ("--pairs", "--length", "--layers", "--vocab", "--threads", "--seed"), shape) for t in (k, str(v))]]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True)
        results[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    full, chunked = results["full"], results["chunked"]
    logp_rel = max(abs(a - b) / abs(a) for a, b in zip(full["chosen_logps"], chunked["chosen_logps"]))
    grad_rel = max(abs(full["grad_norms"][k] - chunked["grad_norms"][k]) / full["grad_norms"][k]
                   for k in full["grad_norms"])
    print(f"DPO policy step, Qwen2.5-0.5B shape with {args.layers} layers, vocabulary {args.vocab:,}, "
          f"{args.pairs} pairs x {args.length} tokens, LoRA r 16, fp32, {args.threads} thread(s)")
    print(f"{'setting':<9}{'peak RSS (MiB)':>16}{'step peak (MiB)':>17}{'step (s)':>10}")
    for r in (full, chunked):
        print(f"{r['setting']:<9}{r['peak_mib']:>16,.0f}{r['peak_mib'] - r['before_mib']:>17,.0f}{r['seconds']:>10.2f}")
    print(f"chunked/full: peak {chunked['peak_mib'] / full['peak_mib']:.3f}, step peak "
          f"{(chunked['peak_mib'] - chunked['before_mib']) / (full['peak_mib'] - full['before_mib']):.3f}; "
          f"max rel. difference: summed log-probs {logp_rel:.1e}, LoRA gradient norms {grad_rel:.1e}")
    return {"results": results, "logp_rel": logp_rel, "grad_rel": grad_rel}


if __name__ == "__main__":
    main()
