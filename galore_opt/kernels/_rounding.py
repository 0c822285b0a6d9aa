"""Rounding helpers shared by the Triton kernels: in-kernel rounding to a storage dtype, and the
host-side scalar arguments of the Adam moment kernels. Imports Triton only (no torch), so the
kernels compile ahead of time in a Triton-only environment (:mod:`galore_opt.kernels.aot`)."""

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (nearest even), returned as fp32. bf16 by bit arithmetic:
    Triton's interpreter truncates on an fp32 -> bf16 cast, GPUs round to nearest; this gives the
    GPU's (and torch's) result in both. A NaN stays NaN: the carry of the rounding would turn some
    NaN bit patterns (e.g. 0x7FFFFFFF) into -0.0 or inf, so a NaN becomes the quiet NaN 0x7FC00000,
    which every later bf16 cast (truncating or rounding) keeps a NaN."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return tl.where(x != x, float("nan"), bits.to(tl.float32, bitcast=True))
    elif dtype == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


def adam_scalars(beta1: float, beta2: float, eps: float, step: float) -> tuple[float, float, float, float, float]:
    """``(1 - beta1, beta2, 1 - beta2, eps, sqrt(1 - beta2**step))`` for a moment kernel: each
    rounded to fp32 from the double when Triton passes it, as torch passes a scalar weight.
    ``step`` is the step count after incrementing."""
    return float(1 - beta1), float(beta2), float(1 - beta2), float(eps), float((1 - beta2**step) ** 0.5)
