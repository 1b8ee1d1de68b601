"""trainer.compile: compiled layer functions equal the eager ones, and a real compiler failure falls back once."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from lmtool.layers.compile import compilable, compile_enabled, set_compile
from lmtool.layers.fast_weight import elementwise_features, normalize_features


@pytest.fixture
def compiling():
    set_compile(True)
    yield
    set_compile(False)
    torch._dynamo.reset()


def test_compiled_features_equal_eager_in_float64(compiling):
    """elu+1 with sum normalisation, compiled: outputs and input gradients equal the eager functions to 1e-12."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 8, dtype=torch.float64, generator=g, requires_grad=True)
    go = torch.randn(2, 3, 10, 8, dtype=torch.float64, generator=g)
    fn = lambda t: F.elu(t) + 1.0  # noqa: E731
    out = elementwise_features(fn, x, "sum", 1e-5)
    ref = normalize_features(fn(x), "sum", 1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (dx,) = torch.autograd.grad(out, x, go)
    (dref,) = torch.autograd.grad(ref, x, go)
    torch.testing.assert_close(dx, dref, rtol=1e-12, atol=1e-12)
    assert compile_enabled()


def test_a_real_compiler_failure_warns_once_and_runs_eagerly(compiling, monkeypatch):
    """With inductor pointed at a C++ compiler that does not exist (and its caches off), the first call warns once,
    returns the eager result with its gradient, and compilation stays off for the process."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/g++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    scale = 1.0 + random.random()  # a graph (and C++ source) no earlier run has cached

    @compilable
    def scaled_sine(t):
        return torch.sin(t) * scale + 1.0

    x = torch.randn(16, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = scaled_sine(x)
        y2 = scaled_sine(x)
    failures = [w for w in caught if "torch.compile of scaled_sine failed" in str(w.message)]
    assert len(failures) == 1 and not compile_enabled()
    torch.testing.assert_close(y, torch.sin(x) * scale + 1.0)
    torch.testing.assert_close(y2, y)
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dx, torch.cos(x) * scale)
