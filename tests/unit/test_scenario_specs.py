"""`flashrecovery demo --then/--service-fault` specs: parsed, or refused with a reason."""

from __future__ import annotations

import pytest

from flashrecovery.scenario import SCENARIOS, FollowUp, ServiceFault


@pytest.mark.parametrize(
    "spec, want",
    [
        ("process-crash:5:0.1", FollowUp("process-crash", 5, 0.1)),
        ("hang:0:1", FollowUp("hang", 0, 1.0)),
        ("node-crash:7:0", FollowUp("node-crash", 7, 0.0)),
    ],
)
def test_follow_up_parses(spec: str, want: FollowUp) -> None:
    assert FollowUp.parse(spec) == want


@pytest.mark.parametrize(
    "spec, why",
    [
        ("process-crash:5", "KIND:RANK:DELAY_S"),
        ("melt:5:0", "kind must be one of"),
        ("hang:x:0", "not a rank number"),
        ("hang:1:soon", "not a number of seconds"),
        ("hang:1:-1", "within 0..600"),
    ],
)
def test_follow_up_refused_with_reason(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        FollowUp.parse(spec)


def test_service_fault_parses_and_refuses_unknown_names() -> None:
    assert ServiceFault.parse("executor-leader:0.1") == ServiceFault("executor-leader", 0.1)
    assert ServiceFault.parse("planner:0") == ServiceFault("planner", 0.0)
    assert ServiceFault.parse("redis:3") == ServiceFault("redis", 3.0)
    assert ServiceFault.parse("redis-restart:0.1") == ServiceFault("redis-restart", 0.1)
    assert ServiceFault.parse("broker:1") == ServiceFault("broker", 1.0)
    # a broker restart must end exact, on a broker the run owns (the fault restarts it)
    broker = [sc for sc in SCENARIOS.values() if any(f.startswith("broker") for f in sc.service_faults)]
    assert broker and all(sc.expect == "exact" and sc.own_broker for sc in broker)
    with pytest.raises(ValueError, match="NAME must be one of"):
        ServiceFault.parse("kafka:1")
    with pytest.raises(ValueError, match="NAME:DELAY_S"):
        ServiceFault.parse("detector")
