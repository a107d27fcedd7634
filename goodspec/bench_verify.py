"""The target's verification step alone, greedy rows apart against every row dense, same run.

    python -m goodspec.bench_verify

A batch of the mixed workload's shape (a third of the rows sampled, the rest greedy) is verified
from random logits over the target's vocabulary with q over the shipped draft's vocabulary, two
ways: as TargetWorker does since b15398e (greedy rows by argmax, sampled rows through the
rejection sampler) and with every row through the rejection sampler's dense [rows, k + 1, vocab]
tensors (as it did before). Outputs are checked equal; the median of 7 alternated timings of each
is printed with their ratio. One torch thread, no model forward: only what the split changes.
"""

from __future__ import annotations

import statistics
import time

import torch

from goodspec.config import model_pair
from goodspec.gguf_import import model_path
from goodspec.workers.messages import Proposal, VerifyBatch, VerifyItem
from goodspec.workers.model_runner import VocabMap
from goodspec.workers.sampling import SamplingParams
from goodspec.workers.target_worker import TargetWorker

SHAPES = ((32, 11, 3), (32, 11, 8), (16, 5, 3))  # (rows, of which sampled, k)


def main() -> int:
    torch.set_num_threads(1)
    _, draft = model_pair("smollm2")
    vmap = VocabMap.load(model_path(draft), torch.device("cpu"))
    vocab, draft_vocab = vmap.target_vocab_size, len(vmap.target_ids)
    worker = TargetWorker.__new__(TargetWorker)  # the verification alone: no model is loaded
    worker.draft_vocab = vmap
    for rows, sampled, k in SHAPES:
        g = torch.Generator().manual_seed(0)
        q = torch.softmax(4 * torch.randn(rows, k, draft_vocab, generator=g), -1)
        drafts = vmap.target_ids[torch.randint(0, draft_vocab, (rows, k), generator=g)].tolist()
        items = [VerifyItem(f"r{i}", 100, [5], True, SamplingParams(temperature=0.8 if i < sampled else 0.0, seed=i),
                            drafts[i], proposal_row=i) for i in range(rows)]
        batch = VerifyBatch(items, Proposal(drafts, q))
        logits = torch.randn(rows * (k + 1), vocab, generator=g)
        first = [i * (k + 1) for i in range(rows)]
        runs = {"every row dense": lambda: worker._accept_sampled(batch, items, first, logits),
                "greedy rows apart": lambda: worker._accept(batch, list(range(rows)), logits)}
        outputs = {name: run() for name, run in runs.items()}
        assert len({repr(o) for o in outputs.values()}) == 1, "the two ways disagree"
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(7):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
        dense, apart = (1e3 * statistics.median(times[n]) for n in runs)
        print(f"{rows} rows ({sampled} sampled), k = {k}: every row dense {dense:.1f} ms, "
              f"greedy rows apart {apart:.1f} ms ({dense / apart:.1f}x), outputs equal")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
