"""Pre-train a small LLaMA twice, with AdamW and with GaLoreAdamW, and compare (``make demo``).

Both runs start from the same random init and see the same batches of a corpus every machine has
(the Python standard library's sources, BPE-tokenised locally; see ``galore_opt.toy``). Nothing is
downloaded. Prints a summary table and writes ``loss.png`` and ``results.json`` to ``--out``.

Default learning rates: AdamW 1e-3 (it did better than 2e-3 and 3e-3 in 300-step tiny-model runs);
GaLoreAdamW 3e-3 with scale 0.25, so the projected matrices move at about 0.75e-3 while the
embeddings, norms and output head (plain AdamW inside GaLoreAdamW) use 3e-3.

    python examples/pretrain_llama.py                  # tiny model, ~5 min on a 2-core CPU
    python examples/pretrain_llama.py --size 60m --steps 2000 --batch 32 --seq 256 --rank 128
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import galore_opt
from galore_opt.layerwise import LayerwiseOptimizer
from galore_opt.toy import TokenStream, build_llama, llama_config, warmup_cosine

try:
    from galore_opt.utils import optimizer_state_bytes
except ImportError:  # pragma: no cover - only while the library is being written

    def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
        return sum(
            t.numel() * t.element_size()
            for state in optimizer.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor)
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", help="tiny, 60m, 130m, 350m, 1b, 7b (default tiny)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--galore-lr", type=float, default=3e-3, help="GaLoreAdamW learning rate")
    p.add_argument("--rank", type=int, default=64, help="GaLore rank")
    p.add_argument("--gap", type=int, default=50, help="GaLore update_proj_gap")
    p.add_argument("--scale", type=float, default=0.25, help="GaLore scale")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10%% of --steps)")
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--eval-batches", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--optimizers",
        default="AdamW,GaLoreAdamW",
        help=f"comma-separated runs, from {','.join(OPTIMIZERS)} (default AdamW,GaLoreAdamW)",
    )
    p.add_argument("--out", type=Path, default=Path("results/demo"))
    return p.parse_args(argv)


OPTIMIZERS = ("AdamW", "GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdamW-layerwise", "GaLoreAdamW8bit-layerwise")


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    losses = [model(input_ids=x, labels=x).loss.item() for x in batches]
    model.train()
    return sum(losses) / len(losses)


def train(
    name: str, args: argparse.Namespace, data: TokenStream, config: Any, eval_batches: list[torch.Tensor]
) -> dict[str, Any]:
    model = build_llama(config, seed=args.seed)
    model.train()
    groups = galore_opt.galore_param_groups(
        model,
        target_modules=["attn", "mlp"],
        rank=args.rank,
        update_proj_gap=args.gap,
        scale=args.scale,
        weight_decay=args.weight_decay,
    )
    if name == "AdamW":
        # the same decay / no-decay split, without the GaLore keys
        plain = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups]
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(plain, lr=args.lr)
        lr = args.lr
    else:
        cls = galore_opt.GaLoreAdamW8bit if name.startswith("GaLoreAdamW8bit") else galore_opt.GaLoreAdamW
        optimizer = cls(groups, lr=args.galore_lr, seed=args.seed)
        if name.endswith("-layerwise"):
            # updates happen inside backward; step()/zero_grad() below are bookkeeping
            optimizer = LayerwiseOptimizer(optimizer)
        lr = args.galore_lr
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps, warmup))

    losses: list[float] = []
    step_s: list[float] = []
    opt_s: list[float] = []
    batches = data.batches(args.batch, args.seq, seed=args.seed)
    bar = tqdm(range(args.steps), desc=f"{name:>11}", dynamic_ncols=True)
    for _ in bar:
        x = next(batches)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        t2 = time.perf_counter()
        losses.append(loss.item())
        step_s.append(t2 - t0)
        opt_s.append(t2 - t1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", step_ms=f"{1e3 * step_s[-1]:.0f}")
    bar.close()

    eval_loss = evaluate(model, eval_batches)
    tail = losses[-20:]
    return {
        "optimizer": name,
        "lr": lr,
        "train_losses": losses,
        "final_train_loss": sum(tail) / len(tail),
        "eval_loss": eval_loss,
        "eval_ppl": math.exp(eval_loss),
        "optimizer_state_mib": optimizer_state_bytes(optimizer) / 2**20,
        # the first step allocates the optimizer state (and GaLore's first bases): left out
        "step_ms": 1e3 * sum(step_s[1:]) / max(1, len(step_s) - 1),
        "optimizer_step_ms": 1e3 * sum(opt_s[1:]) / max(1, len(opt_s) - 1),
        "train_seconds": sum(step_s),
    }


def plot(results: list[dict[str, Any]], path: Path, title: str, window: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for r, color in zip(results, ("tab:blue", "tab:orange"), strict=False):
        y = torch.tensor(r["train_losses"])
        x = torch.arange(1, len(y) + 1)
        ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
        if len(y) >= window:  # moving average
            smooth = y.unfold(0, window, 1).mean(dim=1)
            ax.plot(x[window - 1 :], smooth, color=color, linewidth=1.8)
        label = (
            f"{r['optimizer']} (lr {r['lr']:g}): eval {r['eval_loss']:.3f}, state {r['optimizer_state_mib']:.1f} MiB"
        )
        ax.plot([], [], color=color, linewidth=1.8, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (raw, and 20-step mean)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    data = TokenStream.from_local_corpus(vocab_size=args.vocab)
    config = llama_config(args.size, data.vocab_size)
    eval_batches = data.eval_batches(args.batch, args.seq, max_batches=args.eval_batches)
    n_params = sum(p.numel() for p in build_llama(config, seed=args.seed).parameters())
    print(
        f"LLaMA-{args.size}: {n_params / 1e6:.2f}M params | corpus: {len(data.train) / 1e6:.2f}M train / "
        f"{len(data.eval) / 1e3:.0f}k eval tokens, vocab {data.vocab_size} | {args.steps} steps of "
        f"{args.batch}x{args.seq} tokens | torch threads {torch.get_num_threads()}"
    )

    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        raise SystemExit(f"unknown --optimizers {unknown or args.optimizers!r}: choose from {', '.join(OPTIMIZERS)}")
    results = [train(name, args, data, config, eval_batches) for name in names]

    header = f"{'optimizer':<26} {'lr':>7} {'train loss':>10} {'eval loss':>9} {'eval ppl':>9} {'state MiB':>9} {'step ms':>8} {'opt ms':>7}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        print(
            f"{r['optimizer']:<26} {r['lr']:>7.0e} {r['final_train_loss']:>10.3f} {r['eval_loss']:>9.3f} "
            f"{r['eval_ppl']:>9.1f} {r['optimizer_state_mib']:>9.2f} {r['step_ms']:>8.1f} {r['optimizer_step_ms']:>7.1f}"
        )
    print(
        f"(train loss: mean of the last 20 steps; eval: {len(eval_batches)} held-out batches; "
        "step ms: mean without the first step; opt ms: its optimizer.step part)"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    title = (
        f"LLaMA-{args.size} ({n_params / 1e6:.1f}M) on stdlib sources, {args.steps} steps x {args.batch}x{args.seq}; "
        f"GaLore rank {args.rank}, gap {args.gap}, scale {args.scale:g}"
    )
    plot(results, args.out / "loss.png", title)
    summary = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model_params": n_params,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": time.perf_counter() - start,
        "runs": results,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out / 'loss.png'} and {args.out / 'results.json'} ({summary['wall_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
