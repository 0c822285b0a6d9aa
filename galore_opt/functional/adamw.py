"""Single-tensor ground truth of the AdamW and GaLore-AdamW updates.

Two numerics, chosen per param group:

* ``"torch"``: ``torch.optim.AdamW``'s (``_single_tensor_adam`` with decoupled weight decay):
  weight decay ``W *= 1 - lr * wd`` first, ``eps`` added after dividing by ``sqrt(bias_correction2)``,
  step size ``lr / bias_correction1``. Same ops in the same order, so non-GaLore parameters follow
  ``torch.optim.AdamW(foreach=False)`` bit for bit.
* ``"galore_torch"``: galore-torch 1.0's AdamW (Hugging Face's old ``transformers.AdamW``):
  ``eps`` added to ``sqrt(v)`` before bias correction, step size ``lr * sqrt(bc2) / bc1``, weight
  decay ``W -= lr * wd * W`` after the update, and the same ops in the same order as galore-torch.

The GaLore update projects the gradient with the current basis, runs Adam on the low-rank moments,
and projects the normalized update back, scaled by ``scale``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..projector import project, project_back

#: on the CPU, a full-size AdamW update of a larger contiguous parameter runs over slices of this
#: many elements: each slice's temporaries stay in cache and come back from the allocator's free
#: list, where a whole-tensor ``sqrt(v)`` is a fresh mmap (page faults) every step. Elementwise, so
#: the result is the same; measured 66 -> 28 ms for a 32000 x 512 embedding (1 thread).
CPU_SLICE = 1 << 20
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def adamw_update(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_t: Tensor, **hyper: Any
) -> None:
    """One AdamW step of a full-size parameter, in place: ``step_t`` is incremented, then
    :func:`adamw_apply` (keyword arguments: ``lr``, ``beta1``, ``beta2``, ``eps``,
    ``weight_decay``, ``numerics``, ``correct_bias``), slice by slice on the CPU
    (:data:`CPU_SLICE`)."""
    step_t += 1
    step = step_t.item()
    tensors = (param, grad, exp_avg, exp_avg_sq)
    n = param.numel()
    if (
        param.device.type == "cpu"
        and n > CPU_SLICE
        and all(type(t) in _PLAIN and t.shape == param.shape and t.is_contiguous() for t in tensors)
    ):  # plain tensors only: slicing a DTensor (FSDP2) would redistribute it
        flat = [t.view(-1) for t in tensors]
        for start in range(0, n, CPU_SLICE):
            adamw_apply(*(t[start : start + CPU_SLICE] for t in flat), step, **hyper)
        return
    adamw_apply(param, grad, exp_avg, exp_avg_sq, step, **hyper)


def adamw_apply(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: float,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    numerics: str = "torch",
    correct_bias: bool = True,
) -> None:
    """:func:`adamw_update` for a given (already incremented) ``step``: elementwise, so a
    parameter may be updated slice by slice with the same result."""
    if numerics == "torch":
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        # torch's (sqrt(v) / sqrt(bc2)).add_(eps) with the division in place: the same kernel and
        # values, one full-size temporary instead of two
        denom = exp_avg_sq.sqrt().div_(bias_correction2**0.5).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
        return
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    step_size = lr
    if correct_bias:
        step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    param.add_(exp_avg / denom, alpha=-step_size)
    if weight_decay > 0.0:
        param.add_(param, alpha=-lr * weight_decay)


def bases_for_compute(
    grad: Tensor, left: Tensor | None, right: Tensor | None
) -> tuple[Tensor | None, Tensor | None, torch.dtype]:
    """The bases cast to the dtype the projections run in: the gradient's, or fp32 when a stored
    basis has another dtype (e.g. a bf16 basis of an fp32 parameter, or an fp32 one of a bf16)."""
    compute_dtype = grad.dtype
    basis_dtypes = {b.dtype for b in (left, right) if b is not None}
    if basis_dtypes and basis_dtypes != {grad.dtype}:
        compute_dtype = torch.float32
    left_c = None if left is None else left.to(compute_dtype)
    right_c = None if right is None else right.to(compute_dtype)
    return left_c, right_c, compute_dtype


def add_projected_back(param: Tensor, norm: Tensor, left: Tensor | None, right: Tensor | None, *, alpha: float) -> None:
    """``W += alpha * back(N)``; one GEMM accumulating into ``W`` (no full-size temporary) when a
    single side is projected and the dtypes agree."""
    dtype = (left if left is not None else right).dtype if (left is not None or right is not None) else param.dtype
    if dtype == param.dtype and (left is None) != (right is None):
        if left is not None:
            param.addmm_(left, norm.to(dtype), alpha=alpha)
        else:
            param.addmm_(norm.to(dtype), right, alpha=alpha)
    else:
        update = project_back(norm.to(dtype), left, right)
        param.add_(update.to(param.dtype), alpha=alpha)


#: added to the low-rank gradient's norm in the residual's scaling ratio (Fira's 1e-8): a zero
#: column of ``R`` gives a zero factor, not a division by zero
RESIDUAL_EPS = 1e-8


def residual_update(
    grad: Tensor,
    low: Tensor,
    norm: Tensor,
    left: Tensor | None,
    right: Tensor | None,
    *,
    scaling: str = "column",
    limit: float | None = None,
    prev_norm: Tensor | None = None,
    norm_unit: float = 1.0,
) -> Tensor:
    r"""Fira's residual term (Chen et al., 2024), a new tensor of ``grad``'s shape in the bases'
    dtype (the projection's).

    With the gradient :math:`G`, its projection :math:`R` (``low``: :math:`P^\top G` for a left
    basis :math:`P`, :math:`G Q^\top` for a right one :math:`Q`) and the low-rank Adam direction
    :math:`N` (``norm``, the shape of ``R``):

    .. math::
        S = \phi \odot (G - P R) \quad (\text{or } G - R Q), \qquad
        \phi = \frac{\lVert N \rVert}{\lVert R \rVert + 10^{-8}}

    ``scaling="column"``: one ratio per vector of the *unprojected* dimension (norms over the rank
    dimension: per column of ``R = P^T G`` for a left basis, per row of ``R = G Q^T`` for a right
    one), as Fira's code; ``"matrix"``: one ratio for the matrix. Exactly one of ``left`` /
    ``right`` is given, in the dtype the projection runs in.

    ``limit`` (Fira's norm-growth limiter, :math:`\gamma`): ``s = norm_unit * ||S||`` is compared
    with ``prev_norm`` (a 0-dim fp32 tensor, updated in place); where ``s > gamma * prev``, ``S``
    is divided by ``s / (gamma * prev)`` (its norm grows by ``gamma`` at most) and ``prev_norm``
    becomes the limited norm. ``prev_norm = inf`` (before the first step) limits nothing. A
    non-finite norm (a NaN/Inf gradient) leaves ``prev_norm`` as it was. ``norm_unit`` converts
    ``||S||`` to the units the limiter compares in (see :func:`galore_adamw_update`). Reads no
    value on the host.
    """
    if (left is None) == (right is None):
        raise ValueError("the residual needs exactly one projected side (a left or a right basis)")
    # the norms over the rank dimension: dim 0 of R (r x n) for a left basis, dim 1 of R (m x r)
    dim = 0 if left is not None else 1
    # one copy of G in the bases' dtype (the projection's), the only full-size temporary
    out = grad.to((left if left is not None else right).dtype, memory_format=torch.contiguous_format, copy=True)
    if left is not None:
        out.addmm_(left, low.to(out.dtype), alpha=-1)
    else:
        out.addmm_(low.to(out.dtype), right, alpha=-1)
    f32 = torch.float32
    if scaling == "column":
        factor = torch.linalg.vector_norm(norm, dim=dim, keepdim=True, dtype=f32)
        factor = factor.div_(torch.linalg.vector_norm(low, dim=dim, keepdim=True, dtype=f32).add_(RESIDUAL_EPS))
    elif scaling == "matrix":
        factor = torch.linalg.vector_norm(norm, dtype=f32) / torch.linalg.vector_norm(low, dtype=f32).add_(RESIDUAL_EPS)
    else:
        raise ValueError(f"Invalid residual_scaling: {scaling!r} - must be 'column' or 'matrix'")
    if limit is not None:
        if prev_norm is None:
            raise ValueError("residual_update: limit needs prev_norm (the last residual norm, a 0-dim tensor)")
        # ||phi (.) X|| from the norms of X's vectors: no second full-size temporary
        if scaling == "column":
            s = torch.linalg.vector_norm(factor * torch.linalg.vector_norm(out, dim=dim, keepdim=True, dtype=f32))
        else:
            s = factor * torch.linalg.vector_norm(out, dtype=f32)
        if norm_unit != 1.0:
            s = s * norm_unit
        ratio = s / (prev_norm + RESIDUAL_EPS)
        limiter = torch.where(ratio > limit, ratio / limit, torch.ones_like(ratio))
        factor = factor / limiter
        limited = s / limiter
        # where(out=), not copy_: a fake CUDA tensor's copy_ needs a CUDA build (FakeTensorMode)
        torch.where(torch.isfinite(limited), limited, prev_norm, out=prev_norm)
    out.mul_(factor)
    return out


def galore_adamw_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step_t: Tensor,
    left: Tensor | None,
    right: Tensor | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    numerics: str = "torch",
    correct_bias: bool = True,
    low: Tensor | None = None,
    residual: str | None = None,
    residual_limit: float | None = None,
    residual_norm: Tensor | None = None,
) -> None:
    """One GaLore-AdamW step of a 2-D parameter, in place.

    ``left`` / ``right`` are the stored bases (``None`` for a side not projected; both ``None``
    updates the parameter in full, scaled). The moments have the low-rank shape. ``low``, if
    given, is the already projected gradient (``grad`` is then ignored, unless ``residual``).

    ``residual`` (``"column"`` / ``"matrix"``; ``None``: off): Fira's residual compensation
    (:func:`residual_update`), one side projected only, ``grad`` required. The residual term ``S``
    is added to the update *unscaled* by ``scale`` (Fira: ``W -= lr_t (scale P N + S)``), with
    the Adam direction the low-rank update applies (torch numerics: bias-corrected,
    ``W -= lr (scale P N / bc1 + S)`` with ``phi = ||N / bc1|| / ||R||``; galore_torch numerics:
    Fira's code, ``W -= lr sqrt(bc2) / bc1 (scale P N + S)``, ``N = m / (sqrt(v) + eps)``).
    ``residual_limit``: the norm-growth limit, with ``residual_norm`` the state scalar it updates;
    it compares norms in Fira's units (the residual term before the bias-correction factor
    ``sqrt(bc2) / bc1``, which alone grows the torch-numerics term by up to ~5 % per step over the
    first tens of steps), so it fires on the gradient's growth, not on Adam's warm-up.
    """
    step_t += 1
    step = step_t.item()
    if residual is not None and grad is None:
        raise ValueError("the residual term needs the full gradient (grad=None was given)")
    left_c, right_c, compute_dtype = bases_for_compute(param if grad is None else grad, left, right)
    if low is None:
        low = project(grad.to(compute_dtype), left_c, right_c)
    projected = low
    low = low.to(exp_avg.dtype)

    if numerics == "torch":
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(low, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = exp_avg_sq.sqrt().div_(bias_correction2**0.5).add_(eps)
        norm = exp_avg / denom
        add_projected_back(param, norm, left_c, right_c, alpha=-lr * scale / bias_correction1)
        if residual is not None:
            term = residual_update(
                grad, projected, norm, left_c, right_c, scaling=residual, limit=residual_limit,
                prev_norm=residual_norm, norm_unit=1.0 / bias_correction2**0.5,
            )  # fmt: skip
            param.add_(term, alpha=-lr / bias_correction1)  # rounded once, to the parameter's dtype
        return

    exp_avg.mul_(beta1).add_(low, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    step_size = lr
    if correct_bias:
        step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    norm = exp_avg / denom
    update = project_back(norm.to(compute_dtype), left_c, right_c) * scale
    if residual is not None:
        update += residual_update(
            grad, projected, norm, left_c, right_c, scaling=residual, limit=residual_limit,
            prev_norm=residual_norm,
        )  # fmt: skip
    param.add_(update.to(param.dtype), alpha=-step_size)
    if weight_decay > 0.0:
        param.add_(param, alpha=-lr * weight_decay)


# --- grouped (multi-tensor) paths ------------------------------------------------------------------

#: the grouped GaLore update stacks the weights (and gradients) of at most this many elements at a
#: time: the stacked copies are its only full-size temporaries (64 MiB each in fp32), whatever the
#: number of matrices in a shape group
GROUP_CHUNK = 1 << 24

#: matrices of more elements than this (per device type) keep one GEMM per matrix on the grouped
#: path (the projection into the group's stacked projected gradient, the update accumulated into
#: the weight itself), bit for bit the per-matrix path's: stacking their weights and gradients for
#: a batched GEMM costs more memory traffic than the launches it saves (measured on the CPU:
#: 60M-layer shapes, 23 ms per matrix vs 28 ms stacked, 1 thread)
BATCHED_GEMM_MAX_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 22}


def _scalar(value: float, device: torch.device) -> Tensor:
    """``value`` as a 0-dim fp32 tensor on ``device``, for ``torch._foreach_mul_``: given a Python
    number, the CPU foreach kernel rounds it to the tensors' dtype first (0.99 becomes 0.98828125
    in bf16), where ``Tensor.mul_`` multiplies in fp32; given this tensor it multiplies as
    ``Tensor.mul_`` does."""
    return torch.full((), value, dtype=torch.float32, device=device)


def multi_tensor_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """:func:`adamw_update` (torch numerics) of many full-size parameters on one device at the same
    ``step`` (the count after incrementing; ``steps`` are incremented here): the ops of
    :func:`adamw_apply` as ``torch._foreach_*`` operators over the lists, those of PyTorch's foreach
    AdamW (``torch.optim.adamw``'s ``_multi_tensor_adam``), one dispatch per list.

    Bit for bit :func:`adamw_update`'s on the CPU (each foreach operator runs the single-tensor
    kernel per tensor) except where torch's foreach AdamW is not: it multiplies bf16/fp16 tensors
    by ``beta2`` and ``1 - lr * wd`` rounded to their dtype (a Python scalar given to
    ``_foreach_mul_``); here the multipliers are fp32 tensors (:func:`_scalar`), as in ``mul_``.
    """
    if not params:
        return
    torch._foreach_add_(steps, 1)
    device = params[0].device
    if weight_decay != 0:
        torch._foreach_mul_(params, _scalar(1 - lr * weight_decay, device))
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, _scalar(beta2, device))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2**0.5)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-step_size)


def _lowrank_moments(low, exp_avg, exp_avg_sq, beta1, beta2) -> None:
    """The moments' update of the low-rank Adam step, in place (torch AdamW's ops)."""
    exp_avg.lerp_(low, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1 - beta2)


def grouped_galore_adamw_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    bases: list[Tensor],
    side: str,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    chunk: int = GROUP_CHUNK,
    keep_projected: bool = False,
    residual: str | None = None,
    residual_limit: float | None = None,
    residual_norms: list[Tensor | None] | None = None,
) -> list[Tensor] | None:
    """:func:`galore_adamw_update` (torch numerics, one side projected) of a *shape group*: 2-D
    parameters of one shape, dtype and device, their gradients (one dtype) and bases (one shape
    and dtype, all ``side``: ``"left"`` or ``"right"``), at the same ``step`` (the count after
    incrementing; the caller increments the step tensors). ``exp_avg`` / ``exp_avg_sq``: the
    group's low-rank moments stacked, ``(len(params), *low_rank_shape)``, updated in place.
    Returns the projected gradients (one per matrix, in the projection's dtype) when
    ``keep_projected`` (a deferred refresh reuses them), else ``None``.

    The products of small matrices (:data:`BATCHED_GEMM_MAX_ELEMENTS`) run as batched GEMMs over
    stacked operands: one ``bmm`` projects every gradient, one ``baddbmm_`` (``W <- W + alpha P N``
    per matrix, into a stacked copy of the weights, copied back with one ``_foreach_copy_``)
    applies every update; stacking runs ``chunk`` weight elements at a time (the stacked weights
    and gradients are the only full-size temporaries). Larger matrices keep one GEMM per matrix
    (exactly the per-matrix path's). The low-rank Adam arithmetic is the reference's ops on the
    stacked moments, once for the group.

    Numerics: the elementwise ops are the reference's, element by element. ``bmm`` and
    ``baddbmm_`` on the CPU run the same GEMM per matrix as ``mm`` / ``addmm_`` for most shapes
    (bit for bit), but another kernel for tiny products (``m n r < 400``: a plain loop) and may
    for some large ones (oneDNN): there the result differs from the per-matrix path by the
    reassociation of one GEMM's sums (the tolerance table's ``grouped_gemm`` bound, tested).

    ``residual`` / ``residual_limit`` / ``residual_norms`` (one limiter scalar per matrix): Fira's
    residual term as :func:`galore_adamw_update` adds it, computed per matrix
    (:func:`residual_update`) after the group's low-rank update, from the same projected gradient
    and Adam direction: the per-matrix path's ops on the per-matrix path's operands.
    """
    if not params:
        return None
    left = side == "left"
    m, n = params[0].shape
    batched = m * n <= BATCHED_GEMM_MAX_ELEMENTS.get(params[0].device.type, 1 << 22)
    per = max(1, chunk // max(1, m * n)) if batched else len(params)
    basis_dtype, grad_dtype = bases[0].dtype, grads[0].dtype
    compute_dtype = grad_dtype if basis_dtype == grad_dtype else torch.float32
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    alpha = -lr * scale / bias_correction1
    projected = [] if keep_projected else None
    if weight_decay != 0:
        torch._foreach_mul_(params, _scalar(1 - lr * weight_decay, params[0].device))
    for start in range(0, len(params), per):
        stop = min(start + per, len(params))
        ps = params[start:stop]
        m_t = exp_avg if stop - start == len(params) else exp_avg.narrow(0, start, stop - start)
        v_t = exp_avg_sq if stop - start == len(params) else exp_avg_sq.narrow(0, start, stop - start)
        if batched:
            basis = torch.stack(bases[start:stop])
            if basis.dtype != compute_dtype:
                basis = basis.to(compute_dtype)
            grad = torch.stack(grads[start:stop])
            if grad.dtype != compute_dtype:
                grad = grad.to(compute_dtype)
            low = torch.bmm(basis.transpose(1, 2), grad) if left else torch.bmm(grad, basis.transpose(1, 2))
            del grad
        else:  # one GEMM per matrix into the stacked result
            basis = [b.to(compute_dtype) for b in bases[start:stop]]  # the stored bases, as the reference
            low = torch.empty(m_t.shape, dtype=compute_dtype, device=m_t.device)
            for g, b, out in zip(grads[start:stop], basis, low.unbind(0)):
                g = g if g.dtype == compute_dtype else g.to(compute_dtype)
                torch.mm(b.t(), g, out=out) if left else torch.mm(g, b.t(), out=out)
        if projected is not None:
            projected.extend(low.unbind(0))
        low_c = low if residual is not None else None  # R in the projection's dtype, for the residual
        if low.dtype != m_t.dtype:
            low = low.to(m_t.dtype)
        if m_t.device.type == "cpu" and m_t.numel() > CPU_SLICE:  # slices: temporaries stay in cache (CPU_SLICE)
            norm = torch.empty_like(m_t)
            flat = [t.view(-1) for t in (low, m_t, v_t, norm)]
            for i in range(0, m_t.numel(), CPU_SLICE):
                g, mm, vv, out = (t[i : i + CPU_SLICE] for t in flat)
                _lowrank_moments(g, mm, vv, beta1, beta2)
                torch.div(mm, vv.sqrt().div_(bias_correction2**0.5).add_(eps), out=out)
        else:
            _lowrank_moments(low, m_t, v_t, beta1, beta2)
            norm = m_t / v_t.sqrt().div_(bias_correction2**0.5).add_(eps)
        del low
        direction = norm  # the Adam direction in the moments' dtype, as the residual's reference reads it
        if norm.dtype != compute_dtype:
            norm = norm.to(compute_dtype)
        if not batched:
            norms = norm.unbind(0)
            for p, x, y in zip(ps, basis if left else norms, norms if left else basis):
                if compute_dtype == p.dtype:
                    p.addmm_(x, y, alpha=alpha)
                else:
                    p.add_((x @ y).to(p.dtype), alpha=alpha)
            if residual is not None:
                _grouped_residual(ps, grads[start:stop], low_c, direction, basis, left, step, lr,
                                  beta1, beta2, residual, residual_limit, residual_norms[start:stop])  # fmt: skip
            continue
        a, b = (basis, norm) if left else (norm, basis)
        if compute_dtype == ps[0].dtype:  # one GEMM accumulating into the (stacked) weights
            weight = torch.stack(ps)
            weight.baddbmm_(a, b, alpha=alpha)
            torch._foreach_copy_(ps, weight.unbind(0))
        else:
            update = torch.bmm(a, b).to(ps[0].dtype)
            torch._foreach_add_(ps, update.unbind(0), alpha=alpha)
        if residual is not None:
            _grouped_residual(ps, grads[start:stop], low_c, direction, basis, left, step, lr,
                              beta1, beta2, residual, residual_limit, residual_norms[start:stop])  # fmt: skip
    return projected


def _grouped_residual(params, grads, low, direction, bases, left, step, lr, beta1, beta2,
                      scaling, limit, prev_norms) -> None:  # fmt: skip
    """The residual terms of a chunk of a shape group, matrix by matrix, as
    :func:`galore_adamw_update` (torch numerics) adds them."""
    bias_correction1 = 1 - beta1**step
    norm_unit = 1.0 / (1 - beta2**step) ** 0.5
    # unbind, not [i]: Python indexing takes a device guard that a fake CUDA tensor on a CPU-only
    # build cannot (FakeTensorMode)
    if isinstance(bases, Tensor):
        bases = bases.unbind(0)
    for p, g, b, r, n, prev in zip(params, grads, bases, low.unbind(0), direction.unbind(0), prev_norms):
        term = residual_update(
            g, r, n, b if left else None, None if left else b, scaling=scaling, limit=limit,
            prev_norm=prev, norm_unit=norm_unit,
        )  # fmt: skip
        p.add_(term, alpha=-lr / bias_correction1)
