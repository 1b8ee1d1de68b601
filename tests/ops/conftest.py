"""Shared inputs for the fast-weight op tests: fresh random tensors where the rules are stable."""

from __future__ import annotations

import pytest
import torch

from lmtool.ops import delta_rule, sum_rule

OPS = {"delta_rule": delta_rule, "sum_rule": sum_rule}


class OpCase:
    """One op's inputs and a uniform way to call any of its forms (``beta`` only for the delta rule)."""

    def __init__(self, op: str, B: int, H: int, L: int, Dk: int, Dv: int, *, dtype=torch.float64, seed=0, decay=None):
        g = torch.Generator().manual_seed(seed)
        self.op = op
        self.q = torch.randn(B, H, L, Dk, generator=g, dtype=torch.float64).to(dtype)
        # L2-normalised keys and beta in (0, 1) keep the delta rule's recurrence contractive.
        k = torch.randn(B, H, L, Dk, generator=g, dtype=torch.float64)
        self.k = torch.nn.functional.normalize(k, dim=-1).to(dtype)
        self.v = torch.randn(B, H, L, Dv, generator=g, dtype=torch.float64).to(dtype)
        self.beta = torch.sigmoid(torch.randn(B, H, L, generator=g, dtype=torch.float64)).to(dtype)
        self.s0 = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64)
        self.grad_o = torch.randn(B, H, L, Dv, generator=g, dtype=torch.float64)
        self.grad_s = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64)
        # decay = d: log-decays g uniform in [-d, 0] (0: g = 0, no decay but the decay's code path); None: no g
        self.g = None if decay is None else -decay * torch.rand(B, H, L, generator=g, dtype=torch.float64)

    def inputs(self) -> list[torch.Tensor]:
        names = ["q", "k", "v", "beta"] if self.op == "delta_rule" else ["q", "k", "v"]
        return [getattr(self, n) for n in names]

    def call(self, fn=None, inputs=None, **kwargs):
        """Call ``fn`` (default: the public op) with this case's tensors (or ``inputs``) as positionals."""
        fn = OPS[self.op] if fn is None else fn
        if self.g is not None:
            kwargs.setdefault("g", self.g)
        return fn(*(self.inputs() if inputs is None else inputs), **kwargs)

    def outputs_and_grads(self, fn=None, *, initial_state=True, **kwargs) -> list[torch.Tensor]:
        """``[o, final_state, d inputs..., (dg,) d initial_state]`` under random upstream gradients for o and S."""
        leaves = [x.detach().clone().requires_grad_() for x in self.inputs()]
        s0 = self.s0.clone().requires_grad_() if initial_state else None
        g = None if self.g is None else self.g.clone().requires_grad_()
        if g is not None:
            kwargs["g"] = g
        o, S = self.call(fn, leaves, initial_state=s0, output_final_state=True, **kwargs)
        loss = (o.double() * self.grad_o).sum() + (S.double() * self.grad_s).sum()
        wrt = leaves + ([g] if g is not None else []) + ([s0] if initial_state else [])
        return [o, S, *torch.autograd.grad(loss, wrt)]


def shape_id(shape: tuple[int, ...]) -> str:
    return "B{}-H{}-L{}-Dk{}-Dv{}".format(*shape)


@pytest.fixture
def make_case():
    return OpCase


def build_emulated(tmp_path_factory, name: str, library, extension):
    """``extension(dir, library(dir, sanitize=False))`` in a fresh temporary directory; skipped without g++ or ninja."""
    from tests.ops import cuda_emulation

    if not cuda_emulation.have_toolchain():
        pytest.skip("g++ or ninja not installed")
    build = tmp_path_factory.mktemp(name)
    return extension(build / "ext", library(build / "lib", sanitize=False))


@pytest.fixture(scope="session")
def emulated_extension(tmp_path_factory):
    """The real binding and launchers on the CPU emulation (tests/ops/cuda_emulation.py), built once per session."""
    from tests.ops import cuda_emulation

    return build_emulated(tmp_path_factory, "cuda-emulation", cuda_emulation.build_library,
                          cuda_emulation.build_extension)  # fmt: skip


@pytest.fixture
def kernels_on_emulation(emulated_extension):
    """lmtool.ops.cuda's extension is the emulated one for this test (no self-check done yet); forgotten after."""
    from lmtool.ops import cuda

    cuda.EXTENSION.use(emulated_extension)
    yield emulated_extension
    cuda.EXTENSION.reset()


@pytest.fixture(scope="session")
def recurrent_emulated_extension(tmp_path_factory):
    """The recurrent scans' real binding and launchers on the CPU emulation (tests/ops/recurrent_emulation.py)."""
    from tests.ops import recurrent_emulation

    return build_emulated(tmp_path_factory, "recurrent-emulation", recurrent_emulation.build,
                          recurrent_emulation.build_extension)  # fmt: skip


@pytest.fixture
def recurrent_kernels_on_emulation(recurrent_emulated_extension, monkeypatch):
    """lmtool.ops.recurrent_cuda's extension is the emulated one for this test (no self-check done yet, no fallback
    warning given yet); forgotten after."""
    from lmtool.ops import recurrent_cuda

    recurrent_cuda.EXTENSION.use(recurrent_emulated_extension)
    monkeypatch.setattr(recurrent_cuda.EXTENSION, "_warned", set())
    yield recurrent_emulated_extension
    recurrent_cuda.EXTENSION.reset()
