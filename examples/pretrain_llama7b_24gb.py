"""The LLaMA-7B-in-24-GB recipe: bf16 weights, 8-bit GaLore (rank 1024), layer-wise updates.

    # full scale, on a GPU, under a hard 24 GiB cap (what an RTX 4090 has):
    python examples/pretrain_llama7b_24gb.py --size 7b --batch 4 --seq 256 --steps 5 --cap-gib 24
    # the largest micro-batch that fits, trying batch x sequence shapes until one runs out of memory:
    python examples/pretrain_llama7b_24gb.py --size 7b --find-max --cap-gib 24
    # the same code at toy scale on a CPU (a few seconds):
    python examples/pretrain_llama7b_24gb.py
    # the full 7B on meta tensors (no memory, no GPU): the live-tensor peak of a refresh step and of
    # a steady step, measured with MemTracker, beside the estimator (a minute on a CPU)
    python examples/pretrain_llama7b_24gb.py --device meta --size 7b --batch 4 --seq 256

What keeps a 7B step in 24 GiB (weights 12.6 GiB in bf16):

- ``GaLoreAdamW8bit``: the projected moments of each matrix are ``m x r`` or ``r x n`` in block-wise
  8-bit and the basis is bf16 (1.75 GiB of bases, 3.1 GiB of 8-bit moments); the embedding and head
  keep 8-bit full-size moments (0.5 GiB), updated in slices so that no full-size fp32 temporary
  exists. 5.3 GiB of state in all, against 50 GiB for fp32 AdamW.
- ``LayerwiseOptimizer``: each parameter is updated inside ``backward`` as soon as its gradient is
  ready, and the gradient is freed, so the 12.6 GiB of full gradients never exist at once.
- Activations: about 1.5 GiB per 256 tokens without checkpointing; ``--checkpointing`` recomputes
  each decoder layer in backward (slower, and the batch can grow).

``python -m galore_opt.memory --model llama-7b --optimizer galore-adamw8bit --layerwise --batch 4
--seq 256 --budget 24GiB`` predicts 23.95 GiB at 4 x 256 and 1 x 1024 (weights 12.55, state 5.31,
activations 5.85, the loss's fp32 logits 0.25): under the cap with little to spare.

The cap is ``torch.cuda.set_per_process_memory_fraction(cap / total)``: the caching allocator
raises ``OutOfMemoryError`` past it, as on a card of that size. ``expandable_segments`` keeps
fragmentation from counting against the cap (set before CUDA starts; a user's 24 GB card wants it
too). Data are random token ids: this measures memory and speed, not learning (``make demo`` and
``examples/pretrain_llama.py`` train on real text). Each run prints the estimator's prediction
(:mod:`galore_opt.memory`) beside the measured peak.
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

import galore_opt  # noqa: E402
from galore_opt.layerwise import LayerwiseOptimizer  # noqa: E402
from galore_opt.memory import estimate_memory, fmt_bytes, measure_peak_bytes  # noqa: E402
from galore_opt.toy import llama_config  # noqa: E402

GiB = 2**30
# shapes tried by --find-max, in order of tokens per micro-batch
FIND_MAX_SHAPES = [(4, 256), (1, 1024), (8, 256), (2, 1024), (1, 2048), (16, 256), (4, 1024), (2, 2048),
                   (8, 1024), (4, 2048), (16, 1024), (8, 2048)]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", default=None, help="tiny, 60m, 130m, 350m, 1b, 7b (default 7b on CUDA, tiny on CPU)")
    p.add_argument("--device", default=None, help="cuda, cpu or meta (default cuda when available)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps (the first one builds the bases)")
    p.add_argument("--rank", type=int, default=None, help="GaLore rank (default 1024 at 7B, else min(1024, hidden/4))")
    p.add_argument("--gap", type=int, default=200, help="update_proj_gap")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per update (projected accumulation)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    p.add_argument("--cap-gib", type=float, default=None, help="hard CUDA memory cap in GiB (e.g. 24)")
    p.add_argument("--find-max", action="store_true", help="try growing batch x seq until one does not fit")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.size is None:
        args.size = "7b" if args.device == "cuda" else "tiny"
    if args.device != "cuda" and args.cap_gib is not None:
        p.error("--cap-gib needs --device cuda (it sets the CUDA caching allocator's limit)")
    if args.device == "meta" and args.steps != 2:
        args.steps = 2  # meta: one refresh step (the first, cold) and one steady step
    for name in ("batch", "seq", "steps", "accumulation"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def build_model(config: Any, device: torch.device, seed: int) -> torch.nn.Module:
    """Random-init LLaMA created directly in bf16 on ``device`` (no fp32 copy, no CPU detour)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def run(args: argparse.Namespace, batch: int, seq: int) -> dict[str, Any]:
    device = torch.device(args.device)
    config = llama_config(args.size, args.vocab)
    if args.checkpointing:
        config.use_cache = False
    if device.type == "meta":  # save what a GPU's flash attention saves, not the math path's scores
        from galore_opt.integrations.meta_attention import register_meta_flash_attention

        config._attn_implementation = register_meta_flash_attention()
    rank = args.rank or (1024 if args.size == "7b" else max(1, min(1024, config.hidden_size // 4)))
    model = build_model(config, device, args.seed)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    groups = galore_opt.galore_param_groups(
        model, target_modules=["attn", "mlp"], rank=rank, update_proj_gap=args.gap, scale=0.25
    )
    optimizer = LayerwiseOptimizer(
        galore_opt.GaLoreAdamW8bit(groups, lr=args.lr, seed=args.seed), accumulation_steps=args.accumulation
    )
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    estimate = estimate_memory(
        config,
        "galore-adamw8bit",
        layerwise=True,
        batch=batch,
        seq=seq,
        rank=rank,
        activation_checkpointing=args.checkpointing,
        grad_accumulation=args.accumulation,
        update_proj_gap=args.gap,
        device="cuda" if device.type == "meta" else device.type,
    )
    if device.type == "meta":
        return _run_meta(args, model, optimizer, config, batch, seq, rank, weights, estimate)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    step_s, losses = [], []

    def train_steps() -> None:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            for _ in range(args.accumulation):
                x = torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(device)
                loss = model(input_ids=x, labels=x).loss / args.accumulation
                loss.backward()  # the updates happen in here
                losses.append(loss.detach() * args.accumulation)  # read after the run: no sync per micro-batch
            optimizer.step()  # bookkeeping
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_s.append(time.perf_counter() - t0)

    if device.type == "cuda":
        train_steps()
        peak = torch.cuda.max_memory_allocated(device)
    else:  # the CPU allocator's peak above the weights, from the profiler's allocation events
        extra, _, _ = measure_peak_bytes(train_steps)
        peak = weights + extra
    steady = step_s[1:] or step_s  # the first step builds every basis (the refresh stall)
    tokens = batch * seq * args.accumulation
    result = {
        **_run_facts(args, model, optimizer, batch, seq, rank, weights),
        "peak_gib": peak / GiB,
        "peak_kind": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "weights + CPU allocator peak (profiler)",
        "estimate_gib": estimate.total / GiB,
        "first_step_s": step_s[0],
        "steady_step_s": sum(steady) / len(steady),
        "tokens_per_s": tokens / (sum(steady) / len(steady)),
        "losses": [float(x) for x in losses],
        "grad_norm": float(optimizer.grad_norm) if optimizer.grad_norm is not None else None,
        "fits": True,
    }
    optimizer.remove_hooks()
    return result


def _run_facts(args, model, optimizer, batch, seq, rank, weights) -> dict[str, Any]:
    """What every run reports besides its measurements."""
    return {
        "size": args.size,
        "batch": batch,
        "seq": seq,
        "accumulation": args.accumulation,
        "checkpointing": args.checkpointing,
        "rank": rank,
        "params": sum(p.numel() for p in model.parameters()),
        "weights_gib": weights / GiB,
        "optimizer_state_gib": galore_opt.optimizer_state_bytes(optimizer) / GiB,
    }


def _run_meta(args, model, optimizer, config, batch, seq, rank, weights, estimate) -> dict[str, Any]:
    """Two steps on meta tensors: the first (every basis built: the cold refresh) and a steady one,
    each under a fresh ``MemTracker``, whose live-tensor peak is set beside the estimator's peak of
    the same step (its "first update" walk, and the steady walk)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    device = torch.device("meta")
    steps = []
    for name in ("refresh", "steady"):
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        t0 = time.perf_counter()
        with tracker:
            x = torch.randint(0, config.vocab_size, (batch, seq), device=device)
            model(input_ids=x, labels=x).loss.backward()  # the updates happen in here
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        snapshot = tracker.get_tracker_snapshot("peak")[device]
        steps.append({"step": name, "peak_bytes": snapshot["Total"], "seconds": time.perf_counter() - t0,
                      "by_kind": {str(getattr(k, "value", k)): v for k, v in snapshot.items() if k != "Total"}})  # fmt: skip
    first = max(v for k, v in estimate.phases.items() if k.startswith("first update"))
    steady = max(v for k, v in estimate.phases.items() if not k.startswith("first update"))
    for s, est in zip(steps, (first, steady)):
        s["estimate_bytes"] = est
        s["estimate_error"] = est / s["peak_bytes"] - 1
    result = {
        **_run_facts(args, model, optimizer, batch, seq, rank, weights),
        "peak_gib": max(s["peak_bytes"] for s in steps) / GiB,
        "peak_kind": "MemTracker live-tensor peak on meta tensors (attention: flash stand-in)",
        "estimate_gib": estimate.total / GiB,
        "steps": steps,
        "fits": True,
    }
    optimizer.remove_hooks()
    return result


def try_run(args: argparse.Namespace, batch: int, seq: int) -> dict[str, Any]:
    try:
        return run(args, batch, seq)
    except torch.OutOfMemoryError as e:
        return {"size": args.size, "batch": batch, "seq": seq, "fits": False, "error": str(e).split("\n")[0][:300]}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        total = torch.cuda.get_device_properties(device).total_memory
        if args.cap_gib is not None:
            if args.cap_gib * GiB > total:
                raise SystemExit(f"--cap-gib {args.cap_gib} is above the device's {total / GiB:.1f} GiB")
            torch.cuda.set_per_process_memory_fraction(args.cap_gib * GiB / total, device)
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    print(
        f"LLaMA-{args.size} | 8-bit GaLore, layer-wise | {name} | cap "
        f"{f'{args.cap_gib:g} GiB' if args.cap_gib else 'none'} | checkpointing {args.checkpointing}"
    )
    shapes = FIND_MAX_SHAPES if args.find_max else [(args.batch, args.seq)]
    runs = []
    for batch, seq in shapes:
        if args.find_max and len(runs) >= 2 and not runs[-1]["fits"] and not runs[-2]["fits"]:
            break  # two sizes in a row did not fit: larger ones will not either
        r = try_run(args, batch, seq)
        runs.append(r)
        if r["fits"] and "steps" in r:  # meta
            for s in r["steps"]:
                print(
                    f"  {batch:>3} x {seq:<5} {s['step']:8} live-tensor peak {s['peak_bytes'] / GiB:6.2f} GiB | "
                    f"estimate {s['estimate_bytes'] / GiB:6.2f} GiB ({s['estimate_error']:+.1%}) | {s['seconds']:.1f} s"
                )
        elif r["fits"]:
            print(
                f"  {batch:>3} x {seq:<5} peak {r['peak_gib']:6.2f} GiB (estimate {r['estimate_gib']:6.2f}) | "
                f"state {r['optimizer_state_gib']:.2f} GiB | first step {r['first_step_s']:.2f} s | "
                f"steady {r['steady_step_s']:.3f} s/step, {r['tokens_per_s']:,.0f} tokens/s | "
                f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"
            )
        else:
            print(f"  {batch:>3} x {seq:<5} does not fit: {r['error']}")
    fitting = [r for r in runs if r["fits"]]
    largest = max(fitting, key=lambda r: r["batch"] * r["seq"], default=None)
    if args.find_max:
        print(f"largest micro-batch that fits: {largest['batch']} x {largest['seq']}" if largest else "nothing fits")
    summary = {
        "device": name,
        "torch": torch.__version__,
        "cap_gib": args.cap_gib,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "runs": runs,
        "largest_fitting": None if largest is None else [largest["batch"], largest["seq"]],
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
        print(f"wrote {args.out}")
    print(f"(peak: {runs[0].get('peak_kind', '')}; estimate: galore_opt.memory; {fmt_bytes(GiB)} = 2^30 bytes)")
    return summary


if __name__ == "__main__":
    main()
