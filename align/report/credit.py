"""Token-level credit: which tokens of a preferred and a rejected response carried the preference.

For a trained version π and its reference π_ref (the model it started from), every completion token t of a pair's
chosen and rejected responses gets

    log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t),

teacher-forced in float32. Their sum over a response is log π(y|x) − log π_ref(y|x); times β it is DPO's implicit
reward, and β·(Σ_chosen − Σ_rejected) the implicit reward margin the DPO loss pushes up. For a reward model, where
it is cheap (responses of at most DROP_MAX_TOKENS tokens), each token also gets r(x, y) − r(x, y without token t):
how much of the reward that token carried. The report colours tokens by these values (align/report/html.py).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Optional, Sequence

from align.data import as_messages, prompt_ids, read_jsonl
from align.errors import AlignError, DataError
from align.generation import score_completions
from align.models import load_model
from align.store import export_preferences, get_model_version
from align.store.versions import loadable_spec

DROP_MAX_TOKENS = 64  # drop-one-token reward credit costs one reward forward per token: short responses only
SIDES = ("chosen", "rejected")


def pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds, decoded incrementally (a character split over two tokens lands on the second)."""
    out, before = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=False)
        if text.endswith("\ufffd") and i < len(ids) - 1:  # half a character: it is completed by a later token
            out.append("")
            continue
        out.append(text[len(before):] if text.startswith(before) else tokenizer.decode([ids[i]]))
        before = text
    return out


def pick_pairs(rows: Sequence[dict], k: int, seed: int = 0) -> list[dict]:
    """k pairs, decided ones (label chosen) first, in a seeded random order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: rows[i].get("label", "chosen") != "chosen")
    return [rows[i] for i in order[:k]]


def _ids(row: dict, side: str, tokenizer: Any) -> list[int]:
    """A response's completion ids: the stored sampled ids when they are this tokenizer's, else text + eos."""
    from align.preference import completion_ids  # deferred: torch; the report renders without it

    text = row[side] if isinstance(row[side], str) else row[side][-1]["content"]
    try:
        ids, _ = completion_ids(text, row.get(f"{side}_token_ids"), tokenizer, "pair", side)
    except DataError:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        return str(prompt[-1].get("content", ""))
    return str(prompt)


def log_ratio_credit(policy: Any, reference: Any, tokenizer: Any, rows: Sequence[dict], beta: float) -> list[dict]:
    """Per pair: {prompt, label, beta, margin, chosen/rejected: {tokens, log_ratio, sum, implicit_reward}}."""
    out = []
    for row in rows:
        prompt = prompt_ids(tokenizer, as_messages(row["prompt"]))
        pair: dict[str, Any] = {"prompt": _prompt_text(row["prompt"]), "label": row.get("label", "chosen"),
                                "beta": beta}
        for side in SIDES:
            ids = _ids(row, side, tokenizer)
            pol, _ = score_completions(policy, [prompt], [ids], None, tokenizer.pad_token_id)
            ref, _ = score_completions(reference, [prompt], [ids], None, tokenizer.pad_token_id)
            ratio = [p - r for p, r in zip(pol[0], ref[0])]
            total = math.fsum(ratio)
            pair[side] = {"tokens": pieces(tokenizer, ids), "ids": list(ids), "log_ratio": ratio, "sum": total,
                          "implicit_reward": beta * total}
        pair["margin"] = pair["chosen"]["implicit_reward"] - pair["rejected"]["implicit_reward"]
        out.append(pair)
    return out


def reward_drop_credit(pairs: list[dict], model: Any, tokenizer: Any, stats: Optional[dict], rows: Sequence[dict],
                       batch_size: int = 16) -> None:
    """Add `reward_drop` (r(full) − r(without token t), normalised reward units) to each side that is short
    enough; longer sides get `reward_drop_note`. Token ids come from the pair's own tokens (same tokenizer)."""
    from align.trainers.reward import score  # deferred: torch

    for pair, row in zip(pairs, rows):
        for side in SIDES:
            ids = [t for t in pair[side]["ids"] if t != tokenizer.eos_token_id]
            if len(ids) > DROP_MAX_TOKENS:
                pair[side]["reward_drop_note"] = f"{len(ids)} tokens: longer than {DROP_MAX_TOKENS}, not dropped one by one"
                continue
            texts = [tokenizer.decode(ids, skip_special_tokens=True)]
            texts += [tokenizer.decode(ids[:t] + ids[t + 1:], skip_special_tokens=True) for t in range(len(ids))]
            rewards = score(model, tokenizer, [row["prompt"]] * len(texts), texts, batch_size, stats)
            drops = [rewards[0] - r for r in rewards[1:]]
            pair[side]["reward"] = rewards[0]
            pair[side]["reward_drop"] = drops + [0.0] * (len(pair[side]["ids"]) - len(ids))  # eos: not dropped


def run_credit(run: Path, k: int, seed: int = 0, rows: Optional[list[dict]] = None) -> dict | str:
    """Credit for a training run directory (align report RUN): a DPO or RLHF policy against the model it started
    from on k pairs of its own preference data (or `rows`), a reward model's drop-one-token credit."""
    from align.config import ModelArgs  # deferred: align.config imports torch (through align.weighting)

    info = json.loads((run / "version.json").read_text())
    config = info.get("config") or {}
    method = info.get("method")
    rows = rows if rows is not None else _run_pairs(config)
    if not rows:
        return f"{info.get('name')}: no preference pairs to show (its config names no readable train_file/eval_file)"
    picked = pick_pairs(rows, k, seed)
    if method == "reward":
        from align.trainers.reward import load_reward_model  # deferred: torch

        model, tokenizer, stats = load_reward_model(str(run), device="auto")
        pairs = [{"prompt": _prompt_text(r["prompt"]), "label": r.get("label", "chosen"),
                  **{s: {"tokens": pieces(tokenizer, ids), "ids": ids}
                     for s in SIDES for ids in [_ids(r, s, tokenizer)]}} for r in picked]
        reward_drop_credit(pairs, model, tokenizer, stats, picked)
        return {"kind": "reward", "pairs": pairs}
    if not info.get("parent_spec"):
        return f"{info.get('name')}: version.json names no parent to compare with"
    try:
        policy, tokenizer = load_model(ModelArgs(model=str(run)), device="auto")
        reference, _ = load_model(ModelArgs(model=info["parent_spec"]), device="auto")
    except AlignError as err:
        return f"{info.get('name')}: {err}"
    beta = float(config.get("beta") or 1.0)
    pairs = log_ratio_credit(policy.eval(), reference.eval(), tokenizer, picked, beta)
    return {"kind": "log_ratio", "reference": info.get("parent"), "beta": beta, "pairs": pairs}


def _run_pairs(config: dict) -> list[dict]:
    for key in ("eval_file", "train_file"):
        path = config.get(key)
        if path and Path(path).is_file():
            rows = [r for r in read_jsonl(path) if all(k in r for k in ("prompt", "chosen", "rejected"))]
            if rows:
                return rows
    return []


def eval_credit(store, versions: Sequence, rows: Optional[list[dict]], judges: Sequence, k: int,
                seed: int = 0) -> dict | str:
    """Credit for `align eval`: each compared version that has a parent, against that parent, on k sampled pairs
    (the held-out pairs given, else the store's labelled pairs); the reward judge's drop-one-token credit."""
    from align.config import ModelArgs  # deferred: align.config imports torch (through align.weighting)

    if k <= 0:
        return "token credit turned off (--credit_pairs 0)"
    rows = rows if rows else export_preferences(store)
    if not rows:
        return "no labelled pairs in the store (or --heldout_pairs) to show token credit on"
    picked = pick_pairs(rows, k, seed)
    out: dict[str, Any] = {"per_version": {}, "skipped": {}}
    for v in versions:
        if v.parent_id is None:
            continue
        parent = get_model_version(store, v.parent_id)
        try:
            policy, tokenizer = load_model(ModelArgs(model=loadable_spec(v)), device="auto")
            reference, _ = load_model(ModelArgs(model=loadable_spec(parent)), device="auto")
        except AlignError as err:
            out["skipped"][v.name] = str(err)
            continue
        beta = float((v.training_config or {}).get("beta") or 1.0)
        out["per_version"][v.name] = {"kind": "log_ratio", "reference": parent.name, "beta": beta,
                                      "pairs": log_ratio_credit(policy.eval(), reference.eval(), tokenizer, picked,
                                                                beta)}
        del policy, reference
    judge = next((j for j in judges if j.name == "reward"), None)
    if judge is not None:
        pairs = [{"prompt": _prompt_text(r["prompt"]), "label": r.get("label", "chosen"),
                  **{s: {"tokens": pieces(judge.tokenizer, ids), "ids": ids}
                     for s in SIDES for ids in [_ids(r, s, judge.tokenizer)]}} for r in picked]
        reward_drop_credit(pairs, judge.model, judge.tokenizer, judge.stats, picked)
        out["reward_model"] = {"kind": "reward", "run": judge.run_dir, "pairs": pairs}
    if not out["per_version"] and "reward_model" not in out:
        return "no compared version has a parent to measure log-ratios against, and no reward judge"
    return out
