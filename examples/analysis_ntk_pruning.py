"""Random pruning and the NTK: pruned-NTK / dense-NTK against the pruning probability, with and
without the 1/sqrt(1-p) rescaling (three pruned layers, width 1500, NTK parametrization).

Writes results/analysis/ntk_pruning.{json,png}.

    python examples/analysis_ntk_pruning.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from galore_opt.analysis.ntk import ntk_mlp
from galore_opt.analysis.random_pruning import pruned_ntk_comparison

OUT = Path("results/analysis")
PS = [0.1, 0.3, 0.5, 0.7, 0.9]
SEEDS = [0, 1, 2]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        net = ntk_mlp(16, 1500, 2, 1)
        x = 4 * torch.nn.functional.normalize(torch.randn(16, 16), dim=1)
        for p in PS:
            for rescale in (False, True):
                g = torch.Generator().manual_seed(1000 + seed)  # not the init's seed (correlated streams)
                r = pruned_ntk_comparison(net, x, p, rescale=rescale, generator=g)
                rows.append({"seed": seed, "p": p, "rescale": rescale, **r})
    (OUT / "ntk_pruning.json").write_text(json.dumps(rows, indent=1))
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for rescale, color in ((False, "C0"), (True, "C1")):
        mean = [sum(r["ratio"] for r in rows if r["p"] == p and r["rescale"] == rescale) / len(SEEDS) for p in PS]
        ax.plot(PS, mean, "o-", color=color, label=f"measured, rescale={rescale}")
        pred = [rows[[r["p"] for r in rows].index(p) + (1 if rescale else 0)]["predicted_ratio"] for p in PS]
        ax.plot(PS, pred, "--", color=color, label=f"predicted {'1' if rescale else '(1-p)^3'}")
    ax.set_yscale("log")
    ax.set_xlabel("pruning probability p")
    ax.set_ylabel("pruned NTK / dense NTK")
    ax.legend(fontsize=8)
    ax.set_title("Random pruning, 3 pruned layers, width 1500")
    fig.tight_layout()
    fig.savefig(OUT / "ntk_pruning.png", dpi=110)
    print(f"{'p':>4} {'unscaled':>9} {'(1-p)^3':>8} {'rescaled':>9} {'kernel dist':>11}")
    for p in PS:
        un = [r for r in rows if r["p"] == p and not r["rescale"]]
        re = [r for r in rows if r["p"] == p and r["rescale"]]
        print(
            f"{p:4.1f} {sum(r['ratio'] for r in un) / len(un):9.4f} {un[0]['predicted_ratio']:8.4f} "
            f"{sum(r['ratio'] for r in re) / len(re):9.4f} {sum(r['kernel_distance'] for r in re) / len(re):11.4f}"
        )
    print(f"wrote {OUT / 'ntk_pruning.json'} and {OUT / 'ntk_pruning.png'}")


if __name__ == "__main__":
    main()
