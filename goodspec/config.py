"""The engine's configuration: one dataclass tree, validated where it is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from goodspec.scheduler.scheduler import SchedulerConfig

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_TARGET = str(MODELS_DIR / "target")
DEFAULT_DRAFT = str(MODELS_DIR / "draft")


@dataclass(frozen=True)
class EngineConfig:
    target_dir: str = DEFAULT_TARGET
    draft_dir: str | None = DEFAULT_DRAFT  # None: no draft model, only policy "off"
    policy: str = "fixed:3"  # off | fixed:K
    device: str = "auto"
    dtype: str = "auto"
    target_kv_tokens: int = 32768
    draft_kv_tokens: int = 32768
    block_size: int = 16
    threads: int = 0  # torch CPU threads per worker; 0 = torch's default
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
