"""Recurrent fast weight programmers, the SRWM and the LSTM baseline: the fast form equals the step-loop reference."""

from __future__ import annotations

import pytest
import torch

from lmtool.layers.deep_fwp import DeltaDelta, DeltaMLP
from lmtool.layers.lstm import LSTMMixer
from lmtool.layers.recurrent_fwp import DeltaLSTM, DeltaRNN, RecurrentDeltaNet
from lmtool.layers.srwm import SelfReferentialWeightMatrix

D_MODEL, N_HEAD, D_HEAD = 12, 2, 6

# id -> layer factory; tiny sizes so that the float64 step loops stay fast
LAYERS = {
    "delta_mlp-depth1": lambda: DeltaMLP(D_MODEL, N_HEAD, D_HEAD, 0.0),
    "delta_mlp-depth2-inner5": lambda: DeltaMLP(D_MODEL, N_HEAD, D_HEAD, 0.0, fast_net_depth=2, fast_net_inner=5),
    "delta_delta": lambda: DeltaDelta(D_MODEL, N_HEAD, D_HEAD, 0.0),
    "delta_rnn": lambda: DeltaRNN(D_MODEL, N_HEAD, D_HEAD, 0.0),
    "delta_lstm": lambda: DeltaLSTM(D_MODEL, N_HEAD, D_HEAD, 0.0),
    "rec_delta": lambda: RecurrentDeltaNet(D_MODEL, N_HEAD, D_HEAD, 0.0),
    "srwm": lambda: SelfReferentialWeightMatrix(D_MODEL, N_HEAD, D_HEAD, 0.0),
    "lstm": lambda: LSTMMixer(D_MODEL, 0.0),
}
SHAPES = {"B2-L9": (2, 9), "B1-L1": (1, 1), "B3-L40": (3, 40)}  # L40 > the delta op's chunk of 32


def make(name: str) -> torch.nn.Module:
    """A float64 layer with weights large enough that every nonlinearity leaves its linear regime."""
    torch.manual_seed(0)
    layer = LAYERS[name]().double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.4)
    return layer


def random_state(layer, B: int) -> tuple[torch.Tensor, ...]:
    """A non-zero state of the layer's shapes (what a previous segment would have left), requiring grad."""
    empty = layer.init_state(B, device=torch.device("cpu"), dtype=torch.float64)
    return tuple((0.3 * torch.randn_like(s)).requires_grad_() for s in empty)


def loss_of(y: torch.Tensor, state: tuple) -> torch.Tensor:
    """A loss that weighs every output and state entry differently, so that every gradient is exercised."""
    g = torch.Generator().manual_seed(7)
    total = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    for s in state:
        total = total + (s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum()
    return total


def run(layer, forward, x, state):
    """Outputs, final state and the gradients of the input, the initial state and every parameter."""
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    state = tuple(s.detach().clone().requires_grad_() for s in state)
    y, new_state = forward(x, state, True)
    loss_of(y, new_state).backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return y, new_state, x.grad, [s.grad for s in state], grads


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", LAYERS)
def test_fast_form_equals_reference(name, shape):
    """From a non-zero state, the fast form gives the reference's outputs, final state and all gradients (float64)."""
    layer = make(name)
    B, L = shape
    torch.manual_seed(1)
    x, state = torch.randn(B, L, D_MODEL, dtype=torch.float64), random_state(layer, B)
    fast = run(layer, layer.forward, x, state)
    ref = run(layer, layer.forward_reference, x, state)
    close = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast[0], ref[0], **close)
    for a, b in zip(fast[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, **close)
    torch.testing.assert_close(fast[2], ref[2], **close)
    for a, b in zip(fast[3], ref[3], strict=True):
        torch.testing.assert_close(a, b, **close)
    assert fast[4].keys() == ref[4].keys() and len(fast[4]) >= 2
    for key in fast[4]:
        torch.testing.assert_close(fast[4][key], ref[4][key], **close, msg=key)
    assert ref[0].abs().max() > 1e-3  # the outputs are not trivially zero


@pytest.mark.parametrize("name", LAYERS)
def test_output_depends_on_the_initial_state(name):
    """The state is used, so the equality checks from a non-zero state are not vacuous: perturbing it changes y."""
    layer = make(name)
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    state = random_state(layer, 2)
    y, _ = layer.forward_reference(x, state)
    y2, _ = layer(x, tuple(s + 0.1 for s in state))
    assert (y - y2).abs().max() > 1e-6


@pytest.mark.parametrize("name", LAYERS)
def test_two_halves_with_carried_state_equal_one_pass(name):
    """Running a segment in two halves with the state carried gives the outputs and state of one pass."""
    layer = make(name)
    x = torch.randn(2, 11, D_MODEL, dtype=torch.float64)
    state = random_state(layer, 2)
    with torch.no_grad():
        y, full = layer(x, state, True)
        y1, mid = layer(x[:, :6], state, True)
        y2, end = layer(x[:, 6:], mid, True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-10)
    for a, b in zip(end, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", LAYERS)
def test_empty_state_is_zeros_and_returned_only_on_request(name):
    """state=None equals init_state (zeros, fixed shapes), and the new state comes back only with return_state."""
    layer = make(name)
    x = torch.randn(2, 4, D_MODEL, dtype=torch.float64)
    empty = layer.init_state(2, device=x.device, dtype=x.dtype)
    assert all(float(s.abs().sum()) == 0.0 for s in empty)
    with torch.no_grad():
        y0, none = layer(x)
        y1, state = layer(x, empty, True)
    assert none is None
    torch.testing.assert_close(y0, y1, rtol=0, atol=0)
    assert [s.shape for s in state] == [s.shape for s in empty]


@pytest.mark.parametrize("name", LAYERS)
def test_bf16_autocast_forward_is_finite(name):
    """Under bf16 autocast the fast weights stay float32 and the output is finite."""
    torch.manual_seed(0)
    layer = LAYERS[name]()
    x = torch.randn(2, 5, D_MODEL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = layer(x, None, True)
    assert torch.isfinite(y.float()).all()
    assert all(s.dtype == torch.float32 for s in state)


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: DeltaRNN(12, 0, 6, 0.0), "n_head"),
        (lambda: DeltaLSTM(12, 2, 6, 1.0), "dropout"),
        (lambda: RecurrentDeltaNet(12, 2, 6, 0.0, eps=0.0), "eps"),
        (lambda: DeltaMLP(12, 2, 6, 0.0, fast_net_depth=0), "fast_net_depth"),
        (lambda: DeltaMLP(12, 2, 6, 0.0, fast_net_inner=-1), "fast_net_inner"),
        (lambda: SelfReferentialWeightMatrix(16, 2, 6, 0.0), "d_model"),
        (lambda: LSTMMixer(0, 0.0), "d_model"),
    ],
    ids=["rnn-no-heads", "lstm-dropout-1", "rec-eps-0", "mlp-depth-0", "mlp-inner-negative", "srwm-width",
         "lstm-no-units"],
)
def test_bad_constructor_arguments_are_refused(factory, match):
    """A size, rate or width that cannot work is refused at construction with a message naming it."""
    with pytest.raises(ValueError, match=match):
        factory()


def test_carried_state_of_other_sizes_is_refused():
    """A state from a layer with other sizes fails with a one-line message, not a shape error deep in a matmul."""
    small, big = DeltaRNN(12, 2, 6, 0.0), DeltaRNN(12, 2, 4, 0.0)
    state = big.init_state(2, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ValueError, match="same sizes"):
        small(torch.randn(2, 3, 12), state)
