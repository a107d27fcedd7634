"""TargetWorker: scores every request's new tokens and draft tokens in one forward, then verifies."""

from __future__ import annotations

import time

import torch

from goodspec.workers.messages import VerifyBatch, VerifyResult
from goodspec.gguf_import import model_path
from goodspec.workers.model_runner import ModelRunner, RunnerConfig, VocabMap
from goodspec.workers.rejection import greedy_verify, rejection_sample
from goodspec.workers.sampling import STREAM_ACCEPT, STREAM_TARGET, hash_uniform, logits_to_probs
from goodspec.workers.sampling_tensors import SamplingTensors


class TargetWorker:
    def __init__(self, config: RunnerConfig, draft_dir: str | None = None) -> None:
        """`draft_dir`: the draft whose proposals this target verifies. A draft over a reduced
        vocabulary sends its distributions q over its own tokens (8192 floats a token instead of
        49152 for SmolLM2's pair); its vocab_map.json says which target token each column is."""
        self.runner = ModelRunner(config)
        self.draft_vocab = VocabMap.load(model_path(draft_dir), self.runner.device) if draft_dir else None

    def verify(self, batch: VerifyBatch) -> VerifyResult:
        """One forward over all items (prompt chunks, plain decodes and k_i + 1 verification
        positions alike); the emitting items then go through the rejection sampler together.
        Afterwards each cache holds exactly the request's committed tokens minus the newest."""
        t0 = time.perf_counter()
        items = batch.items
        if not items:
            return VerifyResult(num_accepted=[], output_ids=[])
        for it in items:
            if it.draft_ids and not it.sample:
                raise ValueError(f"request {it.req_id!r}: draft tokens need sample=True")
        q = batch.proposal.draft_probs if batch.proposal is not None else None
        if q is not None and self.draft_vocab is not None and q.shape[-1] != len(self.draft_vocab.target_ids):
            # refused before the forward, so no request's cache has moved
            raise ValueError(f"draft probabilities have {q.shape[-1]} columns; the draft's vocabulary has "
                             f"{len(self.draft_vocab.target_ids)} tokens")
        num_logits = [len(it.draft_ids) + 1 if it.sample else 0 for it in items]
        logits, hidden = self.runner.run(
            [it.req_id for it in items],
            [it.start_pos for it in items],
            [it.token_ids + it.draft_ids for it in items],
            num_logits,
            all_hidden=batch.want_features, layers=batch.feature_layers,
        )  # [sum(num_logits), vocab]

        emit = [i for i, it in enumerate(items) if it.sample]
        num_accepted = [0] * len(items)
        output_ids: list[list[int]] = [[] for _ in items]
        if emit:
            acc, out = self._accept(batch, emit, logits)
            for row, i in enumerate(emit):
                it = items[i]
                a = int(acc[row])
                num_accepted[i] = a
                output_ids[i] = out[row][: a + 1]
                # Forget the rejected draft tokens now: keep the committed tokens only.
                self.runner.truncate(it.req_id, it.start_pos + len(it.token_ids) + a)
        features = self._committed_rows(items, num_accepted, hidden) if batch.want_features else None
        self.runner.synchronize()
        return VerifyResult(num_accepted, output_ids, elapsed_s=time.perf_counter() - t0, features=features)

    @staticmethod
    def _committed_rows(items, num_accepted: list[int], hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states of each item's committed tokens (its new tokens and accepted
        drafts; rejected drafts' rows dropped), in bfloat16: half the bytes on the wire, and the
        draft was trained on bfloat16 features."""
        fed = torch.tensor([len(it.token_ids) + len(it.draft_ids) for it in items])
        kept = torch.tensor([len(it.token_ids) + a for it, a in zip(items, num_accepted)])
        first = torch.cumsum(fed, 0) - fed
        row_of = torch.repeat_interleave(torch.arange(len(items)), kept)
        offset = torch.arange(int(kept.sum())) - (torch.cumsum(kept, 0) - kept)[row_of]
        return hidden[(first[row_of] + offset).to(hidden.device)].to(torch.bfloat16).cpu()

    def _accept(self, batch: VerifyBatch, emit: list[int], logits: torch.Tensor):
        """(num_accepted, output ids) per emitting item. Greedy rows are compared by argmax and
        only sampled rows go through the rejection sampler's [rows, max_k + 1, vocab] tensors:
        together, one sampled request in a batch made every row build them (a row's result
        depends on its own logits, draft and seed only, so the split changes no output)."""
        items = [batch.items[i] for i in emit]
        sizes = torch.tensor([len(it.draft_ids) + 1 for it in items])
        first = (torch.cumsum(sizes, 0) - sizes).tolist()  # each item's first row in `logits`
        num_accepted: list[int] = [0] * len(items)
        output_ids: list[list[int]] = [[] for _ in items]
        greedy = [it.sampling.temperature <= 0 for it in items]
        for want_greedy in (True, False):
            rows = [r for r, g in enumerate(greedy) if g == want_greedy]
            if rows:
                accept = self._accept_greedy if want_greedy else self._accept_sampled
                acc, out = accept(batch, [items[r] for r in rows], [first[r] for r in rows], logits)
                for r, a, o in zip(rows, acc, out):
                    num_accepted[r], output_ids[r] = a, o
        return num_accepted, output_ids

    @staticmethod
    def _slots(items, first: list[int], logits: torch.Tensor):
        """[rows, max_k + 1] flat logits row of each slot (padding slots repeat a valid row and are
        never read past num_accepted <= num_draft), the draft ids padded to max_k, and k per row."""
        num_draft = torch.tensor([len(it.draft_ids) for it in items])
        max_k = int(num_draft.max())
        slot = torch.arange(max_k + 1)
        index = torch.tensor(first)[:, None] + torch.minimum(slot[None, :], num_draft[:, None])
        draft_ids = torch.tensor([it.draft_ids + [0] * (max_k - len(it.draft_ids)) for it in items],
                                 dtype=torch.long).view(len(items), max_k).to(logits.device)
        return index.to(logits.device), draft_ids, num_draft.to(logits.device), max_k

    def _accept_greedy(self, batch: VerifyBatch, items, first: list[int], logits: torch.Tensor):
        index, draft_ids, num_draft, _ = self._slots(items, first, logits)
        # argmax first, then the slots: gathering [rows, max_k + 1, vocab] logits to take their
        # argmax copied up to 57 MB a step at batch 32 (32 x 9 x 49152 floats; 21 ms of a 190 ms
        # goodput step under cProfile).
        num_accepted, out = greedy_verify(logits.argmax(-1)[index], draft_ids, num_draft)
        return num_accepted.tolist(), out.tolist()

    def _accept_sampled(self, batch: VerifyBatch, items, first: list[int], logits: torch.Tensor):
        index, draft_ids, num_draft, max_k = self._slots(items, first, logits)
        num_rows = len(items)
        vocab = logits.shape[-1]
        slot = torch.arange(max_k + 1)
        params = SamplingTensors.from_params([it.sampling for it in items])
        dev = logits.device
        per_slot = params.expand(max_k + 1)
        target_probs = logits_to_probs(
            logits[index], *(t.to(dev) for t in (per_slot.temperature, per_slot.top_k, per_slot.top_p)),
        )  # [rows, max_k + 1, vocab]

        # q: the draft model's rows where it kept them, else the one-hot of the proposed token
        # (a greedy draft token, or prompt lookup's: its rows follow the model's).
        draft_probs = torch.zeros(num_rows, max_k, vocab, device=dev).scatter_(
            -1, draft_ids.unsqueeze(-1), 1.0
        )
        proposal = batch.proposal
        if proposal is not None and proposal.draft_probs is not None and max_k > 0:
            q_all = proposal.draft_probs
            rows = [r for r, it in enumerate(items) if 0 <= it.proposal_row < q_all.shape[0] and len(it.draft_ids)]
            if rows:
                q = q_all[torch.tensor([items[r].proposal_row for r in rows])].to(dev)
                width = min(max_k, q.shape[1])
                if self.draft_vocab is not None:  # q over the draft's own tokens
                    block = self.draft_vocab.to_target(q[:, :width], 0.0)
                else:
                    # A draft whose model vocab is padded differently: the ids past the shared
                    # tokenizer carry (near) zero mass in both models.
                    v = min(vocab, q.shape[2])
                    block = torch.zeros(len(rows), width, vocab, device=dev)
                    block[:, :, :v] = q[:, :width, :v]
                draft_probs[rows, :width] = block

        base = torch.tensor([it.start_pos + len(it.token_ids) for it in items])
        pos = (base[:, None] + slot[None, :]).to(dev)  # position of each slot's token
        seeds = params.seeds[:, None].to(dev)
        u_accept = hash_uniform(seeds, pos[:, :max_k], STREAM_ACCEPT)
        u_sample = hash_uniform(seeds, pos, STREAM_TARGET)
        num_accepted, out = rejection_sample(
            target_probs, draft_probs, draft_ids, num_draft, u_accept, u_sample
        )
        return num_accepted.tolist(), out.tolist()

    def free(self, req_ids: list[str]) -> None:
        self.runner.free(req_ids)
