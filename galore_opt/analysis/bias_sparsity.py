"""Bias-induced activation sparsity of a one-hidden-layer ReLU network and its limiting kernel.

With ``f(x) = m^{-1/2} sum_r a_r ReLU(w_r^T x - B)``, ``w_r ~ N(0, I)``, ``a_r = +-1`` and
``||x|| = 1``, a hidden unit is active at initialization with probability ``P(N(0,1) >= B)``
(0.5, 0.159, 0.0228, 0.00135 for B = 0, 1, 2, 3), and training in the NTK regime keeps the
activations that sparse. The NTK of the first-layer weights and biases tends to the
bias-generalized kernel

    H_B(x, x') = (rho + 1) * P(Z1 >= B, Z2 >= B),   rho = <x, x'>,

with ``(Z1, Z2)`` standard normals of correlation ``rho`` (``rho`` alone when the biases are
frozen). For B = 0 this is the usual ``(rho + 1)(pi - arccos rho) / (2 pi)``. The orthant
probability is computed from Plackett's identity ``dP/drho = phi_2(B, B; rho)`` after the change of
variable ``rho = sin t``, which leaves a smooth integrand:

    P(Z1 >= B, Z2 >= B) = Phi(-B)^2 + 1/(2 pi) * int_0^{arcsin rho} exp(-B^2 / (1 + sin t)) dt.

(The closed form of H_B was derived for this project, not read from the paper.)

Reference: Yang et al., "Neural Networks with Sparse Activation Induced by Large Bias: Tighter
Analysis with Bias-Generalized NTK" (the bias-generalized NTK paper of this project's seed list).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "BiasSparseMLP",
    "active_probability",
    "bias_ntk_limit",
    "first_layer_ntk",
    "orthant_probability",
    "relu_activity",
]


class BiasSparseMLP(nn.Module):
    r"""One-hidden-layer ReLU network with constant bias initialization, NTK parametrization.

    .. math::
        f(x) = \frac{1}{\sqrt{m}} \sum_{r=1}^m a_r \,\mathrm{ReLU}(w_r^\top x + b_r),
        \quad w_r \sim N(0, I_d),\ b_r = -B,\ a_r \sim \mathrm{Unif}\{-1, +1\}

    The hidden layer is ``self.hidden`` (an ``nn.Linear`` whose parameters are the trained
    ``w_r`` and ``b_r``), the ReLU is the module ``self.act`` (so activation probes can hook it)
    and the readout ``a`` is a buffer unless ``train_readout``.

    Args:
        in_features (int): input dimension ``d`` (inputs are expected on the unit sphere).
        width (int): number of hidden units ``m``.
        bias (float): the threshold ``B`` (the bias is initialized to ``-B``). Default 0.
        out_features (int): outputs (independent +-1 readouts). Default 1.
        train_readout (bool): make ``a`` a parameter. Default False (the paper's setting).
        train_bias (bool): whether the biases are trained. Default True.
        generator (torch.Generator, optional): for the initialization.
        dtype (torch.dtype, optional): parameter dtype.

    Reference: Yang et al., "Neural Networks with Sparse Activation Induced by Large Bias: Tighter
    Analysis with Bias-Generalized NTK".
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        bias: float = 0.0,
        out_features: int = 1,
        *,
        train_readout: bool = False,
        train_bias: bool = True,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        for label, value in (("in_features", in_features), ("width", width), ("out_features", out_features)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        if not math.isfinite(bias):
            raise ValueError(f"bias must be finite, got {bias!r}")
        self.bias_value = float(bias)
        self.width = width
        self.hidden = nn.Linear(in_features, width, dtype=dtype)
        self.act = nn.ReLU()
        with torch.no_grad():
            w = torch.randn(width, in_features, generator=generator, dtype=torch.float64)
            self.hidden.weight.copy_(w)
            self.hidden.bias.fill_(-self.bias_value)
        self.hidden.bias.requires_grad_(train_bias)
        signs = torch.randint(0, 2, (out_features, width), generator=generator).to(self.hidden.weight.dtype) * 2 - 1
        if train_readout:
            self.readout = nn.Parameter(signs)
        else:
            self.register_buffer("readout", signs)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.hidden(x)) @ self.readout.T / math.sqrt(self.width)


def active_probability(bias: float | Tensor) -> Tensor:
    """Probability that a unit of :class:`BiasSparseMLP` is active at initialization for a unit-norm
    input: ``P(N(0, 1) >= B) = Phi(-B)``.

    Args:
        bias (float or Tensor): the threshold ``B``.
    """
    b = torch.as_tensor(bias, dtype=torch.float64)
    return torch.special.ndtr(-b)


def orthant_probability(rho: Tensor, bias: float, n_nodes: int = 257) -> Tensor:
    r"""``P(Z1 >= B, Z2 >= B)`` for standard normals with correlation ``rho`` (elementwise).

    Uses ``Phi(-B)^2 + 1/(2 pi) int_0^{arcsin rho} exp(-B^2/(1 + sin t)) dt`` with composite
    Simpson quadrature on ``n_nodes`` points (the integrand is smooth; 257 nodes give ~1e-12).

    Args:
        rho (Tensor): correlations in [-1, 1] (clamped).
        bias (float): the threshold ``B``.
        n_nodes (int): odd number of quadrature nodes. Default 257.
    """
    if n_nodes < 3 or n_nodes % 2 == 0:
        raise ValueError(f"n_nodes must be an odd int >= 3, got {n_nodes!r}")
    rho = torch.as_tensor(rho, dtype=torch.float64).clamp(-1.0, 1.0)
    upper = torch.arcsin(rho)
    u = torch.linspace(0.0, 1.0, n_nodes, dtype=torch.float64, device=rho.device)
    w = torch.ones(n_nodes, dtype=torch.float64, device=rho.device)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    w = w / (3.0 * (n_nodes - 1))
    t = upper[..., None] * u
    denom = 1.0 + torch.sin(t)
    integrand = torch.where(denom > 0, torch.exp(-(bias**2) / denom.clamp_min(1e-300)), torch.zeros_like(t))
    if bias == 0:
        integrand = torch.ones_like(t)
    integral = upper * (integrand * w).sum(-1)
    tail = torch.special.ndtr(torch.tensor(-float(bias), dtype=torch.float64))
    return (tail**2 + integral / (2 * math.pi)).clamp(0.0, 1.0)


def bias_ntk_limit(x: Tensor, x2: Tensor | None = None, bias: float = 0.0, train_bias: bool = True) -> Tensor:
    r"""The bias-generalized NTK ``H_B(x, x') = (rho + 1) P(Z1 >= B, Z2 >= B)``, ``rho = <x, x'>``.

    The infinite-width limit of the first-layer NTK of :class:`BiasSparseMLP` (weights and biases
    trained; ``train_bias=False`` drops the ``+1``). Inputs are expected on the unit sphere (they
    are not normalized here; ``rho`` is clamped to [-1, 1]).

    Args:
        x (Tensor): ``(N, d)`` inputs.
        x2 (Tensor, optional): ``(M, d)`` inputs; default ``x``.
        bias (float): the threshold ``B``.
        train_bias (bool): include the bias term. Default True.

    Returns:
        Tensor: ``(N, M)`` float64 kernel.

    Reference: Yang et al., "Neural Networks with Sparse Activation Induced by Large Bias" (the
    kernel); the closed form was derived for this project (see the module docstring).
    """
    x = x.detach().to(torch.float64)
    x2 = x if x2 is None else x2.detach().to(x.device, torch.float64)
    rho = (x @ x2.T).clamp(-1.0, 1.0)
    p = orthant_probability(rho, bias)
    return (rho + 1.0) * p if train_bias else rho * p


def first_layer_ntk(model: BiasSparseMLP, x: Tensor, x2: Tensor | None = None, chunk_size: int = 32) -> Tensor:
    """Empirical NTK of :class:`BiasSparseMLP` with respect to its trained first-layer parameters
    (weights, and the biases when they require grad), summed over outputs.

    Args:
        model (BiasSparseMLP): the network.
        x, x2 (Tensor): probe batches (see :func:`~galore_opt.analysis.ntk.empirical_ntk`).
        chunk_size (int): samples per Jacobian evaluation. Default 32.
    """
    from .ntk import empirical_ntk

    names = ["hidden.weight"] + (["hidden.bias"] if model.hidden.bias.requires_grad else [])
    return empirical_ntk(model, x, x2, params=names, chunk_size=chunk_size)


@torch.no_grad()
def relu_activity(
    model: nn.Module,
    x: Tensor,
    modules: Iterable[nn.Module] | None = None,
) -> dict[str, float | dict[str, float]]:
    """Fraction of active (> 0) ReLU outputs of ``model`` on ``x``, with the dead units and the
    densest sample (per-sample masks; :func:`galore_opt.analysis.sparsity.activation_sparsity`
    counts the complementary zero fraction of any activation type, without them).

    Forward hooks are placed on the activation modules for this one forward pass and removed
    afterwards (nothing stays attached to the model).

    Args:
        model (nn.Module): the network.
        x (Tensor): probe inputs (moved to the model's device).
        modules (iterable of nn.Module, optional): the modules whose outputs are measured; default
            every ``nn.ReLU`` in the model.

    Returns:
        dict: ``active_fraction`` (over all measured units and samples), ``per_layer`` (fraction by
        module name), ``dead_fraction`` (units inactive on every probe sample) and
        ``max_sample_active_fraction`` (the densest sample).
    """
    names = {m: n for n, m in model.named_modules()}
    targets = list(modules) if modules is not None else [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not targets:
        raise ValueError("relu_activity: the model has no nn.ReLU module; pass modules=")
    outputs: dict[str, Tensor] = {}

    def hook(module, inputs, output):
        outputs[names.get(module, str(id(module)))] = (output > 0).reshape(output.shape[0], -1)

    handles = [m.register_forward_hook(hook) for m in targets]
    try:
        p = next(model.parameters(), None)
        xin = x.to(p.device, p.dtype) if p is not None and x.is_floating_point() else x
        model(xin)
    finally:
        for h in handles:
            h.remove()
    if not outputs:
        raise ValueError("relu_activity: none of the modules ran in the forward pass")
    active = torch.cat(list(outputs.values()), dim=1)
    return {
        "active_fraction": float(active.double().mean()),
        "per_layer": {n: float(a.double().mean()) for n, a in outputs.items()},
        "dead_fraction": float((~active.any(0)).double().mean()),
        "max_sample_active_fraction": float(active.double().mean(1).max()),
    }
