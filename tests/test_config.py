"""Typed configs: YAML + overrides, unknown keys named with a suggestion, every shipped YAML parses."""

from pathlib import Path

import pytest

from align.config import DPO_CONFIG, REWARD_CONFIG, RLHF_CONFIG, SFT_CONFIG, LoraArgs, TrainArgs, parse_config
from align.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIG_TYPES = {"sft": SFT_CONFIG, "dpo": DPO_CONFIG, "reward": REWARD_CONFIG, "rlhf": RLHF_CONFIG}


def test_yaml_then_command_line_wins(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_r: 8\nlearning_rate: 1.0e-3\nlora_target_modules: [q_proj, v_proj]\n")
    model, lora, data, train = parse_config(SFT_CONFIG, ["--config", str(cfg), "--lora_r", "4"])
    assert lora.lora_r == 4  # command line beats YAML
    assert train.learning_rate == pytest.approx(1e-3)  # YAML beats the dataclass default
    assert lora.lora_target_modules == ["q_proj", "v_proj"]
    assert model.model == "smollm2-135m-instruct"  # default kept


def test_unknown_yaml_key_is_named_with_suggestion(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'lerning_rate' in .*c.yaml; did you mean 'learning_rate'"):
        parse_config(SFT_CONFIG, ["--config", str(cfg)])


def test_unknown_cli_key_is_named_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'max_step' on the command line; did you mean 'max_steps'"):
        parse_config(SFT_CONFIG, ["--max_step", "3"])


def test_yaml_values_are_type_checked(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dtype: float64\n")
    with pytest.raises(ConfigError, match="dtype: 'float64' is not one of"):
        parse_config(SFT_CONFIG, ["--config", str(cfg)])
    cfg.write_text("lora_r: 1.5\n")
    with pytest.raises(ConfigError, match="lora_r must be an integer"):
        parse_config(SFT_CONFIG, ["--config", str(cfg)])
    cfg.write_text("use_lora: maybe\n")
    with pytest.raises(ConfigError, match="use_lora"):
        parse_config(SFT_CONFIG, ["--config", str(cfg)])


def test_ranges_are_validated():
    with pytest.raises(ConfigError, match="lora_dropout must be in"):
        LoraArgs(lora_dropout=1.5)
    with pytest.raises(ConfigError, match="learning_rate must be > 0"):
        TrainArgs(learning_rate=0)
    with pytest.raises(ConfigError, match="max_steps must be -1 or > 0"):
        TrainArgs(max_steps=0)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(SFT_CONFIG, ["--config", str(tmp_path / "missing.yaml")])
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lora_r: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config(SFT_CONFIG, ["--config", str(cfg)])


def test_bad_cli_value_is_one_line_error():
    with pytest.raises(ConfigError, match="invalid int value"):
        parse_config(SFT_CONFIG, ["--max_steps", "many"])


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_parses(path):
    method = path.parent.name
    assert method in CONFIG_TYPES, f"no config types registered for recipes/configs/{method}"
    parse_config(CONFIG_TYPES[method], ["--config", str(path)])


@pytest.mark.parametrize("argv, key", [
    (["--weighting_clip", "nan"], "weighting_clip"),
    (["--learning_rate", "inf"], "learning_rate"),
    (["--learning_rate", "nan"], "learning_rate"),
    (["--num_train_epochs", "-3"], "num_train_epochs"),
    (["--num_train_epochs", "0"], "num_train_epochs"),
    (["--max_grad_norm", "-1"], "max_grad_norm"),
    (["--report_to", "bogus"], "report_to"),
    (["--lr_scheduler_type", "bogus"], "lr_scheduler_type"),
    (["--lr_scheduler_type", "reduce_lr_on_plateau"], "lr_scheduler_type"),  # needs a metric our loops never pass
    (["--warmup_steps", "-1"], "warmup_steps"),
    (["--warmup_steps", "2.5"], "warmup_steps"),
    (["--weight_decay", "-0.1"], "weight_decay"),
    (["--beta", "nan"], "beta"),
])
def test_meaningless_values_are_refused_naming_the_key(argv, key):
    with pytest.raises(ConfigError, match=rf"(^|argument --){key}\b"):
        parse_config(DPO_CONFIG, argv)


def test_meaningful_edge_values_still_parse():
    *_, train = parse_config(DPO_CONFIG, ["--max_grad_norm", "0", "--warmup_steps", "5",
                                          "--lr_scheduler_type", "constant_with_warmup", "--report_to", "none"])
    assert train.max_grad_norm == 0 and train.warmup_steps == 5 and train.lr_scheduler_type == "constant_with_warmup"
