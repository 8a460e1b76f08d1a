"""Token-level credit: per-token policy − reference log-ratios (DPO's implicit reward, summed), drop-one-token
reward credit, and an HTML view that escapes everything."""

import math

import pytest

from align.config import ModelArgs
from align.models import load_model, save_tiny_model
from align.report.credit import log_ratio_credit, pick_pairs, pieces, reward_drop_credit
from tests.helpers import completion_logps_by_hand as _by_hand, load_tokenizer, pair_rows


@pytest.fixture(scope="module")
def two_models(tiny_model_dir, tmp_path_factory):
    other = save_tiny_model(tmp_path_factory.mktemp("tiny-seed7"), seed=7)
    policy, tokenizer = load_model(ModelArgs(model=str(other)))
    reference, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    return policy.eval(), reference.eval(), tokenizer


def test_log_ratios_per_token_sum_to_the_implicit_reward(two_models):
    from align.data import as_messages, prompt_ids

    policy, reference, tokenizer = two_models
    rows = pair_rows(tokenizer, n=2)
    pairs = log_ratio_credit(policy, reference, tokenizer, rows, beta=0.1)
    for row, pair in zip(rows, pairs):
        prompt = prompt_ids(tokenizer, as_messages(row["prompt"]))
        for side in ("chosen", "rejected"):
            ids = row[f"{side}_token_ids"]
            expected = [p - r for p, r in zip(_by_hand(policy, prompt, ids), _by_hand(reference, prompt, ids))]
            got = pair[side]["log_ratio"]
            assert got == pytest.approx(expected, abs=1e-4)
            assert pair[side]["sum"] == pytest.approx(math.fsum(expected), abs=1e-3)
            assert pair[side]["implicit_reward"] == pytest.approx(0.1 * pair[side]["sum"])
            assert "".join(pair[side]["tokens"]) == tokenizer.decode(ids)
        assert pair["margin"] == pytest.approx(0.1 * (pair["chosen"]["sum"] - pair["rejected"]["sum"]))
    same = log_ratio_credit(reference, reference, tokenizer, rows[:1], beta=0.1)[0]
    assert all(v == 0.0 for v in same["chosen"]["log_ratio"])  # a model against itself: no credit anywhere


def test_pieces_and_pair_picking(two_models):
    _, _, tokenizer = two_models
    ids = tokenizer("héllo wörld <b>", add_special_tokens=False)["input_ids"]
    assert "".join(pieces(tokenizer, ids)) == tokenizer.decode(ids)
    rows = [{"label": "tie", "i": 0}, {"label": "chosen", "i": 1}, {"label": "chosen", "i": 2}]
    picked = pick_pairs(rows, 2, seed=3)
    assert {r["i"] for r in picked} == {1, 2} and pick_pairs(rows, 2, seed=3) == picked


def test_credit_html_escapes_the_data(two_models, tmp_path):
    from align.report.html import render

    policy, reference, tokenizer = two_models
    row = pair_rows(tokenizer, n=1)[0]
    evil = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'
    row["chosen"] = [{"role": "assistant", "content": evil}]
    row["chosen_token_ids"] = None
    row["prompt"] = [{"role": "user", "content": "<b>bold?</b>"}]
    pairs = log_ratio_credit(policy, reference, tokenizer, [row], beta=0.5)
    html = render({"title": "t", "credit": {"per_version": {"v1": {"reference": "v0", "beta": 0.5, "pairs": pairs}}}})
    assert "<script>" not in html and "<img" not in html and "<b>bold" not in html
    assert "&lt;b&gt;bold?&lt;/b&gt;" in html and f"{pairs[0]['margin']:+.4f}" in html
    spans = html.split('<div class="tok">')[1].split("</div>")[0]  # the chosen response's tokens
    import re
    from html import unescape
    assert unescape(re.sub(r"<[^>]+>", "", spans)).replace("\u200b", "") == evil + "<|im_end|>"
    first = pairs[0]["chosen"]["log_ratio"][0]
    assert f'title="{first:+.4f}"' in html  # each token carries its value


def test_reward_drop_credit_values(tiny_model_dir, tmp_path):
    from align.trainers.reward import load_reward_model, score, train_reward
    from tests.helpers import reward_configs, write_pairs

    tokenizer = load_tokenizer(tiny_model_dir)
    rows = pair_rows(tokenizer, n=4)
    data = write_pairs(tmp_path / "pairs.jsonl", rows)
    run = train_reward(*reward_configs(tiny_model_dir, data, data, tmp_path / "rm"))
    model, tok, stats = load_reward_model(str(run))
    pairs = [{"prompt": "p", "label": "chosen",
              **{s: {"tokens": pieces(tok, r[f"{s}_token_ids"]), "ids": r[f"{s}_token_ids"]}
                 for s in ("chosen", "rejected")}} for r in rows[:1]]
    reward_drop_credit(pairs, model, tok, stats, rows[:1])
    side = pairs[0]["chosen"]
    ids = rows[0]["chosen_token_ids"][:-1]  # without eos
    full = score(model, tok, [rows[0]["prompt"]], [tok.decode(ids)], 8, stats)[0]
    assert side["reward"] == pytest.approx(full, abs=1e-5)
    for t in (0, len(ids) - 1):
        without = score(model, tok, [rows[0]["prompt"]], [tok.decode(ids[:t] + ids[t + 1:])], 8, stats)[0]
        assert side["reward_drop"][t] == pytest.approx(full - without, abs=1e-4)
    assert len(side["reward_drop"]) == len(side["tokens"]) and side["reward_drop"][-1] == 0.0  # eos kept
