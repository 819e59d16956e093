"""Operator commands on the registry: `flashrecovery job register`, `node add-spare`,
`node quarantine`, `node release`. Each reads the registry, applies a pure change
(shared/topology.py) and writes it by compare-and-set. Exit codes: 0 done, 1 refused (the reason
is printed), 2 bad configuration or input."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from .shared.logging import configure, get_logger
from .shared.registry import Registry
from .shared.settings import ConfigError, Settings, load_settings
from .shared.topology import JobSnapshot, as_quarantined, as_released, as_spare, grid_topology, spec_topology


def _settings() -> Settings:
    """Only Redis is needed: FLASHRECOVERY_REDIS_URL, else the job a local `up`/`run` left."""
    settings = load_settings()
    if settings.redis_url:
        return settings
    from .tools import _locate  # the local-job lookup `status` uses

    return _locate(settings)


# ---------------------------------------------------------------- job register
def add_job_parser(sub: Any) -> None:
    p = sub.add_parser("job", help="register a job's topology in the registry")
    jsub = p.add_subparsers(dest="job_cmd", required=True)
    r = jsub.add_parser(
        "register",
        help="write the topology once (generation 0); an existing job is kept",
        description="Either a grid (--nodes, --ranks-per-node; node-<i> and spare-<i>) or "
        '--file with an explicit placement: {"tp": 2, "pp": 1, "nodes": '
        '{"n0": [0, 1], "n1": [2, 3]}, "spares": {"s0": 2}, '
        '"labels": {"n0": {"rack": "a"}}}',
    )
    r.add_argument("--job", help="job id (default FLASHRECOVERY_JOB_ID)")
    r.add_argument("--file", type=Path, help="JSON placement (instead of the grid flags)")
    r.add_argument("--nodes", type=int, help="active nodes of a grid")
    r.add_argument("--ranks-per-node", type=int, help="ranks on each active node of a grid")
    r.add_argument("--tp", type=int, default=1, help="tensor-parallel size (a tp group sits in a node)")
    r.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    r.add_argument("--spares", type=int, default=0, help="spare nodes of a grid (spare-0 ...)")
    r.add_argument("--spare-capacity", type=int, help="standby slots per spare (default --ranks-per-node)")
    r.set_defaults(func=job_register)


def topology_from_args(args: argparse.Namespace, job_id: str) -> JobSnapshot:
    """The requested topology, or ConfigError (exit 2) naming the bad flag or field."""
    try:
        if args.file is not None:
            if args.nodes is not None or args.ranks_per_node is not None:
                raise ValueError("give either --file or --nodes/--ranks-per-node, not both")
            spec = json.loads(args.file.read_text())
            if not isinstance(spec, dict) or not isinstance(spec.get("nodes"), dict):
                raise ValueError('the file must be a JSON object with "nodes": {node id: [ranks]}')
            unknown = set(spec) - {"job_id", "tp", "pp", "nodes", "spares", "labels"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}")
            if spec.get("job_id", job_id) != job_id:
                raise ValueError(f"the file is for job {spec['job_id']!r}, not {job_id!r}")
            return spec_topology(
                job_id,
                {str(k): [int(r) for r in v] for k, v in spec["nodes"].items()},
                tp=int(spec.get("tp", 1)),
                pp=int(spec.get("pp", 1)),
                spares={str(k): int(v) for k, v in spec.get("spares", {}).items()},
                labels=spec.get("labels") or {},
            )
        if args.nodes is None or args.ranks_per_node is None:
            raise ValueError("give --nodes and --ranks-per-node (a grid) or --file (a placement)")
        if args.nodes < 1 or args.ranks_per_node < 1 or args.spares < 0:
            raise ValueError("--nodes and --ranks-per-node must be >= 1, --spares >= 0")
        return grid_topology(
            job_id,
            args.nodes,
            args.ranks_per_node,
            args.tp,
            args.pp,
            spares=args.spares,
            standby_slots=args.spare_capacity,
        )
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"job register: {exc}") from None


def _shape(s: JobSnapshot) -> tuple[Any, ...]:
    return (s.world_size, s.tp, s.pp, sorted((r.rank, r.node_id) for r in s.ranks))


def job_register(args: argparse.Namespace) -> int:
    settings = _settings()
    job_id = args.job or settings.job_id
    snap = topology_from_args(args, job_id)
    configure(settings.log_format)
    log = get_logger("admin", job_id=job_id)

    async def go() -> tuple[bool, JobSnapshot]:
        reg = Registry.from_url(settings.redis_url, job_id)
        try:
            created = await reg.init_job(snap)
            return created, await reg.snapshot()
        finally:
            await reg.close()

    created, stored = asyncio.run(go())
    if created:
        log.info(
            "job_registered",
            world_size=snap.world_size,
            tp=snap.tp,
            pp=snap.pp,
            nodes=len([n for n in snap.nodes if n.ranks]),
            spares=len([n for n in snap.nodes if not n.ranks]),
        )
        print(
            f"job {job_id} registered: world {snap.world_size} (dp={snap.dp} tp={snap.tp} pp={snap.pp}), "
            f"{len(snap.nodes)} nodes"
        )
        return 0
    if stored.generation == 0 and _shape(stored) == _shape(snap):
        print(f"job {job_id} was already registered with this topology: nothing written")
        return 0
    print(
        f"job {job_id} is already registered (generation {stored.generation}, world {stored.world_size}): "
        "nothing written; a registered job's topology changes only through recoveries and `node` commands",
        file=sys.stderr,
    )
    return 1


# ---------------------------------------------------------------- node add-spare / quarantine / release
def add_node_parser(sub: Any) -> None:
    p = sub.add_parser("node", help="add a spare node, quarantine a node, release a quarantined node")
    nsub = p.add_subparsers(dest="node_cmd", required=True)
    a = nsub.add_parser("add-spare", help="a node joins the standby pool (start its sidecar with ROLE=spare)")
    a.add_argument("node")
    a.add_argument("--capacity", type=int, default=2, help="standby slots: ranks it can host (default 2)")
    a.add_argument(
        "--label", action="append", default=None, metavar="KEY=VALUE", help="locality label (rack, switch), repeatable"
    )
    q = nsub.add_parser("quarantine", help="take a node without ranks out of the standby pool")
    q.add_argument("node")
    q.add_argument("--reason", required=True, help="why (kept in the registry, shown by `status --json`)")
    r = nsub.add_parser("release", help="a repaired quarantined node becomes a spare again")
    r.add_argument("node")
    r.add_argument("--capacity", type=int, help="standby slots (needed when the record has none)")
    for x in (a, q, r):
        x.add_argument("--job", help="job id (default FLASHRECOVERY_JOB_ID)")
    p.set_defaults(func=node)


def _labels(items: list[str] | None) -> dict[str, str] | None:
    if items is None:
        return None
    bad = [i for i in items if "=" not in i or not i.split("=", 1)[0]]
    if bad:
        raise ConfigError(f"node add-spare: --label wants KEY=VALUE, got {bad}")
    return dict(i.split("=", 1) for i in items)


def node(args: argparse.Namespace) -> int:
    settings = _settings()
    job_id = args.job or settings.job_id
    configure(settings.log_format)
    log = get_logger("admin", job_id=job_id)
    kw: dict[str, Any] = {}
    if args.node_cmd == "add-spare":
        labels = _labels(args.label)
        change = lambda cur: as_spare(cur, args.node, args.capacity, labels)  # noqa: E731
    elif args.node_cmd == "quarantine":
        change = lambda cur: as_quarantined(cur, args.node)  # noqa: E731
        kw["note"] = json.dumps({"reason": args.reason, "at": time.time()})
    else:
        change = lambda cur: as_released(cur, args.node, args.capacity)  # noqa: E731
        kw.update(drop_note=True, clear_faults=True)  # repaired: earlier faults no longer count

    async def go() -> Any:
        reg = Registry.from_url(settings.redis_url, job_id)
        try:
            return await reg.change_node(args.node, change, **kw)
        finally:
            await reg.close()

    try:
        rec = asyncio.run(go())
    except (ValueError, LookupError) as exc:
        print(f"node {args.node_cmd} {args.node}: refused: {exc}", file=sys.stderr)
        return 1
    log.info(
        f"node_{args.node_cmd.replace('-', '_')}",
        node=rec.node_id,
        role=rec.role.value,
        standby_slots=rec.standby_slots,
        reason=getattr(args, "reason", None),
    )
    print(f"{rec.node_id}: {rec.role.value}, standby slots {rec.standby_slots}")
    return 0
