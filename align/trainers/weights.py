"""Importance weights of a preference dataset: compute, report (weights.json + weights.png), `align weights`.

Static target (the default): the target policy π is the model a run starts from (the DPO reference), scored once
before training, with log-softmax in float32 over the STORED sampled token ids, on the whole dataset (every
data-parallel rank ends with the same weights: they are normalised before the data is sharded).

Dynamic target (DPO only, `DynamicWeights`): the current policy, recomputed each step and detached. The dataset
normaliser cannot be recomputed every step, so a running estimate is used; see `DynamicWeights`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from align import runs
from align.config import TrainArgs, WeightingArgs
from align.errors import DataError
from align.preference import PreferencePair, PreferenceSet
from align.reuse import AutoChoice, choose_weighting, too_little_evidence, worth_report
from align.weighting import (SCHEMES, WeightResult, compute_importance_weights, log_weight_shift,
                             weight_diagnostics)

log = logging.getLogger(__name__)

_HINT = ("use weighting_scheme 'wpo' (self-weights, no generation log-probs needed), or run `align rescore` to score "
         "the stored responses under the model version that generated them")


def check_columns(pset: PreferenceSet, scheme: str) -> None:
    """Fail early, naming the first row that lacks what `scheme` needs (its record's `row_fields`)."""
    record = SCHEMES[scheme]
    for row in pset.rows:
        missing = [name for name in record.row_fields if getattr(row, name) is None]
        if missing:
            raise DataError(f"{row.where}: weighting scheme '{scheme}' needs {' and '.join(record.row_fields)}, "
                            f"and this row has no {' or '.join(missing)}; {_HINT}")
    if "gen_logps_by_version" in record.row_fields:  # every row scored under every pooled version
        versions = {r.gen_model_version for r in pset.rows}
        for row in pset.rows:
            missing = versions - set(row.gen_logps_by_version)
            if missing:
                raise DataError(f"{row.where}: gen_logps_by_version lacks pooled version(s) {sorted(missing)}")
    if record.scores_samples:
        unstored = sum(r.chosen_token_ids is None or r.rejected_token_ids is None for r in pset.rows)
        if unstored:
            log.warning("%s: %d pair(s) have no stored token ids; their target log-probs use re-tokenised text, which "
                        "may not be the sampled tokens the generation log-probs cover", pset.path, unstored)


def _versions(pset: PreferenceSet) -> Optional[list[str]]:
    versions = [r.gen_model_version for r in pset.rows]
    return None if any(v is None for v in versions) else versions


def file_weights(pset: PreferenceSet) -> WeightResult:
    """Scheme none: the data's `weight` column (missing entries count 1), or all ones; with diagnostics."""
    given = [r.weight for r in pset.rows]
    weights = torch.tensor([1.0 if w is None else w for w in given], dtype=torch.float32)
    if float(weights.sum()) <= 0:
        raise DataError(f"{pset.path}: every pair has weight 0")
    log_w = torch.log(weights.double().clamp_min(1e-30))
    diag = weight_diagnostics(weights, log_w, source_version=_versions(pset))
    diag["scheme"] = "none" if all(w is None for w in given) else "none (weight column)"
    return WeightResult(weights, log_w.float(), diag)


def own_version(cols: dict, versions: Sequence[str], tolerance: float = 1e-2) -> Optional[str]:
    """The version whose pairs the target model itself sampled: its generation log-probs equal the target's (mean
    |ℓ|/T below `tolerance` nat/token, float32 re-scoring noise aside); None when no version's do."""
    ratio = ((cols["target_chosen_logps"] - cols["gen_chosen_logps"]).abs() / cols["chosen_lengths"]
             + (cols["target_rejected_logps"] - cols["gen_rejected_logps"]).abs() / cols["rejected_lengths"]) / 2
    means = {v: float(ratio[torch.tensor([s == v for s in versions])].mean()) for v in dict.fromkeys(versions)}
    best = min(means, key=means.get)
    return best if means[best] < tolerance else None


def _columns(rows: Sequence[PreferencePair], scores: dict) -> dict:
    return {"target_chosen_logps": scores["chosen_logps"].double(),
            "target_rejected_logps": scores["rejected_logps"].double(),
            "gen_chosen_logps": torch.tensor([r.gen_chosen_logps for r in rows], dtype=torch.float64),
            "gen_rejected_logps": torch.tensor([r.gen_rejected_logps for r in rows], dtype=torch.float64),
            "chosen_lengths": scores["chosen_lengths"].double(), "rejected_lengths": scores["rejected_lengths"].double()}


def auto_weights(pset: PreferenceSet, full_features: Sequence[dict], weighting: WeightingArgs, score: Any,
                 make_pilot: Any = None) -> tuple[WeightResult, Optional[dict[str, torch.Tensor]]]:
    """weighting_scheme auto (align.reuse.choose_weighting), with the choice, the candidates' scores and the reason
    in the diagnostics (`auto`), the log, and so weights.json, the run record and the report. `make_pilot(scores)`
    returns a LoraPilot (align.trainers.pilot) or None (no pilot fits: then auto can only fall back to none)."""
    rows, versions, scores = pset.rows, _versions(pset), None
    cols = new_version = None

    def unweighted(choice: AutoChoice) -> tuple[WeightResult, Optional[dict]]:
        result = file_weights(pset)
        result.diagnostics.update({"scheme": f"{result.diagnostics['scheme']}, by auto", "auto": choice.record()})
        if cols is not None:
            result.diagnostics["worth"] = worth_report(cols, versions, new_version, clip=weighting.weighting_clip,
                                                       choice=choice)
        log.info("weighting auto: none: %s", choice.reason)
        return result, scores

    if versions is None or any(r.gen_chosen_logps is None or r.gen_rejected_logps is None for r in rows):
        return unweighted(AutoChoice("none", "some pairs carry no gen_model_version or generation log-probs, so old "
                                             "and new pairs cannot be told apart (`align rescore` stores them)"))
    if len(set(versions)) < 2:
        return unweighted(AutoChoice("none", f"every pair comes from {versions[0]}: nothing to reweight"))
    scores = score(full_features, False)
    cols = _columns(rows, scores)
    new_version = weighting.weighting_new_version or own_version(cols, versions)
    if new_version is None:
        return unweighted(AutoChoice("none", "no version's pairs were sampled by the target model (none has generation "
                                             "log-probs equal to the target's); set weighting_new_version"))
    if new_version not in versions:
        return unweighted(AutoChoice("none", f"weighting_new_version {new_version} has no pairs in {pset.path}"))
    n_new = versions.count(new_version)
    reason = too_little_evidence(len(versions) - n_new, n_new, new_version, weighting.weighting_auto_min_new,
                                 weighting.weighting_auto_min_ratio)
    if reason:  # before building any pilot
        return unweighted(AutoChoice("none", reason))
    pilot = make_pilot(scores) if make_pilot is not None else None
    try:
        idx = {v: torch.tensor([i for i, s in enumerate(versions) if (s == new_version) == v]) for v in (True, False)}
        choice = choose_weighting(
            cols, versions, new_version, pilot=pilot, clip=weighting.weighting_clip,
            agreement=None if pilot is None else lambda: pilot.agreement(idx[False], idx[True]),
            min_heldout=weighting.weighting_auto_min_new, min_old_per_new=weighting.weighting_auto_min_ratio)
    finally:
        if pilot is not None:
            pilot.close()
    if choice.result is None:
        return unweighted(choice)
    result = choice.result
    result.diagnostics.update({"scheme": f"auto: {choice.scheme}", "auto": choice.record(),
                               "worth": worth_report(cols, versions, new_version, clip=weighting.weighting_clip,
                                                     choice=choice)})
    log.info("weighting auto: %s: %s", choice.scheme, choice.reason)
    log.info("%s", result.diagnostics["worth"]["sentence"])
    return result, scores


def dataset_weights(
    pset: PreferenceSet, full_features: Sequence[dict], weighting: WeightingArgs, score: Any, make_pilot: Any = None,
) -> tuple[WeightResult, Optional[dict[str, torch.Tensor]]]:
    """(weights for every row, target scores or None). `score(features, with_collision)` runs the static target
    over untruncated features (see `align.preference.score_pairs`); it is called only when the scheme needs it.
    `make_pilot`: see `auto_weights`."""
    scheme = weighting.weighting_scheme
    if scheme == "auto":
        return auto_weights(pset, full_features, weighting, score, make_pilot)
    if scheme == "none":
        return file_weights(pset), None
    check_columns(pset, scheme)
    if any(r.weight is not None for r in pset.rows):
        log.info("%s: weights computed by scheme %s replace the file's weight column", pset.path, scheme)
    scores = score(full_features, SCHEMES[scheme].needs_collision)
    rows = pset.rows
    by_version = None
    if "gen_logps_by_version" in SCHEMES[scheme].row_fields:
        versions = sorted({r.gen_model_version for r in rows})
        by_version = {v: ([r.gen_logps_by_version[v][0] for r in rows],
                          [r.gen_logps_by_version[v][1] for r in rows]) for v in versions}
    gen = {}
    if all(r.gen_chosen_logps is not None and r.gen_rejected_logps is not None for r in rows):
        gen = {"gen_chosen_logps": [r.gen_chosen_logps for r in rows],
               "gen_rejected_logps": [r.gen_rejected_logps for r in rows]}
    result = compute_importance_weights(
        scheme, alpha=weighting.weighting_alpha, clip=weighting.weighting_clip,
        target_chosen_logps=scores["chosen_logps"], target_rejected_logps=scores["rejected_logps"],
        chosen_lengths=scores["chosen_lengths"], rejected_lengths=scores["rejected_lengths"],
        source_version=_versions(pset), version_logps=by_version,
        target_chosen_log_collision=scores.get("chosen_log_collision"),
        target_rejected_log_collision=scores.get("rejected_log_collision"), **gen,
    )
    versions = _versions(pset)
    if gen and versions is not None:
        cols = _columns(rows, scores)
        new_version = weighting.weighting_new_version or own_version(cols, versions)
        result.diagnostics["worth"] = worth_report(cols, versions, new_version, clip=weighting.weighting_clip,
                                                   scheme=scheme)
    return result, scores


def weighted_batch(train: TrainArgs, weights: WeightResult, weighting: WeightingArgs, num_processes: int,
                   n_pairs: int) -> TrainArgs:
    """Weights that survive the optimizer: when the weights are not all equal, raise gradient_accumulation_steps so
    one optimizer step sees at least weighting_min_batch pairs (never more than the data holds).

    AdamW divides each step by a running RMS of the gradient, so a step made of 2 pairs weighted 1.9 and 0.1 moves
    the model almost as much as one weighted 1 and 1: in the research pilot, 1.9 vs 0.1 gave 2.4× the influence over
    6 steps (plain SGD: 25×). Within a larger step the weights set the direction, which Adam keeps. The weights are
    normalised to mean 1 over the whole dataset (not per batch) for the same reason."""
    w = weights.weights
    if weighting.weighting_min_batch == 0 or w.numel() == 0 or float(w.max() - w.min()) < 1e-6:
        return train
    per_step = train.per_device_train_batch_size * num_processes
    target = min(weighting.weighting_min_batch, n_pairs)
    steps = max(train.gradient_accumulation_steps, math.ceil(target / per_step))
    if steps == train.gradient_accumulation_steps:
        return train
    log.info("importance weights: gradient_accumulation_steps %d -> %d, so each optimizer step sees %d pairs "
             "(weighting_min_batch %d; smaller steps let AdamW wash the weights out)",
             train.gradient_accumulation_steps, steps, steps * per_step, weighting.weighting_min_batch)
    return replace(train, gradient_accumulation_steps=steps)


def scalar_diagnostics(diag: dict) -> dict[str, float]:
    """The numeric diagnostics (for metrics.jsonl and version.json)."""
    return {k: v for k, v in diag.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def report(result: WeightResult, pset: PreferenceSet, out: Optional[Path] = None) -> None:
    """Log the headline numbers (warn when ESS/N < 0.1) and, given `out`, write weights.json and weights.png."""
    diag = result.diagnostics
    log.info("weights (%s): ESS/N = %.3f over %d pairs", diag.get("scheme"), diag["weights/ess_frac"],
             diag["weights/n"])
    if "warning" in diag:
        log.warning("importance weights: %s", diag["warning"])
    if out is None:
        return
    runs.write_json(out / "weights.json", {
        "diagnostics": diag,
        "weights": [round(float(w), 6) for w in result.weights],
        "log_weights": [round(float(w), 6) for w in result.log_weights],
        "pair_id": [r.pair_id for r in pset.rows],
        "where": [r.where for r in pset.rows],
    })
    plot(diag, out / "weights.png")


def plot(diag: dict, path: Path) -> None:
    """Three panels: log-weight histogram, ESS/N per source version, the (ℓ_c/T, ℓ_r/T) support map."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2))
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    hist_ax, ess_ax, map_ax = fig.subplots(1, 3)
    hist = diag["weights/log_hist"]
    hist_ax.stairs(hist["counts"], hist["edges"], fill=True, alpha=0.7)
    hist_ax.set(title=f"log-weights ({diag.get('scheme')})", xlabel="log w (mean-1 scale, before truncation)",
                ylabel="pairs")
    versions = sorted(k.split("/", 2)[2] for k in diag if k.startswith("weights/ess_frac/"))
    labels = ["all"] + versions
    ess_ax.bar(labels, [diag["weights/ess_frac"]] + [diag[f"weights/ess_frac/{v}"] for v in versions],
               color=["tab:gray"] + ["tab:blue"] * len(versions))
    ess_ax.axhline(0.1, color="tab:red", linestyle="--", label="0.1: collect new data")
    ess_ax.set(title="ESS/N per source version", ylabel="ESS/N", ylim=(0, 1.05))
    ess_ax.legend(loc="upper right")
    if "map/class" in diag:
        colors = {"off_support": "tab:red", "equally_likely": "tab:green", "other": "tab:blue"}
        x, y, cls = diag["map/chosen_per_token"], diag["map/rejected_per_token"], diag["map/class"]
        for name, color in colors.items():
            idx = [i for i, c in enumerate(cls) if c == name]
            map_ax.scatter([x[i] for i in idx], [y[i] for i in idx], s=10, c=color, label=f"{name} ({len(idx)})")
        map_ax.set(title="support map", xlabel="ℓ_chosen / T (nat/token)", ylabel="ℓ_rejected / T (nat/token)")
        map_ax.legend(loc="best", fontsize=8)
    else:
        map_ax.text(0.5, 0.5, "no generation log-probs:\nno support map", ha="center", va="center")
        map_ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --- dynamic target ---------------------------------------------------------------------------------------------------


class DynamicWeights:
    """Per-step weights against the current policy π_θ (weighting_target: dynamic), always detached.

        w_i(θ) = min(c, w0_i · exp(Δ_i(θ)) / r)

    w0 = the static weights (reference target, normalised to mean 1 over the whole dataset and truncated at c), Δ =
    `log_weight_shift`. Normalisation: r estimates the dataset mean of min(c·r, w0·exp(Δ)) under the current θ (the
    fixed point of truncate-then-renormalise, as in the static case) by an exponential moving average (momentum 0.9)
    of the global-batch mean (combined across ranks, so every rank uses the same r). Each pair enters that mean
    truncated at c·r (or `OUTLIER_CAP`·r without clipping): one outlier pair (+50 nats) can raise r by at most a
    factor 0.9 + 0.1·c per step, instead of by e^50, after which every weight would be ~0 for hundreds of steps.
    At step 0, Δ = 0 and r = 1: exactly the static weights. Everything stays in log space.

    Collapse: a global batch whose mean final weight is below `COLLAPSE_MEAN` (weights have mean 1) trains on almost
    nothing. Each such step is counted (`collapsed_steps`, metric weights/collapsed) and the first of a run of them
    is logged as a warning.
    """

    OUTLIER_CAP = 100.0
    COLLAPSE_MEAN = 0.05

    def __init__(self, scheme: str, alpha: float, clip: Optional[float], accelerator: Any = None,
                 momentum: float = 0.9):
        self.scheme, self.alpha, self.clip, self.accelerator, self.momentum = scheme, alpha, clip, accelerator, momentum
        self.log_scale = 0.0  # log r
        self.collapsed_steps = 0
        self.collapsed = False  # the last batch's state

    def __call__(self, static_weights: torch.Tensor, policy: dict, ref: dict) -> torch.Tensor:
        log_raw = torch.log(static_weights.float()) + log_weight_shift(self.scheme, self.alpha, policy, ref).float()
        log_cap = self.log_scale + math.log(self.clip or self.OUTLIER_CAP)
        stats = torch.stack([torch.logsumexp(log_raw.clamp_max(log_cap), 0),
                             torch.tensor(float(log_raw.numel()), device=log_raw.device)])
        stats = self._gathered(stats)
        log_n = float(torch.log(stats[:, 1].sum()))
        log_mean = float(torch.logsumexp(stats[:, 0], 0)) - log_n
        if math.isfinite(log_mean):
            self.log_scale = float(torch.logaddexp(torch.tensor(math.log(self.momentum) + self.log_scale),
                                                   torch.tensor(math.log(1 - self.momentum) + log_mean)))
        log_w = log_raw - self.log_scale
        if self.clip is not None:
            log_w = log_w.clamp_max(math.log(self.clip))
        weights = torch.exp(log_w).detach()
        total = self._gathered(torch.stack([torch.logsumexp(log_w, 0), stats.new_tensor(0.0)]))
        self._note_collapse(math.exp(float(torch.logsumexp(total[:, 0], 0)) - log_n))
        return weights

    def _gathered(self, stats: torch.Tensor) -> torch.Tensor:
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            stats = self.accelerator.gather(stats.unsqueeze(0))
        return stats.reshape(-1, 2)

    def _note_collapse(self, mean_weight: float) -> None:
        collapsed = mean_weight < self.COLLAPSE_MEAN
        if collapsed and not self.collapsed:
            log.warning("dynamic importance weights collapsed: the batch's mean weight is %.2e (should be about 1; "
                        "running log-normaliser %.2f nats). The policy has moved far from the pairs' samplers; "
                        "consider weighting_target static or fresh pairs", mean_weight, self.log_scale)
        self.collapsed = collapsed
        self.collapsed_steps += int(collapsed)

    def state_dict(self) -> dict:
        return {"log_scale": self.log_scale, "collapsed_steps": self.collapsed_steps, "collapsed": self.collapsed}

    def load_state_dict(self, state: dict) -> None:
        self.log_scale = float(state["log_scale"])
        self.collapsed_steps = int(state.get("collapsed_steps", 0))
        self.collapsed = bool(state.get("collapsed", False))
