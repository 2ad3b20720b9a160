"""Teacher-only probe on GridRead's validation split: how a setting (task options, teacher steps) trains the teacher.

    python recipes/mini/gridread_teacher_probe.py NAME STEPS [KEY=VALUE ...] [+OVERRIDE=VALUE ...]

KEY=VALUE: a GridRead task option (as ``--task-option``, on top of the reproduction's GridRead defaults);
+OVERRIDE=VALUE: a recipes/train.py override of the teacher job. Runs the reproduction's teacher job (2 ranks)
into runs/probes/NAME and prints the validation exact match per question type. The test split is not read.
"""

import json
import sys
import time
from pathlib import Path

import reproduce as R

name, steps, *rest = sys.argv[1:]
opts = [o for o in rest if "=" in o and not o.startswith("+")]
extra = [o[1:] for o in rest if o.startswith("+")]
task = R.make_task("gridread", opts, quick=False)
preset = R.Preset(seeds=1, student_steps=1, teacher_steps=int(steps), sweep_seeds=1, heatmap_samples=1)
rep = R.Reproduction(out=R.REPO / "runs" / "probes" / name, preset=preset, task=task)
start = time.time()
rep.prepare_data()
print(f"data {time.time() - start:.0f} s", flush=True)
job = rep.teacher_job()
job.overrides += extra
scheduler = R.Scheduler(slots=1, threads=1, log_dir=rep.out / "logs")
scheduler.add(job)
start = time.time()
scheduler.run()
scores = json.loads(Path(rep.teacher_dir, "eval", "val_scores.json").read_text())
print(name, steps, opts, extra, f"{time.time() - start:.0f}s", {k: round(v["accuracy"], 1) for k, v in scores.items()})
