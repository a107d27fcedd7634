"""The worker process: a DraftWorker or TargetWorker behind a thin Ray actor.

Ray owns the process (placement, restarts); the scheduler's per-step calls arrive over a
ChannelServer (goodspec.cluster.channel), whose address the actor reports in `info()`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from goodspec.workers.huge_pages import huge_pages_on
from goodspec.workers.runner_config import RunnerConfig


@dataclass(frozen=True)
class WorkerInfo:
    kind: str
    pid: int
    device: str
    weights: str  # the runner's weights: its dtype's name, or int8 (ModelRunner.weights)
    num_blocks: int
    block_size: int
    max_context: int
    vocab_size: int
    model_dir: str
    channel: tuple[str, int]  # where the scheduler connects for propose/verify/free
    reads_features: bool = False  # a feature draft: propose needs the target's hidden states
    feature_layers: tuple[int, ...] = ()  # ... and these blocks' outputs (a fused one)
    threads: int = 0  # torch's CPU threads on the compute thread, as the worker runs
    # linears with weights packed for oneDNN (cpu_linear where it applies: float32, or native
    # bfloat16, on a CPU); keys the cached step-time profile with device and weights
    onednn_linears: int = 0
    huge_pages: bool = False  # the process's allocator asks for huge pages (workers.huge_pages)


class WorkerActor:
    """Plain class; goodspec.cluster.group turns it into a Ray actor with restarts."""

    def __init__(self, kind: str, config: RunnerConfig, channel_token: str, host: str | None = None,
                 draft_dir: str | None = None) -> None:
        """`host`: where the channel listens. The engine passes loopback when its actors share a
        node (STRICT_PACK); None means the node's address, for a scheduler on another node.
        `draft_dir` (a target): the draft it verifies, for the columns of its probabilities."""
        from goodspec.cluster.channel import ChannelServer

        if kind not in ("draft", "target"):
            raise ValueError(f"worker kind must be draft or target; got {kind!r}")
        self.kind = kind
        # Every call that touches the model (loading it included) runs on this one thread, which
        # owns torch's thread pool. GNU OpenMP keeps a team of threads per thread that opens a
        # parallel region, and its waiting threads spin 100 times instead of 300,000 once they
        # outnumber the cores (libgomp's GOMP_SPINCOUNT documentation). With the model loaded on
        # one thread and run on the channel's, 2 torch threads on 2 cores took 80 ms for a batch-1
        # SmolLM2 decode that took 41 ms on the loading thread (200 oneDNN linear layers: 55 vs
        # 27 ms). One thread also keeps the channel's calls and Ray's (used_blocks) apart.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"goodspec-{kind}-compute")
        # Imported here: the driver imports this module only to name the actor class, and the
        # workers pull in transformers' modelling stack (~4.5 s of imports on a 2-core CPU).
        from goodspec.workers.draft_worker import DraftWorker
        from goodspec.workers.target_worker import TargetWorker

        self.worker = self._compute.submit(
            lambda: DraftWorker(config) if kind == "draft" else TargetWorker(config, draft_dir)).result()
        # The per-step calls are reachable over the channel only, never as Ray methods: their
        # answers may hold tensors, and Ray would carry a device tensor to a scheduler that has
        # no GPU.
        step = {"propose": self.worker.propose} if kind == "draft" else {"verify": self.worker.verify}
        methods = {name: self._on_compute_thread(fn) for name, fn in {"free": self.worker.free, **step}.items()}
        if host is None:
            import ray

            host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        self.channel = ChannelServer(methods, channel_token, host)
        runner = self.worker.runner
        spec = runner.cache.spec
        self._info = WorkerInfo(kind, os.getpid(), str(runner.device), runner.weights,
                                spec.num_blocks, spec.block_size, runner.max_context,
                                runner.vocab_size, config.model_dir, self.channel.address,
                                runner.feature_input is not None,
                                runner.feature_input.target_layers if runner.feature_input is not None else (),
                                self._compute.submit(torch.get_num_threads).result(), runner.onednn_linears,
                                huge_pages_on())

    def info(self) -> WorkerInfo:
        return self._info

    def _on_compute_thread(self, fn):
        def call(arg):
            return self._compute.submit(fn, arg).result()

        return call

    def used_blocks(self) -> int:
        return self._compute.submit(lambda: self.worker.runner.cache.num_used_blocks).result()
