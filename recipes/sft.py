"""Supervised fine-tuning with LoRA on chat data (loss on assistant tokens only).

    python recipes/sft.py --config recipes/configs/sft/smollm2_lora.yaml
    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/sft.py --config recipes/configs/sft/qwen2.5-0.5b_lora.yaml
    align sft --config recipes/configs/sft/smollm2_lora.yaml --max_steps 3 --output_dir runs/sft-try

Any config key can be overridden on the command line (`--learning_rate 1e-4`); `--help` lists them all.
The run directory gets the adapter, checkpoints, metrics.jsonl, TensorBoard logs, config.yaml,
version.json and a model card. `--resume` continues from the last checkpoint.
"""

import sys

from align.commands import run_guarded
from align.runs import print_run_summary
from align.config import SFT_CONFIG, parse_config
from align.trainers.sft import train_sft


def main(argv: list[str]) -> None:
    # 1. parse: YAML config plus command-line overrides, validated
    model_args, lora_args, data_args, train_args = parse_config(SFT_CONFIG, argv, prog="recipes/sft.py")
    # 2-4. build model + data, train, save artefacts (align/trainers/sft.py)
    out = train_sft(model_args, lora_args, data_args, train_args)
    # 5. report
    print_run_summary(out)


if __name__ == "__main__":
    sys.exit(run_guarded(main, sys.argv[1:]))
