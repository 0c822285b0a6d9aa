"""galore-opt: drop-in GaLore optimizers for PyTorch.

Importing this package loads no Triton or transformers and touches no CUDA device.
"""

from .optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from .param_groups import galore_param_groups
from .projector import captured_energy, compute_basis, project, project_back
from .utils import optimizer_state_bytes

__version__ = "0.1.0"

__all__ = [
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "__version__",
    "captured_energy",
    "compute_basis",
    "galore_param_groups",
    "optimizer_state_bytes",
    "project",
    "project_back",
]
