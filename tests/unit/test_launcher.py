"""`flashrecovery run`: argument checks, the worker's command line and environment (pure), and
how the tools find a running job."""

from __future__ import annotations

import argparse
import json

import pytest

from flashrecovery.cluster import WorkerSpec
from flashrecovery.launch import add_run_parser, launcher_env, plan_of, standalone_layout
from flashrecovery.shared.settings import Settings, SidecarSettings
from flashrecovery.shared.stack import Stack
from flashrecovery.sidecar.core import TORCHRUN_VARS, WorkerPlace, node_rank, worker_argv, worker_env
from flashrecovery.supervisor import Supervisor, job_address_file, pick_job_address, write_job_address

pytestmark = pytest.mark.unit


def _parse(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    add_run_parser(ap.add_subparsers(dest="cmd"))
    return ap.parse_args(["run", *argv])


@pytest.fixture
def script(tmp_path):
    p = tmp_path / "train.py"
    p.write_text("print('hi')\n")
    return p


def test_script_args_pass_through_unchanged_even_launcher_like_ones(script):
    plan = plan_of(
        _parse(
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            "--steps",
            "5",
            "--tp",
            "3",
            "-m",
            "x",
            "--",
            "a b",
            "",
        )
    )
    assert plan.standalone and plan.nproc == 2 and plan.tp == 1 and plan.standbys == 0
    assert plan.script == str(script.resolve()) and plan.module == ""
    assert plan.args == ("--steps", "5", "--tp", "3", "-m", "x", "--", "a b", "")


def test_module_and_torchrun_spellings():
    plan = plan_of(_parse("--nproc_per_node", "4", "--nnodes", "3", "--node_rank", "2", "-m", "pkg.train", "--lr", "1"))
    assert plan.module == "pkg.train" and plan.script == "" and plan.args == ("--lr", "1")
    assert plan.world == 12 and plan.ranks == [8, 9, 10, 11] and not plan.standalone


@pytest.mark.parametrize(
    "argv, says",
    [
        (("--standalone", "--nproc-per-node", "2", "--nnodes", "2"), "--standalone runs one node"),
        (("--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "2"), "--node-rank"),
        (("--nproc-per-node", "2", "--standbys", "1"), "--standbys is for --standalone"),
        (("--standalone", "--nproc-per-node", "4", "--tp", "3"), "must divide"),
        (("--standalone", "--nproc-per-node", "0"), "at least 1"),
        (("--standalone", "--nproc-per-node", "2", "--standbys", "-1"), "0 or more"),
    ],
)
def test_bad_arguments_are_named(script, argv, says):
    with pytest.raises(ValueError, match=says):
        plan_of(_parse(*argv, str(script)))


def test_a_missing_script_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no such script"):
        plan_of(_parse("--standalone", "--nproc-per-node", "2", str(tmp_path / "nope.py")))


def test_omp_threads_default_like_torchrun():
    assert launcher_env({}, 2) == {"OMP_NUM_THREADS": "1"}
    assert launcher_env({"OMP_NUM_THREADS": "4"}, 2) == {}
    assert launcher_env({}, 1) == {}


def test_worker_argv():
    assert worker_argv("py", "pkg.mod", "", ["--a", "b c"]) == ["py", "-m", "pkg.mod", "--a", "b c"]
    assert worker_argv("py", "", "/x/train.py", []) == ["py", "/x/train.py"]
    for module, script in (("m", "s"), ("", "")):
        with pytest.raises(ValueError):
            worker_argv("py", module, script, [])


def _place(rank=3, **kw) -> WorkerPlace:
    fields = dict(
        job_id="job-1",
        node_id="node-1",
        node_rank=1,
        rank=rank,
        local_rank=1,
        local_world_size=2,
        world_size=4,
        generation=2,
        rdzv="10.0.0.5:29511",
        agent_socket="/tmp/a.sock",
    )

    fields.update(kw)
    return WorkerPlace(**fields)


def test_a_ranked_worker_gets_torchruns_environment_and_the_agents():
    base = {"PATH": "/bin", "RANK": "99", "MASTER_PORT": "1", "FLASHRECOVERY_AGENT_STANDBY": "1"}
    env = worker_env(base, _place())
    assert {k: env[k] for k in TORCHRUN_VARS} == {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "GROUP_WORLD_SIZE": "2",
        "ROLE_RANK": "3",
        "ROLE_NAME": "default",
        "ROLE_WORLD_SIZE": "4",
        "MASTER_ADDR": "10.0.0.5",
        "MASTER_PORT": "29511",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RESTART_COUNT": "2",
        "TORCHELASTIC_RUN_ID": "job-1",
        "TORCHELASTIC_MAX_RESTARTS": "0",
    }
    assert env["FLASHRECOVERY_AGENT_RANK"] == "3" and env["FLASHRECOVERY_AGENT_LOCAL_RANK"] == "1"
    assert env["FLASHRECOVERY_AGENT_WORLD_SIZE"] == "4" and env["FLASHRECOVERY_AGENT_GENERATION"] == "2"
    assert env["FLASHRECOVERY_AGENT_RDZV"] == "10.0.0.5:29511" and env["FLASHRECOVERY_AGENT_SOCKET"] == "/tmp/a.sock"
    assert env["FLASHRECOVERY_AGENT_JOB_ID"] == "job-1" and env["FLASHRECOVERY_AGENT_NODE_ID"] == "node-1"
    assert "FLASHRECOVERY_AGENT_STANDBY" not in env and env["PATH"] == "/bin"
    assert base["RANK"] == "99"  # the input is not changed


def test_a_standby_gets_no_rank_and_no_fault():
    env = worker_env(
        {"RANK": "0", "ROLE_RANK": "0", "FLASHRECOVERY_AGENT_RANK": "0", "FLASHRECOVERY_AGENT_FAULT": "kind=ecc"},
        _place(rank=None, node_rank=-1),
    )
    assert env["FLASHRECOVERY_AGENT_STANDBY"] == "1"
    for gone in ("RANK", "ROLE_RANK", "FLASHRECOVERY_AGENT_RANK", "FLASHRECOVERY_AGENT_FAULT"):
        assert gone not in env
    assert env["WORLD_SIZE"] == "4" and env["GROUP_RANK"] == "-1"


def test_sidecars_sharing_a_machine_number_local_ranks_across_it():
    env = worker_env({}, _place(rank=5, local_rank=1, node_rank=0, local_world_size=8, local_rank_base=4))
    assert (env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"], env["GROUP_RANK"], env["GROUP_WORLD_SIZE"]) == (
        "5",
        "8",
        "0",
        "1",
    )
    assert env["FLASHRECOVERY_AGENT_LOCAL_RANK"] == "1"  # the agent's: the position on its sidecar


def test_standalone_layout_puts_replicas_on_other_registered_nodes():
    assert standalone_layout(4, 2, standbys=2) == (2, 2)  # a tp group per node: its replica elsewhere
    assert standalone_layout(2, 1, standbys=1) == (2, 1)
    assert standalone_layout(4, 2, standbys=0) == (1, 4)  # nothing to recover: one sidecar


def test_no_rendezvous_no_master_address():
    env = worker_env({"MASTER_ADDR": "stale"}, _place(rdzv=""))
    assert "MASTER_ADDR" not in env and "MASTER_PORT" not in env


def test_env_rendezvous_joins_the_jobs_store_as_a_client(monkeypatch):
    """torch's own env:// handler (what init_process_group() uses) with a worker's environment:
    rank 0 too must connect to the job's store (already listening) rather than host one."""
    import importlib
    from datetime import timedelta

    import torch.distributed as dist

    rdzv = importlib.import_module("torch.distributed.rendezvous")
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for k, v in worker_env({}, _place(rank=0, rdzv=f"127.0.0.1:{server.port}")).items():
        monkeypatch.setenv(k, v)
    store, rank, world = next(rdzv._env_rendezvous_handler("env://", timeout=timedelta(seconds=10)))
    assert (rank, world) == (0, 4)
    store.set("k", "v")
    assert server.get("k") == b"v"


def test_node_rank():
    assert node_rank(5, [0, 1]) == 5
    assert node_rank(-1, [4, 5]) == 2
    assert node_rank(-1, []) == -1


def test_sidecar_settings_take_exactly_one_entry_point():
    assert SidecarSettings(worker_script="/x/t.py").worker_script == "/x/t.py"  # the default module yields
    assert SidecarSettings().worker_module  # the reference job by default
    with pytest.raises(ValueError, match="exactly one"):
        SidecarSettings(worker_module="m", worker_script="/x/t.py")
    with pytest.raises(ValueError, match="exactly one"):
        SidecarSettings(worker_module="")


def test_worker_spec_sets_both_entry_points_for_the_sidecar():
    env = WorkerSpec(script="/x/t.py", args=("--out", "a b")).sidecar_env()
    assert env == {
        "FLASHRECOVERY_SIDECAR__WORKER_MODULE": "",
        "FLASHRECOVERY_SIDECAR__WORKER_SCRIPT": "/x/t.py",
        "FLASHRECOVERY_SIDECAR__WORKER_ARGS": "--out 'a b'",
    }
    with pytest.raises(ValueError):
        WorkerSpec()


def test_the_tools_pick_the_running_job():
    a, b = {"job_id": "run-a"}, {"job_id": "run-b"}
    assert pick_job_address([a], None) is a
    assert pick_job_address([a, b], "run-b") is b
    with pytest.raises(ValueError, match="FLASHRECOVERY_JOB_ID"):
        pick_job_address([a, b], None)
    with pytest.raises(ValueError, match="no running job found"):
        pick_job_address([], None)
    with pytest.raises(ValueError, match="no running job 'run-c'"):
        pick_job_address([a], "run-c")


def test_worker_output_is_echoed_by_rank_complete_lines_first(tmp_path, capsys):
    from flashrecovery.launch import Echo

    logs = tmp_path / "sidecars" / "node-0"
    logs.mkdir(parents=True)
    (logs / "rank0.log").write_text("old run\n")
    echo = Echo(tmp_path, on=True)  # what is there already is not echoed
    with (logs / "rank0.log").open("a") as f:
        f.write("step 0 loss 1.0\nstep 1")
    (logs / "standby4242.log").write_text("ready\n")
    echo.poll()
    assert capsys.readouterr().out.splitlines() == ["[rank0]: step 0 loss 1.0", "[standby 4242]: ready"]
    echo.poll(last=True)
    assert capsys.readouterr().out.splitlines() == ["[rank0]: step 1"]
    Echo(tmp_path, on=False).poll(last=True)
    assert capsys.readouterr().out == ""


def test_a_job_address_file_is_the_owners_only(tmp_path):
    """It holds the Redis URL, with the job's ACL password in a secure run."""
    settings = Settings(job_id="j", redis_url="redis://fr-j:secret@127.0.0.1:1/0")
    sup = Supervisor(settings, tmp_path, stack=Stack("127.0.0.1:2", settings.redis_url))
    path = job_address_file(tmp_path, "j")
    write_job_address(path, settings, sup, tmp_path)
    assert json.loads(path.read_text())["redis_url"] == settings.redis_url
    assert path.stat().st_mode & 0o777 == 0o600
