"""What crosses a process boundary carries no device tensors: on a GPU deployment the scheduler
actor has no GPU, so a CUDA tensor reaching it would fail to load (or silently pin a GPU)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import ray
import torch

from goodspec.cluster import wire
from goodspec.cluster.worker_actor import WorkerActor
from goodspec.workers.messages import Proposal, VerifyBatch, VerifyItem
from goodspec.workers.sampling import SamplingParams


def _tensors_in(obj, seen=None) -> list[torch.Tensor]:
    """Every tensor reachable from obj through dataclass fields, lists, tuples and dicts."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in _tensors_in(getattr(obj, f.name), seen)]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors_in(x, seen)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in _tensors_in(x, seen)]
    return []


def test_a_worker_actor_offers_ray_no_method_that_answers_with_worker_data():
    """propose/verify answers hold tensors: they go over the typed channel (CPU bytes), and a
    Ray call that could return them (pickled, device and all) must not exist."""
    public = {name for name, _ in inspect.getmembers(WorkerActor, inspect.isfunction)
              if not name.startswith("_")}
    assert public == {"info", "used_blocks"}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_channel_delivers_tensors_on_the_cpu_whatever_the_sender_held(device, dtype):
    probs = torch.rand(2, 3, 7, device=device).to(dtype)
    proposal = Proposal([[1, 2, 3], [4]], probs, elapsed_s=0.1)
    for call, obj in (("propose", proposal),
                      ("verify", VerifyBatch([VerifyItem("a", 0, [5], True, SamplingParams(seed=1), [1, 2, 3], 0)],
                                             proposal))):
        codec = wire.CALLS[call]
        encode, decode = (codec.encode_result, codec.decode_result) if call == "propose" else \
            (codec.encode_arg, codec.decode_arg)
        got = decode(*wire.unpack(bytearray(wire.pack(*encode(obj)))))
        tensors = _tensors_in(got)
        assert len(tensors) == 1 and tensors[0].device.type == "cpu"
        assert torch.equal(tensors[0], probs.cpu())


def test_nothing_the_engine_actors_answer_over_ray_holds_a_tensor(group):
    """Stream chunks, stats, worker info and step records: plain values only."""
    import asyncio

    from goodspec.workers.sampling import SamplingParams

    async def chunks():
        return [c async for _, c in group.generate(group.codec.encode("Hello there"),
                                                    SamplingParams(max_new_tokens=6, temperature=1.0))]

    replies = [asyncio.run(chunks()), group.stats(), group._ready,
               ray.get(group.engines[0].actor.step_records.remote(8), timeout=60)]
    assert _tensors_in(replies) == []
