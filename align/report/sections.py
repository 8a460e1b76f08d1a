"""The sections of an eval report computed from judged samples: win rates, ranking, scores per family, KL to the
reference, reward-model accuracy, human votes, failures and side-by-side samples.

Inputs share one shape: `samples[version][prompt_id]` is a list of response dicts (by sample index) and
`scores[judge][version][prompt_id]` the judge's scores of those responses, in the same order.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

from align.data import prompt_ids as render
from align.errors import AlignError
from align.generation import score_completions
from align.models import load_model
from align.report import clusters, stats
from align.store import Pair, Response, aggregate, effective_votes, export_preferences
from align.store.versions import loadable_spec

FAIL_BELOW = 0.5  # gold reward under this is a failure


def win_rates(names: Sequence[str], prompt_ids: Sequence[int], scores: dict, n_boot: int, seed: int) -> dict:
    """Every ordered pair of versions on their shared prompts: {pairs: [...], matrix: win rate of row over column}."""
    k = len(names)
    matrix: list[list[Optional[float]]] = [[None] * k for _ in range(k)]
    pairs = []
    for (i, a), (j, b) in itertools.permutations(enumerate(names), 2):
        shared = [p for p in prompt_ids if scores[a].get(p) and scores[b].get(p)]
        if not shared:
            continue
        outcomes = [stats.prompt_outcome(scores[a][p], scores[b][p]) for p in shared]
        summary = stats.win_rate_summary(outcomes, n_boot=n_boot, seed=seed)
        matrix[i][j] = summary["win_rate"]
        pairs.append({"a": a, "b": b, **summary})
    return {"versions": list(names), "pairs": pairs, "matrix": matrix}


def ranking(names: Sequence[str], prompt_ids: Sequence[int], scores: dict, n_boot: int, seed: int) -> dict:
    """Bradley–Terry strengths of the versions from all pairwise outcomes, bootstrapped over prompts."""
    groups = []
    for p in prompt_ids:
        groups.append([(i, j, stats.prompt_outcome(scores[a][p], scores[b][p]))
                       for (i, a), (j, b) in itertools.combinations(enumerate(names), 2)
                       if scores[a].get(p) and scores[b].get(p)])
    fit = stats.bradley_terry_bootstrap(groups, len(names), n_boot=min(n_boot, 200), seed=seed)
    return {"versions": list(names), **fit}


def score_summary(names: Sequence[str], prompt_ids: Sequence[int], prompts: dict, scores: dict, n_boot: int,
                  seed: int) -> dict:
    """Mean score per version, overall (with a bootstrap interval over prompts) and per task family."""
    out = {}
    for name in names:
        per_prompt = {p: sum(v) / len(v) for p, v in scores[name].items() if v}
        by_family: dict[str, list[float]] = defaultdict(list)
        for p in prompt_ids:
            if p in per_prompt:
                by_family[prompts[p]["family"] or "-"].append(per_prompt[p])
        values = [per_prompt[p] for p in prompt_ids if p in per_prompt]
        low, high = stats.bootstrap(values, n_boot=n_boot, seed=seed)
        out[name] = {"mean": sum(values) / len(values), "low": low, "high": high,
                     "per_family": {f: sum(v) / len(v) for f, v in sorted(by_family.items())}}
    return out


def kl_to_reference(reference, versions: Sequence, prompts: dict, samples: dict, settings, n_boot: int = 1000,
                    seed: int = 0) -> dict | str:
    """KL(π_v ‖ π_ref) per version: mean over v's samples of the stored log π_v(y) minus log π_ref(y) re-scored
    teacher-forced under the reference. The reference's own row re-scores its samples (≈ 0: a consistency check)."""
    from align.config import ModelArgs  # deferred: align.config imports torch (through align.weighting)

    try:
        model, tokenizer = load_model(ModelArgs(model=loadable_spec(reference)), device="auto")
    except AlignError as err:
        return f"reference {reference.name} cannot be loaded here: {err}"
    model.eval()
    out: dict[str, Any] = {"reference": reference.name, "per_version": {}, "skipped": {}}
    ref_logp: dict[tuple, float] = {}  # (prompt, token ids): versions often share answers (greedy above all)
    for v in versions:
        if (v.tokenizer_hash, v.chat_template_hash) != (reference.tokenizer_hash, reference.chat_template_hash):
            out["skipped"][v.name] = "a different tokenizer or chat template than the reference: token ids differ"
            continue
        items = [(pid, r) for pid, rs in samples[v.name].items() for r in rs
                 if r["token_ids"] is not None and r["logp"] is not None]
        if not items:
            out["skipped"][v.name] = "no stored token ids and log-probs"
            continue
        keys = [(pid, tuple(r["token_ids"])) for pid, r in items]
        todo = [k for k in dict.fromkeys(keys) if k not in ref_logp]
        for start in range(0, len(todo), 8):
            part = todo[start:start + 8]
            raw, _ = score_completions(model, [render(tokenizer, prompts[pid]["messages"]) for pid, _ in part],
                                       [list(ids) for _, ids in part], None, tokenizer.pad_token_id)
            ref_logp.update((k, math.fsum(t)) for k, t in zip(part, raw))
        ref_logps = [ref_logp[k] for k in keys]
        out["per_version"][v.name] = stats.kl_estimate([r["logp"] for _, r in items], ref_logps,
                                                       [len(r["token_ids"]) for _, r in items], n_boot, seed)
    if settings.temperature != 1.0 or settings.truncates:
        out["note"] = ("samples were not drawn from the raw models at temperature 1, so these are mean log-ratios "
                       "on the evaluated samples, not unbiased KL estimates")
    return out


def heldout_accuracy(store, judges: Sequence, rows: Optional[list[dict]]) -> dict | str:
    """Reward-model accuracy on held-out preference pairs (file rows, else the store's human-labelled pairs)."""
    judge = next((j for j in judges if j.name == "reward"), None)
    if judge is None:
        return "no reward-model judge: pass --judge reward:RUN_DIR (or both) to measure its accuracy"
    source = "file"
    if rows is None:
        rows, source = export_preferences(store, source="human"), "store (human votes)"
    decided = [r for r in rows if r.get("label", "chosen") == "chosen"]
    if not decided:
        return "no held-out human pairs with a decided label: pass --heldout_pairs FILE or collect human votes"
    prompts = [r["prompt"] for r in decided]
    chosen = judge.score_messages(prompts, [r["chosen"] for r in decided])
    rejected = judge.score_messages(prompts, [r["rejected"] for r in decided])
    correct = [1.0 if c > r else 0.0 for c, r in zip(chosen, rejected)]
    # Pairs of one prompt share its difficulty: the interval resamples prompts, not pairs.
    by_prompt: dict[str, list[float]] = defaultdict(list)
    by_family: dict[str, list[float]] = defaultdict(list)
    for row, ok in zip(decided, correct):
        by_prompt[json.dumps(row["prompt"], sort_keys=True, ensure_ascii=False)].append(ok)
        if row.get("family"):
            by_family[str(row["family"])].append(ok)
    low, high = stats.cluster_bootstrap(list(by_prompt.values()))
    return {"source": source, "n": len(correct), "prompts": len(by_prompt), "accuracy": sum(correct) / len(correct),
            "low": low, "high": high, "skipped_ties": len(rows) - len(decided),
            "by_family": {f: {"n": len(v), "accuracy": sum(v) / len(v)} for f, v in sorted(by_family.items())}}


def human_votes(store, versions: Sequence, n_boot: int, seed: int) -> dict | str:
    """Win rates from human side-by-side votes on pairs whose two responses come from two compared versions."""
    from sqlalchemy import select

    by_id = {v.id: v.name for v in versions}
    votes = effective_votes(store, source="human")
    by_pair: dict[int, list] = defaultdict(list)
    for vote in votes:
        by_pair[vote.pair_id].append((vote.choice, vote.strength))
    if not by_pair:
        return "no human votes in the store"
    outcomes: dict[tuple[str, str], list[float]] = defaultdict(list)
    both_bad: dict[tuple[str, str], int] = defaultdict(int)
    with store.read() as session:
        pairs = session.scalars(select(Pair).where(Pair.id.in_(list(by_pair)))).all()
        version_of = dict(session.execute(select(Response.id, Response.model_version_id).where(
            Response.id.in_([i for p in pairs for i in (p.response_a_id, p.response_b_id)]))).tuples().all())
    order = {v.name: k for k, v in enumerate(versions)}
    for pair in pairs:
        a, b = by_id.get(version_of[pair.response_a_id]), by_id.get(version_of[pair.response_b_id])
        if a is None or b is None or a == b:
            continue
        choice = aggregate(by_pair[pair.id]).choice
        value = {"a": 1.0, "b": 0.0}.get(choice, 0.5)
        if order[a] > order[b]:  # report from the earlier-listed version's side
            a, b, value = b, a, 1.0 - value
        outcomes[(a, b)].append(value)
        both_bad[(a, b)] += choice == "both_bad"
    if not outcomes:
        return "human votes exist, but none on a pair of responses from two of the compared versions"
    return {"pairs": [{"a": a, "b": b, **stats.win_rate_summary(o, n_boot, seed), "both_bad": both_bad[(a, b)]}
                      for (a, b), o in outcomes.items()],
            "note": "ties and both-bad majorities count half"}


def failures(names: Sequence[str], prompt_ids: Sequence[int], prompts: dict, samples: dict, scores: dict,
             embed: Optional[Callable], seed: int) -> dict | str:
    """Responses with gold reward < 0.5, grouped by task family and by embedding cluster."""
    if "gold" not in scores:
        return "failures need the gold judge (gold reward < 0.5 is a failure)"
    items, total = [], defaultdict(int)
    for name in names:
        for pid in prompt_ids:
            for r, value in zip(samples[name][pid], scores["gold"][name][pid]):
                family = prompts[pid]["family"] or "-"
                total[family] += 1
                if value < FAIL_BELOW:
                    items.append({"version": name, "family": family, "prompt": prompts[pid]["text"],
                                  "response": r["text"], "reward": value})
    out: dict[str, Any] = {"n": len(items), "of": sum(total.values()), "by_family": clusters.by_family(items, total)}
    grouped = clusters.by_embedding(items, embed, seed=seed)
    if isinstance(grouped, str):
        out["clusters_note"] = grouped
    else:
        out["clusters"] = grouped
        out["embedder"] = "all-MiniLM-L6-v2" if embed == clusters.DEFAULT else getattr(embed, "__name__", "custom")
    return out


def side_by_side(names: Sequence[str], reference: str, prompt_ids: Sequence[int], prompts: dict, samples: dict,
                 scores: dict, limit: int) -> list[dict]:
    """First samples of two versions on the same prompts: the reference against each other version, prompts
    where the first judge disagrees first, one family at a time."""
    if len(names) < 2 or limit <= 0:
        return []
    others = [n for n in names if n != reference] if reference in names else list(names[1:])
    left = reference if reference in names else names[0]
    judge = next(iter(scores), None)
    rows = []
    per_pair = max(1, limit // len(others))
    for right in others:
        def differs(pid: int) -> bool:
            return judge is not None and scores[judge][left][pid][0] != scores[judge][right][pid][0]

        ordered = sorted(prompt_ids, key=lambda p: (not differs(p), prompt_ids.index(p)))
        picked, seen = [], set()
        for pid in ordered:  # first one prompt per family ...
            if len(picked) < per_pair and prompts[pid]["family"] not in seen:
                picked.append(pid)
                seen.add(prompts[pid]["family"])
        for pid in ordered:  # ... then fill up
            if len(picked) < per_pair and pid not in picked:
                picked.append(pid)
        for pid in picked:
            rows.append({"prompt": prompts[pid]["text"], "family": prompts[pid]["family"], "a": left, "b": right,
                         "a_text": samples[left][pid][0]["text"], "b_text": samples[right][pid][0]["text"],
                         "a_scores": {j: s[left][pid][0] for j, s in scores.items()},
                         "b_scores": {j: s[right][pid][0] for j, s in scores.items()}})
    return rows
