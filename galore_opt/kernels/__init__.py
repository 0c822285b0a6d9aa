"""Triton kernels of galore-opt, installed as the subpackage ``galore_opt.kernels``.

Importing this package imports no Triton; :func:`triton_usable` checks, without launching
anything, whether a kernel could run on a device; :func:`kernel_available` says which kernels
ship. Kernel modules (``adamw8bit``, ``galore_adamw``) import Triton and are imported only when a kernel is used.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


def interpreter_mode() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_installed() -> bool:
    """Whether Triton can be imported (looked up once: the optimizers ask on every step, and a
    ``find_spec`` that misses costs ~50 us of file-system lookups)."""
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device | str) -> bool:
    """Whether a Triton kernel could launch on ``device``.

    ``import triton`` succeeding is not enough: without a GPU a launch fails with "0 active
    drivers". CUDA tensors need a visible CUDA device; CPU tensors need interpreter mode.
    """
    if not triton_installed():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpreter_mode()


#: optimizer step kernels this build ships, by the name the optimizers ask for
KERNELS = ("adamw8bit", "galore_adamw")


def kernel_available(name: str) -> bool:
    """Whether the fused kernel ``name`` ships in this build and Triton is installed.

    ``"adamw8bit"``: the 8-bit block-wise moment update (:mod:`galore_opt.kernels.adamw8bit`).
    ``"galore_adamw"``: the low-rank Adam update and the up-projection with the weight update in
    its epilogue (:mod:`galore_opt.kernels.galore_adamw`).
    """
    return name in KERNELS and triton_installed()


__all__ = ["KERNELS", "interpreter_mode", "kernel_available", "triton_installed", "triton_usable"]
