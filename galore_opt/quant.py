"""Block-wise 8-bit quantization of optimizer state, in plain PyTorch (CPU and GPU).

This is the storage format of bitsandbytes' blockwise 8-bit optimizers (Dettmers et al. 2022),
used by ``GaLoreAdamW8bit`` for its low-rank Adam moments. A tensor ``x`` is flattened and cut
into blocks of ``block_size`` consecutive elements (the last block may be shorter). Each block
keeps its absolute maximum in fp32, and each element the uint8 index of the value of a 256-entry
quantization map ``code`` that is nearest to ``x / absmax``::

    absmax[b] = max_{i in block b} |x_i|
    codes[i]  = argmin_j |x_i / absmax[b] - code[j]|      (ties: the lower index j)
    x_i      ~= code[codes[i]] * absmax[b]

The map is bitsandbytes' *dynamic* (dynamic-exponent) map (:func:`dynamic_map`): a sign, a run of
zero bits that sets the decade (``10^-6 .. 10^0``) and a linear fraction in the remaining bits,
so that small and large values of a block get the same relative precision. The signed map holds
the first moment, the unsigned map (no sign bit, one more fraction bit) the second.

Storage is 1 byte per element plus 4 bytes per block: 1.016 bytes per element at the default
block size of 256, a quarter of fp32 state. Tensors below :data:`SMALL_TENSOR_THRESHOLD` elements
are not worth it and stay in fp32.

Nothing here imports bitsandbytes; it is only the oracle of the tests.
"""

from __future__ import annotations

import bisect
import functools
import math

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

#: Elements per quantization block. bitsandbytes' blockwise 8-bit optimizers hard-code 256 when
#: they create their 8-bit state (``blocksize = 256`` in ``Optimizer2State.init_state`` and
#: ``Optimizer1State.init_state``: bitsandbytes 0.50.2, ``bitsandbytes/optim/optimizer.py``
#: lines 524 and 691). ``bitsandbytes.functional.quantize_blockwise`` itself defaults to 4096,
#: which is not what the optimizers use.
DEFAULT_BLOCK_SIZE = 256

#: State tensors with fewer elements stay fp32: the per-block absmax and the extra kernel calls
#: cost more than the bytes saved. bitsandbytes' 8-bit optimizers default to ``min_8bit_size=4096``
#: (``Optimizer2State.__init__`` and ``Optimizer1State.__init__``: bitsandbytes 0.50.2,
#: ``bitsandbytes/optim/optimizer.py`` lines 414 and 604) and apply it in ``init_state`` as
#: ``if p.numel() < config["min_8bit_size"]: dtype = torch.float32`` (lines 502 and 674), i.e.
#: a tensor of exactly 4096 elements is quantized. bnb compares the parameter's size; for GaLore
#: the state is the low-rank moment, so the optimizer should compare the moment's size.
SMALL_TENSOR_THRESHOLD = 4096

#: Elements processed per pass of :func:`quantize_blockwise` and :func:`dequantize_blockwise`
#: (rounded down to whole blocks). It bounds their temporaries (17 and at most 8 bytes per element
#: of a pass: 17 MiB and 8 MiB) whatever the size of the tensor; larger passes only save kernel
#: launches, which matter on GPU for tensors of many millions of elements.
DEFAULT_CHUNK_SIZE = 1 << 20

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- the quantization map -----------------------------------------------------------------------


def _decade_values(exponent: int, count: int) -> Tensor:
    """``count`` values spread over ``10^exponent * (0.1, 1)``: the midpoints of ``count`` equal
    intervals of ``[0.1, 1]``, scaled.

    Computed the way bitsandbytes computes them (fp32 ``linspace`` on CPU, fp32 midpoints, an fp32
    product with the Python float ``10 ** exponent``) so that every bit agrees; CUDA's
    ``linspace`` need not round the same way, hence CPU.
    """
    bounds = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float32, device="cpu")
    return (10.0**exponent) * ((bounds[:-1] + bounds[1:]) / 2.0)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_map_args(signed: bool, max_exponent_bits: int, total_bits: int) -> None:
    if not _is_int(total_bits) or not 2 <= total_bits <= 8:
        raise ValueError(f"Invalid total_bits: {total_bits!r} - must be an int in [2, 8]")
    if not _is_int(max_exponent_bits) or not 1 <= max_exponent_bits <= total_bits - 1:
        raise ValueError(
            f"Invalid max_exponent_bits: {max_exponent_bits!r} - must be an int in [1, total_bits - 1 = {total_bits - 1}]"
        )
    if not signed and max_exponent_bits != total_bits - 1:
        # bitsandbytes' construction then yields 2**total_bits - 2**(linear bits) + 1 values and
        # fails its own length assertion: there is no map to agree with.
        raise ValueError(
            f"Invalid max_exponent_bits: {max_exponent_bits!r} - the unsigned map needs "
            f"max_exponent_bits == total_bits - 1 = {total_bits - 1}"
        )


@functools.cache
def _dynamic_map_values(signed: bool, max_exponent_bits: int, total_bits: int) -> tuple[float, ...]:
    """The map's 256 fp32 values as Python floats (exact), built once on the CPU with real tensors
    (also when the first call comes from inside ``FakeTensorMode``), so maps for fake and meta
    tensors, and the zero code, need no tensor data."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return tuple(_build_dynamic_map(signed, max_exponent_bits, total_bits).tolist())


def _build_dynamic_map(signed: bool, max_exponent_bits: int, total_bits: int) -> Tensor:
    non_sign_bits = total_bits - 1
    # Bits of the linear fraction in the smallest decade; each larger decade has one more. The
    # unsigned map spends the sign bit on the fraction.
    fraction_bits = non_sign_bits - max_exponent_bits + (0 if signed else 1)
    parts = [_decade_values(k - (max_exponent_bits - 1), 2 ** (fraction_bits + k)) for k in range(max_exponent_bits)]
    # With fewer exponent bits than non-sign bits, the codes whose exponent bits are all zero (no
    # indicator bit) add 2**(linear bits) - 1 values. bitsandbytes puts them in the top decade
    # [0.1, 1] (its loop variable's last value), where they may repeat values; so do we.
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra > 0:
        parts.append(_decade_values(0, extra))
    positive = torch.cat(parts)
    values = [positive, -positive] if signed else [positive]
    values.append(torch.tensor([0.0, 1.0]))
    # Maps of fewer than 8 bits are padded to 256 entries with zeros, as bitsandbytes does; the
    # padding repeats 0.0 (quantize_blockwise may pick any copy: they dequantize alike).
    values.append(torch.zeros(256 - 2**total_bits))
    return torch.cat(values).sort().values


def dynamic_map(
    signed: bool = True,
    max_exponent_bits: int = 7,
    total_bits: int = 8,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""The 256 sorted fp32 values of bitsandbytes' dynamic quantization map.

    A code of ``total_bits`` bits is a sign bit (signed map only), then ``E`` zero bits and a one
    bit that select the decade ``10^{-E}`` (``E < max_exponent_bits``), then a linear fraction in
    the bits left. The fraction of decade ``10^{-E}`` takes ``2^F`` values, the midpoints of
    ``2^F`` equal intervals of ``[0.1, 1]`` times ``10^{-E}``, with ``F`` one larger per decade
    towards 1. With the defaults the signed map holds 127 positive values from ``5.5e-7`` to
    ``0.99297``, their negatives, 0 and 1; the unsigned map (the sign bit goes to the fraction)
    254 positive values from ``3.25e-7`` to ``0.99648``, 0 and 1. Both hold 1.0, so the absmax
    element of a block is stored exactly when positive, and 0.0, so zeros stay zeros; the signed
    map has no -1, so a negative absmax element comes back as ``-0.99297 * absmax``. The largest
    gap between neighbours is ``0.0140625`` (signed) and ``0.00703`` (unsigned).

    Equal, bit for bit, to ``bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits,
    total_bits)`` (bitsandbytes 0.50.2, ``bitsandbytes/functional.py`` line 296), which bnb's
    8-bit optimizers use with the defaults: signed for the first moment and unsigned for the
    second (``Optimizer8bit.fill_qmap``). The 256 values are distinct for the defaults; other
    arguments may repeat values, as bnb's do (see the comments in the code).

    Args:
        signed: the signed map (values in ``(-1, 1]``) or the unsigned one (``[0, 1]``).
            Default: ``True``.
        max_exponent_bits: the number of decades. Default: 7.
        total_bits: bits per code; maps of fewer than 8 bits are padded to 256 entries with
            zeros. Default: 8.
        device: where the map is returned. Default: CPU.

    Returns:
        A new 1-D float32 tensor of 256 ascending values (built once per arguments and cached as
        Python floats), so callers may modify it (bitsandbytes' C quantizer has written
        ``code[0] = -1`` into the map it was given) without affecting other callers. Works for
        ``meta`` and fake (``FakeTensorMode``) devices too.

    Reference: Dettmers, "8-Bit Approximations for Parallelism in Deep Learning", ICLR 2016;
    Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via Block-wise Quantization",
    ICLR 2022.
    """
    _check_map_args(signed, max_exponent_bits, total_bits)
    values = _dynamic_map_values(bool(signed), max_exponent_bits, total_bits)
    return torch.tensor(values, dtype=torch.float32, device=torch.device("cpu" if device is None else device))


def zero_code(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> int:
    """The code of 0.0 in :func:`dynamic_map` (the first of the map's zeros, as
    ``searchsorted(map, 0.0)`` finds it): what a moment of zeros is stored as."""
    _check_map_args(signed, max_exponent_bits, total_bits)
    return bisect.bisect_left(_dynamic_map_values(bool(signed), max_exponent_bits, total_bits), 0.0)


# --- argument checks ----------------------------------------------------------------------------


def num_blocks(numel: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Blocks of ``block_size`` elements that cover ``numel`` elements (the last may be partial)."""
    return -(-numel // block_size)


def _check_block_size(block_size: int) -> None:
    if not _is_int(block_size) or block_size < 1:
        raise ValueError(f"Invalid block_size: {block_size!r} - must be an int >= 1")


def _chunk_elements(chunk_size: int, block_size: int, numel: int) -> int:
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"Invalid chunk_size: {chunk_size!r} - must be an int >= 1")
    return min(max(1, chunk_size // block_size) * block_size, numel)


def _check_code(code: Tensor, device: torch.device) -> None:
    if code.dim() != 1 or code.dtype != torch.float32 or not 2 <= code.numel() <= 256:
        raise ValueError(
            f"Invalid code: {code.dtype} tensor of shape {tuple(code.shape)} - must be a 1-D float32 "
            "tensor of 2 to 256 ascending values (e.g. dynamic_map())"
        )
    if code.device != device:
        raise ValueError(f"Invalid code: on {code.device} but the data is on {device} - use code.to({str(device)!r})")


def _check_tensor(name: str, t: Tensor, dtypes: tuple[torch.dtype, ...], numel: int, device: torch.device) -> None:
    if t.dtype not in dtypes or t.numel() != numel or t.device != device or not t.is_contiguous():
        raise ValueError(
            f"Invalid {name}: {t.dtype} tensor of {t.numel()} elements on {t.device} "
            f"(contiguous={t.is_contiguous()}) - must be a contiguous {' or '.join(map(str, dtypes))} "
            f"tensor of {numel} elements on {device}"
        )


# --- nearest-code search ---------------------------------------------------------------------------

# Looked up by identity first: id(code) -> (code, its version counter, table); the entry holds the
# map tensor itself, so its id cannot be reused while cached, and a map modified in place (new
# version) is looked up again. Reading a CUDA map's values would synchronize the device, so the
# value-keyed cache (for a new tensor with known values, e.g. a fresh dynamic_map() copy) is
# consulted only on an identity miss.
_BUCKET_TABLES: dict[int, tuple[Tensor, int, tuple[Tensor, Tensor, int]]] = {}
_BUCKET_TABLES_BY_VALUE: dict[tuple[torch.device, bytes], tuple[Tensor, Tensor, int]] = {}


def _bucket_table(code: Tensor) -> tuple[Tensor, Tensor, int]:
    """A lookup table for ``searchsorted(code, v)`` indexed by the upper 16 bits of fp32 ``v``.

    Each 16-bit prefix is a bucket of fp32 values (a bf16 value's neighbourhood); the table holds
    the first index with ``code >= `` the bucket's smallest value, and ``corrections`` is the most
    codes any finite bucket holds (1 for the dynamic maps: their relative spacing, >= 1%, is
    wider than a bucket's, <= 0.8%). Then ``searchsorted(code, v) = table[b] + (number of codes
    in the bucket below v)``: ``corrections`` compare-and-step passes, each a gather, instead of
    the binary search's eight dependent ones.
    """
    hit = _BUCKET_TABLES.get(id(code))
    if hit is not None and hit[0] is code and hit[1] == code._version:
        return hit[2]
    if len(_BUCKET_TABLES) > 16:
        _BUCKET_TABLES.clear()
    value_key = (code.device, code.detach().cpu().numpy().tobytes())
    entry = _BUCKET_TABLES_BY_VALUE.get(value_key)
    if entry is None:
        entry = _build_bucket_table(code)
        if len(_BUCKET_TABLES_BY_VALUE) > 16:
            _BUCKET_TABLES_BY_VALUE.clear()
        _BUCKET_TABLES_BY_VALUE[value_key] = entry
    _BUCKET_TABLES[id(code)] = (code, code._version, entry)
    return entry


def _build_bucket_table(code: Tensor) -> tuple[Tensor, Tensor, int]:
    b = torch.arange(65536, dtype=torch.int32)
    edge_a = (b << 16).view(torch.float32)
    edge_b = ((b << 16) | 0xFFFF).view(torch.float32)  # the bucket's other end (same sign)
    lo, hi = torch.minimum(edge_a, edge_b), torch.maximum(edge_a, edge_b)
    code_cpu = code.detach().float().cpu()
    first = torch.searchsorted(code_cpu, lo)
    inside = torch.searchsorted(code_cpu, hi, right=True) - first
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    corrections = int(inside[finite].max()) if finite.any() else 0
    # one padding value above every code so that a corrected index can be looked up
    padded = torch.cat([code_cpu, torch.tensor([math.inf])])
    return first.to(torch.int32).to(code.device), padded.to(code.device), corrections


def _searchsorted_into(code: Tensor, v: Tensor, out: Tensor, scratch: Tensor, mask: Tensor) -> None:
    """``out = searchsorted(code, v)`` (int32) for fp32 ``v``; ``scratch`` (fp32) and ``mask``
    (bool): buffers like ``v``. NaN gets an unspecified index the caller clamps."""
    if code.device.type == "meta" or isinstance(code, FakeTensor):  # no values to build a table from
        torch.searchsorted(code, v, out_int32=True, out=out)
        return
    table, padded, corrections = _bucket_table(code)
    if corrections > 4:  # a map with codes closer than a bf16 step: binary search
        torch.searchsorted(code, v, out_int32=True, out=out)
        return
    bucket = scratch.view(torch.int32)
    torch.bitwise_right_shift(v.view(torch.int32), 16, out=bucket)
    bucket.bitwise_and_(0xFFFF)
    torch.index_select(table, 0, bucket, out=out)
    for _ in range(corrections):
        torch.index_select(padded, 0, out.clamp_(max=padded.numel() - 1), out=scratch)
        torch.lt(scratch, v, out=mask)
        out.add_(mask.view(torch.uint8))


# --- quantize / dequantize -----------------------------------------------------------------------


@torch.no_grad()
def quantize_blockwise(
    x: Tensor,
    code: Tensor,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    out: tuple[Tensor, Tensor] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    r"""Quantize ``x`` block-wise to the nearest values of ``code``.

    .. math::
        a_b = \max_{i \in b} |x_i|, \qquad
        q_i = \operatorname*{argmin}_j \left| v_i - c_j \right|, \quad v_i = x_i / a_b

    ``x`` is flattened in row-major order and cut into ``ceil(numel / block_size)`` blocks of
    ``block_size`` elements, the last one ragged. ``v_i`` is an fp32 division whatever the input
    dtype (exact-rounded, also when ``a_b`` is an fp32 subnormal, where a reciprocal would
    overflow). A block of zeros has ``a_b = 0``; its elements get the index of 0.0. The nearest
    value is found by ``searchsorted`` in the sorted map (a lookup on ``v``'s upper 16 bits plus
    one compare-and-step, 2.2x faster than ``torch.searchsorted`` on the CPU; the same index) and
    a comparison of the fp32
    distances to the two neighbours, ``c_hi - v`` and ``v - c_lo``: the result is the argmin of
    the fp32 distances over the whole map, i.e. the true nearest value up to fp32 rounding of
    ``v`` and of the distances (about ``1e-7`` relative).

    Ties (equal fp32 distances): the lower index, i.e. the smaller code value, wins, as
    ``torch.argmin`` picks the first minimum and as bitsandbytes' CPU quantizer does; for the
    unsigned map that is the value nearer zero. A value that the map repeats (only maps other than
    the default ones do) may get any of its indices; they dequantize alike.

    Compared with bitsandbytes 0.50.2 (the tests report the counts): the absmax agrees bit for bit.
    Its pure-PyTorch backend compares ``x * fl(1 / a_b)`` with rounded midpoints, so it picks the
    other neighbour in a few hundred of a million bf16 elements that lie within rounding of a
    midpoint (none in a million fp32 ones), never a farther code by more than rounding. Its native
    CPU kernel's search is approximate and returns a farther code for about a quarter of the
    elements (e.g. ``2.1e-5`` for ``1e-9``); where the codes differ ours is never farther.

    Non-finite input: the absmax of a block that holds a NaN is NaN and of one that holds an inf
    is inf, so that dequantization does not hide them; the codes of such a block are unspecified
    but valid indices.

    Temporaries, per pass of at most ``chunk_size`` elements (rounded down to whole blocks): the
    normalized values (fp32), their indices (int32), two fp32 buffers for the neighbours'
    distances and a bool mask, 17 bytes per element, plus a few per-block tensors: at most
    17 MiB with the default ``chunk_size``, whatever the size of ``x``. A non-contiguous ``x`` is
    first copied to a contiguous one (``x.numel()`` elements of its dtype). With ``out`` given,
    nothing else of the size of ``x`` is allocated.

    Args:
        x: the tensor to quantize: float32, bfloat16 or float16, any shape and strides.
        code: the quantization map: a 1-D float32 tensor of 2 to 256 *ascending* values on the
            device of ``x`` (the order is not checked: an unsorted map gives wrong codes), e.g.
            :func:`dynamic_map`.
        block_size: elements per block. Default: :data:`DEFAULT_BLOCK_SIZE` (256).
        out: optional ``(codes, absmax)`` to write into, e.g. the optimizer's state tensors: a
            contiguous uint8 tensor of ``x.numel()`` elements (any shape) and a contiguous
            float32 tensor of ``ceil(x.numel() / block_size)`` elements, on the device of ``x``.
        chunk_size: elements per pass, see above. Default: :data:`DEFAULT_CHUNK_SIZE` (``2**20``).

    Returns:
        ``(codes, absmax)``: ``codes``, a 1-D uint8 tensor of ``x.numel()`` indices into ``code``,
        and ``absmax``, a 1-D float32 tensor of one value per block (the tensors of ``out`` if
        given).
    """
    _check_block_size(block_size)
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"Invalid x: dtype {x.dtype} - must be one of {_FLOAT_DTYPES}")
    _check_code(code, x.device)
    device, n = x.device, x.numel()
    n_blocks = num_blocks(n, block_size)
    if out is None:
        codes = torch.empty(n, dtype=torch.uint8, device=device)
        absmax = torch.empty(n_blocks, dtype=torch.float32, device=device)
    else:
        codes, absmax = out
        _check_tensor("out[0] (codes)", codes, (torch.uint8,), n, device)
        _check_tensor("out[1] (absmax)", absmax, (torch.float32,), n_blocks, device)
    if n == 0:
        return codes, absmax
    flat = x.detach().reshape(-1)  # a view when x is contiguous
    codes_flat, absmax_flat = codes.view(-1), absmax.view(-1)
    step = _chunk_elements(chunk_size, block_size, n)
    # One set of buffers for all passes (the last, shorter one uses their first elements).
    v = torch.empty(step, dtype=torch.float32, device=device)
    idx = torch.empty(step, dtype=torch.int32, device=device)
    d_hi = torch.empty(step, dtype=torch.float32, device=device)
    c_lo = torch.empty(step, dtype=torch.float32, device=device)
    keep_lo = torch.empty(step, dtype=torch.bool, device=device)
    last = code.numel() - 1
    code_below = torch.cat([code[:1], code[:-1]])  # code_below[i] = code[i - 1]: no "index - 1" pass
    for start in range(0, n, step):
        stop = min(start + step, n)
        m = stop - start
        body = m // block_size * block_size  # elements in whole blocks; m - body in a ragged one
        xs, vs = flat[start:stop], v[:m]
        am = absmax_flat[start // block_size : num_blocks(stop, block_size)]
        # max |x| per block without an |x| temporary of the pass's size; NaN propagates.
        if body:
            torch.linalg.vector_norm(
                xs[:body].view(-1, block_size), ord=math.inf, dim=1, dtype=torch.float32, out=am[: body // block_size]
            )
        if m > body:
            torch.linalg.vector_norm(xs[body:], ord=math.inf, dtype=torch.float32, out=am[-1])
        # A zero block holds only (signed) zeros: divided by 1 they stay zeros, the index of 0.0.
        divisor = am.masked_fill(am == 0, 1.0)
        if body:
            torch.div(
                xs[:body].view(-1, block_size), divisor[: body // block_size, None], out=vs[:body].view(-1, block_size)
            )
        if m > body:
            # divisor[-1:], not divisor[-1]: a 0-dim fp32 tensor does not take part in type promotion,
            # so a bf16 / fp16 x would be divided in its own dtype.
            torch.div(xs[body:], divisor[-1:], out=vs[body:])

        # i = the first index with code[i] >= v, clamped to [1, K - 1] so that (i - 1, i) are both
        # valid: below code[0] the lower one wins (v - c_lo < 0), above code[-1] the upper one
        # (c_hi - v < 0); in between these are the distances to the two nearest values.
        ix, dh, cl, lo = idx[:m], d_hi[:m], c_lo[:m], keep_lo[:m]
        _searchsorted_into(code, vs, ix, dh, lo)
        ix.clamp_(1, last)
        torch.index_select(code, 0, ix, out=dh)
        dh.sub_(vs)  # c_hi - v
        torch.index_select(code_below, 0, ix, out=cl)
        vs.sub_(cl)  # v - c_lo
        torch.ge(dh, vs, out=lo)  # a tie keeps the lower index
        q = codes_flat[start:stop]
        q.copy_(ix)
        # The mask viewed as uint8 (0 or 1): uint8 - uint8, without the int32 copy of the mask
        # that mixing dtypes would allocate.
        q.sub_(lo.view(torch.uint8))
    return codes, absmax


@torch.no_grad()
def dequantize_blockwise(
    codes: Tensor,
    absmax: Tensor,
    code: Tensor,
    block_size: int = DEFAULT_BLOCK_SIZE,
    shape: torch.Size | tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
    *,
    out: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    r"""Undo :func:`quantize_blockwise`: ``x_i = code[codes_i] * absmax_b``.

    The product is computed in fp32 and rounded once to ``dtype``, as bitsandbytes does (the
    results are bit-identical to ``bitsandbytes.functional.dequantize_blockwise``). Against the
    quantized input the error is at most half the largest gap of ``code`` times the block's
    absmax, plus that rounding: ``0.00703 * absmax`` for the signed :func:`dynamic_map` and
    ``0.00352 * absmax`` for the unsigned one.

    Temporaries, per pass of at most ``chunk_size`` elements: the indices as int32 (4 bytes per
    element), plus the gathered map values in fp32 (4 more) when the result is not float32; at
    most 8 MiB with the default ``chunk_size``.

    Args:
        codes: uint8 indices into ``code``, as returned by :func:`quantize_blockwise`; any shape,
            contiguous.
        absmax: float32, one value per block: ``ceil(codes.numel() / block_size)`` values.
        code: the map the codes index (the one they were quantized with): float32, on their
            device.
        block_size: elements per block. Default: :data:`DEFAULT_BLOCK_SIZE` (256).
        shape: the shape of the result, ``codes.numel()`` elements. Default: ``out``'s shape if
            given, else 1-D.
        dtype: float32, bfloat16 or float16. Default: ``out``'s dtype if given, else float32.
        out: optional contiguous tensor to write into (e.g. a buffer reused every step).
        chunk_size: elements per pass. Default: :data:`DEFAULT_CHUNK_SIZE` (``2**20``).

    Returns:
        The dequantized tensor of ``shape`` and ``dtype`` (``out`` if given).
    """
    _check_block_size(block_size)
    device, n = codes.device, codes.numel()
    if codes.dtype != torch.uint8 or not codes.is_contiguous():
        raise ValueError(
            f"Invalid codes: {codes.dtype} tensor (contiguous={codes.is_contiguous()}) - must be a contiguous uint8 tensor"
        )
    _check_tensor("absmax", absmax, (torch.float32,), num_blocks(n, block_size), device)
    _check_code(code, device)
    if out is not None:
        if dtype is not None and dtype != out.dtype:
            raise ValueError(f"Invalid dtype: {dtype} - out has dtype {out.dtype}")
        if shape is not None and tuple(shape) != tuple(out.shape):
            raise ValueError(f"Invalid shape: {tuple(shape)} - out has shape {tuple(out.shape)}")
        _check_tensor("out", out, _FLOAT_DTYPES, n, device)
    else:
        dtype = torch.float32 if dtype is None else dtype
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"Invalid dtype: {dtype} - must be one of {_FLOAT_DTYPES}")
        shape = (n,) if shape is None else tuple(shape)
        if math.prod(shape) != n:
            raise ValueError(f"Invalid shape: {shape} - must have codes.numel() = {n} elements")
        out = torch.empty(shape, dtype=dtype, device=device)
    if n == 0:
        return out
    codes_flat, out_flat = codes.view(-1), out.view(-1)
    step = _chunk_elements(chunk_size, block_size, n)
    idx = torch.empty(step, dtype=torch.int32, device=device)  # index_select takes no uint8 index
    # Gather into the result directly when it is fp32; otherwise into an fp32 buffer, so that the
    # product with absmax is rounded once, to the result's dtype.
    vals = None if out.dtype == torch.float32 else torch.empty(step, dtype=torch.float32, device=device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        m = stop - start
        body = m // block_size * block_size
        ix, dst = idx[:m], out_flat[start:stop]
        src = dst if vals is None else vals[:m]
        ix.copy_(codes_flat[start:stop])
        torch.index_select(code, 0, ix, out=src)
        am = absmax[start // block_size : num_blocks(stop, block_size)]
        if body:
            torch.mul(
                src[:body].view(-1, block_size), am[: body // block_size, None], out=dst[:body].view(-1, block_size)
            )
        if m > body:
            torch.mul(src[body:], am[-1:], out=dst[body:])
    return out


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "SMALL_TENSOR_THRESHOLD",
    "dequantize_blockwise",
    "dynamic_map",
    "num_blocks",
    "quantize_blockwise",
]
