"""The verifier's math against exactly computed distributions."""

import torch

from goodspec.workers.rejection import rejection_sample
from goodspec.workers.sampling import hash_uniform, logits_to_probs, sample_from_probs

V = 5


def _dist(*w):
    t = torch.tensor(w, dtype=torch.float64)
    return (t / t.sum()).float()


P0 = _dist(0.40, 0.25, 0.20, 0.10, 0.05)  # target at the first draft position
Q0 = _dist(0.10, 0.50, 0.05, 0.30, 0.05)  # draft at the first position: deliberately unlike P0
# Second position, conditioned on the first token x (row x).
P1 = torch.stack([_dist(*torch.roll(torch.tensor([5.0, 3, 1, 1, 0.5]), x).tolist()) for x in range(V)])
Q1 = torch.stack([_dist(*torch.roll(torch.tensor([1.0, 1, 4, 2, 2]), x).tolist()) for x in range(V)])
P2 = _dist(1, 1, 1, 1, 1)


def _grid(n):
    return (torch.arange(n, dtype=torch.float64) + 0.5).div(n).float()


def _first_token_law(n=512):
    """The law of the first emitted token (k = 1), integrated over every draft token and both
    uniforms on an n x n midpoint grid: exact up to 1/n."""
    ua, us = torch.meshgrid(_grid(n), _grid(n), indexing="ij")
    m = ua.numel()
    law = torch.zeros(V, dtype=torch.float64)
    p_accept = 0.0
    for d in range(V):
        acc, out = rejection_sample(
            torch.stack([P0, P2]).expand(m, 2, V), Q0.view(1, 1, V).expand(m, 1, V),
            torch.full((m, 1), d), torch.ones(m, dtype=torch.long), ua.reshape(m, 1),
            us.reshape(m, 1).expand(m, 2).contiguous(),
        )
        w = float(Q0[d]) / m
        law.index_add_(0, out[:, 0], torch.full((m,), w, dtype=torch.float64))
        p_accept += w * int(acc.sum())
    return law, p_accept


def test_first_token_follows_target_exactly():
    law, _ = _first_token_law()
    assert torch.allclose(law, P0.double(), atol=3e-3), (law, P0)


def test_acceptance_probability_is_sum_of_min_p_q():
    _, p_accept = _first_token_law()
    assert abs(p_accept - float(torch.minimum(P0, Q0).sum())) < 3e-3


def test_second_token_given_first_follows_target():
    """k = 2 by simulation: given the first draft token was accepted as x, the second emitted
    token must follow P1[x] (chi-square, p = 0.001)."""
    from scipy.stats import chisquare

    g = torch.Generator().manual_seed(0)
    n = 200_000
    d0 = torch.multinomial(Q0, n, replacement=True, generator=g)
    d1 = torch.multinomial(Q1[d0], 1, generator=g).squeeze(1)
    acc, out = rejection_sample(
        torch.stack([P0.expand(n, V), P1[d0], P2.expand(n, V)], 1),
        torch.stack([Q0.expand(n, V), Q1[d0]], 1), torch.stack([d0, d1], 1),
        torch.full((n,), 2), torch.rand(n, 2, generator=g), torch.rand(n, 3, generator=g),
    )
    for x in range(V):
        sel = (acc >= 1) & (out[:, 0] == x)
        counts = torch.bincount(out[sel, 1], minlength=V).double()
        assert counts.sum() > 1000
        expected = P1[x].double() / P1[x].double().sum() * counts.sum()
        assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3, (x, counts, expected)


def test_greedy_rows_accept_iff_argmax_matches_and_emit_argmax():
    target = torch.zeros(1, 4, V)
    target[0, 0, 2] = target[0, 1, 4] = target[0, 2, 1] = target[0, 3, 0] = 1.0
    draft_ids = torch.tensor([[2, 4, 3]])  # third draft token disagrees with the target's 1
    draft = torch.zeros(1, 3, V).scatter_(-1, draft_ids.unsqueeze(-1), 1.0)
    acc, out = rejection_sample(target, draft, draft_ids, torch.tensor([3]),
                                torch.full((1, 3), 0.999), torch.full((1, 4), 0.5))
    assert acc.tolist() == [2] and out.tolist() == [[2, 4, 1, -1]]
    # All accepted: the bonus token is the target's argmax at the last position.
    draft_ids = torch.tensor([[2, 4, 1]])
    draft = torch.zeros(1, 3, V).scatter_(-1, draft_ids.unsqueeze(-1), 1.0)
    acc, out = rejection_sample(target, draft, draft_ids, torch.tensor([3]),
                                torch.full((1, 3), 0.0), torch.full((1, 4), 0.5))
    assert acc.tolist() == [3] and out.tolist() == [[2, 4, 1, 0]]


def test_rows_with_different_k_and_no_drafts_share_one_call():
    target = torch.stack([P0, P1[0], P2]).expand(3, 3, V).contiguous()
    draft = torch.stack([Q0, Q1[0]]).expand(3, 2, V).contiguous()
    draft_ids = torch.tensor([[0, 0], [0, 0], [0, 0]])
    acc, out = rejection_sample(target, draft, draft_ids, torch.tensor([0, 1, 2]),
                                torch.zeros(3, 2), torch.full((3, 3), 0.5))
    assert acc.tolist() == [0, 1, 2]  # u = 0 accepts every real draft token
    assert out[0, 1:].tolist() == [-1, -1] and out[1, 2].item() == -1


def test_top_k_top_p_and_temperature_shape_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]] * 4))
    probs = logits_to_probs(logits, torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([2, 0, 0, 0]),
                            torch.tensor([1.0, 0.85, 1.0, 1.0]))
    assert torch.allclose(probs[0], torch.tensor([0.625, 0.375, 0, 0, 0]), atol=1e-6)
    assert torch.allclose(probs[1], torch.tensor([0.5, 0.3, 0.1, 0, 0]) / 0.9, atol=1e-6)
    assert torch.allclose(probs[2], torch.exp(logits[2]), atol=1e-6)
    assert probs[3].tolist() == [1.0, 0, 0, 0, 0]


def test_hash_uniforms_are_uniform_and_reproducible():
    seeds = torch.arange(200).repeat_interleave(500)
    pos = torch.arange(500).repeat(200)
    u = hash_uniform(seeds, pos, 1)
    assert torch.equal(u, hash_uniform(seeds, pos, 1))
    assert not torch.equal(u, hash_uniform(seeds, pos, 2))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    hist = torch.histc(u, bins=20, min=0, max=1)
    expected = u.numel() / 20
    chi2 = float(((hist - expected) ** 2 / expected).sum())
    assert chi2 < 45.3  # chi-square, 19 degrees of freedom, p = 0.001


def test_inverse_cdf_sampling_never_picks_zero_probability_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(1000, 5)
    tokens = sample_from_probs(probs, _grid(1000))
    assert set(tokens.tolist()) == {1, 3}
    assert (tokens == 1).sum().item() == 500


def test_greedy_verify_equals_rejection_sample_on_one_hot_rows():
    """The verifier's greedy fast path must emit exactly what the general sampler emits for
    one-hot p and q, for every mix of agreeing and disagreeing drafts and of k_i."""
    from goodspec.workers.rejection import greedy_verify

    gen = torch.Generator().manual_seed(0)
    rows, max_k, vocab = 64, 4, 3  # a small vocab makes agreement frequent
    target_ids = torch.randint(0, vocab, (rows, max_k + 1), generator=gen)
    draft_ids = torch.randint(0, vocab, (rows, max_k), generator=gen)
    num_draft = torch.randint(0, max_k + 1, (rows,), generator=gen)
    p = torch.nn.functional.one_hot(target_ids, vocab).float()
    q = torch.nn.functional.one_hot(draft_ids, vocab).float()
    u_a, u_s = torch.rand(rows, max_k, generator=gen), torch.rand(rows, max_k + 1, generator=gen)
    want_acc, want_out = rejection_sample(p, q, draft_ids, num_draft, u_a, u_s)
    got_acc, got_out = greedy_verify(target_ids, draft_ids, num_draft)
    assert torch.equal(got_acc, want_acc)
    assert torch.equal(got_out, want_out)
    assert 0 < int((got_acc > 0).sum()) < rows  # both outcomes were exercised
