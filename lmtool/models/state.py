"""The model's carried state: one entry per layer plus the number of tokens seen, and helpers on it.

`LMState` is what `CausalLM.forward` takes and returns: carried segments (fast weights across segments,
Transformer-XL memory), carry-over evaluation and one-token decoding all go through it. The position
counter `seen` makes absolute positions explicit: a segment that continues a state starts at position
`seen` (or, with a segment memory, at the memory's length; see `CausalLM.position_offset`).

The helpers work on any nesting of tensors, tuples, lists and None (what mixers keep), so no helper needs to
know which mixer made a state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LMState:
    """Per-layer mixer states (None: empty) and the number of tokens of the sequence seen so far."""

    layers: list[Any] = field(default_factory=list)
    seen: int = 0

    def to_payload(self) -> dict:
        """Plain containers for a checkpoint (loadable with `torch.load(weights_only=True)`)."""
        return {"layers": list(self.layers), "seen": self.seen}

    @classmethod
    def from_payload(cls, payload: Any) -> LMState | None:
        """Inverse of `to_payload`. Checkpoints written before the state object held a bare list of layer
        states; their only position-dependent case is a segment memory, whose length was the position
        offset, so `seen` is restored as that length (0 when no layer holds a memory tensor)."""
        if payload is None:
            return None
        if isinstance(payload, dict):
            return cls(list(payload["layers"]), int(payload["seen"]))
        first = payload[0] if payload else None
        return cls(list(payload), first.shape[1] if isinstance(first, torch.Tensor) else 0)


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: Any) -> Any:
    """Apply `fn` to every tensor of a nested state (LMState, list, tuple), keeping its structure."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, LMState):
        return LMState(map_state(fn, state.layers), state.seen)
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(fn, s) for s in state)
    return state


def detach_state(state: Any) -> Any:
    """Detach a carried state, for truncated backprop across segments."""
    return map_state(torch.Tensor.detach, state)


def split_state(state: Any, n: int) -> list[Any]:
    """Split a nested state along the batch dimension into n equal parts (micro-batches, DDP ranks)."""
    if state is None:
        return [None] * n
    if isinstance(state, torch.Tensor):
        return list(state.chunk(n, dim=0))
    if isinstance(state, LMState):
        return [LMState(layers, state.seen) for layers in split_state(state.layers, n)]
    parts = [split_state(s, n) for s in state]
    return [type(state)(p[i] for p in parts) for i in range(n)]


def merge_state(states: list[Any]) -> Any:
    """Inverse of split_state: concatenate along the batch dimension."""
    first = states[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(states, dim=0)
    if isinstance(first, LMState):
        return LMState(merge_state([s.layers for s in states]), first.seen)
    return type(first)(merge_state([s[i] for s in states]) for i in range(len(first)))

