"""Co-occurrence task: generator labels by construction, the model against a hand computation, the
probe on frozen uniform attention with a hand-set MLP, and phase 1 on the default config."""

import math

import pytest
import torch

from galore_opt.analysis.cooccurrence import (
    SAMPLE_TYPES,
    CooccurrenceConfig,
    CooccurrenceTransformer,
    cooccurrence_probe,
    make_cooccurrence_data,
    train_cooccurrence,
)

DT = torch.float64


def test_generator_labels_and_types_by_construction():
    data = make_cooccurrence_data(8, 6, 10, include_neither=True, generator=torch.Generator().manual_seed(0), dtype=DT)
    torch.testing.assert_close(data.mu @ data.mu.T, torch.eye(3, dtype=DT), atol=1e-12, rtol=0)
    assert data.x.shape == (40, 6, 8) and data.y.shape == (40,)
    for i in range(40):
        toks = data.tokens[i].tolist()
        n1, n2 = toks.count(0), toks.count(1)
        expected_type = {(1, 1): 0, (1, 0): 1, (0, 1): 2, (0, 0): 3}[(n1, n2)]
        assert int(data.types[i]) == expected_type
        assert float(data.y[i]) == (1.0 if (n1 and n2) else -1.0)
        torch.testing.assert_close(data.x[i], data.mu[data.tokens[i]])
    assert torch.bincount(data.types).tolist() == [10, 10, 10, 10]
    assert make_cooccurrence_data(8, 6, 4).types.max() == 2  # no 'neither' by default


def test_model_matches_hand_computation():
    model = CooccurrenceTransformer(4, 0.5, dtype=DT)
    x = torch.randn(3, 5, 4, dtype=DT)
    out = torch.empty(3, dtype=DT)
    with torch.no_grad():
        for n in range(3):
            xm = x[n].T  # d x L, columns are tokens
            total = 0.0
            for ell in range(5):
                s = xm.T @ model.W_K.T @ model.W_Q @ xm[:, ell]
                total = total + model.w_O @ model.W_V @ xm @ torch.softmax(s, 0)
            out[n] = total / 5
        torch.testing.assert_close(model(x), out, atol=1e-12, rtol=0)


def hand_set_model(dim, mu, a, t):
    """Frozen uniform attention (W_Q = W_K = 0), W_V = I, w_O = a mu1 + a mu2 - t mu3."""
    model = CooccurrenceTransformer(dim, 1.0, dtype=DT)
    with torch.no_grad():
        model.W_Q.zero_()
        model.W_K.zero_()
        model.W_V.copy_(torch.eye(dim, dtype=DT))
        model.w_O.copy_(a * mu[0] + a * mu[1] - t * mu[2])
    return model


@pytest.mark.parametrize(("a", "t", "separates"), [(3.0, 1.0, True), (1.0, 1.0, False)])
def test_probe_on_frozen_attention_and_hand_set_mlp(a, t, separates):
    L = 6
    data = make_cooccurrence_data(8, L, 5, include_neither=True, generator=torch.Generator().manual_seed(1), dtype=DT)
    model = hand_set_model(8, data.mu, a, t)
    p = cooccurrence_probe(model, data, reference_scores=torch.eye(8, dtype=DT))
    assert p["alignment"] == pytest.approx({"mu1": a, "mu2": a, "mu3": -t})
    assert p["scores"] == [[0.0] * 3] * 3
    assert p["attention_change"] == pytest.approx(1.0)  # ||0 - I|| / ||I||
    assert p["attention_on_designated"] == pytest.approx(2 / L)  # uniform attention
    # uniform attention: F = (a * #designated - t * #filler) / L
    f = {
        "both": (2 * a - (L - 2) * t) / L,
        "only_mu1": (a - (L - 1) * t) / L,
        "only_mu2": (a - (L - 1) * t) / L,
        "neither": -t,
    }
    y = {"both": 1.0, "only_mu1": -1.0, "only_mu2": -1.0, "neither": -1.0}
    losses = {k: math.log1p(math.exp(-y[k] * f[k])) for k in SAMPLE_TYPES}
    assert p["loss_by_type"] == pytest.approx(losses)
    assert p["loss"] == pytest.approx(sum(losses.values()) / 4)
    assert p["balance_ratio"] == pytest.approx(max(losses.values()) / min(losses.values()))
    margins = [y[k] * f[k] for k in SAMPLE_TYPES]
    assert p["min_margin"] == pytest.approx(min(margins))
    assert p["phase1_done"] == float(separates) == float(min(margins) > 0)


def test_phase1_ends_at_a_finite_step_on_the_default_config():
    cfg = CooccurrenceConfig(steps=300, log_every=50)
    out = train_cooccurrence(cfg)
    assert out["phase1_end"] is not None and 1 <= out["phase1_end"] <= 300
    entry = next(h for h in out["history"] if h.get("phase1_end"))
    assert entry["step"] == out["phase1_end"] and entry["phase1_done"] == 1.0
    before = [h for h in out["history"] if h["step"] < out["phase1_end"]]
    assert all(h["phase1_done"] == 0.0 for h in before)
    # the MLP aligns with the signals: mu1, mu2 positive, filler negative
    al = entry["alignment"]
    assert al["mu1"] > 0 and al["mu2"] > 0 and al["mu3"] < 0
    assert out["final"]["loss"] < out["history"][0]["loss"]


def test_validation():
    with pytest.raises(ValueError, match="dim must be an int >= 3.*2"):
        make_cooccurrence_data(2)
    with pytest.raises(ValueError, match="seq_len.*1"):
        make_cooccurrence_data(4, 1)
    with pytest.raises(ValueError, match="steps.*0"):
        train_cooccurrence(CooccurrenceConfig(steps=0))
    with pytest.raises(ValueError, match="init_std.*0"):
        CooccurrenceTransformer(4, 0.0)
