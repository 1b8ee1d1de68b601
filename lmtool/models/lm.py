"""The one causal language model of lmtool: embedding -> block stack -> tied softmax.

Token mixers (softmax attention, fast weight attention, ...) plug in through a factory, so every model
family is this class with a different mixer. Each mixer may carry a per-layer state across segments
(fast weights); the model passes a list of those states in and returns the new list.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtool.layers.feedforward import FeedForward
from lmtool.layers.positional import SinusoidalPositions


class Block(nn.Module):
    """Residual block: token mixer then feed-forward, each with post-LN (default) or pre-LN."""

    def __init__(self, mixer: nn.Module, d_model: int, d_inner: int, dropout: float, pre_lnorm: bool):
        super().__init__()
        self.mixer = mixer
        self.ff = FeedForward(d_model, d_inner, dropout)
        self.norm_mixer = nn.LayerNorm(d_model)
        self.norm_ff = nn.LayerNorm(d_model)
        self.pre_lnorm = pre_lnorm

    def forward(self, h: torch.Tensor, state: Any, return_state: bool) -> tuple[torch.Tensor, Any]:
        if self.pre_lnorm:
            y, state = self.mixer(self.norm_mixer(h), state, return_state)
            h = h + y
            return h + self.ff(self.norm_ff(h)), state
        y, state = self.mixer(h, state, return_state)
        h = self.norm_mixer(h + y)
        return self.norm_ff(h + self.ff(h)), state


class CausalLM(nn.Module):
    """Causal LM over `[B, L]` token ids.

    `forward(inp, tgt=None, state=None, return_state=False)` returns `(out, new_state)` where `out` is the
    per-token negative log-likelihood `[B, L]` (float32) when `tgt` is given, else the logits `[B, L, V]`.
    `state` is a list with one entry per layer (None for stateless mixers).
    """

    def __init__(
        self,
        vocab_size: int,
        make_mixer: Callable[[int], nn.Module],
        *,
        n_layer: int,
        d_model: int,
        d_inner: int,
        dropout: float,
        pre_lnorm: bool = False,
        tie_weight: bool = True,
        pos_emb: bool = True,
        init_std: float = 0.02,
        proj_init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.vocab_size, self.d_model = vocab_size, d_model
        self.embed = nn.Embedding(vocab_size, d_model)
        self.positions = SinusoidalPositions(d_model) if pos_emb else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(make_mixer(i), d_model, d_inner, dropout, pre_lnorm) for i in range(n_layer)
        )
        # pre-LN leaves the residual stream unnormalised: normalise once before the softmax
        self.final_norm = nn.LayerNorm(d_model) if pre_lnorm else nn.Identity()
        self.output = nn.Linear(d_model, vocab_size)
        self._init_weights(init_std, proj_init_std)
        if tie_weight:
            self.output.weight = self.embed.weight

    def _init_weights(self, init_std: float, proj_init_std: float) -> None:
        """The seed's initialisation: N(0, init_std) weights, zero biases, LayerNorm gains N(1, init_std);
        modules with their own `reset_parameters(init_std, proj_init_std)` (e.g. projections of
        feature maps) are delegated to."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight, 1.0, init_std)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if module is not self and hasattr(module, "init_parameters"):
                module.init_parameters(init_std, proj_init_std)

    def forward(
        self,
        inp: torch.Tensor,
        tgt: torch.Tensor | None = None,
        state: list[Any] | None = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, list[Any] | None]:
        h = self.embed(inp) * math.sqrt(self.d_model)
        if self.positions is not None:
            h = h + self.positions(inp.shape[1]).to(h.dtype)
        h = self.drop(h)
        states = state if state is not None else [None] * len(self.blocks)
        new_states = []
        for block, layer_state in zip(self.blocks, states, strict=True):
            h, layer_state = block(h, layer_state, return_state)
            new_states.append(layer_state)
        logits = self.output(self.final_norm(h))
        out_state = new_states if return_state else None
        if tgt is None:
            return logits, out_state
        nll = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), reduction="none")
        return nll.view_as(tgt), out_state


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: Any) -> Any:
    """Apply `fn` to every tensor of a nested (list/tuple) carried state, keeping its structure."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(fn, s) for s in state)
    return state


def detach_state(state: Any) -> Any:
    """Detach a carried state, for truncated backprop across segments."""
    return map_state(torch.Tensor.detach, state)
