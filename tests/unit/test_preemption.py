"""`StopRequest`: a SIGTERM delivered to the process, or the step limit, ends a stage after the step; the
previous handler comes back."""

from __future__ import annotations

import os
import signal

from elva_jax.runtime.preemption import StopRequest


def test_sigterm_and_the_step_limit_end_the_invocation_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest(3).install()
    try:
        assert signal.getsignal(signal.SIGTERM) is not before
        assert not stop.after_step(1) and not stop.requested
        assert stop.after_step(3)  # run.stop_after_steps reached
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the process lives on
        assert stop.requested and stop.after_step(0)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before
    assert not StopRequest(None).after_step(10**6)  # no limit, no signal
