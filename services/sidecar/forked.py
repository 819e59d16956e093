"""The sidecar's side of the node's zygote (zygote.py): start it, ask it for a worker, and
hand back a process object the sidecar drives like an asyncio subprocess (pid, returncode,
wait, kill, stdout / stderr streams)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from .zygote import MAX_PACKET


class ForkedProcess:
    """A worker forked by the zygote: not this process's child, so its end is learnt from the
    zygote (which reaps it) and it is killed by PID while it has not ended."""

    def __init__(self, pid: int, stdout: asyncio.StreamReader, stderr: asyncio.StreamReader) -> None:
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self._ended = asyncio.Event()

    def ended(self, code: int) -> None:
        self.returncode = code
        self._ended.set()

    async def wait(self) -> int:
        await self._ended.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # once reaped, the PID may be another process's
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


async def _reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    return reader


class Zygote:
    """One per sidecar. `start` launches it; `ready` is set once it has imported its modules;
    `spawn` forks a worker. If the zygote dies, `alive` is False and the sidecar starts workers
    as new interpreters again."""

    def __init__(self, preimport: list[str], import_nice: int, log: Any) -> None:
        self.preimport, self.import_nice, self.log = preimport, import_nice, log
        self.proc: asyncio.subprocess.Process | None = None
        self.sock: socket.socket | None = None
        self.ready = asyncio.Event()
        self.alive = False
        self._ids = itertools.count(1)
        self._forked: dict[int, asyncio.Future[int]] = {}  # request id -> pid
        self._procs: dict[int, ForkedProcess] = {}  # pid -> its process object
        self._early_exits: dict[int, int] = {}  # pid -> code, ended before its object existed
        self._task: asyncio.Task | None = None
        self._closing = False

    async def start(self, prepare_child: Callable[[], None]) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "flashrecovery.sidecar.zygote",
            "--fd",
            str(theirs.fileno()),
            "--preimport",
            ",".join(self.preimport),
            "--nice",
            str(self.import_nice),
            pass_fds=(theirs.fileno(),),
            preexec_fn=prepare_child,
        )
        theirs.close()
        mine.setblocking(False)
        self.sock, self.alive = mine, True
        self._task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        try:
            while True:
                packet = await loop.sock_recv(self.sock, MAX_PACKET)
                if not packet:
                    break
                self._on_message(json.loads(packet))
        except (OSError, ValueError) as exc:
            self.log.warning("zygote_channel_failed", error=repr(exc))
        finally:
            self.alive = False
            for fut in self._forked.values():
                if not fut.done():
                    fut.set_exception(RuntimeError("the zygote ended"))
            # Its children die with it (parent-death signal) and nobody is left to report their
            # end: report it here, or the sidecar would wait for them forever.
            for proc in list(self._procs.values()):
                proc.kill()
                proc.ended(-signal.SIGKILL)
            self._procs.clear()
            code = self.proc.returncode if self.proc else None
            if self._closing:
                self.log.info("zygote_ended", code=code)
            else:  # its standbys went with it: new ones start as new interpreters
                self.log.warning("zygote_ended", code=code, fallback="new interpreters")

    def _on_message(self, msg: dict[str, Any]) -> None:
        if msg.get("ready"):
            self.ready.set()
            self.log.info("zygote_ready", pid=self.proc.pid if self.proc else None)
        elif "exit" in msg:
            pid, code = int(msg["exit"]), int(msg["code"])
            proc = self._procs.pop(pid, None)
            if proc is None:
                self._early_exits[pid] = code
            else:
                proc.ended(code)
        elif "pid" in msg or "error" in msg:
            fut = self._forked.pop(msg.get("id") or 0, None)
            if fut is not None and not fut.done():
                if "pid" in msg:
                    fut.set_result(int(msg["pid"]))
                else:
                    fut.set_exception(RuntimeError(f"the zygote refused a request: {msg['error']}"))

    async def spawn(self, argv: list[str], env: dict[str, str], nice: int) -> ForkedProcess:
        """Fork a worker running `argv` (the command after the interpreter)."""
        if not self.alive or self.sock is None:
            raise RuntimeError("the zygote is not running")
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        rid = next(self._ids)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._forked[rid] = fut
        try:
            payload = json.dumps({"id": rid, "argv": argv, "env": env, "nice": nice}).encode()
            socket.send_fds(self.sock, [payload], [out_w, err_w])
        except OSError:
            self._forked.pop(rid, None)
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        pid = await asyncio.wait_for(fut, 30)
        proc = ForkedProcess(pid, await _reader(out_r), await _reader(err_r))
        if pid in self._early_exits:
            proc.ended(self._early_exits.pop(pid))
        else:
            self._procs[pid] = proc
        return proc

    async def close(self) -> None:
        self._closing = True
        if self.sock is not None:
            self.sock.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.proc.wait(), 5)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
