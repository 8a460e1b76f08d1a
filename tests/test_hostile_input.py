"""Hostile input to the data commands: refused before anything is sampled or stored, naming what is wrong."""

import math

import pytest
from sqlalchemy import func, select

from align import store as st
from align.errors import AlignError
from align.sampling import generate_to_store
from align.store import ModelVersion, Response
from tests.test_collect import SETTINGS, task_rows  # noqa: F401 - a fixture


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
