"""A NaN or inf stays in the tokens that depend on it, and degenerate shapes work, in every form of both ops.

The recurrent form is the spec: every other form must give its finite/non-finite pattern exactly (outputs,
final state and every gradient) and, where finite, its values (float64). What the spec keeps finite is
written down in ``test_recurrent_form_before_the_bad_token`` and in ``lmtool/ops/README.md``. Every case here is
the ``g=None`` one; with a log-decay ``g`` the chunk forms recompute through the recurrent form when a value is
not finite (``test_decay.py``). The CUDA kernels' share of these checks (under
the CPU emulation) is in ``test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from lmtool.ops import cuda, delta_rule, sum_rule
from lmtool.ops.delta_rule import delta_rule_chunk, delta_rule_recurrent
from lmtool.ops.sum_rule import sum_rule_chunk, sum_rule_recurrent

OPS = {"delta_rule": delta_rule, "sum_rule": sum_rule}
CHUNK_FORMS = {"delta_rule": delta_rule_chunk, "sum_rule": sum_rule_chunk}
RECURRENT_FORMS = {"delta_rule": delta_rule_recurrent, "sum_rule": sum_rule_recurrent}
CUDA_FORMS = {"delta_rule": cuda.delta_rule_cuda, "sum_rule": cuda.sum_rule_cuda}
NAN, INF = float("nan"), float("inf")
VALUES = [pytest.param(NAN, id="nan"), pytest.param(INF, id="+inf"), pytest.param(-INF, id="-inf")]
TOKEN_INPUTS = {"delta_rule": ["q", "k", "v", "beta"], "sum_rule": ["q", "k", "v"]}


def names_for(op: str) -> list[str]:
    return ["o", "final_state", "dq", "dk", "dv", *(["dbeta"] if op == "delta_rule" else []), "d_initial_state"]


def make_inputs(op: str, B: int, H: int, L: int, Dk: int, Dv: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """float64 inputs where the delta rule is stable (unit keys, beta in (0, 1)), upstream gradients go, gs."""
    g = torch.Generator().manual_seed(seed)
    x = {
        "q": torch.randn(B, H, L, Dk, generator=g, dtype=torch.float64),
        "k": torch.nn.functional.normalize(torch.randn(B, H, L, Dk, generator=g, dtype=torch.float64), dim=-1),
        "v": torch.randn(B, H, L, Dv, generator=g, dtype=torch.float64),
        "beta": torch.sigmoid(torch.randn(B, H, L, generator=g, dtype=torch.float64)),
        "s0": torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64),
        "go": torch.randn(B, H, L, Dv, generator=g, dtype=torch.float64),
        "gs": torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64),
    }
    if op == "sum_rule":
        del x["beta"]
    return x


def outputs_and_grads(op: str, fn, x: dict[str, torch.Tensor], *, before: int | None = None, **kwargs):
    """``[o, final_state, d inputs..., d initial_state]``; the loss uses the outputs at tokens < ``before`` only,
    or, for ``before=None``, every output and the final state."""
    leaves = [x[n].clone().requires_grad_() for n in TOKEN_INPUTS[op]]
    s0 = x["s0"].clone().requires_grad_()
    o, S = fn(*leaves, initial_state=s0, output_final_state=True, **kwargs)
    if before is None:
        loss = (o * x["go"]).sum() + (S * x["gs"]).sum()
    else:
        loss = (o[:, :, :before] * x["go"][:, :, :before]).sum()
    return [o.detach(), S.detach(), *torch.autograd.grad(loss, [*leaves, s0])]


def assert_same_pattern(actual: list[torch.Tensor], expected: list[torch.Tensor], names: list[str]) -> None:
    """Same finite/non-finite mask everywhere, and equal values where finite (float64 tolerance)."""
    for a, e, name in zip(actual, expected, names, strict=True):
        finite = torch.isfinite(e)
        wrong = torch.isfinite(a) != finite
        assert not wrong.any(), (
            f"{name}: {int(wrong.sum())} entries differ in finiteness from the recurrent form, first at "
            f"{wrong.nonzero()[0].tolist()} (recurrent finite: {bool(finite[wrong][0])})"
        )
        torch.testing.assert_close(a[finite], e[finite], rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


def poison(x: dict[str, torch.Tensor], name: str, index: tuple[int, ...], value: float) -> None:
    x[name] = x[name].clone()
    x[name][index] = value


def chunk_call(op: str, chunk: int | None):
    """The chunk form with ``chunk`` tokens per chunk, or the public op's "auto" (the chunk form on CPU)."""
    if chunk is None:
        return OPS[op], {"impl": "auto"}
    return CHUNK_FORMS[op], {"chunk_size": chunk}


# (L, chunk size, bad token t): where t sits relative to the chunks. None: impl="auto" and its default chunk.
PLACEMENTS = [
    pytest.param(13, 4, 6, id="C4-inside-a-chunk"),
    pytest.param(13, 4, 4, id="C4-first-of-a-chunk"),
    pytest.param(13, 4, 7, id="C4-last-of-a-chunk"),
    pytest.param(13, 4, 0, id="C4-first-token"),
    pytest.param(14, 4, 13, id="C4-last-token-in-a-padded-chunk"),
    pytest.param(9, 16, 5, id="C16-one-padded-chunk"),
    pytest.param(7, 1, 3, id="C1"),
    pytest.param(70, None, 40, id="auto-default-chunk"),
]
LOSSES = [pytest.param(True, id="loss-before-t"), pytest.param(False, id="loss-on-all")]
BAD_TOKEN_CASES = [(op, where) for op in OPS for where in TOKEN_INPUTS[op]]


@pytest.mark.parametrize("op, where", BAD_TOKEN_CASES, ids=[f"{op}-{w}" for op, w in BAD_TOKEN_CASES])
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("L, chunk, t", PLACEMENTS)
@pytest.mark.parametrize("loss_before_t", LOSSES)
def test_chunk_form_keeps_a_bad_token_where_the_recurrent_form_does(op, where, value, L, chunk, t, loss_before_t):
    """One NaN/inf in q, k, v or beta of one token of one sequence: the chunk form's outputs, final state and
    gradients have exactly the recurrent form's finite/non-finite pattern and its finite values."""
    x = make_inputs(op, 2, 2, L, 5, 3)
    poison(x, where, (1, 0, t) if where == "beta" else (1, 0, t, 1), value)
    before = t if loss_before_t else None
    expected = outputs_and_grads(op, RECURRENT_FORMS[op], x, before=before, scale=0.7)
    fn, kwargs = chunk_call(op, chunk)
    actual = outputs_and_grads(op, fn, x, before=before, scale=0.7, **kwargs)
    assert_same_pattern(actual, expected, names_for(op))


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("chunk", [4, 16, None], ids=["C4", "C16", "auto"])
def test_chunk_form_with_a_bad_initial_state_matches_recurrent(op, value, chunk):
    """One NaN/inf in the initial state: the chunk form gives the recurrent form's pattern and finite values."""
    x = make_inputs(op, 2, 2, 13, 5, 3, seed=1)
    poison(x, "s0", (0, 1, 2, 1), value)
    expected = outputs_and_grads(op, RECURRENT_FORMS[op], x, scale=0.7)
    fn, kwargs = chunk_call(op, chunk)
    assert_same_pattern(outputs_and_grads(op, fn, x, scale=0.7, **kwargs), expected, names_for(op))


# Several bad values at once: (name, [(input, index, value)]); "go" and "gs" are the upstream gradients of the
# outputs and of the final state.
SEVERAL = [
    ("v-then-q-in-one-chunk", [("v", (0, 0, 5, 2), NAN), ("q", (0, 0, 6, 0), INF)]),
    ("two-sequences", [("k", (0, 1, 3, 4), -INF), ("v", (1, 0, 9, 0), NAN)]),
    ("every-token-of-one-sequence", [("q", (1, 1), NAN), ("k", (1, 1), NAN), ("v", (1, 1), NAN)]),
    ("initial-state-and-a-token", [("s0", (0, 0, 3, 1), NAN), ("v", (0, 0, 7, 2), INF)]),
    ("output-gradient", [("go", (1, 0, 6, 1), NAN)]),
    ("output-gradient-inf-and-a-token", [("go", (0, 1, 9, 0), INF), ("q", (0, 1, 2, 3), NAN)]),
    ("final-state-gradient", [("gs", (1, 1, 0, 2), NAN)]),
]


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("name, bad", SEVERAL, ids=[c[0] for c in SEVERAL])
@pytest.mark.parametrize("chunk", [4, 16], ids=["C4", "C16"])
def test_chunk_form_with_several_bad_values_matches_recurrent(op, name, bad, chunk):
    """Several NaN/inf at once (also in the incoming gradients): the chunk form matches the recurrent pattern."""
    x = make_inputs(op, 2, 2, 14, 5, 3, seed=2)
    for where, index, value in bad:
        poison(x, where, index, value)
    expected = outputs_and_grads(op, RECURRENT_FORMS[op], x, scale=0.7)
    actual = outputs_and_grads(op, CHUNK_FORMS[op], x, scale=0.7, chunk_size=chunk)
    assert_same_pattern(actual, expected, names_for(op))


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("seed", range(6), ids=[f"seed{s}" for s in range(6)])
def test_chunk_form_with_random_bad_values_matches_recurrent(op, seed):
    """One to four NaN/inf at random places of the inputs and the incoming gradients: same pattern and values."""
    g = torch.Generator().manual_seed(100 + seed)
    x = make_inputs(op, 2, 1, 17, 3, 2, seed=seed)
    names = [*TOKEN_INPUTS[op], "s0", "go"]
    for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
        where = names[int(torch.randint(len(names), (1,), generator=g))]
        index = tuple(int(torch.randint(n, (1,), generator=g)) for n in x[where].shape)
        poison(x, where, index, [NAN, INF, -INF][int(torch.randint(3, (1,), generator=g))])
    expected = outputs_and_grads(op, RECURRENT_FORMS[op], x, scale=0.7)
    actual = outputs_and_grads(op, CHUNK_FORMS[op], x, scale=0.7, chunk_size=4)
    assert_same_pattern(actual, expected, names_for(op))


@pytest.mark.parametrize("op", list(OPS))
def test_chunk_form_inference_keeps_earlier_outputs_finite(op):
    """Without autograd, a NaN value at token t leaves every output before t finite and equal to the clean run's."""
    x = make_inputs(op, 1, 2, 40, 8, 8, seed=3)
    clean = [x[n] for n in TOKEN_INPUTS[op]]
    poison(x, "v", (0, 1, 21), NAN)
    with torch.no_grad():
        o_clean, _ = CHUNK_FORMS[op](*clean, chunk_size=8)
        o, _ = CHUNK_FORMS[op](*(x[n] for n in TOKEN_INPUTS[op]), chunk_size=8)
    torch.testing.assert_close(o[:, :, :21], o_clean[:, :, :21], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(o[:, 0]).all() and not torch.isfinite(o[0, 1, 21:]).any()


# What the spec (the recurrent form) keeps entirely finite at the tokens before a bad token t, for either loss
# (outputs before t only, or everything). The gradients not listed are non-finite somewhere before t: autograd
# multiplies the zero gradient arriving at the bad step by the bad value (0 * nan), and that NaN flows back
# through the state's gradient to every earlier token. "final_state" is over the whole state.
RECURRENT_KEEPS_FINITE = {
    ("delta_rule", "q"): {"o", "final_state", "dq"},
    ("delta_rule", "k"): {"o", "dq"},
    ("delta_rule", "v"): {"o", "dq", "dk", "dv", "dbeta"},
    ("delta_rule", "beta"): {"o", "dq"},
    ("sum_rule", "q"): {"o", "final_state", "dq"},
    ("sum_rule", "k"): {"o", "dq", "dk", "dv"},
    ("sum_rule", "v"): {"o", "dq", "dk", "dv"},
}


@pytest.mark.parametrize("op, where", BAD_TOKEN_CASES, ids=[f"{op}-{w}" for op, w in BAD_TOKEN_CASES])
@pytest.mark.parametrize("loss_before_t", LOSSES)
def test_recurrent_form_before_the_bad_token(op, where, loss_before_t):
    """The spec itself: which outputs, state and gradients at tokens before a NaN at token t stay finite."""
    t = 6
    x = make_inputs(op, 1, 1, 11, 4, 3, seed=4)
    poison(x, where, (0, 0, t) if where == "beta" else (0, 0, t, 1), NAN)
    results = outputs_and_grads(op, RECURRENT_FORMS[op], x, before=t if loss_before_t else None)
    for name, value in zip(names_for(op), results, strict=True):
        if name == "d_initial_state":
            continue
        earlier = value if name == "final_state" else value[:, :, :t]
        expect_finite = name in RECURRENT_KEEPS_FINITE[(op, where)]
        assert bool(torch.isfinite(earlier).all()) == expect_finite, f"{name}: finite = {not expect_finite}"


# --- degenerate shapes ---------------------------------------------------------------------------------------

DEGENERATE = [
    pytest.param((2, 3, 5, 0, 4), id="Dk0"),
    pytest.param((2, 3, 5, 4, 0), id="Dv0"),
    pytest.param((2, 3, 5, 0, 0), id="Dk0-Dv0"),
    pytest.param((2, 1, 70, 0, 3), id="Dk0-L70"),
    pytest.param((1, 2, 70, 3, 0), id="Dv0-L70"),
    pytest.param((0, 3, 5, 4, 4), id="B0"),
    pytest.param((2, 0, 5, 4, 4), id="H0"),
    pytest.param((2, 3, 0, 4, 4), id="L0"),
    pytest.param((0, 0, 0, 0, 0), id="all0"),
]


def _no_build():
    pytest.fail("the CUDA form must not build or launch kernels for a degenerate shape")


def degenerate_call(op: str, form: str, monkeypatch):
    """The function and keyword arguments for ``form``: the public op's impls, or a form called directly."""
    if form in ("recurrent", "chunk", "auto"):
        return OPS[op], {"impl": form}
    if form == "cuda-form":  # registered for CUDA tensors only; called directly on CPU tensors here
        monkeypatch.setattr(cuda, "load_extension", _no_build)
        return CUDA_FORMS[op], {}
    return {"recurrent-form": RECURRENT_FORMS, "chunk-form": CHUNK_FORMS}[form][op], {}


FORMS = ["recurrent", "chunk", "auto", "recurrent-form", "chunk-form", "cuda-form"]


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", DEGENERATE)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("with_state", [True, False], ids=["initial-state", "no-initial-state"])
@pytest.mark.parametrize("final_state", [True, False], ids=["final-state", "no-final-state"])
def test_degenerate_shapes(monkeypatch, op, shape, form, with_state, final_state):
    """Dk, Dv, B, H or L = 0: outputs of the right shape (zeros), the initial state as the final state, and
    gradients of every input's shape (zeros; the final state's gradient reaches the initial state), as the
    recurrent form gives them."""
    B, H, L, Dk, Dv = shape
    x = make_inputs(op, B, H, L, Dk, Dv, seed=5)
    fn, kwargs = degenerate_call(op, form, monkeypatch)
    leaves = [x[n].clone().requires_grad_() for n in TOKEN_INPUTS[op]]
    s0 = x["s0"].clone().requires_grad_() if with_state else None
    o, S = fn(*leaves, initial_state=s0, output_final_state=final_state, scale=0.7, **kwargs)

    assert o.shape == (B, H, L, Dv) and o.dtype == torch.float64
    torch.testing.assert_close(o, torch.zeros(B, H, L, Dv, dtype=torch.float64), rtol=0, atol=0)
    if final_state:
        assert S is not None and S is not s0
        torch.testing.assert_close(S, x["s0"] if with_state else torch.zeros_like(x["s0"]), rtol=0, atol=0)
    else:
        assert S is None
    loss = (o * x["go"]).sum() + ((S * x["gs"]).sum() if final_state else 0)
    wrt = leaves + ([s0] if with_state else [])
    grads = torch.autograd.grad(loss, wrt)
    for leaf, grad in zip(leaves, grads, strict=False):
        torch.testing.assert_close(grad, torch.zeros_like(leaf), rtol=0, atol=0)
    if with_state:
        expected = x["gs"] if final_state else torch.zeros_like(x["gs"])
        torch.testing.assert_close(grads[-1], expected, rtol=0, atol=0)
