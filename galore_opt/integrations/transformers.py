"""Hugging Face ``transformers.Trainer`` integration (transformers is imported lazily, on use).

Two ways in, both reading the usual ``TrainingArguments``:

    from galore_opt.integrations.transformers import GaLoreTrainer
    args = TrainingArguments(..., learning_rate=1e-3, weight_decay=0.01, adam_beta2=0.95,
                             optim_target_modules=["attn", "mlp"],
                             optim_args="rank=128,update_proj_gap=200,scale=0.25")
    trainer = GaLoreTrainer(model=model, args=args, train_dataset=ds, galore_optimizer="adamw8bit",
                            layerwise=True)      # optimizer-in-backward, gradient accumulation too
    trainer.train()                              # checkpoints hold the real optimizer state

or build the optimizer yourself and hand it to a plain ``Trainer``::

    optimizer = galore_optimizer(model, args, "adamw")
    trainer = Trainer(model=model, args=args, optimizers=(optimizer, None), ...)

What is honoured, unlike the Trainer's built-in ``galore_*`` optims: ``learning_rate``,
``weight_decay`` (GaLore weights and other matrices decay; biases and norms do not),
``adam_beta1``, ``adam_beta2``, ``adam_epsilon``; ``optim_target_modules`` with the Trainer's
meaning (a list of name fragments or regexes, or ``"all-linear"``); ``optim_args`` keys ``rank``,
``update_proj_gap``, ``scale``, ``proj_type`` (galore-torch's) and ``proj_method``,
``power_iters``, ``numerics`` (ours), typed. Layer-wise mode works with
``gradient_accumulation_steps`` (the projected gradient is accumulated), clips with
``max_grad_norm`` by the previous step's global norm (the Trainer's own clipping sees no
gradients in layer-wise mode, so it is turned off), logs the true global ``grad_norm``, and saves
the full optimizer state in checkpoints; every checkpoint loads with ``torch.load``'s default
``weights_only=True`` and resumes exactly.

Layer-wise mode in the Trainer is single-process; with several processes it raises (in your own
loop, ``LayerwiseOptimizer.register_ddp`` runs the updates from DDP's communication hook, after the
gradients are averaged). The non-layer-wise optimizers work under DDP (see ``docs/distributed.md``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..layerwise import LayerwiseOptimizer
from ..optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from ..param_groups import galore_param_groups

__all__ = ["GaLoreTrainer", "OPTIMIZERS", "galore_optimizer", "parse_optim_args"]  # noqa: F822 (module __getattr__)

#: ``galore_optimizer`` names (the Trainer's ``galore_adamw`` style names are accepted too)
OPTIMIZERS = {
    "adamw": GaLoreAdamW,
    "adamw8bit": GaLoreAdamW8bit,
    "adafactor": GaLoreAdafactor,
}
_ALIASES = {
    "galore_adamw": "adamw",
    "galore_adamw_8bit": "adamw8bit",
    "galore_adafactor": "adafactor",
    "adamw_8bit": "adamw8bit",
}
#: typed ``optim_args`` keys
OPTIM_ARG_TYPES = {
    "rank": int,
    "update_proj_gap": int,
    "scale": float,
    "proj_type": str,
    "proj_method": str,
    "power_iters": int,
    "numerics": str,
}
_OPTIMIZER_KEYS = ("numerics",)  # constructor arguments rather than group keys


def parse_optim_args(optim_args: str | dict[str, Any] | None) -> dict[str, Any]:
    """``"rank=128,update_proj_gap=200,scale=0.25,proj_type=std"`` -> typed dict.

    Raises ``ValueError`` naming an unknown key or a value of the wrong type."""
    if optim_args is None or optim_args == "":
        return {}
    items: dict[str, Any]
    if isinstance(optim_args, dict):
        items = dict(optim_args)
    else:
        items = {}
        for part in str(optim_args).replace(" ", "").split(","):
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"optim_args entry {part!r} is not key=value (in {optim_args!r})")
            key, value = part.split("=", 1)
            items[key] = value
    out: dict[str, Any] = {}
    for key, value in items.items():
        if key not in OPTIM_ARG_TYPES:
            raise ValueError(f"unknown optim_args key {key!r}: allowed {sorted(OPTIM_ARG_TYPES)}")
        kind = OPTIM_ARG_TYPES[key]
        try:
            out[key] = kind(value) if not (kind is int and isinstance(value, str) and "." in value) else int(float(value))
        except (TypeError, ValueError):
            raise ValueError(f"optim_args {key}={value!r} is not a valid {kind.__name__}") from None
    return out


def _resolve_name(name: str) -> str:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown galore optimizer {name!r}: choose from {sorted(OPTIMIZERS)}")
    return key


def galore_optimizer(
    model: torch.nn.Module,
    args: Any,
    optimizer: str = "adamw",
    *,
    layerwise: bool = False,
    target_modules: Any = None,
    max_grad_norm: float | None = None,
    **overrides: Any,
) -> torch.optim.Optimizer:
    """Build a galore-opt optimizer for ``model`` from ``TrainingArguments``.

    Args:
        model: the (unwrapped) model.
        args: ``transformers.TrainingArguments`` (or any object with its attribute names).
        optimizer: ``"adamw"``, ``"adamw8bit"`` or ``"adafactor"`` (or the Trainer's names
            ``galore_adamw``, ``galore_adamw_8bit``, ``galore_adafactor``).
        layerwise: wrap in :class:`~galore_opt.layerwise.LayerwiseOptimizer` with
            ``accumulation_steps = args.gradient_accumulation_steps`` and clipping by the previous
            global norm at ``args.max_grad_norm`` (if > 0).
        target_modules: overrides ``args.optim_target_modules`` (default ``"all-linear"`` when
            both are unset).
        max_grad_norm: overrides ``args.max_grad_norm`` (layer-wise clipping threshold).
        overrides: group keys or optimizer arguments that win over ``args`` (e.g. ``rank=64``).
    """
    key = _resolve_name(optimizer)
    opt_args = parse_optim_args(getattr(args, "optim_args", None))
    opt_args.update({k: v for k, v in overrides.items() if k in OPTIM_ARG_TYPES})
    extra = {k: v for k, v in overrides.items() if k not in OPTIM_ARG_TYPES}
    targets = target_modules if target_modules is not None else getattr(args, "optim_target_modules", None)
    if targets is None:
        targets = "all-linear"
    ctor = {k: opt_args.pop(k) for k in _OPTIMIZER_KEYS if k in opt_args}
    groups = galore_param_groups(
        model,
        target_modules=targets,
        weight_decay=float(getattr(args, "weight_decay", 0.0)),
        **opt_args,
    )
    lr = float(getattr(args, "learning_rate", 1e-3))
    cls = OPTIMIZERS[key]
    if key == "adafactor":
        kwargs: dict[str, Any] = {"lr": lr, **ctor, **extra}
    else:
        kwargs = {
            "lr": lr,
            "betas": (float(getattr(args, "adam_beta1", 0.9)), float(getattr(args, "adam_beta2", 0.999))),
            "eps": float(getattr(args, "adam_epsilon", 1e-8)),
            **ctor,
            **extra,
        }
    opt = cls(groups, **kwargs)
    if not layerwise:
        return opt
    world = int(getattr(args, "world_size", 1) or 1)
    if world > 1:
        raise ValueError(
            f"layerwise=True with {world} processes: the Trainer integration is single-process in layer-wise "
            "mode (a post-accumulate-grad update would use each rank's gradient before DDP averages it); use "
            "layerwise=False, or LayerwiseOptimizer.register_ddp(ddp_model) in your own loop"
        )
    max_norm = float((max_grad_norm if max_grad_norm is not None else getattr(args, "max_grad_norm", 0.0)) or 0.0)
    return LayerwiseOptimizer(
        opt,
        accumulation_steps=int(getattr(args, "gradient_accumulation_steps", 1) or 1),
        max_grad_norm=max_norm if max_norm > 0 else None,
    )


_TRAINER_DOC = """``transformers.Trainer`` whose optimizer is galore-opt's, built from its ``TrainingArguments``.

Extra keyword arguments: ``galore_optimizer`` (``"adamw"``, ``"adamw8bit"``, ``"adafactor"``;
default ``"adamw"``), ``layerwise`` (default False) and ``galore_kwargs`` (dict of overrides
for :func:`galore_optimizer`). Everything else is the Trainer's.
"""


def __getattr__(name: str) -> Any:
    # GaLoreTrainer subclasses transformers.Trainer: built on first access, so that importing this
    # module (e.g. for galore_optimizer) does not import transformers.
    if name == "GaLoreTrainer":
        cls = _make_trainer_class()
        globals()["GaLoreTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_trainer_class():
    from transformers import Trainer

    class GaLoreTrainer(Trainer):
        __doc__ = _TRAINER_DOC

        def __init__(self, *args, galore_optimizer: str = "adamw", layerwise: bool = False,
                     galore_kwargs: dict[str, Any] | None = None, **kwargs):  # fmt: skip
            self.galore_optimizer_name = _resolve_name(galore_optimizer)
            self.galore_layerwise = layerwise
            self.galore_kwargs = dict(galore_kwargs or {})
            super().__init__(*args, **kwargs)
            self._galore_max_grad_norm = self.args.max_grad_norm
            if layerwise:
                # Clipping happens inside backward (LayerwiseOptimizer); the Trainer's own clipping
                # would see no gradients and log a norm of 0.
                self.args.max_grad_norm = 0.0

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = galore_optimizer(
                    model if model is not None else self.model, self.args, self.galore_optimizer_name,
                    layerwise=self.galore_layerwise, max_grad_norm=self._galore_max_grad_norm,
                    **self.galore_kwargs,
                )  # fmt: skip
            return self.optimizer

        def log(self, logs: dict[str, float], *args, **kwargs) -> None:
            if self.galore_layerwise and "loss" in logs:
                inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
                norm = getattr(inner, "grad_norm", None)
                if norm is not None:
                    logs["grad_norm"] = float(norm)
            super().log(logs, *args, **kwargs)

    return GaLoreTrainer
