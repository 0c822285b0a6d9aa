"""Projection math for GaLore, in plain PyTorch (CPU and GPU).

A GaLore parameter ``W`` of shape ``(m, n)`` is updated in a rank-``r`` subspace of its gradient
``G``. The subspace is described by a basis with orthonormal columns (left, ``P`` of shape
``(m, r)``) or orthonormal rows (right, ``P`` of shape ``(r, n)``), or both (full)::

    left:  low = P^T G   (r, n)     back = P N
    right: low = G P^T   (m, r)     back = N P
    full:  low = L^T G R^T (r, r)   back = L N R

The side is chosen once from ``proj_type`` and the shape (:func:`choose_side`) and stored by the
optimizer as *which basis exists*; it is never inferred again from the shape of a low-rank tensor
(galore-torch re-infers it in ``project_back`` and fails on some square low-rank shapes).

Bases are computed in fp32 by one of three methods (:func:`compute_basis`):

* ``"svd"``: exact, ``torch.linalg.svd`` (what galore-torch does). ``O(m n min(m, n))``.
* ``"randomized"``: a randomized range finder (Halko, Martinsson & Tropp 2011) with ``oversample``
  extra columns and ``power_iters`` power iterations, then an SVD of the small ``(r + p, n)`` matrix.
* ``"power"``: one (or ``power_iters``) block subspace iteration warm-started from the previous
  basis, ``Y = G G^T P``, orthonormalized by QR (LDAdam-style). Two skinny matmuls: ``4 m n r``
  FLOPs. Without a previous basis it falls back to ``"randomized"``.

``align`` rotates a new basis within its own span towards the previous one, so that moments kept
across a refresh stay in nearly the same coordinates: column ``j`` of the aligned basis is the
previous column ``j`` projected onto the new span and orthonormalized against the columns before
it (Gram-Schmidt; an ``(r, r)`` QR). An unchanged span gives back the previous basis; otherwise the
rotation agrees with the orthogonal-Procrustes one (an ``(r, r)`` SVD, about 4x the time) to second
order in the principal angles between the old and new spans. It changes no subspace, hence no
captured energy.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from .config import FULL, LEFT, NONE, RIGHT

_MASK64 = (1 << 64) - 1


def refresh_seed(seed: int, param_index: int, step: int) -> int:
    """A 63-bit seed from (optimizer seed, parameter index, step), identical on every rank.

    SplitMix64 of the three numbers: randomized refreshes never touch the global RNG, so a resumed
    or distributed run draws the same test matrix as the uninterrupted single-process run.
    """
    z = (seed * 0x9E3779B97F4A7C15 + param_index * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB) & _MASK64
    for _ in range(2):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z & ((1 << 63) - 1)


def choose_side(shape: tuple[int, ...] | torch.Size, proj_type: str, rank: int, clip_rank: bool = False) -> str:
    """Which side of an ``(m, n)`` matrix is projected.

    ``std`` projects the smaller dimension (left when ``m < n``), ``reverse_std`` the larger, ``left``
    and ``right`` are explicit, ``full`` projects both. When ``rank >= min(m, n)`` a projection
    saves nothing: the parameter is updated in full (:data:`NONE`), unless ``clip_rank`` asks for
    galore-torch's behaviour (a full-size rotation from an SVD clipped to ``min(m, n)`` columns).
    """
    m, n = shape[0], shape[1]
    if rank >= min(m, n) and not clip_rank:
        return NONE
    if proj_type == "std":
        return RIGHT if m >= n else LEFT
    if proj_type == "reverse_std":
        return LEFT if m >= n else RIGHT
    if proj_type in (LEFT, RIGHT, FULL):
        return proj_type
    raise ValueError(f"Invalid proj_type: {proj_type!r}")


def project(grad: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """The low-rank gradient: ``L^T G``, ``G R^T`` or ``L^T G R^T``."""
    if left is not None:
        grad = left.t() @ grad
    if right is not None:
        grad = grad @ right.t()
    return grad


def project_back(low: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """Back to full size: ``L N``, ``N R`` or ``L N R`` (no scale applied)."""
    if left is not None:
        low = left @ low
    if right is not None:
        low = low @ right
    return low


def captured_energy(grad: Tensor, left: Tensor | None = None, right: Tensor | None = None) -> float:
    """Fraction of ``||G||_F^2`` that the basis keeps: ``||project(G)||_F^2 / ||G||_F^2``."""
    g = grad.float()
    total = g.square().sum()
    if total == 0:
        return 1.0
    low = project(g, None if left is None else left.float(), None if right is None else right.float())
    return float(low.square().sum() / total)


# --- basis computation (cold path, fp32) -------------------------------------------------------


def _orthonormalize(y: Tensor) -> Tensor:
    # Householder QR: orthonormal columns even when y is rank deficient (e.g. a zero gradient).
    return torch.linalg.qr(y, mode="reduced").Q


def _align(new: Tensor, prev: Tensor) -> Tensor:
    """``new @ W`` with ``W`` orthogonal such that ``(new W)^T prev`` is upper triangular with a
    non-negative diagonal (both with orthonormal columns): the Q factor of ``new new^T prev``, the
    previous columns projected onto the new span, Gram-Schmidt orthonormalized in order.

    ``M = new^T prev`` has the cosines of the principal angles as singular values; with ``M = W T``
    (Householder QR, so ``W`` is orthogonal even when ``M`` is singular, i.e. a previous direction
    left the span) the result is ``new W``. Same span, so same captured energy; ``prev`` itself
    when the span did not change."""
    w, t = torch.linalg.qr(new.t() @ prev.to(new.dtype))
    sign = torch.where(torch.diagonal(t) < 0, -1.0, 1.0).to(w.dtype)
    return new @ (w * sign)


def _left_svd(a: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :rank], vh[:rank]


def overflow_scale(max_abs: Tensor) -> Tensor:
    """A power of two ``s <= 1`` (an fp32 0-dim tensor on ``max_abs``'s device, computed there:
    no host sync) with ``s * max_abs < 1`` (< 4 past 2^126).

    Multiplying the skinny factor of each product with a gradient of that max-abs by ``s`` bounds
    the product by the matrix sizes, so a huge but finite gradient cannot overflow (``G G^T P``
    does from max-abs ~1e19 in fp32). A power of two scales exactly, and ``s = 1`` whenever
    ``max_abs < 1``: ordinary gradients compute exactly as without it. A non-finite ``max_abs``
    gives 1."""
    exponent = torch.frexp(max_abs.float()).exponent.clamp(0, 126)  # max_abs < 2**exponent
    return ((127 - exponent) << 23).to(torch.int32).view(torch.float32)  # 2**-exponent, by its bits


def _left_randomized(
    a: Tensor, rank: int, oversample: int, power_iters: int, generator: torch.Generator | None, scale: Tensor
) -> tuple[Tensor, Tensor]:
    m, n = a.shape
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, device=a.device, dtype=a.dtype, generator=generator)
    q = _orthonormalize(a @ (omega * scale))
    for _ in range(power_iters):
        q = _orthonormalize(a @ _orthonormalize(a.t() @ (q * scale)) * scale)
    # the singular vectors of s Q^T A are those of Q^T A
    ub, _, vh = torch.linalg.svd((q * scale).t() @ a, full_matrices=False)
    return q @ ub[:, :rank], vh[:rank]


def _left_power(a: Tensor, prev: Tensor, power_iters: int, first: Tensor | None, scale: Tensor) -> Tensor:
    """``power_iters`` block subspace iterations ``Q <- orth(A A^T Q)`` from ``prev``; ``first``, if
    given, is ``A^T prev`` already computed (the gradient projected with the previous basis).
    ``scale`` (:func:`overflow_scale`) multiplies each skinny factor: the span is unchanged."""
    q = prev.to(a.dtype)
    for i in range(max(power_iters, 1)):
        z = first if i == 0 and first is not None else a.t() @ (q * scale)
        q = _orthonormalize(a @ (z * scale))
    return q


def _random_orthonormal(rows: int, rank: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    return _orthonormalize(torch.randn(rows, rank, device=device, dtype=torch.float32, generator=generator))


def compute_basis(
    grad: Tensor,
    rank: int,
    side: str,
    method: str,
    *,
    prev_left: Tensor | None = None,
    prev_right: Tensor | None = None,
    power_iters: int | None = None,
    oversample: int = 8,
    seed: int = 0,
    align: bool = False,
    projected: Tensor | None = None,
    max_abs: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Compute the ``(left, right)`` fp32 bases of ``grad`` for ``side`` (one may be ``None``).

    Args:
        grad: the ``(m, n)`` gradient; any float dtype (computed in fp32). Must be finite: the
            optimizer keeps the previous basis when it is not (see ``GaLoreAdamW``).
        rank: columns of the basis; clipped to ``min(m, n)``.
        side: ``"left"``, ``"right"`` or ``"full"``.
        method: ``"svd"``, ``"randomized"`` or ``"power"``.
        prev_left, prev_right: the previous bases (warm start for ``"power"``, target of ``align``).
        power_iters: iterations; ``None`` takes the method's default (power 1, randomized 2).
        oversample: extra columns of the randomized range finder.
        seed: seeds the randomized test matrix (use :func:`refresh_seed`); the global RNG is
            never used.
        align: rotate the new bases towards the previous ones (see the module docstring).
        projected: ``grad`` projected with the previous basis, ``prev_left^T G`` (left) or
            ``G prev_right^T`` (right), in fp32: the power method's first product, which the
            optimizer already computed for its update, is then not computed again. Used by
            ``"power"`` with a previous basis on one side only; ignored by the other methods.
        max_abs: ``max |grad|`` if already computed (the optimizer computes it to check the
            gradient); it sets the power-of-two :func:`overflow_scale` of the ``"power"`` and
            ``"randomized"`` products. ``"svd"`` needs none (LAPACK scales its input itself).

    No value is read on the host: a CUDA refresh does not synchronize the device (a failed
    factorization raises where the backend checks its result, e.g. on the CPU). A failed SVD
    (ill-conditioned input, GaLore issue #58) falls back to the randomized method, and that to a
    random orthonormal basis; for a finite gradient the result is orthonormal and finite.
    """
    if side not in (LEFT, RIGHT, FULL):
        raise ValueError(f"compute_basis needs side 'left', 'right' or 'full', got {side!r}")
    a = grad.detach().float()
    m, n = a.shape
    rank = min(rank, m, n)
    generator = None
    if a.device.type != "meta" and not isinstance(a, FakeTensor):  # fake and meta tensors draw no numbers
        generator = torch.Generator(device=a.device)
        generator.manual_seed(seed)
    if power_iters is None:
        power_iters = {"power": 1, "randomized": 2, "svd": 0}[method]
    if max_abs is None:
        max_abs = torch.linalg.vector_norm(a, float("inf"))
    scale = overflow_scale(max_abs)

    def randomized(mat: Tensor) -> tuple[Tensor, Tensor]:
        try:
            return _left_randomized(
                mat, rank, oversample, power_iters if method == "randomized" else 2, generator, scale
            )
        except RuntimeError:  # torch.linalg.LinAlgError and friends
            rows, cols = mat.shape
            return (_random_orthonormal(rows, rank, mat.device, generator),
                    _random_orthonormal(cols, rank, mat.device, generator).t())

    def exact(mat: Tensor) -> tuple[Tensor, Tensor]:
        try:
            return _left_svd(mat, rank)
        except RuntimeError:
            return randomized(mat)

    left = right = None
    warm = {LEFT: prev_left is not None, RIGHT: prev_right is not None,
            FULL: prev_left is not None and prev_right is not None}[side]
    if projected is not None and method == "power" and warm:
        r_prev = (prev_left if side == LEFT else prev_right.t()).shape[1] if side != FULL else None
        want = {LEFT: (r_prev, n), RIGHT: (m, r_prev)}.get(side)
        if want is None or tuple(projected.shape) != want or projected.dtype != torch.float32:
            raise ValueError(
                f"compute_basis: projected must be the fp32 gradient projected with the previous basis, "
                f"shape {want} for side {side!r}; got {projected.dtype} {tuple(projected.shape)}"
                if want is not None else "compute_basis: projected is not supported with side 'full'"
            )
    else:
        projected = None
    if method == "power" and warm:
        if side in (LEFT, FULL):
            left = _left_power(a, prev_left, power_iters, None if projected is None else projected.t(), scale)
        if side in (RIGHT, FULL):
            right = _left_power(a.t(), prev_right.t(), power_iters, projected, scale).t()
    elif method == "svd":
        # svd of G itself, as galore-torch does: same singular vectors, same signs.
        u, vh = exact(a)
        left = u if side in (LEFT, FULL) else None
        right = vh if side in (RIGHT, FULL) else None
    elif side == RIGHT:
        # The range finder works on G^T so that its skinny side is the basis.
        right = randomized(a.t())[0].t()
    else:
        left, vh = randomized(a)
        right = vh if side == FULL else None
    if align:
        if left is not None and prev_left is not None:
            left = _align(left, prev_left)
        if right is not None and prev_right is not None:
            right = _align(right.t(), prev_right.t()).t()
    return _compact(left), _compact(right)


def _compact(x: Tensor | None) -> Tensor | None:
    """A copy with its own tight storage and ``x``'s strides.

    A slice such as ``U[:, :r]`` keeps all of ``U`` alive; ``.contiguous()`` would free it but
    change a column-major LAPACK result to row-major, and with it the BLAS call (and the last bits
    of every projection) compared with galore-torch, which keeps the slice as it is. The leading
    columns of a column-major matrix (or rows of a row-major one) are dense, so ``clone`` keeps
    their strides exactly (and a rank-1 slice keeps its own).
    """
    if x is None:
        return None
    return x.clone(memory_format=torch.preserve_format)


__all__ = [
    "FULL",
    "LEFT",
    "NONE",
    "RIGHT",
    "captured_energy",
    "choose_side",
    "compute_basis",
    "overflow_scale",
    "project",
    "project_back",
    "refresh_seed",
]
