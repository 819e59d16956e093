"""A pause ends the step's compute at once (agent/compute.py), never a collective in flight.

Real signals on the test process's main thread (where Python runs handlers), a real gloo
pair for the collective case; every handler is given back after each test."""

from __future__ import annotations

import datetime
import signal
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist

from flashrecovery.agent.groups import Comm, Interruptor, PauseRequested
from flashrecovery.shared.settings import AgentSettings

SIG = int(signal.SIGUSR2)


@pytest.fixture
def intr() -> Iterator[Interruptor]:
    it = Interruptor()
    assert it.compute.install(SIG)
    try:
        yield it
    finally:
        it.compute.uninstall()


def _interrupt_later(it: Interruptor, after_s: float, reason: str = "pause g1 from sidecar") -> threading.Timer:
    t = threading.Timer(after_s, it.interrupt, args=(reason,))
    t.start()
    return t


@pytest.mark.timeout(30)
def test_a_pause_cuts_the_compute_region_short(intr: Interruptor) -> None:
    t0 = time.monotonic()
    timer = _interrupt_later(intr, 0.2)
    with pytest.raises(PauseRequested, match="pause g1"):
        with intr.compute.region():
            time.sleep(10)  # the compute a pause throws away
    timer.join()
    assert time.monotonic() - t0 < 2.0  # not the 10 s of the sleep
    assert (intr.compute.kicks, intr.compute.cut) == (1, 1)


@pytest.mark.timeout(30)
def test_cpu_compute_is_cut_between_two_torch_ops(intr: Interruptor) -> None:
    a = torch.randn(256, 256)
    t0 = time.monotonic()
    timer = _interrupt_later(intr, 0.2)
    done = 0
    with pytest.raises(PauseRequested):
        with intr.compute.region():
            for done in range(1, 10**9):  # noqa: B007 - counted to show where it stopped
                a = torch.tanh(a @ a)
    timer.join()
    assert time.monotonic() - t0 < 2.0 and done > 0


@pytest.mark.timeout(30)
def test_outside_the_region_a_pause_only_waits_to_be_seen(intr: Interruptor) -> None:
    timer = _interrupt_later(intr, 0.05)
    t0 = time.monotonic()
    time.sleep(0.4)  # no region: nothing is sent, the sleep runs to its end
    timer.join()
    assert time.monotonic() - t0 >= 0.39
    assert intr.compute.kicks == 0
    with pytest.raises(PauseRequested):  # the next look (begin_step) sees it
        intr.check()
    with pytest.raises(PauseRequested):  # and a region entered after it is refused at once
        with intr.compute.region():
            pytest.fail("entered a region with a pause pending")


@pytest.mark.timeout(30)
def test_a_suspended_section_is_not_cut_and_the_pause_is_raised_at_its_end(intr: Interruptor) -> None:
    reached_end = False
    timer = _interrupt_later(intr, 0.05)
    with pytest.raises(PauseRequested):
        with intr.compute.region():
            with intr.compute.suspended():
                time.sleep(0.4)  # a collective's launch and wait stand here
                reached_end = True
            pytest.fail("the pause was not raised when the suspension ended")
    timer.join()
    assert reached_end and intr.compute.cut == 0


class _DoneWork:
    """A collective that completed: what gloo returns once a peer answered."""

    def __init__(self) -> None:
        self.fut: torch.futures.Future = torch.futures.Future()
        self.fut.set_result([torch.zeros(1)])

    def get_future(self) -> torch.futures.Future:
        return self.fut

    def wait(self, timeout: object = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class _PausedAtLaunchGroup:
    """A group whose pause arrives on the control thread right after a collective was launched
    (the window where a signal would leave the running collective unaccounted for)."""

    def __init__(self, it: Interruptor) -> None:
        self.it = it
        self.works: list[_DoneWork] = []

    def size(self) -> int:
        return 2

    def allreduce(self, tensors: list[torch.Tensor], opts: object = None) -> _DoneWork:
        work = _DoneWork()
        self.works.append(work)
        t = threading.Thread(target=self.it.interrupt, args=("pause g2 from sidecar",))
        t.start()
        t.join()
        for _ in range(1000):  # bytecodes in which a signal handler would run
            pass
        return work


@pytest.mark.timeout(30)
def test_a_collective_launched_in_the_region_is_abandoned_not_cut(intr: Interruptor) -> None:
    """Comm runs its collectives suspended: the pause that arrives just after the launch is
    raised by the wait, which hands the running work to the graveyard. (Without the suspension
    the signal raised inside the launch and the work was never abandoned: this test failed.)"""
    comm = Comm(intr)
    comm.groups = SimpleNamespace(rank=0)  # type: ignore[assignment]
    pg = _PausedAtLaunchGroup(intr)
    with pytest.raises(PauseRequested, match="pause g2"):
        with intr.compute.region():
            comm._run(pg, torch.ones(3), "tp allreduce")  # type: ignore[arg-type]
    assert [f is pg.works[0].fut for f in intr.take_abandoned()] == [True]
    assert intr.compute.cut == 0


@pytest.mark.timeout(30)
def test_a_signal_that_is_not_ours_reaches_the_jobs_own_handler() -> None:
    seen: list[int] = []
    before = signal.signal(SIG, lambda signum, frame: seen.append(signum))
    it = Interruptor()
    try:
        assert it.compute.install(SIG)
        with it.compute.region():
            signal.raise_signal(SIG)  # from elsewhere (an operator's kill), not a pause
            time.sleep(0.05)
        assert seen == [SIG] and it.compute.cut == 0
    finally:
        it.compute.uninstall()
        signal.signal(SIG, before)


def test_off_and_off_the_main_thread_it_is_not_installed() -> None:
    it = Interruptor()
    assert not it.compute.install(0)
    out: list[bool] = []
    t = threading.Thread(target=lambda: out.append(it.compute.install(SIG)))
    t.start()
    t.join(5)
    assert out == [False] and not it.compute.installed
    it.interrupt("pause g1")  # and a pause then sends nothing
    assert it.compute.kicks == 0


@pytest.mark.parametrize("bad", [int(signal.SIGUSR1), int(signal.SIGKILL), -1, 65])
def test_a_taken_or_impossible_signal_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="(?i)interrupt_signal"):
        AgentSettings(interrupt_signal=bad)


def _region_rank(rank: int, port: int, out: Any) -> None:
    """Rank 0 computes inside a region with a tp all-reduce in it that rank 1 never joins."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    x = torch.ones(2)
    dist.all_reduce(x)  # connected
    if rank == 1:
        time.sleep(30)  # alive, never joins the next collective (as if stopped); killed
        return
    it = Interruptor()
    it.compute.install(SIG)
    comm = Comm(it)
    comm.groups = SimpleNamespace(rank=0)  # type: ignore[assignment]
    threading.Timer(0.3, it.interrupt, args=("pause g1",)).start()
    t0 = time.monotonic()
    try:
        with it.compute.region():
            comm._run(dist.group.WORLD, x, "tp allreduce")
        result = "not interrupted"
    except PauseRequested as exc:
        result = str(exc)
    left = [f.done() for f in it.take_abandoned()]
    out.put((result, time.monotonic() - t0, left, it.compute.cut))


@pytest.mark.timeout(90)
def test_a_pause_during_a_real_collective_in_the_region_abandons_it(gloo_pair) -> None:
    result, pause_s, abandoned, cut = gloo_pair(_region_rank)
    assert result == "pause g1" and pause_s < 2.0
    assert abandoned == [False] and cut == 0  # the wait handed the running work over
