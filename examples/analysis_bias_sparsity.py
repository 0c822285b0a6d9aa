"""Bias-induced sparsity: (1) the first-layer NTK of BiasSparseMLP converges to the closed-form
H_B as the width grows; (2) the active fraction stays near P(N(0,1) >= B) while training.

Writes results/analysis/bias_sparsity.{json,png}.

    python examples/analysis_bias_sparsity.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from galore_opt.analysis.bias_sparsity import BiasSparseMLP, active_probability, bias_ntk_limit, first_layer_ntk
from galore_opt.analysis.callbacks import LoopCallbacks
from galore_opt.analysis.ntk_callbacks import ActivationSparsityCallback

OUT = Path("results/analysis")
BIASES = [0.0, 1.0, 2.0]
WIDTHS = [500, 2000, 8000, 32000]
D = 10


def sphere(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    x = sphere(32, 0)
    conv = {}
    for b in BIASES:
        h = bias_ntk_limit(x, bias=b)
        conv[b] = []
        for m in WIDTHS:
            net = BiasSparseMLP(D, m, b, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            err = float((first_layer_ntk(net, x) - h).norm() / h.norm())
            conv[b].append(err)
    # training: regression on a random teacher (unit-sphere inputs), full-batch GD on w and b
    xtr, xpr = sphere(256, 2), sphere(128, 3)
    teacher = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).double()
    with torch.no_grad():
        ytr = teacher(xtr)[:, 0]
        ytr = (ytr - ytr.mean()) / ytr.std()
    train = {}
    for b in BIASES:
        net = BiasSparseMLP(D, 4000, b, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        opt = torch.optim.SGD(
            [p for p in net.parameters() if p.requires_grad], lr=1.0 / max(float(active_probability(b)), 0.05)
        )
        runner = LoopCallbacks([ActivationSparsityCallback(xpr, every=50)])
        runner.step(0, net)
        losses = []
        for step in range(1, 501):
            opt.zero_grad()
            loss = 0.5 * ((net(xtr)[:, 0] - ytr) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(float(loss))
            runner.step(step, net, opt)
        steps, frac = runner.series("activation_sparsity", "active_fraction")
        train[b] = {"steps": steps, "active_fraction": frac, "loss": losses[::10], "final_loss": losses[-1]}
    (OUT / "bias_sparsity.json").write_text(
        json.dumps({"widths": WIDTHS, "ntk_rel_error": conv, "training": train}, indent=1)
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for b in BIASES:
        axes[0].loglog(WIDTHS, conv[b], "o-", label=f"B={b:g}")
        axes[1].plot(train[b]["steps"], train[b]["active_fraction"], "o-", label=f"B={b:g}")
        axes[1].axhline(float(active_probability(b)), ls="--", color="gray", lw=0.8)
        axes[2].semilogy(range(0, 500, 10), train[b]["loss"], label=f"B={b:g}")
    axes[0].loglog(WIDTHS, [conv[1.0][0] * (WIDTHS[0] / w) ** 0.5 for w in WIDTHS], ":", color="k", label="~ m^-1/2")
    axes[0].set(xlabel="width m", ylabel="||Theta - H_B|| / ||H_B||", title="first-layer NTK vs H_B")
    axes[1].set(xlabel="step", ylabel="active fraction", title="activation sparsity during training (dashed: P(N>=B))")
    axes[2].set(xlabel="step", ylabel="train MSE / 2", title="training loss, width 4000")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "bias_sparsity.png", dpi=110)
    for b in BIASES:
        print(
            f"B={b:g}: NTK rel. error vs H_B "
            + ", ".join(f"m={m}: {e:.4f}" for m, e in zip(WIDTHS, conv[b]))
            + f" | active fraction {train[b]['active_fraction'][0]:.4f} -> {train[b]['active_fraction'][-1]:.4f}"
            + f" (P(N>=B) = {float(active_probability(b)):.4f}), final loss {train[b]['final_loss']:.4f}"
        )
    print(f"wrote {OUT / 'bias_sparsity.json'} and {OUT / 'bias_sparsity.png'}")


if __name__ == "__main__":
    main()
