"""GaLoreAdafactor: torch.optim.Adafactor numerics by default, galore-torch's under the flag."""

import io
import warnings

import pytest
import torch

from galore_opt import GaLoreAdafactor, galore_param_groups

SHAPES = [(32, 48), (40, 24)]


def _run(make_opt, proj_type, dtype, steps=30):
    gen = torch.Generator().manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    others = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in [(24,), (6, 5)]]
    opt = make_opt(
        [{"params": mats, "rank": 8, "update_proj_gap": 10, "scale": 0.25, "proj_type": proj_type}, {"params": others}]
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in (*mats, *others):
            p.grad = (torch.randn(p.shape, generator=gen) * (1 + torch.arange(p.shape[-1]) / 10.0)).to(dtype)
        opt.step()
    return [p.detach().clone() for p in (*mats, *others)]


HF_SETTINGS = [
    {},  # galore-torch's defaults: relative step, parameter scaling, no first moment
    {"lr": 1e-3, "relative_step": False, "scale_parameter": False, "beta1": 0.9, "weight_decay": 0.1},
]


@pytest.mark.parametrize("settings", HF_SETTINGS, ids=["relative_step", "external_lr_beta1_wd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_matches_galore_torch_adafactor(proj_type, dtype, settings):
    galore_torch = pytest.importorskip("galore_torch")

    def reference(groups):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return galore_torch.GaLoreAdafactor(groups, **settings)

    expected = _run(reference, proj_type, dtype)
    actual = _run(lambda g: GaLoreAdafactor(g, numerics="galore_torch", **settings), proj_type, dtype)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)  # measured bit-identical: same ops in the same order


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_non_galore_params_follow_torch_adafactor_bit_for_bit(weight_decay):
    gen = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(7, 9), (5,), (3, 4, 6)]]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = GaLoreAdafactor(ours, lr=1e-2, weight_decay=weight_decay)
    b = torch.optim.Adafactor(theirs, lr=1e-2, weight_decay=weight_decay, foreach=False)
    for _ in range(20):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        for key, value in b.state[q].items():
            assert torch.equal(a.state[p][key], value), key


def test_hf_only_options_need_galore_torch_numerics():
    w = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="relative_step=False is a Hugging Face Adafactor option"):
        GaLoreAdafactor([w], lr=1e-3, relative_step=False)
    with pytest.raises(ValueError, match="beta1=0.9"):
        GaLoreAdafactor([w], beta1=0.9)
    with pytest.raises(ValueError, match="cannot be combined with relative_step=True"):
        GaLoreAdafactor([w], lr=1e-3, numerics="galore_torch")
    with pytest.raises(ValueError, match="Invalid decay_rate: 0.5"):
        GaLoreAdafactor([w], decay_rate=0.5)


@pytest.mark.parametrize("numerics", ["torch", "galore_torch"])
def test_adafactor_resume_is_bit_exact_and_weights_only(numerics):
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))

    def train(m, opt, start, steps):
        for t in range(start, start + steps):
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(t))
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()

    def make(m):
        return GaLoreAdafactor(galore_param_groups(m, rank=4, update_proj_gap=5), numerics=numerics)

    m1 = model()
    o1 = make(m1)
    train(m1, o1, 0, 7)
    buf = io.BytesIO()
    torch.save({"m": m1.state_dict(), "o": o1.state_dict()}, buf)
    train(m1, o1, 7, 10)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)
    m2 = model()
    m2.load_state_dict(checkpoint["m"])
    o2 = make(m2)
    o2.load_state_dict(checkpoint["o"])
    train(m2, o2, 7, 10)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
