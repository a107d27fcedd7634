"""Lossless verification of draft tokens (Leviathan et al. 2023; Chen et al. 2023).

Words used throughout goodspec:
- *draft tokens*: the k tokens the draft model proposed for a request in one step;
- *accepted*: the leading draft tokens the target keeps; draft token j is accepted with
  probability min(1, p_j(d_j) / q_j(d_j)), p the target's and q the draft's distribution;
- *recovered*: at the first rejection, a token drawn from normalise(max(0, p - q)) replaces it;
- *bonus*: when all k are accepted, one more token is drawn from the target's p_{k+1}.
Each verification therefore emits num_accepted + 1 tokens, distributed exactly as the target.

Greedy rows need no special case: their p and q are one-hot argmax distributions, so a draft token
is accepted iff it equals the target's argmax, and the recovered or bonus token is that argmax.
"""

from __future__ import annotations

import torch

from goodspec.workers.sampling import sample_from_probs


def rejection_sample(
    target_probs: torch.Tensor,  # [num_reqs, max_k + 1, vocab]
    draft_probs: torch.Tensor,  # [num_reqs, max_k, vocab]
    draft_ids: torch.Tensor,  # [num_reqs, max_k] int64, padding anything >= 0
    num_draft: torch.Tensor,  # [num_reqs] int64, k_i <= max_k
    u_accept: torch.Tensor,  # [num_reqs, max_k] uniforms for the accept tests
    u_sample: torch.Tensor,  # [num_reqs, max_k + 1] uniforms for the recovered / bonus draw
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (num_accepted [num_reqs], output_ids [num_reqs, max_k + 1]); row i's emitted tokens
    are output_ids[i, : num_accepted[i] + 1]; entries after them are -1."""
    num_reqs, max_k = draft_ids.shape
    rows = torch.arange(num_reqs, device=target_probs.device)
    slot = torch.arange(max_k, device=target_probs.device)
    is_draft = slot[None, :] < num_draft[:, None]  # [num_reqs, max_k]

    ids = draft_ids.clamp(min=0).unsqueeze(-1)
    p_d = target_probs[:, :max_k].gather(-1, ids).squeeze(-1)  # [num_reqs, max_k]
    q_d = draft_probs.gather(-1, ids).squeeze(-1)
    # u < p/q, written without the division so q_d = 0 cannot produce NaN.
    accepted = (u_accept * q_d < p_d) & is_draft
    num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)  # [num_reqs]

    p_next = target_probs[rows, num_accepted]  # [num_reqs, vocab]
    rejected = num_accepted < num_draft
    if max_k > 0:
        q_next = draft_probs[rows, num_accepted.clamp(max=max_k - 1)]
        residual = (p_next - q_next * rejected[:, None]).clamp_(min=0)
        # p == q up to rounding would make the residual empty; that row is then sampled from p.
        empty = residual.sum(-1, keepdim=True) <= 0
        dist = torch.where(empty, p_next, residual)
    else:
        dist = p_next
    new_token = sample_from_probs(dist, u_sample[rows, num_accepted])  # [num_reqs]

    out = torch.full((num_reqs, max_k + 1), -1, dtype=torch.long, device=target_probs.device)
    out[:, :max_k] = torch.where(accepted.long().cumprod(dim=1).bool(), draft_ids, -1)
    out[rows, num_accepted] = new_token
    return num_accepted, out


def greedy_verify(
    target_ids: torch.Tensor,  # [num_reqs, max_k + 1] the target's argmax at each slot
    draft_ids: torch.Tensor,  # [num_reqs, max_k]
    num_draft: torch.Tensor,  # [num_reqs]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rejection_sample` for rows whose p and q are both one-hot (greedy), without building any
    [.., vocab] tensor: a draft token is accepted iff it is the target's argmax, and every emitted
    token (accepted, recovered or bonus) is the target's argmax at its slot. Same outputs."""
    max_k = draft_ids.shape[1]
    slot = torch.arange(max_k + 1, device=target_ids.device)
    match = (draft_ids == target_ids[:, :max_k]) & (slot[None, :max_k] < num_draft[:, None])
    num_accepted = match.long().cumprod(dim=1).sum(dim=1)
    out = target_ids.masked_fill(slot[None, :] > num_accepted[:, None], -1)
    return num_accepted, out
