import pytest
import torch
import torch.nn.functional as F
from torch import nn

from galore_opt import GaLoreAdamW
from galore_opt.analysis.callbacks import LoopCallbacks, attach_to_trainer
from galore_opt.analysis.pruning import prune_at_init
from galore_opt.analysis.pruning_callbacks import (
    GaLoreDiagnosticsCallback,
    MaskKeeperCallback,
    RamanujanCallback,
    SparsityCallback,
)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def _optimizer(model):
    galore = [model.net[0].weight, model.net[2].weight]
    rest = [p for p in model.parameters() if all(p is not q for q in galore)]
    return GaLoreAdamW([{"params": galore, "rank": 4, "update_proj_gap": 3}, {"params": rest}], lr=1e-2)


def _callbacks(model, x):
    masks = prune_at_init(model.net, "magnitude", 0.3)
    masks = {f"net.{k}": v for k, v in masks.items()}
    return [
        MaskKeeperCallback(masks, every=2),
        RamanujanCallback(every=2, per_layer=True),
        SparsityCallback(every=2, probe=x),
        GaLoreDiagnosticsCallback(every=2, per_matrix=True),
    ]


def test_callbacks_in_plain_loop():
    torch.manual_seed(0)
    model = TinyNet()
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    opt = _optimizer(model)
    logged = []
    runner = LoopCallbacks(_callbacks(model, x), log=lambda step, flat: logged.append((step, flat)))
    runner.step(0, model, opt)
    for step in range(1, 9):
        opt.zero_grad()
        model(x, y)["loss"].backward()
        opt.step()
        runner.step(step, model, opt, (x, y))
    steps, max_pruned = runner.series("masks", "max_pruned")
    assert steps == [0, 2, 4, 6, 8] and all(v == 0.0 for v in max_pruned)
    _, density = runner.series("ramanujan", "density")
    assert all(d == pytest.approx(runner.history[0]["masks"]["density"]) for d in density)
    _, w = runner.series("sparsity", "weight")
    assert w[-1]["overall"] == pytest.approx(0.7, abs=1e-3)
    assert 0.0 < runner.history[-1]["sparsity"]["activation"]["overall"] < 1.0
    galore = runner.history[-1]["galore"]
    assert 0.0 < galore["energy_at_refresh"] <= 1.0 and "net.0.weight" in galore["matrices"]
    diag = runner.callbacks[3].diagnostics
    assert (
        diag.steps_observed == 8 and diag.tracks["net.2.weight"].refreshes == 3
    )  # cold start, then (stagger offset 1) optimizer steps 5 and 8
    assert "ramanujan/delta_r_norm" in logged[-1][1] and "galore/drift" in logged[-1][1]
    assert runner.to_json()


def test_callbacks_in_transformers_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import Dataset

    class Data(Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)

        def __len__(self):
            return 64

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    torch.manual_seed(0)
    model = TinyNet()
    data = Data()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=16,
        logging_steps=100,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(_optimizer(model), None))
    cbs = _callbacks(model, data.x[:32])
    handle = attach_to_trainer(trainer, cbs)
    trainer.train()
    steps = [h["step"] for h in handle.history]
    assert steps == [0, 2, 4, 6]
    assert all(h["masks"]["max_pruned"] == 0.0 for h in handle.history)
    assert cbs[3].diagnostics is not None and cbs[3].diagnostics.steps_observed == 6
    logged = [h for h in trainer.state.log_history if "ramanujan/delta_r_norm" in h]
    assert len(logged) == 4 and any("galore/energy_at_refresh" in h for h in logged)
    w = model.net[2].weight.detach()
    assert int(w.count_nonzero()) == int(cbs[0].masks["net.2"].sum())


def test_ramanujan_callback_passes_the_convention_through():
    from galore_opt.analysis.ramanujan import model_scores

    torch.manual_seed(0)
    model = TinyNet()
    masks = {"net.0": (torch.rand(32, 16) < 0.5).float(), "net.2": torch.ones(32, 32), "net.4": torch.eye(4, 32)}
    for convention in ("authors", "library"):
        cb = RamanujanCallback(every=1, masks=masks, convention=convention)
        got = cb.compute(model)
        want = model_scores(model, masks, convention=convention)
        for key in ("narc", "weighted_gap", "fs_norm", "imdb"):
            assert got[key] == pytest.approx(want[key], nan_ok=True)
    assert RamanujanCallback(masks=masks).compute(model)["narc"] != pytest.approx(
        RamanujanCallback(masks=masks, convention="library").compute(model)["narc"]
    )
    with pytest.raises(ValueError, match="'paper'"):
        RamanujanCallback(convention="paper")
