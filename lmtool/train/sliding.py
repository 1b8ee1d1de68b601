"""Sliding-window evaluation: every token scored with a context window of exactly `tgt_len` tokens.

As the original toolkit's sliding-window evaluator for limited-context models: the first window scores all of its
positions, every later window (shifted by one token) scores only its last position, so each target after
the first window sees exactly `tgt_len` tokens of context and no state from earlier windows. Instead of one
window per forward pass, `batch_size` windows are gathered into one batch, and for those windows the output
layer (softmax) runs on the last position only: the other positions' scores would be thrown away.
"""

from __future__ import annotations

import torch

from lmtool.models.lm import CausalLM
from lmtool.train.device import autocast


@torch.no_grad()
def sliding_window_nll(
    model: CausalLM,
    data: torch.Tensor,
    *,
    tgt_len: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[float, int]:
    """Mean NLL (nats/token) of `data[1:]` given `data[:-1]`, windows of `tgt_len`; returns (loss, tokens).

    `batch_size` windows go through the model at once; the result equals one window per pass (batch 1).
    """
    was_training = model.training
    model.eval()
    inputs, targets = data[:-1].long().to(device), data[1:].long().to(device)
    n = targets.numel()
    length = min(tgt_len, n)
    with autocast(device, precision):
        nll, _ = model(inputs[None, :length], targets[None, :length])
        total, count = nll.double().sum().item(), length
        offsets = torch.arange(length, device=device)
        for start in range(1, n - length + 1, batch_size):
            starts = torch.arange(start, min(start + batch_size, n - length + 1), device=device)
            index = starts[:, None] + offsets[None, :]  # [W, length] token positions of each window
            nll, _ = model(inputs[index], targets[index[:, -1:]], last_only=True)  # nll: [W, 1]
            total += nll.double().sum().item()
            count += starts.numel()
    model.train(was_training)
    return total / max(count, 1), count
