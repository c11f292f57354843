"""Polynomial label vectors: the terms of the model, label scaling, and their Jacobian.

The model at one pixel is ``flux = theta . v(x)``, where ``x`` are the labels
scaled to order unity and ``v(x)`` holds every monomial of total degree
``<= order`` (Ness et al. 2015, eq. 8 for ``order = 2``). Terms are described
by an integer exponent matrix ``E`` of shape (T, L): ``v_t = prod_l x_l ** E[t, l]``,
ordered by degree (constant, linear, then quadratic in upper-triangle order, ...).
"""
from __future__ import annotations

import itertools

import numpy as np

__all__ = ["polynomial_exponents", "parse_term", "term_names", "label_vector",
           "label_vector_jacobian", "packed_outer", "packed_outer_monomials", "unpack_symmetric",
           "n_packed"]


def polynomial_exponents(n_labels, order):
    """Exponent matrix of all monomials of degree <= ``order`` in ``n_labels`` variables.

    Parameters
    ----------
    n_labels : int
        L, the number of labels (>= 1).
    order : int
        Maximum total degree (>= 1).

    Returns
    -------
    ndarray of int64, (T, L)
        ``T = comb(L + order, order)``; row 0 is the constant term.
    """
    if int(n_labels) < 1:
        raise ValueError(f"need at least one label, got {n_labels}")
    if int(order) < 1:
        raise ValueError(f"polynomial order must be >= 1, got {order}")
    rows = [np.zeros(n_labels, dtype=np.int64)]
    for degree in range(1, order + 1):
        for combo in itertools.combinations_with_replacement(range(n_labels), degree):
            e = np.zeros(n_labels, dtype=np.int64)
            for i in combo:
                e[i] += 1
            rows.append(e)
    return np.ascontiguousarray(np.array(rows, dtype=np.int64))


def parse_term(term, label_names):
    """Exponents of one term given as text or as a sequence of L integers.

    Parameters
    ----------
    term : str or sequence of int
        ``"TEFF^3"``, ``"TEFF^2*LOGG"``, ``"TEFF*TEFF*LOGG"`` (factors joined by
        ``*``, each a label name with an optional ``^power``), or L exponents.
    label_names : sequence of str

    Returns
    -------
    ndarray of int64, (L,)

    Raises
    ------
    ValueError
        An unknown label name, a power that is not a positive integer, or a
        sequence of the wrong length or with negative entries.
    """
    names = list(label_names)
    if not isinstance(term, str):
        e = np.asarray(term)
        if e.shape != (len(names),) or not np.issubdtype(e.dtype, np.integer) or (e < 0).any():
            raise ValueError(f"term {term!r}: expected {len(names)} non-negative integer "
                             f"exponents (one per label {names})")
        return e.astype(np.int64)
    e = np.zeros(len(names), dtype=np.int64)
    for factor in term.replace(" ", "").split("*"):
        name, _, power = factor.partition("^")
        if name not in names:
            raise ValueError(f"term {term!r}: unknown label {name!r} (labels: {names})")
        if power and not (power.isdigit() and int(power) >= 1):
            raise ValueError(f"term {term!r}: the power of {name} must be a positive integer")
        e[names.index(name)] += int(power) if power else 1
    return e


def term_names(label_names, exponents):
    """Human-readable names of the terms, e.g. ``'1'``, ``'TEFF'``, ``'TEFF*LOGG'``."""
    out = []
    for e in exponents:
        parts = []
        for name, k in zip(label_names, e):
            parts.extend([name] * int(k))
        out.append("*".join(parts) if parts else "1")
    return out


def label_vector(x, exponents):
    """Label vectors ``v(x)``.

    Parameters
    ----------
    x : ndarray, (N, L)
        Scaled labels.
    exponents : ndarray, (T, L)

    Returns
    -------
    ndarray, (N, T)
    """
    x = np.asarray(x, dtype=np.float64)
    return np.prod(x[:, None, :] ** exponents[None, :, :], axis=2)


def label_vector_jacobian(x, exponents):
    """Derivatives ``dv_t / dx_l``.

    Parameters
    ----------
    x : ndarray, (N, L)
    exponents : ndarray, (T, L)

    Returns
    -------
    ndarray, (N, T, L)
    """
    x = np.asarray(x, dtype=np.float64)
    n, n_labels = x.shape
    out = np.empty((n, exponents.shape[0], n_labels))
    for l in range(n_labels):
        e = exponents.copy()
        coef = e[:, l].astype(np.float64)
        e[:, l] = np.maximum(e[:, l] - 1, 0)
        out[:, :, l] = coef[None, :] * np.prod(x[:, None, :] ** e[None, :, :], axis=2)
    return out


def n_packed(n_terms):
    """Number of unique entries of a symmetric (T, T) matrix."""
    return n_terms * (n_terms + 1) // 2


def packed_outer(a):
    """Upper-triangle products ``a_i a_j`` (i <= j) of each row.

    Parameters
    ----------
    a : ndarray, (N, T)

    Returns
    -------
    ndarray, (N, T(T+1)/2)
    """
    iu, ju = np.triu_indices(a.shape[1])
    return np.ascontiguousarray(a[:, iu] * a[:, ju])


def packed_outer_monomials(exponents):
    """The distinct monomials among the packed products of the terms.

    ``v_i v_j`` is the monomial with exponents ``E[i] + E[j]``, and many pairs
    share one (a quadratic model in 5 labels has 231 pairs but 126 monomials of
    degree <= 4). Training builds every pixel's normal matrix from one product
    over the distinct monomials only, then scatters it to the packed pairs.

    Parameters
    ----------
    exponents : ndarray, (T, L)

    Returns
    -------
    first : ndarray of int64, (M,)
        A packed column for each distinct monomial.
    index : ndarray of int64, (T(T+1)/2,)
        ``packed_outer(v) == packed_outer(v)[:, first][:, index]``.
    """
    iu, ju = np.triu_indices(exponents.shape[0])
    _, first, index = np.unique(exponents[iu] + exponents[ju], axis=0, return_index=True,
                                return_inverse=True)
    return first.astype(np.int64), index.reshape(-1).astype(np.int64)


def unpack_symmetric(packed, n_terms):
    """Rebuild symmetric matrices from their packed upper triangles.

    Parameters
    ----------
    packed : ndarray, (..., T(T+1)/2)
    n_terms : int

    Returns
    -------
    ndarray, (..., T, T)
    """
    iu, ju = np.triu_indices(n_terms)
    out = np.zeros(packed.shape[:-1] + (n_terms, n_terms))
    out[..., iu, ju] = packed
    out[..., ju, iu] = packed
    return out
