"""Sparsity probes: weight sparsity per layer and activation sparsity per layer.

* :func:`weight_sparsity`: the fraction of exactly-zero entries of each Linear/Conv2d weight and
  ``transformers`` ``Conv1D`` weight (GPT-2) (the effective weight under a ``torch.nn.utils.prune`` reparametrization), and overall.
* :class:`ActivationSparsity`: forward hooks on the activation modules (ReLU-family, GELU, SiLU,
  Tanh, ..., the ``transformers.activations`` modules that Hugging Face models use, such as
  ``SiLUActivation`` (LLaMA), ``GELUActivation`` (BERT), ``NewGELUActivation`` (GPT-2), or any
  modules you name) counting the fraction of outputs with ``|a| <= threshold``
  (0 by default: exact zeros, which is what ReLU sparsity means). Counts accumulate over forwards
  until :meth:`~ActivationSparsity.reset`; the hooks come off with :meth:`~ActivationSparsity.remove`
  (or at the end of a ``with`` block).

Activation sparsity is the quantity the bias-generalized NTK paper (Yang, Wang et al., "Neural
Networks with Sparse Activation Induced by Large Bias: Tighter Analysis with Bias-Generalized
NTK") claims stays high through training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..param_groups import is_conv1d
from .graphs import GRAPH_MODULE_TYPES, effective_weight, prunable_modules

__all__ = ["ACTIVATION_TYPES", "ActivationSparsity", "activation_modules", "activation_sparsity", "weight_sparsity"]

#: module types hooked by default
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.Softplus,
    nn.Mish,
    nn.Hardswish,
)

#: ``transformers.activations`` classes that compute no nonlinearity (not hooked)
_HF_IDENTITY = ("LinearActivation",)


def is_hf_activation(module: nn.Module) -> bool:
    """A ``transformers.activations`` module (``SiLUActivation``, ``GELUActivation``,
    ``NewGELUActivation``, ...): plain ``nn.Module`` subclasses, not ``nn.SiLU``/``nn.GELU``.
    Recognised by their module of definition, so transformers is not imported."""
    cls = type(module)
    return cls.__module__.startswith("transformers.activations") and cls.__name__ not in _HF_IDENTITY


def activation_modules(model: nn.Module, types: tuple[type[nn.Module], ...] | None = None) -> dict[str, nn.Module]:
    """``{name: module}`` of the activation modules of ``model``: instances of ``types``, or with
    ``types=None`` (the default) of :data:`ACTIVATION_TYPES` and every ``transformers.activations``
    module."""
    return {
        n: m
        for n, m in model.named_modules()
        if n and (isinstance(m, types) if types is not None else isinstance(m, ACTIVATION_TYPES) or is_hf_activation(m))
    }


@torch.no_grad()
def weight_sparsity(
    model: nn.Module, masks: dict[str, Tensor] | None = None, exclude: tuple[str, ...] = ()
) -> dict[str, float]:
    """Fraction of zero weights per Linear/Conv2d/Conv1D layer (keys are module names) and ``"overall"``.

    Args:
        model (nn.Module): the model.
        masks (dict, optional): ``{module name: mask}`` applied on top of the weights.
        exclude: module-name fragments to leave out.
    """
    masks = masks or {}
    out: dict[str, float] = {}
    zeros = total = 0
    mods = prunable_modules(model, GRAPH_MODULE_TYPES, exclude)
    # transformers Conv1D (GPT-2's projections): a linear layer whatever prunable_modules selects
    mods.update({n: m for n, m in model.named_modules() if is_conv1d(m) and not any(e in n for e in exclude)})
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    for name, m in sorted(mods.items(), key=lambda item: order[item[0]]):
        w = effective_weight(m, masks.get(name))
        z = w.numel() - int(w.count_nonzero())
        out[name] = z / w.numel()
        zeros += z
        total += w.numel()
    out["overall"] = zeros / total if total else float("nan")
    return out


class ActivationSparsity:
    """Count the fraction of (near-)zero activations per module through forward hooks.

    Args:
        model (nn.Module): the model.
        modules (iterable of str, optional): names of the modules whose outputs are counted;
            default every module of type ``types``.
        types: module types hooked when ``modules`` is None. Default (``None``):
            :data:`ACTIVATION_TYPES` and the ``transformers.activations`` modules (see
            :func:`activation_modules`).
        threshold (float): an output ``a`` counts as zero when ``|a| <= threshold``. Default 0.

    Example::

        with ActivationSparsity(model) as probe:
            model(x)
            print(probe.compute())     # {"net.1": 0.52, ..., "overall": 0.51}
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Iterable[str] | None = None,
        types: tuple[type[nn.Module], ...] | None = None,
        threshold: float = 0.0,
    ) -> None:
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold!r}")
        self.threshold = threshold
        named = dict(model.named_modules())
        if modules is None:
            targets = activation_modules(model, types)
        else:
            modules = list(modules)
            missing = [n for n in modules if n not in named]
            if missing:
                raise ValueError(f"unknown modules: {missing}")
            targets = {n: named[n] for n in modules}
        if not targets:
            raise ValueError("no modules to hook: give `modules` or `types` that the model contains")
        self.zeros: dict[str, int] = dict.fromkeys(targets, 0)
        self.counts: dict[str, int] = dict.fromkeys(targets, 0)
        # zero counts since the last compute(), one tensor per module on its device (None: none yet)
        self._pending: dict[str, Tensor | None] = dict.fromkeys(targets)
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in targets.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(out, Tensor):
                return
            with torch.no_grad():
                # summed on the device until compute(): an int() here would synchronize a GPU once
                # per hooked module per forward
                zeros = (out.detach().abs() <= self.threshold).sum()
                pending = self._pending[name]
                self._pending[name] = zeros if pending is None else pending.add_(zeros)
                self.counts[name] += out.numel()

        return hook

    def compute(self) -> dict[str, float]:
        """``{module name: fraction of zero outputs}`` since the last reset, and ``"overall"``."""
        for n, pending in self._pending.items():
            if pending is not None:
                self.zeros[n] += int(pending)
                self._pending[n] = None
        out = {n: (self.zeros[n] / c if c else float("nan")) for n, c in self.counts.items()}
        total = sum(self.counts.values())
        out["overall"] = sum(self.zeros.values()) / total if total else float("nan")
        return out

    def reset(self) -> None:
        for n in self.counts:
            self.zeros[n] = self.counts[n] = 0
            self._pending[n] = None

    def remove(self) -> None:
        """Remove the forward hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> ActivationSparsity:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


@torch.no_grad()
def activation_sparsity(
    model: nn.Module,
    inputs: Any,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    modules: Iterable[str] | None = None,
    types: tuple[type[nn.Module], ...] | None = None,
    threshold: float = 0.0,
) -> dict[str, float]:
    """Activation sparsity of one forward pass on ``inputs`` (hooks installed and removed).

    Args:
        model (nn.Module): the model.
        inputs: the batch; ``model(inputs)`` unless ``forward`` is given.
        forward (callable, optional): ``forward(model, inputs)``, e.g. ``lambda m, b: m(**b)``.
        modules, types, threshold: see :class:`ActivationSparsity`.
    """
    with ActivationSparsity(model, modules, types, threshold) as probe:
        if forward is None:
            model(inputs)
        else:
            forward(model, inputs)
        return probe.compute()
