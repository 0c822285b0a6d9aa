"""FSDP2 (``fully_shard``) with a galore-opt optimizer, layer-wise or not, and a distributed
checkpoint, on CPUs or GPUs.

    torchrun --nproc-per-node 2 examples/fsdp2_layerwise.py                  # layer-wise 8-bit GaLore
    torchrun --nproc-per-node 2 examples/fsdp2_layerwise.py --optimizer adafactor --no-layerwise
    accelerate launch --multi_gpu --num_processes 2 examples/fsdp2_layerwise.py   # the same, via accelerate

Each decoder layer and the whole model are sharded on dim 0 over a 1-D mesh (FSDP2's default). The
optimizer state of a sharded parameter is sharded too: the moments (8-bit codes and per-block
absmax included) are DTensors, so each rank holds about ``1/world`` of them. In layer-wise mode
each parameter is updated inside ``backward``, from the post-accumulate-grad hook that FSDP2 runs
once the parameter's gradient is reduce-scattered, and its gradient is freed there. The script
trains ``--steps`` steps with a distributed checkpoint (``torch.distributed.checkpoint``) half-way,
resumes a fresh model and optimizer from it, and checks that both runs end at the same weights.
On CPUs it uses the gloo backend.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from galore_opt import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups
from galore_opt.layerwise import LayerwiseOptimizer
from galore_opt.optim.fsdp import state_bytes
from galore_opt.toy import build_llama, llama_config

VOCAB = 256
OPTIMIZERS = {"adamw": GaLoreAdamW, "adamw8bit": GaLoreAdamW8bit, "adafactor": GaLoreAdafactor}


def build(args, mesh, device):
    model = build_llama(llama_config("tiny", VOCAB, num_hidden_layers=2), seed=0).to(device)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    groups = galore_param_groups(model, rank=32, update_proj_gap=4)
    if args.optimizer == "adafactor":
        opt = GaLoreAdafactor(groups)
    else:
        opt = OPTIMIZERS[args.optimizer](groups, lr=2e-3)
    # the updates run inside backward; clipping by the previous step's global norm
    wrapper = LayerwiseOptimizer(opt, max_grad_norm=1.0) if args.layerwise else opt
    return model, opt, wrapper


def train(model, wrapper, steps, rank, args, device):
    losses = []
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own data
        start = torch.randint(0, VOCAB, (args.batch, 1), generator=gen)
        x = ((start + torch.arange(args.seq)) % VOCAB).to(device)  # learnable: counting
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        wrapper.step()  # layer-wise: bookkeeping only
        wrapper.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / dist.get_world_size())
    return losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", default="adamw8bit", choices=sorted(OPTIMIZERS))
    p.add_argument("--layerwise", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4, help="per process")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("results/fsdp2_layerwise"), help="checkpoint directory")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    half = args.steps // 2
    checkpoint = str(args.out / "checkpoint")

    model, opt, wrapper = build(args, mesh, device)
    losses = train(model, wrapper, range(half), rank, args, device)
    model_sd, optim_sd = get_state_dict(model, opt)  # the inner optimizer: DTensor state, sharded
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    # layer-wise bookkeeping beside the checkpoint: the update counter and the last global norm
    # (the next update's clipping threshold)
    meta = wrapper.wrapper_state_dict() if args.layerwise else None
    losses += train(model, wrapper, range(half, args.steps), rank, args, device)
    final = {k: v.full_tensor() for k, v in model.state_dict().items()}
    held = state_bytes(opt)

    model2, opt2, wrapper2 = build(args, mesh, device)
    model_sd, optim_sd = get_state_dict(model2, opt2)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=checkpoint)
    set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    if args.layerwise:
        wrapper2.load_wrapper_state_dict(meta)
    train(model2, wrapper2, range(half, args.steps), rank, args, device)
    resumed = {k: v.full_tensor() for k, v in model2.state_dict().items()}
    diff = max((final[k] - resumed[k]).abs().max().item() for k in final)
    if rank == 0:
        mode = "layer-wise " if args.layerwise else ""
        print(f"{dist.get_world_size()} process(es), FSDP2, {mode}{args.optimizer}: loss {losses[0]:.3f} -> "
              f"{losses[-1]:.3f}; optimizer state on rank 0: {held / 2**20:.2f} MiB; "
              f"resumed max |diff| {diff:.3g}")  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()
    return losses, diff


if __name__ == "__main__":
    main()
