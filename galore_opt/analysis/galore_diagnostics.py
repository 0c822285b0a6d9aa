"""Diagnostics of GaLore's own subspace: captured gradient energy, basis drift, suggestions.

For every projected matrix ``W`` with gradient ``G`` and basis ``P`` (left ``(m, r)``: ``P^T G``;
right ``(r, n)``: ``G P^T``; full: both):

* **captured energy** ``||project(G)||_F^2 / ||G||_F^2`` (:func:`galore_opt.projector.captured_energy`),
  recorded at the step where the basis is refreshed ("at refresh") and on the steps in between
  ("between refreshes", with a basis computed from an older gradient). The best any rank-``r``
  basis can do, ``sum_{i<=r} sigma_i(G)^2 / ||G||_F^2``, is recorded at refreshes, so the refresh
  method's own shortfall (e.g. the warm-started power iteration) shows up separately.
* **basis drift** between successive bases ``1 - ||P_old^T P_new||_F^2 / r`` (right bases:
  ``P_old P_new^T``): 0 for the same subspace (whatever the rotation within it), 1 for orthogonal
  subspaces; equivalently the mean of ``sin^2`` of the principal angles, which are reported too.
* **suggestions** in plain language when the numbers say the rank or the gap looks wrong (see
  :meth:`GaLoreDiagnostics.suggestions` for the rules and thresholds).

A refresh is detected by the stored basis tensor changing (the optimizer is not modified); the
first observation of a matrix counts as a refresh only on the optimizer's first step (cold
start), so a tracker attached mid-training starts with a between-refresh value. Call
:meth:`GaLoreDiagnostics.observe` after ``optimizer.step()`` and before ``zero_grad()``, or let
:meth:`GaLoreDiagnostics.attach` register an optimizer step post-hook that does it.

Layer-wise training (:class:`~galore_opt.layerwise.LayerwiseOptimizer`) frees every gradient
inside ``backward``, right after its update, so a step post-hook sees none: :meth:`attach` then
observes each parameter right after its own update instead (wrapping the inner optimizer's
``step_param`` on that instance). With gradient accumulation a GaLore matrix keeps only its
projected gradient between refreshes, so only the refresh steps (where the full sum is kept) are
observed there.

Reference: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
ICML 2024 (the projection); the diagnostics are galore-opt's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import config as C
from ..projector import captured_energy

__all__ = ["GaLoreDiagnostics", "basis_drift", "optimal_energy", "principal_angles", "unwrap_optimizer"]


def _as_columns(basis: Tensor, side: str) -> Tensor:
    """The basis as a matrix with orthonormal columns."""
    if side not in (C.LEFT, C.RIGHT):
        raise ValueError(f"side must be {C.LEFT!r} or {C.RIGHT!r}, got {side!r}")
    b = basis.detach().double()
    return b if side == C.LEFT else b.t()


def principal_angles(prev: Tensor, new: Tensor, side: str = C.LEFT) -> Tensor:
    """Principal angles (radians, ascending) between the subspaces of two bases of one side."""
    a, b = _as_columns(prev, side), _as_columns(new, side)
    if a.shape != b.shape:
        raise ValueError(f"bases have different shapes: {tuple(prev.shape)} and {tuple(new.shape)}")
    cos = torch.linalg.svdvals(a.t() @ b).clamp(-1.0, 1.0)
    return torch.arccos(cos).sort().values


def basis_drift(prev: Tensor, new: Tensor, side: str = C.LEFT) -> float:
    """``1 - ||P_old^T P_new||_F^2 / r`` in ``[0, 1]``: 0 for the same subspace, 1 for orthogonal."""
    a, b = _as_columns(prev, side), _as_columns(new, side)
    if a.shape != b.shape:
        raise ValueError(f"bases have different shapes: {tuple(prev.shape)} and {tuple(new.shape)}")
    r = a.shape[1]
    return float((1.0 - (a.t() @ b).square().sum() / r).clamp(0.0, 1.0))


def optimal_energy(grad: Tensor, rank: int) -> float:
    """``sum_{i<=rank} sigma_i(G)^2 / ||G||_F^2``: the most energy a rank-``rank`` basis captures."""
    s2 = torch.linalg.svdvals(grad.detach().double()).square()
    total = s2.sum()
    return 1.0 if total == 0 else float(s2[:rank].sum() / total)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer (through ``.optimizer`` wrappers such as accelerate's)."""
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


@dataclass
class _Track:
    name: str
    rank: int
    side: str
    bases: dict[str, Tensor] = field(default_factory=dict)
    refreshes: int = 0
    last_refresh_step: int = -1
    at_refresh: list[float] = field(default_factory=list)
    optimal: list[float] = field(default_factory=list)
    between: list[float] = field(default_factory=list)  # all steps between refreshes
    since_refresh: list[float] = field(default_factory=list)
    drift: list[float] = field(default_factory=list)
    max_angle_deg: list[float] = field(default_factory=list)
    latest: float = float("nan")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _is_layerwise(optimizer: Any) -> bool:
    return hasattr(optimizer, "optimizers") and hasattr(optimizer, "_owner")


def _span(values: list[float], fmt: str) -> str:
    """``"21%-38%"`` (or one value when they print the same), NaN left out."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}-{hi}"


class GaLoreDiagnostics:
    """Track the captured energy and the drift of every GaLore basis of an optimizer.

    Args:
        optimizer: a galore-opt optimizer (or a wrapper around one, see :func:`unwrap_optimizer`).
        model (nn.Module, optional): names the matrices by ``named_parameters``; otherwise
            ``"param{i}"``.
        with_optimal (bool): also record the optimal rank-``r`` energy at refreshes (one SVD of the
            gradient per refresh). Default True.
        low_energy (float): suggest a larger rank when the energy at refresh is below this.
            Default 0.5.
        high_energy (float): suggest a smaller rank when the energy at refresh is above this.
            Default 0.99.
        stale_ratio (float): suggest a smaller gap when between-refresh energy falls below this
            fraction of the at-refresh energy. Default 0.6.
        low_drift (float): suggest a larger gap when the drift stays below this (and energy holds).
            Default 0.02.
        high_drift (float): warn when successive subspaces are nearly orthogonal. Default 0.9.
        method_shortfall (float): flag the refresh method when at-refresh energy is below this
            fraction of the optimal energy. Default 0.9.
    """

    def __init__(
        self,
        optimizer: Any,
        model: nn.Module | None = None,
        with_optimal: bool = True,
        low_energy: float = 0.5,
        high_energy: float = 0.99,
        stale_ratio: float = 0.6,
        low_drift: float = 0.02,
        high_drift: float = 0.9,
        method_shortfall: float = 0.9,
    ) -> None:
        self.thresholds = dict(
            low_energy=low_energy,
            high_energy=high_energy,
            stale_ratio=stale_ratio,
            low_drift=low_drift,
            high_drift=high_drift,
            method_shortfall=method_shortfall,
        )
        for key, value in self.thresholds.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {value!r}")
        self.optimizer = unwrap_optimizer(optimizer)
        if not hasattr(self.optimizer, "param_groups") or not hasattr(self.optimizer, "state"):
            raise ValueError(f"{type(optimizer).__name__} is not a torch.optim.Optimizer")
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        self.params: list[tuple[Tensor, dict[str, Any], str]] = []
        i = 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if "rank" in group:
                    self.params.append((p, group, names.get(id(p), f"param{i}")))
                i += 1
        self._by_id = {id(p): (p, group, name) for p, group, name in self.params}
        self.with_optimal = with_optimal
        self.tracks: dict[str, _Track] = {}
        self.steps_observed = 0
        self.layerwise = _is_layerwise(self.optimizer)
        self._handle = None
        self._handles: list[Any] = []
        self._wrapped: list[Any] = []  # inner optimizers whose step_param is wrapped (layer-wise)

    def attach(self) -> GaLoreDiagnostics:
        """Observe automatically after every ``optimizer.step()`` (a step post-hook), or, for a
        layer-wise optimizer, after every parameter's update inside ``backward``."""
        if self._handle is not None or self._handles or self._wrapped:
            return self
        if not self.layerwise:
            self._handle = self.optimizer.register_step_post_hook(lambda opt, args, kwargs: self.observe())
            return self
        from ..optim.base import GaLoreOptimizer

        def count(opt, args, kwargs):
            self.steps_observed += 1

        self._handles.append(self.optimizer.register_step_post_hook(count))
        for inner in self.optimizer.optimizers:
            if isinstance(inner, GaLoreOptimizer) and type(inner).step_param is not GaLoreOptimizer.step_param:
                original = inner.step_param

                def step_param(p, low_rank_grad=None, _original=original):
                    _original(p, low_rank_grad=low_rank_grad)
                    if id(p) in self._by_id and p.grad is not None:
                        self._observe_one(*self._by_id[id(p)], p.grad)

                inner.step_param = step_param  # instance attribute: the class is untouched
                self._wrapped.append(inner)
            else:  # stepped through opt.step() with only this parameter's gradient visible
                self._handles.append(inner.register_step_post_hook(lambda opt, args, kwargs: self._observe_all()))
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for h in self._handles:
            h.remove()
        self._handles = []
        for inner in self._wrapped:
            del inner.step_param
        self._wrapped = []

    @torch.no_grad()
    def observe(self) -> dict[str, dict[str, float]]:
        """Record the current gradients against the current bases. Call after ``step()``.

        Returns:
            ``{name: {"captured_energy", "refreshed", ["drift"], ["optimal_energy"]}}`` for the
            matrices that have a gradient and a basis.
        """
        self.steps_observed += 1
        return self._observe_all()

    def _observe_all(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for p, group, name in self.params:
            if p.grad is not None:
                entry = self._observe_one(p, group, name, p.grad)
                if entry is not None:
                    out[name] = entry
        return out

    @torch.no_grad()
    def _observe_one(self, p: Tensor, group: dict[str, Any], name: str, grad: Tensor) -> dict[str, float] | None:
        """Record one matrix's gradient against its current basis (``None``: no basis yet)."""
        state = self.optimizer.state.get(p, {})
        left, right = state.get(C.BASIS_LEFT), state.get(C.BASIS_RIGHT)
        if left is None and right is None:
            return None
        g = grad if grad.dim() == 2 else grad.reshape(grad.shape[0], -1)
        g = g.float()
        bases = {k: v for k, v in ((C.LEFT, left), (C.RIGHT, right)) if v is not None}
        side = C.FULL if len(bases) == 2 else next(iter(bases))
        rank = min(b.shape[1] if k == C.LEFT else b.shape[0] for k, b in bases.items())
        track = self.tracks.get(name)
        if track is None:
            track = self.tracks[name] = _Track(name, rank, side)
        if not track.bases:
            # first sight: a refresh only if this was the optimizer's first step (cold start)
            refreshed = C.STEP in state and int(state[C.STEP].item()) == 1
            if not refreshed:
                track.bases = {k: b.detach().clone() for k, b in bases.items()}
        else:
            refreshed = any(
                track.bases[k].shape != b.shape or not torch.equal(track.bases[k], b) for k, b in bases.items()
            )
        energy = captured_energy(g, left, right)
        entry = {"captured_energy": energy, "refreshed": float(refreshed)}
        if refreshed:
            if track.bases:
                drifts = [basis_drift(track.bases[k], b, k) for k, b in bases.items()]
                angles = [principal_angles(track.bases[k], b, k).max() for k, b in bases.items()]
                track.drift.append(_mean(drifts))
                track.max_angle_deg.append(float(max(angles)) * 180 / math.pi)
                entry["drift"] = track.drift[-1]
            track.refreshes += 1
            track.last_refresh_step = self.steps_observed
            track.at_refresh.append(energy)
            track.since_refresh = []
            if self.with_optimal:
                track.optimal.append(optimal_energy(g, rank))
                entry["optimal_energy"] = track.optimal[-1]
            track.bases = {k: b.detach().clone() for k, b in bases.items()}
        else:
            track.between.append(energy)
            track.since_refresh.append(energy)
        track.latest = energy
        return entry

    def summary(self) -> dict[str, dict[str, float]]:
        """Per matrix: ``rank``, ``refreshes``, ``energy_at_refresh`` (mean), ``energy_between``
        (mean over non-refresh steps), ``energy_latest``, ``optimal_energy`` (mean),
        ``drift`` (mean), ``max_angle_deg`` (mean), plus ``"overall"`` means across matrices."""
        out: dict[str, dict[str, float]] = {}
        for name, t in self.tracks.items():
            out[name] = dict(
                rank=float(t.rank),
                refreshes=float(t.refreshes),
                energy_at_refresh=_mean(t.at_refresh),
                energy_between=_mean(t.between),
                energy_latest=t.latest,
                optimal_energy=_mean(t.optimal),
                drift=_mean(t.drift),
                max_angle_deg=_mean(t.max_angle_deg),
            )
        if out:
            keys = ("energy_at_refresh", "energy_between", "energy_latest", "optimal_energy", "drift")
            out["overall"] = {k: _mean([v[k] for v in out.values() if not math.isnan(v[k])]) for k in keys}
        return out

    def suggestions(self) -> list[str]:
        """Plain-language suggestions, one string per finding, e.g. ``"model.layers.0.mlp.up_proj.weight:
        rank 8 captures only 31% of the gradient energy right after a refresh ..."``.

        Rules (thresholds from the constructor):

        * energy at refresh < ``low_energy``: the gradient is not low-rank at this rank; raise it.
        * energy at refresh > ``high_energy``: a smaller rank would capture nearly as much.
        * energy between refreshes < ``stale_ratio`` x energy at refresh: the basis goes stale;
          shorten ``update_proj_gap``.
        * drift < ``low_drift`` (two or more refreshes) and between-refresh energy holds (ratio above
          0.9): the subspace barely moves; a longer gap saves refreshes.
        * drift > ``high_drift``: successive subspaces are nearly orthogonal, so the moments kept
          across a refresh are in the wrong coordinates; shorten the gap or raise the rank.
        * energy at refresh < ``method_shortfall`` x the optimal rank-r energy: the refresh method
          (e.g. one warm-started power iteration) lags the exact SVD; add ``power_iters`` or use
          ``proj_method="svd"``.
        """
        return [text for _rule, _name, text, _values in self._findings()]

    def grouped_suggestions(self) -> list[str]:
        """The same findings with one line per rule: a rule that fires for several matrices
        (typically every layer's copy of one projection) is one line naming how many, the first
        few, and the range of the numbers, e.g. ``"rank too small for 14 matrices
        (model.layers.0.mlp.up_proj.weight, ... ): 21%-38% of the gradient energy right after a
        refresh; the gradient is not low-rank at this rank: try a larger rank (e.g. 16)."``"""
        return [line for _rule, _names, line in self.grouped_findings()]

    def grouped_findings(self) -> list[tuple[str, tuple[str, ...], str]]:
        """``(rule, matrix names, line)`` per rule that fires (see :meth:`grouped_suggestions`)."""
        by_rule: dict[str, list[tuple[str, str, dict[str, float]]]] = {}
        for rule, name, text, values in self._findings():
            by_rule.setdefault(rule, []).append((name, text, values))
        out = []
        for rule, found in by_rule.items():
            names = [n for n, _, _ in found]
            if len(found) == 1:
                out.append((rule, tuple(names), found[0][1]))
                continue
            shown = ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")
            vals = {k: [v[k] for _, _, v in found] for k in found[0][2]}
            ranks = sorted({int(r) for r in vals["rank"]})
            rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
            detail = {
                "low_energy": f"rank {rank_text} captures only {_span(vals['at'], '.0%')} of the gradient energy "
                f"right after a refresh; the gradient is not low-rank at this rank: try a larger rank "
                f"(e.g. {2 * ranks[-1]})",
                "high_energy": f"rank {rank_text} captures {_span(vals['at'], '.1%')} of the gradient energy at "
                f"refresh; a smaller rank (e.g. {max(1, ranks[0] // 2)}) would likely capture nearly as much",
                "stale": f"captured energy falls from {_span(vals['at'], '.0%')} at refresh to "
                f"{_span(vals['between'], '.0%')} between refreshes; the basis goes stale: try a smaller "
                "update_proj_gap",
                "low_drift": f"successive bases barely move (drift {_span(vals['drift'], '.3f')}) and the energy "
                "holds; a larger update_proj_gap would save refreshes",
                "high_drift": f"successive bases are nearly orthogonal (drift {_span(vals['drift'], '.2f')}): try a "
                "smaller update_proj_gap or a larger rank",
                "method": f"the refreshed basis captures {_span(vals['at'], '.0%')} where the best basis captures "
                f"{_span(vals['optimal'], '.0%')}; the refresh method lags the exact SVD: raise power_iters or "
                "use proj_method='svd'",
            }[rule]
            out.append((rule, tuple(names), f"{len(names)} matrices ({shown}): {detail}."))
        return out

    def _findings(self) -> list[tuple[str, str, str, dict[str, float]]]:
        """``(rule, matrix name, text, numbers)`` for every rule that fires."""
        th = self.thresholds
        out: list[tuple[str, str, str, dict[str, float]]] = []
        for name, s in self.summary().items():
            if name == "overall":
                continue
            r, at, between, drift = int(s["rank"]), s["energy_at_refresh"], s["energy_between"], s["drift"]
            if math.isnan(at):
                continue
            values = dict(rank=float(r), at=at, between=between, drift=drift, optimal=s["optimal_energy"])
            if at < th["low_energy"]:
                out.append(
                    (
                        "low_energy",
                        name,
                        f"{name}: rank {r} captures only {at:.0%} of the gradient energy right after a refresh; "
                        f"the gradient is not low-rank at this rank: try a larger rank (e.g. {2 * r}).",
                        values,
                    )
                )
            elif at > th["high_energy"] and r > 1:
                out.append(
                    (
                        "high_energy",
                        name,
                        f"{name}: rank {r} captures {at:.1%} of the gradient energy at refresh; a smaller rank "
                        f"(e.g. {max(1, r // 2)}) would likely capture nearly as much for less memory.",
                        values,
                    )
                )
            if not math.isnan(between) and between < th["stale_ratio"] * at:
                out.append(
                    (
                        "stale",
                        name,
                        f"{name}: captured energy falls from {at:.0%} at refresh to {between:.0%} on average "
                        "between refreshes; the basis goes stale: try a smaller update_proj_gap.",
                        values,
                    )
                )
            if (
                not math.isnan(drift)
                and drift < th["low_drift"]
                and len(self.tracks[name].drift) >= 2
                and (math.isnan(between) or between >= 0.9 * at)
            ):
                out.append(
                    (
                        "low_drift",
                        name,
                        f"{name}: successive bases barely move (drift {drift:.3f}) and the energy holds between "
                        "refreshes; a larger update_proj_gap would save refreshes.",
                        values,
                    )
                )
            if not math.isnan(drift) and drift > th["high_drift"]:
                out.append(
                    (
                        "high_drift",
                        name,
                        f"{name}: successive bases are nearly orthogonal (drift {drift:.2f}); the moments carried "
                        "across a refresh no longer match the subspace: try a smaller update_proj_gap or a "
                        "larger rank.",
                        values,
                    )
                )
            opt = s["optimal_energy"]
            if not math.isnan(opt) and opt > 0 and at < th["method_shortfall"] * opt:
                out.append(
                    (
                        "method",
                        name,
                        f"{name}: the refreshed basis captures {at:.0%} where the best rank-{r} basis captures "
                        f"{opt:.0%}; the refresh method lags the exact SVD: raise power_iters or use "
                        "proj_method='svd'.",
                        values,
                    )
                )
        return out
