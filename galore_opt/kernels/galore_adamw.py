"""Fused GaLore-AdamW step (Triton): the low-rank Adam update, and the up-projection with the
weight update in its epilogue.

The step of one GaLore matrix ``W`` (``m x n``) with basis ``P`` is, in torch AdamW numerics,

    R = project(G)                                   # cuBLAS: P^T G (left) or G Q^T (right)
    M.lerp_(R, 1 - b1);  V = b2 V + (1 - b2) R^2      # low-rank moments, in place
    N = M / (sqrt(V) / sqrt(bc2) + eps)              # normalized low-rank update
    W = (1 - lr wd) W - lr scale / bc1 * back(N)     # back: P N (left) or N Q (right)

The down-projection stays in cuBLAS (the "hybrid" torchao measured fastest: a skinny GEMM that
cuBLAS already runs near peak). Two kernels replace the rest:

- :func:`lowrank_adam`: one elementwise pass over the ``r x n`` (or ``m x r``) low-rank tensors
  instead of the reference's eight, moments updated in place, ``N`` written once. Arithmetic in
  fp32; moments stored in their dtype, rounded after each operation as torch rounds them, so a
  bf16 run follows the reference's bf16 run.
- :func:`project_back_update`: ``W <- decay * W + alpha * (A @ B)`` with ``A @ B`` the projected-back
  update, accumulated in fp32 tiles and added to ``W`` in the epilogue: one read and one write of
  ``W``, no full-size temporary, weight decay folded in (the reference does a separate ``W *= decay``
  pass, and for a basis dtype other than ``W``'s a full-size ``back(N)`` temporary).

References (same signatures and effects): :func:`lowrank_adam_reference` and
:func:`project_back_update_reference`, built from the ops of
:func:`galore_opt.functional.adamw.galore_adamw_update`. Hyperparameters are runtime arguments;
only tiles are ``tl.constexpr``. In Triton's interpreter (``TRITON_INTERPRET=1``) every product runs
in fp32 and one fixed tile is used (autotuning there would only cost time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import interpreter_mode
from ._rounding import adam_scalars
from ._rounding import round_to as _round

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- low-rank Adam: moments and normalized update --------------------------------------------------


@triton.jit
def _lowrank_adam_kernel(
    low_ptr,
    m_ptr,
    v_ptr,
    norm_ptr,
    n_elements,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    bias_correction2_sqrt,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    mdt = m_ptr.dtype.element_ty
    # each in-place op of the reference rounds to the moments' dtype: so does this (a no-op in fp32)
    g = _round(tl.load(low_ptr + offs, mask=mask, other=0.0).to(tl.float32), mdt)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = _round(tl.fma(one_minus_beta1, g - m, m), mdt)  # exp_avg.lerp_(low, 1 - beta1)
    v = _round(v * beta2, mdt)  # exp_avg_sq.mul_(beta2)
    v = _round(v + one_minus_beta2 * g * g, mdt)  # .addcmul_(low, low, value=1 - beta2)
    tl.store(m_ptr + offs, m.to(mdt), mask=mask)
    tl.store(v_ptr + offs, v.to(mdt), mask=mask)
    root = _round(tl.sqrt_rn(v), mdt)  # exp_avg_sq.sqrt()
    denom = _round(tl.math.div_rn(root, bias_correction2_sqrt), mdt)  # / sqrt(bc2)
    denom = _round(denom + eps, mdt)  # .add_(eps)
    norm = _round(tl.math.div_rn(m, denom), mdt)  # exp_avg / denom
    tl.store(norm_ptr + offs, _round(norm, norm_ptr.dtype.element_ty).to(norm_ptr.dtype.element_ty), mask=mask)


def _check_lowrank(low: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != low.shape or not t.is_contiguous() or t.device != low.device or t.dtype not in _DTYPES:
            raise ValueError(
                f"{name}: expected a contiguous float tensor of shape {tuple(low.shape)} on {low.device}, "
                f"got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    if exp_avg.dtype != exp_avg_sq.dtype:
        raise ValueError(f"exp_avg and exp_avg_sq must share a dtype, got {exp_avg.dtype} and {exp_avg_sq.dtype}")


def lowrank_adam(
    low: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
    out_dtype: torch.dtype | None = None,
    block_size: int = 1024,
) -> Tensor:
    """Update the low-rank moments in place (torch AdamW arithmetic) and return
    ``N = exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps)``.

    ``low`` is the projected gradient; the moments are contiguous, of its shape, in one dtype.
    ``step`` is the step count after incrementing. ``N`` has ``out_dtype`` (default the moments').
    """
    _check_lowrank(low, exp_avg, exp_avg_sq)
    low = low.contiguous()
    norm = torch.empty(low.shape, dtype=out_dtype or exp_avg.dtype, device=low.device)
    n = low.numel()
    if n == 0:
        return norm
    _lowrank_adam_kernel[(triton.cdiv(n, block_size),)](
        low,
        exp_avg,
        exp_avg_sq,
        norm,
        n,
        *adam_scalars(beta1, beta2, eps, step),
        BLOCK=block_size,
    )
    return norm


def lowrank_adam_reference(
    low: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
    out_dtype: torch.dtype | None = None,
    block_size: int = 1024,
) -> Tensor:
    """Pure-PyTorch ground truth of :func:`lowrank_adam`: the ops of ``galore_adamw_update``."""
    _check_lowrank(low, exp_avg, exp_avg_sq)
    low = low.to(exp_avg.dtype)
    exp_avg.lerp_(low, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1 - beta2)
    denom = exp_avg_sq.sqrt().div_((1 - beta2**step) ** 0.5).add_(eps)
    return (exp_avg / denom).to(out_dtype or exp_avg.dtype)


# --- up-projection with the weight update in the epilogue -----------------------------------------


@triton.jit
def _project_back_update_kernel(
    a_ptr,
    b_ptr,
    w_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_wm,
    stride_wn,
    alpha,
    decay,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    # grouped tile order: GROUP_M row-tiles share their B column panel in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    group = pid // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(
            a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
            mask=(rm[:, None] < M) & (kk[None, :] < K),
            other=0.0,
        )
        b = tl.load(
            b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
            mask=(kk[:, None] < K) & (rn[None, :] < N),
            other=0.0,
        )
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    w_ptrs = w_ptr + rm[:, None] * stride_wm + rn[None, :] * stride_wn
    w_mask = (rm[:, None] < M) & (rn[None, :] < N)
    wdt = w_ptr.dtype.element_ty
    w = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
    w = _round(w * decay, wdt)  # the reference's W.mul_(1 - lr * wd), rounded as W
    tl.store(w_ptrs, _round(tl.fma(alpha, acc, w), wdt).to(wdt), mask=w_mask)


def _tuned_configs() -> list[triton.Config]:
    # Hopper (H100/H200) and Ada (RTX 4090, sm_89): K is the rank (128-1024), M and N the layer's.
    cfg = [
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in cfg
    ]


# Autotuning runs the kernel several times on the first call per shape: `restore_value` puts W back
# after each trial (a one-time copy of W while tuning).
_project_back_update_tuned = triton.autotune(
    configs=_tuned_configs(), key=["M", "N", "K", "DOT_FP32", "IEEE"], restore_value=["w_ptr"]
)(_project_back_update_kernel)


def _check_update(weight: Tensor, a: Tensor, b: Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"expected 2-D weight, a, b; got {weight.dim()}-D, {a.dim()}-D, {b.dim()}-D")
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2 or weight.shape != (m, n):
        raise ValueError(f"shapes do not chain: weight {tuple(weight.shape)} = a {tuple(a.shape)} @ b {tuple(b.shape)}")
    if not (weight.device == a.device == b.device):
        raise ValueError(f"weight, a and b must be on one device, got {weight.device}, {a.device}, {b.device}")
    for name, t in (("weight", weight), ("a", a), ("b", b)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: unsupported dtype {t.dtype}; expected one of {_DTYPES}")
    if a.dtype != b.dtype:
        raise ValueError(f"a and b must share a dtype, got {a.dtype} and {b.dtype}")


def project_back_update(weight: Tensor, a: Tensor, b: Tensor, *, alpha: float, decay: float = 1.0) -> None:
    """``weight <- decay * weight + alpha * (a @ b)`` in place, the product accumulated in fp32.

    For GaLore: ``a = P, b = N`` (left basis) or ``a = N, b = Q`` (right basis),
    ``alpha = -lr * scale / bc1``, ``decay = 1 - lr * weight_decay``. ``weight`` may be strided
    (e.g. a transposed view); ``a`` and ``b`` share a dtype, which may differ from ``weight``'s.
    fp32 products follow ``torch.backends.cuda.matmul.allow_tf32`` as cuBLAS would.
    """
    _check_update(weight, a, b)
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return
    interp = interpreter_mode()
    dot_fp32 = interp or a.dtype == torch.float32
    ieee = dot_fp32 and (interp or not torch.backends.cuda.matmul.allow_tf32)
    args = (
        a, b, weight, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), weight.stride(0), weight.stride(1),
        float(alpha), float(decay),
    )  # fmt: skip
    if interp:
        grid = (triton.cdiv(m, 16) * triton.cdiv(n, 16),)
        _project_back_update_kernel[grid](
            *args, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, DOT_FP32=True, IEEE=True
        )
        return

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _project_back_update_tuned[grid](*args, DOT_FP32=dot_fp32, IEEE=ieee)


def project_back_update_reference(weight: Tensor, a: Tensor, b: Tensor, *, alpha: float, decay: float = 1.0) -> None:
    """Pure-PyTorch ground truth of :func:`project_back_update` (the reference path's ops:
    ``W.mul_(decay)`` then one GEMM accumulating into ``W``, or, when the dtypes differ, the
    product in ``a``'s dtype added to ``W``)."""
    _check_update(weight, a, b)
    if decay != 1.0:
        weight.mul_(decay)
    if a.dtype == weight.dtype:
        weight.addmm_(a, b, alpha=alpha)
    else:
        weight.add_((a @ b).to(weight.dtype), alpha=alpha)
