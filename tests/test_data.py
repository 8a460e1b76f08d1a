"""Data readers name the bad line; the assistant mask covers exactly the assistant turns."""

import json

import pytest

from align.data import load_chat_file, read_jsonl, tokenize_chat, write_jsonl
from align.errors import DataError
from align.models import tiny_tokenizer


def test_malformed_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": []}\n{"messages": [\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON"):
        read_jsonl(path)


def test_missing_column_and_empty_and_missing_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hi"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: missing column\(s\) messages"):
        read_jsonl(path, required=["messages"])
    path.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        read_jsonl(path)
    with pytest.raises(DataError, match="data file not found"):
        read_jsonl(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "user", "content": "hi"}], "d.jsonl:1: the last message must be an assistant"),
        # A whitespace-only response is dropped (counted); with nothing left the file is refused.
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], r"no rows left .*empty_responses: 1"),
        ([{"role": "robot", "content": "hi"}], "role 'robot'"),
        ("hello", "non-empty list"),
    ],
)
def test_bad_conversations(tmp_path, messages, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match=message):
        load_chat_file(path)


def test_assistant_mask_covers_exactly_the_assistant_turns():
    tok = tiny_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "six"},
    ]
    out = tokenize_chat(messages, tok, max_length=10_000)
    trained = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    # Each assistant turn's content plus its end-of-turn marker, nothing from the user or system.
    assert trained == "4<|im_end|>\nsix<|im_end|>\n"
    assert len(out["input_ids"]) == len(out["assistant_masks"])


def test_truncation_keeps_mask_aligned():
    tok = tiny_tokenizer()
    messages = [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y" * 50}]
    out = tokenize_chat(messages, tok, max_length=70)
    assert len(out["input_ids"]) == len(out["assistant_masks"]) == 70


def test_write_jsonl_roundtrip(tmp_path):
    rows = [{"a": 1, "b": "é"}, {"a": 2, "b": None}]
    path = write_jsonl(rows, tmp_path / "sub" / "x.jsonl")
    assert read_jsonl(path) == rows
