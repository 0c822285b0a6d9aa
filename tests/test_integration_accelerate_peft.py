"""accelerate (prepare, bf16 mixed precision, save/load state) and PEFT models with galore-opt."""

import copy

import pytest
import torch

from galore_opt import GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups
from galore_opt.layerwise import LayerwiseOptimizer
from galore_opt.toy import build_llama, llama_config

VOCAB = 64


def _model():
    cfg = llama_config("tiny", VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)  # fmt: skip
    return build_llama(cfg, seed=0)


def _data(n=64, seq=16):
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(seq)) % VOCAB


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps a process-wide state: an earlier Trainer test set it up without bf16."""
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(reset_partial_state=True)
    yield
    state.AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("layerwise", [False, True])
def test_accelerate_prepare_bf16_trains_and_round_trips_state(tmp_path, layerwise, fresh_accelerate_state):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    model = _model()
    opt = GaLoreAdamW8bit(galore_param_groups(model, rank=4, update_proj_gap=5), lr=3e-3)
    if layerwise:
        opt = LayerwiseOptimizer(opt)
    loader = torch.utils.data.DataLoader(_data(), batch_size=8, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    losses = []
    for _ in range(3):
        for x in loader:
            with accelerator.autocast():
                loss = model(input_ids=x, labels=x).loss
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert sum(losses[-4:]) < 0.85 * sum(losses[:4])
    accelerator.save_state(str(tmp_path / "state"))
    before = copy.deepcopy(opt.state_dict())
    # disturb, then load: every state tensor comes back
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    if not layerwise:
        opt.step()
    accelerator.load_state(str(tmp_path / "state"))
    after = opt.state_dict()
    inner_b = before["optimizers"][0] if layerwise else before
    inner_a = after["optimizers"][0] if layerwise else after
    assert inner_b["state"].keys() == inner_a["state"].keys()
    for pid, st in inner_b["state"].items():
        for key, value in st.items():
            assert torch.equal(inner_a["state"][pid][key], value), (pid, key)


def test_galore_on_the_trainable_parameters_of_a_peft_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _model(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    groups = galore_param_groups(model, target_modules=["lora_"], rank=4, update_proj_gap=5)
    galore_params = groups[0]["params"]
    assert galore_params and all(p.requires_grad for p in galore_params)
    assert len(galore_params) == 2 * 2 * 2  # lora_A and lora_B of q and v, two layers
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable  # nothing frozen is optimized
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = GaLoreAdamW(groups, lr=1e-2)
    x = _data()[:16]
    losses = []
    for _ in range(15):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    assert any(len(opt.state[p]) and ("basis_left" in opt.state[p] or "basis_right" in opt.state[p])
               for p in galore_params)  # fmt: skip
