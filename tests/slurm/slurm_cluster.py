"""A real one-node SLURM cluster for the tests of slurm/*.sh: munged, slurmctld and slurmd
from Debian's packages, everything (key, socket, state, logs, ports) in a scratch directory so nothing on the
machine is touched, and every daemon stopped at the end."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from conftest import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


def missing_binaries() -> list[str]:
    search = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [name for name in DAEMONS if shutil.which(name, path=search) is None]


def _run(cmd: list[str], env: dict) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.stdout


def _stop(pid_file: Path, timeout: float = 20.0) -> None:
    if not pid_file.is_file():
        return
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, 9)


@contextmanager
def one_node_cluster(root: Path):
    """Start the cluster in ``root``; yields the environment for its clients (``SLURM_CONF`` set)."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(exist_ok=True)
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (root / "munge").chmod(0o711)  # munged insists that nobody else can write here
    sock = root / "munge" / "munge.sock"
    host = socket.gethostname()
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=aligntitest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
GresTypes=gpu
NodeName={host} CPUs={os.cpu_count()} RealMemory=1000 Gres=gpu:8 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    # cred_expire: SLURM holds a requeued job this long (default 120 s) so that the old credential expires.
    # Eight GPUs that exist only for SLURM, so job scripts keep their `--gpus-per-node` as on a real cluster;
    # the jobs run on the CPU (NPROC_PER_NODE says how many ranks).
    (root / "dev").mkdir(exist_ok=True)
    for i in range(8):  # character devices like /dev/null: slurmd wants device files behind a GPU
        if not (root / "dev" / f"gpu{i}").exists():
            os.mknod(root / "dev" / f"gpu{i}", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (root / "gres.conf").write_text(f"AutoDetect=off\nNodeName={host} Name=gpu File={root / 'dev'}/gpu[0-7]\n")
    # No cgroup.conf: SLURM 22.05 refuses to start with CgroupPlugin=disabled.
    env["SLURM_CONF"] = str(conf)
    munge_pid = root / "munge" / "munged.pid"
    try:
        _run(["munged", "--force", f"--socket={sock}", f"--key-file={key}", f"--pid-file={munge_pid}",
              f"--log-file={root / 'log' / 'munged.log'}", f"--seed-file={root / 'munge' / 'munged.seed'}"], env)
        _run(["slurmctld", "-f", str(conf)], env)
        _run(["slurmd", "-f", str(conf)], env)
        deadline = time.time() + 60
        while "idle" not in _run(["sinfo", "-h", "-o", "%T"], env):
            if time.time() > deadline:
                raise RuntimeError("the SLURM node did not become idle in 60 s:\n"
                                   + (root / "log" / "slurmctld.log").read_text()[-3000:])
            time.sleep(0.5)
        yield env
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=60)
        _stop(root / "slurmd.pid")
        _stop(root / "slurmctld.pid")
        _stop(munge_pid)


def job_fields(job_id: int, env: dict) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Reason, Restarts, ExitCode, ...)."""
    text = _run(["scontrol", "show", "job", str(job_id), "-o"], env)
    return dict(item.split("=", 1) for item in text.split() if "=" in item)
