"""Triton kernels of galore-opt, installed as the subpackage ``galore_opt.kernels``.

Importing this package imports no Triton; :func:`triton_usable` checks, without launching
anything, whether a kernel could run on a device; :func:`kernel_available` says which kernels
ship. Kernel modules (``adamw8bit``, ``galore_adamw``, ``jit``) import Triton and are imported only
when a kernel is used; the optimizers call the kernels as operators (``torch.ops.galore_opt.*``,
registered by :mod:`galore_opt.kernels.ops`, which imports torch only). ``configs`` (launch
configs per GPU target) and ``aot`` (ahead-of-time compilation for every target) need no GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch._subclasses.fake_tensor import FakeTensor


def interpreter_mode() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_installed() -> bool:
    """Whether Triton can be imported (looked up once: the optimizers ask on every step, and a
    ``find_spec`` that misses costs ~50 us of file-system lookups)."""
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device | str | torch.Tensor) -> bool:
    """Whether a Triton kernel could launch on ``device`` (or a tensor's device).

    ``import triton`` succeeding is not enough: without a GPU a launch fails with "0 active
    drivers". CUDA tensors need a visible CUDA device of compute capability 8.0 or newer (the
    targets the kernels are compiled for); CPU tensors need interpreter mode. A fake
    CUDA tensor (``FakeTensorMode``, e.g. on a machine without a GPU) counts as CUDA, and so does
    a ``meta`` tensor: the kernels' operators (:mod:`galore_opt.kernels.ops`) run their fake
    implementations on them, so a step on fake or meta tensors follows (and its memory models)
    the path a GPU runs.
    """
    if not triton_installed():
        return False
    if isinstance(device, torch.Tensor):
        if device.device.type == "cuda" and isinstance(device, FakeTensor):
            return True
        device = device.device
    device = torch.device(device)
    if device.type == "meta":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and _capability_supported(device.index)
    return device.type == "cpu" and interpreter_mode()


@functools.cache
def _capability_supported(index: int | None) -> bool:
    """Whether the CUDA device ``index`` (None: the current one) is sm_80 or newer, the targets
    the kernels are compiled and checked for; an older GPU takes the reference path."""
    from .configs import MIN_CAPABILITY

    return torch.cuda.get_device_capability(index) >= MIN_CAPABILITY


#: optimizer step kernels this build ships, by the name the optimizers ask for
KERNELS = ("adamw8bit", "galore_adamw")

#: the oldest Triton the kernels are compiled and checked with (``make test-compat``)
TRITON_MIN_VERSION = (3, 6)


@functools.cache
def triton_supported() -> bool:
    """Whether the installed Triton is one the kernels support (:data:`TRITON_MIN_VERSION` or
    newer), read from the package metadata without importing Triton."""
    if not triton_installed():
        return False
    from importlib.metadata import PackageNotFoundError, version

    try:
        parts = version("triton").split(".")[:2]
        return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts) >= TRITON_MIN_VERSION
    except PackageNotFoundError:  # e.g. a source build without metadata: trust it
        return True


def kernel_available(name: str) -> bool:
    """Whether the fused kernel ``name`` ships in this build and a supported Triton is installed.

    ``"adamw8bit"``: the 8-bit block-wise moment update (:mod:`galore_opt.kernels.adamw8bit`).
    ``"galore_adamw"``: the low-rank Adam update and the up-projection with the weight update in
    its epilogue (:mod:`galore_opt.kernels.galore_adamw`).
    """
    return name in KERNELS and triton_installed() and triton_supported()


__all__ = [
    "KERNELS",
    "TRITON_MIN_VERSION",
    "interpreter_mode",
    "kernel_available",
    "triton_installed",
    "triton_supported",
    "triton_usable",
]
