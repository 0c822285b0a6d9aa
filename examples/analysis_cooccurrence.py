"""Training dynamics of a shallow transformer on word co-occurrence (full-batch GD from a small
Gaussian init). Plots the MLP alignment w_O^T W_V mu_k, the attention scores mu_i^T W_Q^T W_K mu_j
and the attention mass on the designated words, and the per-type losses with the max/min
per-sample loss ratio; marks the end of phase 1. Two init scales are run.

Writes results/analysis/cooccurrence.{json,png}.

    python examples/analysis_cooccurrence.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from galore_opt.analysis.cooccurrence import CooccurrenceConfig, train_cooccurrence

OUT = Path("results/analysis")
CONFIGS = {
    "init_std=0.1": CooccurrenceConfig(init_std=0.1, lr=0.5, steps=3000, log_every=10),
    "init_std=0.01": CooccurrenceConfig(init_std=0.01, lr=0.5, steps=3000, log_every=10),
}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    results = {name: train_cooccurrence(cfg) for name, cfg in CONFIGS.items()}
    (OUT / "cooccurrence.json").write_text(json.dumps(results, indent=1))
    fig, axes = plt.subplots(len(results), 4, figsize=(19, 3.6 * len(results)), squeeze=False)
    for row, (name, res) in zip(axes, results.items()):
        h = res["history"]
        s = [e["step"] for e in h]
        for k in ("mu1", "mu2", "mu3"):
            row[0].plot(s, [e["alignment"][k] for e in h], label=f"w_O^T W_V {k}")
        for key in ("score_mu1_mu2", "score_mu2_mu1", "score_mu1_mu1"):
            row[1].plot(s, [e[key] for e in h], label=key)
        row[2].plot(s, [e["attention_on_designated"] for e in h], label="attention on mu1, mu2 ('both')")
        row[2].axhline(2 / res["config"]["seq_len"], ls=":", color="gray", label="uniform 2/L")
        for t in h[0]["loss_by_type"]:
            row[3].semilogy(s, [e["loss_by_type"][t] for e in h], label=f"loss {t}")
        ax2 = row[3].twinx()
        ax2.semilogy(s, [e["balance_ratio"] for e in h], "k:", lw=1, label="max/min loss")
        ax2.set_ylabel("max/min per-sample loss")
        for ax in row:
            ax.set_xscale("symlog", linthresh=10)
            ax.set_xlim(left=0)
            if res["phase1_end"]:
                ax.axvline(res["phase1_end"], color="red", ls="--", lw=1)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        row[0].set_title(f"{name}: MLP alignment (red: end of phase 1)")
        row[1].set_title("attention scores mu_i^T W_Q^T W_K mu_j")
        row[2].set_title("attention mass on designated tokens")
        row[3].set_title("per-type losses")
    fig.tight_layout()
    fig.savefig(OUT / "cooccurrence.png", dpi=100)
    for name, res in results.items():
        p1 = next(e for e in res["history"] if e.get("phase1_end"))
        late = [e["balance_ratio"] for e in res["history"] if e["step"] >= res["config"]["steps"] // 2]
        print(
            f"{name}: phase 1 ends at step {res['phase1_end']} of {res['config']['steps']} | "
            f"||Delta W_Q^T W_K||/||M_0||: phase 1 {res['attention_change_phase1']:.3g}, phase 2 {res['attention_change_phase2']:.3g} | "
            f"||Delta alignment||/||a_0||: phase 1 {res['alignment_change_phase1']:.3g}, phase 2 {res['alignment_change_phase2']:.3g} | "
            f"attention on designated: init {res['history'][0]['attention_on_designated']:.3f}, "
            f"phase-1 end {p1['attention_on_designated']:.3f}, final {res['final']['attention_on_designated']:.3f} | "
            f"max/min loss: max over phase 2 {res['max_balance_ratio_phase2']:.3g}, second half {min(late):.3g}-{max(late):.3g} | "
            f"final loss {res['final_loss']:.2e}"
        )
    print(f"wrote {OUT / 'cooccurrence.json'} and {OUT / 'cooccurrence.png'}")


if __name__ == "__main__":
    main()
