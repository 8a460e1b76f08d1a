"""RLHF with LoRA: RLOO (default) or GRPO against a trained reward model, with a reward-hacking monitor.

    python recipes/rlhf.py --config recipes/configs/rlhf/smollm2_lora.yaml
    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/rlhf.py --config recipes/configs/rlhf/qwen2.5-0.5b_lora.yaml
    align rlhf --config recipes/configs/rlhf/smollm2_lora.yaml --max_steps 2 --max_prompts 16 --output_dir runs/rlhf-try

The policy starts from `model` (an SFT run directory, usually) with a fresh LoRA adapter; the reference is the same
model with the adapter disabled. The reward is the reward model's score normalised with its saved mean/std, minus an
optional per-token length penalty; the KL penalty has a fixed `beta`, or an adaptive one steered toward `kl_target`
(Ziegler et al. 2019). Every `eval_steps` steps greedy answers to held-out task prompts are scored by their gold
checks (`eval/gold_reward`); the monitor (align/monitor.py) flags proxy-up/gold-down, KL over budget, and runaway
length or repetition, and `--audit_db URL` sends the highest-reward samples to the labeling store as audit pairs.

PPO with a value head is not offered: TRL removed its PPOTrainer, and RLOO/GRPO need no value model.

Run directory: adapter/, checkpoints/ (`--resume` continues), metrics.jsonl, TensorBoard logs, config.yaml,
monitor.json, version.json (method "rlhf") and a model card.
"""

import sys

from align.commands import run_guarded
from align.runs import print_run_summary
from align.config import RLHF_CONFIG, parse_config
from align.trainers.rlhf import train_rlhf


def main(argv: list[str]) -> None:
    from accelerate import PartialState

    # 1. parse: YAML config plus command-line overrides, validated
    model_args, lora_args, data_args, rlhf_args, monitor_args, train_args = parse_config(
        RLHF_CONFIG, argv, prog="recipes/rlhf.py")
    # 2-4. policy + reward model + prompts, online RL with the monitor, save (align/trainers/rlhf.py)
    out = train_rlhf(model_args, lora_args, data_args, rlhf_args, monitor_args, train_args)
    # 5. report (once, from the main process)
    if PartialState().is_main_process:
        print_run_summary(out)


if __name__ == "__main__":
    sys.exit(run_guarded(main, sys.argv[1:]))
