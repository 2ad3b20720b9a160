"""slurm/*.sh: the multi-node arithmetic under a faked SLURM environment, then a real job under a real
slurmctld/slurmd (installed by .ci/run) that is signalled once, checkpoints, requeues, resumes and finishes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, distributed_problem
from slurm_cluster import job_fields, missing_binaries, one_node_cluster
from transformers import AutoModelForImageTextToText

from aligntI.slurm import SlurmEnvError, expand_hostlist, layout_from_env, main, torchrun_command


@pytest.mark.parametrize("hostlist, hosts", [
    ("vm", ["vm"]),
    ("gpu[01-03,10]", ["gpu01", "gpu02", "gpu03", "gpu10"]),
    ("a[8-10],b", ["a8", "a9", "a10", "b"]),
    ("node[098-100]-ib,login", ["node098-ib", "node099-ib", "node100-ib", "login"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
])
def test_hostlists_expand_like_scontrol(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


FOUR_NODES = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[01-03,10]", "SLURM_JOB_NUM_NODES": "4",
              "SLURM_NODEID": "2", "SLURM_GPUS_ON_NODE": "8"}


def test_every_node_computes_the_same_rendezvous():
    layouts = [layout_from_env({**FOUR_NODES, "SLURM_NODEID": str(i)}) for i in range(4)]
    assert {(x.master_addr, x.master_port, x.world_size) for x in layouts} == {("gpu01", 20000 + 123456 % 20000, 32)}
    assert [x.node_rank for x in layouts] == [0, 1, 2, 3]
    program = ["recipes/train.py", "--config", "r.yaml", "optim.lr=1e-5"]
    cmds = [torchrun_command(layout, program) for layout in layouts]
    for node, cmd in enumerate(cmds):
        assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"] and cmd[-4:] == program
        flags = dict(zip(cmd[3:-4:2], cmd[4:-4:2]))
        assert flags == {"--nnodes": "4", "--nproc_per_node": "8", "--rdzv_id": "123456", "--rdzv_backend": "c10d",
                         "--rdzv_endpoint": "gpu01:23456", "--rdzv_conf": f"is_host={int(node == 0)}",
                         "--max_restarts": "0"}


@pytest.mark.parametrize("env, gpus", [
    ({"SLURM_GPUS_PER_NODE": "h100:4"}, 4),
    ({"SLURM_GPUS_PER_NODE": "4", "NPROC_PER_NODE": "2"}, 2),  # an explicit rank count wins
    ({"SLURM_GPUS_PER_NODE": "0", "NPROC_PER_NODE": "2"}, 2),  # CPU-only job
])
def test_ranks_per_node(env, gpus):
    base = {k: v for k, v in FOUR_NODES.items() if k != "SLURM_GPUS_ON_NODE"}
    assert layout_from_env({**base, **env}).procs_per_node == gpus


@pytest.mark.parametrize("change, message", [
    ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID is not set"),
    ({"SLURM_JOB_NUM_NODES": "3"}, "SLURM_JOB_NUM_NODES=3 but SLURM_JOB_NODELIST='gpu[01-03,10]' names 4 hosts"),
    ({"SLURM_NODEID": "4"}, "SLURM_NODEID=4 is not below the 4 nodes"),
    ({"SLURM_GPUS_ON_NODE": None, "SLURM_GPUS_PER_NODE": "0"}, "no GPUs in this job"),
    ({"SLURM_JOB_NODELIST": "gpu[01-03"}, "unbalanced brackets"),
])
def test_bad_environments_name_the_variable(change, message):
    env = {k: v for k, v in {**FOUR_NODES, **change}.items() if v is not None}
    with pytest.raises(SlurmEnvError, match=message.replace("[", r"\[").replace("(", r"\(")):
        layout_from_env(env)


def test_dry_run_prints_the_node_command(monkeypatch, capsys):
    for key, value in FOUR_NODES.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", "29999")
    assert main(["--dry-run", "--", "recipes/train.py", "--config", "r.yaml"]) == 0
    out = capsys.readouterr().out
    assert "node 2/4" in out and "world 32" in out and "--rdzv_endpoint gpu01:29999" in out


def test_run_dir_of_a_composed_recipe(capsys):
    recipe = "recipes/paper/students/qwen2.5-0.5b/align_ti.yaml"
    assert main(["run-dir", str(REPO / recipe), "vars.runs=/scratch/runs"]) == 0
    assert capsys.readouterr().out.strip() == "/scratch/runs/students/qwen2.5-0.5b/align_ti"


# ---------------------------------------------------------------- a real cluster


def wait_for(what: str, predicate, timeout: float, log: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text()[-6000:] if log.is_file() else "(no job log)"
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; job log:\n{tail}")


def test_sbatch_distill_survives_a_preemption_signal(tmp_path, tiny_model, tiny_student, digitgrid):
    missing = missing_binaries()
    if missing:
        if os.environ.get("ALIGNTI_REQUIRE_SLURM"):
            pytest.fail(f"ALIGNTI_REQUIRE_SLURM is set but {missing} are not installed")
        pytest.skip(f"SLURM is not installed ({missing}); .ci/run installs it")
    if problem := distributed_problem():
        pytest.fail(problem)
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    steps = 40
    overrides = [
        f"run_dir={run_dir}", f"model.path={tiny_student}", f"teacher.path={tiny_model}",
        f"data.train.0.path={digitgrid / 'train.json'}", f"eval.data={digitgrid / 'test.json'}",
        "irs.samples=16", f"train.max_steps={steps}", "train.save_every=10",
    ]
    with one_node_cluster(tmp_path / "slurm") as env:
        env = {**env, "NPROC_PER_NODE": "2", "PYTHONUNBUFFERED": "1",
               "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
        submit = subprocess.run(
            ["sbatch", "--parsable", f"--output={log}", "--cpus-per-task=2", "--time=00:20:00",
             "slurm/distill.sh", "recipes/mini/align_ti.yaml", *overrides],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert submit.returncode == 0, submit.stderr
        job = int(submit.stdout.strip().split(";")[0])
        metrics = run_dir / "metrics.jsonl"

        # Once training is under way, send what `#SBATCH --signal=B:USR1@600` sends before the time limit.
        wait_for("step 2", lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, 420, log)
        subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=env, check=True, timeout=60)

        # The job checkpoints, requeues itself, waits out SLURM's requeue hold (cred_expire) and runs again.
        wait_for("the requeue", lambda: job_fields(job, env)["Restarts"] == "1", 300, log)
        done = wait_for("the job to end", lambda: (f := job_fields(job, env))["JobState"] in (
            "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") and f, 600, log)
        text = log.read_text()
        assert done["JobState"] == "COMPLETED" and done["ExitCode"] == "0:0", text[-6000:]

    stopped = [line for line in text.splitlines() if "stopped on request" in line]
    assert len(stopped) == 1, text[-6000:]
    at = int(stopped[0].split("after step ")[1].split(";")[0])
    assert 2 <= at < steps
    assert "requeueing job" in text and f"at step {at}" in text.split("requeueing job", 1)[1]  # resumed there
    assert "node 0/1" in text and "2 ranks, world 2" in text
    jobs = (run_dir / "slurm_jobs.log").read_text().splitlines()
    assert [f"job {job} restart {i}" in line for i, line in enumerate(jobs)] == [True, True]
    # Every step exactly once: the lines after the checkpoint were trimmed when the run resumed.
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, steps + 1))
    student = AutoModelForImageTextToText.from_pretrained(run_dir / "final", dtype=torch.float32)
    assert student.config.text_config.hidden_size == 16  # the student, not the teacher
    assert (run_dir / "eval").is_dir() and not (run_dir / "stop_request").exists()
