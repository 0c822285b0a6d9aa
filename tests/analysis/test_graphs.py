import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from galore_opt.analysis.graphs import drop_isolated, effective_weight, layer_graph, model_graphs, unfold_weight


def test_linear_biadjacency_is_transposed_mask():
    lin = nn.Linear(5, 3)
    mask = (torch.rand(3, 5) < 0.5).float()
    g = layer_graph(lin, mask)
    assert g.biadjacency.shape == (5, 3)  # left = inputs, right = outputs
    assert torch.equal(g.biadjacency, mask.t())
    assert torch.allclose(g.weights, (lin.weight.detach() * mask).abs().t())
    assert g.num_edges == int(mask.sum())


def test_conv_unfolding_indexes_channel_then_kernel_position():
    c_out, c_in, kh, kw = 4, 3, 2, 5
    w = torch.randn(c_out, c_in, kh, kw)
    u = unfold_weight(w)
    assert u.shape == (c_in * kh * kw, c_out)
    for o in range(c_out):
        for c in range(c_in):
            for i in range(kh):
                for j in range(kw):
                    assert u[(c * kh + i) * kw + j, o] == w[o, c, i, j]
    conv = nn.Conv2d(c_in, c_out, (kh, kw))
    g = layer_graph(conv)
    assert torch.equal(g.weights, conv.weight.detach().reshape(c_out, -1).t().abs())


def test_prune_reparametrization_equals_explicit_mask():
    lin = nn.Linear(8, 6)
    prune.random_unstructured(lin, "weight", amount=0.5)
    g = layer_graph(lin)
    explicit = layer_graph(lin.weight_orig.detach(), lin.weight_mask)
    assert torch.equal(g.biadjacency, explicit.biadjacency)
    assert torch.equal(effective_weight(lin), lin.weight_orig.detach() * lin.weight_mask)
    assert g.num_edges == 24


def test_drop_isolated_removes_zero_degree_nodes():
    b = torch.zeros(6, 7)
    b[1:4, 2:6] = 1
    kept, left, right = drop_isolated(b)
    assert kept.shape == (3, 4)
    assert left.tolist() == [1, 2, 3] and right.tolist() == [2, 3, 4, 5]
    g = layer_graph(torch.ones(7, 6) * b.t()).filtered()
    assert g.biadjacency.shape == (3, 4)


def test_model_graphs_from_model_and_masks():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10))
    masks = {"3": torch.zeros(10, 144)}
    graphs = model_graphs(model, masks)
    assert list(graphs) == ["0", "3"]
    assert graphs["0"].biadjacency.shape == (9, 4)
    assert graphs["3"].num_edges == 0
    with pytest.raises(ValueError, match="nope"):
        model_graphs(model, {"nope": torch.ones(1)})
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        layer_graph(nn.Linear(3, 3), torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"\(2, 2, 2\)"):
        unfold_weight(torch.ones(2, 2, 2))
