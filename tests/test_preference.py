"""Preference data: loading and validation (errors name file:line), tokenisation, the 2B-row collator, weights."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from align.config import WeightingArgs
from align.errors import DataError
from align.logprobs import IGNORE_INDEX
from align.preference import PreferenceCollator, load_preferences, tokenize_pairs
from align.trainers.weights import DynamicWeights, check_columns, dataset_weights, log_weight_shift
from tests.helpers import load_tokenizer, pair_rows, run_cli, write_pairs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_load_tokenize_and_both_bad(tokenizer, tmp_path, caplog):
    rows = pair_rows(tokenizer, n=5)
    rows[1]["label"] = "tie"
    rows[2]["label"] = "both_bad"
    rows[3].update(prompt="Plain string prompt", chosen="plain chosen", rejected="plain rejected")
    del rows[3]["chosen_token_ids"], rows[3]["rejected_token_ids"]
    path = write_pairs(tmp_path / "p.jsonl", rows)

    with caplog.at_level(logging.WARNING):
        pset = load_preferences(path)
    assert pset.both_bad_dropped == 1 and len(pset.rows) == 4 and pset.n_read == 5
    assert "dropped 1 both-bad" in caplog.text
    assert [r.label for r in load_preferences(path, both_bad="tie").rows].count("tie") == 2
    assert pset.rows[2].where == f"{path}:4"  # row 3 of the file, after the dropped one

    full, cut, counts = tokenize_pairs(pset, tokenizer, max_length=512, max_prompt_length=256)
    assert full[0]["chosen_ids"] == rows[0]["chosen_token_ids"]  # stored ids used as is
    plain = full[2]
    assert plain["chosen_ids"][-1] == tokenizer.eos_token_id  # text + eos without stored ids
    assert tokenizer.decode(plain["chosen_ids"], skip_special_tokens=True) == "plain chosen"
    assert counts["stored_token_ids"] == 6 and counts["truncated_completions"] == 0
    assert full[1]["is_tie"] and not full[0]["is_tie"]


def test_truncation_is_counted(tokenizer, tmp_path):
    pset = load_preferences(write_pairs(tmp_path / "p.jsonl", pair_rows(tokenizer, n=3)))
    full, cut, counts = tokenize_pairs(pset, tokenizer, max_length=30, max_prompt_length=20)
    assert counts["truncated_prompts"] == 3 and counts["truncated_completions"] == 6
    for f, g in zip(cut, full):
        assert len(f["prompt_ids"]) == 20 and f["prompt_ids"] == g["prompt_ids"][-20:]
        assert len(f["prompt_ids"]) + len(f["chosen_ids"]) == 30
    assert len(full[0]["chosen_ids"]) > len(cut[0]["chosen_ids"])  # weights still see every sampled token


def test_collator_puts_chosen_then_rejected_in_one_batch(tokenizer, tmp_path):
    pset = load_preferences(write_pairs(tmp_path / "p.jsonl", pair_rows(tokenizer, n=3)))
    _, features, _ = tokenize_pairs(pset, tokenizer, 512, 256)
    features[1]["weight"] = 0.25
    batch = PreferenceCollator(tokenizer.pad_token_id)(features)
    assert batch["input_ids"].shape[0] == 6 and batch["labels"].shape == batch["input_ids"].shape
    for i, f in enumerate(features):
        for row, side in ((i, "chosen_ids"), (i + 3, "rejected_ids")):
            n_prompt, n_completion = len(f["prompt_ids"]), len(f[side])
            assert batch["input_ids"][row, :n_prompt].tolist() == f["prompt_ids"]
            assert (batch["labels"][row, :n_prompt] == IGNORE_INDEX).all()
            assert batch["labels"][row, n_prompt:n_prompt + n_completion].tolist() == f[side]
            assert (batch["labels"][row, n_prompt + n_completion:] == IGNORE_INDEX).all()
            assert batch["attention_mask"][row].sum() == n_prompt + n_completion
    assert batch["weight"].tolist() == [1.0, 0.25, 1.0]
    assert batch["index"].tolist() == [0, 1, 2] and batch["is_tie"].dtype == torch.bool


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(label="maybe"), "label 'maybe' is not one of"),
        (lambda r: r.update(chosen_token_ids=[5, 99999]), "chosen_token_ids has id 99999 outside the tokenizer's voc"),
        (lambda r: r.update(rejected_token_ids=[70, 71, 72]), "rejected_token_ids do not decode to the 'rejected' text"),
        (lambda r: r.update(gen_chosen_logps=float("nan")), "'gen_chosen_logps' is nan, not a finite number"),
        (lambda r: r.update(gen_rejected_logps=float("-inf")), "'gen_rejected_logps' is -inf, not a finite number"),
        (lambda r: r.update(label_agreement=1.5), "label_agreement must lie in [0, 1]"),
        (lambda r: r.update(chosen=[{"role": "user", "content": "x"}]), "'chosen' must be a string or a list"),
    ],
)
def test_bad_rows_are_named(tokenizer, tmp_path, edit, message):
    rows = pair_rows(tokenizer, n=3)
    edit(rows[1])
    path = write_pairs(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError) as info:
        tokenize_pairs(load_preferences(path), tokenizer, 512, 256)
    assert f"{path}:2:" in str(info.value) and message in str(info.value)


def test_malformed_line_is_named(tokenizer, tmp_path):
    path = write_pairs(tmp_path / "p.jsonl", pair_rows(tokenizer, n=2))
    path.write_text(path.read_text() + '{"prompt": "x", "chosen": \n')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        load_preferences(path)


def test_schemes_needing_generation_logps_say_what_to_do(tokenizer, tmp_path):
    rows = pair_rows(tokenizer, n=3)
    del rows[2]["gen_chosen_logps"]
    pset = load_preferences(write_pairs(tmp_path / "p.jsonl", rows))
    with pytest.raises(DataError) as info:
        check_columns(pset, "sequence")
    assert ":3:" in str(info.value) and "wpo" in str(info.value) and "align rescore" in str(info.value)
    with pytest.raises(DataError, match="'mixture' needs gen_model_version and gen_logps_by_version"):
        check_columns(pset, "mixture")
    check_columns(pset, "wpo")  # self-weights need nothing stored


def test_file_weights_and_static_scheme(tokenizer, tmp_path):
    rows = pair_rows(tokenizer, n=4)
    rows[0]["weight"] = 0.0
    pset = load_preferences(write_pairs(tmp_path / "p.jsonl", rows))
    result, scores = dataset_weights(pset, [], WeightingArgs(weighting_scheme="none"), score=None)
    assert scores is None and result.weights.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert result.diagnostics["scheme"] == "none (weight column)"

    n = len(pset.rows)
    fake = {"chosen_logps": torch.full((n,), -41.0, dtype=torch.float64),
            "rejected_logps": torch.full((n,), -59.0, dtype=torch.float64),
            "chosen_lengths": torch.full((n,), 10.0, dtype=torch.float64),
            "rejected_lengths": torch.full((n,), 20.0, dtype=torch.float64)}
    result, _ = dataset_weights(pset, [], WeightingArgs(weighting_scheme="sequence"), score=lambda f, c: fake)
    assert result.weights.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert result.weights.max().item() <= 5.0 + 1e-6
    assert "weights/ess_frac/v1" in result.diagnostics and "weights/ess_frac/v2" in result.diagnostics

    for i, row in enumerate(rows):  # mixture: log-probs of each pair under every pooled version
        row["gen_logps_by_version"] = {"v1": [-40.0 - i, -60.0], "v2": [-42.0, -58.0 + i]}
    pset = load_preferences(write_pairs(tmp_path / "m.jsonl", rows))
    mixture = WeightingArgs(weighting_scheme="mixture", weighting_alpha=0.5)
    result, _ = dataset_weights(pset, [], mixture, score=lambda f, c: fake)
    assert result.weights.mean().item() == pytest.approx(1.0, abs=1e-6) and result.diagnostics["alpha"] == 0.5
    del rows[1]["gen_logps_by_version"]["v2"]
    with pytest.raises(DataError, match=r":2: gen_logps_by_version lacks pooled version\(s\) \['v2'\]"):
        check_columns(load_preferences(write_pairs(tmp_path / "m.jsonl", rows)), "mixture")


def test_dynamic_weights_start_at_static_and_shift_by_the_scheme():
    static = torch.tensor([0.5, 1.0, 1.5])
    same = {"chosen_logps": torch.tensor([-10.0, -20.0, -30.0]), "rejected_logps": torch.tensor([-5.0, -6.0, -7.0]),
            "chosen_lengths": torch.tensor([2.0, 4.0, 5.0]), "rejected_lengths": torch.tensor([1.0, 2.0, 2.0])}
    dyn = DynamicWeights("sequence", 1.0, 5.0)
    assert torch.allclose(dyn(static, same, same), static)  # Δ = 0 and the scale starts at 1
    moved = {**same, "chosen_logps": same["chosen_logps"] + torch.tensor([1.0, 0.0, -1.0])}
    shift = log_weight_shift("length_normalized", 1.0, moved, same)
    assert torch.allclose(shift, torch.tensor([0.5, 0.0, -0.2]))
    assert torch.allclose(log_weight_shift("tempered", 0.5, moved, same), torch.tensor([0.5, 0.0, -0.5]))
    w = DynamicWeights("sequence", 1.0, 2.0)(static, moved, same)
    assert w.max() <= 2.0 + 1e-6 and w[0] > w[2]  # the pair the policy moved towards gains weight


def test_align_weights_cli_prints_ess_per_version(tiny_model_dir, tokenizer, tmp_path):
    path = write_pairs(tmp_path / "p.jsonl", pair_rows(tokenizer, n=8))
    code, stdout, err = run_cli("weights", "--data", str(path), "--model", str(tiny_model_dir),
                                "--scheme", "length_normalized", "--out", str(tmp_path / "w"))
    assert code == 0, err
    assert "ESS/N overall" in stdout
    assert "ESS/N v1" in stdout and "ESS/N v2" in stdout
    saved = json.loads((tmp_path / "w" / "weights.json").read_text())
    assert len(saved["weights"]) == 8 and math.isclose(sum(saved["weights"]) / 8, 1.0, abs_tol=1e-4)
    assert (tmp_path / "w" / "weights.png").stat().st_size > 1000
    # Drift: the share of each source version's pairs outside the target's support, counted by hand from the map
    diag = saved["diagnostics"]
    for version in ("v1", "v2"):
        rows = [i for i in range(8) if pair_rows(tokenizer, n=8)[i]["gen_model_version"] == version]
        off = sum(diag["map/chosen_per_token"][i] < -1 and diag["map/rejected_per_token"][i] < -1 for i in rows)
        assert (f"outside the target's support, {version}: {off} of {len(rows)} pairs ({off / len(rows):.0%}; "
                in stdout)
