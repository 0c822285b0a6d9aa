"""Pre-train a small LLaMA with the Hugging Face Trainer and a galore-opt optimizer.

    python examples/hf_trainer.py                                   # GaLoreAdamW, 200 steps
    python examples/hf_trainer.py --optimizer adamw8bit --layerwise --accumulation 2
    python examples/hf_trainer.py --resume results/hf_trainer/checkpoint-100

The model is built from a config (random init); the data are the local text corpus that
``make demo`` uses (this Python installation's sources, tokenized by a BPE tokenizer trained on
the spot), cut into blocks and wrapped in a ``datasets.Dataset``. Nothing is downloaded.
Everything the Trainer's ``TrainingArguments`` say about the optimizer is honoured: learning rate,
weight decay (with a no-decay split), betas, eps, ``optim_target_modules`` and ``optim_args``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import TrainingArguments

from galore_opt.integrations.transformers import GaLoreTrainer
from galore_opt.toy import TokenStream, build_llama, llama_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit", "adafactor"))
    p.add_argument("--layerwise", action="store_true", help="optimizer-in-backward updates")
    p.add_argument("--size", default="tiny")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--gap", type=int, default=50)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--out", type=Path, default=Path("results/hf_trainer"))
    p.add_argument("--save-steps", type=int, default=100)
    p.add_argument("--resume", default=None, help="a checkpoint directory to resume from")
    return p.parse_args(argv)


def block_dataset(stream: TokenStream, seq: int, max_blocks: int | None = None):
    import datasets

    ids = stream.train[: (len(stream.train) // seq) * seq].view(-1, seq)
    if max_blocks is not None:
        ids = ids[:max_blocks]
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")


def collate(rows):
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids}


def main(argv=None):
    args = parse_args(argv)
    stream = TokenStream.from_local_corpus(vocab_size=args.vocab)
    train = block_dataset(stream, args.seq, max_blocks=args.steps * args.batch * args.accumulation)
    model = build_llama(llama_config(args.size, stream.vocab_size), seed=0)
    targs = TrainingArguments(
        output_dir=str(args.out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        weight_decay=0.0,
        adam_beta2=0.999,
        optim_target_modules=["attn", "mlp"],
        optim_args=f"rank={args.rank},update_proj_gap={args.gap},scale=0.25",
        logging_steps=max(1, args.steps // 20),
        save_steps=args.save_steps,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        disable_tqdm=False,
    )
    trainer = GaLoreTrainer(model=model, args=targs, train_dataset=train, data_collator=collate,
                            galore_optimizer=args.optimizer, layerwise=args.layerwise)  # fmt: skip
    trainer.train(resume_from_checkpoint=args.resume)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(f"{args.optimizer}{' layer-wise' if args.layerwise else ''}: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
          f"over {args.steps} steps; checkpoints in {args.out}")  # fmt: skip
    return losses


if __name__ == "__main__":
    main()
