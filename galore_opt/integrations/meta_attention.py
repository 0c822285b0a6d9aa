"""An attention function for *memory modelling on meta tensors*: it keeps what FlashAttention (and
PyTorch's memory-efficient SDPA) keep for backward, and computes nothing.

On ``meta`` tensors (and on the CPU) ``scaled_dot_product_attention`` takes the math path, which
saves the ``S x S`` attention scores and probabilities for backward; a GPU training step takes the
flash or memory-efficient kernel, which saves only ``q``, ``k``, ``v``, the output and one fp32
log-sum-exp per query row. A memory measurement of a whole model on ``meta`` (e.g. with
``torch.distributed._tools.mem_tracker.MemTracker``) therefore needs an attention that saves what
the GPU kernel saves, or it measures the math path's activations instead (at LLaMA-7B, 4 x 256
tokens: 8.27 GiB against 5.85 GiB).

:func:`register_meta_flash_attention` registers :func:`meta_flash_attention` with
``transformers.AttentionInterface`` under :data:`NAME`; build the model with
``config._attn_implementation = NAME``. Forward allocates the output ``(B, S, H, D)`` and the
log-sum-exp ``(B, H, S)`` in fp32 and saves ``q, k, v, out, lse``; backward allocates ``dq, dk, dv``
as the flash backward does. Meta tensors hold no values, so none are computed; any other device is
refused (this is not an attention implementation).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: the name under which :func:`register_meta_flash_attention` registers the stand-in
NAME = "galore_opt_meta_fused_sdpa"  # no "flash" in it: transformers treats such names as hub kernels


class _FlashMemory(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        batch, heads, seq, head_dim = query.shape
        out = query.new_empty(batch, seq, heads, value.shape[-1])
        lse = query.new_empty(batch, heads, seq, dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def meta_flash_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The ``transformers`` attention-function signature: ``query`` ``(B, H, S, D)``, ``key`` and
    ``value`` ``(B, H_kv, S, D)``; returns the output ``(B, S, H, D)`` and no weights. Meta
    tensors only."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.device.type != "meta":
            raise ValueError(
                f"meta_flash_attention models memory on meta tensors only and computes nothing; got {name} on "
                f"{t.device}. Use a real attention implementation (e.g. 'sdpa') for real tensors"
            )
    return _FlashMemory.apply(query, key, value), None


def register_meta_flash_attention() -> str:
    """Register :func:`meta_flash_attention` with ``transformers.AttentionInterface``; returns
    :data:`NAME`."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, meta_flash_attention)
    return NAME


__all__ = ["NAME", "meta_flash_attention", "register_meta_flash_attention"]
