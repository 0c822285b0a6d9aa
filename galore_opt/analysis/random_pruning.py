"""Random pruning at initialization and its effect on the neural tangent kernel.

Each weight of a pruned layer is kept with probability ``1 - p``. Without rescaling, the NTK of a
wide ReLU network shrinks by a factor ``(1 - p)`` per pruned layer (forward signals lose variance
``1 - p`` per pruned layer, and each layer's own Jacobian term sums over a fraction ``1 - p`` of its
weights); scaling the survivors by ``1 / sqrt(1 - p)`` -- as part of the layer's multiplier,
``W = mask * theta / sqrt(1 - p)`` -- keeps it equal to the dense NTK. The kernel of the pruned
network is taken over the surviving weights only (the pruned ones are not parameters any more).

Reference: Yang, Wang, "On the Neural Tangent Kernel Analysis of Randomly Pruned Neural
Networks", AISTATS 2023.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .ntk import empirical_ntk, kernel_distance

__all__ = ["pruned_ntk_comparison", "pruning_param_scales", "random_prune"]

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_p(p: float) -> None:
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"p (pruning probability) must be in [0, 1), got {p!r}")


def _prunable_modules(model: nn.Module, modules: Iterable[str] | None) -> dict[str, nn.Module]:
    named = dict(model.named_modules())
    if modules is None:
        chosen = {n: m for n, m in named.items() if isinstance(m, _PRUNABLE)}
    else:
        chosen = {}
        for n in modules:
            if n not in named:
                raise ValueError(f"modules: no module named {n!r} in the model")
            if not isinstance(getattr(named[n], "weight", None), Tensor):
                raise ValueError(f"modules: {n!r} has no weight tensor")
            chosen[n] = named[n]
    if not chosen:
        raise ValueError("random_prune: no Linear/Conv module to prune")
    return chosen


@torch.no_grad()
def random_prune(
    model: nn.Module,
    p: float,
    *,
    rescale: bool = True,
    modules: Iterable[str] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    r"""Prune the weights of ``model`` at random, in place: each weight entry is kept independently
    with probability ``1 - p`` and, with ``rescale``, the survivors are multiplied by
    ``1 / sqrt(1 - p)``. Biases are left dense.

    Args:
        model (nn.Module): the network (modified in place).
        p (float): pruning probability in [0, 1).
        rescale (bool): scale the surviving weights by ``1/sqrt(1 - p)``. Default True.
        modules (iterable of str, optional): names of the modules to prune; default every
            ``nn.Linear`` / ``nn.Conv{1,2,3}d``.
        generator (torch.Generator, optional): for the masks (drawn on the CPU).

    Returns:
        dict: ``{"<module>.weight": mask}`` with 0/1 masks in the weights' dtype and device, for
        re-applying after optimizer steps and for :func:`pruning_param_scales`.

    Reference: Yang, Wang, "On the Neural Tangent Kernel Analysis of Randomly Pruned Neural
    Networks", AISTATS 2023.
    """
    _check_p(p)
    masks: dict[str, Tensor] = {}
    scale = 1.0 / math.sqrt(1.0 - p) if rescale else 1.0
    for name, module in _prunable_modules(model, modules).items():
        w = module.weight
        keep = torch.rand(w.shape, generator=generator) >= p
        mask = keep.to(w.device, w.dtype)
        w.mul_(mask * scale)
        masks[f"{name}.weight" if name else "weight"] = mask
    return masks


def pruning_param_scales(masks: dict[str, Tensor], p: float, rescale: bool = True) -> dict[str, Tensor]:
    """Jacobian factors for :func:`~galore_opt.analysis.ntk.empirical_ntk` that give the NTK of the
    pruned network over its surviving weights: ``mask / sqrt(1 - p)`` (rescaled) or ``mask``.

    Args:
        masks (dict): from :func:`random_prune`.
        p (float): the pruning probability used.
        rescale (bool): whether the survivors were rescaled. Default True.
    """
    _check_p(p)
    scale = 1.0 / math.sqrt(1.0 - p) if rescale else 1.0
    return {n: m * scale for n, m in masks.items()}


def pruned_ntk_comparison(
    model: nn.Module,
    x: Tensor,
    p: float,
    *,
    rescale: bool = True,
    modules: Iterable[str] | None = None,
    generator: torch.Generator | None = None,
    mode: str = "sum",
    chunk_size: int = 16,
) -> dict[str, float]:
    r"""Compare the NTK of a randomly pruned copy of ``model`` with the dense NTK on ``x``.

    ``model`` is not modified. Reports

    - ``ratio``: the least-squares scale ``<Theta_p, Theta_d>_F / ||Theta_d||_F^2``;
    - ``trace_ratio``: ``tr Theta_p / tr Theta_d``;
    - ``relative_error``: ``||Theta_p - ratio * Theta_d||_F / ||ratio * Theta_d||_F`` (shape change);
    - ``kernel_distance`` between the two kernels;
    - ``predicted_ratio``: 1 with rescaling, ``(1 - p)^k`` without (``k`` pruned layers), and
      ``pruned_layers`` = k.

    Args:
        model (nn.Module): the dense network (a deep copy is pruned).
        x (Tensor): probe inputs.
        p (float): pruning probability in [0, 1).
        rescale (bool): rescale survivors by ``1/sqrt(1 - p)``. Default True.
        modules (iterable of str, optional): modules to prune (default all Linear/Conv).
        generator (torch.Generator, optional): for the masks.
        mode (str): NTK form (see :func:`~galore_opt.analysis.ntk.empirical_ntk`). Default ``"sum"``.
        chunk_size (int): samples per Jacobian evaluation. Default 16.

    Reference: Yang, Wang, "On the Neural Tangent Kernel Analysis of Randomly Pruned Neural
    Networks", AISTATS 2023 (Theorem 1: the pruned NTK converges to the dense limit scaled by
    ``(1 - p)^{L}`` unless the weights are rescaled).
    """
    _check_p(p)
    pruned = copy.deepcopy(model)
    masks = random_prune(pruned, p, rescale=rescale, modules=modules, generator=generator)
    dense = empirical_ntk(model, x, mode=mode, chunk_size=chunk_size).to(torch.float64)
    sparse = empirical_ntk(
        pruned, x, mode=mode, chunk_size=chunk_size, param_scales=pruning_param_scales(masks, p, rescale)
    ).to(torch.float64)
    ratio = float((sparse * dense).sum() / (dense * dense).sum())
    k = len(masks)
    if dense.dim() == 4:
        tr_d, tr_s = dense.diagonal(0, 0, 1).diagonal(0, 0, 1).sum(), sparse.diagonal(0, 0, 1).diagonal(0, 0, 1).sum()
    else:
        tr_d, tr_s = dense.trace(), sparse.trace()
    return {
        "ratio": ratio,
        "trace_ratio": float(tr_s / tr_d),
        "relative_error": float((sparse - ratio * dense).norm() / (ratio * dense).norm()),
        "kernel_distance": kernel_distance(dense, sparse),
        "predicted_ratio": 1.0 if rescale else (1.0 - p) ** k,
        "pruned_layers": k,
    }
