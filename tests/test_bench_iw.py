"""bench/iw_reuse.py: the matched-KL analysis on hand-made trajectories, and `--quick --model tiny` end to end."""

import json
import math
import os
from pathlib import Path

import pytest

from align.reuse import AUTO_CANDIDATES
from tests.bench import load_bench

ROOT = Path(__file__).resolve().parents[1]


iw = load_bench("iw_reuse")


def traj(*points):
    return [{"step": s, "kl": k, "gold": g, "win": w} for s, k, g, w in points]


# ---- matched-KL interpolation ----------------------------------------------------------------------------------------


def test_linear_interpolation_at_a_kl_point():
    t = traj((0, 0.0, 0.50, 0.5), (2, 1.0, 0.70, 0.6), (4, 2.0, 0.90, 0.8))
    assert iw.value_at_kl(t, 1.5, "gold") == pytest.approx(0.80)
    assert iw.value_at_kl(t, 1.5, "win") == pytest.approx(0.70)
    assert iw.value_at_kl(t, 1.0, "gold") == pytest.approx(0.70)  # on a checkpoint: its own value
    assert iw.value_at_kl(t, 0.25, "gold") == pytest.approx(0.55)  # between the start (v2) and the first checkpoint
    assert iw.value_at_kl(list(reversed(t)), 1.5, "gold") == pytest.approx(0.80)  # step order, not list order


def test_first_crossing_of_a_noisy_trajectory():
    t = traj((0, 0.0, 0.0, 0.5), (1, 0.6, 1.0, 0.5), (2, 0.2, 2.0, 0.5), (3, 1.0, 3.0, 0.5))
    assert iw.value_at_kl(t, 0.5, "gold") == pytest.approx(0.5 / 0.6)


def test_a_run_that_never_reaches_the_point_is_not_extrapolated():
    t = traj((0, 0.0, 0.5, 0.5), (2, 0.4, 0.6, 0.55), (4, 0.8, 0.7, 0.6))
    assert iw.value_at_kl(t, 1.0, "gold") is None
    assert iw.common_kl([t, traj((0, 0.0, 0.5, 0.5), (2, 3.0, 0.9, 0.9))]) == 0.75  # largest grid point ≤ 0.8
    assert iw.common_kl([t, traj((0, 0.0, 0.5, 0.5), (2, -0.1, 0.5, 0.5))]) is None  # one run never moved


def run(arm, seed, t, ess=1.0):
    return {"arm": arm, "seed": seed, "trajectory": t, "ess_frac": ess, "ess_frac_old": ess, "pairs": 10}


def test_summary_pairs_arms_by_seed_and_reports_unreached_points():
    # union reaches KL 2 in both seeds; "sequence" moves further in seed 0 and stalls below 2 in seed 1.
    runs = {
        "union": {0: run("union", 0, traj((0, 0, 0.5, 0.5), (2, 1.0, 0.6, 0.6), (4, 2.0, 0.7, 0.7))),
                  1: run("union", 1, traj((0, 0, 0.4, 0.5), (2, 1.0, 0.5, 0.6), (4, 2.0, 0.6, 0.7)))},
        "sequence": {0: run("sequence", 0, traj((0, 0, 0.5, 0.5), (2, 2.0, 0.8, 0.7), (4, 4.0, 0.9, 0.8)), 0.3),
                     1: run("sequence", 1, traj((0, 0, 0.4, 0.5), (2, 1.0, 0.6, 0.6), (4, 1.6, 0.7, 0.7)), 0.5)},
    }
    s = iw.summarize(runs)
    assert s["kl_common"] == 1.5 and s["kl_next"] == 2.0 and s["final_step"] == 4
    seq, union = s["arms"]["sequence"], s["arms"]["union"]
    # at KL 1.5: union 0.65 / 0.55, sequence 0.5 + 0.75·0.3 = 0.725 / 0.6 + (0.5/0.6)·0.1
    assert union["gold_k1"]["mean"] == pytest.approx(0.60)
    d = [0.725 - 0.65, 0.6 + 0.5 / 0.6 * 0.1 - 0.55]
    assert seq["d_gold_k1"]["mean"] == pytest.approx(sum(d) / 2)
    assert seq["d_gold_k1"]["ci"] == pytest.approx(12.706 * abs(d[0] - d[1]) / 2)  # t(1) · sd/√2, sd = |d0-d1|/√2
    assert seq["gold_k2"]["n"] == 1 and seq["d_gold_k2"]["n"] == 1  # seed 1 never reached KL 2: left out, not guessed
    assert seq["ess_frac"] == pytest.approx(0.4)
    assert seq["gold_final"]["mean"] == pytest.approx(0.8) and seq["kl_final"]["mean"] == pytest.approx(2.8)
    assert "not reached" in iw.fmt(iw.mean_ci([None, None]))
    assert any("sequence" in line for line in iw.verdicts(s))


def test_mean_ci_is_a_t_interval():
    c = iw.mean_ci([1.0, 2.0, 3.0])
    assert c["mean"] == 2.0 and c["n"] == 3 and c["ci"] == pytest.approx(4.303 / math.sqrt(3))
    assert math.isnan(iw.mean_ci([1.0, None])["ci"])


def test_verdict_says_plainly_when_weighting_does_not_beat_unweighted_reuse():
    same = traj((0, 0, 0.5, 0.5), (2, 1.0, 0.6, 0.6))
    runs = {arm: {s: run(arm, s, [dict(p, gold=p["gold"] + 0.01 * s) for p in same]) for s in range(3)}
            for arm in ("new_only", "union", "length_normalized")}
    lines = "\n".join(iw.verdicts(iw.summarize(runs)))
    assert "length_normalized: does NOT beat unweighted reuse" in lines


def test_pool_keeps_only_the_pairs_the_loader_trains_on(tmp_path):
    """Row i of the pool must be pair i of the scorings: pairs the loader drops leave the file (the old_new run
    crashed on 1 empty and 7 identical pairs before this)."""
    def pair(chosen, rejected, tag):
        return {"prompt": [{"role": "user", "content": f"q{tag}"}], "tag": tag,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}

    old = [pair("a", "b", "o0"), pair("same", "same", "o1"), pair("c", "d", "o2")]
    new = [pair("", "e", "n0"), pair("f", "g", "n1")]
    kept_old, kept_new = iw.loadable(old, new, tmp_path / "pool.jsonl")
    assert [r["tag"] for r in kept_old] == ["o0", "o2"] and [r["tag"] for r in kept_new] == ["n1"]
    lines = [json.loads(line)["tag"] for line in (tmp_path / "pool.jsonl").read_text().splitlines()]
    assert lines == ["o0", "o2", "n1"]


# ---- the equivalence test (TOST at ±0.03 gold) --------------------------------------------------------------------


def t4_cdf(t):
    """Student t CDF with 4 degrees of freedom, in closed form (independent of scipy)."""
    return 0.5 + 3 / 8 * (t / math.sqrt(1 + t * t / 4)) * (1 - t * t / (12 * (1 + t * t / 4)))


def test_tost_on_hand_made_differences_is_equivalent():
    # mean 0.005, sd = sqrt(5e-4 / 4), se = 0.005; t(0.95, 4) = 2.131847
    e = iw.equivalence([0.01, -0.01, 0.02, 0.0, 0.005])
    assert e["n"] == 5 and e["mean"] == pytest.approx(0.005) and e["se"] == pytest.approx(0.005)
    assert e["half_width"] == pytest.approx(2.131847 * 0.005, rel=1e-6)
    assert e["ci90"] == pytest.approx([0.005 - 0.010659, 0.005 + 0.010659], abs=1e-6)
    assert e["p_upper"] == pytest.approx(t4_cdf((0.005 - 0.03) / 0.005), rel=1e-9)  # t = -5: 0.003745
    assert e["p_lower"] == pytest.approx(1 - t4_cdf((0.005 + 0.03) / 0.005), rel=1e-6)  # t = 7
    assert e["p"] == pytest.approx(0.0037452, rel=1e-4) and e["equivalent"]
    assert e["verdict"].startswith("EQUIVALENT within ±0.03")
    assert e["margin_shown"] == pytest.approx(0.015659, abs=1e-6)


def test_tost_not_established_when_the_interval_reaches_past_the_margin():
    e = iw.equivalence([0.05, -0.04, 0.06, 0.0])  # mean 0.0175, sd 0.0465: 90% CI [-0.037, 0.072]
    assert not e["equivalent"] and e["p"] > 0.05
    assert e["ci90"][0] < -0.03 < 0.03 < e["ci90"][1]
    assert "NOT established" in e["verdict"]


def test_tost_says_different_when_the_whole_interval_is_beyond_the_margin():
    e = iw.equivalence([0.10, 0.11, 0.09])
    assert not e["equivalent"] and e["ci90"][0] > 0.03 and e["verdict"].startswith("DIFFERENT")


def test_tost_edge_cases():
    same = iw.equivalence([0.0, 0.0, 0.0])  # identical arms: a zero-width interval at 0
    assert same["equivalent"] and same["ci90"] == [0.0, 0.0] and same["p"] == 0.0
    assert not iw.equivalence([0.04, 0.04])["equivalent"]  # zero spread, but outside the margin
    one = iw.equivalence([0.01, None])
    assert not one["equivalent"] and one["verdict"].startswith("cannot tell")


def test_crossing_step_is_the_first_checkpoint_at_or_past_the_matched_kl():
    t = traj((0, 0.0, 0.5, 0.5), (2, 0.4, 0.6, 0.5), (4, 1.1, 0.7, 0.5), (6, 0.9, 0.7, 0.5))
    assert iw.crossing_step(t, 1.0) == 4 and iw.crossing_step(t, 0.3) == 2 and iw.crossing_step(t, 2.0) is None


def test_size_overrides_are_typed_and_refused_with_the_field_named():
    s = iw.override_sizes(iw.OLD_NEW, ["n_old=100", "eval_at=1,3", "arm_lr=0.002", "oracle_pairs=true"])
    assert (s.n_old, s.eval_at, s.arm_lr, s.oracle_pairs) == (100, (1, 3), 0.002, True)
    with pytest.raises(ValueError, match="n_olds"):
        iw.override_sizes(iw.OLD_NEW, ["n_olds=1"])
    with pytest.raises(ValueError, match="not a valid int"):
        iw.override_sizes(iw.OLD_NEW, ["n_old=many"])
    assert iw.OLD_NEW.arm_batch * iw.OLD_NEW.arm_accum >= 32 and iw.OLD_NEW.eval_per_family == 0


# ---- end to end on a tiny model ------------------------------------------------------------------------------------


def run_main(argv):
    """iw.main in process, undoing what a command may set globally (torch's thread count, environment variables)."""
    import torch

    threads, environ = torch.get_num_threads(), dict(os.environ)
    try:
        iw.main(argv)
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)


@pytest.fixture(scope="module")
def quick_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("iw_reuse")
    argv = ["--quick", "--model", "tiny", "--work_dir", str(root / "work"), "--results_dir", str(root / "results")]
    run_main(argv)
    return root, argv


def test_quick_tiny_runs_end_to_end(quick_tiny):
    root, _ = quick_tiny
    data = json.loads((root / "results" / "iw_reuse_quick_tiny.json").read_text())
    assert set(data["summary"]["arms"]) == set(iw.ARMS) and set(data["runs"]) == set(iw.ARMS)
    for arm, row in data["summary"]["arms"].items():
        for key in ("gold_final", "win_final", "kl_final"):
            assert math.isfinite(row[key]["mean"]) and row[key]["n"] == iw.QUICK.seeds, (arm, key)
        assert 0 < row["ess_frac"] <= 1 + 1e-6
        for r in data["runs"][arm].values():
            assert [p["step"] for p in r["trajectory"]] == [0, *iw.QUICK.eval_at]
            assert all(math.isfinite(p[k]) for p in r["trajectory"] for k in ("kl", "gold", "win"))
    assert data["caveat"].startswith("PLUMBING CHECK ONLY")
    md = (root / "results" / "iw_reuse_quick_tiny.md").read_text()
    assert "PLUMBING CHECK ONLY" in md and "--quick --model tiny" in md and "| union |" in md
    # auto decided through train_dpo's own pilot fits (QUICK lowers its guards so that it does), and its arm trained
    # on the weights it chose
    rec = data["info"]["auto"]["auto"]
    assert rec["choice"] in ("none", *AUTO_CANDIDATES) and rec["reason"] and rec["scores"]
    shared = next((root / "work").glob("quick_tiny-*"))
    weights = [json.loads(line)["weight"] for line in (next(shared.glob("arms-*")) / "data" / "auto.jsonl")
               .read_text().splitlines()]
    assert len(weights) == data["summary"]["arms"]["auto"]["pairs"]
    assert sum(weights) / len(weights) == pytest.approx(1, abs=1e-4)
    assert any(line.startswith("- auto chose") for line in data["verdicts"])


def test_auto_that_falls_back_to_none_is_union_by_construction(quick_tiny):
    root, argv = quick_tiny
    run_main([*argv, "--arms", "union,auto", "--size", "auto_min_new=1000", "--name", "fallback"])
    data = json.loads((root / "results" / "iw_reuse_fallback.json").read_text())
    assert data["info"]["auto"]["auto"]["choice"] == "none" and "1000" in data["info"]["auto"]["auto"]["reason"]
    assert all(r["same_as_union"] for r in data["runs"]["auto"].values())
    for seed, r in data["runs"]["auto"].items():
        assert r["trajectory"] == data["runs"]["union"][seed]["trajectory"]
    e = data["summary"]["arms"]["auto"]["equiv_k1"]
    assert e.get("mean") in (None, 0.0)
    assert any("equivalent by construction" in line or "chose **none**" in line for line in data["verdicts"])


def test_cached_only_summarises_the_finished_seeds_and_trains_nothing(quick_tiny):
    root, argv = quick_tiny
    before = json.loads((root / "results" / "iw_reuse_quick_tiny.json").read_text())
    run_main([*argv, "--cached_only", "--seeds", "3", "--name", "so_far"])  # seed 2 was never run
    data = json.loads((root / "results" / "iw_reuse_so_far.json").read_text())
    assert data["ran_now"] == [] and data["summary"]["seeds_left_out"] == [2]
    assert data["runs"] == before["runs"] and data["summary"]["arms"] == before["summary"]["arms"]
    assert "Results so far: 2 of 3 seeds" in (root / "results" / "iw_reuse_so_far.md").read_text()
    with pytest.raises(SystemExit):  # nothing cached in a fresh work dir: refused, nothing trained
        run_main(["--quick", "--model", "tiny", "--cached_only", "--work_dir", str(root / "empty"),
                  "--results_dir", str(root / "results")])


def test_rerun_resumes_from_the_cache(quick_tiny):
    root, argv = quick_tiny
    before = json.loads((root / "results" / "iw_reuse_quick_tiny.json").read_text())
    run_main(argv)
    after = json.loads((root / "results" / "iw_reuse_quick_tiny.json").read_text())
    assert after["ran_now"] == [] and after["stage_timings"] == before["stage_timings"]  # nothing redone
    assert after["runs"] == before["runs"] and after["summary"] == before["summary"]


@pytest.mark.parametrize("scheme", ["length_normalized", "wpo", "mixture"])
def test_cached_weights_match_train_dpo_static_weights(quick_tiny, scheme, tmp_path):
    """The bench feeds dataset_weights a cached v2 scoring; train_dpo's own static-target pass gives the same
    weights."""
    from align.config import WeightingArgs
    from align.trainers.dpo import train_dpo

    root, _ = quick_tiny
    shared = next((root / "work").glob("quick_tiny-*"))
    work = next(shared.glob("arms-*"))
    configs = iw.recipe("dpo/smollm2_lora.yaml", model=shared / "v2", train_file=shared / "pool.jsonl", eval_file=None,
                        output_dir=tmp_path / "run", max_steps=1, per_device_train_batch_size=2, report_to="none",
                        save_steps=1, precompute_ref=False)
    train_dpo(*configs[:4], WeightingArgs(weighting_scheme=scheme, weighting_clip=iw.QUICK.clip), configs[5])
    own = json.loads((tmp_path / "run" / "weights.json").read_text())["weights"]
    cached = [json.loads(line)["weight"] for line in (work / "data" / f"{scheme}.jsonl").read_text().splitlines()]
    assert own == pytest.approx(cached, abs=1e-4)
