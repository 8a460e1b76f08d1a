"""Aggregating votes into TRL-format rows: majority and agreement, ties and both-bad kept as such, filters,
and files that `datasets` loads."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from align.errors import AlignError
from align.store import (
    Verdict,
    add_responses,
    add_vote,
    aggregate,
    export_preferences,
    export_sft,
    export_unpaired,
    make_pairs,
    register_model_version,
    to_dataset,
    undo_last_vote,
    write_jsonl,
)
from align.store.pairs import get_pair
from tests.db import fill_store

T0 = datetime(2025, 3, 1, 9, 0, 0)


def test_aggregate():
    assert aggregate([("a", 2), ("a", 1), ("b", 1)]) == Verdict("a", 2 / 3, 1.5, 3)
    assert aggregate([("b", 2)]) == Verdict("b", 1.0, 2.0, 1)
    assert aggregate([("tie", 1), ("tie", 1), ("a", 2)]) == Verdict("tie", 2 / 3, 1.0, 3)
    # Even splits never become a win: a/b is a tie, anything level with both_bad is both_bad.
    assert aggregate([("a", 2), ("b", 2)]) == Verdict("tie", 0.5, 0.0, 2)
    assert aggregate([("a", 1), ("both_bad", 1)]).choice == "both_bad"
    assert aggregate([("a", 1), ("tie", 1)]).choice == "tie"


@pytest.fixture
def labeled(store):
    """Four pairs with hand-made votes: a 2-1 majority for b, a tie, a both-bad, and a 1-1 human split plus a
    simulated judge's vote; answered at T0 + minutes."""
    filled = fill_store(store, n_prompts=4, samples=2)
    pairs = make_pairs(store, filled["version_id"])
    votes = {
        pairs[0]: [("ann", "b", 2), ("bob", "b", 1), ("cat", "a", 1)],
        pairs[1]: [("ann", "tie", 1), ("bob", "tie", 1)],
        pairs[2]: [("ann", "both_bad", 1), ("bob", "both_bad", 2), ("cat", "tie", 1)],
        pairs[3]: [("ann", "a", 1), ("bob", "b", 1)],
    }
    minute = 0
    for pair_id, cast in votes.items():
        for annotator, choice, strength in cast:
            minute += 1
            add_vote(store, pair_id, annotator, choice, strength=strength, answered_at=T0 + timedelta(minutes=minute))
    add_vote(store, pairs[3], "judge", "a", source="sim:judge", answered_at=T0 + timedelta(minutes=60))
    return {"pairs": pairs, **filled}


def by_pair(rows):
    return {row["pair_id"]: row for row in rows}


def test_preference_rows(store, labeled):
    pairs = labeled["pairs"]
    rows = by_pair(export_preferences(store, source="human"))
    assert set(rows) == set(pairs)
    majority = rows[pairs[0]]
    shown = get_pair(store, pairs[0])
    assert majority["label"] == "chosen" and majority["n_votes"] == 3
    assert majority["label_agreement"] == pytest.approx(2 / 3) and majority["margin"] == 1.5
    assert majority["chosen"] == [{"role": "assistant", "content": shown["response_b"]["text"]}]
    assert majority["rejected"] == [{"role": "assistant", "content": shown["response_a"]["text"]}]
    assert majority["prompt"] == shown["prompt"] and majority["prompt"][0]["role"] == "user"
    assert majority["chosen_response_id"] == shown["response_b"]["id"]
    assert (majority["gen_chosen_logps"], majority["gen_chosen_sample_logps"]) == (-1.75, -0.875)
    assert majority["chosen_token_ids"][-1] == 2 and majority["family"] == "math"
    assert majority["gen_model_version"] == majority["gen_chosen_model_version"] == "v0"
    # Ties and both-bad stay what they are, with a and b in stored order.
    for pair_id, label in [(pairs[1], "tie"), (pairs[2], "both_bad"), (pairs[3], "tie")]:
        shown = get_pair(store, pair_id)
        assert rows[pair_id]["label"] == label
        assert rows[pair_id]["chosen"][0]["content"] == shown["response_a"]["text"]
        assert rows[pair_id]["rejected"][0]["content"] == shown["response_b"]["text"]
    assert rows[pairs[2]]["margin"] == 1.5 and rows[pairs[3]]["label_agreement"] == 0.5


def test_filters(store, labeled):
    pairs = labeled["pairs"]
    everyone = by_pair(export_preferences(store))
    assert everyone[pairs[3]]["label"] == "chosen" and everyone[pairs[3]]["n_votes"] == 3  # the judge decides
    simulated = export_preferences(store, source="simulated")
    assert [r["pair_id"] for r in simulated] == [pairs[3]] and simulated[0]["n_votes"] == 1
    assert set(by_pair(export_preferences(store, source="human", min_agreement=0.9))) == {pairs[1]}
    assert set(by_pair(export_preferences(store, source="human", min_agreement=0.6))) == set(pairs[:3])
    only_ann = by_pair(export_preferences(store, annotators=["ann"]))
    assert {r["n_votes"] for r in only_ann.values()} == {1} and only_ann[pairs[0]]["label"] == "chosen"
    # Votes 1-3 fall on pair 0; "until" is exclusive.
    window = export_preferences(store, since=T0, until=T0 + timedelta(minutes=3))
    assert [(r["pair_id"], r["n_votes"]) for r in window] == [(pairs[0], 2)]
    assert export_preferences(store, since=T0 + timedelta(days=1)) == []
    assert len(export_preferences(store, model_versions=["v0"])) == 4
    register_model_version(store, {"name": "v1", "base_model": "tiny", "adapter_hash": "v1"})
    assert export_preferences(store, model_versions=["v1"]) == []
    with pytest.raises(AlignError, match="unknown model version 'v7'"):
        export_preferences(store, model_versions=["v7"])


def test_undone_votes_do_not_count(store, labeled):
    pairs = labeled["pairs"]
    add_vote(store, pairs[3], "cat", "b", answered_at=T0 + timedelta(minutes=90))
    assert by_pair(export_preferences(store, source="human"))[pairs[3]]["label"] == "chosen"
    undo_last_vote(store, "cat")
    assert by_pair(export_preferences(store, source="human"))[pairs[3]]["label"] == "tie"


def test_cross_version_pair(store):
    filled = fill_store(store, n_prompts=1, samples=1)
    newer = register_model_version(store, {"name": "v1", "base_model": "tiny", "adapter_hash": "v1", "parent": "v0"})
    add_responses(store, [dict(filled["rows"][0], model_version_id=newer, text="from v1")])
    (pair,) = make_pairs(store, rule="all_pairs")
    shown = get_pair(store, pair)
    add_vote(store, pair, "ann", "b" if shown["response_b"]["text"] == "from v1" else "a")
    (row,) = export_preferences(store)
    assert row["gen_model_version"] is None
    assert (row["gen_chosen_model_version"], row["gen_rejected_model_version"]) == ("v1", "v0")
    assert export_preferences(store, model_versions=["v1"]) == []
    assert len(export_preferences(store, model_versions=["v0", "v1"])) == 1


def test_sft_and_unpaired(store, labeled):
    pairs = labeled["pairs"]
    sft = export_sft(store, source="human")
    chosen = export_preferences(store, source="human")[0]["chosen"]
    assert sft == [{"messages": get_pair(store, pairs[0])["prompt"] + chosen}]
    unpaired = export_unpaired(store, source="human")
    # pair 0 (decided): True + False; pair 2 (both bad): False + False; ties give nothing.
    assert [row["label"] for row in unpaired] == [True, False, False, False]
    assert unpaired[0]["completion"] == chosen and unpaired[0]["prompt"][0]["role"] == "user"


def test_jsonl_loads_with_datasets(store, labeled, tmp_path):
    import datasets  # slow to import: only here

    rows = export_preferences(store)
    path = write_jsonl(rows, tmp_path / "out" / "prefs.jsonl")
    assert [p.name for p in path.parent.iterdir()] == ["prefs.jsonl"]  # no temp file left behind
    loaded = datasets.load_dataset("json", data_files=str(path), split="train")
    assert len(loaded) == 4 and "tie" in loaded["label"] and "both_bad" in loaded["label"]
    assert loaded[0]["chosen"] == rows[0]["chosen"] and loaded[0]["gold"] == rows[0]["gold"]
    for name, export in [("sft", export_sft), ("kto", export_unpaired)]:
        written = write_jsonl(export(store), tmp_path / f"{name}.jsonl")
        assert len(datasets.load_dataset("json", data_files=str(written), split="train")) == len(export(store))
    assert to_dataset(rows).num_rows == 4
    write_jsonl(rows[:1], path)  # overwrites atomically
    assert len(path.read_text().splitlines()) == 1


def test_export_takes_complete_pairs_unless_asked_for_all(store, store_url, labeled, tmp_path, capsys):
    """Pair 1 has 2 of its 3 votes: `align export` leaves it out by default; --incomplete keeps it."""
    import json

    from align.commands.export import main as export_main

    assert len(export_preferences(store)) == 4
    complete = export_preferences(store, complete_only=True)
    assert sorted(r["n_votes"] for r in complete) == [3, 3, 3] and labeled["pairs"][1] not in {r["pair_id"] for r in complete}
    out = tmp_path / "prefs.jsonl"
    export_main(["--db", store_url, "--out", str(out)])
    assert [json.loads(line)["pair_id"] for line in out.read_text().splitlines()] == [r["pair_id"] for r in complete]
    export_main(["--db", store_url, "--out", str(out), "--incomplete"])
    assert len(out.read_text().splitlines()) == 4
    with pytest.raises(AlignError, match="all the votes it requires \\(--incomplete: every pair\\)"):
        export_main(["--db", store_url, "--out", str(out), "--annotators", "ann"])


def test_trl_format_keeps_decided_pairs_only_and_trains_in_plain_trl(store, store_url, labeled, tmp_path, capsys,
                                                                    tiny_model_dir):
    """`align export --format trl`: ties and both-bad pairs are left out and counted, so TRL's own DPOTrainer (which
    reads every row as a win) trains on decided pairs only; the native export keeps all four."""
    import json

    from align.commands.export import main as export_main

    out = tmp_path / "trl.jsonl"
    export_main(["--db", store_url, "--out", str(out), "--format", "trl", "--incomplete"])
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    native = by_pair(export_preferences(store))
    decided = [r for r in native.values() if r["label"] == "chosen"]
    assert len(native) == 4 and len(rows) == len(decided) == 2
    assert printed.strip().endswith("left out 1 tie(s) and 1 both-bad pair(s)")
    assert [set(r) for r in rows] == [{"prompt", "chosen", "rejected"}] * 2
    assert sorted(r["chosen"][0]["content"] for r in rows) == sorted(r["chosen"][0]["content"] for r in decided)
    with pytest.raises(AlignError, match="applies to --kind preferences"):
        export_main(["--db", store_url, "--out", str(out), "--format", "trl", "--kind", "sft"])

    # Plain TRL reads it as a conversational preference dataset: one step of its DPOTrainer on it.
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), processing_class=tokenizer,
                         train_dataset=ds,
                         args=DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=2,
                                        report_to="none", save_strategy="no", logging_steps=1, bf16=False))
    assert trainer.train().global_step == 1


def test_exported_rows_become_typed_pairs_field_for_field(store, labeled):
    """align.preference.PreferencePair names its fields after the export's columns: every exported value lands in
    the field of the same name (weight and gen_logps_by_version come from later steps, not from the export)."""
    from dataclasses import fields

    from align.preference import PreferencePair, validate_row

    for i, row in enumerate(export_preferences(store, source="human")):
        pair = validate_row(row, f"export:{i + 1}")
        names = {f.name for f in fields(PreferencePair)} - {"where"}
        assert names - set(row) == {"weight", "gen_logps_by_version"}
        for name in names & set(row) - {"chosen", "rejected"}:
            assert getattr(pair, name) == row[name], name
        assert (pair.chosen, pair.rejected) == (row["chosen"][0]["content"], row["rejected"][0]["content"])
        assert pair.text("chosen") == pair.chosen and pair.token_ids("rejected") == row["rejected_token_ids"]
