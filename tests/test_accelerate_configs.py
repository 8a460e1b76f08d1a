"""recipes/accelerate: every YAML loads with accelerate's own config loader and says what it is for; the FSDP2 one
builds accelerate's FSDP plugin and wraps a LoRA model one decoder layer per unit; ZeRO builds its DeepSpeed config
(no deepspeed package needed); the SLURM script is valid bash; every config the docs name exists."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "accelerate"

EXPECTED = {  # file -> (distributed_type, num_machines, num_processes)
    "single_gpu.yaml": ("NO", 1, 1),
    "ddp.yaml": ("MULTI_GPU", 1, 8),
    "fsdp2.yaml": ("FSDP", 1, 8),
    "zero2.yaml": ("DEEPSPEED", 1, 8),
    "zero3.yaml": ("DEEPSPEED", 1, 8),
    "multi_node.yaml": ("FSDP", 2, 16),
}


def load(name: str):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    assert isinstance(config, ClusterConfig)  # unknown top-level keys would raise in the loader
    return config


def test_the_expected_configs_exist():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerate(name):
    kind, machines, processes = EXPECTED[name]
    config = load(name)
    assert config.distributed_type.value == kind
    assert (config.num_machines, config.num_processes) == (machines, processes)
    assert config.compute_environment.value == "LOCAL_MACHINE" and config.use_cpu is False
    # Precision follows the model dtype: the recipes turn bf16 on; the YAML must not force it on every GPU.
    assert config.mixed_precision == "no"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_plugin_keys_are_known_launch_options(name):
    """accelerate copies fsdp_config / deepspeed_config keys onto its launch arguments without checking them: a typo
    would be silently ignored. Every key must be an `accelerate launch` option."""
    from accelerate.commands.launch import launch_command_parser

    options = {a.dest for a in launch_command_parser()._actions}
    config = load(name)
    for key in {**config.fsdp_config, **config.deepspeed_config}:
        assert key in options, f"{name}: {key} is not an accelerate launch option"


def test_fsdp2_full_shard_lora_aware_sharded_checkpoints(monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    from align.config import LoraArgs
    from align.models import apply_lora, tiny_model

    fsdp = load("fsdp2.yaml").fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # full shard
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp  # read from the model's _no_split_modules
    # DPO and the reward model score the data with the unsharded model before prepare(): weights on every rank.
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is False
    assert load("multi_node.yaml").fsdp_config == fsdp

    # What `accelerate launch --config_file fsdp2.yaml` puts in each process's environment, then the plugin
    # Accelerator() builds from it.
    args, _, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(CONFIGS / "fsdp2.yaml"), "train.py"]))
    assert args.use_fsdp
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"

    # LoRA-aware wrapping: on a peft model the policy picks exactly the decoder layers, each of which holds its frozen
    # base weights and its trainable LoRA matrices (FSDP2 shards per parameter, so the mix is fine).
    model = apply_lora(tiny_model(), LoraArgs(lora_r=4, lora_dropout=0.0))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    units = [name for name, module in model.named_modules() if policy(module)]
    assert units == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]
    for name in units:
        layer = model.get_submodule(name)
        flags = {p.requires_grad for p in layer.parameters()}
        assert flags == {True, False}


@pytest.mark.parametrize("name, stage", [("zero2.yaml", 2), ("zero3.yaml", 3)])
def test_deepspeed_configs(name, stage):
    from accelerate.utils import DeepSpeedPlugin

    ds = load(name).deepspeed_config
    assert ds["zero_stage"] == stage
    # Left to "auto": SFT fills them from the recipe's config, our loop accumulates itself.
    assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds
    keys = ("zero_stage", "offload_optimizer_device", "offload_param_device", "zero3_init_flag",
            "zero3_save_16bit_model")
    plugin = DeepSpeedPlugin(**{k: ds[k] for k in keys if k in ds})
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == stage
    if stage == 3:
        # Whole weights on every rank until prepare() (DPO/reward score the data first); a 16-bit gathered save.
        assert plugin.zero3_init_flag is False
        assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_multi_node_example():
    config = load("multi_node.yaml")
    assert config.main_process_ip and config.main_process_port == 29500 and config.rdzv_backend == "static"
    assert config.num_processes == 8 * config.num_machines  # num_processes is the total over nodes


def test_slurm_script():
    script = CONFIGS / "slurm_multinode.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "recipes/accelerate/multi_node.yaml" in text
    for flag in ("--machine_rank \"$SLURM_NODEID\"", "--main_process_ip", "--main_process_port", "--num_machines"):
        assert flag in text, flag
    assert "scontrol show hostnames" in text  # the main process is the allocation's first node


def test_every_config_the_docs_name_exists():
    named = set()
    for path in [ROOT / "README.md", ROOT / "docs" / "scaling.md", *ROOT.glob("recipes/*.py")]:
        if path.is_file():
            named |= set(re.findall(r"recipes/accelerate/([\w.-]+\.(?:yaml|sh))", path.read_text()))
    assert named, "no recipes/accelerate file named in the docs"
    missing = sorted(n for n in named if not (CONFIGS / n).is_file())
    assert missing == []
