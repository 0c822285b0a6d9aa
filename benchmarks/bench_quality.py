"""Training quality: the same small LLaMA trained on the same local text with each optimizer, for a
fixed token budget; loss curves and the final evaluation loss / perplexity.

Data: ``galore_opt.toy.TokenStream.from_local_corpus``: the running Python's standard-library sources
(every machine with Python has them), tokenised with a byte-level BPE trained locally (cached under
``~/.cache/galore_opt``); nothing is downloaded. Every run starts from the same random init (seed)
and sees the same batches in the same order; the evaluation set is the held-out last 5 % of the
corpus, cut into consecutive windows (the same for every run).

Optimizers (``--optimizers``): ``adamw`` (``torch.optim.AdamW``, lr ``--lr``), ``galore-torch``
(galore-torch 1.0 ``GaLoreAdamW``: full SVD every gap), ``ours-svd`` (galore-opt ``GaLoreAdamW``
with ``proj_method="svd"``: exact SVD refreshes), ``ours`` (the default: ``proj_method="power"``, one
warm-started subspace iteration with basis alignment), ``ours-8bit`` (``GaLoreAdamW8bit``);
``ours-randomized`` on request. GaLore runs use ``--galore-lr`` with scale 0.25 on the attention and
MLP matrices (the rest: plain AdamW at ``--galore-lr``), as in ``examples/pretrain_llama.py``. LR
schedule: linear warm-up over 10 % of the steps, then cosine decay to 10 % (the GaLore paper's).

``--scale`` picks a preset; any explicit flag overrides it:

* ``cpu`` (default): LLaMA-tiny (4 layers, width 256, 4096-token vocabulary, ~5.7M params), 300
  steps of 8 x 128 tokens (307k tokens), rank 64, gap 50: about 1.5 min per optimizer on 2 cores;
* ``gpu``: LLaMA-60m, 1500 steps of 16 x 256 (6.1M tokens), rank 128, gap 200, ``--device cuda``;
* ``smoke``: a one-layer tiny model, a few steps (the test suite's).

Output: a Markdown table on stdout, JSON ``benchmarks/results/bench_quality-<cpu|gpu>-<date>.json``
(``--out``) and the loss curves ``<json stem>-loss.png``.

    python benchmarks/bench_quality.py                     # CPU preset
    python benchmarks/bench_quality.py --scale gpu
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import torch  # noqa: E402

import galore_opt  # noqa: E402
from galore_opt.toy import LLAMA_SIZES, TokenStream, build_llama, llama_config, warmup_cosine  # noqa: E402

OPTIMIZERS = {
    "adamw": "torch AdamW",
    "galore-torch": "galore-torch GaLoreAdamW (full SVD)",
    "ours-svd": "ours GaLoreAdamW (svd refresh)",
    "ours": "ours GaLoreAdamW (power refresh, default)",
    "ours-8bit": "ours GaLoreAdamW8bit",
    "ours-randomized": "ours GaLoreAdamW (randomized refresh)",
}
DEFAULT_OPTIMIZERS = ("adamw", "galore-torch", "ours-svd", "ours", "ours-8bit")
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(size="tiny", layers=None, steps=300, batch=8, seq=128, rank=64, gap=50, vocab=4096,
                corpus_bytes=8_000_000, eval_batches=16, eval_points=6, device="cpu", dtype="float32"),
    "gpu": dict(size="60m", layers=None, steps=1500, batch=16, seq=256, rank=128, gap=200, vocab=4096,
                corpus_bytes=8_000_000, eval_batches=64, eval_points=10, device="cuda", dtype="float32"),
    "smoke": dict(size="tiny", layers=1, steps=6, batch=2, seq=32, rank=16, gap=3, vocab=512,
                  corpus_bytes=300_000, eval_batches=2, eval_points=2, device="cpu", dtype="float32"),
}


def make_optimizer(kind: str, model: torch.nn.Module, args: argparse.Namespace) -> tuple[torch.optim.Optimizer, float]:
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr), args.lr
    method = {"ours-svd": "svd", "ours-randomized": "randomized"}.get(kind)
    groups = galore_opt.galore_param_groups(model, target_modules=["self_attn", "mlp"], rank=args.rank,
                                            update_proj_gap=args.gap, scale=0.25, proj_type="std", proj_method=method)
    lr = args.galore_lr
    if kind == "galore-torch":
        from galore_torch import GaLoreAdamW as GT

        keys = ("rank", "update_proj_gap", "scale", "proj_type")
        groups = [{"params": g["params"], **{k: g[k] for k in keys}} if "rank" in g else
                  {"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups]
        return GT(groups, lr=lr, no_deprecation_warning=True), lr
    cls = galore_opt.GaLoreAdamW8bit if kind == "ours-8bit" else galore_opt.GaLoreAdamW
    return cls(groups, lr=lr, seed=args.seed), lr


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    losses = [float(model(input_ids=x, labels=x).loss) for x in batches]
    model.train()
    return sum(losses) / len(losses)


def train_one(kind: str, args: argparse.Namespace, data: TokenStream, cfg: Any,
              eval_batches: list[torch.Tensor]) -> dict[str, Any]:
    from tqdm import tqdm

    dtype = getattr(torch, args.dtype)
    model = build_llama(cfg, args.seed).to(device=args.device, dtype=dtype)
    model.train()
    opt, lr = make_optimizer(kind, model, args)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.steps, warmup))
    batches = data.batches(args.batch, args.seq, seed=args.seed)
    eval_every = max(1, args.steps // max(1, args.eval_points))
    eval_curve: list[tuple[int, float]] = [(0, evaluate(model, eval_batches))]
    losses: list[float] = []
    monitor = C.CpuMonitor().start()
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"{kind:>15}", dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        x = next(batches).to(args.device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            bar.write(f"  {kind}: non-finite loss at step {step}; stopping this run")
            break
        if (step + 1) % eval_every == 0 or step + 1 == args.steps:
            eval_curve.append((step + 1, evaluate(model, eval_batches)))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", eval=f"{eval_curve[-1][1]:.3f}")
    bar.close()
    wall = time.perf_counter() - t0
    if eval_curve[-1][0] != len(losses):
        eval_curve.append((len(losses), evaluate(model, eval_batches)))
    final = eval_curve[-1][1]
    tail = losses[-max(1, min(20, len(losses))):]
    return {
        "optimizer": kind,
        "label": OPTIMIZERS[kind],
        "lr": lr,
        "steps_done": len(losses),
        "train_losses": losses,
        "final_train_loss": sum(tail) / len(tail),
        "eval_curve": eval_curve,
        "eval_loss": final,
        "eval_ppl": math.exp(final) if final < 50 else float("inf"),
        "state_bytes": galore_opt.optimizer_state_bytes(opt),
        "wall_s": wall,
        "s_per_step": wall / max(1, len(losses)),
        "others_cpu": monitor.stop(),
    }


def plot(runs: list[dict[str, Any]], path: Path, title: str, window: int = 20) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    colors = {"adamw": "tab:blue", "galore-torch": "tab:gray", "ours-svd": "tab:green", "ours": "tab:orange",
              "ours-8bit": "tab:red", "ours-randomized": "tab:purple"}
    for r in runs:
        c = colors.get(r["optimizer"], None)
        y = torch.tensor(r["train_losses"])
        x = torch.arange(1, len(y) + 1)
        w = min(window, max(1, len(y)))
        smooth = y.unfold(0, w, 1).mean(dim=1) if len(y) >= w else y
        ax.plot(x[w - 1:] if len(y) >= w else x, smooth, color=c, linewidth=1.6,
                label=f"{r['label']}: eval {r['eval_loss']:.3f}")
        ex, ey = zip(*r["eval_curve"], strict=True)
        ax2.plot(ex[1:], ey[1:], marker="o", markersize=3, color=c, label=r["label"])
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss ({window}-step mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out eval loss")
    ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--scale", default="cpu", choices=tuple(PRESETS), help="preset; the flags below override it")
    ap.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS), help=f"comma list of {', '.join(OPTIMIZERS)}")
    for name, typ, what in (("size", str, f"model size ({', '.join(LLAMA_SIZES)})"),
                            ("layers", int, "override the number of decoder layers"),
                            ("steps", int, "optimizer steps"), ("batch", int, "sequences per step"),
                            ("seq", int, "tokens per sequence"), ("rank", int, "GaLore rank"),
                            ("gap", int, "GaLore update_proj_gap"), ("vocab", int, "BPE vocabulary size"),
                            ("corpus_bytes", int, "bytes of stdlib text to tokenise"),
                            ("eval_batches", int, "held-out batches per evaluation"),
                            ("eval_points", int, "evaluations during training"),
                            ("device", str, "cpu or cuda[:N]"), ("dtype", str, "float32 or bfloat16")):
        ap.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=f"{what} (default: the preset's)")
    ap.add_argument("--lr", type=float, default=1e-3, help="torch AdamW learning rate")
    ap.add_argument("--galore-lr", type=float, default=3e-3, help="learning rate of the GaLore runs (scale 0.25)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default on the CPU: 1; CUDA: torch's)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default benchmarks/results/bench_quality-<cpu|gpu>-<date>.json); PNG beside it")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    for key, value in PRESETS[args.scale].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.size = args.size.lower()
    if args.size not in LLAMA_SIZES:
        ap.error(f"unknown --size {args.size!r}; choose from {', '.join(LLAMA_SIZES)}")
    args.optimizers = [k.strip() for k in args.optimizers.split(",") if k.strip()]
    if not args.optimizers:
        ap.error("--optimizers is empty")
    for k in args.optimizers:
        if k not in OPTIMIZERS:
            ap.error(f"unknown optimizer {k!r}; choose from {', '.join(OPTIMIZERS)}")
    if "galore-torch" in args.optimizers and importlib.util.find_spec("galore_torch") is None:
        ap.error("galore-torch is not installed (pip install galore-torch) or leave it out of --optimizers")
    for name, low in (("steps", 1), ("batch", 1), ("seq", 2), ("rank", 1), ("gap", 1), ("vocab", 260),
                      ("corpus_bytes", 10_000), ("eval_batches", 1), ("eval_points", 1), ("layers", 1),
                      ("threads", 1)):
        v = getattr(args, name)
        if v is not None and v < low:
            ap.error(f"--{name.replace('_', '-')} must be >= {low}, got {v}")
    if args.lr <= 0 or args.galore_lr <= 0:
        ap.error(f"learning rates must be > 0, got --lr {args.lr} --galore-lr {args.galore_lr}")
    if args.threads is None and torch.device(args.device).type == "cpu":
        args.threads = 1  # two threads fighting other jobs for two cores were 5-10x slower (bench_e2e.py)
    if args.dtype not in ("float32", "bfloat16"):
        ap.error(f"--dtype must be float32 or bfloat16, got {args.dtype!r}")
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device {args.device!r} is not a torch device")
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device} (--scale {args.scale}): CUDA is not available on this machine; "
                 "use --scale cpu or --device cpu")
    if dev.type not in ("cpu", "cuda"):
        ap.error(f"--device {args.device!r}: only cpu and cuda are supported")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # a caller (the test suite) keeps its thread count


def _run(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    t_start = time.perf_counter()
    info = C.machine_info(args.device)
    versions = C.library_versions()
    data = TokenStream.from_local_corpus(max_bytes=args.corpus_bytes, vocab_size=args.vocab)
    overrides: dict[str, Any] = {"max_position_embeddings": max(args.seq, 512)}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    cfg = llama_config(args.size, data.vocab_size, **overrides)
    eval_batches = [b.to(args.device) for b in data.eval_batches(args.batch, args.seq, max_batches=args.eval_batches)]
    n_params = sum(p.numel() for p in build_llama(cfg, args.seed).parameters())
    budget = args.steps * args.batch * args.seq
    print(f"# {info.get('gpu') or info['cpu_model']}, torch {versions['torch']}, {torch.get_num_threads()} threads, "
          f"{args.device}, {args.dtype}\n# LLaMA-{args.size} ({cfg.num_hidden_layers} layers, {n_params / 1e6:.2f}M "
          f"params), corpus {len(data.train) / 1e6:.2f}M train / {len(data.eval) / 1e3:.0f}k eval tokens, vocab "
          f"{data.vocab_size}; {args.steps} steps x {args.batch} x {args.seq} = {budget:,} tokens; rank {args.rank}, "
          f"gap {args.gap}; eval on {len(eval_batches)} held-out batches", flush=True)
    monitor = C.CpuMonitor().start()
    runs = [train_one(k, args, data, cfg, eval_batches) for k in args.optimizers]
    others = monitor.stop()

    by = {r["optimizer"]: r for r in runs}
    ref = by.get("adamw")
    headers = ["optimizer", "lr", "final train loss", "eval loss", "eval ppl", "vs AdamW", "state MiB", "s/step",
               "others' CPU"]
    table = [[r["label"], f"{r['lr']:g}", f"{r['final_train_loss']:.3f}", f"{r['eval_loss']:.4f}",
              f"{r['eval_ppl']:.2f}",
              "-" if ref is None or r is ref else f"{(r['eval_loss'] / ref['eval_loss'] - 1) * 100:+.2f}%",
              f"{r['state_bytes'] / 2**20:.2f}", f"{r['s_per_step']:.3f}",
              "?" if r["others_cpu"] is None else f"{r['others_cpu']:.0%}"] for r in runs]
    print(f"\n### LLaMA-{args.size} ({n_params / 1e6:.2f}M params) on stdlib text, {budget:,} tokens "
          f"({args.steps} x {args.batch} x {args.seq}), rank {args.rank}, gap {args.gap}, {args.device} {args.dtype}\n")
    print(C.format_table(headers, table, markdown=True))
    checks: dict[str, Any] = {}
    if "ours" in by and "ours-svd" in by:
        rel = by["ours"]["eval_loss"] / by["ours-svd"]["eval_loss"] - 1
        checks["ours_power_vs_ours_svd_rel"] = rel
        print(f"\nours (power) vs ours (exact SVD): eval loss {rel * 100:+.2f}% "
              f"({'within' if abs(rel) <= 0.01 else 'NOT within'} 1%)")
    if "ours" in by and "galore-torch" in by:
        rel = by["ours"]["eval_loss"] / by["galore-torch"]["eval_loss"] - 1
        checks["ours_power_vs_galore_torch_rel"] = rel
        print(f"ours (power) vs galore-torch (full SVD): eval loss {rel * 100:+.2f}%")
    elapsed = time.perf_counter() - t_start
    print(f"(total {elapsed:.0f} s; other processes used {'?' if others is None else f'{others:.0%}'} of the CPUs)")
    warning = C.shared_machine_warning(others)
    if warning:
        print(warning + " (losses are unaffected)")
    payload = dict(benchmark="bench_quality", machine=info, versions=versions,
                   args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   model={"size": args.size, "layers": cfg.num_hidden_layers, "params": n_params,
                          "vocab": data.vocab_size},
                   corpus={"train_tokens": len(data.train), "eval_tokens": len(data.eval),
                           "eval_batches": len(eval_batches)},
                   token_budget=budget, runs=runs, checks=checks, elapsed_s=elapsed, others_cpu=others,
                   warning=warning)
    path = C.write_json(args.out or C.dated_result_path("bench_quality", args.device), payload)
    print(f"results: {path}")
    if not args.no_plots:
        title = (f"LLaMA-{args.size} ({n_params / 1e6:.1f}M) on stdlib text, {args.steps} steps x {args.batch}x{args.seq}, "
                 f"GaLore rank {args.rank}, gap {args.gap}, scale 0.25; {info.get('gpu') or info['cpu_model']}")
        print(f"plot: {plot(runs, path.parent / f'{path.stem}-loss.png', title)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
