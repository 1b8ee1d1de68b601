"""Adaptive input embeddings (Baevski & Auli 2019) and the adaptive softmax (Grave et al. 2017).

The vocabulary, sorted by frequency, is split by `cutoffs` into clusters [0, c_1), [c_1, c_2), ..., [c_n, V).
Cluster i has embedding width d_i = d_model // div_val**i. With div_val = 1 every cluster is a slice of one
`[V, d_model]` table and there are no projections; with div_val > 1 each cluster has its own `[V_i, d_i]` table
and a `[d_model, d_i]` projection (cluster 0 too, as in the Transformer-XL code that the original toolkit builds on).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn


def cluster_bounds(vocab_size: int, cutoffs: Sequence[int]) -> list[int]:
    """`[0, c_1, ..., c_n, V]`; raises ValueError unless 0 < c_1 < ... < c_n < V."""
    bounds = [0, *cutoffs, vocab_size]
    if any(a >= b for a, b in pairwise(bounds)):
        raise ValueError(
            f"adaptive cutoffs {list(cutoffs)} must increase strictly between 0 and the vocabulary size "
            f"{vocab_size}: lower model.cutoffs"
        )
    return bounds


class _Clusters(nn.Module):
    """The per-cluster tables and projections shared in layout by the adaptive input and softmax."""

    def __init__(self, vocab_size: int, d_model: int, cutoffs: Sequence[int], div_val: int) -> None:
        super().__init__()
        if div_val < 1 or d_model // div_val ** len(cutoffs) < 1:
            raise ValueError(f"div_val={div_val} leaves an empty embedding for {len(cutoffs) + 1} clusters")
        self.vocab_size, self.d_model, self.div_val = vocab_size, d_model, div_val
        self.bounds = cluster_bounds(vocab_size, cutoffs)
        self.n_clusters = len(self.bounds) - 1
        self.dims = [d_model // div_val**i for i in range(self.n_clusters)]
        if div_val == 1:  # one table; cluster i is a slice of its rows
            shapes = [(vocab_size, d_model)]
        else:
            shapes = [(b - a, d) for (a, b), d in zip(pairwise(self.bounds), self.dims, strict=True)]
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(shape)) for shape in shapes)
        projs = [] if div_val == 1 else [nn.Parameter(torch.empty(d_model, d)) for d in self.dims]
        self.projs = nn.ParameterList(projs)

    def weight(self, i: int) -> torch.Tensor:
        """`[V_i, d_i]`: the rows of cluster i."""
        if self.div_val == 1:
            return self.weights[0][self.bounds[i] : self.bounds[i + 1]]
        return self.weights[i]

    def proj(self, i: int) -> torch.Tensor | None:
        """`[d_model, d_i]` projection of cluster i, or None (div_val = 1)."""
        return self.projs[i] if self.div_val > 1 else None

    def init_parameters(self, init_std: float = 0.02, proj_init_std: float = 0.01) -> None:
        for w in self.weights:
            nn.init.normal_(w, 0.0, init_std)
        for p in self.projs:
            nn.init.normal_(p, 0.0, proj_init_std)

    def extra_repr(self) -> str:
        return f"bounds={self.bounds}, dims={self.dims}"


class AdaptiveEmbedding(_Clusters):
    """Adaptive input: token ids `[...]` -> `[..., d_model]`, each cluster's embedding projected to d_model.

    Unscaled (the model multiplies by sqrt(d_model)). Tables N(0, init_std), projections N(0, proj_init_std).
    """

    def __init__(self, vocab_size: int, d_model: int, cutoffs: Sequence[int] = (), div_val: int = 1) -> None:
        super().__init__(vocab_size, d_model, cutoffs, div_val)
        self.init_parameters()

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        if self.div_val == 1:
            return F.embedding(inp, self.weights[0])
        flat = inp.reshape(-1)
        out = self.weights[0].new_zeros(flat.numel(), self.d_model)
        for i in range(self.n_clusters):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            idx = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            if idx.numel():
                emb = F.linear(F.embedding(flat[idx] - lo, self.weight(i)), self.proj(i))
                out.index_copy_(0, idx, emb.to(out.dtype))
        return out.view(*inp.shape, self.d_model)


class AdaptiveLogSoftmax(_Clusters):
    """Adaptive softmax over hidden states `[N, d_model]`, with exact log-probabilities.

    The head is a softmax over the shortlist (cluster 0) plus one logit per tail cluster; a token of tail
    cluster i has log p = log p_head(cluster i) + log p_i(token | cluster i), the second term a softmax over
    cluster i only. Logits of cluster i: (h P_i) W_i^T + b_i, with P_i the cluster's projection (none when
    div_val = 1), W_i its table and b_i its slice of the one output bias `[V]`. The head's cluster rows
    `cluster_weight [n_clusters - 1, d_model]` and `cluster_bias` are in cluster 0's space.

    `tie(embedding, weights, projs)` shares the tables (tie_weight) and the tail projections (tie_projs; the
    head projection stays separate, as in Transformer-XL) with an AdaptiveEmbedding of the same layout.
    Softmax arithmetic runs in at least float32. With one cluster (no cutoffs, div_val 1) this is exactly
    the full softmax with weight `weights[0]` and bias `bias`.
    """

    def __init__(self, vocab_size: int, d_model: int, cutoffs: Sequence[int] = (), div_val: int = 1) -> None:
        super().__init__(vocab_size, d_model, cutoffs, div_val)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.cluster_weight = nn.Parameter(torch.empty(self.n_clusters - 1, d_model))
        self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters - 1))
        self.init_parameters()

    def init_parameters(self, init_std: float = 0.02, proj_init_std: float = 0.01) -> None:
        super().init_parameters(init_std, proj_init_std)
        nn.init.zeros_(self.bias)
        nn.init.normal_(self.cluster_weight, 0.0, init_std)
        nn.init.zeros_(self.cluster_bias)

    def tie(self, embedding: AdaptiveEmbedding, *, weights: bool, projs: bool) -> None:
        """Share the tables (`weights`) and the tail projections (`projs`) with `embedding`."""
        if (embedding.bounds, embedding.dims) != (self.bounds, self.dims):
            raise ValueError("the adaptive softmax and the adaptive embedding must have the same clusters")
        if weights:
            for i, w in enumerate(embedding.weights):
                self.weights[i] = w
        if projs and self.div_val > 1:
            for i in range(1, self.n_clusters):
                self.projs[i] = embedding.projs[i]

    def _logits(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """Logits `[N, V_i]` of cluster i; for i = 0 the head, with the cluster logits appended."""
        lo, hi = self.bounds[i], self.bounds[i + 1]
        weight, bias = self.weight(i), self.bias[lo:hi]
        if i == 0:
            weight = torch.cat([weight, self.cluster_weight], dim=0)
            bias = torch.cat([bias, self.cluster_bias], dim=0)
        proj = self.proj(i)
        if proj is not None:
            h = F.linear(h, proj.t())
        logits = F.linear(h, weight, bias)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def log_prob(self, h: torch.Tensor) -> torch.Tensor:
        """Log-probabilities `[N, V]` of every token (they sum to one in probability over the vocabulary)."""
        head = F.log_softmax(self._logits(h, 0), dim=-1)
        shortlist = self.bounds[1]
        parts = [head[:, :shortlist]]
        for i in range(1, self.n_clusters):
            parts.append(head[:, shortlist + i - 1, None] + F.log_softmax(self._logits(h, i), dim=-1))
        return torch.cat(parts, dim=-1)

    def forward(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood `[N]` of `target [N]` given `h [N, d_model]`; a tail cluster's softmax is
        computed only for the tokens whose target falls in it."""
        head = F.log_softmax(self._logits(h, 0), dim=-1)
        shortlist = self.bounds[1]
        in_head = target < shortlist
        logp = head.gather(1, torch.where(in_head, target, 0)[:, None]).squeeze(1)
        logp = logp.masked_fill(~in_head, 0.0)
        for i in range(1, self.n_clusters):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            idx = ((target >= lo) & (target < hi)).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            tail = F.log_softmax(self._logits(h[idx], i), dim=-1)
            tail_logp = tail.gather(1, (target[idx] - lo)[:, None]).squeeze(1) + head[idx, shortlist + i - 1]
            logp = logp.index_put((idx,), tail_logp)
        return -logp
