"""The start-up profile's cache key: engines whose sweeps would measure different shapes (a KV
budget too small for the larger batches) do not share a cached profile; budgets that fit them all
do."""

import goodspec.scheduler.profiler as profiler
from goodspec.config import EngineConfig
from goodspec.engine import LLMEngine


def test_the_profile_cache_key_follows_the_shapes_the_kv_budget_lets_the_sweep_measure(monkeypatch):
    keys = []

    def cached(key):  # found: no sweep runs
        keys.append(key)
        return []

    monkeypatch.setattr(profiler, "load_cached", cached)
    budgets = (1024, 16384, 65536)
    for tokens in budgets:
        LLMEngine(EngineConfig(model="tiny", policy="goodput", device="cpu", dtype="float32",
                               target_kv_tokens=tokens, draft_kv_tokens=tokens))
    small, large, larger = keys
    max_k = EngineConfig(model="tiny").scheduler.max_k
    shapes = [profiler.swept_shapes(tokens, max_k) for tokens in budgets]
    # 1024 tokens: batch 16 and up do not fit (4 and up at context 320)
    assert len(shapes[0]) < len(shapes[1]) == len(shapes[2]) == 10
    assert small != large == larger
