/*
 * _ccannon.c: Python/numpy glue for the C kernels in cannon.c -> cannon_fast._ccannon.
 *
 * Each function has the Python signature of its numba twin in cannon_fast/_kernels:
 * positional (or keyword) arrays, caller-allocated *_out arrays, returns None. The
 * glue only validates (exact dtype, C-contiguity, shapes, writeable outputs) and
 * never casts or allocates: a wrong array is a caller bug, reported with the
 * function and argument names. The numerics run with the GIL released, so Python
 * threads (e.g. a threaded survey run) can call the kernels concurrently.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define PY_ARRAY_UNIQUE_SYMBOL cannon_fast_ccannon_ARRAY_API
#include <numpy/arrayobject.h>

#include "cannon.h"

/* ------------------------------------------------------------------ validation */

/* Check that obj is a C-contiguous, native-byte-order ndarray of the given type and
 * dimensionality (and writeable if an output). Returns it (borrowed) or NULL with
 * TypeError (not an array, wrong dtype) or ValueError (ndim, layout, read-only) set. */
static PyArrayObject *as_array(PyObject *obj, const char *func, const char *name, int typenum,
                               const char *type_name, int ndim, int output)
{
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be a numpy.ndarray of %s, got %s", func, name,
                     type_name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    if (!PyArray_EquivTypenums(PyArray_TYPE(arr), typenum) || !PyArray_ISNOTSWAPPED(arr)) {
        PyErr_Format(PyExc_TypeError, "%s: %s must have dtype %s (native byte order), got %S",
                     func, name, type_name, (PyObject *)PyArray_DESCR(arr));
        return NULL;
    }
    if (PyArray_NDIM(arr) != ndim) {
        PyObject *shape = PyObject_GetAttrString(obj, "shape");
        if (shape) {
            PyErr_Format(PyExc_ValueError, "%s: %s must be %d-dimensional, got shape %R", func,
                         name, ndim, shape);
            Py_DECREF(shape);
        }
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(arr)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: %s must be C-contiguous (use numpy.ascontiguousarray)", func, name);
        return NULL;
    }
    if (output && !PyArray_ISWRITEABLE(arr)) {
        PyErr_Format(PyExc_ValueError, "%s: output %s is read-only", func, name);
        return NULL;
    }
    return arr;
}

/* Check arr.shape[axis] == expected; `dims` names the expected shape, e.g. "(P, T)". */
static int check_dim(PyArrayObject *arr, int axis, npy_intp expected, const char *func,
                     const char *name, const char *dims, const char *what)
{
    if (PyArray_DIM(arr, axis) == expected) return 0;
    PyObject *shape = PyObject_GetAttrString((PyObject *)arr, "shape");
    if (shape) {
        PyErr_Format(PyExc_ValueError, "%s: %s has shape %R but must be %s with %s = %zd", func,
                     name, shape, dims, what, (Py_ssize_t)expected);
        Py_DECREF(shape);
    }
    return -1;
}

/* Turn a CF_* return code into a Python exception (or None). */
static PyObject *finish(int code, const char *func)
{
    if (code == CF_OK) Py_RETURN_NONE;
    if (code == CF_ERR_NOMEM) return PyErr_NoMemory();
    PyErr_Format(PyExc_ValueError, "%s: invalid arguments (C status %d)", func, code);
    return NULL;
}

#define F64 NPY_FLOAT64, "float64"
#define F32 NPY_FLOAT32, "float32"
#define I64 NPY_INT64, "int64"
#define I8 NPY_INT8, "int8"
#define U8 NPY_UINT8, "uint8"
#define BOOL NPY_BOOL, "bool"
#define IN 0
#define OUT 1

/* ------------------------------------------------------------------ solve_normal_equations */

PyDoc_STRVAR(solve_normal_equations_doc,
"solve_normal_equations(a_packed, b, theta_out, cinv_out, status_out)\n--\n\n"
"Solve ``A theta = b`` per pixel and return ``A^-1`` packed: ``(t2),(t)->(t),(t2),()``.\n\n"
"a_packed (P, T2) float64, b (P, T) float64 -> theta_out (P, T) float64,\n"
"cinv_out (P, T2) or (0, T2) float64 (empty: skip the inverse), status_out (P,) int8\n"
"(1 where A is singular: a squared Cholesky pivot <= CHOL_RTOL max_i A_ii; theta and cinv\n"
"are then 0).");

static PyObject *py_solve_normal_equations(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"a_packed", "b", "theta_out", "cinv_out", "status_out", NULL};
    static const char *fn = "solve_normal_equations";
    PyObject *o[5];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO:solve_normal_equations", kwlist, &o[0],
                                     &o[1], &o[2], &o[3], &o[4]))
        return NULL;
    PyArrayObject *a, *b, *theta, *cinv, *status;
    if (!(a = as_array(o[0], fn, "a_packed", F64, 2, IN))) return NULL;
    if (!(b = as_array(o[1], fn, "b", F64, 2, IN))) return NULL;
    if (!(theta = as_array(o[2], fn, "theta_out", F64, 2, OUT))) return NULL;
    if (!(cinv = as_array(o[3], fn, "cinv_out", F64, 2, OUT))) return NULL;
    if (!(status = as_array(o[4], fn, "status_out", I8, 1, OUT))) return NULL;
    npy_intp n_pix = PyArray_DIM(b, 0), n_terms = PyArray_DIM(b, 1);
    npy_intp n2 = n_terms * (n_terms + 1) / 2;
    if (check_dim(a, 0, n_pix, fn, "a_packed", "(P, T(T+1)/2)", "P") ||
        check_dim(a, 1, n2, fn, "a_packed", "(P, T(T+1)/2)", "T(T+1)/2") ||
        check_dim(theta, 0, n_pix, fn, "theta_out", "(P, T)", "P") ||
        check_dim(theta, 1, n_terms, fn, "theta_out", "(P, T)", "T") ||
        check_dim(cinv, 1, n2, fn, "cinv_out", "(P, T(T+1)/2) or (0, T(T+1)/2)", "T(T+1)/2") ||
        check_dim(status, 0, n_pix, fn, "status_out", "(P,)", "P"))
        return NULL;
    if (PyArray_DIM(cinv, 0) != 0 &&
        check_dim(cinv, 0, n_pix, fn, "cinv_out", "(P, T(T+1)/2) or (0, T(T+1)/2)", "P"))
        return NULL;
    double *cinv_ptr = PyArray_DIM(cinv, 0) ? (double *)PyArray_DATA(cinv) : NULL;
    int code;
    Py_BEGIN_ALLOW_THREADS
    code = cf_solve_normal_equations(n_pix, n_terms, (const double *)PyArray_DATA(a),
                                     (const double *)PyArray_DATA(b),
                                     (double *)PyArray_DATA(theta), cinv_ptr,
                                     (int8_t *)PyArray_DATA(status));
    Py_END_ALLOW_THREADS
    return finish(code, fn);
}

/* ------------------------------------------------------------------ s2_update */

PyDoc_STRVAR(s2_update_doc,
"s2_update(resid, ivar, s2_out, status_out)\n--\n\n"
"Maximise the likelihood in s2 at every pixel: ``(n),(n)->(),()``.\n\n"
"resid (N, P) float64, ivar (N, P) float64 (0 where a star is not valid)\n"
"-> s2_out (P,) float64, status_out (P,) int8 (1 where fewer than two stars are valid).");

static PyObject *py_s2_update(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"resid", "ivar", "s2_out", "status_out", NULL};
    static const char *fn = "s2_update";
    PyObject *o[4];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO:s2_update", kwlist, &o[0], &o[1], &o[2],
                                     &o[3]))
        return NULL;
    PyArrayObject *resid, *ivar, *s2, *status;
    if (!(resid = as_array(o[0], fn, "resid", F64, 2, IN))) return NULL;
    if (!(ivar = as_array(o[1], fn, "ivar", F64, 2, IN))) return NULL;
    if (!(s2 = as_array(o[2], fn, "s2_out", F64, 1, OUT))) return NULL;
    if (!(status = as_array(o[3], fn, "status_out", I8, 1, OUT))) return NULL;
    npy_intp n_stars = PyArray_DIM(resid, 0), n_pix = PyArray_DIM(resid, 1);
    if (check_dim(ivar, 0, n_stars, fn, "ivar", "(N, P)", "N") ||
        check_dim(ivar, 1, n_pix, fn, "ivar", "(N, P)", "P") ||
        check_dim(s2, 0, n_pix, fn, "s2_out", "(P,)", "P") ||
        check_dim(status, 0, n_pix, fn, "status_out", "(P,)", "P"))
        return NULL;
    int code;
    Py_BEGIN_ALLOW_THREADS
    code = cf_s2_update(n_stars, n_pix, (const double *)PyArray_DATA(resid),
                        (const double *)PyArray_DATA(ivar), (double *)PyArray_DATA(s2),
                        (int8_t *)PyArray_DATA(status));
    Py_END_ALLOW_THREADS
    return finish(code, fn);
}

/* ------------------------------------------------------------------ s2_update_warm */

PyDoc_STRVAR(s2_update_warm_doc,
"s2_update_warm(resid, ivar, s2_start, s2_out, status_out)\n--\n\n"
"``s2_update`` started from ``s2_start`` (Newton steps on g'; the cold search where\n"
"s2_start is not > 0 or the steps do not settle): ``(n),(n),()->(),()``.\n\n"
"resid (N, P) float64, ivar (N, P) float64, s2_start (P,) float64\n"
"-> s2_out (P,) float64, status_out (P,) int8 (1 where fewer than two stars are valid).");

static PyObject *py_s2_update_warm(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"resid", "ivar", "s2_start", "s2_out", "status_out", NULL};
    static const char *fn = "s2_update_warm";
    PyObject *o[5];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO:s2_update_warm", kwlist, &o[0], &o[1],
                                     &o[2], &o[3], &o[4]))
        return NULL;
    PyArrayObject *resid, *ivar, *start, *s2, *status;
    if (!(resid = as_array(o[0], fn, "resid", F64, 2, IN))) return NULL;
    if (!(ivar = as_array(o[1], fn, "ivar", F64, 2, IN))) return NULL;
    if (!(start = as_array(o[2], fn, "s2_start", F64, 1, IN))) return NULL;
    if (!(s2 = as_array(o[3], fn, "s2_out", F64, 1, OUT))) return NULL;
    if (!(status = as_array(o[4], fn, "status_out", I8, 1, OUT))) return NULL;
    npy_intp n_stars = PyArray_DIM(resid, 0), n_pix = PyArray_DIM(resid, 1);
    if (check_dim(ivar, 0, n_stars, fn, "ivar", "(N, P)", "N") ||
        check_dim(ivar, 1, n_pix, fn, "ivar", "(N, P)", "P") ||
        check_dim(start, 0, n_pix, fn, "s2_start", "(P,)", "P") ||
        check_dim(s2, 0, n_pix, fn, "s2_out", "(P,)", "P") ||
        check_dim(status, 0, n_pix, fn, "status_out", "(P,)", "P"))
        return NULL;
    int code;
    Py_BEGIN_ALLOW_THREADS
    code = cf_s2_update_warm(n_stars, n_pix, (const double *)PyArray_DATA(resid),
                             (const double *)PyArray_DATA(ivar),
                             (const double *)PyArray_DATA(start), (double *)PyArray_DATA(s2),
                             (int8_t *)PyArray_DATA(status));
    Py_END_ALLOW_THREADS
    return finish(code, fn);
}

/* ------------------------------------------------------------------ lm_fit */

PyDoc_STRVAR(lm_fit_doc,
"lm_fit(g_packed, h, c, exponents, starts, first, lo, hi, n_polish, max_iter, xtol, "
"disagree_dchi2, x_out, phi_out, iters_out, status_out)\n--\n\n"
"Minimise ``c - 2 h.v + v^T G v``, LM from the ``n_polish`` of K starts per star of lowest\n"
"objective ``first``: ``(t2),(t),(),(t,l),(k,l),(k),(l),(l),(),(),(),()->(l),(),(),()``.\n\n"
"g_packed (N, T2), h (N, T), c (N,), exponents (T, L) int64, starts (N, K, L), first (N, K),\n"
"lo (L,), hi (L,)\n"
"float64; n_polish >= 1, max_iter >= 0 int; xtol, disagree_dchi2 float -> x_out (N, L),\n"
"phi_out (N,) float64, iters_out (N,) int64, status_out (N,) int64 (bits NOT_CONVERGED,\n"
"HIT_BOUND, STARTS_DISAGREE).");

static PyObject *py_lm_fit(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"g_packed", "h", "c", "exponents", "starts", "first", "lo", "hi",
                             "n_polish", "max_iter", "xtol", "disagree_dchi2", "x_out",
                             "phi_out", "iters_out", "status_out", NULL};
    static const char *fn = "lm_fit";
    PyObject *o[8], *q[4];
    Py_ssize_t n_polish, max_iter;
    double xtol, disagree;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOOnnddOOOO:lm_fit", kwlist, &o[0],
                                     &o[1], &o[2], &o[3], &o[4], &o[7], &o[5], &o[6], &n_polish,
                                     &max_iter, &xtol, &disagree, &q[0], &q[1], &q[2], &q[3]))
        return NULL;
    PyArrayObject *g, *h, *c, *ex, *st, *fi, *lo, *hi, *x, *phi, *it, *status;
    if (!(g = as_array(o[0], fn, "g_packed", F64, 2, IN))) return NULL;
    if (!(h = as_array(o[1], fn, "h", F64, 2, IN))) return NULL;
    if (!(c = as_array(o[2], fn, "c", F64, 1, IN))) return NULL;
    if (!(ex = as_array(o[3], fn, "exponents", I64, 2, IN))) return NULL;
    if (!(st = as_array(o[4], fn, "starts", F64, 3, IN))) return NULL;
    if (!(fi = as_array(o[7], fn, "first", F64, 2, IN))) return NULL;
    if (!(lo = as_array(o[5], fn, "lo", F64, 1, IN))) return NULL;
    if (!(hi = as_array(o[6], fn, "hi", F64, 1, IN))) return NULL;
    if (!(x = as_array(q[0], fn, "x_out", F64, 2, OUT))) return NULL;
    if (!(phi = as_array(q[1], fn, "phi_out", F64, 1, OUT))) return NULL;
    if (!(it = as_array(q[2], fn, "iters_out", I64, 1, OUT))) return NULL;
    if (!(status = as_array(q[3], fn, "status_out", I64, 1, OUT))) return NULL;
    npy_intp n_stars = PyArray_DIM(c, 0);
    npy_intp n_terms = PyArray_DIM(ex, 0), n_labels = PyArray_DIM(ex, 1);
    npy_intp n_cand = PyArray_DIM(st, 1), n2 = n_terms * (n_terms + 1) / 2;
    if (n_cand < 1) {
        PyErr_Format(PyExc_ValueError,
                     "%s: starts must hold at least one point per star, got shape (%zd, 0, %zd)",
                     fn, (Py_ssize_t)n_stars, (Py_ssize_t)n_labels);
        return NULL;
    }
    if (check_dim(g, 0, n_stars, fn, "g_packed", "(N, T(T+1)/2)", "N") ||
        check_dim(g, 1, n2, fn, "g_packed", "(N, T(T+1)/2)", "T(T+1)/2") ||
        check_dim(h, 0, n_stars, fn, "h", "(N, T)", "N") ||
        check_dim(h, 1, n_terms, fn, "h", "(N, T)", "T") ||
        check_dim(st, 0, n_stars, fn, "starts", "(N, K, L)", "N") ||
        check_dim(st, 2, n_labels, fn, "starts", "(N, K, L)", "L") ||
        check_dim(fi, 0, n_stars, fn, "first", "(N, K)", "N") ||
        check_dim(fi, 1, n_cand, fn, "first", "(N, K)", "K") ||
        check_dim(lo, 0, n_labels, fn, "lo", "(L,)", "L") ||
        check_dim(hi, 0, n_labels, fn, "hi", "(L,)", "L") ||
        check_dim(x, 0, n_stars, fn, "x_out", "(N, L)", "N") ||
        check_dim(x, 1, n_labels, fn, "x_out", "(N, L)", "L") ||
        check_dim(phi, 0, n_stars, fn, "phi_out", "(N,)", "N") ||
        check_dim(it, 0, n_stars, fn, "iters_out", "(N,)", "N") ||
        check_dim(status, 0, n_stars, fn, "status_out", "(N,)", "N"))
        return NULL;
    if (n_polish < 1) {
        PyErr_Format(PyExc_ValueError, "%s: n_polish must be >= 1, got %zd", fn, n_polish);
        return NULL;
    }
    if (max_iter < 0) {
        PyErr_Format(PyExc_ValueError, "%s: max_iter must be >= 0, got %zd", fn, max_iter);
        return NULL;
    }
    int code;
    Py_BEGIN_ALLOW_THREADS
    code = cf_lm_fit(n_stars, n_terms, n_labels, n_cand, (const double *)PyArray_DATA(g),
                     (const double *)PyArray_DATA(h), (const double *)PyArray_DATA(c),
                     (const int64_t *)PyArray_DATA(ex), (const double *)PyArray_DATA(st),
                     (const double *)PyArray_DATA(fi), (const double *)PyArray_DATA(lo),
                     (const double *)PyArray_DATA(hi),
                     n_polish, max_iter, xtol, disagree, (double *)PyArray_DATA(x),
                     (double *)PyArray_DATA(phi), (int64_t *)PyArray_DATA(it),
                     (int64_t *)PyArray_DATA(status));
    Py_END_ALLOW_THREADS
    return finish(code, fn);
}

/* ------------------------------------------------------------------ debias_steps */

PyDoc_STRVAR(debias_steps_doc,
"debias_steps(g_packed, h, b_packed, exponents, lo, hi, cap, n_steps, xtol, x_inout, "
"capped_out)\n--\n\n"
"Newton steps on chi2 - v^T B v from the plain minimum, the eigenvalues of B against the\n"
"Fisher matrix capped at cap (capped_out 1 where some step capped one):\n"
"``(t2),(t),(t2),(t,l),(l),(l),(),(),()->(l),()`` over stars.\n\n"
"g_packed, b_packed (N, T(T+1)/2), h (N, T) float64; exponents (T, L) int64; lo, hi (L,)\n"
"float64; cap float; n_steps int >= 0; xtol float -> x_inout (N, L) float64 (read and\n"
"written), capped_out (N,) int64.");

static PyObject *py_debias_steps(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"g_packed", "h", "b_packed", "exponents", "lo", "hi", "cap",
                             "n_steps", "xtol", "x_inout", "capped_out", NULL};
    static const char *fn = "debias_steps";
    PyObject *o[6], *q[2];
    Py_ssize_t n_steps;
    double cap, xtol;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOdndOO:debias_steps", kwlist, &o[0],
                                     &o[1], &o[2], &o[3], &o[4], &o[5], &cap, &n_steps, &xtol,
                                     &q[0], &q[1]))
        return NULL;
    PyArrayObject *g, *h, *b, *ex, *lo, *hi, *x, *hard;
    if (!(g = as_array(o[0], fn, "g_packed", F64, 2, IN))) return NULL;
    if (!(h = as_array(o[1], fn, "h", F64, 2, IN))) return NULL;
    if (!(b = as_array(o[2], fn, "b_packed", F64, 2, IN))) return NULL;
    if (!(ex = as_array(o[3], fn, "exponents", I64, 2, IN))) return NULL;
    if (!(lo = as_array(o[4], fn, "lo", F64, 1, IN))) return NULL;
    if (!(hi = as_array(o[5], fn, "hi", F64, 1, IN))) return NULL;
    if (!(x = as_array(q[0], fn, "x_inout", F64, 2, OUT))) return NULL;
    if (!(hard = as_array(q[1], fn, "capped_out", I64, 1, OUT))) return NULL;
    npy_intp n_stars = PyArray_DIM(h, 0);
    npy_intp n_terms = PyArray_DIM(ex, 0), n_labels = PyArray_DIM(ex, 1);
    npy_intp n2 = n_terms * (n_terms + 1) / 2;
    if (check_dim(h, 1, n_terms, fn, "h", "(N, T)", "T") ||
        check_dim(g, 0, n_stars, fn, "g_packed", "(N, T(T+1)/2)", "N") ||
        check_dim(g, 1, n2, fn, "g_packed", "(N, T(T+1)/2)", "T(T+1)/2") ||
        check_dim(b, 0, n_stars, fn, "b_packed", "(N, T(T+1)/2)", "N") ||
        check_dim(b, 1, n2, fn, "b_packed", "(N, T(T+1)/2)", "T(T+1)/2") ||
        check_dim(lo, 0, n_labels, fn, "lo", "(L,)", "L") ||
        check_dim(hi, 0, n_labels, fn, "hi", "(L,)", "L") ||
        check_dim(x, 0, n_stars, fn, "x_inout", "(N, L)", "N") ||
        check_dim(x, 1, n_labels, fn, "x_inout", "(N, L)", "L") ||
        check_dim(hard, 0, n_stars, fn, "capped_out", "(N,)", "N"))
        return NULL;
    if (n_steps < 0) {
        PyErr_Format(PyExc_ValueError, "%s: n_steps must be >= 0, got %zd", fn, n_steps);
        return NULL;
    }
    int code;
    Py_BEGIN_ALLOW_THREADS
    code = cf_debias_steps(n_stars, n_terms, n_labels, (const double *)PyArray_DATA(g),
                           (const double *)PyArray_DATA(h), (const double *)PyArray_DATA(b),
                           (const int64_t *)PyArray_DATA(ex), (const double *)PyArray_DATA(lo),
                           (const double *)PyArray_DATA(hi), cap, n_steps, xtol,
                           (double *)PyArray_DATA(x), (int64_t *)PyArray_DATA(hard));
    Py_END_ALLOW_THREADS
    return finish(code, fn);
}

/* ------------------------------------------------------------------ sandwich_covariance */

PyDoc_STRVAR(sandwich_covariance_doc,
"sandwich_covariance(g_packed, b_packed, cbar_packed, kappa, extra, x, exponents, cap, "
"cov_out, capped_out, withheld_out)\n--\n\n"
"The de-biased fit's covariance H^-1 (F (1 + kappa v^T Cbar v) + extra) H^-1 (H the capped\n"
"F - B_x; NaN where H is singular) and the correction the cap withheld, in errors:\n"
"``(t2),(t2),(t2),(),(l,l),(l),(t,l),()->(l,l),(),()`` over stars.\n\n"
"g_packed, b_packed (N, T(T+1)/2), cbar_packed (T(T+1)/2,), kappa (N,), extra (N, L, L),\n"
"x (N, L) float64; exponents (T, L) int64; cap float -> cov_out (N, L, L) float64,\n"
"capped_out (N,) int64, withheld_out (N,) float64.");

static PyObject *py_sandwich_covariance(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"g_packed", "b_packed", "cbar_packed", "kappa", "extra", "x",
                             "exponents", "cap", "cov_out", "capped_out", "withheld_out",
                             NULL};
    static const char *fn = "sandwich_covariance";
    PyObject *o[7], *q[3];
    double cap;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOdOOO:sandwich_covariance", kwlist,
                                     &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &cap,
                                     &q[0], &q[1], &q[2]))
        return NULL;
    PyArrayObject *g, *b, *cb, *ka, *ext, *x, *ex, *cov, *capd, *wh;
    if (!(g = as_array(o[0], fn, "g_packed", F64, 2, IN))) return NULL;
    if (!(b = as_array(o[1], fn, "b_packed", F64, 2, IN))) return NULL;
    if (!(cb = as_array(o[2], fn, "cbar_packed", F64, 1, IN))) return NULL;
    if (!(ka = as_array(o[3], fn, "kappa", F64, 1, IN))) return NULL;
    if (!(ext = as_array(o[4], fn, "extra", F64, 3, IN))) return NULL;
    if (!(x = as_array(o[5], fn, "x", F64, 2, IN))) return NULL;
    if (!(ex = as_array(o[6], fn, "exponents", I64, 2, IN))) return NULL;
    if (!(cov = as_array(q[0], fn, "cov_out", F64, 3, OUT))) return NULL;
    if (!(capd = as_array(q[1], fn, "capped_out", I64, 1, OUT))) return NULL;
    if (!(wh = as_array(q[2], fn, "withheld_out", F64, 1, OUT))) return NULL;
    npy_intp n_stars = PyArray_DIM(x, 0);
    npy_intp n_terms = PyArray_DIM(ex, 0), n_labels = PyArray_DIM(ex, 1);
    npy_intp n2 = n_terms * (n_terms + 1) / 2;
    if (check_dim(x, 1, n_labels, fn, "x", "(N, L)", "L") ||
        check_dim(g, 0, n_stars, fn, "g_packed", "(N, T(T+1)/2)", "N") ||
        check_dim(g, 1, n2, fn, "g_packed", "(N, T(T+1)/2)", "T(T+1)/2") ||
        check_dim(b, 0, n_stars, fn, "b_packed", "(N, T(T+1)/2)", "N") ||
        check_dim(b, 1, n2, fn, "b_packed", "(N, T(T+1)/2)", "T(T+1)/2") ||
        check_dim(cb, 0, n2, fn, "cbar_packed", "(T(T+1)/2,)", "T(T+1)/2") ||
        check_dim(ka, 0, n_stars, fn, "kappa", "(N,)", "N") ||
        check_dim(ext, 0, n_stars, fn, "extra", "(N, L, L)", "N") ||
        check_dim(ext, 1, n_labels, fn, "extra", "(N, L, L)", "L") ||
        check_dim(ext, 2, n_labels, fn, "extra", "(N, L, L)", "L") ||
        check_dim(cov, 0, n_stars, fn, "cov_out", "(N, L, L)", "N") ||
        check_dim(cov, 1, n_labels, fn, "cov_out", "(N, L, L)", "L") ||
        check_dim(cov, 2, n_labels, fn, "cov_out", "(N, L, L)", "L") ||
        check_dim(capd, 0, n_stars, fn, "capped_out", "(N,)", "N") ||
        check_dim(wh, 0, n_stars, fn, "withheld_out", "(N,)", "N"))
        return NULL;
    int code;
    Py_BEGIN_ALLOW_THREADS
    code = cf_sandwich_covariance(n_stars, n_terms, n_labels, (const double *)PyArray_DATA(g),
                                  (const double *)PyArray_DATA(b),
                                  (const double *)PyArray_DATA(cb),
                                  (const double *)PyArray_DATA(ka),
                                  (const double *)PyArray_DATA(ext),
                                  (const double *)PyArray_DATA(x),
                                  (const int64_t *)PyArray_DATA(ex), cap,
                                  (double *)PyArray_DATA(cov), (int64_t *)PyArray_DATA(capd),
                                  (double *)PyArray_DATA(wh));
    Py_END_ALLOW_THREADS
    return finish(code, fn);
}

/* ------------------------------------------------------------------ star_weights */

PyDoc_STRVAR(star_weights_doc,
"star_weights(flux, ivar, s2, good_pix, theta0, t_pix, w_out, wr_out, c_out, npix_out, "
"moments_out, bad_out)\n--\n\n"
"Weights (float32), ``w (f - theta0)``, its chi2, good-pixel counts and weight moments\n"
"per star, and 1 where the star may hold values the input check refuses:\n"
"``(p),(p),(p),(p),(p),(p)->(p),(p),(),(),(3),()``.\n\n"
"flux, ivar (N, P) float64, or both float32; s2 (P,) float64; good_pix (P,) bool; theta0,\n"
"t_pix (P,) float64 -> w_out (N, P) float32, wr_out (N, P), c_out (N,) float64, npix_out (N,) int64,\n"
"moments_out (N, 3) float64, bad_out (N,) int64.");

static PyObject *py_star_weights(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"flux", "ivar", "s2", "good_pix", "theta0", "t_pix", "w_out",
                             "wr_out", "c_out", "npix_out", "moments_out", "bad_out", NULL};
    static const char *fn = "star_weights";
    PyObject *o[12];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOOOOOO:star_weights", kwlist, &o[0],
                                     &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8],
                                     &o[9], &o[10], &o[11]))
        return NULL;
    PyArrayObject *flux, *ivar, *s2, *good, *th0, *tp, *w, *wr, *c, *np_, *mom, *bad;
    /* the spectra are both float64 or both float32, as flux is */
    int single = PyArray_Check(o[0]) &&
                 PyArray_EquivTypenums(PyArray_TYPE((PyArrayObject *)o[0]), NPY_FLOAT32);
    int ft = single ? NPY_FLOAT32 : NPY_FLOAT64;
    if (!(flux = as_array(o[0], fn, "flux", ft, single ? "float32" : "float64 or float32", 2,
                          IN)))
        return NULL;
    if (!(ivar = as_array(o[1], fn, "ivar", ft, single ? "float32 (as flux)" : "float64 (as flux)",
                          2, IN)))
        return NULL;
    if (!(s2 = as_array(o[2], fn, "s2", F64, 1, IN))) return NULL;
    if (!(good = as_array(o[3], fn, "good_pix", BOOL, 1, IN))) return NULL;
    if (!(th0 = as_array(o[4], fn, "theta0", F64, 1, IN))) return NULL;
    if (!(tp = as_array(o[5], fn, "t_pix", F64, 1, IN))) return NULL;
    if (!(w = as_array(o[6], fn, "w_out", F32, 2, OUT))) return NULL;
    if (!(wr = as_array(o[7], fn, "wr_out", F64, 2, OUT))) return NULL;
    if (!(c = as_array(o[8], fn, "c_out", F64, 1, OUT))) return NULL;
    if (!(np_ = as_array(o[9], fn, "npix_out", I64, 1, OUT))) return NULL;
    if (!(mom = as_array(o[10], fn, "moments_out", F64, 2, OUT))) return NULL;
    if (!(bad = as_array(o[11], fn, "bad_out", I64, 1, OUT))) return NULL;
    npy_intp n_stars = PyArray_DIM(flux, 0), n_pix = PyArray_DIM(flux, 1);
    if (check_dim(ivar, 0, n_stars, fn, "ivar", "(N, P)", "N") ||
        check_dim(ivar, 1, n_pix, fn, "ivar", "(N, P)", "P") ||
        check_dim(s2, 0, n_pix, fn, "s2", "(P,)", "P") ||
        check_dim(good, 0, n_pix, fn, "good_pix", "(P,)", "P") ||
        check_dim(th0, 0, n_pix, fn, "theta0", "(P,)", "P") ||
        check_dim(tp, 0, n_pix, fn, "t_pix", "(P,)", "P") ||
        check_dim(w, 0, n_stars, fn, "w_out", "(N, P)", "N") ||
        check_dim(w, 1, n_pix, fn, "w_out", "(N, P)", "P") ||
        check_dim(wr, 0, n_stars, fn, "wr_out", "(N, P)", "N") ||
        check_dim(wr, 1, n_pix, fn, "wr_out", "(N, P)", "P") ||
        check_dim(c, 0, n_stars, fn, "c_out", "(N,)", "N") ||
        check_dim(np_, 0, n_stars, fn, "npix_out", "(N,)", "N") ||
        check_dim(mom, 0, n_stars, fn, "moments_out", "(N, 3)", "N") ||
        check_dim(mom, 1, 3, fn, "moments_out", "(N, 3)", "the second axis") ||
        check_dim(bad, 0, n_stars, fn, "bad_out", "(N,)", "N"))
        return NULL;
    int code;
    Py_BEGIN_ALLOW_THREADS
    code = cf_star_weights(n_stars, n_pix, PyArray_DATA(flux), PyArray_DATA(ivar), single,
                           (const double *)PyArray_DATA(s2),
                           (const uint8_t *)PyArray_DATA(good),
                           (const double *)PyArray_DATA(th0), (const double *)PyArray_DATA(tp),
                           (float *)PyArray_DATA(w), (double *)PyArray_DATA(wr),
                           (double *)PyArray_DATA(c), (int64_t *)PyArray_DATA(np_),
                           (double *)PyArray_DATA(mom), (int64_t *)PyArray_DATA(bad));
    Py_END_ALLOW_THREADS
    return finish(code, fn);
}

/* ------------------------------------------------------------------ design */

PyDoc_STRVAR(design_doc,
"design(x, exponents, v_out, dv_out)\n--\n\n"
"Label vectors and their Jacobian for a batch: ``(l),(t,l)->(t),(t,l)``.\n\n"
"x (N, L) float64, exponents (T, L) int64 -> v_out (N, T), dv_out (N, T, L) float64.");

static PyObject *py_design(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"x", "exponents", "v_out", "dv_out", NULL};
    static const char *fn = "design";
    PyObject *o[4];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO:design", kwlist, &o[0], &o[1], &o[2],
                                     &o[3]))
        return NULL;
    PyArrayObject *x, *ex, *v, *dv;
    if (!(x = as_array(o[0], fn, "x", F64, 2, IN))) return NULL;
    if (!(ex = as_array(o[1], fn, "exponents", I64, 2, IN))) return NULL;
    if (!(v = as_array(o[2], fn, "v_out", F64, 2, OUT))) return NULL;
    if (!(dv = as_array(o[3], fn, "dv_out", F64, 3, OUT))) return NULL;
    npy_intp n_stars = PyArray_DIM(x, 0), n_labels = PyArray_DIM(x, 1);
    npy_intp n_terms = PyArray_DIM(ex, 0);
    if (check_dim(ex, 1, n_labels, fn, "exponents", "(T, L)", "L") ||
        check_dim(v, 0, n_stars, fn, "v_out", "(N, T)", "N") ||
        check_dim(v, 1, n_terms, fn, "v_out", "(N, T)", "T") ||
        check_dim(dv, 0, n_stars, fn, "dv_out", "(N, T, L)", "N") ||
        check_dim(dv, 1, n_terms, fn, "dv_out", "(N, T, L)", "T") ||
        check_dim(dv, 2, n_labels, fn, "dv_out", "(N, T, L)", "L"))
        return NULL;
    int code;
    Py_BEGIN_ALLOW_THREADS
    code = cf_design(n_stars, n_terms, n_labels, (const double *)PyArray_DATA(x),
                     (const int64_t *)PyArray_DATA(ex), (double *)PyArray_DATA(v),
                     (double *)PyArray_DATA(dv));
    Py_END_ALLOW_THREADS
    return finish(code, fn);
}

/* ------------------------------------------------------------------ weighted_square_sum */

PyDoc_STRVAR(weighted_square_sum_doc,
"weighted_square_sum(w, m, out)\n--\n\n"
"``sum_p w m**2`` per star, accumulated in float64: ``(p),(p)->()`` over stars.\n\n"
"w (N, P) float32, m (N, P) float64 -> out (N,) float64.");

static PyObject *py_weighted_square_sum(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"w", "m", "out", NULL};
    static const char *fn = "weighted_square_sum";
    PyObject *o[3];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:weighted_square_sum", kwlist, &o[0],
                                     &o[1], &o[2]))
        return NULL;
    PyArrayObject *w, *m, *out;
    if (!(w = as_array(o[0], fn, "w", F32, 2, IN))) return NULL;
    if (!(m = as_array(o[1], fn, "m", F64, 2, IN))) return NULL;
    if (!(out = as_array(o[2], fn, "out", F64, 1, OUT))) return NULL;
    npy_intp n_stars = PyArray_DIM(w, 0), n_pix = PyArray_DIM(w, 1);
    if (check_dim(m, 0, n_stars, fn, "m", "(N, P)", "N") ||
        check_dim(m, 1, n_pix, fn, "m", "(N, P)", "P") ||
        check_dim(out, 0, n_stars, fn, "out", "(N,)", "N"))
        return NULL;
    int code;
    Py_BEGIN_ALLOW_THREADS
    code = cf_weighted_square_sum(n_stars, n_pix, (const float *)PyArray_DATA(w),
                                  (const double *)PyArray_DATA(m), (double *)PyArray_DATA(out));
    Py_END_ALLOW_THREADS
    return finish(code, fn);
}

/* ------------------------------------------------------------------ training_sums */

PyDoc_STRVAR(training_sums_doc,
"training_sums(resid, ivar, s2, use, same_seg, pairs, chi2_out, count_out, pair_out)\n--\n\n"
"Per training star: chi2 at its labels, its pixel count and neighbour-pair sums:\n"
"``(p),(p),(p),(p),(p),()->(),(),(4)``.\n\n"
"resid, ivar (N, P) float64; s2 (P,) float64; use, same_seg (P,) bool; pairs (N,) bool\n"
"-> chi2_out (N,) float64, count_out (N,) int64, pair_out (N, 4) float64.");

static PyObject *py_training_sums(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"resid", "ivar", "s2", "use", "same_seg", "pairs", "chi2_out",
                             "count_out", "pair_out", NULL};
    static const char *fn = "training_sums";
    PyObject *o[9];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOOO:training_sums", kwlist, &o[0],
                                     &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8]))
        return NULL;
    PyArrayObject *resid, *ivar, *s2, *use, *seg, *pairs, *chi2, *cnt, *pair;
    if (!(resid = as_array(o[0], fn, "resid", F64, 2, IN))) return NULL;
    if (!(ivar = as_array(o[1], fn, "ivar", F64, 2, IN))) return NULL;
    if (!(s2 = as_array(o[2], fn, "s2", F64, 1, IN))) return NULL;
    if (!(use = as_array(o[3], fn, "use", BOOL, 1, IN))) return NULL;
    if (!(seg = as_array(o[4], fn, "same_seg", BOOL, 1, IN))) return NULL;
    if (!(pairs = as_array(o[5], fn, "pairs", BOOL, 1, IN))) return NULL;
    if (!(chi2 = as_array(o[6], fn, "chi2_out", F64, 1, OUT))) return NULL;
    if (!(cnt = as_array(o[7], fn, "count_out", I64, 1, OUT))) return NULL;
    if (!(pair = as_array(o[8], fn, "pair_out", F64, 2, OUT))) return NULL;
    npy_intp n_stars = PyArray_DIM(resid, 0), n_pix = PyArray_DIM(resid, 1);
    if (check_dim(ivar, 0, n_stars, fn, "ivar", "(N, P)", "N") ||
        check_dim(ivar, 1, n_pix, fn, "ivar", "(N, P)", "P") ||
        check_dim(s2, 0, n_pix, fn, "s2", "(P,)", "P") ||
        check_dim(use, 0, n_pix, fn, "use", "(P,)", "P") ||
        check_dim(seg, 0, n_pix, fn, "same_seg", "(P,)", "P") ||
        check_dim(pairs, 0, n_stars, fn, "pairs", "(N,)", "N") ||
        check_dim(chi2, 0, n_stars, fn, "chi2_out", "(N,)", "N") ||
        check_dim(cnt, 0, n_stars, fn, "count_out", "(N,)", "N") ||
        check_dim(pair, 0, n_stars, fn, "pair_out", "(N, 4)", "N") ||
        check_dim(pair, 1, 4, fn, "pair_out", "(N, 4)", "4"))
        return NULL;
    int code;
    Py_BEGIN_ALLOW_THREADS
    code = cf_training_sums(n_stars, n_pix, (const double *)PyArray_DATA(resid),
                            (const double *)PyArray_DATA(ivar), (const double *)PyArray_DATA(s2),
                            (const uint8_t *)PyArray_DATA(use),
                            (const uint8_t *)PyArray_DATA(seg),
                            (const uint8_t *)PyArray_DATA(pairs), (double *)PyArray_DATA(chi2),
                            (int64_t *)PyArray_DATA(cnt), (double *)PyArray_DATA(pair));
    Py_END_ALLOW_THREADS
    return finish(code, fn);
}

/* ------------------------------------------------------------------ continuum_normalize */

PyDoc_STRVAR(continuum_normalize_doc,
"continuum_normalize(flux, ivar, basis, chip, is_cont, n_chips, min_pixels, flux_out, "
"ivar_out, cont_out, status_out, bitmask=None, bits=0)\n--\n\n"
"Per-chip weighted least-squares continuum, divided out:\n"
"``(p),(p),(p,k),(p),(p),(),()->(p),(p),(p),(c)`` over stars.\n\n"
"flux, ivar (N, P) float64 or float32; basis (P, K) float64; chip (P,) int64 (-1: gap);\n"
"is_cont (P,) uint8; n_chips >= 0, min_pixels int -> flux_out, ivar_out (N, P) and cont_out\n"
"(N, P) or (0, P) (empty: not stored), all of flux's dtype; status_out (N, C) int64\n"
"(0 ok, 1 no usable pixel, 2 too few continuum pixels, 3 bad fit). The fit is in float64.\n"
"bitmask: None or (N, P) of an integer dtype (8-64 bits): a pixel with\n"
"int64(bitmask) & bits != 0 is not usable, as if its ivar were 0.");

static PyObject *py_continuum_normalize(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"flux", "ivar", "basis", "chip", "is_cont", "n_chips",
                             "min_pixels", "flux_out", "ivar_out", "cont_out", "status_out",
                             "bitmask", "bits", NULL};
    static const char *fn = "continuum_normalize";
    PyObject *o[5], *q[4], *bm_obj = Py_None;
    Py_ssize_t n_chips, min_pixels;
    long long bits = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOnnOOOO|OL:continuum_normalize", kwlist,
                                     &o[0], &o[1], &o[2], &o[3], &o[4], &n_chips, &min_pixels,
                                     &q[0], &q[1], &q[2], &q[3], &bm_obj, &bits))
        return NULL;
    /* the spectra are all float64 or all float32, as flux is */
    int single = PyArray_Check(o[0]) &&
                 PyArray_EquivTypenums(PyArray_TYPE((PyArrayObject *)o[0]), NPY_FLOAT32);
    int ft = single ? NPY_FLOAT32 : NPY_FLOAT64;
    const char *ft_name = single ? "float32 (as flux)" : "float64 or float32";
    PyArrayObject *flux, *ivar, *basis, *chip, *cont, *fo, *io, *co, *status;
    if (!(flux = as_array(o[0], fn, "flux", ft, ft_name, 2, IN))) return NULL;
    if (!single) ft_name = "float64 (as flux)";
    if (!(ivar = as_array(o[1], fn, "ivar", ft, ft_name, 2, IN))) return NULL;
    if (!(basis = as_array(o[2], fn, "basis", F64, 2, IN))) return NULL;
    if (!(chip = as_array(o[3], fn, "chip", I64, 1, IN))) return NULL;
    if (!(cont = as_array(o[4], fn, "is_cont", U8, 1, IN))) return NULL;
    if (!(fo = as_array(q[0], fn, "flux_out", ft, ft_name, 2, OUT))) return NULL;
    if (!(io = as_array(q[1], fn, "ivar_out", ft, ft_name, 2, OUT))) return NULL;
    if (!(co = as_array(q[2], fn, "cont_out", ft, ft_name, 2, OUT))) return NULL;
    if (!(status = as_array(q[3], fn, "status_out", I64, 2, OUT))) return NULL;
    if (n_chips < 0) {
        PyErr_Format(PyExc_ValueError, "%s: n_chips must be >= 0, got %zd", fn, n_chips);
        return NULL;
    }
    npy_intp n_stars = PyArray_DIM(flux, 0), n_pix = PyArray_DIM(flux, 1);
    npy_intp n_basis = PyArray_DIM(basis, 1);
    if (check_dim(ivar, 0, n_stars, fn, "ivar", "(N, P)", "N") ||
        check_dim(ivar, 1, n_pix, fn, "ivar", "(N, P)", "P") ||
        check_dim(basis, 0, n_pix, fn, "basis", "(P, K)", "P") ||
        check_dim(chip, 0, n_pix, fn, "chip", "(P,)", "P") ||
        check_dim(cont, 0, n_pix, fn, "is_cont", "(P,)", "P") ||
        check_dim(fo, 0, n_stars, fn, "flux_out", "(N, P)", "N") ||
        check_dim(fo, 1, n_pix, fn, "flux_out", "(N, P)", "P") ||
        check_dim(io, 0, n_stars, fn, "ivar_out", "(N, P)", "N") ||
        check_dim(io, 1, n_pix, fn, "ivar_out", "(N, P)", "P") ||
        check_dim(co, 1, n_pix, fn, "cont_out", "(N, P) or (0, P)", "P") ||
        check_dim(status, 0, n_stars, fn, "status_out", "(N, C)", "N") ||
        check_dim(status, 1, n_chips, fn, "status_out", "(N, C)", "C = n_chips"))
        return NULL;
    if (PyArray_DIM(co, 0) != 0 &&
        check_dim(co, 0, n_stars, fn, "cont_out", "(N, P) or (0, P)", "N"))
        return NULL;
    void *co_ptr = PyArray_DIM(co, 0) ? PyArray_DATA(co) : NULL;
    int code;
    if (bm_obj != Py_None) { /* any integer dtype: its width and sign are passed on */
        PyArrayObject *bm = (PyArrayObject *)bm_obj;
        if (!PyArray_Check(bm_obj) || !PyArray_ISINTEGER(bm) || !PyArray_ISNOTSWAPPED(bm)) {
            PyErr_Format(PyExc_TypeError, "%s: bitmask must be None or a numpy.ndarray of an "
                         "integer dtype (native byte order), got %R", fn, bm_obj);
            return NULL;
        }
        int bytes = (int)PyArray_ITEMSIZE(bm);
        if (PyArray_NDIM(bm) != 2 || !PyArray_IS_C_CONTIGUOUS(bm) ||
            check_dim(bm, 0, n_stars, fn, "bitmask", "(N, P)", "N") ||
            check_dim(bm, 1, n_pix, fn, "bitmask", "(N, P)", "P")) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "%s: bitmask must be a C-contiguous (N, P) array",
                             fn);
            return NULL;
        }
        int is_signed = PyArray_ISSIGNED(bm) ? 1 : 0;
        const void *bm_data = PyArray_DATA(bm);
        Py_BEGIN_ALLOW_THREADS
        code = cf_continuum_normalize_masked(
            n_stars, n_pix, n_basis, n_chips, PyArray_DATA(flux), PyArray_DATA(ivar),
            (const double *)PyArray_DATA(basis), (const int64_t *)PyArray_DATA(chip),
            (const uint8_t *)PyArray_DATA(cont), min_pixels, PyArray_DATA(fo), PyArray_DATA(io),
            co_ptr, (int64_t *)PyArray_DATA(status), single, bm_data, bytes, is_signed,
            (int64_t)bits);
        Py_END_ALLOW_THREADS
        return finish(code, fn);
    }
    Py_BEGIN_ALLOW_THREADS
    if (single) {
        code = cf_continuum_normalize_f32(
            n_stars, n_pix, n_basis, n_chips, (const float *)PyArray_DATA(flux),
            (const float *)PyArray_DATA(ivar), (const double *)PyArray_DATA(basis),
            (const int64_t *)PyArray_DATA(chip), (const uint8_t *)PyArray_DATA(cont),
            min_pixels, (float *)PyArray_DATA(fo), (float *)PyArray_DATA(io), (float *)co_ptr,
            (int64_t *)PyArray_DATA(status));
    } else {
        code = cf_continuum_normalize(
            n_stars, n_pix, n_basis, n_chips, (const double *)PyArray_DATA(flux),
            (const double *)PyArray_DATA(ivar), (const double *)PyArray_DATA(basis),
            (const int64_t *)PyArray_DATA(chip), (const uint8_t *)PyArray_DATA(cont),
            min_pixels, (double *)PyArray_DATA(fo), (double *)PyArray_DATA(io),
            (double *)co_ptr, (int64_t *)PyArray_DATA(status));
    }
    Py_END_ALLOW_THREADS
    return finish(code, fn);
}

/* ------------------------------------------------------------------ module */

PyDoc_STRVAR(max_threads_doc,
"max_threads()\n--\n\n"
"Threads the parallel loops use (OpenMP's ``omp_get_max_threads()``; 1 without OpenMP).");

static PyObject *py_max_threads(PyObject *self, PyObject *noargs)
{
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = cf_max_threads();
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(n);
}

PyDoc_STRVAR(set_num_threads_doc,
"set_num_threads(n)\n--\n\n"
"Cap the threads of the parallel loops at ``n`` (0: OpenMP's default); returns the old cap.\n\n"
"A process forked after the loops ran (e.g. a ``multiprocessing`` worker) is capped at 1\n"
"automatically: GNU OpenMP's thread pool does not survive ``fork``.");

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 0 || n > 1 << 20) {
        PyErr_Format(PyExc_ValueError, "set_num_threads: n must be >= 0, got %ld", n);
        return NULL;
    }
    return PyLong_FromLong(cf_set_num_threads((int)n));
}

static PyObject *py_after_fork_in_child(PyObject *self, PyObject *noargs)
{
    cf_set_num_threads(1);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"set_num_threads", py_set_num_threads, METH_O, set_num_threads_doc},
    {"_after_fork_in_child", py_after_fork_in_child, METH_NOARGS,
     "Run single-threaded in a forked child (registered with os.register_at_fork)."},
    {"solve_normal_equations", (PyCFunction)(void (*)(void))py_solve_normal_equations,
     METH_VARARGS | METH_KEYWORDS, solve_normal_equations_doc},
    {"s2_update", (PyCFunction)(void (*)(void))py_s2_update, METH_VARARGS | METH_KEYWORDS,
     s2_update_doc},
    {"s2_update_warm", (PyCFunction)(void (*)(void))py_s2_update_warm,
     METH_VARARGS | METH_KEYWORDS, s2_update_warm_doc},
    {"training_sums", (PyCFunction)(void (*)(void))py_training_sums,
     METH_VARARGS | METH_KEYWORDS, training_sums_doc},
    {"lm_fit", (PyCFunction)(void (*)(void))py_lm_fit, METH_VARARGS | METH_KEYWORDS,
     lm_fit_doc},
    {"star_weights", (PyCFunction)(void (*)(void))py_star_weights, METH_VARARGS | METH_KEYWORDS,
     star_weights_doc},
    {"debias_steps", (PyCFunction)(void (*)(void))py_debias_steps, METH_VARARGS | METH_KEYWORDS,
     debias_steps_doc},
    {"sandwich_covariance", (PyCFunction)(void (*)(void))py_sandwich_covariance,
     METH_VARARGS | METH_KEYWORDS, sandwich_covariance_doc},
    {"design", (PyCFunction)(void (*)(void))py_design, METH_VARARGS | METH_KEYWORDS,
     design_doc},
    {"weighted_square_sum", (PyCFunction)(void (*)(void))py_weighted_square_sum,
     METH_VARARGS | METH_KEYWORDS, weighted_square_sum_doc},
    {"continuum_normalize", (PyCFunction)(void (*)(void))py_continuum_normalize,
     METH_VARARGS | METH_KEYWORDS, continuum_normalize_doc},
    {"max_threads", py_max_threads, METH_NOARGS, max_threads_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(module_doc,
"C kernels: the same names and contracts as ``cannon_fast._reference`` and ``_kernels``.\n\n"
"Optional (built from csrc/ unless CANNON_FAST_NO_EXT=1); select with backend=\"c\".\n"
"Arrays must be C-contiguous with the documented dtypes; outputs are caller-allocated.\n"
"The constants mirror ``_reference.s2_grid``, ``_reference.normal_equations``,\n"
"``_reference.model_eval`` and ``_reference.continuum``; ``OPENMP``\n"
"says whether the loops over pixels and stars run in parallel.");

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_ccannon", module_doc, -1, methods, NULL, NULL, NULL, NULL,
};

/* PyModule_AddObjectRef that also drops our reference (obj may be NULL on error). */
static int add_object(PyObject *m, const char *name, PyObject *obj)
{
    int rc = obj ? PyModule_AddObjectRef(m, name, obj) : -1;
    Py_XDECREF(obj);
    return rc;
}

PyMODINIT_FUNC PyInit__ccannon(void)
{
    import_array();
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) return NULL;
#ifdef _OPENMP
    PyObject *openmp = Py_True;
#else
    PyObject *openmp = Py_False;
#endif
    if (add_object(m, "S2_RTOL", PyFloat_FromDouble(CF_S2_RTOL)) < 0 ||
        add_object(m, "S2_FLOOR", PyFloat_FromDouble(CF_S2_FLOOR)) < 0 ||
        add_object(m, "CHOL_RTOL", PyFloat_FromDouble(CF_CHOL_RTOL)) < 0 ||
        PyModule_AddIntConstant(m, "GRID_PER_DECADE", CF_GRID_PER_DECADE) < 0 ||
        PyModule_AddIntConstant(m, "WARM_STEPS", CF_WARM_STEPS) < 0 ||
        PyModule_AddIntConstant(m, "CONTINUUM_MAX_BASIS", CF_CONT_MAX_BASIS) < 0 ||
        PyModule_AddIntConstant(m, "NOT_CONVERGED", CF_NOT_CONVERGED) < 0 ||
        PyModule_AddIntConstant(m, "HIT_BOUND", CF_HIT_BOUND) < 0 ||
        PyModule_AddIntConstant(m, "STARTS_DISAGREE", CF_STARTS_DISAGREE) < 0 ||
        PyModule_AddObjectRef(m, "OPENMP", openmp) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#ifdef _OPENMP
    /* GNU OpenMP hangs in a forked child that enters a parallel region (its pool's
     * threads were not copied): make children single-threaded, which never touches it. */
    PyObject *os = PyImport_ImportModule("os");
    PyObject *hook = os ? PyObject_GetAttrString(m, "_after_fork_in_child") : NULL;
    PyObject *reg = os ? PyObject_GetAttrString(os, "register_at_fork") : NULL;
    PyObject *res = NULL;
    if (hook && reg) {
        PyObject *kw = Py_BuildValue("{s:O}", "after_in_child", hook);
        PyObject *empty = PyTuple_New(0);
        if (kw && empty) res = PyObject_Call(reg, empty, kw);
        Py_XDECREF(kw);
        Py_XDECREF(empty);
    }
    Py_XDECREF(os);
    Py_XDECREF(hook);
    Py_XDECREF(reg);
    if (!res) {
        Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(res);
#endif
    return m;
}
