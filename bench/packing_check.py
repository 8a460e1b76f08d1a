"""Check: the padding-free path on this machine (issue #19), packed against padded, values, gradients and time.

    python bench/packing_check.py                         # GPU: the Qwen2.5-0.5B shape in bf16 (bench/gpu_check.sh)
    python bench/packing_check.py --shape tiny            # CPU: the tests' 2-layer model, float32, seconds

One LoRA model (random adapters, so gradients are not trivially zero) computes, padded and then packed:
- dpo: summed completion log-probs of chosen and rejected (`align.preference.completion_logps`; packed: one row,
  each prompt once, `align.packing.PackedPreferenceCollator`);
- sft: the mean token NLL of TRL's collator, padded and padding-free (one row with restarting position ids).
Each is a forward and backward of a weighted sum; it prints the largest relative difference of the values and of
the LoRA gradients (as ||g_packed - g_padded|| / ||g_padded|| over all adapters), the median time of each side and
the attention kernel the packed side ran: flash-attention's varlen kernel (CUDA, half precision, flash-attn
installed) or SDPA span by span. Exit status 1 when a difference exceeds the dtype's tolerance.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {"float32": (1e-4, 1e-3), "bfloat16": (2e-2, 5e-2), "float16": (1e-2, 5e-2)}  # (values, gradients)


def build_model(shape: str, dtype: str, device: str, seed: int) -> Any:
    import torch
    import transformers

    from align.config import LoraArgs
    from align.models import apply_lora, tiny_model

    if shape == "tiny":
        model = tiny_model(vocab_size=300, seed=seed)
    else:
        sys.path.insert(0, str(ROOT / "bench"))
        from throughput import SHAPES  # noqa: E402 - the benchmark's model shapes

        name, kwargs = SHAPES[shape]
        torch.manual_seed(seed)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(
                getattr(transformers, name)(**kwargs, tie_word_embeddings=True), attn_implementation="sdpa")
    model = apply_lora(model.to(device=device, dtype=getattr(torch, dtype)), LoraArgs(lora_r=16, lora_alpha=32))
    torch.manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    return model.train()


def features(n: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(1, vocab) for _ in range(k)]  # noqa: E731
    lo, hi = lengths
    out = []
    for i in range(n):
        prompt = rng.randint(max(1, lo // 4), max(1, hi // 4))
        out.append({"index": i, "prompt_ids": ids(prompt), "chosen_ids": ids(rng.randint(lo, hi) - prompt),
                    "rejected_ids": ids(rng.randint(lo, hi) - prompt), "is_tie": False, "soft_label": None,
                    "weight": 1.0})
    return out


def step(model: Any, batch: dict, fn: Callable) -> tuple[list, dict, float]:
    """fn's outputs, the LoRA gradients of their weighted sum, and the wall time of forward + backward."""
    import torch

    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    model.zero_grad(set_to_none=True)
    sync()
    start = time.perf_counter()
    out = fn(model, batch)
    sum((i + 1.0) * v.float().sum() for i, v in enumerate(out)).backward()
    sync()
    seconds = time.perf_counter() - start
    return ([v.detach().float() for v in out],
            {n: p.grad.detach().float() for n, p in model.named_parameters() if p.grad is not None}, seconds)


def compare(padded: tuple, packed: tuple) -> tuple[float, float]:
    import torch

    values = max(float(((b - a).abs() / a.abs().clamp_min(1e-6)).max()) for a, b in zip(padded[0], packed[0]))
    diff = torch.sqrt(sum(((packed[1][n] - g) ** 2).sum() for n, g in padded[1].items()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in padded[1].values()))
    return values, float(diff / norm.clamp_min(1e-12))


def kernel_name(model: Any, dtype: str) -> str:
    import torch

    from align import packing

    probe = torch.zeros(1, 1, 1, 8, dtype=getattr(torch, dtype), device=next(model.parameters()).device)
    return "flash-attention varlen" if packing.flash_varlen(probe) is not None else "SDPA span by span"


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench/packing_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default=None, help="qwen2.5-0.5b (default on CUDA), smollm2-135m or tiny.")
    parser.add_argument("--dtype", default=None, help="Default: bfloat16 on CUDA, float32 on CPU.")
    parser.add_argument("--pairs", type=int, default=8, help="Pairs (dpo) and rows (sft) per batch.")
    parser.add_argument("--lengths", default=None, help="MIN,MAX tokens per sequence (default 200,800; tiny 5,40).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats per side (the median is printed).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from align import packing
    from align.preference import PreferenceCollator, completion_logps

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shape = args.shape or ("qwen2.5-0.5b" if cuda else "tiny")
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    lengths = tuple(map(int, args.lengths.split(","))) if args.lengths else ((5, 40) if shape == "tiny" else (200, 800))
    model = build_model(shape, dtype, device, args.seed)
    vocab = min(model.config.vocab_size, 300 if shape == "tiny" else 30000)
    pairs = features(args.pairs, lengths, vocab, args.seed)
    rows = [{"input_ids": f["prompt_ids"] + f["chosen_ids"],
             "labels": [-100] * len(f["prompt_ids"]) + f["chosen_ids"]} for f in pairs]
    to = lambda batch: {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}  # noqa: E731
    cases = {
        "dpo": (lambda m, b: [v for k, v in completion_logps(m, b).items() if k.endswith("_logps")],
                to(PreferenceCollator(0)(pairs)), to(packing.PackedPreferenceCollator(0)(pairs))),
        "sft": (lambda m, b: [m(**b).loss], to(DataCollatorForLanguageModeling(pad_token_id=0)(rows)),
                to(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows))),
    }
    tol_values, tol_grads = TOLERANCE[dtype]
    kernel = kernel_name(model, dtype)
    results, ok = {}, True
    print(f"[packing_check] {shape}, {dtype} on {torch.cuda.get_device_name(0) if cuda else 'cpu'}; packed kernel: "
          f"{kernel}; {args.pairs} pairs of {lengths[0]}-{lengths[1]} tokens", flush=True)
    for name, (fn, padded_batch, packed_batch) in cases.items():
        padded = [step(model, padded_batch, fn) for _ in range(args.repeats)]
        previous = packing.use_packed_attention(model)
        packed = [step(model, packed_batch, fn) for _ in range(args.repeats)]
        packing.restore_attention(model, previous)
        values, grads = compare(padded[0], packed[0])
        passed = values <= tol_values and grads <= tol_grads
        ok &= passed
        tokens = (int(padded_batch["input_ids"].numel()), int(packed_batch["input_ids"].numel()))
        results[name] = {"values_max_rel": values, "grads_rel": grads, "pass": passed, "tokens": tokens,
                         "padded_s": statistics.median(s for *_, s in padded),
                         "packed_s": statistics.median(s for *_, s in packed)}
        r = results[name]
        print(f"{name}: {'PASS' if passed else 'FAIL'}: values max rel diff {values:.2e} (tol {tol_values:g}), "
              f"gradients rel diff {grads:.2e} (tol {tol_grads:g}); tokens padded {tokens[0]:,} -> packed "
              f"{tokens[1]:,}; forward+backward {r['padded_s']:.3f} s padded, {r['packed_s']:.3f} s packed "
              f"({r['padded_s'] / r['packed_s']:.2f}x)", flush=True)
    results.update(kernel=kernel, shape=shape, dtype=dtype, passed=ok)
    if argv is None and not ok:
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
