"""The training loader's workers under a signal."""

import os
import signal

import torch.utils.data

from aligntI.data.loader import leave_signals_to_the_trainer


class SignalsItself(torch.utils.data.Dataset):
    """Each item's worker receives what Ctrl-C sends every process of the terminal's group."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        os.kill(os.getpid(), signal.SIGINT if i % 2 else signal.SIGTERM)
        return i


def test_workers_leave_ctrl_c_and_sigterm_to_the_trainer():
    # Without the worker_init_fn the first item's worker dies and the loader raises.
    loader = torch.utils.data.DataLoader(SignalsItself(), batch_size=1, num_workers=1,
                                         worker_init_fn=leave_signals_to_the_trainer)
    assert [int(batch) for batch in loader] == [0, 1, 2, 3]
