"""SIGINT/SIGTERM: deferred to the end of the step inside the loop, one line outside it, at once the second time."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from aligntI.errors import run_reporting_errors
from aligntI.training.interrupts import Interrupted, Interrupts


def test_inside_the_loop_a_signal_only_asks_to_stop_and_its_forwarded_copies_are_the_same_request():
    interrupts = Interrupts()
    with interrupts.installed(), interrupts.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a launcher passing on the terminal's Ctrl-C, milliseconds later
        assert interrupts.received == signal.SIGTERM and interrupts.name == "SIGTERM"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_outside_the_loop_a_signal_stops_the_command_with_one_line(capsys):
    interrupts = Interrupts()

    def command():
        with interrupts.installed():
            os.kill(os.getpid(), signal.SIGINT)
            return 0

    assert run_reporting_errors(command) == 130
    assert capsys.readouterr().err == ("aligntI: SIGINT: stopped during start-up: nothing new to save; the same "
                                       "command starts or resumes again\n")
    with pytest.raises(Interrupted) as err, Interrupts().installed():
        os.kill(os.getpid(), signal.SIGTERM)
    assert err.value.code == 143


def test_a_second_interrupt_stops_at_once():
    script = textwrap.dedent("""
        import os, signal, time
        from aligntI.training import interrupts as module
        module.SAME_INTERRUPT_S = 0.05
        interrupts = module.Interrupts()
        with interrupts.installed(), interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        print("not reached")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and proc.stdout == ""
    assert proc.stderr == "aligntI: SIGINT again: stopped at once, without a checkpoint of this step\n"
