import math

import pytest
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


# --- chunked log-probs from the hidden states (no full-vocabulary logits) ---------------------------------------------


def _lora_model(dtype=torch.float32, vocab=300, seed=0):
    from align.config import LoraArgs
    from align.models import apply_lora, tiny_model

    model = apply_lora(tiny_model(vocab_size=vocab, seed=seed).to(dtype), LoraArgs(lora_dropout=0.0))
    torch.manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # a trained adapter: gradients reach both LoRA matrices
    return model


def _scored_batch(vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (4, 20), generator=g)
    labels = ids.clone()
    labels[:, :7] = IGNORE_INDEX  # prompts
    labels[1, :11] = IGNORE_INDEX
    labels[2, 15:] = IGNORE_INDEX  # right padding
    mask = (labels[:, :] != IGNORE_INDEX) | (torch.arange(20) < 7)
    return ids, labels, mask.long()


def _both_paths(model, ids, labels, mask, **kwargs):
    """(sums, collision sums, {param: grad}) on the full-logits path and on the chunked path."""
    import align.logprobs as lp

    out = {}
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        scored = lp.score_tokens(model, ids, labels, mask, chunked=chunked, with_collision=True, **kwargs)
        sums = scored.sums()
        (sums * torch.arange(1.0, 1.0 + len(sums))).sum().backward()  # distinct weights per row
        out[chunked] = (sums.detach(), scored.collision.sum(-1),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return out[False], out[True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logps_equal_full_logits_values_and_gradients(dtype, monkeypatch):
    """Many chunks (5 rows each): sequence log-probs within 1e-5 relative of the full-logits path, WPO collision the
    same, and every LoRA gradient equal; at temperature 0.7 too. Row 2 is padded, row 1 has a longer prompt.

    bf16 at T != 1: the full path rounds the gradient of the picked logit and that of the log-normaliser to bf16
    separately and adds them in bf16; ours adds them in float32 and rounds once, so the gradients agree to bf16
    round-off (1%), not bit for bit."""
    import align.logprobs as lp

    monkeypatch.setattr(lp, "CHUNK_ELEMENTS", 300 * 5)
    model = _lora_model(dtype)
    ids, labels, mask = _scored_batch()
    for temperature in (1.0, 0.7):
        (full, full_coll, full_grads), (ours, our_coll, our_grads) = _both_paths(model, ids, labels, mask,
                                                                                 temperature=temperature)
        assert full.dtype == ours.dtype == torch.float32
        torch.testing.assert_close(ours, full, rtol=1e-5, atol=0)
        torch.testing.assert_close(our_coll, full_coll, rtol=1e-5, atol=1e-6)
        assert set(full_grads) == set(our_grads) and len(full_grads) == 28  # 2 layers × 7 modules × (A, B)
        tol = 2e-2 if dtype == torch.bfloat16 and temperature != 1.0 else 1e-6
        for name, grad in full_grads.items():
            torch.testing.assert_close(our_grads[name].float(), grad.float(), rtol=1e-4,
                                       atol=tol * float(grad.abs().max()))


def test_chunked_head_gradient_of_full_fine_tuning(monkeypatch):
    """Full fine-tuning trains the (tied) head: its gradient from the chunked backward equals autograd's."""
    import align.logprobs as lp
    from align.models import tiny_model

    monkeypatch.setattr(lp, "CHUNK_ELEMENTS", 300 * 3)
    model = tiny_model(vocab_size=300)
    ids, labels, mask = _scored_batch(seed=3)
    (full, _, full_grads), (ours, _, our_grads) = _both_paths(model, ids, labels, mask)
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=0)
    assert "lm_head.weight" in full_grads or "model.embed_tokens.weight" in full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()))


def test_linear_token_logps_gradcheck_with_bias():
    """A head with a bias, float64, 3 chunks: torch's numerical gradcheck of hidden, weight and bias."""
    from align.logprobs import linear_token_logps

    torch.manual_seed(4)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    assert torch.autograd.gradcheck(lambda h, w, b: linear_token_logps(h, w, b, targets, 0.9, chunk=3),
                                    (hidden, weight, bias))
    expected = token_logps((hidden @ weight.T + bias)[None], targets[None], 0.9)[0]
    torch.testing.assert_close(linear_token_logps(hidden, weight, bias, targets, 0.9, chunk=3), expected.double(),
                               rtol=1e-6, atol=1e-6)  # token_logps works in float32


def test_linear_token_logps_one_chunk_keeps_probabilities_exactly():
    """One chunk: the forward's probabilities serve the backward (no second head matmul); gradcheck passes, the
    gradients equal the many-chunk path's, and a second backward (retain_graph) rebuilds them and agrees."""
    from align.logprobs import linear_token_logps

    torch.manual_seed(5)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    assert torch.autograd.gradcheck(lambda h, w: linear_token_logps(h, w, None, targets, 0.8, chunk=7), (hidden, weight))
    grads = {}
    for chunk in (7, 2):
        out = linear_token_logps(hidden, weight, None, targets, 0.8, chunk=chunk)
        first = torch.autograd.grad((out * torch.arange(1.0, 8.0, dtype=out.dtype)).sum(), (hidden, weight),
                                    retain_graph=True)
        second = torch.autograd.grad((out * torch.arange(1.0, 8.0, dtype=out.dtype)).sum(), (hidden, weight))
        for a, b in zip(first, second):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        grads[chunk] = first
    for a, b in zip(grads[7], grads[2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # the head gradient accumulates in float32


def test_chunked_path_only_where_the_head_is_plain(monkeypatch):
    """A soft-capped model (or one not known to use its plain head) gets the full-logits path; forcing the chunked
    path there is an error, not a silent wrong value. The head's forward is restored after each call."""
    import align.logprobs as lp

    model = _lora_model()
    assert lp.plain_head(model) is model.get_base_model().lm_head
    ids, labels, mask = _scored_batch()
    lp.score_tokens(model, ids, labels, mask)
    assert "forward" not in vars(model.get_base_model().lm_head)
    model.get_base_model().config.final_logit_softcapping = 30.0
    assert lp.plain_head(model) is None
    with pytest.raises(ValueError, match="plain linear head"):
        lp.score_tokens(model, ids, labels, mask, chunked=True)
