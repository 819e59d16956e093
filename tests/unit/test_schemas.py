import orjson
import pytest

from flashrecovery.shared import schemas as S
from flashrecovery.shared import topics as T
from flashrecovery.shared.keys import JobKeys
from flashrecovery.shared.settings import ConfigError, load_settings


def test_every_kind_has_a_topic_and_key():
    for kind in S.EVENT_KINDS:
        assert kind in T.TOPIC_OF_KIND


def test_events_are_frozen():
    ev = S.WorkerExit(job_id="j", generation=0, producer="p", node_id="n", rank=1, pid=2, exit_code=-9)
    with pytest.raises(Exception):
        ev.rank = 3  # type: ignore[misc]


@pytest.mark.parametrize("raw, why", [
    (b"", "not JSON"),
    (b"[]", "JSON object"),
    (orjson.dumps({"schema_version": 2, "kind": "worker_exit"}), "schema_version 2"),
    (orjson.dumps({"schema_version": 1, "kind": "nope"}), "unknown kind"),
    (orjson.dumps({"schema_version": 1, "kind": "worker_exit", "job_id": "j"}), "invalid worker_exit"),
    (None, "tombstone"),
])
def test_decode_rejects_with_a_reason(raw, why):
    with pytest.raises(S.SchemaError, match=why):
        S.decode(raw)


def test_node_messages_share_a_partition_key():
    hb = S.NodeHeartbeat(job_id="j", generation=0, producer="p", node_id="node-7", seq=0)
    ex = S.WorkerExit(job_id="j", generation=0, producer="p", node_id="node-7", rank=1, pid=2)
    assert T.key_for(hb) == T.key_for(ex) == b"node-7"


def test_keys_share_one_cluster_slot():
    k = JobKeys("job1")
    for key in (k.meta, k.ranks, k.nodes, k.incident("x"), k.plan("p"), k.lease("executor")):
        assert "{job1}" in key
    with pytest.raises(ValueError):
        JobKeys("bad{id}")


def test_bad_config_names_the_field(monkeypatch):
    monkeypatch.setenv("FLASHRECOVERY_DETECTOR__HEARTBEAT_MISSES", "0")
    with pytest.raises(ConfigError, match="DETECTOR__HEARTBEAT_MISSES"):
        load_settings()


def test_unknown_fields_are_ignored():
    ev = S.NodeHeartbeat(job_id="j", generation=3, producer="p", node_id="n", seq=9)
    raw = orjson.dumps({**ev.model_dump(mode="json"), "added_in_a_later_minor": 1})
    assert S.decode(raw) == ev
