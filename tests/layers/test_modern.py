"""Modern delta-layer options: short convolution with a carried tail, DeltaProduct, head RMSNorm, output gate,
decay gate (Gated DeltaNet and the gated sum rule)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmtool.layers.fast_weight import FastWeightAttention
from lmtool.layers.feature_maps import make_feature_map
from lmtool.layers.modern import DecayGate, ShortConvolution

D_MODEL, N_HEAD, D_HEAD = 12, 2, 4


def test_short_convolution_matches_a_loop_and_carries_its_tail():
    """y_t = silu(sum_i w_i x_{t-K+1+i}) with zeros before the start; two halves with the tail equal one pass."""
    torch.manual_seed(0)
    conv = ShortConvolution(5, 3).double()
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    padded = torch.cat([torch.zeros(2, 2, 5, dtype=torch.float64), x], dim=1)
    w = conv.weight[:, 0]  # [C, K]
    expected = torch.stack([F.silu((padded[:, t : t + 3] * w.T).sum(1)) for t in range(7)], dim=1)
    y, tail = conv(x)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(tail, x[:, -2:])
    y1, mid = conv(x[:, :4])
    y2, end = conv(x[:, 4:], mid)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(end, tail)


def make_layer(rule="delta_product", n=2, fm="silu", qk_norm="l2", **kwargs):
    torch.manual_seed(1)
    layer = FastWeightAttention(
        D_MODEL, N_HEAD, D_HEAD, 0.0, update_rule=rule, feature_map=make_feature_map(fm, D_HEAD),
        qk_norm=qk_norm, attn_norm=False, n_householder=n if rule == "delta_product" else 1, **kwargs,
    )  # fmt: skip
    for p in layer.parameters():  # away from the LM's small init, so that every term matters
        torch.nn.init.normal_(p, 0.0, 0.5)
    return layer.double().eval()


def reference(layer, x):
    """DeltaProduct's equations as a loop: per token, the decay S <- exp(g_t) S (with a decay gate), then n_h
    delta steps S <- S + beta_j k_j (v_j - S^T k_j)^T (sum rule: S <- S + k v^T), then o = S^T q / sqrt(d_head);
    optional conv, head RMSNorm and gate as documented."""
    B, L, _ = x.shape
    H, D, n = N_HEAD, D_HEAD, layer.n_householder
    proj = x @ layer.qkv.weight.T
    if layer.conv is not None:
        K = layer.conv.kernel_size
        padded = torch.cat([proj.new_zeros(B, K - 1, proj.shape[-1]), proj], 1)
        w = layer.conv.weight[:, 0]
        proj = torch.stack([F.silu((padded[:, t : t + K] * w.T).sum(1)) for t in range(L)], 1)
    q, k, v = proj.split([H * D, n * H * D, n * H * D], -1)
    q, k, v = q.view(B, L, H, D), k.view(B, L, n, H, D), v.view(B, L, n, H, D)
    if layer.beta is not None:
        beta = torch.sigmoid(x @ layer.beta.weight.T).view(B, L, n, H) * (2 if layer.allow_neg_eigval else 1)
    if layer.decay_gate is not None:  # g_t = -exp(A_log) softplus(W_a x_t + dt_bias), [B, L, H]
        gate = layer.decay_gate
        g = -gate.A_log.exp() * F.softplus(x @ gate.proj.weight.T + gate.dt_bias)
    phi = layer.feature_map

    def unit(t):
        return phi(t) / phi(t).norm(dim=-1, keepdim=True).clamp_min(layer.eps)

    S = x.new_zeros(B, H, D, D)
    outs = []
    for t in range(L):
        if layer.decay_gate is not None:
            S = g[:, t].exp()[:, :, None, None] * S
        for j in range(n):
            kj = unit(k[:, t, j])
            if layer.beta is None:
                u = v[:, t, j]
            else:
                u = beta[:, t, j, :, None] * (v[:, t, j] - torch.einsum("bhkv,bhk->bhv", S, kj))
            S = S + torch.einsum("bhk,bhv->bhkv", kj, u)
        o = torch.einsum("bhkv,bhk->bhv", S, unit(q[:, t])) * D**-0.5
        if layer.head_norm is not None:
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.head_norm.eps) * layer.head_norm.weight
        outs.append(o.reshape(B, H * D))
    o = torch.stack(outs, 1)
    if layer.gate is not None:
        o = o * F.silu(x @ layer.gate.weight.T)
    return o @ layer.out.weight.T, S


OPTIONS = {
    "product2": {},
    "product3-negeig": {"n": 3, "allow_neg_eigval": True},
    "product2-conv-norm-gate": {"short_conv": 3, "head_norm": True, "output_gate": True},
    "delta-conv-gate": {"rule": "delta", "short_conv": 4, "output_gate": True},
    "gated-delta": {"rule": "delta", "decay": True},
    "gated-sum-conv": {"rule": "sum", "decay": True, "short_conv": 3},
    "gated-product2-conv-norm": {"decay": True, "short_conv": 3, "head_norm": True},
}


@pytest.mark.parametrize("kwargs", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_matches_the_loop_reference(kwargs, impl):
    """Outputs and the final fast weights equal the per-token loop of the equations (float64)."""
    layer = make_layer(**kwargs, impl=impl)
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    y, (S, z, _) = layer(x, return_state=True)
    y_ref, S_ref = reference(layer, x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(S, S_ref)
    assert z is None


@pytest.mark.parametrize("kwargs", OPTIONS.values(), ids=OPTIONS.keys())
def test_two_halves_with_carried_state_equal_one_pass(kwargs):
    """Fast weights and the convolution tail carried across segments give one pass's outputs and state."""
    layer = make_layer(**kwargs)
    x = torch.randn(2, 10, D_MODEL, dtype=torch.float64)
    y, state = layer(x, return_state=True)
    y1, mid = layer(x[:, :3], return_state=True)
    y2, end = layer(x[:, 3:], mid, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    for a, b in zip(end, state, strict=True):
        assert (a is None and b is None) or torch.allclose(a, b)


def test_one_householder_step_is_the_delta_rule():
    """delta_product with n_householder=1 computes the delta rule with the same weights."""
    product, delta = make_layer(n=1), make_layer(rule="delta")
    delta.load_state_dict(product.state_dict())
    x = torch.randn(2, 6, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(product(x)[0], delta(x)[0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"update_rule": "delta", "n_householder": 2}, "n_householder"),
        ({"update_rule": "sum", "allow_neg_eigval": True}, "allow_neg_eigval"),
        ({"update_rule": "delta_product", "short_conv": -1}, "short_conv"),
        ({"update_rule": "delta", "decay": True, "attn_norm": True}, "decaying state needs attn_norm=false"),
        ({"update_rule": "delta", "decay": True, "attn_norm": False, "normalized_retrieval": True}, "decaying state"),
    ],
    ids=["householder-without-product", "negeig-sum", "conv-size", "decay-normaliser", "decay-retrieval"],
)
def test_bad_modern_options_fail_at_construction(kwargs, match):
    """Incompatible modern options are refused by the constructor with a message naming them."""
    with pytest.raises(ValueError, match=match):
        FastWeightAttention(D_MODEL, N_HEAD, D_HEAD, 0.0, feature_map=make_feature_map("silu", 4), qk_norm="l2",
                            **kwargs)  # fmt: skip


def test_decay_gate_initialisation_and_range():
    """A = exp(A_log) lies in (0, 16], softplus(dt_bias) in [1e-3, 0.1], and every log-decay g is <= 0."""
    torch.manual_seed(2)
    gate = DecayGate(D_MODEL, 64)
    A, dt = gate.A_log.exp(), F.softplus(gate.dt_bias)
    assert (A > 0).all() and (A <= 16).all() and A.max() > 8 and A.min() < 8
    assert (dt >= 1e-3 * (1 - 1e-6)).all() and (dt <= 0.1 * (1 + 1e-6)).all()
    g = gate(torch.randn(3, 5, D_MODEL) * 10)
    assert g.shape == (3, 64, 5) and g.dtype == torch.float32 and (g <= 0).all()


def test_decay_gate_keeps_its_initialisation_in_the_lm():
    """The LM's normal init leaves the gate's A and dt ranges as the paper sets them."""
    from lmtool.models.build import build_model
    from tests.helpers import compose_config

    torch.manual_seed(3)
    model = build_model(compose_config("debug=smoke", "update_rule=gated_delta", "feature_map=identity"), 20)
    gate = model.blocks[0].mixer.decay_gate
    assert (gate.A_log.exp() > 0).all() and (F.softplus(gate.dt_bias) >= 1e-3 * (1 - 1e-6)).all()
    assert (F.softplus(gate.dt_bias) <= 0.1 * (1 + 1e-6)).all()
