"""The hostile record generator (flashrecovery/hostile.py) says truthfully what each record is:
what it expects of a consumer must match what the decoder, the detector's admission check and
the signing keyring make of it; otherwise the hostile run's accounting would be wrong."""

from __future__ import annotations

from collections import Counter

import pytest

from flashrecovery import hostile as H
from flashrecovery.detector import core as dcore
from flashrecovery.detector.admission import admit
from flashrecovery.shared import topics as T
from flashrecovery.shared.schemas import SchemaError, decode
from flashrecovery.shared.signing import Keyring

JOB = H.Job("job-h", ("node-0", "node-1", "node-2", "node-3"), world_size=8)
TOPO = dcore.Topology(job_id=JOB.job_id, generation=0, world_size=8, nodes=frozenset(JOB.nodes + ("spare-0",)))
RING = Keyring("k1", {"k1": bytes(range(32))})


def _decoded(raw: bytes):
    try:
        return decode(raw)
    except SchemaError:
        return None


def test_same_seed_same_records_and_every_topic_and_category() -> None:
    a = list(H.generate(1400, JOB, seed=3))
    assert [(h.topic, h.value, h.category) for h in a] == [
        (h.topic, h.value, h.category) for h in H.generate(1400, JOB, seed=3)
    ]
    assert {h.topic for h in a} == set(H.TARGETS)
    kinds = Counter(h.category.split(":")[0] for h in a)
    for want in ("random_bytes", "truncated", "not_an_object", "unknown_kind", "unknown_version", "oversized"):
        assert kinds[want] > 0, want
    assert kinds["absurd"] > 0 and kinds["duplicate"] > 0 and kinds["other_job"] > 0
    assert sum(1 for h in a if len(h.value) > 1 << 20) == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_record_is_what_it_claims(seed: int) -> None:
    for h in H.generate(1400, JOB, seed=seed):
        event = _decoded(h.value)
        if h.expect == H.MALFORMED:
            assert event is None, h.category
            continue
        if h.topic is T.RECOVERY:
            continue
        assert event is not None, (h.category, h.value[:200])
        if h.expect == H.UNTRUSTED:  # telemetry: the detector's admission refuses every one
            assert admit(event, TOPO) is not None, (h.category, h.value[:300])
        elif h.expect == H.OTHER_JOB:
            assert event.job_id != JOB.job_id
        else:
            assert h.expect == H.REFUSED and event.job_id == JOB.job_id
            # no well-formed plausible record for the real job: each carries a refusable value
            assert h.category.startswith(("absurd", "duplicate:absurd")), h.category


def test_signing_forgeries_are_refused_and_the_rest_carry_a_good_tag() -> None:
    records = list(H.generate(1400, JOB, seed=5, keyring=RING))
    forged = [h for h in records if h.expect == H.UNAUTHENTICATED]
    assert {h.category for h in forged} == {f"forged:{k}" for k in H.FORGERIES}
    for h in records:
        why = RING.refusal(h.topic.name, h.value, h.headers)
        assert (why is not None) == (h.expect == H.UNAUTHENTICATED), (h.category, why)
    # forgeries are well-formed events: only the tag tells them apart
    assert all(_decoded(h.value) is not None for h in forged)
