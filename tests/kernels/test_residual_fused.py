"""The fused path with residual compensation (the Triton low-rank Adam kernel and up-projection,
then the residual term in torch ops) against the reference path.

On CPU this runs in Triton's interpreter (``make test`` sets TRITON_INTERPRET=1 for this folder);
on a CUDA machine the same tests run on the GPU.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU: run with TRITON_INTERPRET=1 (make test does)", allow_module_level=True)

from galore_opt import GaLoreAdamW, GaLoreAdamW8bit  # noqa: E402
from galore_opt import config as C  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["left", "right"])
def test_fused_residual_tracks_reference(cls, shape):
    """7 steps over two refreshes, weight decay on, fp32: weights, moments and the limiter's
    scalar of impl='triton' against impl='reference'."""
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) * (1 + t % 3) for t in range(7)]

    def run(impl):
        w = torch.nn.Parameter(init.clone().to(DEVICE))
        group = {"params": [w], "rank": 6, "update_proj_gap": 3, "weight_decay": 0.1, "residual": True}
        extra = {"min_8bit_size": 64} if cls is GaLoreAdamW8bit else {}
        opt = cls([group], lr=1e-2, impl=impl, **extra)
        for g in grads:
            w.grad = g.clone().to(DEVICE)
            opt.step()
        return w.detach(), opt.state[w]

    w_ref, s_ref = run("reference")
    w_tri, s_tri = run("triton")
    assert set(s_tri) == set(s_ref) and C.RESIDUAL_NORM in s_ref
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_tri, w_ref, **tol)
    torch.testing.assert_close(s_tri[C.RESIDUAL_NORM], s_ref[C.RESIDUAL_NORM], **tol)
    for key in (C.EXP_AVG, C.EXP_AVG_SQ):
        if key in s_ref:
            torch.testing.assert_close(s_tri[key], s_ref[key], **tol)
