"""torch.optim-style optimizer classes; the math lives in :mod:`galore_opt.functional`."""

from .base import GaLoreOptimizer
from .galore_adafactor import GaLoreAdafactor
from .galore_adamw import GaLoreAdamW
from .galore_adamw8bit import GaLoreAdamW8bit

__all__ = ["GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreOptimizer"]
