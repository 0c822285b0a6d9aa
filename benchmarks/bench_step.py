"""Optimizer step: time, optimizer-state bytes and peak extra memory of one step.

Optimizers (``--optimizers``; the first five by default): ``torch.optim.AdamW`` (``foreach=False``,
``foreach=True``, ``fused=True``), bitsandbytes' ``AdamW8bit``, galore-torch 1.0's ``GaLoreAdamW``
and ``GaLoreAdamW8bit`` (CUDA only), galore-opt's ``GaLoreAdamW`` (``numerics="torch"``, the
default: power-method refresh with basis alignment, staggered, ``impl="auto"``; ``ours-ref`` and
``ours-triton`` force the reference path or the Triton kernels; ``numerics="galore_torch"``:
galore-torch's arithmetic and full-SVD refresh schedule) and ``GaLoreAdamW8bit``, and
``matmuls``: the two projection GEMMs alone, the floor of a GaLore step (CUDA). On CUDA each size
also prints a roofline: max(GEMM FLOPs / peak, bytes / bandwidth) from a table of device peaks.
Rows that cannot run here are skipped with the reason. Parameters: the 7 weight matrices (q, k, v, o, gate, up, down) of
``--layers`` decoder layers of the LLaMA shapes of the GaLore paper (``--size``), all in the GaLore
group, with gradients set to fixed random values (seeded).

Measured per optimizer:

* steady step: the median of ``--steps`` steps after the first step and ``--warmup`` more (the gap is
  set so large that no refresh happens in them);
* first step: the step that creates the state and computes the first bases (cold refresh);
* refresh step: a run with ``update_proj_gap = --refresh-gap`` (and, for galore-opt's torch
  numerics, ``stagger_refresh=False``, so that every matrix refreshes on the same step as in
  galore-torch: the worst step); median of the steps at ``gap, 2 gap, ...``;
* amortized step at gap 200: ``steady + (refresh - steady) / 200``;
* optimizer state bytes: :func:`galore_opt.utils.optimizer_state_bytes` (counts the tensors in
  galore-torch's projector objects too, whole storages);
* peak extra memory: bytes allocated above the level before the step, at the step's peak. On CUDA
  ``torch.cuda.max_memory_allocated``; on the CPU the allocator's events recorded by
  ``torch.profiler`` (``profile_memory=True``) replayed in time order (checked at start-up on a
  function with known temporaries).

    python benchmarks/bench_step.py                      # 60m, 130m, 350m shapes, 1 layer, fp32 CPU
    python benchmarks/bench_step.py --size 1b --layers 2 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
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

from galore_opt import GaLoreAdamW, GaLoreAdamW8bit, optimizer_state_bytes  # noqa: E402

#: (hidden, intermediate) of the GaLore paper's LLaMA sizes and the rank used for them in the paper
SIZES = {
    "60m": (512, 1376, 128),
    "130m": (768, 2048, 256),
    "350m": (1024, 2736, 256),
    "1b": (2048, 5461, 512),
    "7b": (4096, 11008, 1024),
}
OPTIMIZERS = ("adamw", "adamw-foreach", "adamw-fused", "bnb-adamw8bit", "galore-torch", "galore-torch-8bit",
              "ours", "ours-ref", "ours-triton", "ours-gt", "ours-8bit", "matmuls")
#: run by default (the others on request or by gpu_check.sh)
DEFAULT_OPTIMIZERS = ("adamw", "adamw-foreach", "galore-torch", "ours", "ours-gt")
LABELS = {
    "adamw": "torch AdamW (foreach=False)",
    "adamw-foreach": "torch AdamW (foreach=True)",
    "adamw-fused": "torch AdamW (fused=True)",
    "bnb-adamw8bit": "bitsandbytes AdamW8bit",
    "galore-torch": "galore-torch GaLoreAdamW",
    "galore-torch-8bit": "galore-torch GaLoreAdamW8bit",
    "ours": "galore-opt GaLoreAdamW (numerics=torch)",
    "ours-ref": "galore-opt GaLoreAdamW (impl=reference)",
    "ours-triton": "galore-opt GaLoreAdamW (impl=triton)",
    "ours-gt": "galore-opt GaLoreAdamW (numerics=galore_torch)",
    "ours-8bit": "galore-opt GaLoreAdamW8bit",
    "matmuls": "the two projection GEMMs alone (cuBLAS)",
}
GALORE_KINDS = {"galore-torch", "galore-torch-8bit", "ours", "ours-ref", "ours-triton", "ours-gt", "ours-8bit"}
#: dense bf16 tensor-core FLOP/s and memory bandwidth (bytes/s) by device name, for the roofline
PEAKS = {
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "RTX 4090": (165e12, 1.008e12),
    "A100": (312e12, 2.0e12),
}
NO_REFRESH_GAP = 10**6


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{x:.0%}"


def layer_matrices(size: str, layers: int) -> list[tuple[str, tuple[int, int]]]:
    h, i, _ = SIZES[size]
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    return [(f"layers.{li}.{n}", s) for li in range(layers) for n, s in shapes.items()]


def make_params(size: str, layers: int, device: str, dtype: torch.dtype, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for _, (m, n) in layer_matrices(size, layers):
        p = torch.nn.Parameter((torch.randn(m, n, generator=g) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(m, n, generator=g) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


class MatmulsOnly(torch.optim.Optimizer):
    """The floor of a GaLore step: per matrix, the down-projection ``R = P^T G`` and the
    up-projection accumulated into the weight ``W += alpha P R`` (cuBLAS), with fixed bases."""

    def __init__(self, params: list[torch.nn.Parameter], rank: int, lr: float):
        super().__init__(params, {"lr": lr})
        for p in self.param_groups[0]["params"]:
            m, n = p.shape
            k = min(rank, m, n)
            left = m <= n  # the smaller side, as GaLore's std projection
            g = torch.Generator().manual_seed(m * 7 + n)
            q = torch.linalg.qr(torch.randn(m if left else n, k, generator=g))[0]
            self.state[p]["basis"] = (q if left else q.t().contiguous()).to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def step(self, closure=None):
        lr = self.param_groups[0]["lr"]
        for p in self.param_groups[0]["params"]:
            b = self.state[p]["basis"]
            if b.shape[0] == p.shape[0]:  # left: (m, r)
                p.addmm_(b, b.t() @ p.grad, alpha=-lr)
            else:  # right: (r, n)
                p.addmm_(p.grad @ b.t(), b, alpha=-lr)


def available(kind: str, device: str) -> str | None:
    """None if ``kind`` can run on ``device``, else why not (the row is skipped with that message)."""
    why = C.peer_unavailable(kind, device)
    if why is not None:
        return why
    cuda = torch.device(device).type == "cuda"
    if kind == "ours-triton":
        from galore_opt.kernels import triton_usable

        if not triton_usable(device):
            return "Triton cannot launch here (no GPU; TRITON_INTERPRET=1 would run the slow interpreter)"
    if kind == "matmuls" and not cuda:
        return "the GEMM floor is a GPU figure"
    return None


def make_optimizer(kind: str, params: list[torch.nn.Parameter], rank: int, gap: int, lr: float,
                   stagger: bool | None = None) -> torch.optim.Optimizer:
    galore_group = {"params": params, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, foreach=False)
    if kind == "adamw-foreach":
        return torch.optim.AdamW(params, lr=lr, foreach=True)
    if kind == "adamw-fused":
        return torch.optim.AdamW(params, lr=lr, fused=True)
    if kind == "bnb-adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr)
    if kind == "galore-torch":
        from galore_torch import GaLoreAdamW as GTGaLoreAdamW

        return GTGaLoreAdamW([galore_group], lr=lr, no_deprecation_warning=True)
    if kind == "galore-torch-8bit":
        from galore_torch import GaLoreAdamW8bit as GTGaLoreAdamW8bit

        return GTGaLoreAdamW8bit([galore_group], lr=lr)
    if kind == "matmuls":
        return MatmulsOnly(params, rank, lr)
    if stagger is not None:
        galore_group["stagger_refresh"] = stagger
    if kind in ("ours", "ours-ref", "ours-triton"):
        impl = {"ours": "auto", "ours-ref": "reference", "ours-triton": "triton"}[kind]
        return GaLoreAdamW([galore_group], lr=lr, impl=impl)
    if kind == "ours-8bit":
        return GaLoreAdamW8bit([galore_group], lr=lr)
    if kind == "ours-gt":
        galore_group.pop("stagger_refresh", None)
        return GaLoreAdamW([galore_group], lr=lr, numerics="galore_torch")
    raise ValueError(kind)


def roofline_s(size: str, layers: int, rank: int, dtype: torch.dtype, device: str) -> float | None:
    """Lower bound of a GaLore step at this shape: max(FLOPs / peak, bytes / bandwidth), where the
    FLOPs are the two projection GEMMs (4 r m n per matrix) and the bytes one read of G, one read
    and one write of W, and the low-rank moments read and written in fp32."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    peak = next((v for k, v in PEAKS.items() if k in name), None)
    if peak is None:
        return None
    flops, bw = peak
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        flops = flops / 14  # fp32 without TF32: CUDA cores only (about 67 of 989 TFLOP/s on Hopper)
    d = torch.finfo(dtype).bits // 8
    total_flops = total_bytes = 0
    for _, (m, n) in layer_matrices(size, layers):
        r = min(rank, m, n)
        low = r * max(m, n)
        total_flops += 4 * r * m * n
        total_bytes += 3 * m * n * d + low * (d + 4 * 4)
    return max(total_flops / flops, total_bytes / bw)


def timed_step(opt: torch.optim.Optimizer, device: str) -> float:
    C.sync(device)
    t0 = time.perf_counter()
    opt.step()
    C.sync(device)
    return time.perf_counter() - t0


def run_optimizer(kind: str, size: str, args: argparse.Namespace, dtype: torch.dtype,
                  log: Callable[[str], None]) -> dict[str, Any]:
    rank = args.rank or SIZES[size][2]
    galore = kind in GALORE_KINDS
    row: dict[str, Any] = dict(size=size, layers=args.layers, rank=rank if galore else None, optimizer=kind,
                               label=LABELS[kind])

    monitor = C.CpuMonitor().start()
    # steady state: no refresh after the first step
    params = make_params(size, args.layers, args.device, dtype, args.seed)
    row["param_bytes"] = sum(p.numel() * p.element_size() for p in params)
    opt = make_optimizer(kind, params, rank, NO_REFRESH_GAP, args.lr)
    row["first_step_s"] = timed_step(opt, args.device)
    for _ in range(args.warmup):
        timed_step(opt, args.device)
    times = [timed_step(opt, args.device) for _ in range(args.steps)]
    row["steady_s"] = statistics.median(times)
    row["steady_times_s"] = times
    row["state_bytes"] = optimizer_state_bytes(opt)
    gc.collect()
    row["peak_extra_steady_bytes"], row["net_steady_bytes"] = C.peak_extra_bytes(opt.step, args.device)
    del opt, params
    gc.collect()

    if galore and not args.skip_refresh:
        params = make_params(size, args.layers, args.device, dtype, args.seed)
        gap = args.refresh_gap
        opt = make_optimizer(kind, params, rank, gap, args.lr, stagger=False if kind.startswith("ours") else None)
        refresh_times = []
        steps = gap * args.refresh_repeats
        for s in range(steps + 1):
            t = timed_step(opt, args.device)
            if s > 0 and s % gap == 0:
                refresh_times.append(t)
        for _ in range(gap - 1):  # the next step refreshes again: measure its memory
            opt.step()
        gc.collect()
        row["peak_extra_refresh_bytes"], _ = C.peak_extra_bytes(opt.step, args.device)
        row["refresh_s"] = statistics.median(refresh_times)
        row["refresh_times_s"] = refresh_times
        row["state_bytes_after_refresh"] = optimizer_state_bytes(opt)
        row["amortized_gap200_s"] = row["steady_s"] + (row["refresh_s"] - row["steady_s"]) / 200
        del opt, params
        gc.collect()
    elif galore:  # --skip-refresh: the first (cold) step is the only refresh measured
        row["refresh_s"] = row["peak_extra_refresh_bytes"] = None
        row["amortized_gap200_s"] = row["steady_s"] + (row["first_step_s"] - row["steady_s"]) / 200
    else:
        row["refresh_s"] = row["peak_extra_refresh_bytes"] = None
        row["amortized_gap200_s"] = row["steady_s"]
    row["others_cpu"] = monitor.stop()
    log(f"  {LABELS[kind]:<48} steady {C.fmt_ms(row['steady_s']):>7} ms  refresh {C.fmt_ms(row['refresh_s']):>7} ms  "
        f"state {C.fmt_mib(row['state_bytes']):>7} MiB  peak extra {C.fmt_mib(row['peak_extra_steady_bytes']):>7} MiB  "
        f"(other processes: {_pct(row['others_cpu'])} CPU)")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size", default="60m,130m,350m", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--layers", type=int, default=1, help="decoder layers (7 matrices each)")
    ap.add_argument("--rank", type=int, default=None, help="GaLore rank (default: the paper's for the size)")
    ap.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS), help=f"comma list of {', '.join(OPTIMIZERS)}")
    ap.add_argument("--steps", type=int, default=20, help="timed steady steps (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first one")
    ap.add_argument("--refresh-gap", type=int, default=2, help="update_proj_gap of the refresh-step run")
    ap.add_argument("--refresh-repeats", type=int, default=2, help="refresh steps timed (median)")
    ap.add_argument("--skip-refresh", action="store_true",
                    help="no refresh-step run (amortize the first, cold step instead): for slow SVDs at 7B")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--seed", type=int, default=0)
    C.add_machine_args(ap)
    args = ap.parse_args(argv)
    sizes = [s.strip().lower() for s in args.size.split(",") if s.strip()]
    kinds = [k.strip() for k in args.optimizers.split(",") if k.strip()]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}")
    for k in kinds:
        if k not in OPTIMIZERS:
            ap.error(f"unknown optimizer {k!r}")
    dtype = getattr(torch, args.dtype)
    warnings.filterwarnings("ignore", category=FutureWarning)

    C.apply_machine_args(args)
    info = C.machine_info(args.device)
    print(f"# {info['cpu_model']}, {info['cpu_count']} cores, torch {info['torch_version']}, "
          f"{info['torch_num_threads']} threads, device {args.device}, {args.dtype}, load avg {info.get('loadavg_start')}")
    check = C.check_peak_method(args.device)
    print(f"# peak-memory method check: peak {check['peak']} B (expected {check['expected_peak']}), "
          f"net {check['net']} B (expected {check['expected_net']}): {'ok' if check['ok'] else 'MISMATCH'}")
    log = lambda s: print(s, flush=True)  # noqa: E731
    rows = []
    t_start = time.perf_counter()
    monitor = C.CpuMonitor().start()
    for size in sizes:
        mats = layer_matrices(size, args.layers)
        n_params = sum(m * n for _, (m, n) in mats)
        log(f"== {size}: {len(mats)} matrices ({args.layers} layer(s), hidden {SIZES[size][0]}, intermediate "
            f"{SIZES[size][1]}), {n_params / 1e6:.1f}M params, rank {args.rank or SIZES[size][2]}")
        roof = roofline_s(size, args.layers, args.rank or SIZES[size][2], dtype, args.device)
        if roof is not None:
            log(f"  roofline of a GaLore step here: {C.fmt_ms(roof)} ms")
        for kind in kinds:
            why = available(kind, args.device)
            if why is not None:
                log(f"  {LABELS[kind]:<48} skipped: {why}")
                continue
            threshold = C.BUSY_RETRY["threshold"]
            for attempt in range(C.BUSY_RETRY["attempts"] if threshold is not None else 1):
                row = run_optimizer(kind, size, args, dtype, log)
                row["attempts"] = attempt + 1
                row["roofline_s"] = roof
                if threshold is None or row["others_cpu"] is None or row["others_cpu"] <= threshold:
                    break
                if attempt < C.BUSY_RETRY["attempts"] - 1:
                    log("  (machine busy: measuring again when idle)")
                    C.wait_for_idle(C.BUSY_RETRY["wait_s"], threshold=threshold)
            rows.append(row)
    elapsed = time.perf_counter() - t_start
    others = monitor.stop()

    headers = ["optimizer", "steady ms", "roofline ms", "refresh step ms", "first step ms", "amortized@gap200 ms",
               "state MiB", "peak extra MiB (steady)", "peak extra MiB (refresh)", "others' CPU"]
    print()
    for size in sizes:
        sel = [r for r in rows if r["size"] == size]
        if not sel:
            continue
        print(f"## {size}, {args.layers} layer(s), {sel[0]['param_bytes'] / 2**20:.1f} MiB of {args.dtype} params, "
              f"rank {args.rank or SIZES[size][2]}, device {args.device}")
        print(C.format_table(headers, [[
            r["label"], C.fmt_ms(r["steady_s"]), C.fmt_ms(r["roofline_s"]), C.fmt_ms(r["refresh_s"]),
            C.fmt_ms(r["first_step_s"]),
            C.fmt_ms(r["amortized_gap200_s"]), C.fmt_mib(r["state_bytes"]),
            C.fmt_mib(r["peak_extra_steady_bytes"]), C.fmt_mib(r["peak_extra_refresh_bytes"]), _pct(r["others_cpu"]),
        ] for r in sel]))
        print()
    print(f"(total {elapsed:.0f} s; other processes used {_pct(others)} of the CPUs meanwhile)")
    if others is not None and others > 0.1:
        print("WARNING: the machine was shared during the run: timings are inflated and noisy; rerun when idle")
    payload = dict(benchmark="bench_step", machine=info,
                   args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   peak_method_check=check, rows=rows, elapsed_s=elapsed, others_cpu=others)
    path = C.write_json(args.out or C.default_result_path("bench_step", args.device), payload)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
