"""A refill standby's entry: its heavy imports run in a low-priority thread, then the worker's
own command runs unchanged in the main thread.

    python -m flashrecovery.sidecar.warm_start --nice 19 --preimport torch -- -m MODULE ARGS
    python -m flashrecovery.sidecar.warm_start --nice 19 --preimport torch -- SCRIPT ARGS

Why: a standby started again after a recovery imports torch (~4 CPU-s) while the job trains;
on a node whose cores the trainers use, it took them ~20 steps per fault, several times what
the recovery itself cost (docs/benchmarks.md, "Where ours loses goodput"). Linux niceness is
per thread, and an unprivileged process may raise it but never lower it again: niceing the
whole standby would leave the rank it later becomes a straggler. So only the importing thread
is niced; the main thread, and the threads torch starts later from it (its intra-op pool, gloo's
I/O threads), keep the worker's niceness. A thread the import itself starts keeps the higher
niceness: torch's start one idle thread (measured: no CPU while training).

An import that fails here is left to fail again, with its own traceback, in the worker's code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import runpy
import sys
import threading
import time

# How long the importing thread may take to leave after its Python part ended (C thread-local
# destructors; ~1 ms measured). Bounded so a stuck destructor cannot keep a standby from starting.
THREAD_EXIT_WAIT_S = 5.0


def import_niced(modules: list[str], nice: int) -> int:
    """Import `modules` in a thread niced to at least `nice`; return, once that thread has left
    the process entirely, its native thread id.

    Why the wait: `Thread.join()` returns when the thread's Python part ends, while the OS
    thread still runs the C libraries' thread-exit destructors. The torch import gives the
    thread an MKL memory-accounting slot, and MKL's destructor for it holds a spin lock. The
    zygote forks a standby right after this returns: a fork inside that window copied the lock
    held, with no thread left to release it, and the standby spun forever in its first matrix
    product once it had become a rank (seen under py-spy in `mm_account_ptr_by_tid`; the whole
    job then stalled behind the new rank, and CI failed on it)."""

    def work() -> None:
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
        except OSError:
            pass  # no per-thread priority here: the import still runs, at the worker's
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the worker's own import reports it
                pass

    t = threading.Thread(target=work, name="standby-preimport", daemon=True)
    t.start()
    t.join()
    assert t.native_id is not None  # set once started
    wait_thread_gone(t.native_id, THREAD_EXIT_WAIT_S)
    return t.native_id


def wait_thread_gone(tid: int, timeout_s: float) -> None:
    """Wait, at most `timeout_s`, until thread `tid` of this process no longer exists (its exit
    destructors are done)."""
    deadline = time.monotonic() + timeout_s
    while os.path.exists(f"/proc/self/task/{tid}") and time.monotonic() < deadline:
        time.sleep(0.001)


def run_command(command: list[str]) -> None:
    """Run `-m MODULE ARGS` or `SCRIPT ARGS` as `python` would in this process's main thread."""
    if not command or (command[0] == "-m" and len(command) < 2):
        raise SystemExit("warm_start: nothing to run (expected -m MODULE ARGS or SCRIPT ARGS)")
    if command[0] == "-m":
        sys.argv = [command[1], *command[2:]]  # run_module sets argv[0] to the module's file
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
        return
    script = command[0]
    sys.argv = [script, *command[1:]]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT` sets it
    runpy.run_path(script, run_name="__main__")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if "--" not in args:
        raise SystemExit("warm_start: usage: --nice N --preimport A,B -- (-m MODULE | SCRIPT) ARGS")
    cut = args.index("--")
    p = argparse.ArgumentParser(prog="flashrecovery.sidecar.warm_start")
    p.add_argument("--nice", type=int, required=True)
    p.add_argument("--preimport", default="")
    opts = p.parse_args(args[:cut])
    import_niced([m for m in opts.preimport.split(",") if m.strip()], opts.nice)
    run_command(args[cut + 1 :])


if __name__ == "__main__":
    main()
