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
from torch import Tensor

from . import configs
from ._rounding import adam_scalars
from .jit import adamw8bit_block_kernel


def _check(grad: Tensor, m_codes: Tensor, m_absmax: Tensor, v_codes: Tensor, v_absmax: Tensor, block_size: int) -> None:
    n = grad.numel()
    blocks = -(-n // block_size)
    if block_size not in configs.ADAMW8BIT_BLOCKS:
        raise ValueError(
            f"block_size must be a power of two from {configs.ADAMW8BIT_BLOCKS[0]} to {configs.ADAMW8BIT_BLOCKS[-1]} "
            f"for the Triton kernel, got {block_size}"
        )
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
    scalars = adam_scalars(beta1, beta2, eps, step)
    flat = [t.view(-1) for t in (grad, m_codes, v_codes, norm)]
    # 32-bit offsets in the kernel: a tensor of 2^31 elements or more is processed in several launches
    for start in range(0, n, configs.MAX_LAUNCH_ELEMENTS):
        stop = min(start + configs.MAX_LAUNCH_ELEMENTS, n)
        b0, b1 = start // block_size, -(-stop // block_size)
        g, mc, vc, out = (t[start:stop] for t in flat)
        adamw8bit_block_kernel[(b1 - b0,)](
            g, mc, m_absmax[b0:b1], vc, v_absmax[b0:b1], out, signed_code, unsigned_code, stop - start, *scalars,
            BLOCK=block_size, num_warps=configs.adamw8bit_warps(block_size),
        )  # fmt: skip
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
