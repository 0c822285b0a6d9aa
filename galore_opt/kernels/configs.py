"""Launch configurations of the Triton kernels, per GPU target and dtype (imports nothing).

The dispatch launches only what is listed here, and :mod:`galore_opt.kernels.aot` compiles exactly
these lists for every target, so a config that does not fit a GPU (shared memory over the
per-block limit, register spills) is caught on a machine without a GPU.

Targets are compute capabilities as ``major * 10 + minor``: 80 (A100), 86 (RTX 30xx, A10/A40),
89 (RTX 4090, L4/L40), 90 (H100/H200). Shared memory per block is what a kernel may opt in to
(the CUDA programming guide's table): 163 KiB on sm_80, 99 KiB on sm_86/89, 227 KiB on sm_90.
"""

from __future__ import annotations

#: the compute capabilities the kernels are compiled and checked for
TARGETS = (80, 86, 89, 90)

#: the largest dynamic shared memory a block may use, in bytes, by compute capability
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}

#: the oldest compute capability the kernels run on (bf16 tensor-core dots need sm_80); older
#: GPUs take the reference path
MIN_CAPABILITY = (8, 0)

#: elements per launch of an elementwise kernel: its 32-bit offsets stay below 2^31, and a larger
#: tensor is processed in several launches (a power of two, so whole quantization blocks)
MAX_LAUNCH_ELEMENTS = 1 << 30

#: elements per program of the low-rank Adam kernel (4 warps)
LOWRANK_ADAM_BLOCK = 1024

#: quantization block sizes the fused 8-bit kernel takes (one program per block); other block
#: sizes run on the reference path (2048 and up hold a block per program in registers and spill)
ADAMW8BIT_BLOCKS = (16, 32, 64, 128, 256, 512, 1024)
ADAMW8BIT_DEFAULT_BLOCK = 256


def adamw8bit_warps(block: int) -> int:
    """Warps per program of the 8-bit kernel: one per 64 elements of the block, 1 to 4."""
    return max(1, min(4, block // 64))


#: row tiles of the up-projection GEMM that share a column panel of B in L2
GEMM_GROUP_M = 8

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the up-projection GEMM, the first of each
# list is the default. K is the rank (128-1024); M and N are the layer's sides (1k-28k). The
# candidates were compiled for each target with the ptxas of Triton 3.6 and 3.9
# (python -m galore_opt.kernels.aot): the lists keep those that fit the target's shared memory
# and use no local memory (spills) with both. Three groups of targets: sm_90 (227 KiB of shared
# memory, 64K registers), sm_80 (163 KiB) and sm_86/sm_89 (99 KiB: the RTX 30xx/40xx cards).
_GEMM = {
    "16bit": {  # bf16 / fp16 operands on tensor cores
        "sm90": [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
        "sm80": [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 32, 8, 4)],
        "small": [(128, 128, 32, 8, 3), (128, 128, 64, 8, 2), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4)],
    },
    "tf32": {  # fp32 operands on tensor cores (allow_tf32)
        "sm90": [(128, 128, 32, 8, 3), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (128, 128, 64, 8, 2)],
        "sm80": [(128, 128, 32, 8, 3), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (128, 128, 64, 8, 2)],
        "small": [(64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 4)],
    },
    "ieee": {  # fp32 products on CUDA cores (fp32 operands without tf32): small register tiles
        "sm90": [(64, 64, 16, 4, 2), (64, 128, 16, 8, 2), (128, 64, 16, 8, 2), (32, 64, 16, 4, 2)],
        "sm80": [(64, 64, 16, 4, 2), (64, 128, 16, 8, 2), (128, 64, 16, 8, 2), (32, 64, 16, 4, 2)],
        "small": [(64, 64, 16, 4, 2), (64, 128, 16, 8, 2), (128, 64, 16, 8, 2), (32, 64, 16, 4, 2)],
    },
}

#: operand kinds of the up-projection: 16-bit operands, fp32 with tf32, fp32 exact (ieee)
OPERAND_KINDS = ("16bit", "tf32", "ieee")


def project_back_configs(arch: int, operand: str) -> list[tuple[int, int, int, int, int]]:
    """The ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` configs the up-projection GEMM may
    launch on compute capability ``arch`` with ``operand`` (one of :data:`OPERAND_KINDS`); the
    first is the default. sm_90 and sm_100 (227 KiB of shared memory) take the sm_90 list, sm_80
    and sm_87 (163 KiB) the sm_80 one, every other target (99 KiB or less: sm_86, sm_89, sm_120, or
    unlisted) the small one."""
    table = _GEMM.get(operand)
    if table is None:
        raise ValueError(f"operand must be one of {OPERAND_KINDS}, got {operand!r}")
    limit = SHARED_MEMORY_LIMIT.get(arch, 101376)  # an unlisted target: the smallest lists
    group = "sm90" if arch >= 90 and limit > 166912 else "sm80" if limit > 101376 else "small"
    return list(table[group])


def operand_kind(operand_is_fp32: bool, allow_tf32: bool) -> str:
    """The operand kind of an up-projection: fp32 operands run exact (``"ieee"``) unless tf32 is
    allowed (``torch.backends.cuda.matmul.allow_tf32``, as cuBLAS follows it)."""
    if not operand_is_fp32:
        return "16bit"
    return "tf32" if allow_tf32 else "ieee"


__all__ = [
    "ADAMW8BIT_BLOCKS",
    "ADAMW8BIT_DEFAULT_BLOCK",
    "GEMM_GROUP_M",
    "adamw8bit_warps",
    "LOWRANK_ADAM_BLOCK",
    "MIN_CAPABILITY",
    "MAX_LAUNCH_ELEMENTS",
    "OPERAND_KINDS",
    "SHARED_MEMORY_LIMIT",
    "TARGETS",
    "operand_kind",
    "project_back_configs",
]
