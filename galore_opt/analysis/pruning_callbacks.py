"""Training callbacks for the graph, sparsity and GaLore diagnostics (issue 8's analyses).

All follow :class:`galore_opt.analysis.callbacks.AnalysisCallback`: run them in a plain loop with
:class:`~galore_opt.analysis.callbacks.LoopCallbacks` or in a ``transformers.Trainer`` with
:func:`~galore_opt.analysis.callbacks.attach_to_trainer`.

* :class:`RamanujanCallback`: the model-level Ramanujan scores of the current (masked) weights.
* :class:`SparsityCallback`: weight sparsity per layer and, given a batch, activation sparsity.
* :class:`GaLoreDiagnosticsCallback`: captured energy and basis drift of every GaLore matrix; it
  observes every optimizer step through a step post-hook (so between-refresh values are complete,
  and gradients are read before the Trainer zeroes them) and reports at its own schedule.
* :class:`MaskKeeperCallback`: keeps pruning masks applied (attaches a
  :class:`~galore_opt.analysis.pruning.MaskKeeper` to the optimizer it first sees) and reports the
  largest pruned magnitude (0 when the masks hold).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .callbacks import AnalysisCallback
from .galore_diagnostics import GaLoreDiagnostics, unwrap_optimizer
from .pruning import MaskKeeper
from .ramanujan import CONVENTIONS, model_scores
from .sparsity import ActivationSparsity, activation_modules, weight_sparsity

__all__ = ["GaLoreDiagnosticsCallback", "MaskKeeperCallback", "RamanujanCallback", "SparsityCallback"]


class RamanujanCallback(AnalysisCallback):
    """Ramanujan-graph scores of the model's Linear/Conv2d layers (see
    :func:`galore_opt.analysis.ramanujan.model_scores`).

    Args:
        every (int): run every ``every`` steps. Default 100.
        masks (dict, optional): masks applied on top of the weights (not needed when the weights
            are already zero where pruned).
        exclude: module-name fragments left out.
        per_layer (bool): also report each layer's scalar scores. Default False.
        with_full_spectrum (bool): also compute the full-spectrum norm. Default True.
        at_start (bool): also run at step 0. Default True.
        convention (str): ``"authors"`` (default, the papers' code) or ``"library"``; see
            :mod:`galore_opt.analysis.ramanujan`.
    """

    name = "ramanujan"

    def __init__(
        self,
        every: int = 100,
        masks: dict[str, Tensor] | None = None,
        exclude: tuple[str, ...] = (),
        per_layer: bool = False,
        with_full_spectrum: bool = True,
        at_start: bool = True,
        convention: str = "authors",
    ) -> None:
        super().__init__(every, at_start)
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        self.masks, self.exclude, self.per_layer = masks, exclude, per_layer
        self.with_full_spectrum = with_full_spectrum
        self.convention = convention

    def compute(self, model: nn.Module, optimizer: Any = None, batch: Any = None) -> dict[str, Any]:
        scores = model_scores(
            model, self.masks, self.exclude, with_full_spectrum=self.with_full_spectrum, convention=self.convention
        )
        layers = scores.pop("layers")
        if self.per_layer:
            scores["layers"] = {n: {k: v for k, v in s.items() if isinstance(v, float)} for n, s in layers.items()}
        return scores


def _forward(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(batch[0])
    else:
        model(batch)


class SparsityCallback(AnalysisCallback):
    """Weight sparsity per layer and activation sparsity per activation module.

    Activation sparsity needs a batch: ``probe`` (fixed) or the batch the runner passes; a
    ``(inputs, targets)`` pair uses the inputs, a mapping is passed as keyword arguments.

    Args:
        every (int): run every ``every`` steps. Default 100.
        probe (optional): a fixed batch for activation sparsity.
        forward (callable, optional): ``forward(model, batch)``, overriding the default call.
        types: activation module types hooked. Default (``None``):
            :data:`galore_opt.analysis.sparsity.ACTIVATION_TYPES` and the ``transformers.activations``
            modules (``SiLUActivation``, ``GELUActivation``, ``NewGELUActivation``, ...).
        threshold (float): ``|a| <= threshold`` counts as zero. Default 0.
        at_start (bool): also run at step 0. Default True.
    """

    name = "sparsity"

    def __init__(
        self,
        every: int = 100,
        probe: Any = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        types: tuple[type[nn.Module], ...] | None = None,
        threshold: float = 0.0,
        at_start: bool = True,
    ) -> None:
        super().__init__(every, at_start)
        self.probe, self.forward, self.types, self.threshold = probe, forward or _forward, types, threshold
        self._warned = False

    def compute(self, model: nn.Module, optimizer: Any = None, batch: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = {"weight": weight_sparsity(model)}
        batch = self.probe if self.probe is not None else batch
        if batch is not None and not activation_modules(model, self.types):
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"SparsityCallback: {type(model).__name__} has no activation module of the hooked types "
                    "(activations called as functions cannot be hooked): activation sparsity is not measured; "
                    "pass types= with the model's activation classes",
                    stacklevel=2,
                )
        elif batch is not None:
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad(), ActivationSparsity(model, types=self.types, threshold=self.threshold) as probe:
                    self.forward(model, batch)
                    out["activation"] = probe.compute()
            finally:
                model.train(was_training)
        return out


class GaLoreDiagnosticsCallback(AnalysisCallback):
    """GaLore's captured energy and basis drift (see
    :class:`galore_opt.analysis.galore_diagnostics.GaLoreDiagnostics`).

    The tracker is created, and attached to the optimizer, the first time the callback sees an
    optimizer, so it records every step from then on (also in layer-wise mode, where it observes
    each parameter right after its update inside ``backward``); each scheduled run reports the
    summary (``overall`` and, with ``per_matrix``, every matrix; a metric that is not defined yet,
    such as the drift before a second refresh, is left out rather than reported as NaN) and keeps
    the latest plain-language :attr:`suggestions` (one line per rule, see
    :meth:`~galore_opt.analysis.galore_diagnostics.GaLoreDiagnostics.grouped_suggestions`).

    Args:
        every (int): report every ``every`` steps. Default 100.
        per_matrix (bool): report every matrix, not only the means. Default False.
        print_suggestions (bool): print a suggestion when it first appears (a rule firing for a
            new set of matrices), not again at every report. Default False.
        diagnostics_kwargs: passed to :class:`GaLoreDiagnostics` (thresholds, ``with_optimal``).
        at_start (bool): run at step 0 (attaches the tracker early). Default True.

    A report after optimizer steps in which nothing could be observed (no GaLore matrix, or no
    gradient reaching the tracker) warns once instead of reporting nothing silently.
    """

    name = "galore"

    def __init__(
        self,
        every: int = 100,
        per_matrix: bool = False,
        print_suggestions: bool = False,
        at_start: bool = True,
        **diagnostics_kwargs: Any,
    ) -> None:
        super().__init__(every, at_start)
        self.per_matrix, self.print_suggestions = per_matrix, print_suggestions
        self.kwargs = diagnostics_kwargs
        self.diagnostics: GaLoreDiagnostics | None = None
        self.suggestions: list[str] = []
        self._printed: set[tuple[str, tuple[str, ...]]] = set()
        self._warned = False

    def compute(self, model: nn.Module, optimizer: Any = None, batch: Any = None) -> dict[str, Any]:
        if self.diagnostics is None:
            if optimizer is None:
                return {}
            self.diagnostics = GaLoreDiagnostics(unwrap_optimizer(optimizer), model, **self.kwargs).attach()
            if not self.diagnostics.params:
                warnings.warn("GaLoreDiagnosticsCallback: the optimizer has no GaLore group (no 'rank')", stacklevel=2)
                self._warned = True
        summary = self.diagnostics.summary()
        if not summary and self.diagnostics.steps_observed > 0 and not self._warned:
            self._warned = True
            warnings.warn(
                f"GaLoreDiagnosticsCallback: {self.diagnostics.steps_observed} optimizer steps and no GaLore "
                "gradient observed (was the tracker attached to the optimizer that updates the model?)",
                stacklevel=2,
            )
        findings = self.diagnostics.grouped_findings()
        grouped = [line for _, _, line in findings]
        if self.print_suggestions:
            for rule, names, line in findings:
                # a rule's line changes with its numbers at every report: print it again only when
                # it fires for another set of matrices
                if (rule, names) not in self._printed:
                    self._printed.add((rule, names))
                    print(f"[galore diagnostics] {line}")
        self.suggestions = grouped
        out: dict[str, Any] = {k: v for k, v in summary.get("overall", {}).items() if not math.isnan(v)}
        out["suggestions"] = len(grouped)
        if self.per_matrix:
            out["matrices"] = {
                k: {m: x for m, x in v.items() if not math.isnan(x)} for k, v in summary.items() if k != "overall"
            }
        return out


class MaskKeeperCallback(AnalysisCallback):
    """Keep ``masks`` applied through training and report ``max_pruned`` (0.0 while they hold)
    and ``density``. The :class:`MaskKeeper` is created when the callback first runs and attached
    to the first optimizer it sees (run it at step 0, the default)."""

    name = "masks"

    def __init__(self, masks: dict[str, Tensor], every: int = 100, at_start: bool = True) -> None:
        super().__init__(every, at_start)
        self.masks = masks
        self.keeper: MaskKeeper | None = None
        self._attached = False

    def compute(self, model: nn.Module, optimizer: Any = None, batch: Any = None) -> dict[str, Any]:
        if self.keeper is None:
            self.keeper = MaskKeeper(model, self.masks)
        if optimizer is not None and not self._attached:
            self.keeper.attach(unwrap_optimizer(optimizer))
            self._attached = True
        return {"max_pruned": self.keeper.max_pruned_magnitude(), "density": self.keeper.density()}
