import math

import pytest
import torch

from align.errors import ConfigError
from align.losses import (
    DPO_LOSSES,
    dpo_example_losses,
    hinge_loss,
    ipo_loss,
    preference_loss,
    reward_example_losses,
    reward_pairwise_loss,
    robust_loss,
    sft_loss,
    sigmoid_loss,
    tie_loss,
)

BETA = 0.5
LOG1P_EXP_M1 = math.log1p(math.exp(-1))  # -log σ(1) = 0.3132617
LOG1P_EXP_1 = math.log1p(math.e)  # -log σ(-1) = 1.3132617
TIE_AT_1 = math.log(2 * math.cosh(0.5) + 1)  # Davidson ν = 1 at margin ±1: log(3.255252) = 1.180330


def _pairs(requires_grad=False):
    """Two pairs with β = 0.5.

    Pair 0: π_c = -10, π_r = -12, ref = -11, -11 -> h_c = 0.5·1 = 0.5, h_r = 0.5·(-1) = -0.5, h = 1.
    Pair 1: π_c = -12, π_r = -10, same ref -> h_c = -0.5, h_r = 0.5, h = -1.
    """
    pc = torch.tensor([-10.0, -12.0], requires_grad=requires_grad)
    pr = torch.tensor([-12.0, -10.0], requires_grad=requires_grad)
    ref = torch.tensor([-11.0, -11.0])
    return pc, pr, ref, ref.clone()


def test_sigmoid_on_hand_computed_pairs():
    """-log σ(h): h = 1 -> log(1 + e^-1) = 0.313262; h = -1 -> log(1 + e) = 1.313262."""
    got = sigmoid_loss(*_pairs(), BETA)
    assert torch.allclose(got, torch.tensor([LOG1P_EXP_M1, LOG1P_EXP_1]))


def test_robust_on_hand_computed_pairs():
    """-(1-ε) log σ(h) - ε log σ(-h) = -log σ(h) + ε·h (since log σ(h) - log σ(-h) = h).

    ε = 0.1: h = 1 -> 0.313262 + 0.1 = 0.413262; h = -1 -> 1.313262 - 0.1 = 1.213262.
    """
    got = robust_loss(*_pairs(), BETA, label_smoothing=0.1)
    assert torch.allclose(got, torch.tensor([LOG1P_EXP_M1 + 0.1, LOG1P_EXP_1 - 0.1]))


def test_robust_reduces_to_sigmoid_and_soft_label_matches_smoothing():
    """ε = 0 and soft_label = 1 both give plain DPO; soft_label = 0.9 is ε = 0.1 per row."""
    plain = sigmoid_loss(*_pairs(), BETA)
    assert torch.allclose(robust_loss(*_pairs(), BETA, label_smoothing=0.0), plain)
    assert torch.allclose(robust_loss(*_pairs(), BETA, soft_label=torch.ones(2)), plain)
    smoothed = robust_loss(*_pairs(), BETA, label_smoothing=0.1)
    assert torch.allclose(robust_loss(*_pairs(), BETA, soft_label=torch.full((2,), 0.9)), smoothed)


def test_ipo_on_hand_computed_pairs():
    """(h/β - 1/(2β))² with 1/(2β) = 1: h/β = 2 -> (2 - 1)² = 1; h/β = -2 -> (-2 - 1)² = 9."""
    assert torch.allclose(ipo_loss(*_pairs(), BETA), torch.tensor([1.0, 9.0]))


def test_hinge_on_hand_computed_pairs():
    """relu(1 - h): h = 1 -> 0; h = -1 -> 2."""
    assert torch.allclose(hinge_loss(*_pairs(), BETA), torch.tensor([0.0, 2.0]))


def test_tie_loss_values_symmetry_and_minimum_at_zero_margin():
    """Davidson, ν = 1: -log P(tie) = log(2 cosh(h/2) + ν) - log ν.

    h = ±1 -> log(2·1.127626 + 1) = 1.180330 for both rows (symmetric); h = 0 -> log 3 = 1.098612, the minimum.
    """
    got = tie_loss(*_pairs(), BETA)
    assert torch.allclose(got, torch.tensor([TIE_AT_1, TIE_AT_1]))
    pc, pr, rc, rr = _pairs()
    assert torch.allclose(tie_loss(pr, pc, rr, rc, BETA), got)  # swapping chosen and rejected changes nothing
    shifts = torch.linspace(-3, 3, 61)  # policy_chosen_logps = ref + shift: margin h = β·shift
    losses = tie_loss(shifts, torch.zeros(61), torch.zeros(61), torch.zeros(61), BETA)
    assert int(losses.argmin()) == 30 and math.isclose(float(losses[30]), math.log(3), rel_tol=1e-6)
    nu2 = tie_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), BETA, tie_nu=2.0)
    assert math.isclose(float(nu2), math.log(4 / 2), rel_tol=1e-6)  # log((2 + ν)/ν) at h = 0


def test_tie_loss_gradient_is_zero_at_zero_margin():
    """d/dh log(2 cosh(h/2) + ν) = sinh(h/2)/(2 cosh(h/2) + ν) = 0 at h = 0."""
    pc = torch.tensor([-5.0], requires_grad=True)
    tie_loss(pc, torch.tensor([-7.0]), torch.tensor([-5.0]), torch.tensor([-7.0]), BETA).sum().backward()
    assert abs(float(pc.grad)) < 1e-7


def test_sft_loss_is_per_token_nll():
    """-(-10)/5 = 2 and -(-6)/3 = 2."""
    assert torch.allclose(sft_loss(torch.tensor([-10.0, -6.0]), torch.tensor([5, 3])), torch.tensor([2.0, 2.0]))


def test_preference_loss_weights_reduce_by_batch_size_not_weight_sum():
    """Σ w·l / B with B = 2. weights [2, 0]: (2·0.313262 + 0)/2 = 0.313262.
    weights [3, 1]: (3·0.313262 + 1·1.313262)/2 = 1.126524 (Σ w·l / Σ w would give 0.563262)."""
    loss, _ = preference_loss("sigmoid", *_pairs(), BETA, weights=torch.tensor([2.0, 0.0]))
    assert math.isclose(float(loss), LOG1P_EXP_M1, rel_tol=1e-6)
    loss, _ = preference_loss("sigmoid", *_pairs(), BETA, weights=torch.tensor([3.0, 1.0]))
    assert math.isclose(float(loss), (3 * LOG1P_EXP_M1 + LOG1P_EXP_1) / 2, rel_tol=1e-6)


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSSES))
def test_weight_zero_row_gets_no_gradient(loss_type):
    """Row 1 has weight 0: the gradient of the loss w.r.t. its policy log-probs is exactly 0; row 0's is not."""
    pc, pr, rc, rr = _pairs(requires_grad=True)
    loss, _ = preference_loss(loss_type, pc, pr, rc, rr, BETA, weights=torch.tensor([1.0, 0.0]))
    loss.backward()
    assert pc.grad[1] == 0 and pr.grad[1] == 0
    if loss_type != "hinge":  # the hinge is flat at h = 1, so row 0 has no gradient there either
        assert pc.grad[0] != 0


def test_preference_loss_ties_and_metrics():
    """is_tie = [False, True]: loss = (-log σ(1) + tie(h = -1))/2 = (0.313262 + 1.180330)/2 = 0.746796.

    Metrics: rewards/chosen = mean(0.5, -0.5) = 0, margins = mean(1, -1) = 0, accuracy over the non-tie row 0 = 1,
    logps/chosen = mean(-10, -12) = -11.
    """
    loss, metrics = preference_loss("sigmoid", *_pairs(), BETA, is_tie=torch.tensor([False, True]))
    assert math.isclose(float(loss), (LOG1P_EXP_M1 + TIE_AT_1) / 2, rel_tol=1e-6)
    assert float(metrics["rewards/accuracies"]) == 1.0
    assert float(metrics["rewards/chosen"]) == 0.0 and float(metrics["rewards/margins"]) == 0.0
    assert float(metrics["logps/chosen"]) == -11.0 and float(metrics["logps/rejected"]) == -11.0
    assert not any(m.requires_grad for m in metrics.values())


def test_preference_loss_rejects_bad_config():
    with pytest.raises(ConfigError, match="unknown loss_type"):
        preference_loss("nope", *_pairs(), BETA)
    with pytest.raises(ConfigError, match="robust"):
        preference_loss("sigmoid", *_pairs(), BETA, label_smoothing=0.1)


def test_reward_loss_plain_margin_weights_centering():
    """r_c = [1, 0], r_r = [0, 1]: -log σ(±1) = [0.313262, 1.313262].

    plain mean = 0.813262, accuracy 1/2, margin mean(1, -1) = 0;
    margin m = [1, 0]: [-log σ(0), 1.313262] = [0.693147, 1.313262], mean 1.003204;
    weights [0.5, 1.5]: (0.5·0.313262 + 1.5·1.313262)/2 = 1.063262;
    center_coef 0.01: (r_c + r_r)² = [1, 1], + 0.01·1 -> 0.823262.
    """
    r_c, r_r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    loss, metrics = reward_pairwise_loss(r_c, r_r)
    assert math.isclose(float(loss), (LOG1P_EXP_M1 + LOG1P_EXP_1) / 2, rel_tol=1e-6)
    assert float(metrics["accuracy"]) == 0.5 and float(metrics["margin"]) == 0.0
    loss, _ = reward_pairwise_loss(r_c, r_r, margin=torch.tensor([1.0, 0.0]))
    assert math.isclose(float(loss), (math.log(2) + LOG1P_EXP_1) / 2, rel_tol=1e-6)
    loss, _ = reward_pairwise_loss(r_c, r_r, weights=torch.tensor([0.5, 1.5]))
    assert math.isclose(float(loss), (0.5 * LOG1P_EXP_M1 + 1.5 * LOG1P_EXP_1) / 2, rel_tol=1e-6)
    loss, _ = reward_pairwise_loss(r_c, r_r, center_coef=0.01)
    assert math.isclose(float(loss), (LOG1P_EXP_M1 + LOG1P_EXP_1) / 2 + 0.01, rel_tol=1e-6)


def test_reward_loss_tie_term_and_scalar_head_shape():
    """Row 1 a tie with r = (0, 1): Davidson log(2 cosh(1/2) + 1) = 1.180330; margin does not apply to it.

    loss = (0.313262 + 1.180330)/2 = 0.746796; accuracy over non-tie row 0 = 1; margin over non-tie rows = 1.
    Rewards of shape (B, 1) from a scalar head give the same.
    """
    r_c, r_r = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])
    tie = torch.tensor([False, True])
    loss, metrics = reward_pairwise_loss(r_c, r_r, is_tie=tie, margin=torch.tensor([0.0, 5.0]))
    assert math.isclose(float(loss), (LOG1P_EXP_M1 + TIE_AT_1) / 2, rel_tol=1e-6)
    assert float(metrics["accuracy"]) == 1.0 and float(metrics["margin"]) == 1.0


def test_reward_loss_weight_zero_row_gets_no_gradient_even_with_centering():
    r_c = torch.tensor([1.0, 0.0], requires_grad=True)
    r_r = torch.tensor([0.0, 1.0], requires_grad=True)
    loss, _ = reward_pairwise_loss(r_c, r_r, weights=torch.tensor([1.0, 0.0]), center_coef=0.1)
    loss.backward()
    assert r_c.grad[1] == 0 and r_r.grad[1] == 0 and r_c.grad[0] != 0


def test_per_example_losses_are_what_the_training_losses_average():
    """Evaluation averages dpo_example_losses / reward_example_losses; training weights the same values."""
    pc, pr, rc, rr = _pairs()
    tie = torch.tensor([True, False])
    per_example = dpo_example_losses("sigmoid", pc, pr, rc, rr, BETA, is_tie=tie)
    assert per_example.tolist() == pytest.approx([TIE_AT_1, LOG1P_EXP_1], abs=1e-6)  # pair 0 a tie, pair 1 h = -1
    weights = torch.tensor([0.5, 1.5])
    loss, _ = preference_loss("sigmoid", pc, pr, rc, rr, BETA, is_tie=tie, weights=weights)
    assert loss.item() == pytest.approx((0.5 * TIE_AT_1 + 1.5 * LOG1P_EXP_1) / 2, abs=1e-6)
    r_c, r_r, margin = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5])
    per_pair = reward_example_losses(r_c, r_r, margin=margin, is_tie=tie)
    assert per_pair.tolist() == pytest.approx([TIE_AT_1, math.log1p(math.exp(1.5))], abs=1e-6)
    assert reward_pairwise_loss(r_c, r_r, margin=margin, is_tie=tie)[0].item() == pytest.approx(
        per_pair.mean().item(), abs=1e-7)
