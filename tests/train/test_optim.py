"""Learning-rate schedules follow their formulas, including warmup and reduce-on-plateau; Adam is fused on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from lmtool.config import OptimizerConfig, SchedulerConfig
from lmtool.train.optim import LRSchedule, build_optimizer


def schedule(name: str, **kw) -> LRSchedule:
    cfg = OmegaConf.structured(SchedulerConfig(name=name, **kw))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return LRSchedule(opt, cfg, max_steps=110)


@pytest.mark.parametrize("name", ["cosine", "inv_sqrt", "constant", "dev_perf"])
def test_linear_warmup(name):
    """Every schedule ramps linearly from 0 to the base rate over warmup_steps."""
    s = schedule(name, warmup_steps=10)
    assert [s.set_step(i) for i in (1, 5, 10)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_reaches_eta_min_at_max_steps():
    """Cosine decays from the base rate after warmup to eta_min at max_steps, half-way at the middle."""
    s = schedule("cosine", warmup_steps=10, eta_min=0.1)
    assert s.set_step(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.set_step(110) == pytest.approx(0.1)


def test_inv_sqrt_decay():
    """inv_sqrt scales the rate by sqrt(warmup / step) after warmup."""
    s = schedule("inv_sqrt", warmup_steps=10)
    assert s.set_step(40) == pytest.approx(math.sqrt(10 / 40))


def test_dev_perf_decays_on_plateau_and_restores_from_state():
    """dev_perf multiplies the rate by decay_rate after more than `patience` evaluations without progress."""
    s = schedule("dev_perf", decay_rate=0.5, patience=1, min_lr=0.2)
    for loss in (3.0, 2.0, 2.5, 2.6):
        s.on_eval(loss)
    assert s.set_step(50) == pytest.approx(0.5)
    s.on_eval(2.7)
    s.on_eval(2.8)
    s.on_eval(2.9)
    s.on_eval(3.0)
    assert s.set_step(51) == pytest.approx(0.2)  # floored at min_lr
    restored = schedule("dev_perf", decay_rate=0.5, patience=1, min_lr=0.2)
    restored.load_state_dict(s.state_dict())
    assert restored.set_step(52) == s.set_step(52)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_on_cpu_is_fused_and_matches_the_loop_implementation(name):
    """build_optimizer gives CPU parameters PyTorch's fused Adam/AdamW, whose updates equal the per-parameter
    loop implementation to float rounding over 20 steps."""
    cfg = OmegaConf.structured(OptimizerConfig(name=name, lr=1e-2, weight_decay=0.01))
    torch.manual_seed(0)
    fused_params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
    loop_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    fused = build_optimizer(cfg, fused_params)
    loop = type(fused)(loop_params, lr=1e-2, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=0.01, foreach=False)
    assert fused.param_groups[0]["fused"] is True
    for _ in range(20):
        grads = [torch.randn_like(p) for p in fused_params]
        for params, opt in ((fused_params, fused), (loop_params, loop)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(fused_params, loop_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
