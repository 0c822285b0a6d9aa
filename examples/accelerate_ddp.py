"""Data-parallel training with accelerate (DDP) and GaLoreAdamW, on CPUs or GPUs.

    python examples/accelerate_ddp.py                               # one process
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_ddp.py   # CPUs too (gloo)
    torchrun --nproc-per-node 2 examples/accelerate_ddp.py          # the same, without accelerate's CLI

Every rank draws its own share of each batch; DDP averages the gradients before the optimizer step,
and each rank computes the same GaLore basis (the randomized/power refresh is seeded from the step
and the parameter, never from the global RNG), so the replicas stay identical: the script checks
it at the end. Mixed precision: ``--bf16``.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator

from galore_opt import GaLoreAdamW, galore_param_groups
from galore_opt.toy import build_llama, llama_config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8, help="per process")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args(argv)

    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no", cpu=not torch.cuda.is_available())
    vocab = 256
    model = build_llama(llama_config("tiny", vocab, num_hidden_layers=2), seed=0)
    opt = GaLoreAdamW(galore_param_groups(model, rank=32, update_proj_gap=10), lr=2e-3)
    model, opt = accelerator.prepare(model, opt)
    gen = torch.Generator().manual_seed(1000 + accelerator.process_index)  # each rank its own data
    first = last = None
    for _ in range(args.steps):
        start = torch.randint(0, vocab, (args.batch, 1), generator=gen)
        x = ((start + torch.arange(args.seq)) % vocab).to(accelerator.device)  # learnable: counting
        with accelerator.autocast():
            loss = model(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        loss = accelerator.reduce(loss.detach(), reduction="mean").item()
        first = loss if first is None else first
        last = loss
    # the replicas are identical: compare a checksum of the weights across ranks
    checksum = torch.stack([p.detach().float().sum() for p in model.parameters()]).sum().reshape(1)
    sums = accelerator.gather(checksum.to(accelerator.device))
    same = bool((sums == sums[0]).all())
    if accelerator.is_main_process:
        print(f"{accelerator.num_processes} process(es): loss {first:.3f} -> {last:.3f}; replicas identical: {same}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return first, last, same


if __name__ == "__main__":
    main()
