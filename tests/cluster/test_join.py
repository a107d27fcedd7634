"""Joining an existing Ray cluster (`--ray-address HOST:PORT`, a driver on a node of the
cluster) instead of starting the embedded one: a real `ray start --head` in its own temp dir,
drivers as subprocesses (one Ray per process). Ray Client (`ray://`) is refused."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.cluster.conftest import free_port


def _wait_listening(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def ray_head():
    """A head node as `ray start` makes one, with token auth (its default) and a token of its
    own. Its own --temp-dir keeps other processes' bare ray.init() from finding it."""
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    gcs = free_port()
    temp = tempfile.mkdtemp(prefix="gsr", dir="/tmp")  # short: Ray's socket paths live under it
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={gcs}",
         f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=4", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert _wait_listening(gcs, 60), "ray start --head did not come up"
        yield env, f"127.0.0.1:{gcs}"
    finally:
        head.terminate()  # --block: stopping it stops the head's processes
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _generate(env: dict, address: str, prompt: str, n: int, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "goodspec.cli", "generate", "--model", "tiny", "--json", "--policy", "fixed:3",
         "--ray-address", address, "--device", "cpu", "--max-new-tokens", str(n), prompt],
        capture_output=True, text=True, timeout=timeout, env=env)


def test_generate_on_an_existing_cluster_matches_target_only_greedy(ray_head, sharegpt_prompts, greedy_reference):
    env, gcs = ray_head
    prompt = sharegpt_prompts[0]
    n, want = greedy_reference[prompt]
    res = _generate(env, gcs, prompt, n)
    assert res.returncode == 0, res.stderr[-3000:]
    row = json.loads(res.stdout.splitlines()[0])
    assert row["token_ids"] == want and row["finish_reason"] in ("length", "eos")
    assert row["draft_tokens_proposed"] > 0


def test_unreachable_cluster_is_a_clear_error_not_a_hang():
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "goodspec.cli", "generate", "--model", "tiny", "--ray-address", f"127.0.0.1:{port}",
         "--connect-timeout-s", "2", "Hello"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in res.stderr
    assert time.monotonic() - t0 < 60


def test_ray_client_is_refused_with_what_to_do_instead():
    res = subprocess.run(
        [sys.executable, "-m", "goodspec.cli", "generate", "--model", "tiny", "--ray-address", "ray://127.0.0.1:10001",
         "Hello"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "Ray Client (ray://) is not supported" in res.stderr and "serve_app" in res.stderr


DRIVER = """
import json, sys
from goodspec.cluster.group import EngineGroup
from goodspec.config import build_config
from goodspec.workers.sampling import SamplingParams

prompts = json.loads(sys.argv[2])
g = EngineGroup(build_config(cluster__ray_address=sys.argv[1], engine__model="tiny", engine__device="cpu",
                             engine__dtype="float32", engine__threads=1))
try:
    for _ in range(4):  # back to back: each call is a new event loop over the same engine
        print(json.dumps([c.token_ids for c in g.complete_all(prompts, SamplingParams(max_new_tokens=6))]), flush=True)
finally:
    g.shutdown()
"""


def test_a_driver_on_the_cluster_runs_one_batch_after_another(ray_head, sharegpt_prompts):
    """Each complete_all is its own event loop over the same engines: the streams of one batch
    must not leak into the next."""
    env, gcs = ray_head
    prompts = sharegpt_prompts[:4]
    res = subprocess.run([sys.executable, "-c", DRIVER, gcs, json.dumps(prompts)],
                         capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    batches = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(batches) == 4 and all(b == batches[0] for b in batches)
    assert all(len(ids) == 6 for ids in batches[0])
