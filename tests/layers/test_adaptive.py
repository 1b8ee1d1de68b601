"""Adaptive input and adaptive softmax: exact log-probabilities, the one-cluster case, tying, initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmtool.layers.adaptive import AdaptiveEmbedding, AdaptiveLogSoftmax

V, D = 23, 8
LAYOUTS = [((), 1), ((5,), 1), ((5, 12), 1), ((5, 12), 2), ((3, 9, 20), 2)]
IDS = [f"cut{'-'.join(map(str, c)) or 'none'}-div{d}" for c, d in LAYOUTS]


def make(cutoffs, div_val, seed=0):
    torch.manual_seed(seed)
    emb = AdaptiveEmbedding(V, D, cutoffs, div_val).double()
    out = AdaptiveLogSoftmax(V, D, cutoffs, div_val).double()
    for p in [*emb.parameters(), *out.parameters()]:  # non-zero biases and large weights: every term matters
        torch.nn.init.normal_(p, 0.0, 0.5)
    return emb, out


def test_one_cluster_equals_full_softmax():
    """Without cutoffs and with div_val 1 the NLL and its gradients equal cross-entropy over h W^T + b."""
    _, out = make((), 1)
    h = torch.randn(11, D, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, V, (11,))
    weight, bias = out.weights[0], out.bias
    nll = out(h, target)
    full = F.cross_entropy(F.linear(h, weight, bias), target, reduction="none")
    torch.testing.assert_close(nll, full)
    torch.testing.assert_close(out.log_prob(h), F.log_softmax(F.linear(h, weight, bias), -1))
    g = torch.randn(11, dtype=torch.float64)
    grads = torch.autograd.grad(nll, (h, weight, bias), g)
    full_grads = torch.autograd.grad(full, (h, weight, bias), g)
    for a, b in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cutoffs,div_val", LAYOUTS, ids=IDS)
def test_log_probs_are_a_distribution_and_match_the_nll(cutoffs, div_val):
    """exp(log_prob) sums to one over the vocabulary, and forward's NLL picks -log_prob of the target."""
    _, out = make(cutoffs, div_val)
    h = torch.randn(40, D, dtype=torch.float64)
    target = torch.arange(40) % V  # every cluster present
    log_prob = out.log_prob(h)
    assert log_prob.shape == (40, V)
    torch.testing.assert_close(log_prob.exp().sum(-1), torch.ones(40, dtype=torch.float64))
    torch.testing.assert_close(out(h, target), -log_prob.gather(1, target[:, None]).squeeze(1))


def test_tail_log_prob_is_cluster_prob_times_within_cluster_prob():
    """A tail token's log-probability is log p(cluster) from the head plus log p(token | cluster)."""
    _, out = make((5, 12), 2)
    h = torch.randn(3, D, dtype=torch.float64)
    head = F.log_softmax(F.linear(h @ out.projs[0], torch.cat([out.weights[0], out.cluster_weight]),
                                  torch.cat([out.bias[:5], out.cluster_bias])), -1)
    tail = F.log_softmax(F.linear(h @ out.projs[2], out.weights[2], out.bias[12:]), -1)
    torch.testing.assert_close(out.log_prob(h)[:, 12:], head[:, 6:7] + tail)


@pytest.mark.parametrize("cutoffs,div_val", LAYOUTS, ids=IDS)
def test_adaptive_embedding_matches_per_token_lookup(cutoffs, div_val):
    """Each token is its cluster's row projected to d_model (no projection with div_val 1)."""
    emb, _ = make(cutoffs, div_val)
    inp = torch.randint(0, V, (3, 7))
    out = emb(inp)
    bounds = [0, *cutoffs, V]
    for t, row in zip(inp.flatten().tolist(), out.reshape(-1, D), strict=True):
        i = max(c for c in range(len(bounds) - 1) if bounds[c] <= t)
        w = emb.weight(i)[t - bounds[i]]
        torch.testing.assert_close(row, w if div_val == 1 else emb.projs[i] @ w)
    assert [w.shape[1] for w in emb.weights] == [D // div_val**i for i in range(len(emb.weights))]


def test_tying_shares_tables_and_tail_projections():
    """tie() shares every table and the tail projections; the head projection stays the softmax's own."""
    emb, out = make((5, 12), 2)
    out.tie(emb, weights=True, projs=True)
    assert all(a is b for a, b in zip(out.weights, emb.weights, strict=True))
    assert out.projs[1] is emb.projs[1] and out.projs[2] is emb.projs[2] and out.projs[0] is not emb.projs[0]
    loose_emb, loose = make((5, 12), 2)
    loose.tie(loose_emb, weights=False, projs=False)
    assert not {id(p) for p in loose.parameters()} & {id(p) for p in loose_emb.parameters()}


def test_initialisation_and_bad_cutoffs():
    """Tables are N(0, 0.02), projections N(0, 0.01), biases zero; cutoffs must increase inside the vocabulary."""
    out = AdaptiveLogSoftmax(2000, 64, [500, 1000], 2)
    assert out.weights[0].std().item() == pytest.approx(0.02, rel=0.1)
    assert out.projs[1].std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.count_nonzero(out.bias) == 0 and torch.count_nonzero(out.cluster_bias) == 0
    for bad in ([10, 5], [0, 5], [5, V]):
        with pytest.raises(ValueError, match="cutoffs"):
            AdaptiveEmbedding(V, D, bad)
