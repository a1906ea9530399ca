"""MOSE's input-side update, W ← W Q with Q ∈ O(p), and the reachable sets of both rotation sides.

Pure functions of tensors (float64 on the inputs' device), in the notation of :mod:`mose_easyedit.rules`:
``W`` (d×p), a key ``k`` (p,), the requested output change ``r`` (d,) = v − W k.

A rotation of the input keeps every singular value of W, like the paper's left rotation, but acts in key space,
where generic keys and the keys of earlier edits can be left alone by construction. Each edit key turns in one
plane span{a, b}, a and b orthonormal:

    Q = I + (cos t − 1)(a aᵀ + b bᵀ) + sin t (b aᵀ − a bᵀ)
    W Q = W + (cos t − 1)(W a aᵀ + W b bᵀ) + sin t (W b aᵀ − W a bᵀ)          (rank two, O(dp), no p×p matrix)

With a the unit direction of the key's part α = aᵀk inside the allowed subspace and b ⊥ k in the allowed
subspace, the output moves by

    W Q k − W k = α (sin t · W b − (1 − cos t) · W a).

Every key orthogonal to the plane keeps its output exactly. :func:`aimed_plane` picks b and t: the smallest
angle that meets r exactly when r is within reach, else the plane and angle that come closest (best partial
progress; the layers above take the rest). :func:`aimed_null_plane` is the same aim for a in null(W), where b
need not be ⊥ k (excluding k there would cost the reading one output direction).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Projector = Callable[[torch.Tensor], torch.Tensor]

_BISECTION_STEPS = 60


def plane_rotate(W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """W Q for the plane rotation by ``t`` that turns ``a`` towards ``b`` (a, b orthonormal), in rank-two form."""
    Wa, Wb = W @ a, W @ b
    c, s = math.cos(t) - 1.0, math.sin(t)
    return W + c * (torch.outer(Wa, a) + torch.outer(Wb, b)) + s * (torch.outer(Wb, a) - torch.outer(Wa, b))


def plane_rotation_matrix(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """The p×p matrix Q of :func:`plane_rotate` (for tests and diagnostics; the update never forms it)."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    c, s = math.cos(t) - 1.0, math.sin(t)
    return eye + c * (torch.outer(a, a) + torch.outer(b, b)) + s * (torch.outer(b, a) - torch.outer(a, b))


def orthonormal_columns(X: torch.Tensor, tol: float = 1e-10) -> torch.Tensor:
    """An orthonormal basis (p×q) of the span of X's columns, directions below ``tol``·σ_max dropped."""
    if X.shape[1] == 0:
        return X
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    if S.numel() == 0 or float(S[0]) == 0.0:
        return X[:, :0]
    return U[:, S > tol * S[0]]


def minus_span(project: Projector, Z: torch.Tensor) -> Projector:
    """x ↦ project(x) − Z Zᵀ x: the projector onto range(project) ∩ Z⊥ (Z orthonormal, inside range(project))."""
    if Z.shape[1] == 0:
        return project
    return lambda x: project(x) - Z @ (Z.T @ x)


@dataclass
class Reader:
    """Eigen-decomposition of M Mᵀ = W Π Wᵀ for the reading operator M = W Π (Π an orthogonal projector):
    solves min ‖M x − g‖ s.t. ‖x‖ ≤ radius in d-space (x = Mᵀ U (c / (s² + μ)), c = Uᵀ g)."""

    W: torch.Tensor
    project: Projector
    U: torch.Tensor
    s2: torch.Tensor

    @classmethod
    def build(cls, W: torch.Tensor, project: Projector, rank_tol: float = 1e-12) -> "Reader":
        MMt = W @ project(W.T)
        s2, U = torch.linalg.eigh(0.5 * (MMt + MMt.T))
        keep = s2 > rank_tol * float(s2.max().clamp(min=1e-300))
        return cls(W, project, U[:, keep], s2[keep])

    def ridge(self, c: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """μ ≥ 0 per column of c (r×m) with ‖x(μ)‖ = radius, or 0 where the exact fit is already inside."""
        s2 = self.s2[:, None]
        inside = (c ** 2 / s2).sum(0) <= radius ** 2
        lo = torch.zeros_like(radius)
        # ‖x(μ)‖ ≤ s_max ‖c‖ / μ, so this μ is long enough
        hi = float(self.s2.max()) ** 0.5 * c.norm(dim=0) / radius.clamp(min=1e-300) + 1e-300
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            too_long = (s2 * c ** 2 / (s2 + mid) ** 2).sum(0) > radius ** 2
            lo, hi = torch.where(too_long, mid, lo), torch.where(too_long, hi, mid)
        return torch.where(inside, torch.zeros_like(hi), hi)

    def read(self, c: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """x = Mᵀ U (c / (s² + μ)) for columns of c (r×m); returns p×m."""
        return self.project(self.W.T @ (self.U @ (c / (self.s2[:, None] + mu))))

    def fitted(self, c: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """M x for the same x, in d-space (d×m)."""
        return self.U @ (self.s2[:, None] * c / (self.s2[:, None] + mu))


@dataclass
class Plane:
    """One plane rotation of a key: W ← plane_rotate(W, a, b, t), and how well it meets its request."""

    a: torch.Tensor
    b: torch.Tensor
    t: float
    alpha: float
    reachable: bool
    fit_error: float


def aimed_plane(W: torch.Tensor, k: torch.Tensor, r: torch.Tensor, a: torch.Tensor, reading: Projector,
                grid: int = 64) -> Plane | None:
    """The plane rotation in span{a, b} that moves W k closest to W k + r, with the smallest angle among the
    exact ones.

    ``a`` unit, α = aᵀk > 0; ``reading`` the projector onto the subspace b may use, which must exclude a and
    make bᵀk = 0 (so the key's turn is α·(cos t − 1, sin t) in the plane). For angle t the best unit b solves
    min ‖W b − g(t)‖, g(t) = (r/α + (1 − cos t) W a) / sin t: exact when ‖M⁺ g(t)‖ ≤ 1 (M = W·reading), the
    smallest such t found on a grid over (0, π) and refined by bisection; otherwise the ball-constrained
    least-squares b at the grid angle of least error. Returns None when r = 0 or α = 0 (nothing to do).
    """
    alpha = float(a @ k)
    r_norm = float(r.norm())
    if r_norm == 0.0 or alpha <= 0.0:
        return None
    reader = Reader.build(W, reading)
    wa = W @ a
    c_r, c_a = reader.U.T @ (r / alpha), reader.U.T @ wa
    out_of_range = (r / alpha) - reader.U @ c_r, wa - reader.U @ c_a

    def coefficients(t: torch.Tensor) -> torch.Tensor:
        return (c_r[:, None] + (1 - torch.cos(t))[None, :] * c_a[:, None]) / torch.sin(t)[None, :]

    def exact_norm(t: torch.Tensor) -> torch.Tensor:
        return ((coefficients(t) ** 2) / reader.s2[:, None]).sum(0)

    ts = torch.arange(1, grid, dtype=W.dtype, device=W.device) * (math.pi / grid)
    feasible = exact_norm(ts) <= 1.0
    if bool(feasible.any()):
        first = int(feasible.nonzero()[0])
        lo = float(ts[first - 1]) if first > 0 else 0.0
        hi = float(ts[first])
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            if float(exact_norm(torch.tensor([mid], dtype=W.dtype, device=W.device))) <= 1.0:
                hi = mid
            else:
                lo = mid
        t = torch.tensor([hi], dtype=W.dtype, device=W.device)
        mu = torch.zeros(1, dtype=W.dtype, device=W.device)
        reachable = True
    else:
        c = coefficients(ts)
        mu = reader.ridge(c, torch.ones(len(ts), dtype=W.dtype, device=W.device))
        miss = reader.fitted(c, mu) - reader.U @ c
        leftover = out_of_range[0][:, None] + (1 - torch.cos(ts))[None, :] * out_of_range[1][:, None]
        errors = torch.sin(ts) ** 2 * (miss ** 2).sum(0) + (leftover ** 2).sum(0)
        best = int(errors.argmin())
        t, mu = ts[best:best + 1], mu[best:best + 1]
        reachable = False
    b = reader.read(coefficients(t), mu)[:, 0]
    b = b - (a @ b) * a
    b = b / b.norm()
    angle = float(t)
    change = alpha * (math.sin(angle) * (W @ b) - (1 - math.cos(angle)) * wa)
    return Plane(a, b, angle, alpha, reachable, float((change - r).norm()) / r_norm)


def aimed_null_plane(W: torch.Tensor, k: torch.Tensor, r: torch.Tensor, a: torch.Tensor,
                     reading: Projector) -> Plane | None:
    """The plane rotation for a turning direction ``a`` in null(W) (W a = 0), where b may share a part β = bᵀk
    with the key: W Q k − W k = f(t) · W b with f(t) = α sin t + β (cos t − 1), at most R − β (R = ‖(α, β)‖).

    b is the reading of r within the reach, the ball-constrained least squares x = argmin ‖W x − r‖ over
    range(reading) with ‖x‖ ≤ α, normalised (⊥ a); f the least-squares scale of W b onto r, capped at R − β;
    t the smallest angle that gives f. When ‖M⁺ r‖ ≤ R − β this meets r exactly (x = M⁺ r, M = W·reading).
    Returns None when r = 0 or α = 0.
    """
    alpha = float(a @ k)
    r_norm = float(r.norm())
    if r_norm == 0.0 or alpha <= 0.0:
        return None
    reader = Reader.build(W, reading)
    c = (reader.U.T @ r)[:, None]
    mu = reader.ridge(c, torch.tensor([alpha], dtype=W.dtype, device=W.device))
    x = reader.read(c, mu)[:, 0]
    x = x - (a @ x) * a
    b = x / x.norm()
    beta = float(b @ k)
    wb = W @ b
    wanted = float(r @ wb) / float(wb @ wb)
    radius = math.hypot(alpha, beta)
    most = radius - beta
    f = min(max(wanted, 0.0), most)
    t = math.atan2(alpha, beta) - math.acos(max(-1.0, min(1.0, (f + beta) / radius)))
    return Plane(a, b, t, alpha, wanted <= most, float((f * wb - r).norm()) / r_norm)


def low_variance_direction(W: torch.Tensor, k: torch.Tensor, C: torch.Tensor, shield: torch.Tensor,
                           ridge: float) -> torch.Tensor:
    """a = argmax (aᵀk)² / aᵀ(C / c̄ + ridge·I) a over null(W) ⊥ ``shield`` (orthonormal, inside null(W);
    c̄ = tr C / p): the turning direction that moves generic keys least per unit of reach (to first order the
    output of a generic key k' moves by t·(âᵀk')·W b). Returned scaled so that ‖a‖ = âᵀk, the reach α."""
    basis = torch.linalg.qr(W.T, mode="complete").Q[:, W.shape[0]:]
    if shield.shape[1]:
        U = torch.linalg.svd(basis.T @ shield, full_matrices=True).U
        basis = basis @ U[:, shield.shape[1]:]
    inner = basis.T @ (C @ basis) / (float(torch.trace(C)) / C.shape[0])
    eye = torch.eye(inner.shape[0], dtype=C.dtype, device=C.device)
    direction = basis @ torch.linalg.solve(0.5 * (inner + inner.T) + ridge * eye, basis.T @ k)
    unit = direction / direction.norm()
    return unit * float(unit @ k)


# ------------------------------------------------------------------------------------------- reachable targets
def key_subspaces(W: torch.Tensor, k: torch.Tensor, protected: torch.Tensor, P: torch.Tensor | None = None,
                  C: torch.Tensor | None = None, a_ridge: float | None = None, protect_reading: bool = False,
                  shield: torch.Tensor | None = None):
    """``(a, allowed, reading)`` for key ``k``: the unnormalised turning direction a (its length is the reach
    α = âᵀk), the projector ``allowed`` onto the subspace a comes from, and the projector ``reading`` onto the
    subspace the reading direction b may use; every subspace ⊥ the ``protected`` keys (p × m).

    With ``P`` (a projector onto the null space of the generic keys, "null_c") a and b lie in P's range. Without
    it ("null_w") a lies in null(W), found by a solve with W Wᵀ; with ``a_ridge`` and ``C`` a is instead the
    direction that moves generic keys least per unit of reach (:func:`low_variance_direction`); b is free but
    ⊥ a (and ⊥ the protected keys with ``protect_reading``).

    ``shield``: :func:`protected_basis` of ``protected`` when the caller has it (it is the costly part: an SVD of a
    p × m matrix). ``reading`` is built on its first use (another such SVD), so a caller that needs only a and
    ``allowed`` does not pay for it.
    """
    if P is not None:
        base = P.double().__matmul__
    else:
        gram = W @ W.T
        base = lambda x: x - W.T @ torch.linalg.solve(gram, W @ x)  # noqa: E731  (onto null(W))
    if shield is None:
        shield = orthonormal_columns(base(protected))
    allowed = minus_span(base, shield)
    a = allowed(k)
    if P is None and a_ridge is not None:
        a = low_variance_direction(W, k, C, shield, a_ridge)
    if P is not None:
        return a, allowed, built_on_first_use(
            lambda: minus_span(base, orthonormal_columns(torch.cat([shield, a[:, None]], dim=1))))
    avoid = torch.cat([protected, a[:, None]], dim=1) if protect_reading else a[:, None]
    return a, allowed, built_on_first_use(lambda: minus_span(lambda x: x, orthonormal_columns(avoid)))


def protected_basis(P: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the protected keys' part in P's range (what :func:`key_subspaces` keeps a and b
    orthogonal to in "null_c")."""
    return orthonormal_columns(P.double() @ protected)


def built_on_first_use(build: Callable[[], Projector]) -> Projector:
    """A projector that calls ``build`` once, when it is first applied."""
    built: list[Projector] = []

    def project(x: torch.Tensor) -> torch.Tensor:
        if not built:
            built.append(build())
        return built[0](x)

    return project


def project_to_reach(delta: torch.Tensor, readers: list[Reader], radii: torch.Tensor,
                     sweeps: int = 8) -> torch.Tensor:
    """Nearest point to each row of ``delta`` (n×d) in the Minkowski sum over layers l of the ellipsoids
    {M_l x : ‖x‖ ≤ radii[l, j]} (what the window's input-side planes can add to the residual stream, to first
    order), by block-coordinate descent over the layers (each block a ball-constrained least squares)."""
    target = delta.T.to(readers[0].U.dtype)
    parts = [torch.zeros_like(target) for _ in readers]
    for _ in range(sweeps):
        for index, reader in enumerate(readers):
            rest = target - sum(p for i, p in enumerate(parts) if i != index)
            c = reader.U.T @ rest
            mu = reader.ridge(c, radii[index])
            parts[index] = reader.fitted(c, mu)
    return sum(parts).T.to(delta.dtype)


def project_to_spheres(delta: torch.Tensor, outputs: list[torch.Tensor], sweeps: int = 20,
                       max_angle: float | None = None) -> torch.Tensor:
    """Output side: the share s = δ / L that every layer l of the window can deliver by a rotation keeps
    ‖W_l k_l + s‖ = ‖W_l k_l‖; alternating projections of s onto those spheres (``outputs`` = [W_l K_l], d×n
    each), returned as L·s (n×d). With ``max_angle`` (radians) each sphere is cut to the cap of points within
    that angle of W_l k_l (a trust region: the request turns no output further)."""
    count = len(outputs)
    share = delta.T.to(outputs[0].dtype) / count
    for _ in range(sweeps):
        for u in outputs:
            moved = share + u
            radius = u.norm(dim=0)
            moved = moved * (radius / moved.norm(dim=0).clamp(min=1e-30))
            if max_angle is not None:
                moved = _into_cap(moved, u, radius, max_angle)
            share = moved - u
    return (share * count).T.to(delta.dtype)


def _into_cap(points: torch.Tensor, centres: torch.Tensor, radius: torch.Tensor, max_angle: float) -> torch.Tensor:
    """Columns of ``points`` (on the spheres of ``radius`` around 0) moved along their great circle to within
    ``max_angle`` of the matching column of ``centres``."""
    unit = centres / radius.clamp(min=1e-30)
    along = (points * unit).sum(dim=0)
    across = points - unit * along
    across_norm = across.norm(dim=0)
    angle = torch.atan2(across_norm, along)
    outside = angle > max_angle
    capped = radius * (math.cos(max_angle) * unit + math.sin(max_angle) * across / across_norm.clamp(min=1e-30))
    return torch.where(outside, capped, points)
