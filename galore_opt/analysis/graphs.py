"""Sparse layers as bipartite graphs.

Every ``nn.Linear`` and ``nn.Conv2d`` weight is its own bipartite graph (biases and norms are left
out). The effective weight is ``mask * weight``; a module pruned with ``torch.nn.utils.prune``
contributes ``weight_orig * weight_mask``.

* Linear ``W`` of shape ``(out, in)``: left nodes are the ``in`` inputs, right nodes the ``out``
  outputs, and the biadjacency is ``B = (W != 0)^T`` of shape ``(in, out)``.
* Conv2d ``W`` of shape ``(c_out, c_in, kh, kw)``: reshaped to ``(c_out, c_in * kh * kw)`` and
  transposed, so there is one left node per (input channel, kernel position) -- left index
  ``(c * kh + i) * kw + j`` -- and ``c_out`` right nodes. Weight sharing over spatial positions is
  ignored.

Reference: Hoang et al., "Revisiting Pruning at Initialization through the Lens of Ramanujan
Graph", ICLR 2023; Hoang, Kundu, Liu, Wang, "Don't just prune by magnitude! Your mask topology
is a secret weapon", NeurIPS 2023.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..param_groups import is_conv1d

__all__ = [
    "BipartiteGraph",
    "drop_isolated",
    "effective_weight",
    "layer_graph",
    "model_graphs",
    "prunable_modules",
    "unfold_weight",
]

#: module types whose weights are scored as graphs
GRAPH_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


def unfold_weight(weight: Tensor) -> Tensor:
    """The weight as an ``(n_left, n_right)`` matrix: ``W^T`` for a Linear weight ``(out, in)``,
    ``W.reshape(c_out, -1)^T`` for a Conv2d weight ``(c_out, c_in, kh, kw)``.

    Args:
        weight (Tensor): a 2-D (Linear) or 4-D (Conv2d) weight.

    Returns:
        A view of shape ``(in, out)`` or ``(c_in * kh * kw, c_out)``.
    """
    if weight.dim() == 2:
        return weight.t()
    if weight.dim() == 4:
        return weight.reshape(weight.shape[0], -1).t()
    raise ValueError(f"weight must be 2-D (Linear) or 4-D (Conv2d), got shape {tuple(weight.shape)}")


def effective_weight(module: nn.Module, mask: Tensor | None = None) -> Tensor:
    """``mask * weight`` of a Linear/Conv2d module, detached.

    A ``torch.nn.utils.prune`` reparametrization (``weight_orig`` and ``weight_mask``) is read as
    ``weight_orig * weight_mask``; an explicit ``mask`` is applied on top of it.

    Args:
        module (nn.Module): a module with a ``weight`` (or ``weight_orig``).
        mask (Tensor, optional): 0/1 or boolean mask of the weight's shape.
    """
    if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
        w = module.weight_orig.detach() * module.weight_mask.detach()
    elif isinstance(getattr(module, "weight", None), Tensor):
        w = module.weight.detach()
    else:
        raise ValueError(f"module {type(module).__name__} has no weight tensor")
    if mask is not None:
        if tuple(mask.shape) != tuple(w.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(w.shape)}")
        w = w * mask.to(device=w.device, dtype=w.dtype)
    return w


@dataclass
class BipartiteGraph:
    """One layer as a bipartite graph, before zero-degree nodes are dropped.

    Attributes:
        biadjacency: ``(n_left, n_right)`` float 0/1 matrix (see the module docstring).
        weights: ``(n_left, n_right)`` absolute effective weights ``|W * M|`` in the same layout.
        name: the module name (empty for a bare tensor).
        weight_shape: the original weight shape.
    """

    biadjacency: Tensor
    weights: Tensor
    name: str = ""
    weight_shape: tuple[int, ...] = ()

    @property
    def dim_in(self) -> int:
        return self.biadjacency.shape[0]

    @property
    def dim_out(self) -> int:
        return self.biadjacency.shape[1]

    @property
    def num_edges(self) -> int:
        return int(self.biadjacency.sum().item())

    @property
    def left_degrees(self) -> Tensor:
        return self.biadjacency.sum(1)

    @property
    def right_degrees(self) -> Tensor:
        return self.biadjacency.sum(0)

    @property
    def density(self) -> float:
        return self.num_edges / max(1, self.biadjacency.numel())

    def filtered(self) -> BipartiteGraph:
        """The graph without zero-degree nodes on either side."""
        b, keep_l, keep_r = drop_isolated(self.biadjacency)
        return BipartiteGraph(b, self.weights[keep_l][:, keep_r], self.name, self.weight_shape)


def drop_isolated(biadjacency: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Remove zero-degree left and right nodes.

    Returns:
        ``(B', left_index, right_index)`` with ``B' = B[left_index][:, right_index]``.
    """
    keep_l = torch.nonzero(biadjacency.sum(1) > 0).flatten()
    keep_r = torch.nonzero(biadjacency.sum(0) > 0).flatten()
    return biadjacency[keep_l][:, keep_r], keep_l, keep_r


def layer_graph(layer: nn.Module | Tensor, mask: Tensor | None = None, name: str = "") -> BipartiteGraph:
    """The bipartite graph of one Linear/Conv2d layer (or a bare 2-D/4-D weight tensor).

    Args:
        layer (nn.Module or Tensor): the module (plain or ``torch.nn.utils.prune``-reparametrized)
            or its weight.
        mask (Tensor, optional): mask of the weight's shape; nonzero entries are kept.
        name (str): a label carried along.
    """
    if isinstance(layer, nn.Module):
        w = effective_weight(layer, mask)
    else:
        w = layer.detach()
        if mask is not None:
            if tuple(mask.shape) != tuple(w.shape):
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(w.shape)}")
            w = w * mask.to(device=w.device, dtype=w.dtype)
    # a transformers Conv1D (GPT-2) stores its weight as (in, out): already the (left, right) layout
    unfolded = w if isinstance(layer, nn.Module) and is_conv1d(layer) else unfold_weight(w)
    weights = unfolded.abs().float().contiguous()
    return BipartiteGraph((weights != 0).float(), weights, name, tuple(w.shape))


def prunable_modules(
    model: nn.Module, types: tuple[type[nn.Module], ...] = GRAPH_MODULE_TYPES, exclude: tuple[str, ...] = ()
) -> dict[str, nn.Module]:
    """``{name: module}`` of the model's Linear/Conv2d modules (or ``types``), in registration
    order, leaving out those whose name contains a string of ``exclude``. With ``nn.Linear`` in
    ``types``, ``transformers`` ``Conv1D`` layers (GPT-2's linear layers, weight stored transposed)
    are included too."""
    conv1d = nn.Linear in types
    return {
        name: m
        for name, m in model.named_modules()
        if (isinstance(m, types) or (conv1d and is_conv1d(m))) and not any(e in name for e in exclude)
    }


def model_graphs(
    model: nn.Module,
    masks: dict[str, Tensor] | None = None,
    types: tuple[type[nn.Module], ...] = GRAPH_MODULE_TYPES,
    exclude: tuple[str, ...] = (),
) -> dict[str, BipartiteGraph]:
    """One :class:`BipartiteGraph` per Linear/Conv2d module of ``model``.

    Args:
        model (nn.Module): the model (``torch.nn.utils.prune`` reparametrizations are read).
        masks (dict, optional): ``{module name: mask}``; modules without an entry use their
            (effective) weight as is.
        types: the module types to include. Default Linear and Conv2d.
        exclude: module-name fragments to leave out (e.g. ``("lm_head",)``).
    """
    masks = masks or {}
    mods = prunable_modules(model, types, exclude)
    unknown = set(masks) - set(mods)
    if unknown:
        raise ValueError(f"masks name modules that are not scored layers: {sorted(unknown)}")
    return {name: layer_graph(m, masks.get(name), name) for name, m in mods.items()}
