"""align eval / align report end to end on tiny models: report.json values, files, bad input, run reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from align.errors import AlignError
from tests.helpers import build_fixture_report, hash_embed


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    return build_fixture_report(tmp_path_factory, tiny_model_dir)


def test_eval_report_values(built):
    html, report, url, models = built
    out = html.parent
    assert {p.name for p in out.iterdir()} >= {"report.html", "report.json", "summary.md"}
    names = [v["name"] for v in report["versions"]]
    assert len(names) == 2 and all(v["samples"] == 6 for v in report["versions"])
    pairs = {(p["a"], p["b"]): p for p in report["win_rates"]["gold"]["pairs"]}
    a, b = names
    for p in pairs.values():
        assert 0 <= p["low"] <= p["win_rate"] <= p["high"] <= 1 and p["n"] == 6
    assert pairs[(a, b)]["win_rate"] + pairs[(b, a)]["win_rate"] == pytest.approx(1.0)
    gold = report["scores"]["gold"]
    families = set(report["prompts"]["families"])
    assert len(families) == 6
    for name in names:
        assert set(gold[name]["per_family"]) == families
        assert all(0 <= v <= 1 for v in gold[name]["per_family"].values())
    kl = report["kl"]["per_version"]
    assert report["kl"]["reference"] == a
    assert abs(kl[a]["kl"]) < 1e-4  # the reference re-scored under itself
    assert np.isfinite(kl[b]["kl"])
    assert set(report["lengths"]) == set(names) and report["lengths"][a]["n"] == 6
    assert report["bradley_terry"]["gold"]["versions"] == names
    assert report["side_by_side"] and report["side_by_side"][0]["a"] == a
    failures = report["failures"]
    assert sum(v["failures"] for v in failures["by_family"].values()) == failures["n"]
    if failures["n"] >= 4:
        assert sum(c["size"] for c in failures["clusters"]) == failures["n"]
    # Optional sections the fixture lacks are omitted with a reason, not a crash.
    for key in ("human_votes", "training", "weights", "monitor", "reward_model_accuracy"):
        assert key in report["notes"]
    page = html.read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count("data:image/png;base64,") >= 4



def test_each_distinct_answer_is_judged_once():
    """Versions that give the same answer share one judge call for it, and so get exactly the same score."""
    from align.judges import GoldJudge
    from align.prompts import resolve_prompts
    from align.report.compare import _judge_all

    calls = []

    class Counting(GoldJudge):
        def score(self, prompts, texts):
            calls.append(list(texts))
            return super().score(prompts, texts)

    rows = [r for r in resolve_prompts("tasks:eval", per_family=1) if r["family"] == "keyword"]
    prompts = {7: rows[0]}
    word = rows[0]["gold"]["keyword"]
    samples = {"a": {7: [{"text": f"It is {word}."}, {"text": "No."}]},
               "b": {7: [{"text": "No."}, {"text": f"It is {word}."}]}}
    scores = _judge_all(Counting(), prompts, [7], samples)
    assert calls == [[f"It is {word}.", "No."]]
    assert scores == {"a": {7: [1.0, 0.0]}, "b": {7: [0.0, 1.0]}}


def test_kl_scores_each_distinct_answer_once_under_the_reference(built, monkeypatch):
    """Two versions with the same answers: the reference re-scores them once, and both get the same estimate."""
    import align.report.sections as sections
    from align import store as st
    from align.generation import SamplingSettings
    from align.prompts import resolve_prompts
    from align.report.compare import load_prompts, load_samples
    from align.store.versions import find_version

    _, report, url, models = built
    scored = []
    real = sections.score_completions

    def counted(model, prompt_ids, completions, *args, **kwargs):
        scored.extend(completions)
        return real(model, prompt_ids, completions, *args, **kwargs)

    monkeypatch.setattr(sections, "score_completions", counted)
    settings = SamplingSettings(temperature=1.0, max_new_tokens=12, seed=0)
    with st.connect(url) as store:
        ids = list(dict.fromkeys(st.add_prompts(store, resolve_prompts("tasks:eval", per_family=1, limit=6))))
        a, b = (find_version(store, v["name"]) for v in report["versions"])
        own = load_samples(store, b.id, ids, 1, settings)
        kl = sections.kl_to_reference(a, [b, a], load_prompts(store, ids), {a.name: own, b.name: own}, settings,
                                      n_boot=50)
    assert len(scored) == len({tuple(c) for c in scored}) == 6  # b's six answers, once: a's row reuses them
    assert kl["per_version"][a.name] == kl["per_version"][b.name]
    assert kl["per_version"][b.name]["kl"] == pytest.approx(report["kl"]["per_version"][b.name]["kl"], abs=1e-6)

def test_eval_samples_are_stored_with_provenance(built):
    from sqlalchemy import func, select

    from align import store as st

    _, report, url, _ = built
    with st.connect(url) as store, store.read() as session:
        n, with_logps = session.execute(select(func.count(st.Response.id), func.count(st.Response.logp))).one()
    assert n == with_logps == 12


def test_unknown_version_lists_known_versions(built, tmp_path, capsys):
    from align.commands import main

    _, report, url, _ = built
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say hi.", "family": "arithmetic",
                                   "gold": {"a": 1, "b": 1, "op": "+", "answer": 2}}) + "\n")
    code = main(["eval", "--models", "no-such-version", "--prompts", str(prompts), "--db", url,
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown model version 'no-such-version'" in err
    assert report["versions"][0]["name"] in err  # the known versions are listed


def test_eval_engine_vllm_without_vllm_is_one_line_before_anything_is_stored(built, tmp_path, capsys, monkeypatch):
    """`align eval --engine vllm` where vLLM cannot run (here: not installed, or no CUDA): the one line
    `align generate --engine vllm` prints, exit 2, no prompt stored; with vLLM usable the option reaches the sampler."""
    from sqlalchemy import func, select

    from align import store as st
    from align.commands import main
    from align.generation import vllm_missing
    from align.report import compare

    _, report, url, _ = built
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "A prompt only this test uses.", "family": "arithmetic",
                                   "gold": {"a": 1, "b": 1, "op": "+", "answer": 2}}) + "\n")
    with st.connect(url) as store, store.read() as session:
        before = session.execute(select(func.count(st.Prompt.id))).scalar()
    argv = ["eval", "--models", report["versions"][0]["name"], "--prompts", str(prompts), "--db", url,
            "--out", str(tmp_path / "out"), "--engine", "vllm", "--no_clusters"]
    missing = vllm_missing()
    if missing:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and missing in err and err.count("\n") == 1 and "Traceback" not in err
        with st.connect(url) as store, store.read() as session:
            assert session.execute(select(func.count(st.Prompt.id))).scalar() == before
        assert not (tmp_path / "out").exists()
        # Past the up-front check, the option reaches the sampler: its vLLM engine refuses with the same line.
        monkeypatch.setattr(compare, "vllm_missing", lambda: None)
        assert main(argv) == 2 and missing in capsys.readouterr().err


def test_empty_prompt_set_is_an_error(tmp_path, built):
    from align import store as st
    from align.prompts import resolve_prompts
    from align.report.compare import EvalSpec, run_eval

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(AlignError, match="empty"):
        resolve_prompts(str(empty))
    with st.connect(built[2]) as store, pytest.raises(AlignError, match="prompt set is empty"):
        run_eval(store, EvalSpec(models=built[3], prompt_rows=[]))


def test_gold_judge_names_the_family_it_cannot_score(built):
    from align import store as st
    from align.report.compare import EvalSpec, run_eval

    rows = [{"prompt": "Write a haiku about rain.", "family": "poetry", "gold": {}}]
    with st.connect(built[2]) as store, pytest.raises(AlignError, match="'poetry'"):
        run_eval(store, EvalSpec(models=built[3], prompt_rows=rows, judges=["gold"]))


def test_judge_option_parsing():
    from align.commands.eval import parse_judge

    assert parse_judge("gold", None) == (["gold"], None)
    assert parse_judge("reward:runs/rm", None) == (["reward"], "runs/rm")
    assert parse_judge("both", "runs/rm") == (["gold", "reward"], "runs/rm")
    with pytest.raises(AlignError, match="reward-model run directory"):
        parse_judge("both", None)
    with pytest.raises(AlignError, match="unknown --judge"):
        parse_judge("vibes", None)


def test_human_votes_between_compared_versions(store):
    from align.report.sections import human_votes
    from align.store import add_vote, get_model_version, make_pairs
    from tests.db import fill_store

    fill_store(store, n_prompts=3, samples=1, version="v0")
    fill_store(store, n_prompts=3, samples=1, version="v1")
    versions = [get_model_version(store, "v0"), get_model_version(store, "v1")]
    pair_ids = make_pairs(store, None, rule="all_pairs")
    assert len(pair_ids) == 3
    for pair_id, choice in zip(pair_ids, ("a", "tie", "both_bad")):
        add_vote(store, pair_id, "ann", choice)
    section = human_votes(store, versions, n_boot=100, seed=0)
    [row] = section["pairs"]
    assert (row["a"], row["b"]) == ("v0", "v1")  # response a of each pair is v0's (stored first)
    assert row["win_rate"] == pytest.approx((1 + 0.5 + 0.5) / 3) and row["both_bad"] == 1


def test_clusters_group_failures():
    from align.report.clusters import by_embedding, by_family

    items = [{"version": "v", "family": "json" if i < 5 else "arithmetic", "prompt": "p", "reward": 0.0,
              "response": "{{{{ broken json" if i < 5 else "12345 67890"} for i in range(10)]
    groups = by_embedding(items, hash_embed, seed=0)
    assert sum(g["size"] for g in groups) == 10 and len(groups) >= 2
    assert any(set(g["families"]) == {"json"} for g in groups)
    assert by_embedding(items[:2], hash_embed) == "2 failure(s): too few to cluster"
    fam = by_family(items, {"json": 5, "arithmetic": 10})
    assert fam["json"]["rate"] == 1.0 and fam["arithmetic"]["rate"] == 0.5


def _fake_run(root: Path, name: str, parent: str, with_extras: bool) -> Path:
    run = root / name
    (run / "adapter").mkdir(parents=True)
    (run / "version.json").write_text(json.dumps({
        "name": name, "method": "dpo", "base_model": "tiny", "parent": parent, "parent_spec": parent,
        "adapter_path": str(run / "adapter"), "config": {"learning_rate": 1e-4, "max_steps": 4},
        "metrics": {"loss": 0.5, "rewards/margins": 0.2}}))
    if with_extras:
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 1.0 / s, "rewards/margins": 0.1 * s, "epoch": 0.1 * s}) + "\n"
            for s in range(1, 5)))
        (run / "weights.json").write_text(json.dumps({"diagnostics": {
            "scheme": "sequence", "weights/n": 4, "weights/ess_frac": 0.05, "weights/ess_frac/v0": 0.05,
            "weights/share/v0": 1.0, "data/share/v0": 1.0, "warning": "overall ESS/N = 0.050 < 0.1",
            "weights/log_hist": {"edges": [-1.0, 0.0, 1.0], "counts": [1, 3]}}}))
        (run / "monitor.json").write_text(json.dumps({  # the shape align.monitor writes
            "flagged": True, "flags": [{"step": 3, "reason": "proxy reward up, gold down"}],
            "evaluations": [{"step": s, "proxy": 0.1 * s, "gold": 1 - 0.1 * s} for s in (1, 2, 3)],
            "top_samples": [{"step": 3, "prompt": [{"role": "user", "content": "Say hi"}], "completion": "HI!!!",
                             "reward": 3.0, "completion_ids": None}], "config": {"monitor_window": 3}}))
    return run


def test_runs_report(tmp_path):
    from align.commands.report import build_runs_report
    from align.report import write_report

    first = _fake_run(tmp_path, "v1-dpo", "smollm2-135m-instruct", with_extras=True)
    second = _fake_run(tmp_path, "v2-dpo", str(first), with_extras=False)
    report = build_runs_report([str(first), str(second)])
    assert set(report["training"]) == {"v1-dpo"} and report["training"]["v1-dpo"]["loss"][0] == [1, 1.0]
    assert report["weights"]["v1-dpo"]["weights/ess_frac"] == 0.05
    assert "proxy reward up, gold down" in report["monitor"]["v1-dpo"]["flags"][0]
    assert [c["name"] for c in report["lineage"]["v2-dpo"]] == ["v2-dpo", "v1-dpo", "smollm2-135m-instruct"]
    html = write_report(report, tmp_path / "out").read_text()
    assert "proxy reward up, gold down (step=3)" in html and "ESS/N" in html and "HI!!!" in html
    with pytest.raises(AlignError, match="no version.json"):
        build_runs_report([str(tmp_path / "missing")])


def test_both_judges_with_a_tiny_reward_model(built, tiny_model_dir, tmp_path, monkeypatch):
    """judge "both": reward-model scores and win rates beside gold, and its accuracy on held-out pairs."""
    from align import store as st
    from align.generation import SamplingSettings
    from align.prompts import resolve_prompts
    from align.report.compare import EvalSpec, run_eval
    from align.trainers.reward import train_reward
    from tests.helpers import load_tokenizer, pair_rows, reward_configs, write_pairs

    rows = pair_rows(load_tokenizer(tiny_model_dir), n=8)
    data = write_pairs(tmp_path / "pairs.jsonl", rows)
    run = train_reward(*reward_configs(tiny_model_dir, data, data, tmp_path / "rm"))
    spec = EvalSpec(models=built[3], prompt_rows=resolve_prompts("tasks:eval", per_family=1, limit=6),
                    judges=["gold", "reward"], reward_model=str(run), n_boot=100,
                    heldout_pairs=[{**r, "family": "x" if i < 2 else "y"} for i, r in enumerate(rows[:6])],
                    settings=SamplingSettings(temperature=1.0, max_new_tokens=12, seed=0))
    with st.connect(built[2]) as store:  # the samples are already stored: nothing is generated again
        report = run_eval(store, spec, embed=None)
    import align.models
    from align.judges import RewardJudge

    monkeypatch.setattr(align.models, "inference_device", lambda: "meta")  # a device this CPU has: no weights
    assert next(RewardJudge(str(run)).model.parameters()).device.type == "meta"  # the judge goes where models go
    assert set(report["win_rates"]) == {"gold", "reward"}
    pairs = report["win_rates"]["reward"]["pairs"]
    assert pairs[0]["win_rate"] + pairs[1]["win_rate"] == pytest.approx(1.0)
    acc = report["reward_model_accuracy"]
    assert acc["n"] == 6 and 0 <= acc["accuracy"] <= 1 and acc["source"] == "file"
    assert acc["prompts"] == len({json.dumps(r["prompt"], sort_keys=True) for r in rows[:6]})
    families = acc["by_family"]
    assert {f: v["n"] for f, v in families.items()} == {"x": 2, "y": 4}
    assert sum(v["n"] * v["accuracy"] for v in families.values()) / 6 == pytest.approx(acc["accuracy"])
    assert acc["low"] <= acc["accuracy"] <= acc["high"]
    assert report["failures"]["clusters_note"] == "embedding clusters were turned off"


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, tmp_path_factory):
    """A tiny DPO run that evaluates every step: its run directory."""
    from align.trainers.dpo import train_dpo
    from tests.helpers import dpo_configs as configs, load_tokenizer, pair_rows, write_pairs

    root = tmp_path_factory.mktemp("dpo-run")
    tokenizer = load_tokenizer(tiny_model_dir)
    files = (write_pairs(root / "train.jsonl", pair_rows(tokenizer, n=8)),
             write_pairs(root / "eval.jsonl", pair_rows(tokenizer, 4, offset=50)))
    return train_dpo(*configs(tiny_model_dir, files, root / "v1-dpo", max_steps=3, eval_steps=1))



def test_eval_loads_each_version_once(dpo_run, tiny_model_dir, tmp_path, monkeypatch):
    """Sampling, KL, drift and token credit all need v1-dpo and its parent: each is loaded (and merged) once."""
    import align.models
    from align import store as st
    from align.data import read_jsonl
    from align.generation import SamplingSettings
    from align.prompts import resolve_prompts
    from align.report.compare import EvalSpec, run_eval

    loads, devices = [], []
    real = align.models._load_model

    def counted(resolved, args, device):
        loads.append((resolved.path, resolved.adapters))
        devices.append(device)
        return real(resolved, args, device)

    monkeypatch.setattr(align.models, "_load_model", counted)
    monkeypatch.setattr(align.models, "inference_device", lambda: "cpu")  # what a GPU machine's would be: cuda:0
    rows = resolve_prompts("tasks:eval", per_family=1, limit=4)
    spec = EvalSpec(models=[str(tiny_model_dir), str(dpo_run)], prompt_rows=rows, judges=["gold"], n=1,
                    settings=SamplingSettings(temperature=1.0, max_new_tokens=8, seed=0), n_boot=50, credit_pairs=2,
                    heldout_pairs=read_jsonl(dpo_run.parent / "eval.jsonl"))
    with st.connect(f"sqlite:///{tmp_path / 'store.db'}") as store:
        report = run_eval(store, spec, embed=None)
    # the sections that load both models again ran: KL re-scores under the parent, credit needs both
    assert len(report["kl"]["per_version"]) == 2
    assert report["credit"]["per_version"]["v1-dpo"]["reference"] == str(tiny_model_dir)
    assert len(report["credit"]["per_version"]["v1-dpo"]["pairs"]) == 2
    assert sorted(loads) == sorted({(str(tiny_model_dir), ()), (str(tiny_model_dir), (str(dpo_run / "adapter"),))})
    assert len(loads) == 2 and devices == ["cpu", "cpu"]  # every version on the inference device

def test_runs_report_shows_the_overfitting_gap(dpo_run, tmp_path):
    from align.commands.report import build_runs_report
    from align.report import write_report
    from align.runs import read_metrics

    rows = read_metrics(dpo_run / "metrics.jsonl")
    report = build_runs_report([str(dpo_run)])
    gaps = report["overfit"]["v1-dpo"]["evaluations"]
    assert [g["step"] for g in gaps] == [1, 2, 3]
    for gap, step in zip(gaps, (1, 2, 3)):
        train_loss = next(r["loss"] for r in rows if r["step"] == step and "loss" in r)  # logged every step
        eval_loss = next(r["eval_loss"] for r in rows if r["step"] == step and "eval_loss" in r)
        assert gap["train_loss"] == pytest.approx(train_loss) and gap["eval_gap"] == pytest.approx(eval_loss - train_loss)
    assert "eval_gap" in report["training"]["v1-dpo"]
    html = write_report(report, tmp_path / "out").read_text()
    assert "Overfitting alarm: held-out against training loss" in html and f"{gaps[-1]['eval_gap']:.3f}" in html
    # Stage interference, as the run recorded it, with its before/after table
    recorded = json.loads((dpo_run / "interference.json").read_text())
    assert report["interference"]["v1-dpo"]["before"] == recorded["before"]
    assert f"{recorded['after']['sft_loss'] - recorded['before']['sft_loss']:.3f}" in html
    assert "held-out SFT loss" in html


def test_runs_report_token_credit_against_the_parent(dpo_run, tiny_model_dir, tmp_path):
    """align report RUN: tokens of pairs from the run's own data, coloured by log π_run − log π_parent."""
    from align.config import ModelArgs
    from align.data import as_messages, prompt_ids, read_jsonl
    from align.commands.report import build_runs_report
    from align.models import load_model
    from align.report import write_report
    from tests.helpers import completion_logps_by_hand as _by_hand

    report = build_runs_report([str(dpo_run)], credit_pairs=2)
    credit = report["credit"]["per_version"]["v1-dpo"]
    assert credit["beta"] == 0.1 and credit["reference"] == str(tiny_model_dir.resolve()) and len(credit["pairs"]) == 2
    policy, tokenizer = load_model(ModelArgs(model=str(dpo_run)))
    reference, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    rows = {r["prompt"][0]["content"]: r for r in read_jsonl(dpo_run.parent / "eval.jsonl")}  # eval_file first
    pair = credit["pairs"][0]
    row = rows[pair["prompt"]]
    prompt = prompt_ids(tokenizer, as_messages(row["prompt"]))
    ids = row["chosen_token_ids"]
    expected = [p - r for p, r in zip(_by_hand(policy.eval(), prompt, ids), _by_hand(reference.eval(), prompt, ids))]
    assert pair["chosen"]["log_ratio"] == pytest.approx(expected, abs=1e-4)
    assert pair["margin"] == pytest.approx(0.1 * (pair["chosen"]["sum"] - pair["rejected"]["sum"]))
    html = write_report(report, tmp_path / "out").read_text()
    assert "Token-level credit" in html and f"{pair['margin']:+.4f}" in html
