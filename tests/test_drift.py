"""Drift between versions: formats, embedding shift, the parent's pairs outside the new version's support."""

import math

import numpy as np
import pytest

from align.report.drift import embedding_shift, format_features, format_shares
from align.weighting import support_shares


def test_format_features_by_hand():
    assert format_features("```python\nprint(1)\n```") == {"code_block": True, "list": False, "json": False,
                                                          "refusal": False}
    assert format_features('{"a": [1, 2]}')["json"] and format_features('Here:\n```json\n[1, 2]\n```')["json"]
    assert not format_features("{not json}")["json"]
    assert format_features("Steps:\n- one\n- two\n")["list"] and format_features("1. a\n2) b")["list"]
    assert not format_features("- only one item")["list"]
    assert format_features("I'm sorry, but I can't help with that.")["refusal"]
    assert not format_features("Sorry state of affairs.")["refusal"]
    shares = format_shares(["- a\n- b", "I cannot do that", "plain"])
    assert shares == {"code_block": 0.0, "list": pytest.approx(1 / 3), "json": 0.0, "refusal": pytest.approx(1 / 3)}


def test_embedding_shift_is_the_mean_cosine_distance_of_mean_embeddings():
    vecs = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 1.0]}

    def embed(texts):
        return np.array([vecs[t] for t in texts])

    new = {1: [{"text": "a"}], 2: [{"text": "c"}]}
    old = {1: [{"text": "a"}, {"text": "b"}], 2: [{"text": "c"}, {"text": "c"}]}
    got = embedding_shift(new, old, [1, 2], embed)
    # prompt 1: mean old = (0.5, 0.5) -> cos with (1, 0) = 1/sqrt(2); prompt 2: identical -> 0
    assert got["shift"] == pytest.approx((1 - 1 / math.sqrt(2)) / 2)
    # the parent's own spread: prompt 1, a vs b: 1 - 0 = 1; prompt 2: 0
    assert got["parent_spread"] == pytest.approx(0.5) and got["prompts"] == 2


def test_support_shares_count_pairs_with_both_responses_off_support():
    shares = support_shares([-2.0, -0.5, -3.0, -1.5], [-1.5, -0.45, 0.5, -1.2], ["v0", "v0", "v0", "v1"])
    assert shares["v0"] == {"pairs": 3, "off_support": 1, "equally_likely": 1, "share": pytest.approx(1 / 3)}
    assert shares["v1"]["off_support"] == 1 and shares["v1"]["share"] == 1.0
