"""The demo's summary: the headline numbers from its evaluation report and runs (DIR/summary.json), and the
table and sentences `align demo` prints, which say in words which differences are significant and which are not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from align.monitor import divergence_stats
from align.runs import read_metrics

if TYPE_CHECKING:
    from align.demo import Demo


LABELS = ("v0 base", "v1 SFT", "v2 DPO", "v3 RLHF")
# (version, the one it is compared with): each training stage against its parent, and the last one against v0
COMPARISONS = ((1, 0), (2, 1), (3, 2), (3, 0))


def summary(demo: Demo, records: dict[str, dict]) -> dict:
    """The headline numbers, from the evaluation report and the runs: one row per version, the paired comparisons
    (each stage against its parent, the last against v0), the reward model, the RLHF run and the reuse figures."""
    report = json.loads(demo.path("report/report.json").read_text())
    names = [v["name"] for v in report["versions"]]
    v0 = names[0]
    gold = report.get("scores", {}).get("gold", {})
    reward = report.get("scores", {}).get("reward", {})
    wins = {(p["a"], p["b"]): p for p in report.get("win_rates", {}).get("gold", {}).get("pairs", [])}
    kl = report.get("kl", {}).get("per_version", {})
    rows = []
    for label, name in zip(LABELS, names):
        win = wins.get((name, v0))
        rows.append({"version": label, "name": name, "gold": gold.get(name, {}).get("mean"),
                     "gold_low": gold.get(name, {}).get("low"), "gold_high": gold.get(name, {}).get("high"),
                     "win_vs_v0": None if name == v0 or win is None else win["win_rate"],
                     "reward_model": reward.get(name, {}).get("mean"),
                     "kl_per_token": kl.get(name, {}).get("kl_per_token")})
    comparisons = []
    for i, j in COMPARISONS:
        win = wins.get((names[i], names[j])) if max(i, j) < len(names) else None
        if win is None:
            continue
        comparisons.append({"a": LABELS[i], "b": LABELS[j], "gold_a": rows[i]["gold"], "gold_b": rows[j]["gold"],
                            **{k: win[k] for k in ("win_rate", "low", "high", "n", "wins", "ties", "losses")},
                            "verdict": verdict(win["low"], win["high"])})
    weights = json.loads(demo.path("v2-dpo/weights.json").read_text())["diagnostics"]
    accuracy = report.get("reward_model_accuracy") or {}
    rlhf = records.get("rlhf-v3", {}).get("result", {})
    metrics = demo.path("v3-rlhf/metrics.jsonl")
    evaluations = [r for r in (read_metrics(metrics) if metrics.exists() else []) if "eval/gold_reward" in r]
    gold_curve = [(r["step"], r["eval/gold_reward"]) for r in evaluations]
    gain_low = {str(r["step"]): r["eval/gold_gain_low"] for r in evaluations
                if r.get("eval/gold_gain_low") is not None}
    auto = weights.get("auto") or {}
    return {
        "evaluation": {"prompts": report.get("prompts", {}).get("n"), "n": report.get("settings", {}).get("n"),
                       "temperature": report.get("settings", {}).get("temperature")},
        "versions": rows,
        "comparisons": comparisons,
        "reuse": {"scheme": weights.get("scheme"), "ess_frac": weights.get("weights/ess_frac"),
                  "ess_frac_v0": weights.get(f"weights/ess_frac/{v0}"), "share_v0": weights.get(f"data/share/{v0}"),
                  "weight_share_v0": weights.get(f"weights/share/{v0}"), "auto_choice": auto.get("choice"),
                  "auto_reason": auto.get("reason"), "worth": (weights.get("worth") or {}).get("sentence")},
        "reward_model": {"heldout_accuracy": accuracy.get("accuracy"), "heldout_pairs": accuracy.get("n"),
                         "heldout_prompts": accuracy.get("prompts"), "low": accuracy.get("low"),
                         "high": accuracy.get("high"),
                         "by_family": {f: v["accuracy"] for f, v in (accuracy.get("by_family") or {}).items()}},
        "rlhf": {**{k: rlhf.get(k) for k in ("kl", "monitor/flagged", "eval/gold_reward_start", "eval/gold_reward",
                                             "policy/kept_step", "policy/dropped/gold_reward")},
                 "gold_curve": gold_curve, "gain_low": gain_low,
                 "divergence": divergence(demo.path("v3-rlhf/monitor.json"))},
        "seconds": {name: round(r["seconds"], 1) for name, r in records.items()},
        "cpu_seconds": {name: round(r["cpu_seconds"], 1) for name, r in records.items() if "cpu_seconds" in r},
    }


def divergence(path: Path) -> Optional[dict]:
    """What the monitor's proxy-versus-gold rule saw over its window of the RLHF run's evaluations, with its
    thresholds: a quiet monitor says how far it was from flagging."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    config = saved.get("config", {})
    points = [e for e in saved.get("evaluations", []) if e.get("proxy") is not None and e.get("gold") is not None]
    window = config.get("monitor_window", 5)
    stats = divergence_stats([e["proxy"] for e in points], [e["gold"] for e in points], window)
    if stats is None:
        return None
    return {**stats, "window": window, "min_rho": config.get("monitor_min_rho"),
            "min_drop": config.get("monitor_min_drop")}


def verdict(low: float, high: float) -> str:
    """What a paired win rate's 95% interval says: better or worse beyond noise, or not distinguishable."""
    if low > 0.5:
        return "significantly better"
    if high < 0.5:
        return "significantly worse"
    return "not significant"


def _count(n: int, one: str, many: str = "") -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def print_summary(table: dict) -> None:
    fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    ev = table.get("evaluation", {})
    how = "greedy" if ev.get("temperature") == 0 else f"{ev.get('n')} samples each at temperature {ev.get('temperature')}"
    print(f"\nThe flywheel, one round per version ({ev.get('prompts')} held-out task prompts, {how}):")
    print(f"  {'version':<10}{'gold reward':>24}{'win vs v0':>11}{'RM score':>10}{'KL/token to v0':>16}")
    for r in table["versions"]:
        interval = f"{fmt(r['gold'])} [{fmt(r['gold_low'], 2)}, {fmt(r['gold_high'], 2)}]"
        print(f"  {r['version']:<10}{interval:>24}{fmt(r['win_vs_v0']):>11}{fmt(r['reward_model']):>10}"
              f"{fmt(r['kl_per_token'], 4):>16}")
    print("\nPaired on the same prompts (gold win rate of the first over the second, 95% bootstrap interval over "
          "prompts;\nsignificant when the interval excludes 0.5):")
    for c in table["comparisons"]:
        change = "up" if c["gold_a"] > c["gold_b"] else "down" if c["gold_a"] < c["gold_b"] else "unchanged"
        print(f"  {c['a']} vs {c['b']}: gold {fmt(c['gold_b'])} -> {fmt(c['gold_a'])} ({change}); "
              f"{_count(c['wins'], 'win')}, {_count(c['ties'], 'tie')}, {_count(c['losses'], 'loss', 'losses')} "
              f"on {c['n']} prompts; win rate "
              f"{fmt(c['win_rate'])} [{fmt(c['low'], 2)}, {fmt(c['high'], 2)}]: {c['verdict'].upper()}")
    reuse, rm, rl = table["reuse"], table["reward_model"], table["rlhf"]
    if reuse.get("auto_choice"):
        worth = reuse.get("worth") or ""  # its sentence may already give auto's reason
        print(f"\nReused v0 pairs in the DPO stage ({fmt(reuse['share_v0'], 2)} of the data): weighting auto chose "
              f"{reuse['auto_choice']}" + (f". {worth}" if reuse["auto_reason"] in worth else
                                          f": {reuse['auto_reason']}." + (f" {worth}" if worth else "")))
    else:
        print(f"\nReused v0 pairs in the DPO stage ({reuse['scheme']} weights toward v1): "
              f"ESS/N {fmt(reuse['ess_frac_v0'])} for v0's pairs ({fmt(reuse['share_v0'], 2)} of the data, "
              f"{fmt(reuse['weight_share_v0'], 2)} of the weight); overall {fmt(reuse['ess_frac'])}.")
    chance = ("" if rm.get("low") is None else
              ", better than chance beyond noise" if rm["low"] > 0.5 else ", not distinguishable from chance")
    prompts = f" from {_count(rm['heldout_prompts'], 'prompt')}" if rm.get("heldout_prompts") else ""
    families = ", ".join(f"{f} {fmt(a, 2)}" for f, a in (rm.get("by_family") or {}).items())
    print(f"Reward model: {fmt(rm['heldout_accuracy'])} accuracy [{fmt(rm.get('low'), 2)}, {fmt(rm.get('high'), 2)}] "
          f"on {rm['heldout_pairs'] or 0} held-out decided pairs{prompts}{chance}"
          + (f" (by task family: {families})." if families else "."))
    curve = rl.get("gold_curve") or []
    flagged = rl.get("monitor/flagged")
    div = rl.get("divergence")
    seen = "" if not div else (
        f" (over its last {div['window']} evaluations: proxy ρ {div['proxy_rho']:+.2f}, gold ρ {div['gold_rho']:+.2f}, "
        f"gold's fitted change {-div['gold_drop']:+.3f}; it flags proxy ρ ≥ {div['min_rho']} with gold ρ ≤ "
        f"-{div['min_rho']} and a fall ≥ {div['min_drop']})")
    moved = "" if len(curve) < 2 else (" (up)" if curve[-1][1] > curve[0][1] else
                                       " (down)" if curve[-1][1] < curve[0][1] else " (unchanged)")
    kept = rl.get("policy/kept_step")
    rolled = kept is not None and bool(curve) and kept != curve[-1][0]
    gains = rl.get("gain_low") or {}
    if rolled and kept == curve[0][0] and gains:
        best_step, best_gold = max(curve[1:], key=lambda c: c[1])
        low = gains.get(str(best_step), float("nan"))
        best = ("is no higher than the start" if best_gold <= curve[0][1] else
                f"has a 95% gain interval from {low:+.3f}, not above 0")
        why = (f"; v3 is the starting policy (v2): no evaluation beat it beyond noise (the best, step {best_step} "
               f"at {fmt(best_gold)}, {best})")
    elif rolled:
        why = (f"; v3 is the policy of step {kept}, its best gold evaluation"
               + (" that beat the start beyond noise" if gains else "")
               + f" ({fmt(rl.get('eval/gold_reward'))}), not of step {curve[-1][0]} "
               f"({fmt(rl.get('policy/dropped/gold_reward'))})")
    else:
        why = ""
    print(f"RLHF: greedy gold on its {len(curve)} evaluations (steps {', '.join(str(s) for s, _ in curve)}): "
          f"{' -> '.join(fmt(g) for _, g in curve)}{moved}; KL {fmt(rl.get('kl'), 4)} nats/token "
          f"{'for the policy kept' if rolled else 'at the last step'}; "
          f"reward-hacking monitor {'FLAGGED the run (see v3-rlhf/monitor.json)' if flagged else 'quiet'}{seen}"
          f"{why}.")
    total, cpu = sum(table["seconds"].values()), table.get("cpu_seconds", {})
    print("Stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in table["seconds"].items()) + f" (total {total:.0f}s"
          + (f"; {sum(cpu.values()):.0f} CPU seconds)." if cpu else ")."))
