"""Reusing old labels where it pays: `weighting_scheme: auto`, per-version trust (DESIGN.md §4).

Evidence (research/reuse_findings.md): reusing old pairs at all is the big gain; within-version weights add a small
gain mainly when old pairs far outnumber new ones; a version whose labels were noisy or whose labeler drifted is
better down-weighted as a block. So `choose_weighting` decides by evidence, not by default:

1. No pairs from other versions than the target: none. Fewer than `min_heldout` pairs from the target's own version
   to validate on, or fewer than `min_old_per_new` old pairs per new pair: none, and the reason says which.
2. Otherwise each candidate (none, tempered with α set so the old pairs keep ESS/N ≥ 0.5, length_normalized,
   per-version trust, trust on top of length_normalized) weights the OLD pairs, a short pilot fit trains on them
   (the caller's `pilot`: exact in bench/iw_sim.py, short LoRA DPO runs in align.trainers.weights), and the NEW
   pairs, 2-fold cross-fitted (each scored by a fit that did not train on it), score it: their preference
   log-likelihood at a KL from the start matched across candidates. The largest mean per-pair gain over none wins
   if it exceeds `z` standard errors, else none. z = 0 (AUTO_Z): on development seeds of bench/iw_sim.py (not its
   pre-registered ones) any stricter rule gave up most of the old ≫ new gain, while the candidates are mild enough
   that a choice made by noise costs little.

Per-version trust (`version_trust_from_agreement`): a model fitted on the new pairs predicts P(chosen ≻ rejected) for
every pair. If a version's labels are the new labeler's with a share ε flipped, its mean agreement is
a_v = ε + (1 - 2ε)·a, where a is the new labels' own (cross-fitted) agreement, so 1 - 2ε = (2a_v - 1)/(2a - 1): that
ratio, clamped to [0, 1], is the version's trust (its pairs' weight). Flipped labels give 0, noise-free ones 1. As a
is estimated from few pairs, the scale is the best agreement any labels reach (new or old): a version is never
trusted above the best one, and never distrusted for the new labels' own noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from align.weighting import WeightResult, compute_importance_weights, ess_frac, normalize_log_weights

AUTO_CANDIDATES = ("none", "tempered", "length_normalized", "trust", "trust+length_normalized")
MIN_HELDOUT = 50
MIN_OLD_PER_NEW = 10.0
TARGET_ESS = 0.5
AUTO_Z = 0.0  # a candidate must beat none by this many standard errors of the per-pair gain


def tempered_alpha(pair_log_ratios, target_ess: float = TARGET_ESS, clip: Optional[float] = 5.0) -> float:
    """The largest α in [0, 1] whose weights exp(α·λ) (self-normalised, truncated at clip) keep ESS/N ≥ target_ess.

    ESS/N falls as α grows (α = 0 is unweighted, ESS/N = 1), so bisection finds it; 1 when even α = 1 keeps it."""
    lam = torch.as_tensor(pair_log_ratios, dtype=torch.float64)

    def ess(alpha: float) -> float:
        return ess_frac(normalize_log_weights(alpha * lam, clip).double())

    if ess(1.0) >= target_ess:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ess(mid) >= target_ess else (lo, mid)
    return lo


@dataclass
class Trust:
    """Per-version trust in [0, 1] with the agreements it came from; `reason` when no evidence (all 1)."""

    trust: dict[str, float]
    agreement: dict[str, float]
    new_agreement: float
    reason: str = ""


def version_trust_from_agreement(q_old, old_versions: Sequence[str], q_new, old_weights=None) -> Trust:
    """Trust per old version from a model fitted on new pairs: q = its P(chosen ≻ rejected) per pair, for the old
    pairs (q_old, (N_old,)) and, cross-fitted, for the new pairs (q_new, (N_new,)). See the module docstring.

    Agreement is the share of pairs whose label the model's sign reproduces (q = 0.5 counts half), so it does not
    depend on how sharp the model's probabilities are. `old_weights` (N_old,): importance weights of the old pairs
    toward the target (e.g. length-normalised): a model fitted on new pairs may extrapolate badly where the target
    never goes, which would read as disagreement; weighted agreement compares labels where both versions' responses
    live, so covariate shift is not taken for drift. No evidence (all trust 1, with the reason) unless some
    labels' agreement differs from chance by two standard errors."""
    def agree(q):
        return (q > 0.5).double() + 0.5 * (q == 0.5).double()

    q_old = torch.as_tensor(q_old, dtype=torch.float64)
    q_new = torch.as_tensor(q_new, dtype=torch.float64)
    w = torch.ones_like(q_old) if old_weights is None else torch.as_tensor(old_weights, dtype=torch.float64)
    a_new = float(agree(q_new).mean())
    versions = [str(v) for v in old_versions]
    agreement = {}
    for v in dict.fromkeys(versions):
        rows = torch.tensor([s == v for s in versions])
        agreement[v] = float((w[rows] * agree(q_old[rows])).sum() / w[rows].sum().clamp_min(1e-300))
    # The scale: the best agreement any labels reach (the new labels' own, cross-fitted, or an old version's, which
    # rests on many more pairs). Evidence: some labels' agreement differs from chance by two standard errors.
    sources = {"new": (a_new, len(q_new))} | {v: (a, versions.count(v)) for v, a in agreement.items()}
    signal = 2 * max(a for a, _ in sources.values()) - 1
    evidence = any(abs(2 * a - 1) > 4 * math.sqrt(max(a * (1 - a), 1e-12) / max(n, 1)) for a, n in sources.values())
    if signal <= 0 or not evidence:
        return Trust({v: 1.0 for v in agreement}, agreement, a_new,
                     f"a model fitted on the new pairs reproduces {a_new:.2f} of held-out new labels and no "
                     "version's agreement differs from chance by two standard errors: no evidence to judge by")
    trust = {v: min(1.0, max(0.0, (2 * a - 1) / signal)) for v, a in agreement.items()}
    return Trust(trust, agreement, a_new)


@dataclass
class PilotFit:
    """A pilot fit's trajectory: kl[t] (estimated KL from the start) and loglik[t] (N_new,) held-out per-pair
    preference log-likelihood, at increasing t."""

    kl: list[float]
    loglik: list[torch.Tensor]

    def at(self, kl: float) -> torch.Tensor:
        """Per-pair log-likelihood at `kl`, linearly interpolated along the trajectory (its end if never reached)."""
        points = [0.0] + [float(k) for k in self.kl]
        values = [self.loglik[0]] + list(self.loglik)  # before the first step: the start (the first record)
        for j in range(1, len(points)):
            if points[j] >= kl:
                span = max(points[j] - points[j - 1], 1e-12)
                f = min(max((kl - points[j - 1]) / span, 0.0), 1.0)
                return values[j - 1].double() + f * (values[j].double() - values[j - 1].double())
        return values[-1].double()


@dataclass
class AutoChoice:
    """What `auto` decided: the scheme (a candidate name), its α and trust, the final weights of every pair (None
    for none), each candidate's held-out score and the reason in one sentence."""

    scheme: str
    reason: str
    alpha: float = 1.0
    trust: Optional[Trust] = None
    result: Optional[WeightResult] = None
    scores: dict = field(default_factory=dict)
    matched_kl: Optional[float] = None

    def record(self) -> dict:
        """JSON-serialisable, for the log, the run record and the report."""
        out = {"choice": self.scheme, "reason": self.reason, "alpha": self.alpha, "scores": self.scores,
               "matched_kl": self.matched_kl}
        if self.trust is not None:
            out["trust"] = self.trust.trust
            out["trust_agreement"] = {"old": self.trust.agreement, "new": self.trust.new_agreement}
            if self.trust.reason:
                out["trust_note"] = self.trust.reason
        return out


def _split(source_version: Sequence[str], new_version: str) -> tuple[torch.Tensor, torch.Tensor]:
    versions = [str(v) for v in source_version]
    is_new = torch.tensor([v == str(new_version) for v in versions])
    return (~is_new).nonzero().flatten(), is_new.nonzero().flatten()


def too_little_evidence(n_old: int, n_new: int, new_version: str, min_heldout: int = MIN_HELDOUT,
                        min_old_per_new: float = MIN_OLD_PER_NEW) -> str:
    """Why auto must fall back to none before any pilot fit ('' when it need not)."""
    if n_old == 0:
        return f"no pairs from versions other than {new_version}: nothing to reweight"
    if n_new < min_heldout:
        return (f"only {n_new} pairs from {new_version} to validate a scheme on (auto needs at least {min_heldout}): "
                "old pairs reused unweighted")
    if n_old < min_old_per_new * n_new:
        return (f"{n_old} old pairs for {n_new} new ones ({n_old / n_new:.1f} per new pair): weighting pays only from "
                f"about {min_old_per_new:g} per new pair; old pairs reused unweighted")
    return ""


def _base_scheme(candidate: str) -> str:
    """The within-version scheme of a candidate: 'trust' alone is none, 'trust+X' is X."""
    return "none" if candidate == "trust" else candidate.removeprefix("trust+")


def candidate_weights(candidate: str, cols: dict, versions: list[str], trust: Optional[Trust],
                      clip: Optional[float], alpha: Optional[float] = None) -> tuple[torch.Tensor, float]:
    """(weights, mean 1 over the given pairs, and α) of one candidate; `cols` holds the pairs' per-pair columns.
    α (tempered only) is set so the pairs from other versions than the target keep ESS/N ≥ TARGET_ESS."""
    base = _base_scheme(candidate)
    if base == "tempered" and alpha is None:
        lam = (cols["target_chosen_logps"] - cols["gen_chosen_logps"]) + (
            cols["target_rejected_logps"] - cols["gen_rejected_logps"])
        moved = lam.abs() > 0  # the target's own pairs have λ = 0 and do not constrain α
        alpha = tempered_alpha(lam[moved] if bool(moved.any()) else lam, TARGET_ESS, clip)
    version_trust = trust.trust if candidate.startswith("trust") else None
    result = compute_importance_weights(base, alpha=1.0 if alpha is None else alpha, clip=clip,
                                        source_version=versions, version_trust=version_trust, **cols)
    return result.weights, 1.0 if alpha is None else alpha


def choose_weighting(
    columns: dict, source_version: Sequence[str], new_version: str, *,
    pilot: Optional[Callable[[str, torch.Tensor, torch.Tensor], PilotFit]],
    agreement: Optional[Callable[[], tuple[torch.Tensor, torch.Tensor]]] = None,
    clip: Optional[float] = 5.0, kl: Optional[float] = None, min_heldout: int = MIN_HELDOUT,
    min_old_per_new: float = MIN_OLD_PER_NEW, candidates: Sequence[str] = AUTO_CANDIDATES, z: float = AUTO_Z,
    folds: int = 2, seed: int = 0,
) -> AutoChoice:
    """`weighting_scheme: auto` (module docstring). `columns`: per-pair target_*/gen_* log-probs and *_lengths, (N,)
    each, for every pair; `source_version` (N,); `new_version`: the target's own version.

    The new pairs are split into `folds`; for each fold, `pilot(candidate, weights (N,), heldout)` fits on every pair
    with weight > 0 (the old pairs and the other folds' new pairs, weighted by the candidate; the held-out fold has
    weight 0) and returns a PilotFit scored on the pairs `heldout` (indices). Every new pair is so scored once, by a
    fit that never saw it, and a per-version trust changes the balance of old against new pairs in that fit.
    `agreement()` returns (q_old, cross-fitted q_new) from a model fitted on the new pairs, for trust (without it
    the trust candidates are skipped). `kl`: the matched KL (default: the smallest final KL of all pilots)."""
    versions = [str(v) for v in source_version]
    old_idx, new_idx = _split(versions, new_version)
    n_old, n_new = len(old_idx), len(new_idx)
    reason = too_little_evidence(n_old, n_new, new_version, min_heldout, min_old_per_new)
    if reason:
        return AutoChoice("none", reason)
    if pilot is None:
        return AutoChoice("none", "this trainer has no pilot fits to validate a scheme with: old pairs reused "
                                  "unweighted")
    cols = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in columns.items() if v is not None}
    trust = None
    if agreement is not None and any(c.startswith("trust") for c in candidates):
        q_old, q_new = agreement()
        old_cols = {k: v[old_idx] for k, v in cols.items()}
        old_versions = [versions[i] for i in old_idx.tolist()]
        ln = candidate_weights("length_normalized", old_cols, old_versions, None, clip)[0]
        trust = version_trust_from_agreement(q_old, old_versions, q_new, ln)
    order = new_idx[torch.randperm(n_new, generator=torch.Generator().manual_seed(seed))]
    heldout_folds = [fold.sort().values for fold in torch.tensor_split(order, folds)]
    fits, alphas, ess = {}, {}, {}
    for candidate in candidates:
        if candidate.startswith("trust") and (trust is None or trust.reason or all(
                t == 0 for t in trust.trust.values())):
            continue
        per_fold = []
        for heldout in heldout_folds:
            train = torch.ones(len(versions), dtype=torch.bool)
            train[heldout] = False
            rows = train.nonzero().flatten()
            w, alpha = candidate_weights(candidate, {k: v[rows] for k, v in cols.items()},
                                         [versions[i] for i in rows.tolist()], trust, clip)
            full = torch.zeros(len(versions), dtype=torch.float32)
            full[rows] = w
            per_fold.append(pilot(candidate, full, heldout))
        alphas[candidate] = alpha
        ess[candidate] = ess_frac(full[old_idx].double())
        fits[candidate] = per_fold
    matched = kl if kl is not None else min(f.kl[-1] for fold in fits.values() for f in fold)

    def at(candidate):  # per new pair (in fold order), at the matched KL
        return torch.cat([f.at(matched) for f in fits[candidate]])

    base = at("none")
    scores, best = {}, None
    for candidate in fits:
        diff = at(candidate) - base
        gain = float(diff.mean())
        se = float(diff.std(unbiased=True) / math.sqrt(n_new))
        validated = candidate != "none" and gain > 0 and gain > z * se
        scores[candidate] = {"heldout_loglik": float(at(candidate).mean()), "gain": gain, "se": se,
                             "validated": validated, "ess_frac_old": ess[candidate], "alpha": alphas[candidate],
                             "final_kl": min(float(f.kl[-1]) for f in fits[candidate])}
        if validated and (best is None or gain > scores[best]["gain"]):
            best = candidate
    if best is None:
        top = max((c for c in scores if c != "none"), key=lambda c: scores[c]["gain"], default=None)
        detail = "" if top is None else f" (best: {top} {scores[top]['gain']:+.4f} ± {scores[top]['se']:.4f} nats/pair)"
        return AutoChoice("none", f"no candidate beat unweighted reuse on {n_new} held-out {new_version} pairs at "
                                  f"KL {matched:.2f}{detail}", trust=trust, scores=scores, matched_kl=matched)
    alpha = alphas[best]
    result = compute_importance_weights(_base_scheme(best), alpha=alpha, clip=clip, source_version=versions,
                                        version_trust=trust.trust if best.startswith("trust") else None, **cols)
    s = scores[best]
    return AutoChoice(best, f"{best} raised the held-out {new_version} pairs' log-likelihood by {s['gain']:+.4f} ± "
                            f"{s['se']:.4f} nats/pair over unweighted reuse at KL {matched:.2f}",
                      alpha=alpha, trust=trust, result=result, scores=scores, matched_kl=matched)


# --- what the old labels are still worth ----------------------------------------------------------------------------


def worth_report(columns: dict, source_version: Sequence[str], new_version: Optional[str], *,
                 clip: Optional[float] = 5.0, choice: Optional[AutoChoice] = None, scheme: Optional[str] = None,
                 off_support_threshold: float = -1.0, equal_band: float = 0.1) -> dict:
    """Per source version other than the target's own: pairs, ESS/N under length-normalised and tempered weights
    (α for ESS/N ≥ 0.5 over all old pairs), per-token KL(sampler ‖ target), the support map (pairs both of whose
    responses the target would not produce; pairs it finds equally likely), the labeler-drift check (trust and
    agreement, when auto estimated them) and effective pairs = pairs · ESS/N (length-normalised) · trust: what the
    version's labels are worth in fresh pairs of the target. Ends in one plain `sentence`. `choice`: auto's decision
    (else `scheme`, the named scheme used)."""
    cols = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in columns.items() if v is not None}
    versions = [str(v) for v in source_version]
    old = [v for v in dict.fromkeys(versions) if v != new_version]
    n_new = versions.count(new_version) if new_version else 0
    lam = (cols["target_chosen_logps"] - cols["gen_chosen_logps"]) + (
        cols["target_rejected_logps"] - cols["gen_rejected_logps"])
    old_rows = torch.tensor([v != new_version for v in versions])
    alpha = choice.alpha if choice is not None and _base_scheme(choice.scheme) == "tempered" else (
        tempered_alpha(lam[old_rows], TARGET_ESS, clip) if bool(old_rows.any()) else 1.0)
    trust = choice.trust if choice is not None and choice.trust is not None and not choice.trust.reason else None
    per_version = {}
    for v in old:
        rows = torch.tensor([s == v for s in versions])
        sub = {k: x[rows] for k, x in cols.items()}
        ln = compute_importance_weights("length_normalized", clip=clip, off_support_threshold=off_support_threshold,
                                        equal_band=equal_band, **sub).diagnostics
        tempered = compute_importance_weights("tempered", alpha=alpha, clip=clip, **sub).diagnostics
        n = int(rows.sum())
        entry = {"pairs": n, "ess_frac_ln": ln["weights/ess_frac"], "ess_frac_tempered": tempered["weights/ess_frac"],
                 "kl_per_token": ln.get("kl/per_token"), "off_support": ln["map/counts"]["off_support"],
                 "equally_likely": ln["map/counts"]["equally_likely"]}
        factor = 1.0
        if trust is not None:
            entry["trust"] = trust.trust.get(v, 1.0)
            entry["agreement"] = trust.agreement.get(v)
            factor = entry["trust"]
        entry["effective_pairs"] = n * ln["weights/ess_frac"] * factor
        per_version[v] = entry
    out = {"new_version": new_version, "new_pairs": n_new, "tempered_alpha": alpha, "versions": per_version}
    if choice is not None:
        out.update({"choice": choice.scheme, "reason": choice.reason})
        if choice.scheme in choice.scores:
            out["validated_gain"] = choice.scores[choice.scheme]["gain"]
    elif scheme is not None:
        out["choice"] = scheme
    out["sentence"] = worth_sentence(out)
    return out


def worth_sentence(worth: dict) -> str:
    """'v0's 4,000 pairs are worth about 1,900 fresh pairs of v2 (…); reused with tempered weights.'"""
    parts = [f"{v}'s {e['pairs']:,} pairs are worth about {e['effective_pairs']:,.0f} fresh pairs"
             for v, e in worth["versions"].items()]
    if not parts:
        return "no pairs from other versions than the target's: nothing to reuse"
    target = f" of {worth['new_version']}" if worth.get("new_version") else ""
    head = "; ".join(parts) + target
    if worth.get("new_version"):
        head += f" (against {worth['new_pairs']:,} new pairs)"
    choice = worth.get("choice")
    if choice is None:
        return head
    if choice == "none":
        tail = "reused unweighted" + (f": {worth['reason']}" if worth.get("reason") else "")
    else:
        gain = f" (held-out gain {worth['validated_gain']:+.4f} nats/pair)" if "validated_gain" in worth else ""
        tail = f"reused with {choice.replace('+', ' + ')} weights{gain}"
    return f"{head}; {tail}."


def worth_lines(worth: dict) -> list[str]:
    """The worth report as text lines (for `align weights`)."""
    lines = ["what the old labels are still worth:"]
    for v, e in worth["versions"].items():
        drift = ""
        if "trust" in e:
            drift = f", labeler check: agreement {e['agreement']:.2f}, trust {e['trust']:.2f}"
        kl = "n/a" if e.get("kl_per_token") is None else f"{e['kl_per_token']:.3f}"
        lines.append(f"  {v}: {e['pairs']:,} pairs, ESS/N {e['ess_frac_ln']:.2f} (length-normalised) / "
                     f"{e['ess_frac_tempered']:.2f} (tempered α {worth['tempered_alpha']:.2f}), KL {kl} nat/token, "
                     f"{e['off_support']} off the target's support, {e['equally_likely']} equally likely{drift}; "
                     f"worth ≈ {e['effective_pairs']:,.0f} fresh pairs")
    lines.append("  " + worth["sentence"])
    return lines
