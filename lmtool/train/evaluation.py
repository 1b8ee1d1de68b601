"""Scoring a split in non-overlapping segments (segment and carry modes of `lmtool-eval`, and the trainer's
periodic and final evaluation). Sliding-window scoring lives in `lmtool.train.sliding`."""

from __future__ import annotations

import torch

from lmtool.config import ConfigError
from lmtool.data import LMOrderedIterator
from lmtool.models.lm import CausalLM
from lmtool.train import distributed
from lmtool.train.device import autocast
from lmtool.train.distributed import Topology


@torch.no_grad()
def evaluate(
    model: CausalLM,
    data: torch.Tensor,
    *,
    batch_size: int,
    tgt_len: int,
    carry: bool,
    device: torch.device,
    precision: str = "fp32",
    max_segments: int | None = None,
    topology: Topology | None = None,
) -> tuple[float, int]:
    """Mean NLL (nats/token) over `data` in non-overlapping segments of `tgt_len` over `batch_size` streams.

    carry=True passes each layer's state (fast weights, memory) from one segment to the next; otherwise every
    segment starts from an empty state, except that a model with a segment memory (Transformer-XL, mem_len > 0)
    always carries it, as Transformer-XL evaluates. Returns (loss, tokens scored).

    With a distributed `topology` each rank scores its contiguous slice of the `batch_size` streams and the
    NLL sums and token counts are all-reduced, so every rank returns the single-process result.
    """
    if carry and model.state_grows and not model.has_memory:
        raise ConfigError(
            "mode=carry keeps each layer's state across the whole split, but this model's state is a key/value "
            "cache that grows with the context: use mode=segment or sliding (or a memory, mem_len > 0)"
        )
    carry = carry or model.has_memory
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    split = topology is not None and topology.distributed
    stream_range = topology.stream_range(batch_size) if split else None
    iterator = LMOrderedIterator(data, batch_size, tgt_len, stream_range=stream_range)
    for i, seg in enumerate(iterator):
        if max_segments is not None and i >= max_segments:
            break
        with autocast(device, precision):
            nll, new_state = model(seg.inp.to(device), seg.tgt.to(device), state if carry else None, carry)
        state = new_state
        total += nll.double().sum().item()
        count += nll.numel()
    model.train(was_training)
    if split:
        total, count = distributed.all_reduce_sum([total, count])
        count = int(count)
    return total / max(count, 1), count
