"""Small measurement helpers shared by the demo, the benchmarks and the tests."""

from __future__ import annotations

from typing import Any

import torch


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)
    else:  # e.g. galore-torch's projector object: count the tensors it holds
        attrs = getattr(obj, "__dict__", None)
        if attrs:
            yield from _tensors(attrs)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor held in ``optimizer.state`` (each storage counted once).

    Tensors inside Python objects in the state (galore-torch keeps its basis in a projector object)
    are counted too, so two optimizers compare on what they actually hold.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in _tensors(list(optimizer.state.values())):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total
