"""DPO with LoRA on preference pairs: ties kept, soft labels, per-example (importance) weights.

    python recipes/dpo.py --config recipes/configs/dpo/smollm2_lora.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/dpo.py --config recipes/configs/dpo/qwen2.5-0.5b_lora.yaml
    align dpo --config recipes/configs/dpo/smollm2_lora.yaml --max_steps 3 --output_dir runs/dpo-try

The policy is the starting model plus a LoRA adapter; the reference is the same model with the adapter disabled.
Any config key can be overridden on the command line (`--beta 0.05`); `--help` lists them all. The run directory
gets the adapter, checkpoints, metrics.jsonl, TensorBoard logs, config.yaml, version.json, a model card, and the
weighting diagnostics weights.json / weights.png. `--resume` continues from the last checkpoint.
"""

import sys

from align.commands import run_guarded
from align.runs import print_run_summary
from align.config import DPO_CONFIG, parse_config
from align.trainers.dpo import train_dpo


def main(argv: list[str]) -> None:
    from accelerate import PartialState

    # 1. parse: YAML config plus command-line overrides, validated
    model_args, lora_args, data_args, dpo_args, weighting_args, train_args = parse_config(
        DPO_CONFIG, argv, prog="recipes/dpo.py")
    # 2-4. build model + data (+ importance weights), train, save artefacts (align/trainers/dpo.py)
    out = train_dpo(model_args, lora_args, data_args, dpo_args, weighting_args, train_args)
    # 5. report (once, from the main process)
    if PartialState().is_main_process:
        print_run_summary(out)


if __name__ == "__main__":
    sys.exit(run_guarded(main, sys.argv[1:]))
