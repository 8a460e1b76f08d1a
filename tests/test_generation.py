"""Generation stores exact log-probs: equal to transformers' own sampling scores and to a re-score."""

import pytest
import torch

from align.config import ModelArgs
from align.data import prompt_ids
from align.errors import ConfigError
from align.generation import SamplingSettings, generate_kwargs, sample_responses, score_completions
from align.models import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(ModelArgs(model=str(tiny_model_dir)))


@pytest.mark.parametrize(
    "settings",
    [
        SamplingSettings(temperature=0.7, max_new_tokens=8),
        SamplingSettings(temperature=1.3, top_k=20, max_new_tokens=8),
        SamplingSettings(temperature=1.0, top_p=0.8, max_new_tokens=8),
    ],
    ids=["temperature", "top_k", "top_p"],
)
def test_sampling_logps_match_transformers_scores(tiny, settings):
    """The teacher-forced log-probs under the settings equal log_softmax of the scores generate() sampled from."""
    model, tok = tiny
    ids = prompt_ids(tok, [{"role": "user", "content": "hello there"}])
    torch.manual_seed(0)
    out = model.generate(
        input_ids=torch.tensor([ids]), do_sample=True, temperature=settings.temperature, top_k=settings.top_k,
        top_p=settings.top_p, max_new_tokens=8, output_scores=True, return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id],
    )
    completion = out.sequences[0, len(ids):].tolist()
    expected = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, completion)]
    raw, sampled = score_completions(model, [ids], [completion], settings, tok.pad_token_id)
    assert sampled[0] == pytest.approx(expected, abs=1e-4)
    assert all(r <= 0 for r in raw[0]) and raw[0] != sampled[0]


def test_stored_logps_equal_teacher_forced_recomputation(tiny):
    model, tok = tiny
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    settings = SamplingSettings(temperature=1.0, max_new_tokens=6, seed=3)
    samples = [s for batch in sample_responses(model, tok, prompts, 2, settings, batch_size=4) for s in batch]
    assert sorted((s.prompt_index, s.sample_index) for s in samples) == [(p, i) for p in range(3) for i in range(2)]
    for s in samples:
        assert len(s.token_ids) == len(s.token_logps) == len(s.sample_token_logps) <= 6
        assert s.finish_reason == ("stop" if s.token_ids[-1] == tok.eos_token_id else "length")
        raw, _ = score_completions(model, [prompt_ids(tok, prompts[s.prompt_index])], [s.token_ids], settings, tok.pad_token_id)
        assert raw[0] == pytest.approx(s.token_logps, abs=1e-5)
        # At temperature 1 with no truncation the sampling distribution is the raw model.
        assert s.sample_logp == pytest.approx(s.logp, abs=1e-4)


def test_sampling_is_deterministic_and_skips_are_exact(tiny):
    """A resumed run (skipping what is stored) draws the same samples as an uninterrupted one."""
    model, tok = tiny
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    settings = SamplingSettings(temperature=1.0, max_new_tokens=5, seed=7)
    full = {(s.prompt_index, s.sample_index): s.token_ids for b in sample_responses(model, tok, prompts, 2, settings, 4) for s in b}
    skip = {(0, 0), (0, 1), (1, 0), (1, 1)}  # the first chunk (2 prompts x 2 samples) was stored
    resumed = {(s.prompt_index, s.sample_index): s.token_ids for b in sample_responses(model, tok, prompts, 2, settings, 4, skip) for s in b}
    assert set(resumed) == set(full) - skip
    assert all(resumed[k] == full[k] for k in resumed)


def test_greedy_has_zero_sampling_logps(tiny):
    model, tok = tiny
    settings = SamplingSettings(temperature=0.0, max_new_tokens=4)
    (batch,) = list(sample_responses(model, tok, [[{"role": "user", "content": "x"}]], 1, settings))
    assert batch[0].sample_token_logps == [0.0] * len(batch[0].token_ids)


def test_static_cache_samples_the_same_tokens_with_exact_logps(tiny):
    """cache="static" (transformers' StaticCache, left-padded batch): the samples of the default dynamic cache, and
    their stored log-probs equal each response re-scored alone."""
    model, tok = tiny
    prompts = [[{"role": "user", "content": "q" * (1 + 4 * i)}] for i in range(3)]  # different lengths: padding
    settings = SamplingSettings(temperature=1.0, max_new_tokens=6, seed=5)
    dynamic = [s for b in sample_responses(model, tok, prompts, 2, settings, batch_size=6) for s in b]
    static = [s for b in sample_responses(model, tok, prompts, 2, settings, batch_size=6, cache="static") for s in b]
    assert [s.token_ids for s in static] == [s.token_ids for s in dynamic]
    for s in static:
        raw, sampled = score_completions(model, [prompt_ids(tok, prompts[s.prompt_index])], [s.token_ids], settings,
                                         tok.pad_token_id)
        assert raw[0] == pytest.approx(s.token_logps, abs=1e-5)
        assert sampled[0] == pytest.approx(s.sample_token_logps, abs=1e-5)


def test_static_cache_sampler_draws_from_the_teacher_forced_distribution(tiny):
    """The scores generate() samples from with a static cache and left padding equal the teacher-forced log-probs."""
    model, tok = tiny
    settings = SamplingSettings(temperature=0.8, max_new_tokens=6)
    encoded = [prompt_ids(tok, [{"role": "user", "content": text}]) for text in ("hi", "a longer question here")]
    width = max(map(len, encoded))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in encoded])
    attention = (torch.arange(width) >= torch.tensor([[width - len(e)] for e in encoded])).long()
    torch.manual_seed(0)
    out = model.generate(input_ids=input_ids, attention_mask=attention, output_scores=True,
                         return_dict_in_generate=True,
                         **generate_kwargs(settings, 1, tok.pad_token_id, {tok.eos_token_id}, cache="static"))
    assert type(out.past_key_values).__name__ == "StaticCache"
    for row, ids in enumerate(encoded):
        completion = out.sequences[row, width:].tolist()
        if tok.eos_token_id in completion:
            completion = completion[: completion.index(tok.eos_token_id) + 1]
        expected = [torch.log_softmax(s[row].float(), -1)[t].item() for s, t in zip(out.scores, completion)]
        _, sampled = score_completions(model, [ids], [completion], settings, tok.pad_token_id)
        assert sampled[0] == pytest.approx(expected, abs=1e-4)


def test_unknown_cache_is_a_config_error(tiny):
    model, tok = tiny
    with pytest.raises(ConfigError, match="cache must be one of"):
        next(sample_responses(model, tok, [[{"role": "user", "content": "x"}]], 1, SamplingSettings(), cache="paged"))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_sampler_logps_equal_teacher_forced_rescoring(tiny, temperature, cache):
    """Log-probs taken from the sampler's own logits (the default) equal the teacher-forced pass's for the same
    samples, both stored fields, per token, within 1e-5, for left-padded batches of prompts of different lengths;
    greedy decoding too (its sampled log-probs are 0: the argmax is drawn with probability 1)."""
    model, tok = tiny
    prompts = [[{"role": "user", "content": "hello " * k}] for k in range(1, 6)]
    settings = SamplingSettings(temperature=temperature, max_new_tokens=10, seed=1)
    n = 1 if temperature == 0 else 3  # greedy: one answer per prompt
    ours = [s for b in sample_responses(model, tok, prompts, n, settings, batch_size=6, cache=cache) for s in b]
    rescored = [s for b in sample_responses(model, tok, prompts, n, settings, batch_size=6, cache=cache,
                                            logps_from="rescore") for s in b]
    assert [s.token_ids for s in ours] == [s.token_ids for s in rescored] and len(ours) == 5 * n
    if temperature > 0:  # greedy answers of the random tiny model all run to max_new_tokens
        assert len({len(s.token_ids) for s in ours}) > 1  # some stopped early: their padded tail is not stored
    for a, b in zip(ours, rescored):
        assert len(a.token_logps) == len(a.sample_token_logps) == len(a.token_ids)
        assert a.token_logps == pytest.approx(b.token_logps, abs=1e-5)
        assert a.sample_token_logps == pytest.approx(b.sample_token_logps, abs=1e-5)
    if temperature != 1.0:
        assert ours[0].sample_token_logps != ours[0].token_logps
    if temperature == 0.0:
        assert {v for s in ours for v in s.sample_token_logps} == {0.0}


def test_truncating_settings_rescore(tiny, monkeypatch):
    """top-p and top-k (applied after the point where the sampler's logits are read) take the teacher-forced pass:
    their stored values are exactly the re-scoring's; greedy decoding does not. An unknown source is a config
    error."""
    import align.generation as generation

    model, tok = tiny
    prompts = [[{"role": "user", "content": "hi"}]]
    calls = []
    original = generation.score_completions
    monkeypatch.setattr(generation, "score_completions", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert generation.sampler_logps_usable(SamplingSettings(temperature=0, max_new_tokens=4))
    for settings in (SamplingSettings(top_p=0.8, max_new_tokens=4), SamplingSettings(top_k=5, max_new_tokens=4)):
        assert not generation.sampler_logps_usable(settings)
        (s,) = next(sample_responses(model, tok, prompts, 1, settings))
        raw, sampled = original(model, [prompt_ids(tok, prompts[0])], [s.token_ids], settings, tok.pad_token_id)
        assert s.token_logps == raw[0] and s.sample_token_logps == sampled[0]
    assert len(calls) == 2
    with pytest.raises(ConfigError, match="logps_from must be one of"):
        next(sample_responses(model, tok, prompts, 1, SamplingSettings(), logps_from="vllm"))


def test_generation_batch_from_memory(tiny):
    """The tiny model (2 layers, 2 KV heads of 8, V = 259, fp32): per sequence of 20 + 10 tokens the KV cache is
    2·2·2·8·30·4 = 7680 bytes, one step's logits 16·259 = 4144, the prefill 20·4·(4·32 + 2·64) = 20480: 32304 in
    all, so 1 MB fits 30 sequences -> 28 (a multiple of n = 4); a tiny budget still gives n; the CPU cap is 128.
    batch_size 0 in sample_responses samples with it."""
    from align.generation import generation_batch_size

    model, tok = tiny
    assert generation_batch_size(model, 20, 10, 4, budget_bytes=10**6) == 28
    assert generation_batch_size(model, 20, 10, 4, budget_bytes=10) == 4
    assert generation_batch_size(model, 20, 10, 4, budget_bytes=10**12) == 128
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    batches = list(sample_responses(model, tok, prompts, 2, SamplingSettings(max_new_tokens=3), batch_size=0))
    assert len(batches) == 1 and len(batches[0]) == 6


def test_vllm_engine_absent_says_so_in_one_line(tiny, monkeypatch):
    """vLLM is an optional extra (CUDA only): where it is missing or there is no GPU, asking for it is a config error
    that says what to install or use instead, before anything is sampled. (CUDA is hidden, so a GPU machine with
    vLLM installed takes the no-GPU path.)"""
    from align.generation import vllm_missing

    model, tok = tiny
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = vllm_missing()
    assert reason is not None and "\n" not in reason and "engine hf" in reason
    with pytest.raises(ConfigError, match="engine vllm: vLLM"):
        next(sample_responses(model, tok, [[{"role": "user", "content": "x"}]], 1, SamplingSettings(), engine="vllm"))
    with pytest.raises(ConfigError, match="engine must be one of"):
        next(sample_responses(model, tok, [[{"role": "user", "content": "x"}]], 1, SamplingSettings(), engine="tgi"))
