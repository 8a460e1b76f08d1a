"""Reward model: a scalar head on a causal LM, LoRA, Bradley–Terry with margins, ties and per-example weights.

    python recipes/reward.py --config recipes/configs/reward/smollm2_lora.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/reward.py --config recipes/configs/reward/qwen2.5-0.5b_lora.yaml
    align reward --config recipes/configs/reward/smollm2_lora.yaml --max_steps 3 --output_dir runs/rm-try

Any config key can be overridden on the command line; `--help` lists them all. Besides the usual run artefacts
the directory gets reward_stats.json (reward mean/std over the training set, for normalisation) and the
weighting diagnostics. Load it back with `align.trainers.reward.load_reward_model(run_dir)`.
"""

import sys

from align.commands import run_guarded
from align.runs import print_run_summary
from align.config import REWARD_CONFIG, parse_config
from align.trainers.reward import train_reward


def main(argv: list[str]) -> None:
    from accelerate import PartialState

    # 1. parse: YAML config plus command-line overrides, validated
    model_args, lora_args, data_args, reward_args, weighting_args, train_args = parse_config(
        REWARD_CONFIG, argv, prog="recipes/reward.py")
    # 2-4. build the classifier + data (+ importance weights), train, save (align/trainers/reward.py)
    out = train_reward(model_args, lora_args, data_args, reward_args, weighting_args, train_args)
    # 5. report (once, from the main process)
    if PartialState().is_main_process:
        print_run_summary(out)


if __name__ == "__main__":
    sys.exit(run_guarded(main, sys.argv[1:]))
