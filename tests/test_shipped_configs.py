"""Every YAML under recipes/configs/ runs one step as shipped: its data paths exist in the repository and every key
works. Only the model is swapped for the tiny one (and RLHF's reward model for a tiny reward run), the run
directory is a temporary one, and evaluation sets are capped so the test stays fast."""

import json
from pathlib import Path

import pytest

from align.config import DPO_CONFIG, REWARD_CONFIG, RLHF_CONFIG, SFT_CONFIG, parse_config

CONFIG_TYPES = {"sft": SFT_CONFIG, "dpo": DPO_CONFIG, "reward": REWARD_CONFIG, "rlhf": RLHF_CONFIG}

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").rglob("*.yaml"))


def train_function(method):
    from align.trainers.dpo import train_dpo
    from align.trainers.reward import train_reward
    from align.trainers.rlhf import train_rlhf
    from align.trainers.sft import train_sft

    return {"sft": train_sft, "dpo": train_dpo, "reward": train_reward, "rlhf": train_rlhf}[method]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_runs_one_step(path, tiny_model_dir, reward_run, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name data by paths relative to the repository
    method = path.parent.name
    argv = ["--config", str(path), "--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "run"),
            "--max_steps", "1"]
    if "bfloat16" in path.read_text():  # a GPU config: on a CPU the same run in float32
        argv += ["--dtype", "float32"]
    if method == "rlhf":
        argv += ["--reward_model", str(reward_run), "--eval_per_family", "1", "--max_new_tokens", "8",
                 "--max_prompts", "16"]
    else:
        argv += ["--max_eval_samples", "8", "--max_train_samples", "32"]
    configs = parse_config(CONFIG_TYPES[method], argv)
    data = configs[2]
    for key in ("train_file", "eval_file", "prompts_file", "eval_prompts_file"):
        value = getattr(data, key, None)
        assert value is None or (ROOT / value).is_file(), f"{path.name}: {key} {value} is not shipped"
    out = train_function(method)(*configs)
    record = json.loads((out / "version.json").read_text())
    assert record["method"] == method and record["metrics"]["global_step"] == 1
