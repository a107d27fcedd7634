"""How much one engine step's two worker calls cost in transport alone, three ways, in one run:

    python -m goodspec.cluster.transport_bench [--batch 8] [--k 3] [--vocab 8192] [--steps 300]

- `channel`: goodspec's typed socket channel (cluster/channel.py): scheduler -> draft, then
  scheduler -> target, the draft's probabilities passing through the scheduler;
- `compiled`: a Ray Compiled Graph (`ray.dag`, `experimental_compile`) of the same two calls, the
  draft -> target edge carried directly (the scheduler receives only the draft ids and the result);
- `actor calls`: plain Ray actor method calls (`ray.get(actor.m.remote(...))`), for reference.

The workers answer at once with a step's payload (a Proposal with [batch, k, vocab] float32
probabilities; a VerifyResult), so what is measured is transport: encoding, copies, wake-ups.
Each method runs on the same two actors, interleaved in rounds; medians are printed. This is
the evaluation issue 14 asks for; BENCHMARKS.md records its figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
import torch

from goodspec.cluster.ray_runtime import start_local_ray
from goodspec.workers.messages import (
    ProposeBatch, ProposeItem, Proposal, VerifyBatch, VerifyItem, VerifyResult,
)
from goodspec.workers.sampling import SamplingParams


class _Worker:
    """Answers at once with a fixed step payload, over Ray, a compiled graph or the channel."""

    def __init__(self, batch: int, k: int, vocab: int, token: str) -> None:
        from goodspec.cluster.channel import ChannelServer

        self.proposal = Proposal([[7] * k] * batch, torch.rand(batch, k, vocab), elapsed_s=0.0)
        self.result = VerifyResult([k] * batch, [[7] * (k + 1)] * batch, elapsed_s=0.0)
        self.channel = ChannelServer({"propose": self.propose, "verify": self.verify,
                                      "free": lambda ids: None}, token)

    def address(self) -> tuple[str, int]:
        return self.channel.address

    def propose(self, batch: ProposeBatch) -> Proposal:
        return self.proposal

    def verify(self, batch: VerifyBatch) -> VerifyResult:
        return self.result

    def verify_with(self, batch: VerifyBatch, proposal: Proposal) -> VerifyResult:
        """The compiled graph's target node: the proposal arrives straight from the draft."""
        for item in batch.items:
            item.draft_ids = proposal.draft_ids[item.proposal_row]
        batch.proposal = proposal
        return self.result

    def ids_of(self, proposal: Proposal) -> list[list[int]]:
        return proposal.draft_ids


def _batches(batch: int, k: int) -> tuple[ProposeBatch, VerifyBatch]:
    s = SamplingParams(seed=1)
    propose = ProposeBatch([ProposeItem(f"r{i}", 200, [5], k, s) for i in range(batch)])
    verify = VerifyBatch([VerifyItem(f"r{i}", 200, [5], True, s, [], i) for i in range(batch)])
    return propose, verify


def main(argv: list[str] | None = None) -> None:
    from ray.dag import InputNode, MultiOutputNode

    from goodspec.cluster.channel import ChannelClient, new_token

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=8192, help="width of the draft's probabilities")
    ap.add_argument("--steps", type=int, default=300, help="steps per method and round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    start_local_ray(num_cpus=4)
    try:
        token = new_token()
        Actor = ray.remote(num_cpus=1)(_Worker)
        draft, target = (Actor.remote(args.batch, args.k, args.vocab, token) for _ in range(2))
        channels = [ChannelClient(tuple(ray.get(a.address.remote())), token, 30.0) for a in (draft, target)]
        propose, verify = _batches(args.batch, args.k)

        with InputNode() as inp:
            proposal = draft.propose.bind(inp[0])
            graph = MultiOutputNode([draft.ids_of.bind(proposal), target.verify_with.bind(inp[1], proposal)])
        compiled = graph.experimental_compile()

        def via_channel():
            p = channels[0].call("propose", propose)
            verify.proposal = p
            channels[1].call("verify", verify)

        def via_compiled():
            ray.get(compiled.execute(propose, verify))

        def via_actor_calls():
            p = ray.get(draft.propose.remote(propose))
            verify.proposal = p
            ray.get(target.verify.remote(verify))

        methods = {"channel": via_channel, "compiled": via_compiled, "actor calls": via_actor_calls}
        times: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(args.rounds):
            for name, step in methods.items():
                for _ in range(20):  # warm
                    step()
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - t0)
        compiled.teardown()
        mb = args.batch * args.k * args.vocab * 4 / 2**20
        print(f"transport per engine step (propose + verify), batch {args.batch}, k {args.k}, "
              f"draft probabilities {mb:.2f} MiB, {args.rounds} rounds x {args.steps} steps:")
        base = statistics.median(times["channel"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:12s} median {med * 1e3:7.3f} ms  p90 {sorted(ts)[int(0.9 * len(ts))] * 1e3:7.3f} ms"
                  f"  ({med / base:.2f}x the channel)")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
