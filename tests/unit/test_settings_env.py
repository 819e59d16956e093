"""The settings models: one source of defaults, typed choices, one prefix per component,
unknown FLASHRECOVERY_ variables named, and the generated variable table up to date."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from flashrecovery import envtable
from flashrecovery.detector.core import Config
from flashrecovery.planner import Policy
from flashrecovery.shared.logging import warn_unknown_env
from flashrecovery.shared.settings import (
    AgentSettings,
    BusSettings,
    ConfigError,
    DetectorSettings,
    ExecutorSettings,
    KafkaSecuritySettings,
    PlannerSettings,
    Settings,
    SidecarSettings,
    agent_env,
    env_names,
    load_settings,
    unknown_env,
)
from flashrecovery.sidecar.core import WorkerPlace, worker_env

MODELS = (
    Settings,
    BusSettings,
    KafkaSecuritySettings,
    DetectorSettings,
    PlannerSettings,
    ExecutorSettings,
    SidecarSettings,
    AgentSettings,
)


def test_unknown_env_names_typos_and_old_names_only():
    names = [
        "PATH",
        "FLASHRECOVERY_JOB_ID",
        "FLASHRECOVERY_DETECTOR__HEARTBEAT_MISSES",
        "flashrecovery_bus__linger_ms",
        "FLASHRECOVERY_BUS",
        "FLASHRECOVERY_AGENT_RANK",
        "FLASHRECOVERY_AGENT_SOCKET",
        "FLASHRECOVERY_SIDECAR__ROLE",
        "FLASHRECOVERY_BUS__SECURITY__PROTOCOL",
        "FLASHRECOVERY_BUS__SECURITY",
        "FLASHRECOVERY_HEALTH_ARGS",
        "FLASHRECOVERY_METRICS_PORT",
        "FLASHRECOVERY_DETECTOR__HEARTBEAT_MISES",  # a typo in a nested name
        "FLASHRECOVERY_JOBID",  # a typo at the top
        "FLASHRECOVERY_RANK",  # the agent's name before it got its own prefix
        "FLASHRECOVERY_AGENT__RANK",  # the agent is not a nested group
        "FLASHRECOVERY_PLANNER__",
        "FLASHRECOVERY_BUS__SECURITY__USER",
    ]
    assert unknown_env(names) == [
        "FLASHRECOVERY_AGENT__RANK",
        "FLASHRECOVERY_BUS__SECURITY__USER",
        "FLASHRECOVERY_DETECTOR__HEARTBEAT_MISES",
        "FLASHRECOVERY_JOBID",
        "FLASHRECOVERY_PLANNER__",
        "FLASHRECOVERY_RANK",
    ]
    assert unknown_env([]) == [] and unknown_env(["HOME", "FLASHRECOVERYX"]) == []


def test_every_name_env_names_lists_is_read_by_its_model(monkeypatch):
    """env_names (what unknown_env accepts) agrees with what pydantic-settings reads."""
    monkeypatch.setenv("FLASHRECOVERY_DETECTOR__HANG_K", "12.5")
    monkeypatch.setenv("FLASHRECOVERY_INSTANCE", "7")
    monkeypatch.setenv(agent_env("world_size"), "9")
    assert load_settings().detector.hang_k == 12.5 and load_settings().instance == "7"
    assert AgentSettings().world_size == 9 and load_settings().job_id == "demo"
    names = env_names()
    assert "FLASHRECOVERY_DETECTOR__HANG_K" in names and "FLASHRECOVERY_AGENT_WORLD_SIZE" in names
    # one prefix per component: no service name starts with the agent's prefix
    assert not [
        n for n, (model, _) in names.items() if n.startswith("FLASHRECOVERY_AGENT_") and model is not AgentSettings
    ]


def test_service_start_warns_once_naming_the_unknown_variables():
    env = {"FLASHRECOVERY_JOB_ID": "j", "FLASHRECOVERY_EXECUTOR__LEASE_TTL": "5", "FLASHRECOVERY_RANK": "1"}
    with capture_logs() as logs:
        assert warn_unknown_env("planner", env) == ["FLASHRECOVERY_EXECUTOR__LEASE_TTL", "FLASHRECOVERY_RANK"]
        assert warn_unknown_env("planner", {"FLASHRECOVERY_JOB_ID": "j"}) == []
    assert [(e["event"], e["log_level"], e["names"]) for e in logs] == [
        ("unknown_settings", "warning", ["FLASHRECOVERY_EXECUTOR__LEASE_TTL", "FLASHRECOVERY_RANK"])
    ]


def test_what_the_sidecar_sets_for_a_worker_is_what_the_agent_reads():
    for rank in (3, None):
        env = worker_env(
            {},
            WorkerPlace(
                job_id="j",
                node_id="n",
                node_rank=0,
                rank=rank,
                local_rank=1,
                local_world_size=2,
                world_size=4,
                generation=2,
                rdzv="10.0.0.5:29511",
                agent_socket="/tmp/a.sock",
            ),
        )
        ours = {k: v for k, v in env.items() if k.startswith("FLASHRECOVERY_")}
        assert ours and unknown_env(ours) == []
        assert all(env_names()[k][0] is AgentSettings for k in ours)
        s = AgentSettings(**{k.removeprefix("FLASHRECOVERY_AGENT_").lower(): v for k, v in ours.items()})
        assert (s.job_id, s.rank, s.standby, s.socket, s.generation) == ("j", rank, rank is None, "/tmp/a.sock", 2)


def test_defaults_are_written_once():
    """The pure cores' configs take their settings-backed defaults from the settings models."""
    d, c = DetectorSettings(), Config()
    assert {f: getattr(c, f) for f in DetectorSettings.model_fields if f != "signatures_path"} == {
        f: getattr(d, f) for f in DetectorSettings.model_fields if f != "signatures_path"
    }
    p, pol = PlannerSettings(), Policy()
    assert {f: getattr(pol, f) for f in PlannerSettings.model_fields} == p.model_dump()
    assert Policy.from_settings(PlannerSettings(quarantine_faults=4)).quarantine_faults == 4
    assert dataclasses.replace(Config.from_settings(DetectorSettings(hang_k=3.0)), producer="x").hang_k == 3.0
    assert AgentSettings().job_id == Settings().job_id  # one default job id, not "demo" vs "job"


def test_choices_are_typed_with_clear_errors(monkeypatch):
    with pytest.raises(ValidationError, match="'active' or 'spare'"):
        SidecarSettings(role="standby")
    monkeypatch.setenv("FLASHRECOVERY_LOG_FORMAT", "xml")
    with pytest.raises(ConfigError, match="FLASHRECOVERY_LOG_FORMAT: .*'auto', 'json' or 'console'"):
        load_settings()
    with pytest.raises(ValidationError, match="'gloo' or 'nccl'"):
        AgentSettings(backend="mpi")
    with pytest.raises(ValidationError, match="'shrink' is not supported yet"):
        PlannerSettings(no_spare_policy="shrink")
    with pytest.raises(ValidationError, match="Input should be 'wait'"):
        PlannerSettings(no_spare_policy="grow")


def test_every_setting_is_described():
    missing = [
        f"{m.__name__}.{n}"
        for m in MODELS
        for n, f in m.model_fields.items()
        if not (f.description or isinstance(f.annotation, type) and f.annotation in MODELS)
    ]
    assert missing == []


def test_the_committed_variable_table_is_up_to_date():
    text = envtable.table()
    assert envtable.DOC.read_text() == text, f"docs/configuration.md is out of date: run `{envtable.COMMAND}`"
    for name in env_names():  # every variable has its row or its group's table
        assert f"| `{name}` |" in text or f"### `{name}__*`" in text, name


def test_envtable_check_reports_drift(tmp_path, capsys):
    out = tmp_path / "configuration.md"
    assert envtable.main(["--out", str(out)]) == 0 and envtable.main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text().replace("`demo`", "`job`"))
    assert envtable.main(["--check", "--out", str(out)]) == 1
    assert "python -m flashrecovery.envtable" in capsys.readouterr().err


def test_the_deployment_manifests_name_only_known_variables():
    """deploy/ sets FLASHRECOVERY_ variables for the services and the training job: a name
    there that nothing reads would be a silent misconfiguration in production."""
    import re

    root = envtable.DOC.parent.parent / "deploy"
    found = {m for p in root.rglob("*.yaml") for m in re.findall(r"FLASHRECOVERY_[A-Z0-9_]*[A-Z0-9]", p.read_text())}
    assert found and unknown_env(found) == []
