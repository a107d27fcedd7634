"""The worker process: a DraftWorker or TargetWorker behind a thin Ray actor."""

from __future__ import annotations

import os
from dataclasses import dataclass

from goodspec.workers.draft_worker import DraftWorker
from goodspec.workers.messages import ProposeBatch, Proposal, VerifyBatch, VerifyResult
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


class WorkerActor:
    """Plain class; goodspec.cluster.group turns it into a Ray actor with restarts."""

    def __init__(self, kind: str, config: RunnerConfig) -> None:
        if kind not in ("draft", "target"):
            raise ValueError(f"worker kind must be draft or target; got {kind!r}")
        self.kind = kind
        self.worker = DraftWorker(config) if kind == "draft" else TargetWorker(config)
        runner = self.worker.runner
        spec = runner.cache.spec
        self._info = WorkerInfo(kind, os.getpid(), str(runner.device), str(runner.dtype).replace("torch.", ""),
                                spec.num_blocks, spec.block_size, runner.max_context,
                                runner.vocab_size, config.model_dir)

    def info(self) -> WorkerInfo:
        return self._info

    def propose(self, batch: ProposeBatch) -> Proposal:
        return self.worker.propose(batch)

    def verify(self, batch: VerifyBatch) -> VerifyResult:
        return self.worker.verify(batch)

    def free(self, req_ids: list[str]) -> None:
        self.worker.free(req_ids)

    def used_blocks(self) -> int:
        return self.worker.runner.cache.num_used_blocks
