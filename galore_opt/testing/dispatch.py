"""Dispatch-level views of an optimizer step: which operators it runs and whether it synchronizes.

Used by the tests (fake CUDA tensors, meta tensors) and by ``benchmarks/bench_dispatch.py``.
"""

from __future__ import annotations

import collections
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: operators that read a device tensor's value on the host (each one a device synchronization)
SYNC_OPS = frozenset({"aten._local_scalar_dense.default", "aten.item.default", "aten.equal.default",
                      "aten.is_nonzero.default", "aten.nonzero.default", "aten.allclose.default"})  # fmt: skip


def _devices(args: Any) -> set[str]:
    out: set[str] = set()

    def visit(a: Any) -> None:
        if isinstance(a, torch.Tensor):
            out.add(a.device.type)
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)

    visit(args)
    return out


class OpRecorder(TorchDispatchMode):
    """Counts the operators dispatched while active (a custom operator such as
    ``galore_opt.lowrank_adam`` counts once: what it runs inside is not seen), and records every
    host read of a non-CPU tensor (:data:`SYNC_OPS`) and every copy from a non-CPU device to the
    CPU: the synchronizations a CUDA step would make."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.counts[name] += 1
        devices = _devices((args, kwargs)) - {"cpu"}
        if name in SYNC_OPS and devices:
            self.syncs.append(f"{name} on {sorted(devices)}")
        elif name in ("aten._to_copy.default", "aten.copy_.default") and devices:
            target = kwargs.get("device") if name == "aten._to_copy.default" else args[0].device
            if target is not None and torch.device(target).type == "cpu":
                self.syncs.append(f"{name} to the CPU from {sorted(devices)}")
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def custom_ops(self, namespace: str = "galore_opt") -> dict[str, int]:
        """Counts of the operators of ``namespace`` (the fused kernels)."""
        return {k: v for k, v in self.counts.items() if k.startswith(f"{namespace}.")}


__all__ = ["SYNC_OPS", "OpRecorder"]
