"""The local channel between a training process (the agent) and its node's sidecar.

Wire format: newline-delimited JSON over a Unix stream socket. The sidecar listens at the path in
``FLASHRECOVERY_AGENT_SOCKET``; every worker connects and sends ``hello`` first. Each line is one
JSON object with a ``type`` field naming the message. Both sides use the models and the
``encode``/``decode`` helpers of this module; readers ignore unknown fields, so fields may be added
later with defaults without breaking older peers.

worker -> sidecar: hello, step, long_phase, paused, progress, done, error
sidecar -> worker: pause, assign, recover, stop
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


# --------------------------------------------------------------------------- worker -> sidecar
class Hello(_Msg):
    type: Literal["hello"] = "hello"
    pid: int
    rank: int | None  # None for a pre-started standby that has no identity yet
    local_rank: int | None = None
    standby: bool = False


class Step(_Msg):
    """Sent after every committed step. ``step`` is the last committed step (1-based count)."""

    type: Literal["step"] = "step"
    rank: int
    step: int
    step_time_s: float
    generation: int


# The long phase a rank declares for its first step (agent settings `first_step_s`).
FIRST_STEP_PHASE = "first_step"


class LongPhase(_Msg):
    """A declared long phase (eval, checkpoint...) so the sidecar does not call it a hang."""

    type: Literal["long_phase"] = "long_phase"
    rank: int
    name: str
    expected_s: float


class Paused(_Msg):
    """The rank stopped at a step boundary-safe point and waits for ``recover``.

    applied_step: last step whose optimizer update this rank applied (0: none yet).
    grads_step: step whose fully dp-reduced gradients the rank holds, or None.
    vote_step: last step whose commit vote completed on this rank (0: none yet).
    """

    type: Literal["paused"] = "paused"
    rank: int
    generation: int
    applied_step: int
    grads_step: int | None
    vote_step: int


class Progress(_Msg):
    type: Literal["progress"] = "progress"
    rank: int
    generation: int
    phase: Literal["rebuilt", "restored", "resumed"]
    seconds: float
    bytes: int | None = None
    digest_ok: bool | None = None
    # `rebuilt` of an in-band recovery: the decision the survivors reached (commit_rule.decide_in_band);
    # commit_step None with resume_step set = nothing to commit.
    commit_step: int | None = None
    resume_step: int | None = None
    computed_step: int | None = None


class Done(_Msg):
    type: Literal["done"] = "done"
    rank: int
    step: int
    digest: str


class Error(_Msg):
    type: Literal["error"] = "error"
    rank: int | None
    message: str


# --------------------------------------------------------------------------- sidecar -> worker
class Pause(_Msg):
    """Stop the current generation: break out of collectives, drop the partial step, report."""

    type: Literal["pause"] = "pause"
    generation: int


class Assign(_Msg):
    """A standby takes over the identity of ``rank``."""

    type: Literal["assign"] = "assign"
    rank: int
    local_rank: int
    node_id: str


class Transfer(_Msg):
    src: int
    dst: int


class Recover(_Msg):
    type: Literal["recover"] = "recover"
    generation: int
    world_size: int
    commit_step: int | None
    resume_step: int
    transfers: tuple[Transfer, ...] = ()
    # True: commit_step and resume_step are not given; the ranks decide them in-band, in the
    # rebuild's allreduce (commit_rule.decide_in_band).
    in_band: bool = False


class Stop(_Msg):
    type: Literal["stop"] = "stop"


WorkerMessage = Union[Hello, Step, LongPhase, Paused, Progress, Done, Error]
SidecarMessage = Union[Pause, Assign, Recover, Stop]
Message = Annotated[
    Union[Hello, Step, LongPhase, Paused, Progress, Done, Error, Pause, Assign, Recover, Stop],
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)


class UnknownMessage(ValueError):
    """A line that is not valid JSON or names no known message type."""


def encode(msg: _Msg) -> bytes:
    """One message -> one newline-terminated JSON line."""
    return msg.model_dump_json().encode() + b"\n"


def decode(line: bytes | str) -> Message:
    """One JSON line -> its message model. Raises UnknownMessage on bad input."""
    try:
        return _ADAPTER.validate_json(line.strip() if isinstance(line, bytes) else line.strip())
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise UnknownMessage(f"bad channel line {line[:200]!r}: {exc}") from exc


def message_type(line: bytes | str) -> str | None:
    """The ``type`` field of a line, without validating the rest (for logging bad input)."""
    try:
        kind = json.loads(line).get("type")
    except (ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


class Connection:
    """A thread-safe newline-JSON connection over a connected stream socket (both sides)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._wlock = threading.Lock()
        self._rfile = sock.makefile("rb")

    @classmethod
    def connect(cls, path: str, timeout_s: float = 30.0) -> Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        sock.connect(path)
        sock.settimeout(None)
        return cls(sock)

    def send(self, msg: _Msg) -> None:
        data = encode(msg)
        with self._wlock:
            self.sock.sendall(data)

    def messages(self) -> Iterator[Message]:
        """Yield decoded messages until EOF. Bad lines raise UnknownMessage."""
        for line in self._rfile:
            if line.strip():
                yield decode(line)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._rfile.close()
        except OSError:
            pass
        self.sock.close()
