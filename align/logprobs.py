"""Per-token and per-sequence log-probabilities from logits, in float32.

Conventions (DESIGN.md §2): `*_token_logps` are (B, T) per-token values, `*_logps` are (B,) sums over the completion.
Labels equal to -100 mark positions that are not scored (prompt, padding); they contribute exactly 0.

Every function here is shift-free: `logits[:, t]` must already predict `labels[:, t]`. Call
`shift_for_causal_lm` once, where the model output is produced, so the off-by-one lives in one place.
"""

import inspect
from dataclasses import dataclass
from typing import Optional

import torch

IGNORE_INDEX = -100


def shift_for_causal_lm(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align a causal LM's outputs with its targets.

    logits: (B, L, V), labels: (B, L) -> logits (B, L-1, V), labels (B, L-1).
    Position t of a causal LM predicts token t+1, so drop the last logit and the first label.
    """
    return logits[:, :-1, :], labels[:, 1:]


def scored_logits(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                  labels: torch.Tensor, **forward_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward a causal LM and return shifted (logits, labels) from the first position that any row scores.

    Prompt positions before every row's first scored label need no logits: the LM head (vocabulary × hidden, the
    largest matrix of a small model) and the log-softmax over the vocabulary are skipped there through the model's
    `logits_to_keep`. In a DPO batch the prompt is often more than half of each row, so this saves that share of
    the head's FLOPs and of the (B, T, V) logits memory. Models whose forward has no `logits_to_keep` get all
    positions. Values are identical either way: the kept positions are computed exactly as before.
    """
    width = labels.shape[1]
    keep = width
    if accepts_logits_to_keep(model):
        scored = labels != IGNORE_INDEX
        first = int(torch.where(scored.any(-1), scored.int().argmax(-1), width).min())
        keep = min(width, max(2, width - first + 1))  # logit t-1 predicts label t
    kwargs = {"logits_to_keep": keep} if keep < width else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs,
                   **forward_kwargs).logits
    return shift_for_causal_lm(logits, labels[:, width - logits.shape[1]:])


def accepts_logits_to_keep(model) -> bool:
    """Whether the (possibly DDP- and PEFT-wrapped) causal LM's forward takes `logits_to_keep`."""
    base = getattr(model, "module", model)  # DistributedDataParallel, DeepSpeed
    if hasattr(base, "get_base_model"):  # PEFT
        base = base.get_base_model()
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _label_mask(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of scored positions, labels with ignored positions replaced by a valid index for gather)."""
    mask = labels != IGNORE_INDEX
    return mask, labels.masked_fill(~mask, 0)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # .float() is free for float32 input; dividing only when needed avoids a copy at T = 1.
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / temperature) gathered at the labels, in float32.

    logits: (B, T, V) any float dtype; labels: (B, T) int, -100 = not scored.
    Returns (B, T) float32; ignored positions are exactly 0.

    log p(y_t) = z_t[y_t] / τ - logsumexp_v(z_t[v] / τ). Only the label logit is gathered; the logsumexp runs one
    batch row at a time, so a bf16 input is upcast one (T, V) row at a time and a float32 input never gets a second
    full (B, T, V) copy (the vocabulary is the large dimension).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    mask, safe_labels = _label_mask(labels)
    picked = _scaled(logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1), temperature)   # (B, T)
    log_norm = torch.stack([torch.logsumexp(_scaled(row, temperature), dim=-1) for row in logits])  # (B, T)
    return torch.where(mask, picked - log_norm, torch.zeros_like(picked))


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, average: bool = False
) -> torch.Tensor:
    """Sum (or mean over scored tokens) of `token_logps`: (B, T, V), (B, T) -> (B,) float32.

    A row with no scored tokens gives 0 for both the sum and the mean.
    """
    per_token = token_logps(logits, labels, temperature)
    total = per_token.sum(-1)
    if not average:
        return total
    return total / (labels != IGNORE_INDEX).sum(-1).clamp_min(1)


def token_log_collision(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log Σ_v p(v)² per scored position, p = softmax(logits / temperature): (B, T, V), (B, T) -> (B, T) float32.

    This is WPO's "sampled alignment" normaliser (Zhou et al. 2024, Eq. 2): the expected probability of a token drawn
    from p itself. Summed over the completion it is the `*_log_collision` input of `weighting.compute_importance_weights`
    for the `wpo` scheme. log Σ p² = logsumexp(2z) - 2·logsumexp(z), computed row by row like `token_logps`.
    Ignored positions are exactly 0.
    """
    mask, _ = _label_mask(labels)
    rows = []
    for row in logits:
        z = _scaled(row, temperature)
        rows.append(torch.logsumexp(2.0 * z, dim=-1) - 2.0 * torch.logsumexp(z, dim=-1))
    values = torch.stack(rows)
    return torch.where(mask, values, torch.zeros_like(values))


# --- log-probs straight from the hidden states: no (B, T, V) logits ---------------------------------------------------

# Rows of (rows × V) float32 logits built at a time: 2**25 elements = 128 MiB per chunk, whatever the vocabulary.
CHUNK_ELEMENTS = 2**25
# Causal LMs whose forward is exactly `lm_head(final hidden states)`: no logit scaling or soft-capping after the head
# (Gemma 2/3 soft-cap, Cohere and Granite scale), so the head can be replaced by our chunked computation.
PLAIN_HEAD_MODELS = frozenset({"llama", "qwen2", "qwen3", "mistral", "phi3", "qwen2_moe", "qwen3_moe", "mixtral",
                               "olmo2", "smollm3"})


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where it is on (bf16 training steps), else the input's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias, temperature: float) -> torch.Tensor:
    """float32 logits of a chunk, rounded exactly as the model's own head would round them (matmul in its dtype)."""
    z = torch.nn.functional.linear(hidden, weight, None if bias is None else bias.to(weight.dtype))
    z = z if z.dtype == torch.float64 else z.float()
    return z if temperature == 1.0 else z / temperature


class LinearTokenLogps(torch.autograd.Function):
    """log_softmax(h W^T + b)[y] for N rows, computed `chunk` rows at a time, forward and backward.

    Only the (N,) log-probs and log-normalisers are kept: the backward rebuilds each chunk's logits from the saved
    hidden states (one more head matmul per scored token) instead of keeping N × V float32 values. The numbers are
    those of `token_logps(lm_head(h), y)`: the head runs in the model's dtype, everything after it in float32, and
    the gradient is cast back to the model's dtype before the head's backward, as autograd does for `.float()`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk):
        # Under autocast the head runs in its dtype, forward and backward alike (the backward runs outside the
        # autocast context, so the dtype is recorded here and applied by hand).
        ctx.compute_dtype = dtype = _compute_dtype(hidden)
        w = weight.to(dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        log_norm = torch.empty_like(out)
        # One chunk only (a short batch): its probabilities are kept for the backward, which would otherwise rebuild
        # the same chunk there, so the peak is the same and one head matmul and exp are saved.
        ctx.probs = None
        keep = hidden.shape[0] <= chunk and any(ctx.needs_input_grad[:3])
        with torch.no_grad():
            for s in range(0, hidden.shape[0], chunk):
                z = _head_logits(hidden[s:s + chunk].to(dtype), w, bias, temperature)
                log_norm[s:s + chunk] = torch.logsumexp(z, dim=-1)
                out[s:s + chunk] = z.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - log_norm[s:s + chunk]
                if keep:
                    ctx.probs = torch.exp(z.sub_(log_norm[:, None]))
        ctx.save_for_backward(hidden, weight, bias, targets, log_norm)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, log_norm = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        tau, chunk, dtype = ctx.temperature, ctx.chunk, ctx.compute_dtype
        w = weight.to(dtype)
        for s in range(0, hidden.shape[0], chunk):
            h, g = hidden[s:s + chunk].to(dtype), grad[s:s + chunk].to(log_norm.dtype)
            with torch.no_grad():
                probs, ctx.probs = ctx.probs, None  # used once: a second backward (retain_graph) rebuilds them
                if probs is None:
                    probs = torch.exp(_head_logits(h, w, bias, tau).sub_(log_norm[s:s + chunk, None]))
                # d/dz (z_y - logsumexp z) = onehot(y) - softmax(z); times the incoming gradient and 1/τ.
                dz = probs.mul_(-g[:, None])
                dz.scatter_add_(-1, targets[s:s + chunk, None], g[:, None])
                if tau != 1.0:
                    dz.div_(tau)
                dz_model = dz.to(dtype)
                if need_h:
                    grad_h[s:s + chunk] = dz_model @ w
                if need_w:
                    grad_w.add_((dz_model.t() @ h).float())
                if need_b:
                    grad_b.add_(dz_model.float().sum(0))
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       targets: torch.Tensor, temperature: float = 1.0, chunk: Optional[int] = None) -> torch.Tensor:
    """(N, d) hidden states, (V, d) head, (N,) targets -> (N,) float32 log-probs, no (N, V) tensor kept."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return LinearTokenLogps.apply(hidden, weight, bias, targets, temperature, chunk or _chunk_rows(weight.shape[0]))


def linear_log_collision(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         temperature: float = 1.0, chunk: Optional[int] = None) -> torch.Tensor:
    """`token_log_collision` from hidden states, chunked, without gradient: (N, d) -> (N,) float32."""
    chunk = chunk or _chunk_rows(weight.shape[0])
    dtype = _compute_dtype(hidden)
    w = weight.to(dtype)
    out = []
    with torch.no_grad():
        for s in range(0, hidden.shape[0], chunk):
            z = _head_logits(hidden[s:s + chunk].to(dtype), w, bias, temperature)
            out.append(torch.logsumexp(2.0 * z, dim=-1) - 2.0 * torch.logsumexp(z, dim=-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _causal_lm(model):
    base = getattr(model, "module", model)  # DistributedDataParallel, DeepSpeed
    if hasattr(base, "get_base_model"):  # PEFT
        base = base.get_base_model()
    return base


def plain_head(model) -> Optional[torch.nn.Linear]:
    """The LM head when the chunked path can stand in for it: a plain nn.Linear (not LoRA-wrapped) of a model whose
    logits are exactly the head's output (PLAIN_HEAD_MODELS); else None (the full-logits path is used)."""
    base = _causal_lm(model)
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODELS or getattr(config, "final_logit_softcapping", None):
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return head if type(head) is torch.nn.Linear else None


@dataclass
class ScoredTokens:
    """Per-token values of a causal LM forward, shifted (position t scores label t+1): (B, L-1) each.

    `logps` are float32 log-probs (0 where not scored), `mask` the scored positions, `collision` WPO's log Σ p²
    (None unless asked for).
    """

    logps: torch.Tensor
    mask: torch.Tensor
    collision: Optional[torch.Tensor] = None

    def sums(self) -> torch.Tensor:
        return self.logps.sum(-1)


def score_tokens(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 *, temperature: float = 1.0, with_collision: bool = False, chunked: Optional[bool] = None,
                 **forward_kwargs) -> ScoredTokens:
    """Forward a causal LM and score its labels (-100 = not scored), shifted inside: (B, L) -> ScoredTokens.

    Chunked path (`chunked` None = wherever `plain_head` allows): for the duration of this forward the LM head's
    forward is replaced by `linear_token_logps` over the scored positions only, so no (B, L, V) logits, nor their
    float32 copy, nor the log-softmax, ever exist; the head still runs inside the model's forward, so DDP, FSDP and
    DeepSpeed hooks see it. Else the full-logits path (`scored_logits` + `token_logps`). Both give the same values to
    float32 round-off (tests/test_logprobs.py). `forward_kwargs` go to the model (e.g. position_ids).
    """
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    if chunked is False or (chunked is None and plain_head(model) is None):
        logits, kept = scored_logits(model, input_ids, attention_mask, labels, **forward_kwargs)
        skipped = shifted.shape[1] - kept.shape[1]
        pad = lambda t: torch.nn.functional.pad(t, (skipped, 0))  # noqa: E731 - back to (B, L-1)
        logps = pad(token_logps(logits, kept, temperature))
        collision = None
        if with_collision:
            with torch.no_grad():  # only ever used for detached weights
                collision = pad(token_log_collision(logits.detach(), kept, temperature))
        return ScoredTokens(logps, mask, collision)

    width = input_ids.shape[1]
    predict_at = (torch.arange(shifted.shape[0], device=mask.device)[:, None] * width
                  + torch.arange(shifted.shape[1], device=mask.device))[mask]
    values, collision = token_logps_at(model, input_ids, predict_at, shifted[mask], attention_mask=attention_mask,
                                       temperature=temperature, with_collision=with_collision, chunked=True,
                                       **forward_kwargs)
    scatter = lambda v: torch.zeros(mask.shape, dtype=v.dtype, device=v.device).masked_scatter(mask, v)  # noqa: E731
    return ScoredTokens(scatter(values), mask, None if collision is None else scatter(collision))


def token_logps_at(model, input_ids: torch.Tensor, predict_at: torch.Tensor, targets: torch.Tensor, *,
                   attention_mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
                   with_collision: bool = False, chunked: Optional[bool] = None,
                   **forward_kwargs) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log p(targets[m] | the hidden state at flat position predict_at[m]) for M tokens: (M,) float32, and WPO's
    collision term (M,) on request (None otherwise). Flat positions index the (B·L) tokens of `input_ids` row by row.

    Chunked where `plain_head` allows (module docstring of `score_tokens`), else from the model's full logits.
    """
    head = plain_head(model) if chunked is not False else None
    if chunked and head is None:
        raise ValueError("chunked log-probs need a causal LM whose logits are its plain linear head's output")
    if head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs).logits
        picked = logits.reshape(-1, logits.shape[-1])[predict_at][None]
        values = token_logps(picked, targets[None], temperature)[0]
        collision = None
        if with_collision:
            with torch.no_grad():
                collision = token_log_collision(picked.detach(), targets[None], temperature)[0]
        return values, collision

    extra: dict[str, torch.Tensor] = {}

    def head_forward(hidden: torch.Tensor) -> torch.Tensor:
        picked = hidden.reshape(-1, hidden.shape[-1])[predict_at]  # (M, d): the scored positions only
        if with_collision:
            extra["collision"] = linear_log_collision(picked.detach(), head.weight.detach(), head.bias, temperature)
        return linear_token_logps(picked, head.weight, head.bias, targets, temperature)

    head.forward = head_forward  # an instance attribute: shadows nn.Linear.forward for this call only
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs)
    finally:
        del head.forward
    return out.logits, extra.get("collision")
