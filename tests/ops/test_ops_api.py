"""The ops' public contract: input checks, impl selection and the registry for further forms."""

from __future__ import annotations

import pytest
import torch

from lmtool.ops import available_impls, delta_rule, register_impl, registry, sum_rule


def _inputs(B=2, H=3, L=7, Dk=4, Dv=5):
    return (torch.randn(B, H, L, Dk), torch.randn(B, H, L, Dk), torch.randn(B, H, L, Dv), torch.rand(B, H, L))


def _call(op, q, k, v, beta, **kwargs):
    return delta_rule(q, k, v, beta, **kwargs) if op == "delta_rule" else sum_rule(q, k, v, **kwargs)


@pytest.mark.parametrize("op", ["delta_rule", "sum_rule"])
def test_unknown_impl_is_a_one_line_value_error(op):
    """An unknown impl name raises a one-line ValueError that lists the valid names."""
    with pytest.raises(ValueError, match="unknown impl 'fast'.*recurrent") as info:
        _call(op, *_inputs(), impl="fast")
    assert "\n" not in str(info.value)


def _bad(field, value):
    q, k, v, beta = _inputs()
    args = {"q": q, "k": k, "v": v, "beta": beta, "initial_state": None}
    args[field] = value
    return args


BAD_INPUTS = [
    pytest.param(_bad("q", torch.randn(3, 7, 4)), "q must be a 4-D", id="q-3d"),
    pytest.param(_bad("k", torch.randn(2, 3, 7, 6)), "k must have q's shape", id="k-width"),
    pytest.param(_bad("v", torch.randn(2, 3, 8, 5)), "v must have shape", id="v-length"),
    pytest.param(_bad("q", torch.ones(2, 3, 7, 4, dtype=torch.long)), "floating point", id="q-int"),
    pytest.param(_bad("initial_state", torch.zeros(2, 3, 5, 4)), "initial_state must have", id="state-swap"),
]


@pytest.mark.parametrize("op", ["delta_rule", "sum_rule"])
@pytest.mark.parametrize("args, message", BAD_INPUTS)
def test_bad_shapes_are_one_line_value_errors(op, args, message):
    """Inputs that break the shape or dtype contract raise a one-line ValueError naming the tensor."""
    args = dict(args)
    state = args.pop("initial_state")
    with pytest.raises(ValueError, match=message) as info:
        _call(op, **args, initial_state=state)
    assert "\n" not in str(info.value)


BAD_BETAS = [torch.rand(2, 3, 6), torch.rand(2, 3, 7, 1), None]


@pytest.mark.parametrize("beta", BAD_BETAS, ids=["short", "4d", "none"])
def test_delta_rule_checks_beta(beta):
    """The delta rule requires beta of shape [B, H, L]."""
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="beta must have shape"):
        delta_rule(q, k, v, beta)


def test_available_impls_lists_the_torch_forms():
    """Both torch forms are available on CPU, the chunk form first (it is what 'auto' picks)."""
    for op in ("delta_rule", "sum_rule"):
        names = available_impls(op, "cpu")
        assert names[0] == "chunk" and "recurrent" in names


def test_registered_impl_is_callable_by_name_and_preferred_by_auto(monkeypatch):
    """A newly registered form is reachable by its name and, with a higher priority, chosen by 'auto'."""
    monkeypatch.setitem(registry._REGISTRY, "sum_rule", dict(registry._REGISTRY["sum_rule"]))
    calls = []

    def fake(q, k, v, *, g=None, scale=1.0, initial_state=None, output_final_state=False):
        calls.append(scale)
        return torch.zeros_like(v), None

    register_impl("sum_rule", "fake", fake, devices=("cpu",), priority=100)
    q, k, v, _ = _inputs()
    sum_rule(q, k, v, impl="fake", scale=2.0)
    sum_rule(q, k, v, scale=3.0)
    assert calls == [2.0, 3.0]
    # the cpu-only form is not offered on a GPU (where the "cuda" kernels may come first)
    assert "fake" not in available_impls("sum_rule", "cuda")
    assert available_impls("sum_rule", "cuda")[-2:] == ["chunk", "recurrent"]


def test_impl_on_wrong_device_is_a_value_error(monkeypatch):
    """Asking for a form that does not run on the inputs' device raises a ValueError that says so."""
    monkeypatch.setitem(registry._REGISTRY, "delta_rule", dict(registry._REGISTRY["delta_rule"]))
    register_impl("delta_rule", "gpu_only", lambda *a, **kw: None, devices=("cuda",), priority=100)
    with pytest.raises(ValueError, match="runs on cuda, not on 'cpu'"):
        delta_rule(*_inputs(), impl="gpu_only")
    assert available_impls("delta_rule", "cpu")[0] == "chunk"


def test_chunk_size_must_be_positive():
    """The chunk forms reject a non-positive chunk size with a ValueError."""
    from lmtool.ops.delta_rule import delta_rule_chunk

    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        delta_rule_chunk(*_inputs(), chunk_size=0)


def test_output_dtype_and_state_dtype():
    """o has q's dtype and the final state is float32 for float32 and bfloat16 inputs."""
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, beta = (x.to(dtype) for x in _inputs())
        o, S = delta_rule(q, k, v, beta, output_final_state=True)
        assert o.dtype == dtype and S.dtype == torch.float32 and S.shape == (2, 3, 4, 5)


def test_unavailable_impl_is_skipped_by_auto_and_refused_by_name(monkeypatch):
    """A form whose availability check fails is not picked by 'auto' and, asked for by name, raises a ValueError."""
    monkeypatch.setitem(registry._REGISTRY, "sum_rule", dict(registry._REGISTRY["sum_rule"]))
    register_impl("sum_rule", "broken", lambda *a, **kw: None, priority=100, is_available=lambda device: False)
    q, k, v, _ = _inputs()
    assert "broken" not in available_impls("sum_rule", "cpu")
    assert sum_rule(q, k, v)[0].shape == v.shape
    with pytest.raises(ValueError, match="'broken' is not available"):
        sum_rule(q, k, v, impl="broken")
