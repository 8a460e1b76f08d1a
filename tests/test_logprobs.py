import math

import torch

from align.logprobs import (IGNORE_INDEX, scored_logits, sequence_logps, shift_for_causal_lm, token_log_collision,
                            token_logps)


def _naive_token_logps(logits, labels, temperature=1.0):
    """Position-by-position log softmax, written as plainly as possible."""
    batch, steps, vocab = logits.shape
    out = torch.zeros(batch, steps)
    for b in range(batch):
        for t in range(steps):
            label = int(labels[b, t])
            if label == -100:
                continue
            z = [float(logits[b, t, v]) / temperature for v in range(vocab)]
            out[b, t] = z[label] - math.log(sum(math.exp(x) for x in z))
    return out


def test_token_logps_matches_naive_loop():
    """Random logits (2, 4, 7) with masked positions: every entry equals z[y] - log Σ_v exp z[v] from a Python loop."""
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7) * 3
    labels = torch.tensor([[1, 6, -100, 0], [-100, -100, 3, 5]])
    assert torch.allclose(token_logps(logits, labels), _naive_token_logps(logits, labels), atol=1e-5)


def test_temperature_on_hand_computed_position():
    """logits [2, 0] at T = 2 are [1, 0]: log p(0) = 1 - log(e + 1) = -0.313262, log p(1) = -log(e + 1) = -1.313262."""
    logits = torch.tensor([[[2.0, 0.0], [2.0, 0.0]]])
    labels = torch.tensor([[0, 1]])
    got = token_logps(logits, labels, temperature=2.0)
    assert torch.allclose(got, torch.tensor([[-0.3132617, -1.3132617]]), atol=1e-6)
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 5)
    labels = torch.randint(0, 5, (2, 3))
    assert torch.allclose(token_logps(logits, labels, 0.7), _naive_token_logps(logits, labels, 0.7), atol=1e-5)


def test_masking_and_sequence_sum_and_mean():
    """Uniform logits over V = 4: each scored token is log(1/4) = -1.386294; ignored ones are exactly 0.

    Row 0 scores 3 tokens: sum = 3·(-1.386294) = -4.158883, mean = -1.386294. Row 1 scores none: sum = mean = 0.
    """
    logits = torch.zeros(2, 3, 4)
    labels = torch.tensor([[0, 1, 2], [-100, -100, -100]])
    per_token = token_logps(logits, labels)
    assert per_token[1].eq(0).all()
    assert torch.allclose(sequence_logps(logits, labels), torch.tensor([-3 * math.log(4), 0.0]))
    assert torch.allclose(sequence_logps(logits, labels, average=True), torch.tensor([-math.log(4), 0.0]))


def test_bf16_input_gives_float32_output():
    """bf16 logits upcast exactly to float32, so the result equals scoring the upcast logits, and is float32."""
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 11).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 5))
    got = token_logps(logits, labels)
    assert got.dtype == torch.float32
    assert torch.allclose(got, token_logps(logits.float(), labels), atol=1e-6)
    assert sequence_logps(logits, labels).dtype == torch.float32


def test_shift_for_causal_lm_drops_last_logit_and_first_label():
    """Position t predicts token t + 1: logits (1, 4, V) -> (1, 3, V) from positions 0..2; labels -> tokens 1..3."""
    logits = torch.arange(12.0).reshape(1, 4, 3)
    labels = torch.tensor([[10, 11, 12, 13]])
    shifted_logits, shifted_labels = shift_for_causal_lm(logits, labels)
    assert torch.equal(shifted_logits, logits[:, :3])
    assert torch.equal(shifted_labels, torch.tensor([[11, 12, 13]]))


def test_gradients_flow_through_token_logps():
    """d/dz log softmax(z)[y] = onehot(y) - softmax(z): for z = 0 over V = 2 and y = 0 that is [0.5, -0.5]."""
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    token_logps(logits, torch.tensor([[0]])).sum().backward()
    assert torch.allclose(logits.grad, torch.tensor([[[0.5, -0.5]]]))


def test_token_log_collision_uniform_and_peaked():
    """Uniform over V = 4: Σ p² = 4·(1/4)² = 1/4, log = -1.386294. Logits [ln 3, 0]: p = [3/4, 1/4], Σ p² = 10/16."""
    uniform = token_log_collision(torch.zeros(1, 2, 4), torch.tensor([[1, -100]]))
    assert torch.allclose(uniform, torch.tensor([[-math.log(4), 0.0]]))
    peaked = token_log_collision(torch.tensor([[[math.log(3), 0.0]]]), torch.tensor([[0]]))
    assert torch.allclose(peaked, torch.tensor([[math.log(10 / 16)]]))


def test_scored_logits_skip_the_prompt_and_change_no_value(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear")).eval()
    ids = torch.randint(3, 250, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0  # right padding
    labels = ids.clone()
    labels[0, :5], labels[1, :7], labels[2, :4] = IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX  # prompts of 5, 7, 4
    labels[2, 10:] = IGNORE_INDEX
    with torch.no_grad():
        logits, kept_labels = scored_logits(model, ids, mask, labels)
        full_logits, full_labels = shift_for_causal_lm(model(input_ids=ids, attention_mask=mask).logits, labels)
    # The shortest prompt has 4 tokens: label 4 is the first scored, predicted by logit 3; 8 of 11 shifted positions.
    assert logits.shape == (3, 8, full_logits.shape[-1]) and torch.equal(kept_labels, full_labels[:, 3:])
    torch.testing.assert_close(logits, full_logits[:, 3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sequence_logps(logits, kept_labels), sequence_logps(full_logits, full_labels),
                               rtol=1e-5, atol=1e-5)

    class NoKeep(torch.nn.Module):  # a model whose forward has no logits_to_keep gets every position
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    with torch.no_grad():
        logits, kept_labels = scored_logits(NoKeep(model), ids, mask, labels)
    assert logits.shape == full_logits.shape and torch.equal(kept_labels, full_labels)
