#!/bin/bash
# Distil a student from a recipe with a teacher (Align-TI, KD and every ablation row under recipes/paper/) on a
# SLURM allocation: one task per node, srun -> torchrun (one rank per GPU), c10d rendezvous on the first node.
# Requeues itself after a checkpoint when SLURM signals the time limit (USR1, 10 min ahead) and resumes.
# Usage: sbatch [--nodes=N] slurm/distill.sh recipes/<...>.yaml [dotted.key=value ...]
#SBATCH --job-name=aligntI-distill
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

# shellcheck source=slurm/launch.sh
. "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"
train_recipe "${1:?usage: sbatch slurm/distill.sh <recipe.yaml> [key=value ...]}" "${@:2}"
