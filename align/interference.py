"""Stage interference: what preference training (DPO, RLHF) cost the SFT stage it started from.

Before training, the starting model is measured on
- held-out SFT conversations: the mean per-token NLL of their assistant tokens (the SFT loss), and
- held-out task prompts: the mean gold reward of greedy answers (the SFT stage's gold),
and the trained model is measured the same way after. Both pairs of numbers go into version.json's metrics
(`interference/*`) and DIR/interference.json; the report shows them. Past a threshold (the SFT loss up by more than
`interference_max_loss_increase` nats/token, or gold down by more than `interference_max_gold_drop`) the run warns
and names the remedy: `sft_weight`, DPO's NLL term on chosen responses, which keeps the SFT behaviour anchored.

Which SFT conversations: `interference_sft_file`, or with `auto` the held-out file (else the training file) of the
nearest SFT run in the starting model's lineage, else the shipped data/sft/eval.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch

from align.data import load_chat_file, tokenize_chat
from align.errors import AlignError
from align.evaluate import answer_tasks, gold_summary, stratified
from align.generation import SamplingSettings
from align.prompts import repo_file
from align.tasks import load_tasks

log = logging.getLogger(__name__)

GOLD_MAX_NEW_TOKENS = 64  # greedy answers to the task prompts; the shipped tasks' answers fit


def sft_file(setting: Optional[str], model_spec: str) -> tuple[Optional[str], str]:
    """(path, where it came from) of the SFT conversations to measure, or (None, why not)."""
    if setting and setting != "auto":
        return setting, "interference_sft_file"
    run: Optional[Path] = Path(model_spec).expanduser()
    seen = set()
    while run is not None and (run / "version.json").is_file() and run.resolve() not in seen:
        seen.add(run.resolve())
        info = json.loads((run / "version.json").read_text())
        config = info.get("config") or {}
        if info.get("method") == "sft":
            for key in ("eval_file", "train_file"):
                if config.get(key) and Path(config[key]).is_file():
                    return config[key], f"the {key} of SFT run {info.get('name')}"
        run = Path(info["parent_spec"]) if info.get("parent_spec") else None
    try:
        return str(repo_file("data/sft/eval.jsonl")), "the shipped data/sft/eval.jsonl (no SFT run in the lineage)"
    except AlignError as err:
        return None, str(err)


def sft_loss(model: Any, tokenizer: Any, conversations: list[list[dict]], max_length: int = 512,
             batch_size: int = 8) -> float:
    """Mean NLL per assistant token (token-weighted over all conversations), teacher-forced, float32."""
    rows = [r for r in (tokenize_chat(m, tokenizer, max_length) for m in conversations) if any(r["assistant_masks"])]
    if not rows:
        return math.nan
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            width = max(len(r["input_ids"]) for r in part)
            ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in part], device=device)
            attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in part],
                                     device=device)
            mask = torch.tensor([r["assistant_masks"] + [0] * (width - len(r["input_ids"])) for r in part],
                                device=device)
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
            logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            keep = mask[:, 1:].bool()
            total += float(-(logps * keep).sum())
            count += int(keep.sum())
    if was_training:
        model.train()
    return total / count if count else math.nan


class InterferenceCheck:
    """Measure the starting model (`before`), then the trained one (`after`), then `result()`."""

    def __init__(self, args: Any, model_spec: str, method: str, tokenizer: Any, sft_weight: Optional[float] = None):
        self.args, self.method, self.tokenizer, self.sft_weight = args, method, tokenizer, sft_weight
        self.enabled = args.interference_samples > 0 or args.interference_per_family > 0
        self.conversations: list = []
        self.tasks: list = []
        self.file, self.source = None, "off"
        self.before: dict[str, float] = {}
        if args.interference_samples > 0:
            self.file, self.source = sft_file(args.interference_sft_file, model_spec)
            if self.file is not None:
                self.conversations = load_chat_file(self.file, args.interference_samples)
        if args.interference_per_family > 0:
            self.tasks = stratified(load_tasks(repo_file("data/tasks/eval.jsonl")), args.interference_per_family)

    def measure(self, model: Any) -> dict[str, float]:
        out = {}
        if self.conversations:
            out["sft_loss"] = sft_loss(model, self.tokenizer, self.conversations)
        if self.tasks:
            was_training = model.training
            model.eval()
            rows = answer_tasks(model, self.tokenizer, self.tasks,
                                SamplingSettings(temperature=0.0, max_new_tokens=GOLD_MAX_NEW_TOKENS))
            if was_training:
                model.train()
            out["gold"] = gold_summary(rows)["all"]
        return out

    def start(self, model: Any) -> None:
        if self.enabled:
            self.before = self.measure(model)

    def finish(self, model: Any, out: Optional[Path]) -> dict[str, Any]:
        """Measure the trained model; return the metrics for version.json (and write DIR/interference.json)."""
        if not self.enabled or not self.before:
            return {}
        after = self.measure(model)
        result = {"method": self.method, "sft_file": self.file, "sft_source": self.source,
                  "sft_conversations": len(self.conversations), "gold_tasks": len(self.tasks),
                  "before": self.before, "after": after, "sft_weight": self.sft_weight,
                  "thresholds": {"sft_loss_increase": self.args.interference_max_loss_increase,
                                 "gold_drop": self.args.interference_max_gold_drop}}
        result["warning"] = warning(result)
        if result["warning"]:
            log.warning(result["warning"])
        if out is not None:
            from align.runs import write_json  # cycle: align.runs imports this module

            write_json(out / "interference.json", result)
        metrics = {f"interference/{k}_{when}": v for when, values in (("before", self.before), ("after", after))
                   for k, v in values.items()}
        if result["warning"]:
            metrics["interference_warning"] = result["warning"]
        return metrics


def warning(result: dict) -> Optional[str]:
    """One sentence when the stage cost the SFT stage more than the thresholds allow, naming sft_weight."""
    before, after, limits = result["before"], result["after"], result["thresholds"]
    found = []
    if "sft_loss" in before and "sft_loss" in after:
        rise = after["sft_loss"] - before["sft_loss"]
        if rise > limits["sft_loss_increase"]:
            found.append(f"held-out SFT loss rose from {before['sft_loss']:.4f} to {after['sft_loss']:.4f} "
                         f"nats/token (+{rise:.4f} > {limits['sft_loss_increase']})")
    if "gold" in before and "gold" in after:
        drop = before["gold"] - after["gold"]
        if drop > limits["gold_drop"]:
            found.append(f"gold reward fell from {before['gold']:.3f} to {after['gold']:.3f} "
                         f"(-{drop:.3f} > {limits['gold_drop']})")
    if not found:
        return None
    method = result["method"].upper()
    if result["method"] == "dpo":
        remedy = (f"raise sft_weight (the NLL term on chosen responses, now {result.get('sft_weight') or 0:g}) "
                  "to keep what SFT taught")
    else:
        remedy = ("RLHF has no NLL term: raise beta (or set kl_target), or train this stage with DPO and "
                  "sft_weight > 0 (the NLL term on chosen responses)")
    return f"stage interference: {method} cost the SFT stage: {'; '.join(found)}. Remedy: {remedy}."
