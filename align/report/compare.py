"""Compare model versions on a prompt set: sample into the store, judge, and gather every section of the report.

    from align.report.compare import EvalSpec, run_eval
    report = run_eval(store, EvalSpec(models=["v0", "runs/v1-dpo"], prompt_rows=rows, judges=["gold"]))

Samples go through `generate_to_store` (full provenance, resumable: a re-run reuses what is stored). Judges:
"gold" (the task's program check, reward in [0, 1]) and "reward" (a trained reward model, normalised reward).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from align import store as st
from align.errors import AlignError
from align.generation import SamplingSettings, vllm_missing
from align.judges import GoldJudge, RewardJudge
from align.models import shared_models
from align.report import artifacts, clusters, stats
from align.report.credit import eval_credit
from align.report.drift import drift
from align.report.sections import (failures, heldout_accuracy, human_votes, kl_to_reference, ranking,
                                   score_summary, side_by_side, win_rates)
from align.sampling import generate_to_store
from align.store import ModelVersion, Prompt, Response, get_model_version
from align.store.pairs import prompt_messages
from align.store.samples import sample_settings
from align.store.undo import discard_unused_on_failure
from align.store.versions import ensure_registered

log = logging.getLogger(__name__)

@dataclass
class EvalSpec:
    models: list[str]
    prompt_rows: list[dict]
    judges: list[str] = field(default_factory=lambda: ["gold"])  # "gold" and/or "reward"
    reward_model: Optional[str] = None  # run dir of a reward model, for the "reward" judge
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    n: int = 1
    reference: Optional[str] = None  # default: the first model
    heldout_pairs: Optional[list[dict]] = None  # preference rows; default: the store's human-labelled pairs
    batch_size: int = 16
    n_boot: int = 1000
    side_by_side: int = 8
    prompt_source: str = ""
    seed: int = 0
    credit_pairs: int = 3  # labelled pairs whose tokens are coloured by credit (0: off)
    engine: str = "hf"  # what samples: "hf" (transformers' generate) or "vllm" (align.generation.VllmEngine)


# ---- versions and samples --------------------------------------------------------------------------------------


def known_versions(store) -> list[str]:
    from sqlalchemy import select

    with store.read() as session:
        return list(session.scalars(select(ModelVersion.name).order_by(ModelVersion.id)))


def register(store, spec: str) -> Any:
    """The stored ModelVersion of a spec or version name, registering it if needed; a clear error if neither."""
    try:
        _, name = ensure_registered(store, spec)
    except AlignError as err:
        known = known_versions(store)
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "") if known else "none registered yet"
        raise AlignError(f"unknown model version {spec!r} ({err}); known versions: {shown}") from None
    return get_model_version(store, name)


def load_samples(store, version_id: int, prompt_ids: Sequence[int], n: int, settings: SamplingSettings) -> dict:
    """{prompt_id: [response dict, ...]} of this version's samples under these settings, by sample index."""
    from sqlalchemy import select

    wanted = sample_settings(settings.as_dict())
    query = select(Response).where(
        Response.model_version_id == version_id, Response.prompt_id.in_(list(prompt_ids)),
        Response.seed == settings.seed, Response.sample_index < n,
        *(getattr(Response, k) == v for k, v in wanted.items()),
    ).order_by(Response.prompt_id, Response.sample_index)
    out: dict[int, list[dict]] = defaultdict(list)
    with store.read() as session:
        for r in session.scalars(query):
            out[r.prompt_id].append({"id": r.id, "sample_index": r.sample_index, "text": r.text, "logp": r.logp,
                                     "length": r.length, "finish_reason": r.finish_reason,
                                     "token_ids": r.completion_token_ids})
    return dict(out)


def load_prompts(store, prompt_ids: Sequence[int]) -> dict[int, dict]:
    from sqlalchemy import select

    with store.read() as session:
        rows = session.scalars(select(Prompt).where(Prompt.id.in_(list(prompt_ids)))).all()
        return {p.id: {"id": p.id, "text": p.text, "messages": prompt_messages(p), "family": p.family, "gold": p.gold}
                for p in rows}


# ---- the evaluation ----------------------------------------------------------------------------------------------


@discard_unused_on_failure
def run_eval(store, spec: EvalSpec, embed: Optional[Callable] = clusters.DEFAULT) -> dict:
    """Sample, judge and summarise; returns the report as a JSON-ready dict (see align.report.html for rendering)."""
    # Sampling, KL, drift and token credit each load a version (a run merges every adapter of its chain): shared,
    # each is loaded once.
    with shared_models():
        return _evaluate(store, spec, embed)


def _evaluate(store, spec: EvalSpec, embed: Optional[Callable]) -> dict:
    if not spec.prompt_rows:
        raise AlignError("the prompt set is empty: give a JSONL with at least one prompt (or a larger --per_family)")
    if len(spec.models) < 1:
        raise AlignError("--models needs at least one model version")
    missing = vllm_missing() if spec.engine == "vllm" else None
    if missing:  # before anything is stored or loaded
        raise AlignError(missing)
    prompt_ids = list(dict.fromkeys(st.add_prompts(store, spec.prompt_rows)))
    prompts = load_prompts(store, prompt_ids)
    judges = _make_judges(spec)
    for judge in judges:  # before any sampling: a judge that cannot score the prompts fails at once
        judge.check([prompts[i] for i in prompt_ids])
    versions = [register(store, m) for m in spec.models]
    names = [v.name for v in versions]
    repeated = {n for n in names if names.count(n) > 1}
    if repeated:
        raise AlignError(f"model version(s) listed twice: {', '.join(sorted(repeated))}")
    reference = register(store, spec.reference) if spec.reference else versions[0]

    for v in versions:
        generate_to_store(store, v.name, spec.prompt_rows, spec.n, spec.settings, spec.batch_size, pair_rule=None,
                          engine=spec.engine)
    samples = {v.name: load_samples(store, v.id, prompt_ids, spec.n, spec.settings) for v in versions}
    for name in names:
        missing = [p for p in prompt_ids if p not in samples[name]]
        if missing:
            raise AlignError(f"{name}: no stored samples for {len(missing)} prompt(s) after generation")
    scores = {j.name: _judge_all(j, prompts, prompt_ids, samples) for j in judges}

    report: dict[str, Any] = {"kind": "eval", "notes": {}, "reference": reference.name,
                              "settings": {**spec.settings.as_dict(), "n": spec.n},
                              "prompts": _prompt_summary(spec, prompts, prompt_ids),
                              "judges": [j.name if j.name == "gold" else f"reward:{j.run_dir}" for j in judges]}
    report["versions"] = [_version_row(store, v, samples[v.name]) for v in versions]
    report["win_rates"] = {j: win_rates(names, prompt_ids, s, spec.n_boot, spec.seed) for j, s in scores.items()}
    report["bradley_terry"] = {j: ranking(names, prompt_ids, s, spec.n_boot, spec.seed) for j, s in scores.items()
                               if len(names) > 1}
    if len(names) < 2:
        report["notes"]["win_rates"] = "one version only: nothing to compare"
    report["scores"] = {j: score_summary(names, prompt_ids, prompts, s, spec.n_boot, spec.seed)
                        for j, s in scores.items()}
    if "gold" not in scores:
        report["notes"]["gold"] = "no gold judge (use --judge gold or both on task prompts)"
    report["lengths"] = {n: stats.length_summary([r["length"] or 0 for rs in samples[n].values() for r in rs])
                         | {"values": [r["length"] or 0 for rs in samples[n].values() for r in rs],
                            "stopped": _share(samples[n], lambda r: r["finish_reason"] == "stop")}
                         for n in names}
    _section(report, "kl", lambda: kl_to_reference(reference, versions, prompts, samples, spec.settings,
                                                          spec.n_boot, spec.seed))
    _section(report, "reward_model_accuracy", lambda: heldout_accuracy(store, judges, spec.heldout_pairs))
    _section(report, "human_votes", lambda: human_votes(store, versions, spec.n_boot, spec.seed))
    _section(report, "failures", lambda: failures(names, prompt_ids, prompts, samples, scores, embed, spec.seed))
    report["side_by_side"] = side_by_side(names, reference.name, prompt_ids, prompts, samples, scores,
                                          spec.side_by_side)
    _section(report, "drift", lambda: drift(store, versions, samples, prompt_ids, embed))
    _section(report, "credit", lambda: eval_credit(store, versions, spec.heldout_pairs, judges, spec.credit_pairs,
                                                   spec.seed))
    artifacts.add_run_sections(report, store, versions)
    return report


def _make_judges(spec: EvalSpec) -> list:
    judges = []
    for name in spec.judges:
        if name == "gold":
            judges.append(GoldJudge())
        elif name == "reward":
            judges.append(RewardJudge(spec.reward_model or "", min(spec.batch_size, 8)))
        else:
            raise AlignError(f"unknown judge {name!r}; use gold, reward:RUN_DIR or both")
    if not judges:
        raise AlignError("no judge given: use --judge gold, reward:RUN_DIR or both")
    return judges


def _section(report: dict, key: str, build: Callable[[], Any]) -> None:
    """Add an optional section; a section that returns a str is omitted, that str being the reason."""
    result = build()
    if isinstance(result, str):
        report["notes"][key] = result
    else:
        report[key] = result


def _judge_all(judge, prompts: dict, prompt_ids: Sequence[int], samples: dict) -> dict:
    """{version: {prompt_id: [score per sample]}}. Each distinct answer to a prompt is scored once, in one batched
    call: versions often give the same answer (greedy above all), and it then gets exactly the same score."""
    keys = list(dict.fromkeys((pid, r["text"]) for by_prompt in samples.values() for pid in prompt_ids
                              for r in by_prompt[pid]))
    values = dict(zip(keys, judge.score([prompts[pid] for pid, _ in keys], [text for _, text in keys])))
    return {name: {pid: [float(values[(pid, r["text"])]) for r in by_prompt[pid]] for pid in prompt_ids}
            for name, by_prompt in samples.items()}


def _share(by_prompt: dict, test: Callable[[dict], bool]) -> float:
    rows = [r for rs in by_prompt.values() for r in rs]
    return sum(map(test, rows)) / len(rows) if rows else math.nan


def _prompt_summary(spec: EvalSpec, prompts: dict, prompt_ids: Sequence[int]) -> dict:
    families: dict[str, int] = defaultdict(int)
    for pid in prompt_ids:
        families[prompts[pid]["family"] or "-"] += 1
    return {"source": spec.prompt_source, "n": len(prompt_ids), "families": dict(sorted(families.items()))}


def _version_row(store, version, by_prompt: dict) -> dict:
    return {"name": version.name, "method": version.method, "base_model": version.base_model,
            "parent": artifacts.parent_name(store, version), "samples": sum(map(len, by_prompt.values())),
            "created_at": str(version.created_at)[:19]}
