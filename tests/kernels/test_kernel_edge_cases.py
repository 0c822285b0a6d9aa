"""The kernels at their edges: NaN bit patterns through the bf16 rounding, tensors past 2^31
elements (chunked launches of the elementwise kernels, 64-bit addresses in the GEMM), and the
kernels reached as PyTorch operators (``torch.ops.galore_opt``).

On CPU this runs in Triton's interpreter (``make test`` sets TRITON_INTERPRET=1 for this folder).
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU: run with TRITON_INTERPRET=1 (make test does)", allow_module_level=True)

import triton.language as tl  # noqa: E402

from galore_opt.kernels import adamw8bit, configs, galore_adamw  # noqa: E402
from galore_opt.kernels._rounding import round_to  # noqa: E402
from galore_opt.kernels.adamw8bit import fused_adamw8bit  # noqa: E402
from galore_opt.kernels.galore_adamw import (  # noqa: E402
    lowrank_adam,
    project_back_update,
    project_back_update_reference,
)
from galore_opt.quant import dynamic_map, quantize_blockwise  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8)

# fp32 NaN bit patterns: quiet and signalling, both signs, with payload bits high and low. The
# rounding's carry turned 0x7FFFFFFF into -0.0 and 0x7F800001-like ones into inf before the fix.
NAN_BITS = [0x7FC00000, 0x7FFFFFFF, 0x7F800001, 0x7FBFFFFF, 0xFFC00000, 0xFFFFFFFF, 0xFF800001, 0x7FFF8000]


def _nans() -> torch.Tensor:
    bits = torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in NAN_BITS], dtype=torch.int32)
    x = bits.view(torch.float32)
    assert torch.isnan(x).all()
    return x


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, round_to(x, DTYPE).to(out_ptr.dtype.element_ty), mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_to_keeps_every_nan_a_nan_and_rounds_like_torch(dtype):
    finite = torch.tensor([1.0, -2.5, 1 + 2**-8, 1 + 3 * 2**-9, 3.0e38, -1e-30, 0.0, -0.0, float("inf"), -float("inf")])
    x = torch.cat([_nans(), finite]).to(DEVICE)
    out = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    tl_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]
    _round_kernel[(1,)](x, out, x.numel(), DTYPE=tl_dtype, BLOCK=32)
    n = len(NAN_BITS)
    assert torch.isnan(out[:n].float()).all()
    want = finite.to(dtype)  # torch rounds to nearest even
    assert torch.equal(out[n:].cpu(), want), (out[n:], want)


def test_nan_gradient_stays_nan_through_the_bf16_moments():
    # a NaN gradient entry makes that moment and the update NaN, whatever its bit pattern
    nans = _nans().to(DEVICE)
    low = torch.ones(len(NAN_BITS), 4, device=DEVICE)
    low[:, 1] = nans
    m = torch.full(low.shape, 0.1, dtype=torch.bfloat16, device=DEVICE)
    v = torch.full(low.shape, 0.01, dtype=torch.bfloat16, device=DEVICE)
    norm = lowrank_adam(low, m, v, step=3, out_dtype=torch.bfloat16, **HYPER)
    for t in (m, v, norm):
        assert torch.isnan(t[:, 1].float()).all()
        assert torch.isfinite(t[:, [0, 2, 3]].float()).all()


@pytest.mark.parametrize("chunk", [256, 512])
def test_elementwise_kernels_in_several_launches_equal_one_launch(monkeypatch, chunk):
    # A tensor of 2^31 elements or more is processed in launches of MAX_LAUNCH_ELEMENTS (32-bit
    # offsets inside each). With a small limit, several launches must give exactly one launch's
    # result: moments, 8-bit codes, absmaxes and the normalized update, bit for bit.
    gen = torch.Generator().manual_seed(0)
    n_rows, n_cols, block = 9, 131, 64  # 1179 elements: a ragged last block and a ragged last launch
    grad = (torch.randn(n_rows, n_cols, generator=gen) * 0.05).to(DEVICE)
    m0 = (torch.randn(n_rows, n_cols, generator=gen) * 0.1).to(DEVICE)
    v0 = (torch.rand(n_rows, n_cols, generator=gen) * 0.01).to(DEVICE)
    signed, unsigned = dynamic_map(True, device=DEVICE), dynamic_map(False, device=DEVICE)
    q0 = [*quantize_blockwise(m0, signed, block), *quantize_blockwise(v0, unsigned, block)]

    def run():
        m, v = m0.clone(), v0.clone()
        norm = lowrank_adam(grad, m, v, step=2, out_dtype=torch.float32, **HYPER)
        mc, ma, vc, va = (t.clone() for t in q0)
        norm8 = fused_adamw8bit(grad, mc.view(grad.shape), ma, vc.view(grad.shape), va, signed, unsigned,
                                step=2, block_size=block, **HYPER)  # fmt: skip
        return m, v, norm, mc, ma, vc, va, norm8

    whole = run()

    class Counting:  # counts the launches of a kernel
        def __init__(self, kernel):
            self.kernel, self.launches = kernel, 0

        def __getitem__(self, grid):
            self.launches += 1
            return self.kernel[grid]

    adam = Counting(galore_adamw.lowrank_adam_kernel)
    q8 = Counting(adamw8bit.adamw8bit_block_kernel)
    monkeypatch.setattr(galore_adamw, "lowrank_adam_kernel", adam)
    monkeypatch.setattr(adamw8bit, "adamw8bit_block_kernel", q8)
    monkeypatch.setattr(configs, "MAX_LAUNCH_ELEMENTS", chunk)
    chunked = run()
    assert adam.launches == q8.launches == -(-grad.numel() // chunk) > 1
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


def test_gemm_addresses_rows_past_2_31_elements():
    # W's rows 2^30 elements apart: row 2 starts at element 2^31, past int32. The buffer is 4 GiB of
    # address space, of which only the touched pages become memory.
    stride = 1 << 30
    base = torch.empty(2 * stride + 16, dtype=torch.bfloat16, device=DEVICE)
    w = base.as_strided((3, 16), (stride, 1))
    gen = torch.Generator().manual_seed(0)
    w.copy_(torch.randn(3, 16, generator=gen).to(torch.bfloat16))
    before = w.clone()
    a = torch.randn(3, 4, generator=gen).to(DEVICE)
    b = torch.randn(4, 16, generator=gen).to(DEVICE)
    project_back_update(w, a, b, alpha=-0.5, decay=0.99)
    want = before.clone()
    project_back_update_reference(want, a, b, alpha=-0.5, decay=0.99)
    assert not torch.equal(w, before)
    torch.testing.assert_close(w.float(), want.float(), rtol=2**-7, atol=2**-7)
    del base


def test_kernels_as_operators_match_the_launchers():
    import galore_opt.kernels.ops  # noqa: F401  (registers torch.ops.galore_opt)

    gen = torch.Generator().manual_seed(3)
    low = torch.randn(6, 40, generator=gen).to(DEVICE)
    m, v = torch.zeros(6, 40, device=DEVICE), torch.zeros(6, 40, device=DEVICE)
    m2, v2 = m.clone(), v.clone()
    n_op = torch.ops.galore_opt.lowrank_adam(low, m, v, 0.9, 0.999, 1e-8, 1.0, torch.float32)
    n_fn = lowrank_adam(low, m2, v2, step=1.0, out_dtype=torch.float32, **HYPER)
    assert torch.equal(n_op, n_fn) and torch.equal(m, m2) and torch.equal(v, v2)

    w = torch.randn(20, 40, generator=gen).to(DEVICE)
    p = torch.linalg.qr(torch.randn(20, 6, generator=gen))[0].to(DEVICE)
    w2 = w.clone()
    torch.ops.galore_opt.project_back_update(w, p, n_op, -0.01, 0.999)
    project_back_update(w2, p, n_op, alpha=-0.01, decay=0.999)
    assert torch.equal(w, w2)

    signed, unsigned = dynamic_map(True, device=DEVICE), dynamic_map(False, device=DEVICE)
    codes = [*quantize_blockwise(torch.zeros(240, device=DEVICE), signed, 16),
             *quantize_blockwise(torch.zeros(240, device=DEVICE), unsigned, 16)]  # fmt: skip
    codes2 = [c.clone() for c in codes]
    g = low.view(-1)
    n8_op = torch.ops.galore_opt.adamw8bit(g, *codes, signed, unsigned, 0.9, 0.999, 1e-8, 1.0, 16, torch.float32)
    n8_fn = fused_adamw8bit(g, *codes2, signed, unsigned, step=1.0, block_size=16, out_dtype=torch.float32, **HYPER)
    assert torch.equal(n8_op, n8_fn)
    assert all(torch.equal(x, y) for x, y in zip(codes, codes2))
    # the all-zero moments of the first step quantize to the zero code with absmax 0 (blocks of
    # zero gradient): the kernel's rule for an all-zero block matches the reference's
    z = torch.zeros(48, device=DEVICE)
    zc = [*quantize_blockwise(z, signed, 16), *quantize_blockwise(z, unsigned, 16)]
    torch.ops.galore_opt.adamw8bit(z, *zc, signed, unsigned, 0.9, 0.999, 1e-8, 1.0, 16, torch.float32)
    want = [*quantize_blockwise(z, signed, 16), *quantize_blockwise(z, unsigned, 16)]
    assert all(torch.equal(x, y) for x, y in zip(zc, want))


def test_operators_trace_under_torch_compile_without_graph_breaks():
    # dynamo traces the operators through their fake implementations (fullgraph: no graph break)
    import galore_opt.kernels.ops  # noqa: F401

    def step(low, m, v, w, p):
        norm = torch.ops.galore_opt.lowrank_adam(low, m, v, 0.9, 0.999, 1e-8, 2.0, torch.float32)
        torch.ops.galore_opt.project_back_update(w, p, norm, -1e-3, 1.0)
        return norm

    gen = torch.Generator().manual_seed(5)
    args = [torch.randn(4, 24, generator=gen), torch.zeros(4, 24), torch.zeros(4, 24), torch.randn(12, 24, generator=gen),
            torch.linalg.qr(torch.randn(12, 4, generator=gen))[0]]  # fmt: skip
    args = [a.to(DEVICE) for a in args]
    eager = [a.clone() for a in args]
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    out = compiled(*args)
    want = step(*eager)
    assert torch.equal(out, want)
    assert all(torch.equal(a, b) for a, b in zip(args, eager))  # the mutations happened alike
