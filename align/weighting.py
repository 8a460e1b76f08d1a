"""Importance weights for reusing preference pairs sampled from older model versions (DESIGN.md §4).

Per response, ℓ(y) = log π(y|x) - log μ(y|x) (target policy π, sampler μ, sums over completion tokens); per pair,
λ = ℓ_c + ℓ_r. A scheme maps pairs to log-weights; `normalize_log_weights` truncates at c and self-normalises to mean 1
over the whole dataset. Sequence log-probs are never exponentiated: only log-weights after subtracting their dataset
logsumexp are. Inputs are float32 columns (tensors, arrays or lists); internally we work in float64, so two
-10,000-nat sums subtract without float32 rounding (~1e-3 nat there), and return float32 weights.
"""

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from align.errors import ConfigError, DataError

_GEN_HINT = (
    "; use scheme 'wpo' (self-weights from the current policy, no generation log-probs needed) or run "
    "`align rescore` to score the stored responses under the model version that generated them"
)
_GEN_COLUMNS = ("gen_chosen_logps", "gen_rejected_logps")


def _to_vector(name: str, values, n: int | None = None) -> torch.Tensor:
    """A validated 1-D float64 CPU tensor; DataError on wrong length or non-finite / missing (None) entries."""
    hint = _GEN_HINT if name in _GEN_COLUMNS else ""
    if isinstance(values, torch.Tensor):
        vec = values.detach().to("cpu", torch.float64)
    else:
        try:
            vec = torch.as_tensor(values, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):  # e.g. a list with None for rows never scored
            try:
                vec = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)
            except (TypeError, ValueError) as err:
                raise DataError(f"{name} must be numeric: {err}") from err
    if vec.dim() != 1 or (n is not None and vec.numel() != n):
        size = "" if n is None else f" of {n} values"
        raise DataError(f"{name} must be a 1-D column{size}, got shape {tuple(vec.shape)}")
    bad = ~torch.isfinite(vec)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise DataError(
            f"{name} has {int(bad.sum())} non-finite or missing value(s) of {vec.numel()} (first at index {first}){hint}"
        )
    return vec


def _version_ids(source_version) -> list[str]:
    """Version ids as strings (they become diagnostics keys); accepts lists, arrays and tensors."""
    values = source_version.tolist() if hasattr(source_version, "tolist") else list(source_version)
    return [str(v) for v in values]


@dataclass
class PairLogps:
    """Validated per-pair columns, each (N,) float64, keyed by the argument names of `compute_importance_weights`."""

    n: int
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    source_version: list[str] | None = None
    version_logps: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def need(self, scheme: str, *names: str) -> tuple[torch.Tensor, ...]:
        """The named columns, or a DataError saying which one the scheme lacks."""
        for name in names:
            if name not in self.columns:
                hint = _GEN_HINT if name in _GEN_COLUMNS else ""
                raise DataError(f"weighting scheme {scheme!r} needs {name}, which is missing{hint}")
        return tuple(self.columns[name] for name in names)


@dataclass
class WeightResult:
    """weights: (N,) float32, mean 1; log_weights: (N,) float32 scheme log-weights before normalisation."""

    weights: torch.Tensor
    log_weights: torch.Tensor
    diagnostics: dict


def log_ratios(target_chosen_logps, target_rejected_logps, gen_chosen_logps, gen_rejected_logps):
    """(ℓ_c, ℓ_r, λ), each (N,) float64: ℓ = log π - log μ per response, λ = ℓ_c + ℓ_r per pair."""
    t_c = _to_vector("target_chosen_logps", target_chosen_logps)
    n = t_c.numel()
    t_r = _to_vector("target_rejected_logps", target_rejected_logps, n)
    g_c = _to_vector("gen_chosen_logps", gen_chosen_logps, n)
    g_r = _to_vector("gen_rejected_logps", gen_rejected_logps, n)
    ell_c, ell_r = t_c - g_c, t_r - g_r
    return ell_c, ell_r, ell_c + ell_r


# --- schemes: (pairs, alpha) -> (N,) float64 log-weights before normalisation ---------------------------------------


def none_log_weights(p: PairLogps, alpha: float) -> torch.Tensor:
    """Unweighted baseline: log w = 0."""
    return torch.zeros(p.n, dtype=torch.float64)


def _pair_ratios(p: PairLogps, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    t_c, t_r, g_c, g_r = p.need(scheme, "target_chosen_logps", "target_rejected_logps", *_GEN_COLUMNS)
    return t_c - g_c, t_r - g_r


def sequence_log_weights(p: PairLogps, alpha: float) -> torch.Tensor:
    """Sequence-level IS: log w = λ = ℓ_c + ℓ_r (alpha is not used: this is the untempered estimator)."""
    ell_c, ell_r = _pair_ratios(p, "sequence")
    return ell_c + ell_r


def tempered_log_weights(p: PairLogps, alpha: float) -> torch.Tensor:
    """Shimodaira's flattened IS: log w = α·λ (α = 0 unweighted, α = 1 sequence IS)."""
    ell_c, ell_r = _pair_ratios(p, "tempered")
    return alpha * (ell_c + ell_r)


def length_normalized_log_weights(p: PairLogps, alpha: float) -> torch.Tensor:
    """Geometric-mean (per-token) ratio: log w = ℓ_c/T_c + ℓ_r/T_r."""
    ell_c, ell_r = _pair_ratios(p, "length_normalized")
    len_c, len_r = p.need("length_normalized", "chosen_lengths", "rejected_lengths")
    return ell_c / len_c + ell_r / len_r


def mixture_log_weights(p: PairLogps, alpha: float) -> torch.Tensor:
    """Balance heuristic over pooled versions: log w = α·(log π(pair) - logsumexp_v[log f_v + log μ_v(pair)]).

    log μ_v(pair) = log μ_v(y_c) + log μ_v(y_r) from `version_logps[v]`; f_v = share of pairs sampled by v.
    α = 1 is plain mixture IS; α < 1 tempers it (the research report's recommended default).
    """
    t_c, t_r = p.need("mixture", "target_chosen_logps", "target_rejected_logps")
    if p.source_version is None or p.version_logps is None:
        raise DataError("weighting scheme 'mixture' needs source_version and version_logps" + _GEN_HINT)
    counts = Counter(p.source_version)
    terms = [math.log(count / p.n) + p.version_logps[v][0] + p.version_logps[v][1] for v, count in counts.items()]
    log_den = torch.logsumexp(torch.stack(terms), dim=0)  # versions with f_v = 0 contribute nothing
    return alpha * (t_c + t_r - log_den)


def wpo_log_weights(p: PairLogps, alpha: float) -> torch.Tensor:
    """WPO self-weights (Zhou et al. 2024, Eq. 1-2), for pairs without stored generation log-probs.

    log w = (log π(y_c) - A_c)/T_c + (log π(y_r) - A_r)/T_r with A = Σ_t log Σ_v π(v|·)² ("sampled alignment", the
    paper's default) when `target_*_log_collision` are given (see `logprobs.token_log_collision`), else A = 0 (the
    paper's "no alignment" ablation). Unlike the paper (clamp at 1) and TRL (raw), the weights are then
    self-normalised and truncated like every other scheme, and they are static: computed once from the target.
    """
    t_c, t_r, len_c, len_r = p.need("wpo", "target_chosen_logps", "target_rejected_logps", "chosen_lengths",
                                    "rejected_lengths")
    if "target_chosen_log_collision" in p.columns or "target_rejected_log_collision" in p.columns:
        a_c, a_r = p.need("wpo", "target_chosen_log_collision", "target_rejected_log_collision")
        t_c, t_r = t_c - a_c, t_r - a_r
    return t_c / len_c + t_r / len_r


# --- dynamic shifts: how a scheme's log-weight moves when its target moves from π_ref to π_θ ---------------------
# Only the target moves, so the sampler terms (and mixture's denominator) cancel. `d` holds, per response,
# d = log π_θ - log π_ref (chosen_logps, rejected_logps), the completion lengths and, for WPO, the moved collision term.


def _no_shift(d: dict, alpha: float) -> torch.Tensor:
    return torch.zeros_like(d["chosen_logps"])


def _sequence_shift(d: dict, alpha: float) -> torch.Tensor:
    return d["chosen_logps"] + d["rejected_logps"]


def _tempered_shift(d: dict, alpha: float) -> torch.Tensor:
    return alpha * (d["chosen_logps"] + d["rejected_logps"])


def _length_normalized_shift(d: dict, alpha: float) -> torch.Tensor:
    return d["chosen_logps"] / d["chosen_lengths"] + d["rejected_logps"] / d["rejected_lengths"]


def _wpo_shift(d: dict, alpha: float) -> torch.Tensor:
    return ((d["chosen_logps"] - d["chosen_log_collision"]) / d["chosen_lengths"]
            + (d["rejected_logps"] - d["rejected_log_collision"]) / d["rejected_lengths"])


_GEN_ROW_FIELDS = ("gen_chosen_logps", "gen_rejected_logps")


@dataclass(frozen=True)
class Scheme:
    """Everything the pipeline needs to know about one weighting scheme, in one place.

    log_weight(pairs, α) -> (N,) static log-weights before normalisation; shift(d, α) -> (B,) change of that
    log-weight when the target moves from π_ref to π_θ (the dynamic target); row_fields: the exported columns each
    row must carry; scores_samples: the scheme compares the target with a sampler on the STORED sampled tokens (so
    re-tokenised text is a caveat); needs_collision: WPO's Σ_t log Σ_v π(v|·)² term; uses_alpha: α tempers it.
    """

    name: str
    log_weight: Callable[[PairLogps, float], torch.Tensor]
    shift: Callable[[dict, float], torch.Tensor]
    row_fields: tuple[str, ...] = ()
    scores_samples: bool = False
    needs_collision: bool = False
    uses_alpha: bool = False


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("none", none_log_weights, _no_shift),
    Scheme("sequence", sequence_log_weights, _sequence_shift, _GEN_ROW_FIELDS, scores_samples=True),
    Scheme("tempered", tempered_log_weights, _tempered_shift, _GEN_ROW_FIELDS, scores_samples=True, uses_alpha=True),
    Scheme("length_normalized", length_normalized_log_weights, _length_normalized_shift, _GEN_ROW_FIELDS,
           scores_samples=True),
    Scheme("mixture", mixture_log_weights, _tempered_shift, ("gen_model_version", "gen_logps_by_version"),
           scores_samples=True, uses_alpha=True),
    Scheme("wpo", wpo_log_weights, _wpo_shift, needs_collision=True),
)}
SCHEME_NAMES = tuple(SCHEMES)


def log_weight_shift(scheme: str, alpha: float, policy: dict, ref: dict) -> torch.Tensor:
    """Δ = (scheme log-weight under π_θ) - (under π_ref), (B,), detached, from per-response log-probs (and lengths,
    and `*_log_collision` for WPO) of the policy and the reference: see each scheme's `shift`."""
    record = SCHEMES[scheme]
    keys = ("chosen_logps", "rejected_logps") + (
        ("chosen_log_collision", "rejected_log_collision") if record.needs_collision else ())
    d = {k: (policy[k] - ref[k]).detach() for k in keys}
    d["chosen_lengths"] = policy["chosen_lengths"].clamp_min(1)
    d["rejected_lengths"] = policy["rejected_lengths"].clamp_min(1)
    return record.shift(d, alpha)


# --- normalisation --------------------------------------------------------------------------------------------------


def _normalize(log_w: torch.Tensor, clip: float | None) -> torch.Tensor:
    """(N,) float64 weights with mean 1 and max ≤ clip from (N,) log-weights, all in log space.

    Self-normalise, u = exp(log_w - logsumexp(log_w))·N, then solve truncation exactly: find the smallest j such that
    clipping the j largest at c and rescaling the rest by k_j = (N - j·c)/Σ_{i≥j} u_(i) keeps them ≤ c. This is the
    fixed point of repeated truncate-then-renormalise: the mean is exactly 1 AND the max is exactly ≤ c.
    """
    n = log_w.numel()
    log_norm = torch.logsumexp(log_w, dim=0)
    if not bool(torch.isfinite(log_norm)):
        raise DataError("importance weights: all log-weights are -inf or the normaliser is not finite")
    log_u = log_w - log_norm + math.log(n)
    if clip is None or math.isinf(clip) or float(log_u.max()) <= math.log(clip):
        weights = torch.exp(log_u)
    else:
        log_c = math.log(clip)
        sorted_u, order = torch.sort(log_u, descending=True)
        tail = torch.logcumsumexp(sorted_u.flip(0), dim=0).flip(0)  # tail[j] = log Σ_{i≥j} u_(i)
        j = torch.arange(n, dtype=torch.float64)
        room = n - j * clip  # mass left for the unclipped pairs
        log_k = torch.log(room.clamp_min(1e-300)) - tail
        fits = ((room > 0) & (log_k + sorted_u <= log_c + 1e-9)).nonzero()
        if len(fits) == 0:  # only c = 1 up to rounding: mean 1 with max ≤ 1 forces every weight to 1
            return torch.ones(n, dtype=torch.float64)
        n_clipped = int(fits[0])
        log_final = torch.where(j < n_clipped, torch.full_like(sorted_u, log_c), log_k[n_clipped] + sorted_u)
        weights = torch.empty_like(log_final).scatter_(0, order, torch.exp(log_final))
    if not bool(weights.sum() > 0):
        raise DataError("importance weights: every weight underflowed to zero")
    return weights


def normalize_log_weights(log_w, clip: float | None = 5.0) -> torch.Tensor:
    """(N,) log-weights -> (N,) float32 weights with mean 1 over the dataset and max ≤ clip (None: no truncation).

    Order: self-normalise, truncate at c, renormalise, solved exactly as the fixed point (see `_normalize`), so the
    final mean is exactly 1 and no weight exceeds c. Exact and underflow-safe for log-weights of any magnitude.
    """
    if clip is not None and clip < 1:
        raise ConfigError(f"weighting clip must be ≥ 1 (weights have mean 1), got {clip}")
    vec = _to_vector("log_weights", log_w)
    if vec.numel() == 0:
        raise DataError("importance weights: no pairs")
    return _normalize(vec, clip).float()


# --- diagnostics ----------------------------------------------------------------------------------------------------


def ess_frac(weights: torch.Tensor) -> float:
    """Kish ESS/N = (Σw)² / (N·Σw²); 0 for an all-zero group."""
    sq = float((weights**2).sum())
    return float(weights.sum()) ** 2 / (weights.numel() * sq) if sq > 0 else 0.0


def _histogram(values: torch.Tensor, bins: int) -> dict:
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-9:  # a single value (e.g. scheme 'none'): centre one unit-wide range on it
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(values, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}


OFF_SUPPORT = -1.0  # nat/token: a response the target finds this much less likely per token than its sampler did
EQUAL_BAND = 0.1


def support_shares(chosen_per_token, rejected_per_token, versions: Sequence[str],
                   off_support: float = OFF_SUPPORT, equal_band: float = EQUAL_BAND) -> dict[str, dict]:
    """Per source version, how many of its pairs fall outside the target's support (`_support_map`'s classes):
    {version: {pairs, off_support, equally_likely, share}}; share = off_support / pairs. Used by `align weights` and
    by the report's drift section (old pairs "a picture versus two sentences" away from what the new model says)."""
    c = torch.as_tensor(chosen_per_token, dtype=torch.float64)
    r = torch.as_tensor(rejected_per_token, dtype=torch.float64)
    classes = _support_map(c, r, off_support, equal_band)["map/class"]
    out: dict[str, dict] = {}
    for version, name in zip(versions, classes):
        row = out.setdefault(str(version), {"pairs": 0, "off_support": 0, "equally_likely": 0})
        row["pairs"] += 1
        if name in row:  # "other" is neither
            row[name] += 1
    for row in out.values():
        row["share"] = row["off_support"] / row["pairs"]
    return out


def _support_map(ratio_c: torch.Tensor, ratio_r: torch.Tensor, off_support: float, equal_band: float) -> dict:
    """Classify pairs by their per-token log-ratios (ℓ_c/T_c, ℓ_r/T_r).

    off_support: both below `off_support` nat/token (the target would not produce either; weighting rightly drops
    them, new data is the fix). equally_likely: otherwise, the two within ±`equal_band` of each other (the target
    finds them equally likely relative to the sampler; still informative, keep them). other: the rest.
    """
    off = (ratio_c < off_support) & (ratio_r < off_support)
    equal = ~off & ((ratio_c - ratio_r).abs() <= equal_band)
    names = ["off_support" if o else "equally_likely" if e else "other" for o, e in zip(off.tolist(), equal.tolist())]
    return {
        "map/chosen_per_token": ratio_c.tolist(),
        "map/rejected_per_token": ratio_r.tolist(),
        "map/class": names,
        "map/counts": {k: names.count(k) for k in ("off_support", "equally_likely", "other")},
        "map/off_support_threshold": float(off_support),
        "map/equal_band": float(equal_band),
    }


def weight_diagnostics(
    weights,
    log_weights,
    *,
    clip: float | None = None,
    source_version=None,
    chosen_log_ratios=None,
    rejected_log_ratios=None,
    chosen_lengths=None,
    rejected_lengths=None,
    off_support_threshold: float = OFF_SUPPORT,
    equal_band: float = EQUAL_BAND,
    bins: int = 20,
) -> dict:
    """JSON-serialisable summary of final weights (N,) and scheme log-weights (N,).

    Keys: weights/{ess_frac, top1pct_share, clipped_frac, max, mean, n}, weights/log_hist (edges and counts of
    log w - logmeanexp(log w), i.e. log of the mean-1 weight before truncation), and per source version v:
    weights/ess_frac/v, weights/share/v (share of total weight), data/share/v (share of pairs). With log-ratios
    ℓ = log π - log μ and lengths: kl/per_token (and kl/per_token/v) = mean over responses of -ℓ/T, an estimate of
    KL(μ‖π) per token from μ's own samples, and the map/* keys of `_support_map`. `warning` appears when ESS/N < 0.1
    overall or for a version.
    """
    w = _to_vector("weights", weights)
    n = w.numel()
    lw = torch.as_tensor(log_weights, dtype=torch.float64)
    dropped = lw == -math.inf  # weight 0 on purpose (a version with trust 0): not in the histogram
    lw = _to_vector("log_weights", lw[~dropped] if bool(dropped.any()) else lw, n - int(dropped.sum()))
    top_k = max(1, n // 100)  # top 1% of pairs, at least one
    diag = {
        "weights/n": n,
        "weights/ess_frac": ess_frac(w),
        "weights/top1pct_share": float(torch.topk(w, top_k).values.sum() / w.sum()),
        "weights/clipped_frac": float((w >= clip * (1 - 1e-6)).double().mean()) if clip else 0.0,
        "weights/max": float(w.max()),
        "weights/mean": float(w.mean()),
        "weights/log_hist": _histogram(lw - torch.logsumexp(lw, 0) + math.log(n), bins),
    }
    if bool(dropped.any()):
        diag["weights/dropped"] = int(dropped.sum())
    warnings = []
    if diag["weights/ess_frac"] < 0.1:
        warnings.append(f"overall ESS/N = {diag['weights/ess_frac']:.3f} < 0.1: collect new data for this version")
    versions = _version_ids(source_version) if source_version is not None else []
    if versions and len(versions) != n:
        raise DataError(f"source_version has {len(versions)} entries, expected {n}")
    groups = {v: torch.tensor([i for i, s in enumerate(versions) if s == v]) for v in dict.fromkeys(versions)}
    for v, idx in groups.items():
        diag[f"weights/ess_frac/{v}"] = ess_frac(w[idx])
        diag[f"weights/share/{v}"] = float(w[idx].sum() / w.sum())
        diag[f"data/share/{v}"] = idx.numel() / n
        if diag[f"weights/ess_frac/{v}"] < 0.1:
            warnings.append(f"version {v}: ESS/N = {diag[f'weights/ess_frac/{v}']:.3f} < 0.1: "
                            "collect new data for this version")
    have_map = all(x is not None for x in (chosen_log_ratios, rejected_log_ratios, chosen_lengths, rejected_lengths))
    if have_map:
        ratio_c = _to_vector("chosen_log_ratios", chosen_log_ratios, n) / _to_vector("chosen_lengths", chosen_lengths, n)
        ratio_r = _to_vector("rejected_log_ratios", rejected_log_ratios, n) / _to_vector(
            "rejected_lengths", rejected_lengths, n)
        diag["kl/per_token"] = float(-(ratio_c + ratio_r).mean() / 2)  # both responses are samples of μ
        for v, idx in groups.items():
            diag[f"kl/per_token/{v}"] = float(-(ratio_c[idx] + ratio_r[idx]).mean() / 2)
        diag.update(_support_map(ratio_c, ratio_r, off_support_threshold, equal_band))
    if warnings:
        diag["warning"] = "; ".join(warnings)
    return diag


def _trust_log_weights(p: PairLogps, trust: dict) -> torch.Tensor:
    """log t_v of each pair's source version (versions not in `trust`: 0); t = 0 gives -inf (the pair drops out)."""
    if p.source_version is None:
        raise DataError("per-version trust needs source_version (gen_model_version) for every pair")
    for v, t in trust.items():
        if not 0 <= float(t) <= 1:
            raise ConfigError(f"trust of version {v!r} must lie in [0, 1], got {t}")
    values = torch.tensor([float(trust.get(v, 1.0)) for v in p.source_version], dtype=torch.float64)
    return torch.log(values)


# --- entry point ----------------------------------------------------------------------------------------------------

def _collect(source_version, version_logps, vectors: dict) -> PairLogps:
    """Validate the given columns into a PairLogps; fill gen_* from version_logps when only the latter is given."""
    given = {k: v for k, v in vectors.items() if v is not None}
    if not given:
        raise DataError("importance weights: no per-pair columns given")
    first = next(iter(given))
    n = _to_vector(first, given[first]).numel()
    if n == 0:
        raise DataError("importance weights: no pairs (the per-pair columns are empty)")
    p = PairLogps(n=n, columns={k: _to_vector(k, v, n) for k, v in given.items()})
    for name in ("chosen_lengths", "rejected_lengths"):
        bad = (p.columns[name] <= 0).nonzero() if name in p.columns else []
        if len(bad):
            raise DataError(f"{name} must be positive token counts ({len(bad)} are not, first at index {int(bad[0])})")
    if source_version is not None:
        p.source_version = _version_ids(source_version)
        if len(p.source_version) != n:
            raise DataError(f"source_version has {len(p.source_version)} entries, expected {n}")
    if version_logps is not None:
        p.version_logps = {}
        for v, pair in version_logps.items():
            if len(pair) != 2:
                raise DataError(f"version_logps[{v!r}] must be (chosen_logps, rejected_logps)")
            p.version_logps[str(v)] = (_to_vector(f"version_logps[{v!r}] chosen", pair[0], n),
                                       _to_vector(f"version_logps[{v!r}] rejected", pair[1], n))
        missing = sorted(set(p.source_version or []) - set(p.version_logps))
        if missing:
            raise DataError(f"version_logps lacks source version(s) {missing}" + _GEN_HINT)
        if p.source_version is not None and "gen_chosen_logps" not in p.columns:
            # Each response's own sampler is its source version: pick that version's column row by row.
            for side, col in enumerate(_GEN_COLUMNS):
                gen = torch.empty(n, dtype=torch.float64)
                for v in set(p.source_version):
                    rows = torch.tensor([s == v for s in p.source_version])
                    gen[rows] = p.version_logps[v][side][rows]
                p.columns[col] = gen
    return p


def compute_importance_weights(
    scheme: str,
    *,
    alpha: float = 1.0,
    clip: float | None = 5.0,
    target_chosen_logps=None,
    target_rejected_logps=None,
    gen_chosen_logps=None,
    gen_rejected_logps=None,
    chosen_lengths=None,
    rejected_lengths=None,
    source_version=None,
    version_logps: dict | None = None,
    target_chosen_log_collision=None,
    target_rejected_log_collision=None,
    off_support_threshold: float = OFF_SUPPORT,
    equal_band: float = EQUAL_BAND,
    version_trust: dict | None = None,
) -> WeightResult:
    """Per-pair importance weights with mean 1 over the dataset, plus diagnostics.

    All columns are (N,) per pair: `target_*_logps` = log π (sum over completion tokens), `gen_*_logps` = log μ under
    the sampler that produced each response, `*_lengths` = completion token counts, `source_version` = the sampler's
    version id, `version_logps` = {version: (chosen_logps, rejected_logps)} under every pooled version (for `mixture`;
    gen_* are read from it when not given). `alpha` tempers `tempered` and `mixture` (the other schemes ignore it);
    `clip` truncates (None: off). `off_support_threshold` and `equal_band` (nat/token) set the diagnostics map.
    `version_trust` = {version: t in [0, 1]} multiplies each pair's weight by its source version's trust (versions
    not named: 1) before normalisation, alone (scheme none) or on top of a scheme (see `version_trust_from_agreement`).
    Returns WeightResult(weights (N,) float32 mean 1, log_weights (N,) float32 before normalisation, diagnostics).
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown weighting scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    if alpha < 0:
        raise ConfigError(f"weighting alpha must be ≥ 0, got {alpha}")
    if clip is not None and clip < 1:
        raise ConfigError(f"weighting clip must be ≥ 1 (weights have mean 1), got {clip}")
    vectors = dict(
        target_chosen_logps=target_chosen_logps, target_rejected_logps=target_rejected_logps,
        gen_chosen_logps=gen_chosen_logps, gen_rejected_logps=gen_rejected_logps,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
        target_chosen_log_collision=target_chosen_log_collision,
        target_rejected_log_collision=target_rejected_log_collision,
    )
    p = _collect(source_version, version_logps, vectors)
    log_w = SCHEMES[scheme].log_weight(p, alpha)
    if version_trust:
        log_w = log_w + _trust_log_weights(p, version_trust)
    weights = _normalize(log_w, clip)

    have_ratios = all(k in p.columns for k in ("target_chosen_logps", "target_rejected_logps", *_GEN_COLUMNS))
    ell_c = p.columns["target_chosen_logps"] - p.columns["gen_chosen_logps"] if have_ratios else None
    ell_r = p.columns["target_rejected_logps"] - p.columns["gen_rejected_logps"] if have_ratios else None
    diagnostics = weight_diagnostics(
        weights, log_w, clip=clip, source_version=p.source_version,
        chosen_log_ratios=ell_c, rejected_log_ratios=ell_r,
        chosen_lengths=p.columns.get("chosen_lengths"), rejected_lengths=p.columns.get("rejected_lengths"),
        off_support_threshold=off_support_threshold, equal_band=equal_band,
    )
    diagnostics.update({"scheme": scheme, "alpha": float(alpha), "clip": None if clip is None else float(clip)})
    if version_trust:
        diagnostics["trust"] = {str(v): float(t) for v, t in version_trust.items()}
    if scheme == "wpo":
        diagnostics["wpo_alignment"] = "sampled" if "target_chosen_log_collision" in p.columns else "none"
    return WeightResult(weights=weights.float(), log_weights=log_w.float(), diagnostics=diagnostics)
