"""Unit-importance estimation: regress sub-model utility on the sub-model masks (Bonsai, Sec. 3).

Bonsai measures the utility U (e.g. -perplexity) of a few hundred random sub-models, each a 0/1 mask over the
prunable units, and fits the linear surrogate U ~ b0 + X.beta; a unit's coefficient beta_j is its estimated
marginal contribution to U, so pruning removes the lowest-beta units. The paper's estimator (``lasso_cv``) is
an L1-penalised least-squares fit, because with more units than sub-models the problem is under-determined and
the L1 penalty yields a stable, sparse attribution; its penalty is chosen by k-fold cross-validation on the
Kendall rank correlation between predicted and measured U, because only the *ranking* of sub-models (hence of
units) matters for pruning, not the calibration of U. The lasso is solved by coordinate descent with a growing
working set (the support of a lasso solution is small, at most n_samples), warm-started along a log-spaced
penalty path, which keeps 200 x 2000 problems within seconds without scipy/sklearn. ``ridge`` is a cheap
closed-form alternative (one SVD, penalty chosen by generalised cross-validation) for CPU-friendly runs. An
optional prior score (e.g. Wanda) orders units whose betas are exactly tied, without changing any other order.

``prior_scaled`` is for the few-sub-model regime (tens of samples against thousands of units), where a free
coefficient per unit is mostly noise. It trusts the prior *within* a module (one layer's attention or MLP) and
learns from the utilities only what the prior cannot know: how much a unit of each kind, and of each module, is
worth. beta_j = (a_kind + c_module) * prior_j / mean prior of the module's candidates, where a_kind (2 numbers)
is a least-squares fit on the kept prior mass per kind, and c_module (one per module) a GCV ridge fit of what
is left on the kept prior mass per module. Measured on SmolLM2-135M (benchmarks/results/regression_variants*):
the Wanda prior alone ranks units across layers no better than chance, and per-unit ridge is noisy.
"""

from __future__ import annotations

import numpy as np

from bonsai.errors import BonsaiError

__all__ = ["METHODS", "estimate_importance", "kendall_tau"]

METHODS = ("lasso_cv", "ridge", "prior_scaled")

_N_ALPHAS = 12
_ALPHA_MIN_RATIO = 1e-3
# Relative CD tolerance: largest coefficient change vs largest coefficient, or duality gap vs ||y||^2 / n.
_TOL = 1e-6
# Sweep caps per working-set solve. They bind only at the near-interpolating end of the path (support ~ n),
# where CD drifts along almost-flat directions of the Gram matrix; there the duality gap at the CV cap was
# measured at ~1e-5 * ||y||^2 / n, so held-out predictions (all CV uses) have converged. The final refit,
# whose coefficients are the answer, gets the larger cap.
_MAX_SWEEPS_CV = 200
_MAX_SWEEPS_REFIT = 1000
_CG_ITERS = 40  # an approximate Newton direction suffices; measured fastest overall between 25 and 50
_NEWTON_AFTER = 2  # most working-set solves converge in a few plain sweeps; a k x k solve is dearer
_CV_TIE = 1e-12  # CV scores this close count as tied (summation order must not flip the choice)
_N_RIDGE_LAMBDAS = 60


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall tau-b of two equal-length 1-D arrays (ties handled as in scipy.stats.kendalltau).

    O(n^2) memory and time, which is fine for the few hundred sub-models Bonsai uses. Returns NaN when either
    input is constant (no pair is untied, so the correlation is undefined) or has fewer than 2 elements.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise BonsaiError(f"kendall_tau needs equal-length inputs, got {x.size} and {y.size}")
    n = x.size
    if n < 2:
        return float("nan")
    iu = np.triu_indices(n, k=1)
    sx = np.sign(x[:, None] - x[None, :])[iu]
    sy = np.sign(y[:, None] - y[None, :])[iu]
    # sum(sx^2) = pairs untied in x (n0 - n1), likewise for y: exactly the tau-b denominator terms.
    denom = float(np.sqrt(np.sum(sx * sx) * np.sum(sy * sy)))
    if denom == 0.0:
        return float("nan")
    return float(np.sum(sx * sy) / denom)


def estimate_importance(
    masks: np.ndarray,
    utilities: np.ndarray,
    method: str,
    *,
    seed: int,
    cv_folds: int = 5,
    prior: np.ndarray | None = None,
    modules: np.ndarray | None = None,
    kinds: np.ndarray | None = None,
    costs: np.ndarray | None = None,
) -> np.ndarray:
    """Per-unit importance beta (float64, shape (n_units,)) from sub-model masks and their utilities.

    ``masks`` is (n_samples, n_units) of 0/1 (1 = unit kept); ``utilities`` is (n_samples,), higher = better.
    ``method`` is ``lasso_cv`` (L1 fit, penalty by ``cv_folds``-fold CV on Kendall tau, folds drawn from
    ``seed``) or ``ridge`` (closed form, penalty by GCV). Units that never vary across samples get beta 0.
    ``prior`` (higher = more important) breaks exact ties in beta. ``prior_scaled`` also needs ``modules`` and
    ``kinds`` (integer ids per unit: its layer-and-kind module, its kind), ``costs`` (parameters per unit) and a
    non-negative prior. Deterministic for fixed inputs.
    """
    X, y = _validate(masks, utilities, method, cv_folds, prior)
    if method == "lasso_cv":
        beta = _lasso_cv(X, y, seed=seed, cv_folds=cv_folds)
    elif method == "ridge":
        beta = _ridge_gcv(X, y)
    else:
        beta = _prior_scaled(X, y, *_validate_groups(prior, modules, kinds, costs, X.shape[1]))
    if prior is None:
        return beta
    return _prior_tiebreak(beta, np.asarray(prior, dtype=np.float64))


# ----------------------------------------------------------------------------------------------------
# validation


def _validate(
    masks: np.ndarray, utilities: np.ndarray, method: str, cv_folds: int, prior: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    if method not in METHODS:
        raise BonsaiError(f"unknown regression method {method!r}; valid: {', '.join(METHODS)}")
    X = np.asarray(masks)
    y = np.asarray(utilities)
    if X.ndim != 2:
        raise BonsaiError(f"masks must be 2-D (n_samples, n_units), got shape {X.shape}")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise BonsaiError(
            f"utilities must have shape ({X.shape[0]},) to match masks {X.shape}, got {y.shape}"
        )
    n, p = X.shape
    if p < 1:
        raise BonsaiError("masks have no units (n_units = 0)")
    if n < 4:
        raise BonsaiError(f"need at least 4 sampled sub-models to estimate importance, got {n}")
    try:
        X = X.astype(np.float64)
        y = y.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise BonsaiError(f"masks and utilities must be numeric: {exc}") from None
    if not np.all(np.isfinite(y)):
        raise BonsaiError(f"utilities contain NaN or inf ({int(np.sum(~np.isfinite(y)))} of {n})")
    if not np.all((X == 0.0) | (X == 1.0)):
        raise BonsaiError("masks must contain only 0/1 values")
    if method == "lasso_cv" and not (
        isinstance(cv_folds, (int, np.integer)) and not isinstance(cv_folds, bool) and 2 <= cv_folds <= n
    ):
        raise BonsaiError(f"cv_folds must be between 2 and n_samples={n} for lasso_cv, got {cv_folds}")
    if prior is not None:
        pr = np.asarray(prior)
        if pr.shape != (p,):
            raise BonsaiError(f"prior must have shape ({p},) to match masks {X.shape}, got {pr.shape}")
        try:
            finite = bool(np.all(np.isfinite(pr.astype(np.float64))))
        except (TypeError, ValueError):
            raise BonsaiError("prior must be numeric") from None
        if not finite:
            raise BonsaiError("prior contains NaN or inf")
    return X, y


# ----------------------------------------------------------------------------------------------------
# lasso


def _standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred, unit-variance columns; constant columns are zeroed (scale 1) so they can never enter."""
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    varying = std > 0.0
    scale = np.where(varying, std, 1.0)
    Xs = (X - mean) / scale
    Xs[:, ~varying] = 0.0
    return Xs, scale, varying


def _cd_working_set(
    G: np.ndarray, c: np.ndarray, yy: float, w: np.ndarray, alpha: float, rank: int, max_sweeps: int
) -> None:
    """Cyclic coordinate descent on 1/2 w'Gw - c'w + alpha |w|_1, in place on ``w``.

    ``G = X'X/n`` and ``c = X'y/n`` over the working set, ``yy = y'y/n``, ``rank`` bounds rank(G) (n - 1 for
    centred data). Covariance form: q = G w is kept current, so one update costs O(k) for a working set of
    size k and never touches the n x p data; Python scalars for the per-coordinate arithmetic because numpy's
    per-call overhead dominates at these sizes. Stops when the largest coefficient change is below _TOL of the
    largest coefficient, or when the duality gap is below _TOL * yy: near-interpolating fits (small alpha,
    support near n) drift along almost-flat directions of G for hundreds of sweeps while the objective and
    the predictions no longer move, and the gap certifies that. Newton steps on the current support
    (``_orthant_newton``) between sweeps finish the well-conditioned fits in a few sweeps.
    """
    k = c.shape[0]
    rows = list(G)  # row views; G is symmetric so a row is the column we need
    diag = np.diag(G).tolist()
    cl = c.tolist()
    newton_wait = _NEWTON_AFTER  # sweeps to skip before the next Newton attempt; doubles after useless ones
    newton_backoff = 1
    q = G @ w
    for sweep in range(max_sweeps):
        if sweep % 64 == 63:
            q = G @ w  # the incremental updates accumulate rounding error over many sweeps
        wl = w.tolist()
        max_d = 0.0
        max_w = 0.0
        for j in range(k):
            wj = wl[j]
            gjj = diag[j]
            z = cl[j] - float(q[j]) + gjj * wj
            if z > alpha:
                new = (z - alpha) / gjj
            elif z < -alpha:
                new = (z + alpha) / gjj
            else:
                new = 0.0
            if new != wj:
                d = new - wj
                q += rows[j] * d
                wl[j] = new
                if abs(d) > max_d:
                    max_d = abs(d)
            if abs(new) > max_w:
                max_w = abs(new)
        w[:] = wl
        if max_d <= _TOL * max_w or _duality_gap(c, yy, w, q, alpha) <= _TOL * yy:
            break
        if newton_wait > 0:
            newton_wait -= 1
        elif np.count_nonzero(w) <= rank:  # a larger support makes G_SS singular: no Newton step exists
            if _orthant_newton(G, c, w, alpha):
                newton_backoff = 1
                q = G @ w
            else:
                newton_wait = newton_backoff
                newton_backoff *= 2


def _duality_gap(c: np.ndarray, yy: float, w: np.ndarray, gw: np.ndarray, alpha: float) -> float:
    """Lasso duality gap (objective 1/(2n)||y - Xw||^2 + alpha|w|_1) from Gram quantities (gw = G w) only.

    Same dual point as sklearn's coordinate descent: the residual, rescaled to be dual-feasible.
    """
    wc = float(w @ c)
    r2 = max(yy - 2.0 * wc + float(w @ gw), 0.0)  # ||y - Xw||^2 / n
    dual_norm = float(np.max(np.abs(c - gw)))  # ||X'(y - Xw)||_inf / n
    const = alpha / dual_norm if dual_norm > alpha else 1.0
    return 0.5 * r2 * (1.0 + const * const) + alpha * float(np.sum(np.abs(w))) - const * (yy - wc)


def _lasso_objective(G: np.ndarray, c: np.ndarray, w: np.ndarray, alpha: float) -> float:
    return float(0.5 * w @ (G @ w) - c @ w + alpha * np.sum(np.abs(w)))


def _conjugate_gradient(A: np.ndarray, b: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """Approximate solution of A x = b (A symmetric PSD) by CG from x0, at most _CG_ITERS iterations.

    Why not np.linalg.solve: LAPACK's LU is multithreaded from k ~ 100 on, and on an oversubscribed machine
    each call then costs tens of milliseconds; CG needs only matrix-vector products (single-threaded at these
    sizes) and starts next to the answer, since CD has already brought x0 close. An inexact solution is fine:
    a CG iterate minimises the quadratic on a subspace containing the segment from x0, so the caller's
    monotone line search and objective check stay valid.
    """
    x = x0.copy()
    r = b - A @ x
    d = r.copy()
    rr = float(r @ r)
    stop = (1e-12 * float(np.sqrt(b @ b))) ** 2
    for _ in range(_CG_ITERS):
        if rr <= stop:
            break
        Ad = A @ d
        dAd = float(d @ Ad)
        if dAd <= 0.0:  # singular direction: no further progress possible along it
            break
        step = rr / dAd
        x += step * d
        r -= step * Ad
        rr_new = float(r @ r)
        d = r + (rr_new / rr) * d
        rr = rr_new
    return x


def _orthant_newton(G: np.ndarray, c: np.ndarray, w: np.ndarray, alpha: float) -> bool:
    """Feature-sign step (Lee et al. 2007), in place: move w toward the exact minimiser for its current signs.

    Inside the orthant fixed by sign(w) the objective is a smooth quadratic whose minimiser on the support is
    G_SS^-1 (c_S - alpha sign(w_S)) (approximated by CG); moving along the segment towards it decreases the
    objective monotonically as long as no sign flips, so we stop at the first zero crossing (that coordinate
    becomes 0). The step is kept only if the objective really decreased, which guards against a near-singular
    G_SS. Returns whether it moved w.
    """
    sup = np.flatnonzero(w)
    if sup.size == 0:
        return False
    s = np.sign(w[sup])
    target = _conjugate_gradient(G[np.ix_(sup, sup)], c[sup] - alpha * s, w[sup])
    if not np.all(np.isfinite(target)):
        return False
    cur = w[sup]
    step = target - cur
    crossing = np.sign(target) != s  # then step has sign -s and is nonzero
    t = 1.0
    hit = -1
    if np.any(crossing):
        # Fraction of the step at which each crossing coordinate reaches 0; the earliest one binds.
        frac = np.full(sup.size, np.inf)
        frac[crossing] = cur[crossing] / -step[crossing]
        hit = int(np.argmin(frac))
        t = float(frac[hit])
    new_sup = cur + t * step
    if hit >= 0:
        new_sup[hit] = 0.0
    new_sup[np.sign(new_sup) != s] = 0.0  # rounding can carry a coordinate just past zero
    cand = w.copy()
    cand[sup] = new_sup
    if _lasso_objective(G, c, cand, alpha) < _lasso_objective(G, c, w, alpha):
        w[:] = cand
        return True
    return False


def _lasso_path(Xs: np.ndarray, y: np.ndarray, alphas: np.ndarray, max_sweeps: int) -> np.ndarray:
    """Lasso coefficients (standardised scale) for each alpha (descending), warm-started along the path.

    Objective: 1/(2n) ||y - Xs w||^2 + alpha ||w||_1 with y centred. Each alpha is solved on a working set
    (current support plus the worst KKT violators), re-checking KKT on all units after every inner solve; the
    set grows geometrically so few rounds are needed, and it stays near the support size (<= n), which is
    what makes p >> n affordable.
    """
    n, p = Xs.shape
    yy = float(y @ y) / n
    coefs = np.zeros((alphas.shape[0], p))
    w = np.zeros(p)
    grad = Xs.T @ y / n  # -d/dw of the smooth part, at the current w
    for i, alpha in enumerate(alphas):
        ws = np.flatnonzero(w)
        for _ in range(p + 1):
            if ws.size:
                Xw = Xs[:, ws]
                ww = w[ws].copy()
                _cd_working_set(Xw.T @ Xw / n, Xw.T @ y / n, yy, ww, float(alpha), n - 1, max_sweeps)
                w[:] = 0.0
                w[ws] = ww
                grad = Xs.T @ (y - Xw @ ww) / n
            viol_mask = np.abs(grad) > alpha * (1.0 + 1e-9)
            viol_mask[ws] = False
            viol = np.flatnonzero(viol_mask)
            if viol.size == 0:
                break
            n_add = max(10, ws.size)
            if viol.size > n_add:
                # Stable sort on -|grad| so equal violations are taken in index order (determinism).
                viol = viol[np.argsort(-np.abs(grad[viol]), kind="stable")[:n_add]]
            ws = np.union1d(ws, viol)
        coefs[i] = w
    return coefs


def _alpha_grid(Xs: np.ndarray, y: np.ndarray) -> np.ndarray:
    alpha_max = float(np.max(np.abs(Xs.T @ y))) / Xs.shape[0]
    return alpha_max * np.logspace(0.0, np.log10(_ALPHA_MIN_RATIO), _N_ALPHAS)


def _lasso_cv(X: np.ndarray, y: np.ndarray, *, seed: int, cv_folds: int) -> np.ndarray:
    n, p = X.shape
    Xs, scale, varying = _standardise(X)
    yc = y - y.mean()
    # Constant utilities (ptp, not yc, which keeps rounding noise) or no varying unit: nothing to attribute.
    if np.ptp(y) == 0.0 or not np.any(varying) or not np.any(Xs.T @ yc):
        return np.zeros(p)
    alphas = _alpha_grid(Xs, yc)

    perm = np.random.default_rng(seed).permutation(n)
    folds = np.array_split(perm, cv_folds)
    scores = np.zeros((cv_folds, alphas.shape[0]))
    for f, test_idx in enumerate(folds):
        train = np.ones(n, dtype=bool)
        train[test_idx] = False
        Xtr, ytr = X[train], y[train]
        mean = Xtr.mean(axis=0)
        Xtr_s, scale_tr, varying_tr = _standardise(Xtr)
        path = _lasso_path(Xtr_s, ytr - ytr.mean(), alphas, _MAX_SWEEPS_CV)
        # Units constant in training have no coefficient; zero them so their held-out values can't leak in.
        Xte_s = (X[test_idx] - mean) / scale_tr
        Xte_s[:, ~varying_tr] = 0.0
        preds = Xte_s @ path.T  # (n_test, n_alphas); the intercept is irrelevant to a rank correlation
        for a in range(alphas.shape[0]):
            tau = kendall_tau(preds[:, a], y[test_idx])
            # An all-zero (constant) prediction, or a held-out fold too small or too flat to rank, carries
            # no ranking information: score it as chance.
            scores[f, a] = 0.0 if np.isnan(tau) else tau
    mean_scores = scores.mean(axis=0)
    # alphas are descending, so the first index within the tie tolerance is the largest (sparsest) alpha.
    best = int(np.flatnonzero(mean_scores >= mean_scores.max() - _CV_TIE)[0])

    full_path = _lasso_path(Xs, yc, alphas[: best + 1], _MAX_SWEEPS_REFIT)
    w = full_path[best]
    if not np.any(w):
        # Pruning needs a ranking; the least-penalised fit is the one most likely to give one.
        w = _lasso_path(Xs, yc, alphas, _MAX_SWEEPS_REFIT)[-1]
    return w / scale


# ----------------------------------------------------------------------------------------------------
# ridge


def _ridge_gcv(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Ridge on standardised, centred data; lambda minimises GCV over a log grid, all from one thin SVD."""
    n, p = X.shape
    Xs, scale, varying = _standardise(X)
    yc = y - y.mean()
    beta = np.zeros(p)
    if not np.any(varying) or np.ptp(y) == 0.0:
        return beta
    # Constant columns are left out of the SVD so their beta is exactly 0, not rounding noise.
    U, s, Vt = np.linalg.svd(Xs[:, varying], full_matrices=False)
    keep = s > s[0] * 1e-12
    U, s, Vt = U[:, keep], s[keep], Vt[keep]
    uy = U.T @ yc
    rss_out = max(float(yc @ yc - uy @ uy), 0.0)  # part of y outside the column space: never fitted
    s2 = s * s
    lambdas = s2[0] * np.logspace(-6.0, 3.0, _N_RIDGE_LAMBDAS)[::-1]  # descending: larger penalty first
    shrink = lambdas[:, None] / (s2[None, :] + lambdas[:, None])  # (n_lambda, rank): 1 - hat eigenvalues
    rss = rss_out + np.sum((shrink * uy[None, :]) ** 2, axis=1)
    df = np.sum(1.0 - shrink, axis=1) + 1.0  # +1 for the intercept removed by centring
    resid_df = n - df
    with np.errstate(divide="ignore", invalid="ignore"):
        gcv = np.where(resid_df > 0.0, n * rss / resid_df**2, np.inf)
    best = int(np.flatnonzero(gcv <= gcv.min() * (1.0 + _CV_TIE))[0]) if np.isfinite(gcv.min()) else 0
    lam = lambdas[best]
    beta[varying] = (Vt.T @ (s / (s2 + lam) * uy)) / scale[varying]
    return beta


# ----------------------------------------------------------------------------------------------------
# prior_scaled


def _validate_groups(
    prior: np.ndarray | None,
    modules: np.ndarray | None,
    kinds: np.ndarray | None,
    costs: np.ndarray | None,
    p: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if prior is None or modules is None or kinds is None or costs is None:
        raise BonsaiError("prior_scaled needs the prior and the module, kind and cost of every unit")
    pr = np.asarray(prior, dtype=np.float64)
    if np.any(pr < 0):
        raise BonsaiError("prior_scaled needs a non-negative prior (wanda, fluctuation, magnitude or random)")
    cost = np.asarray(costs, dtype=np.float64)
    if cost.shape != (p,) or not np.all(cost > 0):
        raise BonsaiError(f"costs must be {p} positive parameter counts, got shape {cost.shape}")
    groups = []
    for name, ids in (("modules", modules), ("kinds", kinds)):
        ids = np.asarray(ids)
        if ids.shape != (p,) or not np.issubdtype(ids.dtype, np.integer) or (p and ids.min() < 0):
            raise BonsaiError(f"{name} must be {p} non-negative integer ids, got shape {ids.shape} ({ids.dtype})")
        groups.append(ids)
    return pr, groups[0], groups[1], cost


def _kept_mass(X: np.ndarray, weight: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(n_samples, n_groups): per sub-model, the summed weight of the kept units of each group."""
    onehot = np.zeros((X.shape[1], int(groups.max()) + 1))
    onehot[np.arange(X.shape[1]), groups] = weight
    return X @ onehot


def _prior_scaled(
    X: np.ndarray, y: np.ndarray, prior: np.ndarray, modules: np.ndarray, kinds: np.ndarray, costs: np.ndarray
):
    """beta_j = (a_kind + c_module) * relative prior; see the module docstring."""
    module_mean = np.bincount(modules, weights=prior) / np.maximum(np.bincount(modules), 1)
    rel = np.where(module_mean[modules] > 0, prior / np.where(module_mean[modules] > 0, module_mean[modules], 1), 1.0)
    by_kind = _kept_mass(X, rel, kinds)
    centred = by_kind - by_kind.mean(axis=0)
    # a handful of columns against tens of sub-models: plain least squares is well determined
    a_kind, *_ = np.linalg.lstsq(centred, y - y.mean(), rcond=None)
    if np.any(a_kind[np.unique(kinds)] <= 0):
        kind_cost = np.bincount(kinds, weights=costs) / np.maximum(np.bincount(kinds), 1)
        a_kind = _per_parameter_scale(centred, y, kind_cost)
    c_module = _ridge_gcv(_kept_mass(X, rel, modules), y - centred @ a_kind)
    return (a_kind[kinds] + c_module[modules]) * rel


def _per_parameter_scale(centred: np.ndarray, y: np.ndarray, kind_cost: np.ndarray) -> np.ndarray:
    """Kind scales proportional to the kinds' unit sizes, used when the per-kind fit gives some kind a worth <= 0.

    Removing a whole kind's units never helps on average, so a non-positive kind scale is noise from too few
    sub-models; taken at face value it ranks every unit of that kind below all others and one round removes the
    kind everywhere (seen with 12 sub-models x 4 windows on SmolLM2-135M: attention went from every layer and
    the model collapsed). The fallback fits one worth per parameter on the kept prior mass weighted by unit size,
    so an attention group is worth its parameters' share and modules shrink at comparable rates until the module
    scales say otherwise. If even that is not positive, the ratio of spreads (the utility's over the weighted
    kept mass's) stands in for it, on the utility's scale so the module fit that follows is not swamped."""
    weighted = centred @ kind_cost
    denom = float(weighted @ weighted)
    if denom == 0:  # every sub-model kept the same prior mass: nothing to scale against
        return kind_cost / kind_cost.max()
    per_param = float(weighted @ (y - y.mean())) / denom
    if per_param <= 0:
        per_param = float(np.std(y)) / float(np.std(weighted)) or 1.0
    return per_param * kind_cost


# ----------------------------------------------------------------------------------------------------
# prior tie-break


def _prior_tiebreak(beta: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """beta + eps * rank(prior): exactly-equal betas are ordered by the prior, nothing else changes order.

    rank is the ordinal rank 0..p-1 of the prior (stable, so equal priors fall back to unit index). With
    gap = the smallest positive difference between distinct beta values, any eps <= gap / (2 p) keeps every
    pair of distinct betas in order, because the added term is below eps * p <= gap / 2. We use a millionth
    of that bound so the values themselves barely move, unless that falls under the float resolution of the
    betas (then ties could not be split), in which case eps grows to 16 ulps, still capped at the bound.
    When all betas are equal there is no gap and eps is 1e-12 relative to max(|beta|, 1).
    """
    p = beta.shape[0]
    rank = np.empty(p, dtype=np.float64)
    rank[np.argsort(prior, kind="stable")] = np.arange(p, dtype=np.float64)
    uniq = np.unique(beta)
    if uniq.size > 1:
        eps_safe = float(np.min(np.diff(uniq))) / (2.0 * p)
        resolvable = 16.0 * float(np.spacing(np.max(np.abs(beta))))
        eps = max(eps_safe * 1e-6, min(eps_safe, resolvable))
    else:
        eps = 1e-12 * max(float(np.max(np.abs(beta))), 1.0)
    return beta + eps * rank
