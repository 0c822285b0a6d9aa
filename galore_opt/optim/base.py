"""What every galore-opt optimizer shares: param-group validation and routing, lazy per-parameter
state, the basis refresh (the cold path) and the state-dict dtype policy."""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from .. import config as C
from ..functional.adamw import bases_for_compute
from ..projector import choose_side, compute_basis, project, refresh_seed

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_INTERNAL_DIRS = (
    __file__.rsplit("/optim/", 1)[0] + "/",  # galore_opt/
    torch.optim.__file__.rsplit("/", 1)[0] + "/",  # torch/optim/
)


def _user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called here that points at the first frame outside
    galore_opt and torch.optim (the user's constructor call or ``add_param_group``)."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _select(ok: Tensor, new: Tensor, prev: Tensor) -> Tensor:
    """``new`` where ``ok`` (a 0-dim device bool), else ``prev``: elementwise, so when both share a
    memory layout (an SVD refresh of an SVD basis: LAPACK's column-major) the result keeps it, and
    with it the BLAS path of every later projection."""
    return torch.where(ok, new, prev.to(new.dtype))


class GaLoreOptimizer(torch.optim.Optimizer):
    """Base class: a ``torch.optim.Optimizer`` whose param groups with a ``rank`` key are GaLore
    groups (galore-torch's convention); all other groups are updated in full.

    Subclasses implement :meth:`step` with :meth:`_iter_params`, :meth:`_refresh_if_due` before the
    update and :meth:`_refresh` after it when that deferred the refresh.
    """

    #: state keys that ``load_state_dict`` keeps in their saved dtype (and the refresh offset on
    #: the CPU) instead of casting them to the parameter's dtype
    _dtype_kept_keys: tuple[str, ...] = (*C.DTYPE_PRESERVED_KEYS, C.REFRESH_OFFSET)

    def __new__(cls, *args: Any, **kwargs: Any):
        # GaLore keys given to the constructor would be a bare "unexpected keyword argument"
        misplaced = sorted(
            k for k in kwargs if k in C.GALORE_DEFAULTS or k in C.EXTRA_DEFAULTS or k in C.RESIDUAL_DEFAULTS
        )
        if misplaced:
            key = misplaced[0]
            raise TypeError(
                f"{cls.__name__}() got {', '.join(f'{k}=' for k in misplaced)}: GaLore keys are param-group keys, "
                f"not optimizer arguments; use galore_param_groups(model, {key}=...) or a group "
                f"{{'params': [...], '{key}': ...}}"
            )
        return super().__new__(cls)

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        if defaults.get("numerics") not in C.NUMERICS:
            raise ValueError(f"Invalid numerics: {defaults.get('numerics')!r} - must be one of {C.NUMERICS}")
        self._warned_full_rank: set[tuple[int, ...]] = set()
        super().__init__(params, defaults)
        if not any("rank" in g for g in self.param_groups):
            warnings.warn(
                f"{type(self).__name__}: no param group has a 'rank' key, so nothing is projected and every "
                "parameter gets the plain (full-rank) update; build the groups with "
                "galore_opt.galore_param_groups(model, ...) or add 'rank' to the groups to project",
                stacklevel=_user_stacklevel(),
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling, ``copy.deepcopy`` and ``load_state_dict`` all come here.

        ``Optimizer.__getstate__`` keeps only defaults, state and param groups: the private
        attributes are rebuilt (:meth:`_restore_attributes`). Param groups saved by an older or a
        newer galore-opt, or by galore-torch, may lack keys this version reads: they take this
        optimizer's defaults, as torch's optimizers ``setdefault`` their new keys
        (``test_can_load_older_state_dict``); such a GaLore group is then validated again.
        """
        super().__setstate__(state)
        self._restore_attributes()
        galore_keys = (*C.GALORE_DEFAULTS, *C.EXTRA_DEFAULTS, *C.RESIDUAL_DEFAULTS)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key not in self._optimizer_wide_defaults:
                    group.setdefault(key, value)
            if "rank" in group and any(key not in group for key in galore_keys):
                self._validate_group(group)  # fills the GaLore keys (this class's defaults) and checks them

    #: defaults that are not param-group keys (torch's __setstate__ adds "differentiable")
    _optimizer_wide_defaults: tuple[str, ...] = ("differentiable",)

    def _restore_attributes(self) -> None:
        """Private attributes a copy lacks (see :meth:`__setstate__`); subclasses add theirs."""
        if "_warned_full_rank" not in self.__dict__:
            self._warned_full_rank = set()

    # --- param groups ------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except ValueError:
            self.param_groups.pop()
            raise

    def _validate_group(self, group: dict[str, Any]) -> None:
        numerics = group["numerics"]
        if numerics not in C.NUMERICS:
            raise ValueError(f"Invalid numerics: {numerics!r} - must be one of {C.NUMERICS}")
        for p in group["params"]:
            if p.is_complex():
                raise ValueError(f"complex parameters are not supported (got a {p.dtype} parameter of shape {tuple(p.shape)})")
        if "rank" not in group:
            return
        C.validate_galore_group(group, numerics)
        if group["residual"] and not self._supports_residual:
            raise ValueError(
                f"residual=True is an option of GaLoreAdamW and GaLoreAdamW8bit, not of {type(self).__name__}"
            )
        for p in group["params"]:
            if p.dim() < 2:
                raise ValueError(
                    f"A GaLore group (one with 'rank') holds a {p.dim()}-D parameter of shape "
                    f"{tuple(p.shape)}: GaLore projects matrices. Put vectors and scalars in a group "
                    "without 'rank' (galore_opt.galore_param_groups does this)"
                )
            if p.dim() > 2 and not p.is_contiguous():
                raise ValueError(
                    f"A {p.dim()}-D GaLore parameter of shape {tuple(p.shape)} must be contiguous: it is "
                    "projected as the matrix (shape[0], prod(shape[1:]))"
                )
            m, n = p.shape[0], math.prod(p.shape[1:])
            if group["rank"] >= min(m, n) and numerics == "torch":
                key = (group["rank"], m, n)
                if key not in self._warned_full_rank:
                    self._warned_full_rank.add(key)
                    names = group.get("param_names")
                    index = next(i for i, q in enumerate(group["params"]) if q is p)
                    what = repr(names[index]) if names else f"parameter {index} of its group"
                    warnings.warn(
                        f"rank={group['rank']} >= min{(m, n)} for {what} (shape {tuple(p.shape)}): a projection "
                        "would save nothing, so it is updated in full (the full update times scale, no SVD); "
                        "leave it out of the GaLore group to drop the scale",
                        stacklevel=_user_stacklevel(),
                    )

    # --- iteration and state -----------------------------------------------------------------

    def _iter_params(self, only: Tensor | None = None):
        """Yield ``(group, param, index)`` for params with a gradient (or just ``only``); ``index``
        is the param's position in the optimizer (stable across ranks and resumes: it seeds
        refreshes).

        Every gradient is checked before the first parameter is updated (as torch's optimizers
        do), so an error leaves all parameters and their state untouched and a retry does not
        update some of them twice."""
        if only is not None:
            group, i = self._locate(only)
            if only.grad is not None:
                self._check_grad(group, only)
            yield group, only, i
            return
        with_grad = []
        index = itertools.count()
        for group in self.param_groups:
            for p in group["params"]:
                i = next(index)
                if p.grad is not None:
                    self._check_grad(group, p)
                    with_grad.append((group, p, i))
        yield from with_grad

    def _check_grad(self, group: dict[str, Any], p: Tensor) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if _is_dtensor(p):  # FSDP2: checked before any parameter is updated
            from .fsdp import check_sharding

            check_sharding(p, type(self).__name__)
            if group.get("residual") and "rank" in group:
                raise NotImplementedError(
                    f"{type(self).__name__}: residual=True is not supported for FSDP2-sharded (DTensor) "
                    "parameters yet; turn it off for this group or train without FSDP2"
                )
        if grad.shape != p.shape:
            raise RuntimeError(
                f"the gradient of a parameter of shape {tuple(p.shape)} has shape {tuple(grad.shape)}: "
                "a gradient must have its parameter's shape"
            )
        if "rank" in group and p.dim() > 2 and not p.is_contiguous():
            raise RuntimeError(
                f"the {p.dim()}-D GaLore parameter of shape {tuple(p.shape)} is no longer contiguous "
                f"(strides {p.stride()}): it was converted after the optimizer was built, e.g. by "
                "model.to(memory_format=torch.channels_last). GaLore projects it as the matrix "
                "(shape[0], prod(shape[1:])) of its contiguous layout. Convert the model before "
                "building the optimizer and put such parameters in a group without 'rank', or keep "
                "them contiguous (torch.contiguous_format)"
            )
        if "rank" in group and grad.dim() > 2 and not grad.is_contiguous():
            raise RuntimeError(
                f"the gradient of the {p.dim()}-D GaLore parameter of shape {tuple(p.shape)} is not "
                f"contiguous (strides {grad.stride()}): GaLore reads it as the matrix (shape[0], "
                "prod(shape[1:])) of its contiguous layout; make it contiguous before step()"
            )

    @contextlib.contextmanager
    def _whole_state(self, p: Tensor) -> Iterator[None]:
        """A parameter's state appears whole or not at all: if its first step raises (an
        out-of-memory error or Ctrl-C in the first basis computation), the half-built state is
        dropped, so the next step starts afresh, as torch's AdamW does."""
        fresh = not self.state.get(p)
        try:
            yield
        except BaseException:
            if fresh:
                self.state.pop(p, None)
            raise

    def _locate(self, p: Tensor) -> tuple[dict[str, Any], int]:
        """``(group, index)`` of ``p``. Optimizer-in-backward asks for every parameter on every
        step, so the lookup is a dict, rebuilt when the groups change (``add_param_group``,
        ``load_state_dict``, which replaces the group dicts)."""
        key = tuple((id(g), len(g["params"])) for g in self.param_groups)
        if getattr(self, "_locations_key", None) != key:
            index = itertools.count()
            self._locations = {id(q): (g, next(index)) for g in self.param_groups for q in g["params"]}
            self._locations_key = key
        try:
            return self._locations[id(p)]
        except KeyError:
            raise KeyError("parameter is not in this optimizer") from None

    # --- hooks for optimizer-in-backward (galore_opt.layerwise) ------------------------------

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        return self._locate(p)[0]

    def low_rank_accumulation_ready(self, p: Tensor) -> bool:
        """Whether ``p``'s gradient for the *next* step may be accumulated in its projected form:
        ``p`` is a projected GaLore parameter whose basis exists and is not refreshed on the next
        step (a refresh needs the full accumulated gradient), in a group without ``residual``
        (the residual ``G - P P^T G`` needs the full accumulated gradient on every step), and not
        an FSDP2 (DTensor) parameter (accumulated in full, sharded)."""
        if not self._supports_low_rank_grad or _is_dtensor(p):
            return False
        group = self._group_of(p)
        if "rank" not in group or group.get("residual"):
            return False  # the residual G - P P^T G needs the full accumulated gradient
        state = self.state[p]
        side = self._side(p, group)
        return side != C.NONE and C.STEP in state and not self._refresh_due(state, group, side)

    def project_gradient(self, p: Tensor, grad: Tensor) -> Tensor:
        """``grad`` projected with ``p``'s current basis, in fp32 (see
        :meth:`low_rank_accumulation_ready`)."""
        state = self.state[p]
        left, right = state.get(C.BASIS_LEFT), state.get(C.BASIS_RIGHT)
        g = self._as_matrix(grad).float()
        left_c, right_c, _ = bases_for_compute(g, left, right)
        return project(g, left_c, right_c)

    def step_param(self, p: Tensor, low_rank_grad: Tensor | None = None) -> None:
        """Update only ``p`` from ``p.grad``, or from an already projected gradient."""
        raise NotImplementedError(f"{type(self).__name__} has no single-parameter step")

    #: whether step_param accepts a projected gradient (GaLoreAdamW and GaLoreAdamW8bit do)
    _supports_low_rank_grad = False

    #: whether the group key ``residual`` (Fira's residual compensation) may be True
    _supports_residual = False

    @staticmethod
    def _as_matrix(t: Tensor) -> Tensor:
        return t if t.dim() == 2 else t.view(t.shape[0], -1)

    def _side(self, p: Tensor, group: dict[str, Any]) -> str:
        """The projection side, read from the state once it exists (which basis keys it holds)."""
        state = self.state[p]
        has_left, has_right = C.BASIS_LEFT in state, C.BASIS_RIGHT in state
        if has_left and has_right:
            return C.FULL
        if has_left:
            return C.LEFT
        if has_right:
            return C.RIGHT
        if C.STEP in state:  # initialized (and refreshed) without a basis: updated in full
            return C.NONE
        m, n = p.shape[0], math.prod(p.shape[1:])
        if min(m, n) == 0:  # an empty matrix: nothing to project (a rank-0 basis under galore_torch's clipping)
            return C.NONE
        return choose_side((m, n), group["proj_type"], group["rank"], clip_rank=group["numerics"] == "galore_torch")

    def _low_rank_shape(self, p: Tensor, group: dict[str, Any], side: str) -> tuple[int, int]:
        m, n = p.shape[0], math.prod(p.shape[1:])
        r = min(group["rank"], m, n)
        return {C.LEFT: (r, n), C.RIGHT: (m, r), C.FULL: (r, r), C.NONE: (m, n)}[side]

    def _refresh_offset(self, p: Tensor, group: dict[str, Any]) -> int:
        """Spread the refreshes of a group's matrices evenly over its gap (first one on step 0)."""
        if not group["stagger_refresh"]:
            return 0
        galore_params = [q for g in self.param_groups if "rank" in g for q in g["params"]]
        k = next(i for i, q in enumerate(galore_params) if q is p)
        return (k * group["update_proj_gap"]) // len(galore_params)

    def _init_galore_offset(self, p: Tensor, group: dict[str, Any]) -> None:
        offset = self._refresh_offset(p, group)
        if offset:
            self.state[p][C.REFRESH_OFFSET] = torch.tensor(offset, dtype=torch.int32)

    def _refresh_due(self, state: dict[str, Any], group: dict[str, Any], side: str) -> bool:
        if side == C.NONE:
            return False
        if C.BASIS_LEFT not in state and C.BASIS_RIGHT not in state:
            return True  # cold start
        step = int(state[C.STEP].item())
        offset = int(state[C.REFRESH_OFFSET].item()) if C.REFRESH_OFFSET in state else 0
        return _warm_refresh_due(step, offset, group["update_proj_gap"])

    def _refresh_if_due(self, p: Tensor, grad: Tensor, group: dict[str, Any], index: int, side: str) -> int | None:
        """Before the update: recompute the basis of ``p`` from its 2-D gradient when the schedule
        says so, or defer that refresh to after the update.

        A *warm* refresh (a basis exists) under torch numerics is deferred: this step's update
        still uses the current basis, and the new one, computed from the same gradient, takes
        effect from the next step. The update's projected gradient ``P^T G`` is then also the
        power method's first product (one ``m x n x r`` GEMM fewer per refresh), and the moments,
        built in the current basis, take this step's gradient in that basis before being carried
        over. Returns the step count to pass to :meth:`_refresh` after the update, or ``None``
        (nothing due, or refreshed now: a cold start, or galore_torch numerics, which follow
        galore-torch: refresh first, then project with the new basis).
        """
        state = self.state[p]
        if not self._refresh_due(state, group, side):
            return None
        step = int(state[C.STEP].item())
        if group["numerics"] == "torch" and (C.BASIS_LEFT in state or C.BASIS_RIGHT in state):
            return step
        self._refresh(p, grad, group, index, side, step)
        return None

    def _refresh(
        self, p: Tensor, grad: Tensor, group: dict[str, Any], index: int, side: str, step: int,
        projected: Tensor | None = None,
    ) -> None:
        """Recompute the basis of ``p`` from its 2-D gradient (``step``: the step count the refresh
        was due at, which seeds it). ``projected``: ``grad`` projected with the current basis, in
        fp32 (see :func:`galore_opt.projector.compute_basis`).

        A gradient with NaN/Inf never reaches the basis: on a warm refresh the previous basis is
        kept (its next scheduled refresh tries again), on a cold start the non-finite entries are
        zeroed first. The check reads no value on the host (a CUDA refresh does not synchronize):
        ``max |G|`` is one reduction, and the new basis replaces the old one by a device-side
        select where ``max |G|`` and the new basis are finite. ``max |G|`` also sets the
        power-of-two scale that keeps the power method's products from overflowing on a huge
        finite gradient (:func:`galore_opt.projector.overflow_scale`).
        """
        state = self.state[p]
        prev_left, prev_right = state.get(C.BASIS_LEFT), state.get(C.BASIS_RIGHT)
        cold = prev_left is None and prev_right is None
        if cold:  # zero the non-finite entries (in the fp32 copy, or in a copy of an fp32 gradient)
            g = grad.detach().float()
            grad = g.nan_to_num_(0.0, 0.0, 0.0) if g is not grad else torch.nan_to_num(g, 0.0, 0.0, 0.0)
        max_abs = torch.linalg.vector_norm(grad, float("inf"))
        if projected is not None and (projected.dtype != torch.float32 or side not in (C.LEFT, C.RIGHT)):
            projected = None  # the basis is computed in fp32 from the fp32 gradient
        left, right = compute_basis(
            grad,
            group["rank"],
            side,
            group["proj_method"],
            prev_left=prev_left,
            prev_right=prev_right,
            power_iters=group["power_iters"],
            oversample=group["oversample"],
            seed=refresh_seed(self.defaults.get("seed", 0), index, step),
            align=group["align_basis"],
            projected=projected,
            max_abs=max_abs,
        )
        dtype = _DTYPES[group["basis_dtype"]] if group["basis_dtype"] else p.dtype
        if not cold:
            ok = torch.isfinite(max_abs)
            for new in (left, right):
                if new is not None:
                    ok = ok & torch.isfinite(new).all()
            if left is not None and prev_left is not None:
                left = _select(ok, left, prev_left)
            if right is not None and prev_right is not None:
                right = _select(ok, right, prev_right)
        if left is not None:
            state[C.BASIS_LEFT] = left.to(dtype)
        if right is not None:
            state[C.BASIS_RIGHT] = right.to(dtype)

    # --- serialization -----------------------------------------------------------------------

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, except that the bases keep the dtype they were
        saved in (torch would cast them to the parameter's dtype) and the refresh offset stays on
        the CPU beside ``step``, so the schedule is read without a device sync.

        The load hooks see what torch's do: pre-hooks the whole state dict as given, post-hooks
        the loaded optimizer with its bases (and 8-bit codes) attached. A ``step`` saved as a
        Python number (galore-torch, Hugging Face and old torch checkpoints) becomes the fp32 CPU
        tensor this optimizer keeps, galore-torch's projector object the basis it holds;
        param-group keys the checkpoint lacks take the defaults (see :meth:`__setstate__`).
        """
        self.__dict__.pop("_flat_views", None)  # the grouped path's buffers of the state replaced here
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        kept: dict[Any, dict[str, Tensor]] = {}
        stripped: dict[Any, dict[str, Any]] = {}
        keep = self._dtype_kept_keys
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        id_to_param = dict(zip(saved_ids, params))
        for pid, pstate in state_dict["state"].items():
            if _GALORE_TORCH_PROJECTOR in pstate and pid in id_to_param:
                pstate = _from_galore_torch(pstate, id_to_param[pid])
            kept[pid] = {k: v for k, v in pstate.items() if k in keep}
            stripped[pid] = {k: v for k, v in pstate.items() if k not in keep}
        hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()  # run above, not again
        self._optimizer_load_state_dict_post_hooks = OrderedDict()  # run below, once complete
        try:
            super().load_state_dict({**state_dict, "state": stripped})
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = hooks
        for pid, values in kept.items():
            p = id_to_param[pid]
            for key, value in values.items():
                device = torch.device("cpu") if key == C.REFRESH_OFFSET else p.device
                self.state[p][key] = value.to(device=device, copy=True)
        for state in self.state.values():
            step = state.get(C.STEP)
            if isinstance(step, numbers.Real) and not isinstance(step, bool):
                state[C.STEP] = torch.tensor(float(step), dtype=torch.float32)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _is_dtensor(t: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _warm_refresh_due(step: float, offset: float, gap: int) -> bool:
    """Whether a basis that exists is refreshed on the step that follows ``step`` steps."""
    return step >= gap and (step - offset) % gap == 0


_GALORE_TORCH_PROJECTOR = "projector"


def _from_galore_torch(pstate: dict[str, Any], p: Tensor) -> dict[str, Any]:
    """A galore-torch parameter state (a ``GaLoreProjector`` object beside the moments) in our
    keys: the projector's ``ortho_matrix`` becomes the basis of the side galore-torch projected
    (decided from the parameter's shape and ``proj_type`` as galore-torch does)."""
    pstate = dict(pstate)
    projector = pstate.pop(_GALORE_TORCH_PROJECTOR)
    ortho = getattr(projector, "ortho_matrix", None)
    proj_type = getattr(projector, "proj_type", None)
    if ortho is None:  # created, never projected: the first step computes the basis
        return pstate
    m, n = p.shape[0], math.prod(p.shape[1:])
    sides = {
        "std": C.RIGHT if m >= n else C.LEFT,
        "reverse_std": C.LEFT if m >= n else C.RIGHT,
        "left": C.LEFT,
        "right": C.RIGHT,
        "full": C.FULL,
    }
    if proj_type not in sides:
        raise ValueError(f"galore-torch state with proj_type {proj_type!r}: must be one of {tuple(sides)}")
    side = sides[proj_type]
    if side == C.FULL:
        pstate[C.BASIS_LEFT], pstate[C.BASIS_RIGHT] = ortho[0], ortho[1]
    else:
        pstate[C.BASIS_LEFT if side == C.LEFT else C.BASIS_RIGHT] = ortho
    return pstate
