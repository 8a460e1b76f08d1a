"""weighting_scheme auto and per-version trust (align/reuse.py): the fall-backs, and cases whose right answer is known,
on bench/iw_sim.py's exact task and on the real pipeline with the tiny model."""

import math

import numpy as np
import pytest
import torch

from align.config import LoraArgs, WeightingArgs
from align.reuse import AUTO_CANDIDATES, choose_weighting, tempered_alpha, version_trust_from_agreement
from align.weighting import ess_frac, normalize_log_weights
from tests.bench import load_bench
from tests.helpers import load_tokenizer, pair_rows, write_pairs

sim = load_bench("iw_sim")


def _columns(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    gen_c, gen_r = -30 - 20 * torch.rand(n, generator=g), -30 - 20 * torch.rand(n, generator=g)
    return dict(target_chosen_logps=gen_c + torch.randn(n, generator=g), target_rejected_logps=gen_r - 1,
                gen_chosen_logps=gen_c, gen_rejected_logps=gen_r,
                chosen_lengths=torch.full((n,), 20.0), rejected_lengths=torch.full((n,), 20.0))


def _no_pilot(*args):
    raise AssertionError("auto must decide without pilot fits here")


@pytest.mark.parametrize("n_old, n_new, reason", [
    (0, 80, "no pairs from versions other than v1"),
    (600, 30, "only 30 pairs from v1 to validate a scheme on (auto needs at least 50)"),
    (500, 100, "500 old pairs for 100 new ones (5.0 per new pair)"),
])
def test_auto_falls_back_to_none_and_says_why(n_old, n_new, reason):
    versions = ["v0"] * n_old + ["v1"] * n_new
    choice = choose_weighting(_columns(n_old + n_new), versions, "v1", pilot=_no_pilot)
    assert choice.scheme == "none" and choice.result is None and reason in choice.reason
    assert choice.record()["choice"] == "none" and reason in choice.record()["reason"]


def test_tempered_alpha_keeps_half_the_effective_sample():
    lam = torch.randn(2000, generator=torch.Generator().manual_seed(1)) * 6
    alpha = tempered_alpha(lam, 0.5, clip=5.0)
    assert 0 < alpha < 1
    assert ess_frac(normalize_log_weights(alpha * lam, 5.0).double()) == pytest.approx(0.5, abs=1e-3)
    assert tempered_alpha(lam * 1e-3, 0.5) == 1.0  # versions this close: plain IS keeps ESS/N above 0.5


def test_trust_from_agreement_on_hand_computed_case():
    """The fitted model reproduces 80 of 100 held-out new labels; v0's labels as often (trust 1); v1's 62 of 100
    (30% flipped: 0.3 + 0.4·0.8 = 0.62, so 1 - 2ε = 0.24/0.6 = 0.4); v2's 20 of 100 (all flipped: trust 0)."""
    def probs(agree, n=100):
        return torch.tensor([0.7] * agree + [0.4] * (n - agree))

    q_new = probs(80)
    q_old = torch.cat([probs(80), probs(62), probs(20)])
    trust = version_trust_from_agreement(q_old, ["v0"] * 100 + ["v1"] * 100 + ["v2"] * 100, q_new)
    assert trust.trust == pytest.approx({"v0": 1.0, "v1": 0.4, "v2": 0.0})
    weighted = version_trust_from_agreement(q_old[:200], ["v1"] * 200, q_new, torch.tensor([1.0] * 100 + [0.0] * 100))
    assert weighted.trust == pytest.approx({"v1": 1.0})  # only v0's rows count
    weak = version_trust_from_agreement(probs(27, 50), ["v0"] * 50, probs(55))  # within 2 SE of chance
    assert weak.trust == {"v0": 1.0} and "no evidence" in weak.reason
    noisy_new = version_trust_from_agreement(q_old, ["v0"] * 100 + ["v1"] * 100 + ["v2"] * 100, probs(60))
    assert noisy_new.trust == pytest.approx({"v0": 1.0, "v1": 0.4, "v2": 0.0})  # v0 sets the scale


def test_flipped_version_gets_trust_near_zero_and_auto_drops_it():
    """Two old versions, one labeled by the new labeler, one with every label flipped (exact task of
    bench/iw_sim.py): trust well above 0 and ≈ 0, auto picks a trust candidate, and it beats unweighted reuse in gold."""
    regime = sim.Regime("flipped_version", (1500, 1500), 150, "misspec", 1.5, flip=(0.0, 1.0), kl=0.5)
    world = sim.World(regime, seed=0)
    q_old, q_new = world.agreement()
    old_versions = [f"v{v}" for v in world.old.version]
    ln = world.old_weights(world.weights("length_normalized"))
    trust = version_trust_from_agreement(q_old, old_versions, q_new, ln).trust
    assert trust["v1"] < 0.1 and trust["v0"] > 0.3  # v0 is far from v2: extrapolation costs it some agreement
    choice = choose_weighting(world.cols, world.versions, "v2", pilot=world.pilot, agreement=lambda: (q_old, q_new),
                              clip=sim.CLIP, kl=regime.kl)
    assert choice.scheme.startswith("trust") and choice.scores[choice.scheme]["gain"] > 0.05
    assert set(choice.scores) == set(AUTO_CANDIDATES)
    w = choice.result.weights.numpy()
    assert w[world.pool.version == 1].max() < 0.1 * w[world.pool.version == 0].mean()
    union = world.final(world.pool, np.ones(len(world.pool)))
    assert world.final(world.pool, w) > union + 0.1


def test_auto_on_the_real_pipeline_runs_pilots_and_leaves_the_model_untouched(tiny_model_dir, tmp_path):
    """Pairs of v1 whose generation log-probs are the target's own (so v1 is found as the target's version) and of
    v0: auto runs LoRA pilot fits, records every candidate's held-out score and the choice, and removes its
    adapter, leaving the target bit-identical."""
    from align.models import load_model
    from align.preference import PreferenceCollator, load_preferences, score_pairs, tokenize_pairs
    from align.trainers.pilot import LoraPilot
    from align.trainers.weights import dataset_weights
    from align.config import ModelArgs

    tokenizer = load_tokenizer(tiny_model_dir)
    model, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    rows = pair_rows(tokenizer, n=12, versions=("v0", "v1", "v0"))
    collator = PreferenceCollator(tokenizer.pad_token_id)
    full, _, _ = tokenize_pairs(load_preferences(write_pairs(tmp_path / "a.jsonl", rows)), tokenizer)
    scores = score_pairs(model, full, collator, 8)
    for i, row in enumerate(rows):
        if row["gen_model_version"] == "v1":
            row["gen_chosen_logps"] = float(scores["chosen_logps"][i])
            row["gen_rejected_logps"] = float(scores["rejected_logps"][i])
    pset = load_preferences(write_pairs(tmp_path / "p.jsonl", rows))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weighting = WeightingArgs(weighting_scheme="auto", weighting_auto_min_new=4, weighting_auto_min_ratio=1.0,
                              weighting_auto_steps=1)

    def make_pilot(target):
        return LoraPilot(model, full, target, collator, 0.1, LoraArgs(), 1, 1e-3, eval_batch=8)

    result, target = dataset_weights(pset, full, weighting, lambda f, c: score_pairs(model, f, collator, 8),
                                     make_pilot)
    auto = result.diagnostics["auto"]
    assert auto["choice"] in AUTO_CANDIDATES and auto["reason"]
    assert {"none", "tempered", "length_normalized"} <= set(auto["scores"])
    assert all(math.isfinite(s["heldout_loglik"]) for s in auto["scores"].values())
    assert "by auto" in result.diagnostics["scheme"] or result.diagnostics["scheme"].startswith("auto: ")
    assert target is not None and result.weights.shape == (12,)
    worth = result.diagnostics["worth"]
    assert worth["new_version"] == "v1" and worth["versions"]["v0"]["pairs"] == 8 and worth["new_pairs"] == 4
    assert worth["sentence"].startswith("v0's 8 pairs are worth about ")
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    too_few = WeightingArgs(weighting_scheme="auto")  # 4 pairs of v1 < 50: none, and why
    result, _ = dataset_weights(pset, full, too_few, lambda f, c: score_pairs(model, f, collator, 8), make_pilot)
    assert result.diagnostics["auto"]["choice"] == "none" and "only 4 pairs from v1" in result.diagnostics["auto"]["reason"]


def test_holm_adjustment_on_hand_computed_values():
    """Holm: sorted p (0.01, 0.02, 0.04) times (3, 2, 1) = (0.03, 0.04, 0.04), kept monotone."""
    assert sim.holm({"a": 0.04, "b": 0.01, "c": 0.02}) == pytest.approx({"b": 0.03, "c": 0.04, "a": 0.04})
    assert sim.one_sided_t(np.zeros(5), -0.01) == 0.0 and sim.one_sided_t(np.zeros(5)) == 1.0


def test_iw_sim_prints_the_table_and_verdicts(capsys):
    """Two seeds of two regimes: the table, the test table and the verdict. Benchmark-sized data makes auto fall back
    to none (7 new pairs), so auto − union is exactly 0 there."""
    sim.main(["--seeds", "2", "--regimes", "bench,benign_small"])
    out = capsys.readouterr().out
    assert "| regime | KL(v2‖old) | old ESS/N (LN) | union gain | auto |" in out
    bench_row = next(line for line in out.splitlines() if line.startswith("| bench |"))
    assert bench_row.split("|")[2].strip() == "+0.000 ± 0.000" and "non-inferior" in bench_row


def test_worth_report_on_known_cases():
    """v0 sampled from the target itself (λ = 0: ESS/N 1, worth all its 40 pairs); v1 a shifted sampler whose
    per-token log-ratios are -2 on both responses (all 20 pairs off the target's support), with trust 0.5 from
    auto: worth = 20 · ESS/N · 0.5; the sentence names both and the choice."""
    from align.reuse import AutoChoice, Trust, worth_report

    n_old0, n_old1, n_new = 40, 20, 10
    n = n_old0 + n_old1 + n_new
    target = -torch.linspace(20, 40, n)
    gen = target.clone()
    gen[n_old0:n_old0 + n_old1] += 2 * 10 + torch.linspace(0, 1, n_old1)  # ℓ/T ≈ -2 nat/token, slightly varied
    cols = dict(target_chosen_logps=target, target_rejected_logps=target, gen_chosen_logps=gen, gen_rejected_logps=gen,
                chosen_lengths=torch.full((n,), 10.0), rejected_lengths=torch.full((n,), 10.0))
    versions = ["v0"] * n_old0 + ["v1"] * n_old1 + ["v2"] * n_new
    choice = AutoChoice("trust", "trust won", trust=Trust({"v0": 1.0, "v1": 0.5}, {"v0": 0.7, "v1": 0.6}, 0.7),
                        scores={"trust": {"gain": 0.02}})
    worth = worth_report(cols, versions, "v2", choice=choice)
    v0, v1 = worth["versions"]["v0"], worth["versions"]["v1"]
    assert v0["ess_frac_ln"] == pytest.approx(1.0) and v0["effective_pairs"] == pytest.approx(40.0)
    assert v0["kl_per_token"] == pytest.approx(0.0, abs=1e-9) and v0["off_support"] == 0
    assert v1["off_support"] == 20 and v1["kl_per_token"] == pytest.approx(2.05, abs=0.01)
    assert v1["effective_pairs"] == pytest.approx(20 * v1["ess_frac_ln"] * 0.5) and v1["trust"] == 0.5
    assert set(worth["versions"]) == {"v0", "v1"} and worth["new_pairs"] == 10 and worth["validated_gain"] == 0.02
    assert worth["sentence"].startswith("v0's 40 pairs are worth about 40 fresh pairs; v1's 20 pairs are worth about")
    assert "of v2 (against 10 new pairs); reused with trust weights (held-out gain +0.0200 nats/pair)." in worth["sentence"]


@pytest.mark.slow  # ~30 s idle, ~100 s on a busy shared CPU: 12 pilot fits, then the run
def test_align_dpo_with_auto_records_the_choice(tiny_model_dir, tmp_path):
    """`align dpo` with weighting auto (thresholds lowered to fit the tiny data): pilots run on the starting model,
    the run then trains its own adapter from the untouched model, and the choice and reason reach weights.json,
    version.json and the worth report."""
    import json

    from align.config import DPOArgs, ModelArgs, PreferenceDataArgs, TrainArgs
    from align.models import load_model
    from align.preference import PreferenceCollator, load_preferences, score_pairs, tokenize_pairs
    from align.trainers.dpo import train_dpo

    tokenizer = load_tokenizer(tiny_model_dir)
    model, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    rows = pair_rows(tokenizer, n=12, versions=("v0", "v1", "v0"))
    full, _, _ = tokenize_pairs(load_preferences(write_pairs(tmp_path / "a.jsonl", rows)), tokenizer)
    scores = score_pairs(model, full, PreferenceCollator(tokenizer.pad_token_id), 8)
    for i, row in enumerate(rows):  # v1's pairs were sampled by the model the run starts from
        if row["gen_model_version"] == "v1":
            row.update(gen_chosen_logps=float(scores["chosen_logps"][i]), gen_rejected_logps=float(scores["rejected_logps"][i]))
    train_file = write_pairs(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    train_dpo(ModelArgs(model=str(tiny_model_dir)), LoraArgs(lora_r=4, lora_alpha=8, lora_dropout=0.0),
              PreferenceDataArgs(train_file=str(train_file), eval_file=None, max_length=128, max_prompt_length=64),
              DPOArgs(), WeightingArgs(weighting_scheme="auto", weighting_auto_min_new=4, weighting_auto_min_ratio=1.0,
                                       weighting_auto_steps=1),
              TrainArgs(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                        eval_steps=0, save_steps=2, report_to="none", seed=0))
    diag = json.loads((out / "weights.json").read_text())["diagnostics"]
    record = json.loads((out / "version.json").read_text())["metrics"]["weighting_auto"]
    assert record["choice"] == diag["auto"]["choice"] in AUTO_CANDIDATES and record["reason"] == diag["auto"]["reason"]
    assert set(diag["auto"]["scores"]) >= {"none", "tempered", "length_normalized"}
    assert diag["worth"]["new_version"] == "v1" and diag["worth"]["versions"]["v0"]["pairs"] == 8
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_report_shows_autos_choice_and_the_worth_sentence(tmp_path):
    """The evaluation report's weighting section (from a run's weights.json): auto's choice, reason and candidates,
    and the worth table and sentence."""
    import json

    from align.commands.report import build_runs_report
    from align.report import write_report
    from align.reuse import AutoChoice, worth_report

    run = tmp_path / "v2-dpo"
    (run / "adapter").mkdir(parents=True)
    (run / "version.json").write_text(json.dumps({"name": "v2-dpo", "method": "dpo", "parent": "tiny",
                                                  "adapter_path": str(run / "adapter"), "metrics": {}}))
    cols = _columns(120)
    versions = ["v0"] * 100 + ["v1"] * 20
    choice = AutoChoice("none", "only 20 pairs from v1 to validate a scheme on (auto needs at least 50)")
    worth = worth_report(cols, versions, "v1", choice=choice)
    (run / "weights.json").write_text(json.dumps({"diagnostics": {
        "scheme": "none, by auto", "weights/n": 120, "weights/ess_frac": 1.0, "auto": choice.record(), "worth": worth,
        "weights/log_hist": {"edges": [-0.5, 0.5], "counts": [120]}}}))
    html = write_report(build_runs_report([str(run)]), tmp_path / "out").read_text()
    assert "auto chose none" in html and "only 20 pairs from v1" in html
    assert "What the old labels are still worth" in html
    assert "v0&#x27;s 100 pairs are worth about" in html or "v0's 100 pairs are worth about" in html
