"""Feature maps phi for fast weight attention: `[B, H, L, d_head] -> [B, H, L, d_dot]`.

A feature map turns queries and keys into the vectors that write into and read from the fast weights
(Schlag, Irie & Schmidhuber 2021, arXiv 2102.11174, section 5). Every map works on the last axis only, so
any leading shape is accepted, and has two attributes: `d_dot` (the feature size) and `nonnegative`
(whether phi(x) >= 0 for every x, which the attention normaliser and normalised retrieval rely on).
`make_feature_map` builds one by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

REDRAW_POLICIES = ("every_forward", "every_n", "fixed")


class ElementwiseFeatureMap(nn.Module):
    """phi(x) = fn(x) entry by entry, d_dot = d_head: the maps of `ELEMENTWISE`."""

    def __init__(self, d_head: int, name: str) -> None:
        super().__init__()
        self.name, self.d_dot = name, d_head
        self.fn, self.nonnegative = ELEMENTWISE[name]

    def extra_repr(self) -> str:
        return self.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


# name -> (phi, whether phi(x) >= 0 for every x)
ELEMENTWISE: dict[str, tuple] = {
    "elu": (lambda x: F.elu(x) + 1.0, True),  # Katharopoulos et al. 2020, the Linear Transformer's map
    "relu": (F.relu, True),
    "silu": (F.silu, False),  # DeltaNet's (arXiv 2406.06484); signed: use l2 or no normalisation
    "identity": (lambda x: x, False),  # signed features: no attention normaliser guarantees
}


class DPFPFeatureMap(nn.Module):
    """Deterministic Parameter-Free Projection (the paper's DPFP, eq. 37), d_dot = 2 * nu * d_head.

    r = relu([x, -x]) (2 d_head non-negative entries, one of each pair is zero), then
    phi = concat_{i=1..nu} r * roll(r, i): products of entries i apart on the (cyclic) feature axis, so
    features are sparse and near-orthogonal for different sign patterns.
    """

    nonnegative = True

    def __init__(self, d_head: int, nu: int = 1) -> None:
        super().__init__()
        if nu < 1 or nu >= 2 * d_head:
            raise ValueError(f"dpfp needs 1 <= nu < 2 * d_head = {2 * d_head}, got nu={nu}")
        self.nu = nu
        self.d_dot = 2 * nu * d_head

    def extra_repr(self) -> str:
        return f"nu={self.nu}, d_dot={self.d_dot}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = F.relu(torch.cat([x, -x], dim=-1))
        return torch.cat([r * torch.roll(r, shifts=i, dims=-1) for i in range(1, self.nu + 1)], dim=-1)


def draw_orthogonal_gaussian(
    n_rows: int, dim: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """`[n_rows, dim]` projection for FAVOR+: blocks of `dim` exactly orthogonal rows, row norms chi_dim.

    Each block is the Q factor of a Gaussian `[dim, dim]` matrix (`torch.linalg.qr`), sign-corrected by
    diag(R) so that it is Haar-distributed; the last block is cut to the rows still needed. Every row is
    then rescaled by the norm of an independent Gaussian vector (chi-distributed with `dim` degrees of
    freedom, the Performer's default), so each row is marginally N(0, I) as the estimator requires.
    Draws from the global torch RNG of `device`.
    """
    n_blocks = math.ceil(n_rows / dim)
    q, r = torch.linalg.qr(torch.randn(n_blocks, dim, dim, device=device, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar: fix each column's sign
    w = q.transpose(-2, -1).reshape(n_blocks * dim, dim)[:n_rows]  # rows of each q^T are orthonormal
    norms = torch.randn(n_rows, dim, device=device, dtype=dtype).norm(dim=1, keepdim=True)
    return w * norms


class FavorFeatureMap(nn.Module):
    """FAVOR+ positive orthogonal random features (Choromanski et al. 2021, "Rethinking Attention with
    Performers", arXiv 2009.14794), m = n_features random directions, d_dot = 2 m.

    With x' = x * d_head^(-1/4) (the Performer's input scaling, so that phi(q) . phi(k) estimates the
    softmax kernel exp(q . k / sqrt(d_head))) and projection rows w_i:
        phi(x) = [exp(w_i . x' - |x'|^2 / 2), exp(-w_i . x' - |x'|^2 / 2)]_i / sqrt(2 m) * exp(-c(x)),
    the "hyperbolic" positive features: E[phi(q) . phi(k)] = exp(q' . k') exactly (before the stabiliser).
    Stabiliser: c(x) = max over the 2 m exponents of the same token (the Performer's query stabiliser),
    so the largest feature of every token is 1 / sqrt(2 m) and nothing over- or underflows. It depends on
    the token alone (causal; the Performer's global max over keys would not be). It is a positive factor
    per token, which cancels exactly under sum/l2 key-query normalisation and, for queries, in the
    attention normaliser; without key normalisation it reweights keys by exp(-c(k)).

    The projection `[m, d_head]` is a buffer (checkpoints, eval and DDP's buffer broadcast all see it).
    Redraws use the global torch RNG (checkpointed by the trainer) and happen only in training mode, at the
    start of a forward, before use, so eval always sees the last projection the model trained with:
      every_forward  at every training forward;
      every_n        at training forwards number n, 2n, 3n, ... (n = redraw_interval), counted in the
                     `n_train_forwards` buffer so that a resumed run redraws at the same steps;
      fixed          never (drawn once at construction).
    A redraw overwrites the buffer in place (DDP keeps a reference to it); the forward computes with a
    copy so that a graph from an earlier forward that still awaits backward is not invalidated. Under DDP
    each rank redraws from its own RNG after DDP's buffer broadcast, so ranks train on the same features
    only if they are seeded alike; eval and checkpoints use rank 0's buffer. Activation recomputation
    (checkpointing) would run the redraw policy twice per step: use `fixed` with it.
    """

    nonnegative = True

    def __init__(
        self, d_head: int, n_features: int = 16, redraw: str = "every_forward", redraw_interval: int = 1000
    ) -> None:
        super().__init__()
        if redraw not in REDRAW_POLICIES:
            raise ValueError(f"unknown favor redraw policy {redraw!r}; choose one of {REDRAW_POLICIES}")
        if n_features < 1 or redraw_interval < 1:
            raise ValueError(
                f"favor needs n_features >= 1 and redraw_interval >= 1, got {n_features}, {redraw_interval}"
            )
        self.d_head, self.n_features = d_head, n_features
        self.redraw, self.redraw_interval = redraw, redraw_interval
        self.d_dot = 2 * n_features
        self.register_buffer("projection", draw_orthogonal_gaussian(n_features, d_head))
        self.register_buffer("n_train_forwards", torch.zeros((), dtype=torch.long))
        self._n_train_forwards = 0

    def extra_repr(self) -> str:
        return f"d_head={self.d_head}, n_features={self.n_features}, redraw={self.redraw}"

    @torch.no_grad()
    def redraw_projection(self) -> None:
        """Draw a fresh projection into the buffer (in place), from the global torch RNG."""
        dtype = torch.promote_types(self.projection.dtype, torch.float32)
        w = draw_orthogonal_gaussian(self.n_features, self.d_head, device=self.projection.device, dtype=dtype)
        self.projection.copy_(w)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._n_train_forwards = int(self.n_train_forwards)

    def _step_redraw_policy(self) -> None:
        if self.redraw == "fixed":
            return
        # a Python mirror of the count avoids a device-to-host sync per forward; the buffer is what
        # checkpoints hold (and what `_load_from_state_dict` restores the mirror from)
        self._n_train_forwards += 1
        with torch.no_grad():
            self.n_train_forwards.fill_(self._n_train_forwards)
        if self.redraw == "every_forward" or self._n_train_forwards % self.redraw_interval == 0:
            self.redraw_projection()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._step_redraw_policy()
        w = self.projection.to(x.dtype, copy=True)
        x = x * self.d_head**-0.25
        wx = x @ w.T
        logits = torch.cat([wx, -wx], dim=-1) - 0.5 * (x * x).sum(-1, keepdim=True)
        logits = logits - logits.amax(dim=-1, keepdim=True)
        return torch.exp(logits) / math.sqrt(self.d_dot)


FEATURE_MAPS = ("elu", "favor", "dpfp", "identity", "relu", "silu")


def make_feature_map(
    name: str,
    d_head: int,
    *,
    nu: int = 1,
    n_features: int = 16,
    redraw: str = "every_forward",
    redraw_interval: int = 1000,
) -> nn.Module:
    """Build the feature map `name` (elu | favor | dpfp | identity | relu | silu) for heads of size `d_head`;
    `nu` is for dpfp, `n_features`, `redraw`, `redraw_interval` for favor (ignored by the others)."""
    if name in ELEMENTWISE:
        return ElementwiseFeatureMap(d_head, name)
    if name == "dpfp":
        return DPFPFeatureMap(d_head, nu)
    if name == "favor":
        return FavorFeatureMap(d_head, n_features, redraw, redraw_interval)
    raise ValueError(f"unknown feature map {name!r}; choose one of {FEATURE_MAPS}")
