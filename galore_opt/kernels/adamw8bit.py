"""Fused 8-bit block-wise AdamW moment update (Triton).

One program per quantization block: dequantize both moments (code lookup times the block's
absmax), update them with the low-rank gradient (torch AdamW arithmetic), write the normalized
update ``N = m / (sqrt(v) / sqrt(bc2) + eps)``, and requantize both moments to the nearest codes
with a new absmax. The moments never exist in fp32 outside registers. The projections stay in
cuBLAS (the "hybrid" that measured fastest in torchao's GaLore kernels); the optimizer applies
``W += alpha * P N`` as one GEMM accumulating into ``W``.

Reference: :func:`fused_adamw8bit_reference` (pure PyTorch, built from
:mod:`galore_opt.quant`), which the tests compare every output and every mutated buffer with.
Arithmetic is fp32 throughout (also in interpreter mode, where bf16 math is unreliable).
Hyperparameters are runtime arguments; only the block size is a ``tl.constexpr``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._rounding import adam_scalars
from ._rounding import round_to as _round


@triton.jit
def _nearest_code(x, code_ptr):
    # Largest i with code[i] <= x (0 if none), by an 8-step binary search over the sorted map,
    # then the nearer of code[i] and code[i + 1]; ties go to the lower index (as the reference).
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
def _adamw8bit_block_kernel(
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

    m_absmax = tl.max(tl.abs(m), axis=0)
    v_absmax = tl.max(v, axis=0)
    m_x = tl.where(m_absmax > 0, tl.math.div_rn(m, tl.maximum(m_absmax, 1e-38)), 0.0)
    v_x = tl.where(v_absmax > 0, tl.math.div_rn(v, tl.maximum(v_absmax, 1e-38)), 0.0)
    tl.store(m_codes_ptr + offs, _nearest_code(m_x, signed_code_ptr).to(tl.uint8), mask=mask)
    tl.store(v_codes_ptr + offs, _nearest_code(v_x, unsigned_code_ptr).to(tl.uint8), mask=mask)
    tl.store(m_absmax_ptr + pid, m_absmax)
    tl.store(v_absmax_ptr + pid, v_absmax)


def _check(grad: Tensor, m_codes: Tensor, m_absmax: Tensor, v_codes: Tensor, v_absmax: Tensor, block_size: int) -> None:
    n = grad.numel()
    blocks = -(-n // block_size)
    if block_size & (block_size - 1) or block_size < 16:
        raise ValueError(f"block_size must be a power of two >= 16 for the Triton kernel, got {block_size}")
    for name, t, numel, dtype in (
        ("m_codes", m_codes, n, torch.uint8),
        ("v_codes", v_codes, n, torch.uint8),
        ("m_absmax", m_absmax, blocks, torch.float32),
        ("v_absmax", v_absmax, blocks, torch.float32),
    ):
        if t.numel() != numel or t.dtype != dtype or not t.is_contiguous() or t.device != grad.device:
            raise ValueError(f"{name}: expected a contiguous {dtype} tensor of {numel} elements on {grad.device}")


def fused_adamw8bit(
    grad: Tensor,
    m_codes: Tensor,
    m_absmax: Tensor,
    v_codes: Tensor,
    v_absmax: Tensor,
    signed_code: Tensor,
    unsigned_code: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
    block_size: int = 256,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Update the 8-bit moments in place and return ``N = m / (sqrt(v / bc2) + eps)``.

    ``grad`` is the (low-rank) gradient, contiguous; the codes have its number of elements and the
    absmaxes one fp32 per block. ``step`` is the step count after incrementing (bias correction).
    The result has ``grad``'s shape and ``out_dtype`` (default: ``grad``'s dtype).
    """
    grad = grad.contiguous()
    _check(grad, m_codes, m_absmax, v_codes, v_absmax, block_size)
    norm = torch.empty(grad.shape, dtype=out_dtype or grad.dtype, device=grad.device)
    n = grad.numel()
    if n == 0:
        return norm
    grid = (-(-n // block_size),)
    _adamw8bit_block_kernel[grid](
        grad,
        m_codes,
        m_absmax,
        v_codes,
        v_absmax,
        norm,
        signed_code,
        unsigned_code,
        n,
        *adam_scalars(beta1, beta2, eps, step),
        BLOCK=block_size,
    )
    return norm


def fused_adamw8bit_reference(
    grad: Tensor,
    m_codes: Tensor,
    m_absmax: Tensor,
    v_codes: Tensor,
    v_absmax: Tensor,
    signed_code: Tensor,
    unsigned_code: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
    block_size: int = 256,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Pure-PyTorch ground truth of :func:`fused_adamw8bit` (same signature and effects)."""
    from galore_opt.quant import dequantize_blockwise, quantize_blockwise

    shape = grad.shape
    g = grad.reshape(-1).float()
    m = dequantize_blockwise(m_codes.view(-1), m_absmax, signed_code, block_size, g.shape, torch.float32)
    v = dequantize_blockwise(v_codes.view(-1), v_absmax, unsigned_code, block_size, g.shape, torch.float32)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = v.sqrt().div_((1 - beta2**step) ** 0.5).add_(eps)
    norm = (m / denom).to(out_dtype or grad.dtype).view(shape)
    quantize_blockwise(m, signed_code, block_size, out=(m_codes.view(-1), m_absmax))
    quantize_blockwise(v, unsigned_code, block_size, out=(v_codes.view(-1), v_absmax))
    return norm
