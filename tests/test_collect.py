"""The data half end to end on a tiny model: generate into the store, simulate votes, export, rescore."""

import json
from pathlib import Path

import pytest

from align import store as st
from align.errors import DataError
from align.judges import GoldJudge
from align.prompts import read_prompts
from align.sampling import generate_to_store, rescore
from align.simulate import simulate
from align.tasks import score_response
from tests.helpers import SETTINGS, run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_generate_store_simulate_export_rescore(store, tiny_model_dir, task_rows, tmp_path):
    summary = generate_to_store(store, str(tiny_model_dir), task_rows, 4, SETTINGS, batch_size=8)
    assert summary["generated"] == 16 and summary["skipped"] == 0 and summary["pairs"] == 8

    again = generate_to_store(store, str(tiny_model_dir), task_rows, 4, SETTINGS, batch_size=8)
    assert again["generated"] == 0 and again["skipped"] == 16 and again["pairs"] == 8  # nothing duplicated

    counts = simulate(store, GoldJudge(temperature=0.01, tie_threshold=0.05), annotators=3)
    assert counts == {"votes": 24, "skipped_no_gold": 0, "pairs": 8}
    assert simulate(store, GoldJudge(temperature=0.01), annotators=3)["votes"] == 0  # idempotent

    rows = st.export_preferences(store)
    assert len(rows) == 8
    for row in rows:
        gold = json.loads(row["gold"])
        r_chosen = score_response(row["family"], row["chosen"][0]["content"], gold)
        r_rejected = score_response(row["family"], row["rejected"][0]["content"], gold)
        if row["label"] == "chosen":  # a near-deterministic judge prefers the higher gold reward
            assert r_chosen > r_rejected
        else:
            assert row["label"] in ("tie", "both_bad")
        assert len(row["chosen_token_ids"]) >= 1 and row["gen_model_version"] == str(tiny_model_dir)
        assert row["gen_chosen_logps"] < 0

    report = rescore(store, sample=10)
    (entry,) = report.values()
    assert entry["checked"] == 10 and entry["max_abs_diff_logp"] < 1e-3 and entry["max_abs_diff_sample_logp"] < 1e-3


def test_interrupted_generation_resumes_to_the_same_store(store, tiny_model_dir, task_rows, monkeypatch, tmp_path):
    """A crash after the first committed batch leaves a consistent store; the re-run completes it exactly."""
    calls = {"n": 0}
    real_add = st.add_responses

    def crash_on_second(store_, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_add(store_, rows)

    monkeypatch.setattr(st, "add_responses", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        generate_to_store(store, str(tiny_model_dir), task_rows, 2, SETTINGS, batch_size=4, pair_rule=None)
    monkeypatch.setattr(st, "add_responses", real_add)
    with store.read() as session:
        assert session.query(st.Response).count() == 4  # exactly the first batch (2 prompts x 2 samples)

    summary = generate_to_store(store, str(tiny_model_dir), task_rows, 2, SETTINGS, batch_size=4, pair_rule=None)
    assert summary == {"version": str(tiny_model_dir), "prompts": 4, "generated": 4, "skipped": 4, "pairs": 0}

    fresh = st.connect(f"sqlite:///{tmp_path / 'fresh.db'}")
    generate_to_store(fresh, str(tiny_model_dir), task_rows, 2, SETTINGS, batch_size=4, pair_rule=None)
    with store.read() as a, fresh.read() as b:
        assert sorted(r.text for r in a.query(st.Response)) == sorted(r.text for r in b.query(st.Response))
    fresh.close()


def test_training_run_registers_with_its_lineage(store, tiny_model_dir, tmp_path):
    from align.store.versions import ensure_registered

    run = tmp_path / "v1"
    run.mkdir()
    (run / "adapter").mkdir()
    version = {"name": "v1", "method": "sft", "base_model": str(tiny_model_dir), "parent": str(tiny_model_dir),
               "parent_spec": str(tiny_model_dir), "adapter_hash": "abc", "adapter_path": str(run / "adapter")}
    (run / "version.json").write_text(json.dumps(version))
    version_id, name = ensure_registered(store, str(run))
    assert name == "v1"
    stored = st.get_model_version(store, "v1")
    parent = st.get_model_version(store, str(tiny_model_dir))
    assert stored.id == version_id and stored.parent_id == parent.id and parent.method == "base"
    assert ensure_registered(store, "v1") == (version_id, "v1")  # by name, once registered


def test_bad_prompt_file_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": ""}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: needs a non-empty .prompt."):
        read_prompts(path)
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    code, _, err = run_cli("generate", "--model", "x", "--prompts", str(path), "--db", f"sqlite:///{tmp_path / 's.db'}")
    assert code == 2 and "p.jsonl:2: malformed JSON" in err


def test_export_cli_writes_a_loadable_dataset(store_url, tiny_model_dir, task_rows, tmp_path):
    import datasets

    with st.connect(store_url) as store:
        generate_to_store(store, str(tiny_model_dir), task_rows, 2, SETTINGS, batch_size=8)
        simulate(store, GoldJudge(), annotators=1)
    out = tmp_path / "prefs.jsonl"
    code, stdout, err = run_cli("export", "--db", store_url, "--out", str(out), "--incomplete")  # 1 of 3 votes
    assert code == 0, err
    assert "wrote 4 preferences rows" in stdout
    loaded = datasets.load_dataset("json", data_files=str(out), split="train")
    assert len(loaded) == 4 and {"prompt", "chosen", "rejected", "label", "gen_chosen_logps"} <= set(loaded.column_names)


def test_generate_cli_takes_a_balanced_subset_of_the_task_suite(store_url, tiny_model_dir):
    from sqlalchemy import select

    from align.commands.generate import main as generate
    from align.store import Prompt

    generate(["--model", str(tiny_model_dir), "--prompts", "tasks:train", "--per_family", "2", "--limit", "12",
                   "--n", "2", "--max_new_tokens", "3", "--db", store_url])
    with st.connect(store_url) as store, store.read() as session:
        families = list(session.scalars(select(Prompt.family)))
    # 7 families x 2 prompts, cut to the first 12 in suite order: 2 of each of the first 6 families.
    assert len(families) == 12 and sorted({families.count(f) for f in set(families)}) == [2] and len(set(families)) == 6
