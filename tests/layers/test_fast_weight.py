"""FastWeightAttention against a plain per-token step loop written from the equations."""

from __future__ import annotations

import pytest
import torch

from lmtool.layers.fast_weight import FastWeightAttention
from lmtool.layers.feature_maps import make_feature_map

D_MODEL, N_HEAD, D_HEAD = 8, 2, 4


def make_layer(
    update_rule="delta",
    qk_norm="sum",
    attn_norm=True,
    normalized_retrieval=False,
    fm="elu",
    impl="auto",
    dtype=torch.float64,
    **fm_kwargs,
):
    """A tiny layer in eval mode (no dropout, no FAVOR+ redraws) with seeded weights."""
    torch.manual_seed(0)
    layer = FastWeightAttention(
        D_MODEL,
        N_HEAD,
        D_HEAD,
        0.0,
        update_rule=update_rule,
        feature_map=make_feature_map(fm, D_HEAD, **fm_kwargs),
        qk_norm=qk_norm,
        attn_norm=attn_norm,
        normalized_retrieval=normalized_retrieval,
        impl=impl,
    )
    for p in layer.parameters():  # larger than the LM's init so that every term matters
        torch.nn.init.normal_(p, 0.0, 0.5)
    return layer.to(dtype).eval()


def random_state(layer, B, dtype=torch.float64, requires_grad=False):
    """A non-zero carried state: any S, a positive key sum z (a sum of non-negative features)."""
    S = 0.5 * torch.randn(B, N_HEAD, layer.d_dot, D_HEAD, dtype=dtype)
    z = torch.rand(B, N_HEAD, layer.d_dot, dtype=dtype) + 0.5
    return S.requires_grad_(requires_grad), z.requires_grad_(requires_grad)


def reference(layer, x, state):
    """The layer's equations as a per-token loop; returns (y, (S_T, z_T))."""
    B, L, _ = x.shape
    eps = layer.eps
    q, k, v = (x @ layer.qkv.weight.T).view(B, L, 3, N_HEAD, D_HEAD).unbind(2)  # [B, L, H, D]
    beta = torch.sigmoid(x @ layer.beta.weight.T) if layer.update_rule == "delta" else None  # [B, L, H]

    def norm(phi):
        if layer.qk_norm == "sum":
            return phi / phi.sum(-1, keepdim=True).clamp_min(eps)
        if layer.qk_norm == "l2":
            return phi / phi.norm(dim=-1, keepdim=True).clamp_min(eps)
        return phi

    if state is None:
        S = torch.zeros(B, N_HEAD, layer.d_dot, D_HEAD, dtype=x.dtype)
        z = torch.zeros(B, N_HEAD, layer.d_dot, dtype=x.dtype)
    else:
        S, z = state
        z = torch.zeros(B, N_HEAD, layer.d_dot, dtype=x.dtype) if z is None else z  # tracked, not returned
    outs = []
    for t in range(L):
        phi_q, phi_k = norm(layer.feature_map(q[:, t])), norm(layer.feature_map(k[:, t]))  # [B, H, d_dot]
        if layer.update_rule == "delta":
            v_old = torch.einsum("bhkv,bhk->bhv", S, phi_k)
            if layer.normalized_retrieval:
                v_old = v_old / ((z * phi_k).sum(-1, keepdim=True).clamp_min(0) + eps)
            u = beta[:, t].unsqueeze(-1) * (v[:, t] - v_old)
        else:
            u = v[:, t]
        S = S + phi_k.unsqueeze(-1) * u.unsqueeze(-2)
        z = z + phi_k
        o = layer.scale * torch.einsum("bhkv,bhk->bhv", S, phi_q)
        if layer.attn_norm:
            o = o / ((z * phi_q).sum(-1, keepdim=True) + eps)
        outs.append(o.reshape(B, N_HEAD * D_HEAD))
    y = torch.stack(outs, dim=1) @ layer.out.weight.T
    return y, (S, z if layer.carries_z else None)


def _loss(y, state, weights):
    """A scalar that reaches y and both parts of the final state."""
    wy, wS, wz = weights
    S, z = state[:2]
    total = (y * wy).sum() + (S * wS).sum()
    return total + (z * wz).sum() if z is not None else total


def _grads(layer, x, state, loss):
    inputs = [x, *state, *layer.parameters()]
    return torch.autograd.grad(loss, inputs)


def _config_id(rule, qk, attn_norm, norm_retrieval):
    return f"{rule}-qk_{qk}-attn_norm_{'on' if attn_norm else 'off'}" + ("-norm_retrieval" * norm_retrieval)


CONFIGS = [
    pytest.param(rule, qk, an, nr, id=_config_id(rule, qk, an, nr))
    for rule in ("sum", "delta")
    for qk in ("sum", "l2", "none")
    for an in (True, False)
    for nr in ((False, True) if rule == "delta" else (False,))
]


@pytest.mark.parametrize("update_rule,qk_norm,attn_norm,normalized_retrieval", CONFIGS)
def test_matches_step_loop_reference(update_rule, qk_norm, attn_norm, normalized_retrieval):
    """Outputs, final state and gradients of every input and parameter equal the step-loop reference."""
    layer = make_layer(update_rule, qk_norm, attn_norm, normalized_retrieval)
    B, L = 2, 6
    x = torch.randn(B, L, D_MODEL, dtype=torch.float64, requires_grad=True)
    state = random_state(layer, B, requires_grad=True)
    if not layer.carries_z:
        state = (state[0], None)
    y, new_state = layer(x, state, return_state=True)
    y_ref, state_ref = reference(layer, x, state)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(new_state[0], state_ref[0])
    assert (new_state[1] is None) == (not layer.carries_z)
    if layer.carries_z:
        torch.testing.assert_close(new_state[1], state_ref[1])

    weights = [None if t is None else torch.randn_like(t) for t in (y, *state_ref)]
    grads = _grads(layer, x, [s for s in state if s is not None], _loss(y, new_state, weights))
    grads_ref = _grads(layer, x, [s for s in state if s is not None], _loss(y_ref, state_ref, weights))
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize(
    "fm,kwargs",
    [("favor", {"n_features": 3}), ("dpfp", {"nu": 2}), ("relu", {})],
    ids=["favor-m3", "dpfp-nu2", "relu"],
)
@pytest.mark.parametrize("normalized_retrieval", [False, True], ids=["plain", "norm_retrieval"])
def test_feature_maps_in_layer(fm, kwargs, normalized_retrieval):
    """The layer with FAVOR+, DPFP or relu features matches the reference (delta rule, both retrievals)."""
    layer = make_layer("delta", "sum", True, normalized_retrieval, fm=fm, **kwargs)
    assert layer.d_dot == layer.feature_map.d_dot
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    state = random_state(layer, 2)
    y, (S, z, _) = layer(x, state, return_state=True)
    y_ref, (S_ref, z_ref) = reference(layer, x, state)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(S, S_ref)
    torch.testing.assert_close(z, z_ref)


@pytest.mark.parametrize(
    "update_rule,normalized_retrieval,attn_norm",
    [("sum", False, True), ("delta", False, True), ("delta", True, True), ("delta", True, False)],
    ids=["sum", "delta", "delta-norm_retrieval", "delta-norm_retrieval-attn_norm_off"],
)
def test_two_halves_with_carried_state_equal_one_pass(update_rule, normalized_retrieval, attn_norm):
    """Running two half segments with the state carried gives the output and state of one full pass."""
    layer = make_layer(update_rule, "sum", attn_norm, normalized_retrieval)
    x = torch.randn(2, 8, D_MODEL, dtype=torch.float64)
    y, state = layer(x, return_state=True)
    y1, mid = layer(x[:, :4], return_state=True)
    y2, end = layer(x[:, 4:], mid, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y)
    torch.testing.assert_close(end[0], state[0])
    torch.testing.assert_close(end[1], state[1])


def test_state_returned_only_on_request():
    """Without return_state the layer returns None as its state; a zero state equals no state."""
    layer = make_layer()
    x = torch.randn(1, 3, D_MODEL, dtype=torch.float64)
    y, state = layer(x)
    assert state is None
    zeros = (
        torch.zeros(1, N_HEAD, layer.d_dot, D_HEAD).double(),
        torch.zeros(1, N_HEAD, layer.d_dot).double(),
    )
    torch.testing.assert_close(layer(x, zeros)[0], y)


@pytest.mark.parametrize(
    "update_rule,normalized_retrieval",
    [("sum", False), ("delta", False), ("delta", True)],
    ids=["sum", "delta", "delta-norm_retrieval"],
)
def test_recurrent_and_chunk_impls_agree(update_rule, normalized_retrieval):
    """impl=recurrent and impl=chunk give the same layer output, state and gradients over several chunks."""
    x = torch.randn(1, 70, D_MODEL, dtype=torch.float64)  # longer than one 64-token chunk
    results = []
    for impl in ("recurrent", "chunk"):
        layer = make_layer(update_rule, "sum", True, normalized_retrieval, impl=impl)
        state = random_state(layer, 1)
        y, (S, z, _) = layer(x, state, return_state=True)
        (y.sum() + S.sum()).backward()
        results.append([y, S, z, *(p.grad for p in layer.parameters())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_normalized_retrieval_float32_from_zero_state():
    """From a zero state (d = eps at the first token) the float32 layer tracks the float64 reference."""
    layer = make_layer("delta", "sum", True, True, dtype=torch.float32)
    x = torch.randn(2, 70, D_MODEL)
    y, (S, z, _) = layer(x, return_state=True)
    (y.square().sum() + S.sum()).backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    ref = layer.double()
    y_ref, (S_ref, z_ref) = reference(ref, x.double(), None)
    (y_ref.square().sum() + S_ref.sum()).backward()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(S.double(), S_ref, rtol=1e-4, atol=1e-5)
    for g, p in zip(grads, ref.parameters(), strict=True):
        torch.testing.assert_close(g.double(), p.grad, rtol=1e-3, atol=1e-4)


def test_bf16_autocast_forward_is_finite():
    """Under bf16 autocast the forward runs, is finite, and the fast-weight state stays float32."""
    layer = make_layer("delta", "sum", True, True, dtype=torch.float32, fm="favor", n_features=4)
    layer.train()
    x = torch.randn(2, 6, D_MODEL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (S, z, _) = layer(x, return_state=True)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert S.dtype == torch.float32 and z.dtype == torch.float32
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_favor_draws_one_projection_per_forward():
    """In training mode a forward redraws FAVOR+ features once, so queries and keys share them."""
    layer = make_layer(fm="favor", n_features=3).train()
    layer(torch.randn(1, 3, D_MODEL, dtype=torch.float64))
    assert int(layer.feature_map.n_train_forwards) == 1


def test_no_z_without_normaliser():
    """With attn_norm off and plain retrieval the carried state holds no key sum."""
    layer = make_layer("delta", attn_norm=False)
    _, (S, z, _) = layer(torch.randn(1, 3, D_MODEL, dtype=torch.float64), return_state=True)
    assert z is None and S.shape == (1, N_HEAD, layer.d_dot, D_HEAD)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"update_rule": "hebb"}, "update rule"),
        ({"qk_norm": "max"}, "qk_norm"),
        ({"update_rule": "sum", "normalized_retrieval": True}, "delta rule only"),
        ({"normalized_retrieval": True, "qk_norm": "l2", "feature_map": make_feature_map("identity", D_HEAD)},
         "non-negative"),
        ({"qk_norm": "sum", "feature_map": make_feature_map("identity", D_HEAD)}, "signed feature map"),
        ({"eps": 0.0}, "eps must be positive"),
        ({"impl": "triton"}, "unknown impl"),
        ({"n_head": 0}, "n_head must be at least 1"),
        ({"dropout": 1.0}, "dropout must be in"),
    ],
    ids=["bad-rule", "bad-qk_norm", "norm_retrieval-with-sum", "norm_retrieval-signed-map", "sum-norm-signed-map",
         "eps", "impl", "n_head", "dropout"],
)
def test_bad_options_are_rejected(kwargs, match):
    """Unknown or incompatible options fail at construction with a message naming the problem."""
    kwargs = {"feature_map": make_feature_map("elu", D_HEAD), "n_head": N_HEAD, "dropout": 0.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        FastWeightAttention(D_MODEL, d_head=D_HEAD, **kwargs)


def test_state_without_z_is_rejected_when_needed():
    """Passing a state without z to a layer that normalises fails with a message."""
    layer = make_layer()
    with pytest.raises(ValueError, match="key sum"):
        layer(torch.randn(1, 3, D_MODEL, dtype=torch.float64), (random_state(layer, 1)[0], None))
