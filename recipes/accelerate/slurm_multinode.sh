#!/bin/bash
# Two nodes x 8 GPUs under SLURM: one `accelerate launch` per node, each starting 8 processes.
#   sbatch recipes/accelerate/slurm_multinode.sh recipes/sft.py --config recipes/configs/sft/qwen2.5-0.5b_lora.yaml
# Any recipe and its arguments follow the script name. The run directory (output_dir) must be on a file system
# that every node sees: only global rank 0 writes artefacts, but every rank reads checkpoints on --resume.
#SBATCH --job-name=align
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; accelerate starts the per-GPU processes
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=%x-%j.out

set -euo pipefail

if [ "$#" -lt 1 ]; then
    echo "usage: sbatch $0 RECIPE.py [--config FILE] [--key value ...]" >&2
    exit 2
fi

# Run from the repository root (sbatch copies the script elsewhere, so SLURM_SUBMIT_DIR, not $0, locates it).
cd "${SLURM_SUBMIT_DIR:-.}"
CONFIG_FILE=${CONFIG_FILE:-recipes/accelerate/multi_node.yaml}   # export CONFIG_FILE=... to pick another
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

# The rendezvous: the first node of the allocation, a port derived from the job id (two jobs sharing a node
# do not collide).
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PROCESS_PORT=$((20000 + SLURM_JOB_ID % 20000))
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

export NCCL_ASYNC_ERROR_HANDLING=1   # a dead rank fails the job instead of hanging it

echo "align: $SLURM_NNODES nodes x $GPUS_PER_NODE GPUs, main $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT, config $CONFIG_FILE"

# srun starts one task per node; SLURM_NODEID (0..N-1) is evaluated on each node, hence the single quotes.
srun --kill-on-bad-exit=1 bash -c '
    accelerate launch \
        --config_file "$0" \
        --num_machines "$SLURM_NNODES" \
        --num_processes "$1" \
        --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$2" \
        --main_process_port "$3" \
        --rdzv_backend static \
        "${@:4}"
' "$CONFIG_FILE" "$NUM_PROCESSES" "$MAIN_PROCESS_IP" "$MAIN_PROCESS_PORT" "$@"
