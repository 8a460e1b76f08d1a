"""Nothing trains on the wrong thing: templated text, unknown roles, non-boolean labels, empty or identical
responses. Every refusal names the file (or dataset) and the 1-based row; drops are counted in the log and the run
record. Memory stays bounded on an over-long line."""

import json
import logging
import subprocess
import sys

import pytest

from align.data import load_sft, open_source
from align.errors import DataError
from align.preference import load_preferences, tokenize_pairs
from tests.helpers import bot, load_tokenizer, run_pairs, user, version, write

GOOD = {"prompt": "Q", "chosen": "yes", "rejected": "no"}


def test_templated_prompt_is_refused_not_templated_twice(tiny_model_dir, tmp_path):
    templated = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    path = write(tmp_path / "p.jsonl", [GOOD, dict(GOOD, prompt=templated)])
    pset = load_preferences(path)
    with pytest.raises(DataError, match=r"p.jsonl:2: 'prompt message 1' already holds the chat-template marker "
                                        r"'<\|im_start\|>'.*pass the plain text"):
        tokenize_pairs(pset, load_tokenizer(tiny_model_dir), 96, 64)
    sft = write(tmp_path / "s.csv", [{"prompt": "Q", "completion": "A"}, {"prompt": templated, "completion": "A"}])
    with pytest.raises(DataError, match=r"s.csv: row 2: 'user message 1' already holds"):
        run_pairs  # noqa: B018 - keep the import used by the other tests
        from align.trainers.sft import build_dataset

        build_dataset(load_sft(open_source(str(sft))), load_tokenizer(tiny_model_dir), 64)


@pytest.mark.parametrize("bad, pattern", [
    ({"prompt": [{"role": "human", "content": "Q"}]}, r"p.jsonl:2: message 1 of 'prompt' has role 'human'"),
    ({"chosen": [{"role": "gpt", "content": "yes"}]}, r"p.jsonl:2: 'chosen' has role 'gpt'"),
    ({"label": False}, r"p.jsonl:2: label False is not one of chosen, tie, both_bad"),
    ({"label": 0}, r"p.jsonl:2: label 0 is not one of"),
    ({"label": "yes"}, r"p.jsonl:2: label 'yes' is not one of"),
])
def test_pair_refusals_name_the_row(bad, pattern, tmp_path):
    conversational = {"prompt": [user("Q")], "chosen": [bot("yes")], "rejected": [bot("no")]}
    path = write(tmp_path / "p.jsonl", [conversational, dict(conversational, **bad)])
    with pytest.raises(DataError, match=pattern):
        load_preferences(path)


@pytest.mark.parametrize("rows, pattern", [
    ([{"messages": [user("Q"), bot("A")]}, {"messages": [{"role": "human", "content": "Q"}, bot("A")]}],
     r"s.jsonl:2: message 1 of 'messages' has role 'human'"),
    ([{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
      {"conversations": [{"from": "robot", "value": "Q"}, {"from": "gpt", "value": "A"}]}],
     r"s.jsonl:2: conversations turn 0 is from 'robot'"),
    ([{"prompt": "Q", "completion": "A", "label": True}, {"prompt": "Q", "completion": "A", "label": 1}],
     r"s.jsonl:2: label 1 must be true or false"),
])
def test_sft_refusals_name_the_row(rows, pattern, tmp_path):
    with pytest.raises(DataError, match=pattern):
        load_sft(open_source(str(write(tmp_path / "s.jsonl", rows))))


def test_refusal_in_a_hub_style_dataset_names_dataset_and_row(tmp_path):
    import datasets

    rows = [GOOD, GOOD, dict(GOOD, prompt=[{"role": "human", "content": "Q"}])]
    datasets.Dataset.from_list([dict(r, prompt=r["prompt"] if isinstance(r["prompt"], list) else [user("Q")])
                                for r in rows]).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"saved: row 3: message 1 of 'prompt' has role 'human'"):
        load_preferences(str(tmp_path / "saved"))


def test_empty_and_identical_responses_dropped_and_counted(tiny_model_dir, tmp_path, caplog):
    rows = [GOOD, dict(GOOD, chosen="  "), dict(GOOD, rejected=""), dict(GOOD, rejected="yes"), dict(GOOD, chosen="a")]
    path = write(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        pset = load_preferences(path)
    assert [r.chosen for r in pset.rows] == ["yes", "a"]
    assert pset.dropped == {"empty_responses": 2, "identical_pairs": 1}
    assert "dropped 2 pair(s) with empty responses, 1 pair(s) with identical pairs" in caplog.text
    record = version(run_pairs("dpo", tiny_model_dir, tmp_path / "run", train_file=str(path)))
    assert record["data"]["dropped"] == {"empty_responses": 2, "identical_pairs": 1}
    with pytest.raises(DataError, match="no pairs left to train on"):
        load_preferences(write(tmp_path / "none.jsonl", rows[1:4]))


def test_a_50mb_line_scaled_keeps_memory_bounded(tiny_model_dir, tmp_path):
    """A 5 MB single-line row (the 50 MB case scaled by 10) is read, cut and tokenised within a bounded memory rise:
    tokenising it whole would take well over 1 GB."""
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(dict(GOOD, chosen="word " * 1_000_000)) + "\n")
    script = f"""
import resource, sys
from align.preference import load_preferences, tokenize_pairs
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(tiny_model_dir)!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pset = load_preferences({str(path)!r}, max_length=96)
_, cut, counts = tokenize_pairs(pset, tok, 96, 64)
rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(len(cut[1]["chosen_ids"]), counts["truncated_completions"], round(rise))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    kept, truncated, rise_mb = map(int, out.stdout.split())
    assert kept == 96 - len("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n".replace("<|im_start|>", "S")
                             .replace("<|im_end|>", "E")) and truncated == 1
    assert rise_mb < 120, f"peak memory rose {rise_mb} MB on a 5 MB line"


def test_answers_that_look_like_numbers_stay_text(tmp_path):
    """CSV cells are text, and a JSON file whose columns mix types is read row by row, never through pandas (which
    turns the answer "98" into the number 98); align's numeric columns in CSV still read as numbers."""
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('prompt,chosen,rejected,margin,label\nCalculate 4 + 94.,98,96,1.5,\nQ,007,7,,tie\n')
    pset = load_preferences(csv_path, both_bad="tie")
    assert [(r.chosen, r.rejected, r.margin, r.label) for r in pset.rows] == [
        ("98", "96", 1.5, "chosen"), ("007", "7", None, "tie")]
    mixed = write(tmp_path / "m.jsonl", [{"prompt": "Q", "completion": "98"},
                                         {"prompt": [user("Q")], "completion": [bot("007")]}])
    assert [r["messages"][-1]["content"] for r in load_sft(open_source(str(mixed))).rows] == ["98", "007"]
    unpaired = tmp_path / "u.csv"
    unpaired.write_text("prompt,completion,label\nQ,98,True\nQ,96,false\n")
    sft = load_sft(open_source(str(unpaired)))
    assert [r["messages"][-1]["content"] for r in sft.rows] == ["98"] and sft.dropped == {"false_labels": 1}


def test_token_ids_of_another_tokenizer(tiny_model_dir, tmp_path, caplog):
    """Stored ids from another model's tokenizer are refused where importance weights need them (strict), and give
    way to the text, counted and logged, where they do not (weighting none/auto: the shipped data on any model)."""
    path = write(tmp_path / "p.jsonl", [dict(GOOD, chosen_token_ids=[5000, 17], rejected_token_ids=[6000])])
    tokenizer = load_tokenizer(tiny_model_dir)
    with pytest.raises(DataError, match=r"p.jsonl:1: chosen_token_ids has id 5000 outside"):
        tokenize_pairs(load_preferences(path), tokenizer, 96, 64)
    with caplog.at_level(logging.WARNING):
        _, cut, counts = tokenize_pairs(load_preferences(path), tokenizer, 96, 64, strict_ids=False)
    assert counts["retokenized_foreign_ids"] == 2 and counts["stored_token_ids"] == 0
    assert tokenizer.decode(cut[0]["chosen_ids"]) == "yes<|im_end|>" and "another tokenizer" in caplog.text
