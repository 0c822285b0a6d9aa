"""GPU-only checks (``gpu`` marker; skipped without CUDA, run by benchmarks/gpu_check.sh)."""

import pytest
import torch

from galore_opt import GaLoreAdamW, GaLoreAdamW8bit, optimizer_state_bytes

pytestmark = pytest.mark.gpu


def _peak_extra(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _param(m, n, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(m, n, device="cuda", generator=g).to(dtype) * 0.02)
    p.grad = (torch.randn(m, n, device="cuda", generator=g) * 1e-3).to(dtype)
    return p


@pytest.mark.parametrize("cls,impl", [(GaLoreAdamW, "triton"), (GaLoreAdamW, "reference"), (GaLoreAdamW8bit, "auto")])
def test_steady_step_peak_extra_memory_is_low_rank(cls, impl):
    """No full-size temporary in a steady GaLore step: the peak above the starting level stays at
    most 1.2x the optimizer state (LLaMA-1B down_proj shape, rank 512, bf16), far below one
    full-size copy of the weight."""
    p = _param(2048, 5461)
    opt = cls([{"params": [p], "rank": 512, "update_proj_gap": 10**6}], lr=1e-3, impl=impl)
    opt.step()  # state and basis
    opt.step()
    peak = _peak_extra(opt.step)
    state = optimizer_state_bytes(opt)
    assert peak <= 1.2 * state, (peak, state)
    assert peak < p.numel() * p.element_size() / 2


def test_8bit_full_size_parameter_updates_in_slices_on_cuda():
    """An embedding-sized parameter with 8-bit moments: the step's temporaries are slice-sized."""
    p = _param(32000, 1024)
    opt = GaLoreAdamW8bit([p], lr=1e-3)
    opt.step()
    peak = _peak_extra(opt.step)
    assert peak < 64 * 2**20, peak  # fp32 temporaries of one 2**20-element slice, not of 32.8M elements


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_and_reference_agree_on_cuda_at_layer_shapes(dtype):
    ps = [_param(2048, 5461, dtype, seed=1), _param(2048, 5461, dtype, seed=1)]
    opts = [
        GaLoreAdamW([{"params": [ps[0]], "rank": 128, "update_proj_gap": 3}], lr=1e-3, impl="reference"),
        GaLoreAdamW([{"params": [ps[1]], "rank": 128, "update_proj_gap": 3}], lr=1e-3, impl="triton"),
    ]
    for _ in range(5):
        for o in opts:
            o.step()
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(ps[1].float(), ps[0].float(), **tol)


def test_memory_estimate_matches_cuda_peak():
    """The estimator against torch.cuda.max_memory_allocated for a small LLaMA, 8-bit layer-wise."""
    pytest.importorskip("transformers")
    from galore_opt import galore_param_groups
    from galore_opt.layerwise import LayerwiseOptimizer
    from galore_opt.memory import estimate_memory
    from galore_opt.toy import build_llama, llama_config

    config = llama_config("60m", 32000)
    model = build_llama(config).to("cuda", torch.bfloat16)
    opt = LayerwiseOptimizer(GaLoreAdamW8bit(galore_param_groups(model, rank=128), lr=1e-3))
    x = torch.randint(0, 32000, (4, 256), device="cuda")

    def steps():
        for _ in range(3):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    steps()
    measured = torch.cuda.max_memory_allocated()
    est = estimate_memory(config, "galore-adamw8bit", layerwise=True, batch=4, seq=256, rank=128, device="cuda")
    assert est.total == pytest.approx(measured, rel=0.10), (est.total / 2**20, measured / 2**20)
