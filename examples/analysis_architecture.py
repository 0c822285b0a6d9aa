"""Training-free architecture metrics ("no free lunch"): MLPs of depth 1..6 with about the same
number of parameters (~20k), on scikit-learn's digits. For each: total extrinsic curvature along a
circle of inputs, NNGP lambda_min, NTK lambda_min and condition number, number of linear regions
met by 1000 inputs on a 2-D plane through the data; and the test accuracy after a short training.

Writes results/analysis/architecture.{json,png}.

    python examples/analysis_architecture.py
"""

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

from galore_opt.analysis.architecture import architecture_metrics

OUT = Path("results/analysis")
BUDGET = 20000
DEPTHS = [1, 2, 3, 4, 6]
SEEDS = [0, 1, 2]


def width_for(depth, d_in=64, d_out=10):
    # params ~ d_in*w + (depth-1)*w^2 + w*d_out
    a, b = depth - 1, d_in + d_out
    return int(BUDGET / b) if a == 0 else int((-b + math.sqrt(b * b + 4 * a * BUDGET)) / (2 * a))


def mlp(depth, width):
    layers, fan_in = [], 64
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, 10))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    xtr, ytr, xte, yte = x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]
    probe = xtr[:64]
    # a plane through two training points and the origin, sampled on a 2-D grid, for the regions
    u, v = xtr[0], xtr[1]
    grid = torch.stack(
        torch.meshgrid(torch.linspace(-1.5, 1.5, 32), torch.linspace(-1.5, 1.5, 32), indexing="ij"), -1
    ).reshape(-1, 2)
    plane = grid[:, :1] * u + grid[:, 1:] * v
    rows = []
    for depth in DEPTHS:
        w = width_for(depth)
        for seed in SEEDS:
            torch.manual_seed(seed)
            net = mlp(depth, w)
            n_params = sum(p.numel() for p in net.parameters())
            m = architecture_metrics(net, probe, n_angles=128, region_inputs=plane)
            opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
            g = torch.Generator().manual_seed(seed)
            for _ in range(300):
                idx = torch.randint(0, len(ytr), (64,), generator=g)
                opt.zero_grad()
                nn.functional.cross_entropy(net(xtr[idx]), ytr[idx]).backward()
                opt.step()
            with torch.no_grad():
                acc = float((net(xte).argmax(1) == yte).float().mean())
            rows.append({"depth": depth, "width": w, "params": n_params, "seed": seed, "test_accuracy": acc, **m})
    (OUT / "architecture.json").write_text(json.dumps(rows, indent=1))
    keys = [
        "total_curvature",
        "nngp_lambda_min",
        "ntk_lambda_min",
        "ntk_condition_number",
        "linear_regions",
        "test_accuracy",
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(20, 3.4))
    print(f"{'depth':>5} {'width':>5} {'params':>6} " + " ".join(f"{k:>20}" for k in keys))
    for ax, k in zip(axes, keys):
        means = [sum(r[k] for r in rows if r["depth"] == dep) / len(SEEDS) for dep in DEPTHS]
        ax.plot(DEPTHS, means, "o-")
        ax.set(title=k, xlabel="depth (~20k params)")
        if k in ("ntk_condition_number", "nngp_lambda_min", "ntk_lambda_min"):
            ax.set_yscale("log")
    for dep in DEPTHS:
        rs = [r for r in rows if r["depth"] == dep]
        print(
            f"{dep:5d} {rs[0]['width']:5d} {rs[0]['params']:6d} "
            + " ".join(f"{sum(r[k] for r in rs) / len(rs):20.4g}" for k in keys)
        )
    fig.tight_layout()
    fig.savefig(OUT / "architecture.png", dpi=110)
    print(f"wrote {OUT / 'architecture.json'} and {OUT / 'architecture.png'}")


if __name__ == "__main__":
    main()
