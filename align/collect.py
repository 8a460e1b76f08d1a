"""Generate into the store (with provenance), register model versions, re-score stored responses.

    align generate --model SPEC_OR_VERSION --prompts FILE --n 4 --temperature 1.0 --max_new_tokens 64 --seed 0 --db URL
    align rescore --db URL --sample 200

Each batch of samples is committed as it is produced, so an interrupted run leaves a consistent store
and the same command resumes it, skipping what is stored (the store's unique key includes the seed
and decoding settings, so a re-run never duplicates).
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path
from typing import Any, Optional

from align.data import as_messages, read_jsonl
from align.errors import AlignError, DataError
from align.generation import SamplingSettings, sample_responses, score_completions, warn_if_truncating

log = logging.getLogger(__name__)


# ---- model versions ------------------------------------------------------------------------------


def ensure_registered(store, spec: str) -> tuple[int, str]:
    """Register the model behind a spec (and, for a training run, its parents first); return (id, name).

    A spec may also be the name of a version already in the store.
    """
    from align import store as st
    from align.models import base_revision, load_tokenizer, portable_spec, resolve_model, tokenizer_fingerprint
    from align.store.ops import load_version_json

    known = _find_version(store, spec)
    if known is not None:
        return known.id, known.name
    path = Path(spec).expanduser()
    if (path / "version.json").is_file():
        info = load_version_json(path)
        if info.get("parent_spec"):
            ensure_registered(store, info["parent_spec"])
        return st.register_model_version(store, info), info["name"]
    resolved = resolve_model(spec)
    name = portable_spec(spec)
    record = {
        "name": name,
        "method": "base",
        "base_model": resolved.base,
        "base_revision": base_revision(resolved),
        **tokenizer_fingerprint(load_tokenizer(resolved)),
    }
    return st.register_model_version(store, record), name


def _find_version(store, name: str):
    from sqlalchemy import select

    from align.store import ModelVersion

    with store.read() as session:
        return session.scalars(select(ModelVersion).where(ModelVersion.name == name)).one_or_none()


def loadable_spec(version) -> str:
    """Where to load a registered version from: its saved model (an adapter or merged directory is itself a
    model spec), else, for a base version, its base model."""
    if version.adapter_path and Path(version.adapter_path).exists():
        return version.adapter_path
    if version.method == "base":
        return version.base_model
    raise AlignError(f"model version {version.name!r} was trained at {version.adapter_path}, which no longer exists here")


# ---- generation ----------------------------------------------------------------------------------


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompt rows: task rows ({"prompt", "family", "gold", ...}), chat rows ({"messages"}) or {"prompt": text}."""
    rows = read_jsonl(path)
    for lineno, row in enumerate(rows, start=1):
        prompt = row.get("prompt", row.get("messages"))
        if not prompt or not isinstance(prompt, (str, list)):
            raise DataError(f"{path}: row {lineno} needs a non-empty 'prompt' (text or messages) or 'messages'")
        if isinstance(prompt, list) and prompt[-1].get("role") == "assistant":
            row = dict(row, messages=prompt[:-1], prompt=None)  # an SFT row: prompt with its answer dropped
            rows[lineno - 1] = {k: v for k, v in row.items() if v is not None}
    return rows


def resolve_prompts(source: str, per_family: Optional[int] = None, limit: Optional[int] = None) -> list[dict]:
    """Prompt rows of a JSONL path, or of `tasks:eval` / `tasks:train` (the shipped task suite)."""
    from align.evaluate import stratified
    from align.tasks import load_tasks

    if source.startswith("tasks:"):
        split = source.split(":", 1)[1]
        if split not in ("eval", "train"):
            raise AlignError(f"unknown task split {split!r} in {source!r}; use tasks:eval or tasks:train")
        rows = load_tasks(repo_file(f"data/tasks/{split}.jsonl"))
    else:
        rows = read_prompts(source)
    if per_family is not None:
        rows = stratified([dict(r, family=r.get("family") or "-") for r in rows], per_family)
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise AlignError(f"the prompt set {source!r} is empty after --per_family/--limit")
    return rows


def repo_file(relative: str) -> Path:
    """A shipped file (the task suite, recipe configs), found from the working directory or the source checkout."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / relative).is_file():
            return root / relative
    raise AlignError(f"{relative} not found (run from the repository root, or pass a JSONL path)")


def generate_to_store(
    store,
    model_spec: str,
    prompt_rows: list[dict[str, Any]],
    n: int,
    settings: SamplingSettings,
    batch_size: int = 16,
    pair_rule: Optional[str] = "random_iid",
    votes_required: int = 3,
) -> dict[str, Any]:
    """Sample n responses per prompt into the store, resuming past stored samples; then make pairs."""
    from tqdm.auto import tqdm

    from align import store as st
    from align.config import ModelArgs
    from align.models import load_model
    from align.store.pairs import PAIR_RULES

    if pair_rule is not None and pair_rule not in PAIR_RULES:  # refused before anything is sampled or stored
        raise AlignError(f"--pairs: unknown pair rule {pair_rule!r}; expected one of {', '.join(PAIR_RULES)} or none")
    version_id, name = ensure_registered(store, model_spec)
    prompt_ids = st.add_prompts(store, prompt_rows)
    stored = st.existing_sample_keys(store, version_id, settings.seed, settings.as_dict())
    skip = {(i, s) for i, pid in enumerate(prompt_ids) for s in range(n) if (pid, s) in stored}
    todo = len(prompt_ids) * n - len(skip)
    if todo:
        warn_if_truncating(settings)
        version = _find_version(store, name)
        model, tokenizer = load_model(ModelArgs(model=loadable_spec(version)))
        prompts = [as_messages(row.get("messages") or row["prompt"]) for row in prompt_rows]
        with tqdm(total=todo, desc=f"sampling {name}", unit="response") as bar:
            for batch in sample_responses(model, tokenizer, prompts, n, settings, batch_size, skip):
                st.add_responses(store, [_response_row(s, prompt_ids, version_id, settings) for s in batch])
                bar.update(len(batch))
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


# ---- re-scoring ----------------------------------------------------------------------------------


def rescore(store, sample: int = 200, seed: int = 0) -> dict[str, dict[str, float]]:
    """Re-score a random sample of stored responses with their recorded model and settings.

    Returns, per model version, the largest absolute difference between stored and recomputed
    per-sequence log-probs (raw, and under the sampling distribution), and how many were checked.
    """
    from sqlalchemy import select

    from align.config import ModelArgs
    from align.data import prompt_ids as render_prompt
    from align.models import load_model
    from align.store import ModelVersion, Prompt, Response

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
        model, tokenizer = load_model(ModelArgs(model=loadable_spec(items[0][2])))
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


# ---- commands --------------------------------------------------------------------------------------


def generate_main(argv: list[str]) -> None:
    from align import store as st

    parser = argparse.ArgumentParser(prog="align generate", description="Sample responses with provenance into the store.")
    parser.add_argument("--model", required=True, help="Model spec (alias, path, run dir, hub id) or a stored version name.")
    parser.add_argument("--prompts", required=True, help="JSONL of prompts (task rows, {'prompt': ...} or "
                        "{'messages': [...]}), or tasks:train / tasks:eval (the shipped task suite).")
    parser.add_argument("--db", default="sqlite:///runs/store.db", help="Store URL: sqlite:///path.db or postgresql://...")
    parser.add_argument("--n", type=int, default=4, help="Samples per prompt.")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0, help="< 1 truncates sampling (bad for importance weights).")
    parser.add_argument("--top_k", type=int, default=0, help="> 0 truncates sampling (bad for importance weights).")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=16, help="Sequences sampled at once.")
    parser.add_argument("--per_family", type=int, default=None,
                        help="Use only the first N prompts of each task family (a balanced subset of a task file).")
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N prompts (after --per_family).")
    parser.add_argument("--pairs", default="random_iid", help="Pairing rule (random_iid, all_pairs) or none.")
    parser.add_argument("--votes_required", type=int, default=3, help="Votes each new pair needs.")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise AlignError("--n must be at least 1")
    settings = SamplingSettings(args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.seed)
    rows = resolve_prompts(args.prompts, args.per_family, args.limit)
    with st.connect(args.db) as store:
        summary = generate_to_store(store, args.model, rows, args.n, settings, args.batch_size,
                                    None if args.pairs == "none" else args.pairs, args.votes_required)
    print(f"{summary['version']}: {summary['generated']} responses generated, {summary['skipped']} already stored, "
          f"{summary['prompts']} prompts, {summary['pairs']} pairs")


def rescore_main(argv: list[str]) -> None:
    from align import store as st

    parser = argparse.ArgumentParser(prog="align rescore", description="Re-score stored responses with their recorded model.")
    parser.add_argument("--db", default="sqlite:///runs/store.db")
    parser.add_argument("--sample", type=int, default=200, help="Responses to re-score (random sample).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=0.1, help="Largest acceptable difference, nats per sequence.")
    args = parser.parse_args(argv)
    with st.connect(args.db) as store:
        report = rescore(store, args.sample, args.seed)
    worst = 0.0
    for name, r in report.items():
        worst = max(worst, r["max_abs_diff_logp"], r["max_abs_diff_sample_logp"])
        print(f"{name}: {r['checked']} responses, max |Δ logp| = {r['max_abs_diff_logp']:.2e} nats "
              f"(sampling distribution: {r['max_abs_diff_sample_logp']:.2e})")
    if worst > args.tolerance:
        raise AlignError(f"stored log-probs differ from a re-score by up to {worst:.3f} nats (> {args.tolerance}); "
                         "the model, tokenizer or chat template changed since generation")
    print(f"consistent: every difference is under {args.tolerance} nats")


def export_main(argv: list[str]) -> None:
    from datetime import datetime

    from align import store as st
    from align.data import write_jsonl

    kinds = {"preferences": st.export_preferences, "sft": st.export_sft, "unpaired": st.export_unpaired}
    parser = argparse.ArgumentParser(prog="align export", description="Export labeled pairs for training.")
    parser.add_argument("--db", default="sqlite:///runs/store.db")
    parser.add_argument("--out", required=True, help="Output JSONL (loads with datasets.load_dataset('json', ...)).")
    parser.add_argument("--kind", choices=list(kinds), default="preferences",
                        help="preferences: prompt/chosen/rejected + provenance; sft: preferred responses; unpaired: KTO rows.")
    parser.add_argument("--model_versions", default=None, help="Comma-separated version names: pairs sampled from these.")
    parser.add_argument("--since", type=datetime.fromisoformat, default=None, help="Votes at or after (ISO time).")
    parser.add_argument("--until", type=datetime.fromisoformat, default=None, help="Votes before (ISO time).")
    parser.add_argument("--annotators", default=None, help="Comma-separated annotator names.")
    parser.add_argument("--source", choices=["human", "simulated"], default=None, help="Only human or only simulated votes.")
    parser.add_argument("--min_agreement", type=float, default=0.0, help="Keep pairs whose majority share is at least this.")
    args = parser.parse_args(argv)
    split = lambda value: [v.strip() for v in value.split(",") if v.strip()] if value else None  # noqa: E731
    with st.connect(args.db) as store:
        rows = kinds[args.kind](store, model_versions=split(args.model_versions), since=args.since, until=args.until,
                                annotators=split(args.annotators), source=args.source, min_agreement=args.min_agreement)
    if not rows:
        raise AlignError("nothing to export: no pair has votes matching these filters")
    write_jsonl(rows, args.out)
    labels = {}
    for row in rows:
        labels[row.get("label", "-")] = labels.get(row.get("label", "-"), 0) + 1
    shown = ", ".join(f"{k}: {v}" for k, v in sorted(labels.items(), key=lambda kv: str(kv[0])))
    print(f"wrote {len(rows)} {args.kind} rows to {args.out} ({shown})")
