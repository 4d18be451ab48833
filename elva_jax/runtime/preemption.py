"""When a stage ends its invocation early: a SIGTERM (a preemption notice) or ``run.stop_after_steps``.

Every stage loop (contrastive, warm start, RL) installs one `StopRequest` for its lifetime, asks
`after_step` once per step, saves a checkpoint when it answers True and returns; the same command resumes.
"""

from __future__ import annotations

import signal

from elva_jax.parallel.sharding import any_process


class StopRequest:
    """SIGTERM seen by this process (``requested``) since `install`, and the rule that ends a stage's
    invocation: `after_step` is True on every process when any saw SIGTERM or ``steps_done`` reached
    ``stop_after_steps`` (0 or None: no limit), so all hosts stop at the same step."""

    def __init__(self, stop_after_steps: int | None = 0):
        self.limit = stop_after_steps or 0
        self.requested = False
        self._old = None

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def install(self) -> StopRequest:
        self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None

    def after_step(self, steps_done: int) -> bool:
        return any_process(self.requested or bool(self.limit and steps_done >= self.limit))
