"""Ending a step's compute at once when a pause arrives, instead of at its next collective.

Without this a survivor notices a pause only where it next waits: a collective (sliced waits,
groups.Interruptor) or the next ``begin_step``. A rank in the middle of a long forward/backward
(or of the ~1-s stand-in for a bigger model's compute that the benchmarks sleep) finishes it
first, and every survivor's remaining compute is added to the recovery: measured at ~1-s steps
as RTO 1.35-2.10 s against 0.45-0.61 s at 0.1-s steps (docs/benchmarks.md, stop 30).

How: the job marks the part of its step that only computes (``with agent.compute():``). When the
control thread receives a pause while the training thread is inside it, it sends the training
thread a signal (``FLASHRECOVERY_AGENT_INTERRUPT_SIGNAL``, SIGUSR2 by default, 0: off); Python
runs the handler on the training thread between two bytecodes (a ``time.sleep`` returns early,
a torch op finishes first), and the handler raises ``PauseRequested`` there.

Why this is safe only inside the marked region: the work of a step before its gradient sync
is thrown away by a pause anyway (gradients are zeroed at the next ``begin_step``, generators
are reseeded per step, the committed state is untouched until the optimizer update). What must
never be cut is a collective between its launch and the end of its wait: a collective left
running has to be handed to the graveyard (groups.Interruptor.abandon) or a destructor would
later join its stuck thread. So the agent's own collectives launched inside a region run
``suspended()``: the signal does not raise there; the sliced wait sees the pause within a slice
and abandons the work properly, or, if the collective ends first, the pause is raised when the
suspension ends.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# In the reason of a pause that ended a compute region (the agent's "paused" log line says it).
CUT = "cut the step's compute short"


class ComputeInterrupt:
    """The training thread's interruptible region, and the signal that cuts it short."""

    def __init__(self, reason: Callable[[], str | None], raise_pause: Callable[[str], BaseException]) -> None:
        self._reason = reason  # the pending pause's reason (None: no pause)
        self._raise_pause = raise_pause
        self._signum = 0
        self._thread: int | None = None  # the training thread (the one that installed the handler)
        self._previous: Any = None
        self._computing = False
        self._kicked = False  # a signal of ours is on its way (tells it from a user's signal)
        self.kicks = 0  # signals sent (observability and tests)
        self.cut = 0  # regions the signal actually ended

    @property
    def installed(self) -> bool:
        return self._thread is not None

    def install(self, signum: int) -> bool:
        """Install the handler; only from the main thread (Python runs signal handlers there).
        Returns whether the region can now be cut short; 0 or another thread: it cannot."""
        if signum == 0 or threading.current_thread() is not threading.main_thread():
            return False
        self._previous = signal.signal(signum, self._on_signal)
        self._signum, self._thread = signum, threading.get_ident()
        return True

    def uninstall(self) -> None:
        """Give the signal back to the handler it had before ``install``."""
        if self._thread is not None:
            signal.signal(self._signum, self._previous)
            self._thread = None

    def kick(self) -> None:
        """Called by the control thread after a pause was recorded: cut the region short if the
        training thread is in one. From the training thread itself it does nothing (that thread
        is not computing: it is the one handling the failure)."""
        if not self._computing or self._thread is None or threading.get_ident() == self._thread:
            return
        self._kicked = True
        self.kicks += 1
        signal.pthread_kill(self._thread, self._signum)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._kicked:
            self._kicked = False
            reason = self._reason()
            if self._computing and reason is not None:
                self._computing = False  # raised here, the region's exit may never run
                self.cut += 1
                raise self._raise_pause(f"{reason} ({CUT})")
            return  # the region ended (or is suspended) first: the pause is seen there
        if callable(self._previous):
            self._previous(signum, frame)  # not ours: the job's own handler

    @contextmanager
    def region(self) -> Iterator[None]:
        """The step's compute: a pause ends it with PauseRequested. The flag is set before the
        pause is looked at, and the control thread records the pause before it looks at the
        flag, so a pause is either seen here or signalled."""
        self._computing = True
        try:
            self._raise_if_paused()
            yield
        finally:
            self._computing = False

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Around a collective's launch and wait inside a region: the signal must not cut it
        (see the module docstring); a pause that came meanwhile is raised when it ends."""
        outer = self._computing
        self._computing = False
        try:
            yield
        finally:
            self._computing = outer
        if outer:
            self._raise_if_paused()

    def _raise_if_paused(self) -> None:
        reason = self._reason()
        if reason is not None:
            self._computing = False
            raise self._raise_pause(reason)
