"""Detector service: classifies faults from heartbeats, exits and log lines into incidents.

Public API: core.observe / core.observe_incident / core.tick / core.release_nodes /
core.expect_nodes / core.Config / core.Decision / core.incident_id (pure), state.DetectorState,
signatures.load_catalog, app.DetectorService and app.main (the shell).
"""
