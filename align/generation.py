"""Sample responses with full provenance: token ids, finish reason, and per-token log-probs.

Log-probs come from the scores the sampler drew each token from (`SamplerLogps`), with no second pass; with
greedy or top-k/top-p settings, from one teacher-forced pass over prompt + completion after sampling
(`score_completions`, the function that re-scores stored responses later, `align rescore`). Both agree with a
re-scoring to float32 round-off, so generation and every later consumer (importance weights, KL) agree.
Two log-probs per token are stored, both float32:
- `sample_token_logps`: under the sampling distribution actually used (temperature, top-k, top-p);
- `token_logps`: under the raw model at temperature 1 (what importance weights compare).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

from align.data import prompt_ids
from align.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CACHES = ("dynamic", "static")  # generate()'s KV cache: see generate_kwargs
LOGPS_SOURCES = ("sampler", "rescore")  # where sample_responses takes log-probs from
ENGINES = ("hf", "vllm")  # who samples: transformers' generate(), or vLLM (an optional extra, CUDA only)


@dataclass(frozen=True)
class SamplingSettings:
    """Decoding settings, stored with every response. temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_new_tokens < 1:
            raise ConfigError("top_k must be >= 0 and max_new_tokens >= 1")

    @property
    def truncates(self) -> bool:
        """Top-k/top-p sampling gives some tokens zero probability, which breaks importance weights."""
        return self.top_k > 0 or self.top_p < 1.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop": ended with an end-of-turn token; "length": hit max_new_tokens
    sample_token_logps: list[float]
    token_logps: list[float]

    @property
    def sample_logp(self) -> float:
        return float(math.fsum(self.sample_token_logps))

    @property
    def logp(self) -> float:
        return float(math.fsum(self.token_logps))


def warn_if_truncating(settings: SamplingSettings) -> None:
    if settings.truncates:
        log.warning(
            "top_p=%s / top_k=%s truncate the sampling distribution: responses get zero probability under "
            "other settings, so importance weights for these pairs will be unreliable. Prefer top_p=1, top_k=0.",
            settings.top_p,
            settings.top_k,
        )


def warp_logits(logits: "torch.Tensor", settings: SamplingSettings) -> "torch.Tensor":
    """Apply temperature, then top-k, then top-p (transformers' order), masking with -inf."""
    import torch

    logits = logits.float() / settings.temperature
    if settings.top_k > 0:
        kth = torch.topk(logits, min(settings.top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - settings.top_p)
        drop_sorted[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def score_completions(
    model: "PreTrainedModel",
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    settings: Optional[SamplingSettings] = None,
    pad_token_id: int = 0,
) -> tuple[list[list[float]], list[list[float]]]:
    """Teacher-forced per-token log-probs of each completion given its prompt.

    Returns (token_logps at temperature 1, sample_token_logps under `settings`), float32 values, one
    list per completion, each as long as its completion. Greedy settings give 0 for every token.
    """
    import torch

    from align.logprobs import scored_logits, token_logps  # deferred: torch; sampling settings stay light

    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(map(len, rows))
    device = next(model.parameters()).device
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (p, row) in enumerate(zip(prompts, rows)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        labels[i, len(p) : len(row)] = input_ids[i, len(p) : len(row)]
    with torch.no_grad():
        logits, labels = scored_logits(model, input_ids.to(device), attention.to(device), labels.to(device))
    raw = token_logps(logits, labels)
    if settings is None or settings.temperature == 0:
        sampled = torch.zeros_like(raw)
    elif settings.truncates:
        sampled = token_logps(warp_logits(logits, settings), labels)
    else:
        sampled = token_logps(logits, labels, temperature=settings.temperature)
    # Logits start at the first scored position: put the values back at their places in the (B, width - 1) rows.
    skipped = width - 1 - raw.shape[1]
    raw, sampled = (torch.nn.functional.pad(t, (skipped, 0)) for t in (raw, sampled))
    out_raw, out_sampled = [], []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        span = slice(len(p) - 1, len(p) - 1 + len(c))
        out_raw.append(raw[i, span].tolist())
        out_sampled.append(sampled[i, span].tolist())
    return out_raw, out_sampled


def _completion(tokens: list[int], eos_ids: set[int], pad_id: int) -> tuple[list[int], str]:
    """Cut a generated row after its first end-of-turn token; say why it ended."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1], "stop"
    while tokens and tokens[-1] == pad_id and pad_id not in eos_ids:
        tokens = tokens[:-1]
    return tokens, "length"


def sample_responses(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[list[dict]],
    n: int,
    settings: SamplingSettings,
    batch_size: int = 16,
    skip: Optional[set[tuple[int, int]]] = None,
    with_logps: bool = True,
    cache: str = "dynamic",
    logps_from: str = "sampler",
    engine: str = "hf",
) -> Iterator[list[Sample]]:
    """Sample `n` responses per prompt, yielding one list of Samples per batch of prompts.

    `batch_size` sequences per generate() call; 0: from memory (`generation_batch_size`).
    Prompts are cut into fixed chunks, each seeded from (seed, chunk start): the samples do not depend
    on what was skipped, so a resumed run draws exactly what an uninterrupted one would. `skip` holds
    (prompt_index, sample_index) pairs already stored; chunks with nothing left to do are not run.
    `with_logps=False` skips the teacher-forced pass (about half the cost) when nobody needs log-probs.
    `cache`: the KV cache generate() decodes with (see `generate_kwargs`).
    `logps_from`: "sampler" (default) takes the log-probs from the scores the tokens were drawn from
    (`SamplerLogps`) wherever `sampler_logps_usable`; "rescore" always runs the teacher-forced pass
    (`score_completions`, what `align rescore` runs). Both agree to float round-off.
    `engine`: "hf" (transformers' generate) or "vllm" (`VllmEngine`: vLLM samples, the log-probs are re-scored
    teacher-forced by `model`, so they stay exact whatever vLLM's kernels round).
    """
    import torch

    if cache not in CACHES:
        raise ConfigError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}")
    if logps_from not in LOGPS_SOURCES:
        raise ConfigError(f"logps_from must be one of {', '.join(LOGPS_SOURCES)}, got {logps_from!r}")
    from_sampler = with_logps and logps_from == "sampler" and sampler_logps_usable(settings)
    vllm = VllmEngine(model, settings) if engine == "vllm" else None
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    from_sampler = from_sampler and vllm is None
    model.eval()
    skip = skip or set()
    eos_ids = _eos_ids(model, tokenizer)
    if batch_size <= 0:  # from memory, sized for the longest prompt
        longest = max((len(prompt_ids(tokenizer, p)) for p in prompts), default=1)
        batch_size = generation_batch_size(model, longest, settings.max_new_tokens, n)
        log.info("generation batch from memory: %d sequences per generate call", batch_size)
    per_batch = max(1, batch_size // n)
    for start in range(0, len(prompts), per_batch):
        chunk = list(range(start, min(start + per_batch, len(prompts))))
        if all((i, s) in skip for i in chunk for s in range(n)):
            continue
        encoded = [prompt_ids(tokenizer, prompts[i]) for i in chunk]
        torch.manual_seed(settings.seed * 1_000_003 + chunk[0])
        recorder = SamplerLogps(settings.temperature) if from_sampler else None
        if vllm is not None:
            generated = vllm.generate(encoded, n, settings, eos_ids, settings.seed * 1_000_003 + chunk[0])
        else:
            generated = _generate(model, tokenizer, encoded, n, settings, eos_ids, cache, recorder)
        if recorder is not None:
            import torch

            raw, sampled = recorder.finish(torch.tensor(generated), settings.max_new_tokens)
        samples = []
        for j, tokens in enumerate(generated):
            p_index, s_index = chunk[j // n], j % n
            if (p_index, s_index) in skip:
                continue
            completion, reason = _completion(tokens, eos_ids, tokenizer.pad_token_id)
            sample = Sample(p_index, s_index, completion, tokenizer.decode(completion, skip_special_tokens=True),
                            reason, [], [])
            if recorder is not None:
                sample.token_logps, sample.sample_token_logps = raw[j][:len(completion)], sampled[j][:len(completion)]
            samples.append(sample)
        if with_logps and not from_sampler:
            _attach_logps(model, tokenizer, samples, {i: e for i, e in zip(chunk, encoded)}, settings)
        yield samples


def generation_batch_size(model: "PreTrainedModel", prompt_tokens: int, max_new_tokens: int, n: int,
                          budget_bytes: Optional[int] = None) -> int:
    """Sequences per generate() call from memory: the KV cache of prompt + new tokens, one step's float32 logits
    (and the copies sampling makes) and the prefill's widest activation, per sequence, into a budget (CUDA: 80% of
    the free memory; CPU: a quarter of the available memory, at most 4 GiB). A multiple of n, at least n; at most
    512 sequences on a GPU and 128 on a CPU, where wider batches stop paying (bench/README.md)."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    width = next(model.parameters()).element_size()
    cache = 2 * config.num_hidden_layers * kv_heads * head_dim * (prompt_tokens + max_new_tokens) * width
    logits = 4 * 4 * config.vocab_size  # the step's float32 logits, the warped copy, softmax, the recorded copy
    prefill = prompt_tokens * width * (4 * config.hidden_size + 2 * getattr(config, "intermediate_size", 0))
    cuda = next(model.parameters()).device.type == "cuda"
    if budget_bytes is None:
        if cuda:
            budget_bytes = int(0.8 * torch.cuda.mem_get_info(next(model.parameters()).device)[0])
        else:
            budget_bytes = min(_available_memory() // 4, 4 * 1024**3)
    fits = budget_bytes // (cache + logits + prefill)
    cap = 512 if cuda else 128
    return max(n, min(cap, fits) // n * n)


def _available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (Linux); 8 GiB where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3


def _eos_ids(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> set[int]:
    ids = model.generation_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [ids]) if ids is not None else set()
    found.add(tokenizer.eos_token_id)
    return {i for i in found if i is not None}


def generate_kwargs(settings: SamplingSettings, n: int, pad_token_id: int, eos_ids: set[int],
                    cache: str = "dynamic") -> dict:
    """model.generate() arguments that sample exactly the distribution `settings` describe, n per prompt.

    cache "dynamic" is transformers' default (the cache grows each step). "static" preallocates it for the prompt
    width + max_new_tokens (transformers' StaticCache): every decode step then attends over the full width. On CUDA,
    transformers also compiles the decode step for a static cache (torch.compile, on first use of each shape); on
    CPU it does not, and static is no faster there (bench/README.md, `generation.py`): dynamic stays the default.
    """
    greedy = settings.temperature == 0
    kwargs = dict(
        do_sample=not greedy,
        num_return_sequences=n,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=sorted(eos_ids),
        # Every warper explicit: library defaults (e.g. top_k=50) would silently truncate the distribution.
        top_k=settings.top_k if not greedy else None,
        top_p=settings.top_p if not greedy else None,
        temperature=settings.temperature if not greedy else None,
        repetition_penalty=None,
        min_p=None,
        typical_p=None,
    )
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    return kwargs


class SamplerLogps:
    """A logits processor: generate() runs custom processors after its own logits processors (none with our
    `generate_kwargs`) and before its warpers (temperature, top-k, top-p), so it sees each step's raw float32 logits,
    and at the next step the token that was drawn (the last column of input_ids). It keeps, per step and row, that
    token's log-prob under the raw model and under the sampling distribution (logits / temperature: exact without
    top-k / top-p), then drops the step's (rows × V) logits: memory is one step's logits.

    These are the sampler's own logits: a KV-cached decode of the same model, equal to a teacher-forced re-scoring
    of the completion to float round-off (tests/test_generation.py), without the second forward pass."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.sampled: list["torch.Tensor"] = []  # per step: (rows,) float32
        self.raw: list["torch.Tensor"] = []
        self._last: Optional["torch.Tensor"] = None

    def _take(self, tokens: "torch.Tensor") -> None:
        import torch

        scores, self._last = self._last, None
        if scores is None:
            return
        picked = tokens[:, None]
        self.raw.append((scores.gather(-1, picked) - torch.logsumexp(scores, -1, keepdim=True)).squeeze(-1))
        if self.temperature == 0:  # greedy: the argmax is drawn with probability 1
            self.sampled.append(torch.zeros_like(self.raw[-1]))
            return
        scaled = scores / self.temperature  # what TemperatureLogitsWarper hands the sampler next
        self.sampled.append((scaled.gather(-1, picked) - torch.logsumexp(scaled, -1, keepdim=True)).squeeze(-1))

    def __call__(self, input_ids: "torch.Tensor", scores: "torch.Tensor") -> "torch.Tensor":
        if self._last is not None:
            self._take(input_ids[:, -1])
        self._last = scores.float()
        return scores

    def finish(self, sequences: "torch.Tensor", new_tokens: int) -> tuple[list[list[float]], list[list[float]]]:
        """(raw, sampled) per row, one value per generated column; the last step's token from the output."""
        import torch

        self._take(sequences[:, -1])
        steps = min(new_tokens, len(self.raw))
        raw = torch.stack(self.raw[:steps], dim=1) if steps else torch.zeros(sequences.shape[0], 0)
        sampled = torch.stack(self.sampled[:steps], dim=1) if steps else torch.zeros_like(raw)
        return raw.tolist(), sampled.tolist()


def _generate(model, tokenizer, encoded: list[list[int]], n: int, settings: SamplingSettings, eos_ids: set[int],
              cache: str = "dynamic", recorder: Optional[SamplerLogps] = None) -> list[list[int]]:
    import torch
    from transformers import LogitsProcessorList

    width = max(map(len, encoded))
    pad = tokenizer.pad_token_id
    # Left padding: every row's next token sits in the last column.
    input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    device = next(model.parameters()).device
    extra = {"logits_processor": LogitsProcessorList([recorder])} if recorder is not None else {}
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             **generate_kwargs(settings, n, pad, eos_ids, cache), **extra)
    return out[:, width:].tolist()


class VllmEngine:
    """Sampling with vLLM (`pip install 'align[vllm]'`, a CUDA GPU): the model's weights are loaded by vLLM from the
    model's directory; prompts go in as token ids, `n` samples per prompt come back as token ids, cut at end of turn
    as `generate` does. Log-probs are never vLLM's: `sample_responses` re-scores every completion teacher-forced
    with the transformers model, so importance weights stay exact."""

    def __init__(self, model: "PreTrainedModel", settings: SamplingSettings):
        missing = vllm_missing()
        if missing:
            raise ConfigError(missing)
        from vllm import LLM

        path = getattr(model.config, "_name_or_path", "")
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.llm = LLM(model=path, dtype=dtype, seed=settings.seed, enable_prefix_caching=True)

    def generate(self, encoded: list[list[int]], n: int, settings: SamplingSettings, eos_ids: set[int],
                 seed: int) -> list[list[int]]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=settings.temperature, top_p=settings.top_p,
                                top_k=settings.top_k or -1, max_tokens=settings.max_new_tokens, seed=seed,
                                stop_token_ids=sorted(eos_ids), detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=False)
        return [list(c.token_ids) for out in outputs for c in out.outputs]


def vllm_missing() -> Optional[str]:
    """Why the vLLM engine cannot run here (one line), or None."""
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None:
        return ("engine vllm: vLLM is not installed (pip install 'align[vllm]' on a machine with a CUDA GPU); "
                "use engine hf, transformers' batched generate")
    if not torch.cuda.is_available():
        return "engine vllm: vLLM needs a CUDA GPU and none is visible; use engine hf"
    return None


def sampler_logps_usable(settings: SamplingSettings) -> bool:
    """The sampler's scores give both stored log-probs when they are the raw logits over the temperature: sampling
    without top-k / top-p truncation, and greedy decoding (its raw logits; 0 under the point mass it draws from, as
    the teacher-forced pass stores). Truncated settings use the teacher-forced pass."""
    return not settings.truncates


def _attach_logps(model, tokenizer, samples: list[Sample], encoded: dict[int, list[int]], settings, batch_size: int = 16) -> None:
    for start in range(0, len(samples), batch_size):
        part = samples[start : start + batch_size]
        raw, sampled = score_completions(
            model, [encoded[s.prompt_index] for s in part], [s.token_ids for s in part], settings, tokenizer.pad_token_id
        )
        for s, r, q in zip(part, raw, sampled):
            s.token_logps, s.sample_token_logps = r, q
