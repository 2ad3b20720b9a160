#!/usr/bin/env bash
# The CPU example end to end: DigitGrid data and tokenizer -> random tiny teacher -> ZeRO-3 SFT on 2 CPU ranks
# -> exact-match accuracy on the held-out test split -> reload of the exported HF model in a fresh process.
# Needs: `pip install -e ".[dev]"` (scikit-learn ships the digit images). About 15 minutes on 2 CPU cores.
# Command: bash recipes/mini/run.sh [dotted.key=value overrides for recipes/mini/teacher_sft.yaml]
set -euo pipefail
cd "$(dirname "$0")/../.."

aligntI digitgrid --out data/digitgrid
if [ ! -f data/digitgrid/models/teacher_init/config.json ]; then
  aligntI init-model --spec recipes/mini/models/teacher.yaml --tokenizer data/digitgrid/tokenizer \
    --out data/digitgrid/models/teacher_init
fi
deepspeed --num_gpus 2 recipes/train.py --config recipes/mini/teacher_sft.yaml "$@"
# What a user of the checkpoint does: load the exported directory with transformers and generate.
aligntI eval --model runs/mini/teacher/final --data data/digitgrid/test.json
