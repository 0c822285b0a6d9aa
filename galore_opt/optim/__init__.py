"""torch.optim-style optimizer classes; the math lives in :mod:`galore_opt.functional`."""

from .base import GaLoreOptimizer
from .galore_adamw import GaLoreAdamW

__all__ = ["GaLoreAdamW", "GaLoreOptimizer"]
