"""The node's zygote (services/sidecar/zygote.py, forked.py): standbys forked from one process
that imported torch once. Here with a small module in torch's place."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
from pathlib import Path

import pytest
import structlog

from flashrecovery.sidecar.forked import Zygote

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

PROBE = "import os\nimported_by = os.getpid()\n"
JOB = textwrap.dedent(
    """
    import os, sys, fr_zy_probe
    print("job", sys.argv[1:], os.environ.get("FR_ZY"), fr_zy_probe.imported_by != os.getpid(),
          os.getpriority(os.PRIO_PROCESS, 0), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    code = int(os.environ.get("FR_ZY_EXIT", "0"))
    if code < 0:
        import time
        time.sleep(60)
    sys.exit(code)
    """
)


async def _zygote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Zygote:
    (tmp_path / "fr_zy_probe.py").write_text(PROBE)
    (tmp_path / "fr_zy_job.py").write_text(JOB)
    # the zygote imports the probe: it must find it
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    z = Zygote(["fr_zy_probe"], 0, structlog.get_logger())
    await z.start(lambda: None)
    await asyncio.wait_for(z.ready.wait(), 30)
    return z


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path), "FR_ZY": "here", **extra}


def test_a_forked_worker_runs_its_command_with_its_env_stdio_and_niceness(tmp_path: Path, monkeypatch) -> None:
    async def go() -> None:
        z = await _zygote(tmp_path, monkeypatch)
        try:
            base = os.getpriority(os.PRIO_PROCESS, 0)
            p = await z.spawn(["-m", "fr_zy_job", "--x", "1"], _env(tmp_path, FR_ZY_EXIT="3"), base + 2)
            out = (await asyncio.wait_for(p.stdout.readline(), 30)).decode().split()
            err = (await asyncio.wait_for(p.stderr.readline(), 30)).decode()
            assert await asyncio.wait_for(p.wait(), 30) == 3 and p.returncode == 3
            # its argv and env are its own; the module came imported from the zygote
            assert out == ["job", "['--x',", "'1']", "here", "True", str(base + 2)]
            assert err == "to stderr\n"
            assert p.pid != z.proc.pid
        finally:
            await z.close()

    asyncio.run(go())


def test_a_killed_worker_ends_with_its_signal_and_the_zygotes_end_ends_its_workers(tmp_path, monkeypatch) -> None:
    async def go() -> None:
        z = await _zygote(tmp_path, monkeypatch)
        a = await z.spawn(["-m", "fr_zy_job"], _env(tmp_path, FR_ZY_EXIT="-1"), 0)
        b = await z.spawn(["-m", "fr_zy_job"], _env(tmp_path, FR_ZY_EXIT="-1"), 0)
        await asyncio.wait_for(a.stdout.readline(), 30)
        await asyncio.wait_for(b.stdout.readline(), 30)
        a.kill()
        assert await asyncio.wait_for(a.wait(), 30) == -signal.SIGKILL
        z.proc.kill()  # the zygote dies: its worker dies with it, and is reported ended
        assert await asyncio.wait_for(b.wait(), 30) == -signal.SIGKILL
        for _ in range(100):
            try:
                os.kill(b.pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"worker {b.pid} outlived its zygote")
        with pytest.raises(RuntimeError, match="not running"):
            await z.spawn(["-m", "fr_zy_job"], _env(tmp_path), 0)
        await z.close()

    asyncio.run(go())


def test_the_zygote_answers_a_malformed_request_and_keeps_serving(tmp_path, monkeypatch) -> None:
    async def go() -> None:
        z = await _zygote(tmp_path, monkeypatch)
        try:
            z.sock.send(b"{not json")  # no file descriptors either
            p = await z.spawn(["-m", "fr_zy_job"], _env(tmp_path), 0)
            assert await asyncio.wait_for(p.wait(), 30) == 0
            assert z.alive
        finally:
            await z.close()

    asyncio.run(go())
