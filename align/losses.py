"""Preference losses: DPO family, a tie loss, the SFT term, and the pairwise reward-model loss.

Every loss function returns a (B,) tensor of per-example losses; the caller applies weights and the reduction
(`preference_loss` and `reward_pairwise_loss` do both). Inputs named `*_logps` are (B,) sums of completion-token
log-probs (see `align.logprobs`). With implicit rewards

    h_c = β (log π(y_c) - log π_ref(y_c)),   h_r = β (log π(y_r) - log π_ref(y_r)),   h = h_c - h_r,

each DPO-family function below is one line of its paper's objective.
"""

import math
from typing import Any

import torch
import torch.nn.functional as F

from align.errors import ConfigError, DataError


def implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """(h_c, h_r), each (B,): β-scaled log-ratios of policy to reference."""
    return beta * (policy_chosen_logps - ref_chosen_logps), beta * (policy_rejected_logps - ref_rejected_logps)


def _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """h = β[(log π_c - log π_ref,c) - (log π_r - log π_ref,r)], (B,)."""
    h_c, h_r = implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return h_c - h_r


def sigmoid_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, **_):
    """DPO (Rafailov et al. 2023, Eq. 7): all inputs (B,) -> (B,)."""
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return -F.logsigmoid(h)  # -log σ(h)


def robust_loss(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
    label_smoothing=0.0, soft_label=None, **_,
):
    """Conservative DPO (cDPO): the label is right with probability 1 - ε. All inputs (B,) -> (B,).

    `soft_label` (B,), the probability that "chosen" really is preferred (e.g. annotator agreement), sets a per-example
    ε = 1 - soft_label and overrides `label_smoothing`. This is the label-smoothed cross-entropy, not the unbiased
    rDPO of Chowdhury et al. 2024 (which divides by 1 - 2ε and is undefined at ε = 0.5).
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    eps = label_smoothing if soft_label is None else 1.0 - soft_label.to(h.dtype)
    return -(1.0 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)  # -(1-ε) log σ(h) - ε log σ(-h)


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, **_):
    """IPO (Azar et al. 2023, Eq. 17) with τ = β: all inputs (B,) -> (B,).

    Plain IPO on summed log-probs, NOT length-normalised (TRL's `ipo` averages log-probs over tokens first; pass
    averaged log-probs from `sequence_logps(..., average=True)` to get that variant).
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return (h / beta - 1.0 / (2.0 * beta)) ** 2  # (log-ratio difference - 1/(2τ))²


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, **_):
    """SLiC-HF calibration hinge (Zhao et al. 2023) on the DPO margin: all inputs (B,) -> (B,)."""
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return F.relu(1.0 - h)  # max(0, 1 - h)


def tie_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, tie_nu=1.0, **_):
    """-log P(tie) under Davidson's (1970) tie model on the implicit rewards: all inputs (B,) -> (B,).

    With p = exp(h): P(tie) = ν√(p_c p_r) / (p_c + p_r + ν√(p_c p_r)). Writing h = h_c - h_r this is
    ν / (2 cosh(h/2) + ν): it depends only on the margin, is symmetric in chosen/rejected, and is largest at h = 0
    (loss log((2 + ν)/ν), log 3 for ν = 1). Non-tie rows keep their Bradley–Terry loss; Davidson is used only for the
    tie likelihood, which pulls the two implicit rewards together. ν > 0 sets how likely ties are a priori.
    """
    h_c, h_r = implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return davidson_tie_nll(h_c, h_r, tie_nu)


def davidson_tie_nll(score_a: torch.Tensor, score_b: torch.Tensor, nu: float = 1.0) -> torch.Tensor:
    """-log P(tie) for Davidson's model with log-strengths a, b (each (B,)) -> (B,).

    log P(tie) = log ν + (a+b)/2 - logsumexp([a, b, log ν + (a+b)/2]), stable for any magnitudes.
    """
    if nu <= 0:
        raise ConfigError(f"tie_nu must be positive, got {nu}")
    log_tie = math.log(nu) + 0.5 * (score_a + score_b)
    return torch.logsumexp(torch.stack([score_a, score_b, log_tie]), dim=0) - log_tie


def sft_loss(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of the chosen response: (B,), (B,) -> (B,). Lengths below 1 count as 1."""
    return -policy_chosen_logps / chosen_lengths.clamp_min(1)


DPO_LOSSES = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
}


def weighted_mean(losses: torch.Tensor, weights) -> torch.Tensor:
    """Σ w·l / B for (B,) losses and mean-1 weights (None = ones); weight-0 rows are exactly 0 with no gradient.

    We divide by B, not by Σw: the weights are self-normalised to mean 1 over the whole dataset, so this is an
    unbiased piece of the dataset-level weighted mean. Dividing by the micro-batch Σw would renormalise each
    micro-batch again (noisier, and wrong under gradient accumulation and DDP).
    """
    if weights is None:
        return losses.mean()
    # Weights are data, never trained through (WPO-style self-weights must be detached too).
    weights = weights.detach().to(losses.dtype)
    if weights.shape != losses.shape:
        raise DataError(f"weights have shape {tuple(weights.shape)}, expected {tuple(losses.shape)}")
    # where() rather than w·l alone so a weight-0 row cannot leak a NaN or inf loss into the sum.
    contrib = torch.where(weights == 0, torch.zeros_like(losses), weights * losses)
    return contrib.sum() / losses.numel()


def _tie_mask(is_tie, like: torch.Tensor) -> torch.Tensor:
    if is_tie is None:
        return torch.zeros_like(like, dtype=torch.bool)
    return is_tie.to(device=like.device, dtype=torch.bool)


def _strict_accuracy(chosen: torch.Tensor, rejected: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    """Fraction of non-tie rows with chosen > rejected; NaN when every row is a tie."""
    wins = (chosen > rejected).float()[~tie]
    return wins.mean() if wins.numel() else torch.tensor(float("nan"), device=chosen.device)


def dpo_example_losses(
    loss_type: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    *,
    is_tie: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    soft_label: torch.Tensor | None = None,
    tie_nu: float = 1.0,
) -> torch.Tensor:
    """Per-example DPO-family losses with ties, (B,) inputs -> (B,): what training weights and evaluation averages.

    Non-tie rows use `DPO_LOSSES[loss_type]`, tie rows (`is_tie` bool (B,)) use `tie_loss`. `label_smoothing` and
    `soft_label` apply to `robust` only.
    """
    if loss_type not in DPO_LOSSES:
        raise ConfigError(f"unknown loss_type {loss_type!r}; choose one of {sorted(DPO_LOSSES)}")
    if loss_type != "robust" and (label_smoothing or soft_label is not None):
        raise ConfigError(f"label_smoothing and soft_label apply to loss_type 'robust' only, not {loss_type!r}")
    if soft_label is not None and not bool(((soft_label >= 0) & (soft_label <= 1)).all()):
        raise DataError("soft_label must lie in [0, 1] (probability that the chosen response is preferred)")
    args = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    losses = DPO_LOSSES[loss_type](*args, label_smoothing=label_smoothing, soft_label=soft_label)
    tie = _tie_mask(is_tie, losses)
    if bool(tie.any()):
        losses = torch.where(tie, tie_loss(*args, tie_nu=tie_nu), losses)
    return losses


def preference_loss(
    loss_type: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    *,
    weights: torch.Tensor | None = None,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted DPO-family loss with ties: (B,) inputs -> (scalar loss, metrics of detached 0-d tensors).

    The per-example losses of `dpo_example_losses` (`options`: is_tie, label_smoothing, soft_label, tie_nu) are
    multiplied by `weights` (B,) and reduced as Σ w·l / B (see `weighted_mean`). Metrics are unweighted means;
    `rewards/accuracies` counts non-tie rows only.
    """
    args = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    losses = dpo_example_losses(loss_type, *args, **options)
    loss = weighted_mean(losses, weights)
    is_tie = options.get("is_tie")

    with torch.no_grad():
        h_c, h_r = implicit_rewards(*args)
        metrics = {
            "rewards/chosen": h_c.mean(),
            "rewards/rejected": h_r.mean(),
            "rewards/margins": (h_c - h_r).mean(),
            "rewards/accuracies": _strict_accuracy(h_c, h_r, _tie_mask(is_tie, losses)),
            "logps/chosen": policy_chosen_logps.detach().mean(),
            "logps/rejected": policy_rejected_logps.detach().mean(),
        }
    return loss, metrics


def reward_example_losses(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    is_tie: torch.Tensor | None = None,
    tie_nu: float = 1.0,
) -> torch.Tensor:
    """Per-example Bradley–Terry reward-model losses with ties, (B,) rewards -> (B,).

    Non-tie rows: -log σ(r_c - r_r - m) (Ouyang et al. 2022; margin m as in Llama 2). Tie rows: Davidson's -log P(tie)
    on (r_c, r_r); the margin does not apply to them. Rewards of shape (B, 1) (a scalar head) are accepted.
    """
    r_c, r_r = _squeeze_head(rewards_chosen), _squeeze_head(rewards_rejected)
    diff = r_c - r_r
    losses = -F.logsigmoid(diff if margin is None else diff - margin.to(diff.dtype))  # -log σ(r_c - r_r - m)
    tie = _tie_mask(is_tie, losses)
    if bool(tie.any()):
        losses = torch.where(tie, davidson_tie_nll(r_c, r_r, tie_nu), losses)
    return losses


def _squeeze_head(rewards: torch.Tensor) -> torch.Tensor:
    return rewards.squeeze(-1) if rewards.dim() == 2 else rewards


def reward_pairwise_loss(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    is_tie: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    center_coef: float = 0.0,
    tie_nu: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted Bradley–Terry reward-model loss with ties: (B,) rewards -> (scalar loss, metrics).

    The per-example losses of `reward_example_losses`, weighted and reduced as Σ w·l / B. Centering (Eisenstein et
    al. 2023) adds center_coef · Σ w·(r_c + r_r)² / B, weighted like the main term so a weight-0 row contributes
    nothing at all; with weights = None it is the usual mean.
    Metrics: `accuracy` (strict r_c > r_r over non-tie rows, NaN if none), `margin` (mean r_c - r_r over non-tie rows),
    `rewards/chosen`, `rewards/rejected`.
    """
    r_c, r_r = _squeeze_head(rewards_chosen), _squeeze_head(rewards_rejected)
    losses = reward_example_losses(r_c, r_r, margin=margin, is_tie=is_tie, tie_nu=tie_nu)
    loss = weighted_mean(losses, weights)
    if center_coef:
        loss = loss + center_coef * weighted_mean((r_c + r_r) ** 2, weights)  # η (r_c + r_r)²

    with torch.no_grad():
        tie = _tie_mask(is_tie, losses)
        non_tie = (r_c - r_r)[~tie]
        metrics = {
            "accuracy": _strict_accuracy(r_c, r_r, tie),
            "margin": non_tie.mean() if non_tie.numel() else torch.tensor(float("nan"), device=r_c.device),
            "rewards/chosen": r_c.mean(),
            "rewards/rejected": r_r.mean(),
        }
    return loss, metrics
