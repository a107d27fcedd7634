"""The Kubernetes manifests agree with the code and with each other. Nothing here needs a
Kubernetes cluster: what can drift (a renamed flag or config key, an engine that no longer fits
a worker pod, a port or secret named differently in two places, an image on another Ray) is
checked against goodspec's own parser, config loader and placement arithmetic."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
import yaml

from goodspec.cli import build_parser
from goodspec.config import build_config

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _docs(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kuberay" / name).read_text())}


@pytest.fixture(scope="module")
def ray_cluster() -> dict:
    return _docs("raycluster.yaml")["RayCluster"]


@pytest.fixture(scope="module")
def server() -> dict[str, dict]:
    return _docs("goodspec-server.yaml")


@pytest.fixture(scope="module")
def config(server, tmp_path_factory):
    path = tmp_path_factory.mktemp("cm") / "goodspec.yaml"
    path.write_text(server["ConfigMap"]["data"]["goodspec.yaml"])
    return build_config(yaml_path=path)  # unknown keys and bad values raise here


def _container(pod_template: dict) -> dict:
    (c,) = pod_template["spec"]["containers"]
    return c


def _quantity(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def test_server_command_parses_and_reads_the_mounted_config(server, config):
    pod = server["Deployment"]["spec"]["template"]
    c = _container(pod)
    assert c["command"][0] == "goodspec"
    args = build_parser().parse_args(c["command"][1:])
    assert args.command == "serve"
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    cm_volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
    assert cm_volume["configMap"]["name"] == server["ConfigMap"]["metadata"]["name"]
    key = Path(args.config).name
    assert Path(args.config).parent == Path(mount["mountPath"]) and key in server["ConfigMap"]["data"]
    assert config.server.host == "0.0.0.0", "the server must listen beyond the pod's loopback"


def test_server_ports_probes_and_service_agree(server, config):
    pod = server["Deployment"]["spec"]["template"]
    c = _container(pod)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    port = {"name": "grpc", "containerPort": ports["grpc"]}
    assert port["containerPort"] == config.server.port
    assert ports["metrics"] == config.server.metrics_port
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(config.server.metrics_port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == config.server.port, probe
    (svc_port,) = server["Service"]["spec"]["ports"]
    assert svc_port["targetPort"] == port["name"]
    assert server["Service"]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["terminationGracePeriodSeconds"] > config.server.drain_grace_s


def test_server_reaches_the_head_through_ray_client(ray_cluster, config):
    m = re.fullmatch(r"ray://([\w.-]+):(\d+)", config.cluster.ray_address or "")
    assert m, config.cluster.ray_address
    assert m.group(1).split(".")[0] == f"{ray_cluster['metadata']['name']}-head-svc"  # KubeRay's name
    head = _container(ray_cluster["spec"]["headGroupSpec"]["template"])
    assert int(m.group(2)) in {p["containerPort"] for p in head["ports"]}


def test_every_engine_fits_a_worker_pod(ray_cluster, config):
    """STRICT_PACK: an engine's three bundles (scheduler 1 CPU; target and draft 1 CPU and
    worker_gpus GPUs each) must fit one worker pod; the pods must hold cluster.replicas engines;
    the head hosts none."""
    head_params = ray_cluster["spec"]["headGroupSpec"]["rayStartParams"]
    assert head_params.get("num-cpus") == "0"
    workers = 2 if config.engine.draft_dir and config.engine.proposer == "draft" else 1
    engine_cpus, engine_gpus = 1 + workers, workers * config.cluster.worker_gpus
    assert config.cluster.placement_strategy == "STRICT_PACK"
    capacity = 0
    for group in ray_cluster["spec"]["workerGroupSpecs"]:
        limits = _container(group["template"])["resources"]["limits"]
        cpus, gpus = _quantity(limits["cpu"]), _quantity(limits.get("nvidia.com/gpu", 0))
        per_pod = min(cpus // engine_cpus, gpus // engine_gpus if engine_gpus else cpus // engine_cpus)
        capacity += int(per_pod) * group["minReplicas"]
    assert capacity >= config.cluster.replicas, (capacity, config.cluster.replicas)


def test_one_ray_version_and_one_image_everywhere(ray_cluster, server):
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert base and base.group(1) == ray_cluster["spec"]["rayVersion"]
    images = {_container(ray_cluster["spec"]["headGroupSpec"]["template"])["image"],
              _container(server["Deployment"]["spec"]["template"])["image"]}
    images |= {_container(g["template"])["image"] for g in ray_cluster["spec"]["workerGroupSpecs"]}
    assert len(images) == 1, "Ray Client needs the same Python and Ray on both ends"


def test_every_ray_process_shares_one_auth_token(ray_cluster, server):
    templates = [ray_cluster["spec"]["headGroupSpec"]["template"], server["Deployment"]["spec"]["template"]]
    templates += [g["template"] for g in ray_cluster["spec"]["workerGroupSpecs"]]
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
