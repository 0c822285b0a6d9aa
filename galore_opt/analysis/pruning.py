"""Pruning at initialization (PaI) and masks that stay applied through training.

Scores (one per weight of every Linear/Conv2d module; biases and norms are never pruned):

* ``random``: i.i.d. uniform scores (uniform density per layer by default).
* ``magnitude``: ``|theta|``.
* ``snip``: ``|theta * dL/dtheta|``, gradients summed over the batches given, normalized by the
  total (Lee et al., ICLR 2019).
* ``iterative_snip``: SNIP recomputed on the masked network for ``rounds`` rounds with densities
  ``density^(k / rounds)`` (de Jorge et al., ICLR 2021).
* ``grasp``: ``theta * (H g)`` with the logits divided by ``temperature`` (200); the highest are
  kept (Wang et al., ICLR 2020).
* ``synflow``: ``|theta * dR/dtheta|`` on a copy with ``|theta|`` and an all-ones input,
  ``R = sum(output)``, ``rounds`` (100) rounds with an exponential schedule; data-free (Tanaka et
  al., NeurIPS 2020). Computed in float64 so that 100 rounds of products do not overflow.
* ``erk``: Erdős–Rényi-Kernel layer densities ``eps * (c_out + c_in + kh + kw) / (c_out c_in kh
  kw)``, ``eps`` solved so that the global density is met with layers capped at dense (Evci et
  al., ICML 2020); random positions within each layer.
* :func:`iterative_magnitude_pruning`: train, prune 20% of the surviving weights by magnitude,
  rewind the weights, repeat (Frankle & Carbin, ICLR 2019; rewinding: Frankle et al., ICML 2020).

**Conventions.** ``prune_at_init(..., convention="authors")`` (the default) follows the
authors' code where it differs from a plain top-k:

* ``synflow``: Synaptic-Flow's ``Pruner._global_mask`` / ``_local_mask`` each round: with
  ``k = int((1 - d_k) n)`` (``d_k = density^(k / rounds)``, ``n`` all weights in scope, pruned ones
  included), the weights whose score is ``<= kthvalue(scores, k)`` are pruned, so a round keeps
  ``n - k`` weights without ties (one more than ``round(d_k n)`` whenever ``d_k n`` has a fraction
  below one half) and fewer when scores tie at the threshold.
* ``grasp``: GraSP's own repository (``pruner/GraSP.py``): scored on a copy in *train* mode
  (BatchNorm uses the batch statistics), each batch given split in two halves as its
  ``GraSP_fetch_data`` batch is, scores divided by ``|sum| + 1e-10``; ``num_rm = int(n (1 -
  keep_ratio))`` weights with the lowest scores are removed but the one at the threshold is kept
  (``<=`` on the negated scores): ``n - num_rm + 1`` weights without ties. Its optional Xavier
  re-initialisation of the Linear layers before scoring (on by default there, and random) is
  ``grasp_reinit_linear=True``.

``convention="library"`` keeps this library's own rule for both: exactly ``floor(density * n +
1/2)`` weights (``n`` the number of weights in scope: all layers for ``scope="global"``, each
layer for ``"layerwise"``), ranked by a *stable* descending sort of the scores, so among equal
scores the one that comes first (earlier layer in registration order, then lower flat index) is
kept; NaN scores rank last; GraSP scored in eval mode on the whole batches (Synaptic-Flow's
variant). The other methods (random, magnitude, snip, iterative_snip, erk) always use that exact
count; ERK distributes the rounding over layers by largest remainder so the global count is exact
too. Scores other than GraSP's are computed in eval mode; the model's training mode is restored
afterwards.

**Keeping masks.** :class:`MaskKeeper` zeroes the masked gradients (tensor hooks) and re-applies
the masks after every ``optimizer.step()`` (an optimizer step post-hook). The zeroed gradients
alone are not enough under GaLore: its update is a low-rank projection back to full size, dense
even when the gradient is sparse, so the weights are re-zeroed after each step. Pruned weights
are *exactly* zero after every step with any ``torch.optim.Optimizer``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .graphs import GRAPH_MODULE_TYPES, prunable_modules

__all__ = [
    "CONVENTIONS",
    "PAI_METHODS",
    "RULES",
    "MaskKeeper",
    "apply_masks",
    "erk_densities",
    "grasp_scores",
    "iterative_magnitude_pruning",
    "magnitude_scores",
    "mask_density",
    "masks_from_scores",
    "prune_at_init",
    "random_scores",
    "snip_scores",
    "synflow_scores",
    "to_torch_prune",
]

PAI_METHODS = ("random", "magnitude", "snip", "iterative_snip", "grasp", "synflow", "erk")
SCOPES = ("global", "layerwise")
#: ``"authors"``: Synaptic-Flow's per-round rounding for synflow, GraSP's repository for grasp
#: (default); ``"library"``: exact counts and eval-mode GraSP (see the module docstring)
CONVENTIONS = ("authors", "library")
#: ``masks_from_scores`` rules: exact count, Synaptic-Flow's kthvalue threshold, GraSP's threshold
RULES = ("exact", "synaptic_flow", "grasp")
GRASP_EPS = 1e-10


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


# --- helpers ------------------------------------------------------------------------------------


def _check_density(density: float) -> None:
    if not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")


def _exact_count(density: float, n: int) -> int:
    return min(n, int(math.floor(density * n + 0.5)))


def _weight(module: nn.Module) -> Tensor:
    """The trainable weight tensor (``weight_orig`` under a ``torch.nn.utils.prune`` reparam)."""
    return module.weight_orig if hasattr(module, "weight_orig") else module.weight


def _modules(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    mods = prunable_modules(model, GRAPH_MODULE_TYPES, exclude)
    if not mods:
        raise ValueError("the model has no Linear/Conv2d modules to prune")
    return mods


class _ScoringMode:
    """Eval mode and masked weights for the duration of a scoring pass; restores both."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], masks: dict[str, Tensor] | None):
        self.model, self.modules, self.masks = model, modules, masks or {}

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.saved = {}
        with torch.no_grad():
            for name, mask in self.masks.items():
                w = _weight(self.modules[name])
                self.saved[name] = w.detach().clone()
                w.mul_(mask.to(w.dtype))
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for name, original in self.saved.items():
                _weight(self.modules[name]).copy_(original)
        self.model.train(self.was_training)


def _as_batches(data: Iterable[Batch] | Batch | None, method: str) -> list[Batch]:
    if data is None:
        raise ValueError(f"method {method!r} needs data: an iterable of (inputs, targets) batches")
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        return [data]
    batches = list(data)
    if not batches:
        raise ValueError(f"method {method!r} got no batches")
    return batches


# --- scores -------------------------------------------------------------------------------------


def random_scores(model: nn.Module, exclude: tuple[str, ...] = (), generator: torch.Generator | None = None):
    """I.i.d. uniform scores for every prunable weight."""
    return {
        n: torch.rand(_weight(m).shape, generator=generator).to(_weight(m).device)
        for n, m in _modules(model, exclude).items()
    }


def magnitude_scores(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """``|theta|`` of every prunable weight."""
    return {n: _weight(m).detach().abs().clone() for n, m in _modules(model, exclude).items()}


def snip_scores(
    model: nn.Module,
    data: Iterable[Batch] | Batch,
    loss_fn: LossFn = F.cross_entropy,
    exclude: tuple[str, ...] = (),
    masks: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """SNIP connection sensitivity ``|theta * g|``, ``g = sum_batches dL/dtheta``, normalized to
    sum 1; with ``masks`` the network is masked while scoring (``theta`` the masked weights).

    Args:
        model (nn.Module): the network; scored in eval mode.
        data: ``(inputs, targets)`` or an iterable of such batches.
        loss_fn: ``loss_fn(model(inputs), targets)``. Default cross entropy.
        exclude: module-name fragments not pruned.
        masks (dict, optional): current masks.

    Reference: Lee, Ajanthan, Torr. "SNIP: Single-shot Network Pruning based on Connection
    Sensitivity", ICLR 2019.
    """
    mods = _modules(model, exclude)
    batches = _as_batches(data, "snip")
    weights = [_weight(m) for m in mods.values()]
    grads = [torch.zeros_like(w) for w in weights]
    with _ScoringMode(model, mods, masks), torch.enable_grad():
        for x, y in batches:
            loss = loss_fn(model(x), y)
            for acc, g in zip(grads, torch.autograd.grad(loss, weights)):
                acc.add_(g)
        scores = {n: (w.detach() * g).abs() for n, w, g in zip(mods, weights, grads)}
    total = sum(s.sum() for s in scores.values())
    if total > 0:
        scores = {n: s / total for n, s in scores.items()}
    return scores


def grasp_scores(
    model: nn.Module,
    data: Iterable[Batch] | Batch,
    loss_fn: LossFn = F.cross_entropy,
    exclude: tuple[str, ...] = (),
    temperature: float = 200.0,
    convention: str = "authors",
    reinit_linear: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """GraSP scores ``theta * (H g)``: ``g`` the gradient of the loss on ``logits / temperature``
    summed over the batches, ``H g`` its Hessian-vector product; the highest scores are kept.

    Args:
        model (nn.Module): the network (not modified).
        data: ``(inputs, targets)`` or an iterable of such batches.
        loss_fn: the loss. Default cross entropy.
        exclude: module-name fragments not pruned.
        temperature (float): logit temperature ``T``. Default 200.
        convention (str): ``"authors"`` (default), as GraSP's repository: a copy of the model in
            train mode (BatchNorm on batch statistics), every batch split into its two halves
            ``[:N//2]`` and ``[N//2:]`` (``g`` and ``H g`` summed over the halves), scores divided
            by ``|sum| + 1e-10``. ``"library"``: the model in eval mode, whole batches, divided by
            ``|sum|`` (Synaptic-Flow's variant).
        reinit_linear (bool): re-initialize the copy's Linear weights with Xavier-normal before
            scoring, as GraSP's repository does by default (``reinit=True``); the scores then use
            those weights while the masks apply to the model's own. Default False.
        generator (torch.Generator, optional): for ``reinit_linear``.

    Reference: Wang, Zhang, Grosse. "Picking Winning Tickets Before Training by Preserving
    Gradient Flow", ICLR 2020 (code: alecwangcq/GraSP).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    _check_convention(convention)
    mods = _modules(model, exclude)
    batches = _as_batches(data, "grasp")
    if convention == "authors":
        halves = []
        for x, y in batches:
            n = x.shape[0]
            halves += [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]
        batches = [(x, y) for x, y in halves if x.shape[0] > 0]
        net = copy.deepcopy(model).train()
        net_mods = dict(net.named_modules())
        scored = {n: net_mods[n] for n in mods}
        if reinit_linear:
            with torch.no_grad():
                for m in scored.values():
                    if isinstance(m, nn.Linear):
                        nn.init.xavier_normal_(_weight(m), generator=generator)
        context: Any = torch.enable_grad()
    else:
        net, scored = model, mods
        if reinit_linear:
            raise ValueError("reinit_linear=True is part of convention='authors', got convention='library'")
        context = _ScoringMode(model, mods, None)
    weights = [_weight(m) for m in scored.values()]
    with context, torch.enable_grad():
        g = [torch.zeros_like(w) for w in weights]
        for x, y in batches:
            loss = loss_fn(net(x) / temperature, y)
            for acc, gi in zip(g, torch.autograd.grad(loss, weights)):
                acc.add_(gi)
        hg = [torch.zeros_like(w) for w in weights]
        for x, y in batches:
            loss = loss_fn(net(x) / temperature, y)
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            z = sum((gi * g0).sum() for gi, g0 in zip(grads, g))
            for acc, h in zip(hg, torch.autograd.grad(z, weights)):
                acc.add_(h)
        scores = {n: w.detach() * h for n, w, h in zip(mods, weights, hg)}
    total = abs(sum(s.sum() for s in scores.values()))
    if convention == "authors":
        return {n: s / (total + GRASP_EPS) for n, s in scores.items()}
    if total > 0:
        scores = {n: s / total for n, s in scores.items()}
    return scores


def synflow_scores(
    model: nn.Module,
    input_shape: tuple[int, ...],
    exclude: tuple[str, ...] = (),
    masks: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """One round of SynFlow scores ``|theta * dR/dtheta|``: on a float64 copy of the model in eval
    mode with every parameter and buffer replaced by its absolute value (and masked), ``R`` is the
    sum of the output for an all-ones input of shape ``(1, *input_shape)``.

    Reference: Tanaka, Kunin, Yamins, Ganguli. "Pruning neural networks without any data by
    iteratively conserving synaptic flow", NeurIPS 2020.
    """
    mods = _modules(model, exclude)
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    net_mods = dict(net.named_modules())
    weights = [_weight(net_mods[n]) for n in mods]
    with torch.no_grad():
        for n, w in zip(mods, weights):
            if masks and n in masks:
                w.mul_(masks[n].to(w.dtype))
    device = weights[0].device
    x = torch.ones((1, *input_shape), dtype=torch.float64, device=device)
    with torch.enable_grad():
        r = net(x).sum()
        grads = torch.autograd.grad(r, weights)
    return {n: (w.detach() * g).abs().to(_weight(mods[n]).dtype) for n, w, g in zip(mods, weights, grads)}


# --- from scores to masks -----------------------------------------------------------------------


def _topk_mask(flat: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest entries; stable (earlier index wins ties), NaN last."""
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k <= 0:
        return keep
    s = torch.nan_to_num(flat.double(), nan=-math.inf)
    order = torch.sort(s, descending=True, stable=True).indices
    keep[order[:k]] = True
    return keep


def _threshold_keep(flat: Tensor, density: float, rule: str) -> Tensor:
    """Boolean keep-mask of one score vector under the authors' threshold rules."""
    n = flat.numel()
    if rule == "synaptic_flow":
        # Synaptic-Flow Pruner._global_mask: prune score <= kthvalue(k), k = int((1 - d) n)
        k = int((1.0 - density) * n)
        if k < 1:
            return torch.ones(n, dtype=torch.bool, device=flat.device)
        threshold = torch.kthvalue(flat, k).values
        return flat > threshold
    # GraSP pruner/GraSP.py: remove int(n (1 - keep_ratio)) highest of -score, keep -score <= thr
    ratio = 1.0 - density
    keep_ratio = 1 - ratio
    num_rm = int(n * (1 - keep_ratio))
    if num_rm < 1:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    neg = -flat
    threshold = torch.topk(neg, num_rm, sorted=True).values[-1]
    return neg <= threshold


def masks_from_scores(
    scores: dict[str, Tensor],
    density: float,
    scope: str = "global",
    previous: dict[str, Tensor] | None = None,
    rule: str = "exact",
) -> dict[str, Tensor]:
    """Boolean masks keeping the highest scores at ``density``.

    Args:
        scores (dict): ``{module name: scores of the weight's shape}``.
        density (float): fraction kept, in ``(0, 1]``.
        scope (str): ``"global"`` (one ranking over all layers) or ``"layerwise"`` (each layer
            at ``density``).
        previous (dict, optional): current masks; weights they prune stay pruned (``"exact"``: their
            scores are treated as ``-inf``; the threshold rules keep only weights both masks keep).
        rule (str): ``"exact"`` (default): exactly ``floor(density * n + 1/2)`` weights, stable
            ties (see the module docstring); ``"synaptic_flow"``: Synaptic-Flow's ``score >
            kthvalue(scores, int((1 - density) n))`` on the scores as given (pruned weights
            included, so SynFlow's zero scores stay pruned); ``"grasp"``: GraSP's repository rule
            (the lowest ``int(n (1 - density))`` removed, the one at the threshold kept).
    """
    _check_density(density)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not scores:
        raise ValueError("scores is empty")
    if rule != "exact":
        raw = {n: s.detach() for n, s in scores.items()}
        if scope == "layerwise":
            out = {n: _threshold_keep(s.flatten(), density, rule).view(s.shape) for n, s in raw.items()}
        else:
            flat = torch.cat([s.flatten().cpu() for s in raw.values()])
            keep = _threshold_keep(flat, density, rule)
            out, start = {}, 0
            for n, s in raw.items():
                out[n] = keep[start : start + s.numel()].view(s.shape).to(s.device)
                start += s.numel()
        if previous is not None:
            out = {n: m & previous[n].bool() if n in previous else m for n, m in out.items()}
        return out
    prepared = {}
    for name, s in scores.items():
        s = s.detach().double()
        if previous is not None and name in previous:
            s = s.masked_fill(~previous[name].bool(), -math.inf)
        prepared[name] = s
    if scope == "layerwise":
        return {n: _topk_mask(s.flatten(), _exact_count(density, s.numel())).view(s.shape) for n, s in prepared.items()}
    flat = torch.cat([s.flatten().cpu() for s in prepared.values()])
    keep = _topk_mask(flat, _exact_count(density, flat.numel()))
    out, start = {}, 0
    for n, s in prepared.items():
        out[n] = keep[start : start + s.numel()].view(s.shape).to(s.device)
        start += s.numel()
    return out


def erk_densities(model: nn.Module, density: float, exclude: tuple[str, ...] = ()) -> dict[str, float]:
    """Erdős–Rényi-Kernel layer densities.

    ``d_l = eps * (c_out + c_in + kh + kw) / (c_out c_in kh kw)`` (Linear: ``(out + in) / (out in)``)
    with ``eps`` chosen so that ``sum_l d_l n_l = density * sum_l n_l``; a layer whose ``d_l`` would
    exceed 1 is made dense and ``eps`` is solved again over the others.

    Reference: Evci, Gale, Menick, Castro, Elsen. "Rigging the Lottery: Making All Tickets
    Winners", ICML 2020.
    """
    _check_density(density)
    mods = _modules(model, exclude)
    sizes, raw = {}, {}
    for n, m in mods.items():
        shape = _weight(m).shape
        sizes[n] = _weight(m).numel()
        raw[n] = sum(shape) / sizes[n]
    total = sum(sizes.values())
    dense: set[str] = set()
    while True:
        budget = density * total - sum(sizes[n] for n in dense)
        denom = sum(raw[n] * sizes[n] for n in mods if n not in dense)
        eps = budget / denom if denom > 0 else 0.0
        over = {n for n in mods if n not in dense and eps * raw[n] > 1.0}
        if not over:
            break
        dense |= over
    return {n: 1.0 if n in dense else eps * raw[n] for n in mods}


def _erk_masks(model: nn.Module, density: float, exclude, generator) -> dict[str, Tensor]:
    mods = _modules(model, exclude)
    dens = erk_densities(model, density, exclude)
    sizes = {n: _weight(m).numel() for n, m in mods.items()}
    exact = {n: dens[n] * sizes[n] for n in mods}
    counts = {n: min(sizes[n], int(math.floor(v))) for n, v in exact.items()}
    missing = _exact_count(density, sum(sizes.values())) - sum(counts.values())
    # largest remainder: the global count is exact
    for n in sorted(mods, key=lambda n: exact[n] - counts[n], reverse=True):
        if missing <= 0:
            break
        if counts[n] < sizes[n]:
            counts[n] += 1
            missing -= 1
    scores = random_scores(model, exclude, generator)
    return {n: _topk_mask(scores[n].flatten(), counts[n]).view(scores[n].shape) for n in mods}


def _iterative(score_fn, mods, density: float, rounds: int, scope: str, rule: str = "exact") -> dict[str, Tensor]:
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    masks = {n: torch.ones_like(_weight(m), dtype=torch.bool) for n, m in mods.items()}
    for k in range(1, rounds + 1):
        if rule == "exact":
            masks = masks_from_scores(score_fn(masks), density ** (k / rounds), scope, previous=masks)
        else:
            # Synaptic-Flow replaces the mask each round; the pruned weights' scores are 0 and so
            # at or below the threshold
            masks = masks_from_scores(score_fn(masks), density ** (k / rounds), scope, rule=rule)
    return masks


def prune_at_init(
    model: nn.Module,
    method: str,
    density: float,
    scope: str | None = None,
    data: Iterable[Batch] | Batch | None = None,
    loss_fn: LossFn = F.cross_entropy,
    input_shape: tuple[int, ...] | None = None,
    rounds: int | None = None,
    temperature: float = 200.0,
    exclude: tuple[str, ...] = (),
    generator: torch.Generator | None = None,
    convention: str = "authors",
    grasp_reinit_linear: bool = False,
) -> dict[str, Tensor]:
    """Masks of a pruning-at-initialization method (the model is not modified).

    Args:
        model (nn.Module): the network at initialization.
        method (str): one of :data:`PAI_METHODS`.
        density (float): fraction of weights kept, in ``(0, 1]``.
        scope (str, optional): ``"global"`` or ``"layerwise"``; default layerwise for ``random``,
            global otherwise (``erk`` sets its own layer densities and ignores it).
        data: ``(inputs, targets)`` batches, for snip, iterative_snip and grasp.
        loss_fn: the loss, ``loss_fn(model(x), y)``. Default cross entropy.
        input_shape (tuple): one input's shape without the batch dimension, for synflow.
        rounds (int, optional): iterative_snip (default 10) and synflow (default 100) rounds.
        temperature (float): GraSP's logit temperature. Default 200.
        exclude: module-name fragments left dense.
        generator (torch.Generator, optional): for random, erk and ``grasp_reinit_linear``.
        convention (str): ``"authors"`` (default): synflow rounds rounded as Synaptic-Flow does,
            grasp as its own repository runs it; ``"library"``: exact counts, eval-mode GraSP.
            The other methods do not depend on it. See the module docstring.
        grasp_reinit_linear (bool): GraSP repository's Xavier re-initialisation of the Linear
            layers before scoring (authors' convention only). Default False.

    Returns:
        ``{module name: bool mask of the weight's shape}`` (exactly ``density`` except under the
        authors' synflow and grasp rounding; see the module docstring).
    """
    _check_density(density)
    _check_convention(convention)
    if method not in PAI_METHODS:
        raise ValueError(f"method must be one of {PAI_METHODS}, got {method!r}")
    if scope is None:
        scope = "layerwise" if method == "random" else "global"
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    mods = _modules(model, exclude)
    if method == "random":
        return masks_from_scores(random_scores(model, exclude, generator), density, scope)
    if method == "magnitude":
        return masks_from_scores(magnitude_scores(model, exclude), density, scope)
    if method == "snip":
        return masks_from_scores(snip_scores(model, data, loss_fn, exclude), density, scope)
    if method == "grasp":
        scores = grasp_scores(model, data, loss_fn, exclude, temperature, convention, grasp_reinit_linear, generator)
        return masks_from_scores(scores, density, scope, rule="grasp" if convention == "authors" else "exact")
    if method == "erk":
        return _erk_masks(model, density, exclude, generator)
    if method == "iterative_snip":
        batches = _as_batches(data, method)
        return _iterative(
            lambda masks: snip_scores(model, batches, loss_fn, exclude, masks), mods, density, rounds or 10, scope
        )
    if input_shape is None:
        raise ValueError("method 'synflow' needs input_shape (one input's shape, without the batch dimension)")
    return _iterative(
        lambda masks: synflow_scores(model, tuple(input_shape), exclude, masks),
        mods,
        density,
        rounds or 100,
        scope,
        rule="synaptic_flow" if convention == "authors" else "exact",
    )


# --- applying and keeping masks -----------------------------------------------------------------


def mask_density(masks: dict[str, Tensor]) -> float:
    """Fraction of nonzero entries over all masks."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.count_nonzero()) for m in masks.values()) / total if total else float("nan")


def _resolve(model: nn.Module, masks: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    mods = dict(model.named_modules())
    out = {}
    for name, mask in masks.items():
        if name not in mods:
            raise ValueError(f"mask for unknown module {name!r}")
        w = _weight(mods[name])
        if tuple(mask.shape) != tuple(w.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, the weight {tuple(w.shape)}")
        out[name] = (w, mask.to(device=w.device).bool())
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Zero the masked weights in place (``masked_fill``, so pruned entries are exactly 0)."""
    for w, mask in _resolve(model, masks).values():
        w.masked_fill_(~mask, 0.0)


def to_torch_prune(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Install the masks as ``torch.nn.utils.prune`` reparametrizations (``weight_orig`` and
    ``weight_mask``). The forward then always uses masked weights, but ``weight_orig`` itself keeps
    receiving (dense, under GaLore) updates; use :class:`MaskKeeper` to keep the stored weights
    zero."""
    from torch.nn.utils import prune

    mods = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in mods:
            raise ValueError(f"mask for unknown module {name!r}")
        prune.custom_from_mask(mods[name], "weight", mask.to(_weight(mods[name]).device).float())


class MaskKeeper:
    """Keep pruned weights exactly zero through training, with any optimizer.

    On creation the masks are applied; each masked weight gets a gradient hook that zeroes the
    pruned entries of its gradient (so gradient-based state, e.g. GaLore's basis, sees only the
    surviving weights); :meth:`attach` registers an optimizer step post-hook that re-applies the
    masks after every ``optimizer.step()`` (needed under GaLore, whose update is dense, and with
    weight decay or momentum). With optimizer-in-backward (``galore_opt.layerwise``) there is no
    ``step()`` call: call :meth:`apply` after each backward.

    Args:
        model (nn.Module): the model.
        masks (dict): ``{module name: mask of the weight's shape}``.
        optimizer (torch.optim.Optimizer, optional): attached right away.
        zero_grads (bool): install the gradient hooks. Default True.

    Example::

        masks = prune_at_init(model, "snip", 0.1, data=[(x, y)])
        opt = GaLoreAdamW(galore_param_groups(model, rank=8), lr=1e-3)
        keeper = MaskKeeper(model, masks, opt)
        ...  # train as usual; keeper.remove() to stop
    """

    def __init__(
        self, model: nn.Module, masks: dict[str, Tensor], optimizer: Any = None, zero_grads: bool = True
    ) -> None:
        self.targets = _resolve(model, masks)
        self.masks = {n: m for n, (_, m) in self.targets.items()}
        self._handles: list[Any] = []
        self.apply()
        if zero_grads:
            for w, mask in self.targets.values():
                self._handles.append(w.register_hook(lambda g, m=mask: g.masked_fill(~m, 0.0)))
        if optimizer is not None:
            self.attach(optimizer)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights now."""
        for w, mask in self.targets.values():
            w.masked_fill_(~mask, 0.0)

    def attach(self, optimizer: Any) -> None:
        """Re-apply the masks after every ``optimizer.step()``."""
        self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply()))

    def max_pruned_magnitude(self) -> float:
        """The largest ``|w|`` over pruned positions (0.0 when the masks hold)."""
        vals = [w.detach()[~m].abs().max() for w, m in self.targets.values() if (~m).any()]
        return float(max(vals)) if vals else 0.0

    def density(self) -> float:
        return mask_density(self.masks)

    def remove(self) -> None:
        """Remove the hooks (the weights stay as they are)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> MaskKeeper:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def iterative_magnitude_pruning(
    model: nn.Module,
    train_fn: Callable[[nn.Module, dict[str, Tensor]], None],
    density: float,
    prune_rate: float = 0.2,
    rewind_state: dict[str, Tensor] | None = None,
    scope: str = "global",
    exclude: tuple[str, ...] = (),
) -> dict[str, Tensor]:
    """Iterative magnitude pruning with rewinding (lottery tickets).

    Each round: ``train_fn(model, masks)`` trains the masked model (it should keep the masks, e.g.
    with :class:`MaskKeeper`); the surviving weights with the smallest magnitude are pruned so that
    ``prune_rate`` of them go (the last round stops exactly at ``density``); the weights are
    rewound to ``rewind_state`` (default: the model's state when called, i.e. initialization;
    pass a state saved at step k for late rewinding) and the masks applied. On return the model
    holds the rewound, masked weights.

    Args:
        model (nn.Module): the model.
        train_fn (callable): ``train_fn(model, masks) -> None``.
        density (float): final density in ``(0, 1]``.
        prune_rate (float): fraction of surviving weights pruned per round. Default 0.2.
        rewind_state (dict, optional): the ``state_dict`` to rewind to.
        scope (str): ``"global"`` or ``"layerwise"``.
        exclude: module-name fragments left dense.

    Returns:
        The final masks.

    References: Frankle & Carbin, "The Lottery Ticket Hypothesis", ICLR 2019; Frankle, Dziugaite,
    Roy, Carbin, "Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020.
    """
    _check_density(density)
    if not 0.0 < prune_rate < 1.0:
        raise ValueError(f"prune_rate must be in (0, 1), got {prune_rate!r}")
    mods = _modules(model, exclude)
    rewind = copy.deepcopy(rewind_state if rewind_state is not None else model.state_dict())
    masks = {n: torch.ones_like(_weight(m), dtype=torch.bool) for n, m in mods.items()}
    current = 1.0
    while current > density + 1e-12:
        current = max(density, current * (1.0 - prune_rate))
        train_fn(model, masks)
        masks = masks_from_scores(magnitude_scores(model, exclude), current, scope, previous=masks)
        model.load_state_dict(rewind)
        apply_masks(model, masks)
    return masks
