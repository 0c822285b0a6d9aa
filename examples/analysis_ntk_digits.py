"""NTK during training: an MLP on scikit-learn's bundled digits, GaLoreAdamW vs AdamW.

Logs lambda_min, condition number, kernel distance to init and kernel-target alignment of the
empirical NTK on a probe batch of 128 (NTKCallback in a plain loop), and the NTK-regression test
MSE/accuracy at init and after training. Writes results/analysis/ntk_digits.{json,png}.

    python examples/analysis_ntk_digits.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

from galore_opt import GaLoreAdamW, galore_param_groups
from galore_opt.analysis.callbacks import LoopCallbacks
from galore_opt.analysis.ntk import empirical_ntk, ntk_regression
from galore_opt.analysis.ntk_callbacks import NTKCallback

OUT = Path("results/analysis")
STEPS, EVERY = 300, 25


def data():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def mlp():
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def regression(model, xtr, ytr, xte, yte):
    model.eval()
    ktr = empirical_ntk(model, xtr, chunk_size=64)
    kte = empirical_ntk(model, xte, xtr, chunk_size=64)
    model.train()
    return ntk_regression(ktr, kte, ytr, yte, num_classes=10, ridge=1e-6 * float(ktr.diagonal().mean()))


def run(name, xtr, ytr, xte, yte):
    torch.manual_seed(0)
    model = mlp()
    if name == "galore":
        opt = GaLoreAdamW(galore_param_groups(model, rank=32, update_proj_gap=50, scale=0.25, lr=3e-3))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe, probe_y = xtr[:128], ytr[:128]
    runner = LoopCallbacks([NTKCallback(probe, every=EVERY, targets=probe_y)])
    reg0 = regression(model, xtr[:512], ytr[:512], xte, yte)
    runner.step(0, model)
    g = torch.Generator().manual_seed(1)
    for step in range(1, STEPS + 1):
        idx = torch.randint(0, len(ytr), (128,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
        runner.step(step, model, opt)
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    reg1 = regression(model, xtr[:512], ytr[:512], xte, yte)
    return {
        "history": runner.to_json(),
        "test_accuracy": acc,
        "ntk_regression_init": reg0,
        "ntk_regression_final": reg1,
    }


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = data()
    results = {name: run(name, xtr, ytr, xte, yte) for name in ("adamw", "galore")}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for name, res in results.items():
        steps = [h["step"] for h in res["history"]]
        for ax, key in zip(axes, ["lambda_min", "condition_number", "kernel_distance", "kernel_target_alignment"]):
            ax.plot(steps, [h["ntk"][key] for h in res["history"]], marker="o", label=name)
            ax.set_title(key)
            ax.set_xlabel("step")
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.suptitle("Empirical NTK (sum of logits) on 128 digits, MLP 64-256-256-10")
    fig.tight_layout()
    fig.savefig(OUT / "ntk_digits.png", dpi=110)
    (OUT / "ntk_digits.json").write_text(json.dumps(results, indent=1))
    for name, res in results.items():
        last = res["history"][-1]["ntk"]
        print(
            f"{name:7s} test acc {res['test_accuracy']:.3f} | NTK: kernel distance {last['kernel_distance']:.3f}, "
            f"alignment {res['history'][0]['ntk']['kernel_target_alignment']:.3f} -> {last['kernel_target_alignment']:.3f}, "
            f"cond {res['history'][0]['ntk']['condition_number']:.3g} -> {last['condition_number']:.3g} | "
            f"NTK regression acc {res['ntk_regression_init']['accuracy']:.3f} (init) -> {res['ntk_regression_final']['accuracy']:.3f}"
        )
    print(f"wrote {OUT / 'ntk_digits.json'} and {OUT / 'ntk_digits.png'}")


if __name__ == "__main__":
    main()
