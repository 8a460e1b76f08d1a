"""Padding-free preference batches: every pair of a batch in one row, the prompt computed once for both responses.

A batch of B pairs becomes ONE sequence of Σ (P_i + C_i + R_i) tokens laid out pair after pair as
[prompt_i, chosen_i, rejected_i], with position ids restarting at each prompt and the rejected response continuing
from the prompt's end (the same positions chosen has). No padding is computed, and the prompt's tokens go through
the model once instead of twice: prompt + chosen and prompt + rejected are the two sequences of the padded batch.

Attention is the only place where tokens of one row meet, so it is replaced by `packed_attention` (registered with
transformers as the "align_packed" implementation). For each pair it attends
- prompt + chosen causally, as one sequence;
- rejected queries to the prompt's keys and values, then causally to rejected's own: exactly what they see in the
  padded batch, since a causal prompt's states do not depend on what follows it.
Each span runs through transformers' own SDPA function (torch's fused kernels, causal or with a small boolean mask),
so no (N × N) mask over the packed row is ever built. Without `align_segments` in its keyword arguments (every other
call: generation, padded scoring) it is exactly transformers' SDPA attention, so a model can keep this
implementation for a whole run.

Everything a row-wise computation needs comes with the batch (`PackedPreferenceCollator`): `position_ids`, the spans
(`segments`), the flat positions whose hidden states predict each completion token and which response they belong
to (`predict_at`, `targets`, `token_seq`), and the last token of each response (`ends`, for a reward model's head).
Values equal the padded computation's to float round-off (tests/test_packing.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from align.logprobs import token_logps_at
from align.preference import SIDES, PreferenceCollator, pair_columns

log = logging.getLogger(__name__)

ATTENTION = "align_packed"


# --- attention -------------------------------------------------------------------------------------------------------


def packed_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                     align_segments: Optional[Sequence[tuple]] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (1, H, N, hd) queries, (1, KV, N, hd) keys/values -> (1, N, H, hd).

    `align_segments`: (q_start, q_end, kv_spans, mask) in order, covering [0, N); queries q_start..q_end attend to
    the concatenated key/value spans, causally (mask None: the spans are the query span itself) or where `mask`
    (q_len × kv_len, bool) is true. Without it, a row of whole sequences (`sequence_segments`: TRL's padding-free
    SFT batches) is attended sequence by sequence; anything else is transformers' SDPA attention, unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if align_segments is None and attention_mask is None:
        align_segments = sequence_segments(query, key, kwargs)
    if align_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    varlen = flash_varlen(query)
    if varlen is not None:  # CUDA, half precision, flash-attn installed: every span in one kernel call
        return varlen_attention(varlen, query, key, value, align_segments, dropout, scaling), None
    outputs = []
    for q0, q1, spans, mask in align_segments:
        k = key[:, :, spans[0][0]:spans[0][1]] if len(spans) == 1 else torch.cat(
            [key[:, :, a:b] for a, b in spans], dim=2)
        v = value[:, :, spans[0][0]:spans[0][1]] if len(spans) == 1 else torch.cat(
            [value[:, :, a:b] for a, b in spans], dim=2)
        out, _ = sdpa_attention_forward(module, query[:, :, q0:q1], k, v, mask, dropout=dropout, scaling=scaling,
                                        is_causal=mask is None)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def flash_varlen(query: torch.Tensor) -> Optional[Any]:
    """flash-attn's `flash_attn_varlen_func` where it can run these queries (CUDA, float16/bfloat16, the package
    installed), else None: then the spans go through SDPA one by one (CPU, and CUDA without flash-attn)."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def varlen_layout(segments: Sequence[tuple], device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """The spans as variable-length sequences: (key/value row index, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k). Segment i's queries are rows q0..q1 of the packed row (the segments cover it in order), its keys
    and values the concatenated spans. Every segment's mask is causal aligned to the bottom right, query j seeing
    the keys up to kv_len - q_len + j (a whole sequence: q = kv; a rejected response: the prompt, then itself
    causally), which is what flash-attention's causal varlen kernel computes when q_len < kv_len."""
    kv_rows: list[int] = []
    cu_q, cu_k = [0], [0]
    for q0, q1, spans, _ in segments:
        if q0 != cu_q[-1]:
            raise ValueError("packed segments must cover the row in order")
        for a, b in spans:
            kv_rows += range(a, b)
        cu_q.append(q1)
        cu_k.append(len(kv_rows))
    as_tensor = lambda v, dtype: torch.tensor(v, dtype=dtype, device=device)  # noqa: E731
    lengths_q = [b - a for a, b in zip(cu_q, cu_q[1:])]
    lengths_k = [b - a for a, b in zip(cu_k, cu_k[1:])]
    return (as_tensor(kv_rows, torch.long), as_tensor(cu_q, torch.int32), as_tensor(cu_k, torch.int32),
            max(lengths_q), max(lengths_k))


def varlen_attention(kernel: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     segments: Sequence[tuple], dropout: float, scaling: Optional[float]) -> torch.Tensor:
    """(1, H, N, hd) queries, (1, KV, N, hd) keys/values -> (1, N, H, hd) through one varlen kernel call
    (`kernel`: flash_attn_varlen_func's signature; grouped key/value heads are the kernel's to broadcast)."""
    rows, cu_q, cu_k, max_q, max_k = varlen_layout(segments, query.device)
    q = query[0].transpose(0, 1)  # (N, H, hd)
    k = key[0].transpose(0, 1).index_select(0, rows)
    v = value[0].transpose(0, 1).index_select(0, rows)
    out = kernel(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scaling, causal=True)
    return out[None]


def sequence_segments(query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> Optional[list[tuple]]:
    """Causal spans of a padding-free row of whole sequences (TRL's `padding_free` collator, SFT packing): from
    `cu_seq_lens_q` (the boundaries flash-attention's varlen kernels read) or, without it, from where the position
    ids restart. None unless the row (batch 1, no cache: queries = keys) holds two or more sequences."""
    n = query.shape[2]
    if query.shape[0] != 1 or key.shape[2] != n:
        return None
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is not None:
        cuts = [int(c) for c in bounds.tolist()]
    else:
        positions = kwargs.get("position_ids")
        if positions is None or positions.shape[-1] != n:
            return None
        starts = (positions.reshape(-1) == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            return None
        cuts = starts + [n]
    if len(cuts) < 3 or cuts[0] != 0 or cuts[-1] != n:
        return None
    return [(a, b, ((a, b),), None) for a, b in zip(cuts, cuts[1:]) if b > a]


def _no_mask(*args, attention_mask=None, **kwargs):
    """The mask function of "align_packed": SDPA's where a padding mask is given; none for a packed row, whose
    spans carry their own (transformers would otherwise build an N × N mask from the restarting position ids)."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, packed_attention)
    AttentionMaskInterface.register(ATTENTION, _no_mask)


def _pretrained(model: Any) -> Any:
    base = getattr(model, "module", model)
    return base.get_base_model() if hasattr(base, "get_base_model") else base


def attention_implementation(model: Any) -> Optional[str]:
    """The (possibly PEFT- and DDP-wrapped) model's attention implementation."""
    return getattr(_pretrained(model).config, "_attn_implementation", None)


def supports_packing(model: Any) -> bool:
    """Models whose attention goes through transformers' attention interface (most decoder LMs) and is SDPA today."""
    base = _pretrained(model)
    can = getattr(base, "_can_set_attn_implementation", lambda: False)
    return getattr(base.config, "_attn_implementation", None) in ("sdpa", ATTENTION) and bool(can())


def use_packed_attention(model: Any) -> Optional[str]:
    """Switch the model to "align_packed" (identical to SDPA for padded calls); return the previous implementation,
    or None where the model cannot (then batches must stay padded)."""
    if not supports_packing(model):
        return None
    register()
    base = _pretrained(model)
    previous = base.config._attn_implementation
    base.set_attn_implementation(ATTENTION)
    return previous


# Attention implementations that attend a padding-free row sequence by sequence on their own: flash-attention's
# varlen kernels read the boundaries from the position ids (or `cu_seq_lens_*`), flex attention gets a block mask.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def sequence_packing_attention(model: Any) -> tuple[bool, Optional[str]]:
    """For padding-free rows of whole sequences (SFT): (whether the model attends them exactly and without an N × N
    mask, the previous implementation to restore or None). flash-attention / flex attention as they are; SDPA is
    switched to "align_packed" (`sequence_segments`: SDPA sequence by sequence, CPU included); anything else
    (eager, ...) is not, since transformers would build a dense mask over the whole row."""
    if attention_implementation(model) in VARLEN_ATTENTION:
        return True, None
    previous = use_packed_attention(model)
    return previous is not None, previous


def restore_attention(model: Any, previous: Optional[str]) -> None:
    if previous is not None and previous != ATTENTION:
        _pretrained(model).set_attn_implementation(previous)


# --- batches ---------------------------------------------------------------------------------------------------------


@dataclass
class PackedPreferenceCollator:
    """Features -> one packed row (module docstring). Per-pair columns as `PreferenceCollator` gives them.

    Keys: input_ids, position_ids (1, N); segments (spans, see `packed_attention`; masks built on the batch's device
    by `attention_segments`); predict_at, targets, token_seq (M,) for the M completion tokens, token_seq in 0..2B-1
    with chosen of pair i = i and rejected = B + i, as the padded batch's rows; ends (2B,) last token of each
    response; lengths (2B,) completion tokens; real_tokens (the number of tokens computed).
    """

    pad_token_id: int
    label_smoothing: float = 0.0

    def __call__(self, features: Sequence[dict]) -> dict[str, Any]:
        ids: list[int] = []
        positions: list[int] = []
        segments: list[tuple] = []
        predict_at: list[int] = []
        targets: list[int] = []
        token_seq: list[int] = []
        ends = [0] * (2 * len(features))
        lengths = [0] * (2 * len(features))
        for i, f in enumerate(features):
            prompt = f["prompt_ids"]
            start = len(ids)
            ids += prompt
            positions += range(len(prompt))
            for s, side in enumerate(SIDES):
                response = f[f"{side}_ids"]
                begin = len(ids)
                ids += response
                positions += range(len(prompt), len(prompt) + len(response))
                row = s * len(features) + i
                # The first response token is predicted by the prompt's last state, the others by their predecessor.
                predict_at += [start + len(prompt) - 1] + list(range(begin, begin + len(response) - 1))
                targets += response
                token_seq += [row] * len(response)
                ends[row] = begin + len(response) - 1 if response else start + len(prompt) - 1
                lengths[row] = len(response)
                if s == 0:
                    segments.append((start, begin + len(response), ((start, begin + len(response)),), None))
                elif response:
                    segments.append((begin, begin + len(response), ((start, start + len(prompt)),
                                                                    (begin, begin + len(response))), len(prompt)))
        batch = {
            "input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]), "segments": segments,
            "predict_at": torch.tensor(predict_at, dtype=torch.long), "targets": torch.tensor(targets, dtype=torch.long),
            "token_seq": torch.tensor(token_seq, dtype=torch.long), "ends": torch.tensor(ends, dtype=torch.long),
            "lengths": torch.tensor(lengths, dtype=torch.float32), "real_tokens": len(ids),
        }
        return {**batch, **pair_columns(features, self.label_smoothing)}


def attention_segments(batch: dict, device: Any) -> list[tuple]:
    """The batch's spans with the boolean mask of each rejected span: its queries see the whole prompt, then their
    own tokens causally."""
    out = []
    for q0, q1, spans, prompt in batch["segments"]:
        if prompt is None:
            out.append((q0, q1, spans, None))
            continue
        n = q1 - q0
        own = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        # (1, 1, q, kv): SDPA's mask shape (a one-token span takes transformers' grouped-query path, which needs it)
        out.append((q0, q1, spans, torch.cat([torch.ones(n, prompt, dtype=torch.bool, device=device), own],
                                             dim=1)[None, None]))
    return out


def forward_kwargs(batch: dict) -> dict[str, Any]:
    """What the model's forward needs for a packed row (no attention mask: the spans replace it)."""
    device = batch["input_ids"].device
    return {"position_ids": batch["position_ids"], "align_segments": attention_segments(batch, device)}


def packed_completion_logps(model: Any, batch: dict, with_collision: bool = False) -> dict[str, torch.Tensor]:
    """`align.preference.completion_logps` for a packed batch: the same (B,) float32 values, one forward."""
    values, collision = token_logps_at(model, batch["input_ids"], batch["predict_at"], batch["targets"],
                                       with_collision=with_collision, **forward_kwargs(batch))
    rows = batch["ends"].shape[0]
    sums = torch.zeros(rows, dtype=torch.float32, device=values.device).index_add(0, batch["token_seq"], values)
    half = rows // 2
    out = {"chosen_logps": sums[:half], "rejected_logps": sums[half:],
           "chosen_lengths": batch["lengths"][:half], "rejected_lengths": batch["lengths"][half:]}
    if with_collision:
        coll = torch.zeros(rows, dtype=torch.float32, device=values.device).index_add(0, batch["token_seq"], collision)
        out["chosen_log_collision"], out["rejected_log_collision"] = coll[:half], coll[half:]
    return out


def packed_rewards(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence classifier's (r_chosen, r_rejected), each (B,) float32, from one packed forward: the score head's
    output at each response's last token (the padded batch reads it at the last non-padding token)."""
    base = _pretrained(model)
    captured: list[torch.Tensor] = []
    handle = base.score.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(input_ids=batch["input_ids"], **forward_kwargs(batch))
    finally:
        handle.remove()
    rewards = captured[-1][0, batch["ends"], 0].float()
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


def preference_collator(model: Any, pad_token_id: int, padding_free: bool,
                        label_smoothing: float = 0.0) -> tuple[Any, Optional[str]]:
    """(collator, the model's previous attention implementation or None). padding_free: one packed row per batch
    where the model's attention allows it, else padded rows."""
    if padding_free:
        previous = use_packed_attention(model)
        if previous is not None:
            return PackedPreferenceCollator(pad_token_id, label_smoothing), previous
        log.warning("padding_free: %s's attention is not SDPA through transformers' attention interface; using "
                    "padded batches", type(model).__name__)
    return PreferenceCollator(pad_token_id, label_smoothing), None
