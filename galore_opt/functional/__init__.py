"""The hot path as functions of tensors, and the one dispatch point that picks an implementation.

``_single_tensor`` functions in :mod:`galore_opt.functional.adamw` are the ground truth. Other
implementations (the Triton kernels of ``galore_opt.kernels``) plug in through :func:`resolve_impl`
and are tested against them.
"""

from __future__ import annotations

import torch

from .adamw import adamw_update, galore_adamw_update, grouped_galore_adamw_update, multi_tensor_adamw

IMPLS = ("auto", "reference", "triton")


def triton_usable(device: torch.device | torch.Tensor) -> bool:
    """Whether Triton kernels can run on ``device`` (or a tensor's): a CUDA device with Triton
    importable, a fake CUDA tensor, or Triton's interpreter for CPU tensors
    (``TRITON_INTERPRET=1`` set before the kernels are imported)."""
    from galore_opt.kernels import triton_usable as _usable

    return _usable(device)


def resolve_impl(impl: str, device: torch.device | torch.Tensor, kernel: str | None = None) -> str:
    """Map a requested ``impl`` to the implementation that runs on ``device`` (or on a tensor:
    a fake CUDA tensor counts as CUDA, see :func:`galore_opt.kernels.triton_usable`).

    ``kernel`` names the fused kernel the optimizer would use (``None``: it has none).
    ``"reference"`` always works. ``"auto"`` takes the Triton kernel where it ships and Triton can
    launch on ``device`` (a CUDA device, or the interpreter for CPU tensors), else the reference.
    ``"triton"`` that cannot be honoured raises instead of silently falling back.
    """
    if impl not in IMPLS:
        raise ValueError(f"Invalid impl: {impl!r} - must be one of {IMPLS}")
    if impl == "reference":
        return "reference"
    from galore_opt import kernels

    available = kernel is not None and kernels.kernel_available(kernel)
    if impl == "triton":
        if not available:
            raise ValueError(
                f"impl='triton' was requested but no fused Triton kernel ({kernel or 'none for this optimizer'}) "
                f"is available (is Triton {'.'.join(map(str, kernels.TRITON_MIN_VERSION))} or newer installed?); "
                "use impl='reference' or 'auto'"
            )
        if not kernels.triton_usable(device):
            raise ValueError(
                f"impl='triton' needs a CUDA device with Triton, or TRITON_INTERPRET=1 for CPU "
                f"tensors; got a tensor on {device.device if isinstance(device, torch.Tensor) else device}"
            )
        return "triton"
    return "triton" if available and kernels.triton_usable(device) else "reference"


def check_impl(impl: str, kernel: str | None) -> None:
    """Validate ``impl`` when an optimizer is built: an unknown name, or ``"triton"`` that no
    device here could honour, raises now rather than at the first step."""
    if impl not in IMPLS:
        raise ValueError(f"Invalid impl: {impl!r} - must be one of {IMPLS}")
    if impl == "triton":
        resolve_impl(impl, torch.device("cuda" if torch.cuda.is_available() else "cpu"), kernel)


def use_grouped(foreach: bool | None, impl: str) -> bool:
    """Whether a parameter whose update ``impl`` (a :func:`resolve_impl` result) runs takes the
    grouped path (one batched operation per shape group, :func:`grouped_galore_adamw_update` and
    :func:`multi_tensor_adamw`) instead of the per-matrix one. ``foreach``: the optimizer's
    argument: ``None`` groups wherever the per-matrix Triton kernels are not picked (the reference
    path: the CPU, meta tensors), ``True`` everywhere (also instead of the per-matrix kernels on a
    GPU), ``False`` nowhere (the single-tensor ground truth)."""
    if foreach is None:
        return impl == "reference"
    return bool(foreach)


def kernel_ops():
    """The kernels' operator namespace, ``torch.ops.galore_opt`` (registered on first use by
    :mod:`galore_opt.kernels.ops`, which imports torch only)."""
    import galore_opt.kernels.ops  # noqa: F401

    return torch.ops.galore_opt


__all__ = [
    "IMPLS", "adamw_update", "check_impl", "galore_adamw_update", "grouped_galore_adamw_update", "kernel_ops",
    "multi_tensor_adamw", "resolve_impl", "triton_usable", "use_grouped",
]  # fmt: skip
