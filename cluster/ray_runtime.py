"""Starting or joining Ray for goodspec: a local Ray of our own (on loopback when nothing off
this machine needs it, in a session of its own), or an existing cluster probed first so a dead
address fails fast. Ray offers no option for either of the first two; see each helper."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time

import ray

from goodspec.config import ClusterConfig

log = logging.getLogger("goodspec.cluster")


class ClusterUnreachable(RuntimeError):
    """The Ray cluster named by ray_address does not answer."""


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@contextlib.contextmanager
def _ray_on_loopback():
    """While starting a local Ray: every server of it (GCS, raylet, object manager, workers)
    binds 127.0.0.1. Ray otherwise binds the node's routable address or all interfaces, and has
    no bind-address option; its single-machine mode (the switch it uses on macOS and Windows) is
    read from the environment by the processes it starts and from ray_constants by this one."""
    from ray._private import ray_constants

    key = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    old_env, old_flag = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[key], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old_env


@contextlib.contextmanager
def _ray_in_its_own_session():
    """While starting a local Ray: its processes (GCS, raylet, and the workers the raylet
    forks) start in a session of their own, so a signal to this process's group (a terminal's
    hang-up, `kill -TERM -PGID`, a supervisor stopping the group) reaches only goodspec, which
    then drains through a still-working Ray instead of losing it mid-request. They still end
    with this process (Ray's fate sharing) and on ray.shutdown. Ray has no option for this."""
    from ray._private import services

    base = services.ConsolePopen

    class _OwnSession(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = _OwnSession
    try:
        yield
    finally:
        services.ConsolePopen = base


def init_ray(cluster: ClusterConfig, loopback: bool = False) -> bool:
    """Join or start Ray; returns True when this call started a local Ray (we own its shutdown).
    `loopback`: a local Ray listens on 127.0.0.1 only (nothing outside this machine needs it)."""
    if ray.is_initialized():
        return False
    if cluster.ray_address:
        address = cluster.ray_address
        if address.startswith("ray://"):
            raise ValueError(
                f"ray_address {address!r}: Ray Client (ray://) is not supported. Run goodspec on a "
                f"node of the cluster (ray_address auto or HEAD:6379), or deploy the gRPC server "
                f"into the cluster (goodspec.cluster.serve_app, deploy/kuberay/rayservice.yaml)")
        if address != "auto":
            # ray.init would retry a dead GCS for minutes.
            _probe(address, cluster.connect_timeout_s)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except ConnectionError as e:
            ray.shutdown()
            raise ClusterUnreachable(f"cannot join the Ray cluster at {address!r}: {e}") from e
        return True
    num_cpus = cluster.num_cpus or 3 * cluster.replicas
    # "local": a new Ray of our own even when `ray start` left a cluster on this machine (a
    # bare init would join that one and refuse num_cpus).
    with _ray_in_its_own_session(), _ray_on_loopback() if loopback else contextlib.nullcontext():
        start_local_ray(num_cpus)
    return True


RAY_START_ATTEMPTS = 2
RAY_LOG_LINES = 8  # of the failed start's raylet log, in the warning


def start_local_ray(num_cpus: int) -> None:
    """`ray.init(address="local")`, tried RAY_START_ATTEMPTS times. Ray gives its new GCS and
    raylet fixed waits (no setting: 30 s for the raylet to register, a port file for the GCS)
    and then raises (a bare Exception or a RuntimeError), leaving what it started running; on
    this 2-core machine each has once failed a whole test session. A failed start's processes
    are ended, its raylet log and the machine's load quoted, and Ray started again."""
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for one of them
            if "timed out" not in str(e).lower() or attempt == RAY_START_ATTEMPTS:
                raise
            log.warning("Ray did not start (attempt %d of %d): %s\n%s\n%s", attempt, RAY_START_ATTEMPTS,
                        e, _raylet_log_tail(), _machine_load())
            ray.shutdown()
            _end_ray_children()


def _machine_load() -> str:
    """The load average and the busiest processes: what to look at when Ray starts too slowly."""
    import psutil

    procs = list(psutil.process_iter())
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)  # starts the sample
    time.sleep(0.5)
    rows = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            rows.append((p.cpu_percent(None), p.pid, p.name(), p.memory_info().rss >> 20))
    busiest = ", ".join(f"{name}[{pid}] {cpu:.0f}% cpu {rss} MiB" for cpu, pid, name, rss in sorted(rows, reverse=True)[:5])
    return f"load average {os.getloadavg()}; busiest over 0.5 s: {busiest}"


def _raylet_log_tail() -> str:
    try:
        from ray._common.utils import get_default_ray_temp_dir  # Ray's rule: RAY_TMPDIR or /tmp/ray
        temp = get_default_ray_temp_dir()
    except ImportError:  # older Ray
        temp = "/tmp/ray"
    path = os.path.join(temp, "session_latest", "logs", "raylet.out")
    try:
        with open(path, errors="replace") as f:
            lines = f.readlines()[-RAY_LOG_LINES:]
    except OSError as e:
        return f"(no raylet log: {e})"
    return f"last lines of {path}:\n" + "".join(lines)


def _end_ray_children() -> None:
    """Kill the processes a failed ray.init left (GCS, raylet, agents): this process's
    children that run Ray's own programs."""
    import psutil

    ray_dir = os.path.dirname(ray.__file__)
    doomed = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(ray_dir in part for part in child.cmdline()):
                child.kill()
                doomed.append(child)
    psutil.wait_procs(doomed, timeout=10)


def _probe(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray_address must be auto or HOST:PORT; got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterUnreachable(
            f"no Ray cluster answers at {address} ({e}); start one with `ray start --head "
            f"--port {port}` or check ray_address") from None
