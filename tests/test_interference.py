"""Stage interference: held-out SFT loss and gold before/after preference training, the warning naming sft_weight."""

import json
import math

import pytest
import torch

from align.interference import sft_file, sft_loss, warning


def test_sft_loss_is_the_mean_nll_of_assistant_tokens(tiny_model_dir):
    from align.data import tokenize_chat
    from align.models import load_model
    from align.config import ModelArgs

    model, tokenizer = load_model(ModelArgs(model=str(tiny_model_dir)))
    convs = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}],
             [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]
    total, count = 0.0, 0
    for conv in convs:  # one at a time, no padding: the definition
        row = tokenize_chat(conv, tokenizer, 512)
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        for t in range(1, len(row["input_ids"])):
            if row["assistant_masks"][t]:
                total -= float(logps[t - 1, row["input_ids"][t]])
                count += 1
    assert sft_loss(model, tokenizer, convs, batch_size=2) == pytest.approx(total / count, rel=1e-5)


def test_warning_past_the_thresholds_names_sft_weight():
    base = {"method": "dpo", "sft_weight": 0.0, "thresholds": {"sft_loss_increase": 0.05, "gold_drop": 0.05}}
    quiet = {**base, "before": {"sft_loss": 1.0, "gold": 0.5}, "after": {"sft_loss": 1.04, "gold": 0.46}}
    assert warning(quiet) is None
    loud = {**base, "before": {"sft_loss": 1.0, "gold": 0.5}, "after": {"sft_loss": 1.2, "gold": 0.3}}
    text = warning(loud)
    assert "held-out SFT loss rose from 1.0000 to 1.2000 nats/token (+0.2000 > 0.05)" in text
    assert "gold reward fell from 0.500 to 0.300 (-0.200 > 0.05)" in text
    assert "raise sft_weight (the NLL term on chosen responses, now 0)" in text
    rlhf = warning({**loud, "method": "rlhf"})
    assert rlhf.startswith("stage interference: RLHF") and "sft_weight > 0" in rlhf


def test_sft_file_follows_the_lineage_to_the_sft_run(tmp_path):
    data = tmp_path / "held.jsonl"
    data.write_text("")
    sft = tmp_path / "v1-sft"
    sft.mkdir()
    (sft / "version.json").write_text(json.dumps({"name": "v1-sft", "method": "sft", "parent_spec": "base",
                                                  "config": {"train_file": str(data), "eval_file": None}}))
    dpo = tmp_path / "v2-dpo"
    dpo.mkdir()
    (dpo / "version.json").write_text(json.dumps({"name": "v2-dpo", "method": "dpo", "parent_spec": str(sft),
                                                  "config": {"train_file": "prefs.jsonl"}}))
    assert sft_file("auto", str(dpo)) == (str(data), "the train_file of SFT run v1-sft")
    assert sft_file("mine.jsonl", str(dpo)) == ("mine.jsonl", "interference_sft_file")
    path, source = sft_file("auto", str(tmp_path / "nothing"))
    assert path.endswith("data/sft/eval.jsonl") and "no SFT run" in source


def test_dpo_run_records_what_it_cost_the_sft_stage(tiny_model_dir, tmp_path):
    """Values: the before/after SFT losses equal sft_loss of the starting model and of the saved run."""
    from align.prompts import repo_file
    from align.config import DPOArgs, ModelArgs
    from align.data import load_chat_file
    from align.models import load_model
    from align.trainers.dpo import train_dpo
    from tests.helpers import dpo_configs as configs, load_tokenizer, pair_rows, write_pairs

    tokenizer = load_tokenizer(tiny_model_dir)
    files = (write_pairs(tmp_path / "train.jsonl", pair_rows(tokenizer, n=8)), None)
    dpo = DPOArgs(interference_samples=6, interference_per_family=1, interference_max_loss_increase=0.0,
                  interference_max_gold_drop=0.0, sft_weight=0.0)
    run = train_dpo(*configs(tiny_model_dir, files, tmp_path / "run", dpo=dpo, max_steps=3, learning_rate=5e-2))
    result = json.loads((run / "interference.json").read_text())
    version = json.loads((run / "version.json").read_text())
    convs = load_chat_file(str(repo_file("data/sft/eval.jsonl")), 6)
    assert result["sft_conversations"] == 6 and result["gold_tasks"] == 7
    start, tok = load_model(ModelArgs(model=str(tiny_model_dir)))
    trained, _ = load_model(ModelArgs(model=str(run)))
    assert result["before"]["sft_loss"] == pytest.approx(sft_loss(start, tok, convs), rel=1e-4)
    assert result["after"]["sft_loss"] == pytest.approx(sft_loss(trained, tok, convs), rel=1e-4)
    assert result["after"]["sft_loss"] != pytest.approx(result["before"]["sft_loss"], rel=1e-6)  # training moved it
    assert 0 <= result["before"]["gold"] <= 1 and not math.isnan(result["after"]["gold"])
    assert version["metrics"]["interference/sft_loss_before"] == result["before"]["sft_loss"]
    rose = result["after"]["sft_loss"] > result["before"]["sft_loss"]
    fell = result["after"]["gold"] < result["before"]["gold"]
    assert (result["warning"] is not None) == (rose or fell)
    if result["warning"]:
        assert version["metrics"]["interference_warning"] == result["warning"] and "sft_weight" in result["warning"]
