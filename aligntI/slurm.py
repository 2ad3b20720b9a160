"""SLURM's environment -> the ``torchrun`` command of one node: what every slurm/*.sh runs on each node via srun.

One task per node: each task runs ``python -m aligntI.slurm -- <program> [args]``, which reads the job's
SLURM variables (nodes, this node's index, GPUs per node, job id) and runs torchrun's agent in-process. The
ranks rendezvous (c10d) at the first node of the allocation, which hosts the store, on a port derived from the
job id, so every node computes the same endpoint without talking to the others.

    python -m aligntI.slurm [--dry-run] -- recipes/train.py --config <recipe> [key=value ...]
    python -m aligntI.slurm run-dir <recipe> [key=value ...]     # the run directory a recipe resolves to
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass


class SlurmEnvError(RuntimeError):
    """The environment is not a SLURM job step this launcher can use; the message names the variable."""


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list (``gpu[01-03,07],login-a[1-2]-ib``) as host names, in order."""
    hosts: list[str] = []
    for item in _split_top_level(hostlist):
        hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            raise SlurmEnvError(f"SLURM_JOB_NODELIST: unbalanced brackets in {text!r}")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise SlurmEnvError(f"SLURM_JOB_NODELIST: unbalanced brackets in {text!r}")
    items.append(text[start:])
    return [item for item in items if item]


def _expand_one(item: str) -> list[str]:
    match = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", item)
    if not match:
        return [item]
    prefix, ranges, rest = match.groups()
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise SlurmEnvError(f"SLURM_JOB_NODELIST: cannot read the range {part!r} in {item!r}")
        width = len(lo)  # zero padding: node[08-10] -> node08 node09 node10
        for n in range(int(lo), int(hi or lo) + 1):
            out.extend(prefix + str(n).zfill(width) + tail for tail in _expand_one(rest))
    return out


@dataclass(frozen=True)
class NodeLayout:
    job_id: int
    nodes: list[str]
    node_rank: int
    procs_per_node: int
    master_port: int

    @property
    def master_addr(self) -> str:
        return self.nodes[0]

    @property
    def world_size(self) -> int:
        return len(self.nodes) * self.procs_per_node


def _int(env: dict, key: str) -> int:
    value = env.get(key)
    if value is None:
        raise SlurmEnvError(f"{key} is not set: run this inside a SLURM job step (srun, one task per node)")
    if not value.isdigit():
        raise SlurmEnvError(f"{key}={value!r}: expected a non-negative integer")
    return int(value)


def procs_per_node(env: dict) -> int:
    """One rank per GPU SLURM gave this node; ``NPROC_PER_NODE`` (set at submission) overrides, and is how a
    CPU-only job says how many ranks it wants."""
    if env.get("NPROC_PER_NODE"):
        count = _int(env, "NPROC_PER_NODE")
        if count == 0:
            raise SlurmEnvError("NPROC_PER_NODE=0: need at least one rank per node")
        return count
    if env.get("SLURM_GPUS_ON_NODE"):
        count = _int(env, "SLURM_GPUS_ON_NODE")
        if count:
            return count
    per_node = env.get("SLURM_GPUS_PER_NODE")  # "8" or "h100:8"; "0" on nodes without GPUs
    if per_node:
        count = per_node.rsplit(":", 1)[-1]
        if not count.isdigit():
            raise SlurmEnvError(f"SLURM_GPUS_PER_NODE={per_node!r}: cannot read a GPU count")
        if int(count):
            return int(count)
    raise SlurmEnvError("no GPUs in this job (SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE unset or 0): submit with "
                        "--gpus-per-node=N, or set NPROC_PER_NODE=N for a CPU-only job")


def layout_from_env(env: dict) -> NodeLayout:
    job_id = _int(env, "SLURM_JOB_ID")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SlurmEnvError("SLURM_JOB_NODELIST is not set: run this inside a SLURM job")
    nodes = expand_hostlist(nodelist)
    num_nodes = _int(env, "SLURM_JOB_NUM_NODES") if "SLURM_JOB_NUM_NODES" in env else _int(env, "SLURM_NNODES")
    if num_nodes != len(nodes):
        raise SlurmEnvError(f"SLURM_JOB_NUM_NODES={num_nodes} but SLURM_JOB_NODELIST={nodelist!r} names "
                            f"{len(nodes)} hosts")
    node_rank = _int(env, "SLURM_NODEID")
    if node_rank >= num_nodes:
        raise SlurmEnvError(f"SLURM_NODEID={node_rank} is not below the {num_nodes} nodes of the job")
    # The same port on every node, different for jobs sharing a node; MASTER_PORT pins it.
    port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else 20000 + job_id % 20000
    return NodeLayout(job_id, nodes, node_rank, procs_per_node(env), port)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # what the printed command runs; main runs it in-process


def torchrun_command(layout: NodeLayout, program: list[str]) -> list[str]:
    return [
        *TORCHRUN,
        "--nnodes", str(len(layout.nodes)),
        "--nproc_per_node", str(layout.procs_per_node),
        "--rdzv_id", str(layout.job_id),
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", f"{layout.master_addr}:{layout.master_port}",
        # Said, not guessed: torch guesses the store's host from the host name, so a node list that names the
        # first node by another interface (an InfiniBand name, an address) leaves every node waiting as a client.
        "--rdzv_conf", f"is_host={int(layout.node_rank == 0)}",
        "--max_restarts", "0",  # a failed rank fails the job step; SLURM's requeue is the retry
        *program,
    ]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run-dir"]:
        from aligntI.config import ConfigError, load_recipe

        if len(argv) < 2:
            print("usage: python -m aligntI.slurm run-dir <recipe.yaml> [key=value ...]", file=sys.stderr)
            return 2
        try:
            print(load_recipe(argv[1], argv[2:]).run_dir)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    dry_run = argv[:1] == ["--dry-run"]
    argv = argv[dry_run:]
    if argv[:1] != ["--"] or len(argv) < 2:
        print("usage: python -m aligntI.slurm [--dry-run] -- <program> [args ...]", file=sys.stderr)
        return 2
    try:
        layout = layout_from_env(dict(os.environ))
    except SlurmEnvError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cmd = torchrun_command(layout, argv[1:])
    print(f"[aligntI.slurm] job {layout.job_id} node {layout.node_rank}/{len(layout.nodes)} "
          f"({os.uname().nodename}): {layout.procs_per_node} ranks, world {layout.world_size}, rendezvous "
          f"{layout.master_addr}:{layout.master_port}\n[aligntI.slurm] {shlex.join(cmd)}", flush=True)
    if dry_run:
        return 0
    return run_torchrun(cmd[len(TORCHRUN):], layout.node_rank)


def run_torchrun(args: list[str], node_rank: int) -> int:
    """torchrun's agent, in this process: a failed rank ends it with that rank's exit code (2 for bad input)
    and one line, where the ``torchrun`` command exits 1 with a traceback of its own after the rank's message;
    SIGINT/SIGTERM (``scancel``) likewise end it with one line once the ranks have checkpointed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(args))
    except SignalException as err:  # the agent has passed it on and waited for the ranks, which checkpoint
        print(f"[aligntI.slurm] node {node_rank}: {err.sigval.name}; the ranks were told and have ended",
              file=sys.stderr, flush=True)
        return 128 + err.sigval
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        how = f"exit code {failure.exitcode}" if failure.exitcode > 0 else f"signal {-failure.exitcode}"
        print(f"[aligntI.slurm] node {node_rank}: rank {rank} ended first, with {how}; its own message is above",
              file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
