"""Distributed start-up and the few collectives the loops use.

:func:`init_distributed` works under the ``deepspeed`` launcher, ``torchrun`` (also when SLURM launches it) and
a bare ``python`` process (it fills the five variables DeepSpeed needs).
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Start (or join) the process group and pick this rank's device."""
    quiet_third_party_warnings()
    if "RANK" not in os.environ:  # bare `python`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    local_rank = int(os.environ["LOCAL_RANK"])
    if accel.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    if accel.device_name() == "cuda":
        device = torch.device("cuda", local_rank)
    else:
        # Ranks on one machine share its cores; without this each would start one thread per core.
        # An explicit OMP_NUM_THREADS (e.g. jobs run side by side) is the user's split and wins.
        if "OMP_NUM_THREADS" not in os.environ:
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
        device = torch.device("cpu")
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def quiet_third_party_warnings() -> None:
    """Warnings raised inside third-party code on every step, each named here, are not shown.

    * DeepSpeed's collectives (``deepspeed/comm/torch.py``) call ``torch.distributed.all_gather_into_tensor`` and
      ``reduce_scatter_tensor``, deprecated in torch 2.13 for ``*_single``: a FutureWarning per ZeRO-3 gather.
    """
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def communicated_bytes() -> dict[str, int]:
    """Bytes this rank has passed to each collective so far (``all_gather_into_tensor``, ``reduce_scatter_tensor``,
    ...), as DeepSpeed's comms logger records them: enable it with a ``comms_logger`` section in the DS config."""
    from deepspeed.comm.comm import comms_logger

    return {op: sum(size * record[0] for size, record in sizes.items())
            for op, sizes in comms_logger.comms_dict.items()}


def barrier() -> None:
    torch.distributed.barrier()


def destroy() -> None:
    """End the process group through DeepSpeed, which also drops the groups it cached (a stale one would break
    the next run started in the same process). The barrier first: a gloo rank that tears down while a peer is
    still busy (rank 0 writing a report) can abort at exit with "terminate called without an active exception"."""
    if torch.distributed.is_initialized():
        import deepspeed.comm

        torch.distributed.barrier()

        deepspeed.comm.destroy_process_group()
