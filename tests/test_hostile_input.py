"""Hostile input to the data commands: refused before anything is sampled or stored, naming what is wrong."""

import math

import pytest
from sqlalchemy import func, select

from align import store as st
from align.errors import AlignError
from align.sampling import generate_to_store
from align.store import ModelVersion, Response
from tests.helpers import SETTINGS


def count(store, table) -> int:
    with store.read() as session:
        return session.scalar(select(func.count()).select_from(table))


def test_generate_refuses_an_unknown_pair_rule_before_sampling(store, tiny_model_dir, task_rows):  # noqa: F811
    with pytest.raises(AlignError, match="--pairs: unknown pair rule 'bogus'"):
        generate_to_store(store, str(tiny_model_dir), task_rows, 2, SETTINGS, pair_rule="bogus")
    assert count(store, Response) == 0 and count(store, ModelVersion) == 0


@pytest.mark.parametrize("value", [math.nan, -0.1, 1.5])
def test_export_refuses_a_meaningless_min_agreement(store, value):
    with pytest.raises(AlignError, match="min_agreement must be a share between 0 and 1"):
        st.export_preferences(store, min_agreement=value)


def test_a_fifo_is_written_into_not_replaced(tmp_path):
    import os
    import stat
    import threading

    from align.data import write_jsonl

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    write_jsonl([{"a": 1}, {"b": 2}], fifo)
    reader.join(timeout=10)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and received == ['{"a": 1}\n{"b": 2}\n']


def test_a_symlink_stays_a_link_and_its_target_keeps_its_mode(tmp_path):
    import os

    from align.data import write_jsonl

    target = tmp_path / "real.jsonl"
    target.write_text("old\n")
    target.chmod(0o640)
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    write_jsonl([{"new": True}], link)
    assert link.is_symlink() and target.read_text() == '{"new": true}\n'
    assert os.stat(target).st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "real.jsonl"]  # no temporary file left


def test_dev_full_stays_a_device_and_the_error_is_one_line(tmp_path):
    import os
    import stat

    from align.data import write_jsonl

    if not os.path.exists("/dev/full") or not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("no /dev/full character device here")
    with pytest.raises(AlignError, match="^cannot write /dev/full: No space left on device$"):
        write_jsonl([{"a": 1}], "/dev/full")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    with pytest.raises(AlignError, match="it is a directory"):
        write_jsonl([{"a": 1}], tmp_path)


# ---- reader errors name the file, the 1-based line and the column ----------------------------------------------------

GOOD = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'


@pytest.mark.parametrize("second_line, message", [
    (b'{"prompt": "\xff\xfe"}\n', r":2: not valid UTF-8 \(byte 0xff at column 13\)$"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", r":2: JSON nested too deeply to read"),
    (b'{"prompt": "abc\n', r":2: malformed JSON \(Unterminated string starting at column 12; the line ends at "
                           r"column 15 before the JSON does: truncated\?\)$"),
    (b'{"prompt": 1,, "x": 2}\n', r":2: malformed JSON \(Expecting property name enclosed in double quotes at "
                                  r"column 14\)$"),
    (b'["a list"]\n', r":2: expected a JSON object, got list$"),
])
def test_every_reader_names_file_line_and_column(tmp_path, second_line, message):
    from align.data import iter_jsonl, open_source
    from align.errors import DataError

    path = tmp_path / "rows.jsonl"
    path.write_bytes(GOOD.encode() + second_line)
    with pytest.raises(DataError, match="^" + str(path).replace(".", r"\.") + message):
        list(iter_jsonl(path))
    with pytest.raises(DataError, match="^" + str(path).replace(".", r"\.") + message):
        open_source(str(path))  # the training entry point: Arrow's error is replaced by the line's


@pytest.mark.parametrize("row, message", [
    ({"prompt": ["a", "b"]}, r":2: message 1 of 'prompt' must be an object with 'role' and 'content'"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, r":2: 'messages' holds only an assistant turn"),
    ({"prompt": "a\u0000b"}, r":2: holds a NUL character"),
    ({"prompt": ""}, r":2: needs a non-empty 'prompt'"),
])
def test_prompt_files_name_the_line(tmp_path, row, message):
    import json

    from align.errors import DataError
    from align.prompts import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match="^" + str(path).replace(".", r"\.") + message):
        read_prompts(path)


def test_config_files_name_line_and_column(tmp_path):
    from align.config import SFT_CONFIG, parse_config
    from align.errors import ConfigError

    bad = tmp_path / "c.yaml"
    bad.write_bytes(b"seed: 1\nname: \xff\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:2: not valid UTF-8 \(byte 0xff at column 7\)$"):
        parse_config(SFT_CONFIG, ["--config", str(bad)])
    bad.write_text("seed: 1\nname: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: not valid YAML at column 1"):
        parse_config(SFT_CONFIG, ["--config", str(bad)])


def test_nul_is_refused_alike_on_every_backend(store):
    from align.errors import DataError

    with pytest.raises(DataError, match=r"^prompt\.text: a NUL character \(\\x00\) cannot be stored"):
        st.add_prompts(store, [{"prompt": "a\u0000b"}])
    with pytest.raises(DataError, match=r"^prompt\.gold: a NUL character"):
        st.add_prompts(store, [{"prompt": "fine", "gold": {"answer": "\u0000"}}])
    with store.read() as session:
        assert session.scalar(select(func.count()).select_from(st.Prompt)) == 0


def test_store_prompt_rows_are_counted_from_1(store):
    from align.errors import DataError

    with pytest.raises(DataError, match="^prompt row 2 needs 'prompt'"):
        st.add_prompts(store, [{"prompt": "fine"}, {"prompt": ""}])


# ---- a failed command leaves nothing that looks like a result --------------------------------------------------------

def counts(store):
    from align.store import Prompt

    return count(store, Prompt), count(store, ModelVersion), count(store, Response)


def test_generate_that_fails_after_registering_leaves_no_rows(store, tiny_model_dir, task_rows, tmp_path):  # noqa: F811
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()  # registers (the tokenizer is there), then cannot load
    st.add_prompts(store, task_rows[:1])  # a prompt stored before stays
    with pytest.raises(Exception):
        generate_to_store(store, str(broken), task_rows, 2, SETTINGS)
    assert counts(store) == (1, 0, 0)


def test_eval_with_a_failing_gold_check_leaves_no_rows(store, tiny_model_dir):
    from align.report.compare import EvalSpec, run_eval

    rows = [{"prompt": f"free text {i}"} for i in range(7)]  # no task family: the gold judge cannot score them
    spec = EvalSpec(models=[str(tiny_model_dir)], prompt_rows=rows, judges=["gold"], settings=SETTINGS)
    with pytest.raises(AlignError, match="the gold judge cannot score no task family"):
        run_eval(store, spec, embed=None)
    assert counts(store) == (0, 0, 0)


def test_a_sampled_nul_is_stored_as_a_replacement_character(store):
    from align.errors import DataError

    [prompt] = st.add_prompts(store, [{"prompt": "hi"}])
    version = st.register_model_version(store, {"name": "m", "base_model": "m"})
    row = {"prompt_id": prompt, "model_version_id": version, "seed": 0, "max_new_tokens": 4}
    [rid] = st.add_responses(store, [{**row, "text": "a\u0000b", "completion_token_ids": [97, 0, 98]}])
    with store.read() as session:
        stored = session.get(Response, rid)
        assert stored.text == "a\ufffdb" and stored.completion_token_ids == [97, 0, 98]
    with pytest.raises(DataError, match=r"^response\.text: a NUL character"):  # a text without tokens is refused
        st.add_responses(store, [{**row, "sample_index": 1, "text": "a\u0000b"}])


def test_a_new_file_gets_the_umask_mode_not_0600(tmp_path):
    import os

    from align.data import write_jsonl

    old = os.umask(0o022)
    try:
        write_jsonl([{"a": 1}], tmp_path / "new.jsonl")
        os.umask(0o027)
        write_jsonl([{"a": 1}], tmp_path / "private.jsonl")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "new.jsonl").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "private.jsonl").st_mode & 0o777 == 0o640
