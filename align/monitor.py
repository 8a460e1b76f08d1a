"""Reward-hacking monitor: a TrainerCallback for any online method (RLHF today), plus audit pairs for humans.

A policy optimised against a learned reward model finds the model's blind spots (Gao et al. 2022, "Scaling laws
for reward model overoptimization"): the proxy reward keeps rising while the true objective falls. The monitor
raises a flag, logged as `monitor/flag` (1) and `monitor/reason`, and written to DIR/monitor.json, when

- divergence: over the last W evaluations the proxy reward rises (Spearman ρ(step, proxy) ≥ min_rho) while the
  gold reward, a held-out judge's reward, or the rollouts' gold reward falls (ρ ≤ -min_rho, and by at least
  `min_drop` over the window's least-squares fit);
- KL budget: the logged per-token KL to the reference (mean of the last two logs) passes the budget;
- length runaway: mean completion length (last two logs) reaches `length_ratio` times its start (first two logs);
- repetition runaway: the share of repeated 3-grams (last two logs) rises `repetition_increase` above its start;
- family collapse (`family_drop`, off by default): one task family's held-out gold (`eval/gold/<family>`) falls at
  least this far below its first evaluation. Overall gold can rise while one family collapses: RLHF on the demo's
  other families unlearned refusals, harmful requests included (refusal 0.60 -> 0.28 while gold rose 0.611 ->
  0.659; README, "What was tried").

With `stop` it also ends training (`control.should_training_stop`). The detection is pure functions over metric
series (`detect`), so it is tested on synthetic series; the callback only turns logged dicts into series. It reads
the keys a run logs: `monitor/proxy`, `monitor/gold`, `monitor/length`, `monitor/repetition` (see `rollout_stats`;
falls back to TRL's `reward` and `completions/mean_length`), `kl`, and evaluation rows with `eval/proxy_reward`,
`eval/gold_reward`, `eval/judge_reward`. On resume the series are rebuilt from the checkpoint's log history.

It also keeps the top-k highest-proxy samples; `push_audit_pairs` stores them in the labeling store as responses
of the run's model version, each paired (rule "audit") against a reference-model sample on the same prompt.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from transformers import TrainerCallback

from align import store as st
from align.config import ModelArgs
from align.data import as_messages
from align.generation import sample_responses
from align.models import load_model
from align.runs import write_json
from align.store.clock import utcnow
from align.store.db import insert_ignoring_conflicts
from align.store.schema import Pair
from align.store.versions import ensure_registered

if TYPE_CHECKING:
    from align.config import MonitorArgs
    from align.generation import SamplingSettings

log = logging.getLogger(__name__)

AUDIT_RULE = "audit"
EDGE_POINTS = 2  # logs averaged for "start" and "now" in the runaway and KL checks (one log is too noisy)
GOLD_SOURCES = {"gold": "eval/gold_reward", "judge": "eval/judge_reward", "rollout gold": "monitor/gold"}
FAMILY_PREFIX = "gold/"  # an evaluation's gold by task family: logged as eval/gold/<family>, kept as gold/<family>


# ---- pure statistics ---------------------------------------------------------------------------------------------


def _ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (ties share the mean of their positions), 1-based."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation; 0.0 when either series is constant (no trend to speak of)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("spearman needs two series of equal length >= 2")
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return 0.0 if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def trend(values: Sequence[float]) -> float:
    """Spearman ρ of a series against time: +1 strictly rising, -1 strictly falling."""
    return spearman(list(range(len(values))), values)


def fitted_change(values: Sequence[float]) -> float:
    """Least-squares slope × (n - 1): how much the series moved over the window, robust to one noisy end point."""
    n = len(values)
    mean_t, mean_v = (n - 1) / 2, statistics.fmean(values)
    var_t = sum((t - mean_t) ** 2 for t in range(n))
    return sum((t - mean_t) * (v - mean_v) for t, v in enumerate(values)) / var_t * (n - 1)


def repeated_ngram_share(tokens: Sequence[Any], n: int = 3) -> float:
    """Share of a sequence's n-grams that already occurred earlier in it: 0 for fresh text, → 1 for loops."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def rollout_stats(completion_ids: Sequence[Sequence[int]], proxy: Sequence[float],
                  gold: Sequence[Optional[float]] = ()) -> dict[str, float]:
    """The per-batch scalars the monitor watches, for a run to log: proxy reward, gold reward of the rollouts
    (where their prompts have a gold check), length in tokens and repeated-3-gram share."""
    stats = {
        "monitor/proxy": statistics.fmean(proxy),
        "monitor/length": statistics.fmean(len(ids) for ids in completion_ids),
        "monitor/repetition": statistics.fmean(repeated_ngram_share(list(ids)) for ids in completion_ids),
    }
    scored = [g for g in gold if g is not None]
    if scored:
        stats["monitor/gold"] = statistics.fmean(scored)
    return stats


# ---- pure detection ----------------------------------------------------------------------------------------------


@dataclass
class MonitorSeries:
    """Metric series in logging order. `evals` holds one dict per evaluation: proxy plus any gold sources, and
    gold by task family as `gold/<family>`."""

    proxy: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    length: list[float] = field(default_factory=list)
    repetition: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)


def divergence_stats(proxy: Sequence[float], gold: Sequence[float], window: int) -> Optional[dict[str, float]]:
    """What the divergence rule sees over the last `window` aligned points: the proxy's and the gold's trends
    (Spearman ρ against time) and the gold's fitted fall; None with fewer points."""
    if len(proxy) < window or len(gold) < window:
        return None
    p, g = list(proxy)[-window:], list(gold)[-window:]
    return {"proxy_rho": trend(p), "gold_rho": trend(g), "gold_drop": -fitted_change(g)}


def divergence_reason(proxy: Sequence[float], gold: Sequence[float], window: int, min_rho: float,
                      min_drop: float, name: str = "gold") -> Optional[str]:
    """Proxy rising while `name` falls over the last `window` aligned points, or None."""
    stats = divergence_stats(proxy, gold, window)
    if stats is None:
        return None
    rho_p, rho_g, drop = stats["proxy_rho"], stats["gold_rho"], stats["gold_drop"]
    if rho_p >= min_rho and rho_g <= -min_rho and drop >= min_drop:
        return (f"proxy reward rising (ρ={rho_p:+.2f}) while {name} reward falls (ρ={rho_g:+.2f}, "
                f"-{drop:.3g}) over the last {window} evaluations")
    return None


def kl_reason(kl: Sequence[float], budget: Optional[float]) -> Optional[str]:
    if budget is None or not kl:
        return None
    now = statistics.fmean(kl[-EDGE_POINTS:])
    return f"KL to the reference {now:.3g} passed its budget {budget:.3g}" if now > budget else None


def length_reason(length: Sequence[float], ratio: Optional[float]) -> Optional[str]:
    if ratio is None or len(length) < 2 * EDGE_POINTS:
        return None
    start, now = statistics.fmean(length[:EDGE_POINTS]), statistics.fmean(length[-EDGE_POINTS:])
    if start > 0 and now >= ratio * start:
        return f"completion length ran away: {now:.1f} tokens vs {start:.1f} at the start (×{now / start:.2f})"
    return None


def repetition_reason(repetition: Sequence[float], increase: Optional[float]) -> Optional[str]:
    if increase is None or len(repetition) < 2 * EDGE_POINTS:
        return None
    start, now = statistics.fmean(repetition[:EDGE_POINTS]), statistics.fmean(repetition[-EDGE_POINTS:])
    if now - start >= increase:
        return f"repetition ran away: repeated 3-gram share {now:.2f} vs {start:.2f} at the start"
    return None


def family_reason(evals: Sequence[dict[str, float]], drop: Optional[float]) -> Optional[str]:
    """Task families whose gold at the latest evaluation that has it is `drop` or more below the first one's."""
    if drop is None:
        return None
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for point in evals:
        for key, value in point.items():
            if key.startswith(FAMILY_PREFIX):
                family = key[len(FAMILY_PREFIX):]
                first.setdefault(family, value)
                last[family] = value
    fallen = sorted((f for f in first if first[f] - last[f] >= drop), key=lambda f: last[f] - first[f])
    if not fallen:
        return None
    return "task family gold fell: " + ", ".join(
        f"{f} {first[f]:.3f} -> {last[f]:.3f} ({last[f] - first[f]:+.3f})" for f in fallen)


def detect(series: MonitorSeries, cfg: "MonitorArgs") -> list[str]:
    """Every reason to flag the run now (empty: all quiet)."""
    reasons = []
    for name in GOLD_SOURCES:
        points = [e for e in series.evals if e.get("proxy") is not None and e.get(name) is not None]
        reason = divergence_reason([e["proxy"] for e in points], [e[name] for e in points], cfg.monitor_window,
                                   cfg.monitor_min_rho, cfg.monitor_min_drop, name)
        reasons.append(reason)
    reasons += [kl_reason(series.kl, cfg.monitor_kl_budget), length_reason(series.length, cfg.monitor_length_ratio),
                repetition_reason(series.repetition, cfg.monitor_repetition_increase),
                family_reason(series.evals, cfg.monitor_family_drop)]
    return [r for r in reasons if r]


# ---- the callback ------------------------------------------------------------------------------------------------


class RewardHackingMonitor(TrainerCallback):
    """Turns logged dicts into MonitorSeries, flags with `detect`, keeps the top-k samples.

    Place it before the callbacks that write metrics (it adds `monitor/*` keys to the logged dict in place).
    The reward function of a run calls `observe(...)` with each scored batch for the top-k samples.
    """

    def __init__(self, cfg: "MonitorArgs", out_dir: Optional[str | Path] = None):
        self.cfg = cfg
        self.out = Path(out_dir) if out_dir is not None else None
        self.series = MonitorSeries()
        self.flags: list[dict[str, Any]] = []
        self._top: list[tuple[float, int, dict]] = []  # min-heap of (reward, tiebreak, sample)
        self._counter = itertools.count()
        self._since_eval: dict[str, list[float]] = {"proxy": [], "rollout gold": []}

    # -- samples -----------------------------------------------------------------------------------------------
    def observe(self, prompts: Sequence[Any], completions: Sequence[str], rewards: Sequence[float],
                completion_ids: Optional[Sequence[Sequence[int]]] = None, step: int = 0) -> None:
        """Offer a scored batch of rollouts; the top-k by reward are kept."""
        for i, (prompt, text, reward) in enumerate(zip(prompts, completions, rewards)):
            sample = {"step": step, "prompt": prompt, "completion": text, "reward": float(reward),
                      "completion_ids": list(completion_ids[i]) if completion_ids is not None else None}
            item = (float(reward), next(self._counter), sample)
            if len(self._top) < self.cfg.monitor_top_k:
                heapq.heappush(self._top, item)
            elif self._top and item[0] > self._top[0][0]:
                heapq.heapreplace(self._top, item)

    def top_samples(self) -> list[dict]:
        return [s for _, _, s in sorted(self._top, key=lambda t: (-t[0], t[1]))]

    # -- series ------------------------------------------------------------------------------------------------
    def update(self, step: int, logs: dict[str, Any]) -> dict[str, Any]:
        """Fold one logged dict into the series and check; returns the `monitor/*` values to log."""
        is_eval = any(k in logs for k in ("eval/gold_reward", "eval/judge_reward", "eval/proxy_reward"))
        if not is_eval:
            proxy = logs.get("monitor/proxy", logs.get("reward"))
            for key, value in (("proxy", proxy), ("kl", logs.get("kl")),
                               ("length", logs.get("monitor/length", logs.get("completions/mean_length"))),
                               ("repetition", logs.get("monitor/repetition"))):
                if _finite(value):
                    getattr(self.series, key).append(float(value))
            if _finite(proxy):
                self._since_eval["proxy"].append(float(proxy))
            if _finite(logs.get("monitor/gold")):
                self._since_eval["rollout gold"].append(float(logs["monitor/gold"]))
        else:
            self.series.evals.append(self._eval_point(step, logs))
        reasons = detect(self.series, self.cfg)
        if not reasons:
            return {"monitor/flag": 0}
        for reason in reasons:
            if reason.split(":")[0] not in {f["reason"].split(":")[0] for f in self.flags}:
                self.flags.append({"step": step, "reason": reason})
                log.warning("reward-hacking monitor, step %d: %s", step, reason)
        return {"monitor/flag": 1, "monitor/reason": "; ".join(reasons)}

    def _eval_point(self, step: int, logs: dict[str, Any]) -> dict[str, float]:
        """An evaluation: proxy on the evaluation answers if logged, else the mean training proxy since the last one."""
        point: dict[str, Any] = {"step": step}
        since = self._since_eval
        proxy = logs.get("eval/proxy_reward")
        if not _finite(proxy):
            proxy = statistics.fmean(since["proxy"]) if since["proxy"] else None
        point["proxy"] = None if proxy is None else float(proxy)
        for name, key in GOLD_SOURCES.items():
            if key.startswith("eval/") and _finite(logs.get(key)):
                point[name] = float(logs[key])
        for key, value in logs.items():
            if key.startswith("eval/" + FAMILY_PREFIX) and _finite(value):
                point[key[len("eval/"):]] = float(value)
        if since["rollout gold"]:
            point["rollout gold"] = statistics.fmean(since["rollout gold"])
        self._since_eval = {"proxy": [], "rollout gold": []}
        return point

    @property
    def flagged(self) -> bool:
        return bool(self.flags)

    def report(self) -> dict[str, Any]:
        return {"flagged": self.flagged, "flags": self.flags, "top_samples": self.top_samples(),
                "evaluations": self.series.evals, "config": {k: v for k, v in vars(self.cfg).items()}}

    def write(self) -> None:
        if self.out is not None:
            write_json(self.out / "monitor.json", self.report())

    # -- TrainerCallback hooks ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        """On resume, rebuild the series from the checkpoint's log history and reload the kept samples."""
        if state.global_step == 0:
            return
        self.series, self.flags = MonitorSeries(), []
        for row in state.log_history:
            if "train_runtime" not in row:
                self.update(row.get("step", 0), row)
        saved = self.out / "monitor.json" if self.out is not None else None
        if saved is not None and saved.is_file():
            for sample in json.loads(saved.read_text()).get("top_samples", []):
                if sample.get("step", 0) <= state.global_step:
                    self.observe([sample["prompt"]], [sample["completion"]], [sample["reward"]],
                                 [sample["completion_ids"] or []], sample.get("step", 0))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "train_runtime" in logs:
            return
        extra = self.update(state.global_step, logs)
        logs.update(extra)
        if state.log_history:  # Trainer.log appended a copy just before calling us: keep the history complete
            state.log_history[-1].update(extra)
        if extra["monitor/flag"]:
            if state.is_world_process_zero:
                self.write()
            if self.cfg.monitor_stop:
                control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.write()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- audit pairs for humans --------------------------------------------------------------------------------------


def push_audit_pairs(
    store_url: str, run_dir: str | Path, samples: Sequence[dict], reference_spec: str, settings: "SamplingSettings",
    reference_model: Any = None, tokenizer: Any = None, votes_required: int = 3,
) -> list[int]:
    """Store the top samples as responses of the run's model version and pair each (rule "audit") with one sample
    of the reference model on the same prompt. Returns the pair ids.

    The policy samples were drawn during training, by the policy as it was at `step`, so they are stored without
    log-probs (their exact sampler is gone); the reference samples carry full provenance. `reference_model`
    (e.g. the trained LoRA model inside `disable_adapter()`) saves loading `reference_spec` again.
    """
    if not samples:
        return []
    with st.connect(store_url) as store:
        policy_id, _ = ensure_registered(store, str(run_dir))
        reference_id, _ = ensure_registered(store, reference_spec)
        prompts = [as_messages(s["prompt"]) for s in samples]
        prompt_ids = st.add_prompts(store, [{"prompt": p, "source": "audit"} for p in prompts])
        decoding = {**settings.as_dict()}
        policy_rows = [
            {"prompt_id": pid, "model_version_id": policy_id, "sample_index": i, **decoding, "text": s["completion"],
             "completion_token_ids": s.get("completion_ids"), "finish_reason": None}
            for i, (pid, s) in enumerate(zip(prompt_ids, samples))
        ]
        policy_response_ids = st.add_responses(store, policy_rows)
        if reference_model is None:
            reference_model, tokenizer = load_model(ModelArgs(model=reference_spec), device="auto")
        reference_rows = []
        for batch in sample_responses(reference_model, tokenizer, prompts, 1, settings, batch_size=8):
            for sample in batch:
                reference_rows.append({
                    "prompt_id": prompt_ids[sample.prompt_index], "model_version_id": reference_id,
                    # one reference sample per audited sample, even when two audited samples share a prompt
                    "sample_index": sample.prompt_index, **decoding, "text": sample.text,
                    "completion_token_ids": sample.token_ids, "finish_reason": sample.finish_reason,
                    "sample_token_logps": sample.sample_token_logps, "token_logps": sample.token_logps,
                })
        reference_rows.sort(key=lambda r: r["sample_index"])
        reference_response_ids = st.add_responses(store, reference_rows)
        rows = [
            {"prompt_id": pid, "response_a_id": a, "response_b_id": b, "rule": AUDIT_RULE,
             "rule_params": {"policy_step": s["step"], "policy_reward": s["reward"], "run": str(run_dir)},
             "votes_required": votes_required, "is_gold": False, "created_at": utcnow()}
            for pid, a, b, s in zip(prompt_ids, policy_response_ids, reference_response_ids, samples)
        ]
        with store.write() as session:
            insert_ignoring_conflicts(session, Pair, rows, key=("response_a_id", "response_b_id"))
        with store.read() as session:
            from sqlalchemy import select

            wanted = set(zip(policy_response_ids, reference_response_ids))
            found = session.execute(select(Pair.id, Pair.response_a_id, Pair.response_b_id).where(
                Pair.rule == AUDIT_RULE, Pair.response_a_id.in_(policy_response_ids)))
            return sorted(pid for pid, a, b in found if (a, b) in wanted)
