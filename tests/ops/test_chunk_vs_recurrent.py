"""Every fast form of each op against the recurrent reference, in float64."""

from __future__ import annotations

import pytest
import torch

from lmtool.ops.delta_rule import delta_rule_chunk
from lmtool.ops.sum_rule import sum_rule_chunk

CHUNK_FORMS = {"delta_rule": delta_rule_chunk, "sum_rule": sum_rule_chunk}
OPS = ["delta_rule", "sum_rule"]


def _param(B, H, L, Dk, Dv, chunk):
    return pytest.param((B, H, L, Dk, Dv), chunk, id=f"B{B}-H{H}-L{L}-Dk{Dk}-Dv{Dv}-C{chunk or 'default'}")


SHAPES = [
    _param(2, 3, 37, 8, 5, 16),  # L not a multiple of the chunk, Dk != Dv
    _param(2, 2, 48, 6, 6, 16),  # L a multiple of the chunk
    _param(1, 2, 5, 4, 7, 16),  # L smaller than one chunk
    _param(1, 1, 1, 3, 2, 16),  # a single token
    _param(1, 2, 100, 8, 8, None),  # the default chunk size, with a padded second chunk
]


def assert_all_close(actual: list[torch.Tensor], expected: list[torch.Tensor], names: list[str], **tol):
    assert len(actual) == len(expected)
    for a, e, name in zip(actual, expected, names, strict=True):
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}", **tol)


def names_for(op: str, initial_state: bool = True) -> list[str]:
    grads = ["dq", "dk", "dv", "dbeta"] if op == "delta_rule" else ["dq", "dk", "dv"]
    return ["o", "final_state", *grads, *(["d_initial_state"] if initial_state else [])]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape, chunk", SHAPES)
def test_chunk_matches_recurrent(make_case, op, shape, chunk):
    """The chunk form gives the reference's outputs, final state and all gradients, from a non-zero state."""
    case = make_case(op, *shape)
    kwargs = {} if chunk is None else {"chunk_size": chunk}
    expected = case.outputs_and_grads(impl="recurrent", scale=0.7)
    actual = case.outputs_and_grads(CHUNK_FORMS[op], scale=0.7, **kwargs)
    assert_all_close(actual, expected, names_for(op), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("op", OPS)
def test_chunk_matches_recurrent_without_state(make_case, op):
    """With no initial state and the final state unused, the chunk form still matches the reference."""
    case = make_case(op, 2, 2, 29, 6, 4, seed=1)
    results = []
    for impl in ("recurrent", "chunk"):
        leaves = [x.clone().requires_grad_() for x in case.inputs()]
        o, S = case.call(inputs=leaves, impl=impl)
        assert S is None
        results.append([o, *torch.autograd.grad((o * case.grad_o).sum(), leaves)])
    names = ["o", "dq", "dk", "dv", "dbeta"][: len(results[0])]
    assert_all_close(results[1], results[0], names, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("op", OPS)
def test_auto_uses_a_form_that_matches_recurrent(make_case, op):
    """impl='auto' (the default) agrees with the reference."""
    case = make_case(op, 1, 2, 70, 8, 8, seed=2)
    expected = case.outputs_and_grads(impl="recurrent")
    assert_all_close(case.outputs_and_grads(), expected, names_for(op), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_two_half_segments_equal_one_pass(make_case, op, impl):
    """Running two segments with the state carried over gives the same outputs and final state as one pass."""
    case = make_case(op, 2, 2, 45, 6, 5, seed=3)
    kwargs = {"impl": impl, "scale": 0.5, "output_final_state": True}
    o_full, s_full = case.call(initial_state=case.s0, **kwargs)
    first = [x[:, :, :19] for x in case.inputs()]
    second = [x[:, :, 19:] for x in case.inputs()]
    o1, s1 = case.call(inputs=first, initial_state=case.s0, **kwargs)
    o2, s2 = case.call(inputs=second, initial_state=s1, **kwargs)
    torch.testing.assert_close(torch.cat([o1, o2], dim=2), o_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s_full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_chunk_form(make_case, op):
    """The hand-written chunk backward passes torch.autograd.gradcheck (two chunks, one padded)."""
    case = make_case(op, 1, 1, 6, 3, 2, seed=4)
    leaves = [x.clone().requires_grad_() for x in case.inputs()]
    s0 = case.s0.clone().requires_grad_()

    def fn(*args):
        *inputs, state = args
        return CHUNK_FORMS[op](*inputs, initial_state=state, output_final_state=True, scale=0.9, chunk_size=4)

    assert torch.autograd.gradcheck(fn, (*leaves, s0))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_half_precision_inputs(make_case, op, dtype, impl):
    """Half-precision inputs run forward and backward, keep their dtypes and stay close to float64."""
    case = make_case(op, 1, 2, 40, 16, 16, dtype=dtype, seed=5)
    reference = make_case(op, 1, 2, 40, 16, 16, seed=5)
    for name in ("q", "k", "v", "beta"):  # the float64 reference sees the same rounded inputs
        setattr(reference, name, getattr(case, name).double())
    leaves = [x.clone().requires_grad_() for x in case.inputs()]
    o, S = case.call(inputs=leaves, impl=impl, initial_state=case.s0.float(), output_final_state=True)
    o_ref, S_ref = reference.call(impl="recurrent", initial_state=reference.s0, output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    assert (o.double() - o_ref).abs().max() <= 2e-2 * o_ref.abs().max()
    assert (S.double() - S_ref).abs().max() <= 1e-4 * S_ref.abs().max()
    loss = (o.float() * case.grad_o.float()).sum() + (S * case.grad_s.float()).sum()
    for g in torch.autograd.grad(loss, leaves):
        assert g.dtype == dtype and torch.isfinite(g.float()).all()


@pytest.mark.parametrize("op", OPS)
def test_chunk_backward_saves_no_per_token_states(make_case, op):
    """The chunk form saves O(L*(d + C) + (L/C)*d^2) numbers for backward, not L per-token d x d states."""
    B, H, L, D, C = 1, 1, 256, 32, 32
    case = make_case(op, B, H, L, D, D, dtype=torch.float32, seed=6)

    def saved_numel(fn, **kwargs):
        leaves = [x.clone().requires_grad_() for x in case.inputs()]
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            case.call(fn, leaves, **kwargs)
        return sum(sizes)

    chunked = saved_numel(CHUNK_FORMS[op], chunk_size=C)
    # q, k, v, beta, X (L x C), U' (L x D) and one state per chunk.
    bound = B * H * (L * (4 * D + C + 1) + (L // C) * D * D)
    assert chunked <= bound
    per_token_states = B * H * L * D * D
    assert saved_numel(None, impl="recurrent") >= per_token_states > 4 * chunked


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_empty_sequence(make_case, op, impl):
    """L = 0 gives an empty output and returns the initial state, through which the gradient flows."""
    case = make_case(op, 2, 3, 0, 4, 5)
    s0 = case.s0.clone().requires_grad_()
    o, S = case.call(impl=impl, initial_state=s0, output_final_state=True)
    assert o.shape == (2, 3, 0, 5) and o.dtype == torch.float64
    torch.testing.assert_close(S, case.s0)
    (S * case.grad_s).sum().backward()
    torch.testing.assert_close(s0.grad, case.grad_s)
    _, S_zero = case.call(impl=impl, output_final_state=True)
    assert torch.equal(S_zero, torch.zeros_like(case.s0))


@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_delta_rule_with_beta_one_overwrites_the_stored_value(make_case, impl):
    """With beta = 1 the delta rule replaces the value stored under a unit key instead of adding to it."""
    case = make_case("delta_rule", 1, 1, 2, 4, 3)
    key = torch.nn.functional.normalize(torch.randn(4, dtype=torch.float64), dim=0)
    k = key.expand(1, 1, 2, 4).contiguous()
    beta = torch.ones(1, 1, 2, dtype=torch.float64)
    o, _ = case.call(inputs=[k, k, case.v, beta], impl=impl)
    torch.testing.assert_close(o[0, 0], case.v[0, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_chunk_accepts_non_contiguous_inputs(make_case, op):
    """Inputs that are transposed views of [B, L, H, D] tensors (as a layer produces) give the same results."""
    case = make_case(op, 2, 3, 21, 5, 4, seed=7)
    expected = case.outputs_and_grads(CHUNK_FORMS[op], chunk_size=8)
    for name in ("q", "k", "v", "beta"):
        x = getattr(case, name)
        setattr(case, name, x.transpose(1, 2).contiguous().transpose(1, 2))
    assert not case.q.is_contiguous()
    actual = case.outputs_and_grads(CHUNK_FORMS[op], chunk_size=8)
    assert_all_close(actual, expected, names_for(op), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_chunk_gradient_for_a_subset_of_inputs(make_case, op):
    """When only v requires grad, the chunk form returns the reference's dv."""
    case = make_case(op, 1, 2, 19, 4, 3, seed=8)
    grads = []
    for impl in ("recurrent", "chunk"):
        inputs = case.inputs()
        inputs[2] = inputs[2].clone().requires_grad_()
        o, _ = case.call(inputs=inputs, impl=impl, initial_state=case.s0)
        grads.append(torch.autograd.grad((o * case.grad_o).sum(), inputs[2])[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-10)
