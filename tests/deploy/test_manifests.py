"""The Kubernetes manifests agree with the code, with each other and with Kubernetes' schemas.
Nothing here needs a Kubernetes cluster: what can drift (a renamed config key, an engine that no
longer fits a worker pod, a port or secret named differently in two places, an image on another
Ray, an unknown field) is checked against goodspec's own config loader and placement arithmetic
and against Kubernetes' strict OpenAPI schemas."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest
import yaml

from goodspec.config import config_from_tree

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="module")
def service() -> dict:
    (doc,) = [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text()) if d]
    assert doc["kind"] == "RayService" and doc["apiVersion"] == "ray.io/v1"
    return doc


@pytest.fixture(scope="module")
def ray_cluster(service) -> dict:
    return service["spec"]["rayClusterConfig"]


@pytest.fixture(scope="module")
def application(service) -> dict:
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    return app


@pytest.fixture(scope="module")
def config(application):
    return config_from_tree(application["args"])  # unknown keys and bad values raise here


def _container(pod_template: dict) -> dict:
    (c,) = pod_template["spec"]["containers"]
    return c


def _quantity(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def test_the_application_imports_goodspecs_front_door_with_this_config(application, config):
    from goodspec.cluster import serve_app

    module, _, name = application["import_path"].partition(":")
    assert module == serve_app.__name__ and getattr(serve_app, name) is serve_app.build_app
    (deployment,) = application["deployments"]
    assert deployment["name"] == serve_app.FrontDoor.name
    assert application["route_prefix"] is None  # nothing goes through Serve's HTTP proxy
    assert config.server.host == "0.0.0.0", "the server must listen beyond the pod's loopback"


def test_the_front_door_runs_on_the_head_whose_service_exposes_its_ports(ray_cluster, application, config):
    """The replica asks for a resource only the head advertises, and the head container
    declares the gRPC and metrics ports (KubeRay's head Service exposes them)."""
    head = ray_cluster["headGroupSpec"]
    resources = application["deployments"][0]["ray_actor_options"]["resources"]
    advertised = json.loads(yaml.safe_load(head["rayStartParams"]["resources"]))
    assert resources.items() <= advertised.items()
    for group in ray_cluster["workerGroupSpecs"]:
        assert "resources" not in group["rayStartParams"]
    ports = {p["name"]: p["containerPort"] for p in _container(head["template"])["ports"]}
    assert ports["grpc"] == config.server.port and ports["metrics"] == config.server.metrics_port
    assert head["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(config.server.metrics_port)
    assert head["template"]["spec"]["terminationGracePeriodSeconds"] > config.server.drain_grace_s


def test_upgrades_go_to_a_new_cluster_before_the_old_one_stops(service):
    assert service["spec"]["upgradeStrategy"]["type"] == "NewCluster"


def test_every_engine_fits_a_worker_pod(ray_cluster, config, application):
    """STRICT_PACK: an engine's three bundles (scheduler 1 CPU; target and draft 1 CPU and
    worker_gpus GPUs each) must fit one worker pod; the pods must hold cluster.replicas engines;
    the head holds the front door and no engine."""
    head_params = ray_cluster["headGroupSpec"]["rayStartParams"]
    front_door_cpus = application["deployments"][0]["ray_actor_options"]["num_cpus"]
    assert head_params.get("num-gpus") == "0" and float(head_params["num-cpus"]) == front_door_cpus
    workers = 2 if config.engine.draft_dir and config.engine.proposer == "draft" else 1
    engine_cpus, engine_gpus = 1 + workers, workers * config.cluster.worker_gpus
    assert config.cluster.placement_strategy == "STRICT_PACK"
    capacity = 0
    for group in ray_cluster["workerGroupSpecs"]:
        limits = _container(group["template"])["resources"]["limits"]
        cpus, gpus = _quantity(limits["cpu"]), _quantity(limits.get("nvidia.com/gpu", 0))
        per_pod = min(cpus // engine_cpus, gpus // engine_gpus if engine_gpus else cpus // engine_cpus)
        capacity += int(per_pod) * group["minReplicas"]
    assert capacity >= config.cluster.replicas, (capacity, config.cluster.replicas)


def test_one_ray_version_and_one_image_everywhere(ray_cluster):
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert base and base.group(1) == ray_cluster["rayVersion"]
    images = {_container(ray_cluster["headGroupSpec"]["template"])["image"]}
    images |= {_container(g["template"])["image"] for g in ray_cluster["workerGroupSpecs"]}
    assert len(images) == 1


def test_every_ray_process_shares_one_auth_token(ray_cluster):
    templates = [ray_cluster["headGroupSpec"]["template"]] + [g["template"] for g in ray_cluster["workerGroupSpecs"]]
    secrets = set()
    for t in templates:
        env = {e["name"]: e for e in _container(t)["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        secrets.add((ref["name"], ref["key"]))
    assert len(secrets) == 1


def test_the_image_install_carries_the_model_pair_and_the_protos():
    """The Dockerfile pip-installs the repository (not editable): everything the server and
    the workers load at run time must be package data."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]
    package_dirs = pyproject["tool"]["setuptools"]["package-dir"]
    needed = [p for p in (ROOT / "goodspec" / "models").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    needed += list((ROOT / "protos" / "goodspec" / "v1").glob("*.proto"))
    assert any(p.suffix == ".safetensors" for p in needed)
    for path in needed:
        covered = any(
            fnmatch.fnmatch(str(path.relative_to(ROOT / package_dirs[pkg])), glob)
            for pkg, globs in data.items() for glob in globs
            if path.is_relative_to(ROOT / package_dirs[pkg]))
        assert covered, f"{path.relative_to(ROOT)} would be missing from the image"


# -- strict schemas and Pod Security ------------------------------------------------------------
K8S_VERSIONS = ("1.28.0", "1.37.0")  # the oldest Kubernetes the manifests support, the newest known

# The fields of KubeRay's ray.io/v1 RayCluster API (v1.1+) that a RayCluster spec, a head group
# and a worker group may set. KubeRay's CRD ships in no package registry this project can install
# from, so its own schema cannot be loaded here; the pod templates inside, which are most of each
# spec, are checked against Kubernetes' strict PodTemplateSpec schema below.
RAYSERVICE_FIELDS = {"serveConfigV2", "rayClusterConfig", "upgradeStrategy", "excludeHeadPodFromServeSvc",
                     "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"}
RAYCLUSTER_FIELDS = {"rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling",
                     "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy",
                     "gcsFaultToleranceOptions"}
HEAD_GROUP_FIELDS = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams",
                       "template", "scaleStrategy", "suspend", "idleTimeoutSeconds", "numOfHosts"}


def _manifests() -> list[dict]:
    return [d for path in sorted((DEPLOY / "kuberay").glob("*.yaml"))
            for d in yaml.safe_load_all(path.read_text()) if d]


def _pod_templates(doc: dict) -> list[dict]:
    if doc["kind"] in ("RayCluster", "RayService"):
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterConfig"]
        return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [doc["spec"]["template"]]
    return []


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_passes_kubernetes_strict_schemas(version):
    """Unknown fields are refused (the strict schemas forbid additional properties): a typo such
    as `timeoutSecond` would otherwise be dropped silently by the API server."""
    import kubernetes_validate

    for doc in _manifests():
        if doc["apiVersion"].startswith("ray.io/"):
            for template in _pod_templates(doc):
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                              "metadata": {"name": "check"}, "template": template},
                                             version, strict=True)
        else:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_strict_check_refuses_an_unknown_field():
    import kubernetes_validate

    (service,) = _manifests()
    template = _pod_templates(service)[0]
    _container(template)["readinessProbe"] = {"grpc": {"port": 50051}, "timeoutSecond": 5}
    with pytest.raises(kubernetes_validate.ValidationError, match="timeoutSecond"):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                                      "template": template}, K8S_VERSIONS[0], strict=True)


def test_rayservices_set_only_fields_of_kuberays_v1_api():
    docs = [d for d in _manifests() if d["apiVersion"].startswith("ray.io/")]
    assert docs
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
        assert set(doc["spec"]) <= RAYSERVICE_FIELDS, set(doc["spec"]) - RAYSERVICE_FIELDS
        spec = doc["spec"]["rayClusterConfig"]
        assert set(spec) <= RAYCLUSTER_FIELDS, set(spec) - RAYCLUSTER_FIELDS
        assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
        for group in spec["workerGroupSpecs"]:
            assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_every_pod_meets_pod_security_restricted():
    """The checks of the "restricted" profile (Kubernetes Pod Security Standards) that a
    manifest decides: non-root, no privilege escalation, every capability dropped, the runtime's
    seccomp profile, no host namespaces or host paths, only the allowed volume types."""
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                       "persistentVolumeClaim", "projected", "secret"}
    templates = [t for d in _manifests() for t in _pod_templates(d)]
    assert len(templates) == 2  # the Ray head (with the gRPC front door), the GPU workers
    for t in templates:
        pod = t["spec"]
        psc = pod.get("securityContext", {})
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= allowed_volumes, volume
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, c["name"]
            assert sc.get("runAsUser", psc.get("runAsUser", 1)) != 0, c["name"]
            assert sc.get("allowPrivilegeEscalation") is False, c["name"]
            assert not sc.get("privileged"), c["name"]
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], c["name"]
            assert not set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}
            seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
            assert seccomp in ("RuntimeDefault", "Localhost"), c["name"]


def test_probes_allow_seconds_not_the_one_second_default():
    for d in _manifests():
        for t in _pod_templates(d):
            for c in t["spec"]["containers"]:
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if probe in c:
                        assert c[probe].get("timeoutSeconds", 1) >= 3, (c["name"], probe)
