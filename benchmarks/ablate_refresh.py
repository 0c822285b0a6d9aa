"""Training quality of the default refresh against the refresh it replaced, over several seeds.

The default warm refresh (``numerics="torch"``) changed on 2026-11-27 in two ways that make it
cheaper (see ``galore_opt/projector.py`` and ``GaLoreOptimizer._refresh_if_due``):

* alignment: Gram-Schmidt (an ``r x r`` QR) instead of the orthogonal-Procrustes rotation (an
  ``r x r`` SVD);
* order: the new basis takes effect from the step after the refresh (the refresh step's update uses
  the current basis, whose projected gradient starts the power iteration) instead of refresh, then
  project with the new basis.

This script trains ``bench_quality.py``'s model (LLaMA-tiny on the standard library's text, the
``--scale`` preset) with ``ours`` (the default refresh) under each variant, for each seed, and
reports the test losses (``bench_quality.train_run`` at ``--lr``, one run per variant and seed).
The previous behaviour is recreated here by replacing the two
functions for the run (``procrustes``: the alignment; ``refresh_first``: the order); the library
itself has no switch for them.

    python benchmarks/ablate_refresh.py --seeds 0,1,2                         # about 9 min on 2 cores
    python benchmarks/ablate_refresh.py --seeds 0 --variants default,procrustes,refresh_first,previous
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as C  # noqa: E402

VARIANTS = {
    "default": "the current default: Gram-Schmidt alignment, new basis from the next step",
    "procrustes": "Procrustes alignment (r x r SVD), new basis from the next step",
    "refresh_first": "Gram-Schmidt alignment, refresh then project with the new basis",
    "previous": "the previous default: Procrustes alignment, refresh then project with the new basis",
}


def _patch(variant: str) -> None:
    """Recreate the previous behaviour in this process (run as a child, see :func:`main`)."""
    import torch

    import galore_opt.projector as projector
    from galore_opt import config as GC
    from galore_opt.optim import base

    if variant in ("procrustes", "previous"):
        def procrustes(new: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
            u, _, vh = torch.linalg.svd(new.t() @ prev.to(new.dtype))
            return new @ (u @ vh)

        projector._align = procrustes
    if variant in ("refresh_first", "previous"):
        def refresh_first(self, p, grad, group, index, side):
            state = self.state[p]
            if self._refresh_due(state, group, side):
                self._refresh(p, grad, group, index, side, int(state[GC.STEP].item()))
            return None

        base.GaLoreOptimizer._refresh_if_due = refresh_first


def child(variant: str, seed: int, scale: str, lr: float, out: Path) -> None:
    _patch(variant)
    import bench_quality
    import torch

    args = bench_quality.parse_args(["--scale", scale])
    cfg = {k: getattr(args, k) for k in bench_quality.RUN_KEYS}
    if args.threads:
        torch.set_num_threads(args.threads)
    # one run, not bench_quality's cached sweep: the patched library must not write into its cache
    run = bench_quality.train_run("ours", lr, seed, cfg)
    out.write_text(json.dumps({"runs": [{"eval_loss": run["test_loss"], "final_train_loss": run["final_train_loss"]}]}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma list of bench_quality seeds")
    ap.add_argument("--variants", default="default,previous", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--scale", default="cpu", help="bench_quality preset (cpu, gpu, smoke)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/ablate_refresh-...)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    ap.add_argument("--lr", type=float, default=3e-3, help="learning rate of the ours runs (scale 0.25)")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "SEED", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.scale, args.lr, Path(args.child[2]))
        return 0
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(seed, v, Path(tmp) / f"{v}-{seed}.json") for seed in seeds for v in variants]

        def run(job: tuple[int, str, Path]) -> None:
            # a fresh process per run: the patches must not leak into the next variant
            seed, v, out = job
            subprocess.run([sys.executable, __file__, "--scale", args.scale, "--lr", str(args.lr), "--child", v,
                            str(seed), str(out)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        # the losses do not depend on timing, so runs may share the machine (one thread each)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(run, jobs))
        for seed, v, out in jobs:
            r = json.loads(out.read_text())["runs"][0]
            runs.append({"variant": v, "seed": seed, "eval_loss": r["eval_loss"],
                         "final_train_loss": r.get("final_train_loss")})
            print(f"seed {seed} {v:<14} eval loss {r['eval_loss']:.4f}", flush=True)
    summary = {}
    for v in variants:
        losses = [r["eval_loss"] for r in runs if r["variant"] == v]
        summary[v] = {"mean_eval_loss": statistics.mean(losses), "eval_losses": losses}
    if "default" in variants and "previous" in variants:
        diffs = [a["eval_loss"] / b["eval_loss"] - 1 for a in runs if a["variant"] == "default"
                 for b in runs if b["variant"] == "previous" and b["seed"] == a["seed"]]
        summary["default_vs_previous_relative"] = diffs
        print("default vs previous, eval loss per seed: " + ", ".join(f"{d:+.2%}" for d in diffs))
    payload = {"benchmark": "ablate_refresh", "machine": C.machine_info("cpu"), "versions": C.library_versions(),
               "args": {"seeds": seeds, "variants": variants, "scale": args.scale, "lr": args.lr}, "variants": VARIANTS,
               "runs": runs, "summary": summary}
    path = C.write_json(args.out or C.default_result_path("ablate_refresh"), payload)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
