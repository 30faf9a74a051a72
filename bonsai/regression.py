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
"""

from __future__ import annotations

import numpy as np

from bonsai.errors import BonsaiError

__all__ = ["METHODS", "estimate_importance", "kendall_tau"]

METHODS = ("lasso_cv", "ridge")

_N_ALPHAS = 12
_ALPHA_MIN_RATIO = 1e-3
_TOL = 1e-6  # relative: stop when the largest coefficient change is below _TOL * largest coefficient
_MAX_SWEEPS = 1000  # per working set; bounds the cost of near-interpolating fits at the smallest alphas
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
) -> np.ndarray:
    """Per-unit importance beta (float64, shape (n_units,)) from sub-model masks and their utilities.

    ``masks`` is (n_samples, n_units) of 0/1 (1 = unit kept); ``utilities`` is (n_samples,), higher = better.
    ``method`` is ``lasso_cv`` (L1 fit, penalty by ``cv_folds``-fold CV on Kendall tau, folds drawn from
    ``seed``) or ``ridge`` (closed form, penalty by GCV). Units that never vary across samples get beta 0.
    ``prior`` (higher = more important) only breaks exact ties in beta. Deterministic for fixed inputs.
    """
    X, y = _validate(masks, utilities, method, cv_folds, prior)
    if method == "lasso_cv":
        beta = _lasso_cv(X, y, seed=seed, cv_folds=cv_folds)
    else:
        beta = _ridge_gcv(X, y)
    if prior is None:
        return beta
    return _prior_tiebreak(beta, np.asarray(prior, dtype=np.float64))


# --------------------------------------------------------------------------------------------------------------
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
        raise BonsaiError(f"utilities must have shape ({X.shape[0]},) to match masks {X.shape}, got {y.shape}")
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
    if method == "lasso_cv" and not (2 <= cv_folds <= n):
        raise BonsaiError(f"cv_folds must be between 2 and n_samples={n} for lasso_cv, got {cv_folds}")
    if prior is not None:
        pr = np.asarray(prior)
        if pr.shape != (p,):
            raise BonsaiError(f"prior must have shape ({p},) to match masks {X.shape}, got {pr.shape}")
        if not np.all(np.isfinite(pr.astype(np.float64))):
            raise BonsaiError("prior contains NaN or inf")
    return X, y


# --------------------------------------------------------------------------------------------------------------
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


def _cd_working_set(G: np.ndarray, c: np.ndarray, w: np.ndarray, alpha: float) -> None:
    """Cyclic coordinate descent on 1/2 w'Gw - c'w + alpha |w|_1, in place on ``w``.

    Covariance form: q = G w is kept current, so one update costs O(k) for a working set of size k and never
    touches the n x p data. Python scalars for the per-coordinate arithmetic because numpy's per-call overhead
    dominates at these sizes. Near-interpolating fits (small alpha, support close to n) make plain CD crawl
    (hundreds of sweeps), so between sweeps we take a Newton step on the current support (see
    ``_orthant_newton``); CD sweeps still decide which coordinates enter or leave and when we have converged.
    """
    k = c.shape[0]
    rows = list(G)  # row views; G is symmetric so a row is the column we need
    diag = np.diag(G).tolist()
    cl = c.tolist()
    for _ in range(_MAX_SWEEPS):
        q = G @ w
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
        if max_d <= _TOL * max_w:
            break
        _orthant_newton(G, c, w, alpha)


def _lasso_objective(G: np.ndarray, c: np.ndarray, w: np.ndarray, alpha: float) -> float:
    return float(0.5 * w @ (G @ w) - c @ w + alpha * np.sum(np.abs(w)))


def _orthant_newton(G: np.ndarray, c: np.ndarray, w: np.ndarray, alpha: float) -> None:
    """Feature-sign step (Lee et al. 2007), in place: move w toward the exact minimiser for its current signs.

    Inside the orthant fixed by sign(w) the objective is a smooth quadratic whose minimiser on the support is
    G_SS^-1 (c_S - alpha sign(w_S)); moving along the segment towards it decreases the objective monotonically
    as long as no sign flips, so we stop at the first zero crossing (that coordinate becomes 0). The step is
    kept only if the objective really decreased, which guards against a near-singular G_SS.
    """
    sup = np.flatnonzero(w)
    if sup.size == 0:
        return
    s = np.sign(w[sup])
    try:
        target = np.linalg.solve(G[np.ix_(sup, sup)], c[sup] - alpha * s)
    except np.linalg.LinAlgError:
        return
    if not np.all(np.isfinite(target)):
        return
    cur = w[sup]
    step = target - cur
    crossing = np.sign(target) != s
    t = 1.0
    if np.any(crossing):
        # Fraction of the step at which each crossing coordinate reaches 0; the earliest one binds.
        t = float(np.min(cur[crossing] / -step[crossing]))
    new_sup = cur + t * step
    if np.any(crossing):
        new_sup[crossing & (np.abs(cur / -np.where(step == 0.0, 1.0, step) - t) <= 1e-12)] = 0.0
        new_sup[np.sign(new_sup) != s] = 0.0
    cand = w.copy()
    cand[sup] = new_sup
    if _lasso_objective(G, c, cand, alpha) < _lasso_objective(G, c, w, alpha):
        w[:] = cand


def _lasso_path(Xs: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Lasso coefficients (standardised scale) for each alpha (descending), warm-started along the path.

    Objective: 1/(2n) ||y - Xs w||^2 + alpha ||w||_1 with y centred. Each alpha is solved on a working set
    (current support plus the worst KKT violators), re-checking KKT on all units after every inner solve; the
    set grows geometrically so few rounds are needed, and it stays near the support size (<= n), which is
    what makes p >> n affordable.
    """
    n, p = Xs.shape
    coefs = np.zeros((alphas.shape[0], p))
    w = np.zeros(p)
    grad = Xs.T @ y / n  # -d/dw of the smooth part, at the current w
    for i, alpha in enumerate(alphas):
        ws = np.flatnonzero(w)
        for _ in range(p + 1):
            if ws.size:
                Xw = Xs[:, ws]
                ww = w[ws].copy()
                _cd_working_set(Xw.T @ Xw / n, Xw.T @ y / n, ww, float(alpha))
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
    Xs, scale, _ = _standardise(X)
    yc = y - y.mean()
    if not np.any(Xs.T @ yc):
        # Constant utilities or no varying unit: nothing can be attributed.
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
        Xtr_s, scale_tr, varying = _standardise(Xtr)
        path = _lasso_path(Xtr_s, ytr - ytr.mean(), alphas)
        # Held-out units that were constant in training carry weight 0 (zeroed column) so they don't matter.
        Xte_s = (X[test_idx] - mean) / scale_tr
        Xte_s[:, ~varying] = 0.0
        preds = Xte_s @ path.T  # (n_test, n_alphas); the intercept is irrelevant to a rank correlation
        for a in range(alphas.shape[0]):
            tau = kendall_tau(preds[:, a], y[test_idx])
            # An all-zero (constant) prediction carries no ranking information: score it as chance.
            scores[f, a] = 0.0 if np.isnan(tau) else tau
    mean_scores = scores.mean(axis=0)
    # alphas are descending, so the first index within the tie tolerance is the largest (sparsest) alpha.
    best = int(np.flatnonzero(mean_scores >= mean_scores.max() - _CV_TIE)[0])

    full_path = _lasso_path(Xs, yc, alphas[: best + 1])
    w = full_path[best]
    if not np.any(w):
        # Pruning needs a ranking; the least-penalised fit is the one most likely to give one.
        w = _lasso_path(Xs, yc, alphas)[-1]
    return w / scale


# --------------------------------------------------------------------------------------------------------------
# ridge


def _ridge_gcv(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Ridge on standardised, centred data; lambda minimises GCV over a log grid, all from one thin SVD."""
    n, p = X.shape
    Xs, scale, _ = _standardise(X)
    yc = y - y.mean()
    U, s, Vt = np.linalg.svd(Xs, full_matrices=False)
    keep = s > s[0] * 1e-12 if s.size and s[0] > 0.0 else np.zeros(s.shape, dtype=bool)
    if not np.any(keep) or not np.any(yc):
        return np.zeros(p)
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
    w = Vt.T @ (s / (s2 + lam) * uy)
    return w / scale


# --------------------------------------------------------------------------------------------------------------
# prior tie-break


def _prior_tiebreak(beta: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """beta + eps * rank(prior), with eps small enough that no pair of *distinct* betas changes order.

    rank is the ordinal rank 0..p-1 of the prior (stable, so equal priors fall back to unit index). With
    gap = the smallest positive difference between distinct beta values, eps = gap / (2 p) bounds the added
    term by eps * (p - 1) < gap / 2, so distinct betas keep their order while exactly-equal betas are spread
    by the prior. When all betas are equal there is no gap; eps is then 1e-12 relative to max(|beta|, 1).
    """
    p = beta.shape[0]
    rank = np.empty(p, dtype=np.float64)
    rank[np.argsort(prior, kind="stable")] = np.arange(p, dtype=np.float64)
    uniq = np.unique(beta)
    if uniq.size > 1:
        eps = float(np.min(np.diff(uniq))) / (2.0 * p)
    else:
        eps = 1e-12 * max(float(np.max(np.abs(beta))), 1.0)
    return beta + eps * rank
