"""Per-row sampling parameters of a batch as tensors, built once per worker call."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from goodspec.workers.sampling import SamplingParams


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [rows] float
    top_k: torch.Tensor  # [rows] int64
    top_p: torch.Tensor  # [rows] float
    seeds: torch.Tensor  # [rows] int64

    @classmethod
    def from_params(cls, params: list[SamplingParams]) -> "SamplingTensors":
        if any(p.seed is None for p in params):
            raise ValueError("workers need a concrete seed per request; the scheduler assigns one")
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
            seeds=torch.tensor([p.seed for p in params], dtype=torch.long),
        )

    @property
    def all_greedy(self) -> bool:
        return bool((self.temperature <= 0).all())

    def select(self, rows: torch.Tensor) -> "SamplingTensors":
        return SamplingTensors(self.temperature[rows], self.top_k[rows], self.top_p[rows], self.seeds[rows])

    def to(self, device: torch.device) -> "SamplingTensors":
        return SamplingTensors(self.temperature.to(device), self.top_k.to(device),
                               self.top_p.to(device), self.seeds.to(device))

    def expand(self, n: int) -> "SamplingTensors":
        """Each row repeated n times along a new last dim: [rows, n]."""
        return SamplingTensors(*(t.unsqueeze(1).expand(-1, n) for t in
                                 (self.temperature, self.top_k, self.top_p, self.seeds)))
