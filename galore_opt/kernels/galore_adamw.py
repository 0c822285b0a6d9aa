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
only tiles are ``tl.constexpr``; the kernels themselves are in :mod:`galore_opt.kernels.jit`, the
configs each GPU target may launch in :mod:`galore_opt.kernels.configs`. In Triton's interpreter
(``TRITON_INTERPRET=1``) every product runs in fp32 and one fixed tile is used (autotuning there
would only cost time).
"""

from __future__ import annotations

import functools

import torch
import triton
from torch import Tensor

from . import configs, interpreter_mode
from ._rounding import adam_scalars
from .jit import lowrank_adam_kernel, project_back_update_kernel

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- low-rank Adam: moments and normalized update --------------------------------------------------


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
    block_size: int = configs.LOWRANK_ADAM_BLOCK,
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
    scalars = adam_scalars(beta1, beta2, eps, step)
    flat = [t.view(-1) for t in (low, exp_avg, exp_avg_sq, norm)]
    # 32-bit offsets in the kernel: a tensor of 2^31 elements or more is processed in several launches
    for start in range(0, n, configs.MAX_LAUNCH_ELEMENTS):
        stop = min(start + configs.MAX_LAUNCH_ELEMENTS, n)
        g, m, v, out = (t[start:stop] for t in flat)
        lowrank_adam_kernel[(triton.cdiv(stop - start, block_size),)](g, m, v, out, stop - start, *scalars, BLOCK=block_size)
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
    block_size: int = configs.LOWRANK_ADAM_BLOCK,
) -> Tensor:
    """Pure-PyTorch ground truth of :func:`lowrank_adam`: the ops of ``galore_adamw_update``."""
    _check_lowrank(low, exp_avg, exp_avg_sq)
    low = low.to(exp_avg.dtype)
    exp_avg.lerp_(low, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1 - beta2)
    denom = exp_avg_sq.sqrt().div_((1 - beta2**step) ** 0.5).add_(eps)
    return (exp_avg / denom).to(out_dtype or exp_avg.dtype)


# --- up-projection with the weight update in the epilogue -----------------------------------------


@functools.cache
def _tuned_kernel(arch: int, operand: str):
    """The up-projection kernel autotuned over the configs of :func:`configs.project_back_configs`
    for this target and operand kind (only those are compiled). Autotuning runs the kernel several
    times on the first call per shape: ``restore_value`` puts W back after each trial (a one-time
    copy of W while tuning)."""
    cfgs = [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": configs.GEMM_GROUP_M}, num_warps=w, num_stages=st
        )
        for bm, bn, bk, w, st in configs.project_back_configs(arch, operand)
    ]
    return triton.autotune(configs=cfgs, key=["M", "N", "K"], restore_value=["w_ptr"])(project_back_update_kernel)


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
    args = (
        a, b, weight, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), weight.stride(0), weight.stride(1),
        float(alpha), float(decay),
    )  # fmt: skip
    if interp:
        grid = (triton.cdiv(m, 16) * triton.cdiv(n, 16),)
        project_back_update_kernel[grid](*args, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, DOT_FP32=True, IEEE=True)
        return
    fp32 = a.dtype == torch.float32
    operand = configs.operand_kind(fp32, torch.backends.cuda.matmul.allow_tf32)
    major, minor = torch.cuda.get_device_capability(weight.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _tuned_kernel(major * 10 + minor, operand)[grid](*args, DOT_FP32=fp32, IEEE=operand == "ieee")


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
