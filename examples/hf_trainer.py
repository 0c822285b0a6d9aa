"""Pre-train a small LLaMA with the Hugging Face Trainer and a galore-opt optimizer.

    python examples/hf_trainer.py                                   # GaLoreAdamW, 200 steps
    python examples/hf_trainer.py --optim galore_adamw_8bit_layerwise --accumulation 2
    python examples/hf_trainer.py --optimizer adafactor --arch gpt2 --analysis
    python examples/hf_trainer.py --resume results/hf_trainer/checkpoint-100

``--optim`` takes the Trainer's own GaLore names (``galore_adamw``, ``galore_adamw_8bit``,
``galore_adafactor`` and their ``_layerwise`` variants) exactly as ``TrainingArguments(optim=...)``
does: coming from the built-in GaLore, only ``Trainer`` changes to ``GaLoreTrainer``.
``--optimizer``/``--layerwise`` are the same choice without the Trainer's names. ``--arch gpt2``
trains a GPT-2 (its ``transformers`` ``Conv1D`` projections are the GaLore matrices);
``--analysis`` attaches the GaLore diagnostics and sparsity callbacks, whose entries are logged
next to the Trainer's loss, and writes their JSON and PNG plots to ``<out>/analysis/``.

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

from galore_opt.integrations.transformers import HF_OPTIM_NAMES, GaLoreTrainer
from galore_opt.toy import LLAMA_SIZES, TokenStream, build_llama, llama_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optim", default=None, choices=sorted(HF_OPTIM_NAMES),
                   help="the Trainer's GaLore name (TrainingArguments.optim); overrides --optimizer/--layerwise")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit", "adafactor"))
    p.add_argument("--layerwise", action="store_true", help="optimizer-in-backward updates")
    p.add_argument("--arch", default="llama", choices=("llama", "gpt2"))
    p.add_argument("--analysis", action="store_true", help="GaLore diagnostics and sparsity callbacks, with plots")
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
    if args.arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        hidden, _, layers, heads = LLAMA_SIZES[args.size]
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max(args.seq, 128),
                                           vocab_size=stream.vocab_size, bos_token_id=0, eos_token_id=0))  # fmt: skip
    else:
        model = build_llama(llama_config(args.size, stream.vocab_size), seed=0)
    choice = {} if args.optim else {"galore_optimizer": args.optimizer, "layerwise": args.layerwise}
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
        **({"optim": args.optim} if args.optim else {}),
    )
    trainer = GaLoreTrainer(model=model, args=targs, train_dataset=train, data_collator=collate, **choice)
    if args.analysis:
        from galore_opt.analysis.callbacks import attach_to_trainer
        from galore_opt.analysis.pruning_callbacks import GaLoreDiagnosticsCallback, SparsityCallback

        probe = collate([train[i] for i in range(min(4, len(train)))])
        every = max(1, args.steps // 10)
        attach_to_trainer(trainer, [GaLoreDiagnosticsCallback(every=every, print_suggestions=True),
                                    SparsityCallback(every=every, probe=probe, threshold=1e-2)])  # fmt: skip
    trainer.train(resume_from_checkpoint=args.resume)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    name = f"{trainer.galore_optimizer_name}{' layer-wise' if trainer.galore_layerwise else ''}"
    print(f"{args.arch} {name}: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps; "
          f"checkpoints in {args.out}")  # fmt: skip
    return losses


if __name__ == "__main__":
    main()
