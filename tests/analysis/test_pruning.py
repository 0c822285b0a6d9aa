import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from galore_opt import GaLoreAdamW, galore_param_groups
from galore_opt.analysis.graphs import layer_graph
from galore_opt.analysis.pruning import (
    PAI_METHODS,
    MaskKeeper,
    apply_masks,
    erk_densities,
    grasp_scores,
    iterative_magnitude_pruning,
    magnitude_scores,
    mask_density,
    masks_from_scores,
    prune_at_init,
    snip_scores,
    synflow_scores,
    to_torch_prune,
)

TARGETS = ["0", "2"]  # the two hidden Linear layers of mlp(); the 4-output head is left dense


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 5)
    )


def data(n=16, in_shape=(12,), classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *in_shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def count(masks):
    return sum(int(m.count_nonzero()) for m in masks.values())


@pytest.mark.parametrize("method", PAI_METHODS)
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_every_method_hits_exact_density_library_convention(method, scope):
    model = cnn()
    x, y = data(8, (1, 6, 6), 5)
    density = 0.137
    masks = prune_at_init(
        model, method, density, scope=scope, data=[(x, y)], input_shape=(1, 6, 6), rounds=5, convention="library"
    )
    sizes = {n: m.numel() for n, m in masks.items()}
    total = sum(sizes.values())
    assert all(m.dtype == torch.bool for m in masks.values())
    if scope == "layerwise" and method != "erk":
        for n, m in masks.items():
            assert int(m.count_nonzero()) == math.floor(density * sizes[n] + 0.5)
    else:
        assert count(masks) == math.floor(density * total + 0.5)
    apply_masks(model, masks)
    nonzero = sum(int(mod.weight.count_nonzero()) for mod in model if isinstance(mod, (nn.Linear, nn.Conv2d)))
    assert nonzero == count(masks)


def test_ties_keep_earlier_entries():
    scores = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    masks = masks_from_scores(scores, 0.5)  # 5 of 10 kept, all tied
    flat = torch.cat([masks["a"].flatten(), masks["b"]])
    assert flat.tolist() == [True] * 5 + [False] * 5
    nan_scores = {"a": torch.tensor([float("nan"), 1.0, 2.0])}
    assert masks_from_scores(nan_scores, 2 / 3)["a"].tolist() == [False, True, True]


def test_snip_equals_finite_differences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    scores = snip_scores(model, batches)
    brute, h = {}, 1e-6
    for name in ("0", "2"):
        w = model.get_submodule(name).weight
        s = torch.zeros_like(w)
        for idx in torch.cartesian_prod(*[torch.arange(k) for k in w.shape]):
            i = tuple(idx.tolist())
            diffs = []
            for sign in (1, -1):
                with torch.no_grad():
                    w[i] += sign * h
                    diffs.append(sum(F.cross_entropy(model(bx), by) for bx, by in batches))
                    w[i] -= sign * h
            s[i] = abs(w[i].item() * (diffs[0] - diffs[1]).item() / (2 * h))
        brute[name] = s
    total = sum(s.sum() for s in brute.values())
    for name in brute:
        assert torch.allclose(scores[name], brute[name] / total, rtol=1e-5, atol=1e-9)


def test_synflow_equals_closed_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    scores = synflow_scores(model, (5,))
    w1, b1 = model[0].weight.detach().double().abs(), model[0].bias.detach().double().abs()
    w2 = model[2].weight.detach().double().abs()
    # R = 1^T (|W2| (|W1| 1 + |b1|) + |b2|): dR/dW1_ij = colsum(|W2|)_i, dR/dW2_ki = h_i
    hidden = w1.sum(1) + b1
    assert torch.allclose(scores["0"].double(), w1 * w2.sum(0)[:, None], rtol=1e-6)
    assert torch.allclose(scores["2"].double(), w2 * hidden[None, :], rtol=1e-6)
    # iterative: pruned weights never come back
    masks = prune_at_init(model, "synflow", 0.3, input_shape=(5,), rounds=100, convention="library")
    assert count(masks) == math.floor(0.3 * 32 + 0.5)


def test_grasp_equals_autograd_hessian_vector_product():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    scores = grasp_scores(model, [(x, y)], temperature=200.0, convention="library")
    w1, w2 = model[0].weight.detach(), model[2].weight.detach()
    b1, b2 = model[0].bias.detach(), model[2].bias.detach()

    def loss(a, b):
        return F.cross_entropy((torch.tanh(x @ a.t() + b1) @ b.t() + b2) / 200.0, y)

    g = torch.autograd.grad(loss(w1.requires_grad_(), w2.requires_grad_()), (w1, w2))
    _, hg = torch.autograd.functional.hvp(loss, (w1.detach(), w2.detach()), g)
    raw = [w1.detach() * hg[0], w2.detach() * hg[1]]
    total = abs(sum(r.sum() for r in raw))
    assert torch.allclose(scores["0"], raw[0] / total, rtol=1e-6)
    assert torch.allclose(scores["2"], raw[1] / total, rtol=1e-6)


def test_erk_densities_proportional_and_capped():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(100, 80), nn.Linear(80, 60), nn.Conv2d(3, 8, 3))
    d = erk_densities(model, 0.2)
    assert d["0"] == 1.0  # capped
    raw = {"1": (100 + 80) / 8000, "2": (80 + 60) / 4800, "3": (8 + 3 + 3 + 3) / (8 * 3 * 9)}
    assert d["1"] / d["2"] == pytest.approx(raw["1"] / raw["2"])
    assert d["3"] / d["2"] == pytest.approx(raw["3"] / raw["2"])
    sizes = {"0": 16, "1": 8000, "2": 4800, "3": 216}
    assert sum(d[n] * sizes[n] for n in sizes) == pytest.approx(0.2 * sum(sizes.values()))
    masks = prune_at_init(model, "erk", 0.2)
    assert masks["0"].all()
    assert count(masks) == math.floor(0.2 * sum(sizes.values()) + 0.5)
    for n in ("1", "2", "3"):
        assert abs(int(masks[n].count_nonzero()) - d[n] * sizes[n]) <= 1


def _train(model, masks, opt, steps=20, keeper=True):
    k = MaskKeeper(model, masks, opt) if keeper else None
    x, y = data(32)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if k is not None:
            assert k.max_pruned_magnitude() == 0.0
    return k


@pytest.mark.parametrize("method", PAI_METHODS)
def test_masks_survive_galore_adamw(method):
    model = mlp()
    masks = prune_at_init(model, method, 0.2, data=[data(16)], input_shape=(12,), rounds=4)
    opt = GaLoreAdamW(galore_param_groups(model, TARGETS, rank=4, update_proj_gap=5, weight_decay=0.1), lr=1e-2)
    keeper = _train(model, masks, opt)
    for n, m in masks.items():
        w = model.get_submodule(n).weight
        assert torch.count_nonzero(w[~m]) == 0
    assert mask_density(masks) == pytest.approx(count(masks) / sum(m.numel() for m in masks.values()))
    keeper.remove()


def test_masks_survive_torch_adamw_and_galore_breaks_them_without_keeper():
    model = mlp()
    masks = prune_at_init(model, "magnitude", 0.3)
    _train(model, masks, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    assert all(torch.count_nonzero(model.get_submodule(n).weight[~m]) == 0 for n, m in masks.items())
    # the control: GaLore's dense low-rank update refills pruned weights when nothing re-applies the mask
    model = mlp()
    apply_masks(model, masks)
    opt = GaLoreAdamW(galore_param_groups(model, TARGETS, rank=4, update_proj_gap=5), lr=1e-2)
    _train(model, masks, opt, steps=3, keeper=False)
    assert torch.count_nonzero(model[2].weight[~masks["2"]]) > 0


def test_torch_prune_reparametrization_and_keeper():
    model = mlp()
    masks = prune_at_init(model, "random", 0.25, generator=torch.Generator().manual_seed(0))
    to_torch_prune(model, masks)
    assert torch.equal(layer_graph(model[0]).biadjacency.bool(), masks["0"].t())
    # galore_param_groups reads module.weight, which the reparametrization turns into a non-leaf
    hidden = [model[0].weight_orig, model[2].weight_orig]
    rest = [p for p in model.parameters() if all(p is not q for q in hidden)]
    opt = GaLoreAdamW([{"params": hidden, "rank": 4, "update_proj_gap": 5}, {"params": rest}], lr=1e-2)
    keeper = _train(model, masks, opt, steps=5)
    assert torch.count_nonzero(model[2].weight_orig[~masks["2"]]) == 0
    keeper.remove()


def test_iterative_magnitude_pruning_with_rewinding():
    model = mlp()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    rounds = []

    def train_fn(m, masks):
        rounds.append(mask_density(masks))
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        _train(m, masks, opt, steps=3)

    masks = iterative_magnitude_pruning(model, train_fn, density=0.5)
    assert len(rounds) == math.ceil(math.log(0.5) / math.log(0.8))  # 4 rounds: 1, .8, .64, .512
    assert rounds[0] == 1.0 and rounds[1] == pytest.approx(0.8, abs=1e-3)
    total = sum(m.numel() for m in masks.values())
    assert count(masks) == math.floor(0.5 * total + 0.5)
    for n, m in masks.items():
        w = model.get_submodule(n).weight
        assert torch.equal(w[m], init[f"{n}.weight"][m])  # rewound
        assert torch.count_nonzero(w[~m]) == 0
    # magnitude after training decided the mask: it differs from pruning the initial magnitudes
    assert any(not torch.equal(masks[n], masks_from_scores(magnitude_scores(mlp()), 0.5)[n]) for n in masks)


def test_validation_errors_name_the_value():
    model = mlp()
    with pytest.raises(ValueError, match="1.5"):
        prune_at_init(model, "magnitude", 1.5)
    with pytest.raises(ValueError, match="'foo'"):
        prune_at_init(model, "foo", 0.5)
    with pytest.raises(ValueError, match="'local'"):
        prune_at_init(model, "magnitude", 0.5, scope="local")
    with pytest.raises(ValueError, match="input_shape"):
        prune_at_init(model, "synflow", 0.5)
    with pytest.raises(ValueError, match="needs data"):
        prune_at_init(model, "snip", 0.5)
    with pytest.raises(ValueError, match="'nope'"):
        MaskKeeper(model, {"nope": torch.ones(2)})


# --- the authors' conventions (default) ----------------------------------------------------------


def test_synflow_one_round_keeps_n_minus_int_of_the_pruned_fraction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))  # 32 weights
    scores = synflow_scores(model, (5,))
    flat = torch.cat([scores["0"].flatten(), scores["2"].flatten()])
    assert flat.unique().numel() == 32  # no ties
    # d n = 10.24: Synaptic-Flow prunes k = int(0.68 * 32) = 21, keeps 11; the exact rule keeps 10
    authors = prune_at_init(model, "synflow", 0.32, input_shape=(5,), rounds=1)
    library = prune_at_init(model, "synflow", 0.32, input_shape=(5,), rounds=1, convention="library")
    assert count(authors) == 32 - int((1.0 - 0.32) * 32) == 11
    assert count(library) == 10
    top = torch.cat([authors["0"].flatten(), authors["2"].flatten()])
    assert torch.equal(top, flat >= flat.sort(descending=True).values[10])
    # per layer ("layerwise" = Synaptic-Flow's local mask): k = int(0.68 * 20) = 13, int(0.68 * 12) = 8
    local = prune_at_init(model, "synflow", 0.32, input_shape=(5,), rounds=1, scope="layerwise")
    assert int(local["0"].sum()) == 7 and int(local["2"].sum()) == 4


def test_synaptic_flow_rule_drops_ties_at_the_threshold_and_keeps_pruned_weights_pruned():
    scores = {"a": torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0])}
    # k = int(0.4 * 5) = 2, kthvalue = 2: every 2 is pruned, one weight kept
    assert masks_from_scores(scores, 0.6, rule="synaptic_flow")["a"].tolist() == [False] * 4 + [True]
    # k < 1: nothing pruned
    assert masks_from_scores(scores, 0.9, rule="synaptic_flow")["a"].all()
    # SynFlow over rounds: a weight pruned once has score 0 and never comes back
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    previous = None
    for rounds in (1, 2, 3):
        masks = prune_at_init(model, "synflow", 0.25 ** (rounds / 3), input_shape=(6,), rounds=1)
        if previous is not None:
            assert count(masks) <= count(previous)
        previous = masks
    many = prune_at_init(model, "synflow", 0.25, input_shape=(6,), rounds=10)
    n = sum(m.numel() for m in many.values())
    assert count(many) <= n - int((1.0 - 0.25) * n)
    with pytest.raises(ValueError, match="'floor'"):
        masks_from_scores(scores, 0.5, rule="floor")


def test_grasp_rule_keeps_the_weight_at_the_threshold():
    scores = {"a": torch.tensor([0.5, -1.0, 2.0, 0.1, -0.3, 1.5, 0.7, -2.0, 0.0, 0.9])}
    # density 0.3: num_rm = int(10 * (1 - (1 - (1 - 0.3)))) = 7 lowest to remove, but the 7th
    # lowest (0.7) is kept by GraSP's "-score <= threshold": 6 removed, 4 kept
    num_rm = int(10 * (1 - (1 - (1 - 0.3))))
    assert num_rm == 7
    keep = masks_from_scores(scores, 0.3, rule="grasp")["a"]
    assert keep.tolist() == [False, False, True, False, False, True, True, False, False, True]
    assert masks_from_scores(scores, 0.3)["a"].sum() == 3  # the exact rule


def grasp_by_hand(model, x, y, temperature=200.0):
    """GraSP as its repository computes it: a train-mode copy, the batch in two halves."""
    net = copy.deepcopy(model).train()
    weights = [m.weight for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    n = x.shape[0]
    halves = [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]
    g = None
    for hx, hy in halves:
        gp = torch.autograd.grad(F.cross_entropy(net(hx) / temperature, hy), weights)
        g = list(gp) if g is None else [a + b for a, b in zip(g, gp)]
    for hx, hy in halves:
        gf = torch.autograd.grad(F.cross_entropy(net(hx) / temperature, hy), weights, create_graph=True)
        sum((a.detach() * b).sum() for a, b in zip(g, gf)).backward()
    raw = [-w.detach() * w.grad for w in weights]
    norm = torch.abs(torch.cat([r.flatten() for r in raw]).sum()) + 1e-10
    return [-r / norm for r in raw]


def test_grasp_authors_convention_matches_the_repository_procedure_with_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    ).double()
    x, y = torch.randn(10, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    model.eval()  # the caller's mode is restored and the BatchNorm statistics are untouched
    stats = model[1].running_mean.clone()
    scores = grasp_scores(model, [(x, y)])
    expected = grasp_by_hand(model, x, y)
    assert torch.allclose(scores["0"], expected[0], rtol=1e-9, atol=1e-15)
    assert torch.allclose(scores["4"], expected[1], rtol=1e-9, atol=1e-15)
    assert not model.training and torch.equal(model[1].running_mean, stats)
    library = grasp_scores(model, [(x, y)], convention="library")  # eval-mode BatchNorm
    assert not torch.allclose(library["0"], scores["0"], rtol=1e-3)
    masks = prune_at_init(model, "grasp", 0.2, data=[(x, y)])
    n = 36 + 300
    assert count(masks) == n - int(n * (1 - (1 - (1 - 0.2)))) + 1  # one weight at the threshold


def test_grasp_reinit_linear_scores_with_xavier_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    scores = grasp_scores(model, [(x, y)], reinit_linear=True, generator=torch.Generator().manual_seed(5))
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in (twin[0], twin[2]):
            nn.init.xavier_normal_(m.weight, generator=gen)
    expected = grasp_scores(twin, [(x, y)])
    assert all(torch.allclose(scores[n], expected[n]) for n in ("0", "2"))
    with pytest.raises(ValueError, match="convention='library'"):
        grasp_scores(model, [(x, y)], reinit_linear=True, convention="library")
    with pytest.raises(ValueError, match="'tanaka'"):
        prune_at_init(model, "grasp", 0.5, data=[(x, y)], convention="tanaka")


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_synflow_rounds_replay_synaptic_flow_prune_loop(scope):
    """prune_loop(schedule="exponential"): round e keeps score > kthvalue(int((1 - d^((e+1)/E)) n))."""
    model = cnn(3)
    rounds, density = 7, 0.1
    got = prune_at_init(model, "synflow", density, input_shape=(1, 6, 6), rounds=rounds, scope=scope)
    masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in model.named_modules() if n in got}
    for epoch in range(rounds):
        scores = synflow_scores(model, (1, 6, 6), masks=masks)
        sparse = density ** ((epoch + 1) / rounds)
        groups = [list(scores)] if scope == "global" else [[n] for n in scores]
        for names in groups:
            flat = torch.cat([scores[n].flatten() for n in names])
            k = int((1.0 - sparse) * flat.numel())
            if k >= 1:
                threshold = torch.kthvalue(flat, k).values
                for n in names:
                    masks[n] = scores[n] > threshold
    assert all(torch.equal(got[n], masks[n]) for n in got)
