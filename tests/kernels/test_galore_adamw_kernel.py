"""The fused GaLore-AdamW kernels against their pure-PyTorch references, and the optimizer's
Triton path against its reference path.

On CPU this runs in Triton's interpreter (``make test`` sets TRITON_INTERPRET=1 for this folder);
on a CUDA machine the same tests run on the GPU (``benchmarks/gpu_check.sh``).
"""

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU: run with TRITON_INTERPRET=1 (make test does)", allow_module_level=True)

from galore_opt.kernels.galore_adamw import (  # noqa: E402
    lowrank_adam,
    lowrank_adam_reference,
    project_back_update,
    project_back_update_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8)


def _rand(shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


def _assert_moments_close(got, want, dtype):
    if dtype == torch.float32:  # a few ulps of the tensor's scale (lerp/fma contraction differ)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=4 * 2**-23 * float(want.abs().max()))
    else:  # rounded to bf16 after every op as the reference does: at most one ulp apart
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-30)
        assert (got != want).float().mean() < 0.01


def _assert_within_ulps(got, want, ulps, magnitude=None):
    """Elementwise: |got - want| <= ulps * (bf16 spacing at ``magnitude``, default max(|got|, |want|))."""
    g, w = got.float(), want.float()
    mag = torch.maximum(g.abs(), w.abs()) if magnitude is None else magnitude.float()
    mag = mag.clamp_min(2.0**-126)
    spacing = torch.exp2(torch.floor(torch.log2(mag)) - 7)
    bad = (g - w).abs() > ulps * spacing
    assert not bad.any(), f"{int(bad.sum())} elements more than {ulps} ulps apart, e.g. {g[bad][:3]} vs {w[bad][:3]}"


@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (7, 1), (5, 300), (33, 65)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowrank_adam_matches_reference(shape, dtype):
    m0 = _rand(shape, 1, dtype, 0.1)
    v0 = _rand(shape, 2, dtype, 0.1).square()
    v0.view(-1)[0] = 0  # sqrt(0): the eps branch
    ms, vs = (m0.clone(), m0.clone()), (v0.clone(), v0.clone())
    for step in (1, 2, 7):
        low = _rand(shape, 10 + step, torch.float32)
        n_tri = lowrank_adam(low, ms[0], vs[0], step=step, out_dtype=torch.float32, **HYPER)
        n_ref = lowrank_adam_reference(low, ms[1], vs[1], step=step, out_dtype=torch.float32, **HYPER)
        _assert_moments_close(ms[0], ms[1], dtype)
        _assert_moments_close(vs[0], vs[1], dtype)
        _assert_moments_close(n_tri.to(dtype), n_ref.to(dtype), dtype)
        assert n_tri.dtype == n_ref.dtype == torch.float32 and n_tri.shape == shape
        ms = (ms[1].clone(), ms[1])  # continue both from the reference's state
        vs = (vs[1].clone(), vs[1])


def test_lowrank_adam_rejects_bad_buffers():
    low = _rand((4, 6), 0)
    with pytest.raises(ValueError, match="exp_avg"):
        lowrank_adam(low, torch.zeros(4, 5, device=DEVICE), torch.zeros(4, 6, device=DEVICE), step=1, **HYPER)
    with pytest.raises(ValueError, match="contiguous"):
        lowrank_adam(low, torch.zeros(6, 4, device=DEVICE).t(), torch.zeros(4, 6, device=DEVICE), step=1, **HYPER)
    with pytest.raises(ValueError, match="share a dtype"):
        lowrank_adam(
            low,
            torch.zeros(4, 6, device=DEVICE),
            torch.zeros(4, 6, device=DEVICE, dtype=torch.bfloat16),
            step=1,
            **HYPER,
        )


# (m, n, rank): ragged sizes, rank 1, rank = min dim
SHAPES = [(17, 23, 1), (40, 24, 8), (24, 40, 24), (33, 65, 33), (64, 48, 16)]


@pytest.mark.parametrize("m,n,r", SHAPES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("w_dtype,ab_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32)])  # fmt: skip
def test_project_back_update_matches_reference(m, n, r, side, w_dtype, ab_dtype):
    w0 = _rand((m, n), 0, w_dtype)
    basis = torch.linalg.qr(_rand((max(m, n), r), 1))[0]
    if side == "left":  # W += alpha * P N, P (m x r), N (r x n)
        a, b = basis[:m].contiguous().to(ab_dtype), _rand((r, n), 2, ab_dtype)
    else:  # W += alpha * N Q, N (m x r), Q (r x n)
        a, b = _rand((m, r), 2, ab_dtype), basis[:n].t().contiguous().to(ab_dtype)
    w_tri, w_ref = w0.clone(), w0.clone()
    kw = dict(alpha=-0.37, decay=1 - 1e-2 * 0.1)
    project_back_update(w_tri, a, b, **kw)
    project_back_update_reference(w_ref, a, b, **kw)
    if w_dtype == torch.float32:
        torch.testing.assert_close(w_tri, w_ref, rtol=1e-5, atol=1e-6)
    else:  # one bf16 rounding (kernel) against two or three (reference: W * decay, the product,
        # the sum): at most two ulps of the operands' magnitude apart (a sum near zero cancels)
        operands = torch.maximum(w0.float().abs(), (kw["alpha"] * (a.float() @ b.float())).abs())
        _assert_within_ulps(w_tri, w_ref, 2, operands)
    assert w_tri.dtype == w_dtype


def test_project_back_update_strided_weight_and_no_decay():
    w0 = _rand((24, 40), 0)
    a, b = _rand((40, 5), 1), _rand((5, 24), 2)
    w_tri, w_ref = w0.clone(), w0.clone()
    project_back_update(w_tri.t(), a, b, alpha=0.5)  # writes through a transposed view
    project_back_update_reference(w_ref.t(), a, b, alpha=0.5)
    torch.testing.assert_close(w_tri, w_ref, rtol=1e-5, atol=1e-6)


def test_project_back_update_rejects_bad_shapes():
    w = torch.zeros(4, 6, device=DEVICE)
    with pytest.raises(ValueError, match="do not chain"):
        project_back_update(w, torch.zeros(4, 2, device=DEVICE), torch.zeros(3, 6, device=DEVICE), alpha=1.0)
    with pytest.raises(ValueError, match="share a dtype"):
        project_back_update(
            w, torch.zeros(4, 2, device=DEVICE), torch.zeros(2, 6, device=DEVICE, dtype=torch.bfloat16), alpha=1.0
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,rank,proj_type",
    [((24, 40), 6, "std"), ((40, 24), 6, "std"), ((24, 40), 6, "reverse_std"), ((17, 23), 1, "std"),
     ((16, 24), 16, "std")],
)  # fmt: skip
def test_optimizer_triton_path_tracks_reference_path(dtype, shape, rank, proj_type):
    """GaLoreAdamW with impl='triton' against impl='reference' over 7 steps and two refreshes:
    weights and every state buffer (moments, basis, step)."""
    from galore_opt import GaLoreAdamW
    from galore_opt import config as C

    init = _rand(shape, 0, dtype)
    grads = [_rand(shape, 10 + t, dtype) for t in range(7)]

    def run(impl):
        w = torch.nn.Parameter(init.clone())
        group = {"params": [w], "rank": rank, "update_proj_gap": 3, "proj_type": proj_type, "weight_decay": 0.1}
        opt = GaLoreAdamW([group], lr=1e-2, impl=impl)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        return w.detach(), opt.state[w]

    w_ref, s_ref = run("reference")
    w_tri, s_tri = run("triton")
    assert set(s_tri) == set(s_ref)
    if dtype == torch.float32:
        tol = dict(rtol=1e-4, atol=1e-5)
    else:
        tol = dict(rtol=3e-2, atol=3e-2)  # bf16: roundings of one GEMM differ, over 7 steps
    torch.testing.assert_close(w_tri.float(), w_ref.float(), **tol)
    for key in (C.EXP_AVG, C.EXP_AVG_SQ, C.BASIS_LEFT, C.BASIS_RIGHT):
        if key in s_ref:
            torch.testing.assert_close(s_tri[key].float(), s_ref[key].float(), **tol)
    assert torch.equal(s_tri[C.STEP], s_ref[C.STEP])


def test_optimizer_triton_path_handles_layerwise_low_rank_accumulation():
    """The projected gradient handed over by the layer-wise wrapper goes through the kernels too."""
    from galore_opt import GaLoreAdamW
    from galore_opt.layerwise import LayerwiseOptimizer

    def run(impl):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)).to(DEVICE)
        groups = [
            {"params": [model[0].weight, model[2].weight], "rank": 4, "update_proj_gap": 4},
            {"params": [model[0].bias, model[2].bias]},
        ]
        opt = LayerwiseOptimizer(GaLoreAdamW(groups, lr=1e-2, impl=impl), accumulation_steps=2)
        for t in range(8):
            x = torch.randn(6, 24, generator=torch.Generator().manual_seed(t)).to(DEVICE)
            (model(x).square().mean() / 2).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach() for p in model.parameters()]

    for p, q in zip(run("reference"), run("triton"), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_path_agrees_with_the_per_matrix_paths(dtype):
    """Three matrices of one shape, 5 steps with a refresh: the grouped step (``foreach=True``,
    chosen over the per-matrix kernels) against the per-matrix reference (bit for bit on the CPU
    from the same first step, where bmm runs mm per matrix) and the per-matrix Triton path (the
    kernels' tolerance)."""
    from galore_opt import GaLoreAdamW

    inits = [_rand((32, 48), i, dtype) for i in range(3)]

    def run(impl, foreach):
        ws = [torch.nn.Parameter(t.clone()) for t in inits]
        opt = GaLoreAdamW([{"params": ws, "rank": 4, "update_proj_gap": 3}], lr=1e-2, weight_decay=0.1, impl=impl,
                          foreach=foreach)  # fmt: skip
        for t in range(5):
            for i, w in enumerate(ws):
                w.grad = _rand((32, 48), 100 + 10 * t + i, dtype)
            opt.step()
        return [w.detach() for w in ws]

    # "auto": the steps that stay per matrix (the first one, builds the state) take the kernels
    grouped, grouped_ref = run("auto", True), run("reference", True)
    reference, fused = run("reference", False), run("triton", False)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for g, gr, r, f in zip(grouped, grouped_ref, reference, fused):
        if DEVICE == "cpu":
            assert torch.equal(gr, r)
        else:
            torch.testing.assert_close(gr.float(), r.float(), **tol)
        torch.testing.assert_close(g.float(), f.float(), **tol)
        torch.testing.assert_close(g.float(), r.float(), **tol)
