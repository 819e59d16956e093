"""The node's zygote: one process that imports torch once, then forks the node's standbys.

    python -m flashrecovery.sidecar.zygote --fd N --preimport torch

Why: every standby used to be a new interpreter importing torch (~4 CPU-s, ~8 contended). A
standby started again after a recovery did that while the job trained, and on a node whose
cores the trainers use it cost them more steps than the recovery itself (docs/benchmarks.md,
"Where ours loses goodput"); a cold start in place cost seconds on the critical path. A fork of
a process that has imported torch (and nothing else: no op has run, no thread pool or
communicator exists, as in a DataLoader worker forked from a trainer) is ready in a fraction of
a second, for a few MB of copied page tables.

The sidecar (services/sidecar/forked.py) owns it over a SOCK_SEQPACKET socket, one JSON message
per packet:
- zygote -> sidecar: {"ready": true} once its imports are done;
- sidecar -> zygote: {"id", "argv", "env", "nice"} with the child's stdout and stderr as two
  file descriptors (SCM_RIGHTS); argv is the worker command after the interpreter
  (`-m MODULE ARGS` or `SCRIPT ARGS`);
- zygote -> sidecar: {"id", "pid"} once forked, {"exit": pid, "code": rc} when a child ends
  (rc as subprocess gives it: negative for a signal).
The zygote dies with the sidecar, and every child with the zygote (parent-death signal), so
nothing outlives the node. Single-threaded: children are reaped on SIGCHLD through the signal
wakeup fd, never by a thread that a fork could catch holding a lock; and it reports ready only
once the importing thread has left the process (warm_start.import_niced: its C exit
destructors hold locks too; a standby forked inside that window once hung in MKL).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
from typing import Any

from flashrecovery.shared.process import die_with_parent

from .warm_start import import_niced, run_command

MAX_PACKET = 1 << 20  # a request carries the worker's whole environment


def _send(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.send(json.dumps(obj).encode())


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _become_child(sock: socket.socket, wake_r: int, wake_w: int, req: dict[str, Any], fds: list[int]) -> list[str]:
    """In the forked child: the worker's stdio, environment and niceness; returns its command."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd in (wake_r, wake_w):
        os.close(fd)
    sock.close()
    die_with_parent(signal.SIGKILL)  # the zygote is the parent: a worker never outlives its node
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in fds:
        os.close(fd)
    os.environ.clear()
    os.environ.update(req["env"])
    raise_by = int(req.get("nice", 0)) - os.getpriority(os.PRIO_PROCESS, 0)
    if raise_by > 0:
        os.nice(raise_by)
    return list(req["argv"])


def serve(sock: socket.socket) -> list[str]:
    """Fork children on request until the sidecar closes the socket (then exit). Returns only
    in a forked child: the command it is to run."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd is written
    _send(sock, {"ready": True})
    while True:
        ready, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
            _reap(sock)
        if sock not in ready:
            continue
        msg, fds, _, _ = socket.recv_fds(sock, MAX_PACKET, 2)
        if not msg:
            raise SystemExit(0)  # the sidecar is gone; the children follow (parent-death signal)
        try:
            req = json.loads(msg)
            if len(fds) != 2 or not isinstance(req.get("argv"), list) or not isinstance(req.get("env"), dict):
                raise ValueError("a request needs argv, env and two file descriptors")
        except ValueError as exc:
            for fd in fds:
                os.close(fd)
            _send(sock, {"id": None, "error": str(exc)})
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return _become_child(sock, wake_r, wake_w, req, fds)
        for fd in fds:
            os.close(fd)
        _send(sock, {"id": req.get("id"), "pid": pid})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="flashrecovery.sidecar.zygote")
    p.add_argument("--fd", type=int, required=True, help="the sidecar's end of a SOCK_SEQPACKET socketpair")
    p.add_argument("--preimport", default="torch")
    p.add_argument("--nice", type=int, default=0, help="niceness of the importing thread")
    args = p.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    import_niced([m for m in args.preimport.split(",") if m.strip()], args.nice)
    run_command(serve(sock))  # only a forked child gets here


if __name__ == "__main__":
    main()
