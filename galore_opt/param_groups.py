"""Build param groups: GaLore for selected weight matrices, plain AdamW for everything else."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

DEFAULT_NO_DECAY = ("bias", "norm", "ln_", "layernorm", "embed_positions")

#: ``proj_type`` for a weight stored transposed (``transformers`` ``Conv1D``): ``left`` and ``right``
#: name sides of the layer's ``(out, in)`` matrix, so they swap; ``std``/``reverse_std`` pick by
#: size, which is the same choice on either storage; ``full`` projects both.
_TRANSPOSED_PROJ_TYPE = {"left": "right", "right": "left"}


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` ``Conv1D`` (GPT-2's linear layer, weight stored
    transposed as ``(in_features, out_features)``). Duck-typed so that transformers is not imported."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or a ``transformers`` ``Conv1D``: a layer computing ``x W^T + b``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _module_matches(target: str | Iterable[str], name: str) -> bool:
    """Hugging Face's ``optim_target_modules`` semantics: a string is a regex matched against the
    whole module name; a list matches a module named exactly, or containing one of its entries as a
    substring, or fully matching one of them as a regex."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    targets = list(target)
    if name in targets or any(t in name for t in targets):
        return True
    return any(_safe_fullmatch(t, name) for t in targets)


def _safe_fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _is_all_linear(target: Any) -> bool:
    return isinstance(target, str) and target.replace("_", "-").lower() == "all-linear"


def _check_targets(target: Any, names: list[str]) -> None:
    """An invalid regex is an error unless the entry is found as a plain name or substring (the
    Trainer would raise ``re.error`` on it; we say which entry and why)."""
    entries = [target] if isinstance(target, str) else list(target)
    for entry in entries:
        if not isinstance(entry, str):
            raise ValueError(f"target_modules entries must be strings, got {entry!r}")
        try:
            re.compile(entry)
        except re.error as err:
            if isinstance(target, str) or not any(entry in n for n in names):
                raise ValueError(
                    f"target_modules entry {entry!r} is not a valid regex ({err}) and names no module "
                    "(entries match a module name exactly, as a substring, or as a full regex)"
                ) from None


def galore_param_groups(
    model: nn.Module,
    target_modules: str | Iterable[str] | None = None,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    proj_method: str | None = None,
    weight_decay: float = 0.0,
    no_decay: Iterable[str] = DEFAULT_NO_DECAY,
    **galore_kwargs: Any,
) -> list[dict[str, Any]]:
    """Param groups for a GaLore optimizer.

    The weights of the modules selected by ``target_modules`` form the GaLore group (with
    ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``, ``proj_method`` and any extra group
    keys in ``galore_kwargs``, e.g. ``lr``). All other trainable parameters are split into a decay
    group (``weight_decay``) and a no-decay group (weight decay 0): 1-D parameters and those whose
    name contains one of ``no_decay`` (case-insensitive). Empty groups are left out; shared (tied)
    parameters appear once.

    Selectable modules: ``nn.Linear``; ``transformers`` ``Conv1D`` (GPT-2's projections, weight
    stored transposed as ``(in, out)``: they get a group of their own in which ``proj_type``
    ``"left"``/``"right"`` are swapped, so a side names the same side of the layer as for an
    ``nn.Linear``; ``std``/``reverse_std`` choose by size and need no swap); and ``nn.Conv2d``
    when named explicitly (projected as ``(c_out, c_in * kh * kw)``; never by ``"all-linear"``).

    Args:
        model: the model.
        target_modules: ``None`` (default): every ``nn.Linear`` and ``Conv1D`` except the model's
            output head (``get_output_embeddings()`` or ``lm_head``). Otherwise as Hugging Face's
            ``optim_target_modules``: ``"all-linear"``, a regex string matched against the full
            module name, or a list of names / substrings / regexes. ``"all-linear"`` is the
            Trainer's selection for GaLore in transformers 5.x: every ``nn.Linear`` whose weight
            is its own parameter, output heads and classifiers included (a head tied to the input
            embedding is not selected, as in the Trainer); unlike the Trainer it also selects
            ``Conv1D`` layers (on GPT-2 the Trainer's selects nothing: its only ``nn.Linear`` is
            the tied head). A small matrix (``rank >= min(m, n)``, e.g. a 3-class
            classifier) then gets the full AdamW update times ``scale``, as with galore-torch;
            list the modules you want instead to keep it out.
        rank, update_proj_gap, scale, proj_type, proj_method: the GaLore group keys.
        weight_decay: for the GaLore group and the decay group.
        no_decay: name fragments that exclude a parameter from weight decay.

    Modules that match but are not selectable (embeddings, norms) are skipped. An entry that is
    not a valid regex and names no module is a ``ValueError``; so is a selection of nothing (a
    GaLore run without GaLore is almost surely a typo).
    """
    default = target_modules is None
    all_linear = default or _is_all_linear(target_modules)
    head = None
    if default:
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if head is None and isinstance(getattr(model, "lm_head", None), nn.Module):
            head = model.lm_head
    named_modules = list(model.named_modules())
    if not all_linear:
        if isinstance(target_modules, str):
            _check_targets(target_modules, [])
        else:
            target_modules = list(target_modules)
            _check_targets(target_modules, [n for n, _ in named_modules])
    # parameters by name as named_parameters() reports them: a tied head's weight is reported
    # under the embedding's name, so the Trainer's "all-linear" (which selects by name) skips it
    owner_name = {id(p): n for n, p in model.named_parameters()}

    galore: list[nn.Parameter] = []
    transposed: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, module in named_modules:
        conv2d = isinstance(module, nn.Conv2d)
        if not (is_linear_like(module) or conv2d):
            continue
        # torch.nn.utils.prune turns ``weight`` into a computed tensor; the parameter is ``weight_orig``
        weight = module._parameters.get("weight_orig", module._parameters.get("weight"))
        if weight is None or not weight.requires_grad:
            continue
        if all_linear:
            if conv2d or module is head:
                continue
            own = f"{name}.weight" if name else "weight"
            if owner_name.get(id(weight)) not in (own, f"{name}.weight_orig" if name else "weight_orig"):
                continue  # tied to a parameter of another module (a tied head)
        elif not _module_matches(target_modules, name):
            continue
        if id(weight) not in seen:
            seen.add(id(weight))
            (transposed if is_conv1d(module) else galore).append(weight)
    if not galore and not transposed:
        raise ValueError(
            f"target_modules={'every linear layer but the head' if default else repr(target_modules)} selects "
            "no nn.Linear, Conv1D or Conv2d weight of this model"
        )

    fragments = tuple(f.lower() for f in no_decay)
    decay: list[nn.Parameter] = []
    skip_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2 or any(f in name.lower() for f in fragments):
            skip_decay.append(p)
        else:
            decay.append(p)

    def galore_group(params: list[nn.Parameter], side: str) -> dict[str, Any]:
        group: dict[str, Any] = {
            "params": params,
            "rank": rank,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "proj_type": side,
            "weight_decay": weight_decay,
            **galore_kwargs,
        }
        if proj_method is not None:
            group["proj_method"] = proj_method
        return group

    groups = []
    if galore:
        groups.append(galore_group(galore, proj_type))
    if transposed:
        groups.append(galore_group(transposed, _TRANSPOSED_PROJ_TYPE.get(proj_type, proj_type)))
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if skip_decay:
        groups.append({"params": skip_decay, "weight_decay": 0.0})
    return groups
