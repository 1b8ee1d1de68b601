"""The one causal language model of lmtool: embedding -> block stack -> (adaptive) softmax.

Token mixers (`lmtool.layers.mixer.TokenMixer`: softmax attention, relative attention, fast weight
attention, ...) plug in through a factory, so every model family is this class with a different mixer. The
model's state (`lmtool.models.state.LMState`) holds each mixer's state and the number of tokens seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lmtool.layers.adaptive import AdaptiveEmbedding, AdaptiveLogSoftmax
from lmtool.layers.dropout import Dropout
from lmtool.layers.feedforward import FeedForward
from lmtool.layers.mixer import TokenMixer
from lmtool.layers.output import linear_cross_entropy
from lmtool.layers.positional import SinusoidalPositions
from lmtool.models.state import LMState


class Block(nn.Module):
    """Residual block: token mixer then feed-forward, each with post-LN (default) or pre-LN."""

    def __init__(self, mixer: TokenMixer, d_model: int, d_inner: int, dropout: float, pre_lnorm: bool):
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
    per-token negative log-likelihood `[B, L]` (float32, or float64 for a float64 model) when `tgt` is given,
    else scores `[B, L, V]`: the logits, or with the adaptive softmax the exact log-probabilities (which are
    also valid logits: softmax returns the same distribution). `state` is an `LMState` (None: a new
    sequence); the new one, `seen` advanced by L, is returned when `return_state`, else None.
    `init_state(B)` is the empty state of a sequence to be decoded token by token (key/value caches included).

    Embedding: a tied `[V, d_model]` table, or adaptive input (`adaptive`, `cutoffs`, `div_val`), scaled by
    sqrt(d_model). Positions: absolute sinusoidal (`pos_emb`), never with a mixer that has
    `relative_positions`; the first token of a segment gets position `position_offset(state.seen)`: the
    number of tokens seen, or with a segment memory the memory's length min(seen, mem_len), so that a
    segment with its memory sees what one pass over memory + segment would. The memory holds the mixer's
    input: with pre-LN the normalised block input (Transformer-XL keeps the raw one and normalises it with the
    current LayerNorm: the same at evaluation, and up to one LayerNorm update in training).

    Output: a linear softmax tied to the embedding (`tie_weight`), or the adaptive softmax sharing the tables
    (`tie_weight`) and the tail projections (`tie_projs`) with the adaptive input.

    Absolute positions with a memory (model=transformer, mem_len > 0): once the memory is full every segment
    gets the positions mem_len .. mem_len + L - 1, while the memory holds states computed with their own
    earlier positions; only the relative mixer is free of that (Transformer-XL's motivation).
    """

    def __init__(
        self,
        vocab_size: int,
        make_mixer: Callable[[int], TokenMixer],
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
        adaptive: bool = False,
        cutoffs: Sequence[int] = (),
        div_val: int = 1,
        tie_projs: bool = True,
        carry_over: bool = False,
    ) -> None:
        super().__init__()
        self.vocab_size, self.d_model, self.carry_over = vocab_size, d_model, carry_over
        if adaptive:
            self.embed: nn.Module = AdaptiveEmbedding(vocab_size, d_model, cutoffs, div_val)
        else:
            self.embed = nn.Embedding(vocab_size, d_model)
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(make_mixer(i), d_model, d_inner, dropout, pre_lnorm) for i in range(n_layer)
        )
        self.mem_len = max(block.mixer.mem_len for block in self.blocks)
        if pos_emb and any(block.mixer.relative_positions for block in self.blocks):
            raise ValueError("the token mixer uses relative positions: build the model with pos_emb=False")
        self.positions = SinusoidalPositions(d_model) if pos_emb else None
        # pre-LN leaves the residual stream unnormalised: normalise once before the softmax
        self.final_norm = nn.LayerNorm(d_model) if pre_lnorm else nn.Identity()
        if adaptive:
            self.output = AdaptiveLogSoftmax(vocab_size, d_model, cutoffs, div_val)
        else:
            self.output = nn.Linear(d_model, vocab_size)
        self._init_weights(init_std, proj_init_std)
        if adaptive:
            self.output.tie(self.embed, weights=tie_weight, projs=tie_projs)
        elif tie_weight:
            self.output.weight = self.embed.weight

    @property
    def has_memory(self) -> bool:
        """Whether a mixer keeps a segment memory (mem_len > 0), carried across segments like Transformer-XL."""
        return self.mem_len > 0

    @property
    def state_grows(self) -> bool:
        """Whether a mixer's state grows with the context (a key/value cache): never carried across segments."""
        return any(block.mixer.state_grows for block in self.blocks)

    @property
    def carries_state(self) -> bool:
        """Whether training passes each layer's state to the next segment: carried fast weights or memory."""
        return self.carry_over or self.has_memory

    def position_offset(self, seen: int) -> int:
        """Absolute position of the next token after `seen` tokens: `seen`, or with a segment memory the
        memory's length (positions count from the memory's start, as in Transformer-XL's recurrence)."""
        return min(seen, self.mem_len) if self.has_memory else seen

    def init_state(self, batch_size: int, device: torch.device | None = None) -> LMState:
        """The empty state of `batch_size` sequences that will be continued token by token."""
        param = next(self.parameters())
        device = device if device is not None else param.device
        layers = [b.mixer.init_state(batch_size, device=device, dtype=param.dtype) for b in self.blocks]
        return LMState(layers, 0)

    def _init_weights(self, init_std: float, proj_init_std: float) -> None:
        """The original toolkit's initialisation: N(0, init_std) weights, zero biases, LayerNorm gains N(1, init_std);
        modules with their own `init_parameters(init_std, proj_init_std)` (feature maps, adaptive
        embedding and softmax, relative biases) are delegated to."""
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
        state: LMState | None = None,
        return_state: bool = False,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, LMState | None]:
        """`last_only`: run the output layer on the last position only (`tgt` is then `[B, 1]`); every
        position is still context. Sliding-window evaluation and decoding use it to skip discarded scores."""
        state = state if state is not None else LMState([None] * len(self.blocks), 0)
        h = self.embed(inp) * math.sqrt(self.d_model)
        if self.positions is not None:
            h = h + self.positions(inp.shape[1], self.position_offset(state.seen)).to(h.dtype)
        h = self.drop(h)
        new_layers = []
        for block, layer_state in zip(self.blocks, state.layers, strict=True):
            h, layer_state = block(h, layer_state, return_state)
            new_layers.append(layer_state)
        h = self.final_norm(h[:, -1:] if last_only else h)
        out_state = LMState(new_layers, state.seen + inp.shape[1]) if return_state else None
        if isinstance(self.output, AdaptiveLogSoftmax):
            if tgt is None:
                return self.output.log_prob(h.flatten(0, 1)).view(*h.shape[:2], -1), out_state
            return self.output(h.flatten(0, 1), tgt.flatten()).view_as(tgt), out_state
        if tgt is None:
            return self.output(h), out_state
        # the output matmul and the loss in one function: no log-softmax copies of the [B L, V] logits
        nll = linear_cross_entropy(h.flatten(0, 1), self.output.weight, self.output.bias, tgt.flatten())
        return nll.view_as(tgt), out_state

