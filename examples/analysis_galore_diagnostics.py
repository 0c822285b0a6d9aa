"""GaLore's own diagnostics on a tiny LLaMA: how much gradient energy each basis captures, at
refresh and as it ages, how far the basis moves between refreshes, and what that suggests about
``rank`` and ``update_proj_gap``.

Trains a small LLaMA (``galore_opt.toy``, offline: the corpus is Python's standard library) with
:class:`~galore_opt.GaLoreAdamW` for a few hundred steps, observes every step with
:class:`~galore_opt.analysis.galore_diagnostics.GaLoreDiagnostics`, prints the per-matrix summary
and the suggestions, and plots captured energy over steps to
``results/analysis/galore_diagnostics.png`` (with the numbers in ``galore_diagnostics.json``)::

    OMP_NUM_THREADS=1 python examples/analysis_galore_diagnostics.py --steps 200 --rank 16 --gap 50
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from galore_opt import GaLoreAdamW, galore_param_groups
from galore_opt.analysis.galore_diagnostics import GaLoreDiagnostics
from galore_opt.toy import TokenStream, build_llama, llama_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--gap", type=int, default=50)
    ap.add_argument("--proj-method", default=None, choices=[None, "svd", "randomized", "power"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--out", default="results/analysis")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    stream = TokenStream.from_local_corpus(max_bytes=1_000_000, vocab_size=1024)
    config = llama_config(
        "tiny",
        stream.vocab_size,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    model = build_llama(config, seed=0)
    groups = galore_param_groups(model, rank=args.rank, update_proj_gap=args.gap, proj_method=args.proj_method)
    opt = GaLoreAdamW(groups, lr=3e-3)
    diag = GaLoreDiagnostics(opt, model)
    timeline: dict[str, list[tuple[int, float, bool]]] = {}
    batches = stream.batches(args.batch, args.seq, seed=0)
    for step in range(1, args.steps + 1):
        ids = next(batches)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for name, entry in diag.observe().items():
            timeline.setdefault(name, []).append((step, entry["captured_energy"], bool(entry["refreshed"])))
        if step % 50 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f} s)")

    summary = diag.summary()
    print(f"\nper matrix (rank {args.rank}, update_proj_gap {args.gap}):")
    print(f"{'matrix':<42}{'refr':>5}{'E@refresh':>10}{'E between':>10}{'optimal':>9}{'drift':>7}{'max angle':>10}")
    for name, s in summary.items():
        if name == "overall":
            continue
        print(
            f"{name.replace('model.layers.', 'L'):<42}{int(s['refreshes']):>5}{s['energy_at_refresh']:>10.3f}"
            f"{s['energy_between']:>10.3f}{s['optimal_energy']:>9.3f}{s['drift']:>7.3f}{s['max_angle_deg']:>9.1f}°"
        )
    o = summary["overall"]
    print(
        f"\noverall: energy at refresh {o['energy_at_refresh']:.3f} (optimal rank-{args.rank} "
        f"{o['optimal_energy']:.3f}), between refreshes {o['energy_between']:.3f}, drift {o['drift']:.3f}"
    )
    suggestions = diag.suggestions()  # one per matrix and rule, all in the JSON
    grouped = diag.grouped_suggestions()  # one line per rule
    print(f"\n{len(suggestions)} suggestions ({len(grouped)} rules)" + (":" if grouped else ""))
    for s in grouped:
        print(" -", s)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
    (out / "galore_diagnostics.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "summary": {k: {kk: clean(vv) for kk, vv in v.items()} for k, v in summary.items()},
                "suggestions": suggestions,
                "timeline": timeline,
            },
            indent=1,
        )
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for name, points in timeline.items():
        steps, energy, _ = zip(*points)
        ax.plot(steps, energy, lw=0.8, alpha=0.7, label=name.replace("model.layers.", "L"))
    ax.set_xlabel("step")
    ax.set_ylabel("captured gradient energy ||P^T G||^2 / ||G||^2")
    ax.set_title(f"GaLore rank {args.rank}, gap {args.gap}: captured energy per matrix")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "galore_diagnostics.png", dpi=110)
    print(
        f"\nwrote {out / 'galore_diagnostics.json'} and {out / 'galore_diagnostics.png'} ({time.perf_counter() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
