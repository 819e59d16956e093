"""The sidecar <-> worker channel contract (shared/channel.py)."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from flashrecovery.shared import channel as ch

SAMPLES = [
    ch.Hello(pid=12, rank=None, local_rank=None, standby=True),
    ch.Hello(pid=12, rank=3, local_rank=1),
    ch.Step(rank=3, step=12, step_time_s=0.05, generation=0),
    ch.LongPhase(rank=3, name="eval", expected_s=30.0),
    ch.Paused(rank=3, generation=0, applied_step=11, grads_step=None, vote_step=11),
    ch.Progress(rank=3, generation=1, phase="restored", seconds=0.2, bytes=100, digest_ok=True),
    ch.Done(rank=3, step=30, digest="ab"),
    ch.Error(rank=3, message="RuntimeError: Connection closed by peer"),
    ch.Pause(generation=0),
    ch.Assign(rank=2, local_rank=0, node_id="spare"),
    ch.Recover(generation=1, world_size=8, commit_step=None, resume_step=12, transfers=(ch.Transfer(src=0, dst=2),)),
    ch.Stop(),
]


@pytest.mark.unit
@pytest.mark.parametrize("msg", SAMPLES, ids=[m.type for m in SAMPLES])
def test_roundtrip(msg: ch._Msg) -> None:
    line = ch.encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["type"] == msg.type
    assert ch.decode(line) == msg


@pytest.mark.unit
def test_wire_shape_of_recover() -> None:
    obj = json.loads(ch.encode(SAMPLES[10]))
    assert obj == {
        "type": "recover",
        "generation": 1,
        "world_size": 8,
        "commit_step": None,
        "resume_step": 12,
        "transfers": [{"src": 0, "dst": 2}],
        "in_band": False,
    }


@pytest.mark.unit
def test_unknown_fields_ignored_and_bad_lines_rejected() -> None:
    assert ch.decode('{"type": "pause", "generation": 3, "new_field": 1}') == ch.Pause(generation=3)
    for bad in ['{"type": "nope"}', "not json", '{"type": "pause"}']:
        with pytest.raises(ch.UnknownMessage):
            ch.decode(bad)
    assert ch.message_type('{"type": "nope"}') == "nope"


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_connection_over_socketpair() -> None:
    a, b = socket.socketpair()
    ca, cb = ch.Connection(a), ch.Connection(b)
    got: list[ch.Message] = []
    t = threading.Thread(target=lambda: got.extend(cb.messages()))
    t.start()
    for m in SAMPLES:
        ca.send(m)
    ca.close()
    t.join(5)
    assert got == SAMPLES
    cb.close()
