"""Detection latency per fault class through the real broker: one DetectorService, simulated
sidecars (bench/detector_rig.py: 4 nodes x 2 ranks, 1 Hz heartbeats, 0.1 s steps) publishing on
tansu, the incident read back from the incidents topic. n runs per class, each on a fresh job.

    python -m flashrecovery.bench.detector_latency --runs 5 [--out bench/results/detector_latency.json]

Latency is measured on this process's monotonic clock from the fault to the incident's arrival
back here (so it includes both Kafka hops): crash = WorkerExit published; node lost = the node's
last heartbeat (budget: 3 x 1 s + 1 s); hang = the frozen rank's last step (budget: threshold
max(10 x p99 step, 5 s) + 1 s); log classes = the first line published (communication errors
with no root cause are held for the correlation window by design, then reported without action);
straggler = the first slow step's start (a Degradation after M consecutive slow steps)."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from flashrecovery.bench.detector_rig import FakeJob, running_detector
from flashrecovery.shared import bus as busmod
from flashrecovery.shared.settings import BusSettings, Settings
from flashrecovery.shared.stack import start_stack

XID = "NVRM: Xid (PCI:0000:3b:00): 79, pid=10002, GPU has fallen off the bus."
OOM = [
    "Traceback (most recent call last):",
    '  File "train.py", line 88, in step',
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB",
]
SOFTWARE = [
    "Traceback (most recent call last):",
    '  File "train.py", line 12, in load',
    "RuntimeError: corrupt batch header",
]
COMM = "NCCL WARN NET/IB : Got completion with error 12, opcode 0, timeout"


async def _lines(job: FakeJob, rank: int, lines: list[str]) -> float:
    first = None
    for line in lines:
        t = await job.log(rank, line)
        first = first or t
    return first


async def fault_crash(job: FakeJob) -> float:
    return await job.crash(3)


async def fault_node_lost(job: FakeJob) -> float:
    job.silent.add("node-2")
    await asyncio.sleep(0)
    return job.last_beat["node-2"]


async def fault_hang(job: FakeJob) -> float:
    job.ranks[5].frozen = True
    return job.ranks[5].last_advance


async def fault_hardware(job: FakeJob) -> float:
    return await _lines(job, 2, [XID])


async def fault_oom(job: FakeJob) -> float:
    return await _lines(job, 2, OOM)


async def fault_software(job: FakeJob) -> float:
    return await _lines(job, 2, SOFTWARE)


async def fault_communication(job: FakeJob) -> float:
    return await _lines(job, 2, [COMM])


async def fault_straggler(job: FakeJob) -> float:
    r = job.ranks[6]
    r.dt = 0.5
    return r.next_due  # the first step run at the slow pace starts when the current one ends


CLASSES: dict[str, tuple[Callable[[FakeJob], Awaitable[float]], str]] = {
    "process_crash": (fault_crash, "incident"),
    "node_lost": (fault_node_lost, "incident"),
    "hang": (fault_hang, "incident"),
    "hardware": (fault_hardware, "incident"),
    "out_of_memory": (fault_oom, "incident"),
    "software": (fault_software, "incident"),
    "communication": (fault_communication, "incident"),
    "straggler": (fault_straggler, "degradation"),
}


async def one_run(kafka: str, redis: str, cls: str, warmup_s: float, timeout_s: float) -> dict[str, Any]:
    ns = f"lat{uuid.uuid4().hex[:8]}"
    settings = Settings(
        job_id=f"job-{ns}",
        kafka_bootstrap=kafka,
        redis_url=redis,
        bus=BusSettings(topic_namespace=ns, telemetry_partitions=4, control_partitions=1, linger_ms=0),
    )
    await busmod.ensure_topics(kafka, settings.bus)
    producer = busmod.Producer(kafka, settings.bus)
    await producer.start()
    try:
        async with running_detector(settings, producer, "latency") as (_, watcher, job):
            job.start()
            await asyncio.sleep(warmup_s)
            inject, kind = CLASSES[cls]
            t_fault = await inject(job)
            got = watcher.incidents if kind == "incident" else watcher.degradations
            await watcher.wait(lambda: got, timeout_s, f"the {cls} {kind}")
            at, ev = got[0]
            wrong = (str(getattr(ev, "fault_class", "")) != cls) if kind == "incident" else False
            return {
                "class": cls,
                "latency_s": round(at - t_fault, 4),
                "event": kind,
                "fault_class": str(getattr(ev, "fault_class", None)),
                "wrong_class": wrong,
                "incidents": len(watcher.incidents),
            }
    except Exception as exc:  # noqa: BLE001 - a failed run is a result, recorded as such
        return {"class": cls, "error": repr(exc)}
    finally:
        await producer.stop()


async def run(
    runs: int, classes: list[str], run_dir: Path, warmup_s: float = 3.0, timeout_s: float = 20.0, log=print
) -> dict[str, Any]:
    stack = start_stack(run_dir)
    out: dict[str, Any] = {"runs": runs, "classes": {}}
    try:
        for cls in classes:
            rows = []
            for i in range(runs):
                log(f"detector latency: {cls} run {i + 1}/{runs}")
                rows.append(await one_run(stack.kafka_bootstrap, stack.redis_url, cls, warmup_s, timeout_s))
            lat = [r["latency_s"] for r in rows if "latency_s" in r]
            out["classes"][cls] = {
                "runs": rows,
                "ok": len(lat),
                "median_s": round(statistics.median(lat), 4) if lat else None,
                "max_s": round(max(lat), 4) if lat else None,
                "wrong_class": sum(1 for r in rows if r.get("wrong_class")),
            }
    finally:
        stack.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--classes", default=",".join(CLASSES))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "detector_latency.json")
    ap.add_argument("--run-dir", type=Path, default=Path(".runtime/bench/detector_latency"))
    args = ap.parse_args(argv)
    from flashrecovery.shared.logging import configure

    configure("json", level="WARNING")
    classes = [c for c in args.classes.split(",") if c]
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        ap.error(f"unknown classes {unknown}; choose from {','.join(CLASSES)}")
    args.run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = asyncio.run(run(args.runs, classes, args.run_dir))
    res["wall_s"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print("| class | runs ok | median s | max s | wrong class |")
    print("|---|---|---|---|---|")
    for cls, r in res["classes"].items():
        print(f"| {cls} | {r['ok']}/{args.runs} | {r['median_s']} | {r['max_s']} | {r['wrong_class']} |")
    return 0 if all(r["ok"] == args.runs for r in res["classes"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
