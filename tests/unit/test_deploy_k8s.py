"""deploy/k8s offline: every manifest validates against the Kubernetes schemas that the
`kubernetes-validate` package ships (strict: unknown fields are errors), and so does the example
overlay, rendered here without kubectl or kustomize by applying the few kustomize features it
uses (namespace, images, replicas, JSON 6902 patches; any other feature fails the test, so a new
one cannot slip through unrendered). Then what the deployment promises: a scalable detector, two
executors apart, probes, requests, a ServiceAccount without rights, credentials from Secrets,
Redis with AOF, and a training job whose entrypoint is `flashrecovery run`, with spare pods."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from flashrecovery.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s" / "base"
OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "example"
K8S_VERSION = "1.30.0"  # the oldest release the manifests must work on (validated also on the newest)
NAMESPACED_NOT = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}
RENDERED_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "replicas", "patches", "labels"}


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization(folder: Path) -> dict:
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert k["kind"] == "Kustomization"
    unknown = set(k) - RENDERED_KEYS
    assert not unknown, f"{folder}: kustomize features this test does not render: {sorted(unknown)}"
    return k


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec") if "template" in spec else None
    return [] if pod is None else pod.get("containers", []) + pod.get("initContainers", [])


def _pointer_set(doc: dict, path: str, value, op: str) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    node = doc
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last = parts[-1]
    if isinstance(node, list):
        i = len(node) if last == "-" else int(last)
        if op == "replace":
            assert i < len(node), f"replace of a missing item: {path}"
            node[i] = value
        else:
            node.insert(i, value)
    else:
        assert op == "add" or last in node, f"replace of a missing field: {path}"
        node[last] = value


def render(folder: Path) -> list[dict]:
    """The resources of a kustomization, with the features RENDERED_KEYS lists applied."""
    k = _kustomization(folder)
    docs: list[dict] = []
    for res in k.get("resources", []):
        path = (folder / res).resolve()
        docs += render(path) if path.is_dir() else copy.deepcopy(_load(path))
    for group in k.get("labels", []):
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(group["pairs"])
    if "namespace" in k:
        for d in docs:
            if d["kind"] not in NAMESPACED_NOT:
                d["metadata"]["namespace"] = k["namespace"]
    for image in k.get("images", []):
        for d in docs:
            for c in _containers(d):
                if c["image"].split(":")[0] == image["name"] or c["image"] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for rep in k.get("replicas", []):
        hit = [d for d in docs if d["metadata"]["name"] == rep["name"] and "replicas" in d.get("spec", {})]
        assert hit, f"replicas for {rep['name']}: no such workload"
        hit[0]["spec"]["replicas"] = rep["count"]
    for patch in k.get("patches", []):
        t = patch["target"]
        hit = [d for d in docs if d["kind"] == t["kind"] and d["metadata"]["name"] == t["name"]]
        assert len(hit) == 1, f"patch target {t}: {len(hit)} matches"
        for op in yaml.safe_load(patch["patch"]):
            assert op["op"] in ("replace", "add"), op
            _pointer_set(hit[0], op["path"], op["value"], op["op"])
    return docs


def _by(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


BASE_FILES = sorted(p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", BASE_FILES + [OVERLAY / "namespace.yaml"], ids=lambda p: p.name)
def test_every_manifest_validates_strictly(path):
    for doc in _load(path):
        for version in (K8S_VERSION, kubernetes_validate.latest_version()):
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_base_lists_every_manifest_file():
    listed = {(BASE / r).name for r in _kustomization(BASE)["resources"]}
    assert listed == {p.name for p in BASE_FILES}


def test_validator_refuses_a_bad_manifest():
    doc = _load(BASE / "planner.yaml")[0]
    doc["spec"]["template"]["spec"]["containers"][0]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_overlay_renders_to_valid_manifests():
    docs = render(OVERLAY)
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    assert all(d["metadata"].get("namespace") == "llm-team" for d in docs if d["kind"] != "Namespace")
    assert _by(docs, "Deployment", "flashrecovery-detector")["spec"]["replicas"] == 3
    assert _by(docs, "ConfigMap", "flashrecovery-config")["data"]["FLASHRECOVERY_JOB_ID"] == "llm-run-42"
    job = _by(docs, "Job", "flashrecovery-train")
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 8
    assert _containers(job)[0]["args"][:4] == ["--nproc-per-node", "8", "--nnodes", "8"]
    spare_env = {
        e["name"]: e.get("value") for e in _containers(_by(docs, "StatefulSet", "flashrecovery-spare"))[0]["env"]
    }
    assert spare_env["FLASHRECOVERY_SIDECAR__WORLD_SIZE"] == "64"  # 8 nodes x 8 ranks
    for d in docs:
        for c in _containers(d):
            name, _, tag = c["image"].rpartition(":")
            assert tag and tag != "latest" and ("/" in name or name == "redis"), f"unpinned image {c['image']}"


def test_control_plane_shape():
    docs = render(BASE)
    assert _by(docs, "Deployment", "flashrecovery-executor")["spec"]["replicas"] == 2
    anti = _by(docs, "Deployment", "flashrecovery-executor")["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"], "the two executors on different nodes"
    for name in ("detector", "planner", "executor"):
        dep = _by(docs, "Deployment", f"flashrecovery-{name}")
        (c,) = _containers(dep)
        assert c["args"] == [name]
        assert c["livenessProbe"]["httpGet"]["port"] == "metrics"
        assert c["readinessProbe"]["exec"]["command"] == ["flashrecovery", "health", "--service", name]
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        secret_env = {e["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        assert secret_env == {"FLASHRECOVERY_KAFKA_BOOTSTRAP", "FLASHRECOVERY_REDIS_URL"}
        assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "flashrecovery"
    for d in docs:
        for c in _containers(d):
            assert c.get("resources", {}).get("requests"), f"{d['metadata']['name']}/{c['name']}: no requests"


def test_least_privilege_and_redis_durability():
    docs = render(BASE)
    sa = _by(docs, "ServiceAccount", "flashrecovery")
    assert sa["automountServiceAccountToken"] is False
    assert not [d for d in docs if d["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]
    for d in docs:
        if _containers(d):
            assert d["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True, d["metadata"]["name"]
    (redis,) = _containers(_by(docs, "StatefulSet", "flashrecovery-redis"))
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert "$(REDIS_PASSWORD)" in args


def test_training_job_runs_flashrecovery_run_with_spares():
    docs = render(BASE)
    job = _by(docs, "Job", "flashrecovery-train")
    assert job["spec"]["completionMode"] == "Indexed"
    (trainer,) = _containers(job)
    assert trainer["command"] == ["flashrecovery", "run"]
    args = trainer["args"]
    assert args[args.index("--node-rank") + 1] == "$(NODE_RANK)"
    env = {e["name"]: e for e in trainer["env"]}
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    spare = _by(docs, "StatefulSet", "flashrecovery-spare")
    (side,) = _containers(spare)
    assert side["command"] == ["flashrecovery", "sidecar"]
    assert {e["name"]: e.get("value") for e in side["env"]}["FLASHRECOVERY_SIDECAR__ROLE"] == "spare"
    assert spare["spec"]["replicas"] >= 1


def test_manifest_commands_are_cli_commands(capsys):
    """Every `flashrecovery X` a container or probe runs is a real subcommand."""
    found = set()
    for d in render(BASE):
        for c in _containers(d):
            if c["image"].startswith("flashrecovery:"):  # the control-plane image: ENTRYPOINT flashrecovery
                found.add(c["args"][0])
            cmd = c.get("command", [])
            if cmd[:1] == ["flashrecovery"]:
                found.add(cmd[1])
            for probe in ("livenessProbe", "readinessProbe"):
                exe = c.get(probe, {}).get("exec", {}).get("command", [])
                if exe[:1] == ["flashrecovery"]:
                    found.add(exe[1])
    assert {"detector", "planner", "executor", "run", "sidecar", "health"} <= found
    for cmd in sorted(found):
        with pytest.raises(SystemExit) as exit_:
            cli_main([cmd, "--help"])
        assert exit_.value.code == 0, f"`flashrecovery {cmd} --help` failed"
        capsys.readouterr()
