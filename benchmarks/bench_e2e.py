"""End-to-end pre-training steps of LLaMA configs: throughput, refresh stall and memory of every
optimizer, side by side in one run.

Model: ``transformers.LlamaForCausalLM`` of the GaLore paper's shapes (``galore_opt.toy.llama_config``:
60m, 130m, 350m, 1b, 7b; ``tiny`` for smoke tests), randomly initialised (seed 0), vocabulary 32000
(the paper's T5 tokenizer), trained on synthetic token ids (uniform random, 4 pre-drawn batches
cycled: throughput does not depend on the text). One training step = forward, loss, backward,
``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``.

Optimizers (``--optimizers``):

* ``adamw``: ``torch.optim.AdamW`` (``fused=True`` where the device supports it, else ``foreach``);
* ``bnb-adamw8bit``: bitsandbytes ``AdamW8bit`` on every parameter;
* ``lora``: peft LoRA on q, k, v, o, gate, up, down (rank = the GaLore rank of the size, alpha =
  rank / 4, no dropout; embeddings, norms and head frozen), the adapters trained with torch AdamW
  (fused). Not pre-training (the base weights never move): the memory/throughput reference that
  GaLore's paper compares against;
* ``galore-torch`` / ``galore-torch-8bit``: galore-torch 1.0's ``GaLoreAdamW`` / ``GaLoreAdamW8bit``
  (the latter CUDA only), GaLore on the attention and MLP matrices;
* ``ours`` (default refresh ``proj_method="power"``), ``ours-randomized``, ``ours-svd``: galore-opt
  ``GaLoreAdamW``; ``ours-8bit``: ``GaLoreAdamW8bit``; ``ours-layerwise``, ``ours-8bit-layerwise``:
  the same wrapped in ``galore_opt.layerwise.LayerwiseOptimizer`` (updates inside backward).

GaLore settings: the paper's recipe (rank 60m 128, 130m/350m 256, 1b 512, 7b 1024; update_proj_gap
200, 7b 500; scale 0.25; ``proj_type="std"``), on the ``self_attn`` and ``mlp`` linear weights; the
embeddings, norms and head get plain AdamW inside the same optimizer.

Measured per (size, optimizer), on a fresh copy of the same initial model, in one run: the first
step (state creation and the cold refresh: the *first-step stall*), ``--warmup`` steps, then
``--steps`` timed steps. GaLore optimizers are built with ``update_proj_gap = --refresh-every``
(default 5) and (ours) ``stagger_refresh=False``, so every GaLore matrix refreshes on the same
steps, as galore-torch's do every gap: with the defaults, 4 of the 20 timed steps refresh and 16
are steady. A timed step counts as a refresh step when the basis changed during it (checked on the
first GaLore matrix, not assumed from the schedule; a row whose refreshes fell elsewhere than
scheduled says so in ``note``).

Memory: the peak over the first + warm-up steps (the first step creates the state and runs the
cold refresh) and, on CUDA, over the timed steps. CUDA: ``torch.cuda.max_memory_allocated``
(weights included). CPU: the bytes of the weights plus ``galore_opt.memory.measure_peak_bytes``
(the allocator's events recorded by ``torch.profiler``, summed in time order), so the first and
warm-up steps run under the profiler; the timed steps do not. The optimizer-state bytes
(``galore_opt.optimizer_state_bytes``; layer-wise: of the inner optimizers) are read after the
warm-up.

Reported: tokens/s over the steady steps (median step time), and with the refresh amortized at the
configured gap ``G`` (``--gap``, default the paper's 200): ``step_eff = steady + stall / G``,
tokens/s = tokens per step / ``step_eff``. Our default staggers refreshes (1/G of the matrices per
step), which spreads the same work over the gap instead of stalling one step; the amortized figure
is the same. The *refresh stall* is the median refresh step's ``optimizer.step()`` time minus the
median steady one (the forward and backward, identical in both and noisy on a shared machine, are
left out); for the layer-wise rows, whose update runs inside backward, the median whole refresh
step minus the median steady step. Our default (``numerics="torch"``) applies a warm refresh from
the step after it (``GaLoreOptimizer._refresh_if_due``); galore-torch refreshes before projecting.
Both compute the new basis from the refresh step's gradient, inside that step's
``optimizer.step()``.

CPU threads: 1 by default (``--threads``). On a machine shared with other jobs, two OpenMP threads
fighting another process for two cores made a 60M step 5-10x slower than one thread (3-10 s
instead of 0.7 s); single-thread figures are reproducible. Others' CPU use during each row is
recorded (``others_cpu``) and a warning is printed when it exceeded 10 %.

Sizes whose estimated peak (``galore_opt.memory.estimate_memory``) exceeds ``--mem-fraction`` of
the available memory (``MemAvailable`` / free GPU memory) are skipped with a message. Results:
JSON ``benchmarks/results/bench_e2e-<cpu|gpu>-<date>.json`` (``--out``), a Markdown table on
stdout, and two PNGs beside the JSON (``-memory.png``: peak and state; ``-throughput.png``).

    python benchmarks/bench_e2e.py --sizes 60m --steps 20              # CPU, fp32, batch 2 x 128
    python benchmarks/bench_e2e.py --sizes 1b --device cuda            # bf16, batch 16 x 256
    python benchmarks/bench_e2e.py --sizes 7b --device cuda --cap-gib 24 --optimizers ours-8bit-layerwise
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import torch  # noqa: E402

import galore_opt  # noqa: E402
from galore_opt import config as GC  # noqa: E402
from galore_opt.layerwise import LayerwiseOptimizer  # noqa: E402
from galore_opt.memory import estimate_memory, measure_peak_bytes  # noqa: E402
from galore_opt.toy import LLAMA_SIZES, build_llama, llama_config  # noqa: E402

SIZES = tuple(LLAMA_SIZES)  # tiny, 60m, 130m, 350m, 1b, 7b
PAPER_RANK = {"tiny": 64, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
PAPER_GAP = {"tiny": 200, "60m": 200, "130m": 200, "350m": 200, "1b": 200, "7b": 500}

#: key -> (label, estimate_memory's optimizer name, layer-wise)
OPTIMIZERS: dict[str, tuple[str, str, bool]] = {
    "adamw": ("torch AdamW", "adamw", False),
    "bnb-adamw8bit": ("bnb AdamW8bit", "adamw8bit", False),
    "lora": ("LoRA (peft) + torch AdamW", "galore-adamw", False),
    "galore-torch": ("galore-torch GaLoreAdamW", "galore-adamw", False),
    "galore-torch-8bit": ("galore-torch GaLoreAdamW8bit", "galore-adamw8bit", False),
    "ours": ("ours GaLoreAdamW (power, default)", "galore-adamw", False),
    "ours-randomized": ("ours GaLoreAdamW (randomized)", "galore-adamw", False),
    "ours-svd": ("ours GaLoreAdamW (svd)", "galore-adamw", False),
    "ours-8bit": ("ours GaLoreAdamW8bit", "galore-adamw8bit", False),
    "ours-layerwise": ("ours GaLoreAdamW layer-wise", "galore-adamw", True),
    "ours-8bit-layerwise": ("ours GaLoreAdamW8bit layer-wise", "galore-adamw8bit", True),
}
GALORE_KINDS = {k for k in OPTIMIZERS if k.startswith(("galore-torch", "ours"))}
PROJ_METHOD = {"ours-randomized": "randomized", "ours-svd": "svd"}


# --- building model and optimizer ------------------------------------------------------------------


def available(kind: str, device: str) -> str | None:
    """None if ``kind`` can run on ``device``, else the reason (its row is skipped with it)."""
    return C.peer_unavailable(kind, device)


def adamw(params: Any, lr: float, device: str) -> torch.optim.Optimizer:
    """torch AdamW, fused where this torch supports it on ``device``, else foreach."""
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # pragma: no cover - older torch / device
        return torch.optim.AdamW(params, lr=lr, foreach=True)


def make_run(kind: str, proto: torch.nn.Module, *, rank: int, gap: int, lr: float, device: str,
             seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A fresh copy of ``proto`` on ``device`` (LoRA: wrapped by peft) and the optimizer ``kind``
    for it. ``proto`` stays on the CPU, so that a GPU's peak counts one copy of the weights."""
    model = copy.deepcopy(proto).to(device)
    model.train()
    if kind == "lora":
        model = add_lora(model, rank)
    return model, make_optimizer(kind, model, rank=rank, gap=gap, lr=lr, device=device, seed=seed)


def add_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """peft LoRA (rank ``rank``, alpha rank / 4, no dropout) on every attention and MLP matrix."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=max(1, rank // 4), lora_dropout=0.0, bias="none",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    model.train()
    return model


def make_optimizer(kind: str, model: torch.nn.Module, *, rank: int, gap: int, lr: float, device: str,
                   seed: int = 0) -> torch.optim.Optimizer:
    """The optimizer ``kind`` for ``model`` (LoRA: ``model`` already wrapped by :func:`add_lora`).
    GaLore optimizers get the gap ``gap`` on every matrix at once (ours: ``stagger_refresh=False``)."""
    if kind == "lora":
        return adamw([p for p in model.parameters() if p.requires_grad], lr, device)
    if kind == "adamw":
        return adamw(model.parameters(), lr, device)
    if kind == "bnb-adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(model.parameters(), lr=lr)
    extra: dict[str, Any] = {} if kind.startswith("galore-torch") else {"stagger_refresh": False}
    groups = galore_opt.galore_param_groups(model, target_modules=["self_attn", "mlp"], rank=rank,
                                            update_proj_gap=gap, scale=0.25, proj_type="std",
                                            proj_method=PROJ_METHOD.get(kind), **extra)
    if kind.startswith("galore-torch"):
        keys = ("rank", "update_proj_gap", "scale", "proj_type")
        groups = [{"params": g["params"], **{k: g[k] for k in keys}} if "rank" in g else
                  {"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups]
        if kind == "galore-torch":
            from galore_torch import GaLoreAdamW as GT

            return GT(groups, lr=lr, no_deprecation_warning=True)
        from galore_torch import GaLoreAdamW8bit as GT8

        return GT8(groups, lr=lr)
    cls = galore_opt.GaLoreAdamW8bit if "8bit" in kind else galore_opt.GaLoreAdamW
    opt: torch.optim.Optimizer = cls(groups, lr=lr, seed=seed)
    if kind.endswith("layerwise"):
        opt = LayerwiseOptimizer(opt)
    return opt


def inner_optimizers(opt: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    return list(opt.optimizers) if isinstance(opt, LayerwiseOptimizer) else [opt]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Optimizer-state bytes (a layer-wise wrapper: its inner optimizers' and its own buffers)."""
    total = galore_opt.optimizer_state_bytes(opt)  # a LayerwiseOptimizer's state is its inner ones'
    if isinstance(opt, LayerwiseOptimizer):
        total += C.tensor_bytes(opt._low_rank.values())
    return total


def basis_fingerprint(opt: torch.optim.Optimizer) -> torch.Tensor | None:
    """A few entries of the first GaLore matrix's basis (ours: the state's basis tensor;
    galore-torch: its projector's ``ortho_matrix``), to check when a refresh happened."""
    for o in inner_optimizers(opt):
        for group in o.param_groups:
            if "rank" not in group:
                continue
            for p in group["params"]:
                state = o.state.get(p, {})
                basis = state.get(GC.BASIS_LEFT, state.get(GC.BASIS_RIGHT))
                if basis is None and "projector" in state:
                    basis = getattr(state["projector"], "ortho_matrix", None)
                if isinstance(basis, torch.Tensor):
                    return basis.detach().flatten()[:256].float().cpu().clone()
    return None


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               device: str = "cpu") -> tuple[torch.Tensor, float]:
    """One step; returns the loss and the seconds spent in ``optimizer.step()`` (synchronized)."""
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    C.sync(device)
    t0 = time.perf_counter()
    opt.step()
    C.sync(device)
    opt_s = time.perf_counter() - t0
    opt.zero_grad(set_to_none=True)
    return loss.detach(), opt_s


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    C.sync(device)
    t0 = time.perf_counter()
    out = fn()
    C.sync(device)
    return time.perf_counter() - t0, out


# --- one (size, optimizer) -------------------------------------------------------------------------


def measure(kind: str, proto: torch.nn.Module, batches: list[torch.Tensor], rank: int,
            args: argparse.Namespace, tick: Callable[[str], None]) -> dict[str, Any]:
    """One run of ``kind`` on a fresh copy of ``proto``: the first step, ``--warmup`` steps and
    ``--steps`` timed steps, among them the refresh steps (GaLore: every ``--refresh-every``
    steps); the peak memory of the first + warm-up steps and, on CUDA, of the timed steps (see
    the module docstring)."""
    from torch.profiler import record_function

    cuda = torch.device(args.device).type == "cuda"
    galore = kind in GALORE_KINDS
    model, opt = make_run(kind, proto, rank=rank, gap=args.refresh_every, lr=args.lr, device=args.device,
                          seed=args.seed)
    weights = C.tensor_bytes([*model.parameters(), *model.buffers()])
    nb = len(batches)
    out: dict[str, Any] = {"weights_bytes": weights,
                           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}

    def step(i: int, region: str | None = None) -> tuple[float, float, torch.Tensor]:
        """(whole step s, optimizer.step() s, loss)"""
        if region is None:
            t, (loss, opt_s) = timed(lambda: train_step(model, opt, batches[i % nb], args.device), args.device)
        else:
            with record_function(f"##{region}"):
                t, (loss, opt_s) = timed(lambda: train_step(model, opt, batches[i % nb], args.device), args.device)
        return t, opt_s, loss

    # first step and warm-up: on the CPU under the memory profiler (its overhead is per operator,
    # milliseconds against seconds-long steps); on CUDA max_memory_allocated
    times: dict[str, Any] = {}

    def start() -> None:
        times["first"], _, loss = step(0, "first")
        tick(f"{float(loss):.3f}")
        for i in range(args.warmup):
            step(1 + i, "warmup")
            tick("")

    dev = torch.device(args.device)
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        start()
        out["peak_start_bytes"] = torch.cuda.max_memory_allocated(dev)
    else:
        peak, _, _ = measure_peak_bytes(start)
        out["peak_start_bytes"] = weights + peak
    out["first_step_s"] = times["first"]
    out["state_bytes"] = state_bytes(opt)

    # timed steps, without the profiler (its per-operator cost would inflate a refresh made of many
    # small operations more than one made of a few SVDs). A step is a refresh step when the basis
    # changed during it (checked, not assumed from the schedule).
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    steady: list[float] = []
    steady_opt: list[float] = []
    refresh: list[float] = []
    refresh_opt: list[float] = []
    refresh_index: list[int] = []
    loss = None
    for i in range(args.steps):
        index = 1 + args.warmup + i
        before = basis_fingerprint(opt) if galore else None
        t, opt_s, loss = step(index)
        after = basis_fingerprint(opt) if galore else None
        if before is not None and after is not None and not torch.equal(before, after):
            refresh.append(t)
            refresh_opt.append(opt_s)
            refresh_index.append(index)
        else:
            steady.append(t)
            steady_opt.append(opt_s)
        tick(f"{float(loss):.3f}")
    out["peak_timed_bytes"] = torch.cuda.max_memory_allocated(dev) if cuda else None
    out.update(steady_times_s=steady, steady_s=statistics.median(steady) if steady else None, final_loss=float(loss),
               steady_opt_times_s=steady_opt, steady_opt_s=statistics.median(steady_opt) if steady_opt else None,
               refresh_times_s=refresh, refresh_opt_times_s=refresh_opt, refresh_step_indices=refresh_index,
               refresh_s=statistics.median(refresh) if refresh else None,
               refresh_opt_s=statistics.median(refresh_opt) if refresh_opt else None)
    if galore:
        due = [1 + args.warmup + i for i in range(args.steps) if (1 + args.warmup + i) % args.refresh_every == 0]
        if refresh_index != due:
            out["note"] = f"refresh steps {refresh_index}, scheduled {due}"
    out["peak_bytes"] = max(out["peak_start_bytes"], out["peak_timed_bytes"] or 0)
    out["peak_method"] = ("torch.cuda.max_memory_allocated over all steps" if cuda else
                          "weights + galore_opt.memory.measure_peak_bytes (profiler allocation events) over the "
                          "first (cold refresh) and warm-up steps")
    return out  # model and optimizer are freed with this frame (the caller collects)


def finish_row(row: dict[str, Any]) -> dict[str, Any]:
    tokens = row["tokens_per_step"]
    steady = row["steady_s"]
    row["tokens_per_s"] = tokens / steady
    stall = None
    if row.get("refresh_s") is not None:
        if row["optimizer"].endswith("layerwise"):  # the update runs inside backward: whole steps
            stall = max(0.0, row["refresh_s"] - steady)
            row["stall_method"] = "median refresh step - median steady step (whole steps)"
        else:  # the optimizer step alone: the forward/backward's noise is left out
            stall = max(0.0, row["refresh_opt_s"] - row["steady_opt_s"])
            row["stall_method"] = "median refresh optimizer.step() - median steady optimizer.step()"
    row["refresh_stall_s"] = stall
    row["effective_step_s"] = steady + (stall or 0.0) / row["gap"]
    row["effective_tokens_per_s"] = tokens / row["effective_step_s"]
    row["first_step_stall_s"] = max(0.0, row["first_step_s"] - steady)
    return row


# --- output ------------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


TABLE_HEADERS = ["optimizer", "tokens/s steady", "tokens/s refresh amortized", "first step s", "refresh stall s",
                 "peak MiB", "state MiB", "others' CPU"]


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [[r["label"], _f(r["tokens_per_s"]), _f(r["effective_tokens_per_s"]), _f(r["first_step_s"], "{:.2f}"),
             _f(r["refresh_stall_s"], "{:.2f}"), _f(r["peak_bytes"] / 2**20, "{:,.0f}"),
             _f(r["state_bytes"] / 2**20, "{:,.1f}"), _f(r.get("others_cpu"), "{:.0%}")] for r in rows]


def plot(rows: list[dict[str, Any]], stem: Path, title: str) -> list[Path]:
    """``<stem>-memory.png`` (peak and optimizer state per optimizer) and ``<stem>-throughput.png``
    (steady and refresh-amortized tokens/s), one panel per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in rows))
    paths = []
    for what, keys, unit in (("memory", ("peak_bytes", "state_bytes"), "MiB"),
                             ("throughput", ("tokens_per_s", "effective_tokens_per_s"), "tokens/s")):
        fig, axes = plt.subplots(len(sizes), 1, figsize=(9, 0.45 * max(len(rows) / len(sizes), 4) + 1.6),
                                 dpi=110, squeeze=False)
        for ax, size in zip(axes[:, 0], sizes, strict=True):
            sel = [r for r in rows if r["size"] == size]
            labels = [r["label"] for r in sel]
            y = torch.arange(len(sel)).float()
            h = 0.4
            names = {"peak_bytes": "peak memory", "state_bytes": "optimizer state",
                     "tokens_per_s": "steady", "effective_tokens_per_s": f"refresh amortized (gap {sel[0]['gap']})"}
            for j, key in enumerate(keys):
                vals = [(r[key] / 2**20 if unit == "MiB" else r[key]) for r in sel]
                colors = ["tab:orange" if r["optimizer"].startswith("ours") else "tab:blue" for r in sel]
                bars = ax.barh(y + (j - 0.5) * h, vals, height=h, color=colors, alpha=1.0 if j == 0 else 0.5,
                               label=names[key])
                for b, v in zip(bars, vals, strict=True):
                    ax.text(b.get_width(), b.get_y() + h / 2, f" {v:,.0f}", va="center", fontsize=7)
            ax.set_yticks(y.tolist(), labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(unit)
            ax.set_title(f"LLaMA-{size}: {what} (orange: galore-opt; solid: {names[keys[0]]}, light: {names[keys[1]]})",
                         fontsize=9)
            ax.margins(x=0.15)
            ax.grid(axis="x", alpha=0.3)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = stem.parent / f"{stem.name}-{what}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


# --- command line ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", default="60m", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma list of {', '.join(OPTIMIZERS)}")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (steady ones and, GaLore, refresh ones)")
    ap.add_argument("--refresh-every", type=int, default=5,
                    help="GaLore optimizers refresh every matrix every this many steps while measured "
                         "(update_proj_gap); the stall is amortized over --gap")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first one")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default CPU 2, CUDA 16)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default CPU 128, CUDA 256)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size of the model")
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    ap.add_argument("--rank", type=int, default=None, help="GaLore/LoRA rank (default: the paper's per size)")
    ap.add_argument("--gap", type=int, default=None, help="update_proj_gap to amortize the refresh over "
                    "(default the paper's: 200, 7b 500)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="default CPU float32, CUDA bfloat16")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default on the CPU: 1, see the module docstring; CUDA: torch's)")
    ap.add_argument("--cap-gib", type=float, default=None,
                    help="CUDA: cap this process' memory at this many GiB (set_per_process_memory_fraction)")
    ap.add_argument("--mem-fraction", type=float, default=0.9,
                    help="skip a size whose estimated peak exceeds this share of the available memory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="first wait up to this long until other processes use < 10%% of the CPUs")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default benchmarks/results/bench_e2e-<cpu|gpu>-<date>.json); PNGs beside it")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    args = ap.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda" if args.device else False
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device {args.device!r} is not a torch device (cpu or cuda[:N])")
    if dev.type not in ("cpu", "cuda"):
        ap.error(f"--device {args.device!r}: only cpu and cuda are supported")
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine")
    args.sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    args.optimizers = [k.strip() for k in args.optimizers.split(",") if k.strip()]
    if not args.sizes:
        ap.error("--sizes is empty")
    for s in args.sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}; choose from {', '.join(SIZES)}")
    if not args.optimizers:
        ap.error("--optimizers is empty")
    for k in args.optimizers:
        if k not in OPTIMIZERS:
            ap.error(f"unknown optimizer {k!r}; choose from {', '.join(OPTIMIZERS)}")
    args.batch = args.batch if args.batch is not None else (16 if cuda else 2)
    args.seq = args.seq if args.seq is not None else (256 if cuda else 128)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.threads is None and not cuda:
        args.threads = 1
    for name, low in (("steps", 1), ("warmup", 0), ("batch", 1), ("seq", 2), ("vocab", 2), ("layers", 1),
                      ("rank", 1), ("gap", 1), ("threads", 1)):
        v = getattr(args, name)
        if v is not None and v < low:
            ap.error(f"--{name} must be >= {low}, got {v}")
    if args.refresh_every < 2 or args.refresh_every > args.steps:
        ap.error(f"--refresh-every must be in [2, --steps] so that the timed steps hold steady and refresh "
                 f"steps, got {args.refresh_every} with --steps {args.steps}")
    if not 0 < args.mem_fraction <= 1:
        ap.error(f"--mem-fraction must be in (0, 1], got {args.mem_fraction}")
    if args.cap_gib is not None:
        if not cuda:
            ap.error("--cap-gib needs --device cuda (the CPU has no per-process memory cap); "
                     "see benchmarks/rtx4090.py for the estimate on the CPU")
        if args.cap_gib <= 0:
            ap.error(f"--cap-gib must be > 0, got {args.cap_gib}")
    if args.lr <= 0:
        ap.error(f"--lr must be > 0, got {args.lr}")
    return ap, args


def model_config(size: str, args: argparse.Namespace) -> Any:
    overrides: dict[str, Any] = {"max_position_embeddings": max(args.seq, 512 if size == "tiny" else 1024)}
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    return llama_config(size, args.vocab, **overrides)


def cap_memory(args: argparse.Namespace) -> int | None:
    """Apply ``--cap-gib`` (CUDA); returns the cap in bytes."""
    if args.cap_gib is None:
        return None
    dev = torch.device(args.device)
    total = torch.cuda.get_device_properties(dev).total_memory
    cap = int(args.cap_gib * 2**30)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), dev)
    return cap


def budget_bytes(args: argparse.Namespace, cap: int | None) -> int | None:
    avail = C.available_memory_bytes(args.device)
    if cap is not None:
        avail = cap if avail is None else min(avail, cap)
    return avail


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*rank.*min\\(m, n\\).*")
    C.wait_for_idle(args.wait_idle)
    cap = cap_memory(args)
    info = C.machine_info(args.device)
    versions = C.library_versions()
    dtype = getattr(torch, args.dtype)
    est_dtype = "bf16" if dtype == torch.bfloat16 else "fp32"
    print(f"# {info.get('gpu') or info['cpu_model']}, {info['cpu_count']} cores, torch {info['torch_version']}, "
          f"{torch.get_num_threads()} threads, device {args.device}, {args.dtype}, batch {args.batch} x seq {args.seq}"
          + (f", memory capped at {args.cap_gib:g} GiB" if cap else ""), flush=True)
    budget = budget_bytes(args, cap)
    plans = []  # (size, kind, cfg) that will run
    skipped = []
    for size in args.sizes:
        cfg = model_config(size, args)
        rank = args.rank or PAPER_RANK[size]
        for kind in args.optimizers:
            why = available(kind, args.device)
            if why is None and budget is not None:
                label, est_opt, layerwise = OPTIMIZERS[kind]
                est = estimate_memory(cfg, est_opt, layerwise=layerwise, batch=args.batch, seq=args.seq, rank=rank,
                                      dtype=est_dtype, device=torch.device(args.device).type)
                if est.total > args.mem_fraction * budget:
                    why = (f"estimated peak {est.total / 2**30:.1f} GiB > {args.mem_fraction:.0%} of the "
                           f"{budget / 2**30:.1f} GiB available (galore_opt.memory.estimate_memory)")
            if why is not None:
                print(f"  skipped {size} {OPTIMIZERS[kind][0]}: {why}", flush=True)
                skipped.append({"size": size, "optimizer": kind, "label": OPTIMIZERS[kind][0], "reason": why})
            else:
                plans.append((size, kind, cfg))

    total = len(plans) * (1 + args.warmup + args.steps)
    bar = tqdm(total=total, desc="bench_e2e", dynamic_ncols=True, file=sys.stderr)
    rows: list[dict[str, Any]] = []
    monitor = C.CpuMonitor().start()
    t_start = time.perf_counter()
    protos: dict[str, torch.nn.Module] = {}
    for size, kind, cfg in plans:
        if size not in protos:
            protos.clear()
            gc.collect()
            protos[size] = build_llama(cfg, args.seed).to(dtype=dtype)  # on the CPU; copied per run
        proto = protos[size]
        rank = args.rank or PAPER_RANK[size]
        gen = torch.Generator().manual_seed(args.seed)
        batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
                   for _ in range(4)]
        label = OPTIMIZERS[kind][0]
        bar.set_description(f"{size} {kind}")
        row_monitor = C.CpuMonitor().start()
        row: dict[str, Any] = {"size": size, "optimizer": kind, "label": label, "rank": rank,
                               "gap": args.gap or PAPER_GAP[size], "batch": args.batch, "seq": args.seq,
                               "tokens_per_step": args.batch * args.seq, "dtype": args.dtype,
                               "params": sum(p.numel() for p in proto.parameters()),
                               "layers": cfg.num_hidden_layers, "vocab": args.vocab}
        try:
            def tick(loss: str) -> None:
                bar.update(1)
                if loss:
                    bar.set_postfix(loss=loss)

            row.update(measure(kind, proto, batches, rank, args, tick))
            gc.collect()
        except torch.OutOfMemoryError as exc:  # pragma: no cover - GPU only
            gc.collect()
            torch.cuda.empty_cache()
            msg = f"out of memory: {str(exc).splitlines()[0]}"
            print(f"  skipped {size} {label}: {msg}", flush=True)
            skipped.append({"size": size, "optimizer": kind, "label": label, "reason": msg})
            continue
        row["others_cpu"] = row_monitor.stop()
        rows.append(finish_row(row))
        bar.write(f"  {size} {label:<36} {row['tokens_per_s']:>9,.0f} tok/s steady, {row['effective_tokens_per_s']:>9,.0f} "
                  f"amortized, first {row['first_step_s']:.2f} s, stall {_f(row['refresh_stall_s'], '{:.2f}')} s, "
                  f"peak {row['peak_bytes'] / 2**20:,.0f} MiB, state {row['state_bytes'] / 2**20:,.1f} MiB")
    bar.close()
    protos.clear()
    elapsed = time.perf_counter() - t_start
    others = monitor.stop()
    return dict(benchmark="bench_e2e", machine=info, versions=versions,
                args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                memory_budget_bytes=budget, cap_bytes=cap, rows=rows, skipped=skipped, elapsed_s=elapsed,
                others_cpu=others)


def comparisons(sel: list[dict[str, Any]]) -> list[str]:
    """Our default against galore-torch and fused AdamW at one size (the issue's acceptance figures)."""
    by = {r["optimizer"]: r for r in sel}
    ours, gt, aw = by.get("ours"), by.get("galore-torch"), by.get("adamw")
    out = []
    if ours and gt:
        so, sg = ours["refresh_stall_s"], gt["refresh_stall_s"]
        if so is not None and sg is not None:
            out.append(f"refresh stall: ours (power) {so:.3f} s vs galore-torch {sg:.3f} s: "
                       + (f"{sg / so:.0f}x shorter" if so > 0 else "no measurable stall"))
        out.append(f"steady tokens/s: ours / galore-torch = {ours['tokens_per_s'] / gt['tokens_per_s']:.2f}; "
                   f"refresh amortized: {ours['effective_tokens_per_s'] / gt['effective_tokens_per_s']:.2f}")
    if ours and aw:
        out.append(f"refresh amortized tokens/s: ours / torch AdamW = "
                   f"{ours['effective_tokens_per_s'] / aw['effective_tokens_per_s']:.2f}; peak memory ours / AdamW = "
                   f"{ours['peak_bytes'] / aw['peak_bytes']:.2f}")
    return out


def print_tables(payload: dict[str, Any]) -> None:
    rows = payload["rows"]
    a = payload["args"]
    for size in dict.fromkeys(r["size"] for r in rows):
        sel = [r for r in rows if r["size"] == size]
        r0 = sel[0]
        print(f"\n### LLaMA-{size} ({r0['params'] / 1e6:.1f}M params, {r0['layers']} layers, vocab {r0['vocab']}), "
              f"{a['dtype']}, batch {a['batch']} x seq {a['seq']}, rank {r0['rank']}, refresh amortized over gap "
              f"{r0['gap']}, device {a['device']}\n")
        print(C.format_table(TABLE_HEADERS, table_rows(sel), markdown=True))
        for line in comparisons(sel):
            print(f"- {line}")
    for s in payload["skipped"]:
        print(f"- skipped: {s['size']} {s['label']}: {s['reason']}")


def main(argv: list[str] | None = None) -> int:
    _, args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        payload = run(args)
    finally:
        torch.set_num_threads(threads)  # a caller (the test suite) keeps its thread count
    print_tables(payload)
    others = payload["others_cpu"]
    print(f"\n(total {payload['elapsed_s']:.0f} s; other processes used "
          f"{'?' if others is None else f'{others:.0%}'} of the CPUs meanwhile)")
    warning = C.shared_machine_warning(others)
    if warning:
        print(warning)
    payload["warning"] = warning
    path = C.write_json(args.out or C.dated_result_path("bench_e2e", args.device), payload)
    print(f"results: {path}")
    if payload["rows"] and not args.no_plots:
        a = payload["args"]
        title = (f"bench_e2e on {payload['machine'].get('gpu') or payload['machine']['cpu_model']}, "
                 f"torch {payload['versions']['torch']}, {a['dtype']}, batch {a['batch']} x {a['seq']}")
        for p in plot(payload["rows"], path.with_suffix(""), title):
            print(f"plot: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
