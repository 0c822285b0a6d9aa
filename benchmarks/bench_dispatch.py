"""Operators dispatched per optimizer step, counted by a dispatch mode (no GPU needed).

For each optimizer, on a LLaMA-like stack of ``--layers`` decoder layers (q, k, v, o, gate, up,
down per layer, plus the embedding, the head and the norms):

* ``fake_cuda``: the step on fake CUDA tensors (``FakeTensorMode``): the code path a GPU runs, the
  fused kernels' operators (``torch.ops.galore_opt.*``) counted once each; and the number of host
  synchronizations (reads of a device value, copies to the CPU) the step would make;
* ``cpu``: the step on real CPU tensors (the reference path that runs here).

Each is counted on a steady step and on a refresh step (every basis refreshed at once). Prints a
table and writes JSON (default ``benchmarks/results/bench_dispatch-cpu-<date>.json``).

    python benchmarks/bench_dispatch.py --layers 8 --hidden 256 --intermediate 688 --rank 64
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from galore_opt import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit  # noqa: E402
from galore_opt.testing.dispatch import OpRecorder  # noqa: E402

OPTIMIZERS = {
    "torch-adamw-foreach": lambda g: torch.optim.AdamW([{"params": q["params"]} for q in g], lr=1e-3, foreach=True),
    "torch-adamw-single": lambda g: torch.optim.AdamW([{"params": q["params"]} for q in g], lr=1e-3, foreach=False),
    "galore-adamw-permatrix": lambda g: GaLoreAdamW(g, lr=1e-3, foreach=False),
    "galore-adamw": lambda g: GaLoreAdamW(g, lr=1e-3),
    "galore-adamw-grouped-all": lambda g: GaLoreAdamW(g, lr=1e-3, foreach=True),
    "galore-adamw8bit-permatrix": lambda g: GaLoreAdamW8bit(g, lr=1e-3, foreach=False),
    "galore-adamw8bit": lambda g: GaLoreAdamW8bit(g, lr=1e-3),
    "galore-adamw8bit-all8bit-permatrix": lambda g: GaLoreAdamW8bit(g, lr=1e-3, min_8bit_size=0, foreach=False),
    "galore-adamw8bit-all8bit": lambda g: GaLoreAdamW8bit(g, lr=1e-3, min_8bit_size=0),
    "galore-adafactor": lambda g: GaLoreAdafactor(g, lr=1e-3),
}


def build(device: str, dtype: torch.dtype, args: argparse.Namespace):
    h, i, v = args.hidden, args.intermediate, args.vocab
    shapes = [(h, h)] * 4 + [(i, h), (i, h), (h, i)]
    matrices = [torch.randn(s, device=device, dtype=dtype) for _ in range(args.layers) for s in shapes]
    others = [torch.randn(v, h, device=device, dtype=dtype), torch.randn(v, h, device=device, dtype=dtype)]
    others += [torch.randn(h, device=device, dtype=dtype) for _ in range(2 * args.layers + 1)]
    groups = [
        {"params": matrices, "rank": args.rank, "update_proj_gap": 2, "stagger_refresh": False},
        {"params": others},
    ]
    return groups, matrices + others


def count(name: str, device: str, dtype: torch.dtype, args: argparse.Namespace) -> dict[str, object]:
    def run() -> dict[str, object]:
        torch.manual_seed(0)
        groups, params = build(device, dtype, args)
        opt = OPTIMIZERS[name](groups)
        out: dict[str, object] = {}
        # steps 0 (cold), 1 (steady), 2 (refresh of every basis), 3 (steady)
        for label in ("first", "steady", "refresh", "steady2"):
            for p in params:
                p.grad = torch.randn_like(p) if device == "cpu" else torch.empty_like(p)
            with OpRecorder() as rec:
                opt.step()
            if label in ("steady", "refresh"):
                out[label] = {"ops": rec.total, "syncs": len(rec.syncs), "fused_ops": sum(rec.custom_ops().values())}
        out["matrices"] = args.layers * 7
        return out

    if device == "cuda":
        with FakeTensorMode():
            return run()
    return run()


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = []
    print(f"{'optimizer':26} {'path':10} {'steady ops':>10} {'/matrix':>8} {'refresh ops':>11} {'fused':>6} {'syncs':>6}")
    for name in args.optimizers.split(","):
        for device, path in (("cuda", "fake_cuda"), ("cpu", "cpu")):
            r = count(name, device, dtype, args)
            rows.append({"optimizer": name, "path": path, **r})
            s, f = r["steady"], r["refresh"]
            print(f"{name:26} {path:10} {s['ops']:10} {s['ops'] / r['matrices']:8.1f} {f['ops']:11} "
                  f"{s['fused_ops']:6} {s['syncs'] + f['syncs']:6}")  # fmt: skip
    result = {
        "benchmark": "bench_dispatch",
        "date": dt.date.today().isoformat(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "note": "ops: aten operators dispatched in one optimizer.step() (a galore_opt fused operator counts once); "
        "syncs: host reads of device values and device-to-CPU copies (fake_cuda path only)",
        "rows": rows,
    }
    out = args.out or Path(__file__).parent / "results" / f"bench_dispatch-cpu-{dt.date.today():%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
