"""Triton kernels of galore-opt, installed as the subpackage ``galore_opt.kernels``.

Importing this package imports no Triton; :func:`triton_usable` checks, without launching
anything, whether a kernel could run on a device. The fused GaLore-AdamW kernels are the subject of
a later change: until they land, :func:`fused_galore_adamw_available` is False and the optimizers'
``impl="auto"`` takes the pure-PyTorch reference path.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreter_mode() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device | str) -> bool:
    """Whether a Triton kernel could launch on ``device``.

    ``import triton`` succeeding is not enough: without a GPU a launch fails with "0 active
    drivers". CUDA tensors need a visible CUDA device; CPU tensors need interpreter mode.
    """
    if importlib.util.find_spec("triton") is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpreter_mode()


def fused_galore_adamw_available() -> bool:
    """Whether this build ships the fused GaLore-AdamW kernels (not yet: see module docstring)."""
    return False


__all__ = ["fused_galore_adamw_available", "interpreter_mode", "triton_usable"]
