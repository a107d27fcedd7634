"""DraftWorker: proposes k_i draft tokens for each request of a batch with the small model
(a token-only draft, or a feature draft that also reads the target's hidden states)."""

from __future__ import annotations

import time

import torch

from goodspec.workers.messages import CONFIDENCE_BINS, DraftStop, ProposeBatch, Proposal
from goodspec.workers.model_runner import ModelRunner, RunnerConfig
from goodspec.workers.sampling import STREAM_DRAFT, hash_uniform, logits_to_probs, sample_from_probs
from goodspec.workers.sampling_tensors import SamplingTensors


class DraftWorker:
    def __init__(self, config: RunnerConfig) -> None:
        self.runner = ModelRunner(config)

    @property
    def reads_features(self) -> bool:
        """A feature draft: its proposals read the target's hidden states (ProposeBatch.features)."""
        return self.runner.feature_input is not None

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The target blocks a fused feature draft reads besides the last hidden state."""
        return self.runner.feature_input.target_layers if self.runner.feature_input is not None else ()

    def propose(self, batch: ProposeBatch) -> Proposal:
        """max_k sequential passes: the first appends each request's unseen committed tokens (any
        number) and drafts one token; pass j feeds draft token j-1 of the requests with k_i >= j."""
        t0 = time.perf_counter()
        items = batch.items
        num_items = len(items)
        if num_items == 0:
            return Proposal(draft_ids=[], draft_probs=None)
        if any(it.num_draft < 1 for it in items):
            raise ValueError("ProposeItem.num_draft must be >= 1; leave k = 0 requests out of the batch")
        dev = self.runner.device
        params = SamplingTensors.from_params([it.sampling for it in items]).to(dev)
        num_draft = torch.tensor([it.num_draft for it in items], device=dev)
        max_k = int(num_draft.max())
        keep_probs = not params.all_greedy
        # q over the draft's own tokens (the target maps a reduced vocabulary's columns back)
        vocab = self.runner.model_vocab_size
        draft = torch.zeros(num_items, max_k, dtype=torch.long, device=dev)
        conf = torch.zeros(num_items, max_k, device=dev)  # the draft's confidence at each position
        probs_out = torch.zeros(num_items, max_k, vocab, device=dev) if keep_probs else None
        # Position of the next token each request drafts.
        next_pos = torch.tensor([it.start_pos + len(it.token_ids) for it in items], device=dev)

        active = torch.arange(num_items, device=dev)
        seq_ids = [it.req_id for it in items]
        starts = [it.start_pos for it in items]
        inputs = [it.token_ids for it in items]
        reads_features = self.reads_features
        features = batch.features if reads_features else None  # pass 0: the target's
        stopping = _Stopping(batch.stop, items, params.temperature <= 0) if batch.stop is not None else None
        for j in range(max_k):
            # In the draft's own vocabulary (a reduced one is mapped to the target's only where
            # needed: scattering every row to 49152 ids cost 14% of a batch-16 draft step).
            logits, hidden = self.runner.run(seq_ids, starts, inputs, [1] * len(seq_ids), target_vocab=False,
                                             features=features)
            pos = next_pos[active] + j
            if probs_out is None:  # all greedy: q is the one-hot of the argmax, never built
                top_p, top_id = torch.softmax(logits.float(), -1).max(-1)
                tokens = self.runner.target_ids(top_id)
                conf[active, j] = top_p
            else:
                sub = params.select(active)
                probs = logits_to_probs(logits, sub.temperature, sub.top_k, sub.top_p)  # [active, V']
                picked = sample_from_probs(probs, hash_uniform(sub.seeds, pos, STREAM_DRAFT))
                tokens = self.runner.target_ids(picked)
                probs_out[active, j] = probs
                # The top probability of q, not q(drafted token): it must not depend on the token
                # drawn, or verifying by it would bias sampled output (goodspec.scheduler.confidence).
                # A greedy row's q is one-hot: its confidence is the temperature-1 top probability.
                top = probs.max(-1).values
                greedy_rows = sub.temperature <= 0
                if bool(greedy_rows.any()):  # (the softmax only where a greedy row needs it)
                    top = torch.where(greedy_rows, torch.softmax(logits.float(), -1).max(-1).values, top)
                conf[active, j] = top
            draft[active, j] = tokens
            still = num_draft[active] > j + 1
            if stopping is not None:
                still = stopping.drafting_on(active, j, conf[active, j], still)
            if not bool(still.any()):
                break
            active = active[still]
            if reads_features:  # pass j + 1 reads the state this pass predicted
                features = hidden[still]
            idx = still.nonzero().squeeze(1).tolist()
            pos_list, token_list = pos.tolist(), tokens.tolist()
            seq_ids = [seq_ids[i] for i in idx]
            starts = [pos_list[i] for i in idx]  # the draft token j sits at position pos
            inputs = [[token_list[i]] for i in idx]
        self.runner.synchronize()
        ks = (num_draft if stopping is None else stopping.drafted(num_draft)).tolist()
        ids = [row[:k] for row, k in zip(draft.tolist(), ks)]
        confs = [row[:k] for row, k in zip(conf.tolist(), ks)]
        return Proposal(draft_ids=ids, draft_probs=probs_out, elapsed_s=time.perf_counter() - t0,
                        draft_conf=confs)

    def free(self, req_ids: list[str]) -> None:
        self.runner.free(req_ids)


class _Stopping:
    """DraftStop applied to one proposal: each row's reach so far, and which rows draft on."""

    def __init__(self, stop: DraftStop, items, greedy: torch.Tensor) -> None:
        dev = greedy.device
        sampled = (~greedy).long()
        self.rates = torch.tensor(stop.rates, dtype=torch.float32, device=dev)[sampled]  # [n, bins]
        self.next_rate = torch.tensor(stop.next_rate, dtype=torch.float32, device=dev)[sampled]
        self.may_stop = torch.tensor([it.may_stop for it in items], device=dev)
        self.reach = torch.ones(len(items), device=dev)
        self.stopped_at = torch.full((len(items),), -1, dtype=torch.long, device=dev)  # last position drafted
        self.row_cost, self.pass_cost = stop.row_cost, stop.pass_cost

    def drafting_on(self, active: torch.Tensor, j: int, conf: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
        """Of the `active` rows, which draft position j + 1 (0-based); `conf` their confidences
        at position j, just drafted, `wanted` whether their k asks for another."""
        bins = (conf.float() * CONFIDENCE_BINS).long().clamp(0, CONFIDENCE_BINS - 1)
        self.reach[active] *= self.rates[active, bins]
        value = self.reach[active] * self.next_rate[active]  # tokens the next position is expected to add
        may = self.may_stop[active]
        keep = wanted & (~may | (value >= self.row_cost))
        if not bool((wanted & ~may).any()):  # no row pays for the pass regardless: its rows share it
            # Each round only drops rows (the share of those left grows): at most one round per row.
            while bool(keep.any()):
                narrower = keep & (value >= self.row_cost + self.pass_cost / int(keep.sum()))
                if bool((narrower == keep).all()):
                    break
                keep = narrower
        self.stopped_at[active[wanted & ~keep]] = j
        return keep

    def drafted(self, num_draft: torch.Tensor) -> torch.Tensor:
        """Tokens each row drafted: its k, or fewer where it stopped."""
        return torch.where(self.stopped_at >= 0, self.stopped_at + 1, num_draft)
