"""A worker process runs everything that touches its model on one thread: the one that loaded it.

GNU OpenMP keeps a thread team per thread that opens a parallel region; with a second team the
threads outnumber 2 cores and all but stop spinning between regions, and a 2-thread forward on the
channel's thread ran at half the speed of the same forward on the loading thread (BENCHMARKS.md,
fifteenth session). So loading, the channel's calls and Ray's calls all go to one compute thread.
"""

from __future__ import annotations

import threading

from goodspec.cluster.channel import ChannelClient, new_token
from goodspec.cluster.worker_actor import WorkerActor
from goodspec.config import DEFAULT_TARGET
from goodspec.workers.messages import VerifyBatch, VerifyItem
from goodspec.workers.model_runner import ModelRunner, RunnerConfig
from goodspec.workers.sampling import SamplingParams
from goodspec.workers.target_worker import TargetWorker


def _recording(calls: list[tuple[str, str]], name: str, fn):
    def wrapper(*args, **kwargs):
        calls.append((name, threading.current_thread().name))
        return fn(*args, **kwargs)

    return wrapper


def test_loading_and_every_call_run_on_one_compute_thread(monkeypatch):
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(ModelRunner, "__init__", _recording(calls, "load", ModelRunner.__init__))
    monkeypatch.setattr(TargetWorker, "verify", _recording(calls, "verify", TargetWorker.verify))
    monkeypatch.setattr(TargetWorker, "free", _recording(calls, "free", TargetWorker.free))
    token = new_token()
    # threads 0: leave this process's torch thread count alone
    actor = WorkerActor("target", RunnerConfig(DEFAULT_TARGET, "cpu", "float32", 1024, 16, 0), token, "127.0.0.1")
    client = ChannelClient(actor.channel.address, token, 60)
    try:
        greedy = SamplingParams(max_new_tokens=4, seed=0)
        result = client.call("verify", VerifyBatch([VerifyItem("r0", 0, [5, 6, 7, 8], True, greedy)]))
        assert len(result.num_accepted) == 1
        used = actor.used_blocks()
        assert used >= 1
        client.call("free", ["r0"])
        assert actor.used_blocks() == 0
    finally:
        client.close()
        actor.channel.close()
    assert [c[0] for c in calls] == ["load", "verify", "free"]
    threads = {t for _, t in calls}
    assert len(threads) == 1, calls
    (thread,) = threads
    assert thread.startswith("goodspec-target-compute") and thread != threading.main_thread().name
