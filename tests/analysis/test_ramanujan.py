import math

import numpy as np
import pytest
import torch
from torch import nn

from galore_opt.analysis.graphs import layer_graph
from galore_opt.analysis.ramanujan import (
    full_spectrum,
    imdb,
    layer_scores,
    model_scores,
    narc,
    spectral_gaps,
    top_singular_values,
    weighted_spectral_gap,
)


@pytest.mark.parametrize("a,b", [(4, 4), (5, 9), (12, 3)])
def test_complete_bipartite_has_normalized_gaps_of_one(a, b):
    g = spectral_gaps(torch.ones(a, b))
    assert g["d_left"] == b and g["d_right"] == a
    assert g["mu0"] == pytest.approx(math.sqrt(a * b), rel=1e-12)
    assert g["mu_hat"] == pytest.approx(0.0, abs=1e-9)
    assert g["delta_r_norm"] == pytest.approx(1.0, abs=1e-9)
    assert g["delta_s_norm"] == pytest.approx(1.0, abs=1e-9)
    assert g["ramanujan"]


def test_disjoint_complete_blocks_give_block_singular_values():
    b = torch.block_diag(torch.ones(4, 6), torch.ones(3, 5))
    g = spectral_gaps(b)
    assert g["mu0"] == pytest.approx(math.sqrt(24))
    assert g["mu_hat"] == pytest.approx(math.sqrt(15))
    d_l, d_r = 39 / 7, 39 / 11
    assert g["d_left"] == pytest.approx(d_l) and g["d_right"] == pytest.approx(d_r)
    bound = math.sqrt(d_l - 1) + math.sqrt(d_r - 1)
    assert g["delta_r"] == pytest.approx(bound - math.sqrt(15))
    assert g["delta_s"] == pytest.approx(2 * math.sqrt(math.sqrt(24) - 1) - math.sqrt(15))


def test_regular_circulant_graph_matches_closed_form():
    n, d = 20, 5
    b = sum(torch.roll(torch.eye(n), k, dims=1) for k in range(d))
    g = spectral_gaps(b)
    # circulant: singular values |sum_k w^(jk)| = |sin(pi j d / n) / sin(pi j / n)|
    sv = [abs(math.sin(math.pi * j * d / n) / math.sin(math.pi * j / n)) for j in range(1, n)]
    assert g["mu0"] == pytest.approx(d)
    assert g["mu_hat"] == pytest.approx(max(sv))
    assert g["delta_r"] == pytest.approx(2 * math.sqrt(d - 1) - max(sv))


def test_mu_hat_is_sigma2_not_second_adjacency_eigenvalue():
    torch.manual_seed(1)
    b = (torch.rand(30, 20) < 0.3).double()
    g = spectral_gaps(b)
    adj = torch.zeros(50, 50, dtype=torch.float64)
    adj[:30, 30:] = b
    adj[30:, :30] = b.t()
    ev = torch.linalg.eigvalsh(adj).abs().sort(descending=True).values
    assert ev[1] == pytest.approx(g["mu0"])  # the bug: second |eigenvalue| is sigma_1 again
    assert ev[2] == pytest.approx(g["mu_hat"])
    assert g["mu_hat"] == pytest.approx(float(np.linalg.svd(b.numpy(), compute_uv=False)[1]))


def test_zero_degree_nodes_are_dropped_and_gate_applies():
    b = torch.zeros(10, 12)
    b[2:6, 3:8] = 1
    g = spectral_gaps(b)
    assert (g["n_left"], g["n_right"]) == (4, 5)
    assert g["delta_r_norm"] == pytest.approx(1.0)
    # a perfect matching has mean degree 1 < 3: no score
    m = spectral_gaps(torch.eye(8))
    assert not m["scored"] and math.isnan(m["delta_r"]) and not m["ramanujan"]
    # d_R = 2 < 3 fails even though d_L = 4
    k = spectral_gaps(torch.ones(2, 4))
    assert not k["scored"]


def test_erdos_renyi_mask_normalized_delta_r_near_zero():
    torch.manual_seed(0)
    mask = (torch.rand(576, 64) < 0.1).float()
    s = layer_scores(torch.randn(576, 64), mask)  # Linear (out=576, in=64)
    assert s.scored
    assert abs(s.delta_r_norm) < 0.05


def test_imdb_by_hand():
    # right nodes 0..8
    b = torch.zeros(14, 9)
    b[0:5, 0:4] = 1  # 5 left nodes of degree 4: K_{5,4}, normalized gap 1
    rows = [[0, 1, 2, 4], [1, 2, 3, 5], [2, 3, 4, 6], [3, 4, 5, 7]]  # more degree-4 nodes
    for r, cols in enumerate(rows):
        b[5 + r, cols] = 1
    b[9, [0, 1]] = 1  # 2 nodes of degree 2: group too small, left out
    b[10, [5, 6]] = 1
    b[11, [6]] = 1  # 3 nodes of degree 1 -> d_L = 1 fails the gate
    b[12, [7]] = 1
    b[13, [8]] = 1
    # the only passing group: degree 4, rows 0..8
    sub = b[:9].numpy()
    sub = sub[:, sub.sum(0) > 0]
    n_l, n_r = sub.shape
    e = sub.sum()
    s2 = np.linalg.svd(sub, compute_uv=False)[1]
    bound = math.sqrt(e / n_l - 1) + math.sqrt(e / n_r - 1)
    assert imdb(b) == pytest.approx((bound - s2) / bound)
    assert math.isnan(imdb(torch.eye(6)))


def test_narc_by_hand_both_edge_counts():
    b = torch.zeros(6, 5)
    b[:4, :4] = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1]], dtype=torch.float)
    # filtered: 4 x 4, 12 edges, d_L = 3; unfiltered dims 6 x 5
    s2 = float(np.linalg.svd(b[:4, :4].numpy(), compute_uv=False)[1])
    for count, e in (("double", 24), ("single", 12)):
        expected = ((s2**2 / 4 + 1) * math.sqrt(16) - abs(e - 3 / 5 * 16)) / 30
        assert narc(b, edge_count=count) == pytest.approx(expected)
    with pytest.raises(ValueError, match="'triple'"):
        narc(b, edge_count="triple")


@pytest.mark.parametrize("convention", ["authors", "library"])
def test_weighted_gap_of_rank_one_and_full_spectrum_of_complete_graph(convention):
    u, v = torch.rand(7) + 0.1, torch.rand(5) + 0.1
    w = torch.outer(u, v)
    assert weighted_spectral_gap(w) == pytest.approx(float(u.norm() * v.norm()), rel=1e-6)
    g = layer_graph(torch.outer(v, u))  # Linear (out=5, in=7): unfolded (7, 5) = u v^T
    fs = full_spectrum(g, convention=convention)
    bound = math.sqrt(5 - 1) + math.sqrt(7 - 1)
    assert fs["fs_delta_r"] == pytest.approx(bound, abs=1e-6)
    assert fs["fs_lambda"] == pytest.approx(float(u.norm() * v.norm()), rel=1e-6)
    # one group of 7 inputs of degree 5 (library) or 5 outputs of degree 7 (authors):
    # c = max(7, 5) / (7 + 5 - 1) either way
    c = 7 / 11
    assert fs["fs_imdb_r"] == pytest.approx(c * bound, abs=1e-6)
    assert fs["fs_imdb_lambda"] == pytest.approx(c * float(u.norm() * v.norm()), rel=1e-6)
    norm = math.sqrt(sum(fs[k] ** 2 for k in ("fs_delta_r", "fs_lambda", "fs_imdb_r", "fs_imdb_lambda")))
    assert fs["fs_norm"] == pytest.approx(norm)


def test_solvers_agree():
    torch.manual_seed(0)
    b = (torch.rand(300, 80) < 0.2).float()
    ref = top_singular_values(b, 3, "svd")
    for method in ("gram", "lobpcg"):
        assert torch.allclose(top_singular_values(b, 3, method), ref, rtol=1e-6)
    with pytest.raises(ValueError, match="'eig'"):
        top_singular_values(b, method="eig")


def test_large_unfolded_conv_layer_is_scored():
    """A 512x512x3x3 conv (4608x512 unfolded) gets every score. Its speed (about 1.2 s on one core
    of the dev machine) is a benchmark figure, in docs/analysis_pruning.md, not a test."""
    torch.manual_seed(0)
    w = torch.randn(512, 512, 3, 3)
    mask = (torch.rand_like(w) < 0.1).float()
    s = layer_scores(w, mask)
    assert (s.dim_in, s.dim_out) == (4608, 512)
    assert s.scored and math.isfinite(s.imdb) and math.isfinite(s.full_spectrum["fs_norm"])


def test_model_scores_aggregates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 3))
    masks = {
        "0": (torch.rand(30, 40) < 0.5).float(),
        "2": torch.ones(20, 30),
        "4": torch.eye(3, 20),  # mean degree 1: not scored
    }
    out = model_scores(model, masks)
    layers = out["layers"]
    assert layers["2"]["delta_r_norm"] == pytest.approx(1.0)
    assert not layers["4"]["scored"]
    assert out["scored_layers"] == 2 and out["empty_layers"] == 0
    assert out["delta_r_norm"] == pytest.approx((layers["0"]["delta_r_norm"] + 1.0) / 2)
    assert out["ramanujan_fraction"] == pytest.approx((layers["0"]["ramanujan"] + layers["2"]["ramanujan"]) / 2)
    edges = masks["0"].sum() + 600 + 3
    assert out["density"] == pytest.approx(float(edges) / (1200 + 600 + 60))


# --- the authors' conventions (default) against the library's earlier ones --------------------


def linear_weight(rows):
    """A Linear weight (out, in) of ones from each output's list of inputs."""
    n_in = max(max(r) for r in rows if r) + 1
    w = torch.zeros(len(rows), n_in)
    for o, cols in enumerate(rows):
        w[o, cols] = 1.0
    return w


def test_narc_gate_boundary_authors_vs_library():
    full = torch.ones(3, 3)  # K_{3,3}: both mean degrees exactly 3 -> scored
    assert narc(full) == pytest.approx(narc(full, convention="library"))
    assert math.isfinite(narc(full))
    short = full.clone()
    short[0, 0] = 0  # 8 edges: mean degrees 8/3 < 3 -> no score in the authors' code
    assert math.isnan(narc(short))
    s2 = float(np.linalg.svd(short.numpy(), compute_uv=False)[1])
    expected = ((s2**2 / 4 + 1) * 3 - abs(16 - 8 / 3 / 3 * 9)) / 9
    assert narc(short, convention="library") == pytest.approx(expected)
    with pytest.raises(ValueError, match="'paper'"):
        narc(full, convention="paper")


def test_weighted_gap_gate_is_outputs_at_least_3_inputs_above_1():
    # 2 outputs of degree 3 on 6 distinct inputs: inputs' mean degree exactly 1 -> fails (> 1)
    disjoint = layer_graph(linear_weight([[0, 1, 2], [3, 4, 5]]))
    assert math.isnan(weighted_spectral_gap(disjoint.weights))
    assert weighted_spectral_gap(disjoint.weights, convention="library") == pytest.approx(0.0, abs=1e-9)
    # one shared input: inputs' mean 6/5 > 1, outputs' mean exactly 3 -> passes
    shared = layer_graph(linear_weight([[0, 1, 2], [2, 3, 4]]))
    sv = np.linalg.svd(shared.weights.numpy(), compute_uv=False)
    assert weighted_spectral_gap(shared.weights) == pytest.approx(float(sv[0] - sv[1]))
    # outputs' mean 5/2 < 3 -> fails, although the ICLR gate is not involved
    low = layer_graph(linear_weight([[0, 1, 2], [2, 3]]))
    assert math.isnan(weighted_spectral_gap(low.weights))


def test_full_spectrum_two_node_group_and_skipped_failures():
    # outputs o0, o1 read inputs {0,1,2} (a 2-node group of degree 3); o2, o3 read one input each
    # (a 2-node group of degree 1, which fails the gate). The whole layer has outputs' mean 2 < 3.
    g = layer_graph(linear_weight([[0, 1, 2], [0, 1, 2], [3], [4]]))
    fs = full_spectrum(g)
    # K_{2,3}: mu_hat = 0, delta_r = sqrt(3 - 1) + sqrt(2 - 1); c = max(2, 3) / (2 + 3 - 1)
    c = 3 / 4
    assert fs["fs_delta_r"] == 0.0 and fs["fs_lambda"] == 0.0
    assert fs["fs_subgraphs"] == 1  # the failing degree-1 group is skipped, not averaged as 0
    assert fs["fs_imdb_r"] == pytest.approx(c * (math.sqrt(2) + 1))
    assert fs["fs_imdb_lambda"] == pytest.approx(c * math.sqrt(6))  # ones(2, 3): sigma = sqrt(6), 0
    assert fs["fs_norm"] == pytest.approx(math.hypot(fs["fs_imdb_r"], fs["fs_imdb_lambda"]))
    # library: groups of inputs ({0,1,2} of degree 2, {3,4} of degree 1) under the both->=3 gate:
    # both fail and each counts 0
    lib = full_spectrum(g, convention="library")
    assert lib["fs_subgraphs"] == 2 and lib["fs_imdb_r"] == 0.0 and lib["fs_norm"] == 0.0


def test_full_spectrum_averages_only_passing_left_regular_subgraphs():
    # two passing groups: outputs 0-2 of degree 4 on inputs 0-3 (K_{3,4}), outputs 3-4 of degree 3
    # on inputs 4-6 (K_{2,3}); outputs 5-6 of degree 1 on disjoint inputs fail and are skipped
    rows = [[0, 1, 2, 3]] * 3 + [[4, 5, 6]] * 2 + [[7], [8]]
    g = layer_graph(linear_weight(rows))
    fs = full_spectrum(g)
    k34 = (math.sqrt(3) + math.sqrt(2)) * 4 / 6  # c = max(3, 4) / (3 + 4 - 1)
    k23 = (math.sqrt(2) + 1) * 3 / 4
    assert fs["fs_subgraphs"] == 2
    assert fs["fs_imdb_r"] == pytest.approx((k34 + k23) / 2)
    assert fs["fs_imdb_lambda"] == pytest.approx((math.sqrt(12) * 4 / 6 + math.sqrt(6) * 3 / 4) / 2)
    # whole layer: 20 edges, 7 outputs (mean 20/7 < 3) -> fails, coordinate terms 0
    assert fs["fs_delta_r"] == 0.0 and fs["fs_lambda"] == 0.0
    with pytest.raises(ValueError, match="'both'"):
        full_spectrum(g, convention="both")


def test_model_scores_narc_and_weighted_gap_average_gated_layers_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 3))
    masks = {"0": (torch.rand(30, 40) < 0.5).float(), "2": torch.ones(20, 30), "4": torch.eye(3, 20)}
    out = model_scores(model, masks)
    lib = model_scores(model, masks, convention="library")
    layers, lib_layers = out["layers"], lib["layers"]
    assert math.isnan(layers["4"]["narc"]) and math.isfinite(lib_layers["4"]["narc"])
    assert out["narc"] == pytest.approx((layers["0"]["narc"] + layers["2"]["narc"]) / 2)
    assert lib["narc"] == pytest.approx(sum(lib_layers[n]["narc"] for n in "024") / 3)
    # layer "4": 3 outputs of degree 1 -> outputs' mean 1 < 3: no weighted gap in the authors' code
    assert math.isnan(layers["4"]["weighted_gap"]) and math.isfinite(lib_layers["4"]["weighted_gap"])
    assert out["weighted_gap"] == pytest.approx((layers["0"]["weighted_gap"] + layers["2"]["weighted_gap"]) / 2)
    for key in ("delta_r_norm", "imdb", "delta_s_norm"):
        assert out[key] == pytest.approx(lib[key])  # the ICLR'23 quantities do not depend on it
