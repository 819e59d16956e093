"""#12 item 4: an assigned standby answers a pause between assign and recover."""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
from pathlib import Path

import pytest
import torch.distributed as dist

from flashrecovery.agent.agent import AgentExit, RecoveryAgent
from flashrecovery.agent.settings import AgentSettings
from flashrecovery.shared import channel as ch


def _read(f, timeout_s: float = 10.0) -> ch.Message:
    f.raw._sock.settimeout(timeout_s)  # type: ignore[attr-defined]
    line = f.readline()
    assert line, "the agent closed the channel"
    return ch.decode(line)


@contextlib.contextmanager
def _standby(command_timeout_s: float):
    """A standby agent started in a thread against a socket this test serves as its sidecar ->
    (connection, its reader, the thread, what start() raised), once the agent said hello."""
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "agent.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        settings = AgentSettings(
            standby=True,
            socket=path,
            world_size=2,
            rdzv=f"127.0.0.1:{master.port}",
            command_timeout_s=command_timeout_s,
        )
        agent = RecoveryAgent(settings)
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                agent.start()
            except BaseException as exc:  # noqa: BLE001 - the test reads it
                outcome.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        server.settimeout(20)
        conn, _ = server.accept()
        try:
            f = conn.makefile("rb")
            assert isinstance(_read(f), ch.Hello)
            yield conn, f, t, outcome
        finally:
            conn.close()
            server.close()


@pytest.mark.unit
@pytest.mark.timeout(60)
def test_assigned_standby_reports_paused_on_pause() -> None:
    with _standby(command_timeout_s=20) as (conn, f, t, outcome):
        conn.sendall(ch.encode(ch.Assign(rank=1, local_rank=0, node_id="spare-0")))
        conn.sendall(ch.encode(ch.Pause(generation=2)))  # a superseding plan's pause
        paused = _read(f)
        assert isinstance(paused, ch.Paused) and paused.rank == 1 and paused.applied_step == 0
        conn.sendall(ch.encode(ch.Stop()))
        t.join(20)
        assert outcome and isinstance(outcome[0], AgentExit)


@pytest.mark.unit
@pytest.mark.timeout(60)
def test_an_unassigned_standby_outwaits_the_command_timeout() -> None:
    """A standby waits for its assignment as long as the job runs fault-free; the command
    timeout bounds only an assigned rank's wait for its recover (seen: the spare's standbys all
    died after command_timeout_s, 10 minutes into a fault-free soak)."""
    with _standby(command_timeout_s=0.5) as (conn, _f, t, outcome):
        t.join(2.0)  # four command timeouts with nothing to do
        assert t.is_alive() and not outcome, outcome
        # assigned, it is a rank waiting for its recover: that wait is bounded
        conn.sendall(ch.encode(ch.Assign(rank=1, local_rank=0, node_id="spare-0")))
        t.join(10)
        assert outcome and "no command from the sidecar" in str(outcome[0])
