"""Peak GPU memory of a training run, estimated before it starts: `align memory`.

Every term is a closed formula in the model's shape (d = hidden size, L = layers, h / kv = attention / key-value
heads, hd = head dim, ff = MLP intermediate size, V = vocabulary) and the run (B = micro-batch per GPU, T = max
length, r = LoRA rank). Bytes: w for weights (bf16 2, fp32 4), a for activations (the same dtype).

  weights        P·w; QLoRA: linear weights 0.5 B/param + 4 B per 64-weight block (fp32 absmax, NF4 without double
                 quantisation) = 0.5625 B/param, other params fp32 (prepare_model_for_kbit_training upcasts them)
  LoRA           n = L·r·Σ(d_in + d_out) over q,k,v,o,gate,up,down (all-linear); fp32 adapters: 4n weights + 4n
                 grads + 8n AdamW moments
  full FT        grads P·w, AdamW 8P (fp32 m, v) + 4P fp32 master copy when w < 4: 16 B/param in bf16
  activations    bytes per layer per token that autograd keeps, with SDPA attention (no T² score matrix):
                 full FT  A = (8 + 4a)·d + 5a·h·hd + 4a·ff + 4h
                   2 RMSNorms (fp32 input copy 4d, normalised a·d, linear input a·d), q, k, v (k, v repeated to h
                   heads), attention output, o_proj input (5a·h·hd), MLP gate, up, act(gate), product (4a·ff),
                   attention logsumexp (4h, fp32);
                 LoRA     A = 8d + 4·(5d + h·hd + ff) + 4a·h·hd + 3a·ff + 4h + 28r
                   the frozen base linears and norms keep no inputs, but peft casts each adapted linear's input to
                   the fp32 adapter dtype and keeps that copy (4 bytes x the inputs of q, k, v, gate, up: 5d, o:
                   h·hd, down: ff); + (5d + h·hd + ff) with LoRA dropout (the bool masks).
                 Tokens N = B·T (SFT, RLHF) or 2B·T (DPO, reward: chosen + rejected). Without checkpointing:
                 N·(L·A + f), with: N·(L·a·d + A + f): the layer inputs plus one layer recomputed at a time; f is the
                 final norm, (4 + 2a)·d (full) or 4d (LoRA). Checked against the tensors torch saves for a small
                 bf16 Llama (tests/test_memory.py).
  logits         RLHF: N·V·(4 + a), the model-dtype logits (then their gradient) and the fp32 copy that
                 log-softmax keeps for backward. DPO: align.logprobs' chunked head keeps the final hidden states of
                 the scored tokens and an fp32 log-normaliser, N·(a·d + 8) (N counts every token: an upper bound),
                 plus 3 fp32 tiles of min(2^25, N·V) values (logits, exp, gradient) in flight. SFT: TRL's fused LM head never builds the logits;
                 it keeps the final hidden states and a few fp32 per-token statistics, N·(a·d + 12), plus one
                 4096 x min(V, 32768) fp32 tile. Reward model: none (scalar head).
  reference      DPO/RLHF with LoRA or QLoRA: the base with the adapter disabled, no copy. DPO precomputes the
                 reference by default (and always for full fine-tuning); computed each step, its chunked head
                 adds no more than the tiles. RLHF full fine-tuning: a frozen copy, P·w. RLHF also holds a frozen reward model.
  overhead       1 GiB (CUDA context, cuBLAS workspace) + 10% of the peak (allocator fragmentation).

The sum is an upper bound of torch.cuda.max_memory_allocated (gradients and activations do not all coexist).
Sharding divides per GPU: ZeRO-2 the gradients and optimizer state, FSDP2 / ZeRO-3 also the weights (plus two
gathered layers in flight); activations and logits are per GPU whatever the sharding. GPU-measured peaks to
calibrate these formulas are still to be recorded (docs/scaling.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from align.errors import ConfigError

GiB = 1024**3
OVERHEAD_BYTES = 1 * GiB
FRAGMENTATION = 0.10
NF4_BYTES = 0.5 + 4 / 64  # 4-bit weight + one fp32 absmax per block of 64
SFT_TILE_TOKENS, SFT_TILE_VOCAB = 4096, 32768  # TRL's chunked log-prob tile
CHUNK_ELEMENTS = 2**25  # align.logprobs.CHUNK_ELEMENTS: float32 logits per tile of the chunked head
DPO_TILE_COPIES = 3  # the tile's logits, their exp and its gradient in the backward
SHARD_COUNTS = (2, 4, 8, 16)  # GPUs tried when one is not enough; 16 = two nodes of 8
METHODS = ("sft", "reward", "dpo", "rlhf")
MODES = ("lora", "qlora", "full")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = True
    head_dim: Optional[int] = None  # default hidden // heads
    qkv_bias: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads


# From /work/shared/research/flops_model.py (the models' config.json): hidden, layers, heads, kv heads, intermediate,
# vocab, tied embeddings, head dim, q/k/v bias.
SHAPES: dict[str, Shape] = {
    "smollm2-135m": Shape(576, 30, 9, 3, 1536, 49152, True, 64),
    "smollm2-360m": Shape(960, 32, 15, 5, 2560, 49152, True, 64),
    "smollm2-1.7b": Shape(2048, 24, 32, 32, 8192, 49152, True, 64),
    "qwen2.5-0.5b": Shape(896, 24, 14, 2, 4864, 151936, True, 64, True),
    "qwen2.5-1.5b": Shape(1536, 28, 12, 2, 8960, 151936, True, 128, True),
    "qwen2.5-3b": Shape(2048, 36, 16, 2, 11008, 151936, True, 128, True),
    "llama-3.2-1b": Shape(2048, 16, 32, 8, 8192, 128256, True, 64),
    "llama-3.2-3b": Shape(3072, 28, 24, 8, 8192, 128256, True, 128),
    "llama-3-8b": Shape(4096, 32, 32, 8, 14336, 128256, False, 128),
}
ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "llama-3.1-8b": "llama-3-8b"}

# Memory a process can use, GiB (what nvidia-smi reports, not the marketing GB).
GPUS: dict[str, float] = {
    "h200-141gb": 139.8, "h100-80gb": 79.6, "a100-80gb": 79.2, "a100-40gb": 39.4, "l40s-48gb": 44.4,
    "a10g-24gb": 22.0, "l4-24gb": 22.0, "rtx4090-24gb": 23.6, "v100-32gb": 31.7, "t4-16gb": 14.6,
}


# --- shapes -----------------------------------------------------------------------------------------------------------


def shape_from_config(config: dict) -> Shape:
    """A Shape from a transformers config.json (Llama, Qwen2, Mistral, SmolLM and the like)."""
    try:
        heads = config["num_attention_heads"]
        return Shape(
            hidden=config["hidden_size"], layers=config["num_hidden_layers"], heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads, intermediate=config["intermediate_size"],
            vocab=config["vocab_size"], tied=bool(config.get("tie_word_embeddings", True)),
            head_dim=config.get("head_dim"),
            qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
        )
    except KeyError as exc:
        raise ConfigError(f"config.json lacks {exc.args[0]}: not a decoder-only transformer align can size") from None


def resolve_shape(spec: str) -> tuple[str, Shape]:
    """A shape name (SHAPES, case-insensitive), or a local model / adapter / run directory (reads JSON only)."""
    key = ALIASES.get(spec.lower(), spec.lower())
    if key in SHAPES:
        return key, SHAPES[key]
    path = Path(spec).expanduser()
    for candidate in (path, path / "merged"):
        if (candidate / "config.json").is_file():
            return str(path), shape_from_config(json.loads((candidate / "config.json").read_text()))
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            base = json.loads((candidate / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if base:
                return resolve_shape(base)
    raise ConfigError(f"unknown model '{spec}': give a local model directory (config.json) or one of the shapes "
                      f"{', '.join(sorted(SHAPES))}")


def param_counts(shape: Shape, lora_r: int) -> dict[str, int]:
    """linear (the 7 projections of every layer), other (embeddings, lm_head if untied, norms, biases), lora."""
    d, hd, ff = shape.hidden, shape.hd, shape.intermediate
    q, kv = shape.heads * hd, shape.kv_heads * hd
    pairs = [(d, q), (d, kv), (d, kv), (q, d), (d, ff), (d, ff), (ff, d)]  # (in, out): q k v o gate up down
    linear = shape.layers * sum(i * o for i, o in pairs)
    bias = shape.layers * (q + 2 * kv) if shape.qkv_bias else 0
    norms = shape.layers * 2 * d + d
    embed = shape.vocab * d * (1 if shape.tied else 2)
    return {"linear": linear, "other": embed + norms + bias, "lm_head": 0 if shape.tied else shape.vocab * d,
            "lora": shape.layers * lora_r * sum(i + o for i, o in pairs)}


# --- the estimate -----------------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    """Bytes per term on one GPU without sharding, and which of them sharding divides."""

    model: str
    method: str
    mode: str
    batch: int
    max_length: int
    gradient_checkpointing: bool
    params: int
    trainable: int
    terms: dict[str, float]

    @property
    def peak(self) -> float:
        return sum(self.terms.values())

    def per_gpu(self, strategy: str = "none", n: int = 1, layer: float = 0.0) -> float:
        """Peak on one of n GPUs: strategy none (single GPU, DDP), zero2, or full_shard (FSDP2, ZeRO-3)."""
        t = dict(self.terms)
        if strategy in ("zero2", "full_shard"):
            t["gradients"] /= n
            t["optimizer"] /= n
        if strategy == "full_shard":
            for key in ("weights", "reference", "reward_model"):
                t[key] /= n
            t["gathered_layers"] = 2 * layer  # the layer in use and the prefetched one, unsharded
        return sum(t.values())

    @staticmethod
    def needs(peak: float) -> float:
        return peak * (1 + FRAGMENTATION) + OVERHEAD_BYTES


def activation_bytes_per_token(shape: Shape, act: int, checkpointing: bool, lora: bool = False, lora_r: int = 16,
                               lora_dropout: bool = False) -> float:
    """Bytes of saved activations per token, all layers (formulas in the module docstring)."""
    d, h, hd, ff = shape.hidden, shape.heads, shape.hd, shape.intermediate
    adapted_inputs = 5 * d + h * hd + ff  # the inputs of q, k, v, gate, up (d each), o (h·hd), down (ff)
    if lora:
        layer = 8 * d + 4 * adapted_inputs + 4 * act * h * hd + 3 * act * ff + 4 * h + 7 * 4 * lora_r
        layer += adapted_inputs if lora_dropout else 0
        final_norm = 4 * d
    else:
        layer = (8 + 4 * act) * d + 5 * act * h * hd + 4 * act * ff + 4 * h
        final_norm = (4 + 2 * act) * d
    if checkpointing:
        return shape.layers * act * d + layer + final_norm
    return shape.layers * layer + final_norm


def estimate(
    shape: Shape, method: str = "sft", mode: str = "lora", batch: int = 8, max_length: int = 1024,
    gradient_checkpointing: bool = False, dtype: str = "bfloat16", lora_r: int = 16, lora_dropout: float = 0.0,
    precompute_ref: bool = True, model: str = "",
) -> Estimate:
    """Peak GPU memory terms for one training micro-batch of `batch` sequences (SFT, RLHF) or pairs (DPO, reward)."""
    if method not in METHODS or mode not in MODES:
        raise ConfigError(f"method must be one of {METHODS} and mode one of {MODES}")
    if batch < 1 or max_length < 1 or lora_r < 1:
        raise ConfigError("batch, max_length and lora_r must be >= 1")
    w = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
    counts = param_counts(shape, lora_r)
    head = shape.hidden if method == "reward" else 0  # the reward model's scalar head (trainable)
    lm_head = counts["lm_head"] if method == "reward" else 0  # a reward model has no lm_head
    total = counts["linear"] + counts["other"] - lm_head + head  # the model's own parameters, adapters aside
    lora = mode != "full"
    trainable = counts["lora"] + head if lora else total

    if mode == "qlora":
        weights = counts["linear"] * NF4_BYTES + (counts["other"] - lm_head) * 4 + trainable * 4
    elif mode == "lora":
        weights = (total - head) * w + trainable * 4
    else:
        weights = total * w
    grad_bytes = 4 if lora else w  # peft keeps adapters in fp32
    optimizer = trainable * (8 + (4 if grad_bytes < 4 else 0))

    seqs = batch * (2 if method in ("dpo", "reward") else 1)
    tokens = seqs * max_length
    activations = tokens * activation_bytes_per_token(shape, w, gradient_checkpointing, lora, lora_r,
                                                       lora_dropout > 0)
    if method == "reward":
        logits = 0.0
    elif method == "sft":  # TRL's fused, tiled LM head (trl.trainer.utils.add_fused_lm_head)
        logits = tokens * (w * shape.hidden + 12) + SFT_TILE_TOKENS * min(shape.vocab, SFT_TILE_VOCAB) * 4
    elif method == "dpo":  # align.logprobs' chunked head: the final hidden states kept, one tile of logits at a time
        logits = tokens * (w * shape.hidden + 8) + DPO_TILE_COPIES * 4 * min(CHUNK_ELEMENTS, tokens * shape.vocab)
    else:
        logits = tokens * shape.vocab * (4 + w)
    reference = reward_model = 0.0
    if method == "rlhf":
        reference = 0.0 if lora else total * w
        reward_model = (total - counts["lm_head"]) * w  # a frozen reward model of the same shape, no lm_head
    terms = {"weights": float(weights), "gradients": float(trainable * grad_bytes), "optimizer": float(optimizer),
             "activations": float(activations), "logits": float(logits), "reference": float(reference),
             "reward_model": float(reward_model)}
    return Estimate(model, method, mode, batch, max_length, gradient_checkpointing, total, trainable, terms)


def layer_bytes(shape: Shape, dtype: str = "bfloat16") -> float:
    """One decoder layer's weights: what FSDP / ZeRO-3 gathers at a time."""
    w = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
    return param_counts(shape, 1)["linear"] / shape.layers * w


def placement(est: Estimate, gpu_gib: float, layer: float) -> Optional[tuple[str, int, float]]:
    """The cheapest way to fit `est` on GPUs of `gpu_gib`: (strategy, GPUs, GiB needed per GPU), or None.
    Strategies: none (one GPU, or DDP), zero2 (full fine-tuning only: LoRA's optimizer state is tiny), full_shard."""
    cap = gpu_gib * GiB
    if Estimate.needs(est.per_gpu()) <= cap:
        return "none", 1, Estimate.needs(est.per_gpu()) / GiB
    for n in SHARD_COUNTS:
        for strategy in ("zero2", "full_shard") if est.mode == "full" else ("full_shard",):
            need = Estimate.needs(est.per_gpu(strategy, n, layer))
            if need <= cap:
                return strategy, n, need / GiB
    return None


CONFIG_FOR = {"none": "single_gpu.yaml (ddp.yaml on more GPUs, for speed)", "zero2": "zero2.yaml",
              "full_shard": "fsdp2.yaml or zero3.yaml"}


def recommend(est: Estimate, gpu_gib: float, layer: float, variants: Sequence[tuple[str, Estimate]] = ()) -> list[str]:
    """Which recipes/accelerate config fits on GPUs of `gpu_gib`: the verdict, then, when one GPU is not enough, the
    cheapest placement of the run and of each variant (e.g. with gradient checkpointing, with QLoRA), stopping at the
    first that fits on one GPU."""
    found = placement(est, gpu_gib, layer)
    single = Estimate.needs(est.per_gpu()) / GiB
    if found and found[0] == "none":
        return [f"fits on one GPU ({single:.1f} of {gpu_gib:g} GiB): recipes/accelerate/{CONFIG_FOR['none']}"]
    lines = [f"does not fit on one GPU ({single:.1f} of {gpu_gib:g} GiB)"]
    for label, run in [("as given", est), *variants]:
        found = placement(run, gpu_gib, layer)
        if found is None:
            if run is est:
                per_gpu = (est.terms["activations"] + est.terms["logits"]) / GiB
                lines.append(f"  as given: not even sharded over {SHARD_COUNTS[-1]} GPUs (activations + logits are "
                             f"{per_gpu:.1f} GiB per GPU whatever the sharding)")
            continue
        strategy, n, need = found
        where = CONFIG_FOR[strategy] if n <= 8 else "multi_node.yaml (2 nodes x 8 GPUs)"
        gpus = "one GPU" if n == 1 else f"{strategy} over {n} GPUs"
        lines.append(f"  {label}: {gpus}, {need:.1f} GiB each -> recipes/accelerate/{where}")
        if n == 1:
            break
    if len(lines) == 2 and "not even sharded" in lines[1]:
        lines.append("  lower the per-device batch (keep the global batch with gradient_accumulation_steps), shorten "
                     "max_length, or use gradient checkpointing / LoRA / QLoRA")
    return lines


def render(est: Estimate, gpu: Optional[str], advice: list[str]) -> str:
    mode = {"lora": "LoRA", "qlora": "QLoRA", "full": "full fine-tuning"}[est.mode]
    unit = "pairs" if est.method in ("dpo", "reward") else "sequences"
    lines = [f"{est.model}: {est.method} with {mode}, {est.batch} {unit} x {est.max_length} tokens per GPU"
             f"{', gradient checkpointing' if est.gradient_checkpointing else ''}",
             f"  parameters {est.params / 1e6:,.1f}M, trainable {est.trainable / 1e6:,.2f}M"]
    for key, value in est.terms.items():
        if value:
            lines.append(f"  {key:<14}{value / GiB:9.2f} GiB")
    lines.append(f"  {'peak':<14}{est.peak / GiB:9.2f} GiB   (+10% and 1 GiB CUDA context: "
                 f"{Estimate.needs(est.peak) / GiB:.2f} GiB)")
    if gpu:
        lines += [f"{gpu}: {line}" for line in advice]
    return "\n".join(lines)


# --- --auto_batch: the largest micro-batch that fits ------------------------------------------------------------------


def micro_batch_candidates(global_batch: int) -> list[int]:
    """Divisors of the global batch, largest first: micro-batch b with global/b accumulation steps keeps it exact."""
    return [b for b in range(global_batch, 0, -1) if global_batch % b == 0]


def largest_fitting(candidates: Sequence[int], estimated_fits, probe_fits) -> Optional[int]:
    """The first candidate (largest first) that the estimate admits and a probe step confirms; None if none does.
    Candidates the estimate refuses are not probed; a probe failure moves on to the next smaller one."""
    for b in candidates:
        if estimated_fits(b) and probe_fits(b):
            return b
    return None


def auto_batch(accelerator, model, task, train, method: str, max_length: int):
    """`train` with the largest per-device micro-batch that fits this GPU and gradient accumulation keeping the
    global batch (per_device_train_batch_size × gradient_accumulation_steps) fixed.

    Each divisor of the global batch, largest first, is checked against `estimate` for this model's shape (its
    needs ≤ the GPU's free memory), then by a probe: one forward + backward of the task's loss on the longest
    examples, which must not run out of memory. CUDA only: elsewhere `train` is returned unchanged, with a warning.
    """
    import dataclasses
    import logging

    import torch

    log = logging.getLogger(__name__)
    if not torch.cuda.is_available() or accelerator.device.type != "cuda":
        log.warning("auto_batch needs a CUDA GPU (it probes GPU memory); keeping per_device_train_batch_size=%d",
                    train.per_device_train_batch_size)
        return train
    global_batch = train.per_device_train_batch_size * train.gradient_accumulation_steps
    config = getattr(getattr(model, "get_base_model", lambda: model)(), "config", model.config)
    shape = shape_from_config(config.to_dict())
    lora = any("lora_" in name for name, _ in model.named_parameters())
    dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(next(model.parameters()).dtype, "float32")
    free = torch.cuda.mem_get_info(accelerator.device)[0]
    longest = sorted(task.train_data, key=lambda f: -sum(len(v) for v in f.values() if isinstance(v, list)))

    def estimated_fits(b: int) -> bool:
        est = estimate(shape, method, "lora" if lora else "full", b, max_length, train.gradient_checkpointing, dtype,
                       lora_dropout=0.0)
        return Estimate.needs(est.per_gpu()) - est.terms["weights"] <= free  # the weights are already loaded

    def probe_fits(b: int) -> bool:
        batch = {k: v.to(accelerator.device) if hasattr(v, "to") else v
                 for k, v in task.collate(longest[:b]).items()}
        try:
            with accelerator.autocast():
                loss, _ = task.loss(model, batch)
            loss.backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    chosen = largest_fitting(micro_batch_candidates(global_batch), estimated_fits, probe_fits) or 1
    log.info("auto_batch: micro-batch %d x %d accumulation steps (global batch %d)", chosen, global_batch // chosen,
             global_batch)
    return dataclasses.replace(train, per_device_train_batch_size=chosen,
                               gradient_accumulation_steps=global_batch // chosen)
