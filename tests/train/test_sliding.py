"""Batched sliding-window evaluation equals the one-window-per-pass definition."""

from __future__ import annotations

import pytest
import torch

from lmtool.models.build import build_model
from lmtool.train.sliding import sliding_window_nll
from tests.helpers import compose_config


def one_window_at_a_time(model, data: torch.Tensor, tgt_len: int) -> tuple[float, int]:
    """The definition: first window scores all positions, each later window (batch 1) only its last."""
    inputs, targets = data[:-1], data[1:]
    total, count = 0.0, 0
    with torch.no_grad():
        nll, _ = model(inputs[None, :tgt_len], targets[None, :tgt_len])
        total, count = nll.sum().item(), tgt_len
        for start in range(1, targets.numel() - tgt_len + 1):
            nll, _ = model(inputs[None, start:start + tgt_len], targets[None, start:start + tgt_len])
            total += nll[0, -1].item()
            count += 1
    return total / count, count


@pytest.mark.parametrize("model_name", ["transformer", "fwm", "delta_lstm", "srwm"])
def test_batched_sliding_window_matches_batch_one(model_name):
    """Every target is scored once, with the same loss as the batch-1 sliding window (the recurrent models of the
    WikiText-103 recipes too: no state leaks from one window into the next)."""
    torch.manual_seed(0)
    model = build_model(compose_config(f"model={model_name}", "debug=smoke"), 29).double().eval()
    data = torch.randint(0, 29, (60,))
    loss, count = sliding_window_nll(model, data, tgt_len=8, batch_size=7, device=torch.device("cpu"))
    ref_loss, ref_count = one_window_at_a_time(model, data, 8)
    assert count == ref_count == 59
    assert loss == pytest.approx(ref_loss, rel=1e-10)
