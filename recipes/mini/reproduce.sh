#!/usr/bin/env bash
# The paper's component table in miniature on the CPU example: DigitGrid data, teacher SFT once (2 CPU ranks), then the
# rows student SFT, vanilla KD (temperature chosen on the validation split), uniform visual KD, +IVA, +TPA and Align-TI
# over 5 seeds (side by side, one single-rank DeepSpeed job per core), each scored on the held-out test split.
# Writes runs/mini/reproduce/{results.md,results.json,results.png,attention_maps/}; about 40 minutes on 2 CPU cores,
# `--quick` (teacher 1000 steps, 2 seeds, 200 steps) under 10. Rerunning continues an interrupted reproduction.
# Needs: `pip install -e ".[dev]"`. Options: see `python recipes/mini/reproduce.py --help` (--seeds, --steps,
# --ranks-per-job, --out; --task gridread [--task-option KEY=VALUE]: the table on GridRead, with its mechanisms).
# Command: bash recipes/mini/reproduce.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python recipes/mini/reproduce.py "$@"
