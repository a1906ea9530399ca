"""Every method's weight-update rule as a small pure function of tensors.

No model, no hooks, no global state: each function takes tensors and returns tensors. Notation follows
``docs/methods.md`` in torch's (out, in) orientation:

* ``W`` (d×p) the edited weight, ``K`` (p×n) edit keys as columns, ``V`` (d×n) target outputs,
* ``Rsd`` (d×n) residuals ``V − W K``,
* ``C`` (p×p) the uncentred key second moment E[k kᵀ] (a normalised mean, not a sum), symmetric.

Inputs may have any real floating dtype and live on any device (all on the same one). Unless a docstring
says otherwise the linear algebra runs in float64 on the inputs' device and the result is float64 on that
device; the caller casts back to the weight's dtype. Bad shapes or arguments raise ``ValueError`` naming
the argument.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch

logger = logging.getLogger(__name__)

POLAR_METHODS = ("svd", "eigh", "newton_schulz")

# eigh route: R = M (MᵀM)^(-1/2) loses about eps·κ(M)² of accuracy; below this eigenvalue ratio of MᵀM
# (κ(M) above ~1e5; measured error there ~1e-8) it would near the 1e-6 agreement bound, so fall back to SVD.
_EIGH_MIN_EIGENVALUE_RATIO = 1e-10
# rect_sparsify: stands in for |W_ij| when W_ij = 0, so such entries rank as (very) large relative changes.
_RELATIVE_CHANGE_EPS = 1e-30


# ----------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------
def _check_tensor(name: str, value, ndim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise ValueError(f"{name} must have a real floating dtype, got {value.dtype}")
    if value.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    return value


def _same_device(**tensors: torch.Tensor | None) -> torch.device:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return next(iter(devices))


def _float64(value: torch.Tensor) -> torch.Tensor:
    return value.to(torch.float64)


def _check_shape(name: str, value: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({meaning}), got {tuple(value.shape)}")


def _check_square(name: str, value: torch.Tensor) -> int:
    if value.shape[0] != value.shape[1]:
        raise ValueError(f"{name} must be square, got shape {tuple(value.shape)}")
    return value.shape[0]


def _check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return number


DIMENSIONS = {"d": "the output size", "p": "the key size", "n": "the number of columns, one per key"}


def _operands(**named) -> dict[str, int]:
    """Check every operand of a public function at once against named dimensions and return their sizes:
    ``_operands(W=(W, "d p"), K=(K, "p n"), V=(V, "d n"))``. Each operand (None: absent, skipped) must be a real
    floating tensor with one letter per axis; a letter has one size across all operands (a letter repeated within
    one operand makes it square); all operands share one device. Errors name the operand and the dimension."""
    sizes: dict[str, tuple[int, str]] = {}
    present = {}
    for name, (value, dims) in named.items():
        if value is None:
            continue
        letters = dims.split()
        _check_tensor(name, value, len(letters))
        if len(set(letters)) < len(letters) and len(set(value.shape)) > 1:
            raise ValueError(f"{name} must be square, got shape {tuple(value.shape)}")
        for letter, size in zip(letters, value.shape):
            known = sizes.setdefault(letter, (size, name))
            if known[0] != size:
                expected = ", ".join(f"{x}={sizes[x][0]}" if x in sizes else x for x in letters)
                raise ValueError(f"{name} must have shape ({expected}) ({letter}: {DIMENSIONS.get(letter, letter)}, "
                                 f"{known[0]} as in {known[1]}), got {tuple(value.shape)}")
        present[name] = value
    _same_device(**present)
    return {letter: size for letter, (size, _) in sizes.items()}


def _max_abs(value: torch.Tensor) -> float:
    return float(value.abs().max()) if value.numel() else 0.0


# ----------------------------------------------------------------------------------------------------------
# 1. polar factor
# ----------------------------------------------------------------------------------------------------------
def _polar_by_svd(M: torch.Tensor) -> torch.Tensor:
    left, _, right_t = torch.linalg.svd(M)
    return left @ right_t


def _polar_by_eigh(M: torch.Tensor) -> torch.Tensor:
    gram = M.T @ M
    gram = 0.5 * (gram + gram.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    largest = float(eigenvalues[-1])
    smallest = float(eigenvalues[0])
    if not largest > 0 or smallest <= _EIGH_MIN_EIGENVALUE_RATIO * largest:
        logger.debug("polar_factor(eigh): MᵀM eigenvalue ratio %.3g too small, using the SVD",
                     smallest / largest if largest > 0 else 0.0)
        return _polar_by_svd(M)
    inverse_sqrt = (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T
    return M @ inverse_sqrt


def _spectral_norm_estimate(M: torch.Tensor, steps: int = 12) -> float:
    """Power iteration on MᵀM from a fixed start vector; a lower bound on σ_max(M), usually within 1%."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    vector = torch.randn(M.shape[1], generator=generator, dtype=torch.float64).to(M.device)
    estimate = 0.0
    for _ in range(steps):
        image = M @ vector
        estimate = float(torch.linalg.vector_norm(image))
        if estimate == 0.0:
            return 0.0
        vector = M.T @ (image / estimate)
        vector = vector / torch.linalg.vector_norm(vector)
    return estimate


def _orthonormalise_init(init: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
    """Polish a nearly orthogonal ``init`` to orthogonal to rounding (Newton–Schulz on init itself)."""
    identity = torch.eye(init.shape[0], dtype=init.dtype, device=init.device)
    rotation = init
    for _ in range(max_iter):
        defect = identity - rotation.T @ rotation
        deviation = _max_abs(defect)
        if deviation > 0.5:
            raise ValueError(
                "init must be (nearly) orthogonal for a warm start, "
                f"max|initᵀinit − I| = {deviation:.3g} > 0.5"
            )
        if deviation < 1e-15 * init.shape[0]:
            break
        rotation = rotation + 0.5 * rotation @ defect
        if deviation < math.sqrt(tol):
            break
    return rotation


def polar_factor_newton_schulz(M: torch.Tensor, init: torch.Tensor | None = None, tol: float = 1e-12,
                               max_iter: int = 100) -> tuple[torch.Tensor, int]:
    """Orthogonal polar factor of square ``M`` by the Newton–Schulz iteration; returns ``(R, iterations)``.

    Iteration X ← X + ½ X (I − XᵀX) = 3/2 X − ½ X XᵀX, started at X₀ = Y/σ̂ with σ̂ ≈ σ_max(Y) (power
    iteration), converges to polar(Y) whenever all singular values of X₀ lie in (0, √3): each singular value
    follows σ ← 3/2 σ − ½ σ³, growing by 1.5 per step while small, then converging quadratically, so the
    count is about log₁.₅(κ(M)) + 5. It stops once max|XᵀX − I| < √tol; the final step leaves an
    orthogonality/accuracy defect of about tol.

    Warm start: with an orthogonal ``init`` Q (e.g. the previous edit's rotation, polished to orthogonal
    first) it iterates on Y = Qᵀ M and returns R = Q·polar(Y); since polar(QᵀM) = Qᵀ polar(M) exactly for
    orthogonal Q, this is the same R. The iteration count depends only on M's singular values, which Y
    shares, so a warm start does not shorten the iteration; it only makes Y nearly symmetric.

    If the iteration does not converge within ``max_iter`` (singular or extremely ill-conditioned M) a
    warning is logged and the SVD result is returned (iterations is then reported as ``max_iter``).
    All arithmetic is float64.
    """
    size = _operands(M=(M, "d d"), init=(init, "d d"))["d"]
    tol = _check_positive("tol", tol)
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    M = _float64(M)
    warm_rotation = None
    if init is not None:
        warm_rotation = _orthonormalise_init(_float64(init), tol, max_iter=10)
        target = warm_rotation.T @ M
    else:
        target = M
    scale = _spectral_norm_estimate(target)
    if not math.isfinite(scale) or scale == 0.0:
        raise ValueError("M must be finite and non-zero to have a polar factor")
    iterate = target / (1.01 * scale)
    identity = torch.eye(size, dtype=torch.float64, device=M.device)
    stop_at = math.sqrt(tol)
    for iteration in range(1, int(max_iter) + 1):
        defect = identity - iterate.T @ iterate
        deviation = _max_abs(defect)
        if not math.isfinite(deviation) or deviation > 3.0:
            break  # diverging: a singular value left (0, √3); the SVD fallback below handles it
        iterate = iterate + 0.5 * iterate @ defect
        if deviation < stop_at:
            logger.debug("polar_factor(newton_schulz): converged in %d iterations", iteration)
            rotation = iterate if warm_rotation is None else warm_rotation @ iterate
            return rotation, iteration
    logger.warning("polar_factor(newton_schulz): no convergence in %d iterations (M singular or very "
                   "ill-conditioned); using the SVD", max_iter)
    return _polar_by_svd(M), int(max_iter)


def polar_factor(M: torch.Tensor, method: str = "svd", init: torch.Tensor | None = None, tol: float = 1e-12,
                 max_iter: int = 100) -> torch.Tensor:
    """Orthogonal polar factor R = U Vᵀ of square ``M`` = U Σ Vᵀ (the orthogonal R maximising tr(Rᵀ M)).

    ``method``:

    * ``"svd"``: ``torch.linalg.svd``; exact to rounding, defined (not unique) even for singular M.
    * ``"eigh"``: R = M (MᵀM)^(-1/2) from the eigen-decomposition of MᵀM. Its error grows like eps·κ(M)², so
      when λ_min(MᵀM) ≤ 1e-10·λ_max(MᵀM) (κ(M) ≳ 1e5) it falls back to the SVD.
    * ``"newton_schulz"``: see :func:`polar_factor_newton_schulz`; ``init`` (an orthogonal d×d matrix such
      as the previous rotation) warm-starts it, ``tol``/``max_iter`` control it. ``init``/``tol``/``max_iter``
      are ignored by the other methods.

    Computed in float64 on M's device; returns float64.
    """
    _operands(M=(M, "d d"))
    if method not in POLAR_METHODS:
        raise ValueError(f"method must be one of {POLAR_METHODS}, got {method!r}")
    if method == "newton_schulz":
        return polar_factor_newton_schulz(M, init=init, tol=tol, max_iter=max_iter)[0]
    M = _float64(M)
    if not bool(torch.isfinite(M).all()):
        raise ValueError("M must be finite")
    if method == "svd":
        return _polar_by_svd(M)
    return _polar_by_eigh(M)


# ----------------------------------------------------------------------------------------------------------
# 2. MOSE: orthogonal Procrustes rotation
# ----------------------------------------------------------------------------------------------------------
def preservation_moment(W: torch.Tensor, C: torch.Tensor, lam: float,
                        extra_moment: torch.Tensor | None = None) -> torch.Tensor:
    """The key-space part of MOSE's cross moment: G = W (lam·C + extra_moment) Wᵀ (d×d).

    It costs O(d·p²); after W ← R W it becomes R G Rᵀ (O(d³)), so a sequential caller may propagate it
    (see :func:`propagate_preservation_moment`) instead of rebuilding it every edit.
    """
    _operands(W=(W, "d p"), C=(C, "p p"), extra_moment=(extra_moment, "p p"))
    lam = _check_positive("lam", lam)
    key_moment = lam * _float64(C)
    if extra_moment is not None:
        key_moment = key_moment + _float64(extra_moment)
    W = _float64(W)
    return (W @ key_moment) @ W.T


def propagate_preservation_moment(G: torch.Tensor, R: torch.Tensor, new_outputs: torch.Tensor | None = None,
                                  weight: float = 0.0) -> torch.Tensor:
    """G after W ← R W: R G Rᵀ, plus ``weight``·(R W K)(R W K)ᵀ when the edit's keys join the protected moment
    (``new_outputs`` = R W K, d×n). Equals :func:`preservation_moment` of the new W up to rounding."""
    _operands(G=(G, "d d"), R=(R, "d d"), new_outputs=(new_outputs, "d n"))
    G, R = _float64(G), _float64(R)
    G = R @ G @ R.T
    if new_outputs is not None and weight > 0:
        outputs = _float64(new_outputs)
        G = G + weight * (outputs @ outputs.T)
    return (G + G.T) / 2


def procrustes_cross_moment(W: torch.Tensor, C: torch.Tensor, K: torch.Tensor, V: torch.Tensor, lam: float,
                            extra_moment: torch.Tensor | None = None,
                            preservation: torch.Tensor | None = None) -> torch.Tensor:
    """MOSE's d×d cross moment M = W (lam·C + extra_moment) Wᵀ + V (W K)ᵀ (paper Eq. 18–19, C for K₀K₀ᵀ).

    This is B Aᵀ with A = [√lam W K₀, W K_E], B = [√lam W K₀, V_E]; its polar factor is the Procrustes
    rotation. ``preservation``, if given, is the already computed first term (:func:`preservation_moment`).
    """
    _operands(W=(W, "d p"), K=(K, "p n"), V=(V, "d n"), preservation=(preservation, "d d"))
    if preservation is None:
        preservation = preservation_moment(W, C, lam, extra_moment)
    outputs = _float64(W) @ _float64(K)
    return _float64(preservation) + _float64(V) @ outputs.T


def procrustes_rotation(W: torch.Tensor, C: torch.Tensor, K: torch.Tensor, V: torch.Tensor, lam: float,
                        extra_moment: torch.Tensor | None = None, method: str = "svd",
                        init: torch.Tensor | None = None, preservation: torch.Tensor | None = None) -> torch.Tensor:
    """MOSE rotation (paper Eq. 17–20): R = polar(M), M = W (lam·C + extra_moment) Wᵀ + V (W K)ᵀ.

    Over orthogonal R (d×d), R minimises tr((R − I) W (lam·C + extra_moment) Wᵀ (R − I)ᵀ) + ‖R W K − V‖_F²
    (keep what the generic keys and earlier edits' keys produce, move the new keys to V); apply it as
    W ← R W. ``extra_moment`` (p×p, optional) is the already-weighted accumulated second moment of earlier
    edits' keys. lam must be > 0 (else M can be rank deficient and R arbitrary). ``method``/``init`` are
    passed to :func:`polar_factor`. Returns float64.
    """
    cross_moment = procrustes_cross_moment(W, C, K, V, lam, extra_moment, preservation)
    _operands(M=(cross_moment, "d d"), init=(init, "d d"))
    return polar_factor(cross_moment, method=method, init=init)


def rotation_trust_region(R: torch.Tensor, max_distance: float) -> tuple[torch.Tensor, float]:
    """Shorten the rotation R along its geodesic from I so that ‖R_t − I‖_F ≤ ``max_distance``.

    R_t = exp(t·log R) turns each of R's invariant planes by t·θ instead of θ (same planes, same sense); the
    largest t ∈ [0, 1] within the bound is returned with R_t (t = 1 and R itself when R is already inside).
    With S = (R + Rᵀ)/2 = Σ cos θ_i u_i u_iᵀ and A = (R − Rᵀ)/2 (S and A commute since R is normal),
    R_t = f(S) + g(S) A with f(cos θ) = cos tθ and g(cos θ) = sin tθ / sin θ; ‖R_t − I‖_F² = Σ_i 2 − 2 cos tθ_i
    over the d eigenvalues of S. One symmetric eigendecomposition, float64. A plane turned by π (eigenvalue
    −1) has no unique geodesic; it is shortened as if turned by π − 1e-12.
    """
    _operands(R=(R, "d d"))
    R = _float64(R)
    max_distance = _check_positive("max_distance", max_distance)
    distance = float(torch.linalg.norm(R - torch.eye(R.shape[0], dtype=R.dtype, device=R.device)))
    if distance <= max_distance:
        return R, 1.0
    cosines, U = torch.linalg.eigh((R + R.T) / 2)
    theta = torch.arccos(cosines.clamp(-1.0, 1.0)).clamp(max=math.pi - 1e-12)

    def distance_at(t: float) -> float:
        return float(torch.sqrt((2 - 2 * torch.cos(t * theta)).sum()))

    low, high = 0.0, 1.0
    for _ in range(60):  # distance_at is increasing in t on [0, 1] (every tθ_i ≤ π)
        middle = (low + high) / 2
        low, high = (middle, high) if distance_at(middle) <= max_distance else (low, middle)
    t = low
    sin_theta = torch.sin(theta)
    small = sin_theta < 1e-8
    ratio = torch.where(small, torch.full_like(theta, t), torch.sin(t * theta) / torch.where(small, 1.0, sin_theta))
    f_of_s = (U * torch.cos(t * theta)) @ U.T
    g_of_s = (U * ratio) @ U.T
    return f_of_s + g_of_s @ ((R - R.T) / 2), t


def procrustes_diagnostics(W: torch.Tensor, K: torch.Tensor, V: torch.Tensor, R: torch.Tensor) -> dict:
    """Floats describing one MOSE edit (all norms Frobenius, computed in float64):

    * ``rho`` = ‖V − W K‖ / ‖W K‖ (requested change relative to the current output; a rotation cannot change
      ‖W k‖, so large rho means part of the residual is unreachable),
    * ``target_norm_ratio`` = ‖V‖ / ‖W K‖ (1 is what a rotation can deliver),
    * ``fit_error`` = ‖R W K − V‖ / ‖V − W K‖ (0 = every target met, 1 = no progress),
    * ``rotation_distance`` = ‖R − I‖,
    * ``orthogonality_error`` = ‖Rᵀ R − I‖ (Frobenius, not max-abs).

    A ratio whose denominator is zero is reported as nan.
    """
    out_dim = _operands(W=(W, "d p"), K=(K, "p n"), V=(V, "d n"), R=(R, "d d"))["d"]
    outputs = _float64(W) @ _float64(K)
    V = _float64(V)
    R = _float64(R)
    identity = torch.eye(out_dim, dtype=torch.float64, device=R.device)

    def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
        top, bottom = float(torch.linalg.norm(numerator)), float(torch.linalg.norm(denominator))
        return top / bottom if bottom > 0 else float("nan")

    residual = V - outputs
    return {
        "rho": ratio(residual, outputs),
        "target_norm_ratio": ratio(V, outputs),
        "fit_error": ratio(R @ outputs - V, residual),
        "rotation_distance": float(torch.linalg.norm(R - identity)),
        "orthogonality_error": float(torch.linalg.norm(R.T @ R - identity)),
    }


# ----------------------------------------------------------------------------------------------------------
# 3.–4. MEMIT and EMMET
# ----------------------------------------------------------------------------------------------------------
def cholesky_factor(C: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor of C in float64, or None when C is not (numerically) positive definite."""
    factor, info = torch.linalg.cholesky_ex(_float64(C))
    return factor if int(info) == 0 else None


def memit_delta(Rsd: torch.Tensor, K: torch.Tensor, C: torch.Tensor, lam: float,
                factor: torch.Tensor | None = None) -> torch.Tensor:
    """MEMIT: ΔW = Rsd Kᵀ (lam·C + K Kᵀ)⁻¹ (d×p), by a linear solve in float64, never an inverse.

    ΔW satisfies the normal equations ΔW (lam·C + K Kᵀ) = Rsd Kᵀ. lam must be > 0. With ``factor`` (C's
    Cholesky factor, :func:`cholesky_factor`, computed once per run) the same ΔW comes from the push-through
    identity Kᵀ (lam·C + K Kᵀ)⁻¹ = (I + Kᵀ (lam·C)⁻¹ K)⁻¹ Kᵀ (lam·C)⁻¹ at O(p²n) instead of O(p³).
    """
    _operands(Rsd=(Rsd, "d n"), K=(K, "p n"), C=(C, "p p"), factor=(factor, "p p"))
    lam = _check_positive("lam", lam)
    K = _float64(K)
    if factor is None:
        system = lam * _float64(C) + K @ K.T
        # ΔW A = Rsd Kᵀ  ⇔  ΔW = solve from the right
        return torch.linalg.solve(system, _float64(Rsd) @ K.T, left=False)
    whitened = torch.cholesky_solve(K, factor) / lam               # (lam·C)⁻¹ K  (p×n)
    gram = K.T @ whitened
    gram = 0.5 * (gram + gram.T) + torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return torch.linalg.solve(gram, _float64(Rsd), left=False) @ whitened.T


def emmet_delta(Rsd: torch.Tensor, K: torch.Tensor, C: torch.Tensor, ridge: float,
                factor: torch.Tensor | None = None) -> torch.Tensor:
    """EMMET: ΔW = Rsd (Kᵀ C⁻¹ K + ridge·I)⁻¹ Kᵀ C⁻¹ (d×p), float64, solves only.

    Minimises tr(ΔW C ΔWᵀ) subject to (W + ΔW) K = W K + Rsd; ridge ≥ 0 relaxes the constraint (ridge → 0
    meets it exactly when Kᵀ C⁻¹ K is invertible). C must be symmetric positive definite; scale it
    beforehand if the ridge is meant relative to a scaled C (EMMET's λ_m only enters as ridge = λ_m·λ_e).
    ``factor``: C's Cholesky factor (:func:`cholesky_factor`), to solve with C in O(p²n).
    """
    _operands(Rsd=(Rsd, "d n"), K=(K, "p n"), C=(C, "p p"), factor=(factor, "p p"))
    ridge = _check_positive("ridge", ridge, allow_zero=True)
    K = _float64(K)
    if factor is None:
        whitened_keys = torch.linalg.solve(_float64(C), K)        # C⁻¹ K  (p×n)
    else:
        whitened_keys = torch.cholesky_solve(K, factor)
    gram = K.T @ whitened_keys                                    # Kᵀ C⁻¹ K (n×n)
    gram = 0.5 * (gram + gram.T)
    gram = gram + ridge * torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    # Rsd (gram)⁻¹ (C⁻¹K)ᵀ ; (C⁻¹K)ᵀ = Kᵀ C⁻¹ for symmetric C
    return torch.linalg.solve(gram, _float64(Rsd), left=False) @ whitened_keys.T


# ----------------------------------------------------------------------------------------------------------
# 5.–6. AlphaEdit
# ----------------------------------------------------------------------------------------------------------
def null_space_projector(C: torch.Tensor, threshold: float = 2e-2) -> torch.Tensor:
    """AlphaEdit's projector P = Û Ûᵀ (p×p) onto C's eigenvectors whose eigenvalue is < ``threshold``.

    C = U diag(s) Uᵀ by ``torch.linalg.eigh`` in float64 (C symmetric PSD, so these are its singular
    vectors too); the threshold is absolute. Returns float64.
    """
    _operands(C=(C, "p p"))
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    C = _float64(C)
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (C + C.T))
    kept = eigenvectors[:, eigenvalues < threshold]
    return kept @ kept.T


def alphaedit_delta(Rsd: torch.Tensor, K: torch.Tensor, P: torch.Tensor, prior_moment: torch.Tensor,
                    l2: float, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """AlphaEdit: ΔW = Rsd Kᵀ P ((K Kᵀ + prior_moment) P + l2·I)⁻¹ (d×p).

    ``prior_moment`` = K_p K_pᵀ (p×p) accumulated over earlier batches (see :func:`alphaedit_grow_moment`).
    Computed in ``compute_dtype`` (float32 by default, as AlphaEdit does) with a solve; the result is then
    returned as float64 like every rule here, but carries float32 accuracy. With l2 > 0 the update lies in
    P's range: ΔW (I − P) = 0, because P (I − P) = 0.
    """
    _operands(Rsd=(Rsd, "d n"), K=(K, "p n"), P=(P, "p p"), prior_moment=(prior_moment, "p p"))
    l2 = _check_positive("l2", l2)
    if not compute_dtype.is_floating_point:
        raise ValueError(f"compute_dtype must be a floating dtype, got {compute_dtype}")
    K = K.to(compute_dtype)
    P = P.to(compute_dtype)
    system = (K @ K.T + prior_moment.to(compute_dtype)) @ P
    system.diagonal().add_(l2)
    right_side = (Rsd.to(compute_dtype) @ K.T) @ P
    return torch.linalg.solve(system, right_side, left=False).to(torch.float64)


def alphaedit_grow_moment(prior_moment: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """AlphaEdit's carried state after a batch: prior_moment + K Kᵀ (p×p, float64)."""
    _operands(prior_moment=(prior_moment, "p p"), K=(K, "p n"))
    K = _float64(K)
    return _float64(prior_moment) + K @ K.T


def alphaedit_inverse(prior_moment: torch.Tensor, P: torch.Tensor, l2: float) -> torch.Tensor:
    """A⁻¹ = (K_p K_pᵀ P + l2·I)⁻¹ (p×p, float64): the start of AlphaEdit's carried inverse (an inverse of the
    identity-shifted product of two PSD matrices, whose eigenvalues are real and ≥ l2)."""
    _operands(prior_moment=(prior_moment, "p p"), P=(P, "p p"))
    l2 = _check_positive("l2", l2)
    A = _float64(prior_moment) @ _float64(P)
    A.diagonal().add_(l2)
    return torch.linalg.inv(A)


def alphaedit_carried_delta(Rsd: torch.Tensor, K: torch.Tensor, P: torch.Tensor,
                            inverse: torch.Tensor) -> torch.Tensor:
    """AlphaEdit's ΔW (the value of :func:`alphaedit_delta`) from the carried A⁻¹ (:func:`alphaedit_inverse`),
    in O(p²n) instead of a p×p product and solve: with G = KᵀP and B = G A⁻¹,

        ΔW = Rsd G (A + K G)⁻¹ = Rsd (I_n + B K)⁻¹ B            (push-through identity), float64.
    """
    _operands(Rsd=(Rsd, "d n"), K=(K, "p n"), P=(P, "p p"), inverse=(inverse, "p p"))
    K = _float64(K)
    B = (K.T @ _float64(P)) @ _float64(inverse)
    small = B @ K
    small.diagonal().add_(1.0)
    return _float64(Rsd) @ torch.linalg.solve(small, B)


def alphaedit_grow_inverse(inverse: torch.Tensor, K: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """The carried inverse after a batch, (A + K KᵀP)⁻¹ from A⁻¹ by the Woodbury identity in O(p²n), float64:

        (A + K G)⁻¹ = A⁻¹ − A⁻¹K (I_n + G A⁻¹ K)⁻¹ G A⁻¹,   G = KᵀP.
    """
    _operands(inverse=(inverse, "p p"), K=(K, "p n"), P=(P, "p p"))
    inverse, K = _float64(inverse), _float64(K)
    right = (K.T @ _float64(P)) @ inverse       # G A⁻¹ (n×p)
    left = inverse @ K                          # A⁻¹ K (p×n)
    small = right @ K
    small.diagonal().add_(1.0)
    return inverse - left @ torch.linalg.solve(small, right)


# ----------------------------------------------------------------------------------------------------------
# 7. RECT
# ----------------------------------------------------------------------------------------------------------
def rect_kept_count(numel: int, keep_fraction: float) -> int:
    """Entries RECT keeps: round(keep_fraction·numel), halves rounded up, at least 1 (never above numel)."""
    fraction = float(keep_fraction)
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
    return min(int(numel), max(1, math.floor(fraction * int(numel) + 0.5)))


def rect_sparsify(delta: torch.Tensor, W: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """RECT: keep the entries of ``delta`` with the largest relative change |ΔW_ij| / |W_ij|, zero the rest.

    Exactly :func:`rect_kept_count` (round(keep_fraction·numel), halves up, ≥ 1) entries are kept; ties are
    broken arbitrarily by ``torch.topk``. Where W_ij = 0 the denominator is a tiny eps (1e-30), so any
    non-zero change there ranks as a very large relative change. W is the weight the delta is added to.
    Returns float64.
    """
    _operands(delta=(delta, "d p"), W=(W, "d p"))
    kept_count = rect_kept_count(delta.numel(), keep_fraction)
    delta = _float64(delta)
    relative_change = delta.abs() / (_float64(W).abs() + _RELATIVE_CHANGE_EPS)
    kept_positions = torch.topk(relative_change.flatten(), kept_count, sorted=False).indices
    sparse = torch.zeros_like(delta).flatten()
    sparse[kept_positions] = delta.flatten()[kept_positions]
    return sparse.view_as(delta)


# ----------------------------------------------------------------------------------------------------------
# 8. PRUNE
# ----------------------------------------------------------------------------------------------------------
def gram_spectrum(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(σ, U, wide)`` of a d×p matrix from the eigendecomposition of its smaller Gram matrix (ΔW ΔWᵀ when
    ``wide``, d ≤ p, else ΔWᵀ ΔW), float64: the singular values in ascending order and the matching singular
    vectors on the smaller side. Cheaper than an SVD and accurate for the large, well-separated values."""
    _operands(matrix=(matrix, "d p"))
    matrix = _float64(matrix)
    wide = matrix.shape[0] <= matrix.shape[1]
    eigenvalues, vectors = torch.linalg.eigh(matrix @ matrix.T if wide else matrix.T @ matrix)
    return eigenvalues.clamp(min=0).sqrt(), vectors, wide


def prune_restrain(delta_total: torch.Tensor, sigma_max_w0: float,
                   log: Callable[[float], float] = math.log) -> torch.Tensor:
    """PRUNE: restrain the accumulated ΔW = W_n − W_0 by F applied to its singular values.

    ΔW = U Σ Vᵀ, σ̄ = ``sigma_max_w0`` = σ_max(W_0) > 0;
    F(σ) = log(σ) − log(σ̄) + σ̄ for σ ≥ σ̄, F(σ) = σ otherwise; returns U diag(F(σ)) Vᵀ (float64).
    ``log`` is applied to Python floats (natural log by default). F is continuous and F(σ) ≤ σ.

    Only the singular pairs with σ ≥ σ̄ change, so no SVD is needed: from the eigen-decomposition of the smaller
    Gram matrix (ΔW ΔWᵀ = U Σ² Uᵀ when d ≤ p), U diag(F(σ)) Vᵀ = ΔW + U_L diag(F(σ_L)/σ_L − 1) U_Lᵀ ΔW over the
    large pairs L (the pairs at or above σ̄ are the well-separated top of the spectrum, where the Gram matrix
    loses no accuracy).
    """
    threshold = _check_positive("sigma_max_w0", sigma_max_w0)
    sigmas, vectors, wide = gram_spectrum(delta_total)
    delta_total = _float64(delta_total)
    large = sigmas >= threshold
    if not bool(large.any()):
        return delta_total.clone()
    log_threshold = float(log(threshold))
    scale = torch.tensor([(float(log(value)) - log_threshold + threshold) / value - 1.0
                          for value in sigmas[large].tolist()], dtype=torch.float64, device=sigmas.device)
    basis = vectors[:, large]
    if wide:
        return delta_total + (basis * scale) @ (basis.T @ delta_total)
    return delta_total + (delta_total @ basis) @ (basis * scale).T


# ----------------------------------------------------------------------------------------------------------
# 9. ROME
# ----------------------------------------------------------------------------------------------------------
def rome_delta(W: torch.Tensor, k_star: torch.Tensor, k_mean: torch.Tensor, v_star: torch.Tensor,
               C: torch.Tensor | None = None) -> torch.Tensor:
    """ROME rank-one update ΔW = (v* − W k*) uᵀ / (uᵀ k*), u = C⁻¹ k̄ (a solve) if C is given else k̄.

    Shapes: W (d×p), k_star and k_mean (p,), v_star (d,), C (p×p). Then (W + ΔW) k* = v* exactly (up to
    rounding). Raises ValueError if uᵀ k* = 0. Float64.
    """
    _operands(W=(W, "d p"), k_star=(k_star, "p"), k_mean=(k_mean, "p"), v_star=(v_star, "d"), C=(C, "p p"))
    k_star = _float64(k_star)
    direction = _float64(k_mean)
    if C is not None:
        direction = torch.linalg.solve(_float64(C), direction)
    denominator = float(direction @ k_star)
    if denominator == 0.0 or not math.isfinite(denominator):
        raise ValueError(f"uᵀ k_star must be finite and non-zero, got {denominator}")
    residual = _float64(v_star) - _float64(W) @ k_star
    return torch.outer(residual, direction) / denominator


__all__ = [
    "POLAR_METHODS",
    "polar_factor",
    "polar_factor_newton_schulz",
    "procrustes_cross_moment",
    "procrustes_rotation",
    "procrustes_diagnostics",
    "memit_delta",
    "emmet_delta",
    "null_space_projector",
    "alphaedit_delta",
    "alphaedit_grow_moment",
    "alphaedit_inverse",
    "alphaedit_carried_delta",
    "alphaedit_grow_inverse",
    "rect_kept_count",
    "rect_sparsify",
    "prune_restrain",
    "rome_delta",
]
