"""Spectral (Ramanujan-graph) scores of sparse layers.

For one layer's bipartite graph (see :mod:`galore_opt.analysis.graphs`) with zero-degree nodes
dropped -- ``n_L``, ``n_R`` surviving nodes, mean degrees ``d_L = |E| / n_L``, ``d_R = |E| / n_R``:

* ``mu0 = sigma_1(B)`` and ``mu_hat = sigma_2(B)``, the two largest singular values of the 0/1
  biadjacency ``B``. (The symmetric adjacency ``[[0, B], [B^T, 0]]`` has eigenvalues ``+-sigma_k``,
  so ``mu_hat`` is its *third* largest absolute eigenvalue, not its second.)
* ``delta_r = sqrt(d_L - 1) + sqrt(d_R - 1) - mu_hat`` (bipartite Ramanujan bound), normalized by
  the bound; a layer with ``delta_r > 0`` is "Ramanujan".
* ``delta_s = 2 sqrt(mu0 - 1) - mu_hat``, normalized by ``2 sqrt(mu0 - 1)``; NaN when ``mu0 <= 1``.
  Both normalized gaps are exactly 1 for a complete bipartite graph.
* A layer is *scored* only when ``d_L >= 3`` and ``d_R >= 3``; otherwise its gaps are NaN and it
  is skipped in model averages.
* **IMDB**: the left nodes of the unfiltered layer grouped by degree; every degree ``> 0`` held by
  at least 3 left nodes gives a left-regular subgraph (that group and all right nodes), scored as
  above (filtering and gate included); IMDB is the mean normalized ``delta_r`` over the subgraphs
  that pass the gate.
* **NaRC** (the ICLR'23 code's formula, whole layer):
  ``[(mu_hat^2 / 4 + 1) sqrt(n_L n_R) - |E' - (d_L / dim_out) n_L n_R|] / (dim_in dim_out)`` with
  ``E' = 2|E|`` by default (the code counts both edge directions) or ``|E|``.
* **Weighted spectral gap**: ``lambda = sigma_1(|W M|) - sigma_2(|W M|)`` on the unfolded weights.
* **Full-spectrum coordinate**: ``(delta_r, lambda, IMDB_r, IMDB_lambda)`` with raw (unnormalized)
  gaps; the IMDB terms average, over the degree groups of at least 2 nodes, each left-regular
  subgraph's gap times ``c = max(|S|, n_R') / (|S| + n_R' - 1)`` (``n_R'`` the subgraph's
  surviving nodes on the other side). Its L2 norm is the layer's full-spectrum norm; the model
  score is the mean over layers.

**Conventions.** ``convention="authors"`` (the default everywhere) reproduces the authors' code:

* NaRC is computed only for layers that pass the ICLR'23 gate (both mean degrees >= 3; the
  ICLR'23 ``lib/graphs/scores.py::ramanujan_score`` returns no randomness factor otherwise), so
  the model mean averages the scored layers only.
* The weighted spectral gap and the full-spectrum coordinate use the NeurIPS'23 code's gate and
  orientation: its graph is built from the weight transposed twice, so its *left* nodes are the
  layer's outputs; a (sub)graph passes when the outputs' mean degree is >= 3 and the inputs' is
  > 1. The degree groups are groups of outputs; a group whose subgraph fails the gate is skipped
  (not averaged in); a layer failing the gate has ``lambda`` NaN (``weighted_gap``) and 0 terms in
  its coordinate.

``convention="library"`` keeps this library's earlier, more uniform definitions: NaRC for every
layer with an edge; ``lambda`` for every layer; full-spectrum groups of *inputs* with the ICLR'23
gate (both mean degrees >= 3), a failing subgraph counting 0 in the average (so a 2-node group,
whose other side has mean degree <= 2, always adds a 0).

Singular values: ``torch.linalg.svdvals`` in float64 when the smaller side is at most
``dense_limit`` (a 4608x512 unfolded conv layer takes about 0.2 s on one CPU core), otherwise
``torch.lobpcg`` for the two largest eigenvalues of the smaller Gram matrix.

References:
    Hoang, Liu, Marculescu, Wang. "Revisiting Pruning at Initialization through the Lens of
    Ramanujan Graph", ICLR 2023. Hoang, Kundu, Liu, Wang. "Don't just prune by magnitude! Your
    mask topology is a secret weapon", NeurIPS 2023 (code: VITA-Group/FullSpectrum-PAI).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from .graphs import BipartiteGraph, drop_isolated, layer_graph, model_graphs

__all__ = [
    "CONVENTIONS",
    "LayerScores",
    "full_spectrum",
    "imdb",
    "layer_scores",
    "model_scores",
    "narc",
    "spectral_gaps",
    "top_singular_values",
    "weighted_spectral_gap",
]

NAN = float("nan")
MIN_MEAN_DEGREE = 3.0
#: ``"authors"``: the published code's gates, orientation and averaging (default);
#: ``"library"``: this library's earlier uniform definitions (see the module docstring)
CONVENTIONS = ("authors", "library")


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def _neurips_gate(d_outputs: float, d_inputs: float) -> bool:
    """The NeurIPS'23 code's gate: outputs' mean degree >= 3 and inputs' > 1."""
    return d_outputs >= MIN_MEAN_DEGREE and d_inputs > 1.0


SOLVERS = ("auto", "svd", "gram", "lobpcg")


def top_singular_values(matrix: Tensor, k: int = 2, method: str = "auto", dense_limit: int = 2048) -> Tensor:
    """The ``k`` largest singular values of ``matrix`` (float64, descending, zero-padded).

    Args:
        matrix (Tensor): a 2-D tensor.
        k (int): how many. Default 2.
        method (str): ``"svd"`` (``torch.linalg.svdvals``), ``"gram"`` (``eigvalsh`` of the smaller
            Gram matrix), ``"lobpcg"`` (``torch.lobpcg`` on the Gram matrix) or ``"auto"``: svd when
            the smaller side is at most ``dense_limit``, lobpcg otherwise.
        dense_limit (int): see ``method``. Default 2048.
    """
    if method not in SOLVERS:
        raise ValueError(f"method must be one of {SOLVERS}, got {method!r}")
    if matrix.dim() != 2:
        raise ValueError(f"matrix must be 2-D, got shape {tuple(matrix.shape)}")
    a = matrix.detach().double()
    m, n = a.shape
    small = min(m, n)
    out = torch.zeros(k, dtype=torch.float64)
    if small == 0:
        return out
    if method == "auto":
        method = "svd" if small <= dense_limit else "lobpcg"
    if method == "lobpcg" and small < 3 * k + 1:
        method = "gram"
    if method == "svd":
        s = torch.linalg.svdvals(a)
    else:
        gram = a.t() @ a if n <= m else a @ a.t()
        if method == "gram":
            ev = torch.linalg.eigvalsh(gram).flip(0)
        else:
            gen = torch.Generator().manual_seed(0)
            x0 = torch.randn(small, k, dtype=torch.float64, generator=gen)
            ev, _ = torch.lobpcg(gram, k=k, X=x0, largest=True, tol=1e-9, niter=200)
            ev = ev.sort(descending=True).values
        s = ev.clamp_min(0).sqrt()
    s = s.cpu()[:k]
    out[: s.numel()] = s
    return out


def spectral_gaps(biadjacency: Tensor, method: str = "auto") -> dict[str, float]:
    """Ramanujan scores of one 0/1 biadjacency (zero-degree nodes dropped first).

    Returns:
        dict with ``n_left``, ``n_right``, ``edges``, ``d_left``, ``d_right``, ``scored`` (the gate
        ``d_left >= 3 and d_right >= 3``), ``mu0``, ``mu_hat``, ``bound_r``, ``delta_r``,
        ``delta_r_norm``, ``bound_s``, ``delta_s``, ``delta_s_norm``, ``ramanujan``. Gaps are NaN
        for a layer that fails the gate.
    """
    b, _, _ = drop_isolated((biadjacency != 0).double())
    n_l, n_r = b.shape
    edges = float(b.sum().item())
    d_l = edges / n_l if n_l else 0.0
    d_r = edges / n_r if n_r else 0.0
    s = top_singular_values(b, 2, method)
    mu0, mu_hat = float(s[0]), float(s[1])
    scored = d_l >= MIN_MEAN_DEGREE and d_r >= MIN_MEAN_DEGREE
    out = dict(n_left=n_l, n_right=n_r, edges=edges, d_left=d_l, d_right=d_r, scored=scored, mu0=mu0, mu_hat=mu_hat)
    if not scored:
        out.update(
            bound_r=NAN, delta_r=NAN, delta_r_norm=NAN, bound_s=NAN, delta_s=NAN, delta_s_norm=NAN, ramanujan=False
        )
        return out
    bound_r = math.sqrt(d_l - 1) + math.sqrt(d_r - 1)
    delta_r = bound_r - mu_hat
    if mu0 > 1:
        bound_s = 2 * math.sqrt(mu0 - 1)
        delta_s, delta_s_norm = bound_s - mu_hat, (bound_s - mu_hat) / bound_s
    else:
        bound_s = delta_s = delta_s_norm = NAN
    out.update(
        bound_r=bound_r,
        delta_r=delta_r,
        delta_r_norm=delta_r / bound_r,
        bound_s=bound_s,
        delta_s=delta_s,
        delta_s_norm=delta_s_norm,
        ramanujan=delta_r > 0,
    )
    return out


def _degree_groups(biadjacency: Tensor, min_group: int) -> list[Tensor]:
    """Row indices of the left nodes grouped by (nonzero) degree, groups of >= ``min_group``."""
    deg = (biadjacency != 0).sum(1)
    groups = []
    for d in torch.unique(deg).tolist():
        if d <= 0:
            continue
        idx = torch.nonzero(deg == d).flatten()
        if idx.numel() >= min_group:
            groups.append(idx)
    return groups


def imdb(biadjacency: Tensor, method: str = "auto", min_group: int = 3) -> float:
    """Iterative mean difference of bound: the mean normalized ``delta_r`` over the left-regular
    subgraphs (left nodes of one degree, all right nodes) that pass the gate; NaN if none does.

    Args:
        biadjacency (Tensor): the *unfiltered* ``(n_left, n_right)`` biadjacency.
        method (str): singular-value solver (see :func:`top_singular_values`).
        min_group (int): smallest group of left nodes that forms a subgraph. Default 3.
    """
    values = []
    for idx in _degree_groups(biadjacency, min_group):
        g = spectral_gaps(biadjacency[idx], method)
        if g["scored"]:
            values.append(g["delta_r_norm"])
    return sum(values) / len(values) if values else NAN


def narc(biadjacency: Tensor, edge_count: str = "double", method: str = "auto", convention: str = "authors") -> float:
    """Normalized random coefficient of one layer, as the ICLR'23 paper's code computes it.

    ``[(mu_hat^2/4 + 1) sqrt(n_L n_R) - |E' - (d_L / dim_out) n_L n_R|] / (dim_in dim_out)`` with
    ``n_L, n_R, d_L, mu_hat`` of the filtered graph and ``dim_in, dim_out`` the unfiltered sides.

    Args:
        biadjacency (Tensor): the unfiltered ``(dim_in, dim_out)`` biadjacency.
        edge_count (str): ``"double"`` (``E' = 2|E|``, the paper code's count, default) or
            ``"single"`` (``E' = |E|``).
        method (str): singular-value solver.
        convention (str): ``"authors"`` (default): NaN unless the layer passes the gate (both mean
            degrees >= 3), as in the paper's code; ``"library"``: computed for any layer with an
            edge.
    """
    if edge_count not in ("double", "single"):
        raise ValueError(f"edge_count must be 'double' or 'single', got {edge_count!r}")
    _check_convention(convention)
    dim_in, dim_out = biadjacency.shape
    g = spectral_gaps(biadjacency, method)
    if g["edges"] == 0 or (convention == "authors" and not g["scored"]):
        return NAN
    e = g["edges"] * (2 if edge_count == "double" else 1)
    n_l, n_r = g["n_left"], g["n_right"]
    value = (g["mu_hat"] ** 2 / 4 + 1) * math.sqrt(n_l * n_r) - abs(e - g["d_left"] / dim_out * n_l * n_r)
    return value / (dim_in * dim_out)


def _sigma_gap(weights: Tensor, method: str) -> float:
    s = top_singular_values(weights.abs(), 2, method)
    return float(s[0] - s[1])


def weighted_spectral_gap(weights: Tensor, method: str = "auto", convention: str = "authors") -> float:
    """``sigma_1(|W M|) - sigma_2(|W M|)`` of the unfolded ``(n_left, n_right)`` weights.

    Args:
        weights (Tensor): the unfolded effective weights (rows = inputs, columns = outputs, as
            :attr:`BipartiteGraph.weights`); zeros are pruned connections.
        method (str): singular-value solver.
        convention (str): ``"authors"`` (default): NaN when the layer fails the NeurIPS'23 code's
            gate (after dropping zero-degree nodes: outputs' mean degree >= 3 and inputs' > 1);
            ``"library"``: always computed.
    """
    _check_convention(convention)
    if convention == "authors":
        b, _, _ = drop_isolated((weights != 0).double())
        edges = float(b.sum())
        n_in, n_out = b.shape
        if edges == 0 or not _neurips_gate(edges / n_out, edges / n_in):
            return NAN
    return _sigma_gap(weights, method)


def _subgraph_gaps_library(graph: BipartiteGraph, idx: Tensor, method: str) -> tuple[float, float, float]:
    """(delta_r or 0, lambda or 0, c) of the left-regular subgraph on rows ``idx`` (ICLR gate)."""
    sub_b = graph.biadjacency[idx]
    g = spectral_gaps(sub_b, method)
    n_s, n_r = idx.numel(), g["n_right"]
    c = max(n_s, n_r) / (n_s + n_r - 1)
    if not g["scored"]:
        return 0.0, 0.0, c
    return g["delta_r"], _sigma_gap(graph.weights[idx], method), c


def _gate_and_delta_r_authors(b_out_in: Tensor, method: str) -> tuple[bool, float, int, int]:
    """On an ``(outputs, inputs)`` biadjacency: (passes the NeurIPS'23 gate, raw delta_r, n_out,
    n_in) after dropping zero-degree nodes."""
    g = spectral_gaps(b_out_in, method)
    d_out, d_in = g["d_left"], g["d_right"]
    if g["edges"] == 0 or not _neurips_gate(d_out, d_in):
        return False, NAN, g["n_left"], g["n_right"]
    return True, math.sqrt(d_out - 1) + math.sqrt(d_in - 1) - g["mu_hat"], g["n_left"], g["n_right"]


def _full_spectrum_authors(graph: BipartiteGraph, method: str, min_group: int) -> dict[str, float]:
    b = graph.biadjacency.t()  # (outputs, inputs): the authors' left side is the outputs
    w = graph.weights.t()
    ok, delta_r, _, _ = _gate_and_delta_r_authors(b, method)
    lam = _sigma_gap(w, method) if ok else 0.0
    delta_r = delta_r if ok else 0.0
    terms_r, terms_l = [], []
    for idx in _degree_groups(b, min_group):
        sub_ok, sub_dr, n_s, n_r = _gate_and_delta_r_authors(b[idx], method)
        if not sub_ok:
            continue  # skipped, not averaged in
        c = max(n_s, n_r) / (n_s + n_r - 1)
        terms_r.append(c * sub_dr)
        terms_l.append(c * _sigma_gap(w[idx], method))
    return _full_spectrum_result(delta_r, lam, terms_r, terms_l)


def _full_spectrum_result(delta_r: float, lam: float, terms_r: list[float], terms_l: list[float]) -> dict[str, float]:
    """The coordinate from the layer's gaps and its subgraphs' weighted terms (averaged; 0 if none)."""
    imdb_r = sum(terms_r) / len(terms_r) if terms_r else 0.0
    imdb_l = sum(terms_l) / len(terms_l) if terms_l else 0.0
    norm = math.sqrt(delta_r**2 + lam**2 + imdb_r**2 + imdb_l**2)
    return dict(
        fs_delta_r=delta_r,
        fs_lambda=lam,
        fs_imdb_r=imdb_r,
        fs_imdb_lambda=imdb_l,
        fs_norm=norm,
        fs_subgraphs=float(len(terms_r)),
    )


def full_spectrum(
    graph: BipartiteGraph, method: str = "auto", min_group: int = 2, convention: str = "authors"
) -> dict[str, float]:
    """The full-spectrum coordinate ``(delta_r, lambda, imdb_r, imdb_lambda)`` and its L2 norm.

    Raw gaps. ``convention="authors"`` (default), as the NeurIPS'23 code: outputs are the left
    side; gate outputs' mean degree >= 3 and inputs' > 1; output groups of >= ``min_group`` nodes of
    one degree; a subgraph failing the gate is skipped; a layer failing it has 0 for ``delta_r``
    and ``lambda``. ``convention="library"``: input groups, gate both >= 3, failures count 0.

    Returns:
        dict with ``fs_delta_r``, ``fs_lambda``, ``fs_imdb_r``, ``fs_imdb_lambda``, ``fs_norm`` and
        ``fs_subgraphs`` (number of subgraphs averaged).
    """
    _check_convention(convention)
    if convention == "authors":
        return _full_spectrum_authors(graph, method, min_group)
    g = spectral_gaps(graph.biadjacency, method)
    delta_r = g["delta_r"] if g["scored"] else 0.0
    lam = _sigma_gap(graph.weights, method) if g["scored"] else 0.0
    terms_r, terms_l = [], []
    for idx in _degree_groups(graph.biadjacency, min_group):
        dr, dl, c = _subgraph_gaps_library(graph, idx, method)
        terms_r.append(c * dr)
        terms_l.append(c * dl)
    return _full_spectrum_result(delta_r, lam, terms_r, terms_l)


@dataclass
class LayerScores:
    """Every score of one layer (NaN where undefined); ``to_dict`` for logging."""

    name: str
    dim_in: int
    dim_out: int
    density: float
    n_left: int
    n_right: int
    d_left: float
    d_right: float
    scored: bool
    mu0: float
    mu_hat: float
    delta_r: float
    delta_r_norm: float
    delta_s: float
    delta_s_norm: float
    ramanujan: bool
    imdb: float
    narc: float
    weighted_gap: float
    full_spectrum: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float]:
        d = asdict(self)
        fs = d.pop("full_spectrum")
        d.update(fs)
        return d


def layer_scores(
    layer: BipartiteGraph | nn.Module | Tensor,
    mask: Tensor | None = None,
    name: str = "",
    edge_count: str = "double",
    method: str = "auto",
    with_full_spectrum: bool = True,
    convention: str = "authors",
) -> LayerScores:
    """All scores of one layer.

    Args:
        layer: a :class:`BipartiteGraph`, a Linear/Conv2d module, or its weight tensor.
        mask (Tensor, optional): mask of the weight's shape (not with a graph).
        name (str): label.
        edge_count (str): NaRC's edge count, ``"double"`` (default) or ``"single"``.
        method (str): singular-value solver.
        with_full_spectrum (bool): also compute the full-spectrum coordinate. Default True.
        convention (str): ``"authors"`` (default) or ``"library"``, for NaRC, the weighted gap
            and the full-spectrum coordinate (see the module docstring).
    """
    _check_convention(convention)
    if isinstance(layer, BipartiteGraph):
        if mask is not None:
            raise ValueError("give a mask with a module or weight, not with a BipartiteGraph")
        graph = layer
    else:
        graph = layer_graph(layer, mask, name)
    b = graph.biadjacency
    g = spectral_gaps(b, method)
    return LayerScores(
        name=name or graph.name,
        dim_in=graph.dim_in,
        dim_out=graph.dim_out,
        density=graph.density,
        n_left=g["n_left"],
        n_right=g["n_right"],
        d_left=g["d_left"],
        d_right=g["d_right"],
        scored=g["scored"],
        mu0=g["mu0"],
        mu_hat=g["mu_hat"],
        delta_r=g["delta_r"],
        delta_r_norm=g["delta_r_norm"],
        delta_s=g["delta_s"],
        delta_s_norm=g["delta_s_norm"],
        ramanujan=g["ramanujan"],
        imdb=imdb(b, method),
        narc=narc(b, edge_count, method, convention),
        weighted_gap=weighted_spectral_gap(graph.weights, method, convention),
        full_spectrum=full_spectrum(graph, method, convention=convention) if with_full_spectrum else {},
    )


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else NAN


def model_scores(
    model: nn.Module,
    masks: dict[str, Tensor] | None = None,
    exclude: tuple[str, ...] = (),
    edge_count: str = "double",
    method: str = "auto",
    with_full_spectrum: bool = True,
    convention: str = "authors",
) -> dict[str, object]:
    """Per-layer scores of every Linear/Conv2d module and the model-level aggregates.

    Aggregates are NaN-skipping means (the papers' code averages a per-layer table the same way):
    ``delta_r``, ``delta_r_norm``, ``delta_s_norm`` over the scored layers; ``imdb`` over the
    layers with a passing subgraph; ``narc`` over the scored layers (``convention="library"``:
    over layers with edges); ``weighted_gap`` over the layers passing the NeurIPS'23 gate
    (``"library"``: all); ``fs_norm`` over all layers; and ``ramanujan_fraction`` (Ramanujan layers
    over scored layers), ``scored_layers``, ``empty_layers`` (layers with no edge left: the
    network is disconnected, which the means above cannot see), ``density`` (global).

    Args:
        model (nn.Module): the model; ``torch.nn.utils.prune`` reparametrizations are read.
        masks (dict, optional): ``{module name: mask}``.
        exclude: module-name fragments to leave out.
        edge_count, method, with_full_spectrum, convention: see :func:`layer_scores`.

    Returns:
        ``{"layers": {name: LayerScores.to_dict()}, **aggregates}``.
    """
    _check_convention(convention)
    graphs = model_graphs(model, masks, exclude=exclude)
    layers = {
        name: layer_scores(
            g, edge_count=edge_count, method=method, with_full_spectrum=with_full_spectrum, convention=convention
        )
        for name, g in graphs.items()
    }
    scored = [s for s in layers.values() if s.scored]
    total = sum(g.biadjacency.numel() for g in graphs.values())
    edges = sum(g.num_edges for g in graphs.values())
    agg: dict[str, object] = {
        "delta_r": _nanmean([s.delta_r for s in scored]),
        "delta_r_norm": _nanmean([s.delta_r_norm for s in scored]),
        "delta_s_norm": _nanmean([s.delta_s_norm for s in scored]),
        "imdb": _nanmean([s.imdb for s in layers.values()]),
        "narc": _nanmean([s.narc for s in layers.values()]),
        "weighted_gap": _nanmean([s.weighted_gap for s in layers.values()]),
        "ramanujan_fraction": (sum(s.ramanujan for s in scored) / len(scored)) if scored else NAN,
        "scored_layers": len(scored),
        "empty_layers": sum(g.num_edges == 0 for g in graphs.values()),
        "density": edges / total if total else NAN,
    }
    if with_full_spectrum:
        agg["fs_norm"] = _nanmean([s.full_spectrum["fs_norm"] for s in layers.values()])
    return {"layers": {n: s.to_dict() for n, s in layers.items()}, **agg}
