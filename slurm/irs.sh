#!/bin/bash
# Instruction-relevance score of every teacher layer on one GPU node: prints the table, writes irs.json
# and irs.png, names the IVA layer. Usage: sbatch slurm/irs.sh --model <teacher dir> --data <llava json> --out <dir> [...]
# (the arguments of `aligntI irs`; `--chat-template llava_v1` for the paper's models).
#SBATCH --job-name=aligntI-irs
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out

# shellcheck source=slurm/launch.sh
. "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"
run_on_nodes -m aligntI.cli irs "$@"
