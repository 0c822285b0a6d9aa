"""Hugging Face ``transformers.Trainer`` integration (transformers is imported lazily, on use).

Coming from the Trainer's built-in GaLore (``optim="galore_adamw"``, galore-torch): keep the
``TrainingArguments`` and change ``Trainer`` to ``GaLoreTrainer``::

    from galore_opt.integrations.transformers import GaLoreTrainer
    args = TrainingArguments(..., optim="galore_adamw_8bit_layerwise", learning_rate=1e-3,
                             optim_target_modules=["attn", "mlp"],
                             optim_args="rank=128,update_proj_gap=200,scale=0.25")
    trainer = GaLoreTrainer(model=model, args=args, train_dataset=ds)   # was: Trainer(...)
    trainer.train()                              # checkpoints hold the real optimizer state

``args.optim`` chooses the optimizer for every Hugging Face GaLore name (:data:`HF_OPTIM_NAMES`:
``galore_adamw``, ``galore_adamw_8bit``, ``galore_adafactor`` and their ``_layerwise`` variants);
with the Trainer's default ``optim`` (``adamw_torch_fused`` / ``adamw_torch``) the
``galore_optimizer=`` and ``layerwise=`` arguments choose (default ``"adamw"``, not layer-wise);
any other ``optim`` is a ``ValueError``. Or build the optimizer yourself and hand it to a plain
``Trainer``::

    optimizer = galore_optimizer(model, args)    # reads args.optim as above
    trainer = Trainer(model=model, args=args, optimizers=(optimizer, None), ...)

Semantics, name by name, against the Trainer's built-in path (``transformers`` 5.x):

* ``galore_adamw``: ``GaLoreAdamW``; eps 1e-6 (galore-torch's default, which the Trainer uses: it
  does not pass ``adam_epsilon``) unless ``adam_epsilon`` is changed from its default 1e-8.
* ``galore_adamw_8bit``: ``GaLoreAdamW8bit``; eps 1e-8 (bitsandbytes' default, the Trainer's).
* ``galore_adafactor``: ``GaLoreAdafactor`` with the Trainer's flags ``scale_parameter=False,
  relative_step=False`` and ``lr=learning_rate``, which are Hugging Face's Adafactor
  (``numerics="galore_torch"``; torch's Adafactor rule has no external learning rate:
  ``optim_args="numerics=torch"`` selects it, with ``learning_rate`` capping its relative step).
* ``*_layerwise``: the same optimizer in :class:`~galore_opt.layerwise.LayerwiseOptimizer`. The
  Trainer refuses gradient accumulation there; we accumulate the projected gradient. (The Trainer's
  ``galore_adafactor_layerwise`` omits the Adafactor flags and so raises on any ``learning_rate``;
  ours uses the same flags as ``galore_adafactor``.)

What we honour that the Trainer's GaLore ignores: ``weight_decay`` (GaLore weights and other
matrices decay; biases and norms do not; the Trainer passes none, so galore-torch's defaults
apply: 0 for AdamW and Adafactor, 0.01 on every parameter for the 8-bit AdamW), ``adam_beta1``,
``adam_beta2`` (their defaults are galore-torch's). ``optim_target_modules`` has the Trainer's
meaning (a list of name fragments or regexes, a regex string, or ``"all-linear"``: every
``nn.Linear``, heads included; see :func:`~galore_opt.galore_param_groups`), plus ``transformers``
``Conv1D`` layers (GPT-2), which the Trainer's GaLore cannot select. ``optim_args`` keys ``rank``,
``update_proj_gap``, ``scale``, ``proj_type`` (galore-torch's) and ``proj_method``,
``power_iters``, ``numerics``, ``residual``, ``residual_scaling``, ``residual_limit`` (ours),
typed and validated.

Layer-wise mode works with ``gradient_accumulation_steps``, clips with ``max_grad_norm`` by the
previous update's global norm (the Trainer's own clipping sees no gradients in layer-wise mode, so
it is turned off on the trainer's copy of the arguments, never on the caller's; a warning says that
this clipping is not the regular run's) and saves the full optimizer state in checkpoints. The
logged ``grad_norm`` is the true global gradient norm without accumulation; with accumulation a
GaLore matrix accumulates only its projection, so the norm of what the optimizer applied is logged
as ``grad_norm_projected`` instead (it is lower than the full gradient's norm). Every checkpoint
loads with ``torch.load``'s default ``weights_only=True`` and resumes exactly.

Layer-wise mode with several processes (``torchrun`` / ``accelerate launch``): under DDP the updates
run from DDP's communication hook, after each gradient bucket is averaged
(:meth:`LayerwiseOptimizer.register_ddp`, called before the first backward); under FSDP2 from the
hooks FSDP2 runs on each sharded parameter after its gradient is reduce-scattered. The Trainer
accumulates the first micro-batches of a step under ``no_sync``, so each rank accumulates the full
gradient and the optimizer updates once per step (``accumulation_steps=1``; the logged
``grad_norm`` is then exact). See ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Any

import torch

from ..layerwise import LayerwiseOptimizer
from ..optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from ..optim.fsdp import is_dtensor as _is_dtensor
from ..param_groups import galore_param_groups

__all__ = ["GaLoreTrainer", "HF_OPTIM_NAMES", "OPTIMIZERS", "galore_optimizer", "parse_optim_args", "resolve_optim"]  # noqa: F822 (module __getattr__)

#: ``galore_optimizer`` names
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
#: Hugging Face ``TrainingArguments.optim`` GaLore names -> (our optimizer, layer-wise)
HF_OPTIM_NAMES = {
    "galore_adamw": ("adamw", False),
    "galore_adamw_8bit": ("adamw8bit", False),
    "galore_adafactor": ("adafactor", False),
    "galore_adamw_layerwise": ("adamw", True),
    "galore_adamw_8bit_layerwise": ("adamw8bit", True),
    "galore_adafactor_layerwise": ("adafactor", True),
}
#: ``TrainingArguments.optim`` values that mean "not chosen" (the defaults of transformers 4.x / 5.x)
_DEFAULT_OPTIMS = ("adamw_torch", "adamw_torch_fused", "adamw_hf")
#: eps of the Trainer's built-in GaLore (galore-torch's defaults; the Trainer passes no eps)
_HF_EPS = {"adamw": 1e-6, "adamw8bit": 1e-8}
_TRAINER_DEFAULT_EPS = 1e-8
#: typed ``optim_args`` keys
OPTIM_ARG_TYPES = {
    "rank": int,
    "update_proj_gap": int,
    "scale": float,
    "proj_type": str,
    "proj_method": str,
    "power_iters": int,
    "numerics": str,
    "residual": bool,  # "true" / "false" (also 1 / 0, yes / no)
    "residual_scaling": str,
    "residual_limit": float,  # or "none": no limiter
}
_OPTIMIZER_KEYS = ("numerics",)  # constructor arguments rather than group keys


def _to_int(value: Any) -> int:
    """``64``, ``"64"``, ``"1e3"``, ``"200.0"`` -> int; ``"64.7"`` (not integral) raises."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    number = float(value)
    if not math.isfinite(number) or number != int(number):
        raise ValueError
    return int(number)


def _to_bool(value: Any) -> bool:
    """``True``, ``"true"``, ``"1"``, ``"yes"`` -> True; ``False``, ``"false"``, ``"0"``, ``"no"`` -> False."""
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError


def parse_optim_args(optim_args: str | dict[str, Any] | None) -> dict[str, Any]:
    """``"rank=128,update_proj_gap=200,scale=0.25,proj_type=std"`` -> typed dict.

    Integers may be written ``1e3`` or ``200.0``; a non-integral value (``rank=64.7``) is refused.
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
            if key == "residual_limit" and (value is None or str(value).lower() == "none"):
                out[key] = None
            elif kind is bool:
                out[key] = _to_bool(value)
            else:
                out[key] = _to_int(value) if kind is int else kind(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"optim_args {key}={value!r} is not a valid {kind.__name__}") from None
    return out


def _resolve_name(name: str) -> str:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown galore optimizer {name!r}: choose from {sorted(OPTIMIZERS)}")
    return key


def _optim_value(args: Any) -> str | None:
    optim = getattr(args, "optim", None)
    if optim is None:
        return None
    return str(getattr(optim, "value", optim)).lower()


def resolve_optim(args: Any, optimizer: str | None = None, layerwise: bool | None = None) -> tuple[str, bool, bool]:
    """``(optimizer key, layer-wise, from_hf_name)`` from ``args.optim`` and explicit choices.

    ``args.optim`` set to a Hugging Face GaLore name decides; an explicit ``optimizer`` or
    ``layerwise`` that contradicts it is a ``ValueError``. With the Trainer's default ``optim`` the
    explicit choices (default ``"adamw"``, not layer-wise) decide. Any other ``optim`` is a
    ``ValueError`` (galore-opt builds GaLore optimizers only)."""
    optim = _optim_value(args)
    if optim in HF_OPTIM_NAMES:
        key, lw = HF_OPTIM_NAMES[optim]
        if optimizer is not None and _resolve_name(optimizer) != key:
            raise ValueError(
                f"galore_optimizer={optimizer!r} contradicts TrainingArguments.optim={optim!r} (which means "
                f"{key!r}): set one of them"
            )
        if layerwise is not None and bool(layerwise) != lw:
            raise ValueError(
                f"layerwise={layerwise!r} contradicts TrainingArguments.optim={optim!r}: "
                f"{'drop' if lw else 'add'} the '_layerwise' suffix or leave layerwise unset"
            )
        return key, lw, True
    if optim is not None and optim not in _DEFAULT_OPTIMS:
        raise ValueError(
            f"TrainingArguments.optim={optim!r} is not a GaLore optimizer: use one of {sorted(HF_OPTIM_NAMES)}, "
            f"or leave optim at its default and pass galore_optimizer= (one of {sorted(OPTIMIZERS)}); "
            "for a non-GaLore optimizer use a plain Trainer"
        )
    return _resolve_name(optimizer or "adamw"), bool(layerwise), False


def galore_optimizer(
    model: torch.nn.Module,
    args: Any,
    optimizer: str | None = None,
    *,
    layerwise: bool | None = None,
    target_modules: Any = None,
    max_grad_norm: float | None = None,
    **overrides: Any,
) -> torch.optim.Optimizer:
    """Build a galore-opt optimizer for ``model`` from ``TrainingArguments``.

    Args:
        model: the (unwrapped) model.
        args: ``transformers.TrainingArguments`` (or any object with its attribute names).
        optimizer: ``"adamw"``, ``"adamw8bit"`` or ``"adafactor"`` (or ``galore_adamw``,
            ``galore_adamw_8bit``, ``galore_adafactor``). Default: from ``args.optim`` when it is
            one of :data:`HF_OPTIM_NAMES`, else ``"adamw"`` (see :func:`resolve_optim`).
        layerwise: wrap in :class:`~galore_opt.layerwise.LayerwiseOptimizer` with
            ``accumulation_steps = args.gradient_accumulation_steps`` and clipping by the previous
            global norm at ``args.max_grad_norm`` (if > 0). Default: from ``args.optim``'s
            ``_layerwise`` suffix, else False.
        target_modules: overrides ``args.optim_target_modules``; when both are unset, every linear
            layer but the output head (:func:`~galore_opt.galore_param_groups`' default; the
            Trainer's own GaLore requires ``optim_target_modules``).
        max_grad_norm: overrides ``args.max_grad_norm`` (layer-wise clipping threshold).
        overrides: group keys or optimizer arguments that win over ``args`` (e.g. ``rank=64``,
            ``eps=1e-7``).

    eps: ``adam_epsilon`` when it differs from the Trainer's default 1e-8; otherwise the Trainer's
    built-in GaLore value when ``args.optim`` is a GaLore name or ``numerics="galore_torch"``
    (1e-6 for AdamW, 1e-8 for 8-bit AdamW: galore-torch's defaults), else 1e-8.
    """
    key, layerwise, from_hf = resolve_optim(args, optimizer, layerwise)
    opt_args = parse_optim_args(getattr(args, "optim_args", None))
    opt_args.update({k: v for k, v in overrides.items() if k in OPTIM_ARG_TYPES})
    extra = {k: v for k, v in overrides.items() if k not in OPTIM_ARG_TYPES}
    targets = target_modules if target_modules is not None else getattr(args, "optim_target_modules", None)
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
        ctor.setdefault("numerics", "galore_torch")
        kwargs: dict[str, Any] = {"lr": lr, **ctor}
        if ctor["numerics"] == "galore_torch":
            # the Trainer's galore_adafactor: Hugging Face's Adafactor with an external learning rate
            kwargs.update(scale_parameter=False, relative_step=False, warmup_init=False)
        kwargs.update(extra)
    else:
        adam_eps = float(getattr(args, "adam_epsilon", _TRAINER_DEFAULT_EPS))
        if adam_eps == _TRAINER_DEFAULT_EPS and (from_hf or ctor.get("numerics") == "galore_torch"):
            adam_eps = _HF_EPS[key]
        kwargs = {
            "lr": lr,
            "betas": (float(getattr(args, "adam_beta1", 0.9)), float(getattr(args, "adam_beta2", 0.999))),
            "eps": adam_eps,
            **ctor,
            **extra,
        }
    opt = cls(groups, **kwargs)
    if not layerwise:
        return opt
    world = int(getattr(args, "world_size", 1) or 1)
    max_norm = float((max_grad_norm if max_grad_norm is not None else getattr(args, "max_grad_norm", 0.0)) or 0.0)
    # several processes: the Trainer runs all but the last micro-batch under accelerate's no_sync
    # (DDP's no_sync, FSDP2's set_requires_gradient_sync(False)), so the gradient accumulates in full
    # on each rank and is reduced once: one update per reduced gradient
    accumulation = 1 if world > 1 else int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    if max_norm > 0:
        warnings.warn(
            f"layer-wise mode clips with max_grad_norm={max_norm:g} by the previous update's global gradient "
            "norm (the current one is not known until backward ends)"
            + (", which with gradient accumulation is the norm of the projected gradients" if accumulation > 1 else "")
            + ": the updates differ from a regular run's clipping; set max_grad_norm=0 to turn clipping off",
            stacklevel=2,
        )
    return LayerwiseOptimizer(
        opt,
        accumulation_steps=accumulation,
        max_grad_norm=max_norm if max_norm > 0 else None,
    )


def _attach_layerwise(model: torch.nn.Module, optimizer: Any) -> None:
    """Before the first backward of a multi-process run: under DDP, run the layer-wise updates from
    DDP's communication hook (:meth:`LayerwiseOptimizer.register_ddp`, once); under FSDP2 the
    post-accumulate-grad hooks already fire after each reduce-scatter (nothing to do). Any other
    wrapper of a multi-process run is refused."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    if not isinstance(inner, LayerwiseOptimizer) or inner._ddp:
        return
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        inner.register_ddp(model)
        return
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    if torch.distributed.get_world_size() > 1 and not any(_is_dtensor(p) for p in model.parameters()):
        raise ValueError(
            f"layer-wise mode with {torch.distributed.get_world_size()} processes needs the model wrapped in "
            f"DistributedDataParallel or sharded with FSDP2 (fully_shard); got a {type(model).__name__}: a "
            "post-accumulate-grad update would use each rank's own gradient"
        )


#: the layer-wise wrapper's counters beside an FSDP checkpoint of the wrapped optimizer
LAYERWISE_META = "galore_layerwise.pt"


_TRAINER_DOC = """``transformers.Trainer`` whose optimizer is galore-opt's, built from its ``TrainingArguments``.

``args.optim`` set to a Hugging Face GaLore name (``galore_adamw``, ``galore_adamw_8bit``,
``galore_adafactor`` and their ``_layerwise`` variants) chooses the optimizer with that name's
semantics (see the module docstring); with the default ``optim`` the extra keyword arguments
``galore_optimizer`` (``"adamw"``, ``"adamw8bit"``, ``"adafactor"``; default ``"adamw"``) and
``layerwise`` (default False) choose. ``galore_kwargs``: dict of overrides for
:func:`galore_optimizer`. Everything else is the Trainer's. The caller's ``args`` are never
modified (layer-wise mode turns the Trainer's clipping off on a copy).
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
    import copy

    from transformers import Trainer

    class GaLoreTrainer(Trainer):
        __doc__ = _TRAINER_DOC

        def __init__(self, *args, galore_optimizer: str | None = None, layerwise: bool | None = None,
                     galore_kwargs: dict[str, Any] | None = None, **kwargs):  # fmt: skip
            # the trainer gets its own copy of the arguments: layer-wise mode changes max_grad_norm
            if len(args) >= 2 and args[1] is not None:
                args = (args[0], copy.copy(args[1]), *args[2:])
            elif kwargs.get("args") is not None:
                kwargs["args"] = copy.copy(kwargs["args"])
            given = args[1] if len(args) >= 2 else kwargs.get("args")
            if given is not None:
                resolve_optim(given, galore_optimizer, layerwise)  # refuse a wrong optim before any set-up
            self.galore_kwargs = dict(galore_kwargs or {})
            super().__init__(*args, **kwargs)
            name, lw, _ = resolve_optim(self.args, galore_optimizer, layerwise)
            self.galore_optimizer_name, self.galore_layerwise = name, lw
            self._galore_max_grad_norm = self.args.max_grad_norm
            if lw:
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

        def _get_grad_norm(self, model, grad_norm=None):
            # transformers >= 5 measures the norm with clip_grad_norm_(..., inf) after backward,
            # when the layer-wise updates have freed the gradients: take the optimizer's instead
            if self.galore_layerwise and grad_norm is None:
                norm = getattr(getattr(self.optimizer, "optimizer", self.optimizer), "grad_norm", None)
                return norm
            return super()._get_grad_norm(model, grad_norm=grad_norm)

        def training_step(self, model, *args, **kwargs):
            if self.galore_layerwise:
                _attach_layerwise(model, self.optimizer)
            return super().training_step(model, *args, **kwargs)

        def _save_optimizer_and_scheduler(self, output_dir):
            with self._galore_fsdp_checkpoint() as layerwise:
                super()._save_optimizer_and_scheduler(output_dir)
            if layerwise is not None and self.args.should_save:
                torch.save(layerwise.wrapper_state_dict(), os.path.join(output_dir, LAYERWISE_META))

        def _load_optimizer_and_scheduler(self, checkpoint):
            with self._galore_fsdp_checkpoint() as layerwise:
                super()._load_optimizer_and_scheduler(checkpoint)
            if layerwise is not None and checkpoint is not None:
                meta = os.path.join(checkpoint, LAYERWISE_META)
                if os.path.isfile(meta):
                    layerwise.load_wrapper_state_dict(torch.load(meta, weights_only=True))

        @contextlib.contextmanager
        def _galore_fsdp_checkpoint(self):
            """Under FSDP the Trainer checkpoints the optimizer with accelerate's FSDP helpers, which
            read it through ``torch.distributed.checkpoint``'s state-dict API: in layer-wise mode
            they get the wrapped optimizer (torch's state-dict layout, DTensor state) and the
            wrapper's own counters go to a file beside it. Yields that wrapper, or None."""
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            if not (self.galore_layerwise and getattr(self, "is_fsdp_enabled", False)) or not isinstance(
                inner, LayerwiseOptimizer
            ):
                yield None
                return
            if len(inner.optimizers) != 1:
                raise ValueError("FSDP checkpoints of a LayerwiseOptimizer need it to wrap one optimizer")
            holder = self.optimizer if inner is not self.optimizer else None
            if holder is not None:
                holder.optimizer = inner.optimizers[0]
            else:
                self.optimizer = inner.optimizers[0]
            try:
                yield inner
            finally:
                if holder is not None:
                    holder.optimizer = inner
                else:
                    self.optimizer = inner

        def log(self, logs: dict[str, float], *args, **kwargs) -> None:
            if self.galore_layerwise and "loss" in logs:
                # the Trainer's own grad_norm reads .grad after backward, when layer-wise updates
                # have freed the gradients: 0 or a partial norm, never logged
                logs.pop("grad_norm", None)
                inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
                norm = getattr(inner, "grad_norm", None)
                if norm is not None:
                    exact = getattr(inner, "accumulation_steps", 1) == 1
                    logs["grad_norm" if exact else "grad_norm_projected"] = float(norm)
            super().log(logs, *args, **kwargs)

    return GaLoreTrainer
