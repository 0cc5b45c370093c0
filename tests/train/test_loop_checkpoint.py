"""The stop request of checkpointed loops (xlora.train.loop_checkpoint.stop_on_signals): the first signal asks for
a checkpoint-and-exit, the second stops at once, and the process's handlers come back afterwards."""

from __future__ import annotations

import os
import signal

import pytest

from xlora.train.loop_checkpoint import STOP, stop_on_signals


def test_a_first_signal_requests_a_stop_and_a_second_interrupts():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        assert STOP.is_set()  # the loop will checkpoint after its step and exit
        os.kill(os.getpid(), signal.SIGTERM)  # asked again: now
    assert not STOP.is_set() and signal.getsignal(signal.SIGTERM) is before
