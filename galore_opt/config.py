"""State keys, group keys and their validated defaults.

Everything that ends up in ``optimizer.state`` or in a param group is named here, so that users'
configs, checkpoints and our tests agree on one spelling.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

# --- optimizer.state keys (tensors only) -------------------------------------------------------
STEP = "step"  # float32 scalar tensor, as torch.optim.AdamW keeps it
EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
BASIS_LEFT = "basis_left"  # (m, r), orthonormal columns: low = P^T G, back = P N
BASIS_RIGHT = "basis_right"  # (r, n), orthonormal rows:    low = G P^T, back = N P
REFRESH_OFFSET = "refresh_offset"  # int32 scalar: refresh when (step - offset) % gap == 0
#: fp32 scalar on the parameter's device: the norm of the last residual term (group key
#: ``residual``, Fira's norm-growth limiter), +inf before the first step (nothing to limit against)
RESIDUAL_NORM = "residual_norm"

#: state keys whose dtype is chosen by the optimizer, not by the parameter; ``load_state_dict``
#: keeps them as saved instead of casting them to the parameter's dtype.
DTYPE_PRESERVED_KEYS = (BASIS_LEFT, BASIS_RIGHT, RESIDUAL_NORM)

# --- projection sides, decided once per parameter and stored as which basis key exists ----------
LEFT, RIGHT, FULL, NONE = "left", "right", "full", "none"

# --- param-group keys ---------------------------------------------------------------------------
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJ_METHODS = ("svd", "randomized", "power")
NUMERICS = ("torch", "galore_torch")
BASIS_DTYPES = {None: None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

#: defaults of the GaLore group keys (galore-torch names, values of its paper recipe)
GALORE_DEFAULTS: dict[str, Any] = {
    "rank": 128,
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
}

#: defaults of the keys galore-opt adds; ``None`` means "chosen from ``numerics``" (see
#: :func:`galore_group_defaults`).
EXTRA_DEFAULTS: dict[str, Any] = {
    "proj_method": None,  # "power" under torch numerics, "svd" under galore_torch numerics
    "power_iters": None,  # subspace iterations: power 1, randomized 2
    "oversample": 8,  # extra columns of the randomized range finder
    "stagger_refresh": None,  # True under torch numerics, False under galore_torch numerics
    "align_basis": None,  # True under torch numerics, False under galore_torch numerics
    "basis_dtype": None,  # None: the parameter's dtype (what galore-torch stores)
}

#: defaults of the residual-compensation keys (Fira, Chen et al. 2024): off by default. Filled with
#: ``setdefault`` (``residual_limit=None`` is a value: no limiter), not from ``numerics``.
RESIDUAL_DEFAULTS: dict[str, Any] = {
    "residual": False,  # add the scaled out-of-subspace gradient G - P P^T G to the update
    "residual_scaling": "column",  # Fira's per-column norm ratio; "matrix": one ratio per matrix
    "residual_limit": 1.01,  # Fira's norm-growth limit gamma; None: no limiter (and no state)
}
RESIDUAL_SCALINGS = ("column", "matrix")

DEFAULT_POWER_ITERS = {"power": 1, "randomized": 2, "svd": 0}


def galore_group_defaults(numerics: str) -> dict[str, Any]:
    """The values that ``None`` stands for in :data:`EXTRA_DEFAULTS` under ``numerics``."""
    torch_numerics = numerics == "torch"
    return {
        "proj_method": "power" if torch_numerics else "svd",
        "stagger_refresh": torch_numerics,
        "align_basis": torch_numerics,
    }


def _is_int(value: Any) -> bool:
    """An integer (numpy's included, as galore-torch accepts them), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


#: integer group keys, stored as Python ints once validated (numpy integers would keep the param
#: groups, hence the state dict, from loading with ``torch.load(weights_only=True)``)
_INT_KEYS = ("rank", "update_proj_gap", "power_iters", "oversample")


def validate_galore_group(group: dict[str, Any], numerics: str) -> None:
    """Fill the GaLore keys of ``group`` with defaults and check them; raises ``ValueError``."""
    for key, value in GALORE_DEFAULTS.items():
        group.setdefault(key, value)
    filled = galore_group_defaults(numerics)
    for key, value in EXTRA_DEFAULTS.items():
        if group.get(key) is None:
            group[key] = filled.get(key, value)

    rank, gap, scale = group["rank"], group["update_proj_gap"], group["scale"]
    if not _is_int(rank) or rank < 1:
        raise ValueError(f"Invalid rank: {rank!r} - must be an int >= 1")
    if not _is_int(gap) or gap < 1:
        raise ValueError(f"Invalid update_proj_gap: {gap!r} - must be an int >= 1")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"Invalid scale: {scale!r} - must be a finite number > 0")
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"Invalid proj_type: {group['proj_type']!r} - must be one of {PROJ_TYPES}")
    if group["proj_method"] not in PROJ_METHODS:
        raise ValueError(f"Invalid proj_method: {group['proj_method']!r} - must be one of {PROJ_METHODS}")
    if group["power_iters"] is not None and (not _is_int(group["power_iters"]) or group["power_iters"] < 0):
        raise ValueError(f"Invalid power_iters: {group['power_iters']!r} - must be an int >= 0 or None")
    if not _is_int(group["oversample"]) or group["oversample"] < 0:
        raise ValueError(f"Invalid oversample: {group['oversample']!r} - must be an int >= 0")
    if group["basis_dtype"] not in BASIS_DTYPES:
        raise ValueError(
            f"Invalid basis_dtype: {group['basis_dtype']!r} - must be one of {tuple(BASIS_DTYPES)}"
        )
    for key in ("stagger_refresh", "align_basis"):
        if not isinstance(group[key], bool):
            raise ValueError(f"Invalid {key}: {group[key]!r} - must be a bool")
    if numerics == "galore_torch" and (group["stagger_refresh"] or group["align_basis"]):
        raise ValueError(
            "numerics='galore_torch' reproduces galore-torch's refresh schedule and basis: "
            "stagger_refresh and align_basis must be False"
        )
    validate_residual_keys(group, numerics)
    for key in _INT_KEYS:
        if group[key] is not None:
            group[key] = int(group[key])
    if not isinstance(scale, int):
        group["scale"] = float(scale)


def validate_residual_keys(group: dict[str, Any], numerics: str) -> None:
    """Fill and check the residual-compensation keys of a GaLore group; raises ``ValueError``."""
    for key, value in RESIDUAL_DEFAULTS.items():
        group.setdefault(key, value)
    residual, scaling, limit = group["residual"], group["residual_scaling"], group["residual_limit"]
    if not isinstance(residual, bool):
        raise ValueError(f"Invalid residual: {residual!r} - must be a bool")
    if scaling not in RESIDUAL_SCALINGS:
        raise ValueError(f"Invalid residual_scaling: {scaling!r} - must be one of {RESIDUAL_SCALINGS}")
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, numbers.Real) or not math.isfinite(limit) or limit < 1
    ):
        raise ValueError(f"Invalid residual_limit: {limit!r} - must be a finite number >= 1 (a growth factor) or None")
    if limit is not None:
        group["residual_limit"] = float(limit)
    if residual and group["proj_type"] == "full":
        raise ValueError(
            "residual=True needs a one-sided projection (proj_type 'std', 'reverse_std', 'left' or 'right'), "
            "got proj_type='full'"
        )


def validate_adam_hyperparameters(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """torch.optim.AdamW's checks, with the offending value in the message."""
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr!r} - must be a number >= 0")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} - must be a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta!r} - must be in [0, 1)")
    if not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps!r} - must be >= 0")
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r} - must be >= 0")

# --- 8-bit state (GaLoreAdamW8bit) --------------------------------------------------------------
EXP_AVG_CODES = "exp_avg_codes"  # uint8, the moment's shape: indices into the signed dynamic map
EXP_AVG_ABSMAX = "exp_avg_absmax"  # float32, one per block
EXP_AVG_SQ_CODES = "exp_avg_sq_codes"  # uint8: indices into the unsigned dynamic map
EXP_AVG_SQ_ABSMAX = "exp_avg_sq_absmax"
