"""lmtool's CPU dropout has nn.Dropout's distribution, scaling, gradient and evaluation behaviour."""

from __future__ import annotations

import pytest
import torch

from lmtool.layers.dropout import Dropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.5], ids=["p0.1", "p0.5"])
def test_kept_fraction_and_scale_match_bernoulli(p):
    """Each element is kept with probability 1 - p (within 6 standard deviations over 4M draws), kept elements
    are scaled by 1 / (1 - p) exactly and the others are zero; neighbours are independent (both kept with
    probability (1 - p)^2)."""
    torch.manual_seed(0)
    x = torch.ones(2048, 2048)
    y = dropout(x, p, True)
    kept = y != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 6 * (p * (1 - p) / n) ** 0.5
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)), rtol=0, atol=0)
    both = (kept[:, 1:] & kept[:, :-1]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 6 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5
    for half in (kept[:, 0::2], kept[:, 1::2]):  # the low and the high word of each 64-bit draw
        assert abs(half.float().mean().item() - (1 - p)) < 6 * (p * (1 - p) / half.numel()) ** 0.5


def test_odd_sizes_get_a_mask_of_their_own_shape():
    """An odd number of elements (half a 64-bit draw left over) and a non-contiguous input get a full mask."""
    torch.manual_seed(2)
    for x in (torch.ones(7, 9, 3), torch.ones(8, 6).T, torch.ones(1)):
        y = dropout(x, 0.5, True)
        assert y.shape == x.shape and set(y.unique().tolist()) <= {0.0, 2.0}
    assert (dropout(torch.ones(10001), 0.5, True) != 0).sum().item() in range(4700, 5300)


def test_gradient_is_the_mask_times_the_scale():
    """The gradient of sum(w * dropout(x)) is w on the kept elements, scaled by 1 / (1 - p), and 0 elsewhere."""
    torch.manual_seed(1)
    x = torch.randn(64, 33, dtype=torch.float64, requires_grad=True)
    w = torch.randn(64, 33, dtype=torch.float64)
    y = dropout(x, 0.3, True)
    (dx,) = torch.autograd.grad((w * y).sum(), x)
    torch.testing.assert_close(dx, w * (y != 0) / 0.7, rtol=1e-15, atol=0)
    torch.testing.assert_close(y, x * (y != 0) / 0.7, rtol=1e-15, atol=0)


def test_evaluation_zero_rate_and_seeding():
    """In eval mode and with p = 0 the input is returned unchanged; the same seed draws the same mask; the
    dtype is kept (bf16 under mixed precision)."""
    x = torch.randn(8, 16)
    module = Dropout(0.2).eval()
    assert module(x) is x and dropout(x, 0.0, True) is x
    module.train()
    torch.manual_seed(3)
    first = module(x)
    torch.manual_seed(3)
    assert torch.equal(first, module(x))
    assert module(x.bfloat16()).dtype == torch.bfloat16
