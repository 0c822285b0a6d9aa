"""Refresh cost in single-thread CPU time: galore-torch's SVD refresh vs our default refresh.

Ours is timed as GaLoreAdamW runs it: ``compute_basis(..., "power", align=True, projected=P^T G)``,
the projected gradient being the one the step's update computes anyway (``ours_without_reuse_ms``:
the same refresh computing it again).

Wall-clock timings on a shared 2-core machine swing with whatever else runs; the CPU time of one
thread (``time.thread_time`` with ``torch.set_num_threads(1)``) measures the work itself. Uses the
real gradients that ``bench_projector.py`` captures (steps t and t + gap of a LLaMA MLP) from its
cache, ``~/.cache/galore_opt/grads-*.pt``; run bench_projector.py first.

    python benchmarks/bench_refresh_cputime.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from galore_opt.projector import captured_energy, choose_side, compute_basis


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/galore_opt"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from galore_torch.galore_projector import GaLoreProjector

    torch.set_num_threads(1)
    clock = time.thread_time
    rows = []
    files = sorted(glob.glob(f"{args.cache}/grads-*.pt"))
    if not files:
        raise SystemExit(f"no captured gradients under {args.cache}: run benchmarks/bench_projector.py first")
    for path in files:
        for name, grads in torch.load(path, weights_only=True).items():
            g_prev, g = grads["t"].float(), grads["t+gap"].float()
            rank = 128 if min(g.shape) <= 1024 else 512
            side = choose_side(g.shape, "std", rank)
            prev_left, prev_right = compute_basis(g_prev, rank, side, "svd")
            reference = GaLoreProjector(rank, proj_type="std")
            # the update's projected gradient with the previous basis: GaLoreAdamW's refresh reuses it
            low = prev_left.t() @ g if side == "left" else g @ prev_right.t()
            ref_t, our_t, whole_t = [], [], []
            for _ in range(args.repeats):  # interleaved, so both see the same conditions
                t = clock()
                reference.get_orthogonal_matrix(g, rank, side)
                ref_t.append(clock() - t)
                t = clock()
                ours = compute_basis(g, rank, side, "power", prev_left=prev_left, prev_right=prev_right, align=True,
                                     projected=low)
                our_t.append(clock() - t)
                t = clock()
                compute_basis(g, rank, side, "power", prev_left=prev_left, prev_right=prev_right, align=True)
                whole_t.append(clock() - t)
            exact = compute_basis(g, rank, side, "svd")
            row = {
                "matrix": name,
                "shape": list(g.shape),
                "rank": rank,
                "side": side,
                "galore_torch_ms": 1e3 * statistics.median(ref_t),
                "ours_ms": 1e3 * statistics.median(our_t),
                "ours_without_reuse_ms": 1e3 * statistics.median(whole_t),
                "energy_ratio": captured_energy(g, *ours) / captured_energy(g, *exact),
            }
            row["speedup"] = row["galore_torch_ms"] / row["ours_ms"]
            rows.append(row)
            print(
                f"{name:<36} {g.shape[0]:>5}x{g.shape[1]:<5} r{rank:<4} {side:<5} galore-torch {row['galore_torch_ms']:8.0f} ms"
                f"  ours {row['ours_ms']:6.0f} ms ({row['ours_without_reuse_ms']:.0f} ms recomputing P^T G)"
                f"  {row['speedup']:5.1f}x  energy ratio {row['energy_ratio']:.5f}",
                flush=True,
            )
    result = {
        "benchmark": "refresh_cputime",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__},
        "method": "galore-torch GaLoreProjector.get_orthogonal_matrix vs galore-opt compute_basis(power, 1 iteration, align, "
        "projected=P^T G: the update's projected gradient, which GaLoreAdamW's refresh reuses; ours_without_reuse_ms "
        "computes it again) warm-started from the exact basis of step t; single-thread CPU time, median of --repeats",
        "rows": rows,
    }
    out = args.out or Path(__file__).parent / "results" / f"refresh_cputime-cpu-{datetime.date.today():%Y%m%d}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
