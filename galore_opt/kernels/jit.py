"""The Triton kernels of galore-opt, as ``@triton.jit`` functions only.

This module imports Triton and nothing else (no torch), so that every kernel can be compiled ahead
of time for the real GPU targets on a machine without a GPU, also in an environment that holds
only Triton (:mod:`galore_opt.kernels.aot`). The launchers, their checks and the pure-PyTorch
references live in :mod:`galore_opt.kernels.adamw8bit` and :mod:`galore_opt.kernels.galore_adamw`.

Arithmetic is fp32 in every kernel (Triton's CPU interpreter gives NaN for bf16 math), with
the results rounded to the storage dtype as torch rounds them. Offsets: the elementwise kernels
index with 32-bit offsets and their launchers split a tensor of 2^31 elements or more into several
launches (:data:`galore_opt.kernels.configs.MAX_LAUNCH_ELEMENTS`); the GEMM, whose rows and
columns are strided, computes its addresses in 64 bits.
"""

import triton
import triton.language as tl

from ._rounding import round_to as _round


@triton.jit
def nearest_code(x, code_ptr):
    """Index of the code nearest ``x`` in the sorted 256-entry map at ``code_ptr``: the largest
    ``i`` with ``code[i] <= x`` (0 if none) by an 8-step binary search, then the nearer of
    ``code[i]`` and ``code[i + 1]``; ties go to the lower index (as the reference)."""
    i = tl.zeros(x.shape, dtype=tl.int32)
    for shift in tl.static_range(8):
        step = 128 >> shift
        cand = i + step
        ok = (cand <= 255) & (tl.load(code_ptr + tl.minimum(cand, 255)) <= x)
        i = tl.where(ok, cand, i)
    lo = tl.load(code_ptr + i)
    hi = tl.load(code_ptr + tl.minimum(i + 1, 255))
    d_lo = tl.abs(x - lo)
    d_hi = tl.abs(hi - x)
    return tl.where((i < 255) & (d_hi < d_lo), i + 1, i)


@triton.jit
def adamw8bit_block_kernel(
    grad_ptr,
    m_codes_ptr,
    m_absmax_ptr,
    v_codes_ptr,
    v_absmax_ptr,
    norm_ptr,
    signed_code_ptr,
    unsigned_code_ptr,
    n_elements,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    bias_correction2_sqrt,
    BLOCK: tl.constexpr,
):
    """One program per quantization block of ``BLOCK`` elements: dequantize both moments, update
    them (torch AdamW arithmetic), write ``N = m / (sqrt(v) / sqrt(bc2) + eps)`` and requantize
    the moments to the nearest codes with the block's new absmax."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m_code = tl.load(m_codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    v_code = tl.load(v_codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(signed_code_ptr + m_code) * tl.load(m_absmax_ptr + pid)
    v = tl.load(unsigned_code_ptr + v_code) * tl.load(v_absmax_ptr + pid)

    # torch: exp_avg.lerp_(g, 1 - beta1) (an fma); exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2);
    # correctly rounded sqrt and divisions, as torch's (tl.sqrt may be approximate on GPUs)
    m = tl.fma(one_minus_beta1, g - m, m)
    v = v * beta2
    v = v + one_minus_beta2 * g * g
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)
    denom = tl.math.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    out_dtype = norm_ptr.dtype.element_ty
    tl.store(norm_ptr + offs, _round(tl.math.div_rn(m, denom), out_dtype).to(out_dtype), mask=mask)

    # An all-zero block keeps absmax 0 and the zero code (the reference's rule). The divisor is
    # selected, not clamped: a float literal below fp32's normal range (e.g. 1e-38) is typed fp64
    # by Triton 3.6 and before, and div_rn refuses fp64.
    m_absmax = tl.max(tl.abs(m), axis=0)
    v_absmax = tl.max(v, axis=0)
    m_x = tl.where(m_absmax > 0, tl.math.div_rn(m, tl.where(m_absmax > 0, m_absmax, 1.0)), 0.0)
    v_x = tl.where(v_absmax > 0, tl.math.div_rn(v, tl.where(v_absmax > 0, v_absmax, 1.0)), 0.0)
    tl.store(m_codes_ptr + offs, nearest_code(m_x, signed_code_ptr).to(tl.uint8), mask=mask)
    tl.store(v_codes_ptr + offs, nearest_code(v_x, unsigned_code_ptr).to(tl.uint8), mask=mask)
    tl.store(m_absmax_ptr + pid, m_absmax)
    tl.store(v_absmax_ptr + pid, v_absmax)


@triton.jit
def lowrank_adam_kernel(
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
    """The low-rank Adam pass: moments updated in place, ``N`` written once; each in-place op of
    the reference rounds to the moments' dtype, and so does this (a no-op in fp32)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    mdt = m_ptr.dtype.element_ty
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


@triton.jit
def project_back_update_kernel(
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
    """``W <- round(decay * W) + alpha * (A @ B)``: the product accumulated in fp32 tiles and added
    to ``W`` in the epilogue (one read and one write of ``W``). Addresses in 64 bits: a row offset
    ``row * stride`` passes 2^31 long before a tensor has 2^31 elements of its own."""
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
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    a_rows = a_ptr + rm64[:, None] * stride_am
    b_cols = b_ptr + rn64[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        kk64 = kk.to(tl.int64)
        a = tl.load(a_rows + kk64[None, :] * stride_ak, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_cols + kk64[:, None] * stride_bk, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    w_ptrs = w_ptr + rm64[:, None] * stride_wm + rn64[None, :] * stride_wn
    w_mask = (rm[:, None] < M) & (rn[None, :] < N)
    wdt = w_ptr.dtype.element_ty
    w = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
    w = _round(w * decay, wdt)  # the reference's W.mul_(1 - lr * wd), rounded as W
    tl.store(w_ptrs, _round(tl.fma(alpha, acc, w), wdt).to(wdt), mask=w_mask)
