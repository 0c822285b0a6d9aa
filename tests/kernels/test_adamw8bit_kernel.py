"""The fused 8-bit AdamW kernel against its pure-PyTorch reference.

On CPU this runs in Triton's interpreter: ``make test`` runs this folder with TRITON_INTERPRET=1
(set before the kernel module is imported). On a CUDA machine the same tests run on the GPU.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU: run with TRITON_INTERPRET=1 (make test does)", allow_module_level=True)

from galore_opt.kernels.adamw8bit import fused_adamw8bit, fused_adamw8bit_reference  # noqa: E402
from galore_opt.quant import dynamic_map, quantize_blockwise  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _state(shape, seed, block_size):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=gen) * 0.1
    v = torch.rand(shape, generator=gen) * 0.01
    v.view(-1)[: min(v.numel(), block_size)] = 0.0  # one all-zero block of v
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    mc, ma = quantize_blockwise(m, signed, block_size)
    vc, va = quantize_blockwise(v, unsigned, block_size)
    return [t.to(DEVICE) for t in (mc.view(shape), ma, vc.view(shape), va, signed, unsigned)]


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (16, 16), (5, 300), (33, 65)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [64, 256])
def test_kernel_matches_reference(shape, dtype, block_size):
    gen = torch.Generator().manual_seed(1)
    grad = (torch.randn(shape, generator=gen) * 0.05).to(dtype).to(DEVICE)
    ours = _state(shape, 0, block_size)
    ref = [t.clone() for t in ours]
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, step=3.0, block_size=block_size)
    norm = fused_adamw8bit(grad, *ours, **hyper)
    norm_ref = fused_adamw8bit_reference(grad, *ref, **hyper)
    assert norm.dtype == dtype and norm.shape == shape
    torch.testing.assert_close(norm.float(), norm_ref.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)
    # absmax: the same fp32 max of the same updated moments (up to the update's rounding)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(ours[3], ref[3], rtol=1e-6, atol=0)
    # codes: identical except where the moment lies within rounding of a midpoint of two codes
    for i, code in ((0, ours[4]), (2, ours[5])):
        diff = ours[i].long() - ref[i].long()
        assert diff.abs().max() <= 1
        assert (diff != 0).float().mean() <= 0.01
        del code


def test_bad_buffers_raise():
    grad = torch.zeros(10, device=DEVICE)
    mc, ma, vc, va, s, u = _state((10,), 0, 64)
    with pytest.raises(ValueError, match="m_absmax"):
        fused_adamw8bit(grad, mc, ma[:0], vc, va, s, u, beta1=0.9, beta2=0.999, eps=1e-8, step=1.0, block_size=64)
    with pytest.raises(ValueError, match="power of two"):
        fused_adamw8bit(grad, mc, ma, vc, va, s, u, beta1=0.9, beta2=0.999, eps=1e-8, step=1.0, block_size=100)


def test_optimizer_triton_path_tracks_reference_path():
    from torch import nn

    from galore_opt import GaLoreAdamW8bit, galore_param_groups

    def run(impl):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 48)).to(DEVICE)
        opt = GaLoreAdamW8bit(
            galore_param_groups(model, rank=16, update_proj_gap=5, weight_decay=0.01), lr=1e-2, impl=impl,
            min_8bit_size=64,
        )
        for t in range(8):
            x = torch.randn(16, 32, generator=torch.Generator().manual_seed(t)).to(DEVICE)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        return model, opt

    m_ref, o_ref = run("reference")
    m_tri, o_tri = run("triton")
    # A moment within rounding of a midpoint between two codes may take the other code (one code
    # gap, <= 1.4% of its block's absmax); over 8 steps at lr 1e-2 that moves a weight by < 1e-4.
    for p, q in zip(m_ref.parameters(), m_tri.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4)
        assert set(o_tri.state[q]) == set(o_ref.state[p])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_size_parameter_kernel_slices_track_reference(dtype, monkeypatch):
    """Embedding / head-like parameters: the kernel updates each slice's 8-bit moments; weights and
    every state buffer track the reference path (a moment at a code midpoint may round the other way)."""
    from torch import nn

    from galore_opt import GaLoreAdamW8bit
    from galore_opt import config as C

    monkeypatch.setattr(GaLoreAdamW8bit, "FULL_CHUNK", 512)  # 3 slices, the last one ragged
    torch.manual_seed(0)
    init = torch.randn(23, 59).to(dtype)
    grads = [torch.randn(23, 59).to(dtype) for _ in range(3)]

    def run(impl):
        w = nn.Parameter(init.clone().to(DEVICE))
        opt = GaLoreAdamW8bit([{"params": [w]}], lr=1e-2, weight_decay=0.1, impl=impl, block_size=64, min_8bit_size=0)
        for g in grads:
            w.grad = g.clone().to(DEVICE)
            opt.step()
        return w.detach(), opt.state[w]

    w_ref, s_ref = run("reference")
    w_tri, s_tri = run("triton")
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_tri, w_ref, **tol)
    assert set(s_tri) == set(s_ref)
    for key in (C.EXP_AVG_ABSMAX, C.EXP_AVG_SQ_ABSMAX):
        torch.testing.assert_close(s_tri[key], s_ref[key], rtol=1e-5, atol=1e-9)
    for key in (C.EXP_AVG_CODES, C.EXP_AVG_SQ_CODES):
        differ = (s_tri[key].int() - s_ref[key].int()).abs()
        assert differ.max() <= 1 and (differ > 0).float().mean() < 0.01, key
    assert torch.equal(s_tri[C.STEP], s_ref[C.STEP])
