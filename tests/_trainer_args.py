"""TrainingArguments for the tiny Trainer runs of the integration tests (CPU, no saving, no
reporting, one log per step, constant lr, GaLore on attention and MLP at rank 4)."""

from __future__ import annotations

from typing import Any


def trainer_args(tmp_path: Any, **overrides: Any):
    import transformers

    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        max_steps=6,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        optim_target_modules=["attn", "mlp"],
        optim_args="rank=4,update_proj_gap=3,scale=0.25",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    base.update(overrides)
    return transformers.TrainingArguments(**base)


def logged_losses(trainer: Any) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]
