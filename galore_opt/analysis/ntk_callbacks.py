"""Training callbacks for the NTK, bias-sparsity, architecture and co-occurrence analyses.

Each is an :class:`~galore_opt.analysis.callbacks.AnalysisCallback`: run it from a plain loop with
:class:`~galore_opt.analysis.callbacks.LoopCallbacks` or from a ``transformers.Trainer`` with
:func:`~galore_opt.analysis.callbacks.attach_to_trainer`. They hold a fixed probe batch, register
nothing on the model when constructed (hooks, if any, live for one forward pass inside
``compute``) and return plain dicts of floats.

Example::

    from galore_opt.analysis.callbacks import LoopCallbacks
    from galore_opt.analysis.ntk_callbacks import NTKCallback

    cbs = LoopCallbacks([NTKCallback(x_probe, every=50, targets=y_probe)])
    cbs.step(0, model)
    for step in range(1, n + 1):
        ...; optimizer.step()
        cbs.step(step, model, optimizer)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .callbacks import AnalysisCallback

__all__ = [
    "ActivationSparsityCallback",
    "ArchitectureMetricsCallback",
    "CooccurrenceDynamicsCallback",
    "NTKCallback",
]


class NTKCallback(AnalysisCallback):
    """Empirical NTK on a fixed probe batch: ``lambda_min``, ``lambda_max``, ``condition_number``,
    ``trace``, ``kernel_distance`` to a reference kernel and (with ``targets``)
    ``kernel_target_alignment``.

    The model is put in eval mode for the measurement (restored afterwards).

    Args:
        probe_x (Tensor): probe inputs (a probe batch of 128 on a small MLP is fine).
        every (int): run every ``every`` optimizer steps. Default 100.
        reference (str or Tensor or None): ``"init"`` (the first kernel this callback computes,
            normally at step 0), a kernel, or ``None`` (no distance). Default ``"init"``.
        targets (Tensor, optional): labels of the probe batch for the alignment.
        mode (str): NTK form (``"sum"``, ``"full"``, ``"trace"``). Default ``"sum"``.
        params (iterable of str, optional): parameters to differentiate (default all trainable).
        chunk_size (int): samples per Jacobian evaluation. Default 32.
        output_fn (callable, optional): reads the tensor from the model's output.
        at_start (bool): also run at step 0. Default True.
        keep_kernels (bool): keep every kernel (CPU) in ``self.kernels``. Default False.
        convention (str): ``"tutorial"`` (default: all trainable parameters, each sample alone, eval
            mode) or ``"tenas"`` (weights only, train mode, the probe batch in one forward); see
            :func:`galore_opt.analysis.ntk.empirical_ntk`.

    Reference: Jacot et al., NeurIPS 2018; Fort et al., NeurIPS 2020 (kernel distance).
    """

    name = "ntk"

    def __init__(
        self,
        probe_x: Tensor,
        every: int = 100,
        *,
        reference: str | Tensor | None = "init",
        targets: Tensor | None = None,
        mode: str = "sum",
        params: Iterable[str] | None = None,
        chunk_size: int = 32,
        output_fn: Callable[[Any], Tensor] | None = None,
        at_start: bool = True,
        keep_kernels: bool = False,
        convention: str = "tutorial",
    ):
        super().__init__(every=every, at_start=at_start)
        from .ntk import NTK_CONVENTIONS, NTK_MODES

        if mode not in NTK_MODES:
            raise ValueError(f"mode must be one of {NTK_MODES}, got {mode!r}")
        if convention not in NTK_CONVENTIONS:
            raise ValueError(f"convention must be one of {NTK_CONVENTIONS}, got {convention!r}")
        self.convention = convention
        if isinstance(reference, str) and reference != "init":
            raise ValueError(f"reference must be 'init', a kernel tensor or None, got {reference!r}")
        if targets is not None and targets.shape[0] != probe_x.shape[0]:
            raise ValueError(f"targets have {targets.shape[0]} rows, probe_x has {probe_x.shape[0]}")
        self.probe_x = probe_x
        self.targets = targets
        self.mode = mode
        self.params = list(params) if params is not None else None
        self.chunk_size = chunk_size
        self.output_fn = output_fn
        self.reference = reference
        self.reference_kernel: Tensor | None = reference if isinstance(reference, Tensor) else None
        self.keep_kernels = keep_kernels
        self.kernels: list[Tensor] = []

    def compute(self, model: nn.Module, optimizer=None, batch=None) -> dict[str, Any]:
        from .ntk import empirical_ntk, kernel_distance, kernel_target_alignment, ntk_eigen_metrics

        model.eval()
        theta = empirical_ntk(
            model,
            self.probe_x,
            mode=self.mode,
            params=self.params,
            chunk_size=self.chunk_size,
            output_fn=self.output_fn,
            convention=self.convention,
        )
        theta_cpu = theta.detach().to("cpu", torch.float64)
        out: dict[str, Any] = dict(ntk_eigen_metrics(theta_cpu))
        if self.reference_kernel is None and self.reference == "init":
            self.reference_kernel = theta_cpu
        if self.reference_kernel is not None:
            out["kernel_distance"] = kernel_distance(self.reference_kernel, theta_cpu)
        if self.targets is not None:
            out["kernel_target_alignment"] = kernel_target_alignment(theta_cpu, self.targets.cpu())
        if self.keep_kernels:
            self.kernels.append(theta_cpu)
        return out


class ActivationSparsityCallback(AnalysisCallback):
    """Fraction of active ReLU units on a probe batch (see
    :func:`~galore_opt.analysis.bias_sparsity.relu_activity`); ``expected_at_init`` is added
    for a :class:`~galore_opt.analysis.bias_sparsity.BiasSparseMLP` (``P(N(0,1) >= B)``).

    Args:
        probe_x (Tensor): probe inputs.
        every (int): run every ``every`` optimizer steps. Default 100.
        modules (iterable of nn.Module, optional): modules to measure (default every ``nn.ReLU``).
        at_start (bool): also run at step 0. Default True.

    Reference: Yang et al., "Neural Networks with Sparse Activation Induced by Large Bias".
    """

    name = "activation_sparsity"

    def __init__(
        self, probe_x: Tensor, every: int = 100, *, modules: Iterable[nn.Module] | None = None, at_start: bool = True
    ):
        super().__init__(every=every, at_start=at_start)
        self.probe_x = probe_x
        self.modules = list(modules) if modules is not None else None

    def compute(self, model: nn.Module, optimizer=None, batch=None) -> dict[str, Any]:
        from .bias_sparsity import BiasSparseMLP, active_probability, relu_activity

        model.eval()
        out = dict(relu_activity(model, self.probe_x, self.modules))
        if isinstance(model, BiasSparseMLP):
            out["expected_at_init"] = float(active_probability(model.bias_value))
        return out


class ArchitectureMetricsCallback(AnalysisCallback):
    """Training-free architecture metrics on a probe batch (see
    :func:`~galore_opt.analysis.architecture.architecture_metrics`): total curvature, NNGP and NTK
    ``lambda_min``, NTK condition number, linear regions.

    Args:
        probe_x (Tensor): probe inputs.
        every (int): run every ``every`` optimizer steps. Default 1000.
        n_angles (int): curvature angles. Default 128.
        at_start (bool): also run at step 0. Default True.

    Reference: Chen, Huang, Wang, "No Free Lunch in Neural Architectures?", AutoML-Conf 2023.
    """

    name = "architecture"

    def __init__(self, probe_x: Tensor, every: int = 1000, *, n_angles: int = 128, at_start: bool = True):
        super().__init__(every=every, at_start=at_start)
        self.probe_x = probe_x
        self.n_angles = n_angles

    def compute(self, model: nn.Module, optimizer=None, batch=None) -> dict[str, Any]:
        from .architecture import architecture_metrics

        model.eval()
        return architecture_metrics(model, self.probe_x, n_angles=self.n_angles)


class CooccurrenceDynamicsCallback(AnalysisCallback):
    """The co-occurrence dynamics (see :func:`~galore_opt.analysis.cooccurrence.cooccurrence_probe`)
    with ``attention_change`` measured from the first call, and ``phase1_end``: the first step at
    which this callback saw every margin positive (its resolution is ``every``).

    Args:
        data (CooccurrenceData): the training set.
        every (int): run every ``every`` optimizer steps. Default 10.
        at_start (bool): also run at step 0. Default True.

    Reference: Yang et al., "Training Dynamics of Transformers to Recognize Word Co-occurrence via
    Gradient Flow Analysis", NeurIPS 2024.
    """

    name = "cooccurrence"

    def __init__(self, data, every: int = 10, *, at_start: bool = True):
        super().__init__(every=every, at_start=at_start)
        self.data = data
        self.reference_scores: Tensor | None = None
        self.phase1_end: int | None = None

    def __call__(self, step, model, optimizer=None, batch=None):
        self._step = step
        return super().__call__(step, model, optimizer=optimizer, batch=batch)

    def compute(self, model: nn.Module, optimizer=None, batch=None) -> dict[str, Any]:
        from .cooccurrence import cooccurrence_probe

        with torch.no_grad():
            if self.reference_scores is None:
                self.reference_scores = (model.W_Q.T @ model.W_K).detach().clone()
        out = cooccurrence_probe(model, self.data, self.reference_scores)
        if self.phase1_end is None and out["phase1_done"]:
            self.phase1_end = getattr(self, "_step", None)
        if self.phase1_end is not None:
            out["phase1_end"] = float(self.phase1_end)
        return out
