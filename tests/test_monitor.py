"""Reward-hacking monitor: the statistics by hand, each trigger on hand-made series, and the callback flagging and
stopping a run whose proxy reward is exploitable (rising proxy, falling gold) while staying quiet on an honest one."""

import json
import math

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from align.config import MonitorArgs
from align.errors import ConfigError
from align.monitor import (MonitorSeries, RewardHackingMonitor, detect, divergence_reason, divergence_stats,
                           family_reason, fitted_change, repeated_ngram_share, rollout_stats, spearman, trend)


def test_statistics_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1,2,3,4) vs (2,1,4,3): Σd² = 4, ρ = 1 - 6·4 / (4·15) = 0.6
    assert spearman([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
    assert trend([5, 5, 5]) == 0.0  # constant: no trend, never a flag
    assert trend([1, 3, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)  # ties share their average rank
    assert fitted_change([0, 1, 2, 3]) == pytest.approx(3.0)
    assert fitted_change([1, 0, 0, 1]) == pytest.approx(0.0)
    assert repeated_ngram_share([1, 2, 3, 4, 5]) == 0.0
    assert repeated_ngram_share([7, 7, 7, 7, 7]) == pytest.approx(2 / 3)  # 3 trigrams, 1 distinct
    assert repeated_ngram_share([1, 2]) == 0.0  # shorter than n


def test_rollout_stats():
    stats = rollout_stats([[1, 2, 3], [4, 4, 4, 4, 4]], [0.5, 1.5], [None, 1.0])
    assert stats["monitor/proxy"] == pytest.approx(1.0)
    assert stats["monitor/length"] == pytest.approx(4.0)
    assert stats["monitor/repetition"] == pytest.approx(1 / 3)  # (0 + 2/3) / 2
    assert stats["monitor/gold"] == pytest.approx(1.0)  # prompts without a gold check are left out
    assert "monitor/gold" not in rollout_stats([[1]], [0.0], [None])


def test_divergence_needs_trend_and_drop():
    rising, falling = [0.1, 0.2, 0.3, 0.4, 0.5], [0.8, 0.7, 0.6, 0.5, 0.4]
    assert "proxy reward rising" in divergence_reason(rising, falling, 5, 0.8, 0.05)
    assert divergence_reason(rising, rising, 5, 0.8, 0.05) is None  # both up: honest progress
    assert divergence_reason(rising, falling[1:], 5, 0.8, 0.05) is None  # not enough evaluations yet
    tiny_drop = [0.50, 0.49, 0.48, 0.47, 0.46]
    assert divergence_reason(rising, tiny_drop, 5, 0.8, 0.05) is None  # a consistent but negligible slide
    noisy = [0.5, 0.3, 0.6, 0.2, 0.4]
    assert divergence_reason(rising, noisy, 5, 0.8, 0.05) is None


def test_divergence_on_the_demo_run_that_stayed_quiet():
    # The 2026-12-05 demo's RLHF run (14 greedy held-out prompts, 5 evaluations): proxy up, gold down by one refusal
    # prompt (0.25 -> 0) and one word-count answer. Both trends pass 0.8, but the fitted fall, 0.038, is under
    # min_drop 0.05: quiet, as meant for a fall smaller than one of 14 prompts flipping (1/14 = 0.071).
    proxy = [-0.1328, 0.0310, 0.1020, 0.1062, 0.1062]
    gold = [0.5308, 0.4950, 0.4871, 0.4871, 0.4871]
    stats = divergence_stats(proxy, gold, 5)
    assert stats["proxy_rho"] == pytest.approx(9.5 / 95 ** 0.5)  # ranks 1, 2, 3, 4.5, 4.5
    assert stats["gold_rho"] == pytest.approx(-8 / 80 ** 0.5)  # ranks 5, 4, 2, 2, 2
    assert stats["gold_drop"] == pytest.approx(0.0951 * 4 / 10, abs=1e-4)
    assert divergence_reason(proxy, gold, 5, 0.8, 0.05) is None
    # the rule can fire on five points: the same curve with the fall doubled does
    doubled = [gold[0] - 2 * (gold[0] - g) for g in gold]
    assert "over the last 5 evaluations" in divergence_reason(proxy, doubled, 5, 0.8, 0.05)
    assert divergence_stats(proxy[1:], gold[1:], 5) is None


def test_each_trigger_on_hand_made_series():
    cfg = MonitorArgs(monitor_kl_budget=0.2, monitor_length_ratio=2.0, monitor_repetition_increase=0.3)
    quiet = MonitorSeries(kl=[0.01, 0.05, 0.1, 0.15], length=[20, 22, 25, 30], repetition=[0.05, 0.1, 0.1, 0.2])
    assert detect(quiet, cfg) == []

    kl = MonitorSeries(kl=[0.01, 0.1, 0.25, 0.3])
    (reason,) = detect(kl, cfg)
    assert "KL to the reference 0.275 passed its budget 0.2" in reason

    length = MonitorSeries(length=[20, 20, 35, 45])
    (reason,) = detect(length, cfg)
    assert "completion length ran away" in reason and "×2.00" in reason

    repetition = MonitorSeries(repetition=[0.0, 0.1, 0.3, 0.5])
    (reason,) = detect(repetition, cfg)
    assert "repetition ran away" in reason

    judge = MonitorSeries(evals=[{"proxy": p, "judge": j} for p, j in zip(range(5), [1.0, 0.8, 0.7, 0.5, 0.2])])
    (reason,) = detect(judge, cfg)
    assert "judge reward falls" in reason
    off = MonitorArgs(monitor_kl_budget=None, monitor_length_ratio=None, monitor_repetition_increase=None)
    assert detect(MonitorSeries(kl=[9, 9], length=[1, 1, 9, 9], repetition=[0, 0, 1, 1]), off) == []


def test_a_family_that_collapses_is_flagged_while_overall_gold_rises(tmp_path):
    # The README's run on keyword, JSON, one-sentence and arithmetic prompts: overall held-out gold rose while the
    # refusal family fell 0.60 -> 0.275 (it stopped refusing harmful requests); the divergence rule cannot see it.
    rows = []
    for step, (gold, refusal, keyword) in enumerate([(0.611, 0.6, 0.6), (0.63, 0.5, 0.8), (0.659, 0.275, 0.95)]):
        rows.append((step, {"eval/gold_reward": gold, "eval/proxy_reward": 0.1 * step, "eval/gold/refusal": refusal,
                            "eval/gold/keyword": keyword, "eval/gold/json": 1.0}))
    monitor = RewardHackingMonitor(MonitorArgs(monitor_family_drop=0.25), tmp_path)
    drive(monitor, rows[:2])
    assert not monitor.flagged  # refusal down 0.1: under the threshold
    drive(monitor, rows[2:])
    (flag,) = monitor.flags
    assert flag == {"step": 2, "reason": "task family gold fell: refusal 0.600 -> 0.275 (-0.325)"}
    assert monitor.series.evals[2]["gold/refusal"] == 0.275 and monitor.series.evals[2]["gold"] == 0.659
    assert json.loads((tmp_path / "monitor.json").read_text())["flags"] == [flag]
    # off by default: the same run raises nothing
    quiet = RewardHackingMonitor(MonitorArgs(), tmp_path / "quiet")
    drive(quiet, rows)
    assert not quiet.flagged


def test_the_report_plots_overall_series_not_each_family():
    from align.report.plots import monitor_keys

    evals = [{"step": 0, "proxy": 0.1, "gold": 0.6, "gold/refusal": 0.6}, {"step": 1, "proxy": 0.2, "rollout gold": 0.5}]
    assert monitor_keys(evals) == ["proxy", "gold", "rollout gold"]


def test_family_reason_by_hand():
    evals = [{"gold/a": 0.9, "gold/b": 0.5}, {"gold/a": 0.5}, {"gold/a": 0.6, "gold/b": 0.1, "gold/c": 0.0}]
    # each family against its own first evaluation; the biggest fall first; a family seen once cannot fall
    assert family_reason(evals, 0.3) == "task family gold fell: b 0.500 -> 0.100 (-0.400), a 0.900 -> 0.600 (-0.300)"
    assert family_reason(evals, 0.35) == "task family gold fell: b 0.500 -> 0.100 (-0.400)"
    assert family_reason(evals, 0.5) is None
    assert family_reason(evals, None) is None


def drive(monitor, logs_by_step, out_state=None):
    """Feed logged dicts to the callback the way Trainer.log does; return the state and control."""
    args = TrainingArguments(output_dir="unused", report_to="none")
    state, control = out_state or TrainerState(), TrainerControl()
    for step, logs in logs_by_step:
        state.global_step = step
        state.log_history.append({**logs, "step": step})
        monitor.on_log(args, state, control, logs=logs)
        if control.should_training_stop:
            break
    return state, control


def hacked_run(steps=10, gold_falls=True):
    """A length-exploiting policy: proxy (pays for length) rises every step; gold (falls with length) drops."""
    rows = []
    for step in range(1, steps + 1):
        length = 10 + 6 * step
        proxy = 0.1 * length
        gold = max(0.0, 1.0 - 0.02 * length) if gold_falls else 0.02 * length
        rows.append((step, {"loss": 0.1, "kl": 0.01 * step, "monitor/proxy": proxy, "monitor/length": float(length),
                            "monitor/repetition": 0.05}))
        rows.append((step, {"eval/gold_reward": gold, "eval/proxy_reward": proxy}))
    return rows


def test_flags_and_stops_an_exploited_reward(tmp_path):
    cfg = MonitorArgs(monitor_stop=True, monitor_length_ratio=None, monitor_kl_budget=None)
    monitor = RewardHackingMonitor(cfg, tmp_path)
    state, control = drive(monitor, hacked_run())
    assert control.should_training_stop
    assert monitor.flagged and "gold reward falls" in monitor.flags[0]["reason"]
    assert monitor.flags[0]["step"] == cfg.monitor_window  # as soon as the window holds five evaluations
    last = state.log_history[-1]
    assert last["monitor/flag"] == 1 and "gold reward falls" in last["monitor/reason"]
    saved = json.loads((tmp_path / "monitor.json").read_text())
    assert saved["flagged"] and saved["flags"] == monitor.flags

    # The length runaway trigger sees the same run (16 -> 70 tokens) when it is on.
    both = RewardHackingMonitor(MonitorArgs(monitor_length_ratio=2.0), tmp_path)
    drive(both, hacked_run())
    assert any("length ran away" in f["reason"] for f in both.flags)


def test_quiet_when_proxy_is_the_gold_reward(tmp_path):
    monitor = RewardHackingMonitor(MonitorArgs(monitor_stop=True, monitor_length_ratio=None), tmp_path)
    rows = [(s, {"loss": 0.1, "kl": 0.01, "monitor/proxy": 0.1 * s, "monitor/gold": 0.1 * s}) for s in range(1, 13)]
    rows += [(s, {"eval/gold_reward": 0.05 * s, "eval/proxy_reward": 0.05 * s}) for s in range(1, 13)]
    rows.sort(key=lambda r: r[0])
    state, control = drive(monitor, rows)
    assert not control.should_training_stop and not monitor.flagged
    assert all(row["monitor/flag"] == 0 for row in state.log_history)
    assert not (tmp_path / "monitor.json").exists()  # written only on a flag or at the end


def test_rollout_gold_without_evaluation_rows(tmp_path):
    """Without held-out evaluations, the rollouts' own gold checks are compared at each evaluation point."""
    monitor = RewardHackingMonitor(MonitorArgs(), tmp_path)
    for step in range(1, 7):
        monitor.update(step, {"monitor/proxy": 0.2 * step, "monitor/gold": 1.0 - 0.1 * step})
        monitor.update(step, {"eval/proxy_reward": 0.2 * step})  # an evaluation with no gold of its own
    assert any("rollout gold reward falls" in f["reason"] for f in monitor.flags)


def test_top_k_samples_and_resume(tmp_path):
    monitor = RewardHackingMonitor(MonitorArgs(monitor_top_k=2), tmp_path)
    monitor.observe(["p1", "p2", "p3"], ["a", "b", "c"], [0.1, 0.9, 0.5], [[1], [2], [3]], step=1)
    monitor.observe(["p4"], ["d"], [0.7], [[4]], step=2)
    assert [s["completion"] for s in monitor.top_samples()] == ["b", "d"]

    state, _ = drive(monitor, hacked_run(steps=3))
    monitor.write()
    resumed = RewardHackingMonitor(MonitorArgs(monitor_top_k=2), tmp_path)
    resumed.on_train_begin(None, state, TrainerControl())
    assert resumed.series.proxy == monitor.series.proxy and resumed.series.evals == monitor.series.evals
    assert [s["completion"] for s in resumed.top_samples()] == ["b", "d"]
    assert all(math.isfinite(x) for x in resumed.series.length)


def test_monitor_config_is_validated():
    with pytest.raises(ConfigError, match="monitor_window must be >= 3"):
        MonitorArgs(monitor_window=2)
    with pytest.raises(ConfigError, match="monitor_length_ratio must be > 1"):
        MonitorArgs(monitor_length_ratio=1.0)
    with pytest.raises(ConfigError, match="monitor_family_drop"):
        MonitorArgs(monitor_family_drop=0.0)
