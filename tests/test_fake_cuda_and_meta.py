"""The CUDA code path without a GPU, and every optimizer on meta tensors.

* Fake CUDA (``FakeTensorMode``): parameters and gradients are ``device="cuda"`` tensors without
  storage, on this CPU-only torch. Each optimizer's step at LLaMA-7B layer shapes, bf16 and fp32,
  goes through the fused path (the kernels' operators ``torch.ops.galore_opt.*`` run, once per
  GaLore matrix) and never reads a device value on the host: not on the first step (every basis
  built), not on a steady one, not on a warm refresh (a non-finite gradient keeps the old basis by
  a device-side select, not by a Python branch). The layer-wise per-parameter update too.
* ``meta``: every optimizer and the layer-wise wrapper run forward, backward and the update on meta
  parameters (deferred initialization, FSDP's meta-device flow and memory tools need it).
"""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from galore_opt import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from galore_opt import config as C
from galore_opt.kernels import kernel_available
from galore_opt.layerwise import LayerwiseOptimizer
from galore_opt.testing.dispatch import OpRecorder

# one LLaMA-7B decoder layer (q, k, v, o, gate, up, down), its norms, the embedding and the head
HIDDEN, INTER, VOCAB = 4096, 11008, 32000
MATRICES = [(HIDDEN, HIDDEN)] * 4 + [(INTER, HIDDEN)] * 2 + [(HIDDEN, INTER)]
FUSED = {GaLoreAdamW: "galore_opt.lowrank_adam.default", GaLoreAdamW8bit: "galore_opt.adamw8bit.default"}


def _fake_model(dtype):
    matrices = [torch.empty(shape, device="cuda", dtype=dtype) for shape in MATRICES]
    others = [torch.empty(VOCAB, HIDDEN, device="cuda", dtype=dtype), torch.empty(VOCAB, HIDDEN, device="cuda", dtype=dtype),
              torch.empty(HIDDEN, device="cuda", dtype=dtype), torch.empty(HIDDEN, device="cuda", dtype=dtype)]  # fmt: skip
    return matrices, others


def _set_grads(params):
    for p in params:
        p.grad = torch.empty_like(p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor])
def test_cuda_step_on_fake_tensors_is_fused_and_never_syncs(cls, dtype):
    fused = cls in FUSED and kernel_available("galore_adamw")
    with FakeTensorMode():
        matrices, others = _fake_model(dtype)
        opt = cls(
            [{"params": matrices, "rank": 1024, "update_proj_gap": 2, "stagger_refresh": False}, {"params": others}],
            lr=1e-3,
        )
        # step 0: cold refresh of every basis; 1: steady; 2: warm refresh; 3: steady
        for step in range(4):
            _set_grads(matrices + others)
            with OpRecorder() as rec:
                opt.step()
            assert rec.syncs == [], f"step {step} synchronizes: {rec.syncs[:5]}"
            if fused:
                ops = rec.custom_ops()
                # one per GaLore matrix; 8-bit: also one per slice of each full-size 8-bit parameter
                slices = sum(-(-p.numel() // opt.FULL_CHUNK) for p in others) if cls is GaLoreAdamW8bit else 0
                assert ops[FUSED[cls]] == len(MATRICES) + slices, ops
                assert ops["galore_opt.project_back_update.default"] == len(MATRICES), ops
        for p in matrices:
            state = opt.state[p]
            basis = state.get(C.BASIS_LEFT, state.get(C.BASIS_RIGHT))
            assert basis.device.type == "cuda" and 1024 in basis.shape


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor])
def test_layerwise_per_parameter_update_on_fake_cuda_never_syncs(cls):
    with FakeTensorMode():
        matrices, others = _fake_model(torch.bfloat16)
        opt = cls([{"params": matrices, "rank": 512, "update_proj_gap": 2}, {"params": others}], lr=1e-3)
        for step in range(3):
            for p in matrices + others:  # what the wrapper's hook does as each gradient arrives
                p.grad = torch.empty_like(p)
                with OpRecorder() as rec:
                    if cls is GaLoreAdafactor:  # no step_param: the wrapper steps it for p alone
                        LayerwiseOptimizer._step_only(opt, p)
                    else:
                        opt.step_param(p)
                assert rec.syncs == [], f"step {step}: {rec.syncs[:5]}"
                if cls in FUSED and p.dim() == 2 and p.shape in MATRICES and kernel_available("galore_adamw"):
                    assert rec.custom_ops().get("galore_opt.project_back_update.default") == 1
                p.grad = None


def _meta_model():
    torch.manual_seed(0)
    emb = nn.Embedding(5000, 64, device="meta")
    body = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.LayerNorm(64)).to("meta")
    head = nn.Linear(64, 5000, bias=False, device="meta")
    model = nn.ModuleDict({"emb": emb, "body": body, "head": head})
    matrices = [body[0].weight, body[2].weight]
    others = [p for p in model.parameters() if all(p is not m for m in matrices)]
    return model, matrices, others


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor])
def test_every_optimizer_runs_on_meta(cls, layerwise, impl):
    # "auto" on meta takes the fused operators (their fake implementations: the GPU's path) when
    # Triton is installed; "reference" the plain PyTorch path
    model, matrices, others = _meta_model()
    opt = cls([{"params": matrices, "rank": 16, "update_proj_gap": 2}, {"params": others}], lr=1e-3, impl=impl)
    if layerwise:
        opt = LayerwiseOptimizer(opt, accumulation_steps=2)
    tokens = torch.zeros(4, 8, dtype=torch.long, device="meta")
    for _ in range(6):  # three updates with layer-wise accumulation; refreshes on 0 and 2
        h = model["body"](model["emb"](tokens))
        model["head"](h).float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    inner = opt.optimizers[0] if layerwise else opt
    for p in matrices:
        state = inner.state[p]
        assert state[C.STEP].item() == (3 if layerwise else 6)
        basis = state.get(C.BASIS_LEFT, state.get(C.BASIS_RIGHT))
        assert basis.device.type == "meta" and 16 in basis.shape
        assert all(t.device.type in ("meta", "cpu") for t in state.values())
    if layerwise:
        assert opt.grad_norm != opt.grad_norm  # NaN: meta tensors hold no values to read
        opt.remove_hooks()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_cuda_step_on_fake_tensors_never_syncs(dtype):
    """``foreach=True`` groups on CUDA too (instead of the per-matrix kernels): shape groups q/k/v/o
    and gate/up (down is alone: per matrix), no host sync on a cold, steady, refresh or steady
    step."""
    with FakeTensorMode():
        matrices, others = _fake_model(dtype)
        opt = GaLoreAdamW(
            [{"params": matrices, "rank": 1024, "update_proj_gap": 2, "stagger_refresh": False}, {"params": others}],
            lr=1e-3,
            foreach=True,
        )
        for step in range(4):
            _set_grads(matrices + others)
            with OpRecorder() as rec:
                opt.step()
            assert rec.syncs == [], f"step {step} synchronizes: {rec.syncs[:5]}"
            if step in (1, 2):  # steady and warm refresh (deferred after the grouped update)
                # 7B matrices are above BATCHED_GEMM_MAX_ELEMENTS: one GEMM each into the group's
                # stacked projected gradient, the update accumulated into each weight
                assert rec.counts["aten.addmm_.default"] == 6, rec.counts
                # the lone down_proj stays per matrix: the fused kernels
                assert rec.custom_ops()["galore_opt.project_back_update.default"] == 1, rec.counts
