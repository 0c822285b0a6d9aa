"""Full-spectrum mask sampling for pruning at initialization.

Start from the masks a PaI method (SNIP or SynFlow) gives on all the data. Then draw a population
of candidate masks with the same method, each from ``batches_per_candidate`` random mini-batches
(SynFlow, being data-free, from the weights plus Gaussian noise). Layer by layer, a candidate's
mask replaces the current best when *both* its subgraph score and its full-spectrum norm are at
least the current best's (see :mod:`galore_opt.analysis.ramanujan`). Layers are swapped
independently, so the final global density can drift slightly from the target (global pruning
gives each candidate its own layer densities); it is reported.

``convention="authors"`` (default), as the NeurIPS'23 code: the subgraph score is the
full-spectrum coordinate's ``IMDB_r`` term (``fs_imdb_r``), both it and the norm under the
authors' full-spectrum convention; SNIP candidates use 4 mini-batches; SynFlow candidates add
noise at the scale of the initial weights (``noise_std = 1`` times each weight tensor's standard
deviation); the PaI masks themselves follow :func:`prune_at_init`'s authors' convention.
``convention="library"``: the ICLR'23 IMDB (an undefined IMDB counts as ``-inf``, so such a layer
is decided by the norm alone) with the library's full-spectrum convention, 2 mini-batches per
SNIP candidate, SynFlow noise ``0.01`` times the weights' standard deviation, exact-count masks.

Reference: Hoang, Kundu, Liu, Wang. "Don't just prune by magnitude! Your mask topology is a
secret weapon", NeurIPS 2023.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .graphs import layer_graph, prunable_modules
from .pruning import LossFn, mask_density, prune_at_init
from .ramanujan import CONVENTIONS, full_spectrum, imdb

__all__ = ["MaskSamplingResult", "full_spectrum_mask_sampling", "layer_topology_scores"]

SAMPLING_METHODS = ("snip", "synflow")


@dataclass
class MaskSamplingResult:
    """Outcome of :func:`full_spectrum_mask_sampling`.

    Attributes:
        masks: the final ``{module name: bool mask}``.
        density: their global density.
        target_density: the density asked for.
        initial_scores / final_scores: ``{module name: (subgraph score, fs_norm)}`` (subgraph
            score: ``fs_imdb_r`` under the authors' convention, the ICLR'23 IMDB otherwise).
        adopted: ``(candidate index, module name)`` of every layer swap.
    """

    masks: dict[str, Tensor]
    density: float
    target_density: float
    initial_scores: dict[str, tuple[float, float]]
    final_scores: dict[str, tuple[float, float]]
    adopted: list[tuple[int, str]] = field(default_factory=list)


def layer_topology_scores(module: nn.Module, mask: Tensor, convention: str = "authors") -> tuple[float, float]:
    """``(subgraph score, full-spectrum norm)`` of one masked layer.

    ``convention="authors"``: ``(fs_imdb_r, fs_norm)`` of the authors' full-spectrum coordinate;
    ``"library"``: ``(ICLR'23 IMDB, fs_norm)`` with the library's coordinate, an undefined IMDB
    being ``-inf``.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    graph = layer_graph(module, mask.float())
    fs = full_spectrum(graph, convention=convention)
    if convention == "authors":
        return fs["fs_imdb_r"], fs["fs_norm"]
    value = imdb(graph.biadjacency)
    return (value if not math.isnan(value) else -math.inf), fs["fs_norm"]


def full_spectrum_mask_sampling(
    model: nn.Module,
    density: float,
    method: str = "snip",
    data: list[tuple[Tensor, Tensor]] | None = None,
    loss_fn: LossFn = F.cross_entropy,
    input_shape: tuple[int, ...] | None = None,
    population: int = 20,
    batches_per_candidate: int | None = None,
    noise_std: float | None = None,
    rounds: int | None = None,
    scope: str = "global",
    exclude: tuple[str, ...] = (),
    generator: torch.Generator | None = None,
    convention: str = "authors",
) -> MaskSamplingResult:
    """Sample PaI masks and keep, per layer, the best by subgraph score and full-spectrum norm.

    Args:
        model (nn.Module): the network at initialization (not modified).
        density (float): target density in ``(0, 1]``.
        method (str): ``"snip"`` or ``"synflow"``.
        data (list): ``(inputs, targets)`` mini-batches (SNIP: the base mask uses all of them,
            each candidate ``batches_per_candidate`` drawn at random).
        loss_fn: SNIP's loss. Default cross entropy.
        input_shape (tuple): SynFlow's input shape (without the batch dimension).
        population (int): number of candidates. Default 20.
        batches_per_candidate (int, optional): mini-batches per SNIP candidate. Default 4 (authors)
            or 2 (library).
        noise_std (float, optional): SynFlow candidates' weight noise, relative to each weight
            tensor's standard deviation. Default 1.0 (authors: the scale of the initial weights)
            or 0.01 (library).
        rounds (int, optional): SynFlow rounds (default 100).
        scope (str): ``"global"`` or ``"layerwise"`` pruning for base and candidates.
        exclude: module-name fragments left dense.
        generator (torch.Generator, optional): draws the mini-batches and the noise.
        convention (str): ``"authors"`` (default) or ``"library"``; see the module docstring.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if batches_per_candidate is None:
        batches_per_candidate = 4 if convention == "authors" else 2
    if noise_std is None:
        noise_std = 1.0 if convention == "authors" else 0.01
    if method not in SAMPLING_METHODS:
        raise ValueError(f"method must be one of {SAMPLING_METHODS}, got {method!r}")
    if not isinstance(population, int) or population < 0:
        raise ValueError(f"population must be an int >= 0, got {population!r}")
    if not isinstance(batches_per_candidate, int) or batches_per_candidate < 1:
        raise ValueError(f"batches_per_candidate must be an int >= 1, got {batches_per_candidate!r}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    if method == "snip" and not data:
        raise ValueError("method 'snip' needs data: a list of (inputs, targets) mini-batches")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    kwargs: dict[str, Any] = dict(
        scope=scope, loss_fn=loss_fn, input_shape=input_shape, rounds=rounds, exclude=exclude, convention=convention
    )
    mods = prunable_modules(model, exclude=exclude)
    best = prune_at_init(model, method, density, data=data, **kwargs)
    best_scores = {n: layer_topology_scores(mods[n], best[n], convention) for n in best}
    initial = dict(best_scores)
    adopted: list[tuple[int, str]] = []
    for c in range(population):
        if method == "snip":
            idx = torch.randint(0, len(data), (batches_per_candidate,), generator=gen).tolist()
            cand = prune_at_init(model, method, density, data=[data[i] for i in idx], **kwargs)
        else:
            noisy = copy.deepcopy(model)
            with torch.no_grad():
                for m in prunable_modules(noisy, exclude=exclude).values():
                    w = m.weight
                    noise = torch.randn(w.shape, generator=gen).to(w.device, w.dtype)
                    w.add_(noise * noise_std * w.std())
            cand = prune_at_init(noisy, method, density, **kwargs)
        for n, mask in cand.items():
            sub, fs = layer_topology_scores(mods[n], mask, convention)
            b_sub, b_fs = best_scores[n]
            if sub >= b_sub and fs >= b_fs and not torch.equal(mask, best[n]):
                best[n], best_scores[n] = mask, (sub, fs)
                adopted.append((c, n))
    return MaskSamplingResult(
        masks=best,
        density=mask_density(best),
        target_density=density,
        initial_scores=initial,
        final_scores=best_scores,
        adopted=adopted,
    )
