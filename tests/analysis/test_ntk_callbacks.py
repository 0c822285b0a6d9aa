"""The analysis callbacks in a real transformers.Trainer run, in a plain loop with GaLoreAdamW, and
the no-cost-when-unattached guarantee."""

import json

import pytest
import torch
from torch import nn

from galore_opt import GaLoreAdamW, galore_param_groups
from galore_opt.analysis.bias_sparsity import BiasSparseMLP
from galore_opt.analysis.callbacks import LoopCallbacks, attach_to_trainer
from galore_opt.analysis.cooccurrence import CooccurrenceTransformer, cooccurrence_probe, make_cooccurrence_data
from galore_opt.analysis.ntk import empirical_ntk, kernel_distance, ntk_eigen_metrics
from galore_opt.analysis.ntk_callbacks import (
    ActivationSparsityCallback,
    ArchitectureMetricsCallback,
    CooccurrenceDynamicsCallback,
    NTKCallback,
)


def no_hooks(model):
    return (
        all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
        and not torch.nn.modules.module._global_forward_hooks
    )


class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x, labels=None):
        logits = self.head(self.body(x))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def test_ntk_callback_in_a_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = TinyClassifier()
    xs, ys = torch.randn(32, 6), torch.randint(0, 3, (32,))
    dataset = [{"x": xs[i], "labels": ys[i]} for i in range(32)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        logging_steps=100,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    probe = xs[:8]
    ntk_cb = NTKCallback(probe, every=2, targets=ys[:8])
    sparsity_cb = ActivationSparsityCallback(probe, every=2)
    assert no_hooks(model)  # constructing callbacks attaches nothing
    cb = attach_to_trainer(trainer, [ntk_cb, sparsity_cb])
    trainer.train()
    steps = [h["step"] for h in cb.history]
    assert steps == [0, 2, 4]
    logged = [h for h in trainer.state.log_history if "ntk/lambda_min" in h]
    assert len(logged) == 3
    assert all("activation_sparsity/active_fraction" in h for h in logged)
    assert logged[0]["ntk/kernel_distance"] == pytest.approx(0.0, abs=1e-12)
    assert logged[-1]["ntk/kernel_distance"] > 0  # the kernel moved
    # the logged values are those of the functions on the final model
    final = ntk_eigen_metrics(empirical_ntk(model.eval(), probe))
    assert cb.history[-1]["ntk"]["lambda_max"] == pytest.approx(final["lambda_max"], rel=1e-5)
    assert no_hooks(model)


def test_callbacks_in_a_plain_loop_with_galore(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    opt = GaLoreAdamW(galore_param_groups(net, rank=4, update_proj_gap=5, lr=1e-2))
    ntk_cb = NTKCallback(x[:16], every=5, targets=y[:16], keep_kernels=True)
    logged = []
    runner = LoopCallbacks(
        [
            ntk_cb,
            ActivationSparsityCallback(x[:16], every=5),
            ArchitectureMetricsCallback(x[:16], every=10, n_angles=16),
        ],
        log=lambda step, flat: logged.append((step, flat)),
    )
    runner.step(0, net)
    for step in range(1, 11):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        runner.step(step, net, opt)
    assert [s for s, _ in logged] == [0, 5, 10]
    assert set(logged[-1][1]) >= {
        "ntk/lambda_min",
        "ntk/kernel_distance",
        "activation_sparsity/active_fraction",
        "architecture/ntk_lambda_min",
    }
    assert "architecture/linear_regions" not in logged[1][1]  # every=10: not at step 5
    # the distance is the one computed from the kept kernels
    d = kernel_distance(ntk_cb.kernels[0], ntk_cb.kernels[-1])
    assert runner.series("ntk", "kernel_distance")[1][-1] == pytest.approx(d)
    path = runner.save_json(tmp_path / "a.json")
    assert json.loads(path.read_text())[0]["step"] == 0
    assert net.training and no_hooks(net)


def test_unattached_model_costs_nothing():
    net = BiasSparseMLP(4, 32, 1.0)
    x = torch.randn(5, 4)
    calls = []
    net.hidden.register_forward_hook(lambda *a: calls.append(1))  # a user's hook stays untouched
    cb = ActivationSparsityCallback(x, every=3)
    before = len(calls)
    assert len(net.hidden._forward_hooks) == 1 and not net.act._forward_hooks
    out = cb(0, net)
    assert len(calls) == before + 1  # exactly one forward pass for the probe
    assert not net.act._forward_hooks and len(net.hidden._forward_hooks) == 1
    assert out["expected_at_init"] == pytest.approx(0.158655, abs=1e-6)
    assert not cb.due(1) and cb.due(3)


def test_cooccurrence_callback_matches_probe_and_finds_phase1():
    g = torch.Generator().manual_seed(0)
    data = make_cooccurrence_data(8, 6, 8, generator=g)
    model = CooccurrenceTransformer(8, 0.1, generator=g)
    m0 = (model.W_Q.T @ model.W_K).detach().clone()
    cb = CooccurrenceDynamicsCallback(data, every=5)
    runner = LoopCallbacks([cb])
    runner.step(0, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(1, 301):
        opt.zero_grad()
        nn.functional.softplus(-data.y * model(data.x)).mean().backward()
        opt.step()
        runner.step(step, model, opt)
    assert cb.phase1_end is not None and cb.phase1_end % 5 == 0
    last = runner.history[-1]["cooccurrence"]
    ref = cooccurrence_probe(model, data, m0)
    assert last["loss"] == pytest.approx(ref["loss"]) and last["attention_change"] == pytest.approx(
        ref["attention_change"]
    )
    assert last["phase1_end"] == cb.phase1_end


def test_callback_validation():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="'bogus'"):
        NTKCallback(x, mode="bogus")
    with pytest.raises(ValueError, match="'later'"):
        NTKCallback(x, reference="later")
    with pytest.raises(ValueError, match="every must be a positive int, got 0"):
        NTKCallback(x, every=0)
    with pytest.raises(ValueError, match="targets have 3 rows"):
        NTKCallback(x, targets=torch.zeros(3))


def test_ntk_callback_tenas_convention():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    cb = NTKCallback(x, every=1, convention="tenas", keep_kernels=True, reference=None)
    out = cb.compute(model)
    want = ntk_eigen_metrics(empirical_ntk(model, x, convention="tenas"))
    assert out["lambda_max"] == pytest.approx(want["lambda_max"])
    assert out["trace"] == pytest.approx(want["trace"])
    with pytest.raises(ValueError, match="'nngp'"):
        NTKCallback(x, convention="nngp")
