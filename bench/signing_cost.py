"""What an authentication tag costs per message (shared/signing.py), beside what decoding the
same message costs every consumer anyway. Same process, interleaved, medians.

    python -m flashrecovery.bench.signing_cost [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

from flashrecovery.shared.schemas import (
    Assignment,
    ExecutorCommand,
    NodeHeartbeat,
    RankState,
    RankStatus,
    Transfer,
    decode,
    encode,
)
from flashrecovery.shared.signing import Keyring

TOPIC = "flashrecovery.commands.v1"


def _messages() -> dict[str, bytes]:
    cmd = ExecutorCommand(
        job_id="job",
        generation=3,
        producer="executor-0",
        command_id="c" * 32,
        plan_id="p" * 32,
        incident_id="i" * 32,
        action="recover",
        world_size=8,
        commit_step=None,
        resume_step=12,
        assignments=(Assignment(rank=2, local_rank=0, node_id="spare-0"),),
        transfers=(Transfer(src=0, dst=2),),
        fence_token=4,
    )
    beat8 = NodeHeartbeat(
        job_id="job",
        generation=3,
        producer="sidecar",
        node_id="node-1",
        seq=7,
        ranks=tuple(
            RankStatus(rank=r, local_rank=r % 8, pid=1000 + r, state=RankState.RUNNING, step=12, step_time_s=0.1)
            for r in range(8)
        ),
    )
    return {"command (recover)": encode(cmd), "heartbeat (8 ranks)": encode(beat8)}


def _per_op_us(fn: Callable[[], object], n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def measure(rounds: int = 15, n: int = 2000) -> list[dict[str, object]]:
    ring = Keyring("k1", {"k1": bytes(range(32))})
    rows = []
    for name, value in _messages().items():
        headers = ring.headers(TOPIC, value)
        samples: dict[str, list[float]] = {"sign_us": [], "verify_us": [], "decode_us": []}
        for _ in range(rounds):  # interleaved: load changes hit all three alike
            samples["sign_us"].append(_per_op_us(lambda: ring.headers(TOPIC, value), n))
            samples["verify_us"].append(_per_op_us(lambda: ring.refusal(TOPIC, value, headers), n))
            samples["decode_us"].append(_per_op_us(lambda: decode(value), n))
        med = {k: statistics.median(v) for k, v in samples.items()}
        rows.append(
            {
                "message": name,
                "bytes": len(value),
                **{k: round(v, 2) for k, v in med.items()},
                "verify_over_decode": round(med["verify_us"] / med["decode_us"], 3),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = measure()
    for r in rows:
        print(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.machine(), "python": platform.python_version(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
