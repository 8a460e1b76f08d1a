import json
import math
import typing

import pytest
import torch

from align.errors import ConfigError, DataError
from align.losses import preference_loss
from align.config import WeightingArgs
from align.trainers.weights import DynamicWeights
from align.weighting import (
    SCHEME_NAMES,
    SCHEMES,
    compute_importance_weights,
    log_ratios,
    log_weight_shift,
    normalize_log_weights,
    weight_diagnostics,
)


def _columns(n=64, seed=0):
    """Random but plausible per-pair columns: sequence log-probs of tens of nats, lengths 10-40 tokens."""
    g = torch.Generator().manual_seed(seed)
    gen_c, gen_r = -30 - 20 * torch.rand(n, generator=g), -30 - 20 * torch.rand(n, generator=g)
    return dict(
        target_chosen_logps=gen_c + 3 * torch.randn(n, generator=g),
        target_rejected_logps=gen_r + 3 * torch.randn(n, generator=g),
        gen_chosen_logps=gen_c,
        gen_rejected_logps=gen_r,
        chosen_lengths=torch.randint(10, 41, (n,), generator=g).float(),
        rejected_lengths=torch.randint(10, 41, (n,), generator=g).float(),
    )


def _two_versions(cols, seed=7):
    """source_version and version_logps for _columns' pairs: rows 0-9 from v1 (the gen_* columns), the rest v2."""
    n = len(cols["gen_chosen_logps"])
    g = torch.Generator().manual_seed(seed)
    other = (cols["gen_chosen_logps"] + torch.randn(n, generator=g), cols["gen_rejected_logps"] - 1)
    return dict(source_version=["v1"] * 10 + ["v2"] * (n - 10),
                version_logps={"v1": (cols["gen_chosen_logps"], cols["gen_rejected_logps"]), "v2": other})


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_every_scheme_static_and_dynamic_paths_agree(scheme):
    """For every row of the scheme table: the dynamic shift equals the change of the static log-weight when the
    target moves (so no scheme can fall through to another's shift), DynamicWeights starts at the static weights and,
    after the move, is proportional to the static weights computed against the moved target."""
    cols, g = _columns(16, seed=1), torch.Generator().manual_seed(2)
    coll = {"target_chosen_log_collision": -5 * torch.rand(16, generator=g),
            "target_rejected_log_collision": -5 * torch.rand(16, generator=g)}
    extra = _two_versions(cols)
    before = compute_importance_weights(scheme, alpha=0.5, clip=None, **cols, **coll, **extra)
    d = {name: torch.randn(16, generator=g) for name in ("chosen_logps", "rejected_logps", "chosen_log_collision",
                                                          "rejected_log_collision")}
    moved = {**cols, **coll}
    for side in ("chosen", "rejected"):
        moved[f"target_{side}_logps"] = cols[f"target_{side}_logps"] + d[f"{side}_logps"]
        moved[f"target_{side}_log_collision"] = coll[f"target_{side}_log_collision"] + d[f"{side}_log_collision"]
    after = compute_importance_weights(scheme, alpha=0.5, clip=None, **moved, **extra)

    def view(c):  # what the DPO step hands the dynamic weights: per-response log-probs of a model
        return {f"{k}": c[f"target_{k}"] for k in ("chosen_logps", "rejected_logps", "chosen_log_collision",
                                                     "rejected_log_collision")} | {
            "chosen_lengths": cols["chosen_lengths"], "rejected_lengths": cols["rejected_lengths"]}

    shift = log_weight_shift(scheme, 0.5, view(moved), view({**cols, **coll}))
    expected = after.log_weights.double() - before.log_weights.double()
    assert torch.allclose(shift.double(), expected, atol=2e-3)
    dyn = DynamicWeights(scheme, 0.5, None)
    assert torch.allclose(dyn(before.weights, view({**cols, **coll}), view({**cols, **coll})), before.weights)
    w = dyn(before.weights, view(moved), view({**cols, **coll})).double()
    assert torch.allclose(w / w.sum(), after.weights.double() / after.weights.double().sum(), atol=1e-5)
    assert scheme in typing.get_args(typing.get_type_hints(WeightingArgs)["weighting_scheme"])


def test_uniform_weights_reproduce_plain_dpo():
    """Scheme none gives w = 1 for every pair, and Σ 1·l / B is the plain DPO mean
    (1/B) Σ_i -log σ(β[(π_c - ref_c) - (π_r - ref_r)]_i) = (1/B) Σ_i log(1 + exp(-h_i)), written out by hand here."""
    cols = _columns(8)
    weights = compute_importance_weights("none", **cols).weights
    assert torch.equal(weights, torch.ones(8))
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-20 - 10 * torch.rand(8, generator=g) for _ in range(4))
    beta = 0.1
    by_hand = sum(
        math.log1p(math.exp(-beta * float((pc[i] - rc[i]) - (pr[i] - rr[i])))) for i in range(8)  # -log σ(h)
    ) / 8
    loss, _ = preference_loss("sigmoid", pc, pr, rc, rr, beta, weights=weights)
    assert math.isclose(float(loss), float(by_hand), rel_tol=1e-6)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("clip", [None, 1.5, 5.0])
def test_self_normalised_weights_average_one_and_ess_at_most_n(scheme, clip):
    """Σw / N = 1 (to 1e-6) and ESS = (Σw)²/Σw² ≤ N for every scheme, with and without truncation; max ≤ clip."""
    cols = _columns()
    extra = {}
    if scheme == "mixture":
        extra = dict(source_version=["v1"] * 64, version_logps={"v1": (cols["gen_chosen_logps"],
                                                                       cols["gen_rejected_logps"])})
    result = compute_importance_weights(scheme, alpha=0.5, clip=clip, **cols, **extra)
    w = result.weights
    assert w.dtype == torch.float32 and w.shape == (64,)
    assert abs(float(w.double().mean()) - 1.0) < 1e-6
    assert result.diagnostics["weights/ess_frac"] <= 1.0 + 1e-12
    if clip is not None:
        assert float(w.max()) <= clip * (1 + 1e-6)


def test_ess_equals_n_for_uniform_weights():
    """All weights 1: ESS/N = N²/(N·N) = 1."""
    diag = compute_importance_weights("none", **_columns()).diagnostics
    assert diag["weights/ess_frac"] == 1.0


def test_truncation_is_exact_fixed_point_on_hand_computed_example():
    """log w = [log 4, 0, 0, 0]: mean-1 weights are 4·[4, 1, 1, 1]/7 = [2.2857, 0.5714, 0.5714, 0.5714].

    Clip c = 2: the top pair is held at 2, the rest share 4 - 2 = 2 in proportion: k = 2/(12/7) = 7/6, so
    each is (4/7)(7/6) = 2/3. Final [2, 2/3, 2/3, 2/3]: mean (2 + 2)/4 = 1 exactly, max 2 = c.
    """
    log_w = torch.tensor([math.log(4), 0.0, 0.0, 0.0])
    assert torch.allclose(normalize_log_weights(log_w, clip=None), torch.tensor([16 / 7, 4 / 7, 4 / 7, 4 / 7]))
    assert torch.allclose(normalize_log_weights(log_w, clip=2.0), torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3]))


def test_no_underflow_at_minus_ten_thousand_nats():
    """log w = [-10000, -10001, -10002]: exp would underflow, but w ∝ [1, e^-1, e^-2]; mean-1 weights are
    3/(1 + e^-1 + e^-2) = 1.995723 times that: [1.995723, 0.734181, 0.270095]. Equal log-weights give all ones."""
    w = normalize_log_weights(torch.tensor([-10000.0, -10001.0, -10002.0]), clip=None)
    scale = 3 / (1 + math.exp(-1) + math.exp(-2))
    assert torch.allclose(w, torch.tensor([scale, scale * math.exp(-1), scale * math.exp(-2)]))
    assert torch.equal(normalize_log_weights(torch.full((5,), -10000.0)), torch.ones(5))
    cols = _columns()
    cols["target_chosen_logps"] = cols["target_chosen_logps"] - 10000  # 10,000 nats per sequence below μ
    result = compute_importance_weights("sequence", clip=5.0, **cols)
    assert torch.isfinite(result.weights).all() and abs(float(result.weights.double().mean()) - 1) < 1e-6


@pytest.mark.parametrize("scheme", ["sequence", "tempered", "mixture"])
@pytest.mark.parametrize("shifted", ["target", "gen"])
def test_weights_unchanged_when_all_logps_shift_by_a_constant(scheme, shifted):
    """Adding k to every target (or every sampler) log-prob adds ±2k·α to every log-weight (both responses of each
    pair shift), which self-normalisation removes. (length_normalized would add k/T_c + k/T_r, not a constant.)"""
    cols = _columns()
    versions = ["v1"] * 40 + ["v2"] * 24
    g = torch.Generator().manual_seed(5)
    other = (cols["gen_chosen_logps"] + torch.randn(64, generator=g), cols["gen_rejected_logps"] - 1)
    extra = {}
    if scheme == "mixture":
        extra = dict(source_version=versions,
                     version_logps={"v1": (cols["gen_chosen_logps"], cols["gen_rejected_logps"]), "v2": other})
    before = compute_importance_weights(scheme, alpha=0.5, clip=5.0, **cols, **extra).weights
    k = 123.0
    if shifted == "target":
        cols["target_chosen_logps"] = cols["target_chosen_logps"] + k
        cols["target_rejected_logps"] = cols["target_rejected_logps"] + k
    else:
        cols["gen_chosen_logps"] = cols["gen_chosen_logps"] + k
        cols["gen_rejected_logps"] = cols["gen_rejected_logps"] + k
        if scheme == "mixture":
            extra["version_logps"] = {v: (c + k, r + k) for v, (c, r) in extra["version_logps"].items()}
    after = compute_importance_weights(scheme, alpha=0.5, clip=5.0, **cols, **extra).weights
    assert torch.allclose(before, after, atol=1e-5)


def test_mixture_log_weight_bounded_by_minus_log_target_share():
    """Bound tested: when the target π is itself the pooled version t, every mixture log-weight (α = 1, before
    normalisation) is ≤ -log f_t.

    Derivation: logsumexp_v[log f_v + log μ_v(pair)] ≥ log f_t + log μ_t(pair) = log f_t + log π(pair), so
    log w = log π(pair) - logsumexp(...) ≤ -log f_t. Here f_v1 = 3/4, f_v2 = 1/4, target = v2: bound log 4 = 1.386294.
    Pair 0: μ_v1 = μ_v2 -> log w = log π - (log(3/4 + 1/4) + log π) = 0.
    Pair 3: μ_v1 is 1000 nats below -> log w = log 4 - log(1 + 3e^-1000) = log 4 (to float precision).
    """
    v2_c = torch.tensor([-10.0, -20.0, -30.0, -40.0])
    v2_r = torch.tensor([-11.0, -21.0, -31.0, -41.0])
    v1_c = torch.tensor([-10.0, -15.0, -35.0, -1040.0])
    v1_r = torch.tensor([-11.0, -25.0, -30.0, -41.0])
    result = compute_importance_weights(
        "mixture", clip=None, target_chosen_logps=v2_c, target_rejected_logps=v2_r,
        source_version=["v1", "v1", "v1", "v2"], version_logps={"v1": (v1_c, v1_r), "v2": (v2_c, v2_r)},
    )
    lw = result.log_weights
    assert float(lw[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(lw[3]) == pytest.approx(math.log(4), abs=1e-6)
    assert bool((lw <= math.log(4) + 1e-6).all())
    g = torch.Generator().manual_seed(7)
    rnd = {v: (-50 * torch.rand(200, generator=g), -50 * torch.rand(200, generator=g)) for v in ("a", "b", "c")}
    versions = ["a"] * 100 + ["b"] * 60 + ["c"] * 40  # target = c, f_c = 0.2, bound log 5 = 1.609438
    lw = compute_importance_weights("mixture", target_chosen_logps=rnd["c"][0], target_rejected_logps=rnd["c"][1],
                                    source_version=versions, version_logps=rnd).log_weights
    assert bool((lw <= math.log(5) + 1e-5).all())


def test_log_ratios_and_simple_schemes_on_hand_computed_pair():
    """π = (-10, -20), μ = (-12, -16), T = (5, 10): ℓ_c = 2, ℓ_r = -4, λ = -2.
    length_normalized: 2/5 + (-4)/10 = 0; tempered α = 0.5: -1; sequence: -2."""
    ell_c, ell_r, lam = log_ratios([-10.0], [-20.0], [-12.0], [-16.0])
    assert (float(ell_c), float(ell_r), float(lam)) == (2.0, -4.0, -2.0)
    cols = dict(target_chosen_logps=[-10.0], target_rejected_logps=[-20.0], gen_chosen_logps=[-12.0],
                gen_rejected_logps=[-16.0], chosen_lengths=[5], rejected_lengths=[10])
    expected = {"length_normalized": 0.0, "tempered": -1.0, "sequence": -2.0, "none": 0.0}
    for scheme, value in expected.items():
        assert float(compute_importance_weights(scheme, alpha=0.5, **cols).log_weights[0]) == value


def test_wpo_self_weights_without_generation_logps():
    """No gen columns needed. log w = log π_c/T_c + log π_r/T_r: pair 0: -10/5 + -20/10 = -4; pair 1: -5/5 + -10/10
    = -2. Mean-1 weights: 2e^-4/(e^-4 + e^-2) = 2/(1 + e²) = 0.238406 and 2 - 0.238406 = 1.761594.
    With collision sums A = [-5, 0] (sampled alignment) pair 0 becomes (-10+5)/5 - 2 = -3."""
    cols = dict(target_chosen_logps=[-10.0, -5.0], target_rejected_logps=[-20.0, -10.0],
                chosen_lengths=[5, 5], rejected_lengths=[10, 10])
    result = compute_importance_weights("wpo", clip=None, **cols)
    assert torch.allclose(result.weights, torch.tensor([2 / (1 + math.e**2), 2 - 2 / (1 + math.e**2)]))
    assert result.diagnostics["wpo_alignment"] == "none"
    aligned = compute_importance_weights("wpo", clip=None, target_chosen_log_collision=[-5.0, 0.0],
                                         target_rejected_log_collision=[0.0, 0.0], **cols)
    assert torch.allclose(aligned.log_weights, torch.tensor([-3.0, -2.0]))
    assert aligned.diagnostics["wpo_alignment"] == "sampled"


def test_missing_generation_logps_error_suggests_wpo_and_rescore():
    cols = _columns(4)
    del cols["gen_chosen_logps"]
    with pytest.raises(DataError, match="gen_chosen_logps") as err:
        compute_importance_weights("sequence", **cols)
    assert "wpo" in str(err.value) and "align rescore" in str(err.value)
    cols = _columns(4)
    cols["gen_rejected_logps"] = [-3.0, None, -4.0, None]  # a dataset column with unscored rows
    with pytest.raises(DataError, match=r"2 non-finite or missing .*first at index 1.*wpo.*align rescore"):
        compute_importance_weights("length_normalized", **cols)


def test_non_finite_inputs_name_count_and_first_index():
    cols = _columns(5)
    cols["target_chosen_logps"] = torch.tensor([-1.0, -2.0, float("nan"), -4.0, float("-inf")])
    with pytest.raises(DataError, match=r"target_chosen_logps has 2 non-finite .*first at index 2"):
        compute_importance_weights("sequence", **cols)
    with pytest.raises(DataError, match="first at index 1"):
        normalize_log_weights(torch.tensor([0.0, float("inf")]))


def test_bad_config_and_mixture_without_versions():
    with pytest.raises(ConfigError, match="unknown weighting scheme"):
        compute_importance_weights("magic", **_columns(4))
    with pytest.raises(ConfigError, match="clip"):
        compute_importance_weights("none", clip=0.5, **_columns(4))
    with pytest.raises(DataError, match="source_version"):
        compute_importance_weights("mixture", **_columns(4))
    with pytest.raises(DataError, match="lacks source version"):
        compute_importance_weights("mixture", source_version=["a", "b", "a", "b"],
                                   version_logps={"a": ([0.0] * 4, [0.0] * 4)}, **_columns(4))


def test_diagnostics_are_json_serialisable_for_every_scheme():
    cols = _columns()
    versions = ["old"] * 48 + ["new"] * 16
    extra = dict(source_version=versions,
                 version_logps={"old": (cols["gen_chosen_logps"], cols["gen_rejected_logps"]),
                                "new": (cols["target_chosen_logps"], cols["target_rejected_logps"])})
    for scheme in SCHEMES:
        diag = compute_importance_weights(scheme, alpha=0.5, **cols, **extra).diagnostics
        json.loads(json.dumps(diag, allow_nan=False))
        assert sum(diag["weights/log_hist"]["counts"]) == 64
        assert {"weights/ess_frac/old", "weights/share/new", "kl/per_token/old", "map/counts"} <= set(diag)


def test_support_map_classification_on_constructed_pairs():
    """T = 10 for all responses; per-token log-ratios ℓ/T:
    pair 0: (-2.0, -1.5)   both < -1            -> off_support
    pair 1: (-0.5, -0.55)  |difference| 0.05    -> equally_likely
    pair 2: (0.05, -0.04)  both near 0          -> equally_likely
    pair 3: (0.3, -0.2)    difference 0.5       -> other
    pair 4: (-3.0, -0.2)   only chosen off      -> other
    """
    ell_c = torch.tensor([-20.0, -5.0, 0.5, 3.0, -30.0])
    ell_r = torch.tensor([-15.0, -5.5, -0.4, -2.0, -2.0])
    tens = torch.full((5,), 10.0)
    diag = weight_diagnostics(torch.ones(5), torch.zeros(5), chosen_log_ratios=ell_c, rejected_log_ratios=ell_r,
                              chosen_lengths=tens, rejected_lengths=tens)
    assert diag["map/class"] == ["off_support", "equally_likely", "equally_likely", "other", "other"]
    assert diag["map/counts"] == {"off_support": 1, "equally_likely": 2, "other": 2}
    assert diag["map/chosen_per_token"] == pytest.approx([-2.0, -0.5, 0.05, 0.3, -3.0])


def test_ess_share_and_kl_per_version_on_two_version_example():
    """Sequence IS, T = 1, no clip. λ = [log 3, 0 | 0, 0] for versions [v1, v1 | v2, v2]: w ∝ [3, 1, 1, 1], mean-1
    weights [2, 2/3, 2/3, 2/3].
    ESS/N v1 = (2 + 2/3)²/(2·(4 + 4/9)) = (64/9)/(80/9) = 0.8; v2 = 1; overall = 4²/(4·(4 + 12/9)) = 0.75.
    Weight share v1 = (8/3)/4 = 2/3. Top 1% (one pair of 4): 2/4 = 0.5. Truncation at c = 2 would hold 1 pair.
    KL per token v1 = -mean(ℓ/T over its 4 responses) = -(log 3 + 0 + 0 + 0)/4 = -0.274653 (a noisy estimate can be
    negative); v2 = 0.
    """
    cols = dict(target_chosen_logps=[math.log(3), 0.0, 0.0, 0.0], target_rejected_logps=[0.0] * 4,
                gen_chosen_logps=[0.0] * 4, gen_rejected_logps=[0.0] * 4,
                chosen_lengths=[1] * 4, rejected_lengths=[1] * 4, source_version=["v1", "v1", "v2", "v2"])
    diag = compute_importance_weights("sequence", clip=None, **cols).diagnostics
    assert diag["weights/ess_frac/v1"] == pytest.approx(0.8)
    assert diag["weights/ess_frac/v2"] == pytest.approx(1.0)
    assert diag["weights/ess_frac"] == pytest.approx(0.75)
    assert diag["weights/share/v1"] == pytest.approx(2 / 3) and diag["data/share/v1"] == 0.5
    assert diag["weights/top1pct_share"] == pytest.approx(0.5)
    assert diag["kl/per_token/v1"] == pytest.approx(-math.log(3) / 4) and diag["kl/per_token/v2"] == 0.0
    assert "warning" not in diag
    assert compute_importance_weights("sequence", clip=2.0, **cols).diagnostics["weights/clipped_frac"] == 0.25


def test_warning_when_ess_fraction_below_a_tenth():
    """One pair at log w = 0 and 19 at -50: ESS ≈ 1, ESS/N ≈ 1/20 = 0.05 < 0.1 -> warning, overall and for v_old."""
    target = torch.tensor([0.0] + [-50.0] * 19)
    diag = compute_importance_weights("sequence", clip=None, target_chosen_logps=target,
                                      target_rejected_logps=torch.zeros(20), gen_chosen_logps=torch.zeros(20),
                                      gen_rejected_logps=torch.zeros(20), source_version=["v_old"] * 20).diagnostics
    assert diag["weights/ess_frac"] == pytest.approx(0.05, abs=1e-6)
    assert "collect new data for this version" in diag["warning"] and "v_old" in diag["warning"]


def _batches(steps, seed, outlier_step=None, outlier=0.0, drop_from=None, drop=0.0):
    """(static weights, policy, ref) per step for pairs of 2: Δ ~ N(0, 0.3²) nats, one pair at `outlier_step`
    shifted by `outlier` nats, or every pair from step `drop_from` on shifted by -`drop` nats."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        ref = {"chosen_logps": -20 - torch.rand(2, generator=g), "rejected_logps": -20 - torch.rand(2, generator=g),
               "chosen_lengths": torch.full((2,), 10.0), "rejected_lengths": torch.full((2,), 10.0)}
        d = 0.3 * torch.randn(2, generator=g)
        if step == outlier_step:
            d[0] += outlier
        if drop_from is not None and step >= drop_from:
            d -= drop
        policy = {**ref, "chosen_logps": ref["chosen_logps"] + d}
        yield 0.5 + torch.rand(2, generator=g), policy, ref


@pytest.mark.parametrize("outlier", [50.0, 200.0])
def test_dynamic_weights_recover_at_once_after_an_outlier_pair(outlier):
    """One pair +50 (+200) nats above the rest once: its weight is truncated at c, and the running normaliser moves
    by at most 0.9 + 0.1·c, so the next batches keep weights of order 1 (before: ~1e-20 for 450 (1,900) steps)."""
    dyn = DynamicWeights("sequence", 1.0, 5.0)
    means = [float(dyn(*batch).mean()) for batch in _batches(60, seed=4, outlier_step=20, outlier=outlier)]
    assert dyn(*next(_batches(1, 9, 0, outlier)))[0] <= 5.0 + 1e-5
    assert min(means[21:]) > 0.4 and sum(means[21:26]) / 5 > 0.5
    assert dyn.collapsed_steps == 0 and dyn.log_scale < math.log(1.6)
    unclipped = DynamicWeights("sequence", 1.0, None)  # no truncation: the outlier cap (100) bounds the normaliser
    means = [float(unclipped(*batch).mean()) for batch in _batches(60, seed=4, outlier_step=20, outlier=outlier)]
    assert min(means[22:]) > 0.05 and sum(means[40:]) / 20 > 0.5


def test_dynamic_weights_report_a_collapse(caplog):
    """Every pair's target log-prob drops by 40 nats at step 10: the running normaliser lags, the mean weight falls to
    ~e^-40; each such step is counted, the metric says so, and one warning names it."""
    dyn = DynamicWeights("length_normalized", 1.0, 5.0)
    caplog.set_level("WARNING")
    flags = []
    for batch in _batches(40, seed=5, drop_from=10, drop=400.0):  # length 10: -40 nats per token-normalised pair
        dyn(*batch)
        flags.append(dyn.collapsed)
    assert flags[:10] == [False] * 10 and all(flags[10:20]) and dyn.collapsed_steps == sum(flags) >= 10
    warnings = [r for r in caplog.records if "collapsed" in r.getMessage()]
    assert len(warnings) == 1 and "mean weight" in warnings[0].getMessage()
    restored = DynamicWeights("length_normalized", 1.0, 5.0)
    restored.load_state_dict(dyn.state_dict())
    assert restored.collapsed_steps == dyn.collapsed_steps and restored.log_scale == dyn.log_scale


def test_unequal_weights_get_an_effective_batch_of_32_pairs():
    """2 pairs per micro-batch on 1 process: 16 micro-batches per step; 2 processes: 8; a 10-pair dataset: 5 (all of
    it); equal weights, or weighting_min_batch 0, leave the config alone."""
    from align.config import TrainArgs
    from align.trainers.weights import weighted_batch
    from align.weighting import WeightResult

    train = TrainArgs(per_device_train_batch_size=2, gradient_accumulation_steps=1)
    unequal = WeightResult(torch.tensor([0.5, 1.5] * 50), torch.zeros(100), {})
    on = WeightingArgs()
    assert weighted_batch(train, unequal, on, 1, 100).gradient_accumulation_steps == 16
    assert weighted_batch(train, unequal, on, 2, 100).gradient_accumulation_steps == 8
    assert weighted_batch(train, unequal, on, 1, 10).gradient_accumulation_steps == 5
    equal = WeightResult(torch.ones(100), torch.zeros(100), {})
    assert weighted_batch(train, equal, on, 1, 100) is train
    assert weighted_batch(train, unequal, WeightingArgs(weighting_min_batch=0), 1, 100) is train
    big = TrainArgs(per_device_train_batch_size=8, gradient_accumulation_steps=6)
    assert weighted_batch(big, unequal, on, 1, 100).gradient_accumulation_steps == 6  # 48 pairs already
