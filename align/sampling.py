"""Responses into the store with their provenance (token ids, log-probs, decoding settings), and a re-score of
stored responses that checks their log-probs still agree with the model that sampled them.

Each batch of samples is committed as it is produced, so an interrupted run leaves a consistent store and the same
call resumes it, skipping what is stored (the store's unique key includes the seed and decoding settings, so a re-run
never duplicates).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Optional

from align import store as st
from align.config import ModelArgs
from align.data import as_messages
from align.data import prompt_ids as render_prompt
from align.errors import AlignError
from align.generation import SamplingSettings, sample_responses, score_completions, warn_if_truncating
from align.models import load_model
from align.store import ModelVersion, Prompt, Response
from align.store.undo import discard_unused_on_failure
from align.store.versions import ensure_registered, find_version, loadable_spec


@discard_unused_on_failure
def generate_to_store(
    store,
    model_spec: str,
    prompt_rows: list[dict[str, Any]],
    n: int,
    settings: SamplingSettings,
    batch_size: int = 16,
    pair_rule: Optional[str] = "random_iid",
    votes_required: int = 3,
    engine: str = "hf",
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> dict[str, Any]:
    """Sample n responses per prompt into the store, resuming past stored samples; then make pairs. `engine`: see
    `align.generation.sample_responses`. `on_batch(done, todo)` is called once before sampling and after each
    stored batch (the labeling app's generation jobs report their progress with it)."""
    from tqdm.auto import tqdm

    if pair_rule is not None and pair_rule not in st.PAIR_RULES:  # refused before anything is sampled or stored
        raise AlignError(f"--pairs: unknown pair rule {pair_rule!r}; expected one of {', '.join(st.PAIR_RULES)} or none")
    version_id, name = ensure_registered(store, model_spec)
    prompt_ids = st.add_prompts(store, prompt_rows)
    stored = st.existing_sample_keys(store, version_id, settings.seed, settings.as_dict())
    skip = {(i, s) for i, pid in enumerate(prompt_ids) for s in range(n) if (pid, s) in stored}
    todo = len(prompt_ids) * n - len(skip)
    if on_batch is not None:
        on_batch(0, todo)
    if todo:
        warn_if_truncating(settings)
        version = find_version(store, name)
        model, tokenizer = load_model(ModelArgs(model=loadable_spec(version)), device="auto")
        prompts = [as_messages(row.get("messages") or row["prompt"]) for row in prompt_rows]
        done = 0
        with tqdm(total=todo, desc=f"sampling {name}", unit="response") as bar:
            for batch in sample_responses(model, tokenizer, prompts, n, settings, batch_size, skip, engine=engine):
                st.add_responses(store, [_response_row(s, prompt_ids, version_id, settings) for s in batch])
                bar.update(len(batch))
                done += len(batch)
                if on_batch is not None:
                    on_batch(done, todo)
    pairs = st.make_pairs(store, version_id, rule=pair_rule, seed=settings.seed, votes_required=votes_required,
                          prompt_ids=sorted(set(prompt_ids))) if pair_rule else []
    return {"version": name, "prompts": len(set(prompt_ids)), "generated": todo, "skipped": len(skip), "pairs": len(pairs)}


def _response_row(sample, prompt_ids: list[int], version_id: int, settings: SamplingSettings) -> dict[str, Any]:
    return {
        "prompt_id": prompt_ids[sample.prompt_index],
        "model_version_id": version_id,
        "sample_index": sample.sample_index,
        **settings.as_dict(),
        "text": sample.text,
        "completion_token_ids": sample.token_ids,
        "finish_reason": sample.finish_reason,
        "sample_token_logps": sample.sample_token_logps,
        "token_logps": sample.token_logps,
    }


def rescore(store, sample: int = 200, seed: int = 0) -> dict[str, dict[str, float]]:
    """Re-score a random sample of stored responses with their recorded model and settings.

    Returns, per model version, the largest absolute difference between stored and recomputed
    per-sequence log-probs (raw, and under the sampling distribution), and how many were checked.
    """
    from sqlalchemy import select

    with store.read() as session:
        ids = session.scalars(select(Response.id).where(Response.completion_token_ids.is_not(None))).all()
        chosen = sorted(random.Random(seed).sample(list(ids), min(sample, len(ids))))
        rows = session.execute(
            select(Response, Prompt, ModelVersion).join(Prompt, Response.prompt_id == Prompt.id)
            .join(ModelVersion, Response.model_version_id == ModelVersion.id).where(Response.id.in_(chosen))
        ).all()
    if not rows:
        raise AlignError("no stored responses with token ids to re-score; run `align generate` first")
    by_version: dict[str, list] = {}
    for response, prompt, version in rows:
        by_version.setdefault(version.name, []).append((response, prompt, version))
    report = {}
    for name, items in by_version.items():
        model, tokenizer = load_model(ModelArgs(model=loadable_spec(items[0][2])), device="auto")
        worst_raw = worst_sample = 0.0
        # One response per pass: each may have its own decoding settings, and padding would change nothing here.
        for response, prompt, _ in items:
            settings = SamplingSettings(response.temperature, response.top_p, response.top_k, response.max_new_tokens, response.seed)
            p_ids = render_prompt(tokenizer, prompt.messages or as_messages(prompt.text))
            raw, sampled = score_completions(model, [p_ids], [response.completion_token_ids], settings, tokenizer.pad_token_id)
            worst_raw = max(worst_raw, abs(sum(raw[0]) - response.logp))
            worst_sample = max(worst_sample, abs(sum(sampled[0]) - response.sample_logp))
        report[name] = {"checked": len(items), "max_abs_diff_logp": worst_raw, "max_abs_diff_sample_logp": worst_sample}
    return report
