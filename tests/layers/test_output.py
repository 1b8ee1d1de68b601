"""The fused output layer and loss equals F.cross_entropy of F.linear: values and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmtool.layers.output import linear_cross_entropy


def make(N=37, d=6, V=23, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(V, d, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    go = torch.rand(N, generator=g, dtype=dtype)
    return h, w, b, t, go


def reference(h, w, b, t):
    return F.cross_entropy(F.linear(h, w, b).to(torch.promote_types(h.dtype, torch.float32)), t, reduction="none")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_equals_cross_entropy_of_linear_in_float64(bias):
    """Per-token losses and the gradients of h, W and b equal the unfused reference to 1e-12."""
    h, w, b, t, go = make(bias=bias)
    leaves = [x for x in (h, w, b) if x is not None]
    fused = linear_cross_entropy(h, w, b, t)
    ref = reference(h, w, b, t)
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    for a, e in zip(torch.autograd.grad(fused, leaves, go), torch.autograd.grad(ref, leaves, go), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_second_backward_through_the_same_graph_gives_the_same_gradients():
    """The backward only reads the saved softmax-minus-onehot buffer: differentiating the same graph twice
    (retain_graph) returns the same gradients both times."""
    h, w, b, t, go = make(N=5, d=3, V=7)
    loss = (linear_cross_entropy(h, w, b, t) * go).sum()
    first = torch.autograd.grad(loss, (h, w, b), retain_graph=True)
    second = torch.autograd.grad(loss, (h, w, b))
    for a, e in zip(first, second, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_repeated_targets_and_a_subset_of_gradients():
    """Rows sharing a target, and gradients requested for W only, match the reference."""
    h, w, b, t, go = make()
    t = torch.zeros_like(t)
    dw = torch.autograd.grad(linear_cross_entropy(h, w, b, t), w, go)[0]
    torch.testing.assert_close(dw, torch.autograd.grad(reference(h, w, b, t), w, go)[0], rtol=1e-12, atol=1e-12)


def test_bf16_autocast_matches_the_unfused_autocast_path():
    """Under bf16 autocast the loss is float32, the gradients keep the parameters' dtypes, and both stay close to
    F.linear + F.cross_entropy under the same autocast."""
    h, w, b, t, go = make(N=64, d=16, V=50, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(h, w, b, t)
        ref = F.cross_entropy(F.linear(h, w, b).float(), t, reduction="none")
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, rtol=1e-2, atol=1e-2)
    grads = torch.autograd.grad(fused, (h, w, b), go)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    for a, e in zip(grads, torch.autograd.grad(ref, (h, w, b), go), strict=True):
        torch.testing.assert_close(a, e, rtol=3e-2, atol=3e-2)
