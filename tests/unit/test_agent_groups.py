"""Per-generation gloo groups and interruptible collectives, within one process."""

from __future__ import annotations

import datetime
import multiprocessing
import threading
import time

import pytest
import torch
import torch.distributed as dist

from flashrecovery.agent.faults import FaultSpec, parse_faults
from flashrecovery.agent.groups import (
    CollectiveError,
    Comm,
    GlooGroupFactory,
    Interruptor,
    NcclGroupFactory,
    PauseRequested,
    WorkBatch,
    arrival_barrier,
    gloo_loop_threads,
)


class FutureWork:
    """Stands in for a gloo Work: completes when the test sets its future."""

    def __init__(self) -> None:
        self.fut: torch.futures.Future = torch.futures.Future()

    def get_future(self) -> torch.futures.Future:
        return self.fut

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        """As c10d's Work.wait: a timed wait that runs out raises and leaves the work running."""
        done = threading.Event()
        self.fut.add_done_callback(lambda _f: done.set())
        if not done.wait(None if timeout is None else timeout.total_seconds()):
            raise RuntimeError("Operation timed out!")
        self.fut.wait()
        return True

    def is_completed(self) -> bool:
        return self.fut.done()


class LateWork(FutureWork):
    """Finishes just after its first timed wait ran out: the wait raises, yet it succeeded."""

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        if timeout is not None and not self.fut.done():
            self.fut.set_result(None)
            raise RuntimeError("Operation timed out!")
        return super().wait(timeout)


class NoFutureWork:
    """Like gloo send/recv works: no future, only a blocking wait()."""

    def __init__(self) -> None:
        self.ev = threading.Event()
        self.error: Exception | None = None

    def get_future(self) -> None:
        raise RuntimeError("Work::getFuture not implemented.")

    def wait(self) -> bool:
        self.ev.wait()
        if self.error:
            raise self.error
        return True


@pytest.mark.unit
@pytest.mark.timeout(30)
@pytest.mark.parametrize("work_cls", [FutureWork, NoFutureWork])
def test_pause_breaks_out_of_a_wait_that_never_completes(work_cls: type) -> None:
    intr = Interruptor()
    threading.Timer(0.2, intr.interrupt, args=("test pause",)).start()
    t0 = time.perf_counter()
    work = work_cls()
    with pytest.raises(PauseRequested):
        intr.wait(work, "allreduce", rank=0)  # type: ignore[arg-type]
    assert time.perf_counter() - t0 < 5.0
    # let the abandoned wait end now: no helper thread left blocked at interpreter exit
    if isinstance(work, FutureWork):
        work.fut.set_result(None)
    else:
        work.ev.set()
    with pytest.raises(PauseRequested):  # stays interrupted until cleared
        intr.check()
    intr.clear(0)
    intr.check()


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_completed_and_failed_works() -> None:
    intr = Interruptor()
    w = FutureWork()
    threading.Timer(0.1, w.fut.set_result, args=(None,)).start()
    intr.wait(w, "allreduce")  # type: ignore[arg-type]
    intr.wait(LateWork(), "allreduce")  # type: ignore[arg-type]
    failed = FutureWork()
    threading.Timer(0.1, failed.fut.set_exception, args=(RuntimeError("Connection closed by peer"),)).start()
    with pytest.raises(CollectiveError, match="Connection closed by peer"):
        intr.wait(failed, "allreduce", rank=1)  # type: ignore[arg-type]
    n = NoFutureWork()
    n.error = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1234")
    threading.Timer(0.1, n.ev.set).start()
    with pytest.raises(CollectiveError, match="Connection closed by peer"):
        intr.wait(n, "recv from 3", rank=1)  # type: ignore[arg-type]


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_a_batch_of_works_is_waited_for_whole_and_abandoned_whole() -> None:
    """The transfer's windows (Comm.wait_all): every work is waited for even after one failed
    (a work left pending on a group later destroyed would be joined by its destructor), the
    first failure is reported, and a pause abandons the batch as one future."""
    ok1, bad, ok2 = NoFutureWork(), NoFutureWork(), NoFutureWork()
    bad.error = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1234")
    for w in (ok1, bad):
        w.ev.set()
    threading.Timer(0.2, ok2.ev.set).start()  # the last one finishes after the failure
    intr = Interruptor()
    t0 = time.perf_counter()
    with pytest.raises(CollectiveError, match="Connection closed by peer"):
        intr.wait(WorkBatch([ok1, bad, ok2]), "state from 3", rank=1)  # type: ignore[list-item]
    assert time.perf_counter() - t0 >= 0.19  # it waited for ok2 too

    stuck = NoFutureWork()
    done = NoFutureWork()
    done.ev.set()
    threading.Timer(0.2, intr.interrupt, args=("pause g1",)).start()
    with pytest.raises(PauseRequested):
        intr.wait(WorkBatch([done, stuck]), "state to 2", rank=1)  # type: ignore[list-item]
    [batch] = intr.take_abandoned()
    assert not batch.done()  # type: ignore[attr-defined]
    stuck.ev.set()  # the abandoned batch ends: no helper thread left blocked
    for _ in range(100):
        if batch.done():  # type: ignore[attr-defined]
            break
        time.sleep(0.02)
    assert batch.done()  # type: ignore[attr-defined]


@pytest.mark.unit
@pytest.mark.timeout(60)
def test_gloo_generation_rebuild_single_rank() -> None:
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30)
    )
    fac = GlooGroupFactory()
    comm = Comm(Interruptor())
    for gen in range(3):
        comm.groups = fac.build(store, "t", gen, rank=0, world_size=1, tp=1)
        assert float(comm.global_allreduce(torch.ones(1))[0]) == 1.0
        fac.abort(comm.groups)
    assert len(fac.graveyard) == 3
    assert fac.reap() == 3 and fac.graveyard == []


def _reaped_settled(timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while any(t.name == "flashrecovery-reap" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "background reap did not finish"
        time.sleep(0.02)


@pytest.mark.timeout(90)
def test_aborted_generations_are_destroyed_once_their_abandoned_work_finished() -> None:
    # It counts gloo's loop threads process-wide: in a fresh process, so no group of an earlier
    # test can end its threads in the middle of the count (seen failing 1 run in 3 in the suite).
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_destroyed_once_abandoned_work_finished)
    proc.start()
    proc.join(75)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
        pytest.fail("the check did not finish in 75 s")
    assert proc.exitcode == 0, "the check failed in its process (its assertion is printed above)"


def _threads_reach(want: int, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while gloo_loop_threads() != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return gloo_loop_threads()


def _destroyed_once_abandoned_work_finished() -> None:
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30)
    )
    _reaped_settled()
    # device loop threads of earlier tests' groups may end just after their destructors
    base, deadline = gloo_loop_threads(), time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if gloo_loop_threads() == base:
            break
        base = gloo_loop_threads()
    fac = GlooGroupFactory(lazy_init=False)
    groups = fac.build(store, "t", 0, rank=0, world_size=1, tp=1)
    # one device, one loop thread, per group; a loaded machine may start them a moment after
    # build returns (seen failing under load with the count taken at once)
    assert _threads_reach(base + 3) == base + 3
    abandoned = torch.futures.Future()
    fac.abort(groups, [abandoned])
    del groups
    assert fac.reap() == 0 and gloo_loop_threads() == base + 3  # its collective may still run: kept
    abandoned.set_result(None)
    assert fac.reap() == 1 and fac.graveyard == []
    _reaped_settled()
    deadline = time.monotonic() + 10
    while gloo_loop_threads() > base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gloo_loop_threads() == base  # the devices' loop threads are gone with the groups


@pytest.mark.unit
def test_nccl_factory_is_a_declared_stub() -> None:
    with pytest.raises(NotImplementedError):
        NcclGroupFactory().build(None, "j", 0, 0, 1, 1)  # type: ignore[arg-type]


@pytest.mark.unit
def test_fault_spec_parsing() -> None:
    assert FaultSpec.parse("kind=kill,rank=2,step=12,phase=grad_sync") == FaultSpec("kill", 2, 12, "grad_sync")
    assert len(parse_faults("kind=kill,rank=2,step=3;kind=hang,rank=3,step=3")) == 2
    assert parse_faults(None) == [] and parse_faults("") == []
    with pytest.raises(ValueError):
        FaultSpec.parse("kind=melt,rank=2,step=3")


def test_arrival_barrier_waits_for_every_member() -> None:
    store = dist.HashStore()
    late = threading.Timer(0.05, lambda: store.add("g1/arrived", 1))
    late.start()
    try:
        polls = arrival_barrier(store, "g1/arrived", 2, lambda: None, timeout_s=5)
    finally:
        late.cancel()
    assert store.add("g1/arrived", 0) == 2
    assert polls > 1  # it had to wait for the late member


def test_arrival_barrier_is_abandoned_on_pause() -> None:
    store = dist.HashStore()
    reason: list[str] = []
    threading.Timer(0.05, lambda: reason.append("pause g3")).start()
    t0 = time.monotonic()
    with pytest.raises(PauseRequested, match="pause g3"):
        arrival_barrier(store, "g2/arrived", 2, lambda: reason[0] if reason else None, timeout_s=30)
    assert time.monotonic() - t0 < 5


def test_arrival_barrier_times_out_on_a_member_that_never_comes() -> None:
    store = dist.HashStore()
    with pytest.raises(CollectiveError, match="only 1 of 3 members"):
        arrival_barrier(store, "g4/arrived", 3, lambda: None, timeout_s=0.2)


def test_arrival_barrier_consults_abandon_even_when_everyone_arrived() -> None:
    """#12 item 9: a full barrier must not hide a superseding pause that is already pending."""
    store = dist.HashStore()
    store.add("g5/arrived", 1)  # the other member is already here: the first poll fills it
    with pytest.raises(PauseRequested, match="pause g6"):
        arrival_barrier(store, "g5/arrived", 2, lambda: "pause g6", timeout_s=5)


@pytest.mark.unit
def test_clear_keeps_a_pause_of_a_newer_generation() -> None:
    """#12 item 9: entering generation 2 must not erase a pause that already names generation 3."""
    intr = Interruptor()
    intr.interrupt("pause g2 from sidecar", generation=2)
    intr.interrupt("pause g3 from sidecar", generation=3)  # superseding plan, during recovery
    assert intr.clear(2) is False
    with pytest.raises(PauseRequested, match="pause g3"):
        intr.check()
    assert intr.clear(3) is True
    intr.check()
    intr.interrupt("peer died (self-detected)")  # no generation: belongs to the current one
    assert intr.clear(4) is True
    intr.check()


@pytest.mark.unit
@pytest.mark.timeout(60)
def test_group_build_with_a_missing_member_fails_within_the_connect_timeout() -> None:
    """#12: a member that died after the arrival barrier pinned its peers in the gloo constructor
    for the collective timeout (300 s), far past the executor's pause wait."""
    store = dist.HashStore()
    fac = GlooGroupFactory(lazy_init=False, connect_timeout_s=2.0)  # eager, as sidecars start ranks
    t0 = time.monotonic()
    with pytest.raises(RuntimeError):
        fac.build(store, "job", 1, rank=0, world_size=2, tp=1)  # rank 1 never comes
    assert time.monotonic() - t0 < 20
    # one budget for the build: the global group takes it all, the dp group fails at once
    store = dist.HashStore()
    store.set("flashrecovery/job/g3/global/marker", b"x")
    t0 = time.monotonic()
    glob_only = GlooGroupFactory(lazy_init=False, connect_timeout_s=2.0)
    with pytest.raises(RuntimeError):
        glob_only.build(store, "job", 3, rank=0, world_size=4, tp=2)  # 3 of 4 never come
    assert time.monotonic() - t0 < 2.0 + 2 * 0.5 + 3  # not 3 x 2 s
    # the collectives of a group that did form keep the long timeout and work
    ok = GlooGroupFactory(lazy_init=False, connect_timeout_s=1.0).build(dist.HashStore(), "job", 2, 0, 1, 1)
    t = torch.ones(2)
    ok.global_pg.allreduce([t]).wait()
    assert t.tolist() == [1.0, 1.0]


def _sliced_wait_rank(rank: int, port: int, out: multiprocessing.Queue) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    x = torch.ones(3) * (rank + 1)
    if rank == 1:
        time.sleep(0.6)  # many wait slices late
        dist.all_reduce(x)
        time.sleep(30)  # alive, never joins the second collective (as if stopped); killed
        return
    intr = Interruptor()
    t0 = time.monotonic()
    intr.wait(dist.all_reduce(x, async_op=True), "allreduce", rank=0)
    late = (time.monotonic() - t0, x.tolist())
    threading.Timer(0.3, intr.interrupt, args=("pause g1",)).start()
    t0 = time.monotonic()
    try:
        intr.wait(dist.all_reduce(x, async_op=True), "allreduce", rank=0)
        paused = "not interrupted"
    except PauseRequested as exc:
        paused = str(exc)
    left = [f.done() for f in intr.take_abandoned()]
    out.put((late, paused, time.monotonic() - t0, left))


@pytest.mark.timeout(90)
def test_a_sliced_wait_outlasts_a_late_peer_and_still_pauses_on_a_peer_that_never_comes(gloo_pair) -> None:
    """The slices of a collective wait time out while the peer is late, and the collective still
    completes with the right result (a timed-out work.wait leaves the gloo work running); with a
    peer that never joins, a pause ends the wait and the running collective is abandoned."""
    (late_s, summed), paused, pause_s, abandoned = gloo_pair(_sliced_wait_rank)
    assert late_s > 0.4 and summed == [3.0, 3.0, 3.0]  # waited through ~25 slices, then the sum
    assert paused == "pause g1" and pause_s < 2.0
    assert abandoned == [False]  # the second collective still runs on its group
