"""The one-layer memory of the synthetic retrieval task (arXiv 2102.11174, section 6.1): no Transformer stack.

Pair i writes with the key  k_i = W_K [e(key_i); onehot(value_i)]  (e: learned key embedding of width about
1.1 * 2 S) and the fixed one-hot value vector; after all pairs, the query q = W_Q e(query) reads one
vector of size S. The memory is named by a string:

  "softmax"            softmax attention over the L pairs (the reference with unbounded capacity);
  "sum/<map>"          the sum rule (linear attention), by default with attention normalisation (sec. 3.2);
  "delta/<map>"        the delta rule with beta = sigmoid(W_beta [e(key); onehot(value)]), by default with
                       sum-normalised keys and queries and no attention normalisation (sec. 4.2);
  <map> = elu | relu | identity | dpfp<nu> | favor<m>   e.g. "sum/dpfp2" (nu = 2), "sum/favor64" (m = 64).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from lmtool.layers.fast_weight import normalize_features
from lmtool.layers.feature_maps import FEATURE_MAPS, make_feature_map

_MEMORY = re.compile(r"^(sum|delta)/([a-z]+)(\d*)$")


def parse_memory(name: str) -> tuple[str, str, int | None]:
    """`"delta/dpfp2"` -> `("delta", "dpfp", 2)`; `"softmax"` -> `("softmax", "", None)`."""
    if name == "softmax":
        return "softmax", "", None
    match = _MEMORY.match(name)
    if match is None or match.group(2) not in FEATURE_MAPS:
        raise ValueError(
            f"unknown retrieval memory {name!r}; use softmax or <sum|delta>/<map>, map one of "
            f"{', '.join(FEATURE_MAPS)} (dpfp<nu>, favor<m> take a number, e.g. sum/dpfp2)"
        )
    number = int(match.group(3)) if match.group(3) else None
    if number is not None and match.group(2) not in ("dpfp", "favor"):
        raise ValueError(f"retrieval memory {name!r}: only dpfp<nu> and favor<m> take a number")
    return match.group(1), match.group(2), number


class RetrievalMemory(nn.Module):
    """Write L (key, value) pairs, read with Q query keys: `forward(keys [B, L], values [B, L],
    queries [B, Q]) -> [B, Q, n_symbols]` (the retrieved value vectors)."""

    def __init__(
        self,
        n_symbols: int,
        memory: str = "sum/elu",
        *,
        d_key: int = 64,
        embedding_factor: float = 1.1,
        qk_norm: str | None = None,
        attn_norm: bool | None = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.rule, map_name, number = parse_memory(memory)
        self.n_symbols, self.d_key, self.eps = n_symbols, d_key, eps
        d_emb = max(1, round(embedding_factor * 2 * n_symbols))
        self.embedding = nn.Embedding(n_symbols, d_emb)
        n_write = d_key + (self.rule == "delta")  # key (+ beta logit)
        self.write = nn.Linear(d_emb + n_symbols, n_write, bias=False)  # acts on [e(key); onehot(value)]
        self.query = nn.Linear(d_emb, d_key, bias=False)
        self.feature_map = None
        if self.rule != "softmax":
            sizes = {} if number is None else {"nu": number, "n_features": number}  # dpfp reads nu, favor m
            self.feature_map = make_feature_map(map_name, d_key, **sizes)
        self.qk_norm = qk_norm if qk_norm is not None else ("sum" if self.rule == "delta" else "none")
        self.attn_norm = attn_norm if attn_norm is not None else self.rule == "sum"

    @property
    def d_dot(self) -> int:
        """Size of the vectors the memory stores under (d_key for softmax)."""
        return self.feature_map.d_dot if self.feature_map is not None else self.d_key

    def write_projection(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`W [e(key); onehot(value)]` for every pair, `[B, L, n_write]`, without building one-hot inputs:
        the value half of W is a lookup table and the key half is folded into the embedding once per call."""
        d_emb = self.embedding.embedding_dim
        from_key = self.embedding.weight @ self.write.weight[:, :d_emb].t()  # [S, n_write]
        from_value = self.write.weight[:, d_emb:].t()  # [S, n_write]
        return from_key[keys] + from_value[values]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_features(self.feature_map(x), self.qk_norm, self.eps)

    def forward(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        written = self.write_projection(keys, values)
        k, q = written[..., : self.d_key], self.query(self.embedding(queries))
        if self.rule == "softmax":
            weights = torch.softmax(q @ k.transpose(1, 2) * self.d_key**-0.5, dim=-1)  # [B, Q, L]
            return self.scatter_to_values(weights, values)
        phi_k, phi_q = self.features(k), self.features(q)
        scores = phi_q @ phi_k.transpose(1, 2)  # [B, Q, L]
        if self.rule == "delta":
            weights = delta_read_weights(phi_k, torch.sigmoid(written[..., -1]), scores)
        else:
            weights = scores
        if self.attn_norm:  # o / (z . phi_q) with z = sum_i phi_k_i, and z . phi_q is the row sum of the scores
            weights = weights / (scores.sum(-1, keepdim=True) + self.eps)
        return self.scatter_to_values(weights, values)

    def scatter_to_values(self, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`sum_i weights[b, q, i] onehot(values[b, i])`, `[B, Q, S]`, as a scatter-add (no one-hot matrix)."""
        out = weights.new_zeros(weights.shape[0], weights.shape[1], self.n_symbols)
        return out.scatter_add(2, values.unsqueeze(1).expand(-1, weights.shape[1], -1), weights)


def delta_read_weights(phi_k: torch.Tensor, beta: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Read-out after the delta rule as weights over the written values: `[B, Q, L]`.

    From a zero state the delta rule's final state is S_L = K^T U with (I + A) U = diag(beta) V,
    A = tril(diag(beta) K K^T, -1) (the WY/UT form over one chunk of all L pairs; `lmtool/ops/README.md`).
    The read-out S_L^T phi_q = V^T diag(beta) (I + A)^-T (K phi_q), so each query needs one unit-triangular
    solve with its score vector K phi_q instead of an L x S state: O(L^2 (d_dot + Q)) for the whole
    sequence, independent of the number of values S. Tests compare it with `delta_rule(impl="recurrent")`.
    """
    a = torch.tril(beta.unsqueeze(-1) * (phi_k @ phi_k.transpose(1, 2)), diagonal=-1)
    w = torch.linalg.solve_triangular(a.transpose(1, 2), scores.transpose(1, 2), upper=True, unitriangular=True)
    return (beta.unsqueeze(-1) * w).transpose(1, 2)


def retrieval_loss(retrieved: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The paper's loss: 0.5 * ||onehot(target) - retrieved||^2 summed over values, averaged over the queries
    whose target is >= 0 (`targets [B, Q]`; -1 marks a key absent from the sequence). Zeros score 0.5."""
    present = targets >= 0
    onehot = F.one_hot(targets.clamp(min=0), retrieved.shape[-1]).to(retrieved.dtype)
    per_query = 0.5 * (onehot - retrieved).pow(2).sum(-1)
    return per_query[present].mean()
