"""The training loader's workers under a signal: the trainer, not a worker's death, decides when a run stops."""

import os
import signal
import time

import torch.utils.data

from aligntI.data.loader import leave_signals_to_the_trainer


class SignalsItself(torch.utils.data.Dataset):
    """Item ``i >= 1`` makes its worker receive ``sig``, as a signal to the whole process group or tree would."""

    def __init__(self, sig: int):
        self.sig = sig

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        if i >= 1:
            os.kill(os.getpid(), self.sig)
        return i


def loader(sig: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(SignalsItself(sig), batch_size=1, num_workers=1, prefetch_factor=1,
                                       worker_init_fn=leave_signals_to_the_trainer)


def test_a_worker_ignores_ctrl_c():
    assert [int(batch) for batch in loader(signal.SIGINT)] == [0, 1, 2, 3]


def test_a_worker_ended_by_sigterm_does_not_interrupt_the_trainer():
    # Without the worker_init_fn, torch's SIGCHLD handler raises "worker ... is killed by signal: Terminated"
    # in the trainer, wherever it is in its step.
    batches = iter(loader(signal.SIGTERM))
    assert int(next(batches)) == 0  # the worker then takes item 1 and receives SIGTERM
    deadline = time.time() + 10
    while any(w.is_alive() for w in batches._workers) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # where an asynchronous error would surface
    assert [w.exitcode for w in batches._workers] == [0]
    del batches  # and the loader shuts down without waiting on it
