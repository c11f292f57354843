"""Polynomial terms, label vectors and their Jacobian."""
from math import comb

import numpy as np
import pytest
from numpy.testing import assert_allclose

from cannon_fast.core import vectorizer as vz


@pytest.mark.parametrize("n_labels,order", [(1, 1), (3, 2), (5, 2), (2, 3), (4, 1)])
def test_term_count_and_order(n_labels, order):
    e = vz.polynomial_exponents(n_labels, order)
    assert e.shape == (comb(n_labels + order, order), n_labels)
    assert e[0].sum() == 0
    assert np.all(np.diff(e.sum(axis=1)) >= 0)  # sorted by degree
    assert len({tuple(r) for r in e}) == len(e)  # no duplicate terms


def test_quadratic_terms_are_the_lab_design():
    e = vz.polynomial_exponents(2, 2)
    x = np.array([[2.0, 3.0]])
    assert_allclose(vz.label_vector(x, e), [[1, 2, 3, 4, 6, 9]])
    assert vz.term_names(["A", "B"], e) == ["1", "A", "B", "A*A", "A*B", "B*B"]


@pytest.mark.parametrize("n_labels,order", [(3, 2), (2, 3)])
def test_jacobian_matches_finite_differences(n_labels, order):
    rng = np.random.default_rng(1)
    e = vz.polynomial_exponents(n_labels, order)
    x = rng.normal(size=(4, n_labels))
    jac = vz.label_vector_jacobian(x, e)
    eps = 1e-6
    for l in range(n_labels):
        dx = np.zeros(n_labels)
        dx[l] = eps
        fd = (vz.label_vector(x + dx, e) - vz.label_vector(x - dx, e)) / (2 * eps)
        assert_allclose(jac[:, :, l], fd, rtol=1e-7, atol=1e-8)


def test_packed_outer_round_trip():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 5))
    full = vz.unpack_symmetric(vz.packed_outer(a), 5)
    assert_allclose(full, a[:, :, None] * a[:, None, :])


def test_bad_order_and_labels():
    with pytest.raises(ValueError, match="order must be >= 1"):
        vz.polynomial_exponents(3, 0)
    with pytest.raises(ValueError, match="at least one label"):
        vz.polynomial_exponents(0, 2)


@pytest.mark.parametrize("n_labels, order", [(1, 1), (3, 2), (5, 2), (4, 3)])
def test_packed_outer_monomials_rebuild_every_pair(n_labels, order):
    e = vz.polynomial_exponents(n_labels, order)
    first, index = vz.packed_outer_monomials(e)
    x = np.random.default_rng(3).normal(size=(11, n_labels))
    packed = vz.packed_outer(vz.label_vector(x, e))
    # equal up to the order of the multiplications (x1 * x1x2 against x1² * x2)
    assert_allclose(packed[:, first][:, index], packed, rtol=1e-14, atol=0)
    # distinct monomials of degree <= 2 * order: comb(L + 2 order, 2 order)
    assert len(first) == comb(n_labels + 2 * order, 2 * order)
