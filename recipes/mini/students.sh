#!/usr/bin/env bash
# The CPU example's distillation rows: student SFT, vanilla KD, uniform visual KD, +IVA, +TPA and Align-TI, each on 2 CPU ranks
# with ZeRO-3 from the teacher of `bash recipes/mini/run.sh`, then a table of held-out exact match.
# Needs: runs/mini/teacher/final (`bash recipes/mini/run.sh`). About 7 minutes per row on 2 CPU cores (16 for the TPA rows).
# Command: bash recipes/mini/students.sh [dotted.key=value overrides applied to every row, e.g. seed=1]
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ ! -f runs/mini/teacher/final/config.json ]; then
  echo "no teacher at runs/mini/teacher/final: run bash recipes/mini/run.sh first" >&2
  exit 1
fi
if [ ! -f data/digitgrid/models/student_init/config.json ]; then
  aligntI init-model --spec recipes/mini/models/student.yaml --tokenizer data/digitgrid/tokenizer \
    --vision-from runs/mini/teacher/final --out data/digitgrid/models/student_init
fi
rows=(student_sft vanilla_kd visual_kd_uniform iva_only tpa_only align_ti)
for row in "${rows[@]}"; do
  deepspeed --num_gpus 2 recipes/train.py --config "recipes/mini/$row.yaml" "$@"
done
python - "${rows[@]}" <<'PY'
import json, sys
print(f"{'row':<20}{'all':>7}{'pos':>7}{'read':>7}{'sum':>7}{'odd':>7}")
for row in sys.argv[1:]:
    s = json.load(open(f"runs/mini/{row}/eval/test_scores.json"))
    print(f"{row:<20}" + "".join(f"{s[k]['accuracy']:>7.1f}" for k in ("all", "pos", "read", "sum", "odd")))
PY
