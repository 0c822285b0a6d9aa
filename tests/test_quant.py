"""Block-wise 8-bit quantization: the map against bitsandbytes, nearest codes against a brute-force
argmin, round-trip error bounds, zero blocks, strides, ``out=`` buffers, and bitsandbytes' own
quantize/dequantize on CPU as an oracle (where it imports)."""

from __future__ import annotations

import math

import pytest
import torch

from galore_opt.quant import (
    DEFAULT_BLOCK_SIZE,
    SMALL_TENSOR_THRESHOLD,
    dequantize_blockwise,
    dynamic_map,
    num_blocks,
    quantize_blockwise,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RAGGED_SIZES = (1, 255, 256, 257, 1000)


@pytest.fixture(scope="module")
def bnb_functional():
    """``bitsandbytes.functional``, or a skip that says why it is not usable here."""
    try:
        pytest.importorskip("bitsandbytes", exc_type=ImportError)
        import bitsandbytes.functional as bnb_f
    except pytest.skip.Exception:
        raise
    except Exception as exc:  # CPU-only installs can fail in their native library, not with ImportError
        pytest.skip(f"bitsandbytes is installed but does not import here: {type(exc).__name__}: {exc}")
    return bnb_f


def _moment_like(n: int, signed: bool, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Values over many decades (like Adam moments), with exact zeros; non-negative if unsigned."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(6) * 10.0
    x[torch.rand(n, generator=g) < 0.02] = 0.0
    return (x if signed else x.abs()).to(dtype)


def _normalized(x: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """x / absmax per element in fp32, zero blocks divided by 1: the v the contract is stated on."""
    per_elem = absmax.repeat_interleave(block_size)[: x.numel()]
    return x.reshape(-1).float() / torch.where(per_elem == 0, 1.0, per_elem)


def _half_max_gap(code: torch.Tensor, signed: bool) -> float:
    """The largest distance from a point of [-1, 1] (signed) or [0, 1] to the map."""
    lo_end = -1.0 if signed else 0.0
    return max((code[1:] - code[:-1]).max().item() / 2, code[0].item() - lo_end, 1.0 - code[-1].item())


# --- the map ------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_values(signed):
    code = dynamic_map(signed)
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert torch.all(code[1:] > code[:-1]), "256 distinct ascending values"
    assert code[-1] == 1.0 and (code == 0).sum() == 1
    if signed:
        assert -1.0 < code[0] < -0.99 and (code < 0).sum() == 127 and (code > 0).sum() == 128
        assert torch.equal(code[code < 0].flip(0), -code[(code > 0) & (code < 1)]), "symmetric but for 1.0"
        assert code[code > 0].min().item() == pytest.approx(5.5e-7)
    else:
        assert code[0] == 0.0 and code[code > 0].min().item() == pytest.approx(3.25e-7)
    # the numbers dequantize_blockwise documents
    assert _half_max_gap(code, signed) == pytest.approx(0.00703 if signed else 0.00352, abs=1e-5)


def test_dynamic_map_is_cached_but_returned_as_a_copy():
    a = dynamic_map(True)
    a[0] = -1.0  # what bitsandbytes' C quantizer has done to the map it was given
    assert dynamic_map(True)[0] > -1.0
    assert not torch.equal(dynamic_map(True), dynamic_map(False))


@pytest.mark.parametrize(
    "signed, max_exponent_bits, total_bits",
    [(True, 7, 8), (False, 7, 8), (True, 4, 8), (True, 1, 8), (True, 3, 6), (False, 5, 6), (True, 2, 3)],
)
def test_dynamic_map_equals_bitsandbytes(bnb_functional, signed, max_exponent_bits, total_bits):
    ours = dynamic_map(signed, max_exponent_bits, total_bits)
    theirs = bnb_functional.create_dynamic_map(signed, max_exponent_bits, total_bits)
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs), "bit-identical, not just close"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"total_bits": 9}, "Invalid total_bits: 9"),
        ({"max_exponent_bits": 0}, "Invalid max_exponent_bits: 0"),
        ({"max_exponent_bits": 8}, "Invalid max_exponent_bits: 8"),
        ({"signed": False, "max_exponent_bits": 5}, "the unsigned map needs max_exponent_bits == total_bits - 1 = 7"),
    ],
)
def test_dynamic_map_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dynamic_map(**kwargs)


def test_constants():
    assert DEFAULT_BLOCK_SIZE == 256 and SMALL_TENSOR_THRESHOLD == 4096
    assert num_blocks(0) == 0 and num_blocks(1) == 1 and num_blocks(256) == 1 and num_blocks(257) == 2


# --- nearest codes, round trip ------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", RAGGED_SIZES)
def test_codes_are_nearest_brute_force(signed, dtype, n):
    code = dynamic_map(signed)
    x = _moment_like(n, signed, dtype, seed=n)
    codes, absmax = quantize_blockwise(x, code)
    assert codes.dtype == torch.uint8 and codes.shape == (n,)
    assert absmax.dtype == torch.float32 and absmax.shape == (num_blocks(n),)

    blocks = torch.nn.functional.pad(x.float(), (0, num_blocks(n) * 256 - n)).view(-1, 256)
    assert torch.equal(absmax, blocks.abs().amax(dim=1))

    v = _normalized(x, absmax, 256)
    dist = (v[:, None] - code[None, :]).abs()  # O(N * 256) brute force
    best = dist.min(dim=1).values
    chosen = dist.gather(1, codes.long()[:, None]).squeeze(1)
    assert torch.all(chosen <= best), "every chosen code is a nearest one (fp32 distances, no slack)"
    # and the tie rule is argmin's: the first (lowest) of equally near indices
    assert torch.equal(codes.long(), dist.argmin(dim=1))


@pytest.mark.parametrize("block_size", [1, 64, 100])
@pytest.mark.parametrize("chunk_size", [1, 300, 1 << 20])
def test_other_block_and_chunk_sizes_brute_force(block_size, chunk_size):
    code = dynamic_map(True)
    x = _moment_like(777, True, torch.float32, seed=block_size)
    codes, absmax = quantize_blockwise(x, code, block_size, chunk_size=chunk_size)
    v = _normalized(x, absmax, block_size)
    assert torch.equal(codes.long(), (v[:, None] - code[None, :]).abs().argmin(dim=1))
    y = dequantize_blockwise(codes, absmax, code, block_size, x.shape, chunk_size=chunk_size)
    assert torch.equal(y, code[codes.long()] * absmax.repeat_interleave(block_size)[:777])


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_bound(signed, dtype):
    code = dynamic_map(signed)
    x = _moment_like(5000, signed, dtype, seed=1).view(50, 100)
    codes, absmax = quantize_blockwise(x, code)
    y = dequantize_blockwise(codes, absmax, code, 256, x.shape)
    assert y.shape == x.shape and y.dtype == torch.float32
    per_elem = absmax.repeat_interleave(256)[: x.numel()].view(x.shape)
    # + the fp32 roundings of v and of y, each within an ulp of absmax
    bound = (_half_max_gap(code, signed) + 2**-22) * per_elem
    assert torch.all((y - x.float()).abs() <= bound)
    # the other output dtypes are the fp32 result rounded once
    for out_dtype in DTYPES:
        z = dequantize_blockwise(codes, absmax, code, 256, x.shape, out_dtype)
        assert z.dtype == out_dtype and torch.equal(z, y.to(out_dtype))


def test_absmax_element_and_zero_round_trip_exactly():
    code = dynamic_map(True)
    x = torch.tensor([3.0, 0.0, -0.0, -1.5, 1e-3])
    codes, absmax = quantize_blockwise(x, code)
    y = dequantize_blockwise(codes, absmax, code, 256, x.shape)
    assert absmax.tolist() == [3.0] and y[0] == 3.0 and y[1] == 0.0 and y[2] == 0.0


def test_ties_go_to_the_lower_index():
    code = dynamic_map(True)
    c64 = code.double()
    mids = (c64[:-1] + c64[1:]) / 2
    # midpoints representable in fp32 whose fp32 distances to both neighbours are equal: exact ties
    exact = (mids.float().double() == mids) & ((mids.float() - code[:-1]) == (code[1:] - mids.float()))
    lower = torch.nonzero(exact).squeeze(1)
    assert lower.numel() > 50
    x = torch.cat([torch.ones(1), mids[lower].float()])  # absmax 1: v == x exactly
    codes, _ = quantize_blockwise(x, code)
    assert torch.equal(codes[1:].long(), lower)


def test_zero_blocks():
    code = dynamic_map(True)
    zero_index = int(torch.nonzero(code == 0))
    x = torch.randn(1000)
    x[256:512] = 0.0
    x[512:768] = -0.0
    x[768:] = 0.0  # ragged zero tail
    codes, absmax = quantize_blockwise(x, code)
    assert absmax[1:].tolist() == [0.0, 0.0, 0.0] and absmax[0] > 0
    assert torch.all(codes[256:] == zero_index)
    y = dequantize_blockwise(codes, absmax, code, 256, x.shape)
    assert torch.all(y[256:] == 0) and torch.isfinite(y).all()
    codes, absmax = quantize_blockwise(torch.zeros(3, 5, dtype=torch.bfloat16), dynamic_map(False))
    assert torch.all(codes == 0) and torch.all(absmax == 0)


def test_empty_tensor():
    codes, absmax = quantize_blockwise(torch.empty(0, 4), dynamic_map())
    assert codes.shape == (0,) and absmax.shape == (0,)
    assert dequantize_blockwise(codes, absmax, dynamic_map(), shape=(0, 4)).shape == (0, 4)


def test_non_finite_blocks_keep_it_visible():
    code = dynamic_map(True)
    x = torch.randn(768)
    x[3] = float("nan")
    x[300] = float("inf")
    codes, absmax = quantize_blockwise(x, code)
    assert math.isnan(absmax[0]) and absmax[1] == float("inf") and math.isfinite(absmax[2])
    y = dequantize_blockwise(codes, absmax, code, 256, x.shape)
    assert torch.isnan(y[:256]).all() and torch.isfinite(y[512:]).all()


def test_subnormal_absmax_is_normalized_exactly():
    code = dynamic_map(True)
    x = torch.tensor([1e-40, -5e-41, 2.5e-41, 0.0])  # 1 / 1e-40 overflows fp32: needs a division
    codes, absmax = quantize_blockwise(x, code)
    v = _normalized(x, absmax, 256)
    assert v[0] == 1.0 and torch.equal(codes.long(), (v[:, None] - code).abs().argmin(dim=1))


def test_non_contiguous_input_and_shapes():
    code = dynamic_map(True)
    base = _moment_like(40 * 30, True, torch.float32).view(40, 30)
    for x in (base.t(), base[:, ::2], base.to(torch.bfloat16).t()):
        assert not x.is_contiguous()
        codes, absmax = quantize_blockwise(x, code)
        ref_codes, ref_absmax = quantize_blockwise(x.contiguous(), code)
        assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
        y = dequantize_blockwise(codes, absmax, code, 256, x.shape, x.dtype)
        assert y.shape == x.shape and y.dtype == x.dtype


def test_out_buffers_are_filled_in_place():
    code = dynamic_map(False)
    x = _moment_like(3000, False, torch.float32).view(30, 100)
    ref_codes, ref_absmax = quantize_blockwise(x, code)
    codes = torch.full((30, 100), 7, dtype=torch.uint8)  # the state keeps the parameter's shape
    absmax = torch.full((num_blocks(3000),), -1.0)
    got = quantize_blockwise(x, code, out=(codes, absmax), chunk_size=512)
    assert got[0] is codes and got[1] is absmax
    assert torch.equal(codes.view(-1), ref_codes) and torch.equal(absmax, ref_absmax)
    for dtype in DTYPES:
        out = torch.empty(30, 100, dtype=dtype)
        assert dequantize_blockwise(codes, absmax, code, out=out, chunk_size=700) is out
        assert torch.equal(out, dequantize_blockwise(ref_codes, ref_absmax, code, 256, (30, 100), dtype))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c: quantize_blockwise(torch.ones(4, dtype=torch.float64), c), "Invalid x: dtype torch.float64"),
        (lambda c: quantize_blockwise(torch.ones(4), c.double()), "Invalid code: torch.float64"),
        (lambda c: quantize_blockwise(torch.ones(4), c.view(16, 16)), r"Invalid code: .* shape \(16, 16\)"),
        (lambda c: quantize_blockwise(torch.ones(4), c, 0), "Invalid block_size: 0"),
        (lambda c: quantize_blockwise(torch.ones(4), c, chunk_size=0), "Invalid chunk_size: 0"),
        (
            lambda c: quantize_blockwise(torch.ones(4), c, out=(torch.empty(5, dtype=torch.uint8), torch.empty(1))),
            r"Invalid out\[0\] \(codes\): torch.uint8 tensor of 5 elements",
        ),
        (
            lambda c: quantize_blockwise(torch.ones(4), c, out=(torch.empty(4, dtype=torch.uint8), torch.empty(2))),
            r"Invalid out\[1\] \(absmax\): torch.float32 tensor of 2 elements",
        ),
        (
            lambda c: dequantize_blockwise(torch.zeros(4, dtype=torch.int32), torch.ones(1), c),
            "Invalid codes: torch.int32",
        ),
        (
            lambda c: dequantize_blockwise(torch.zeros(4, dtype=torch.uint8), torch.ones(2), c),
            "Invalid absmax: torch.float32 tensor of 2 elements",
        ),
        (
            lambda c: dequantize_blockwise(torch.zeros(4, dtype=torch.uint8), torch.ones(1), c, shape=(3,)),
            "Invalid shape",
        ),
        (
            lambda c: dequantize_blockwise(torch.zeros(4, dtype=torch.uint8), torch.ones(1), c, dtype=torch.int8),
            "Invalid dtype: torch.int8",
        ),
        (
            lambda c: dequantize_blockwise(
                torch.zeros(4, dtype=torch.uint8), torch.ones(1), c, dtype=torch.float16, out=torch.empty(4)
            ),
            "Invalid dtype: torch.float16 - out has dtype torch.float32",
        ),
    ],
)
def test_validation(call, message):
    with pytest.raises(ValueError, match=message):
        call(dynamic_map())


# --- bitsandbytes on CPU as an oracle -------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_against_bitsandbytes_cpu(bnb_functional, signed, dtype):
    """Absmax and dequantization agree bit for bit. Codes: bitsandbytes' native CPU quantizer
    (0.50.2) uses an approximate search and picks a farther code for about a quarter of the
    elements; wherever the codes differ ours must be the nearer one."""
    n = 1 << 16
    code = dynamic_map(signed)
    x = _moment_like(n, signed, dtype, seed=7)
    codes, absmax = quantize_blockwise(x, code)
    try:
        bnb_codes, state = bnb_functional.quantize_blockwise(x, code=code.clone(), blocksize=256)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"bitsandbytes' CPU quantize_blockwise does not run here: {exc}")
    assert torch.equal(absmax, state.absmax)

    v = _normalized(x, absmax, 256)
    ours, theirs = (v - code[codes.long()]).abs(), (v - code[bnb_codes.view(-1).long()]).abs()
    differ = codes != bnb_codes.view(-1)
    print(
        f"\nbnb native CPU, signed={signed} {dtype}: {int(differ.sum())} of {n} codes differ, "
        f"{int((theirs > ours).sum())} where bnb's is farther, {int((theirs < ours).sum())} where ours is"
    )
    assert torch.all(ours <= theirs)

    # dequantization of the same codes is bit-identical, in every output dtype
    for out_dtype in DTYPES:
        state = bnb_functional.QuantState(absmax=absmax, code=code.clone(), blocksize=256, dtype=out_dtype)
        expected = bnb_functional.dequantize_blockwise(codes, state)
        assert torch.equal(dequantize_blockwise(codes, absmax, code, 256, (n,), out_dtype), expected)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_against_bitsandbytes_pytorch_backend(bnb_functional, signed, dtype):
    """bitsandbytes' pure-PyTorch backend (what it runs where it has no native kernel) compares
    ``x * fl(1/absmax)`` with rounded midpoints: codes may differ only within rounding of a tie."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    n = 1 << 16
    code = dynamic_map(signed)
    x = _moment_like(n, signed, dtype, seed=11)
    try:  # a private route to the CompositeExplicitAutograd ("default") kernel, past the CPU one
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
        bnb_codes, bnb_absmax = op.redispatch(keys, x, code.clone(), 256)
    except Exception as exc:
        pytest.skip(f"cannot reach bitsandbytes' default (PyTorch) kernel: {type(exc).__name__}: {exc}")
    codes, absmax = quantize_blockwise(x, code)
    assert torch.equal(absmax, bnb_absmax)
    v = _normalized(x, absmax, 256)
    ours, theirs = (v - code[codes.long()]).abs(), (v - code[bnb_codes.view(-1).long()]).abs()
    differ = codes != bnb_codes.view(-1)
    print(f"\nbnb PyTorch backend, signed={signed} {dtype}: {int(differ.sum())} of {n} codes differ")
    assert torch.all(ours <= theirs)
    # where they differ, bnb's code is as near as ours up to a few fp32 roundings of v
    assert torch.all((theirs - ours)[differ] <= 4 * 2**-23 * v.abs()[differ])


# --- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_bit_for_bit(dtype):
    for signed in (True, False):
        code = dynamic_map(signed)
        code_cuda = dynamic_map(signed, device="cuda")
        assert code_cuda.device.type == "cuda" and torch.equal(code_cuda.cpu(), code)
        x = _moment_like(100_003, signed, dtype, seed=3)
        codes, absmax = quantize_blockwise(x, code)
        codes_cuda, absmax_cuda = quantize_blockwise(x.cuda(), code_cuda, chunk_size=1 << 14)
        assert torch.equal(codes_cuda.cpu(), codes) and torch.equal(absmax_cuda.cpu(), absmax)
        y = dequantize_blockwise(codes_cuda, absmax_cuda, code_cuda, 256, x.shape, dtype)
        assert torch.equal(y.cpu(), dequantize_blockwise(codes, absmax, code, 256, x.shape, dtype))


@pytest.mark.parametrize("signed", [True, False])
def test_bucket_search_equals_searchsorted(signed):
    """The 16-bit-prefix lookup that replaces the binary search gives searchsorted's index for every
    value: random ones over many decades, the codes themselves, their fp32 neighbours, +-0, and the
    maps' ends; a map with codes closer than a bf16 step falls back to the binary search."""
    from galore_opt.quant import _bucket_table, _searchsorted_into

    code = dynamic_map(signed)
    gen = torch.Generator().manual_seed(0)
    v = torch.cat([
        torch.randn(20000, generator=gen) * torch.exp2(torch.randint(-40, 2, (20000,), generator=gen).float()),
        code, torch.nextafter(code, torch.tensor(math.inf)), torch.nextafter(code, torch.tensor(-math.inf)),
        torch.tensor([0.0, -0.0, 1.0, -1.0, 1.5, -1.5, 1e-30, -1e-30]),
    ])  # fmt: skip
    for c in (code, torch.linspace(0.0, 1e-3, 200)):  # the second: codes 5e-6 apart near 1e-3
        out = torch.empty(v.numel(), dtype=torch.int32)
        _searchsorted_into(c, v, out, torch.empty_like(v), torch.empty(v.numel(), dtype=torch.bool))
        assert torch.equal(out, torch.searchsorted(c, v, out_int32=True))
    assert _bucket_table(code)[2] == 1
