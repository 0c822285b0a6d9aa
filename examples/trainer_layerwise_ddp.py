"""Layer-wise (optimizer-in-backward) 8-bit GaLore in a multi-process Hugging Face Trainer (DDP).

    torchrun --nproc-per-node 2 examples/trainer_layerwise_ddp.py
    accelerate launch --multi_gpu --num_processes 2 examples/trainer_layerwise_ddp.py

``optim="galore_adamw_8bit_layerwise"``: each parameter is updated inside ``backward`` as soon as
DDP has averaged its gradient bucket (``LayerwiseOptimizer.register_ddp``, which ``GaLoreTrainer``
calls before the first backward). The Trainer accumulates the first micro-batches of a step under
``no_sync``; the last one's backward averages the accumulated gradients and updates. The script
trains ``--steps`` steps saving a checkpoint half-way, then resumes a fresh model from that
checkpoint, and checks that the resumed run ends at the same weights and that the replicas are
identical. On CPUs it uses the gloo backend.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import TrainingArguments

from galore_opt.integrations.transformers import GaLoreTrainer
from galore_opt.toy import build_llama, llama_config

VOCAB = 64


class Counting(torch.utils.data.Dataset):
    """Learnable token sequences: arithmetic progressions mod VOCAB."""

    def __init__(self, n: int = 64, seq: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(seq)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    cfg = llama_config("tiny", VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)  # fmt: skip
    return build_llama(cfg, seed=0)


def _trainer(out: Path, steps: int, accumulation: int) -> GaLoreTrainer:
    args = TrainingArguments(
        output_dir=str(out),
        optim="galore_adamw_8bit_layerwise",
        optim_target_modules=["attn", "mlp"],
        optim_args="rank=4,update_proj_gap=2",
        learning_rate=3e-3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        save_strategy="steps",
        save_steps=steps // 2,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=None if torch.cuda.is_available() else "gloo",
    )
    return GaLoreTrainer(model=_model(), args=args, train_dataset=Counting())


def _weights(trainer: GaLoreTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results/trainer_layerwise_ddp"),
                   help="checkpoint directory, shared by the processes")  # fmt: skip
    args = p.parse_args(argv)
    out = args.out
    trainer = _trainer(out, args.steps, args.accumulation)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    final = _weights(trainer)
    world = trainer.args.world_size
    layerwise = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside accelerate's wrapper
    from_ddp_hook = layerwise._ddp  # register_ddp was called: updates from DDP's communication hook
    resumed_trainer = _trainer(out, args.steps, args.accumulation)
    resumed_trainer.train(resume_from_checkpoint=str(out / f"checkpoint-{args.steps // 2}"))
    resumed = _weights(resumed_trainer)
    diff = max((final[k] - resumed[k]).abs().max().item() for k in final)
    checksum = torch.stack([v.double().sum() for v in final.values()]).sum().reshape(1)
    if world > 1:
        sums = [torch.zeros_like(checksum) for _ in range(world)]
        torch.distributed.all_gather(sums, checksum)
    else:
        sums = [checksum]
    same = all(torch.equal(s, checksum) for s in sums)
    if trainer.is_world_process_zero():
        print(f"{world} process(es), layer-wise: loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
              f"updates from DDP's hook: {from_ddp_hook}; resumed max |diff| {diff:.3g}; replicas identical: {same}")  # fmt: skip
    return losses, diff, same


if __name__ == "__main__":
    main()
