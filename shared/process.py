"""Process plumbing shared by everything that starts children (the embedded stack, `up`'s
supervisor, the sidecar's workers)."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Child-side, before exec: the kernel sends `sig` to this process when the thread that
    started it dies (even by SIGKILL), so nothing outlives a crashed parent. Linux only;
    elsewhere a no-op."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except OSError:
        pass
