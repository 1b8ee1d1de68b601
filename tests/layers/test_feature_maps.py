"""Feature maps: shapes, positivity, DPFP values, FAVOR+ projections and redraw policies."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lmtool.layers.feature_maps import FavorFeatureMap, draw_orthogonal_gaussian, make_feature_map

D_HEAD = 4
SPECS = {  # name -> (factory kwargs, expected d_dot, non-negative)
    "elu": ({}, D_HEAD, True),
    "relu": ({}, D_HEAD, True),
    "identity": ({}, D_HEAD, False),
    "dpfp-nu1": ({"nu": 1}, 2 * D_HEAD, True),
    "dpfp-nu3": ({"nu": 3}, 6 * D_HEAD, True),
    "favor-m6": ({"n_features": 6}, 12, True),
}


def _build(spec: str):
    kwargs, d_dot, nonneg = SPECS[spec]
    return make_feature_map(spec.split("-")[0], D_HEAD, **kwargs).double(), d_dot, nonneg


@pytest.mark.parametrize("spec", list(SPECS))
def test_shape_and_sign(spec):
    """Each map sends [B, H, L, d_head] to [B, H, L, d_dot] and is non-negative where it claims to be."""
    fm, d_dot, nonneg = _build(spec)
    x = 3 * torch.randn(2, 3, 5, D_HEAD, dtype=torch.float64)
    phi = fm(x)
    assert fm.d_dot == d_dot
    assert phi.shape == (2, 3, 5, d_dot)
    assert fm.nonnegative == nonneg
    if nonneg:
        assert (phi >= 0).all()
    assert torch.isfinite(phi).all()


def test_elu_values():
    """elu + 1 is x + 1 for x > 0 and exp(x) otherwise."""
    x = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    expected = torch.tensor([math.exp(-1.0), 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(make_feature_map("elu", 3)(x), expected)


def test_dpfp_hand_computed():
    """DPFP with nu=1, 2 on x = (1, -2): r = (1, 0, 0, 2), phi_i = r * roll(r, i) concatenated."""
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    # r = relu([1, -2, -1, 2]) = (1, 0, 0, 2); roll(r, 1) = (2, 1, 0, 0); roll(r, 2) = (0, 2, 1, 0)
    torch.testing.assert_close(make_feature_map("dpfp", 2, nu=1)(x), torch.tensor([2.0, 0, 0, 0]).double())
    torch.testing.assert_close(
        make_feature_map("dpfp", 2, nu=2)(x), torch.tensor([2.0, 0, 0, 0, 0, 0, 0, 0]).double()
    )
    x = torch.tensor([1.0, 3.0], dtype=torch.float64)
    # r = (1, 3, 0, 0); roll 1 = (0, 1, 3, 0) -> (0, 3, 0, 0); roll 2 = (0, 0, 1, 3) -> (0, 0, 0, 0)
    torch.testing.assert_close(
        make_feature_map("dpfp", 2, nu=2)(x), torch.tensor([0.0, 3, 0, 0, 0, 0, 0, 0]).double()
    )


def test_unknown_name_is_rejected():
    """An unknown feature map name fails with the list of choices."""
    with pytest.raises(ValueError, match="elu"):
        make_feature_map("softplus", 4)


@pytest.mark.parametrize("n_rows,dim", [(3, 4), (4, 4), (10, 4)], ids=lambda v: str(v))
def test_favor_projection_blocks_orthogonal(n_rows, dim):
    """Rows of each block of `dim` rows of the FAVOR+ projection are mutually orthogonal."""
    torch.manual_seed(0)
    w = draw_orthogonal_gaussian(n_rows, dim, dtype=torch.float64)
    assert w.shape == (n_rows, dim)
    for start in range(0, n_rows, dim):
        block = w[start : start + dim]
        gram = block @ block.T
        off_diag = gram - torch.diag(torch.diagonal(gram))
        assert off_diag.abs().max() < 1e-10
        assert (torch.diagonal(gram) > 0).all()


def test_favor_estimates_softmax_kernel():
    """Averaged over many features, phi(q) . phi(k) is proportional to exp(q . k / sqrt(d)) per query."""
    torch.manual_seed(0)
    d = 4
    fm = FavorFeatureMap(d, n_features=20000, redraw="fixed").double()
    q = 0.5 * torch.randn(d, dtype=torch.float64)
    keys = 0.5 * torch.randn(6, d, dtype=torch.float64)
    # the per-token stabiliser multiplies each key's features by its own constant: undo it by comparing
    # the ratio of estimates against a reference computed with the same stabiliser factor removed
    x = keys * d**-0.25
    wx = x @ fm.projection.T
    logits = torch.cat([wx, -wx], -1) - 0.5 * (x * x).sum(-1, keepdim=True)
    unstabilised = fm(keys) * torch.exp(logits.amax(-1, keepdim=True))
    est = unstabilised @ fm(q)
    exact = torch.exp(keys @ q / math.sqrt(d))
    ratio = est / exact
    torch.testing.assert_close(ratio / ratio.mean(), torch.ones_like(ratio), atol=0.05, rtol=0)


def _favor(redraw: str, interval: int = 3) -> FavorFeatureMap:
    return FavorFeatureMap(D_HEAD, n_features=5, redraw=redraw, redraw_interval=interval).double()


def test_favor_every_forward_redraws_in_train_only():
    """every_forward redraws at each training forward and never in eval mode."""
    fm = _favor("every_forward")
    x = torch.randn(2, 3, D_HEAD, dtype=torch.float64)
    before = fm.projection.clone()
    fm.train()
    fm(x)
    after_train = fm.projection.clone()
    assert not torch.equal(before, after_train)
    fm.eval()
    fm(x)
    fm(x)
    assert torch.equal(fm.projection, after_train)


def test_favor_every_n_redraws_after_n_forwards():
    """every_n keeps the projection for n - 1 training forwards, redraws at the n-th, counting in a buffer."""
    fm = _favor("every_n", interval=3).train()
    x = torch.randn(2, 3, D_HEAD, dtype=torch.float64)
    first = fm.projection.clone()
    fm(x)
    fm(x)
    assert torch.equal(fm.projection, first)
    fm.eval()
    fm(x)  # eval forwards do not count
    fm.train()
    fm(x)
    second = fm.projection.clone()
    assert not torch.equal(second, first)
    assert int(fm.n_train_forwards) == 3
    fm(x)
    fm(x)
    assert torch.equal(fm.projection, second)
    fm(x)
    assert not torch.equal(fm.projection, second)


def test_favor_fixed_never_redraws():
    """fixed keeps the projection drawn at construction in training mode."""
    fm = _favor("fixed").train()
    first = fm.projection.clone()
    for _ in range(3):
        fm(torch.randn(2, D_HEAD, dtype=torch.float64))
    assert torch.equal(fm.projection, first)


def test_favor_redraw_uses_global_rng():
    """Redraws come from the global torch RNG, so restoring its state reproduces them."""
    fm = _favor("every_forward").train()
    x = torch.randn(2, D_HEAD, dtype=torch.float64)
    rng = torch.get_rng_state()
    fm(x)
    first = fm.projection.clone()
    torch.set_rng_state(rng)
    fm(x)
    assert torch.equal(fm.projection, first)


def test_favor_forward_keeps_earlier_graph_valid():
    """A redraw does not break the backward of a graph built before it (the forward uses a copy)."""
    fm = _favor("every_forward").train()
    x = torch.randn(2, D_HEAD, dtype=torch.float64, requires_grad=True)
    loss = fm(x).sum() + fm(x).sum()
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_favor_state_dict_roundtrip():
    """Projection and forward count are in the state_dict; loading them reproduces outputs and redraws."""
    fm = _favor("every_n", interval=2).train()
    x = torch.randn(2, 3, D_HEAD, dtype=torch.float64)
    fm(x)
    sd = fm.state_dict()
    assert set(sd) == {"projection", "n_train_forwards"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = _favor("every_n", interval=2)
    other.load_state_dict(torch.load(buf))
    fm.eval()
    other.eval()
    torch.testing.assert_close(other(x), fm(x), rtol=0, atol=0)
    loaded = other.projection.clone()
    fm.train()
    other.train()
    rng = torch.get_rng_state()
    fm(x)
    torch.set_rng_state(rng)
    other(x)  # the second training forward of both: the resumed count makes both redraw here
    assert int(other.n_train_forwards) == 2
    assert not torch.equal(other.projection, loaded)
    assert torch.equal(other.projection, fm.projection)


def test_favor_large_inputs_stay_finite():
    """The per-token stabiliser keeps features finite and non-zero for large inputs in float32."""
    fm = FavorFeatureMap(16, n_features=8, redraw="fixed")
    phi = fm(100 * torch.randn(5, 16))
    assert torch.isfinite(phi).all()
    assert (phi.amax(-1) > 0).all()
