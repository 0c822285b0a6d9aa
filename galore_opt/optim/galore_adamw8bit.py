"""GaLoreAdamW8bit: GaLoreAdamW with block-wise 8-bit moments."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .. import config as C
from ..functional import kernel_ops, resolve_impl
from ..functional.adamw import adamw_apply
from ..kernels.configs import ADAMW8BIT_BLOCKS
from ..quant import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CHUNK_SIZE,
    SMALL_TENSOR_THRESHOLD,
    dequantize_blockwise,
    dynamic_map,
    quantize_blockwise,
    zero_code,
)
from .galore_adamw import GaLoreAdamW, _is_dtensor

#: elements per quantization pass on the grouped path (whole blocks): one pass over the 8-bit
#: moments of all grouped matrices of a small model; at most ~70 MB of temporaries (17 bytes per
#: element, see quant.quantize_blockwise) whatever the model's size
_GROUPED_QUANT_CHUNK = 1 << 22
_STACKED_8BIT = (C.EXP_AVG_CODES, C.EXP_AVG_ABSMAX, C.EXP_AVG_SQ_CODES, C.EXP_AVG_SQ_ABSMAX)


class GaLoreAdamW8bit(GaLoreAdamW):
    r"""GaLoreAdamW whose moments are stored in block-wise 8-bit (Dettmers et al., 2022).

    The same algorithm, API and group keys as :class:`~galore_opt.GaLoreAdamW`. Each moment of at
    least ``min_8bit_size`` elements (the *low-rank* moment's size for GaLore parameters) is kept
    as one ``uint8`` code per element plus one fp32 absmax per block of ``block_size`` elements:
    the first moment in bitsandbytes' signed dynamic map, the second in its unsigned one
    (:mod:`galore_opt.quant`). Every step dequantizes the moments to fp32, runs the fp32 update
    (the parameter update uses these fp32 moments, as bitsandbytes does) and requantizes them to
    the nearest codes. Smaller moments stay fp32.

    Unlike galore-torch's 8-bit optimizer it never clones the weight, never swaps ``p.data`` or
    ``p.grad``, never synchronizes the device per parameter, and runs on the CPU too.

    Args:
        params, lr, betas, eps, weight_decay, numerics, impl, seed: as :class:`GaLoreAdamW`.
        block_size: elements per quantization block (default 256, what bitsandbytes' block-wise
            8-bit optimizers use).
        min_8bit_size: moments with fewer elements stay fp32 (default 4096, bitsandbytes'
            ``min_8bit_size``).

    The basis is stored in bf16 by default (group key ``basis_dtype``; galore-torch stores it in
    the gradient's dtype): with fp32 parameters a fp32 basis alone would be larger than both 8-bit
    moments. It is computed in fp32 and only rounded for storage.

    Temporaries: the fp32 dequantized moments of one parameter at a time for GaLore parameters
    (low-rank sized). Full-size 8-bit parameters (embeddings, the head) are updated in slices of
    :data:`FULL_CHUNK` elements (whole quantization blocks): fp32 moments, gradient and update of
    one slice at a time, about 40 bytes per slice element (40 MiB), whatever the parameter's
    size; the result is the same as updating it at once (every operation is elementwise or
    per block). At LLaMA-7B the head's update would otherwise hold ~2.4 GiB of fp32 temporaries
    at the moment of the training step's memory peak.

    FSDP2 (DTensor parameters sharded on dim 0 over a 1-D mesh): the codes are sharded like the
    moment, each rank quantizes its rows in blocks that start at its shard, and the absmax is a
    per-rank padded DTensor; the updates equal the unsharded ones when every shard starts on a
    block boundary (:mod:`galore_opt.optim.fsdp`, ``docs/distributed.md``).
    """

    #: elements per slice of a full-size 8-bit parameter's update (rounded down to whole blocks)
    FULL_CHUNK = DEFAULT_CHUNK_SIZE

    # torch's load_state_dict would cast every state tensor (uint8 codes included) to the
    # parameter's dtype; all of these keep their own.
    _dtype_kept_keys = (
        *GaLoreAdamW._dtype_kept_keys,
        C.EXP_AVG,
        C.EXP_AVG_SQ,
        C.EXP_AVG_CODES,
        C.EXP_AVG_ABSMAX,
        C.EXP_AVG_SQ_CODES,
        C.EXP_AVG_SQ_ABSMAX,
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float | None = None,
        weight_decay: float = 0.0,
        *,
        numerics: str = "torch",
        impl: str = "auto",
        seed: int = 0,
        block_size: int = DEFAULT_BLOCK_SIZE,
        min_8bit_size: int = SMALL_TENSOR_THRESHOLD,
        foreach: bool | None = None,
    ) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"Invalid block_size: {block_size!r} - must be an int >= 1")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"Invalid min_8bit_size: {min_8bit_size!r} - must be an int >= 0")
        self._block_size = block_size
        self._min_8bit_size = min_8bit_size
        self._maps: dict[tuple[bool, torch.device], Tensor] = {}
        super().__init__(params, lr, betas, eps, weight_decay, numerics=numerics, impl=impl, seed=seed, foreach=foreach)
        self.defaults.update(block_size=block_size, min_8bit_size=min_8bit_size)

    _kernel = "adamw8bit"

    _optimizer_wide_defaults = (*GaLoreAdamW._optimizer_wide_defaults, "block_size", "min_8bit_size")

    def _restore_attributes(self) -> None:
        super()._restore_attributes()
        # a copy (deepcopy, pickle) keeps the defaults but not these attributes
        self.__dict__.setdefault("_block_size", self.defaults["block_size"])
        self.__dict__.setdefault("_min_8bit_size", self.defaults["min_8bit_size"])
        self.__dict__.setdefault("_maps", {})

    def _fused_galore_step(self, param, grad, state, left, right, group, low=None) -> bool:
        """The Triton path: cuBLAS down-projection, the fused 8-bit moment kernel, the Triton
        up-projection with the weight update in its epilogue. fp32 (small) moments, galore_torch
        numerics, both sides projected and block sizes the kernel does not take stay on the
        reference path."""
        block = self._block_size
        if C.EXP_AVG_CODES not in state or group["numerics"] != "torch" or block not in ADAMW8BIT_BLOCKS:
            return False
        if (left is None) == (right is None):
            return False
        step, low, left_c, right_c, compute_dtype = self._fused_project(param, grad, state, left, right, low)
        beta1, beta2 = group["betas"]
        norm = kernel_ops().adamw8bit(
            low,
            state[C.EXP_AVG_CODES],
            state[C.EXP_AVG_ABSMAX],
            state[C.EXP_AVG_SQ_CODES],
            state[C.EXP_AVG_SQ_ABSMAX],
            self._map(True, low.device),
            self._map(False, low.device),
            beta1,
            beta2,
            group["eps"],
            step,
            block,
            compute_dtype,
        )
        self._fused_update(param, norm, left_c, right_c, group, step)
        self._fused_residual(param, grad, state, low, norm, left_c, right_c, group, step)
        return True

    def _full_step(self, group, p, state, hyper) -> bool:
        """A full-size parameter with 8-bit moments, slice by slice (see the class docstring); the
        Triton kernel updates each slice's moments when the dispatch picks it. An FSDP2 (DTensor)
        parameter updates its local rows with its local codes (blocks start at its shard)."""
        if C.EXP_AVG_CODES not in state:
            return False
        if _is_dtensor(p):
            from .fsdp import check_sharding, local_moments

            check_sharding(p, type(self).__name__)
            local = local_moments(state, self._block_size)
            flat_p, flat_g = p.to_local().view(-1), p.grad.to_local().view(-1)
            self._update_full_8bit(group, flat_p, flat_g, state, local, hyper)
            return True
        if not p.is_contiguous() or not p.grad.is_contiguous():
            return False
        self._update_full_8bit(group, p.view(-1), p.grad.view(-1), state, state, hyper)
        return True

    def _update_full_8bit(self, group, flat_p, flat_g, state, moments, hyper) -> None:
        """The 8-bit AdamW update of the flat ``flat_p`` with the codes and absmax of ``moments``."""
        block = self._block_size
        chunk = max(1, self.FULL_CHUNK // block) * block
        use_kernel = (
            hyper["numerics"] == "torch"
            and block in ADAMW8BIT_BLOCKS
            and resolve_impl(group["impl"], flat_p, self._kernel) == "triton"
        )
        step_t = state[C.STEP]
        step_t += 1
        step = step_t.item()
        m_codes, v_codes = moments[C.EXP_AVG_CODES].view(-1), moments[C.EXP_AVG_SQ_CODES].view(-1)
        m_absmax, v_absmax = moments[C.EXP_AVG_ABSMAX], moments[C.EXP_AVG_SQ_ABSMAX]
        signed, unsigned = self._map(True, flat_p.device), self._map(False, flat_p.device)
        lr, wd, beta1 = hyper["lr"], hyper["weight_decay"], hyper["beta1"]
        for start in range(0, flat_p.numel(), chunk):
            stop = min(start + chunk, flat_p.numel())
            b0, b1 = start // block, -(-stop // block)
            # narrow, not [a:b]: the same view without Python indexing's device guard (which a
            # fake CUDA tensor on a CPU-only build cannot take)
            pc, gc = flat_p.narrow(0, start, stop - start), flat_g.narrow(0, start, stop - start)
            codes_m, codes_v = m_codes.narrow(0, start, stop - start), v_codes.narrow(0, start, stop - start)
            amax_m, amax_v = m_absmax.narrow(0, b0, b1 - b0), v_absmax.narrow(0, b0, b1 - b0)
            if use_kernel:
                norm = kernel_ops().adamw8bit(
                    gc, codes_m, amax_m, codes_v, amax_v, signed, unsigned, beta1, hyper["beta2"], hyper["eps"], step,
                    block, torch.float32,
                )  # fmt: skip
                if wd != 0:
                    pc.mul_(1 - lr * wd)
                pc.add_(norm, alpha=-lr / (1 - beta1**step))
                continue
            m = dequantize_blockwise(codes_m, amax_m, signed, block, gc.shape, torch.float32)
            v = dequantize_blockwise(codes_v, amax_v, unsigned, block, gc.shape, torch.float32)
            adamw_apply(pc, gc.float(), m, v, step, **hyper)
            quantize_blockwise(m, signed, block, out=(codes_m, amax_m))
            quantize_blockwise(v, unsigned, block, out=(codes_v, amax_v))

    def _grouped_moments(self, state: dict[str, Any]) -> tuple | None:
        """8-bit moments stack when their blocks do not straddle two matrices (elements a multiple
        of ``block_size``): block-wise quantization of the stacked codes is then the per-matrix
        one, block for block."""
        codes = state.get(C.EXP_AVG_CODES)
        if codes is None:
            return super()._grouped_moments(state)
        if codes.numel() % self._block_size or not codes.is_contiguous():
            return None
        return _STACKED_8BIT, ()

    def _load_stacked(self, stacks: tuple) -> tuple[Tensor, Tensor]:
        if len(stacks) == 2:
            return super()._load_stacked(stacks)
        m_codes, m_absmax, v_codes, v_absmax = stacks
        device, block = m_codes.device, self._block_size
        return (
            dequantize_blockwise(m_codes, m_absmax, self._map(True, device), block, m_codes.shape, torch.float32,
                                 chunk_size=_GROUPED_QUANT_CHUNK),
            dequantize_blockwise(v_codes, v_absmax, self._map(False, device), block, v_codes.shape, torch.float32,
                                 chunk_size=_GROUPED_QUANT_CHUNK),
        )

    def _store_stacked(self, stacks: tuple, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
        if len(stacks) == 2:
            return
        m_codes, m_absmax, v_codes, v_absmax = stacks
        block = self._block_size
        quantize_blockwise(exp_avg, self._map(True, exp_avg.device), block, out=(m_codes, m_absmax), chunk_size=_GROUPED_QUANT_CHUNK)
        quantize_blockwise(exp_avg_sq, self._map(False, exp_avg.device), block, out=(v_codes, v_absmax), chunk_size=_GROUPED_QUANT_CHUNK)

    def _validate_group(self, group: dict[str, Any]) -> None:
        if "rank" in group and group.get("basis_dtype") is None:
            group["basis_dtype"] = "bfloat16"
        super()._validate_group(group)

    def _map(self, signed: bool, device: torch.device) -> Tensor:
        key = (signed, device)
        if key not in self._maps:
            self._maps[key] = dynamic_map(signed=signed, device=device)
        return self._maps[key]

    def _init_moments(self, state: dict[str, Any], p: Tensor, shape: tuple[int, ...], group: dict[str, Any]) -> None:
        if _is_dtensor(p):  # a full-size FSDP2 parameter
            self._init_sharded_moments(state, p, shape, group)
            return
        numel = 1
        for size in shape:
            numel *= size
        if numel < self._min_8bit_size:
            state[C.EXP_AVG] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            state[C.EXP_AVG_SQ] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            return
        blocks = -(-numel // self._block_size)
        for codes_key, absmax_key, signed in (
            (C.EXP_AVG_CODES, C.EXP_AVG_ABSMAX, True),
            (C.EXP_AVG_SQ_CODES, C.EXP_AVG_SQ_ABSMAX, False),
        ):
            state[codes_key] = torch.full(shape, zero_code(signed), dtype=torch.uint8, device=p.device)
            state[absmax_key] = torch.zeros(blocks, dtype=torch.float32, device=p.device)

    def _init_sharded_moments(self, state: dict[str, Any], p: Tensor, shape: tuple[int, ...], group: dict[str, Any]) -> None:
        """The moments of an FSDP2 parameter, ``Shard(0)`` DTensors of ``shape``: 8-bit codes with a
        per-rank block layout (:mod:`galore_opt.optim.fsdp`), or fp32 below ``min_8bit_size``
        elements (counted over the whole moment, so the choice is the unsharded optimizer's)."""
        from .fsdp import check_sharding, sharded_absmax, sharded_full

        check_sharding(p, type(self).__name__)
        mesh, device = p.device_mesh, p.to_local().device
        numel = 1
        for size in shape:
            numel *= size
        if numel < self._min_8bit_size:
            for key in (C.EXP_AVG, C.EXP_AVG_SQ):
                state[key] = sharded_full(shape, 0.0, torch.float32, device, mesh)
            return
        for codes_key, absmax_key, signed in (
            (C.EXP_AVG_CODES, C.EXP_AVG_ABSMAX, True),
            (C.EXP_AVG_SQ_CODES, C.EXP_AVG_SQ_ABSMAX, False),
        ):
            state[codes_key] = sharded_full(shape, zero_code(signed), torch.uint8, device, mesh)
            state[absmax_key] = sharded_absmax(shape, self._block_size, device, mesh)

    def _load_moments(self, state: dict[str, Any]) -> tuple[Tensor, Tensor]:
        if C.EXP_AVG in state:
            return state[C.EXP_AVG], state[C.EXP_AVG_SQ]
        codes = state[C.EXP_AVG_CODES]
        return tuple(
            dequantize_blockwise(
                state[codes_key], state[absmax_key], self._map(signed, codes.device), self._block_size,
                codes.shape, torch.float32,
            )
            for codes_key, absmax_key, signed in (
                (C.EXP_AVG_CODES, C.EXP_AVG_ABSMAX, True),
                (C.EXP_AVG_SQ_CODES, C.EXP_AVG_SQ_ABSMAX, False),
            )
        )

    def _store_moments(self, state: dict[str, Any], exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
        if C.EXP_AVG in state:
            return  # fp32, updated in place
        for value, codes_key, absmax_key, signed in (
            (exp_avg, C.EXP_AVG_CODES, C.EXP_AVG_ABSMAX, True),
            (exp_avg_sq, C.EXP_AVG_SQ_CODES, C.EXP_AVG_SQ_ABSMAX, False),
        ):
            codes, absmax = state[codes_key], state[absmax_key]
            quantize_blockwise(
                value, self._map(signed, value.device), self._block_size, out=(codes.view(-1), absmax)
            )
