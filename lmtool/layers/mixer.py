"""The token-mixer contract: what every model family plugs into the one causal LM.

A token mixer is the part of a block that moves information between positions (softmax attention, relative
attention with a memory, a fast weight layer, ...). The LM calls it on a segment with an optional per-layer
state and receives the output and the new state; everything else (embedding, residual, LayerNorm,
feed-forward, softmax) is shared. A new model family is a `TokenMixer` subclass, its config schema and
builder (`MixerSpec` in `lmtool.models.registry`) and one registration line.

State, per mixer (docs/token_mixers.md has the table):
  FastWeightAttention  `(S [B, H, d_dot, d_head], z [B, H, d_dot] or None, conv tail or None)`: fast
                       weights, key sum, and the short convolution's last inputs
  SoftmaxAttention     mem_len > 0: the segment memory `[B, M, d_model]`, M <= mem_len (its past inputs);
                       mem_len = 0: a key/value cache `(k, v)`, each `[B, H, T, d_head]`, used for decoding
  RelativeAttention    the segment memory `[B, M, d_model]`, M <= mem_len (Transformer-XL)
  recurrent FWPs, SRWM every fast matrix, plus the last output (and cell) where the model is recurrent
  LSTMMixer            `(h, c)`, each `[B, d_model]`
`None` always means "empty". A state is a tensor, a tuple of tensors (or None entries), or None, so that
`lmtool.models.state` can detach, move, split and merge it without knowing the mixer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from omegaconf import MISSING
from torch import nn


@dataclass
class ModelConfig:
    """`cfg.model`: the keys every model family has. A family's schema extends it with its own keys (e.g.
    Transformer-XL's mem_len), so a key that the chosen family does not have fails at compose time."""

    name: str = MISSING  # the registered model name: transformer | transformer_xl | fwm | ...
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 4
    d_head: int = 64
    d_inner: int = 1024
    dropout: float = 0.1
    dropatt: float = 0.0  # dropout on attention probabilities (softmax mixers)
    pre_lnorm: bool = False
    tie_weight: bool = True
    pos_emb: bool = True  # sinusoidal absolute positions added to the embedding
    init_std: float = 0.02
    proj_init_std: float = 0.01
    # pass each layer's state (detached) to the next training segment, as the original toolkit's
    # carry_over_fast_weight; reset at every epoch. Only for families whose state has a fixed size.
    carry_over: bool = False
    # adaptive input + adaptive softmax (Baevski & Auli 2019; Grave et al. 2017): vocabulary clusters split at
    # `cutoffs`, cluster i embedded in d_model // div_val**i dimensions; tie_weight shares the tables between
    # input and output, tie_projs the tail clusters' projections
    adaptive: bool = False
    cutoffs: list[int] = field(default_factory=list)
    div_val: int = 1
    tie_projs: bool = True


def check_layer_args(
    layer: str, *, sizes: dict[str, int], lengths: dict[str, int] | None = None, dropouts: dict[str, float]
) -> None:
    """Refuse `sizes` below 1, `lengths` below 0 and `dropouts` outside [0, 1) with a ValueError naming the
    layer and the argument, so that a layer built by hand fails as early as one built from a config."""
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{layer}: {name} must be at least 1, got {value}")
    for name, value in (lengths or {}).items():
        if value < 0:
            raise ValueError(f"{layer}: {name} must be at least 0, got {value}")
    for name, value in dropouts.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{layer}: {name} must be in [0, 1), got {value}")


class TokenMixer(nn.Module):
    """Base class of token mixers: `forward(x [B, L, d_model], state, return_state) -> (y [B, L, d_model], state)`.

    - `state=None` starts from the empty state. With `return_state` the new state is returned, so that the
      next segment (or the next decoded token) continues the sequence; otherwise None.
    - `relative_positions`: the mixer encodes positions itself; the LM then adds no absolute positions.
    - `mem_len`: length of a segment memory carried across training segments (Transformer-XL recurrence);
      0 for mixers without one. The LM uses it to know what it carries and which absolute positions a
      segment gets (with a memory, positions count from the start of the memory).
    - `state_grows`: whether the state grows with the context (a key/value cache). Such a state is never
      carried across training or evaluation segments; generation keeps it.
    """

    relative_positions: ClassVar[bool] = False
    mem_len: int = 0

    @property
    def state_grows(self) -> bool:
        return False

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> Any:
        """The empty state of a sequence that is about to be continued token by token (generation)."""
        return None

    def forward(
        self, x: torch.Tensor, state: Any = None, return_state: bool = False
    ) -> tuple[torch.Tensor, Any]:  # pragma: no cover - every subclass defines it
        raise NotImplementedError
