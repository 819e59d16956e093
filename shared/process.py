"""Process plumbing shared by everything that starts children (the embedded stack, `up`'s
supervisor, the sidecar's workers)."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc Linux: die_with_parent is a no-op there
        return None


# Loaded here, in the parent, never in a child between fork and exec. The parents are threaded
# (asyncio runs name resolution, which loads NSS libraries, on executor threads), and in a child
# of a threaded process only what needs no lock another thread could have held at the fork is
# safe (Python's subprocess docs warn that preexec_fn may deadlock; the zygote's MKL hang was
# one such lock): a dlopen takes the dynamic loader's lock. Not seen to hang here; removed
# because it could, and it was a library load per spawned process.
_LIBC = _load_libc()


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Child-side, before exec: the kernel sends `sig` to this process when the thread that
    started it dies (even by SIGKILL), so nothing outlives a crashed parent. Linux only;
    elsewhere a no-op. Loads no library (see _LIBC)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, sig)
