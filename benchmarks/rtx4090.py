"""The "RTX 4090" scenario: which LLaMA size / batch / sequence length trains in 24 GiB, per optimizer.

On a GPU (``--device cuda``, the default when CUDA is available) the process' memory is capped with
``torch.cuda.set_per_process_memory_fraction`` at ``--cap-gib`` (24) of the card's memory, a bf16
LLaMA of each ``--sizes`` is built on the device (random init, 32000-token vocabulary, synthetic
token ids), and for every optimizer and every ``--shapes`` entry (``BATCHxSEQ``) two training steps
are run (the first one includes the cold refresh); a CUDA out-of-memory error marks the combination
as not fitting. Recorded: fits, peak ``max_memory_allocated``, the second step's time. Optimizers and
GaLore settings as in ``bench_e2e.py`` (the paper's rank; galore-torch's 8-bit recipe is
``galore-torch-8bit`` without its per-layer hooks, which exist only in its training script).
``--checkpointing`` turns on transformers' activation checkpointing, as the GaLore README's 7B
recipe does.

Without CUDA it says so and lists what **would** fit according to the memory model
``galore_opt.memory.estimate_memory`` (bf16 weights, CUDA implementations) for our optimizers,
torch AdamW and 8-bit AdamW, with and without layer-wise updates: an ESTIMATE, labelled as such
in the table and in the JSON (``"mode": "estimate"``). galore-torch and LoRA are not modelled
by the estimator and appear only in measured runs.

    python benchmarks/rtx4090.py                                   # GPU: measured; CPU: estimate
    python benchmarks/rtx4090.py --sizes 7b --shapes 1x256,4x256,16x256 --checkpointing
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import bench_e2e as E  # noqa: E402
import torch  # noqa: E402

from galore_opt.memory import estimate_memory  # noqa: E402

DEFAULT_MEASURED = ("adamw", "bnb-adamw8bit", "galore-torch", "galore-torch-8bit", "ours", "ours-8bit",
                    "ours-layerwise", "ours-8bit-layerwise")
#: estimator rows: (label, estimate_memory optimizer, layer-wise)
ESTIMATED = (
    ("torch AdamW", "adamw", False),
    ("8-bit AdamW", "adamw8bit", False),
    ("ours GaLoreAdamW", "galore-adamw", False),
    ("ours GaLoreAdamW8bit", "galore-adamw8bit", False),
    ("ours GaLoreAdamW layer-wise", "galore-adamw", True),
    ("ours GaLoreAdamW8bit layer-wise", "galore-adamw8bit", True),
)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            b, s = (int(x) for x in item.split("x"))
        except ValueError:
            raise ValueError(f"bad shape {item!r}: expected BATCHxSEQ, e.g. 4x256") from None
        if b < 1 or s < 2:
            raise ValueError(f"bad shape {item!r}: batch must be >= 1 and seq >= 2")
        out.append((b, s))
    if not out:
        raise ValueError("--shapes is empty")
    return out


def estimate_rows(args: argparse.Namespace, shapes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    budget = int(args.cap_gib * 2**30)
    rows = []
    for size in args.sizes:
        for label, opt, layerwise in ESTIMATED:
            for b, s in shapes:
                e = estimate_memory(f"llama-{size}", opt, layerwise=layerwise, batch=b, seq=s, dtype="bf16",
                                    activation_checkpointing=args.checkpointing, device="cuda")
                rows.append({"size": size, "label": label, "optimizer": opt, "layerwise": layerwise, "batch": b,
                             "seq": s, "checkpointing": args.checkpointing, "peak_bytes": e.total,
                             "fits": e.total <= budget, "peak_phase": e.peak_phase, "mode": "estimate"})
    return rows


def measure_rows(args: argparse.Namespace, shapes: list[tuple[int, int]]) -> list[dict[str, Any]]:  # pragma: no cover - GPU
    from galore_opt.toy import build_llama, llama_config

    dev = torch.device(args.device)
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total), dev)
    rows = []
    for size in args.sizes:
        cfg = llama_config(size, 32000, max_position_embeddings=max(1024, max(s for _, s in shapes)))
        rank = E.PAPER_RANK[size]
        default_dtype = torch.get_default_dtype()
        try:
            torch.set_default_dtype(torch.bfloat16)
            with torch.device(dev):
                model = build_llama(cfg, 0)
        except torch.OutOfMemoryError:
            torch.set_default_dtype(default_dtype)
            gc.collect()
            torch.cuda.empty_cache()
            for kind in args.optimizers:
                rows.append({"size": size, "optimizer": kind, "label": E.OPTIMIZERS[kind][0], "fits": False,
                             "reason": "the bf16 weights alone do not fit", "mode": "measured"})
            continue
        finally:
            torch.set_default_dtype(default_dtype)
        if args.checkpointing:
            model.config.use_cache = False
            model.gradient_checkpointing_enable()
        model.train()
        for kind in args.optimizers:
            why = E.available(kind, args.device)
            for b, s in shapes:
                row: dict[str, Any] = {"size": size, "optimizer": kind, "label": E.OPTIMIZERS[kind][0], "batch": b,
                                       "seq": s, "checkpointing": args.checkpointing, "rank": rank,
                                       "mode": "measured"}
                if why is not None:
                    row.update(fits=None, reason=why)
                    rows.append(row)
                    continue
                opt = None
                try:
                    torch.cuda.reset_peak_memory_stats(dev)
                    opt = E.make_optimizer(kind, model, rank=rank, gap=E.PAPER_GAP[size], lr=1e-5, device=args.device)
                    gen = torch.Generator().manual_seed(0)
                    x = torch.randint(0, 32000, (b, s), generator=gen).to(dev)
                    E.train_step(model, opt, x)
                    torch.cuda.synchronize(dev)
                    t0 = time.perf_counter()
                    E.train_step(model, opt, x)
                    torch.cuda.synchronize(dev)
                    row.update(fits=True, step_s=time.perf_counter() - t0, tokens_per_s=b * s / (time.perf_counter() - t0),
                               peak_bytes=torch.cuda.max_memory_allocated(dev))
                except torch.OutOfMemoryError:
                    row.update(fits=False, peak_bytes=None, reason="CUDA out of memory under the cap")
                finally:
                    if opt is not None and hasattr(opt, "remove_hooks"):
                        opt.remove_hooks()
                    model.zero_grad(set_to_none=True)
                    del opt
                    gc.collect()
                    torch.cuda.empty_cache()
                rows.append(row)
                print(f"  {size} {row['label']:<34} {b}x{s}: "
                      f"{'fits' if row['fits'] else 'does not fit' if row['fits'] is False else row.get('reason')}"
                      + (f", peak {row['peak_bytes'] / 2**30:.2f} GiB, {row['step_s']:.2f} s/step" if row.get("fits") else ""),
                      flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", default="1b,7b", help=f"comma list of {', '.join(s for s in E.SIZES if s != 'tiny')}")
    ap.add_argument("--shapes", default="1x256,4x256,16x256,1x1024,4x1024", help="comma list of BATCHxSEQ")
    ap.add_argument("--optimizers", default=",".join(DEFAULT_MEASURED),
                    help=f"GPU runs: comma list of {', '.join(E.OPTIMIZERS)}")
    ap.add_argument("--cap-gib", type=float, default=24.0, help="memory cap (an RTX 4090 has 24 GiB)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every decoder layer")
    ap.add_argument("--device", default=None, help="cuda[:N] (default when available) or cpu (estimate only)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/rtx4090-...)")
    args = ap.parse_args(argv)
    args.sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    for s in args.sizes:
        if s not in E.SIZES or s == "tiny":
            ap.error(f"unknown size {s!r}; choose from 60m, 130m, 350m, 1b, 7b")
    args.optimizers = [k.strip() for k in args.optimizers.split(",") if k.strip()]
    for k in args.optimizers:
        if k not in E.OPTIMIZERS:
            ap.error(f"unknown optimizer {k!r}; choose from {', '.join(E.OPTIMIZERS)}")
    if "lora" in args.optimizers:
        ap.error("lora is not part of this scenario (peft wraps the shared model in place)")
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as exc:
        ap.error(str(exc))
    if args.cap_gib <= 0:
        ap.error(f"--cap-gib must be > 0, got {args.cap_gib}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine")
    warnings.filterwarnings("ignore", category=FutureWarning)

    measured = torch.device(args.device).type == "cuda"
    if measured:  # pragma: no cover - GPU
        rows = measure_rows(args, shapes)
    else:
        print("# This scenario measures on a GPU (it caps CUDA memory with set_per_process_memory_fraction); "
              "no CUDA here.\n# Listing instead what WOULD fit in "
              f"{args.cap_gib:g} GiB according to galore_opt.memory.estimate_memory: an ESTIMATE, not a measurement.")
        rows = estimate_rows(args, shapes)
    mode = "measured" if measured else "estimate"
    print(f"\n### What fits in {args.cap_gib:g} GiB ({mode}; bf16, vocab 32000"
          f"{', activation checkpointing' if args.checkpointing else ''})\n")
    print(markdown(rows, shapes))
    payload = dict(benchmark="rtx4090", mode=mode, machine=C.machine_info(args.device), versions=C.library_versions(),
                   args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   cap_bytes=int(args.cap_gib * 2**30), rows=rows)
    path = C.write_json(args.out or C.dated_result_path("rtx4090", args.device), payload)
    print(f"\nresults: {path}")
    return 0


def markdown(rows: list[dict[str, Any]], shapes: list[tuple[int, int]]) -> str:
    """One line per (size, optimizer), one column per shape: the peak in GiB and whether it fits."""
    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        if r.get("fits") is None:
            return "n/a"
        gib = "" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**30:.1f} GiB"
        return f"{'fits' if r['fits'] else 'no'} {gib}".strip() + ("" if r.get("mode") == "measured" else " (est.)")

    headers = ["size", "optimizer", *[f"{b}x{s}" for b, s in shapes]]
    keys = list(dict.fromkeys((r["size"], r["label"]) for r in rows))
    lines = []
    for size, label in keys:
        by_shape = {(r.get("batch"), r.get("seq")): r for r in rows if r["size"] == size and r["label"] == label}
        whole = by_shape.get((None, None))  # a size whose weights did not fit
        lines.append([size, label, *[cell(by_shape.get((b, s), whole)) for b, s in shapes]])
    return C.format_table(headers, lines, markdown=True)


if __name__ == "__main__":
    raise SystemExit(main())
