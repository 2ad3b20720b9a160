"""Two SLURM "nodes" on this machine, no SLURM daemons: two ``python -m aligntI.slurm`` processes, each given the
environment srun gives one task of a two-node job, rendezvous through torchrun's c10d store at the first node
and run one 2-rank world: a ZeRO-3 distillation that checkpoints, stops on request and resumes exactly."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, distributed_problem, launch, launch_env, processes_with, write_recipe

TERMS = ("loss", "sft", "kd", "iva", "tpa", "top1_agreement", "grad_norm")


def job_id_with_free_port() -> int:
    """A job id whose derived rendezvous port (aligntI.slurm: 20000 + id % 20000) is free on this machine."""
    while True:
        job_id = random.randrange(1, 10**6)
        with socket.socket() as s:
            try:
                s.bind(("", 20000 + job_id % 20000))
            except OSError:
                continue
        return job_id


def node_env(job_id: int, nodelist: str, node: int, marker: str) -> dict:
    """What srun sets for task ``node`` of a two-node job with one task per node (and no GPUs: one CPU rank)."""
    env = {k: v for k, v in launch_env().items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST=nodelist, SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2",
               SLURM_NTASKS="2", SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0",
               NPROC_PER_NODE="1", LOGLEVEL="INFO", ALIGNTI_TWO_NODES=marker)  # INFO: torchrun's rendezvous result
    return env


@contextmanager
def two_nodes(program: list[str], nodelist: str, logs: Path):
    """Start node 0 and node 1 of one job, each ``python -m aligntI.slurm -- <program>`` in its own session;
    yields the two processes. Whatever still runs at the end is stopped: torchrun's agent first (it stops its
    ranks), then everything that carries this job's marker (ranks run in sessions of their own)."""
    if problem := distributed_problem():
        pytest.fail(problem)
    job_id, marker = job_id_with_free_port(), str(logs)
    mine = f"ALIGNTI_TWO_NODES={marker}"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        for node in (0, 1):
            with open(logs / f"node{node}.log", "w") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "aligntI.slurm", "--", *program], cwd=REPO,
                    env=node_env(job_id, nodelist, node, marker), stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True))
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                with suppress(ProcessLookupError):  # it may end meanwhile
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 30
        while processes_with(mine) and time.time() < deadline:
            time.sleep(0.2)
        for pid in processes_with(mine):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in procs:
            proc.wait()


def wait_all(procs, logs: Path, timeout: float, until=None) -> list[str]:
    """Wait for both nodes (calling ``until()`` meanwhile, if given); their logs, after both exited with 0."""
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if until is not None:
            until()
        time.sleep(0.1)
    texts = [(logs / f"node{node}.log").read_text() for node in (0, 1)]
    tails = "\n".join(f"--- node {i} (rc {p.poll()}):\n{t[-5000:]}" for i, (p, t) in enumerate(zip(procs, texts)))
    assert all(p.poll() is not None for p in procs), f"timed out after {timeout:.0f} s\n{tails}"
    assert [p.returncode for p in procs] == [0, 0], tails
    return texts


def rendezvous_results(texts: list[str]) -> list[tuple[int, int]]:
    """(group_rank, group_world_size) that torchrun's agent on each node reports for the rendezvous."""
    out = []
    for text in texts:
        ranks = re.findall(r"group_rank=(\d+)", text)
        sizes = re.findall(r"group_world_size=(\d+)", text)
        assert len(ranks) == len(sizes) == 1, text[-3000:]  # one rendezvous per node, no restart
        out.append((int(ranks[0]), int(sizes[0])))
    return out


def non_loopback_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def test_first_node_hosts_the_rendezvous_when_its_name_is_not_the_host_name(tmp_path):
    """A node list may name a node by another interface than its host name (an InfiniBand name, an address):
    torch's guess of who hosts the c10d store then says "not me" on every node, and the job waits for a store
    that nobody started. aligntI.slurm makes the first node of the list the host."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback address on this machine")
    probe = tmp_path / "probe.py"
    probe.write_text("import torch, torch.distributed as dist\n"
                     "dist.init_process_group('gloo')\n"
                     "x = torch.tensor([dist.get_rank() + 1.0])\n"
                     "dist.all_reduce(x)\n"
                     "print(f'rank {dist.get_rank()} of {dist.get_world_size()}: sum {x.item():.0f}', flush=True)\n"
                     # A rank that exits with its group alive may abort (SIGABRT) while its peer tears down.
                     "dist.barrier()\n"
                     "dist.destroy_process_group()\n")
    logs = tmp_path / "logs"
    with two_nodes([str(probe)], f"{address},127.0.0.1", logs) as procs:
        texts = wait_all(procs, logs, timeout=150)
    assert sorted(rendezvous_results(texts)) == [(0, 2), (1, 2)]
    printed = sorted(re.search(r"rank (\d) of 2: sum 3", t).group(1) for t in texts)
    assert printed == ["0", "1"]


def test_a_failed_rank_gives_its_exit_code_and_no_launcher_traceback(tmp_path):
    """Bad input exits 2 on a rank; under ``python -m aligntI.slurm`` the job step exits 2 too, and torchrun's own
    ChildFailedError traceback does not bury the rank's one-line message."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os, sys\n"
                     "if os.environ['RANK'] == '1':\n"
                     "    print('aligntI [rank 1]: data error: d.json: broken', file=sys.stderr)\n"
                     "    sys.exit(2)\n")
    env = node_env(job_id_with_free_port(), "127.0.0.1", 0, str(tmp_path))
    env.update(SLURM_JOB_NUM_NODES="1", SLURM_NNODES="1", SLURM_NTASKS="1", NPROC_PER_NODE="2", LOGLEVEL="WARNING")
    proc = subprocess.run([sys.executable, "-m", "aligntI.slurm", "--", str(probe)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "aligntI [rank 1]: data error: d.json: broken" in out and "Traceback" not in out, out
    assert "rank 1 ended first, with exit code 2" in out, out


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_node_distillation_checkpoints_stops_and_resumes_exactly(tmp_path, tiny_model, tiny_student, digitgrid,
                                                                     zero3_partitioned):
    steps = 8
    recipes = {}
    for name in ("one_node", "two_nodes"):
        recipes[name] = write_recipe(
            tmp_path / f"{name}.yaml", tiny_student, digitgrid, tmp_path / name, zero3_partitioned,
            teacher={"path": str(tiny_model)}, iva={"layer": 1}, train={
                "max_steps": steps, "save_every": 3, "global_batch_size": 4, "micro_batch_size": 2})
    # The oracle: the same recipe straight through, two ranks on one node.
    launch(["recipes/train.py", "--config", str(recipes["one_node"])], launcher="torchrun")

    run = tmp_path / "two_nodes"
    program = ["recipes/train.py", "--config", str(recipes["two_nodes"])]
    checkpoint = run / "checkpoints" / "step_00000003" / "COMPLETE"
    requested = []

    def stop_after_the_first_checkpoint():  # what slurm/*.sh do on SLURM's time-limit warning, once
        if checkpoint.exists() and not requested:
            (run / "stop_request").touch()
            requested.append(True)

    with two_nodes(program, "localhost,127.0.0.1", tmp_path / "first") as procs:
        first = wait_all(procs, tmp_path / "first", timeout=300, until=stop_after_the_first_checkpoint)
    stopped = re.search(r"stopped on request \(.*\) after step (\d+)", "".join(first))
    assert stopped, "".join(first)[-4000:]
    at = int(stopped.group(1))
    assert 3 <= at < steps and not (run / "final").exists()
    with two_nodes(program, "localhost,127.0.0.1", tmp_path / "again") as procs:
        again = wait_all(procs, tmp_path / "again", timeout=300)
    assert f"at step {at}" in "".join(again).split("resumed from", 1)[-1]

    # One world of two ranks, one on each node, both times.
    for texts in (first, again):
        assert "node 0/2" in texts[0] and "node 1/2" in texts[1]
        assert all("1 ranks, world 2" in t for t in texts)
        assert sorted(rendezvous_results(texts)) == [(0, 2), (1, 2)]
    assert yaml.safe_load((run / "config.yaml").read_text())["resolved"]["world_size"] == 2

    # Exact: every step once, as the uninterrupted one-node run computed it, and the same exported student.
    a, b = read_metrics(tmp_path / "one_node"), read_metrics(run)
    assert [m["step"] for m in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        for key in TERMS:
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (x["step"], key)
    from transformers import AutoModelForImageTextToText

    a_final = AutoModelForImageTextToText.from_pretrained(tmp_path / "one_node" / "final")
    b_final = AutoModelForImageTextToText.from_pretrained(run / "final")
    assert b_final.config.text_config.hidden_size == 16  # the student
    for (name, p), q in zip(a_final.named_parameters(), b_final.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
