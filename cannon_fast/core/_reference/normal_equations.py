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


def solve_normal_equations(a_packed, b, theta_out, cinv_out, status_out):
    """Solve ``A theta = b`` per pixel and return ``A^-1`` packed.

    Contract: ``(t2),(t)->(t),(t2),()`` over pixels.

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
        0, or 1 where the matrix is not positive definite (theta and cinv set to 0).
    """
    n_terms = b.shape[1]
    iu, ju = np.triu_indices(n_terms)
    a = unpack_symmetric(a_packed, n_terms)  # (P, T, T)
    for p in range(a.shape[0]):
        try:
            chol = np.linalg.cholesky(a[p])
            # reject numerically singular systems: relative pivot below 1e-12
            d = np.diag(chol) ** 2
            if d.min() <= 1e-12 * d.max():
                raise np.linalg.LinAlgError
        except np.linalg.LinAlgError:
            theta_out[p] = 0.0
            if len(cinv_out):
                cinv_out[p] = 0.0
            status_out[p] = SINGULAR
            continue
        theta_out[p] = np.linalg.solve(a[p], b[p])
        if len(cinv_out):
            cinv_out[p] = np.linalg.inv(a[p])[iu, ju]
        status_out[p] = OK
