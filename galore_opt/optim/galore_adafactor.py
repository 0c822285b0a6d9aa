"""GaLoreAdafactor: Adafactor with gradient low-rank projection."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .. import config as C
from ..functional import check_impl, resolve_impl
from ..functional.adafactor import (
    EXP_AVG,
    EXP_AVG_SQ,
    EXP_AVG_SQ_COL,
    EXP_AVG_SQ_ROW,
    adafactor_update,
    init_adafactor_state,
)
from .base import GaLoreOptimizer
from .fsdp import is_dtensor as _is_dtensor

#: state keys of an FSDP2 parameter kept whole on every rank (the rest is sharded, the bases too:
#: they are most of Adafactor's state, and the step all-gathers the state anyway)
_REPLICATED_KEYS = (C.STEP, C.REFRESH_OFFSET)

_DEFAULT_EPS = {"torch": (None, 1e-3), "galore_torch": (1e-30, 1e-3)}


class GaLoreAdafactor(GaLoreOptimizer):
    r"""Adafactor (Shazeer & Stern, 2018) with GaLore gradient low-rank projection.

    For a GaLore parameter the factored second moment (one row and one column vector) is kept for
    the projected ``r x n`` (or ``m x r``) gradient, the normalized low-rank update is projected
    back and multiplied by ``scale``. Other parameters get plain Adafactor.

    The positional arguments are galore-torch's (Hugging Face's) so that existing calls work.

    Args:
        params: parameters or param groups; a group with ``rank`` is a GaLore group (keys as in
            :class:`~galore_opt.GaLoreAdamW`).
        lr: ``numerics="torch"``: the ``lr`` of ``torch.optim.Adafactor`` (``None`` means its
            default 1e-2; the step is ``min(lr, 1/sqrt(t))`` times the parameter's RMS).
            ``numerics="galore_torch"``: the external learning rate, ``None`` with ``relative_step``.
        eps: ``(eps1, eps2)``; ``None`` means ``(None, 1e-3)`` under torch numerics (eps1 = the
            dtype's machine epsilon, clamping the variance estimate) and ``(1e-30, 1e-3)`` under
            galore_torch numerics (eps1 added to the squared gradient).
        clip_threshold: RMS threshold of the update (torch's ``d``), default 1.0.
        decay_rate: ``1 - beta2_t = t ** decay_rate`` (torch's ``beta2_decay``), default -0.8.
        beta1: first-moment coefficient (galore_torch numerics only; torch's Adafactor has none).
        weight_decay: decoupled weight decay.
        scale_parameter, relative_step, warmup_init: Hugging Face's options, honoured under
            galore_torch numerics. torch numerics always scale by the parameter's RMS and use the
            relative step, so they must keep their defaults there (a ``ValueError`` says so).
        numerics: ``"torch"`` (default, ``torch.optim.Adafactor``'s arithmetic) or
            ``"galore_torch"`` (galore-torch 1.0's, refresh schedule and exact SVD included).
        impl: ``"auto"`` or ``"reference"`` (there is no fused Adafactor kernel; ``"triton"`` raises).
        seed: seeds randomized refreshes with the step and the parameter's index.

    Bases are computed and stored in fp32 by default (``basis_dtype`` group key): galore-torch's
    Adafactor projects the fp32-cast gradient and so keeps an fp32 basis too.

    FSDP2 (DTensor parameters sharded on dim 0 over a 1-D mesh): the step of a sharded parameter
    all-gathers it, its gradient and its state and runs the unsharded arithmetic; the state, bases
    included, stays sharded between steps (see :meth:`_step_sharded`).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        eps: tuple[float | None, float] | None = None,
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        numerics: str = "torch",
        impl: str = "auto",
        seed: int = 0,
    ) -> None:
        if numerics not in C.NUMERICS:
            raise ValueError(f"Invalid numerics: {numerics!r} - must be one of {C.NUMERICS}")
        if eps is None:
            eps = _DEFAULT_EPS[numerics]
        if numerics == "torch":
            if lr is None:
                lr = 1e-2
            for name, value, want in (
                ("relative_step", relative_step, True),
                ("scale_parameter", scale_parameter, True),
                ("warmup_init", warmup_init, False),
                ("beta1", beta1, None),
            ):
                if value != want:
                    raise ValueError(
                        f"{name}={value!r} is a Hugging Face Adafactor option: use numerics='galore_torch' "
                        f"for it (numerics='torch' follows torch.optim.Adafactor, which has {name}={want!r})"
                    )
        else:
            if lr is not None and relative_step:
                raise ValueError(f"lr={lr!r} cannot be combined with relative_step=True (galore-torch's rule)")
            if lr is None and not relative_step:
                raise ValueError("relative_step=False needs an explicit lr")
            if warmup_init and not relative_step:
                raise ValueError("warmup_init=True requires relative_step=True")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr >= 0.0):
            # a tensor lr is refused, as GaLoreAdamW refuses it: one rule for all three optimizers
            raise ValueError(f"Invalid learning rate: {lr!r} - must be a number >= 0")
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"Invalid eps: {eps!r} - must be a pair (eps1, eps2)")
        if (eps[0] is not None and not eps[0] >= 0.0) or not eps[1] >= 0.0:
            raise ValueError(f"Invalid eps: {eps!r} - both must be >= 0")
        if not decay_rate <= 0.0:
            raise ValueError(f"Invalid decay_rate: {decay_rate!r} - must be <= 0")
        if not clip_threshold > 0.0:
            raise ValueError(f"Invalid clip_threshold: {clip_threshold!r} - must be > 0")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta1: {beta1!r} - must be in [0, 1) or None")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay!r} - must be >= 0")
        check_impl(impl, None)
        defaults = dict(
            lr=lr,
            eps=tuple(eps),
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            beta1=beta1,
            weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            relative_step=relative_step,
            warmup_init=warmup_init,
            numerics=numerics,
            impl=impl,
            seed=seed,
        )
        super().__init__(params, defaults)

    # galore_torch numerics keep these in fp32 whatever the parameter's dtype (computed in fp32 for
    # half parameters); torch's load_state_dict would cast them to a bf16 parameter's dtype
    _dtype_kept_keys = (*GaLoreOptimizer._dtype_kept_keys, EXP_AVG, EXP_AVG_SQ, EXP_AVG_SQ_ROW, EXP_AVG_SQ_COL)

    def _validate_group(self, group: dict[str, Any]) -> None:
        if "rank" in group and group.get("basis_dtype") is None:
            group["basis_dtype"] = "float32"
        super()._validate_group(group)

    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, p, index in self._iter_params():
            with self._whole_state(p):
                if _is_dtensor(p):
                    self._step_sharded(group, p, index)
                else:
                    self._step_one(group, p, index)
        return loss

    def _step_one(self, group: dict[str, Any], p: torch.Tensor, index: int, whole: tuple | None = None) -> None:
        """One parameter's step; ``whole``: ``(weight, gradient)`` to update instead of ``p`` and
        ``p.grad`` (an FSDP2 parameter's all-gathered ones, see :meth:`_step_sharded`)."""
        state = self.state[p]
        data, data_grad = whole if whole is not None else (p, p.grad)
        hyper = {
            k: group[k]
            for k in (
                "lr", "eps", "clip_threshold", "decay_rate", "beta1", "weight_decay",
                "scale_parameter", "relative_step", "warmup_init", "numerics",
            )
        }  # fmt: skip
        galore = "rank" in group
        param, grad = (self._as_matrix(data), self._as_matrix(data_grad)) if galore else (data, data_grad)
        side = self._side(p, group) if galore else C.NONE
        if not state:
            state[C.STEP] = torch.tensor(0.0, dtype=torch.float32)
            shape = self._low_rank_shape(p, group, side) if galore else tuple(p.shape)
            init_adafactor_state(state, tuple(shape), data, group["numerics"], group["beta1"])
            if galore:
                self._init_galore_offset(p, group)
        deferred = None
        if galore:
            deferred = self._refresh_if_due(p, grad, group, index, side)
            resolve_impl(group["impl"], p.device, None)
        adafactor_update(
            param,
            grad,
            state,
            state[C.STEP],
            state.get(C.BASIS_LEFT),
            state.get(C.BASIS_RIGHT),
            galore=galore,
            scale=group.get("scale", 1.0),
            **hyper,
        )
        if deferred is not None:
            self._refresh(p, grad, group, index, side, deferred)

    def _step_sharded(self, group: dict[str, Any], p: torch.Tensor, index: int) -> None:
        """A step of an FSDP2 parameter (a DTensor sharded on dim 0 over a 1-D mesh).

        Adafactor's state is factored (row and column statistics), its step reads global norms
        (the parameter's RMS, the update's RMS) and means over rows and columns, and the state is
        small next to the weight. So the weight, the gradient and the state are all-gathered, the
        unsharded step runs on them (the same arithmetic as one process, on every rank; the basis
        is seeded from step and parameter, so every rank computes the same one), and each rank
        keeps its weight rows and its share of the state: every state tensor but the step counts,
        the bases included (computed whole on every rank, then cut), is stored as a DTensor
        sharded on its largest dimension. With the factored second moment the basis is most of
        Adafactor's state, so this is what halves it. Costs, per step and parameter: all-gathers
        of the weight, the gradient and the state (the weight's all-gather is FSDP2's own forward
        cost once more), and the whole update's arithmetic on every rank.
        """
        from .fsdp import check_sharding, local_rows, shard_largest

        check_sharding(p, type(self).__name__)
        if p.grad is None:
            return
        from torch.distributed.tensor import DTensor

        mesh = p.device_mesh
        state = self.state[p]
        sharded = {k: v for k, v in state.items() if isinstance(v, DTensor)}
        full_state = {k: (v.full_tensor() if k in sharded else v) for k, v in state.items()}
        whole = p.full_tensor()
        self.state[p] = full_state
        try:
            self._step_one(group, p, index, (whole, p.grad.full_tensor()))
        except BaseException:
            self.state[p] = state
            raise
        for key, value in list(full_state.items()):
            if key not in _REPLICATED_KEYS and isinstance(value, torch.Tensor) and value.dim() >= 1:
                full_state[key] = shard_largest(value, mesh)
        local = p.to_local()
        local.copy_(whole[local_rows(p.shape, mesh)])
