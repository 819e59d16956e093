"""The detector's decisions: pure functions of (state, event or clock, config). No I/O, no wall
clock: `now` is the detector's receive clock, passed in by the shell. Sender timestamps are never
compared with it; the sidecars measure `since_progress_s` on their own monotonic clocks.

observe(state, event, now, cfg) -> (state, decisions)   a heartbeat, worker exit or log line
observe_incident(state, incident, now, cfg)             a peer instance's incident: a known root
expect_nodes(state, job_id, nodes, now, cfg)            seed nodes handed over in a rebalance
tick(state, now, cfg) -> (state, decisions)             node lost, hang, expiry of held evidence

Root cause before symptoms: a crash, node loss, hang or hardware/OOM/software error is a root
cause and becomes an incident at once (one per node and generation; later evidence from that
node joins it). Communication errors are symptoms: they are held for the correlation window and
attributed to a root cause seen before or after them; only if none turns up does one incident of
class communication go out, with low confidence and action none. A "Traceback" line is held
until its exception line (or the exit, or a short settle time) says what it was, and an exit
that follows a communication error of the same rank is held like a symptom.

Several instances split the nodes between them; each also reads the incidents the others publish
(observe_incident), so a root cause seen by one explains the symptoms held by another.

This module is the public entry; the work is split by concern, each module pure:
  config      Config, Decision, incident_id
  admission   Topology, admit: what telemetry may claim, checked against the registry
  classify    observe: heartbeats, exits and log lines -> evidence
  correlate   root incidents, held symptoms and their attribution, generation changes
  timers      tick: lost nodes, hangs, Traceback settle, expiry of held symptoms
  peers       observe_incident, release_nodes, expect_nodes: several instances
"""

from __future__ import annotations

from .admission import Topology, admit
from .classify import observe
from .config import PRIOR_GENERATIONS, Config, Decision, incident_id
from .peers import expect_nodes, observe_incident, release_nodes
from .timers import tick

__all__ = [
    "PRIOR_GENERATIONS",
    "Config",
    "Decision",
    "Topology",
    "admit",
    "expect_nodes",
    "incident_id",
    "observe",
    "observe_incident",
    "release_nodes",
    "tick",
]
