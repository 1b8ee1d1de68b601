"""Optimizers and learning-rate schedules (each schedule with linear warmup)."""

from __future__ import annotations

import math
from typing import Any

import torch


def build_optimizer(cfg: Any, params) -> torch.optim.Optimizer:
    """Adam, AdamW, SGD (momentum) or Adagrad from `cfg.optimizer`.

    Adam and AdamW take PyTorch's fused kernel (one call for all parameters) when every parameter is a
    floating-point tensor on the CPU or a CUDA device: the same update up to float rounding, without the per-
    parameter Python loop of the default CPU implementation.
    """
    name, lr, wd = cfg.name, cfg.lr, cfg.weight_decay
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors) or None
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=wd, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=wd, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=wd)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=cfg.eps, weight_decay=wd)
    raise ValueError(f"unknown optimizer.name={name}")


class LRSchedule:
    """Sets the learning rate of every param group before each step.

    lr(step) = base_lr * warmup(step) * shape(step), with warmup = step / warmup_steps until warmup ends:
      cosine:   shape decays from 1 to eta_min / base_lr at max_steps (the original toolkit's CosineAnnealingLR)
      inv_sqrt: shape = sqrt(warmup_steps / step) after warmup
      constant: shape = 1
      dev_perf: shape = decay_rate ** (number of evaluations that did not improve, beyond patience),
                floored at min_lr (the original toolkit's ReduceLROnPlateau on the dev loss)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Any, max_steps: int) -> None:
        self.optimizer, self.cfg, self.max_steps = optimizer, cfg, max_steps
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.plateau_scale = 1.0
        self.best = math.inf
        self.bad_evals = 0

    def factor(self, step: int, base_lr: float) -> float:
        cfg, warm = self.cfg, self.cfg.warmup_steps
        if warm > 0 and step <= warm:
            return step / warm
        if cfg.name == "cosine":
            span = max(1, self.max_steps - warm)
            progress = min(1.0, (step - warm) / span)
            floor = cfg.eta_min / base_lr
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.name == "inv_sqrt":
            return math.sqrt(max(warm, 1) / max(step, 1))
        if cfg.name == "dev_perf":
            return max(self.plateau_scale, cfg.min_lr / base_lr)
        return 1.0

    def set_step(self, step: int) -> float:
        """Set the rate used for optimizer step `step` (1-based) and return the first group's rate."""
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * self.factor(step, base)
        return self.optimizer.param_groups[0]["lr"]

    def on_eval(self, valid_loss: float) -> None:
        if self.cfg.name != "dev_perf":
            return
        if valid_loss < self.best:
            self.best, self.bad_evals = valid_loss, 0
            return
        self.bad_evals += 1
        if self.bad_evals > self.cfg.patience:
            self.plateau_scale *= self.cfg.decay_rate
            self.bad_evals = 0

    def state_dict(self) -> dict:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_scale, self.best, self.bad_evals = state["plateau_scale"], state["best"], state["bad_evals"]
