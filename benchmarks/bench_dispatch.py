"""The optimizer step as the host sees it: operators dispatched, kernel launches, host time and
step time, per-matrix against grouped (issue 15), all in one run (no GPU needed).

Optimizers: torch AdamW (``foreach=True``, ``fused=True``, single tensor), galore-torch 1.0's
``GaLoreAdamW``, galore-opt's ``GaLoreAdamW`` and ``GaLoreAdamW8bit`` (8-bit moments on every
matrix: ``min_8bit_size=0``) on the per-matrix path (``foreach=False``) and the grouped one
(the default; ``foreach=True`` also groups on CUDA instead of the per-matrix Triton kernels).
Parameters: the 7 matrices (q, k, v, o, gate, up, down) of ``--layers`` LLaMA-like decoder
layers, all in one GaLore group (``--with-others`` adds the embedding, the head and the norms as
full-size parameters).

1. ``ops``: aten operators dispatched by one steady ``step()`` on real CPU tensors (a
   ``TorchDispatchMode``; a ``torch.ops.galore_opt`` kernel counts once), and on a refresh step
   (every basis refreshed at once);
2. ``fake_cuda``: the same on fake CUDA tensors (``FakeTensorMode``): the code path a GPU runs; its
   count is the kernel launches of the step, up to foreach operators (FakeTensorMode runs a
   foreach operator as one operator per tensor, where CUDA launches one kernel per chunk of
   tensors: an upper bound for torch's foreach and our grouped path), and the host syncs;
3. ``host``: host time of a steady step on tiny matrices (hidden 16, intermediate 32, rank 4, one
   thread): median over ``--host-steps`` steps, per parameter;
4. ``step``: step time on this CPU at the per-layer shapes of the GaLore paper's 60M, 130M and 1B
   LLaMAs (7 matrices of one layer, the paper's rank): median of ``--steps`` steady steps, on
   ``--threads`` threads (default 1).

Prints tables; writes JSON and a plot (default ``benchmarks/results/bench_dispatch-cpu-<date>``).

    python benchmarks/bench_dispatch.py
    python benchmarks/bench_dispatch.py --sizes 60m --steps 3 --host-steps 20   # quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from galore_opt import GaLoreAdamW, GaLoreAdamW8bit  # noqa: E402
from galore_opt.testing.dispatch import OpRecorder  # noqa: E402


def _plain(groups):
    return [{"params": [p for g in groups for p in g["params"]]}]


def _galore_torch(groups, lr):
    import galore_torch

    gt = []
    for g in groups:
        if "rank" in g:
            gt.append({"params": g["params"], "rank": g["rank"], "update_proj_gap": g["update_proj_gap"],
                       "scale": 0.25, "proj_type": "std"})  # fmt: skip
        else:
            gt.append({"params": g["params"]})
    return galore_torch.GaLoreAdamW(gt, lr=lr)


OPTIMIZERS = {
    "torch-adamw-foreach": lambda g: torch.optim.AdamW(_plain(g), lr=1e-3, foreach=True),
    "torch-adamw-fused": lambda g: torch.optim.AdamW(_plain(g), lr=1e-3, fused=True),
    "torch-adamw-single": lambda g: torch.optim.AdamW(_plain(g), lr=1e-3, foreach=False),
    "galore-torch": lambda g: _galore_torch(g, 1e-3),
    "ours-per-matrix": lambda g: GaLoreAdamW(g, lr=1e-3, foreach=False),
    "ours-grouped": lambda g: GaLoreAdamW(g, lr=1e-3),
    "ours-grouped-all": lambda g: GaLoreAdamW(g, lr=1e-3, foreach=True),
    "ours-8bit-per-matrix": lambda g: GaLoreAdamW8bit(g, lr=1e-3, min_8bit_size=0, foreach=False),
    "ours-8bit-grouped": lambda g: GaLoreAdamW8bit(g, lr=1e-3, min_8bit_size=0),
    "ours-8bit-grouped-all": lambda g: GaLoreAdamW8bit(g, lr=1e-3, min_8bit_size=0, foreach=True),
}
#: the per-layer shapes (hidden, intermediate, rank) of the GaLore paper's LLaMAs
SIZES = {"60m": (512, 1376, 128), "130m": (768, 2048, 256), "1b": (2048, 5461, 512)}
#: timed at the SIZES (the *-all variants equal the grouped ones on the CPU)
STEP_OPTIMIZERS = ("torch-adamw-foreach", "torch-adamw-fused", "galore-torch", "ours-per-matrix", "ours-grouped",
                   "ours-8bit-per-matrix", "ours-8bit-grouped")  # fmt: skip


def build(device, dtype, layers, hidden, inter, rank, with_others=False, vocab=1000, gap=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter)]

    def make(shape):
        t = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
        return torch.nn.Parameter(t.to(device) if device == "cpu" else torch.empty(shape, device=device, dtype=dtype))

    matrices = [make(s) for _ in range(layers) for s in shapes]
    groups = [{"params": matrices, "rank": rank, "update_proj_gap": gap, "stagger_refresh": False}]
    params = list(matrices)
    if with_others:
        others = [make((vocab, hidden)), make((vocab, hidden))] + [make((hidden,)) for _ in range(2 * layers + 1)]
        groups.append({"params": others})
        params += others
    return groups, params


def _grads(params, device, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype) if device == "cpu" else torch.empty_like(p)


def count(name, device, dtype, args):
    """Ops of a steady and of a refresh step (steps 0: cold start, 1: the first warm one, where the
    grouped path builds its buffers, 2: steady, 3: refresh of every basis, gap 3)."""

    def run():
        groups, params = build(device, dtype, args.layers, args.hidden, args.intermediate, args.rank, args.with_others)
        opt = OPTIMIZERS[name](groups)
        out = {}
        for step, label in enumerate(("first", "second", "steady", "refresh")):
            _grads(params, device, step)
            with OpRecorder() as rec:
                opt.step()
            if label in ("steady", "refresh"):
                out[label] = {"ops": rec.total, "syncs": len(rec.syncs), "fused_ops": sum(rec.custom_ops().values())}
        out["params"] = len(params)
        out["matrices"] = args.layers * 7
        return out

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if device == "cuda":
                with FakeTensorMode():
                    return run()
            return run()
    except Exception as e:  # an optimizer that cannot run there (e.g. galore-torch on fake CUDA)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}


def timed_steps(name, groups, params, steps, warmup=2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OPTIMIZERS[name](groups)
        _grads(params, "cpu", 0)
        for _ in range(1 + warmup):
            opt.step()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
    return statistics.median(times), times


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--with-others", action="store_true", help="add embedding, head and norms (full-size AdamW)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--host-steps", type=int, default=200)
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--steps", type=int, default=5, help="timed steady steps per size (median)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads for the step times (1: stable on a shared machine)"
    )
    p.add_argument("--out", type=Path, default=None, help="JSON path (the plot beside it, .png)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    names = [n for n in args.optimizers.split(",") if n]
    have_gt = True
    try:
        import galore_torch  # noqa: F401
    except ImportError:
        have_gt = False
        names = [n for n in names if n != "galore-torch"]

    # 1 and 2: ops and fake-CUDA launches
    ops_rows = []
    print(
        f"ops per step, {args.layers * 7} matrices ({args.hidden}/{args.intermediate}, rank {args.rank}, {args.dtype})"
    )
    print(f"{'optimizer':24} {'path':10} {'steady':>7} {'/param':>7} {'refresh':>8} {'fused':>6} {'syncs':>6}")
    for name in names:
        for device, path in (("cpu", "cpu"), ("cuda", "fake_cuda")):
            r = count(name, device, dtype, args)
            ops_rows.append({"optimizer": name, "path": path, **r})
            if "error" in r:
                print(f"{name:24} {path:10} {r['error']}")
                continue
            s, f = r["steady"], r["refresh"]
            print(f"{name:24} {path:10} {s['ops']:7} {s['ops'] / r['params']:7.1f} {f['ops']:8} {s['fused_ops']:6} "
                  f"{s['syncs'] + f['syncs']:6}")  # fmt: skip

    # 3: host time on tiny matrices, one thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    host_rows = []
    print("\nhost time per steady step, tiny matrices (16/32, rank 4), 1 thread")
    for name in names:
        groups, params = build("cpu", torch.float32, args.layers, 16, 32, 4, gap=10**6)
        med, _ = timed_steps(name, groups, params, args.host_steps, warmup=5)
        host_rows.append({"optimizer": name, "step_s": med, "per_param_s": med / len(params), "params": len(params)})
        print(f"{name:24} {med * 1e3:8.3f} ms  {med / len(params) * 1e6:7.2f} us/param")
    torch.set_num_threads(args.threads or threads)  # 0: torch's default

    # 4: step time at the paper's per-layer shapes
    step_rows = []
    for size in [s for s in args.sizes.split(",") if s]:
        hidden, inter, rank = SIZES[size]
        print(f"\nstep time, {size} layer ({hidden}/{inter}, rank {rank}), {torch.get_num_threads()} threads")
        for name in [n for n in STEP_OPTIMIZERS if n in names]:
            groups, params = build("cpu", torch.float32, 1, hidden, inter, rank, gap=10**6)
            med, times = timed_steps(name, groups, params, args.steps)
            step_rows.append({"optimizer": name, "size": size, "step_s": med, "times_s": times})
            print(f"{name:24} {med * 1e3:9.2f} ms")
            del groups, params

    result = {
        "benchmark": "bench_dispatch",
        "machine": _common.machine_info("cpu"),
        "galore_torch": have_gt,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "note": "ops: aten operators dispatched in one optimizer.step() (a galore_opt fused operator counts once); "
        "fake_cuda: the same on fake CUDA tensors (foreach operators counted once per tensor there); syncs: host "
        "reads of device values and device-to-CPU copies; host: median steady step on tiny matrices, 1 thread; "
        "step: median steady step at the per-layer shapes on this CPU",
        "ops": ops_rows,
        "host": host_rows,
        "step": step_rows,
    }
    out = args.out or Path(__file__).parent / "results" / f"bench_dispatch-cpu-{dt.date.today():%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    cpu = [r for r in result["ops"] if r["path"] == "cpu" and "error" not in r]
    fake = {r["optimizer"]: r for r in result["ops"] if r["path"] == "fake_cuda" and "error" not in r}
    names = [r["optimizer"] for r in cpu]
    y = range(len(names))
    axes[0].barh([i + 0.2 for i in y], [r["steady"]["ops"] for r in cpu], height=0.4, label="CPU (aten ops)")
    axes[0].barh([i - 0.2 for i in y], [fake[n]["steady"]["ops"] if n in fake else 0 for n in names], height=0.4,
                 label="fake CUDA (launch bound)")  # fmt: skip
    axes[0].set_xscale("log")
    axes[0].set_yticks(list(y), names)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("operators per steady step (log)")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"{cpu[0]['matrices']} LLaMA-like matrices" if cpu else "ops")
    host = result["host"]
    axes[1].barh(range(len(host)), [r["per_param_s"] * 1e6 for r in host])
    axes[1].set_yticks(range(len(host)), [r["optimizer"] for r in host])
    axes[1].invert_yaxis()
    axes[1].set_xlabel("host time per parameter, us (tiny matrices, 1 thread)")
    sizes = list(dict.fromkeys(r["size"] for r in result["step"]))
    opts = list(dict.fromkeys(r["optimizer"] for r in result["step"]))
    width = 0.8 / max(1, len(opts))
    for j, name in enumerate(opts):
        vals = [
            next((r["step_s"] * 1e3 for r in result["step"] if r["size"] == s and r["optimizer"] == name), 0)
            for s in sizes
        ]
        axes[2].bar([i + j * width for i in range(len(sizes))], vals, width=width, label=name)
    axes[2].set_xticks([i + 0.4 - width / 2 for i in range(len(sizes))], [f"{s} layer" for s in sizes])
    axes[2].set_yscale("log")
    axes[2].set_ylabel("steady step, ms (log)")
    axes[2].legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"bench_dispatch: {m.get('cpu_model')}, torch {m.get('torch_version')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
