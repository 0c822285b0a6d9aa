"""Single-tensor ground truth of the Adafactor and GaLore-Adafactor updates.

Two numerics, chosen per param group:

* ``"torch"``: ``torch.optim.Adafactor``'s (``_single_tensor_adafactor``): relative step
  ``rho_t = min(lr, 1/sqrt(t))`` scaled by the parameter's RMS, ``1 - beta2_t = t^decay_rate``,
  factored row/column variances (``row_var @ col_var / mean(row_var)``) clamped at ``eps1^2``,
  update RMS clipped at ``clip_threshold`` (torch's ``d``), weight decay ``W *= 1 - lr * wd`` first.
  Same ops in the same order: non-GaLore parameters follow ``torch.optim.Adafactor(foreach=False)``
  bit for bit.
* ``"galore_torch"``: galore-torch 1.0's Adafactor (fairseq / Hugging Face): ``eps1`` added to
  ``grad^2``, optional first moment ``beta1``, ``relative_step`` / ``scale_parameter`` /
  ``warmup_init`` options, weight decay after the update, computed in fp32 for half parameters.

For a GaLore parameter the moments are those of the projected gradient; the update is projected
back, times ``scale``. The parameter's RMS (for the relative step) is that of the full parameter.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..projector import project, project_back

ROW_VAR, COL_VAR, VARIANCE = "row_var", "col_var", "variance"  # torch numerics
EXP_AVG_SQ_ROW, EXP_AVG_SQ_COL, EXP_AVG_SQ, EXP_AVG = "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg"


def init_adafactor_state(state: dict[str, Any], shape: tuple[int, ...], like: Tensor, numerics: str, beta1) -> None:
    """Create the moment tensors for a (possibly low-rank) gradient of ``shape``."""
    factored = len(shape) >= 2
    if numerics == "torch":
        if factored:
            state[ROW_VAR] = like.new_zeros(shape[:-1]).unsqueeze(-1)
            state[COL_VAR] = like.new_zeros(shape[:-2] + shape[-1:]).unsqueeze(-2)
        else:
            state[VARIANCE] = like.new_zeros(shape)
        return
    fp32 = dict(dtype=torch.float32, device=like.device)
    if beta1 is not None:
        state[EXP_AVG] = torch.zeros(shape, **fp32)
    if factored:
        state[EXP_AVG_SQ_ROW] = torch.zeros(shape[:-1], **fp32)
        state[EXP_AVG_SQ_COL] = torch.zeros(shape[:-2] + shape[-1:], **fp32)
    else:
        state[EXP_AVG_SQ] = torch.zeros(shape, **fp32)


def _rms(tensor: Tensor) -> Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def adafactor_update(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    step_t: Tensor,
    left: Tensor | None,
    right: Tensor | None,
    *,
    galore: bool,
    scale: float,
    lr: float | None,
    eps: tuple[float | None, float],
    clip_threshold: float,
    decay_rate: float,
    beta1: float | None,
    weight_decay: float,
    scale_parameter: bool,
    relative_step: bool,
    warmup_init: bool,
    numerics: str,
) -> None:
    """One Adafactor step of ``param`` in place; a GaLore step when ``galore`` (bases may then be
    ``None`` for a side not projected, both ``None`` for a full-size update)."""
    if param.numel() == 0:  # nothing to update (torch.optim.Adafactor divides by zero here)
        step_t += 1
        return
    if numerics == "torch":
        _torch_adafactor(param, grad, state, step_t, left, right, galore, scale, lr, eps, clip_threshold, decay_rate, weight_decay)
    else:
        _galore_torch_adafactor(
            param, grad, state, step_t, left, right, galore, scale, lr, eps, clip_threshold, decay_rate, beta1,
            weight_decay, scale_parameter, relative_step, warmup_init,
        )


def _torch_adafactor(param, grad, state, step_t, left, right, galore, scale, lr, eps, d, beta2_decay, weight_decay):
    eps1, eps2 = eps
    if eps1 is None:
        eps1 = torch.finfo(param.dtype).eps
    step_t += 1
    step_float = step_t.item()
    one_minus_beta2_t = step_float**beta2_decay
    rho_t = min(lr, 1 / (step_float**0.5))
    # torch reads the two norms on the host (.item()); off the CPU they stay on the device, in
    # float64 as torch computes them in Python (a CUDA step then never synchronizes; the final
    # scaling is one multiply instead of add's alpha, so the last bit may differ from torch's)
    on_host = param.device.type == "cpu"
    if on_host:
        alpha = max(eps2, param.norm(2).item() / (param.numel() ** 0.5)) * rho_t
    else:
        alpha = (param.norm(2).double() / (param.numel() ** 0.5)).clamp_(min=eps2) * rho_t
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    if galore:
        grad = project(grad, None if left is None else left.to(grad.dtype), None if right is None else right.to(grad.dtype))
    if grad.dim() > 1:
        row_var, col_var = state[ROW_VAR], state[COL_VAR]
        row_mean = torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))
        row_var.lerp_(row_mean, one_minus_beta2_t)
        col_mean = torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2))
        col_var.lerp_(col_mean, one_minus_beta2_t)
        var_estimate = row_var @ col_var
        var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    else:
        variance = state[VARIANCE]
        variance.lerp_(grad * grad, one_minus_beta2_t)
        var_estimate = variance.clone()
    update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_()
    update.mul_(grad)
    if on_host:
        denom = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * d))
    else:
        denom = (update.norm(2).double() / ((update.numel() ** 0.5) * d)).clamp_(min=1.0)
    if galore:
        update = project_back(update, None if left is None else left.to(update.dtype), None if right is None else right.to(update.dtype))
        alpha = alpha * scale
    if on_host:
        param.add_(update.to(param.dtype), alpha=-alpha / denom)
    else:
        param.add_(update.to(param.dtype) * (-alpha / denom).to(update.dtype))


def _galore_torch_adafactor(
    param, grad, state, step_t, left, right, galore, scale, lr, eps, clip_threshold, decay_rate, beta1,
    weight_decay, scale_parameter, relative_step, warmup_init,
):
    if grad.dtype in {torch.float16, torch.bfloat16}:
        grad = grad.float()
    if galore:
        grad = project(grad, None if left is None else left.to(grad.dtype), None if right is None else right.to(grad.dtype))
    p_data_fp32 = param.float() if param.dtype in {torch.float16, torch.bfloat16} else param
    step_t += 1
    step = step_t.item()
    rms = _rms(p_data_fp32)
    rel_step_sz = lr
    if relative_step:
        min_step = 1e-6 * step if warmup_init else 1e-2
        rel_step_sz = min(min_step, 1.0 / math.sqrt(step))
    param_scale = 1.0
    if scale_parameter:
        param_scale = max(eps[1], rms)
    step_lr = param_scale * rel_step_sz
    beta2t = 1.0 - math.pow(step, decay_rate)
    update = (grad**2) + eps[0]
    if grad.dim() >= 2:
        row, col = state[EXP_AVG_SQ_ROW], state[EXP_AVG_SQ_COL]
        row.mul_(beta2t).add_(update.mean(dim=-1), alpha=(1.0 - beta2t))
        col.mul_(beta2t).add_(update.mean(dim=-2), alpha=(1.0 - beta2t))
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        c_factor = col.unsqueeze(-2).rsqrt()
        update = torch.mul(r_factor, c_factor)
        update.mul_(grad)
    else:
        exp_avg_sq = state[EXP_AVG_SQ]
        exp_avg_sq.mul_(beta2t).add_(update, alpha=(1.0 - beta2t))
        update = exp_avg_sq.rsqrt().mul_(grad)
    update.div_((_rms(update) / clip_threshold).clamp_(min=1.0))
    update.mul_(step_lr)
    if beta1 is not None:
        exp_avg = state[EXP_AVG]
        exp_avg.mul_(beta1).add_(update, alpha=(1 - beta1))
        update = exp_avg
    if galore:
        update = project_back(update, None if left is None else left.to(update.dtype), None if right is None else right.to(update.dtype)) * scale
    if weight_decay != 0:
        p_data_fp32.add_(p_data_fp32, alpha=(-weight_decay * step_lr))
    p_data_fp32.add_(-update)
    if param.dtype in {torch.float16, torch.bfloat16}:
        param.copy_(p_data_fp32)
