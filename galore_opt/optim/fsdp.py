"""FSDP2 (``fully_shard``) support: GaLore steps of DTensor parameters sharded on dim 0 over a
1-D device mesh, and the sharded layout of their optimizer state.

Layout (see ``docs/distributed.md``). Every moment of a sharded parameter is a DTensor sharded on
dim 0 (``Shard(0)``), in its global shape:

* a full-size moment (a parameter that is not projected) has the weight's shape, so each rank
  holds the moment rows of its weight rows;
* the low-rank moments of a right-projected matrix (``m x r``) follow the weight's rows too: each
  rank updates its rows without communicating;
* the low-rank moments of a left-projected matrix (``r x n``) are cut into row blocks of the
  ``r`` basis directions: the projected gradient ``P^T G`` is all-reduced (as before), each rank
  updates its rows of the moments, and the normalized rows are all-gathered to form the update.

8-bit moments: the codes are a uint8 DTensor of the moment's shape, sharded like it. The
quantization blocks of each rank start at its shard's first element (rank ``k`` quantizes its
local rows, flattened, in blocks of ``block_size``), so no block straddles two ranks. The
per-block absmax is a DTensor of ``world * B`` fp32 values, ``B = ceil(ceil(rows / world) *
cols / block_size)`` per rank (the most any rank needs; FSDP2 gives every rank but the last
``ceil(rows / world)`` rows): rank ``k`` uses the first ``ceil(local_rows * cols / block_size)``
of its ``B`` (a shorter last rank uses fewer, an empty one none; the rest stay 0). When
``ceil(rows / world) * cols`` is a multiple of ``block_size`` every shard starts on a block
boundary of the unsharded layout, and the sharded state holds the unsharded blocks exactly
(bit-identical updates); otherwise the blocks differ from an unsharded run's, by the
quantization's own error. The absmax layout depends on the world size, so a distributed
checkpoint of 8-bit state loads on a mesh of the same size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import config as C
from ..functional.adamw import add_projected_back, bases_for_compute
from ..projector import project_back

_MOMENT_KEYS = (
    C.EXP_AVG,
    C.EXP_AVG_SQ,
    C.EXP_AVG_CODES,
    C.EXP_AVG_SQ_CODES,
    C.EXP_AVG_ABSMAX,
    C.EXP_AVG_SQ_ABSMAX,
)
_ABSMAX_OF = {C.EXP_AVG_ABSMAX: C.EXP_AVG_CODES, C.EXP_AVG_SQ_ABSMAX: C.EXP_AVG_SQ_CODES}


def is_dtensor(t: Any) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def check_sharding(p: Tensor, who: str, hint: str = "") -> None:
    """FSDP2 parameters as these optimizers take them: sharded on dim 0 over a 1-D mesh."""
    from torch.distributed.tensor import Shard

    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise NotImplementedError(
            f"{who} on DTensor parameters needs them sharded on dim 0 over a 1-D device mesh (fully_shard "
            f"with a 1-D mesh); got placements {tuple(placements)} on a {mesh.ndim}-D mesh. HSDP (a 2-D mesh) "
            "is not supported" + hint
        )


def local_rows(shape: tuple[int, ...] | torch.Size, mesh) -> slice:
    """The rows of a tensor of global ``shape`` that this rank holds under ``Shard(0)``."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local, offset = compute_local_shape_and_global_offset(torch.Size(shape), mesh, [Shard(0)])
    return slice(offset[0], offset[0] + local[0])


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def shard_rows(full: Tensor, mesh) -> Tensor:
    """``full`` (the same on every rank) as a ``Shard(0)`` DTensor: each rank keeps its rows (a
    copy), with no communication."""
    from torch.distributed.tensor import DTensor, Shard

    rows = local_rows(full.shape, mesh)
    local = full[rows].clone()
    return DTensor.from_local(
        local, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=_contiguous_stride(tuple(full.shape))
    )


def sharded_full(shape: tuple[int, ...], fill: float, dtype: torch.dtype, device, mesh) -> Tensor:
    """A ``Shard(0)`` DTensor of global ``shape`` filled with ``fill``."""
    from torch.distributed.tensor import DTensor, Shard

    rows = local_rows(shape, mesh)
    local = torch.full((rows.stop - rows.start, *shape[1:]), fill, dtype=dtype, device=device)
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(tuple(shape)))  # fmt: skip


def blocks_per_rank(shape: tuple[int, ...], mesh, block_size: int) -> int:
    """``B``: the absmax values each rank reserves for a ``Shard(0)`` tensor of ``shape`` (see the
    module docstring)."""
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:])
    per_rank_rows = -(-rows // mesh.size())
    return -(-per_rank_rows * cols // block_size)


def sharded_absmax(shape: tuple[int, ...], block_size: int, device, mesh) -> Tensor:
    """The per-block absmax of a ``Shard(0)`` 8-bit moment of ``shape``: ``world * B`` zeros,
    evenly sharded."""
    from torch.distributed.tensor import DTensor, Shard

    b = blocks_per_rank(shape, mesh, block_size)
    local = torch.zeros(b, dtype=torch.float32, device=device)
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size((b * mesh.size(),)),
                              stride=(1,))  # fmt: skip


def local_moments(state: dict[str, Any], block_size: int | None) -> dict[str, Tensor]:
    """This rank's pieces of the moment tensors in ``state`` (views: writing them writes the
    state); an absmax is cut to the blocks this rank's codes use."""
    local: dict[str, Tensor] = {}
    for key in _MOMENT_KEYS:
        if key in state:
            value = state[key]
            local[key] = value.to_local() if is_dtensor(value) else value
    for key, codes_key in _ABSMAX_OF.items():
        if key in local and is_dtensor(state[key]):
            used = -(-local[codes_key].numel() // block_size)
            local[key] = local[key].narrow(0, 0, used)
    return local


def galore_step_sharded(opt, group: dict[str, Any], p: Tensor, index: int, low_rank_grad: Tensor | None,
                        hyper: dict[str, Any]) -> None:  # fmt: skip
    """A GaLore AdamW step of an FSDP2 parameter (``GaLoreAdamW`` and ``GaLoreAdamW8bit``).

    Refresh: the gradient is all-gathered on the steps that refresh the basis (only those), and
    every rank computes the same basis (seeded from step and parameter) from it, after the update
    when the refresh is deferred. Left basis ``P`` (m x r, whole on every rank): the projected
    gradient is the all-reduced sum of the ranks' ``P_k^T G_k`` (r x n); each rank updates its rows
    of the (sharded) moments and the normalized rows are all-gathered; each rank then adds
    ``P_k N`` to its weight rows. Right basis ``Q`` (r x n, whole on every rank): each rank projects
    its rows, ``G_k Q^T``, and updates its moment rows and weight rows, with no communication. No
    basis (``rank >= min(m, n)`` under torch numerics): the full update of the rank's rows, times
    ``scale``.
    The arithmetic is :func:`galore_opt.functional.galore_adamw_update`'s, split at the normalized
    update ``N``, so results equal the unsharded optimizer's up to the order of the reduction.
    """
    if low_rank_grad is not None:
        raise NotImplementedError("projected (low-rank) accumulation of FSDP2 parameters is not supported")
    if p.grad is None:
        return
    who = type(opt).__name__
    check_sharding(p, who)
    if p.dim() != 2:
        raise NotImplementedError(
            f"{who}: GaLore on a {p.dim()}-D DTensor parameter of shape {tuple(p.shape)}; FSDP2 GaLore "
            "parameters must be 2-D (put others in a group without 'rank')"
        )
    mesh = p.device_mesh
    state = opt.state[p]
    side = opt._side(p, group)
    if not state:
        state[C.STEP] = torch.tensor(0.0, dtype=torch.float32)
        opt._init_sharded_moments(state, p, opt._low_rank_shape(p, group, side), group)
        opt._init_galore_offset(p, group)
    grad = p.grad
    deferred = full = None
    if opt._refresh_due(state, group, side):
        full = grad.full_tensor()
        deferred = opt._refresh_if_due(p, full, group, index, side)
        side = opt._side(p, group)
    if side not in (C.LEFT, C.RIGHT, C.NONE):
        raise NotImplementedError(
            f"{who}: GaLore on DTensor parameters projects one side (left or right), not {side!r}"
        )
    local_w, local_g = p.to_local(), grad.to_local()
    left, right = state.get(C.BASIS_LEFT), state.get(C.BASIS_RIGHT)
    local = local_moments(state, getattr(opt, "_block_size", None))
    exp_avg, exp_avg_sq = opt._load_moments(local)
    step_t = state[C.STEP]
    step_t += 1
    step = step_t.item()  # a CPU tensor: no device sync
    if side == C.LEFT:
        left_c, _, compute_dtype = bases_for_compute(local_g, left[local_rows(p.shape, mesh)], None)
        low = left_c.t() @ local_g.to(compute_dtype)  # this rank's part of P^T G
        torch.distributed.all_reduce(low, group=mesh.get_group())
        projected = low  # the whole P^T G, the same on every rank: the refresh's first product
        mine = low[local_rows(low.shape, mesh)]
        norm_rows = _normalized(mine, exp_avg, exp_avg_sq, step, hyper)
        norm = _gather_rows(norm_rows, tuple(low.shape), mesh)
        _apply(local_w, norm, left_c, None, step, hyper, group["scale"], compute_dtype)
    elif side == C.RIGHT:
        _, right_c, compute_dtype = bases_for_compute(local_g, None, right)
        low = local_g.to(compute_dtype) @ right_c.t()  # these rows of G Q^T
        projected = None  # only this rank's rows of G Q^T
        norm = _normalized(low, exp_avg, exp_avg_sq, step, hyper)
        _apply(local_w, norm, None, right_c, step, hyper, group["scale"], compute_dtype)
    else:  # rank >= min(m, n) under torch numerics: the full update times scale, moments like the weight
        projected = None
        norm = _normalized(local_g, exp_avg, exp_avg_sq, step, hyper)
        _apply(local_w, norm, None, None, step, hyper, group["scale"], local_g.dtype)
    opt._store_moments(local, exp_avg, exp_avg_sq)
    if deferred is not None:
        opt._refresh(p, full, group, index, side, deferred, projected=projected)


def _normalized(low: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: float, hyper: dict[str, Any]) -> Tensor:
    """The moments' update and the normalized low-rank direction ``N`` (``galore_adamw_update``'s
    arithmetic before the projection back)."""
    beta1, beta2, eps = hyper["beta1"], hyper["beta2"], hyper["eps"]
    low = low.to(exp_avg.dtype)
    if hyper["numerics"] == "torch":
        exp_avg.lerp_(low, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1 - beta2)
        denom = exp_avg_sq.sqrt().div_((1 - beta2**step) ** 0.5).add_(eps)
        return exp_avg / denom
    exp_avg.mul_(beta1).add_(low, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
    return exp_avg / exp_avg_sq.sqrt().add_(eps)


def _apply(param: Tensor, norm: Tensor, left_c, right_c, step: float, hyper: dict[str, Any], scale: float,
           compute_dtype: torch.dtype) -> None:  # fmt: skip
    """The weight update from ``N`` (``galore_adamw_update``'s arithmetic after ``N``)."""
    lr, beta1, beta2, weight_decay = hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["weight_decay"]
    if hyper["numerics"] == "torch":
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        add_projected_back(param, norm, left_c, right_c, alpha=-lr * scale / (1 - beta1**step))
        return
    step_size = lr
    if hyper["correct_bias"]:
        step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    update = project_back(norm.to(compute_dtype), left_c, right_c) * scale
    param.add_(update.to(param.dtype), alpha=-step_size)
    if weight_decay > 0.0:
        param.add_(param, alpha=-lr * weight_decay)


def _gather_rows(rows: Tensor, shape: tuple[int, ...], mesh) -> Tensor:
    """The whole ``shape`` tensor from every rank's ``Shard(0)`` rows (an all-gather; uneven
    shards included)."""
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(
        rows.contiguous(), mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=_contiguous_stride(shape)
    ).full_tensor()


def tensor_bytes(t: Tensor) -> int:
    """Bytes this rank holds for ``t`` (a DTensor's local shard only)."""
    if is_dtensor(t):
        t = t.to_local()
    return t.numel() * t.element_size()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The bytes of optimizer state this rank holds: every state tensor, a DTensor's local shard
    only (what sharding saves is visible here; replicated tensors count in full)."""
    return sum(tensor_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor))


def shard_largest(full: Tensor, mesh) -> Tensor:
    """``full`` (the same on every rank) as a DTensor sharded on its largest dimension (the first
    of equals): each rank keeps a copy of its piece, with no communication."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    dim = max(range(full.dim()), key=lambda d: (full.shape[d], -d))
    shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, [Shard(dim)])
    local = full.narrow(dim, offset[dim], shape[dim]).clone()
    return DTensor.from_local(
        local, mesh, [Shard(dim)], run_check=False, shape=full.shape, stride=_contiguous_stride(tuple(full.shape))
    )
