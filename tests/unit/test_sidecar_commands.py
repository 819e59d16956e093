"""The sidecar's command handlers on one node, without a broker: acks are captured, the
worker processes are `sleep` processes this test starts (and kills)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from flashrecovery.shared import bus as busmod
from flashrecovery.shared import channel as ch
from flashrecovery.shared.schemas import Assignment, CommandAction, ExecutorCommand, RankState
from flashrecovery.shared.settings import Settings, SidecarSettings
from flashrecovery.sidecar.app import SidecarService, Worker
from flashrecovery.sidecar.core import RegistryView

pytestmark = pytest.mark.timeout(30)


class _Writer:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    async def drain(self) -> None:
        pass


class _Bus:
    """Stands in for the Kafka producer and consumer: nothing here talks to a broker."""

    def __init__(self, *args, **kwargs) -> None:
        pass


async def _sidecar(tmp_path, node_id: str, monkeypatch):
    monkeypatch.setattr(busmod, "Producer", _Bus)
    monkeypatch.setattr(busmod, "Consumer", _Bus)
    svc = SidecarService(
        Settings(
            job_id="j",
            runtime_dir=str(tmp_path),
            redis_url="redis://127.0.0.1:9",
            # no standby of its own: these tests hand it the workers they need
            sidecar=SidecarSettings(node_id=node_id, role="active", standbys=0),
        )
    )
    acks: list = []

    async def publish(event, wait=False):
        acks.append(event)

    async def no_cold_start(local_rank, rank):
        raise AssertionError("cold start: the replacement assigned earlier was killed")

    async def view():  # the registry: generation 4 (every command here is from 3 or 4), 8 ranks
        return RegistryView(generation=4, world_size=8, fence_token=None)

    svc.producer.publish = publish
    svc._launch = no_cold_start
    svc._registry_view = view
    return svc, acks


async def _worker(svc: SidecarService, tmp_path, rank: int | None) -> Worker:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(60)")
    w = Worker(
        proc=proc,
        local_rank=0,
        rank=rank,
        standby=rank is None,
        log_path=tmp_path / f"{proc.pid}.log",
        writer=_Writer(),
        state=RankState.STANDBY if rank is None else RankState.RUNNING,
    )
    svc.workers[proc.pid] = w
    return w


async def _handled(svc: SidecarService, cmd: ExecutorCommand) -> None:
    await svc.on_command(cmd, None)
    await asyncio.wait_for(asyncio.gather(*list(svc.tasks)), 10)


def _cmd(action, attempt, gen=3, **fields) -> ExecutorCommand:
    return ExecutorCommand(
        job_id="j",
        generation=gen,
        producer="executor-0",
        command_id=f"p:{action}:{attempt}",
        plan_id="p",
        incident_id="i",
        action=action,
        attempt=attempt,
        **fields,
    )


async def test_retried_replace_and_pause_keep_the_replacement(tmp_path, monkeypatch):
    svc, acks = await _sidecar(tmp_path, "spare-0", monkeypatch)
    standby = await _worker(svc, tmp_path, None)
    try:
        replace = dict(
            nodes=("node-1", "spare-0"),
            kill_ranks=(2,),
            assignments=(Assignment(rank=2, local_rank=0, node_id="spare-0"),),
        )
        await _handled(svc, _cmd(CommandAction.REPLACE, 0, **replace))
        assert standby.rank == 2 and acks[-1].ok
        # attempt 0's ack was lost: the executor retries (a new command id), then a late retry
        # of the pause arrives too; both name rank 2 in kill_ranks
        await _handled(svc, _cmd(CommandAction.REPLACE, 1, **replace))
        await _handled(svc, _cmd(CommandAction.PAUSE, 1, kill_ranks=(2,)))
        assert standby.proc.returncode is None, "a retry killed the replacement it had assigned"
        assert acks[1].ok and [r.pid for r in acks[1].ranks] == [standby.pid]
        # a newer plan (generation 4) that moves rank 2 again does kill it
        await _handled(svc, _cmd(CommandAction.PAUSE, 0, gen=4, kill_ranks=(2,)))
        assert standby.proc.returncode is not None
    finally:
        if standby.proc.returncode is None:
            standby.proc.kill()
        await standby.proc.wait()


async def test_a_digest_mismatch_fails_the_restore_stage_at_once(tmp_path, monkeypatch):
    svc, acks = await _sidecar(tmp_path, "spare-0", monkeypatch)
    w = await _worker(svc, tmp_path, 2)
    try:
        await svc.on_command(_cmd(CommandAction.RECOVER, 0, world_size=8, resume_step=6), None)
        async with asyncio.timeout(5):  # until the handler has sent Recover and waits
            while not w.writer.sent:
                await asyncio.sleep(0.01)
        for msg in (
            ch.Progress(rank=2, generation=3, phase="rebuilt", seconds=0.1),
            ch.Error(rank=2, message="state from rank 6: digest mismatch"),
        ):
            svc._on_report(w, msg)
            async with svc.events:
                svc.events.notify_all()
        # the phase timeout is 60 s: the failure must come long before it
        await asyncio.wait_for(asyncio.gather(*list(svc.tasks)), 5)
        assert [(a.stage, a.ok) for a in acks] == [("rebuilt", True), ("restored", False)]
        assert "digest mismatch" in acks[-1].detail
    finally:
        w.proc.kill()
        await w.proc.wait()


async def _plain_exit(
    tmp_path, monkeypatch, code: int, rank: int | None, exit_with_job: bool = True, role: str = "active"
):
    """A worker that never connected to the agent (a plain torchrun script) exits with `code`."""
    monkeypatch.setattr(busmod, "Producer", _Bus)
    monkeypatch.setattr(busmod, "Consumer", _Bus)
    svc = SidecarService(
        Settings(
            job_id="j",
            runtime_dir=str(tmp_path),
            redis_url="redis://127.0.0.1:9",
            sidecar=SidecarSettings(
                node_id="node-0" if role == "active" else "spare-0",
                role=role,
                ranks="0,1" if role == "active" else "",
                world_size=2,
                exit_with_job=exit_with_job,
            ),
        )
    )
    published, finished = [], []

    async def publish(event, wait=False):
        published.append(event)

    async def mark_finished(r, step):
        finished.append(r)
        return len(finished), 2

    async def job_finished():
        return len(finished) == 2

    svc.producer.publish = publish
    svc.registry.mark_finished = mark_finished
    svc.registry.job_finished = job_finished
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", f"import sys; sys.exit({code})")
    w = Worker(
        proc=proc,
        local_rank=0,
        rank=rank,
        standby=rank is None,
        log_path=tmp_path / "w.log",
        state=RankState.STARTING if rank is not None else RankState.STANDBY,
    )
    svc.workers[proc.pid] = w
    await asyncio.wait_for(svc._watch_exit(w), 10)
    return svc, published, finished


async def test_a_plain_rank_exiting_0_has_finished(tmp_path, monkeypatch):
    svc, published, finished = await _plain_exit(tmp_path, monkeypatch, 0, 1)
    assert finished == [1] and published[-1].expected and published[-1].exit_code == 0
    assert svc.result is None and not svc.stopping.is_set()  # rank 0 has not finished yet


async def test_a_plain_rank_failing_ends_the_run_with_its_reason(tmp_path, monkeypatch):
    svc, published, finished = await _plain_exit(tmp_path, monkeypatch, 3, 1)
    assert not finished and not published[-1].expected
    code, reason = svc.result
    assert code == 1 and svc.stopping.is_set()
    assert reason.startswith("rank 1 (pid") and "(exit code 3)" in reason and "w.log" in reason


async def test_a_plain_standby_on_a_spare_ends_the_run_saying_standbys_0(tmp_path, monkeypatch):
    svc, _, _ = await _plain_exit(tmp_path, monkeypatch, 1, None, role="spare")
    assert svc.result[0] == 1 and "use --standbys 0" in svc.result[1]


async def test_a_plain_standby_on_an_active_node_only_turns_its_standbys_off(tmp_path, monkeypatch):
    """An active node's standby only speeds up restarts in place: a plain script's (it cannot
    wait for a rank) turns the node's standbys off, and the run goes on."""
    svc, _, _ = await _plain_exit(tmp_path, monkeypatch, 1, None)
    assert svc.result is None and not svc.stopping.is_set()
    assert svc.standbys_off
    await asyncio.wait_for(svc._refill_standbys(), 5)  # and starts no other
    assert svc.workers.keys() == {w.pid for w in svc.workers.values() if w.proc.returncode is not None}


async def test_without_exit_with_job_a_plain_failure_is_left_to_the_control_plane(tmp_path, monkeypatch):
    svc, published, _ = await _plain_exit(tmp_path, monkeypatch, 3, 1, exit_with_job=False)
    assert svc.result is None and not svc.stopping.is_set() and not published[-1].expected


@pytest.mark.parametrize(
    "forged",
    [
        dict(gen=10**9),
        dict(fence_token=10**18),
        dict(kill_ranks=(10**9,)),
    ],
)
async def test_a_forged_command_is_refused_and_does_not_blind_the_node(tmp_path, monkeypatch, forged):
    """A pause from a generation the registry never reached (or with a token never issued, or
    for a rank outside the job) was acted on, and left the gate at that generation / token: every
    real command after it was ignored as stale. Refused now, not acked, and the real one acts."""
    svc, acks = await _sidecar(tmp_path, "node-1", monkeypatch)

    async def view():
        return RegistryView(generation=4, world_size=8, fence_token=2)

    svc._registry_view = view
    w = await _worker(svc, tmp_path, 2)
    try:
        gen = forged.pop("gen", 4)
        await _handled(svc, _cmd(CommandAction.PAUSE, 7, gen=gen, **forged))
        assert acks == [] and svc.gate.refused_commands == 1 and not w.writer.sent
        assert svc.gate.generation <= 4 and svc.gate.fence_token <= 2
        real = _cmd(CommandAction.PAUSE, 0, gen=4, kill_ranks=(2,), fence_token=2)
        await _handled(svc, real)
        assert w.proc.returncode is not None  # the real pause killed rank 2, as it asked
        assert acks and acks[-1].command_id == real.command_id and acks[-1].ok
    finally:
        if w.proc.returncode is None:
            w.proc.kill()
        await w.proc.wait()


async def test_a_command_is_not_acted_on_unchecked_when_the_registry_does_not_answer(tmp_path, monkeypatch):
    svc, acks = await _sidecar(tmp_path, "node-1", monkeypatch)

    async def view():
        return None

    svc._registry_view = view
    await _handled(svc, _cmd(CommandAction.STOP, 0, gen=4))
    assert acks == [] and svc.gate.refused_commands == 1
