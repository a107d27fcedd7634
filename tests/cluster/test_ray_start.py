"""Starting the local Ray: Ray gives a new raylet a fixed 30 s to register and then raises,
leaving what it started running (its GCS, given a fixed time to write its port file, the
same). Each has failed a whole test session here; goodspec tries again
after ending the failed start's processes. Ray's failure is faked (it cannot be provoked on
demand); the processes ended are real ones."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import ray

from goodspec.cluster import ray_runtime

TIMEOUT = Exception("The current node timed out during startup. This could happen because ...")
# Ray's other wait: the GCS writes its port to a file, read within a fixed time
GCS_TIMEOUT = RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_abc")


@pytest.mark.parametrize("error", [TIMEOUT, GCS_TIMEOUT], ids=["raylet", "gcs"])
def test_a_start_that_times_out_is_tried_again(monkeypatch, error):
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise error

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray_runtime, "_end_ray_children", lambda: calls.append("ended"))
    ray_runtime.start_local_ray(num_cpus=3)
    assert calls[1] == "ended" and len(calls) == 3
    assert calls[2] == dict(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)


def test_other_failures_and_the_last_timeout_are_raised(monkeypatch):
    def broken(**kwargs):
        raise ValueError("num_cpus must be positive")

    monkeypatch.setattr(ray, "init", broken)
    with pytest.raises(ValueError, match="num_cpus"):
        ray_runtime.start_local_ray(num_cpus=3)

    def slow(**kwargs):
        raise TIMEOUT

    monkeypatch.setattr(ray, "init", slow)
    monkeypatch.setattr(ray_runtime, "_end_ray_children", lambda: None)
    with pytest.raises(Exception, match="timed out during startup"):
        ray_runtime.start_local_ray(num_cpus=3)


def test_only_the_children_running_rays_programs_are_ended():
    ray_dir = os.path.dirname(ray.__file__)
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    ray_like = subprocess.Popen(sleep + [os.path.join(ray_dir, "core", "src", "ray", "raylet", "raylet")])
    other = subprocess.Popen(sleep)
    try:
        ray_runtime._end_ray_children()
        ray_like.wait(timeout=10)  # ended (psutil reaped it, so no exit status is left to read)
        assert other.poll() is None
    finally:
        for p in (ray_like, other):
            p.kill()
            p.wait()
