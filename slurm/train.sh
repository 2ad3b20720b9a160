#!/bin/bash
# Train from a recipe on a SLURM allocation: one task per node, `srun` starts `torchrun`, which starts one
# rank per GPU; ranks rendezvous (c10d) on the first node of the allocation.
# Usage: sbatch --nodes=2 slurm/train.sh recipes/<...>.yaml [dotted.key=value ...]
#SBATCH --job-name=aligntI
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

RECIPE=${1:?usage: sbatch slurm/train.sh <recipe.yaml> [key=value ...]}
shift
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
mkdir -p logs

# Quoted so that SLURM_PROCID etc. expand inside each task, not here.
srun --kill-on-bad-exit=1 --wait=60 bash -c "torchrun \
  --nnodes $SLURM_NNODES --nproc_per_node $GPUS_PER_NODE \
  --rdzv_id $SLURM_JOB_ID --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:$MASTER_PORT \
  --max_restarts 0 --tee 3 \
  recipes/train.py --config $RECIPE $*"
