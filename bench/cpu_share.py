"""Where a run's CPU goes: cores used per process family (trainers, sidecars, broker, services,
torchrun) over a window, read from /proc for every descendant of one process (Linux only).

On this 2-core box the trainers are CPU-bound, so every core-second the control plane spends is
a core-second the trainers wait for: this is the per-component answer to "where does the
fault-free overhead go". A process that exits inside the window is not counted; one that starts
inside it is counted from zero."""

from __future__ import annotations

import os
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# (family, substrings of its command line); first match wins, in this order
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("trainers and standbys", ("agent.reference.train", "bench.agent_only", "bench.baseline_train")),
    ("sidecars", ("flashrecovery.sidecar",)),
    ("detector", ("flashrecovery.detector",)),
    ("planner", ("flashrecovery.planner",)),
    ("executor", ("flashrecovery.executor",)),
    ("broker", ("tansu",)),
    ("redis", ("redis-server",)),
    ("torchrun", ("torchrun", "torch.distributed.run")),
)


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (fields[1]: ppid, [11]/[12]: user/system ticks,
    [16]: niceness, [17]: threads), None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parens


def cpu_seconds(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / _TICK


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds user + system) of pid, None when it is gone."""
    fields = stat_fields(pid)
    return None if fields is None else (int(fields[1]), cpu_seconds(fields))


ZYGOTE = "flashrecovery.sidecar.zygote"


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def _family(pid: int) -> str:
    cmd = _cmdline(pid)
    if cmd is None:
        return "other"
    if ZYGOTE in cmd:
        # A worker forked by a node's zygote keeps the zygote's command line: its parent tells
        # (the zygote's parent is the sidecar).
        fields = stat_fields(pid)
        parent = _cmdline(int(fields[1])) if fields else None
        return "trainers and standbys" if parent is not None and ZYGOTE in parent else "zygotes"
    for name, keys in FAMILIES:
        if any(k in cmd for k in keys):
            return name
    return "other"


def _descendants(root: int) -> dict[int, float]:
    """CPU seconds of root and every process below it."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                stats[int(entry.name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[pid] = stats[pid][1]
        todo.extend(children.get(pid, []))
    return out


class CpuWindow:
    """Cores used per family by root's process tree between start() and end()."""

    def __init__(self, root: int | None = None, own_label: str = "benchmark driver") -> None:
        self.root = os.getpid() if root is None else root
        self.own_label = own_label
        self._t0 = 0.0
        self._cpu0: dict[int, float] = {}

    def start(self) -> None:
        self._t0, self._cpu0 = time.monotonic(), _descendants(self.root)

    def end(self) -> dict[str, float]:
        cpu1, dt = _descendants(self.root), time.monotonic() - self._t0
        cores: dict[str, float] = {}
        for pid, used in cpu1.items():
            name = self.own_label if pid == self.root else _family(pid)
            cores[name] = cores.get(name, 0.0) + (used - self._cpu0.get(pid, 0.0)) / dt
        return {k: round(v, 3) for k, v in sorted(cores.items(), key=lambda kv: -kv[1]) if v >= 0.0005}
