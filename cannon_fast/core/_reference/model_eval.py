"""Label fitting kernels (numpy reference): batched Levenberg-Marquardt on precomputed moments.

For one star with weights ``w_p = 1 / (sigma_p² + s²_p)`` the chi² of a
polynomial model ``f_p = theta_p . v(x)`` is a polynomial in ``v``:

    chi²(x) = c - 2 h . v(x) + v(x)^T G v(x),
    c = sum_p w_p f_p²,  h = Theta^T W f,  G = Theta^T W Theta,

so once (c, h, G) are known (matrix products over pixels, done by BLAS for a
whole batch of stars), every iteration and every starting point costs O(T² L)
instead of O(P T L). The de-biased objective replaces G by ``G - B`` with
``B = sum_p w_p Cov(theta_p)``: the expected excess chi² that the errors of
theta add at x (see ``cannon_fast.core.fitting``).

References
----------
Ness et al. 2015, ApJ 808, 16, eq. 6 (the test step).
"""
import numpy as np

from ..vectorizer import label_vector, label_vector_jacobian, unpack_symmetric
from .normal_equations import cholesky

#: status bits of ``lm_fit`` (the public flags in ``cannon_fast.core.fitting`` reuse them)
NOT_CONVERGED, HIT_BOUND, STARTS_DISAGREE = 1, 2, 4


def _second_derivatives(x, exponents):
    """d²v_t / dx_l dx_m for one star: (T, L, L), by differentiating the monomials."""
    n_terms, n_labels = exponents.shape
    out = np.zeros((n_terms, n_labels, n_labels))
    for l in range(n_labels):
        for m in range(n_labels):
            e = exponents.astype(float).copy()
            coef = e[:, l].copy()
            e[:, l] -= 1
            coef = coef * e[:, m]
            e[:, m] -= 1
            ok = coef != 0
            out[ok, l, m] = coef[ok] * np.prod(x[None, :] ** e[ok], axis=1)
    return out


def _objective(x, c, h, g, exponents):
    v = label_vector(x[None, :], exponents)[0]
    return c - 2.0 * h @ v + v @ g @ v


def start_objectives(g_packed, h, c, exponents, starts, lo, hi):
    """The objective ``c - 2 h.v + v^T G v`` of each star at each start, clipped to the bounds.

    ``starts`` (K, L) shared by all stars: one (N, T(T+1)/2) x (T(T+1)/2, K) product for
    the batch (``v^T G v`` is the packed G against the packed ``v v^T``, off-diagonal
    entries twice), instead of K evaluations per star in the LM kernel; or (N, K, L), a
    set per star. Returns (N, K), ``lm_fit``'s ``first``.
    """
    n_terms = exponents.shape[0]
    cand = np.clip(starts, lo, hi)
    iu, ju = np.triu_indices(n_terms)
    twice = np.where(iu == ju, 1.0, 2.0)
    if cand.ndim == 2:
        v = label_vector(cand, exponents)  # (K, T)
        vv = v[:, iu] * v[:, ju] * twice  # (K, T2)
        return c[:, None] - 2.0 * h @ v.T + g_packed @ vv.T
    n, k, n_labels = cand.shape
    v = label_vector(cand.reshape(-1, n_labels), exponents).reshape(n, k, n_terms)
    vv = v[:, :, iu] * v[:, :, ju] * twice
    return c[:, None] - 2.0 * np.einsum("nt,nkt->nk", h, v) + np.einsum("nq,nkq->nk", g_packed, vv)


def lm_fit(g_packed, h, c, exponents, starts, first, lo, hi, n_polish, max_iter, xtol,
           disagree_dchi2, x_out, phi_out, iters_out, status_out):
    """Minimise ``c - 2 h.v(x) + v(x)^T G v(x)`` from several starts within bounds.

    LM runs from the ``n_polish`` starting points of lowest objective ``first``
    (``start_objectives``: one BLAS product for a batch) and the best end point wins.

    Contract: ``(t2),(t),(),(t,l),(k,l),(k),(l),(l),(),(),(),()->(l),(),(),()`` over stars
    (``starts`` is per star).

    Parameters
    ----------
    g_packed : ndarray, (N, T(T+1)/2)
        Packed upper triangles of ``G`` (or ``G - B``).
    h : ndarray, (N, T)
    c : ndarray, (N,)
    exponents : ndarray of int64, (T, L)
    starts : ndarray, (N, K, L)
        Candidate starting points of each star, in scaled labels.
    first : ndarray, (N, K)
        The objective at each start clipped to the bounds (``start_objectives``); only
        its order matters (which starts are polished).
    lo, hi : ndarray, (L,)
        Bounds in scaled labels.
    n_polish : int
        LM runs from this many of the best candidates.
    max_iter : int
    xtol : float
        Convergence when the largest step is below ``xtol`` (scaled units).
    disagree_dchi2 : float
        Another start that ends more than this Mahalanobis distance² from the best
        point with an objective within this of the best marks the star STARTS_DISAGREE.
    x_out : ndarray, (N, L)
    phi_out : ndarray, (N,)
    iters_out : ndarray of int64, (N,)
    status_out : ndarray of int64, (N,)
        Bit field of NOT_CONVERGED, HIT_BOUND, STARTS_DISAGREE.
    """
    n_terms, n_labels = exponents.shape
    for i in range(len(c)):
        g = unpack_symmetric(g_packed[i], n_terms)
        ends, phis, its, convs = [], [], [], []
        cand = np.clip(starts[i], lo, hi)
        for j in np.argsort(first[i], kind="stable")[:n_polish]:
            x = cand[j].copy()
            phi = _objective(x, c[i], h[i], g, exponents)
            lam, converged, it = 1e-3, False, 0
            while it < max_iter:
                it += 1
                v = label_vector(x[None, :], exponents)[0]
                dv = label_vector_jacobian(x[None, :], exponents)[0]  # (T, L)
                gv = g @ v - h[i]
                grad = dv.T @ gv
                hess = dv.T @ g @ dv
                # full Newton: add sum_t gv_t d²v_t/dx dx (see _second_derivatives)
                full = hess + np.einsum("t,tlm->lm", gv, _second_derivatives(x, exponents))
                damp = full + lam * np.diag(np.diag(hess) + 1e-12)
                if cholesky(damp) is None:  # away from a minimum: Gauss-Newton
                    damp = hess + lam * np.diag(np.diag(hess) + 1e-12)
                try:
                    step = -np.linalg.solve(damp, grad)
                except np.linalg.LinAlgError:
                    lam *= 10.0
                    continue
                x_new = np.clip(x + step, lo, hi)
                phi_new = _objective(x_new, c[i], h[i], g, exponents)
                if phi_new <= phi:
                    moved = np.max(np.abs(x_new - x))
                    x, phi = x_new, phi_new
                    lam = max(lam / 10.0, 1e-9)
                    if moved < xtol:
                        converged = True
                        break
                else:
                    lam *= 4.0
                    if lam > 1e12:
                        break
            ends.append(x)
            phis.append(phi)
            its.append(it)
            convs.append(converged)
        best = int(np.argmin(phis))
        xb = ends[best]
        status = 0 if convs[best] else NOT_CONVERGED
        if np.any((xb <= lo) | (xb >= hi)):
            status |= HIT_BOUND
        dv = label_vector_jacobian(xb[None, :], exponents)[0]
        hess = dv.T @ g @ dv
        for k in range(len(ends)):
            d = ends[k] - xb
            if convs[k] and phis[k] - phis[best] < disagree_dchi2 \
                    and d @ hess @ d > disagree_dchi2:
                status |= STARTS_DISAGREE
        x_out[i] = xb
        phi_out[i] = phis[best]
        iters_out[i] = sum(its)
        status_out[i] = status


def star_weights(flux, ivar, s2, good_pix, theta0, t_pix, w_out, wr_out, c_out, npix_out,
                 moments_out, bad_out):
    """Fit weights, weighted residuals from the constant term, their chi², good-pixel counts.

    Contract: ``(p),(p),(p),(p),(p),(p)->(p),(p),(),(),(3),()`` over stars.

    Working with ``r = f - theta_0`` (the model's constant term) removes the
    large, cancelling constant-term parts of ``c``, ``h`` and ``G``; what is
    left of G is small enough to accumulate in float32.

    Parameters
    ----------
    flux, ivar : ndarray, (N, P)
        float64, or both float32 (read as they are: each value widens to float64 exactly,
        so the results are those of a float64 copy, without the copy).
    s2 : ndarray, (P,)
    good_pix : ndarray of bool, (P,)
    theta0 : ndarray, (P,)
        The constant term of the model at each pixel.
    t_pix : ndarray, (P,)
        Per-pixel scale of ``Cov(theta_p)`` (see ``cannon_fast.core.fitting._precompute``).
    w_out : ndarray of float32, (N, P)
        ``1 / (1/ivar + s²)``, computed as ``ivar / (1 + ivar s²)`` (one division); 0
        where ``ivar = 0`` or the pixel is bad.
    wr_out : ndarray, (N, P)
        ``w (f - theta0)``.
    c_out : ndarray, (N,)
        ``sum_p w (f - theta0)²``.
    npix_out : ndarray of int64, (N,)
    moments_out : ndarray, (N, 3)
        ``sum w``, ``sum w t`` and ``sum w² t`` over pixels.
    bad_out : ndarray of int64, (N,)
        1 where the star may hold a value ``check_spectra`` refuses, by its fast test
        over all pixels: the sum of ivar, or of flux where ivar > 0, is not finite
        (a NaN or inf in it; or an overflow), or an ivar is negative. The fit checks
        its input in this pass instead of three more over the whole survey, and asks
        ``check_spectra`` for the verdict and message only where this is 1.
    """
    flux, ivar = flux.astype(np.float64), ivar.astype(np.float64)
    valid = (ivar > 0) & good_pix[None, :]
    # bad values (counted in bad_out, refused by the caller) may make NaN here: no warnings
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iv = np.where(valid, ivar, 0.0)
        w = iv / (1.0 + iv * s2[None, :])
        r = np.where(valid, flux - theta0[None, :], 0.0)
        w_out[...] = w
        wr_out[...] = w * r
        c_out[...] = np.sum(w * r * r, axis=1)
        npix_out[...] = valid.sum(axis=1)
        moments_out[:, 0] = w.sum(axis=1)
        moments_out[:, 1] = w @ t_pix
        moments_out[:, 2] = (w * w) @ t_pix
        bad = (~np.isfinite(ivar.sum(axis=1)) | np.any(ivar < 0, axis=1)
               | ~np.isfinite(np.where(ivar > 0, flux, 0.0).sum(axis=1)))
    bad_out[...] = bad


def design(x, exponents, v_out, dv_out):
    """Label vectors and their Jacobian for a batch of stars.

    Contract: ``(l),(t,l)->(t),(t,l)`` over stars.

    Parameters
    ----------
    x : ndarray, (N, L)
    exponents : ndarray of int64, (T, L)
    v_out : ndarray, (N, T)
    dv_out : ndarray, (N, T, L)
    """
    v_out[...] = label_vector(x, exponents)
    dv_out[...] = label_vector_jacobian(x, exponents)


def weighted_square_sum(w, m, out):
    """``sum_p w m²`` per star, accumulated in float64.

    Contract: ``(p),(p)->()`` over stars. The chi² of the fit at its labels is
    ``c - 2 h.v + sum_p w m²`` with ``m`` the model minus its constant term: one
    pass over ``w`` and ``m`` instead of four over (N, P) temporaries.

    Parameters
    ----------
    w : ndarray of float32, (N, P)
    m : ndarray, (N, P)
    out : ndarray, (N,)
    """
    out[...] = np.einsum("np,np->n", w.astype(np.float64) * m, m)


def training_sums(resid, ivar, s2, use, same_seg, pairs, chi2_out, count_out, pair_out):
    """Per training star: chi² at its labels, its pixel count, and neighbour-pair sums.

    Contract: ``(p),(p),(p),(p),(p),()->(),(),(4)`` over stars. ``train_info``'s
    POOR_FIT limit and neighbour noise correlation from the training residuals in
    one pass, where numpy makes a dozen over (N, P) temporaries.

    Parameters
    ----------
    resid, ivar : ndarray, (N, P)
        Residuals at the training labels and their inverse variances.
    s2 : ndarray, (P,)
    use : ndarray of bool, (P,)
        The pixels fits use.
    same_seg : ndarray of bool, (P,)
        Whether pixel p and pixel p + 1 are in the same segment (the last is ignored).
    pairs : ndarray of bool, (N,)
        The stars whose pair sums are wanted (zeros for the others).
    chi2_out : ndarray, (N,)
        ``sum_p w r²`` over the usable pixels (``ivar > 0`` and ``use``), with
        ``w = 1 / (1/ivar + s²)``.
    count_out : ndarray of int64, (N,)
        The number of usable pixels.
    pair_out : ndarray, (N, 4)
        Over the pairs (p, p + 1) of usable pixels with ``same_seg[p]``: their
        number, ``sum z_p z_p+1``, ``sum z_p²`` and ``sum z_p+1²`` with
        ``z = r sqrt(w)``.
    """
    good = (ivar > 0) & use[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(good, ivar / (1.0 + ivar * s2[None, :]), 0.0)
    r = np.where(good, resid, 0.0)
    chi2_out[...] = np.sum(w * r * r, axis=1)
    count_out[...] = good.sum(axis=1)
    z = r * np.sqrt(w)
    pair = good[:, :-1] & good[:, 1:] & same_seg[None, :-1]
    a, b = np.where(pair, z[:, :-1], 0.0), np.where(pair, z[:, 1:], 0.0)
    sums = np.stack([pair.sum(axis=1), (a * b).sum(axis=1), (a * a).sum(axis=1),
                     (b * b).sum(axis=1)], axis=1)
    pair_out[...] = np.where(pairs[:, None], sums, 0.0)


def _positive_definite(a):
    """Whether ``a`` (L, L) is positive definite: every Cholesky pivot > 0 (NaN: no).

    The rule of ``batched_cholesky`` (no relative tolerance: this is a test
    of the eigenvalues' sign, not of a solve's conditioning).
    """
    n = len(a)
    c = np.zeros_like(a)
    for j in range(n):
        d = a[j, j] - c[j, :j] @ c[j, :j]
        if not d > 0:
            return False
        c[j, j] = np.sqrt(d)
        for i in range(j + 1, n):
            c[i, j] = (a[i, j] - c[i, :j] @ c[j, :j]) / c[j, j]
    return True


def capped_step_matrices(fisher, bmat, cap):
    """The capped Hessian and push operator of one star (``capped_hessian``, batched).

    In the coordinates where F is the identity and B_x is diagonal (eigenvalues
    lambda), the Hessian ``F - B_x`` has ``1 - min(lambda, cap)`` and the push
    ``dv^T B v`` is scaled by ``min(1, cap / lambda)``. Returns (hess, push, capped):
    ``F - B_x``, the identity and False where no eigenvalue exceeds the cap; F, 0 and
    False where F is not positive definite (no correction).
    """
    n = len(fisher)
    if _positive_definite(cap * fisher - bmat):
        return fisher - bmat, np.eye(n), False
    if not _positive_definite(fisher):
        return fisher, np.zeros((n, n)), False
    c = np.linalg.cholesky(fisher)
    a = np.linalg.solve(c, np.linalg.solve(c, bmat).T)  # C^-1 B C^-T
    lam, u = np.linalg.eigh(0.5 * (a + a.T))
    hess = c @ (u * (1.0 - np.minimum(lam, cap))) @ u.T @ c.T
    scale = np.where(lam > cap, cap / np.where(lam > cap, lam, 1.0), 1.0)
    push = c @ (u * scale) @ u.T @ np.linalg.inv(c)
    return hess, push, bool(lam.max() > cap)


def debias_steps(g_packed, h, b_packed, exponents, lo, hi, cap, n_steps, xtol, x_inout,
                 capped_out):
    """Newton steps on the de-biased objective ``chi² - v^T B v`` from the plain minimum.

    Each step takes the capped Hessian and push of ``capped_step_matrices`` at the
    current labels (``F = dv^T G dv``, ``B_x = dv^T B dv``) and solves
    ``hess s = push dv^T B v - dv^T (G v - h)`` (s = 0 where hess is singular),
    clipped to the bounds; a star stops when a step is no smaller than the one
    before it (it is not taken), or is below ``xtol``, or after ``n_steps``: a
    correction can only converge, never run away. The per-star form of
    ``fitting._debias``.

    Contract: ``(t2),(t),(t2),(t,l),(l),(l),(),(),()->(l),()`` over stars
    (``x_inout`` is read and written).

    Parameters
    ----------
    g_packed, b_packed : ndarray, (N, T(T+1)/2)
        Packed ``G`` and ``B = sum_p w_p Cov(theta_p)``.
    h : ndarray, (N, T)
    exponents : ndarray of int64, (T, L)
    lo, hi : ndarray, (L,)
    cap : float
        ``fitting.DEBIAS_LAMBDA_CAP``.
    n_steps : int
    xtol : float
    x_inout : ndarray, (N, L)
        The plain fit's scaled labels in, the de-biased ones out.
    capped_out : ndarray of int64, (N,)
        1 where some step met an eigenvalue above ``cap``.
    """
    n_terms = exponents.shape[0]
    for i in range(len(h)):
        g = unpack_symmetric(g_packed[i], n_terms)
        b = unpack_symmetric(b_packed[i], n_terms)
        x = x_inout[i].copy()
        last, capped = np.inf, 0
        for _ in range(n_steps):
            v = label_vector(x[None, :], exponents)[0]
            dv = label_vector_jacobian(x[None, :], exponents)[0]
            hess, push, cap_hit = capped_step_matrices(dv.T @ g @ dv, dv.T @ b @ dv, cap)
            capped |= cap_hit
            plain = dv.T @ (g @ v - h[i])
            try:
                step = np.linalg.solve(hess, push @ (dv.T @ (b @ v)) - plain)
            except np.linalg.LinAlgError:
                step = np.zeros_like(x)
            size = np.max(np.abs(step))
            go = size < last
            if go:
                x = np.clip(x + step, lo, hi)
            last = size
            if not (go and size > xtol):
                break
        capped_out[i] = capped
        x_inout[i] = x


def batched_inverse(m):
    """Inverses of (n, L, L) matrices; NaN for a singular one instead of failing the batch."""
    try:
        return np.linalg.inv(m)
    except np.linalg.LinAlgError:
        out = np.full_like(m, np.nan)
        for i in range(len(m)):
            try:
                out[i] = np.linalg.inv(m[i])
            except np.linalg.LinAlgError:
                pass
        return out


def batched_solve(a, rhs):
    """``a x = rhs`` for (n, L, L) and (n, L); 0 for a singular ``a`` instead of failing."""
    try:
        return np.linalg.solve(a, rhs[:, :, None])[:, :, 0]
    except np.linalg.LinAlgError:
        out = np.zeros_like(rhs)
        for i in range(len(a)):
            try:
                out[i] = np.linalg.solve(a[i], rhs[i])
            except np.linalg.LinAlgError:
                pass
        return out


def batched_cholesky(a):
    """Lower Cholesky factors of (n, L, L) matrices, vectorised over n (L is small).

    Returns ``(chol, ok)``; ``ok`` is False where a matrix is not positive definite
    (its factor is then meaningless). One numpy call per entry instead of one LAPACK
    call per matrix, and no exception for the whole batch when one matrix fails.
    """
    n, size = a.shape[0], a.shape[1]
    c = np.zeros_like(a)
    ok = np.ones(n, bool)
    for j in range(size):
        d = a[:, j, j] - np.einsum("nk,nk->n", c[:, j, :j], c[:, j, :j])
        ok &= d > 0
        dj = np.sqrt(np.where(d > 0, d, 1.0))
        c[:, j, j] = dj
        for i in range(j + 1, size):
            c[:, i, j] = (a[:, i, j] - np.einsum("nk,nk->n", c[:, i, :j], c[:, j, :j])) / dj
    return c, ok


def capped_hessian(fisher, bmat, cap):
    """``F - B`` with the generalized eigenvalues of B against F capped at ``cap`` (batched).

    In the coordinates where F is the identity and B is diagonal (eigenvalues
    lambda), the plain fit is shrunk by (1 - lambda) and the correction divides
    by it. Capping lambda bounds that amplification; the push ``dv^T B v`` is
    scaled by ``min(1, cap / lambda)`` along the same directions so the capped
    correction stays consistent. ``capped_step_matrices`` is the per-star form.

    Returns
    -------
    hess : ndarray, (n, L, L)
        The capped ``F - B``; F itself for a star whose F is not positive definite.
    push_scale : ndarray, (n, L, L)
        The operator applied to ``dv^T B v``; the identity where nothing is capped.
    capped : ndarray of bool, (n,)
    """
    n, n_labels = fisher.shape[0], fisher.shape[1]
    # Every eigenvalue is below the cap exactly where cap * F - B is positive definite:
    # those stars (most of them) need no eigendecomposition.
    easy = batched_cholesky(cap * fisher - bmat)[1]
    hess = fisher - bmat
    push = np.repeat(np.eye(n_labels)[None], n, axis=0)
    capped = np.zeros(n, bool)
    hard = np.flatnonzero(~easy)
    if len(hard) == 0:
        return hess, push, capped
    fisher, bmat = fisher[hard], bmat[hard]
    hess[hard] = fisher
    # stars whose F is not positive definite get no correction
    chol, fine = batched_cholesky(fisher)
    c = chol[fine]
    a = np.linalg.solve(c, np.swapaxes(np.linalg.solve(c, bmat[fine]), 1, 2))  # L^-1 B L^-T
    lam, u = np.linalg.eigh(0.5 * (a + np.swapaxes(a, 1, 2)))
    capped[hard[fine]] = lam.max(axis=1) > cap
    ut = np.swapaxes(u, 1, 2)
    hess[hard[fine]] = c @ ((u * (1.0 - np.minimum(lam, cap))[:, None, :]) @ ut) \
        @ np.swapaxes(c, 1, 2)
    scale = np.where(lam > cap, cap / np.where(lam > cap, lam, 1.0), 1.0)
    push[hard[fine]] = c @ ((u * scale[:, None, :]) @ ut) @ np.linalg.inv(c)
    push[hard[~fine]] = 0.0
    return hess, push, capped


def withheld_correction(hess, push, bias_push, cov_x):
    """How much de-biasing correction the cap left out, in units of each label's error.

    At the capped solution the plain gradient balances ``push @ b`` (``b`` =
    ``dv^T B v``, the pull of the model's training noise toward the centre of the
    training set); the full correction would balance ``b`` itself. One Newton step
    at the capped curvature, ``hess^-1 (I - push) b``, is the part withheld, a lower
    bound on the pull the fit still carries. Returns, per star, its largest ratio
    to the label's standard error (0 where nothing was capped).
    """
    rest = bias_push - (push @ bias_push[:, :, None])[:, :, 0]
    step = batched_solve(hess, rest)
    sigma = np.sqrt(np.abs(np.diagonal(cov_x, axis1=1, axis2=2)))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(step) / sigma
    return np.nan_to_num(ratio, nan=0.0, posinf=np.inf).max(axis=1)


def sandwich_covariance(g_packed, b_packed, cbar_packed, kappa, extra, x, exponents, cap,
                        cov_out, capped_out, withheld_out):
    """The de-biased fit's covariance in scaled labels, and what its eigenvalue cap withheld.

    At the labels ``x``, with ``F = dv^T G dv`` (the Fisher matrix) and
    ``B_x = dv^T B dv``: the capped Hessian ``H`` of ``capped_hessian(F, B_x, cap)``
    and the sandwich ``H^-1 (F (1 + kappa v^T Cbar v) + extra) H^-1``, the middle
    the Fisher matrix plus the model's training noise as extra per-pixel noise
    (``fitting`` module docstring): ``kappa v^T Cbar v F`` its factorised form
    (``fitting._precompute``), ``extra`` the exact one (pass the unused one as 0).
    NaN where ``H`` is singular. ``withheld_out``: ``withheld_correction``, the
    correction the cap held back in standard errors (0 where nothing was capped).

    Contract: ``(t2),(t2),(t2),(),(l,l),(l),(t,l),()->(l,l),(),()`` over stars
    (``cbar_packed``, ``exponents`` and ``cap`` shared).

    Parameters
    ----------
    g_packed, b_packed : ndarray, (N, T(T+1)/2)
        Packed ``G`` and ``B = sum_p w_p Cov(theta_p)``.
    cbar_packed : ndarray, (T(T+1)/2,)
        Packed ``Cbar``, the common shape of ``Cov(theta_p)``.
    kappa : ndarray, (N,)
    extra : ndarray, (N, L, L)
    x : ndarray, (N, L)
        The de-biased fit's scaled labels.
    exponents : ndarray of int64, (T, L)
    cap : float
        ``fitting.DEBIAS_LAMBDA_CAP``.
    cov_out : ndarray, (N, L, L)
    capped_out : ndarray of int64, (N,)
        1 where an eigenvalue of B_x against F exceeds ``cap`` at ``x``.
    withheld_out : ndarray, (N,)
    """
    n_terms = exponents.shape[0]
    v, dv = label_vector(x, exponents), label_vector_jacobian(x, exponents)
    dvt = np.swapaxes(dv, 1, 2)
    g = unpack_symmetric(g_packed, n_terms)
    b = unpack_symmetric(b_packed, n_terms)
    fisher = dvt @ g @ dv
    hess, push, capped = capped_hessian(fisher, dvt @ b @ dv, cap)
    lev = np.einsum("nt,tu,nu->n", v, unpack_symmetric(cbar_packed, n_terms), v)
    hinv = batched_inverse(hess)
    cov = hinv @ (fisher * (1.0 + kappa * lev)[:, None, None] + extra) @ np.swapaxes(hinv, 1, 2)
    cov_out[...] = cov
    capped_out[...] = capped
    withheld_out[...] = withheld_correction(hess, push, (dvt @ (b @ v[:, :, None]))[:, :, 0], cov)
