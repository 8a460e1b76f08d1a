"""Drift between versions: how a version's answers differ from its parent's on the same prompts, and whether the
pairs labelled on the parent's answers still lie where the new version puts its probability.

Per compared version whose parent is compared too:
- length: mean response length in tokens, parent and version;
- format: the share of responses with a fenced code block, a list, JSON (the whole answer, or a fenced block, parses
  as a JSON object or array), a refusal;
- embedding shift: per prompt, the cosine distance between the mean sentence embedding (all-MiniLM-L6-v2) of the
  version's answers and of the parent's, averaged over prompts; beside it, with two or more samples per prompt, the
  parent's own spread (mean distance between two of its answers to one prompt), which says what "far" means;
- support: the pairs labelled on the parent's answers, scored under the new version: per response ℓ/T =
  (log π_new(y) − log π_parent(y)) / T, and a pair is outside the new version's support when both its responses are
  below `weighting.OFF_SUPPORT` nat/token (the same map as the importance-weighting diagnostics,
  align.weighting.support_shares). A high share says the old pairs have stopped being relevant: new data, not
  reweighting, is the fix.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np

from align.data import as_messages, prompt_ids
from align.errors import AlignError
from align.generation import score_completions
from align.models import load_model
from align.report import clusters
from align.store import export_preferences
from align.store.versions import loadable_spec

MAX_SUPPORT_PAIRS = 64  # old pairs re-scored under the new version, per version
SUPPORT_BATCH = 16  # responses per scoring pass (one at a time cost the demo's evaluation ~20 s of its ~220)

_LIST = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.M)
_FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
_REFUSAL = re.compile(r"\b(?:I can(?:no|')t|I cannot|I'm sorry|I am sorry|I'm unable|I am unable|I won't|I will not|"
                      r"as an AI|I'm not able|I am not able)\b", re.I)
FORMATS = ("code_block", "list", "json", "refusal")


def _is_json(text: str) -> bool:
    for candidate in [text.strip()] + [m.strip() for m in _FENCE.findall(text)]:
        if candidate[:1] in "{[":
            try:
                json.loads(candidate)
                return True
            except ValueError:
                continue
    return False


def format_features(text: str) -> dict[str, bool]:
    """Which formats an answer uses (see the module docstring)."""
    return {"code_block": "```" in text, "list": len(_LIST.findall(text)) >= 2, "json": _is_json(text),
            "refusal": bool(_REFUSAL.search(text))}


def format_shares(texts: Sequence[str]) -> dict[str, float]:
    features = [format_features(t or "") for t in texts]
    return {k: (sum(f[k] for f in features) / len(features)) if features else math.nan for k in FORMATS}


def embedding_shift(new: dict, old: dict, prompt_ids: Sequence[int], embed: Callable) -> dict[str, Any]:
    """Mean over prompts of 1 − cos(mean embedding of new answers, mean embedding of old answers); and the old
    version's own spread (mean 1 − cos between two of its answers to one prompt), when it has two or more."""
    shared = [p for p in prompt_ids if new.get(p) and old.get(p)]
    texts = [(r["text"] or "(empty)")[:512] for p in shared for r in new[p] + old[p]]
    if not texts:
        return {"shift": math.nan, "prompts": 0}
    vectors = np.asarray(embed(texts), dtype=np.float64)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    shifts, spreads, at = [], [], 0
    for p in shared:
        a, b = vectors[at:at + len(new[p])], vectors[at + len(new[p]):at + len(new[p]) + len(old[p])]
        at += len(new[p]) + len(old[p])
        ma, mb = a.mean(0), b.mean(0)
        shifts.append(max(0.0, 1.0 - float(ma @ mb / max(np.linalg.norm(ma) * np.linalg.norm(mb), 1e-12))))
        if len(b) >= 2:
            sims = b @ b.T
            k = len(b)
            spreads.append(max(0.0, 1.0 - float((sims.sum() - np.trace(sims)) / (k * (k - 1)))))
    return {"shift": float(np.mean(shifts)), "parent_spread": float(np.mean(spreads)) if spreads else None,
            "prompts": len(shared)}


def support(store, new_version, parent, model: Any, tokenizer: Any, max_pairs: int = MAX_SUPPORT_PAIRS) -> dict | str:
    """The parent's labelled pairs under the new version: how many fall outside its support."""
    from align.weighting import OFF_SUPPORT, support_shares  # deferred: torch

    rows = [r for r in export_preferences(store, model_versions=[parent.name])
            if r.get("chosen_token_ids") and r.get("rejected_token_ids") and r.get("gen_chosen_logps") is not None
            and r.get("gen_rejected_logps") is not None][:max_pairs]
    if not rows:
        return f"no labelled pairs of {parent.name}'s answers with stored token ids and log-probs"
    prompts = [prompt_ids(tokenizer, as_messages(row["prompt"])) for row in rows]
    ratios = {"chosen": [], "rejected": []}
    for side in ("chosen", "rejected"):
        for start in range(0, len(rows), SUPPORT_BATCH):
            batch = rows[start:start + SUPPORT_BATCH]
            ids = [row[f"{side}_token_ids"] for row in batch]
            logps, _ = score_completions(model, prompts[start:start + SUPPORT_BATCH], ids, None, tokenizer.pad_token_id)
            ratios[side] += [(math.fsum(lp) - row[f"gen_{side}_logps"]) / max(1, len(t))
                             for lp, row, t in zip(logps, batch, ids)]
    shares = support_shares(ratios["chosen"], ratios["rejected"], [parent.name] * len(rows))[parent.name]
    return {**shares, "threshold": OFF_SUPPORT, "chosen_per_token": ratios["chosen"],
            "rejected_per_token": ratios["rejected"]}


def drift(store, versions: Sequence, samples: dict, prompt_ids: Sequence[int],
          embed: Optional[Callable | str]) -> dict | str:
    """{per_version: {name: {parent, length, format, embedding, support}}, notes}: every compared version against
    its parent when the parent is compared too."""
    from align.config import ModelArgs  # deferred: align.config imports torch (through align.weighting)

    by_id = {v.id: v for v in versions}
    children = [v for v in versions if v.parent_id in by_id]
    if not children:
        return "no compared version has its parent among the compared versions"
    if embed == clusters.DEFAULT:
        embed = clusters.minilm_embedder()
    out: dict[str, Any] = {"per_version": {}, "notes": {}}
    if isinstance(embed, str) or embed is None:
        out["notes"]["embedding"] = embed or "embeddings turned off"
        embed = None
    for v in children:
        parent = by_id[v.parent_id]
        new, old = samples[v.name], samples[parent.name]
        texts = {n: [r["text"] for p in prompt_ids for r in s.get(p, [])] for n, s in ((v.name, new), (parent.name, old))}
        lengths = {n: [r["length"] or 0 for p in prompt_ids for r in s.get(p, [])] for n, s in ((v.name, new),
                                                                                               (parent.name, old))}
        row: dict[str, Any] = {
            "parent": parent.name,
            "length": {"parent": float(np.mean(lengths[parent.name])), "version": float(np.mean(lengths[v.name]))},
            "format": {k: {"parent": a, "version": b} for (k, a), b in
                       zip(format_shares(texts[parent.name]).items(), format_shares(texts[v.name]).values())},
        }
        if embed is not None:
            row["embedding"] = embedding_shift(new, old, prompt_ids, embed)
        try:
            model, tokenizer = load_model(ModelArgs(model=loadable_spec(v)), device="auto")
            row["support"] = support(store, v, parent, model.eval(), tokenizer)
            del model
        except AlignError as err:
            row["support"] = f"{v.name} cannot be loaded here: {err}"
        out["per_version"][v.name] = row
    return out
