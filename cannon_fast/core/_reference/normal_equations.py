"""Per-pixel weighted least squares from packed normal equations (numpy reference).

References
----------
Ness et al. 2015, ApJ 808, 16, eqs. 4-5: at fixed s², theta at each pixel is the
weighted least-squares solution with weights 1 / (sigma² + s²).
"""
import numpy as np

from ..vectorizer import unpack_symmetric

#: status codes of ``solve_normal_equations``
OK, SINGULAR = 0, 1
#: a squared Cholesky pivot at or below this fraction of the largest diagonal entry
#: means singular (the rule of ``solve_normal_equations``; ``CF_CHOL_RTOL`` in C)
CHOL_RTOL = 1e-12


def cholesky(a):
    """Lower Cholesky factor of the symmetric ``a`` (T, T), or None where it is singular.

    The singular-matrix rule of every backend; see ``solve_normal_equations``.
    """
    with np.errstate(invalid="ignore"):  # NaN in, NaN pivots out: singular below
        try:
            chol = np.linalg.cholesky(a)
        except np.linalg.LinAlgError:  # a pivot <= 0: not positive definite
            return None
        pivots = np.diag(chol) ** 2  # A_jj - sum_{k<j} L_jk²
        tol = CHOL_RTOL * max(0.0, np.max(np.diag(a), initial=0.0))
        if not np.all(pivots > tol):  # also False for NaN
            return None
    return chol


def solve_normal_equations(a_packed, b, theta_out, cinv_out, status_out):
    """Solve ``A theta = b`` per pixel and return ``A^-1`` packed.

    Contract: ``(t2),(t)->(t),(t2),()`` over pixels.

    The singular-matrix rule, the same in every backend (and in the continuum
    fit and the LM step's test for a positive-definite Hessian): ``A`` is
    singular unless its Cholesky factorisation ``A = L L^T`` runs to the end
    with every squared pivot ``L_jj² = A_jj - sum_{k<j} L_jk²`` greater than
    ``CHOL_RTOL = 1e-12`` times the largest diagonal entry ``max_i A_ii``.
    This rejects indefinite matrices, NaN, and the numerically singular: the
    diagonal bounds every entry (``|A_ij| <= sqrt(A_ii A_jj)``), so a pivot
    below 1e-12 of it is what is left after cancelling entries that carry
    rounding of about ``T eps max_i A_ii`` (and far more from the sums over
    stars that built A). Comparing pivots with the largest pivot instead would
    depend on the other columns: in ``[[1e-6, 1e-3], [1e-3, 1 + 1e-13]]`` the
    second pivot, 1e-13, is 1 + 1e-13 - 1, but it is 1e-7 of the first.

    Parameters
    ----------
    a_packed : ndarray, (P, T(T+1)/2)
        Upper triangles of ``X^T W_p X``.
    b : ndarray, (P, T)
        ``X^T W_p f_p``.
    theta_out : ndarray, (P, T)
    cinv_out : ndarray, (P, T(T+1)/2) or (0, T(T+1)/2)
        Upper triangles of ``(X^T W_p X)^-1`` (the covariance of theta_p); pass
        an empty array to skip the inverse.
    status_out : ndarray of int8, (P,)
        0, or 1 (``SINGULAR``) where ``A`` is singular by the rule above
        (theta and cinv set to 0).
    """
    n_terms = b.shape[1]
    iu, ju = np.triu_indices(n_terms)
    a = unpack_symmetric(a_packed, n_terms)  # (P, T, T)
    for p in range(a.shape[0]):
        if cholesky(a[p]) is None:
            theta_out[p] = 0.0
            if len(cinv_out):
                cinv_out[p] = 0.0
            status_out[p] = SINGULAR
            continue
        theta_out[p] = np.linalg.solve(a[p], b[p])
        if len(cinv_out):
            cinv_out[p] = np.linalg.inv(a[p])[iu, ju]
        status_out[p] = OK
