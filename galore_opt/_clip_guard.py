"""A loud ``clip_grad_norm_`` / ``clip_grad_value_`` for parameters trained layer-wise.

A :class:`~galore_opt.layerwise.LayerwiseOptimizer` applies and frees each gradient inside
``backward()``. ``torch.nn.utils.clip_grad_norm_`` called afterwards, as in a regular training
loop, finds no gradients (or only the ones still accumulating) and returns 0 or a partial norm
without clipping anything: a run that believes it clips does not. While a layer-wise optimizer is
attached, torch's clipping functions are wrapped so that a call naming any of its parameters raises
instead, pointing at ``max_grad_norm``; ``clip_grad_norm_`` with ``max_norm=inf``, which clips
nothing and only asks for the norm (the Hugging Face Trainer does so every step), warns that the
norm is not the update's and points at ``optimizer.grad_norm``. Calls on other parameters, and every call while no
layer-wise optimizer is attached, go to torch's function unchanged (the arguments are passed
through as given; an iterator is only materialized when a layer-wise optimizer is attached).

The wrappers replace the module attributes ``torch.nn.utils.clip_grad_norm_`` /
``clip_grad_value_`` and those of ``torch.nn.utils.clip_grad`` (which torch's deprecated
``clip_grad_norm`` and accelerate's ``Accelerator.clip_grad_norm_`` go through). A name imported
before galore-opt attached an optimizer (``from torch.nn.utils import clip_grad_norm_``) keeps
torch's function and is not checked.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_NAMES = ("clip_grad_norm_", "clip_grad_value_")
_attached: weakref.WeakSet[Any] = weakref.WeakSet()


def _message(name: str) -> str:
    return (
        f"torch.nn.utils.{name} was called on parameters that a LayerwiseOptimizer updates inside "
        "backward(): their gradients have already been applied and freed, so it would clip nothing "
        "(and clip_grad_norm_ would return 0 or the norm of the rest). Clip with "
        "LayerwiseOptimizer(..., max_grad_norm=...) (clip_mode 'previous' or 'parameter') and read "
        "optimizer.grad_norm for the norm; remove_hooks() detaches the layer-wise optimizer"
    )


_NORM_QUERY = (
    "torch.nn.utils.clip_grad_norm_(..., max_norm=inf) on parameters that a LayerwiseOptimizer "
    "updates inside backward() returns the norm of the gradients still held (0 once the updates "
    "have freed them), not the norm of the update: read optimizer.grad_norm"
)


def _norm_query(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``clip_grad_norm_`` with an infinite ``max_norm`` clips nothing: a request for the norm
    (the Hugging Face Trainer makes one every step to log ``grad_norm``)."""
    if name != "clip_grad_norm_":
        return False
    max_norm = args[0] if args else kwargs.get("max_norm")
    try:
        return math.isinf(float(max_norm)) and float(max_norm) > 0
    except (TypeError, ValueError):
        return False


def _wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def checked(parameters: Any, *args: Any, **kwargs: Any) -> Any:
        if len(_attached):
            parameters = [parameters] if isinstance(parameters, Tensor) else list(parameters)
            ids = {id(p) for p in parameters}
            if any(opt._owns_any(ids) for opt in list(_attached)):
                if _norm_query(name, args, kwargs):
                    warnings.warn(_NORM_QUERY, stacklevel=2)
                else:
                    raise RuntimeError(_message(name))
        return original(parameters, *args, **kwargs)

    checked._galore_opt_original = original  # type: ignore[attr-defined]
    return checked


def _install() -> None:
    """Wrap torch's clipping functions once (idempotent)."""
    modules = (torch.nn.utils, torch.nn.utils.clip_grad)
    for name in _NAMES:
        for module in modules:
            current = getattr(module, name)
            if not hasattr(current, "_galore_opt_original"):
                setattr(module, name, _wrap(name, current))


def attach(optimizer: Any) -> None:
    """Check clipping calls against ``optimizer``'s parameters from now on (``optimizer`` must have
    ``_owns_any(ids) -> bool``); held weakly."""
    _install()
    _attached.add(optimizer)


def detach(optimizer: Any) -> None:
    _attached.discard(optimizer)


__all__ = ["attach", "detach"]
