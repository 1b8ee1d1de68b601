"""Where and in which precision a model runs: shared by training, evaluation and generation."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from lmtool.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if visible, else cpu; `cuda` without a visible device is refused with one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or auto")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """Mixed-precision context for the forward pass; fp32 runs without autocast."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
