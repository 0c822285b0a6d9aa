"""Projection math: bases, sides, energies, fallbacks."""

import pytest
import torch

from galore_opt import config as C
from galore_opt.projector import (
    captured_energy,
    choose_side,
    compute_basis,
    project,
    project_back,
    refresh_seed,
)


def _low_rank_plus_noise(m, n, k=6, noise=1e-3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    s = torch.linspace(10, 1, k)
    return (u * s) @ v.t() + noise * torch.randn(m, n, generator=gen)


@pytest.mark.parametrize(
    "shape,proj_type,rank,side",
    [
        ((8, 16), "std", 4, C.LEFT),
        ((16, 8), "std", 4, C.RIGHT),
        ((8, 8), "std", 4, C.RIGHT),
        ((8, 16), "reverse_std", 4, C.RIGHT),
        ((16, 8), "reverse_std", 4, C.LEFT),
        ((16, 8), "left", 4, C.LEFT),
        ((16, 8), "full", 4, C.FULL),
        ((16, 8), "std", 8, C.NONE),
    ],
)
def test_choose_side(shape, proj_type, rank, side):
    assert choose_side(shape, proj_type, rank) == side


def test_clip_rank_keeps_galore_torch_behaviour():
    assert choose_side((16, 8), "std", 8, clip_rank=True) == C.RIGHT


@pytest.mark.parametrize("method", ["svd", "randomized", "power"])
@pytest.mark.parametrize("side", [C.LEFT, C.RIGHT, C.FULL])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_bases_are_orthonormal_and_capture_the_dominant_subspace(method, side, shape):
    g = _low_rank_plus_noise(*shape)
    rank = 6
    prev_left = prev_right = None
    if method == "power":  # warm start from a perturbed exact basis
        el, er = compute_basis(g + 0.3 * torch.randn(shape), rank, side, "svd")
        prev_left, prev_right = el, er
    left, right = compute_basis(g, rank, side, method, prev_left=prev_left, prev_right=prev_right, seed=3)
    for basis, cols in ((left, True), (right, False)):
        if basis is None:
            continue
        q = basis if cols else basis.t()
        torch.testing.assert_close(q.t() @ q, torch.eye(rank), atol=1e-5, rtol=0)
    exact = captured_energy(g, *compute_basis(g, rank, side, "svd"))
    assert captured_energy(g, left, right) >= 0.999 * exact
    assert (left is None) == (side == C.RIGHT) and (right is None) == (side == C.LEFT)


def test_svd_basis_is_the_top_singular_vectors():
    g = _low_rank_plus_noise(20, 30)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    left, _ = compute_basis(g, 5, C.LEFT, "svd")
    _, right = compute_basis(g, 5, C.RIGHT, "svd")
    assert torch.equal(left, u[:, :5]) and torch.equal(right, vh[:5])
    assert captured_energy(g, left) == pytest.approx(float(s[:5].square().sum() / s.square().sum()), rel=1e-5)


def test_project_and_back_with_each_side():
    g = torch.randn(12, 20)
    left = torch.linalg.qr(torch.randn(12, 4)).Q
    right = torch.linalg.qr(torch.randn(20, 4)).Q.t()
    assert project(g, left, None).shape == (4, 20)
    assert project(g, None, right).shape == (12, 4)
    assert project(g, left, right).shape == (4, 4)
    torch.testing.assert_close(project_back(project(g, left, None), left, None), left @ left.t() @ g)
    torch.testing.assert_close(project_back(project(g, None, right), None, right), g @ right.t() @ right)


def test_align_rotates_within_the_span_towards_the_previous_basis():
    g = _low_rank_plus_noise(30, 50)
    prev, _ = compute_basis(g, 6, C.LEFT, "svd")
    # a sign-flipped, permuted copy of the same subspace is rotated back onto prev
    shuffled = prev[:, [3, 1, 0, 5, 2, 4]] * torch.tensor([1.0, -1, -1, 1, 1, -1])
    left, _ = compute_basis(g, 6, C.LEFT, "power", prev_left=shuffled, align=False)
    aligned, _ = compute_basis(g, 6, C.LEFT, "power", prev_left=prev, align=True)
    torch.testing.assert_close(aligned, prev, atol=1e-4, rtol=0)
    # alignment changes no subspace: same energy
    assert captured_energy(g, left) == pytest.approx(captured_energy(g, aligned), abs=1e-5)


@pytest.mark.parametrize("angle", [1e-3, 1e-2, 0.1, 1.0])
def test_align_is_gram_schmidt_of_the_projected_previous_basis(angle):
    """The aligned basis spans the new subspace, its overlap with the previous basis is upper
    triangular with a positive diagonal, and it agrees with the orthogonal-Procrustes rotation to
    second order in the principal angles."""
    from galore_opt.projector import _align

    torch.manual_seed(0)
    m, r = 40, 5
    basis = torch.linalg.qr(torch.randn(m, 2 * r, dtype=torch.float64)).Q
    prev = basis[:, :r]
    # tilt the span by about `angle` towards the complement (generic principal vectors), then
    # scramble its coordinates
    tilt = torch.randn(r, r, dtype=torch.float64) / r**0.5
    moved = prev + angle * basis[:, r:] @ tilt
    new = torch.linalg.qr(moved @ torch.linalg.qr(torch.randn(r, r, dtype=torch.float64)).Q).Q
    out = _align(new, prev)
    torch.testing.assert_close(out.t() @ out, torch.eye(r, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(out @ out.t(), new @ new.t(), atol=1e-12, rtol=0)  # same span
    t = out.t() @ prev
    torch.testing.assert_close(torch.tril(t, -1), torch.zeros_like(t), atol=1e-12, rtol=0)
    assert (torch.diagonal(t) > 0).all()
    u, _, vh = torch.linalg.svd(new.t() @ prev)
    procrustes = new @ (u @ vh)
    gap = float((out - procrustes).norm())
    assert gap <= 2 * angle**2, (gap, angle)  # measured: 0.93 angle^2
    assert float((new - procrustes).norm()) > 0.5  # unaligned, the coordinates are scrambled


def test_power_refresh_reuses_the_projected_gradient():
    g = _low_rank_plus_noise(30, 50)
    for side in (C.LEFT, C.RIGHT):
        a = g if side == C.LEFT else g.t().contiguous()
        cold = compute_basis(a, 6, side, "randomized", seed=1)
        prev_l, prev_r = cold
        low = prev_l.t() @ a if side == C.LEFT else a @ prev_r.t()
        kw = dict(prev_left=prev_l, prev_right=prev_r, align=True)
        base_l, base_r = compute_basis(a, 6, side, "power", **kw)
        got_l, got_r = compute_basis(a, 6, side, "power", projected=low, **kw)
        for x, y in ((base_l, got_l), (base_r, got_r)):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="projected"):
            compute_basis(a, 6, side, "power", projected=low.t().contiguous() if low.shape[0] != low.shape[1] else low[:1], **kw)
        with pytest.raises(ValueError, match="projected"):
            compute_basis(a, 6, side, "power", projected=low.double(), **kw)
        # other methods ignore it
        compute_basis(a, 6, side, "svd", projected=low, **kw)


def test_randomized_is_deterministic_in_its_seed_and_ignores_the_global_rng():
    g = torch.randn(30, 40)
    a = compute_basis(g, 5, C.LEFT, "randomized", seed=11)[0]
    torch.manual_seed(123)
    torch.randn(100)
    b = compute_basis(g, 5, C.LEFT, "randomized", seed=11)[0]
    c = compute_basis(g, 5, C.LEFT, "randomized", seed=12)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert refresh_seed(0, 3, 200) == refresh_seed(0, 3, 200) != refresh_seed(0, 4, 200)


def test_failed_svd_falls_back(monkeypatch):
    g = _low_rank_plus_noise(20, 30)

    def broken_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (ill-conditioned)")

    exact = captured_energy(g, *compute_basis(g, 4, C.LEFT, "svd"))
    monkeypatch.setattr(torch.linalg, "svd", broken_svd)
    left, _ = compute_basis(g, 4, C.LEFT, "svd")  # -> randomized -> random orthonormal
    torch.testing.assert_close(left.t() @ left, torch.eye(4), atol=1e-5, rtol=0)
    assert torch.isfinite(left).all()
    assert captured_energy(g, left) <= exact + 1e-6


def test_zero_gradient_gives_an_orthonormal_basis():
    for method in ("svd", "randomized"):
        left, _ = compute_basis(torch.zeros(10, 14), 3, C.LEFT, method)
        assert torch.isfinite(left).all()
    assert captured_energy(torch.zeros(4, 4), torch.eye(4)[:, :2]) == 1.0


def test_power_without_the_previous_basis_of_its_side_starts_cold():
    g = _low_rank_plus_noise(24, 40)
    left_only, _ = compute_basis(g, 4, C.FULL, "svd")
    left, right = compute_basis(g, 4, C.FULL, "power", prev_left=left_only)  # no prev_right: cold start
    assert left.shape == (24, 4) and right.shape == (4, 40)
    assert captured_energy(g, left, right) >= 0.99 * captured_energy(g, *compute_basis(g, 4, C.FULL, "svd"))
