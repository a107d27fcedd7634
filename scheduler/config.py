"""The scheduler's configuration and the KV budgets it plans against."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KVBudget:
    num_blocks: int
    block_size: int

    def blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = _f(32, "requests running at once (the decode batch size limit)")
    max_num_batched_tokens: int = _f(512, "tokens per target forward; bounds prefill chunks")
    max_k: int = _f(8, "K_max: the most draft tokens a request gets in one step")
    max_context: int = _f(1024, "context limit (capped by the models' own)")
    eos_token_id: int | None = _f(None, "end-of-sequence id (default: the tokenizer's)")
    max_worker_failures: int = _f(3, "consecutive failed worker calls before the engine gives up")

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1; got {self.max_num_seqs}")
        if self.max_k < 0:
            raise ValueError(f"max_k must be >= 0; got {self.max_k}")
        if self.max_num_batched_tokens < self.max_num_seqs * (self.max_k + 1):
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs * (max_k + 1) = {self.max_num_seqs * (self.max_k + 1)} so a full "
                f"decode batch fits one step"
            )
