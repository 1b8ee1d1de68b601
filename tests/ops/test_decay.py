"""The per-token log-decay ``g`` of both ops: every form against the recurrent reference in float64."""

from __future__ import annotations

import pytest
import torch

from lmtool.ops import delta_rule, sum_rule
from tests.ops.test_chunk_vs_recurrent import CHUNK_FORMS, OPS, SHAPES, assert_all_close

# the largest log-decay magnitude: 0 (g = 0 through the decay's code), moderate, and strong (alpha >= e^-20)
DECAYS = [pytest.param(0.0, id="g0"), pytest.param(3.0, id="g-3"), pytest.param(20.0, id="g-20")]


def names_for(op: str) -> list[str]:
    grads = ["dq", "dk", "dv", "dbeta"] if op == "delta_rule" else ["dq", "dk", "dv"]
    return ["o", "final_state", *grads, "dg", "d_initial_state"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("shape, chunk", SHAPES)
def test_decayed_chunk_matches_recurrent(make_case, op, decay, shape, chunk):
    """With a decay the chunk form gives the reference's outputs, final state and all gradients including dg."""
    case = make_case(op, *shape, decay=decay)
    kwargs = {} if chunk is None else {"chunk_size": chunk}
    expected = case.outputs_and_grads(impl="recurrent", scale=0.7)
    actual = case.outputs_and_grads(CHUNK_FORMS[op], scale=0.7, **kwargs)
    assert_all_close(actual, expected, names_for(op), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_zero_decay_is_the_undecayed_op(make_case, op, impl):
    """g = 0 gives the results of g = None (and dg is then the gradient of the unit decay)."""
    case = make_case(op, 2, 2, 37, 6, 5, seed=1, decay=0.0)
    decayed = case.outputs_and_grads(impl=impl)
    case.g = None
    plain = case.outputs_and_grads(impl=impl)
    names = names_for(op)
    keep = [i for i, n in enumerate(names) if n != "dg"]
    assert_all_close([decayed[i] for i in keep], plain, [names[i] for i in keep], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_decay_forgets_the_past(make_case, op):
    """A decay of exp(-inf) = 0 at token t erases the state: later outputs are those of a run started at t."""
    case = make_case(op, 1, 2, 20, 4, 3, seed=2, decay=1.0)
    case.g = case.g.clone()
    case.g[..., 9] = float("-inf")
    o, S = case.call(CHUNK_FORMS[op], chunk_size=8, initial_state=case.s0, output_final_state=True)
    later = [x[:, :, 9:] for x in case.inputs()]
    o_fresh, S_fresh = case.call(inputs=later, g=case.g[..., 9:].clamp_min(-1e3), impl="recurrent",
                                 output_final_state=True)  # fmt: skip
    torch.testing.assert_close(o[:, :, 9:], o_fresh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, S_fresh, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_decayed_chunk_form(make_case, op):
    """The decayed chunk backward passes torch.autograd.gradcheck, g included (two chunks, one padded)."""
    case = make_case(op, 1, 1, 7, 3, 2, seed=4, decay=2.0)
    leaves = [x.clone().requires_grad_() for x in (*case.inputs(), case.g, case.s0)]

    def fn(*args):
        *inputs, g, state = args
        return CHUNK_FORMS[op](*inputs, g=g, initial_state=state, output_final_state=True, scale=0.9, chunk_size=4)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_decayed_half_segments_equal_one_pass(make_case, op, impl):
    """Two segments with the state carried give the outputs and final state of one pass, with a decay."""
    case = make_case(op, 2, 2, 45, 6, 5, seed=3, decay=2.0)
    kwargs = {"impl": impl, "output_final_state": True}
    o_full, s_full = case.call(initial_state=case.s0, **kwargs)
    o1, s1 = case.call(inputs=[x[:, :, :19] for x in case.inputs()], g=case.g[..., :19], initial_state=case.s0,
                       **kwargs)  # fmt: skip
    o2, s2 = case.call(inputs=[x[:, :, 19:] for x in case.inputs()], g=case.g[..., 19:], initial_state=s1, **kwargs)
    torch.testing.assert_close(torch.cat([o1, o2], dim=2), o_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s_full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("decay", [pytest.param(0.01, id="slow"), pytest.param(20.0, id="strong")])
def test_float32_decayed_chunk_stays_close_over_long_sequences(make_case, op, decay):
    """In float32 over 1024 tokens the decayed chunk form stays within 1e-4 (relative) of the float64 reference,
    for slow decays (long memory) and strong ones (alpha down to e^-20)."""
    ref = make_case(op, 1, 2, 1024, 16, 16, seed=5, decay=decay)
    o_ref, S_ref = ref.call(impl="recurrent", initial_state=ref.s0, output_final_state=True)
    inputs = [x.float() for x in ref.inputs()]
    o, S = ref.call(CHUNK_FORMS[op], inputs=inputs, g=ref.g.float(), initial_state=ref.s0.float(),
                    output_final_state=True)  # fmt: skip
    assert (o.double() - o_ref).abs().max() <= 1e-4 * o_ref.abs().max()
    assert (S.double() - S_ref).abs().max() <= 1e-4 * S_ref.abs().max()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_bfloat16_inputs_with_a_float32_decay(make_case, op, impl):
    """bf16 q/k/v/beta with a float32 g keep their dtypes, get finite gradients and a float32 dg."""
    case = make_case(op, 1, 2, 40, 8, 8, dtype=torch.bfloat16, seed=6)
    g = (-torch.rand(1, 2, 40)).requires_grad_()
    leaves = [x.clone().requires_grad_() for x in case.inputs()]
    o, S = case.call(inputs=leaves, g=g, impl=impl, output_final_state=True)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    grads = torch.autograd.grad(o.float().sum() + S.sum(), [*leaves, g])
    assert [x.dtype for x in grads] == [*(x.dtype for x in leaves), torch.float32]
    assert all(torch.isfinite(x.float()).all() for x in grads)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad_input", ["g", "q", "v", "grad"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_decayed_chunk_keeps_bad_values_where_the_recurrent_form_does(make_case, op, bad_input, value):
    """A NaN or inf in g, an input or the incoming gradient: the chunk form gives the recurrent form's pattern
    of finite and non-finite entries in every output and gradient, and its values where finite."""
    case = make_case(op, 1, 2, 13, 3, 2, seed=7, decay=1.0)
    if bad_input == "grad":
        case.grad_o = case.grad_o.clone()
        case.grad_o[0, 1, 6, 0] = value
    else:
        setattr(case, bad_input, getattr(case, bad_input).clone())
        getattr(case, bad_input)[0, 1, 6] = value
    expected = case.outputs_and_grads(impl="recurrent")
    actual = case.outputs_and_grads(CHUNK_FORMS[op], chunk_size=4)
    for a, e, name in zip(actual, expected, names_for(op), strict=True):
        finite = torch.isfinite(e)
        assert torch.equal(torch.isfinite(a), finite), f"{name}: finiteness differs from the recurrent form"
        torch.testing.assert_close(a[finite], e[finite], rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("op", OPS)
def test_decayed_chunk_saves_no_per_token_states(make_case, op):
    """With a decay the chunk form still saves O(L (d + C) + (L / C) d^2) numbers, not L states of d x d."""
    B, H, L, D, C = 1, 1, 256, 32, 32
    case = make_case(op, B, H, L, D, D, dtype=torch.float32, seed=8, decay=1.0)
    case.g = case.g.float()
    leaves = [x.clone().requires_grad_() for x in case.inputs()]
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        case.call(CHUNK_FORMS[op], leaves, chunk_size=C)
    # q, k, v, beta, g, the decay factors a and D (L x C), X (L x C), U' (L x D) and one state per chunk.
    assert sum(sizes) <= B * H * (L * (4 * D + 2 * C + 3) + (L // C) * D * D)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_empty_sequence_with_a_decay(make_case, op, impl):
    """L = 0 with a g of shape [B, H, 0] returns the initial state, and g gets an (empty) gradient."""
    case = make_case(op, 2, 3, 0, 4, 5, decay=1.0)
    g = case.g.clone().requires_grad_()
    s0 = case.s0.clone().requires_grad_()
    o, S = case.call(g=g, impl=impl, initial_state=s0, output_final_state=True)
    assert o.shape == (2, 3, 0, 5)
    dg, ds0 = torch.autograd.grad((S * case.grad_s).sum() + o.sum(), [g, s0])
    assert dg.shape == g.shape
    torch.testing.assert_close(ds0, case.grad_s)


@pytest.mark.parametrize(
    "g, message",
    [
        (torch.zeros(2, 3, 4), r"g \(log-decay\) must have shape \[B, H, L\] = \[2, 3, 5\], got \(2, 3, 4\)"),
        (torch.zeros(2, 3, 5, dtype=torch.bfloat16), "must be float32 or float64, got torch.bfloat16"),
    ],
    ids=["shape", "dtype"],
)
@pytest.mark.parametrize("op", [delta_rule, sum_rule], ids=["delta_rule", "sum_rule"])
def test_bad_decay_is_a_one_line_error(op, g, message):
    """A g of the wrong shape or a half-precision g is refused with a one-line ValueError naming it."""
    q = k = torch.randn(2, 3, 5, 4)
    v = torch.randn(2, 3, 5, 6)
    args = (q, k, v, torch.rand(2, 3, 5)) if op is delta_rule else (q, k, v)
    with pytest.raises(ValueError, match=message):
        op(*args, g=g)
