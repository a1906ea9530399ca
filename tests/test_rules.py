"""Fast CPU checks of every update rule in mose_easyedit.rules on small seeded random matrices.

Each test asserts a property that a wrong formula would break (optimality, constraints, invariants).
"""
from __future__ import annotations

import math

import pytest
import torch

from mose_easyedit import rules

torch.set_num_threads(1)

OUT_DIM, IN_DIM, N_KEYS = 24, 48, 5
F64 = torch.float64


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_matrix(rows: int, cols: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(rows, cols, generator=generator(seed), dtype=F64)


def random_orthogonal(size: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(random_matrix(size, size, seed))
    return q * torch.sign(torch.diagonal(r))


def key_moment(size: int, seed: int, samples: int = 400) -> torch.Tensor:
    """An SPD uncentred second moment E[k kᵀ] (normalised mean) from random keys."""
    keys = random_matrix(size, samples, seed)
    return keys @ keys.T / samples


def edit_problem(seed: int = 0, n_keys: int = N_KEYS, residual_scale: float = 0.5):
    W = random_matrix(OUT_DIM, IN_DIM, seed, scale=IN_DIM ** -0.5)
    C = key_moment(IN_DIM, seed + 1)
    K = random_matrix(IN_DIM, n_keys, seed + 2)
    outputs = W @ K
    residual_size = residual_scale * outputs.norm(dim=0).mean() / OUT_DIM ** 0.5
    V = outputs + residual_size * random_matrix(OUT_DIM, n_keys, seed + 3)
    return W, C, K, V


def max_abs(value: torch.Tensor) -> float:
    return float(value.abs().max())


def identity(size: int) -> torch.Tensor:
    return torch.eye(size, dtype=F64)


# ---------------------------------------------------------------------------------------------- polar factor
def well_conditioned_square(seed: int, size: int = OUT_DIM) -> torch.Tensor:
    return random_matrix(size, size, seed) + 3.0 * identity(size)


@pytest.mark.parametrize("method", ["eigh", "newton_schulz"])
def test_polar_methods_agree_with_svd(method):
    for seed in range(3):
        M = well_conditioned_square(seed)
        reference = rules.polar_factor(M, "svd")
        assert max_abs(rules.polar_factor(M, method) - reference) <= 1e-6


def test_polar_svd_is_orthogonal_factor_of_m():
    M = well_conditioned_square(5)
    R = rules.polar_factor(M)
    assert max_abs(R.T @ R - identity(OUT_DIM)) < 1e-12
    symmetric_factor = R.T @ M  # M = R H with H symmetric positive definite
    assert max_abs(symmetric_factor - symmetric_factor.T) < 1e-10
    assert float(torch.linalg.eigvalsh(0.5 * (symmetric_factor + symmetric_factor.T))[0]) > 0


def test_newton_schulz_warm_start_converges_to_the_same_rotation():
    M = well_conditioned_square(7)
    reference = rules.polar_factor(M, "svd")
    previous = rules.polar_factor(M + 0.05 * random_matrix(OUT_DIM, OUT_DIM, 8), "svd")
    warm = rules.polar_factor(M, "newton_schulz", init=previous)
    assert max_abs(warm - reference) <= 1e-6
    # a float32-rounded (slightly non-orthogonal) init is polished first and still gives the same R
    rounded = rules.polar_factor(M, "newton_schulz", init=previous.to(torch.float32))
    assert max_abs(rounded - reference) <= 1e-6
    # an ill-conditioned M still converges (more iterations) to the SVD answer
    singular = torch.logspace(0, -4, OUT_DIM, dtype=F64)
    hard = (random_orthogonal(OUT_DIM, 9) * singular) @ random_orthogonal(OUT_DIM, 10).T
    solution, iterations = rules.polar_factor_newton_schulz(hard, init=previous)
    assert max_abs(solution - rules.polar_factor(hard)) <= 1e-6
    assert iterations > rules.polar_factor_newton_schulz(M)[1]


def test_eigh_falls_back_to_svd_when_ill_conditioned():
    singular = torch.logspace(0, -9, OUT_DIM, dtype=F64)
    M = (random_orthogonal(OUT_DIM, 11) * singular) @ random_orthogonal(OUT_DIM, 12).T
    assert max_abs(rules.polar_factor(M, "eigh") - rules.polar_factor(M, "svd")) <= 1e-6


def test_polar_validation():
    with pytest.raises(ValueError, match="square"):
        rules.polar_factor(random_matrix(3, 4, 0))
    with pytest.raises(ValueError, match="method"):
        rules.polar_factor(identity(3), method="qr")
    with pytest.raises(ValueError, match="init"):
        rules.polar_factor(identity(3), method="newton_schulz", init=identity(4))
    with pytest.raises(ValueError, match="init"):
        rules.polar_factor(identity(3), method="newton_schulz", init=3 * identity(3))
    with pytest.raises(ValueError, match="floating"):
        rules.polar_factor(torch.eye(3, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------- MOSE
def test_procrustes_rotation_is_orthogonal_and_preserves_norm_and_condition():
    W, C, K, V = edit_problem(0)
    R = rules.procrustes_rotation(W.float(), C.float(), K.float(), V.float(), lam=0.1)
    assert R.dtype == F64
    assert max_abs(R.T @ R - identity(OUT_DIM)) < 1e-12
    assert rules.procrustes_diagnostics(W, K, V, R)["rotation_distance"] > 1e-3  # it did move
    edited = R @ W
    assert abs(float(edited.norm()) / float(W.norm()) - 1) < 1e-10
    assert abs(float(torch.linalg.cond(edited)) / float(torch.linalg.cond(W)) - 1) < 1e-10


def test_procrustes_huge_lambda_gives_identity():
    W, C, K, V = edit_problem(1)
    R = rules.procrustes_rotation(W, C, K, V, lam=1e12)
    assert max_abs(R - identity(OUT_DIM)) < 1e-8


def test_procrustes_recovers_a_planted_rotation():
    W, C, K, _ = edit_problem(2, n_keys=3 * OUT_DIM)
    planted = random_orthogonal(OUT_DIM, 20)
    V = planted @ W @ K
    R = rules.procrustes_rotation(W, C, K, V, lam=1e-8)
    assert max_abs(R - planted) < 1e-6
    assert rules.procrustes_diagnostics(W, K, V, R)["fit_error"] < 1e-6


def test_procrustes_matches_the_stacked_procrustes_problem():
    """With raw preserved keys K0 and C = K0 K0ᵀ/n0 (the normalised mean), R solves paper Eq. 18 with weight
    lam/n0 on the preserved block: min ‖R A − B‖ over O(d),
    A = [√(lam/n0) W K0, W K], B = [√(lam/n0) W K0, V]."""
    W, _, K, V = edit_problem(3)
    preserved = random_matrix(IN_DIM, 60, 21)
    C = preserved @ preserved.T / preserved.shape[1]
    lam = 0.3
    R = rules.procrustes_rotation(W, C, K, V, lam=lam)
    weight = math.sqrt(lam / preserved.shape[1])
    A = torch.cat([weight * W @ preserved, W @ K], dim=1)
    B = torch.cat([weight * W @ preserved, V], dim=1)
    best = float((R @ A - B).norm())
    for seed in range(20):  # no nearby rotation does better
        skew = random_matrix(OUT_DIM, OUT_DIM, 100 + seed, scale=1e-3)
        nearby = torch.linalg.matrix_exp(skew - skew.T) @ R
        assert float((nearby @ A - B).norm()) >= best - 1e-12


def test_procrustes_fit_error_decreases_as_lambda_decreases():
    W, C, K, V = edit_problem(4)
    errors = [rules.procrustes_diagnostics(W, K, V, rules.procrustes_rotation(W, C, K, V, lam))["fit_error"]
              for lam in (1000.0, 1.0, 0.1, 0.01)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[0] > 0.9  # huge lam: hardly any edit
    assert errors[-1] < errors[0] - 0.3


def test_procrustes_extra_moment_protects_earlier_keys():
    W, C, K, V = edit_problem(5)
    protected = random_matrix(IN_DIM, 4, 30)
    extra = 10.0 * protected @ protected.T
    drift = {}
    for label, moment in (("without", None), ("with", extra)):
        R = rules.procrustes_rotation(W, C, K, V, lam=0.05, extra_moment=moment)
        drift[label] = float((R @ W @ protected - W @ protected).norm())
    assert drift["with"] < 0.5 * drift["without"]


@pytest.mark.parametrize("method", ["eigh", "newton_schulz"])
def test_procrustes_methods_agree(method):
    W, C, K, V = edit_problem(6)
    reference = rules.procrustes_rotation(W, C, K, V, lam=0.1)
    warm = rules.procrustes_rotation(W, C, K, V, lam=0.1, method=method, init=reference)
    assert max_abs(warm - reference) <= 1e-6
    assert max_abs(rules.procrustes_rotation(W, C, K, V, lam=0.1, method=method) - reference) <= 1e-6


def test_rotation_trust_region_shortens_along_the_geodesic():
    # a rotation with known generator A (every angle < π), so the geodesic R^t = exp(tA) is known
    A = random_matrix(OUT_DIM, OUT_DIM, 11, scale=0.08)
    A = A - A.T
    R = torch.linalg.matrix_exp(A)
    identity = torch.eye(OUT_DIM, dtype=F64)
    full = float(torch.linalg.norm(R - identity))
    shortened, t = rules.rotation_trust_region(R, full / 3)
    assert 0 < t < 1
    assert float(torch.linalg.norm(shortened - identity)) == pytest.approx(full / 3, rel=1e-9)
    torch.testing.assert_close(shortened, torch.linalg.matrix_exp(t * A), rtol=0, atol=1e-12)
    torch.testing.assert_close(shortened.T @ shortened, identity, rtol=0, atol=1e-12)
    W = random_matrix(OUT_DIM, IN_DIM, 12)
    torch.testing.assert_close(torch.linalg.svdvals(shortened @ W), torch.linalg.svdvals(W), rtol=1e-10, atol=0)
    inside, t_inside = rules.rotation_trust_region(R, full * 1.01)
    assert t_inside == 1.0 and torch.equal(inside, R)
    with pytest.raises(ValueError, match="max_distance"):
        rules.rotation_trust_region(R, 0.0)


def test_procrustes_diagnostics_values():
    W, C, K, V = edit_problem(7)
    diagnostics = rules.procrustes_diagnostics(W, K, V, identity(OUT_DIM))
    outputs = W @ K
    assert diagnostics["rho"] == pytest.approx(float((V - outputs).norm() / outputs.norm()), rel=1e-12)
    assert diagnostics["fit_error"] == pytest.approx(1.0, rel=1e-12)
    assert diagnostics["rotation_distance"] == 0.0
    assert diagnostics["orthogonality_error"] == 0.0
    assert set(diagnostics) >= {"rho", "fit_error", "rotation_distance", "orthogonality_error"}
    assert all(isinstance(value, float) for value in diagnostics.values())


def test_procrustes_validation():
    W, C, K, V = edit_problem(8)
    for bad_lam in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lam"):
            rules.procrustes_rotation(W, C, K, V, lam=bad_lam)
    with pytest.raises(ValueError, match="C"):
        rules.procrustes_rotation(W, C[:-1, :-1], K, V, lam=1.0)
    with pytest.raises(ValueError, match="K"):
        rules.procrustes_rotation(W, C, K[:-1], V, lam=1.0)
    with pytest.raises(ValueError, match="V"):
        rules.procrustes_rotation(W, C, K, V[:, :-1], lam=1.0)
    with pytest.raises(ValueError, match="extra_moment"):
        rules.procrustes_rotation(W, C, K, V, lam=1.0, extra_moment=C[:-1])
    with pytest.raises(ValueError, match="R"):
        rules.procrustes_diagnostics(W, K, V, identity(OUT_DIM + 1))
    with pytest.raises(ValueError, match="W"):
        rules.procrustes_rotation(W[0], C, K, V, lam=1.0)


# ---------------------------------------------------------------------------------------------- MEMIT / EMMET
def test_memit_delta_satisfies_normal_equations():
    W, C, K, V = edit_problem(9)
    residual = V - W @ K
    lam = 3.0
    delta = rules.memit_delta(residual.float(), K.float(), C.float(), lam)
    assert delta.dtype == F64 and delta.shape == W.shape
    K32, C32 = K.float().double(), C.float().double()
    left = delta @ (lam * C32 + K32 @ K32.T)
    assert max_abs(left - residual.float().double() @ K32.T) < 1e-9 * max_abs(residual @ K.T)


def test_cached_cholesky_factor_gives_the_same_memit_and_emmet_updates():
    """The O(p²n) path with C's Cholesky factor solves the same equations as the direct solves."""
    W, C, K, V = edit_problem(13)
    residual = V - W @ K
    factor = rules.cholesky_factor(C)
    assert factor is not None and max_abs(factor @ factor.T - C) < 1e-10 * max_abs(C)
    for lam in (0.5, 3.0, 2000.0):
        direct = rules.memit_delta(residual, K, C, lam)
        fast = rules.memit_delta(residual, K, C, lam, factor=factor)
        assert max_abs(fast - direct) < 1e-9 * max_abs(direct)
    direct = rules.emmet_delta(residual, K, C, ridge=0.1)
    assert max_abs(rules.emmet_delta(residual, K, C, ridge=0.1, factor=factor) - direct) < 1e-9 * max_abs(direct)
    # a matrix that is not positive definite has no factor: the rules then take the direct solve
    assert rules.cholesky_factor(-C) is None


def test_memit_validation():
    W, C, K, V = edit_problem(10)
    with pytest.raises(ValueError, match="lam"):
        rules.memit_delta(V - W @ K, K, C, 0.0)
    with pytest.raises(ValueError, match="columns"):
        rules.memit_delta((V - W @ K)[:, :-1], K, C, 1.0)
    with pytest.raises(ValueError, match="C"):
        rules.memit_delta(V - W @ K, K, C[:, :-1], 1.0)


def test_emmet_meets_constraints_as_ridge_vanishes():
    W, C, K, V = edit_problem(11)
    residual = V - W @ K
    exact = rules.emmet_delta(residual, K, C, ridge=1e-10)
    assert max_abs((W + exact) @ K - V) < 1e-8
    relaxed = rules.emmet_delta(residual, K, C, ridge=10.0)
    assert max_abs((W + relaxed) @ K - V) > 1e-3
    # minimum C-weighted norm among updates that meet the constraints: adding anything in K's C-null
    # complement (Z with Z K = 0) can only increase tr(Δ C Δᵀ)
    null_part = random_matrix(OUT_DIM, IN_DIM, 12)
    null_part = null_part - null_part @ K @ torch.linalg.pinv(K)
    assert max_abs(null_part @ K) < 1e-10
    cost = float(torch.trace(exact @ C @ exact.T))
    assert float(torch.trace((exact + 0.1 * null_part) @ C @ (exact + 0.1 * null_part).T)) > cost
    with pytest.raises(ValueError, match="ridge"):
        rules.emmet_delta(residual, K, C, ridge=-1.0)


# ---------------------------------------------------------------------------------------------- AlphaEdit
def test_null_space_projector():
    basis = random_orthogonal(IN_DIM, 13)
    spectrum = torch.logspace(-4, 1, IN_DIM, dtype=F64)
    C = (basis * spectrum) @ basis.T
    P = rules.null_space_projector(C, threshold=2e-2)
    small = basis[:, spectrum < 2e-2]
    assert max_abs(P - small @ small.T) < 1e-10
    assert max_abs(P @ P - P) < 1e-10
    assert round(float(torch.trace(P))) == small.shape[1]


def test_alphaedit_delta_lies_in_projector_range():
    W, _, K, V = edit_problem(14)
    basis = random_orthogonal(IN_DIM, 15)
    C = (basis * torch.logspace(-4, 1, IN_DIM, dtype=F64)) @ basis.T
    P = rules.null_space_projector(C)
    prior = rules.alphaedit_grow_moment(torch.zeros(IN_DIM, IN_DIM, dtype=F64), random_matrix(IN_DIM, 3, 16))
    residual = V - W @ K
    delta = rules.alphaedit_delta(residual, K, P, prior, l2=10.0)
    assert delta.shape == W.shape and max_abs(delta) > 1e-3
    assert max_abs(delta @ (identity(IN_DIM) - P)) < 1e-5 * max_abs(delta)
    # it solves its (float32) linear system: ΔW ((K Kᵀ + prior) P + l2 I) = Rsd Kᵀ P
    system = (K @ K.T + prior) @ P + 10.0 * identity(IN_DIM)
    assert max_abs(delta @ system - residual @ K.T @ P) < 1e-4 * max_abs(residual @ K.T @ P)
    in_float64 = rules.alphaedit_delta(residual, K, P, prior, l2=10.0, compute_dtype=F64)
    assert max_abs(in_float64 @ system - residual @ K.T @ P) < 1e-10 * max_abs(residual @ K.T @ P)
    with pytest.raises(ValueError, match="l2"):
        rules.alphaedit_delta(residual, K, P, prior, l2=0.0)
    with pytest.raises(ValueError, match="prior_moment"):
        rules.alphaedit_delta(residual, K, P, prior[:-1], l2=1.0)


def test_alphaedit_carried_inverse_matches_the_solve_over_a_sequence():
    basis = random_orthogonal(IN_DIM, 40)
    C = (basis * torch.logspace(-4, 1, IN_DIM, dtype=F64)) @ basis.T
    P = rules.null_space_projector(C)
    prior = torch.zeros(IN_DIM, IN_DIM, dtype=F64)
    inverse = rules.alphaedit_inverse(prior, P, l2=10.0)
    assert max_abs(inverse - identity(IN_DIM) / 10.0) < 1e-15
    for step in range(12):
        n = 1 + step % 3
        K, residual = random_matrix(IN_DIM, n, 41 + step) * 4, random_matrix(OUT_DIM, n, 60 + step)
        expected = rules.alphaedit_delta(residual, K, P, prior, l2=10.0, compute_dtype=F64)
        carried = rules.alphaedit_carried_delta(residual, K, P, inverse)
        assert max_abs(carried - expected) < 1e-10 * max_abs(expected)
        grown = K + 0.1 * random_matrix(*K.shape, 80 + step)  # the keys recomputed after the edit
        prior = rules.alphaedit_grow_moment(prior, grown)
        inverse = rules.alphaedit_grow_inverse(inverse, grown, P)
    direct = rules.alphaedit_inverse(prior, P, l2=10.0)
    assert max_abs(inverse - direct) < 1e-10 * max_abs(direct)
    with pytest.raises(ValueError, match="inverse"):
        rules.alphaedit_carried_delta(residual, K, P, inverse[:-1])


def test_alphaedit_grow_moment_adds_key_outer_products():
    prior = key_moment(IN_DIM, 17)
    K = random_matrix(IN_DIM, 4, 18)
    grown = rules.alphaedit_grow_moment(prior.float(), K)
    assert grown.dtype == F64
    assert max_abs(grown - prior.float().double() - sum(torch.outer(k, k) for k in K.T)) < 1e-10
    with pytest.raises(ValueError, match="prior_moment"):
        rules.alphaedit_grow_moment(prior[:-1, :-1], K)


# ---------------------------------------------------------------------------------------------- RECT
def test_rect_keeps_the_largest_relative_changes():
    W = random_matrix(OUT_DIM, IN_DIM, 19)
    W[0, 0] = 0.0  # a zero weight: its (small) change counts as very large
    delta = random_matrix(OUT_DIM, IN_DIM, 20, scale=1e-2)
    delta[0, 0] = 1e-9
    numel = delta.numel()
    for fraction in (0.4, 0.2, 1 / 3, 1.0):
        sparse = rules.rect_sparsify(delta, W, fraction)
        kept = sparse != 0
        expected_count = max(1, math.floor(fraction * numel + 0.5))
        assert int(kept.sum()) == expected_count == rules.rect_kept_count(numel, fraction)
        assert torch.equal(sparse[kept], delta[kept])
        assert bool(kept[0, 0])
        ratio = delta.abs() / W.abs()
        if fraction < 1.0:
            assert float(ratio[kept & (W != 0)].min()) >= float(ratio[~kept].max())
    assert rules.rect_kept_count(10, 0.25) == 3  # 2.5 rounds half up
    assert rules.rect_kept_count(10, 0.01) == 1  # at least one entry


def test_rect_validation():
    W = random_matrix(4, 5, 21)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep_fraction"):
            rules.rect_sparsify(W, W, bad)
    with pytest.raises(ValueError, match="W"):
        rules.rect_sparsify(W, W[:, :-1], 0.5)


# ---------------------------------------------------------------------------------------------- PRUNE
def test_prune_restrains_only_large_singular_values():
    left = random_orthogonal(OUT_DIM, 22)[:, :6]
    right = random_orthogonal(IN_DIM, 23)[:, :6]
    spectrum = torch.tensor([40.0, 9.0, 5.0, 3.0, 1.0, 0.2], dtype=F64)
    delta = (left * spectrum) @ right.T
    threshold = 3.0
    restrained = rules.prune_restrain(delta, threshold)
    large = spectrum >= threshold
    expected = torch.where(large, torch.log(spectrum) - math.log(threshold) + threshold, spectrum)
    # same singular vectors, new singular values: Uᵀ out V is diagonal with F(σ)
    assert max_abs(left.T @ restrained @ right - torch.diag(expected)) < 1e-10
    assert max_abs(restrained - (left * expected) @ right.T) < 1e-10
    assert torch.allclose(torch.linalg.svdvals(restrained)[:6], torch.sort(expected, descending=True).values,
                          atol=1e-10, rtol=0)
    # nothing at or above the threshold: unchanged
    assert max_abs(rules.prune_restrain(delta, 100.0) - delta) < 1e-10
    # another log base is honoured
    base2 = rules.prune_restrain(delta, threshold, log=math.log2)
    expected2 = torch.where(large, torch.log2(spectrum) - math.log2(threshold) + threshold, spectrum)
    assert max_abs(left.T @ base2 @ right - torch.diag(expected2)) < 1e-10
    with pytest.raises(ValueError, match="sigma_max_w0"):
        rules.prune_restrain(delta, 0.0)


# ---------------------------------------------------------------------------------------------- ROME
@pytest.mark.parametrize("with_moment", [False, True])
def test_rome_delta_is_rank_one_and_exact(with_moment):
    W = random_matrix(OUT_DIM, IN_DIM, 24)
    k_star, k_mean = random_matrix(IN_DIM, 2, 25).T
    v_star = random_matrix(OUT_DIM, 1, 26)[:, 0]
    C = key_moment(IN_DIM, 27) if with_moment else None
    delta = rules.rome_delta(W.float(), k_star, k_mean, v_star, C=C)
    assert int(torch.linalg.matrix_rank(delta)) == 1
    assert max_abs((W.float().double() + delta) @ k_star - v_star) < 1e-10
    direction = torch.linalg.solve(C, k_mean) if with_moment else k_mean
    # the row space is u = C⁻¹ k̄ (or k̄)
    assert max_abs(delta - torch.outer(delta @ direction / direction.dot(direction), direction)) < 1e-10


def test_rome_validation():
    W = random_matrix(OUT_DIM, IN_DIM, 28)
    k = random_matrix(IN_DIM, 1, 29)[:, 0]
    v = random_matrix(OUT_DIM, 1, 30)[:, 0]
    with pytest.raises(ValueError, match="k_star"):
        rules.rome_delta(W, k[:-1], k, v)
    with pytest.raises(ValueError, match="v_star"):
        rules.rome_delta(W, k, k, k)
    with pytest.raises(ValueError, match="C"):
        rules.rome_delta(W, k, k, v, C=identity(3))
    first_axis, second_axis = torch.eye(IN_DIM, dtype=F64)[:2]
    with pytest.raises(ValueError, match="k_star"):  # uᵀ k* = 0
        rules.rome_delta(W, first_axis, second_axis, v)
    with pytest.raises(ValueError, match="k_mean"):
        rules.rome_delta(W, k, k.reshape(1, -1), v)
