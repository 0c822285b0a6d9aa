"""GaLoreAdamW: AdamW with gradient low-rank projection."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .. import config as C
from ..functional import (
    adamw_update,
    check_impl,
    galore_adamw_update,
    grouped_galore_adamw_update,
    kernel_ops,
    multi_tensor_adamw,
    resolve_impl,
    use_grouped,
)
from ..functional.adamw import CPU_SLICE, bases_for_compute, residual_update
from ..projector import project
from .base import GaLoreOptimizer, _warm_refresh_due

_PLAIN = (torch.Tensor, torch.nn.Parameter)

_DEFAULT_EPS = {"torch": 1e-8, "galore_torch": 1e-6}


class GaLoreAdamW(GaLoreOptimizer):
    r"""AdamW with GaLore gradient low-rank projection (Zhao et al., 2024).

    For a parameter in a GaLore group (a param group with a ``rank`` key) with gradient
    :math:`G \in \mathbb{R}^{m \times n}` and basis :math:`P` (refreshed every ``update_proj_gap``
    steps), each step does

    .. math::
        R &= P^\top G \quad (\text{or } G P^\top) \\
        M &\leftarrow \beta_1 M + (1 - \beta_1) R, \qquad V \leftarrow \beta_2 V + (1-\beta_2) R^2 \\
        N &= \frac{M / (1 - \beta_1^t)}{\sqrt{V / (1 - \beta_2^t)} + \epsilon} \\
        W &\leftarrow (1 - \eta \lambda) W - \eta \cdot \text{scale} \cdot P N

    so the moments are ``r x n`` instead of ``m x n``. Every other parameter gets plain AdamW,
    identical to ``torch.optim.AdamW(foreach=False)``.

    Args:
        params: parameters or param groups. A group with ``rank`` is a GaLore group; its keys
            (galore-torch / Hugging Face compatible, with defaults): ``rank`` (128),
            ``update_proj_gap`` (200), ``scale`` (0.25), ``proj_type`` (``"std"``: project the
            smaller side; ``"reverse_std"``, ``"left"``, ``"right"``, ``"full"``). galore-opt's own
            keys: ``proj_method`` (``"power"``: one subspace iteration warm-started from the
            previous basis; ``"randomized"``; ``"svd"``), ``power_iters``, ``oversample`` (8),
            ``stagger_refresh`` (spread refreshes over the gap), ``align_basis`` (rotate a new
            basis towards the old one so kept moments stay meaningful), ``basis_dtype`` (None: the
            parameter's dtype, as galore-torch; or ``"float32"``), ``residual`` (False; True:
            Fira's residual compensation, the out-of-subspace gradient ``G - P P^T G`` scaled by
            ``||N|| / ||R||`` added to the update, see ``docs/residual.md``),
            ``residual_scaling`` (``"column"`` or ``"matrix"``), ``residual_limit`` (1.01: the
            residual norm grows by at most this factor per step; None: no limiter).
        lr: learning rate (default 1e-3).
        betas: coefficients of the moment averages (default (0.9, 0.999)).
        eps: added to the denominator; ``None`` means 1e-8 (``numerics="torch"``) or 1e-6
            (``numerics="galore_torch"``, galore-torch's default).
        weight_decay: decoupled weight decay (default 0).
        numerics: ``"torch"`` (default): ``torch.optim.AdamW``'s arithmetic, power-method
            refreshes staggered over the gap. ``"galore_torch"``: galore-torch 1.0's arithmetic
            (eps before bias correction, weight decay after the update), its refresh schedule
            (every matrix on steps 0, gap, 2 gap, ...), exact SVD by default and no basis
            alignment, so old runs can be continued.
        impl: ``"auto"`` (default), ``"reference"`` or ``"triton"`` (see
            :func:`galore_opt.functional.resolve_impl`).
        seed: seeds randomized refreshes together with the step and the parameter's index;
            the global RNG is never touched.
        foreach: ``None`` (default): the *grouped* step wherever the per-matrix Triton kernels
            are not picked (the CPU, meta tensors): GaLore matrices that share shape, side, rank,
            dtypes, device, hyperparameters and step count are updated together (batched
            projection, the low-rank Adam arithmetic once over their stacked moments, batched
            up-projection with the update; 8-bit moments quantized once over one flat buffer),
            full-size parameters by foreach operators. ``True``: grouped on CUDA too, instead of
            the per-matrix kernels. ``False``: the per-matrix (single-tensor) ground truth.
            The grouped path gives the per-matrix results bit for bit where the batched GEMM
            runs the per-matrix GEMM (tested; see
            :func:`galore_opt.functional.grouped_galore_adamw_update` for the exceptions and the
            bound). Per matrix in any case: first steps, galore_torch numerics, both sides
            projected, full-rank matrices, FSDP2 (DTensor) parameters and ``step_param``
            (layer-wise). The state stays per parameter in the same keys; on the grouped path
            each value is a view of one buffer per group (checkpoints hold the same bytes and load
            into either path).

    Notes:
        ``rank >= min(m, n)`` under torch numerics updates that parameter in full (the AdamW
        update times ``scale``; a warning says so); under galore_torch numerics the rank is
        clipped to ``min(m, n)`` as galore-torch does. Moments are kept across a refresh. Under
        torch numerics a warm refresh takes effect from the next step: the refresh step's update
        uses the current basis, whose projected gradient ``P^T G`` is also the first product of
        the power iteration that computes the new basis from the same gradient (galore_torch
        numerics refresh first and project with the new basis, as galore-torch does).
        The optimizer state holds tensors only and loads with ``torch.load(weights_only=True)``.

        ``capturable`` (in torch's sense: a step that a CUDA graph can capture and replay) is not
        offered. The step count is a CPU tensor read on the host (no device sync), and the bias
        corrections, the refresh schedule and the grouping are computed from it in Python, so a
        captured step would replay its first step's constants; the step itself allocates only
        value-independent shapes and reads no device value (``tests/test_fake_cuda_and_meta.py``).
        Under ``torch.compile`` the step runs eagerly (a graph break, ``torch._disable_dynamo``):
        the model's forward and backward are compiled, the optimizer gives the uncompiled numbers.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float | None = None,
        weight_decay: float = 0.0,
        *,
        numerics: str = "torch",
        impl: str = "auto",
        seed: int = 0,
        correct_bias: bool = True,
        foreach: bool | None = None,
    ) -> None:
        if numerics not in C.NUMERICS:
            raise ValueError(f"Invalid numerics: {numerics!r} - must be one of {C.NUMERICS}")
        if eps is None:
            eps = _DEFAULT_EPS[numerics]
        C.validate_adam_hyperparameters(lr, betas, eps, weight_decay)
        check_impl(impl, self._kernel)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            numerics=numerics,
            impl=impl,
            correct_bias=correct_bias,
        )
        if not correct_bias and numerics == "torch":
            raise ValueError("correct_bias=False exists only under numerics='galore_torch'")
        if foreach not in (None, True, False):
            raise ValueError(f"Invalid foreach: {foreach!r} - must be None, True or False")
        super().__init__(params, {**defaults, "seed": seed})
        self.defaults["foreach"] = foreach

    _optimizer_wide_defaults = (*GaLoreOptimizer._optimizer_wide_defaults, "foreach")

    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = list(self._iter_params())
        if self.defaults.get("foreach") is not False:
            entries = self._grouped_step(entries)
        for group, p, index in entries:
            with self._whole_state(p):
                self._step_one(group, p, index)
        return loss

    def _grouped_step(self, entries: list) -> list:
        """Update at once, one shape group at a time, the parameters that the dispatch
        (:func:`galore_opt.functional.use_grouped`) sends to the grouped path; return the others
        ``(group, param, index)`` for the per-matrix path.

        Grouped: GaLore matrices (torch numerics, one side projected, plain fp moments) whose
        state exists and whose basis is not refreshed this step, batched by (shape, side, rank,
        dtypes, device, hyperparameters, residual settings, step):
        :func:`grouped_galore_adamw_update` (the residual term, if on, per matrix after the
        group's low-rank update); and
        full-size parameters with moments in their dtype (torch numerics), per param group:
        :func:`multi_tensor_adamw` (PyTorch's foreach AdamW). Per matrix: a first step (the state
        and the first basis are built), a refresh step (the refresh needs the matrix's own
        gradient and projected gradient), galore_torch numerics (galore-torch's arithmetic,
        kept op for op), both sides projected, full-rank GaLore matrices, 8-bit moments,
        FSDP2 (DTensor) parameters and whatever the per-matrix fused kernels take.
        """
        rest: list = []
        impls: dict = {}
        full: dict = {}
        candidates: dict = {}
        foreach = self.defaults.get("foreach")
        state_of = self.state
        for entry in entries:
            group, p, _ = entry
            state = state_of.get(p)
            if (
                not state
                or C.STEP not in state
                or group["numerics"] != "torch"
                or type(p) not in _PLAIN and _is_dtensor(p)  # FSDP2 parameters: per matrix
            ):
                rest.append(entry)
                continue
            key = (group["impl"], p.device)
            grouped = impls.get(key)
            if grouped is None:
                grouped = impls[key] = use_grouped(foreach, resolve_impl(group["impl"], p, self._kernel))
            exp_avg = state.get(C.EXP_AVG)
            grad = p.grad
            if not grouped:
                rest.append(entry)
                continue
            if "rank" not in group:
                if (
                    exp_avg is not None
                    and exp_avg.dtype == p.dtype == grad.dtype
                    and exp_avg.shape == p.shape
                    and (p.numel() <= CPU_SLICE or p.device.type != "cpu")  # larger: sliced per tensor
                ):
                    full.setdefault(id(group), (group, []))[1].append(p)
                else:
                    rest.append(entry)
                continue
            if p.dim() != 2 or (left := state.get(C.BASIS_LEFT)) is not None and C.BASIS_RIGHT in state:
                rest.append(entry)
                continue
            basis = left if left is not None else state.get(C.BASIS_RIGHT)
            if basis is None or (moments := self._grouped_moments(state)) is None:
                rest.append(entry)
                continue
            candidates.setdefault(id(group), (group, []))[1].append((entry, state, basis, left is not None, moments))
        for group, params in full.values():
            beta1, beta2 = group["betas"]
            states = [state_of[p] for p in params]
            by_step: dict = {}
            for p, state, step in zip(params, states, _values([s[C.STEP] for s in states])):
                by_step.setdefault((p.device, p.dtype, step), []).append((p, state))
            for (_, _, step), members in by_step.items():
                multi_tensor_adamw(
                    [p for p, _ in members], [p.grad for p, _ in members], [s[C.EXP_AVG] for _, s in members],
                    [s[C.EXP_AVG_SQ] for _, s in members], [s[C.STEP] for _, s in members], step=step + 1,
                    lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                )  # fmt: skip
        buckets: dict = {}
        for group, members in candidates.values():
            # every step count of the group in one read (CPU tensors: no device sync)
            steps = _values([member[1][C.STEP] for member in members])
            offsets = [member[1].get(C.REFRESH_OFFSET) for member in members]
            offset_values = iter(_values([o for o in offsets if o is not None]))
            gap = group["update_proj_gap"]
            hyper = (group["lr"], *group["betas"], group["eps"], group["weight_decay"], group["scale"])
            residual = (group["residual_scaling"], group["residual_limit"]) if group.get("residual") else None
            for (entry, state, basis, left, moments), step, offset in zip(members, steps, offsets):
                offset = 0 if offset is None else next(offset_values)
                p = entry[1]
                key = (p.shape, p.dtype, p.device, p.grad.dtype, left, basis.shape, basis.dtype, moments, residual, hyper,
                       step)  # fmt: skip
                # a warm refresh due on this step follows the update (deferred, see _refresh_if_due)
                buckets.setdefault(key, []).append((entry, state, basis, _warm_refresh_due(step, offset, gap)))
        supers: dict = {}
        for key, members in buckets.items():
            if len(members) == 1:  # a batch of one gains nothing
                rest.append(members[0][0])
                continue
            supers.setdefault((key[2], key[7]), []).append((key, members))
        for (_, moments), shape_groups in supers.items():
            # the state of all shape groups with this moment layout: one flat buffer per key
            states = [member[1] for _, members in shape_groups for member in members]
            flats = self._flat_state(states, (*moments[0], C.STEP))
            step_t = flats[-1]
            if isinstance(step_t, torch.Tensor):
                step_t.add_(1)
            else:
                torch._foreach_add_(step_t, 1)
            flat_m, flat_v = self._load_stacked(flats[:-1])
            offset = 0
            for key, members in shape_groups:
                left, step, (lr, beta1, beta2, eps, weight_decay, scale) = key[4], key[-1], key[-2]
                low_shape = members[0][1][moments[0][0]].shape
                count = len(members) * math.prod(low_shape)
                exp_avg = flat_m.narrow(0, offset, count).view(len(members), *low_shape)
                exp_avg_sq = flat_v.narrow(0, offset, count).view(len(members), *low_shape)
                offset += count
                params = [entry[1] for entry, _, _, _ in members]
                side = C.LEFT if left else C.RIGHT
                due = [i for i, member in enumerate(members) if member[3]]
                residual = {}
                if key[-3] is not None:  # Fira's residual term, per matrix after the group's update
                    scaling, limit = key[-3]
                    norms = []
                    for (group, p, _), state, basis, _ in members:
                        bases = (basis, None) if left else (None, basis)
                        args = self._residual_args(group, state, *bases, p.device)
                        norms.append(args["residual_norm"])
                    residual = dict(residual=scaling, residual_limit=limit, residual_norms=norms)
                projected = grouped_galore_adamw_update(
                    params, [p.grad for p in params], exp_avg, exp_avg_sq, [basis for _, _, basis, _ in members], side,
                    step=step + 1, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, scale=scale,
                    keep_projected=bool(due), **residual,
                )  # fmt: skip
                for i in due:
                    group, p, index = members[i][0]
                    self._refresh(p, p.grad, group, index, side, int(step), projected=projected[i])
            self._store_stacked(flats[:-1], flat_m, flat_v)
        return rest

    def _grouped_moments(self, state: dict[str, Any]) -> tuple | None:
        """How a GaLore parameter's moments are stacked on the grouped path: ``(keys, dtypes)``
        (part of the shape-group key), or ``None``: per matrix."""
        exp_avg, exp_avg_sq = state.get(C.EXP_AVG), state.get(C.EXP_AVG_SQ)
        if exp_avg is None or exp_avg_sq is None:
            return None
        return (C.EXP_AVG, C.EXP_AVG_SQ), (exp_avg.dtype, exp_avg_sq.dtype)

    def _load_stacked(self, stacks: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked moments to update from the stacked state of :meth:`_grouped_moments`' keys."""
        return stacks[0], stacks[1]

    def _store_stacked(self, stacks: tuple, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        pass  # updated in place

    def _flat_state(self, states: list, keys: tuple) -> tuple:
        """The state tensors under ``keys`` (the moments, and the step counts last) of the given
        parameters' states, each key's as one flat 1-D buffer in which every state holds a view of
        its own shape (consecutive, in order).

        The state stays per parameter, in the same keys, shapes and dtypes; the grouped update
        (and 8-bit block-wise quantization) then runs once over a buffer instead of once per
        tensor. ``torch.save`` writes a shared storage once: a checkpoint holds the same bytes as
        before. Where the views are not (or no longer) there (the first grouped step, a loaded
        checkpoint, parameters that changed), the buffer is rebuilt from the current values (one
        copy) and the views put into the states. Step counts share a buffer only when they are
        plain tensors (a fake tensor's value would be lost): otherwise the list of them.
        """
        cache = self.__dict__.setdefault("_flat_views", {})  # id(buffer) -> (buffer, its views)
        flats = []
        for key in keys:
            values = [state[key] for state in states]
            base = values[0]._base
            hit = cache.get(id(base)) if base is not None else None
            if hit is not None and hit[0] is base and len(hit[1]) == len(values) and all(map(operator.is_, values, hit[1])):
                flats.append(base)
                continue
            if key == C.STEP and not all(type(v) is torch.Tensor for v in values):
                flats.append(values)
                continue
            flat = _flat_base(values)
            if flat is None:
                flat = torch.cat([v.reshape(-1) for v in values])
                for state, piece, value in zip(states, flat.split([v.numel() for v in values]), values):
                    state[key] = piece.view(value.shape)
            for old in {id(v._base) for v in values if v._base is not None}:
                cache.pop(old, None)
            cache[id(flat)] = (flat, tuple(state[key] for state in states))
            flats.append(flat)
        return tuple(flats)

    #: the fused kernel of galore_opt.kernels this optimizer can use (None: reference only)
    _kernel: str | None = "galore_adamw"

    def _fused_galore_step(self, param, grad, state, left, right, group, low=None) -> bool:
        """The Triton path (:mod:`galore_opt.kernels.galore_adamw`): cuBLAS down-projection, one
        fused pass for the low-rank moments and normalized update, the up-projection with the
        weight decay and update in its epilogue. False (reference path) for galore_torch numerics,
        both sides projected, or moments not contiguous."""
        exp_avg, exp_avg_sq = state.get(C.EXP_AVG), state.get(C.EXP_AVG_SQ)
        if (
            group["numerics"] != "torch"
            or (left is None) == (right is None)
            or exp_avg is None
            or not (exp_avg.is_contiguous() and exp_avg_sq.is_contiguous())
            or exp_avg.dtype != exp_avg_sq.dtype
        ):
            return False
        step, low, left_c, right_c, compute_dtype = self._fused_project(param, grad, state, left, right, low)
        beta1, beta2 = group["betas"]
        norm = kernel_ops().lowrank_adam(low, exp_avg, exp_avg_sq, beta1, beta2, group["eps"], step, compute_dtype)
        self._fused_update(param, norm, left_c, right_c, group, step)
        self._fused_residual(param, grad, state, low, norm, left_c, right_c, group, step)
        return True

    def _residual_args(self, group, state, left, right, device) -> dict:
        """The residual keyword arguments of :func:`galore_adamw_update` for this parameter (empty:
        no residual term, also for a parameter updated in full, whose residual is zero), creating
        the limiter's state scalar (+inf: nothing to limit against yet) on its first use."""
        if not group.get("residual") or (left is None) == (right is None):
            return {}
        limit = group["residual_limit"]
        prev = None
        if limit is not None:
            prev = state.get(C.RESIDUAL_NORM)
            if prev is None:
                prev = state[C.RESIDUAL_NORM] = torch.full((), math.inf, dtype=torch.float32, device=device)
        return dict(residual=group["residual_scaling"], residual_limit=limit, residual_norm=prev)

    def _fused_residual(self, param, grad, state, low, norm, left_c, right_c, group, step) -> None:
        """After the fused low-rank update: the residual term in torch ops (a full-size
        temporary, one GEMM, reductions and two elementwise passes; no host read), the same
        arithmetic as the reference path (:func:`galore_adamw_update`, torch numerics)."""
        args = self._residual_args(group, state, left_c, right_c, param.device)
        if not args:
            return
        beta1, beta2 = group["betas"]
        term = residual_update(
            grad, low, norm, left_c, right_c, scaling=args["residual"],
            limit=args["residual_limit"], prev_norm=args["residual_norm"], norm_unit=1.0 / (1 - beta2**step) ** 0.5,
        )  # fmt: skip
        param.add_(term, alpha=-group["lr"] / (1 - beta1**step))

    @staticmethod
    def _fused_project(param, grad, state, left, right, low):
        """The fused paths' start: the step count (incremented), the bases in the compute dtype and
        the projected gradient (cuBLAS), unless ``low`` was given (layer-wise accumulation)."""
        step_t = state[C.STEP]
        step_t += 1
        left_c, right_c, compute_dtype = bases_for_compute(param if low is not None else grad, left, right)
        if low is None:
            low = project(grad.to(compute_dtype), left_c, right_c)
        return step_t.item(), low, left_c, right_c, compute_dtype  # step: a CPU tensor, no sync

    @staticmethod
    def _fused_update(param, norm, left_c, right_c, group, step) -> None:
        """``W <- (1 - lr wd) W - lr scale / bc1 * back(N)`` in one Triton GEMM (one side projected)."""
        lr, beta1 = group["lr"], group["betas"][0]
        a, b = (left_c, norm) if left_c is not None else (norm, right_c)
        kernel_ops().project_back_update(
            param, a, b, -lr * group["scale"] / (1 - beta1**step), 1 - lr * group["weight_decay"]
        )

    def _full_step(self, group, p, state, hyper) -> bool:
        """Update a full-size (non-GaLore) parameter another way; False: the default path."""
        return False

    @torch._disable_dynamo
    @torch.no_grad()
    def step_param(self, p: torch.Tensor, low_rank_grad: torch.Tensor | None = None) -> None:
        """Update only ``p`` (optimizer-in-backward). ``low_rank_grad``: the gradient already
        projected with ``p``'s current basis (accumulated micro-batches), used instead of
        ``p.grad``; only when :meth:`low_rank_accumulation_ready` said so."""
        for group, q, index in self._iter_params(only=p):
            with self._whole_state(q):
                self._step_one(group, q, index, low_rank_grad)

    _supports_low_rank_grad = True

    _supports_residual = True

    def _step_one(self, group, p, index, low_rank_grad=None) -> None:
        state = self.state[p]
        beta1, beta2 = group["betas"]
        hyper = dict(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            numerics=group["numerics"],
            correct_bias=group["correct_bias"],
        )
        if "rank" not in group:
            if p.grad is None:
                return
            if not state:
                state[C.STEP] = torch.tensor(0.0, dtype=torch.float32)
                self._init_moments(state, p, tuple(p.shape), group)
            if self._full_step(group, p, state, hyper):
                return
            exp_avg, exp_avg_sq = self._load_moments(state)
            grad = p.grad if exp_avg.dtype == p.grad.dtype else p.grad.to(exp_avg.dtype)
            adamw_update(p, grad, exp_avg, exp_avg_sq, state[C.STEP], **hyper)
            self._store_moments(state, exp_avg, exp_avg_sq)
            return

        if _is_dtensor(p):
            self._step_sharded(group, p, index, low_rank_grad, hyper)
            return
        param = self._as_matrix(p)
        side = self._side(p, group)
        deferred = None
        if low_rank_grad is None:
            if p.grad is None:
                return
            grad = self._as_matrix(p.grad)
            if not state:
                state[C.STEP] = torch.tensor(0.0, dtype=torch.float32)
                self._init_moments(state, p, self._low_rank_shape(p, group, side), group)
                self._init_galore_offset(p, group)
            deferred = self._refresh_if_due(p, grad, group, index, side)
        else:
            if not self.low_rank_accumulation_ready(p):
                raise RuntimeError("a projected gradient was given for a parameter whose basis is due for a refresh")
            grad = None
        left, right = state.get(C.BASIS_LEFT), state.get(C.BASIS_RIGHT)
        low = low_rank_grad
        if deferred is not None:
            # the update's projected gradient is also the refresh's first product
            left_c, right_c, compute_dtype = bases_for_compute(grad, left, right)
            low = project(grad.to(compute_dtype), left_c, right_c)
        self._update(group, p, param, grad, state, left, right, low, hyper)
        if deferred is not None:
            self._refresh(p, grad, group, index, side, deferred, projected=low)

    def _update(self, group, p, param, grad, state, left, right, low, hyper) -> None:
        """The GaLore update of the 2-D ``param`` with the bases ``left`` / ``right``: the fused
        Triton path when the dispatch picks it and it applies, else the reference path. ``low``:
        the gradient already projected (``grad`` is then not read)."""
        if resolve_impl(group["impl"], p, self._kernel) == "triton" and self._fused_galore_step(
            param, grad, state, left, right, group, low
        ):
            return
        exp_avg, exp_avg_sq = self._load_moments(state)
        galore_adamw_update(
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            state[C.STEP],
            left,
            right,
            scale=group["scale"],
            low=low,
            **self._residual_args(group, state, left, right, param.device),
            **hyper,
        )
        self._store_moments(state, exp_avg, exp_avg_sq)

    def _step_sharded(self, group, p, index, low_rank_grad, hyper) -> None:
        """A GaLore step of an FSDP2 parameter (a DTensor sharded on dim 0 over a 1-D mesh): see
        :func:`galore_opt.optim.fsdp.galore_step_sharded`."""
        from .fsdp import galore_step_sharded

        galore_step_sharded(self, group, p, index, low_rank_grad, hyper)

    def _init_sharded_moments(self, state, p, shape, group) -> None:
        """The low-rank moments of an FSDP2 parameter: ``Shard(0)`` DTensors of ``shape``."""
        from .fsdp import sharded_full

        for key in (C.EXP_AVG, C.EXP_AVG_SQ):
            state[key] = sharded_full(shape, 0.0, p.dtype, p.to_local().device, p.device_mesh)

    # Moment storage; GaLoreAdamW8bit overrides these three to keep the moments in 8 bits.

    def _init_moments(self, state: dict[str, Any], p: torch.Tensor, shape: tuple[int, ...], group: dict[str, Any]) -> None:
        for key in (C.EXP_AVG, C.EXP_AVG_SQ):
            if shape == tuple(p.shape):
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                state[key] = torch.zeros(shape, dtype=p.dtype, device=p.device)

    def _load_moments(self, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return state[C.EXP_AVG], state[C.EXP_AVG_SQ]

    def _store_moments(self, state: dict[str, Any], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        pass  # updated in place


def _flat_base(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The 1-D contiguous buffer whose consecutive pieces, in order, ``tensors`` are (contiguous
    views), or ``None``."""
    base = tensors[0]._base
    if base is None or base.dim() != 1 or not base.is_contiguous() or base.storage_offset() != 0:
        return None
    offset = 0
    for t in tensors:
        if t._base is not base or t.storage_offset() != offset or not t.is_contiguous():
            return None
        offset += t.numel()
    return base if offset == base.numel() else None


def _values(cpu_scalars: list[torch.Tensor]) -> list[float]:
    """The values of 0-dim CPU tensors (step counts, refresh offsets): one stacked read for plain
    tensors; one read each for others (a fake tensor's value is known only per tensor)."""
    if not cpu_scalars:
        return []
    if all(type(t) is torch.Tensor for t in cpu_scalars):
        return torch.stack(cpu_scalars).tolist()
    return [t.item() for t in cpu_scalars]


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)

