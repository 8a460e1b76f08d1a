"""Every recipes/*.py runs end to end as a script, on its shipped config with a tiny model and a few steps: exit
code 0, a finite training loss, the artefacts every run leaves (adapter, version.json, metrics.jsonl), and the
run's parameters moved. The reward recipe's run is the RLHF recipe's reward model, as in the README's order."""

import json
import math
import runpy
import sys

import pytest

from tests.helpers import ROOT, load_tokenizer, pair_rows, write_pairs

RECIPES = ("sft", "reward", "dpo", "rlhf")  # in the order of the flywheel: rlhf uses the reward recipe's run
SMALL = ["--max_steps", "2", "--logging_steps", "1", "--save_steps", "2", "--eval_steps", "0", "--report_to", "none",
         "--lora_r", "4", "--lora_alpha", "8", "--warmup_steps", "0", "--seed", "0"]


def test_every_recipe_file_is_run_here():
    assert sorted(p.stem for p in (ROOT / "recipes").glob("*.py")) == sorted(RECIPES)


def run_recipe(name: str, *args: str) -> int:
    """`python recipes/NAME.py --config recipes/configs/NAME/smollm2_lora.yaml ARGS`, in this process."""
    config = ROOT / "recipes" / "configs" / name / "smollm2_lora.yaml"
    argv = sys.argv
    sys.argv = [str(ROOT / "recipes" / f"{name}.py"), "--config", str(config), *args]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:
        return exc.code
    finally:
        sys.argv = argv
    return 0


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("recipes")


@pytest.fixture(scope="module")
def pair_file(tiny_model_dir, runs_root):
    return write_pairs(runs_root / "pairs.jsonl", pair_rows(load_tokenizer(tiny_model_dir), n=8))


def recipe_args(name, tiny_model_dir, runs_root, pair_file):
    common = ["--model", str(tiny_model_dir), "--output_dir", str(runs_root / name), *SMALL]
    if name == "sft":
        return common + ["--eval_file", "none", "--max_train_samples", "8", "--max_length", "64",
                         "--per_device_train_batch_size", "4"]
    if name in ("dpo", "reward"):
        return common + ["--train_file", str(pair_file), "--eval_file", "none", "--max_length", "96",
                         "--max_prompt_length", "48", "--per_device_train_batch_size", "4",
                         "--gradient_accumulation_steps", "1"]
    return common + ["--reward_model", str(runs_root / "reward"), "--max_prompts", "4", "--eval_prompts_file", "none",
                     "--num_generations", "2", "--max_new_tokens", "4", "--per_device_train_batch_size", "4",
                     "--monitor", "false"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_end_to_end(name, tiny_model_dir, runs_root, pair_file, capsys):
    out = runs_root / name
    assert run_recipe(name, *recipe_args(name, tiny_model_dir, runs_root, pair_file)) == 0, capsys.readouterr().err
    assert f"saved to {out}" in capsys.readouterr().out  # the recipe's own summary
    version = json.loads((out / "version.json").read_text())
    assert version["method"] == name and (out / "adapter" / "adapter_config.json").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    from safetensors.torch import load_file

    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and any(bool(t.abs().sum() > 0) for t in lora_b)  # LoRA B starts at 0: nonzero once trained
