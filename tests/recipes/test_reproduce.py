"""`recipes/mini/reproduce.py` end to end at a few steps, and the rules it relies on (skips, temperature choice,
report)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import launch_env
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "recipes" / "mini" / "reproduce.py"
sys.path.insert(0, str(DRIVER.parent))  # what running the driver as a script does

from reproduce import GRIDREAD_EXTRA, METHODS, Job, make_task, task_rows  # noqa: E402
from reproduce_report import fixed_samples, mean_std, paired_difference  # noqa: E402


def test_a_job_is_skipped_only_when_finished_with_the_same_settings(tmp_path):
    job = Job("sft/seed0", tmp_path / "run", "recipes/mini/student_sft.yaml", ["seed=0"], ranks=1)
    assert not job.finished()
    (job.run_dir / "final").mkdir(parents=True)
    (job.run_dir / "final" / "config.json").write_text("{}")
    assert not job.finished()  # exported, but no record of how
    (job.run_dir / "job.json").write_text(json.dumps({"settings": job.settings, "seconds": 1.0}))
    assert job.finished()
    other = Job("sft/seed0", job.run_dir, job.recipe, ["seed=0", "train.max_steps=9"], ranks=1)
    assert not other.finished()  # other settings: run again, never reuse
    # ... and never resume the other settings' checkpoints: the run directory starts afresh.
    (job.run_dir / "checkpoints" / "step_00000400").mkdir(parents=True)
    other.start_fresh_unless_same()
    assert not (job.run_dir / "checkpoints").exists() and not (job.run_dir / "final").exists()
    assert json.loads((job.run_dir / "job.json").read_text()) == {"settings": other.settings}
    assert not other.finished()  # started, not finished
    (job.run_dir / "checkpoints").mkdir()  # an interrupted run with the same settings keeps its checkpoints
    other.start_fresh_unless_same()
    assert (job.run_dir / "checkpoints").is_dir()
    assert job.command()[1:] == ["recipes/train.py", "--config", "recipes/mini/student_sft.yaml", "seed=0"]
    two = Job("x", job.run_dir, job.recipe, [], ranks=2).command()
    assert two[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def test_report_statistics_by_hand():
    assert mean_std([70.0, 74.0, 72.0]) == (72.0, 2.0)  # sample std: sqrt((4 + 4 + 0) / 2)
    assert mean_std([5.0]) == (5.0, 0.0)
    d = paired_difference([80.0, 82.0, 90.0], [78.0, 81.0, 85.0])
    assert d["per_seed"] == [2.0, 1.0, 5.0] and d["mean"] == pytest.approx(8 / 3)
    # paired t = mean / (sd / sqrt(3)); sd of (2, 1, 5) = sqrt(13/3); t = 2.2188, two-sided p with 2 dof = 0.1566
    assert d["p_value"] == pytest.approx(0.1566, abs=1e-3)
    assert d["se"] == pytest.approx((13 / 3) ** 0.5 / 3**0.5)
    # Two seeds whose differences agree up to rounding (per-question accuracies on the same 89 questions) are
    # no evidence of anything: no p-value, where a t-test on the rounding error would give p = 1e-15.
    same = paired_difference([17.696629213483146, 16.292134831460675], [17.134831460674157, 15.730337078651685])
    assert same["mean"] == pytest.approx(50 / 89) and math.isnan(same["p_value"])


def test_heatmap_questions_are_the_first_of_each_type(tmp_path):
    records = [{"category": c} for c in ("sum", "pos", "pos", "read", "odd", "pos", "odd", "sum", "read")]
    (tmp_path / "t.json").write_text(json.dumps(records))
    assert fixed_samples(tmp_path / "t.json", 2, ("pos", "read", "sum", "odd")) == [0, 1, 2, 3, 4, 6, 7, 8]


@pytest.mark.distributed
def test_reproduce_runs_every_row_over_seeds_and_reports(tmp_path):
    out = tmp_path / "repro"
    cmd = [sys.executable, str(DRIVER), "--seeds", "2", "--steps", "3", "--teacher-steps", "4", "--out", str(out)]
    # Run from elsewhere: the driver finds the repository from its own path, never from the working directory.
    proc = subprocess.run(cmd, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in res["rows"]] == [m.key for m in METHODS]
    assert all(len(r["per_seed"]) == 2 for r in res["rows"])
    kd_row = next(r for r in res["rows"] if r["key"] == "vanilla_kd")
    assert kd_row["run_dirs"] == [f"vanilla_kd_T{res['kd_temperature']:g}/seed{s}" for s in (0, 1)]

    # Every student job ran with its seed, its own initial weights and the teacher; the seeds' weights differ.
    job = json.loads((out / "align_ti" / "seed1" / "job.json").read_text())["settings"]
    assert {"seed=1", f"model.path={out / 'init' / 'student_seed1'}", "train.max_steps=3",
            f"teacher.path={out / 'teacher' / 'final'}"} <= set(job["overrides"])
    w0, w1 = ((out / "init" / f"student_seed{s}" / "model.safetensors").read_bytes() for s in (0, 1))
    assert w0 != w1

    # The vanilla-KD temperature is the best mean of the sweep runs' own validation files (ties: the lower T).
    val = {t: [json.loads((out / f"vanilla_kd_T{t:g}" / "seed0" / "eval" / "val_scores.json").read_text())
               ["all"]["accuracy"]] for t in (1.0, 2.0, 4.0)}
    assert res["kd_temperature"] == max(val, key=lambda t: (val[t][0], -t))
    assert (out / f"vanilla_kd_T{res['kd_temperature']:g}" / "seed1" / "final").is_dir()

    # A table entry equals a fresh `aligntI eval` of that model in another process.
    again = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "aligntI.cli", "eval", "--model", str(out / "tpa" / "seed1" / "final"),
                    "--data", "data/digitgrid/test.json", "--max-new-tokens", "8", "--out", str(again)],
                   cwd=REPO, env=launch_env(), check=True, capture_output=True)
    tpa = next(r for r in res["rows"] if r["key"] == "tpa")
    assert tpa["per_seed"][1] == json.loads((again / "test_scores.json").read_text())["all"]["accuracy"]

    md = (out / "results.md").read_text()
    for m in METHODS:
        assert m.label in md and (m.paper is None or f"{m.paper:.1f}" in md)
    assert "Align-TI − vanilla KD" in md and "IRS per teacher layer" in md
    for png in [out / "results.png", out / "attention_maps" / "overview.png"]:
        with Image.open(png) as im:
            assert im.size[0] > 400 and im.size[1] > 300
    maps = json.loads((out / "attention_maps" / "attention_maps.json").read_text())
    assert [s["id"] for s in maps["samples"]] == [f"test-{i:06d}" for i in fixed_samples(REPO / "data/digitgrid/test.json", 2,
                                                                                      ("pos", "read", "sum", "odd"))]
    assert set(maps["models"]) == {"teacher", "student before", "after SFT", "after Align-TI"}


def test_the_task_options_reach_the_data_models_and_recipes(tmp_path):
    task = make_task("gridread", ["grid=3", "mix=cell:1,grid:2"], quick=False)
    # The reproduction's GridRead setting (upscale 1: one vision token per cell) under the given options
    assert task.categories == ("cell", "grid") and task.options.image_size == 24
    assert task.max_new_tokens == 3 * 9 + 2  # the longest answer (every pair of a where) fits
    spec = task.spec("student", tmp_path)
    assert "image_size: 24" in spec.read_text()
    assert make_task("gridread", ["upscale=2"], quick=False).options.image_size == 64
    assert make_task("gridread", [], quick=False).options.mix == {"cell": 3, "row": 1, "column": 1, "grid": 2,
                                                                  "row_sums": 1}
    assert f"data.train.0.path={tmp_path / 'train.json'}" in task.overrides(tmp_path)
    assert make_task("gridread", [], quick=True).options.train_size == 8000
    assert make_task("digitgrid", [], quick=False).overrides(tmp_path) == []


@pytest.mark.parametrize("args, message", [
    (["--task", "gridread", "--task-option", "grid=12"], "grid must be 2..9"),
    (["--task-option", "grid=3"], "--task-option applies to --task gridread"),
    (["--rows", "sft,iva_attn"], "--rows: unknown rows ['iva_attn'] for digitgrid"),  # a GridRead-only row
    (["--task", "gridread", "--rows", ","], "--rows: no rows given"),
])
def test_bad_task_options_exit_2_with_one_message(args, message):
    proc = subprocess.run([sys.executable, str(DRIVER), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr


def test_rows_keep_the_table_order_whatever_order_they_are_given_in():
    assert [m.key for m in task_rows("gridread", ["tpa", "iva_attn", "sft"])] == ["sft", "tpa", "iva_attn"]
    assert task_rows("gridread") == METHODS + GRIDREAD_EXTRA and task_rows("digitgrid") == METHODS


@pytest.mark.distributed
def test_reproduce_some_rows_trains_and_reports_only_those(tmp_path):
    """``--rows`` without vanilla KD's sweep or the Align-TI row: no attention study, no capture, the checks
    whose rows both ran."""
    out = tmp_path / "repro"
    cmd = [sys.executable, str(DRIVER), "--task", "gridread", "--task-option", "train_size=200",
           "--task-option", "test_size=60", "--task-option", "val_size=20", "--seeds", "2", "--steps", "3",
           "--teacher-steps", "4", "--rows", "tpa,sft", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in res["rows"]] == ["sft", "tpa"]
    trained = sorted(d.name for d in out.iterdir() if (d / "seed0").is_dir())
    assert trained == ["sft", "tpa"]  # no other row, no temperature sweep
    assert res["kd_temperature"] is None and res["align_ti_minus_sft"] is None and res["attention"] is None
    mech = res["mechanisms"]
    assert mech["capture"] == {} and mech["checks"] == []  # every prediction compares a row that did not run
    assert set(mech["rows"]) == {"sft", "tpa"} and len(mech["rows"]["tpa"]["transition_kl"]) == 2
    md = (out / "results.md").read_text()
    assert "No attention study" in md and "Align-TI − vanilla KD" not in md
    with Image.open(out / "mechanisms.png") as im:
        assert im.size[0] > 800


@pytest.mark.distributed
def test_reproduce_on_gridread_reports_the_mechanisms(tmp_path):
    out = tmp_path / "repro"
    cmd = [sys.executable, str(DRIVER), "--task", "gridread", "--task-option", "train_size=200",
           "--task-option", "test_size=60", "--task-option", "val_size=20", "--seeds", "2", "--steps", "3",
           "--teacher-steps", "4", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads((out / "results.json").read_text())
    assert res["task_options"]["train_size"] == 200 and res["categories"][0] == "cell"
    mech = res["mechanisms"]
    assert {c["key"] for c in mech["checks"]} == {"iva_one_cell", "tpa_transition", "tpa_long", "align_ti_vs_iva",
                                                  "align_ti_vs_kd", "iva_as_one_cell", "align_ti_as_vs_kd",
                                                  "iva_attention_one_cell", "align_ti_attention_vs_kd",
                                                  "align_ti_attention_vs_iva"}
    assert all(len(mech["rows"][m.key]["transition_kl"]) == 2 for m in METHODS + GRIDREAD_EXTRA)
    assert set(mech["capture"]) == {"instruction", "answer_start"}  # the capture from either query rows
    rel = mech["capture"]["instruction"]["relevant"]
    assert rel["cells:1"]["token_share"] == pytest.approx(1 / 16)  # upscale 1: a cell is one of 16 vision tokens
    # The answer-start rows' jobs trained with that focus: their IRS calibration says so.
    assert json.loads((out / "align_ti_as" / "seed0" / "irs.json").read_text())["queries"] == "answer_start"
    assert json.loads((out / "align_ti" / "seed0" / "irs.json").read_text())["queries"] == "instruction"
    md = (out / "results.md").read_text()
    assert "## Predictions and what held" in md and "transition KL" in md
    assert (out / "attention_maps_answer_start" / "overview.png").is_file()
    assert json.loads((out / "attention_maps_answer_start" / "attention_maps.json").read_text())["queries"] == \
        "answer_start"
    with Image.open(out / "mechanisms.png") as im:
        assert im.size[0] > 1000


def test_gridread_recovery_reads_a_reproduction_folder(tmp_path):
    """The recovery diagnostic on a hand-made reproduction folder: two seeds of two rows and a teacher."""
    refs = {"a": "1 2 , 3 4", "b": "5 6 , 7 8", "c": "9"}
    records = [{"id": i, "category": "cell" if i == "c" else "two_rows", "item_sep": "space"} for i in refs]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.json").write_text(json.dumps(records))
    predictions = {  # per model: the predictions of a and b (c, a cell question, is left out by --categories)
        "vanilla_kd_T2/seed0": ("1 9 , 3 4", "0 6 , 7 8"),  # wrong at 2, then 2 of 2 right; at 1, then 3 of 3
        "vanilla_kd_T2/seed1": ("1 9 , 0 0", "5 6 , 7 8"),  # wrong at 2, then 0 of 2 right; b right
        "tpa/seed0": ("1 2 , 3 4", "5 6 , 7 8"),
        "tpa/seed1": ("1 2 , 3 0", "5 6 , 7 8"),  # wrong at 4, nothing after it
        "teacher": ("1 2 , 3 4", "5 6 , 7 8"),
    }
    for name, (pa, pb) in predictions.items():
        folder = tmp_path / name / "final" / "eval"
        folder.mkdir(parents=True)
        lines = [{"id": "a", "prediction": pa, "reference": refs["a"]},
                 {"id": "b", "prediction": pb, "reference": refs["b"]},
                 {"id": "c", "prediction": "0", "reference": "9"}]
        (folder / "test_predictions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "results.json").write_text(json.dumps({
        "rows": [{"key": "vanilla_kd", "label": "Vanilla KD (T=2)",
                  "run_dirs": ["vanilla_kd_T2/seed0", "vanilla_kd_T2/seed1"]},
                 {"key": "tpa", "label": "+TPA", "run_dirs": ["tpa/seed0", "tpa/seed1"]}],
        "teacher_dir": "teacher", "categories": ["cell", "two_rows"]}))
    proc = subprocess.run([sys.executable, str(DRIVER.parent / "gridread_recovery.py"), "--run", str(tmp_path),
                           "--categories", "two_rows"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # Vanilla KD: seed 0 both wrong (first at 2 and 1: 1.50), 5 of 5 later items right; seed 1 one wrong at 2,
    # 0 of 2 right. +TPA: seed 0 none wrong (no position, no later items: left out), seed 1 wrong at 4, nothing
    # after it (left out).
    assert "| Vanilla KD | 75.0 ± 35.4 | 1.75 ± 0.35 | 50.0 ± 70.7 |" in proc.stdout
    assert "| +TPA | 25.0 ± 35.4 | 4.00 | — |" in proc.stdout
    assert "| Teacher | 0.0 | — | — |" in proc.stdout
    # Paired over the seeds where both rows have the measure: seed 1 only for the first wrong item (4 − 2).
    assert "+TPA − Vanilla KD, first_wrong: +2.00 ± 0.00 SE (p = nan, 1 seeds)" in proc.stdout
    assert "right_after" not in proc.stdout.split("first_wrong")[-1]
