#!/usr/bin/env bash
# The CPU example end to end: DigitGrid data and tokenizer -> tiny teacher trained with ZeRO-3 SFT on 2 CPU ranks
# (reused when runs/mini/teacher/final exists) -> Align-TI distillation into a smaller student (IVA + TPA, ZeRO-3,
# 2 CPU ranks) -> exact match of teacher and distilled student on the held-out test split, each reloaded from its
# exported HF directory in a fresh process.
# Needs: `pip install -e ".[dev]"` (scikit-learn ships the digit images). About 30 minutes on 2 CPU cores with a
# fresh teacher, 17 with a reused one.
# Command: bash recipes/mini/run.sh [dotted.key=value overrides for recipes/mini/align_ti.yaml]
set -euo pipefail
cd "$(dirname "$0")/../.."

aligntI digitgrid --out data/digitgrid
if [ -f runs/mini/teacher/final/config.json ]; then
  echo "[run.sh] reusing the teacher in runs/mini/teacher/final (delete runs/mini/teacher to retrain it)"
else
  if [ ! -f data/digitgrid/models/teacher_init/config.json ]; then
    aligntI init-model --spec recipes/mini/models/teacher.yaml --tokenizer data/digitgrid/tokenizer \
      --out data/digitgrid/models/teacher_init
  fi
  deepspeed --num_gpus 2 recipes/train.py --config recipes/mini/teacher_sft.yaml
fi
if [ ! -f data/digitgrid/models/student_init/config.json ]; then
  aligntI init-model --spec recipes/mini/models/student.yaml --tokenizer data/digitgrid/tokenizer \
    --vision-from runs/mini/teacher/final --out data/digitgrid/models/student_init
fi
deepspeed --num_gpus 2 recipes/train.py --config recipes/mini/align_ti.yaml "$@"

# What a user of the checkpoints does: load each exported directory with transformers and generate.
aligntI eval --model runs/mini/teacher/final --data data/digitgrid/test.json
aligntI eval --model runs/mini/align_ti/final --data data/digitgrid/test.json
python - <<'PY'
import json
print(f"\n{'model':<34}{'all':>7}{'pos':>7}{'read':>7}{'sum':>7}{'odd':>7}")
for name, run in (("teacher (SFT)", "teacher"), ("student (Align-TI)", "align_ti")):
    s = json.load(open(f"runs/mini/{run}/final/eval/test_scores.json"))
    print(f"{name:<34}" + "".join(f"{s[k]['accuracy']:>7.1f}" for k in ("all", "pos", "read", "sum", "odd")))
PY
