"""The worker process: a DraftWorker or TargetWorker behind a thin Ray actor.

Ray owns the process (placement, restarts); the scheduler's per-step calls arrive over a
ChannelServer (goodspec.cluster.channel), whose address the actor reports in `info()`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from goodspec.workers.draft_worker import DraftWorker
from goodspec.workers.model_runner import RunnerConfig
from goodspec.workers.target_worker import TargetWorker


@dataclass(frozen=True)
class WorkerInfo:
    kind: str
    pid: int
    device: str
    dtype: str
    num_blocks: int
    block_size: int
    max_context: int
    vocab_size: int
    model_dir: str
    channel: tuple[str, int]  # where the scheduler connects for propose/verify/free
    reads_features: bool = False  # a feature draft: propose needs the target's hidden states
    feature_layers: tuple[int, ...] = ()  # ... and these blocks' outputs (a fused one)


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
        self.worker = DraftWorker(config) if kind == "draft" else TargetWorker(config, draft_dir)
        # The per-step calls are reachable over the channel only, never as Ray methods: their
        # answers may hold tensors, and Ray would carry a device tensor to a scheduler that has
        # no GPU. Channel calls run on the channel's thread, Ray calls (info, used_blocks) on
        # Ray's; the lock keeps them apart.
        self._lock = threading.Lock()
        step = {"propose": self.worker.propose} if kind == "draft" else {"verify": self.worker.verify}
        methods = {name: self._locked(fn) for name, fn in {"free": self.worker.free, **step}.items()}
        if host is None:
            import ray

            host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        self.channel = ChannelServer(methods, channel_token, host)
        runner = self.worker.runner
        spec = runner.cache.spec
        self._info = WorkerInfo(kind, os.getpid(), str(runner.device), str(runner.dtype).replace("torch.", ""),
                                spec.num_blocks, spec.block_size, runner.max_context,
                                runner.vocab_size, config.model_dir, self.channel.address,
                                runner.feature_input is not None,
                                runner.feature_input.target_layers if runner.feature_input is not None else ())

    def info(self) -> WorkerInfo:
        return self._info

    def _locked(self, fn):
        def call(arg):
            with self._lock:
                return fn(arg)

        return call

    def used_blocks(self) -> int:
        with self._lock:
            return self.worker.runner.cache.num_used_blocks
