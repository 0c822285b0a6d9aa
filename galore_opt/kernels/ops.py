"""The kernels as PyTorch operators: ``torch.ops.galore_opt.*``.

Each Triton kernel is registered with ``torch.library.custom_op``, with a fake implementation that
only allocates the outputs, so the fused optimizer path runs under ``FakeTensorMode`` (fake CUDA
tensors on a machine without a GPU), on ``meta`` tensors and inside ``torch.compile`` (as an opaque
operator), and dispatch modes see one operator per kernel call. The optimizers reach the kernels
through this namespace only.

Importing this module imports torch only; the real implementations import Triton (and the
launcher modules) at their first call.

Operators (arguments as the launchers in :mod:`galore_opt.kernels.galore_adamw` and
:mod:`galore_opt.kernels.adamw8bit`):

- ``lowrank_adam(low, exp_avg!, exp_avg_sq!, beta1, beta2, eps, step, out_dtype) -> N``
- ``project_back_update(weight!, a, b, alpha, decay) -> ()``
- ``adamw8bit(grad, m_codes!, m_absmax!, v_codes!, v_absmax!, signed_code, unsigned_code, beta1,
  beta2, eps, step, block_size, out_dtype) -> N``

(``!``: mutated in place.)
"""

from __future__ import annotations

import torch
from torch import Tensor

#: the operator namespace: ``torch.ops.galore_opt``
NAMESPACE = "galore_opt"


@torch.library.custom_op(f"{NAMESPACE}::lowrank_adam", mutates_args=("exp_avg", "exp_avg_sq"))
def lowrank_adam(
    low: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """The low-rank Adam pass (:func:`galore_opt.kernels.galore_adamw.lowrank_adam`)."""
    from .galore_adamw import lowrank_adam as launch

    return launch(low, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps, step=step, out_dtype=out_dtype)


@lowrank_adam.register_fake
def _(low, exp_avg, exp_avg_sq, beta1, beta2, eps, step, out_dtype):
    from .galore_adamw import _check_lowrank

    _check_lowrank(low, exp_avg, exp_avg_sq)
    return low.new_empty(low.shape, dtype=out_dtype)


@torch.library.custom_op(f"{NAMESPACE}::project_back_update", mutates_args=("weight",))
def project_back_update(weight: Tensor, a: Tensor, b: Tensor, alpha: float, decay: float) -> None:
    """``weight <- decay * weight + alpha * (a @ b)`` in place
    (:func:`galore_opt.kernels.galore_adamw.project_back_update`)."""
    from .galore_adamw import project_back_update as launch

    launch(weight, a, b, alpha=alpha, decay=decay)


@project_back_update.register_fake
def _(weight, a, b, alpha, decay):
    from .galore_adamw import _check_update

    _check_update(weight, a, b)


@torch.library.custom_op(
    f"{NAMESPACE}::adamw8bit", mutates_args=("m_codes", "m_absmax", "v_codes", "v_absmax")
)
def adamw8bit(
    grad: Tensor,
    m_codes: Tensor,
    m_absmax: Tensor,
    v_codes: Tensor,
    v_absmax: Tensor,
    signed_code: Tensor,
    unsigned_code: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
    block_size: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """The fused 8-bit moment update (:func:`galore_opt.kernels.adamw8bit.fused_adamw8bit`)."""
    from .adamw8bit import fused_adamw8bit as launch

    return launch(
        grad, m_codes, m_absmax, v_codes, v_absmax, signed_code, unsigned_code,
        beta1=beta1, beta2=beta2, eps=eps, step=step, block_size=block_size, out_dtype=out_dtype,
    )  # fmt: skip


@adamw8bit.register_fake
def _(grad, m_codes, m_absmax, v_codes, v_absmax, signed_code, unsigned_code, beta1, beta2, eps, step, block_size, out_dtype):
    from .adamw8bit import _check

    _check(grad.contiguous(), m_codes, m_absmax, v_codes, v_absmax, block_size)
    return grad.new_empty(grad.shape, dtype=out_dtype)


#: the operators above by name, as dispatch modes report them (``galore_opt.<name>.default``)
OPERATORS = ("lowrank_adam", "project_back_update", "adamw8bit")

__all__ = ["NAMESPACE", "OPERATORS", "adamw8bit", "lowrank_adam", "project_back_update"]
