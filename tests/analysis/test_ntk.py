"""Empirical NTK against a brute-force per-sample autograd Jacobian, closed forms for linear models,
and the metrics against their direct formulas (all fp64)."""

import math

import pytest
import torch
from torch import nn

from galore_opt.analysis.ntk import (
    empirical_ntk,
    kernel_distance,
    kernel_target_alignment,
    ntk_eigen_metrics,
    ntk_matrix,
    ntk_mlp,
    ntk_regression,
    target_matrix,
)

DT = torch.float64


def brute_force_jacobian(model, x, names=None):
    """J[i, k, :] = d f_k(x_i) / d theta, one autograd call per (sample, output)."""
    params = [p for n, p in model.named_parameters() if names is None or n in names]
    rows = []
    for xi in x:
        out = model(xi[None]).reshape(-1)
        per_k = []
        for k in range(out.numel()):
            g = torch.autograd.grad(out[k], params, retain_graph=True, allow_unused=True)
            per_k.append(
                torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(g, params)])
            )
        rows.append(torch.stack(per_k))
    return torch.stack(rows)  # (N, K, P)


def small_mlp(d=5, h=7, k=3):
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, k)).to(DT)


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_ntk_matches_brute_force_all_forms(chunk):
    model = small_mlp()
    x = torch.randn(9, 5, dtype=DT)
    j = brute_force_jacobian(model, x)
    full_ref = torch.einsum("akp,blp->abkl", j, j)
    sum_ref = j.sum(1) @ j.sum(1).T
    trace_ref = torch.einsum("akp,bkp->ab", j, j)
    torch.testing.assert_close(empirical_ntk(model, x, mode="sum", chunk_size=chunk), sum_ref, atol=1e-8, rtol=0)
    torch.testing.assert_close(empirical_ntk(model, x, mode="full", chunk_size=chunk), full_ref, atol=1e-8, rtol=0)
    torch.testing.assert_close(empirical_ntk(model, x, mode="trace", chunk_size=chunk), trace_ref, atol=1e-8, rtol=0)
    # the trace form is the trace of the full form, the sum form the sum of its blocks
    full = empirical_ntk(model, x, mode="full", chunk_size=chunk)
    torch.testing.assert_close(full.sum((2, 3)), sum_ref, atol=1e-8, rtol=0)


def test_ntk_cross_kernel_and_chunking_identical():
    model = small_mlp()
    x, x2 = torch.randn(7, 5, dtype=DT), torch.randn(5, 5, dtype=DT)
    j1, j2 = brute_force_jacobian(model, x), brute_force_jacobian(model, x2)
    ref = torch.einsum("akp,blp->abkl", j1, j2)
    for chunk in (1, 3, 100):
        got = empirical_ntk(model, x, x2, mode="full", chunk_size=chunk)
        torch.testing.assert_close(got, ref, atol=1e-8, rtol=0)
    a = empirical_ntk(model, x, mode="sum", chunk_size=2)
    b = empirical_ntk(model, x, mode="sum", chunk_size=7)
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    torch.testing.assert_close(a, a.T, atol=0, rtol=0)  # symmetric fill is exact


def test_ntk_subset_of_params_and_scales():
    model = small_mlp()
    x = torch.randn(6, 5, dtype=DT)
    names = ["0.weight", "2.bias"]
    j = brute_force_jacobian(model, x, names)
    got = empirical_ntk(model, x, mode="full", params=names)
    torch.testing.assert_close(got, torch.einsum("akp,blp->abkl", j, j), atol=1e-8, rtol=0)
    # a mask on the Jacobian = the NTK over the surviving entries only
    mask = (torch.rand(7, 5) > 0.5).to(DT)
    jm = brute_force_jacobian(model, x, ["0.weight"]) * mask.reshape(-1)
    got = empirical_ntk(model, x, mode="trace", params=["0.weight"], param_scales={"0.weight": mask})
    torch.testing.assert_close(got, torch.einsum("akp,bkp->ab", jm, jm), atol=1e-8, rtol=0)


def test_linear_model_ntk_is_gram_matrix():
    d, k, n = 6, 4, 10
    lin = nn.Linear(d, k, bias=False).to(DT)
    x = torch.randn(n, d, dtype=DT)
    xxt = x @ x.T
    full = empirical_ntk(lin, x, mode="full")
    torch.testing.assert_close(full, xxt[:, :, None, None] * torch.eye(k, dtype=DT), atol=1e-10, rtol=0)
    torch.testing.assert_close(ntk_matrix(full), torch.kron(xxt, torch.eye(k, dtype=DT)), atol=1e-10, rtol=0)
    # sum of logits: d(sum_k W_k x)/dW = 1 x^T, so <., .> = K x.x'; the trace form is the same
    torch.testing.assert_close(empirical_ntk(lin, x, mode="sum"), k * xxt, atol=1e-10, rtol=0)
    torch.testing.assert_close(empirical_ntk(lin, x, mode="trace"), k * xxt, atol=1e-10, rtol=0)
    # with a bias: X X^T + 1
    lin_b = nn.Linear(d, 1).to(DT)
    torch.testing.assert_close(empirical_ntk(lin_b, x), xxt + 1, atol=1e-10, rtol=0)


def test_model_returning_mapping_and_integer_inputs():
    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 4, dtype=DT)
            self.head = nn.Linear(4, 2, dtype=DT)

        def forward(self, ids):
            return {"logits": self.head(self.emb(ids).mean(1))}

    model = Tok()
    ids = torch.randint(0, 11, (5, 3))
    got = empirical_ntk(model, ids, mode="sum")

    class Plain(nn.Module):
        def forward(self, ids):
            return model(ids)["logits"]

    wrapped = Plain()
    wrapped.inner = model
    j = brute_force_jacobian(wrapped, ids)
    torch.testing.assert_close(got, j.sum(1) @ j.sum(1).T, atol=1e-8, rtol=0)


def test_probe_batch_128_chunked_on_mlp():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    x = torch.randn(128, 64)
    theta = empirical_ntk(model, x, mode="trace", chunk_size=32)
    assert theta.shape == (128, 128) and torch.isfinite(theta).all()
    ref = empirical_ntk(model.to(DT), x.to(DT), mode="trace", chunk_size=128)
    torch.testing.assert_close(theta.to(DT), ref, rtol=1e-4, atol=1e-4)


def test_validation_errors_name_the_value():
    model = small_mlp()
    x = torch.randn(3, 5, dtype=DT)
    with pytest.raises(ValueError, match="'bogus'"):
        empirical_ntk(model, x, mode="bogus")
    with pytest.raises(ValueError, match="chunk_size.*0"):
        empirical_ntk(model, x, chunk_size=0)
    with pytest.raises(ValueError, match="nope"):
        empirical_ntk(model, x, params=["nope"])
    with pytest.raises(ValueError, match="param_scales"):
        empirical_ntk(model, x, params=["0.weight"], param_scales={"0.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="shapes differ"):
        kernel_distance(torch.eye(2), torch.eye(3))
    with pytest.raises(ValueError, match="ridge"):
        ntk_regression(torch.eye(2), torch.eye(2), torch.zeros(2), torch.zeros(2), ridge=-1.0)


def test_eigen_metrics_against_direct_formulas():
    a = torch.randn(8, 8, dtype=DT)
    theta = a @ a.T + 0.1 * torch.eye(8, dtype=DT)
    m = ntk_eigen_metrics(theta)
    ev = torch.linalg.eigvalsh(theta)
    assert m["lambda_min"] == pytest.approx(float(ev.min()), rel=1e-10)
    assert m["lambda_max"] == pytest.approx(float(ev.max()), rel=1e-10)
    assert m["condition_number"] == pytest.approx(float(ev.max() / ev.min()), rel=1e-10)
    assert m["trace"] == pytest.approx(float(ev.sum()), rel=1e-10)
    assert ntk_eigen_metrics(torch.zeros(3, 3, dtype=DT))["condition_number"] == math.inf


def test_kernel_distance_and_alignment_formulas():
    a, b = torch.randn(6, 6, dtype=DT), torch.randn(6, 6, dtype=DT)
    direct = 1 - (a * b).sum() / (a.norm() * b.norm())
    assert kernel_distance(a, b) == pytest.approx(float(direct), abs=1e-12)
    assert kernel_distance(a, 3.0 * a) == pytest.approx(0.0, abs=1e-12)
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    y = torch.nn.functional.one_hot(labels, 3).to(DT) - 1 / 3
    torch.testing.assert_close(target_matrix(labels), y)
    yy = y @ y.T
    theta = a @ a.T
    direct = (theta * yy).sum() / (theta.norm() * yy.norm())
    assert kernel_target_alignment(theta, labels) == pytest.approx(float(direct), abs=1e-12)
    assert kernel_target_alignment(yy, labels) == pytest.approx(1.0, abs=1e-12)


def test_ntk_regression_against_direct_solve():
    n_tr, n_te = 12, 5
    z = torch.randn(n_tr + n_te, 20, dtype=DT)
    k = z @ z.T
    labels = torch.randint(0, 3, (n_tr + n_te,))
    y = target_matrix(labels, 3)
    out = ntk_regression(k[:n_tr, :n_tr], k[n_tr:, :n_tr], labels[:n_tr], labels[n_tr:], num_classes=3)
    pred = k[n_tr:, :n_tr] @ torch.linalg.inv(k[:n_tr, :n_tr]) @ y[:n_tr]
    assert out["mse"] == pytest.approx(float(((pred - y[n_tr:]) ** 2).mean()), rel=1e-9)
    assert out["accuracy"] == pytest.approx(float((pred.argmax(1) == labels[n_tr:]).double().mean()))
    # interpolation: predicting the training set returns its labels
    out = ntk_regression(k[:n_tr, :n_tr], k[:n_tr, :n_tr], labels[:n_tr], labels[:n_tr], num_classes=3)
    assert out["mse"] < 1e-15 and out["accuracy"] == 1.0
    # block kernel of a linear model: same predictions as the scalar kernel X X^T
    lin = nn.Linear(20, 3, bias=False).to(DT)
    full = empirical_ntk(lin, z, mode="full")
    out_block = ntk_regression(full[:n_tr, :n_tr], full[n_tr:, :n_tr], labels[:n_tr], labels[n_tr:], num_classes=3)
    out_scalar = ntk_regression(k[:n_tr, :n_tr], k[n_tr:, :n_tr], labels[:n_tr], labels[n_tr:], num_classes=3)
    assert out_block["mse"] == pytest.approx(out_scalar["mse"], rel=1e-9)


def test_ntk_mlp_parametrization_and_infinite_width_limit():
    # one hidden ReLU layer, NTK parametrization, only the readout trained, |x|^2 = fan_in: the
    # kernel is E[relu(h) relu(h')] with h ~ N(0, sigma_w^2 = 2), i.e. 2 (sin t + (pi - t) cos t) / (2 pi)
    torch.manual_seed(1)
    net = ntk_mlp(3, 20000, 1, dtype=DT)
    x = math.sqrt(3) * torch.nn.functional.normalize(torch.randn(4, 3, dtype=DT), dim=1)
    theta = empirical_ntk(net, x, params=["2.weight"])
    rho = (x @ x.T / 3).clamp(-1, 1)
    t = torch.arccos(rho)
    ref = 2 * (torch.sin(t) + (math.pi - t) * rho) / (2 * math.pi)
    assert (
        float((theta - ref).norm() / ref.norm()) < 0.05
    )  # measured 0.024 (seed 1); the 1/sqrt(m) scale noise is ~1.6%
    with pytest.raises(ValueError, match="depth"):
        ntk_mlp(3, 4, 0)


# --- TE-NAS convention ----------------------------------------------------------------------------


def tenas_by_hand(network, x):
    """TE-NAS get_ntk_n(train_mode=True) on a copy: one forward, a backward per sample."""
    import copy

    net = copy.deepcopy(network).train()
    logit = net(x)
    grads = []
    for i in range(len(x)):
        net.zero_grad()
        logit[i : i + 1].backward(torch.ones_like(logit[i : i + 1]), retain_graph=True)
        grads.append(torch.cat([w.grad.view(-1) for n, w in net.named_parameters() if "weight" in n]))
    g = torch.stack(grads)
    return g @ g.T


def test_tenas_convention_matches_its_procedure_with_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(7, 5, dtype=torch.float64)
    stats = model[1].running_mean.clone()
    theta = empirical_ntk(model, x, convention="tenas")
    assert torch.allclose(theta, tenas_by_hand(model, x), rtol=1e-10, atol=1e-12)
    assert not model.training and torch.equal(model[1].running_mean, stats)
    # the per-sample (tutorial) kernel in eval mode differs: batch statistics couple the samples
    tutorial = empirical_ntk(model, x, params=["0.weight", "1.weight", "3.weight"])
    assert not torch.allclose(theta, tutorial, rtol=1e-3)


def test_tenas_without_batch_coupling_is_the_weights_only_tutorial_kernel():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, x2 = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    weights = ["0.weight", "2.weight"]
    for mode in ("sum", "full", "trace"):
        got = empirical_ntk(model, x, x2, mode=mode, convention="tenas")
        want = empirical_ntk(model, x, x2, mode=mode, params=weights)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    everything = empirical_ntk(model, x)  # the default differentiates the biases too
    assert not torch.allclose(everything, empirical_ntk(model, x, convention="tenas"))
    with pytest.raises(ValueError, match="'te-nas'"):
        empirical_ntk(model, x, convention="te-nas")
