"""One table of tolerances, keyed by (dtype, comparison), each with its reason."""

from __future__ import annotations

import torch

#: (dtype, comparison) -> (rtol, atol, reason)
TOLERANCES: dict[tuple[torch.dtype, str], tuple[float, float, str]] = {
    (torch.float32, "same_ops"): (0.0, 0.0, "the same ops in the same order: bit-identical"),
    (torch.float32, "galore_torch"): (
        1e-5,
        0.0,
        "the issue's bound over 50 steps; numerics='galore_torch' with exact SVD is measured bit-identical",
    ),
    (torch.float32, "rewritten_ops"): (
        1e-6,
        1e-7,
        "the same math with the ops reassociated (e.g. lr/bc1 folded into one GEMM alpha): a few ulps per step",
    ),
    (torch.bfloat16, "galore_torch"): (0.0, 0.0, "bf16 parity is bit-identical too: same ops, same dtypes"),
    (torch.float32, "grouped_gemm"): (
        2.4e-7,
        0.0,
        "grouped vs per-matrix GaLore step where the CPU's bmm takes another kernel than mm (products of "
        "m n r < 400 elements: a plain loop): one GEMM's sums reassociated; measured at most 1 ulp of the "
        "weights over 12 steps, bounded here by 2 ulps (2 * fp32 eps, relative)",
    ),
    (torch.float32, "basis_energy"): (0.0, 1e-5, "energies of the same subspace computed two ways"),
}


def tolerance(dtype: torch.dtype, comparison: str) -> dict[str, float]:
    """``dict(rtol=..., atol=...)`` for ``torch.testing.assert_close``."""
    rtol, atol, _ = TOLERANCES[(dtype, comparison)]
    return {"rtol": rtol, "atol": atol}
