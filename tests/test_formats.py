"""Every accepted data format, in every container: recognised, converted field by field, and one training step of
each method that accepts it. The asserts say which input field became prompt, chosen, rejected or completion, so
templating twice, an inverted label or a wrong column fails them."""

import logging

import pytest

from align.config import LoraArgs, ModelArgs, PreferenceDataArgs, SFTDataArgs
from align.data import load_sft, open_source, template_markers, tokenize_sft_row
from align.errors import DataError
from align.preference import load_preferences, tokenize_pairs
from tests.helpers import bot, load_tokenizer, run_pairs, train_args, user, version, write


def run_sft(model_dir, out, **data):
    from align.trainers.sft import train_sft

    data.setdefault("eval_file", None)
    return train_sft(ModelArgs(model=str(model_dir)), LoraArgs(lora_r=2, lora_alpha=4),
                     SFTDataArgs(max_length=64, **data), train_args(out))


# --- preferences -------------------------------------------------------------------------------------------------

# Two rows per format; every row's prompt is "Q{i}", chosen "good {i}", rejected "bad {i}" once converted.
PAIR_CASES = {
    "standard-explicit": [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(2)],
    "conversational-explicit": [{"prompt": [user(f"Q{i}")], "chosen": [bot(f"good {i}")], "rejected": [bot(f"bad {i}")]}
                                for i in range(2)],
    # TRL's implicit standard format: the longest shared leading text is the prompt.
    "standard-implicit": [{"chosen": f"Q{i} good {i}", "rejected": f"Q{i} bad {i}"} for i in range(2)],
    "conversational-implicit": [{"chosen": [user(f"Q{i}"), bot(f"good {i}")], "rejected": [user(f"Q{i}"), bot(f"bad {i}")]}
                                for i in range(2)],
    "ultrafeedback": [{"prompt": f"Q{i}", "chosen": [user(f"Q{i}"), bot(f"good {i}")],
                       "rejected": [user(f"Q{i}"), bot(f"bad {i}")], "score_chosen": 8.0 + i, "score_rejected": 5.0,
                       "messages": [user(f"Q{i}"), bot(f"good {i}")]} for i in range(2)],
    "hh": [{"chosen": f"\n\nHuman: Q{i}\n\nAssistant: good {i}", "rejected": f"\n\nHuman: Q{i}\n\nAssistant: bad {i}"}
           for i in range(2)],
}


def expected_prompt(fmt, i):
    # The standard implicit prompt keeps the separating space (the shared text is "Q0 "), as TRL's extract_prompt.
    return [user(f"Q{i} " if fmt == "standard-implicit" else f"Q{i}")]


def expected_response(fmt, side, i):
    return f"{'good' if side == 'chosen' else 'bad'} {i}"


@pytest.mark.parametrize("fmt", list(PAIR_CASES))
def test_preference_format_recognised_converted_and_trained(fmt, tiny_model_dir, tmp_path, caplog):
    path = write(tmp_path / "pairs.jsonl", PAIR_CASES[fmt])
    with caplog.at_level(logging.INFO, logger="align.preference"):
        pset = load_preferences(path)
    assert pset.format == fmt and f"read 2 rows of {path} as" in caplog.text
    for i, row in enumerate(pset.rows):
        assert row.prompt == expected_prompt(fmt, i)
        assert (row.chosen, row.rejected) == (expected_response(fmt, "chosen", i), expected_response(fmt, "rejected", i))
        assert row.label == "chosen" and row.where == f"{path}:{i + 1}"
    if fmt == "ultrafeedback":
        assert [r.margin for r in pset.rows] == [3.0, 4.0]

    # The tokens trained on: the prompt templated once, each response as its own text plus the end of the turn.
    tokenizer = load_tokenizer(tiny_model_dir)
    _, features, _ = tokenize_pairs(pset, tokenizer, 96, 64)
    assert tokenizer.decode(features[1]["prompt_ids"]) == f"<|im_start|>user\n{expected_prompt(fmt, 1)[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(features[1]["chosen_ids"]) == "good 1<|im_end|>"
    assert tokenizer.decode(features[1]["rejected_ids"]) == "bad 1<|im_end|>"

    for method in ("dpo", "reward"):
        out = run_pairs(method, tiny_model_dir, tmp_path / method, train_file=str(path))
        record = version(out)
        assert record["metrics"]["global_step"] == 1 and record["data"]["format"] == fmt
        assert record["data"]["described"].startswith(f"read 2 rows of {path} as")


@pytest.mark.parametrize("container", ["pairs.json", "pairs.csv", "pairs.parquet", "saved", "glob"])
def test_preference_containers(container, tiny_model_dir, tmp_path):
    rows = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    if container == "glob":
        write(tmp_path / "parts" / "a.jsonl", rows[:2])
        write(tmp_path / "parts" / "b.jsonl", rows[2:])
        spec = str(tmp_path / "parts" / "*.jsonl")
    else:
        spec = str(write(tmp_path / container, rows))
    pset = load_preferences(spec)
    assert [(r.prompt[0]["content"], r.chosen, r.rejected) for r in pset.rows] == [
        (f"Q{i}", f"good {i}", f"bad {i}") for i in range(3)]
    assert pset.rows[2].where == (f"{spec}: row 3" if container != "glob" else f"{spec}: row 3")
    if container in ("pairs.parquet", "saved"):  # one step of each pair method on the binary containers
        for method in ("dpo", "reward"):
            assert version(run_pairs(method, tiny_model_dir, tmp_path / method, train_file=spec))["metrics"]["global_step"] == 1


def test_dataset_name_reads_a_local_dataset_with_splits_and_columns(tiny_model_dir, tmp_path):
    """--dataset_name with --dataset_split / --dataset_eval_split slices and --columns (a local DatasetDict folder:
    the same code path as a hub id, without a network)."""
    import datasets

    rows = [{"question": f"Q{i}", "good": f"good {i}", "bad": f"bad {i}"} for i in range(6)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
                         ).save_to_disk(str(tmp_path / "dd"))
    out = run_pairs("dpo", tiny_model_dir, tmp_path / "run", dataset_name=str(tmp_path / "dd"),
                    dataset_split="train[2:5]", dataset_eval_split="test", columns="prompt=question,chosen=good,rejected=bad")
    record = version(out)
    assert record["data"]["rows_read"] == 3 and record["data"]["format"] == "standard-explicit"
    assert record["data"]["source"] == str(tmp_path / "dd")
    assert "eval_loss" in record["metrics"]


def test_hub_dataset_offline_is_one_line_with_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from align.data import open_split

    with pytest.raises(DataError) as err:
        open_split(PreferenceDataArgs(dataset_name="nobody/no-such-dataset-xyz"), "train")
    message = str(err.value)
    assert "\n" not in message and "no network" in message and "--train_file PATH" in message


def test_unpaired_rows_refused_by_pair_methods(tmp_path):
    path = write(tmp_path / "kto.jsonl", [{"prompt": "Q", "completion": "A", "label": True}])
    with pytest.raises(DataError, match="unpaired rows .* cannot use them"):
        load_preferences(path)


def test_columns_mapping_errors_name_the_column(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"question": "Q", "good": "a", "bad": "b"}])
    with pytest.raises(DataError, match="'answer', not a column here"):
        load_preferences(path, columns="prompt=question,chosen=answer,rejected=bad")
    with pytest.raises(DataError, match="cannot tell the preference format .* --columns"):
        load_preferences(path)


# --- SFT ---------------------------------------------------------------------------------------------------------

# Each format's two rows mean: user "Q{i}", assistant "A{i}" (Alpaca: instruction + input).
SFT_CASES = {
    "messages": [{"messages": [user(f"Q{i}"), bot(f"A{i}")]} for i in range(2)],
    "conversations": [{"conversations": [user(f"Q{i}"), bot(f"A{i}")]} for i in range(2)],
    "sharegpt": [{"conversations": [{"from": "human", "value": f"Q{i}"}, {"from": "gpt", "value": f"A{i}"}]}
                 for i in range(2)],
    "prompt-completion": [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(2)],
    "prompt-completion-messages": [{"prompt": [user(f"Q{i}")], "completion": [bot(f"A{i}")]} for i in range(2)],
    "unpaired": [{"prompt": f"Q{i}", "completion": f"A{i}", "label": True} for i in range(2)]
                + [{"prompt": "Q9", "completion": "bad answer", "label": False}],
    "alpaca": [{"instruction": f"Q{i}", "input": "", "output": f"A{i}"} for i in range(2)],
}


@pytest.mark.parametrize("fmt", list(SFT_CASES))
def test_sft_format_recognised_converted_and_trained(fmt, tiny_model_dir, tmp_path):
    path = write(tmp_path / "sft.jsonl", SFT_CASES[fmt])
    sft = load_sft(open_source(str(path)))
    assert sft.format == fmt.replace("-messages", "")
    assert [r["messages"] for r in sft.rows] == [[user(f"Q{i}"), bot(f"A{i}")] for i in range(2)]
    if fmt == "unpaired":
        assert sft.dropped == {"false_labels": 1}  # a false label is never trained on
    tokenizer = load_tokenizer(tiny_model_dir)
    row = tokenize_sft_row(sft.rows[1], tokenizer, 64, template_markers(tokenizer))
    trained = tokenizer.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m])
    assert trained == "A1<|im_end|>\n"  # the completion, once templated, and nothing of the prompt
    record = version(run_sft(tiny_model_dir, tmp_path / "run", train_file=str(path)))
    assert record["metrics"]["global_step"] == 1 and record["data"]["format"] == sft.format


def test_alpaca_input_joins_the_instruction(tmp_path):
    path = write(tmp_path / "a.jsonl", [{"instruction": "Translate", "input": "chat", "output": "cat"}])
    assert load_sft(open_source(str(path))).rows[0]["messages"] == [user("Translate\n\nchat"), bot("cat")]


def test_text_rows_train_on_every_token_as_is(tiny_model_dir, tmp_path):
    """A `text` column is used as-is (often already templated): no template added, every token trained on."""
    text = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>"  # ends with eos: none added
    path = write(tmp_path / "t.parquet", [{"text": text}, {"text": "plain words"}])
    sft = load_sft(open_source(str(path)))
    tokenizer = load_tokenizer(tiny_model_dir)
    row = tokenize_sft_row(sft.rows[0], tokenizer, 64, template_markers(tokenizer))
    assert tokenizer.decode(row["input_ids"]) == text and all(row["assistant_masks"])
    assert tokenizer.decode(tokenize_sft_row(sft.rows[1], tokenizer, 64, [])["input_ids"]) == "plain words<|im_end|>"
    assert version(run_sft(tiny_model_dir, tmp_path / "run", train_file=str(path)))["data"]["format"] == "text"


@pytest.mark.parametrize("container", ["sft.csv", "saved"])
def test_sft_containers(container, tiny_model_dir, tmp_path):
    spec = write(tmp_path / container, [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(3)])
    sft = load_sft(open_source(str(spec)))
    assert sft.rows[2]["messages"] == [user("Q2"), bot("A2")] and sft.rows[2]["where"] == f"{spec}: row 3"
    assert version(run_sft(tiny_model_dir, tmp_path / "run", train_file=str(spec)))["metrics"]["global_step"] == 1


@pytest.mark.parametrize("container", ["prompts.parquet", "prompts.csv", "saved"])
def test_prompt_files_for_generate_and_rlhf(container, tmp_path):
    """align generate / rlhf prompts come through the same entry point: any container, rows named on refusal."""
    from align.prompts import read_prompts
    from align.trainers.rlhf import prompt_dataset

    spec = write(tmp_path / container, [{"prompt": "Calculate 4 + 94.", "family": "arithmetic"}, {"prompt": "Name a prime."}])
    rows = read_prompts(spec)
    assert [(r["prompt"], r.get("family")) for r in rows] == [("Calculate 4 + 94.", "arithmetic"), ("Name a prime.", None)]
    assert prompt_dataset(str(spec), None)[1]["prompt"] == [user("Name a prime.")]
    bad = write(tmp_path / f"bad-{container}", [{"prompt": "ok"}, {"prompt": ""}])
    with pytest.raises(DataError, match=r"bad-.*: row 2: needs a non-empty 'prompt'"):
        read_prompts(bad)
