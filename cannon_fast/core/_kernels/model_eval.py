"""Label fitting on precomputed moments: batched Levenberg-Marquardt (numba).

Same contract as ``_reference.model_eval.lm_fit``; see its docstring for the math.
"""
import numba as nb
import numpy as np

from .._reference.model_eval import HIT_BOUND, NOT_CONVERGED, STARTS_DISAGREE
from ._jit import JIT, JIT_PARALLEL
from ._linalg import gauss_solve_inplace
from .normal_equations import _cholesky_inplace


@nb.njit(**JIT)
def _ipow(x, e):
    out = 1.0
    for _ in range(e):
        out *= x
    return out


@nb.njit(**JIT)
def label_vector_and_jacobian(x, exponents, v_out, dv_out):
    """``v(x)`` (T,) and ``dv/dx`` (T, L) for one star: ``(l),(t,l)->(t),(t,l)``."""
    n_terms, n_labels = exponents.shape
    for t in range(n_terms):
        prod = 1.0
        for l in range(n_labels):
            prod *= _ipow(x[l], exponents[t, l])
        v_out[t] = prod
        for l in range(n_labels):
            e = exponents[t, l]
            if e == 0:
                dv_out[t, l] = 0.0
                continue
            d = e * _ipow(x[l], e - 1)
            for m in range(n_labels):
                if m != l:
                    d *= _ipow(x[m], exponents[t, m])
            dv_out[t, l] = d


@nb.njit(**JIT)
def _label_vector(x, exponents, v_out):
    """``v(x)`` alone, the products of ``label_vector_and_jacobian``."""
    n_terms, n_labels = exponents.shape
    for t in range(n_terms):
        prod = 1.0
        for l in range(n_labels):
            prod *= _ipow(x[l], exponents[t, l])
        v_out[t] = prod


@nb.njit(**JIT)
def _sym_matvec(g, v, gv):
    """``gv = g v`` for the symmetric g: rows of g for its columns, the loop over t inside.

    Vectorizes without reassociation: each ``gv[t]`` is summed in the order s = 0, 1, ...,
    as the C kernel's dot product loop, bit for bit (there that loop measured faster).
    """
    n_terms = v.shape[0]
    for t in range(n_terms):
        gv[t] = 0.0
    for s in range(n_terms):
        vs = v[s]
        for t in range(n_terms):
            gv[t] += g[s, t] * vs


@nb.njit(**JIT)
def _objective(x, c, h, g, exponents, v, dv):
    _label_vector(x, exponents, v)
    n_terms = v.shape[0]
    gv = dv[:, 0]  # scratch (dv is not needed here)
    _sym_matvec(g, v, gv)
    acc = c
    for t in range(n_terms):
        acc += v[t] * (gv[t] - 2.0 * h[t])
    return acc


@nb.njit(**JIT)
def _solve_small(a, b, out, n):
    """Solve ``a out = b`` on copies (a and b are reused); False if singular."""
    return gauss_solve_inplace(a.copy(), b.copy(), out, n, 0.0)


@nb.njit(**JIT)
def _grad_hess(g, h, v, dv, grad, hess, gv):
    """``grad = dv^T (g v - h)``, ``hess = dv^T g dv`` (g symmetric), ``gv = g v - h``.

    The exact zeros of ``dv`` (a term's derivative in a label it lacks) are skipped:
    they would add +-0, and the other products are summed in the same order, so the
    results are the dense loops' bit for bit (as the C kernel's ``lm_grad_hess``).
    """
    n_terms, n_labels = dv.shape
    gdv = np.zeros((n_terms, n_labels))
    _sym_matvec(g, v, gv)
    for t in range(n_terms):
        gv[t] -= h[t]
    for s in range(n_terms):
        for l in range(n_labels):
            d = dv[s, l]
            if d == 0.0:
                continue
            for t in range(n_terms):
                gdv[t, l] += g[s, t] * d
    for l in range(n_labels):
        acc = 0.0
        for m in range(n_labels):
            hess[l, m] = 0.0
        for t in range(n_terms):
            d = dv[t, l]
            if d == 0.0:
                continue
            acc += d * gv[t]
            for m in range(n_labels):
                hess[l, m] += d * gdv[t, m]
        grad[l] = acc


@nb.njit(**JIT)
def _is_positive_definite(a):
    """Whether the symmetric matrix ``a`` is (numerically) positive definite."""
    return _cholesky_inplace(a.copy(), a.shape[0])


@nb.njit(**JIT)
def _add_second_order(x, exponents, gv, out):
    """out[l, m] += sum_t gv[t] d²v_t / dx_l dx_m (the term Gauss-Newton leaves out)."""
    n_terms, n_labels = exponents.shape
    for t in range(n_terms):
        if gv[t] == 0.0:
            continue
        for l in range(n_labels):
            el = exponents[t, l]
            if el == 0:
                continue
            for m in range(l, n_labels):
                em = exponents[t, m]
                if l == m:
                    if el < 2:
                        continue
                    d = el * (el - 1) * _ipow(x[l], el - 2)
                else:
                    if em == 0:
                        continue
                    d = el * em * _ipow(x[l], el - 1) * _ipow(x[m], em - 1)
                for k in range(n_labels):
                    if k != l and k != m:
                        d *= _ipow(x[k], exponents[t, k])
                out[l, m] += gv[t] * d
                if m != l:
                    out[m, l] += gv[t] * d


@nb.njit(**JIT)
def _lm_one(x, c, h, g, exponents, lo, hi, max_iter, xtol, v, dv):
    """LM from x (modified in place); returns (phi, iterations, converged)."""
    n_labels = x.shape[0]
    grad = np.empty(n_labels)
    hess = np.empty((n_labels, n_labels))
    damp = np.empty((n_labels, n_labels))
    step = np.empty(n_labels)
    x_new = np.empty(n_labels)
    gv = np.empty(v.shape[0])
    phi = _objective(x, c, h, g, exponents, v, dv)
    lam = 1e-3
    it = 0
    while it < max_iter:
        it += 1
        label_vector_and_jacobian(x, exponents, v, dv)
        _grad_hess(g, h, v, dv, grad, hess, gv)
        # full Newton Hessian (the polynomial's second derivatives too): converges where
        # Gauss-Newton crawls along curved, nearly flat valleys; damping scales with the
        # Gauss-Newton diagonal, which is never negative
        for l in range(n_labels):
            for m in range(n_labels):
                damp[l, m] = hess[l, m]
        _add_second_order(x, exponents, gv, damp)
        for l in range(n_labels):
            damp[l, l] += lam * (hess[l, l] + 1e-12)
        if not _is_positive_definite(damp):  # away from a minimum: Gauss-Newton
            for l in range(n_labels):
                for m in range(n_labels):
                    damp[l, m] = hess[l, m]
                damp[l, l] += lam * (hess[l, l] + 1e-12)
        for l in range(n_labels):
            grad[l] = -grad[l]
        if not _solve_small(damp, grad, step, n_labels):
            lam *= 10.0
            continue
        moved = 0.0
        for l in range(n_labels):
            xn = x[l] + step[l]
            if xn < lo[l]:
                xn = lo[l]
            elif xn > hi[l]:
                xn = hi[l]
            x_new[l] = xn
            if abs(xn - x[l]) > moved:
                moved = abs(xn - x[l])
        phi_new = _objective(x_new, c, h, g, exponents, v, dv)
        if phi_new <= phi:
            x[:] = x_new
            phi = phi_new
            lam = max(lam / 10.0, 1e-9)
            if moved < xtol:
                return phi, it, True
        else:
            lam *= 4.0
            if lam > 1e12:
                return phi, it, False
    return phi, it, False


@nb.njit(**JIT_PARALLEL)
def lm_fit(g_packed, h, c, exponents, starts, first, lo, hi, n_polish, max_iter, xtol,
           disagree_dchi2, x_out, phi_out, iters_out, status_out):
    """Minimise ``c - 2 h.v + v^T G v`` per star, LM from its ``n_polish`` best starts.

    ``(t2),(t),(),(t,l),(k,l),(k),(l),(l),(),(),(),()->(l),(),(),()``
    """
    n_stars = c.shape[0]
    n_terms, n_labels = exponents.shape
    n_cand = starts.shape[1]
    n_runs = min(n_polish, n_cand)
    for i in nb.prange(n_stars):
        g = np.empty((n_terms, n_terms))
        k = 0
        for a in range(n_terms):
            for b in range(a, n_terms):
                g[a, b] = g_packed[i, k]
                g[b, a] = g_packed[i, k]
                k += 1
        v = np.empty(n_terms)
        dv = np.empty((n_terms, n_labels))
        cand = np.empty((n_cand, n_labels))
        for s in range(n_cand):
            for l in range(n_labels):
                cand[s, l] = min(max(starts[i, s, l], lo[l]), hi[l])
        order = np.argsort(first[i], kind="mergesort")
        ends = np.empty((n_runs, n_labels))
        phis = np.empty(n_runs)
        convs = np.zeros(n_runs, dtype=np.bool_)
        total_it = 0
        for s in range(n_runs):
            x = cand[order[s]].copy()
            phi, it, conv = _lm_one(x, c[i], h[i], g, exponents, lo, hi, max_iter, xtol, v, dv)
            ends[s] = x
            phis[s] = phi
            convs[s] = conv
            total_it += it
        best = 0
        for s in range(1, n_runs):
            if phis[s] < phis[best]:
                best = s
        status = 0 if convs[best] else NOT_CONVERGED
        for l in range(n_labels):
            if ends[best, l] <= lo[l] or ends[best, l] >= hi[l]:
                status |= HIT_BOUND
        label_vector_and_jacobian(ends[best], exponents, v, dv)
        grad = np.empty(n_labels)
        hess = np.empty((n_labels, n_labels))
        _grad_hess(g, h[i], v, dv, grad, hess, np.empty(n_terms))
        for s in range(n_runs):
            if not convs[s] or phis[s] - phis[best] >= disagree_dchi2:
                continue
            d2 = 0.0
            for l in range(n_labels):
                for m in range(n_labels):
                    d2 += (ends[s, l] - ends[best, l]) * hess[l, m] * (ends[s, m] - ends[best, m])
            if d2 > disagree_dchi2:
                status |= STARTS_DISAGREE
        x_out[i] = ends[best]
        phi_out[i] = phis[best]
        iters_out[i] = total_it
        status_out[i] = status


@nb.njit(**JIT_PARALLEL)
def star_weights(flux, ivar, s2, good_pix, theta0, t_pix, w_out, wr_out, c_out, npix_out,
                 moments_out, bad_out):
    """Weights, ``w (f - theta0)``, chi², good pixels, moments and a bad-value test per star.

    ``(p),(p),(p),(p),(p),(p)->(p),(p),(),(),(3),()``; flux and ivar float64 or both float32
    (compiled for each).
    """
    n_stars, n_pix = flux.shape
    for i in nb.prange(n_stars):
        acc = 0.0
        cnt = 0
        neg = 0
        sum_iv = 0.0
        sum_f = 0.0
        m0 = 0.0
        m1 = 0.0
        m2 = 0.0
        for p in range(n_pix):
            iv = ivar[i, p]
            # the input check rides along with the pass (see _reference.star_weights)
            sum_iv += iv
            if iv < 0.0:
                neg += 1
            if iv > 0.0:
                sum_f += flux[i, p]
            if iv > 0 and good_pix[p]:
                w = iv / (1.0 + iv * s2[p])  # 1 / (1/ivar + s2) with one division
                r = flux[i, p] - theta0[p]
                w_out[i, p] = w
                wr_out[i, p] = w * r
                acc += w * r * r
                cnt += 1
                m0 += w
                m1 += w * t_pix[p]
                m2 += w * w * t_pix[p]
            else:
                w_out[i, p] = 0.0
                wr_out[i, p] = 0.0
        c_out[i] = acc
        npix_out[i] = cnt
        bad_out[i] = 1 if (not np.isfinite(sum_iv) or neg > 0 or not np.isfinite(sum_f)) else 0
        moments_out[i, 0] = m0
        moments_out[i, 1] = m1
        moments_out[i, 2] = m2


@nb.njit(**JIT)
def design(x, exponents, v_out, dv_out):
    """Label vectors and their Jacobian for a batch: ``(l),(t,l)->(t),(t,l)``."""
    # serial: ~200 flops a star, and waking threads right after a BLAS call (whose
    # threads still spin) cost 20x the work itself
    for i in range(x.shape[0]):
        label_vector_and_jacobian(x[i], exponents, v_out[i], dv_out[i])


@nb.njit(**JIT_PARALLEL)
def weighted_square_sum(w, m, out):
    """``sum_p w m²`` per star, accumulated in float64: ``(p),(p)->()``."""
    n_stars, n_pix = m.shape
    for i in nb.prange(n_stars):
        acc = 0.0
        for p in range(n_pix):
            acc += np.float64(w[i, p]) * m[i, p] * m[i, p]
        out[i] = acc


@nb.njit(**JIT_PARALLEL)
def training_sums(resid, ivar, s2, use, same_seg, pairs, chi2_out, count_out, pair_out):
    """Per star: chi², pixel count, neighbour-pair sums: ``(p),(p),(p),(p),(p),()->(),(),(4)``."""
    n_stars, n_pix = resid.shape
    for i in nb.prange(n_stars):
        acc = 0.0
        cnt = 0
        n_pair, ab, aa, bb = 0.0, 0.0, 0.0, 0.0
        prev_ok = False
        prev_z = 0.0
        for p in range(n_pix):
            x = ivar[i, p]
            ok = x > 0 and use[p]
            z = 0.0
            if ok:
                w = x / (1.0 + x * s2[p])
                r = resid[i, p]
                acc += w * r * r
                cnt += 1
                if pairs[i]:
                    z = r * np.sqrt(w)
                    if prev_ok and same_seg[p - 1]:
                        n_pair += 1.0
                        ab += prev_z * z
                        aa += prev_z * prev_z
                        bb += z * z
            prev_ok = ok
            prev_z = z
        chi2_out[i] = acc
        count_out[i] = cnt
        pair_out[i, 0] = n_pair
        pair_out[i, 1] = ab
        pair_out[i, 2] = aa
        pair_out[i, 3] = bb


@nb.njit(**JIT)
def _positive_definite(a, c, n):
    """Whether ``a[:n, :n]`` is positive definite (every Cholesky pivot > 0); c is scratch."""
    for j in range(n):
        d = a[j, j]
        for k in range(j):
            d -= c[j, k] * c[j, k]
        if not d > 0:
            return False
        dj = np.sqrt(d)
        c[j, j] = dj
        for i in range(j + 1, n):
            s = a[i, j]
            for k in range(j):
                s -= c[i, k] * c[j, k]
            c[i, j] = s / dj
    return True


@nb.njit(**JIT)
def _jacobi_eigh(a, lam, u):
    """Eigenvalues (lam) and eigenvectors (columns of u) of the symmetric a, destroyed.

    Cyclic Jacobi rotations (a is a few labels square), until the off-diagonal part
    is below 1e-15 of the whole; the C kernel's ``jacobi_eigh``.
    """
    n = a.shape[0]
    for i in range(n):
        for j in range(n):
            u[i, j] = 1.0 if i == j else 0.0
    for _ in range(100):
        off = 0.0
        tot = 0.0
        for i in range(n):
            for j in range(n):
                tot += a[i, j] * a[i, j]
                if i != j:
                    off += a[i, j] * a[i, j]
        if not off > 1e-30 * tot:
            break
        for p in range(n - 1):
            for q in range(p + 1, n):
                apq = a[p, q]
                if apq == 0.0:
                    continue
                theta = (a[q, q] - a[p, p]) / (2.0 * apq)
                t = (1.0 if theta >= 0 else -1.0) / (abs(theta) + np.sqrt(theta * theta + 1.0))
                c = 1.0 / np.sqrt(t * t + 1.0)
                sn = t * c
                for k in range(n):
                    akp = a[k, p]
                    akq = a[k, q]
                    a[k, p] = c * akp - sn * akq
                    a[k, q] = sn * akp + c * akq
                for k in range(n):
                    apk = a[p, k]
                    aqk = a[q, k]
                    a[p, k] = c * apk - sn * aqk
                    a[q, k] = sn * apk + c * aqk
                for k in range(n):
                    ukp = u[k, p]
                    ukq = u[k, q]
                    u[k, p] = c * ukp - sn * ukq
                    u[k, q] = sn * ukp + c * ukq
    for i in range(n):
        lam[i] = a[i, i]


@nb.njit(**JIT)
def _lower_solve(c, b):
    """Solve the lower-triangular ``c y = b`` in place."""
    n = b.shape[0]
    for i in range(n):
        s = b[i]
        for k in range(i):
            s -= c[i, k] * b[k]
        b[i] = s / c[i, i]


@nb.njit(**JIT)
def _capped_step(fisher, bmat, cap, work, push):
    """The capped Hessian (into work) and pushed bias (push, in place) of one star.

    ``_reference.capped_step_matrices`` applied to ``push``; returns whether an
    eigenvalue exceeded ``cap``.
    """
    n = fisher.shape[0]
    chol = np.zeros((n, n))
    for l in range(n):
        for m in range(n):
            work[l, m] = cap * fisher[l, m] - bmat[l, m]
    if _positive_definite(work, chol, n):
        for l in range(n):
            for m in range(n):
                work[l, m] = fisher[l, m] - bmat[l, m]
        return False
    chol[:, :] = 0.0
    if not _positive_definite(fisher, chol, n):
        for l in range(n):
            push[l] = 0.0
            for m in range(n):
                work[l, m] = fisher[l, m]
        return False
    y = np.empty((n, n))
    a = np.empty((n, n))
    vec = np.empty(n)
    for j in range(n):  # Y = C^-1 B, column by column
        for i in range(n):
            vec[i] = bmat[i, j]
        _lower_solve(chol, vec)
        for i in range(n):
            y[i, j] = vec[i]
    for i in range(n):  # a = C^-1 Y^T, transposed: C^-1 B C^-T
        for j in range(n):
            vec[j] = y[i, j]
        _lower_solve(chol, vec)
        for j in range(n):
            a[j, i] = vec[j]
    for i in range(n):
        for j in range(i + 1, n):
            mid = 0.5 * (a[i, j] + a[j, i])
            a[i, j] = mid
            a[j, i] = mid
    lam = np.empty(n)
    u = np.empty((n, n))
    _jacobi_eigh(a, lam, u)
    cu = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            s = 0.0
            for k in range(i + 1):
                s += chol[i, k] * u[k, j]
            cu[i, j] = s
    for i in range(n):
        for j in range(n):
            s = 0.0
            for k in range(n):
                s += cu[i, k] * (1.0 - min(lam[k], cap)) * cu[j, k]
            work[i, j] = s
    for i in range(n):
        vec[i] = push[i]
    _lower_solve(chol, vec)
    capped = False
    coef = np.empty(n)
    for k in range(n):
        s = 0.0
        for i in range(n):
            s += u[i, k] * vec[i]
        if lam[k] > cap:
            capped = True
            s *= cap / lam[k]
        coef[k] = s
    for i in range(n):
        s = 0.0
        for k in range(n):
            s += cu[i, k] * coef[k]
        push[i] = s
    return capped


@nb.njit(**JIT_PARALLEL)
def debias_steps(g_packed, h, b_packed, exponents, lo, hi, cap, n_steps, xtol, x_inout,
                 capped_out):
    """Newton steps on ``chi² - v^T B v``, the eigenvalues of B against F capped.

    ``(t2),(t),(t2),(t,l),(l),(l),(),(),()->(l),()``; see ``_reference.debias_steps``.
    """
    n_terms, n_labels = exponents.shape
    for i in nb.prange(h.shape[0]):
        g = np.empty((n_terms, n_terms))
        b = np.empty((n_terms, n_terms))
        k = 0
        for a in range(n_terms):
            for c in range(a, n_terms):
                g[a, c] = g_packed[i, k]
                g[c, a] = g_packed[i, k]
                b[a, c] = b_packed[i, k]
                b[c, a] = b_packed[i, k]
                k += 1
        zero = np.zeros(n_terms)
        x = x_inout[i].copy()
        v = np.empty(n_terms)
        gv = np.empty(n_terms)
        dv = np.empty((n_terms, n_labels))
        plain = np.empty(n_labels)
        push = np.empty(n_labels)
        fisher = np.empty((n_labels, n_labels))
        bmat = np.empty((n_labels, n_labels))
        work = np.empty((n_labels, n_labels))
        step = np.empty(n_labels)
        last = np.inf
        capped = 0
        for _ in range(n_steps):
            label_vector_and_jacobian(x, exponents, v, dv)
            _grad_hess(g, h[i], v, dv, plain, fisher, gv)
            _grad_hess(b, zero, v, dv, push, bmat, gv)
            if _capped_step(fisher, bmat, cap, work, push):
                capped = 1
            for l in range(n_labels):
                push[l] -= plain[l]
            if not gauss_solve_inplace(work, push, step, n_labels, 0.0):
                step[:] = 0.0
            size = 0.0
            for l in range(n_labels):
                size = max(size, abs(step[l]))
            go = size < last
            if go:
                for l in range(n_labels):
                    x[l] = min(max(x[l] + step[l], lo[l]), hi[l])
            last = size
            if not (go and size > xtol):
                break
        capped_out[i] = capped
        for l in range(n_labels):
            x_inout[i, l] = x[l]


@nb.njit(**JIT)
def _unpack_into(packed, out):
    """The symmetric (T, T) ``out`` from its packed upper triangle (row-major)."""
    n = out.shape[0]
    k = 0
    for a in range(n):
        for c in range(a, n):
            out[a, c] = packed[k]
            out[c, a] = packed[k]
            k += 1


@nb.njit(**JIT)
def _inverse_into(a, out, n):
    """``out = a^-1`` column by column (a is not changed); False if a is singular."""
    col = np.empty(n)
    rhs = np.empty(n)
    for j in range(n):
        for i in range(n):
            rhs[i] = 1.0 if i == j else 0.0
        if not gauss_solve_inplace(a.copy(), rhs, col, n, 0.0):
            return False
        for i in range(n):
            out[i, j] = col[i]
    return True


@nb.njit(**JIT)  # serial: a few us a star, less than waking threads costs (as design)
def sandwich_covariance(g_packed, b_packed, cbar_packed, kappa, extra, x, exponents, cap,
                        cov_out, capped_out, withheld_out):
    """The de-biased covariance and the withheld correction per star.

    ``(t2),(t2),(t2),(),(l,l),(l),(t,l),()->(l,l),(),()``; see
    ``_reference.sandwich_covariance``.
    """
    n_terms, n_labels = exponents.shape
    cbar = np.empty((n_terms, n_terms))
    _unpack_into(cbar_packed, cbar)
    for i in range(x.shape[0]):
        g = np.empty((n_terms, n_terms))
        b = np.empty((n_terms, n_terms))
        _unpack_into(g_packed[i], g)
        _unpack_into(b_packed[i], b)
        v = np.empty(n_terms)
        dv = np.empty((n_terms, n_labels))
        gv = np.empty(n_terms)
        zero = np.zeros(n_terms)
        label_vector_and_jacobian(x[i], exponents, v, dv)
        scratch = np.empty(n_labels)
        fisher = np.empty((n_labels, n_labels))
        bmat = np.empty((n_labels, n_labels))
        bias = np.empty(n_labels)
        _grad_hess(g, zero, v, dv, scratch, fisher, gv)
        _grad_hess(b, zero, v, dv, bias, bmat, gv)  # bias = dv^T B v
        hess = np.empty((n_labels, n_labels))
        pushed = bias.copy()
        capped_out[i] = 1 if _capped_step(fisher, bmat, cap, hess, pushed) else 0
        _sym_matvec(cbar, v, gv)
        lev = 0.0
        for t in range(n_terms):
            lev += v[t] * gv[t]
        scale = 1.0 + kappa[i] * lev
        hinv = np.empty((n_labels, n_labels))
        if not _inverse_into(hess, hinv, n_labels):
            cov_out[i] = np.nan
            withheld_out[i] = 0.0
            continue
        mid = np.empty((n_labels, n_labels))  # middle @ hinv^T
        for l in range(n_labels):
            for m in range(n_labels):
                s = 0.0
                for k in range(n_labels):
                    s += (fisher[l, k] * scale + extra[i, l, k]) * hinv[m, k]
                mid[l, m] = s
        for l in range(n_labels):
            for m in range(n_labels):
                s = 0.0
                for k in range(n_labels):
                    s += hinv[l, k] * mid[k, m]
                cov_out[i, l, m] = s
        rest = np.empty(n_labels)
        for l in range(n_labels):
            rest[l] = bias[l] - pushed[l]
        step = np.zeros(n_labels)
        if not gauss_solve_inplace(hess.copy(), rest, step, n_labels, 0.0):
            step[:] = 0.0
        worst = 0.0
        for l in range(n_labels):
            ratio = abs(step[l]) / np.sqrt(abs(cov_out[i, l, l]))
            if ratio > worst:  # NaN (0 / 0) counts as 0
                worst = ratio
        withheld_out[i] = worst
