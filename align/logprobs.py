"""Per-token and per-sequence log-probabilities from logits, in float32.

Conventions (DESIGN.md §2): `*_token_logps` are (B, T) per-token values, `*_logps` are (B,) sums over the completion.
Labels equal to -100 mark positions that are not scored (prompt, padding); they contribute exactly 0.

Every function here is shift-free: `logits[:, t]` must already predict `labels[:, t]`. Call
`shift_for_causal_lm` once, where the model output is produced, so the off-by-one lives in one place.
"""

import inspect

import torch

IGNORE_INDEX = -100


def shift_for_causal_lm(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align a causal LM's outputs with its targets.

    logits: (B, L, V), labels: (B, L) -> logits (B, L-1, V), labels (B, L-1).
    Position t of a causal LM predicts token t+1, so drop the last logit and the first label.
    """
    return logits[:, :-1, :], labels[:, 1:]


def scored_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
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
