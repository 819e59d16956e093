import orjson
import pytest
from pydantic import ValidationError

from flashrecovery.shared import schemas as S
from flashrecovery.shared import topics as T
from flashrecovery.shared.keys import JobKeys
from flashrecovery.shared.settings import ConfigError, load_settings


def test_every_kind_has_a_topic_and_key():
    for kind in S.EVENT_KINDS:
        assert kind in T.TOPIC_OF_KIND


def test_events_are_frozen():
    ev = S.WorkerExit(job_id="j", generation=0, producer="p", node_id="n", rank=1, pid=2, exit_code=-9)
    with pytest.raises(ValidationError, match="frozen"):
        ev.rank = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"", "not JSON"),
        (b"[]", "JSON object"),
        (orjson.dumps({"schema_version": 2, "kind": "worker_exit"}), "schema_version 2"),
        (orjson.dumps({"schema_version": 1, "kind": "nope"}), "unknown kind"),
        (orjson.dumps({"schema_version": 1, "kind": "worker_exit", "job_id": "j"}), "invalid worker_exit"),
        (None, "tombstone"),
    ],
)
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


def _statuses():
    return (
        S.RankStatus(
            rank=8,
            local_rank=0,
            pid=10,
            state="running",
            step=7,
            step_time_s=0.25,
            since_progress_s=0.1,
            proc_state="S",
        ),
        S.RankStatus(
            rank=9,
            local_rank=1,
            pid=11,
            state="running",
            step=7,
            long_phase="eval",
            long_phase_expected_s=30.0,
            since_progress_s=4.5,
            proc_state="T",
        ),
        S.RankStatus(rank=None, local_rank=2, pid=12, state="standby"),
    )


def _beat(**form):
    return S.NodeHeartbeat(job_id="j", generation=1, producer="p", node_id="node-1", seq=3, **form)


def test_rank_columns_carry_exactly_what_rank_objects_carry():
    rows = _beat(ranks=_statuses())
    cols = _beat(rank_columns=S.RankColumns.of(_statuses()))
    back = S.decode(S.encode(cols))
    assert back.rank_statuses() == rows.rank_statuses() == _statuses()
    assert list(back.rank_rows()) == list(rows.rank_rows())
    assert len(S.encode(cols)) < len(S.encode(rows))


def test_columns_that_are_all_none_are_left_out_and_read_back_as_none():
    plain = tuple(S.RankStatus(rank=r, local_rank=r, pid=r, state="running") for r in range(3))
    cols = S.RankColumns.of(plain)
    assert cols.proc_state is None and cols.step_time_s is None and cols.long_phase is None
    assert _beat(rank_columns=cols).rank_statuses() == plain


@pytest.mark.parametrize(
    "columns, why",
    [
        (
            {
                "rank": [1, 2],
                "local_rank": [0],
                "pid": [1, 2],
                "state": ["running"] * 2,
                "step": [1, 1],
                "generation": [0, 0],
                "since_progress_s": [0, 0],
            },
            "one entry per rank",
        ),
        (
            {
                "rank": [1],
                "local_rank": [0],
                "pid": [1],
                "state": ["sleepy"],
                "step": [1],
                "generation": [0],
                "since_progress_s": [0],
            },
            "rank_columns.state",
        ),
    ],
)
def test_bad_rank_columns_are_rejected_with_a_reason(columns, why):
    raw = orjson.dumps({**orjson.loads(S.encode(_beat())), "rank_columns": columns})
    with pytest.raises(S.SchemaError, match=why):
        S.decode(raw)


def test_a_heartbeat_sends_one_form_of_its_ranks():
    both = {
        **orjson.loads(S.encode(_beat(ranks=_statuses()))),
        "rank_columns": orjson.loads(S.encode(S.RankColumns.of(_statuses()))),
    }
    with pytest.raises(S.SchemaError, match="exclusive"):
        S.decode(orjson.dumps(both))


def _ack(**form):
    return S.CommandAck(
        job_id="j",
        generation=2,
        producer="s",
        command_id="p:pause:0",
        plan_id="p",
        incident_id="i",
        action=S.CommandAction.PAUSE,
        node_id="node-1",
        **form,
    )


def test_report_columns_carry_exactly_what_rank_reports_carry():
    reports = (
        S.RankReport(rank=4, pid=40, applied_step=6, grads_step=7, vote_step=6),
        S.RankReport(rank=5, pid=41, applied_step=6, vote_step=7),
        S.RankReport(rank=6, phase="restored", seconds=0.5, bytes=1024, digest_ok=True),
    )
    objects, columns = _ack(ranks=reports), _ack(report_columns=S.ReportColumns.of(reports))
    back = S.decode(S.encode(columns))
    assert back.report_rows() == objects.report_rows()
    assert [(r.rank, r.applied_step, r.grads_step, r.vote_step) for r in back.report_rows()] == [
        (4, 6, 7, 6),
        (5, 6, None, 7),
        (6, -1, None, -1),
    ]
    assert back.report_rows()[2].bytes == 1024 and back.report_rows()[2].digest_ok is True
    plain = S.ReportColumns.of((S.RankReport(rank=1, applied_step=3),))
    assert plain.pid is None and plain.phase is None and plain.applied_step == (3,)


def test_bad_report_columns_are_rejected_with_a_reason():
    raw = {**orjson.loads(S.encode(_ack())), "report_columns": {"rank": [1, 2], "vote_step": [3]}}
    with pytest.raises(S.SchemaError, match="one entry per rank"):
        S.decode(orjson.dumps(raw))
    both = {**orjson.loads(S.encode(_ack(ranks=(S.RankReport(rank=1),)))), "report_columns": {"rank": [1]}}
    with pytest.raises(S.SchemaError, match="exclusive"):
        S.decode(orjson.dumps(both))


def test_vote_rows_are_the_same_in_both_forms():
    reports = (S.RankReport(rank=4, applied_step=6, grads_step=7, vote_step=6), S.RankReport(rank=5))
    objects, columns = _ack(ranks=reports), _ack(report_columns=S.ReportColumns.of(reports))
    assert list(objects.vote_rows()) == list(columns.vote_rows()) == [(4, 6, 7, 6), (5, -1, None, -1)]
