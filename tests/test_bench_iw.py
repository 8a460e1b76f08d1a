"""bench/iw_reuse.py: the matched-KL analysis on hand-made trajectories, and `--quick --model tiny` end to end."""

import json
import math
import os
from pathlib import Path

import pytest

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
