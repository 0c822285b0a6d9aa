"""Build param groups: GaLore for selected weight matrices, plain AdamW for everything else."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

DEFAULT_NO_DECAY = ("bias", "norm", "ln_", "layernorm", "embed_positions")


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


def galore_param_groups(
    model: nn.Module,
    target_modules: str | Iterable[str] = "all-linear",
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

    The weights of the ``nn.Linear`` modules selected by ``target_modules`` form one GaLore group
    (with ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``, ``proj_method`` and any extra
    group keys in ``galore_kwargs``, e.g. ``lr``). All other trainable parameters are split into a
    decay group (``weight_decay``) and a no-decay group (weight decay 0): 1-D parameters and those
    whose name contains one of ``no_decay`` (case-insensitive). Empty groups are left out; shared
    (tied) parameters appear once.

    Args:
        model: the model.
        target_modules: as Hugging Face's ``optim_target_modules``: ``"all-linear"`` (every
            ``nn.Linear`` except the model's output head), a regex string matched against the full
            module name, or a list of names / substrings / regexes.
        rank, update_proj_gap, scale, proj_type, proj_method: the GaLore group keys.
        weight_decay: for the GaLore group and the decay group.
        no_decay: name fragments that exclude a parameter from weight decay.

    Modules that match but are not ``nn.Linear`` are skipped without a warning. If nothing is
    selected a ``ValueError`` says so (a GaLore run without GaLore is almost surely a typo).
    """
    head = None
    if _is_all_linear(target_modules):
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if head is None and isinstance(getattr(model, "lm_head", None), nn.Module):
            head = model.lm_head

    galore: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        # torch.nn.utils.prune turns ``weight`` into a computed tensor; the parameter is ``weight_orig``
        weight = module._parameters.get("weight_orig", module._parameters.get("weight"))
        if weight is None or not weight.requires_grad:
            continue
        if _is_all_linear(target_modules):
            if module is head:
                continue
        elif not _module_matches(target_modules, name):
            continue
        if id(weight) not in seen:
            seen.add(id(weight))
            galore.append(weight)
    if not galore:
        raise ValueError(f"target_modules={target_modules!r} selects no nn.Linear weight of this model")

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

    galore_group: dict[str, Any] = {
        "params": galore,
        "rank": rank,
        "update_proj_gap": update_proj_gap,
        "scale": scale,
        "proj_type": proj_type,
        "weight_decay": weight_decay,
        **galore_kwargs,
    }
    if proj_method is not None:
        galore_group["proj_method"] = proj_method
    groups = [galore_group]
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if skip_decay:
        groups.append({"params": skip_decay, "weight_decay": 0.0})
    return groups
