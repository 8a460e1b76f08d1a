"""Hostile input to the data commands: refused before anything is sampled or stored, naming what is wrong."""

import math

import pytest
from sqlalchemy import func, select

from align import store as st
from align.collect import generate_to_store
from align.errors import AlignError
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
