"""Preference pairs for DPO and reward models: load and validate JSONL, tokenise, batch, score.

Input rows are what `align export` writes (TRL's conversational preference format, data/README.md):
`prompt` (messages or a string), `chosen` and `rejected` (one assistant message or a string), and optional
`label` (chosen | tie | both_bad), `margin`, `label_agreement`, `weight`, `gen_chosen_logps`, `gen_rejected_logps`,
`chosen_token_ids`, `rejected_token_ids`, `gen_model_version`, `gen_logps_by_version`, `pair_id`.

A completion's token ids are the stored ones when present (exactly what the sampler produced, which importance
weights need), else the response text followed by the tokenizer's eos token (the end of an assistant turn).
Chosen and rejected go into ONE padded batch of 2B rows, so one forward pass scores both.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from align.data import (CHARS_PER_TOKEN, ROLES, Source, as_messages, cap_text, check_messages, open_source, open_split,
                        parse_columns, prompt_ids, refuse_templated, template_markers)
from align.errors import DataError
from align.logprobs import IGNORE_INDEX, score_tokens

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

LABELS = ("chosen", "tie", "both_bad")
SIDES = ("chosen", "rejected")


@dataclass
class PreferencePair:
    """One validated preference pair. The field names are the columns `align export` writes (data/README.md);
    `where` ("file:line" or "name: row N") names the input row in later errors."""

    where: str
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    label: str = "chosen"  # chosen | tie | both_bad
    pair_id: Any = None
    margin: Optional[float] = None
    label_agreement: Optional[float] = None
    weight: Optional[float] = None
    gen_chosen_logps: Optional[float] = None
    gen_rejected_logps: Optional[float] = None
    chosen_token_ids: Optional[list[int]] = None
    rejected_token_ids: Optional[list[int]] = None
    gen_model_version: Optional[str] = None
    gen_logps_by_version: Optional[dict[str, tuple[float, float]]] = None

    def text(self, side: str) -> str:
        """The response of one side ("chosen" or "rejected")."""
        return self.chosen if side == "chosen" else self.rejected

    def token_ids(self, side: str) -> Optional[list[int]]:
        """The stored sampled token ids of one side, or None."""
        return self.chosen_token_ids if side == "chosen" else self.rejected_token_ids


@dataclass
class PreferenceSet:
    """Validated rows of one input. Each row keeps `where` ("file:line" or "name: row N") so later errors can name
    it; `format` is the recognised input format, `dropped` counts rows left out (and why)."""

    path: str
    rows: list[PreferencePair]
    n_read: int
    both_bad_dropped: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    format: str = "conversational-explicit"
    dropped: dict[str, int] = field(default_factory=dict)
    data_hash: str = ""

    @property
    def name(self) -> str:
        return self.path

    def describe(self) -> str:
        return f"read {self.n_read:,} rows of {self.path} as {PAIR_FORMATS[self.format]}"


# --- recognising a preference format -------------------------------------------------------------------------------

PAIR_FORMATS = {
    "standard-explicit": "standard preferences with explicit prompts",
    "conversational-explicit": "conversational preferences with explicit prompts",
    "standard-implicit": "standard preferences with implicit prompts (the shared leading text is the prompt)",
    "conversational-implicit": "conversational preferences with implicit prompts (the shared leading turns are the "
                               "prompt)",
    "ultrafeedback": "UltraFeedback-binarized preferences (score_chosen - score_rejected is the margin)",
    "hh": "Anthropic HH text preferences (\\n\\nHuman: / \\n\\nAssistant: turns; the shared leading turns are the prompt)",
}
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def pair_format(source: Source) -> str:
    cols = set(source.columns)
    if {"chosen", "rejected"} <= cols:
        first = next(iter(source))
        conversational = isinstance(first.get("chosen"), list)
        if "prompt" in cols:
            if {"score_chosen", "score_rejected"} <= cols:
                return "ultrafeedback"
            return "conversational-explicit" if conversational or isinstance(first.get("prompt"), list) else "standard-explicit"
        if not conversational and isinstance(first.get("chosen"), str) and HH_TURN.match(first["chosen"]):
            return "hh"
        return "conversational-implicit" if conversational else "standard-implicit"
    if {"prompt", "completion", "label"} <= cols:
        raise DataError(f"{source.name}: holds unpaired rows (prompt, completion, boolean label); DPO and reward "
                        "models learn from two responses to one prompt compared, so they cannot use them. Pair the "
                        "responses (`align export --kind preferences`), or train SFT on them (label true rows)")
    raise DataError(f"{source.name}: cannot tell the preference format from the columns "
                    f"{', '.join(source.columns)}; align reads prompt/chosen/rejected (standard or conversational), "
                    "chosen/rejected with an implicit prompt, UltraFeedback and Anthropic HH; map other names with "
                    "--columns, e.g. --columns prompt=question,chosen=good,rejected=bad")


def hh_messages(text: Any, column: str, where: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{user: hi}, {assistant: hello}]."""
    if not isinstance(text, str):
        raise DataError(f"{where}: '{column}' must be Anthropic HH text, got {type(text).__name__}")
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(f"{where}: '{column}' must start with '\\n\\nHuman:' and alternate Human/Assistant turns")
    return [{"role": HH_ROLES[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts), 2)]


def _split_shared(chosen: list, rejected: list, where: str) -> tuple[list, list, list]:
    """(shared leading turns, chosen rest, rejected rest) of two conversations: the implicit prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(f"{where}: chosen and rejected share no leading turns, so there is no prompt; give a "
                        "'prompt' column (or map one with --columns)")
    return chosen[:n], chosen[n:], rejected[n:]


def _strip_prompt(prompt: list, response: Any) -> Any:
    """UltraFeedback-style responses repeat the prompt's turns before the answer: drop them."""
    if isinstance(response, list) and len(response) > len(prompt) and response[:len(prompt)] == prompt:
        return response[len(prompt):]
    return response


def to_native(fmt: str, raw: dict[str, Any], where: str) -> dict[str, Any]:
    """A row of any recognised format -> align's own row (prompt messages or text, chosen/rejected responses)."""
    row = dict(raw)
    if fmt == "hh":
        chosen, rejected = hh_messages(raw["chosen"], "chosen", where), hh_messages(raw["rejected"], "rejected", where)
        row["prompt"], row["chosen"], row["rejected"] = _split_shared(chosen, rejected, where)
    elif fmt == "conversational-implicit":
        chosen = check_messages(raw["chosen"], where, "chosen")
        rejected = check_messages(raw["rejected"], where, "rejected")
        row["prompt"], row["chosen"], row["rejected"] = _split_shared(chosen, rejected, where)
    elif fmt == "standard-implicit":
        chosen, rejected = (response_text(raw[k], k, where) for k in SIDES)
        n = len(os.path.commonprefix([chosen, rejected]))
        if n == 0:
            raise DataError(f"{where}: chosen and rejected share no leading text, so there is no prompt; give a "
                            "'prompt' column (or map one with --columns)")
        row["prompt"], row["chosen"], row["rejected"] = chosen[:n], chosen[n:], rejected[n:]
    elif fmt in ("conversational-explicit", "ultrafeedback") and isinstance(raw["prompt"], (list, str)):
        prompt = _prompt(raw["prompt"], where)
        row["chosen"], row["rejected"] = (_strip_prompt(prompt, raw[k]) for k in SIDES)
        scores = [_number(raw, f"score_{k}", where) for k in SIDES] if fmt == "ultrafeedback" else [None]
        if None not in scores and raw.get("margin") is None:
            row["margin"] = scores[0] - scores[1]
    return row


# --- loading and validation ------------------------------------------------------------------------------------------


def _prompt(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str) and value.strip():
        return as_messages(value)
    if isinstance(value, list) and value:
        return check_messages(value, where, "prompt")  # unknown roles (human, gpt, ...) refused, naming the row
    raise DataError(f"{where}: 'prompt' must be a non-empty string or a list of {{role, content}} messages")


def response_text(value: Any, column: str, where: str) -> str:
    """A response given as a string or as a list with one assistant message, as text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        message = value[0]
        if message.get("role") == "assistant" and isinstance(message.get("content"), str):
            return message["content"]
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: '{column}' has role {message.get('role')!r}; expected assistant")
    raise DataError(f"{where}: '{column}' must be a string or a list with one assistant message")


def _number(row: dict, key: str, where: str) -> Optional[float]:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: '{key}' must be a number, got {value!r}")
    if not math.isfinite(value):
        raise DataError(f"{where}: '{key}' is {value}, not a finite number")
    return float(value)


def _token_ids(row: dict, key: str, where: str) -> Optional[list[int]]:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise DataError(f"{where}: '{key}' must be a non-empty list of integer token ids")
    return value


def _by_version(row: dict, where: str) -> Optional[dict[str, tuple[float, float]]]:
    value = row.get("gen_logps_by_version")
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise DataError(f"{where}: 'gen_logps_by_version' must be an object {{version: [chosen_logp, rejected_logp]}}")
    out = {}
    for version, pair in value.items():
        if not isinstance(pair, list) or len(pair) != 2:
            raise DataError(f"{where}: gen_logps_by_version[{version!r}] must be [chosen_logp, rejected_logp]")
        numbers = {"c": pair[0], "r": pair[1]}
        out[str(version)] = (_number(numbers, "c", where), _number(numbers, "r", where))
        if None in out[str(version)]:
            raise DataError(f"{where}: gen_logps_by_version[{version!r}] has a missing value")
    return out


def validate_row(raw: dict, where: str) -> PreferencePair:
    """One input row -> a PreferencePair; DataError naming `where` on any bad value."""
    label = raw.get("label")
    if label is None:
        label = "chosen"
    elif not isinstance(label, str) or label not in LABELS:
        # Never `label or "chosen"`: 0 / false would silently become a win.
        raise DataError(f"{where}: label {label!r} is not one of {', '.join(LABELS)} (or absent: chosen is preferred); "
                        "a true/false label belongs to unpaired rows (prompt, completion, label), not to pairs")
    numbers = {key: _number(raw, key, where)
               for key in ("margin", "label_agreement", "weight", "gen_chosen_logps", "gen_rejected_logps")}
    if numbers["label_agreement"] is not None and not 0 <= numbers["label_agreement"] <= 1:
        raise DataError(f"{where}: label_agreement must lie in [0, 1], got {numbers['label_agreement']}")
    if numbers["weight"] is not None and numbers["weight"] < 0:
        raise DataError(f"{where}: weight must be >= 0, got {numbers['weight']}")
    version = raw.get("gen_model_version") or raw.get("gen_chosen_model_version")
    return PreferencePair(
        where=where,
        prompt=_prompt(raw["prompt"], where),
        chosen=response_text(raw["chosen"], "chosen", where),
        rejected=response_text(raw["rejected"], "rejected", where),
        label=label,
        pair_id=raw.get("pair_id"),
        gen_logps_by_version=_by_version(raw, where),
        chosen_token_ids=_token_ids(raw, "chosen_token_ids", where),
        rejected_token_ids=_token_ids(raw, "rejected_token_ids", where),
        gen_model_version=None if version is None else str(version),
        **numbers,
    )


def load_preferences(path: str | Path | Source, limit: Optional[int] = None, both_bad: str = "drop",
                     max_length: Optional[int] = None, columns: Optional[str] = None) -> PreferenceSet:
    """Read, recognise, convert, validate and count preference rows (any input open_source reads). both_bad pairs
    are dropped (counted, logged) or become ties; pairs with an empty response or chosen == rejected are dropped
    and counted; texts beyond CHARS_PER_TOKEN x max_length characters are cut before tokenising."""
    source = path if isinstance(path, Source) else open_source(str(path)).rename(parse_columns(columns))
    source = source.take(limit)
    fmt = pair_format(source)
    max_chars = None if max_length is None else max_length * CHARS_PER_TOKEN
    rows, dropped = [], {"empty_responses": 0, "identical_pairs": 0}
    for i, raw in enumerate(source):
        where = source.where(i)
        row = validate_row(to_native(fmt, raw, where), where)
        if not row.chosen.strip() or not row.rejected.strip():
            dropped["empty_responses"] += 1
            continue
        if row.chosen.strip() == row.rejected.strip():
            dropped["identical_pairs"] += 1
            continue
        for side in SIDES:
            if row.token_ids(side) is None:
                setattr(row, side, cap_text(row.text(side), max_chars))
        row.prompt = [dict(m, content=cap_text(m["content"], max_chars)) for m in row.prompt]
        rows.append(row)
    counts = {label: sum(r.label == label for r in rows) for label in LABELS}
    both_bad_dropped = 0
    if both_bad == "drop":
        both_bad_dropped = counts["both_bad"]
        rows = [r for r in rows if r.label != "both_bad"]
        if both_bad_dropped:
            log.warning("%s: dropped %d both-bad pair(s) of %d (both_bad: drop; set both_bad: tie to train on them "
                        "as ties)", source.name, both_bad_dropped, len(source))
    else:
        for r in rows:
            if r.label == "both_bad":
                r.label = "tie"
    dropped = {k: v for k, v in dropped.items() if v}
    pset = PreferenceSet(source.name, rows, len(source), both_bad_dropped, counts, fmt, dropped, source.data_hash())
    log.info("%s", pset.describe())
    if dropped:
        log.warning("%s: dropped %s", source.name,
                    ", ".join(f"{v} pair(s) with {k.replace('_', ' ')}" for k, v in dropped.items()))
    if not rows:
        raise DataError(f"{source.name}: no pairs left to train on (both-bad dropped: {both_bad_dropped}, "
                        f"{', '.join(f'{k}: {v}' for k, v in dropped.items()) or 'nothing else dropped'})")
    return pset


# --- tokenisation ----------------------------------------------------------------------------------------------------


def completion_ids(text: str, stored: Optional[list[int]], tokenizer: "PreTrainedTokenizerBase", where: str,
                   side: str, strict: bool = True) -> tuple[list[int], Optional[bool]]:
    """(token ids of one response, whether they are the stored sampled ids). Stored ids are checked: each id
    within the vocabulary, and decoding them reproduces the text (else they belong to another tokenizer). Ids of
    another tokenizer are refused when `strict` (importance weights need the sampled ids), else the text is
    tokenised instead and the second value is None (counted by the caller)."""
    from_text = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if stored is None:
        return from_text, False
    vocab = len(tokenizer)
    bad = [t for t in stored if not 0 <= t < vocab]
    problem = None
    if bad:
        problem = (f"{where}: {side}_token_ids has id {bad[0]} outside the tokenizer's vocabulary "
                   f"(size {vocab}); were the responses generated with another tokenizer?")
    else:
        # The store keeps a sampled NUL as U+FFFD (align.store.samples.response_record): compare alike.
        decoded = tokenizer.decode(stored, skip_special_tokens=True).replace("\x00", "\ufffd")
        if decoded.strip() != text.replace("\x00", "\ufffd").strip():
            problem = (f"{where}: {side}_token_ids do not decode to the '{side}' text "
                       f"({decoded[:40]!r} vs {text[:40]!r}); were they made by another tokenizer?")
    if problem is None:
        return list(stored), True
    if strict:
        raise DataError(problem)
    return from_text, None


def tokenize_pairs(
    pset: PreferenceSet, tokenizer: "PreTrainedTokenizerBase", max_length: Optional[int] = None,
    max_prompt_length: Optional[int] = None, strict_ids: bool = True,
) -> tuple[list[dict], list[dict], dict[str, int]]:
    """(full features, truncated features, counts). Full = untruncated, for importance weights (the stored
    log-probs cover every sampled token); truncated = what training sees (None: no limit). A feature holds `index`, `prompt_ids`,
    `chosen_ids`, `rejected_ids`, `is_tie`, `weight` (1.0 until weights are attached), `margin`, `soft_label`."""
    full, cut = [], []
    counts = {"truncated_prompts": 0, "truncated_completions": 0, "stored_token_ids": 0, "retokenized_foreign_ids": 0}
    markers = template_markers(tokenizer)
    for i, row in enumerate(pset.rows):
        for j, message in enumerate(row.prompt, start=1):
            refuse_templated(message["content"], markers, row.where, f"prompt message {j}")
        for side in SIDES:
            refuse_templated(row.text(side), markers, row.where, side)
        feature = {"index": i, "prompt_ids": prompt_ids(tokenizer, row.prompt), "is_tie": row.label == "tie",
                   "weight": 1.0 if row.weight is None else row.weight,
                   "margin": row.margin or 0.0, "soft_label": row.label_agreement}
        for side in SIDES:
            feature[f"{side}_ids"], stored = completion_ids(row.text(side), row.token_ids(side), tokenizer, row.where,
                                                            side, strict_ids)
            counts["stored_token_ids"] += bool(stored)
            counts["retokenized_foreign_ids"] += stored is None
        full.append(feature)
        short = dict(feature)
        if max_prompt_length is not None and len(short["prompt_ids"]) > max_prompt_length:  # keep the end: the question nearest the answer
            short["prompt_ids"] = short["prompt_ids"][-max_prompt_length:]
            counts["truncated_prompts"] += 1
        room = math.inf if max_length is None else max_length - len(short["prompt_ids"])
        for side in SIDES:
            if len(short[f"{side}_ids"]) > room:
                short[f"{side}_ids"] = short[f"{side}_ids"][:room]
                counts["truncated_completions"] += 1
        cut.append(short)
    if counts["retokenized_foreign_ids"]:
        log.warning("%s: %d response(s) carry token ids of another tokenizer (another model generated them); "
                    "tokenised from their text instead (importance weighting would refuse them)", pset.path,
                    counts["retokenized_foreign_ids"])
    if counts["truncated_prompts"] or counts["truncated_completions"]:
        log.warning("%s: truncated %d prompt(s) to max_prompt_length=%d and %d completion(s) to max_length=%d",
                    pset.path, counts["truncated_prompts"], max_prompt_length, counts["truncated_completions"], max_length)
    return full, cut, counts


# --- batching --------------------------------------------------------------------------------------------------------

# Per-pair float columns a feature may carry into the batch (B,); missing soft labels default per row.
FLOAT_COLUMNS = ("weight", "margin", "ref_chosen_logps", "ref_rejected_logps",
                 "ref_chosen_log_collision", "ref_rejected_log_collision")


@dataclass
class PreferenceCollator:
    """Features -> one batch of 2B rows: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected.

    `labels` is -100 on prompt and padding (right padding), so log-probs cover completion tokens only.
    Also (B,): `index`, `is_tie`, `label_agreement` (NaN where missing), `soft_label` (label_agreement, default
    1 - label_smoothing), and the FLOAT_COLUMNS that every feature carries.
    """

    pad_token_id: int
    label_smoothing: float = 0.0

    def __call__(self, features: Sequence[dict]) -> dict[str, "torch.Tensor"]:
        import torch

        seqs, labels = [], []
        for side in SIDES:
            for f in features:
                seqs.append(f["prompt_ids"] + f[f"{side}_ids"])
                labels.append([IGNORE_INDEX] * len(f["prompt_ids"]) + f[f"{side}_ids"])
        width = max(map(len, seqs))
        batch = {
            "input_ids": torch.tensor([s + [self.pad_token_id] * (width - len(s)) for s in seqs]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
            "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels]),
        }
        return {**batch, **pair_columns(features, self.label_smoothing)}


def pair_columns(features: Sequence[dict], label_smoothing: float = 0.0) -> dict[str, "torch.Tensor"]:
    """The (B,) per-pair columns of a batch, padded or packed: `index`, `is_tie`, `label_agreement` (NaN where
    missing), `soft_label` (label_agreement, default 1 - label_smoothing), and the FLOAT_COLUMNS every feature has."""
    import torch

    columns = {
        "index": torch.tensor([f["index"] for f in features]),
        "is_tie": torch.tensor([bool(f["is_tie"]) for f in features]),
        "label_agreement": torch.tensor([math.nan if f["soft_label"] is None else f["soft_label"] for f in features]),
        "soft_label": torch.tensor([1.0 - label_smoothing if f["soft_label"] is None else f["soft_label"]
                                    for f in features]),
    }
    for key in FLOAT_COLUMNS:
        if all(key in f for f in features):
            columns[key] = torch.tensor([float(f[key]) for f in features], dtype=torch.float32)
    return columns


def completion_logps(model: Any, batch: dict, with_collision: bool = False) -> dict[str, "torch.Tensor"]:
    """One forward over the 2B rows -> (B,) float32 `chosen_logps`, `rejected_logps` (sums over completion
    tokens), `chosen_lengths`, `rejected_lengths`, and `*_log_collision` (WPO's Σ log Σ_v p²) on request.

    The log-probs come from `align.logprobs.score_tokens`: chunked over the scored tokens, no (2B, T, V) logits.
    A packed batch (`align.packing.PackedPreferenceCollator`) gives the same values from its one packed row."""
    if "segments" in batch:
        from align.packing import packed_completion_logps  # cycle: align.packing imports this module

        return packed_completion_logps(model, batch, with_collision)
    scored = score_tokens(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                          with_collision=with_collision)
    half = scored.mask.shape[0] // 2
    logps = scored.sums()
    lengths = scored.mask.sum(-1).float()
    out = {"chosen_logps": logps[:half], "rejected_logps": logps[half:],
           "chosen_lengths": lengths[:half], "rejected_lengths": lengths[half:]}
    if with_collision:
        coll = scored.collision.sum(-1)
        out["chosen_log_collision"], out["rejected_log_collision"] = coll[:half], coll[half:]
    return out


def to_device(batch: dict, device: Any) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def score_pairs(
    model: Any, features: Sequence[dict], collator: PreferenceCollator, batch_size: int,
    accelerator: Any = None, with_collision: bool = False, fn: Optional[Callable[[Any, dict], dict]] = None,
) -> dict[str, "torch.Tensor"]:
    """No-grad pass: completion_logps (or `fn(model, batch)` -> {name: (B,)}) for every feature, as (N,) float64
    tensors in feature order.

    Under data parallelism each rank scores its share and the results are gathered, so every rank ends with the
    values of the WHOLE dataset (importance weights are normalised over all of it, identically on every rank).
    Rows are batched by length to waste little padding.
    """
    import torch

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = sorted(range(rank, len(features), world), key=lambda i: len(features[i]["chosen_ids"]) +
                  len(features[i]["rejected_ids"]) + len(features[i]["prompt_ids"]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[tuple[int, dict[str, float]]] = []
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            batch = to_device(collator([features[i] for i in chunk]), device)
            out = fn(model, batch) if fn is not None else completion_logps(model, batch, with_collision)
            values = {k: v.double().cpu().tolist() for k, v in out.items()}
            results += [(i, {k: v[j] for k, v in values.items()}) for j, i in enumerate(chunk)]
    model.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    results.sort(key=lambda item: item[0])
    keys = results[0][1].keys()
    return {k: torch.tensor([r[k] for _, r in results], dtype=torch.float64) for k in keys}


def load_pair_sets(data_args: Any, both_bad: str) -> tuple[PreferenceSet, Optional[PreferenceSet]]:
    """The training set and, when the config names one (eval_file, or dataset_eval_split of dataset_name), the
    held-out set."""
    train_set = load_preferences(open_split(data_args, "train"), data_args.max_train_samples, both_bad,
                                 data_args.max_length)
    eval_source = open_split(data_args, "eval")
    eval_set = (load_preferences(eval_source, data_args.max_eval_samples, both_bad, data_args.max_length)
                if eval_source is not None else None)
    return train_set, eval_set


def tokenize_sets(train_set: PreferenceSet, eval_set: Optional[PreferenceSet], tokenizer: Any, data_args: Any,
                  strict_ids: bool = True) -> tuple:
    """(full, features, counts) of the training set as tokenize_pairs returns them, and the eval features.
    strict_ids=False (no importance weighting): stored token ids of another tokenizer give way to the text."""
    full, features, counts = tokenize_pairs(train_set, tokenizer, data_args.max_length, data_args.max_prompt_length,
                                            strict_ids)
    eval_features = (tokenize_pairs(eval_set, tokenizer, data_args.max_length, data_args.max_prompt_length,
                                    strict_ids)[1] if eval_set else [])
    return full, features, counts, eval_features
