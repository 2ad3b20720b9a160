#!/bin/bash
# Greedy-generation evaluation of an exported model (a run's final/) on one GPU node, questions sharded over its GPUs.
# Usage: sbatch slurm/eval.sh --config recipes/eval/paper_benchmarks.yaml [key=value ...]   (the six benchmarks)
#        sbatch slurm/eval.sh --model <run_dir>/final --bench pope --data <questions> --images <dir> --annotations <dir>
#   (the arguments of `aligntI eval`; add --zero3 for a model that one GPU cannot hold)
#SBATCH --job-name=aligntI-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out

# shellcheck source=slurm/launch.sh
. "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"
run_on_nodes -m aligntI.cli eval "$@"
