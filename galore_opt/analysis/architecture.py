"""Training-free architecture metrics: expressivity, convergence and generalization proxies.

"No free lunch in neural architectures" measures, for a network at initialization,

- expressivity by the extrinsic curvature of the output along a circle of inputs
  (:func:`extrinsic_curvature`),
- convergence by the smallest eigenvalue of the NNGP kernel ``K = F F^T`` of the features before
  the readout (:func:`nngp_kernel`, :func:`nngp_min_eigenvalue`),
- generalization by the smallest eigenvalue of the NTK; the NTK condition number and the number of
  linear regions (distinct ReLU activation patterns over a set of inputs,
  :func:`count_linear_regions`) are related training-free metrics of the same group.

:func:`architecture_metrics` computes them all.

Reference: Chen, Huang, Wang, "No Free Lunch in Neural Architectures? A Joint Analysis of
Expressivity, Convergence, and Generalization", AutoML-Conf 2023; Chen, Gong, Wang, "Neural
Architecture Search on ImageNet in Four GPU Hours" (TE-NAS), ICLR 2021 (NTK condition number,
linear regions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacfwd, vmap

from .ntk import default_output, empirical_ntk, ntk_eigen_metrics

__all__ = [
    "activation_patterns",
    "architecture_metrics",
    "circle_basis",
    "count_linear_regions",
    "extrinsic_curvature",
    "nngp_kernel",
    "nngp_min_eigenvalue",
]


def circle_basis(dim: int, radius: float = 1.0, generator: torch.Generator | None = None, dtype=torch.float32):
    """Two orthogonal vectors of norm ``radius`` in ``R^dim`` spanning a random plane: the circle
    ``x(t) = x0 cos t + x1 sin t`` of :func:`extrinsic_curvature`.

    Args:
        dim (int): input dimension (>= 2).
        radius (float): norm of both vectors. Default 1.
        generator (torch.Generator, optional): for the plane.
        dtype (torch.dtype): Default float32.
    """
    if not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an int >= 2, got {dim!r}")
    q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=generator, dtype=torch.float64))
    return (radius * q[:, 0]).to(dtype), (radius * q[:, 1]).to(dtype)


def extrinsic_curvature(
    model: nn.Module,
    x0: Tensor,
    x1: Tensor,
    n_angles: int = 128,
    output_fn: Callable[[Any], Tensor] | None = None,
) -> dict[str, Any]:
    r"""Extrinsic curvature of the output curve ``t -> f(x0 cos t + x1 sin t)``.

    At each of ``n_angles`` equally spaced angles, with ``v = df/dt`` and ``a = d^2f/dt^2``
    (forward-mode derivatives through the model),

    .. math::
        \kappa(t) = \frac{\sqrt{\|v\|^2 \|a\|^2 - (v \cdot a)^2}}{\|v\|^3}.

    ``total_curvature`` is ``sum_t kappa(t)`` (the paper's expressivity score), ``length`` the curve
    length ``sum_t ||v|| dt`` and ``length_weighted_curvature`` the total curvature
    ``sum_t kappa ||v|| dt`` (2 pi for a convex planar closed curve). The output must have at least
    two components (a curve in R^1 has no curvature). For ReLU networks the second derivative is
    the a.e. one: the kinks of the curve are not counted.

    Args:
        model (nn.Module): the network; the input is a batch of one sample ``(1, *x0.shape)``.
        x0, x1 (Tensor): the circle's two axes (see :func:`circle_basis`).
        n_angles (int): number of angles. Default 128.
        output_fn (callable, optional): reads the tensor from the model's output (default
            :func:`~galore_opt.analysis.ntk.default_output`).

    Returns:
        dict: ``curvature`` (list per angle), ``total_curvature``, ``mean_curvature``, ``length``,
        ``length_weighted_curvature``.

    Reference: Poole et al., "Exponential expressivity in deep neural networks through transient
    chaos", NeurIPS 2016; Chen, Huang, Wang, "No Free Lunch in Neural Architectures?",
    AutoML-Conf 2023.
    """
    if not isinstance(n_angles, int) or n_angles < 3:
        raise ValueError(f"n_angles must be an int >= 3, got {n_angles!r}")
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    p = next(model.parameters())
    x0, x1 = x0.to(p.device, p.dtype), x1.to(p.device, p.dtype)
    read = output_fn if output_fn is not None else default_output
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    state = {k: v.detach() for k, v in state.items()}

    def curve(t: Tensor) -> Tensor:
        x = x0 * torch.cos(t) + x1 * torch.sin(t)
        return read(functional_call(model, state, (x.unsqueeze(0),))).reshape(-1)

    t = torch.arange(n_angles, device=p.device, dtype=p.dtype) * (2 * math.pi / n_angles)
    with torch.no_grad():
        v = vmap(jacfwd(curve))(t)
        a = vmap(jacfwd(jacfwd(curve)))(t)
    if v.shape[-1] < 2:
        raise ValueError(f"the output has {v.shape[-1]} component(s); curvature needs at least 2 (pass output_fn)")
    v, a = v.to(torch.float64), a.to(torch.float64)
    vv, aa, va = (v * v).sum(-1), (a * a).sum(-1), (v * a).sum(-1)
    speed = vv.sqrt()
    kappa = (vv * aa - va**2).clamp_min(0).sqrt() / speed.clamp_min(1e-300) ** 3
    dt = 2 * math.pi / n_angles
    return {
        "curvature": kappa.tolist(),
        "total_curvature": float(kappa.sum()),
        "mean_curvature": float(kappa.mean()),
        "length": float(speed.sum() * dt),
        "length_weighted_curvature": float((kappa * speed).sum() * dt),
    }


def _last_linear(model: nn.Module) -> nn.Module:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError("the model has no nn.Linear readout; pass readout=")
    return last


@torch.no_grad()
def nngp_kernel(model: nn.Module, x: Tensor, readout: nn.Module | None = None) -> Tensor:
    """NNGP kernel ``K = F F^T`` of the features ``F`` that enter the readout layer.

    The features are captured by a forward pre-hook on ``readout`` for one forward pass (removed
    afterwards) and flattened per sample.

    Args:
        model (nn.Module): the network.
        x (Tensor): inputs ``(N, ...)``.
        readout (nn.Module, optional): the layer whose input is the feature map; default the last
            ``nn.Linear`` of ``model.modules()``.

    Returns:
        Tensor: ``(N, N)`` float64.

    Reference: Lee et al., "Deep Neural Networks as Gaussian Processes", ICLR 2018; Chen, Huang,
    Wang, "No Free Lunch in Neural Architectures?", AutoML-Conf 2023.
    """
    layer = readout if readout is not None else _last_linear(model)
    feats: list[Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, args: feats.append(args[0].detach()))
    try:
        p = next(model.parameters())
        model(x.to(p.device, p.dtype) if x.is_floating_point() else x.to(p.device))
    finally:
        handle.remove()
    if not feats:
        raise ValueError("the readout layer did not run in the forward pass")
    f = feats[0].reshape(x.shape[0], -1).to(torch.float64)
    return f @ f.T


def nngp_min_eigenvalue(model: nn.Module, x: Tensor, readout: nn.Module | None = None) -> float:
    """Smallest eigenvalue of :func:`nngp_kernel` (the convergence proxy).

    Args:
        model, x, readout: as :func:`nngp_kernel`.

    Reference: Chen, Huang, Wang, "No Free Lunch in Neural Architectures?", AutoML-Conf 2023.
    """
    k = nngp_kernel(model, x, readout)
    return float(torch.linalg.eigvalsh((k + k.T) / 2)[0])


@torch.no_grad()
def activation_patterns(model: nn.Module, x: Tensor, modules: Iterable[nn.Module] | None = None) -> Tensor:
    """Binary ReLU activation pattern of each input: ``(N, total units)`` booleans (unit > 0),
    concatenated over ``modules`` (default every ``nn.ReLU``, in module order).

    Args:
        model (nn.Module): the network.
        x (Tensor): inputs ``(N, ...)``.
        modules (iterable of nn.Module, optional): the activation modules to read.
    """
    targets = list(modules) if modules is not None else [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not targets:
        raise ValueError("activation_patterns: the model has no nn.ReLU module; pass modules=")
    found: dict[int, Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, i, out, idx=idx: found.__setitem__(idx, out.reshape(out.shape[0], -1) > 0))
        for idx, m in enumerate(targets)
    ]
    try:
        p = next(model.parameters())
        model(x.to(p.device, p.dtype) if x.is_floating_point() else x.to(p.device))
    finally:
        for h in handles:
            h.remove()
    return torch.cat([found[i] for i in sorted(found)], dim=1)


def count_linear_regions(model: nn.Module, x: Tensor, modules: Iterable[nn.Module] | None = None) -> int:
    """Number of linear regions of a ReLU network met by the inputs ``x``: the number of distinct
    activation patterns (:func:`activation_patterns`).

    Args:
        model, x, modules: as :func:`activation_patterns`.

    Reference: Serra, Tjandraatmadja, Ramalingam, "Bounding and Counting Linear Regions of Deep
    Neural Networks", ICML 2018; Chen, Gong, Wang (TE-NAS), ICLR 2021.
    """
    pats = activation_patterns(model, x, modules)
    return int(torch.unique(pats, dim=0).shape[0])


def architecture_metrics(
    model: nn.Module,
    x: Tensor,
    *,
    circle: tuple[Tensor, Tensor] | None = None,
    n_angles: int = 128,
    region_inputs: Tensor | None = None,
    readout: nn.Module | None = None,
    chunk_size: int = 32,
) -> dict[str, float]:
    """All the training-free metrics on one probe batch.

    Args:
        model (nn.Module): the network (put it in eval mode if it has BatchNorm/dropout).
        x (Tensor): probe batch for the NNGP and NTK kernels.
        circle (tuple of Tensor, optional): ``(x0, x1)`` for the curvature; default a random plane of
            radius ``sqrt(d)`` (unit per-coordinate scale) through the origin, seed 0.
        n_angles (int): curvature angles. Default 128.
        region_inputs (Tensor, optional): inputs for the linear-region count; default ``x``.
        readout (nn.Module, optional): readout layer for the NNGP features.
        chunk_size (int): NTK chunk size. Default 32.

    Returns:
        dict: ``total_curvature``, ``nngp_lambda_min``, ``ntk_lambda_min``, ``ntk_lambda_max``,
        ``ntk_condition_number``, ``ntk_trace``, ``linear_regions``.

    Reference: Chen, Huang, Wang, "No Free Lunch in Neural Architectures?", AutoML-Conf 2023.
    """
    if circle is None:
        d = x[0].numel()
        circle = circle_basis(d, math.sqrt(d), generator=torch.Generator().manual_seed(0))
        circle = (circle[0].reshape(x.shape[1:]), circle[1].reshape(x.shape[1:]))
    out: dict[str, float] = {}
    try:
        out["total_curvature"] = extrinsic_curvature(model, circle[0], circle[1], n_angles)["total_curvature"]
    except ValueError:
        out["total_curvature"] = math.nan  # scalar output: no curvature
    out["nngp_lambda_min"] = nngp_min_eigenvalue(model, x, readout)
    ntk = ntk_eigen_metrics(empirical_ntk(model, x, chunk_size=chunk_size))
    out.update({f"ntk_{k}": v for k, v in ntk.items()})
    try:
        out["linear_regions"] = float(count_linear_regions(model, region_inputs if region_inputs is not None else x))
    except ValueError:
        out["linear_regions"] = math.nan  # no ReLU modules
    return out
