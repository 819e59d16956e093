"""The rendezvous store for communication-group rebuilds: one TCPStore master.

Each generation uses its own key prefix, so a rebuild never reads a previous generation's
addresses (see docs/commit-protocol.md and the field notes on gloo)."""

from __future__ import annotations

import argparse
import signal
import threading


def main() -> None:
    ap = argparse.ArgumentParser(prog="flashrecovery rdzv")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    from datetime import timedelta

    # torch.distributed builds its namespace at import time: the stubs do not list TCPStore.
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    store = TCPStore(
        args.host, args.port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=300), use_libuv=True
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    del store


if __name__ == "__main__":
    main()
