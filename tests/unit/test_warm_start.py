"""A refill standby imports torch in a niced thread, then runs the worker's command unchanged
(services/sidecar/warm_start.py; the wiring: core.refill_argv)."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from flashrecovery.sidecar.core import WARM_START_MODULE, refill_argv, worker_argv
from flashrecovery.sidecar.warm_start import import_niced, run_command

pytestmark = pytest.mark.unit

PROBE = """
import os, threading
nice_at_import = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
thread_at_import = threading.current_thread().name
"""


def own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_refill_argv_wraps_the_worker_command_and_is_unchanged_when_off():
    argv = worker_argv("/py", "pkg.train", "", ["--steps", "5"])
    assert refill_argv(argv, 19, ["torch"]) == [
        "/py",
        "-m",
        WARM_START_MODULE,
        "--nice",
        "19",
        "--preimport",
        "torch",
        "--",
        "-m",
        "pkg.train",
        "--steps",
        "5",
    ]
    script = worker_argv("/py", "", "job.py", ["a"])
    assert refill_argv(script, 19, ["torch", "numpy"])[3:] == [
        "--nice",
        "19",
        "--preimport",
        "torch,numpy",
        "--",
        "job.py",
        "a",
    ]
    assert refill_argv(argv, 0, ["torch"]) == argv
    assert refill_argv(argv, 19, []) == argv


def test_the_preimport_runs_niced_in_its_own_thread_and_the_main_thread_keeps_its_niceness(tmp_path, monkeypatch):
    (tmp_path / "fr_probe_mod.py").write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = own_nice()
    import_niced(["fr_probe_mod", "fr_no_such_module"], 19)  # a missing one is left to the worker
    probe = sys.modules.pop("fr_probe_mod")
    assert probe.thread_at_import == "standby-preimport"
    assert probe.nice_at_import == 19
    assert own_nice() == before


# A module whose import gives the importing thread a C thread-exit destructor that takes 0.3 s,
# as MKL's does (briefly) for the slot the torch import takes: libc's usleep is the destructor,
# the thread's value its argument. No GIL is involved, so it runs after Thread.join() returned.
SLOW_EXIT = """
import ctypes, threading
importer = threading.get_native_id()
libc = ctypes.CDLL(None)
key = ctypes.c_uint()
assert libc.pthread_key_create(ctypes.byref(key), ctypes.cast(libc.usleep, ctypes.c_void_p)) == 0
assert libc.pthread_setspecific(key, ctypes.c_void_p(300_000)) == 0
"""


def test_the_preimport_returns_only_once_its_thread_has_left_the_process(tmp_path, monkeypatch):
    """The zygote forks right after import_niced returns: a thread still running its exit
    destructors then (MKL's holds a spin lock) hands the child a lock nobody will release."""
    (tmp_path / "fr_slow_exit_mod.py").write_text(SLOW_EXIT)
    monkeypatch.syspath_prepend(str(tmp_path))
    returned = import_niced(["fr_slow_exit_mod"], 0)
    tid = sys.modules.pop("fr_slow_exit_mod").importer
    assert not os.path.exists(f"/proc/self/task/{tid}"), "returned while the importing thread still ran"
    assert returned == tid != threading.get_native_id()


def test_a_script_runs_as_python_would_run_it(tmp_path, monkeypatch):
    out = tmp_path / "seen.txt"
    script = tmp_path / "job" / "train.py"
    script.parent.mkdir()
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            open({str(out)!r}, "w").write(repr((__name__, sys.argv, sys.path[0])))
            """
        )
    )
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    run_command([str(script), "--steps", "3"])
    assert eval(out.read_text()) == ("__main__", [str(script), "--steps", "3"], str(script.parent))


def test_the_entry_runs_a_module_with_its_arguments_in_a_real_interpreter(tmp_path):
    (tmp_path / "fr_probe_mod.py").write_text(PROBE)
    (tmp_path / "fr_job_mod.py").write_text(
        textwrap.dedent(
            """
            import os, sys, threading
            import fr_probe_mod
            main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            print(__name__, sys.argv[1:], fr_probe_mod.nice_at_import, main_nice)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    argv = refill_argv(worker_argv(sys.executable, "fr_job_mod", "", ["--x", "1"]), 19, ["fr_probe_mod"])
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["__main__", "['--x',", "'1']", "19", str(own_nice())]


def test_a_bad_command_line_is_a_clear_error(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", WARM_START_MODULE, "--nice", "19", "-m", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "usage" in done.stderr
    with pytest.raises(SystemExit, match="nothing to run"):
        run_command(["-m"])
