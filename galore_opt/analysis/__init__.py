"""Companion analyses (NTK, sparsity, pruning, graph metrics, training dynamics, GaLore diagnostics).

Pure functions on models and tensors; they depend on torch only. The training-time adapters are in
:mod:`galore_opt.analysis.callbacks`. Submodules are imported on first use so that
``import galore_opt`` stays light.
"""

from __future__ import annotations

import importlib

_SUBMODULES = (
    "callbacks",
    "graphs",
    "ramanujan",
    "pruning",
    "mask_sampling",
    "sparsity",
    "galore_diagnostics",
    "pruning_callbacks",
    "ntk",
    "bias_sparsity",
    "random_pruning",
    "architecture",
    "cooccurrence",
    "ntk_callbacks",
)

__all__ = list(_SUBMODULES)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
