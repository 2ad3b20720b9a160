"""How a command ends on bad input: one line on stderr and exit code 2, printed once under a launcher.

Bad input is a recipe, data, model directory or a path that cannot be read or written. Under a launcher every
rank runs the command. Rank 0 reports at once; any other rank first waits ``SIBLING_WAIT_S``, in which the
launcher ends it if rank 0 has exited: an error every rank meets (a recipe key, a model path, the data check
before training) is printed once, one that only this rank met still is. A rank whose collective fails because
a peer exited waits the same way, then says so (exit 1). A signal that stops a command outside the training loop
(:class:`~aligntI.training.interrupts.Interrupted`) is one line from rank 0, exit 128 + the signal.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable

from aligntI.config import ConfigError
from aligntI.data.records import DataError
from aligntI.models.compat import IncompatibleModelsError
from aligntI.models.loading import ModelDirError
from aligntI.training.interrupts import Interrupted

DEBUG_ENV = "ALIGNTI_DEBUG"  # =1: a reported error also prints its traceback
BAD_INPUT = ((ConfigError, "config error: "), (DataError, "data error: "), (ModelDirError, "model error: "),
             (IncompatibleModelsError, ""))
SIBLING_WAIT_S = 10.0  # far longer than a launcher takes to end every rank once one has exited (0.1-1 s)


def run_reporting_errors(command: Callable[[], int]) -> int:
    """Run ``command``; bad input becomes one line on stderr and exit code 2 (see the module docstring)."""
    try:
        return command()
    except Interrupted as err:  # every rank was told; one line is enough
        if int(os.environ.get("RANK", "0")) == 0:
            _close_progress_bars()
            print(f"aligntI: {err}", file=sys.stderr, flush=True)
        return err.code
    except tuple(cls for cls, _ in BAD_INPUT) as err:
        label = next(label for cls, label in BAD_INPUT if isinstance(err, cls))
        return report(err, f"{label}{err}", 2)
    except OSError as err:
        if err.filename is None:  # not about a path the user gave (a socket, a pipe): a bug until shown otherwise
            raise
        other = f" -> {err.filename2}" if err.filename2 is not None else ""
        return report(err, f"file error: {err.filename}{other}: {err.strerror or err}", 2)
    except Exception as err:
        if not lost_peer(err):
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        return report(err, f"stopped: a collective failed ({type(err).__name__}: {first}); when another rank "
                           "exited first, its message says why", 1, secondary=True)


def report(err: Exception, message: str, code: int, secondary: bool = False) -> int:
    """Print ``message`` for this rank (after the traceback with ``ALIGNTI_DEBUG=1``); see :func:`main`.

    ``secondary``: this rank failed because another one did, so even rank 0 leaves the launcher time first.
    """
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if debug:
        traceback.print_exception(err)
    elif world > 1 and (rank != 0 or secondary):
        time.sleep(SIBLING_WAIT_S)
    where = f" [rank {rank}]" if world > 1 else ""
    hint = "" if debug else f" ({DEBUG_ENV}=1 shows the traceback)"
    _close_progress_bars()
    print(f"aligntI{where}: {message}{hint}", file=sys.stderr, flush=True)
    return code


def _close_progress_bars() -> None:
    """End the progress bars an error left open mid-line: they would run into the message and redraw after it."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def lost_peer(err: Exception) -> bool:
    """A collective or the rendezvous store failed in a multi-rank run: usually another rank exited first."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(err, dist.DistError):
        return True
    # gloo (CPU runs) raises a plain RuntimeError the moment a peer's socket closes
    return isinstance(err, RuntimeError) and any(s in str(err) for s in ("closed by peer", "reset by peer"))
