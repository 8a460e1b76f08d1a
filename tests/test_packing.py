"""Padding-free preference batches (align/packing.py): one packed row with the prompt computed once gives the padded
batch's log-probs, rewards, losses and gradients; the attention implementation is SDPA for every other call."""

import random

import pytest
import torch

from align import packing
from align.config import DPOArgs, RewardArgs
from align.preference import PreferenceCollator, completion_logps
from align.runs import read_metrics


def _features(n=4, vocab=300, seed=0):
    rng = random.Random(seed)
    ids = lambda lo, hi: [rng.randrange(vocab) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    return [{"index": i, "prompt_ids": ids(3, 11), "chosen_ids": ids(1, 9), "rejected_ids": ids(1, 9),
             "is_tie": i == 1, "soft_label": None, "weight": 1.0 + i} for i in range(n)]


def _lora_lm(checkpointing=False):
    from align.config import LoraArgs
    from align.models import apply_lora, tiny_model

    model = apply_lora(tiny_model(vocab_size=300), LoraArgs(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    if checkpointing:
        from align.runs import enable_checkpointing

        enable_checkpointing(model, use_reentrant=False)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    return model


def _run(model, batch, fn):
    model.zero_grad(set_to_none=True)
    out = fn(model, batch)
    loss = sum((i + 1.0) * v.float().sum() for i, v in enumerate(out))  # distinct weights: every output counts
    loss.backward()
    return [v.detach() for v in out], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(padded, packed, rtol=1e-5):
    (values_a, grads_a), (values_b, grads_b) = padded, packed
    for a, b in zip(values_a, values_b):
        torch.testing.assert_close(b, a, rtol=rtol, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_dpo_logps_and_gradients_equal_padded(checkpointing):
    """Four pairs of random lengths: summed log-probs, lengths, WPO collision and every LoRA gradient agree with the
    padded batch's, with gradient checkpointing too (its recompute sees the same spans)."""
    model = _lora_lm(checkpointing)
    model.train()
    features = _features()
    previous = packing.use_packed_attention(model)
    assert previous == "sdpa"
    keys = ("chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths", "chosen_log_collision",
            "rejected_log_collision")
    fn = lambda m, b: [completion_logps(m, b, with_collision=True)[k] for k in keys]  # noqa: E731
    padded_batch = PreferenceCollator(0)(features)
    packed_batch = packing.PackedPreferenceCollator(0)(features)
    # No padding and each prompt once: the packed row holds Σ (P + C + R) tokens, the padded batch 2B × width.
    assert packed_batch["real_tokens"] == sum(len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"])
                                              for f in features)
    assert packed_batch["real_tokens"] < padded_batch["attention_mask"].sum() < padded_batch["input_ids"].numel()
    _assert_same(_run(model, padded_batch, fn), _run(model, packed_batch, fn))
    # The per-pair columns are the padded collator's.
    for key in ("index", "is_tie", "soft_label", "weight"):
        torch.testing.assert_close(packed_batch[key], padded_batch[key], equal_nan=True)
    packing.restore_attention(model, previous)
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_one_token_responses_packed_equal_padded():
    """A response of one token (an immediate end of turn) is a one-query span: with grouped key/value heads it takes
    transformers' single-query SDPA path, which needs a 4-D mask."""
    model = _lora_lm()
    features = _features(n=3, seed=9)
    features[0]["rejected_ids"], features[1]["chosen_ids"] = features[0]["rejected_ids"][:1], features[1]["chosen_ids"][:1]
    fn = lambda m, b: [v for k, v in completion_logps(m, b).items() if k.endswith("_logps")]  # noqa: E731
    expected = _run(model, PreferenceCollator(0)(features), fn)
    previous = packing.use_packed_attention(model)
    _assert_same(expected, _run(model, packing.PackedPreferenceCollator(0)(features), fn))
    packing.restore_attention(model, previous)


def test_packed_attention_is_sdpa_without_segments():
    """After the switch, a padded forward (generation, padded scoring) gives exactly the SDPA logits."""
    model = _lora_lm().eval()
    batch = PreferenceCollator(0)(_features(seed=2))
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        previous = packing.use_packed_attention(model)
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    packing.restore_attention(model, previous)
    assert torch.equal(before, after)


def test_packed_rewards_and_gradients_equal_padded():
    """A LoRA sequence classifier: the score head read at each response's last token of the packed row gives the
    padded batch's rewards (read at the last non-padding token) and the same gradients, head included."""
    from align.config import LoraArgs
    from align.models import tiny_model
    from align.trainers.reward import apply_reward_lora, pair_rewards
    from transformers import LlamaForSequenceClassification

    lm = tiny_model(vocab_size=300)
    torch.manual_seed(3)
    classifier = LlamaForSequenceClassification(lm.config.__class__(**{**lm.config.to_dict(), "num_labels": 1,
                                                                       "pad_token_id": 0}))
    model = apply_reward_lora(classifier, LoraArgs(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    features = _features(seed=4)
    for f in features:  # the padded batch finds a row's end as its last non-pad token: keep 0 out of the data
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            f[key] = [t or 1 for t in f[key]]
    previous = packing.use_packed_attention(model)
    padded = _run(model, PreferenceCollator(0)(features), lambda m, b: list(pair_rewards(m, b)))
    packed = _run(model, packing.PackedPreferenceCollator(0)(features), lambda m, b: list(pair_rewards(m, b)))
    assert any("score" in name for name in padded[1])
    _assert_same(padded, packed)
    packing.restore_attention(model, previous)


def test_training_runs_padding_free_equal_padded_runs(tiny_model_dir, tmp_path):
    """DPO and reward training, 3 steps, padding_free on (the default) and off: the logged losses agree, step by
    step, to float round-off."""
    from tests.helpers import dpo_configs as configs, load_tokenizer, pair_rows, reward_configs, write_pairs

    from align.trainers.dpo import train_dpo
    from align.trainers.reward import train_reward

    assert DPOArgs().padding_free and RewardArgs().padding_free
    tokenizer = load_tokenizer(tiny_model_dir)
    data = (write_pairs(tmp_path / "train.jsonl", pair_rows(tokenizer, n=8)),
            write_pairs(tmp_path / "eval.jsonl", pair_rows(tokenizer, 4, offset=50)))
    losses = {}
    for padding_free in (True, False):
        out = tmp_path / f"dpo-{padding_free}"
        train_dpo(*configs(tiny_model_dir, data, out, dpo=DPOArgs(padding_free=padding_free), max_steps=3,
                           eval_steps=0, save_steps=10))
        rm = tmp_path / f"rm-{padding_free}"
        model_args, lora, data_args, reward_args, weighting, train = reward_configs(tiny_model_dir, *data, rm)
        reward_args.padding_free = padding_free
        train_reward(model_args, lora, data_args, reward_args, weighting, train)
        losses[padding_free] = [[r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r]
                                for d in (out, rm)]
    assert len(losses[True][0]) == len(losses[True][1]) == 3
    for ours, padded in zip(losses[True], losses[False]):
        assert ours == pytest.approx(padded, rel=1e-4)


# --- SFT: TRL's padding-free rows of whole sequences -----------------------------------------------------------------


def _sft_features(n=4, vocab=300, seed=5):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, answer = rng.randint(2, 9), rng.randint(1, 12)
        ids = [rng.randrange(1, vocab) for _ in range(prompt + answer)]
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def test_sft_padding_free_rows_equal_padded_loss_and_gradients(monkeypatch):
    """TRL's padding-free collator (one row, restarting position ids, `cu_seq_lens_*`) under "align_packed": the
    loss and every LoRA gradient equal the padded batch's, and attention runs sequence by sequence (no query span
    longer than the longest sequence, so no N x N mask over the row)."""
    from transformers.integrations import sdpa_attention
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = _lora_lm()
    model.train()
    features = _sft_features()
    padded_batch = DataCollatorForLanguageModeling(pad_token_id=0)(features)
    packed_batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(features)
    assert packed_batch["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in features))
    loss = lambda m, b: [m(**b).loss]  # noqa: E731 - mean NLL over the labelled tokens, shifted inside
    padded = _run(model, padded_batch, loss)
    previous = packing.use_packed_attention(model)
    spans = []
    real = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward",
                        lambda module, q, *a, **kw: spans.append(q.shape[2]) or real(module, q, *a, **kw))
    packed = _run(model, packed_batch, loss)
    _assert_same(padded, packed)
    longest = max(len(f["input_ids"]) for f in features)
    assert spans and max(spans) == longest and len(spans) == 2 * len(features)  # 2 layers x 4 sequences
    # Without cu_seq_lens the restarting position ids give the same spans.
    spans.clear()
    no_bounds = {k: v for k, v in packed_batch.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    _assert_same(padded, _run(model, no_bounds, loss))
    assert max(spans) == longest
    packing.restore_attention(model, previous)


def test_sequence_segments_only_for_packed_rows():
    q = torch.zeros(1, 2, 6, 4)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert packing.sequence_segments(q, q, {"position_ids": positions}) == [
        (0, 3, ((0, 3),), None), (3, 5, ((3, 5),), None), (5, 6, ((5, 6),), None)]
    assert packing.sequence_segments(q, q, {"cu_seq_lens_q": torch.tensor([0, 4, 6])}) == [
        (0, 4, ((0, 4),), None), (4, 6, ((4, 6),), None)]
    assert packing.sequence_segments(q, q, {"position_ids": torch.arange(6)[None]}) is None  # one sequence: SDPA
    assert packing.sequence_segments(q, q[:, :, :1], {"position_ids": positions}) is None  # a cache: not a row
    assert packing.sequence_segments(torch.zeros(2, 2, 6, 4), torch.zeros(2, 2, 6, 4),
                                     {"position_ids": positions.expand(2, -1)}) is None  # padded rows


def test_sft_padding_free_by_default_and_its_fallback(tiny_model_dir, tmp_path, caplog):
    """padding_free is on by default; the model trains on "align_packed" and is saved with its own kernel. An
    attention that cannot attend packed sequences without a dense mask (eager) gets padded batches, with a warning."""
    from align.config import LoraArgs, ModelArgs, SFTDataArgs
    from align.models import load_model
    from align.trainers.sft import padding_free_batches

    assert SFTDataArgs().padding_free
    model, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    assert padding_free_batches(model, SFTDataArgs()) == (True, "sdpa")
    assert model.config._attn_implementation == packing.ATTENTION
    packing.restore_attention(model, "sdpa")
    assert padding_free_batches(model, SFTDataArgs(padding_free=False)) == (False, None)
    eager, _ = load_model(ModelArgs(model=str(tiny_model_dir), attn_implementation="eager"))
    with caplog.at_level("WARNING"):
        assert padding_free_batches(eager, SFTDataArgs()) == (False, None)
    assert "padding_free: LlamaForCausalLM's attention (eager) cannot attend packed sequences" in caplog.text
    assert padding_free_batches(eager, SFTDataArgs(padding_free=False, packing=True)) == (False, None)


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_varlen_func's contract in plain torch (float32, CPU): per sequence, causal aligned bottom-right,
    grouped key/value heads broadcast."""
    assert causal and dropout_p == 0.0
    out = []
    for i in range(len(cu_q) - 1):
        qs, ks, vs = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        assert qs.shape[0] <= max_q and ks.shape[0] <= max_k
        groups = qs.shape[1] // ks.shape[1]
        ks, vs = ks.repeat_interleave(groups, 1), vs.repeat_interleave(groups, 1)
        n, m = qs.shape[0], ks.shape[0]
        mask = torch.ones(n, m, dtype=torch.bool).tril(m - n)
        o = torch.nn.functional.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1),
                                                             vs.transpose(0, 1), attn_mask=mask, scale=softmax_scale)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("kind", ["dpo", "sft"])
def test_varlen_kernel_layout_gives_the_padded_values(monkeypatch, kind):
    """The CUDA path (one flash-attention varlen call over every span) with the kernel's contract computed in torch:
    DPO's packed pairs (rejected spans attend to their prompt) and SFT's padding-free rows give the padded log-probs
    and gradients. Here flash-attn itself cannot run (no CUDA): only its inputs, the layout, are tested."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = _lora_lm()
    model.train()
    calls = []
    monkeypatch.setattr(packing, "flash_varlen", lambda query: calls.append(query.shape) or _reference_varlen)
    if kind == "dpo":
        features = _features(seed=7)
        fn = lambda m, b: list(completion_logps(m, b).values())  # noqa: E731 - log-probs and lengths
        padded, packed = PreferenceCollator(0)(features), packing.PackedPreferenceCollator(0)(features)
    else:
        features = _sft_features(seed=8)
        fn = lambda m, b: [m(**b).loss]  # noqa: E731
        padded = DataCollatorForLanguageModeling(pad_token_id=0)(features)
        packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(features)
    expected = _run(model, padded, fn)
    assert not calls  # padded batches never take the varlen path
    previous = packing.use_packed_attention(model)
    _assert_same(expected, _run(model, packed, fn))
    assert len(calls) == 2  # one kernel call per layer
    packing.restore_attention(model, previous)


def test_varlen_layout_and_where_it_applies():
    segments = [(0, 7, ((0, 7),), None), (7, 10, ((0, 4), (7, 10)), torch.ones(3, 7, dtype=torch.bool))]
    rows, cu_q, cu_k, max_q, max_k = packing.varlen_layout(segments, "cpu")
    assert rows.tolist() == list(range(7)) + [0, 1, 2, 3, 7, 8, 9]
    assert cu_q.tolist() == [0, 7, 10] and cu_k.tolist() == [0, 7, 14] and (max_q, max_k) == (7, 7)
    assert cu_q.dtype == cu_k.dtype == torch.int32
    with pytest.raises(ValueError, match="in order"):
        packing.varlen_layout(segments[::-1], "cpu")
    assert packing.flash_varlen(torch.zeros(1, 2, 3, 4)) is None  # CPU: the SDPA spans
    assert packing.flash_varlen(torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16)) is None
