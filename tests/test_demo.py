"""`align demo`: every stage of the flywheel on a tiny model, resumable, deterministic, failing clearly."""

import json
from pathlib import Path

import numpy as np
import pytest

from align.demo import SIZES, STAGES, Demo, DemoSize, prompt_sets, run_stages
from align.demo_summary import summary
from align.errors import AlignError
from align.prompts import resolve_prompts
from align.tasks import reference_messages

TINY = DemoSize(v0_per_family=1, v1_per_family=1, n=3, v1_n=3, max_new_tokens=8, sft_steps=2, dpo_steps=2,
                reward_steps=2, rlhf_steps=2, rlhf_evaluations=3, rlhf_eval_per_family=1, eval_per_family=1, eval_n=1,
                sft_eval_samples=4, demonstrations_per_family=3)
# A random model answers nothing right: with a both-bad threshold of 0 every pair is a tie, which every stage trains on.
OVERRIDES = ("--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1")


def tiny_demo(out: Path, model: Path, seed: int = 0, weighting: str = "length_normalized") -> Demo:
    return Demo(out, TINY, "tiny", str(model), seed, weighting, both_bad_threshold=0.0, overrides=OVERRIDES)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir) -> tuple[Demo, dict]:
    demo = tiny_demo(tmp_path_factory.mktemp("demo") / "demo", tiny_model_dir)
    return demo, run_stages(demo)


def test_every_stage_leaves_its_result(finished):
    demo, records = finished
    assert list(records) == [name for name, _ in STAGES]
    for run in ("v1-sft", "v2-dpo", "reward", "v3-rlhf"):
        assert (demo.path(run) / "version.json").is_file()
    lineage = [json.loads((demo.path(run) / "version.json").read_text())["parent"]
               for run in ("v1-sft", "v2-dpo", "v3-rlhf")]
    assert lineage[1:] == ["v1-sft", "v2-dpo"]
    # 7 families x 1 prompt x 3 samples: v0's are paired disjointly (1 pair, one sample left over), v1's all
    # pairwise (3 pairs); 3 simulated annotators vote on each.
    assert records["label-v0"]["result"]["pairs"] == 7 and records["label-v0"]["result"]["votes"] == 21
    assert records["label-v1"]["result"]["pairs"] == 21
    exported = records["export"]["result"]
    assert exported["pairs"] == 28
    assert exported["reward_train"] - exported["reward_demonstrations"] + exported["reward_heldout"] == 28
    prefs = [json.loads(line) for line in demo.path("prefs.jsonl").read_text().splitlines()]
    assert {r["gen_model_version"] for r in prefs} == {str(demo.model), "v1-sft"}
    assert (demo.path("report") / "report.html").stat().st_size > 10_000
    monitor = demo.path("report/summary.md").read_text().split("## Monitor flags: v3-rlhf\n\n")[1].splitlines()[0]
    assert monitor.startswith("- ")  # a flag, or the sentence saying there was none


def test_report_shows_the_overfitting_gap_of_the_sft_stage(finished):
    from align.runs import read_metrics

    demo, _ = finished
    report = json.loads(demo.path("report/report.json").read_text())
    gaps = report["overfit"]["v1-sft"]["evaluations"]
    assert [g["step"] for g in gaps] == [1, 2]  # 2 SFT steps, evaluated every step on 4 held-out conversations
    logged = {r["step"]: r for r in read_metrics(demo.path("v1-sft/metrics.jsonl")) if "eval_loss" in r}
    for g in gaps:
        assert g["eval_gap"] == pytest.approx(logged[g["step"]]["eval_loss"] - logged[g["step"]]["eval_train_loss"])
    assert "Overfitting alarm" in demo.path("report/report.html").read_text()


def test_report_shows_what_dpo_and_rlhf_cost_the_sft_stage(finished):
    demo, _ = finished
    report = json.loads(demo.path("report/report.json").read_text())
    assert set(report["interference"]) == {"v2-dpo", "v3-rlhf"}
    for run in ("v2-dpo", "v3-rlhf"):
        recorded = json.loads(demo.path(f"{run}/interference.json").read_text())
        metrics = json.loads(demo.path(f"{run}/version.json").read_text())["metrics"]
        assert report["interference"][run]["before"] == recorded["before"]
        assert metrics["interference/sft_loss_after"] == recorded["after"]["sft_loss"]
        assert recorded["sft_conversations"] == 4 and recorded["gold_tasks"] == 7
    # DPO starts from v1-sft: its SFT conversations are v1's held-out file; RLHF's v2 has no SFT run of its own
    assert report["interference"]["v2-dpo"]["sft_source"] == "the eval_file of SFT run v1-sft"
    assert report["interference"]["v3-rlhf"]["sft_source"] == "the eval_file of SFT run v1-sft"
    # v2 is v3's starting model: RLHF's "before" is DPO's "after"
    assert report["interference"]["v3-rlhf"]["before"]["sft_loss"] == pytest.approx(
        report["interference"]["v2-dpo"]["after"]["sft_loss"], rel=1e-4)
    assert "Stage interference" in demo.path("report/report.html").read_text()


def test_report_colours_tokens_by_credit(finished):
    demo, _ = finished
    report = json.loads(demo.path("report/report.json").read_text())
    credit = report["credit"]
    assert set(credit["per_version"]) == {"v1-sft", "v2-dpo", "v3-rlhf"}  # each against its parent; v0 has none
    assert credit["per_version"]["v2-dpo"]["reference"] == "v1-sft"
    beta = json.loads(demo.path("v2-dpo/version.json").read_text())["config"]["beta"]
    for pair in credit["per_version"]["v2-dpo"]["pairs"]:
        for side in ("chosen", "rejected"):
            assert pair[side]["sum"] == pytest.approx(sum(pair[side]["log_ratio"]), abs=1e-9)
            assert len(pair[side]["tokens"]) == len(pair[side]["log_ratio"])
        assert pair["margin"] == pytest.approx(beta * (pair["chosen"]["sum"] - pair["rejected"]["sum"]))
    drops = credit["reward_model"]["pairs"][0]["chosen"]
    assert len(drops["reward_drop"]) == len(drops["tokens"])  # 8-token answers: every token dropped once
    assert "Token-level credit" in demo.path("report/report.html").read_text()


def test_report_shows_drift_of_each_version_against_its_parent(finished):
    """Lengths agree with the report's length section; the support share is recomputed from the v1 model's
    log-probs of v0's labelled pairs against their stored v0 log-probs."""
    from align import store as st
    from align.config import ModelArgs
    from align.data import as_messages, prompt_ids
    from align.generation import score_completions
    from align.models import load_model

    demo, _ = finished
    report = json.loads(demo.path("report/report.json").read_text())
    drift = report["drift"]["per_version"]
    assert {name: row["parent"] for name, row in drift.items()} == {
        "v1-sft": str(demo.model), "v2-dpo": "v1-sft", "v3-rlhf": "v2-dpo"}
    for name, row in drift.items():
        lengths = report["lengths"]
        assert row["length"]["version"] == pytest.approx(np.mean(lengths[name]["values"]))
        assert row["length"]["parent"] == pytest.approx(np.mean(lengths[row["parent"]]["values"]))
        assert set(row["format"]) == {"code_block", "list", "json", "refusal"}
        assert 0 <= row["embedding"]["shift"] <= 2 and row["embedding"]["prompts"] == 7
    support = drift["v1-sft"]["support"]
    assert support["pairs"] == 7  # v0's 7 labelled pairs
    model, tokenizer = load_model(ModelArgs(model=str(demo.path("v1-sft"))))
    with st.connect(demo.db) as store:
        rows = st.export_preferences(store, model_versions=[str(demo.model)])
    by_hand = []
    for row in rows:
        prompt = prompt_ids(tokenizer, as_messages(row["prompt"]))
        per_token = []
        for side in ("chosen", "rejected"):
            logps, _ = score_completions(model.eval(), [prompt], [row[f"{side}_token_ids"]], None,
                                         tokenizer.pad_token_id)
            per_token.append((sum(logps[0]) - row[f"gen_{side}_logps"]) / len(row[f"{side}_token_ids"]))
        by_hand.append(per_token)
    assert sorted(support["chosen_per_token"]) == pytest.approx(sorted(c for c, _ in by_hand), abs=1e-4)
    assert support["off_support"] == sum(c < -1 and r < -1 for c, r in by_hand)
    assert isinstance(drift["v3-rlhf"]["support"], str)  # v2 sampled no pairs of its own
    assert "Drift between versions" in demo.path("report/report.html").read_text()


def test_summary_table_comes_from_the_report_and_the_runs(finished):
    demo, records = finished
    table = summary(demo, records)
    report = json.loads(demo.path("report/report.json").read_text())
    assert [r["name"] for r in table["versions"]] == [v["name"] for v in report["versions"]]
    for row in table["versions"]:
        assert row["gold"] == report["scores"]["gold"][row["name"]]["mean"]
        assert row["reward_model"] == report["scores"]["reward"][row["name"]]["mean"]
    assert table["versions"][0]["win_vs_v0"] is None and table["versions"][1]["win_vs_v0"] is not None
    weights = json.loads(demo.path("v2-dpo/weights.json").read_text())["diagnostics"]
    assert table["reuse"]["ess_frac_v0"] == weights[f"weights/ess_frac/{demo.model}"]
    assert table["reuse"]["share_v0"] == pytest.approx(0.25)  # 7 of 28 pairs come from v0
    assert set(table["seconds"]) == set(table["cpu_seconds"]) == {name for name, _ in STAGES}
    assert table["evaluation"] == {"prompts": 7, "n": 1, "temperature": 0.0}  # greedy, one answer per prompt


def test_summary_compares_each_stage_with_its_parent_and_says_what_is_significant(finished, capsys):
    from align.demo_summary import print_summary

    demo, records = finished
    table = summary(demo, records)
    report = json.loads(demo.path("report/report.json").read_text())
    pairs = {(p["a"], p["b"]): p for p in report["win_rates"]["gold"]["pairs"]}
    names = [v["name"] for v in report["versions"]]
    compared = [(c["a"], c["b"]) for c in table["comparisons"]]
    assert compared == [("v1 SFT", "v0 base"), ("v2 DPO", "v1 SFT"), ("v3 RLHF", "v2 DPO"), ("v3 RLHF", "v0 base")]
    for c, (i, j) in zip(table["comparisons"], [(1, 0), (2, 1), (3, 2), (3, 0)]):
        paired = pairs[(names[i], names[j])]
        assert (c["win_rate"], c["low"], c["high"], c["n"]) == (paired["win_rate"], paired["low"], paired["high"], 7)
        assert c["wins"] + c["ties"] + c["losses"] == 7  # greedy: every prompt is a win, a tie or a loss
        assert c["verdict"] == ("significantly better" if c["low"] > 0.5 else
                                "significantly worse" if c["high"] < 0.5 else "not significant")
    # the RLHF run evaluated before its first step and every step after (2 steps, 3 evaluations asked for)
    assert [step for step, _ in table["rlhf"]["gold_curve"]] == [0, 1, 2]
    print_summary(table)
    out = capsys.readouterr().out
    assert "(7 held-out task prompts, greedy)" in out
    for c in table["comparisons"]:
        assert f"{c['a']} vs {c['b']}: " in out
        line = next(x for x in out.splitlines() if x.strip().startswith(f"{c['a']} vs {c['b']}: "))
        assert line.endswith(c["verdict"].upper()) and f"on 7 prompts" in line
    assert "held-out decided pairs" in out and "3 evaluations (steps 0, 1, 2)" in out


@pytest.mark.parametrize("low, high, words", [(0.52, 0.7, "significantly better"), (0.3, 0.48, "significantly worse"),
                                              (0.45, 0.62, "not significant"), (0.5, 0.8, "not significant")])
def test_a_difference_is_significant_only_when_its_interval_excludes_one_half(low, high, words):
    from align.demo_summary import verdict

    assert verdict(low, high) == words


def test_rerun_skips_every_stage_and_other_settings_are_refused(finished, tiny_model_dir, capsys):
    demo, records = finished
    stamp = demo.path("v2-dpo/version.json").stat().st_mtime_ns
    again = run_stages(demo)
    assert again == json.loads(json.dumps(records))  # the records read back from the markers
    assert capsys.readouterr().out.count("done already") == len(STAGES)
    assert demo.path("v2-dpo/version.json").stat().st_mtime_ns == stamp
    with pytest.raises(AlignError, match="other settings \\(seed\\)"):
        run_stages(tiny_demo(demo.out, tiny_model_dir, seed=1))


def test_a_failed_stage_is_named_and_the_next_run_resumes_from_it(tmp_path, tiny_model_dir):
    demo = tiny_demo(tmp_path / "demo", tiny_model_dir)
    calls = []

    def flaky(d):
        calls.append("flaky")
        if len(calls) == 1:
            raise RuntimeError("disk full")
        return {"ok": True}

    stages = [("generate-v0", STAGES[0][1]), ("flaky", flaky), ("label-v0", STAGES[1][1])]
    with pytest.raises(AlignError, match="demo stage 'flaky' failed \\(RuntimeError: disk full\\).*resume"):
        run_stages(demo, stages)
    assert (demo.path("stages") / "generate-v0.json").exists()
    assert not (demo.path("stages") / "flaky.json").exists() and not (demo.path("stages") / "label-v0.json").exists()
    records = run_stages(demo, stages)
    assert calls == ["flaky", "flaky"] and records["flaky"]["result"] == {"ok": True}
    assert records["label-v0"]["result"]["pairs"] == 7


def test_same_seed_same_demo_and_auto_weighting_says_why_it_reuses_old_pairs_unweighted(finished, tmp_path,
                                                                                        tiny_model_dir):
    demo, _ = finished
    # the twin differs in its weighting only, which nothing before the DPO stage reads
    twin = tiny_demo(tmp_path / "twin", tiny_model_dir, weighting="auto")
    assert Demo(tmp_path, TINY).weighting == "auto"  # the demo's default
    run_stages(twin, STAGES[:7])  # generation, labels and export: everything the training stages read; then DPO
    assert twin.path("prefs.jsonl").read_text() == demo.path("prefs.jsonl").read_text().replace(
        str(demo.out), str(twin.out))
    # 7 of v0's pairs for 21 of v1's: too few new pairs to validate a scheme on, so auto falls back to none
    auto = json.loads(twin.path("v2-dpo/weights.json").read_text())["diagnostics"]["auto"]
    assert auto["choice"] == "none" and auto["reason"].startswith("only 21 pairs from v1-sft to validate a scheme on")


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_size_fits_the_task_suite(size, tmp_path):
    demo = Demo(tmp_path, SIZES[size], size)
    v0, v1 = prompt_sets(demo)
    families = {r["family"] for r in v0}
    assert len(families) == 7 and {r["family"] for r in v1} == families
    assert len(v0) == 7 * SIZES[size].v0_per_family and len(v1) == 7 * SIZES[size].v1_per_family
    assert not {r["id"] for r in v0} & {r["id"] for r in v1}  # v1 labels new prompts
    assert len(resolve_prompts("tasks:eval", SIZES[size].eval_per_family)) == 7 * SIZES[size].eval_per_family
    assert SIZES[size].n >= 2 and SIZES[size].rlhf_steps >= 1
    # what the demo must show: >= 70 held-out prompts (greedy, or >= 2 samples), >= 5 RLHF evaluations
    assert 7 * SIZES[size].eval_per_family >= 70
    assert SIZES[size].eval_temperature == 0 or SIZES[size].eval_n >= 2
    from align.demo import rlhf_eval_steps

    assert SIZES[size].rlhf_steps // rlhf_eval_steps(SIZES[size]) + 1 >= 5
    # the RLHF run's own gold evaluations (which pick the policy kept after a flag) use other held-out prompts
    from align.demo import rlhf_eval_tasks

    rlhf = rlhf_eval_tasks(SIZES[size])
    assert len(rlhf) == 7 * SIZES[size].rlhf_eval_per_family
    assert not {t["id"] for t in rlhf} & {t["id"] for t in resolve_prompts("tasks:eval", SIZES[size].eval_per_family)}
    with pytest.raises(AlignError, match="too few .* prompts for 20 evaluation and 5 RLHF prompts per family"):
        rlhf_eval_tasks(DemoSize(**{**SIZES[size].__dict__, "eval_per_family": 20, "rlhf_eval_per_family": 5}))


def test_a_weighting_scheme_the_demo_cannot_use_is_refused_before_anything_runs(tmp_path):
    from align.commands.demo import main

    with pytest.raises(AlignError, match="invalid choice: 'mixture'"):
        main(["--out", str(tmp_path / "demo"), "--weighting", "mixture"])
    assert not (tmp_path / "demo").exists()


def test_bf16_autocast_only_where_the_cpu_computes_bf16_natively(tmp_path):
    from align.demo import native_bf16_cpu

    def cpuinfo(flags: str) -> Path:
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\nflags\t\t: fpu sse2 {flags}\n")
        return path

    assert native_bf16_cpu(cpuinfo("avx512f avx512_bf16")) and native_bf16_cpu(cpuinfo("amx_tile amx_bf16"))
    assert not native_bf16_cpu(cpuinfo("avx512f avx2"))  # emulated bf16 is slower than float32: keep auto
    assert not native_bf16_cpu(tmp_path / "absent")
    assert Demo(tmp_path, TINY).precision == "auto"  # the dataclass default; `align demo` asks default_precision()


@pytest.mark.parametrize("method", ["sft", "rlhf"])
def test_mixed_precision_bf16_reaches_transformers_trainers_on_a_cpu(method, tmp_path, monkeypatch):
    """SFT and RLHF run on transformers' Trainer, which autocasts bf16 on a CPU only with use_cpu."""
    import torch

    from align import config as cfg
    from align.prompts import repo_file

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for precision, expect in (("bf16", (True, True)), ("no", (False, False)), ("auto", (False, False))):
        if method == "sft":
            from align.trainers.sft import trainer_args

            model, _lora, _data, train = cfg.parse_config(cfg.SFT_CONFIG, [
                "--config", str(repo_file("recipes/configs/sft/smollm2_lora.yaml")), "--mixed_precision", precision,
                "--output_dir", str(tmp_path)])
            args = trainer_args(train, model, False, tmp_path)
        else:
            from align.trainers.rlhf import trainer_config

            model, _lora, _data, rl, _monitor, train = cfg.parse_config(cfg.RLHF_CONFIG, [
                "--config", str(repo_file("recipes/configs/rlhf/smollm2_lora.yaml")), "--mixed_precision", precision,
                "--output_dir", str(tmp_path)])
            args = trainer_config(rl, train, model, tmp_path)
        assert (args.bf16, args.use_cpu) == expect, precision


def test_summary_says_how_far_a_quiet_monitor_was_from_flagging(tmp_path, finished, capsys):
    from align.demo_summary import divergence, print_summary

    demo, records = finished
    assert summary(demo, records)["rlhf"]["divergence"] is None  # 3 evaluations: fewer than the monitor's window
    gold = [0.5308, 0.4950, 0.4871, 0.4871, 0.4871]  # the 2026-12-05 demo's RLHF run, proxy up and gold down
    proxy = [-0.1328, 0.0310, 0.1020, 0.1062, 0.1062]
    path = tmp_path / "monitor.json"
    path.write_text(json.dumps({"config": {"monitor_window": 5, "monitor_min_rho": 0.8, "monitor_min_drop": 0.05},
                                "evaluations": [{"step": 3 * i, "proxy": p, "gold": g}
                                                for i, (p, g) in enumerate(zip(proxy, gold))]}))
    seen = divergence(path)
    assert seen["proxy_rho"] == pytest.approx(0.975, abs=1e-3) and seen["gold_rho"] == pytest.approx(-0.894, abs=1e-3)
    assert seen["gold_drop"] == pytest.approx(0.038, abs=1e-3) and (seen["window"], seen["min_drop"]) == (5, 0.05)
    table = summary(demo, records)
    table["rlhf"]["divergence"] = seen
    print_summary(table)
    assert ("quiet (over its last 5 evaluations: proxy ρ +0.97, gold ρ -0.89, gold's fitted change -0.038; it flags "
            "proxy ρ ≥ 0.8 with gold ρ ≤ -0.8 and a fall ≥ 0.05)") in capsys.readouterr().out
    assert divergence(tmp_path / "absent.json") is None


def test_reward_heldout_split_measures_every_family_and_keeps_prompts_whole():
    from align.demo import _prompt_key, held_out_prompts

    rows = [{"prompt": f"{family} task {i}", "family": family, "pair": j}
            for family, count in (("a", 11), ("b", 17), ("c", 2), ("d", 1)) for i in range(count) for j in range(3)]
    held = held_out_prompts(rows)
    by_family = {f: {_prompt_key(r["prompt"]) for r in rows if r["family"] == f} for f in "abcd"}
    # one in five of each family's prompts, at least one where there are two, never a family's only prompt
    assert [len(by_family[f] & held) for f in "abcd"] == [2, 3, 1, 0]
    assert held == held_out_prompts(list(reversed(rows)))  # the order of the rows does not matter
    assert [len(by_family[f] & held_out_prompts(rows, every=10)) for f in "abcd"] == [1, 1, 1, 0]


def test_export_holds_out_whole_prompts_of_every_family(finished):
    demo, records = finished
    read = lambda name: [json.loads(x) for x in demo.path(name).read_text().splitlines()]  # noqa: E731
    train, held = read("prefs_train.jsonl"), read("prefs_heldout.jsonl")
    key = lambda r: json.dumps(r["prompt"], sort_keys=True)  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in held}
    # 7 families x 2 prompts (v0's and v1's): one of each family's two is held out
    assert sorted({r["family"] for r in held}) == sorted({r["family"] for r in train}) and len(
        {key(r) for r in held}) == 7
    assert records["export"]["result"]["reward_heldout"] == len(held)
    # the reward model's training file: the training pairs, then comparisons with the demonstrations of the
    # training tasks (3 per family, one of them held out): none of a held-out prompt, as demonstration or as mismatch
    reward = read("prefs_reward.jsonl")
    assert reward[:len(train)] == train
    extra = reward[len(train):]
    assert len(extra) == records["export"]["result"]["reward_demonstrations"]
    kinds = {r["kind"] for r in extra}
    assert kinds == {"reference", "mismatched", "off_task"}
    assert not {key(r) for r in extra} & {key(r) for r in held}
    held_texts = {json.loads(key(r))[0]["content"] for r in held}
    references = {t["prompt"]: reference_messages(t)[-1]["content"] for t in resolve_prompts("tasks:train", 3)}
    only_held = ({ref for prompt, ref in references.items() if prompt in held_texts}
                 - {ref for prompt, ref in references.items() if prompt not in held_texts})  # a refusal is shared
    assert only_held and not {r[side][0]["content"] for r in extra for side in ("chosen", "rejected")} & only_held
    # one mismatch for each of the two training tasks of a family, unless their references are the same text
    # (two refusals of harmful requests)
    kept = [t for t in resolve_prompts("tasks:train", 3) if t["prompt"] not in held_texts]
    expected = sum(any(o["family"] == t["family"] and references[o["prompt"]] != references[t["prompt"]]
                       for o in kept) for t in kept)
    assert len(kept) == 14 and 10 <= expected <= 14
    assert sum(r["kind"] == "mismatched" for r in extra) == expected
    assert sum(r["kind"] == "off_task" for r in extra) == len(kept)  # one answer of another family each


def test_summary_says_which_policy_the_rlhf_run_kept(finished, capsys):
    from align.demo_summary import print_summary

    demo, records = finished
    table = summary(demo, records)
    table["rlhf"].update({"monitor/flagged": 1, "policy/kept_step": 3, "eval/gold_reward": 0.513,
                          "policy/dropped/gold_reward": 0.424, "kl": 0.0011,
                          "gold_curve": [(0, 0.5), (3, 0.513), (6, 0.49), (9, 0.45), (12, 0.424)], "gain_low": {}})
    print_summary(table)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("RLHF: "))
    assert "KL 0.0011 nats/token for the policy kept" in line and "FLAGGED the run" in line
    assert line.endswith("; v3 is the policy of step 3, its best gold evaluation (0.513), not of step 12 (0.424).")
    # keep_policy best_beyond_noise (the demo's): the summary says the kept step beat the start beyond noise...
    table["rlhf"]["gain_low"] = {"3": 0.004, "6": -0.01, "9": -0.05, "12": -0.08}
    print_summary(table)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("RLHF: "))
    assert line.endswith("; v3 is the policy of step 3, its best gold evaluation that beat the start beyond noise "
                         "(0.513), not of step 12 (0.424).")
    # ... or, when none did, that v3 is v2's policy, and how far the best evaluation was from beating it
    table["rlhf"].update({"policy/kept_step": 0, "eval/gold_reward": 0.5, "kl": 0.0})
    table["rlhf"]["gain_low"]["3"] = -0.021
    print_summary(table)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("RLHF: "))
    assert line.endswith("; v3 is the starting policy (v2): no evaluation beat it beyond noise (the best, step 3 at "
                         "0.513, has a 95% gain interval from -0.021, not above 0).")
    table["rlhf"]["gold_curve"] = [(0, 0.5), (3, 0.5), (6, 0.49), (9, 0.45), (12, 0.424)]  # none above the start
    table["rlhf"]["gain_low"]["3"] = 0.0
    print_summary(table)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("RLHF: "))
    assert line.endswith("(the best, step 3 at 0.500, is no higher than the start).")
    table["rlhf"]["policy/kept_step"] = 12  # the last policy was the best: nothing rolled back
    print_summary(table)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("RLHF: "))
    assert "at the last step" in line and "v3 is the policy" not in line
