/*
 * cannon.c: the Cannon kernels in pure C99; see cannon.h for the contracts.
 *
 * Each function mirrors its numba twin in cannon_fast/_kernels (same loops,
 * same tolerances, same status codes), so the three backends agree to
 * rounding. Scratch memory is allocated once per thread, never per pixel.
 */
#include "cannon.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#define CF_OMP(directive) _Pragma(#directive)
#else
#define CF_OMP(directive) /* single-threaded build: no pragma, no warning */
#endif

/* Below these sizes a parallel region costs more than it saves. */
#define CF_PAR_MIN_PIX 256
#define CF_PAR_MIN_STARS 16

/* Runtime dispatch to wider SIMD for the hot loops where the toolchain supports it
 * (GCC, x86-64, glibc ifunc): portable wheels without -march, yet AVX2/AVX-512 speed. */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8 && defined(__x86_64__) && \
    defined(__GLIBC__) && !defined(CF_NO_CLONES)
#define CF_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CF_SIMD_CLONES
#endif

/* Pixels gathered per block in cf_s2_update, so reads of (N, P) rows are contiguous. */
#define CF_S2_BLOCK 32

/* Thread cap set by cf_set_num_threads (0: OpenMP's default). */
static int cf_thread_cap = 0;

int cf_set_num_threads(int n)
{
    int old = cf_thread_cap;
    cf_thread_cap = n > 0 ? n : 0;
    return old;
}

int cf_max_threads(void)
{
#ifdef _OPENMP
    int n = omp_get_max_threads();
    return cf_thread_cap > 0 && cf_thread_cap < n ? cf_thread_cap : n;
#else
    return 1;
#endif
}

/* Threads for a loop of n items, or 1 when the loop is too short to pay for a team.
 * With 1 the regions below run with if(0), which never touches the thread pool: that
 * is what keeps a forked child (whose pool threads are gone) from hanging in libgomp. */
static int team_size(ptrdiff_t n, ptrdiff_t min_n)
{
    if (n < min_n) return 1;
    return cf_max_threads();
}

/* ------------------------------------------------------------------ normal equations */

/* Lower Cholesky factor of a (n, n) in place; 0 if singular by the rule of
 * _reference.normal_equations.solve_normal_equations: every squared pivot must
 * exceed CF_CHOL_RTOL times the largest diagonal entry. */
static int cholesky_inplace(double *a, ptrdiff_t n)
{
    double dmax = 0.0;
    for (ptrdiff_t i = 0; i < n; i++) {
        if (a[i * n + i] > dmax) dmax = a[i * n + i];
    }
    for (ptrdiff_t j = 0; j < n; j++) {
        double s = a[j * n + j];
        for (ptrdiff_t k = 0; k < j; k++) s -= a[j * n + k] * a[j * n + k];
        /* a relative pivot this small is numerically singular; !(>) makes NaN singular */
        if (!(s > CF_CHOL_RTOL * dmax)) return 0;
        double d = sqrt(s);
        a[j * n + j] = d;
        for (ptrdiff_t i = j + 1; i < n; i++) {
            double t = a[i * n + j];
            for (ptrdiff_t k = 0; k < j; k++) t -= a[i * n + k] * a[j * n + k];
            a[i * n + j] = t / d;
        }
    }
    return 1;
}

/* Solve (L L^T) out = b with the lower factor L. */
static void cho_solve(const double *chol, const double *b, double *out, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; i++) {
        double s = b[i];
        for (ptrdiff_t k = 0; k < i; k++) s -= chol[i * n + k] * out[k];
        out[i] = s / chol[i * n + i];
    }
    for (ptrdiff_t i = n - 1; i >= 0; i--) {
        double s = out[i];
        for (ptrdiff_t k = i + 1; k < n; k++) s -= chol[k * n + i] * out[k];
        out[i] = s / chol[i * n + i];
    }
}

int cf_solve_normal_equations(ptrdiff_t n_pix, ptrdiff_t n_terms, const double *a_packed,
                              const double *b, double *theta_out, double *cinv_out,
                              int8_t *status_out)
{
    const ptrdiff_t nt = n_terms;
    const ptrdiff_t n2 = nt * (nt + 1) / 2;
    int err = CF_OK;
    if (n_pix < 0 || nt < 0) return CF_ERR_ARG;
    if (n_pix == 0) return CF_OK;
    const int nthr = team_size(n_pix, CF_PAR_MIN_PIX);
    (void)nthr; /* unused without OpenMP */

    CF_OMP(omp parallel if (nthr > 1) num_threads(nthr))
    {
        /* a: the matrix, then its factor; linv: the inverse of the factor */
        double *a = (double *)malloc(sizeof(double) * (size_t)(2 * nt * nt + 1));
        double *linv = a ? a + nt * nt : NULL;
        if (!a) {
            CF_OMP(omp atomic write)
            err = CF_ERR_NOMEM;
        }
        CF_OMP(omp for schedule(static))
        for (ptrdiff_t p = 0; p < n_pix; p++) {
            if (!a) continue;
            const double *ap = a_packed + p * n2;
            ptrdiff_t k = 0;
            for (ptrdiff_t i = 0; i < nt; i++) {
                for (ptrdiff_t j = i; j < nt; j++, k++) {
                    a[i * nt + j] = ap[k];
                    a[j * nt + i] = ap[k];
                }
            }
            double *th = theta_out + p * nt;
            if (!cholesky_inplace(a, nt)) {
                for (ptrdiff_t i = 0; i < nt; i++) th[i] = 0.0;
                if (cinv_out) {
                    for (ptrdiff_t i = 0; i < n2; i++) cinv_out[p * n2 + i] = 0.0;
                }
                status_out[p] = CF_SINGULAR;
                continue;
            }
            cho_solve(a, b + p * nt, th, nt);
            if (cinv_out) {
                /* A^-1 = L^-T L^-1: invert the triangular factor, then one product
                 * (T^3/3 flops instead of a general inverse) */
                memset(linv, 0, sizeof(double) * (size_t)(nt * nt));
                for (ptrdiff_t j = 0; j < nt; j++) {
                    linv[j * nt + j] = 1.0 / a[j * nt + j];
                    for (ptrdiff_t i = j + 1; i < nt; i++) {
                        double acc = 0.0;
                        for (ptrdiff_t k2 = j; k2 < i; k2++) acc -= a[i * nt + k2] * linv[k2 * nt + j];
                        linv[i * nt + j] = acc / a[i * nt + i];
                    }
                }
                double *cp = cinv_out + p * n2;
                k = 0;
                for (ptrdiff_t i = 0; i < nt; i++) {
                    for (ptrdiff_t j = i; j < nt; j++, k++) {
                        double acc = 0.0;
                        for (ptrdiff_t k2 = j; k2 < nt; k2++) acc += linv[k2 * nt + i] * linv[k2 * nt + j];
                        cp[k] = acc;
                    }
                }
            }
            status_out[p] = 0;
        }
        free(a);
    }
    return err;
}

/* ------------------------------------------------------------------ s2 grid */

/* 2 g'(s2) = sum (r2 - v - s2) / (v + s2)^2, written as (r2 u - 1) u with u = 1/(v + s2).
 * Eight fixed partial sums, added in a fixed order: the compiler may put them in SIMD
 * lanes (SSE2, or AVX2/AVX-512 in the CF_SIMD_CLONES) and every clone gives the same bits. */
#define CF_LANES 8
CF_SIMD_CLONES
static double s2_dg(double s, const double *r2, const double *v, ptrdiff_t m)
{
    double acc[CF_LANES] = {0.0};
    ptrdiff_t i = 0;
    for (; i + CF_LANES <= m; i += CF_LANES) {
        for (int j = 0; j < CF_LANES; j++) {
            double u = 1.0 / (v[i + j] + s);
            acc[j] += (r2[i + j] * u - 1.0) * u;
        }
    }
    for (int j = 0; i < m; i++, j++) {
        double u = 1.0 / (v[i] + s);
        acc[j] += (r2[i] * u - 1.0) * u;
    }
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* 2 g'(s2) as s2_dg, and in *lip a bound on |2 g''| over [s2, inf):
 * d/ds (r2 - v - s)/(v + s)^2 = (v + s - 2 r2)/(v + s)^3, whose modulus is at most
 * (v + s + 2 r2)/(v + s)^3 = u^2 + 2 r2 u^3, a decreasing function of s. So g' keeps its
 * sign on [s2, s2 + |g'(s2)| / lip): the scan may step that far without missing a root.
 * Called once per pixel (at s2 = 0), so it is left to the compiler as it is. */
static double s2_dg_lip(double s, const double *r2, const double *v, ptrdiff_t m, double *lip)
{
    double acc[CF_LANES] = {0.0}, bnd[CF_LANES] = {0.0};
    ptrdiff_t i = 0;
    for (; i + CF_LANES <= m; i += CF_LANES) {
        for (int j = 0; j < CF_LANES; j++) {
            double u = 1.0 / (v[i + j] + s);
            double ru = r2[i + j] * u;
            acc[j] += (ru - 1.0) * u;
            bnd[j] += (1.0 + 2.0 * ru) * u * u;
        }
    }
    for (int j = 0; i < m; i++, j++) {
        double u = 1.0 / (v[i] + s);
        double ru = r2[i] * u;
        acc[j] += (ru - 1.0) * u;
        bnd[j] += (1.0 + 2.0 * ru) * u * u;
    }
    *lip = ((bnd[0] + bnd[4]) + (bnd[2] + bnd[6])) + ((bnd[1] + bnd[5]) + (bnd[3] + bnd[7]));
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* 2 g'(s2) as s2_dg, and in *ub a bound on 2 g' over all of [s2, hi] (hi = max r2):
 * each term f(t) = (r2 - v - t)/(v + t)^2 falls, then rises (its one turning point,
 * t = v + 2 (r2 - v), is a minimum), so on [s2, hi] it is at most the larger of
 * f(s2) and f(hi) <= (r2 - v - hi) k with k = 1/(max v + hi)^2 (the numerator is < 0).
 * ub < 0: g' < 0 on [s2, hi], and beyond hi every term is < 0: no maximum above s2. */
CF_SIMD_CLONES
static double s2_dg_ub(double s, const double *r2, const double *v, ptrdiff_t m, double hi,
                       double k, double *ub)
{
    double acc[CF_LANES] = {0.0}, bnd[CF_LANES] = {0.0};
    ptrdiff_t i = 0;
    for (; i + CF_LANES <= m; i += CF_LANES) {
        for (int j = 0; j < CF_LANES; j++) {
            double u = 1.0 / (v[i + j] + s);
            double t = (r2[i + j] * u - 1.0) * u;
            double h = (r2[i + j] - v[i + j] - hi) * k;
            acc[j] += t;
            bnd[j] += 0.5 * ((t + h) + fabs(t - h)); /* max(t, h), and it vectorizes */
        }
    }
    for (int j = 0; i < m; i++, j++) {
        double u = 1.0 / (v[i] + s);
        double t = (r2[i] * u - 1.0) * u;
        double h = (r2[i] - v[i] - hi) * k;
        acc[j] += t;
        bnd[j] += 0.5 * ((t + h) + fabs(t - h));
    }
    *ub = ((bnd[0] + bnd[4]) + (bnd[2] + bnd[6])) + ((bnd[1] + bnd[5]) + (bnd[3] + bnd[7]));
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* g(s2) = -1/2 sum [r2 / (v + s2) + log(v + s2)]: only at the candidates. */
static double s2_g(double s, const double *r2, const double *v, ptrdiff_t m)
{
    double acc = 0.0;
    for (ptrdiff_t i = 0; i < m; i++) {
        double t = v[i] + s;
        acc -= r2[i] / t + log(t);
    }
    return 0.5 * acc;
}

/* Root of g' in (a, b) with fa = g'(a) > 0 >= g'(b) = fb (known from the scan):
 * regula falsi (Illinois) until b - a <= S2_RTOL b; the midpoint is then within
 * S2_RTOL / 2 of the root, relative (the tolerance of _reference.s2_grid). */
static double s2_refine(double a, double b, double fa, double fb, const double *r2,
                        const double *v, ptrdiff_t m)
{
    int side = 0;
    for (int it = 0; it < 100; it++) {
        if (b - a <= CF_S2_RTOL * b) break;
        double mid = (a * fb - b * fa) / (fb - fa);
        if (!(a < mid && mid < b)) mid = 0.5 * (a + b); /* also catches NaN */
        double fm = s2_dg(mid, r2, v, m);
        if (fm > 0) {
            a = mid;
            fa = fm;
            if (side == 1) fb *= 0.5;
            side = 1;
        } else {
            b = mid;
            fb = fm;
            if (side == -1) fa *= 0.5;
            side = -1;
        }
    }
    return 0.5 * (a + b);
}

/* s2 at one pixel from the m valid stars' r2 and v. */
static double s2_one_pixel(const double *r2, const double *v, ptrdiff_t m, int8_t *status)
{
    if (m < 2) {
        *status = CF_TOO_FEW;
        return 0.0;
    }
    *status = 0;
    double hi = 0.0, vsum = 0.0, vmax = 0.0;
    for (ptrdiff_t i = 0; i < m; i++) {
        if (r2[i] > hi) hi = r2[i];
        if (v[i] > vmax) vmax = v[i];
        vsum += v[i];
    }
    const double vmean = vsum / (double)m;
    double lo = CF_S2_FLOOR * vmean;
    if (hi <= lo) return 0.0;
    double span = ceil(log10(hi / lo) * CF_GRID_PER_DECADE);
    /* hi / lo = inf (a zero variance): no grid, as in the numba kernel */
    if (!(span >= 0.0 && span < 1e6)) return 0.0;
    ptrdiff_t n_grid = (ptrdiff_t)span + 1;
    double ratio = n_grid > 1 ? pow(hi / lo, 1.0 / (double)(n_grid - 1)) : 1.0;
    /* Candidates for the maximum: s2 = 0 when g'(0) <= 0, and every root of g' where it
     * goes from + to -. g itself (a logarithm per star) is only needed to choose between
     * two or more of them, which is rare: best_g stays NaN until then. */
    int n_cand = 0;
    double best_s = 0.0, best_g = NAN;
    double prev_s = 0.0, lip;
    double prev_d = s2_dg_lip(0.0, r2, v, m, &lip);
    if (prev_d <= 0) n_cand = 1;
    /* g' cannot change sign before |g'(0)| / lip (s2_dg_lip): the scan starts there
     * when that is above lo, which skips about two of the five decades of the grid
     * that lie below the noise variance. The last point is hi, where g' < 0 for certain. */
    double s = fmax(lo, fabs(prev_d) / lip);
    const double k = 1.0 / ((vmax + hi) * (vmax + hi));
    for (;;) {
        if (s > hi) s = hi;
        /* below half the mean noise variance the bound is never < 0 on these data's
         * like (the pixel's larger residuals keep it up): the plain g' there */
        double ub = 1.0;
        double d = s >= 0.5 * vmean ? s2_dg_ub(s, r2, v, m, hi, k, &ub) : s2_dg(s, r2, v, m);
        if (prev_d > 0 && d <= 0) { /* a local maximum in (prev_s, s) */
            double root = s2_refine(prev_s, s, prev_d, d, r2, v, m);
            if (n_cand == 0) {
                best_s = root;
            } else {
                if (isnan(best_g)) best_g = s2_g(best_s, r2, v, m);
                double gr = s2_g(root, r2, v, m);
                if (gr > best_g) {
                    best_s = root;
                    best_g = gr;
                }
            }
            n_cand++;
        }
        /* the rest of the grid would find no maximum (s2_dg_ub): about a third of the
         * scan, the part above the noise variance, is skipped this way */
        if (s >= hi || ub < 0) break;
        prev_s = s;
        prev_d = d;
        s *= ratio;
    }
    return best_s;
}

/* 2 g'(s2) as s2_dg, and 2 g''(s2) in *ddg: d/ds of each term (r2 u - 1) u is
 * (1 - 2 r2 u) u^2. For the Newton steps of the warm-started search. */
CF_SIMD_CLONES
static double s2_dg_ddg(double s, const double *r2, const double *v, ptrdiff_t m, double *ddg)
{
    double acc[CF_LANES] = {0.0}, acc2[CF_LANES] = {0.0};
    ptrdiff_t i = 0;
    for (; i + CF_LANES <= m; i += CF_LANES) {
        for (int j = 0; j < CF_LANES; j++) {
            double u = 1.0 / (v[i + j] + s);
            double ru = r2[i + j] * u;
            acc[j] += (ru - 1.0) * u;
            acc2[j] += (1.0 - 2.0 * ru) * u * u;
        }
    }
    for (int j = 0; i < m; i++, j++) {
        double u = 1.0 / (v[i] + s);
        double ru = r2[i] * u;
        acc[j] += (ru - 1.0) * u;
        acc2[j] += (1.0 - 2.0 * ru) * u * u;
    }
    *ddg = ((acc2[0] + acc2[4]) + (acc2[2] + acc2[6])) + ((acc2[1] + acc2[5]) + (acc2[3] + acc2[7]));
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* Newton steps on g' from s0 (_reference.s2_grid._warm_one); 0 in *ok: go cold. */
static double s2_warm_one(double s0, const double *r2, const double *v, ptrdiff_t m, int *ok)
{
    double s = s0, dd;
    double d = s2_dg_ddg(s, r2, v, m, &dd);
    *ok = 0;
    for (int it = 0; it < CF_WARM_STEPS; it++) {
        if (!(dd < 0)) return 0.0; /* not concave here: outside the basin of a maximum */
        double t = fmin(fmax(s - d / dd, 0.25 * s), 4.0 * s);
        double eps = 0.25 * CF_S2_RTOL * t;
        if (fabs(t - s) <= eps) {
            /* the root is within eps of t: the point eps beyond t, across the root from s,
             * closes a bracket of width <= 2 eps */
            double u = d > 0 ? t + eps : t - eps, ddu;
            double du = s2_dg_ddg(u, r2, v, m, &ddu);
            if ((d > 0) != (du > 0)) {
                *ok = 1;
                return 0.5 * (s + u);
            }
            s = u;
            d = du;
            dd = ddu;
            continue;
        }
        if (!(t > 0)) return 0.0;
        s = t;
        d = s2_dg_ddg(s, r2, v, m, &dd);
    }
    return 0.0;
}

/* cf_s2_update (s2_start NULL) and cf_s2_update_warm */
static int s2_update_impl(ptrdiff_t n_stars, ptrdiff_t n_pix, const double *resid,
                          const double *ivar, const double *s2_start, double *s2_out,
                          int8_t *status_out)
{
    const ptrdiff_t n_blocks = (n_pix + CF_S2_BLOCK - 1) / CF_S2_BLOCK;
    int err = CF_OK;
    if (n_stars < 0 || n_pix < 0) return CF_ERR_ARG;
    if (n_pix == 0) return CF_OK;
    const int nthr = team_size(n_pix, CF_PAR_MIN_PIX);
    (void)nthr; /* unused without OpenMP */

    CF_OMP(omp parallel if (nthr > 1) num_threads(nthr))
    {
        size_t width = (size_t)CF_S2_BLOCK * (size_t)(n_stars > 0 ? n_stars : 1);
        double *r2 = (double *)malloc(sizeof(double) * 2 * width);
        ptrdiff_t *counts = (ptrdiff_t *)malloc(sizeof(ptrdiff_t) * CF_S2_BLOCK);
        double *vv = r2 ? r2 + width : NULL;
        if (!r2 || !counts) {
            CF_OMP(omp atomic write)
            err = CF_ERR_NOMEM;
        }
        /* dynamic: the cost of a pixel depends on its number of sign changes */
        CF_OMP(omp for schedule(dynamic, 1))
        for (ptrdiff_t blk = 0; blk < n_blocks; blk++) {
            if (!r2 || !counts) continue;
            ptrdiff_t p0 = blk * CF_S2_BLOCK;
            ptrdiff_t w = n_pix - p0 < CF_S2_BLOCK ? n_pix - p0 : CF_S2_BLOCK;
            for (ptrdiff_t j = 0; j < w; j++) counts[j] = 0;
            for (ptrdiff_t n = 0; n < n_stars; n++) {
                const double *irow = ivar + n * n_pix + p0;
                const double *rrow = resid + n * n_pix + p0;
                for (ptrdiff_t j = 0; j < w; j++) {
                    double x = irow[j];
                    if (x > 0) {
                        ptrdiff_t c = counts[j];
                        r2[j * n_stars + c] = rrow[j] * rrow[j];
                        vv[j * n_stars + c] = 1.0 / x;
                        counts[j] = c + 1;
                    }
                }
            }
            for (ptrdiff_t j = 0; j < w; j++) {
                const double *r2j = r2 + j * n_stars, *vj = vv + j * n_stars;
                int ok = 0;
                if (s2_start && counts[j] >= 2 && s2_start[p0 + j] > 0) {
                    s2_out[p0 + j] = s2_warm_one(s2_start[p0 + j], r2j, vj, counts[j], &ok);
                    status_out[p0 + j] = 0;
                }
                if (!ok)
                    s2_out[p0 + j] = s2_one_pixel(r2j, vj, counts[j], &status_out[p0 + j]);
            }
        }
        free(r2);
        free(counts);
    }
    return err;
}

int cf_s2_update(ptrdiff_t n_stars, ptrdiff_t n_pix, const double *resid, const double *ivar,
                 double *s2_out, int8_t *status_out)
{
    return s2_update_impl(n_stars, n_pix, resid, ivar, NULL, s2_out, status_out);
}

int cf_s2_update_warm(ptrdiff_t n_stars, ptrdiff_t n_pix, const double *resid,
                      const double *ivar, const double *s2_start, double *s2_out,
                      int8_t *status_out)
{
    return s2_update_impl(n_stars, n_pix, resid, ivar, s2_start, s2_out, status_out);
}

/* ------------------------------------------------------------------ label vectors */

static double ipow(double x, int64_t e)
{
    double out = 1.0;
    for (int64_t i = 0; i < e; i++) out *= x;
    return out;
}

void cf_label_vector_and_jacobian(ptrdiff_t n_terms, ptrdiff_t n_labels, const double *x,
                                  const int64_t *exponents, double *v_out, double *dv_out)
{
    for (ptrdiff_t t = 0; t < n_terms; t++) {
        const int64_t *e_t = exponents + t * n_labels;
        double prod = 1.0;
        for (ptrdiff_t l = 0; l < n_labels; l++) prod *= ipow(x[l], e_t[l]);
        v_out[t] = prod;
        for (ptrdiff_t l = 0; l < n_labels; l++) {
            int64_t e = e_t[l];
            if (e == 0) {
                dv_out[t * n_labels + l] = 0.0;
                continue;
            }
            double d = (double)e * ipow(x[l], e - 1);
            for (ptrdiff_t m = 0; m < n_labels; m++) {
                if (m != l) d *= ipow(x[m], e_t[m]);
            }
            dv_out[t * n_labels + l] = d;
        }
    }
}

/* v(x) alone (the objective needs no Jacobian); same products as above. */
static void label_vector(ptrdiff_t n_terms, ptrdiff_t n_labels, const double *x,
                         const int64_t *exponents, double *v_out)
{
    for (ptrdiff_t t = 0; t < n_terms; t++) {
        const int64_t *e_t = exponents + t * n_labels;
        double prod = 1.0;
        for (ptrdiff_t l = 0; l < n_labels; l++) prod *= ipow(x[l], e_t[l]);
        v_out[t] = prod;
    }
}

int cf_design(ptrdiff_t n_stars, ptrdiff_t n_terms, ptrdiff_t n_labels, const double *x,
              const int64_t *exponents, double *v_out, double *dv_out)
{
    if (n_stars < 0 || n_terms < 0 || n_labels < 0) return CF_ERR_ARG;
    /* ~200 flops a star: threads cost more than they save until the batch is large
       (measured 6 ms for 512 stars on two threads of a busy machine, 0.3 ms on one) */
    const int nthr = team_size(n_stars, 65536);
    (void)nthr; /* unused without OpenMP */
    CF_OMP(omp parallel for schedule(static) if (nthr > 1) num_threads(nthr))
    for (ptrdiff_t i = 0; i < n_stars; i++) {
        cf_label_vector_and_jacobian(n_terms, n_labels, x + i * n_labels, exponents,
                                     v_out + i * n_terms, dv_out + i * n_terms * n_labels);
    }
    return CF_OK;
}

/* ------------------------------------------------------------------ label fits */

/* Per-thread scratch of cf_lm_fit, carved from one allocation. */
typedef struct {
    double *g;     /* (T, T) */
    double *v;     /* (T,) */
    double *dv;    /* (T, L) */
    double *gv;    /* (T,) */
    double *gdv;   /* (T, L) */
    double *cand;  /* (K, L) */
    double *ends;  /* (R, L) */
    double *phis;  /* (R,) */
    double *x;     /* (L,) */
    double *x_new; /* (L,) */
    double *grad;  /* (L,) */
    double *step;  /* (L,) */
    double *hess;  /* (L, L) */
    double *damp;  /* (L, L) */
    double *m;     /* (L, L) elimination copy */
    double *r;     /* (L,) elimination copy */
    ptrdiff_t *order; /* (K,) */
    int *convs;       /* (R,) */
    void *block;
} lm_scratch;

static int lm_scratch_alloc(lm_scratch *s, ptrdiff_t nt, ptrdiff_t nl, ptrdiff_t k, ptrdiff_t r)
{
    size_t n_dbl = (size_t)(nt * nt + 2 * nt + 2 * nt * nl + k * nl + r * nl + r
                            + 5 * nl + 3 * nl * nl + 1);
    size_t bytes = sizeof(double) * n_dbl + sizeof(ptrdiff_t) * (size_t)(k + 1)
                   + sizeof(int) * (size_t)(r + 1);
    double *d = (double *)malloc(bytes);
    s->block = d;
    if (!d) return 0;
    s->g = d; d += nt * nt;
    s->v = d; d += nt;
    s->gv = d; d += nt;
    s->dv = d; d += nt * nl;
    s->gdv = d; d += nt * nl;
    s->cand = d; d += k * nl;
    s->ends = d; d += r * nl;
    s->phis = d; d += r;
    s->x = d; d += nl;
    s->x_new = d; d += nl;
    s->grad = d; d += nl;
    s->step = d; d += nl;
    s->r = d; d += nl;
    s->hess = d; d += nl * nl;
    s->damp = d; d += nl * nl;
    s->m = d; d += nl * nl;
    d += 1;
    s->order = (ptrdiff_t *)d;
    s->convs = (int *)(s->order + k + 1);
    return 1;
}

/* c - 2 h.v(x) + v(x)^T G v(x); v is scratch. */
static double lm_objective(const double *x, double c, const double *h, const double *g,
                           const int64_t *exponents, ptrdiff_t nt, ptrdiff_t nl, double *v)
{
    label_vector(nt, nl, x, exponents, v);
    double acc = c;
    for (ptrdiff_t t = 0; t < nt; t++) {
        double gv = 0.0;
        for (ptrdiff_t s = 0; s < nt; s++) gv += g[t * nt + s] * v[s];
        acc += v[t] * (gv - 2.0 * h[t]);
    }
    return acc;
}

/* Gaussian elimination with partial pivoting on copies (m, r); 0 if singular. */
static int solve_small(const double *a, const double *b, double *out, ptrdiff_t n, double *m,
                       double *r)
{
    memcpy(m, a, sizeof(double) * (size_t)(n * n));
    memcpy(r, b, sizeof(double) * (size_t)n);
    for (ptrdiff_t col = 0; col < n; col++) {
        ptrdiff_t piv = col;
        for (ptrdiff_t i = col + 1; i < n; i++) {
            if (fabs(m[i * n + col]) > fabs(m[piv * n + col])) piv = i;
        }
        double pv = m[piv * n + col];
        if (pv == 0.0 || !isfinite(pv)) return 0;
        if (piv != col) {
            for (ptrdiff_t j = 0; j < n; j++) {
                double tmp = m[col * n + j];
                m[col * n + j] = m[piv * n + j];
                m[piv * n + j] = tmp;
            }
            double tmp = r[col];
            r[col] = r[piv];
            r[piv] = tmp;
        }
        for (ptrdiff_t i = col + 1; i < n; i++) {
            double f = m[i * n + col] / m[col * n + col];
            for (ptrdiff_t j = col; j < n; j++) m[i * n + j] -= f * m[col * n + j];
            r[i] -= f * r[col];
        }
    }
    for (ptrdiff_t i = n - 1; i >= 0; i--) {
        double s = r[i];
        for (ptrdiff_t j = i + 1; j < n; j++) s -= m[i * n + j] * out[j];
        out[i] = s / m[i * n + i];
    }
    return 1;
}

/* Gradient dv^T (G v - h) and Gauss-Newton Hessian dv^T G dv.
 * dv is sparse (a term's derivative in a label it does not contain is exactly 0, most of
 * them for a polynomial): the zero entries are skipped. What they would add is +-0, and the
 * other products are added in the same order, so the sums are the dense loops' bit for bit.
 * G is symmetric (both halves copied from one packed entry): row s stands for column s. */
static void lm_grad_hess(const double *g, const double *h, const double *v, const double *dv,
                         ptrdiff_t nt, ptrdiff_t nl, double *gv, double *gdv, double *grad,
                         double *hess)
{
    for (ptrdiff_t t = 0; t < nt; t++) {
        double acc = 0.0;
        for (ptrdiff_t s = 0; s < nt; s++) acc += g[t * nt + s] * v[s];
        gv[t] = acc - h[t];
    }
    memset(gdv, 0, sizeof(double) * (size_t)(nt * nl));
    for (ptrdiff_t s = 0; s < nt; s++) {
        const double *gs = g + s * nt;
        for (ptrdiff_t l = 0; l < nl; l++) {
            double d = dv[s * nl + l];
            if (d == 0.0) continue;
            for (ptrdiff_t t = 0; t < nt; t++) gdv[t * nl + l] += gs[t] * d;
        }
    }
    for (ptrdiff_t l = 0; l < nl; l++) {
        double acc = 0.0;
        for (ptrdiff_t m = 0; m < nl; m++) hess[l * nl + m] = 0.0;
        for (ptrdiff_t t = 0; t < nt; t++) {
            double d = dv[t * nl + l];
            if (d == 0.0) continue;
            acc += d * gv[t];
            for (ptrdiff_t m = 0; m < nl; m++) hess[l * nl + m] += d * gdv[t * nl + m];
        }
        grad[l] = acc;
    }
}

/* Whether the symmetric (n, n) a is (numerically) positive definite; work is scratch. */
static int is_positive_definite(const double *a, ptrdiff_t n, double *work)
{
    memcpy(work, a, sizeof(double) * (size_t)(n * n));
    return cholesky_inplace(work, n);
}

/* out[l, m] += sum_t gv[t] d²v_t/dx_l dx_m: the term Gauss-Newton leaves out. */
static void lm_add_second_order(const double *x, const int64_t *exponents, const double *gv,
                                ptrdiff_t nt, ptrdiff_t nl, double *out)
{
    for (ptrdiff_t t = 0; t < nt; t++) {
        if (gv[t] == 0.0) continue;
        const int64_t *e = exponents + t * nl;
        for (ptrdiff_t l = 0; l < nl; l++) {
            if (e[l] == 0) continue;
            for (ptrdiff_t m = l; m < nl; m++) {
                double d;
                if (l == m) {
                    if (e[l] < 2) continue;
                    d = (double)(e[l] * (e[l] - 1)) * ipow(x[l], e[l] - 2);
                } else {
                    if (e[m] == 0) continue;
                    d = (double)(e[l] * e[m]) * ipow(x[l], e[l] - 1) * ipow(x[m], e[m] - 1);
                }
                for (ptrdiff_t k = 0; k < nl; k++) {
                    if (k != l && k != m) d *= ipow(x[k], e[k]);
                }
                out[l * nl + m] += gv[t] * d;
                if (m != l) out[m * nl + l] += gv[t] * d;
            }
        }
    }
}

/* LM from s->x (modified in place); returns phi, sets *iters and *converged. */
static double lm_one(lm_scratch *s, double c, const double *h, const int64_t *exponents,
                     const double *lo, const double *hi, ptrdiff_t nt, ptrdiff_t nl,
                     ptrdiff_t max_iter, double xtol, int64_t *iters, int *converged)
{
    double *x = s->x;
    double phi = lm_objective(x, c, h, s->g, exponents, nt, nl, s->v);
    double lam = 1e-3;
    ptrdiff_t it = 0;
    *converged = 0;
    while (it < max_iter) {
        it++;
        cf_label_vector_and_jacobian(nt, nl, x, exponents, s->v, s->dv);
        lm_grad_hess(s->g, h, s->v, s->dv, nt, nl, s->gv, s->gdv, s->grad, s->hess);
        /* full Newton Hessian (converges where Gauss-Newton crawls along curved, flat
           valleys); damping scales with the Gauss-Newton diagonal, never negative */
        memcpy(s->damp, s->hess, sizeof(double) * (size_t)(nl * nl));
        lm_add_second_order(x, exponents, s->gv, nt, nl, s->damp);
        for (ptrdiff_t l = 0; l < nl; l++) s->damp[l * nl + l] += lam * (s->hess[l * nl + l] + 1e-12);
        if (!is_positive_definite(s->damp, nl, s->m)) { /* away from a minimum: Gauss-Newton */
            memcpy(s->damp, s->hess, sizeof(double) * (size_t)(nl * nl));
            for (ptrdiff_t l = 0; l < nl; l++) s->damp[l * nl + l] += lam * (s->hess[l * nl + l] + 1e-12);
        }
        for (ptrdiff_t l = 0; l < nl; l++) s->grad[l] = -s->grad[l];
        if (!solve_small(s->damp, s->grad, s->step, nl, s->m, s->r)) {
            lam *= 10.0;
            continue;
        }
        double moved = 0.0;
        for (ptrdiff_t l = 0; l < nl; l++) {
            double xn = x[l] + s->step[l];
            if (xn < lo[l]) {
                xn = lo[l];
            } else if (xn > hi[l]) {
                xn = hi[l];
            }
            s->x_new[l] = xn;
            if (fabs(xn - x[l]) > moved) moved = fabs(xn - x[l]);
        }
        double phi_new = lm_objective(s->x_new, c, h, s->g, exponents, nt, nl, s->v);
        if (phi_new <= phi) {
            memcpy(x, s->x_new, sizeof(double) * (size_t)nl);
            phi = phi_new;
            lam = lam / 10.0 > 1e-9 ? lam / 10.0 : 1e-9;
            if (moved < xtol) {
                *converged = 1;
                break;
            }
        } else {
            lam *= 4.0;
            if (lam > 1e12) break;
        }
    }
    *iters = (int64_t)it;
    return phi;
}

/* a sorts before b: numpy's order (NaN last) */
static int less_nan_last(double a, double b)
{
    return a < b || (isnan(b) && !isnan(a));
}

int cf_lm_fit(ptrdiff_t n_stars, ptrdiff_t n_terms, ptrdiff_t n_labels, ptrdiff_t n_cand,
              const double *g_packed, const double *h, const double *c,
              const int64_t *exponents, const double *starts, const double *first,
              const double *lo, const double *hi, ptrdiff_t n_polish, ptrdiff_t max_iter,
              double xtol,
              double disagree_dchi2, double *x_out, double *phi_out, int64_t *iters_out,
              int64_t *status_out)
{
    const ptrdiff_t nt = n_terms, nl = n_labels;
    const ptrdiff_t n2 = nt * (nt + 1) / 2;
    const ptrdiff_t n_runs = n_polish < n_cand ? n_polish : n_cand;
    int err = CF_OK;
    if (n_stars < 0 || nt < 0 || nl < 0 || n_cand < 1 || n_polish < 1) return CF_ERR_ARG;
    if (n_stars == 0) return CF_OK;
    const int nthr = team_size(n_stars, CF_PAR_MIN_STARS);
    (void)nthr; /* unused without OpenMP */

    /* dynamic: stars differ in the number of LM iterations they need */
    CF_OMP(omp parallel if (nthr > 1) num_threads(nthr))
    {
        lm_scratch s = {0};
        int ok = lm_scratch_alloc(&s, nt, nl, n_cand, n_runs);
        if (!ok) {
            CF_OMP(omp atomic write)
            err = CF_ERR_NOMEM;
        }
        CF_OMP(omp for schedule(dynamic, 4))
        for (ptrdiff_t i = 0; i < n_stars; i++) {
            if (!ok) continue;
            const double *gp = g_packed + i * n2;
            const double *hrow = h + i * nt;
            ptrdiff_t k = 0;
            for (ptrdiff_t a = 0; a < nt; a++) {
                for (ptrdiff_t b = a; b < nt; b++, k++) {
                    s.g[a * nt + b] = gp[k];
                    s.g[b * nt + a] = gp[k];
                }
            }
            /* the starts, clipped; their objective (first) comes from the caller: one
               BLAS product for a batch */
            const double *fi = first + i * n_cand;
            for (ptrdiff_t j = 0; j < n_cand; j++) {
                double *cj = s.cand + j * nl;
                for (ptrdiff_t l = 0; l < nl; l++) {
                    double x = starts[(i * n_cand + j) * nl + l];
                    x = x > lo[l] ? x : lo[l];
                    cj[l] = x < hi[l] ? x : hi[l];
                }
            }
            /* stable insertion sort of the candidates (K is small) */
            for (ptrdiff_t j = 0; j < n_cand; j++) {
                ptrdiff_t q = j;
                while (q > 0 && less_nan_last(fi[j], fi[s.order[q - 1]])) {
                    s.order[q] = s.order[q - 1];
                    q--;
                }
                s.order[q] = j;
            }
            int64_t total_it = 0;
            for (ptrdiff_t r = 0; r < n_runs; r++) {
                memcpy(s.x, s.cand + s.order[r] * nl, sizeof(double) * (size_t)nl);
                int64_t it;
                int conv;
                s.phis[r] = lm_one(&s, c[i], hrow, exponents, lo, hi, nt, nl, max_iter, xtol,
                                   &it, &conv);
                memcpy(s.ends + r * nl, s.x, sizeof(double) * (size_t)nl);
                s.convs[r] = conv;
                total_it += it;
            }
            ptrdiff_t best = 0;
            for (ptrdiff_t r = 1; r < n_runs; r++) {
                if (s.phis[r] < s.phis[best]) best = r;
            }
            const double *xb = s.ends + best * nl;
            int64_t status = s.convs[best] ? 0 : CF_NOT_CONVERGED;
            for (ptrdiff_t l = 0; l < nl; l++) {
                if (xb[l] <= lo[l] || xb[l] >= hi[l]) status |= CF_HIT_BOUND;
            }
            cf_label_vector_and_jacobian(nt, nl, xb, exponents, s.v, s.dv);
            lm_grad_hess(s.g, hrow, s.v, s.dv, nt, nl, s.gv, s.gdv, s.grad, s.hess);
            for (ptrdiff_t r = 0; r < n_runs; r++) {
                if (!s.convs[r] || s.phis[r] - s.phis[best] >= disagree_dchi2) continue;
                const double *xr = s.ends + r * nl;
                double d2 = 0.0;
                for (ptrdiff_t l = 0; l < nl; l++) {
                    for (ptrdiff_t m = 0; m < nl; m++) {
                        d2 += (xr[l] - xb[l]) * s.hess[l * nl + m] * (xr[m] - xb[m]);
                    }
                }
                if (d2 > disagree_dchi2) status |= CF_STARTS_DISAGREE;
            }
            memcpy(x_out + i * nl, xb, sizeof(double) * (size_t)nl);
            phi_out[i] = s.phis[best];
            iters_out[i] = total_it;
            status_out[i] = status;
        }
        free(s.block);
    }
    return err;
}

/* ------------------------------------------------------------------ de-biasing steps */

/* Whether a (n, n) is positive definite: every Cholesky pivot > 0, NaN not (the rule of
 * fitting._batched_cholesky: a sign test of the eigenvalues, no relative tolerance). */
static int positive_definite(const double *a, ptrdiff_t n, double *c)
{
    for (ptrdiff_t j = 0; j < n; j++) {
        double d = a[j * n + j];
        for (ptrdiff_t k = 0; k < j; k++) d -= c[j * n + k] * c[j * n + k];
        if (!(d > 0.0)) return 0;
        double dj = sqrt(d);
        c[j * n + j] = dj;
        for (ptrdiff_t i = j + 1; i < n; i++) {
            double t = a[i * n + j];
            for (ptrdiff_t k = 0; k < j; k++) t -= c[i * n + k] * c[j * n + k];
            c[i * n + j] = t / dj;
        }
    }
    return 1;
}

/* Eigen-decomposition of the symmetric (n, n) a by cyclic Jacobi rotations (n is a few
 * labels): a is destroyed, lam (n,) gets the eigenvalues and u (n, n) the eigenvectors
 * as columns. Converges quadratically; stops when the off-diagonal part is below
 * 1e-15 of the whole (or after 100 sweeps). */
static void jacobi_eigh(double *a, ptrdiff_t n, double *lam, double *u)
{
    for (ptrdiff_t i = 0; i < n * n; i++) u[i] = 0.0;
    for (ptrdiff_t i = 0; i < n; i++) u[i * n + i] = 1.0;
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0.0, tot = 0.0;
        for (ptrdiff_t i = 0; i < n; i++) {
            for (ptrdiff_t j = 0; j < n; j++) {
                tot += a[i * n + j] * a[i * n + j];
                if (i != j) off += a[i * n + j] * a[i * n + j];
            }
        }
        if (!(off > 1e-30 * tot)) break; /* also stops on NaN */
        for (ptrdiff_t p = 0; p < n - 1; p++) {
            for (ptrdiff_t q = p + 1; q < n; q++) {
                double apq = a[p * n + q];
                if (apq == 0.0) continue;
                double theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                double t = (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
                double c = 1.0 / sqrt(t * t + 1.0), sn = t * c;
                for (ptrdiff_t k = 0; k < n; k++) { /* columns p, q */
                    double akp = a[k * n + p], akq = a[k * n + q];
                    a[k * n + p] = c * akp - sn * akq;
                    a[k * n + q] = sn * akp + c * akq;
                }
                for (ptrdiff_t k = 0; k < n; k++) { /* rows p, q */
                    double apk = a[p * n + k], aqk = a[q * n + k];
                    a[p * n + k] = c * apk - sn * aqk;
                    a[q * n + k] = sn * apk + c * aqk;
                }
                for (ptrdiff_t k = 0; k < n; k++) {
                    double ukp = u[k * n + p], ukq = u[k * n + q];
                    u[k * n + p] = c * ukp - sn * ukq;
                    u[k * n + q] = sn * ukp + c * ukq;
                }
            }
        }
    }
    for (ptrdiff_t i = 0; i < n; i++) lam[i] = a[i * n + i];
}

/* Solve the lower-triangular c y = b in place (b -> y). */
static void lower_solve(const double *c, double *b, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; i++) {
        double s = b[i];
        for (ptrdiff_t k = 0; k < i; k++) s -= c[i * n + k] * b[k];
        b[i] = s / c[i * n + i];
    }
}

typedef struct {
    double *chol, *a, *u, *lam, *tmp, *vec; /* (L, L) x 4, (L,) x 2 */
} capped_scratch;

/* The scratch carved out of a thread's block from `base` on: 4 (L, L) and 2 (L,). */
static void capped_scratch_at(capped_scratch *cs, double *base, ptrdiff_t nl)
{
    cs->chol = base;
    cs->a = cs->chol + nl * nl;
    cs->u = cs->a + nl * nl;
    cs->tmp = cs->u + nl * nl;
    cs->lam = cs->tmp + nl * nl;
    cs->vec = cs->lam + nl;
}

/* The capped Hessian and pushed bias of one star (_reference.capped_step_matrices):
 * work = F - B_x and push as it is where cap F - B_x is positive definite (returns 0);
 * else, with F = C C^T and C^-1 B_x C^-T = U diag(lam) U^T,
 * work = C U diag(1 - min(lam, cap)) U^T C^T and push -> C U diag(min(1, cap/lam)) U^T
 * C^-1 push (returns 1 if some lam > cap); F and push = 0 where F is not positive
 * definite (returns 0). */
static int capped_step(const double *fisher, const double *bmat, double cap, ptrdiff_t nl,
                       double *work, double *push, capped_scratch *cs)
{
    for (ptrdiff_t q = 0; q < nl * nl; q++) work[q] = cap * fisher[q] - bmat[q];
    if (positive_definite(work, nl, cs->chol)) {
        for (ptrdiff_t q = 0; q < nl * nl; q++) work[q] = fisher[q] - bmat[q];
        return 0;
    }
    for (ptrdiff_t q = 0; q < nl * nl; q++) cs->chol[q] = 0.0;
    if (!positive_definite(fisher, nl, cs->chol)) {
        memcpy(work, fisher, sizeof(double) * (size_t)(nl * nl));
        for (ptrdiff_t l = 0; l < nl; l++) push[l] = 0.0;
        return 0;
    }
    const double *c = cs->chol;
    /* a = C^-1 B C^-T: columns of B through C^-1, then the rows */
    for (ptrdiff_t j = 0; j < nl; j++) {
        for (ptrdiff_t i = 0; i < nl; i++) cs->vec[i] = bmat[i * nl + j];
        lower_solve(c, cs->vec, nl);
        for (ptrdiff_t i = 0; i < nl; i++) cs->tmp[i * nl + j] = cs->vec[i]; /* Y = C^-1 B */
    }
    for (ptrdiff_t i = 0; i < nl; i++) {
        for (ptrdiff_t j = 0; j < nl; j++) cs->vec[j] = cs->tmp[i * nl + j]; /* row i of Y */
        lower_solve(c, cs->vec, nl);
        for (ptrdiff_t j = 0; j < nl; j++) cs->a[j * nl + i] = cs->vec[j]; /* (C^-1 Y^T)^T */
    }
    for (ptrdiff_t i = 0; i < nl; i++) {
        for (ptrdiff_t j = i + 1; j < nl; j++) {
            double m = 0.5 * (cs->a[i * nl + j] + cs->a[j * nl + i]);
            cs->a[i * nl + j] = cs->a[j * nl + i] = m;
        }
    }
    jacobi_eigh(cs->a, nl, cs->lam, cs->u);
    int capped = 0;
    /* tmp = C U (columns of U through C) */
    for (ptrdiff_t i = 0; i < nl; i++) {
        for (ptrdiff_t j = 0; j < nl; j++) {
            double s = 0.0;
            for (ptrdiff_t k = 0; k <= i; k++) s += c[i * nl + k] * cs->u[k * nl + j];
            cs->tmp[i * nl + j] = s;
        }
    }
    /* work = (C U) diag(1 - min(lam, cap)) (C U)^T */
    for (ptrdiff_t i = 0; i < nl; i++) {
        for (ptrdiff_t j = 0; j < nl; j++) {
            double s = 0.0;
            for (ptrdiff_t k = 0; k < nl; k++) {
                double d = 1.0 - (cs->lam[k] < cap ? cs->lam[k] : cap);
                s += cs->tmp[i * nl + k] * d * cs->tmp[j * nl + k];
            }
            work[i * nl + j] = s;
        }
    }
    /* push -> (C U) diag(scale) U^T (C^-1 push) */
    memcpy(cs->vec, push, sizeof(double) * (size_t)nl);
    lower_solve(c, cs->vec, nl);
    for (ptrdiff_t k = 0; k < nl; k++) {
        double s = 0.0;
        for (ptrdiff_t i = 0; i < nl; i++) s += cs->u[i * nl + k] * cs->vec[i];
        if (cs->lam[k] > cap) {
            capped = 1;
            s *= cap / cs->lam[k];
        }
        cs->a[k] = s; /* a is free again */
    }
    for (ptrdiff_t i = 0; i < nl; i++) {
        double s = 0.0;
        for (ptrdiff_t k = 0; k < nl; k++) s += cs->tmp[i * nl + k] * cs->a[k];
        push[i] = s;
    }
    return capped;
}

int cf_debias_steps(ptrdiff_t n_stars, ptrdiff_t n_terms, ptrdiff_t n_labels,
                    const double *g_packed, const double *h, const double *b_packed,
                    const int64_t *exponents, const double *lo, const double *hi, double cap,
                    ptrdiff_t n_steps, double xtol, double *x_inout, int64_t *capped_out)
{
    const ptrdiff_t nt = n_terms, nl = n_labels, n2 = nt * (nt + 1) / 2;
    int err = CF_OK;
    if (n_stars < 0 || nt < 0 || nl < 0 || n_steps < 0) return CF_ERR_ARG;
    if (n_stars == 0) return CF_OK;
    const int nthr = team_size(n_stars, CF_PAR_MIN_STARS);
    (void)nthr; /* unused without OpenMP */
    CF_OMP(omp parallel if (nthr > 1) num_threads(nthr))
    {
        /* g, b (T, T); zero, v, gv (T); dv, gdv (T, L); x, plain, push, step, r, lam, vec
           (L); fisher, bmat, work, m, chol, a, u, tmp (L, L) */
        size_t n_dbl = (size_t)(2 * nt * nt + 3 * nt + 2 * nt * nl + 7 * nl + 8 * nl * nl + 1);
        double *blk = (double *)calloc(n_dbl, sizeof(double));
        if (!blk) {
            CF_OMP(omp atomic write)
            err = CF_ERR_NOMEM;
        }
        double *g = blk, *b = g + nt * nt, *zero = b + nt * nt, *v = zero + nt, *gv = v + nt;
        double *dv = gv + nt, *gdv = dv + nt * nl, *x = gdv + nt * nl, *plain = x + nl;
        double *push = plain + nl, *step = push + nl, *r = step + nl, *fisher = r + nl;
        double *bmat = fisher + nl * nl, *work = bmat + nl * nl, *m = work + nl * nl;
        capped_scratch cs;
        capped_scratch_at(&cs, m + nl * nl, nl);
        CF_OMP(omp for schedule(dynamic, 8))
        for (ptrdiff_t i = 0; i < n_stars; i++) {
            if (!blk) continue;
            const double *gp = g_packed + i * n2, *bp = b_packed + i * n2;
            ptrdiff_t k = 0;
            for (ptrdiff_t a = 0; a < nt; a++) {
                for (ptrdiff_t c = a; c < nt; c++, k++) {
                    g[a * nt + c] = g[c * nt + a] = gp[k];
                    b[a * nt + c] = b[c * nt + a] = bp[k];
                }
            }
            memcpy(x, x_inout + i * nl, sizeof(double) * (size_t)nl);
            double last = INFINITY;
            int64_t capped = 0;
            for (ptrdiff_t it = 0; it < n_steps; it++) {
                cf_label_vector_and_jacobian(nt, nl, x, exponents, v, dv);
                lm_grad_hess(g, h + i * nt, v, dv, nt, nl, gv, gdv, plain, fisher);
                lm_grad_hess(b, zero, v, dv, nt, nl, gv, gdv, push, bmat);
                capped |= capped_step(fisher, bmat, cap, nl, work, push, &cs);
                for (ptrdiff_t l = 0; l < nl; l++) push[l] -= plain[l];
                if (!solve_small(work, push, step, nl, m, r)) {
                    for (ptrdiff_t l = 0; l < nl; l++) step[l] = 0.0;
                }
                double size = 0.0;
                for (ptrdiff_t l = 0; l < nl; l++) {
                    if (fabs(step[l]) > size) size = fabs(step[l]);
                }
                int go = size < last;
                if (go) {
                    for (ptrdiff_t l = 0; l < nl; l++) {
                        double xn = x[l] + step[l];
                        xn = xn > lo[l] ? xn : lo[l];
                        x[l] = xn < hi[l] ? xn : hi[l];
                    }
                }
                last = size;
                if (!(go && size > xtol)) break;
            }
            capped_out[i] = capped;
            memcpy(x_inout + i * nl, x, sizeof(double) * (size_t)nl);
        }
        free(blk);
    }
    return err;
}

/* The de-biased covariance of one star at its labels (_reference.sandwich_covariance):
 * H^-1 (F (1 + kappa v^T Cbar v) + extra) H^-1 with H the capped F - B_x, and the
 * correction the cap withheld, max_l |(H^-1 (b - push b))_l| / sigma_l. */
int cf_sandwich_covariance(ptrdiff_t n_stars, ptrdiff_t n_terms, ptrdiff_t n_labels,
                           const double *g_packed, const double *b_packed,
                           const double *cbar_packed, const double *kappa, const double *extra,
                           const double *x, const int64_t *exponents, double cap,
                           double *cov_out, int64_t *capped_out, double *withheld_out)
{
    const ptrdiff_t nt = n_terms, nl = n_labels, n2 = nt * (nt + 1) / 2;
    int err = CF_OK;
    if (n_stars < 0 || nt < 0 || nl < 0) return CF_ERR_ARG;
    if (n_stars == 0) return CF_OK;
    /* a few microseconds a star: threads woken for a batch cost more than they save on a
       busy machine (as for cf_design) */
    const int nthr = team_size(n_stars, 65536);
    (void)nthr; /* unused without OpenMP */
    CF_OMP(omp parallel if (nthr > 1) num_threads(nthr))
    {
        /* g, b, cbar (T, T); zero, v, gv (T); dv, gdv (T, L); scratch, bias, pushed, rest,
           step, r, lam, vec, col, unit (L); fisher, bmat, hess, hinv, mid, m, chol, a, u,
           tmp (L, L) */
        size_t n_dbl = (size_t)(3 * nt * nt + 3 * nt + 2 * nt * nl + 10 * nl + 10 * nl * nl + 1);
        double *blk = (double *)calloc(n_dbl, sizeof(double));
        if (!blk) {
            CF_OMP(omp atomic write)
            err = CF_ERR_NOMEM;
        }
        double *g = blk, *b = g + nt * nt, *cbar = b + nt * nt, *zero = cbar + nt * nt;
        double *v = zero + nt, *gv = v + nt, *dv = gv + nt, *gdv = dv + nt * nl;
        double *scratch = gdv + nt * nl, *bias = scratch + nl, *pushed = bias + nl;
        double *rest = pushed + nl, *step = rest + nl, *r = step + nl, *col = r + nl;
        double *unit = col + nl, *fisher = unit + nl, *bmat = fisher + nl * nl;
        double *hess = bmat + nl * nl, *hinv = hess + nl * nl, *mid = hinv + nl * nl;
        double *m = mid + nl * nl;
        capped_scratch cs;
        capped_scratch_at(&cs, m + nl * nl, nl);
        if (blk) {
            ptrdiff_t k = 0;
            for (ptrdiff_t a = 0; a < nt; a++) {
                for (ptrdiff_t c = a; c < nt; c++, k++) cbar[a * nt + c] = cbar[c * nt + a] =
                    cbar_packed[k];
            }
        }
        CF_OMP(omp for schedule(dynamic, 8))
        for (ptrdiff_t i = 0; i < n_stars; i++) {
            if (!blk) continue;
            const double *gp = g_packed + i * n2, *bp = b_packed + i * n2;
            double *cov = cov_out + i * nl * nl;
            ptrdiff_t k = 0;
            for (ptrdiff_t a = 0; a < nt; a++) {
                for (ptrdiff_t c = a; c < nt; c++, k++) {
                    g[a * nt + c] = g[c * nt + a] = gp[k];
                    b[a * nt + c] = b[c * nt + a] = bp[k];
                }
            }
            cf_label_vector_and_jacobian(nt, nl, x + i * nl, exponents, v, dv);
            lm_grad_hess(g, zero, v, dv, nt, nl, gv, gdv, scratch, fisher);
            lm_grad_hess(b, zero, v, dv, nt, nl, gv, gdv, bias, bmat); /* bias = dv^T B v */
            memcpy(pushed, bias, sizeof(double) * (size_t)nl);
            capped_out[i] = capped_step(fisher, bmat, cap, nl, hess, pushed, &cs);
            double lev = 0.0;
            for (ptrdiff_t t = 0; t < nt; t++) {
                double acc = 0.0;
                for (ptrdiff_t s2 = 0; s2 < nt; s2++) acc += cbar[s2 * nt + t] * v[s2];
                lev += v[t] * acc;
            }
            double scale = 1.0 + kappa[i] * lev;
            int ok = 1;
            for (ptrdiff_t j = 0; j < nl && ok; j++) { /* hinv, column by column */
                for (ptrdiff_t q = 0; q < nl; q++) unit[q] = q == j ? 1.0 : 0.0;
                ok = solve_small(hess, unit, col, nl, m, r);
                for (ptrdiff_t q = 0; q < nl; q++) hinv[q * nl + j] = col[q];
            }
            if (!ok) {
                for (ptrdiff_t q = 0; q < nl * nl; q++) cov[q] = NAN;
                withheld_out[i] = 0.0;
                continue;
            }
            const double *ex = extra + i * nl * nl;
            for (ptrdiff_t l = 0; l < nl; l++) { /* mid = middle hinv^T */
                for (ptrdiff_t q = 0; q < nl; q++) {
                    double s = 0.0;
                    for (ptrdiff_t p = 0; p < nl; p++)
                        s += (fisher[l * nl + p] * scale + ex[l * nl + p]) * hinv[q * nl + p];
                    mid[l * nl + q] = s;
                }
            }
            for (ptrdiff_t l = 0; l < nl; l++) {
                for (ptrdiff_t q = 0; q < nl; q++) {
                    double s = 0.0;
                    for (ptrdiff_t p = 0; p < nl; p++) s += hinv[l * nl + p] * mid[p * nl + q];
                    cov[l * nl + q] = s;
                }
            }
            for (ptrdiff_t l = 0; l < nl; l++) rest[l] = bias[l] - pushed[l];
            if (!solve_small(hess, rest, step, nl, m, r)) {
                for (ptrdiff_t l = 0; l < nl; l++) step[l] = 0.0;
            }
            double worst = 0.0;
            for (ptrdiff_t l = 0; l < nl; l++) {
                double ratio = fabs(step[l]) / sqrt(fabs(cov[l * nl + l]));
                if (ratio > worst) worst = ratio; /* NaN (0 / 0) counts as 0 */
            }
            withheld_out[i] = worst;
        }
        free(blk);
    }
    return err;
}

/* ------------------------------------------------------------------ star weights */

/* One star's pass (the body of cf_star_weights) for spectra of type TYPE: float32
 * spectra are read as they are, each value widened to double exactly, so the results are
 * those of a float64 copy without the copy (for a survey, a pass as long as this one). */
#define CF_STAR_WEIGHTS_ROW(NAME, TYPE)                                                   \
static void NAME(ptrdiff_t n_pix, const TYPE *f, const TYPE *iv, const double *s2,        \
                 const uint8_t *good_pix, const double *theta0, const double *t_pix,      \
                 float *wo, double *wro, double *c_out, int64_t *npix_out,                \
                 double *moments_out, int64_t *bad_out)                                   \
{                                                                                         \
    double acc = 0.0, m0 = 0.0, m1 = 0.0, m2 = 0.0, sum_iv = 0.0, sum_f = 0.0;            \
    int64_t cnt = 0, neg = 0;                                                             \
    for (ptrdiff_t p = 0; p < n_pix; p++) {                                               \
        double x = (double)iv[p];                                                         \
        /* the input check rides along, as check_spectra's fast path: a sum with a NaN   \
           or inf in it is not finite (a finite sum can also overflow: a false alarm,    \
           which check_spectra then clears) */                                            \
        sum_iv += x;                                                                      \
        neg += x < 0.0;                                                                   \
        sum_f += x > 0.0 ? (double)f[p] : 0.0;                                            \
        if (x > 0 && good_pix[p]) {                                                       \
            double w = x / (1.0 + x * s2[p]); /* 1 / (1/ivar + s2), one division */       \
            double r = (double)f[p] - theta0[p];                                          \
            wo[p] = (float)w;                                                             \
            wro[p] = w * r;                                                               \
            acc += w * r * r;                                                             \
            cnt++;                                                                        \
            m0 += w;                                                                      \
            m1 += w * t_pix[p];                                                           \
            m2 += w * w * t_pix[p];                                                       \
        } else {                                                                          \
            wo[p] = 0.0f;                                                                 \
            wro[p] = 0.0;                                                                 \
        }                                                                                 \
    }                                                                                     \
    *c_out = acc;                                                                         \
    *npix_out = cnt;                                                                      \
    *bad_out = !isfinite(sum_iv) || neg > 0 || !isfinite(sum_f);                          \
    moments_out[0] = m0;                                                                  \
    moments_out[1] = m1;                                                                  \
    moments_out[2] = m2;                                                                  \
}

CF_STAR_WEIGHTS_ROW(star_weights_row_f64, double)
CF_STAR_WEIGHTS_ROW(star_weights_row_f32, float)

int cf_star_weights(ptrdiff_t n_stars, ptrdiff_t n_pix, const void *flux, const void *ivar,
                    int single, const double *s2, const uint8_t *good_pix,
                    const double *theta0, const double *t_pix, float *w_out, double *wr_out,
                    double *c_out, int64_t *npix_out, double *moments_out, int64_t *bad_out)
{
    if (n_stars < 0 || n_pix < 0) return CF_ERR_ARG;
    const int nthr = team_size(n_stars, CF_PAR_MIN_STARS);
    (void)nthr; /* unused without OpenMP */
    /* one pass over each spectrum: this kernel is bound by memory bandwidth */
    CF_OMP(omp parallel for schedule(static) if (nthr > 1) num_threads(nthr))
    for (ptrdiff_t i = 0; i < n_stars; i++) {
        if (single) {
            star_weights_row_f32(n_pix, (const float *)flux + i * n_pix,
                                 (const float *)ivar + i * n_pix, s2, good_pix, theta0, t_pix,
                                 w_out + i * n_pix, wr_out + i * n_pix, c_out + i,
                                 npix_out + i, moments_out + 3 * i, bad_out + i);
        } else {
            star_weights_row_f64(n_pix, (const double *)flux + i * n_pix,
                                 (const double *)ivar + i * n_pix, s2, good_pix, theta0, t_pix,
                                 w_out + i * n_pix, wr_out + i * n_pix, c_out + i,
                                 npix_out + i, moments_out + 3 * i, bad_out + i);
        }
    }
    return CF_OK;
}

/* ------------------------------------------------------------------ training sums */

int cf_training_sums(ptrdiff_t n_stars, ptrdiff_t n_pix, const double *resid,
                     const double *ivar, const double *s2, const uint8_t *use,
                     const uint8_t *same_seg, const uint8_t *pairs, double *chi2_out,
                     int64_t *count_out, double *pair_out)
{
    if (n_stars < 0 || n_pix < 0) return CF_ERR_ARG;
    const int nthr = team_size(n_stars, CF_PAR_MIN_STARS);
    (void)nthr; /* unused without OpenMP */
    CF_OMP(omp parallel for schedule(static) if (nthr > 1) num_threads(nthr))
    for (ptrdiff_t i = 0; i < n_stars; i++) {
        const double *r = resid + i * n_pix;
        const double *iv = ivar + i * n_pix;
        double acc = 0.0, n_pair = 0.0, ab = 0.0, aa = 0.0, bb = 0.0, prev_z = 0.0;
        int64_t cnt = 0;
        int prev_ok = 0;
        for (ptrdiff_t p = 0; p < n_pix; p++) {
            double x = iv[p];
            int ok = x > 0 && use[p];
            double z = 0.0;
            if (ok) {
                double w = x / (1.0 + x * s2[p]);
                acc += w * r[p] * r[p];
                cnt++;
                if (pairs[i]) {
                    z = r[p] * sqrt(w);
                    if (prev_ok && same_seg[p - 1]) {
                        n_pair += 1.0;
                        ab += prev_z * z;
                        aa += prev_z * prev_z;
                        bb += z * z;
                    }
                }
            }
            prev_ok = ok;
            prev_z = z;
        }
        chi2_out[i] = acc;
        count_out[i] = cnt;
        pair_out[4 * i] = n_pair;
        pair_out[4 * i + 1] = ab;
        pair_out[4 * i + 2] = aa;
        pair_out[4 * i + 3] = bb;
    }
    return CF_OK;
}

/* ------------------------------------------------------------------ weighted sum of squares */

int cf_weighted_square_sum(ptrdiff_t n_stars, ptrdiff_t n_pix, const float *w, const double *m,
                           double *out)
{
    if (n_stars < 0 || n_pix < 0) return CF_ERR_ARG;
    const int nthr = team_size(n_stars, CF_PAR_MIN_STARS);
    (void)nthr; /* unused without OpenMP */
    /* one pass over two (N, P) arrays, bound by memory bandwidth */
    CF_OMP(omp parallel for schedule(static) if (nthr > 1) num_threads(nthr))
    for (ptrdiff_t i = 0; i < n_stars; i++) {
        const float *wi = w + i * n_pix;
        const double *mi = m + i * n_pix;
        double acc = 0.0;
        for (ptrdiff_t p = 0; p < n_pix; p++) acc += (double)wi[p] * mi[p] * mi[p];
        out[i] = acc;
    }
    return CF_OK;
}

/* ------------------------------------------------------------------ continuum */

/* What every star shares: the chips as runs of consecutive pixels (one run per chip for
 * the apStar chips, so the per-pixel loops need no chip test) and each chip's
 * continuum pixels, cidx[cstart[c]:cstart[c + 1]]. */
typedef struct {
    ptrdiff_t n_pix, k, n_chips, min_pixels, n_runs;
    const double *basis;   /* (P, K) */
    const int64_t *chip;   /* (P,) */
    ptrdiff_t *run_lo;     /* (R,) first pixel of each run */
    ptrdiff_t *run_hi;     /* (R,) one past its last */
    ptrdiff_t *run_chip;   /* (R,) its chip */
    ptrdiff_t *cstart;     /* (C + 1,) */
    ptrdiff_t *cidx;       /* (continuum pixels on chips,), then C scratch cursors */
    void *block;
} cont_layout;

static int in_chip(int64_t c, ptrdiff_t n_chips)
{
    return c >= 0 && c < (int64_t)n_chips;
}

/* Fill cl for these chips (cl->block then holds its arrays: free it); 0 if out of memory. */
static int cont_layout_init(cont_layout *cl, ptrdiff_t n_pix, ptrdiff_t k, ptrdiff_t n_chips,
                            ptrdiff_t min_pixels, const double *basis, const int64_t *chip,
                            const uint8_t *is_cont)
{
    ptrdiff_t n_runs = 0, n_cont = 0;
    for (ptrdiff_t j = 0; j < n_pix; j++) {
        if (!in_chip(chip[j], n_chips)) continue;
        if (j == 0 || chip[j - 1] != chip[j]) n_runs++;
        if (is_cont[j]) n_cont++;
    }
    cl->n_pix = n_pix;
    cl->k = k;
    cl->n_chips = n_chips;
    cl->min_pixels = min_pixels;
    cl->n_runs = n_runs;
    cl->basis = basis;
    cl->chip = chip;
    cl->block = malloc(sizeof(ptrdiff_t) * (size_t)(3 * n_runs + 2 * n_chips + 1 + n_cont + 1));
    if (!cl->block) return 0;
    cl->run_lo = (ptrdiff_t *)cl->block;
    cl->run_hi = cl->run_lo + n_runs;
    cl->run_chip = cl->run_hi + n_runs;
    cl->cstart = cl->run_chip + n_runs;
    cl->cidx = cl->cstart + n_chips + 1;
    ptrdiff_t r = -1;
    for (ptrdiff_t c = 0; c <= n_chips; c++) cl->cstart[c] = 0;
    for (ptrdiff_t j = 0; j < n_pix; j++) {
        if (!in_chip(chip[j], n_chips)) continue;
        if (j == 0 || chip[j - 1] != chip[j]) {
            r++;
            cl->run_lo[r] = j;
            cl->run_chip[r] = (ptrdiff_t)chip[j];
        }
        cl->run_hi[r] = j + 1;
        if (is_cont[j]) cl->cstart[chip[j] + 1]++;
    }
    for (ptrdiff_t c = 0; c < n_chips; c++) cl->cstart[c + 1] += cl->cstart[c];
    /* in pixel order, as the numba kernel (the order of the sums) */
    ptrdiff_t *fill = cl->cidx + n_cont; /* (C,) cursors */
    for (ptrdiff_t c = 0; c < n_chips; c++) fill[c] = cl->cstart[c];
    for (ptrdiff_t j = 0; j < n_pix; j++) {
        if (in_chip(chip[j], n_chips) && is_cont[j]) cl->cidx[fill[chip[j]]++] = j;
    }
    return 1;
}

/* A pixel carries weight: finite flux, finite positive ivar. */
static int usable(double f, double w)
{
    return w > 0.0 && w < INFINITY && fabs(f) < INFINITY;
}

/* Element j of a float (single) or double spectrum row, and a store into one. Every
 * caller passes a constant `single`, so the compiler specialises the inline functions
 * below for each precision: one source for both, with no conversion pass. */
static inline double ld(const void *row, ptrdiff_t j, int single)
{
    return single ? (double)((const float *)row)[j] : ((const double *)row)[j];
}

static inline void put(void *row, ptrdiff_t j, double x, int single)
{
    if (single) {
        ((float *)row)[j] = (float)x;
    } else {
        ((double *)row)[j] = x;
    }
}

/* Divide pixel j by its continuum value; returns 1 if the pixel is usable but the
 * continuum there is not finite and positive (the fit is then rejected). */
static inline int cont_divide(ptrdiff_t j, double cont, const void *f, const void *w, void *fo,
                              void *wo, void *co, int single, int keep)
{
    double fj = ld(f, j, single), wj = ld(w, j, single);
    /* & rather than && and the quotient always computed: selects, not branches (GCC still
     * does not vectorize the loop around this under its default -ftrapping-math) */
    int g = (wj > 0.0) & (wj < INFINITY) & (fabs(fj) < INFINITY);
    int ok = g & (cont > 0.0) & (cont < INFINITY);
    double fn = fj / cont, wn = wj * cont * cont;
    put(fo, j, ok ? fn : 1.0, single);
    put(wo, j, ok ? wn : 0.0, single);
    if (keep) put(co, j, cont, single);
    return g & !ok;
}

/* Evaluate, divide and store one run of a fitted chip; returns the number of usable
 * pixels where the continuum is not finite and positive. */
static inline ptrdiff_t cont_divide_run(const cont_layout *cl, const double *coef,
                                        ptrdiff_t lo, ptrdiff_t hi, const void *f,
                                        const void *w, void *fo, void *wo, void *co, int single,
                                        int keep)
{
    const ptrdiff_t k = cl->k;
    const double *basis = cl->basis;
    ptrdiff_t bad = 0;
    if (k == 4) { /* the default degree 3, unrolled (as in numba) */
        const double c0 = coef[0], c1 = coef[1], c2 = coef[2], c3 = coef[3];
        for (ptrdiff_t j = lo; j < hi; j++) {
            const double *bj = basis + 4 * j;
            double cont = c0 * bj[0] + c1 * bj[1] + c2 * bj[2] + c3 * bj[3];
            bad += cont_divide(j, cont, f, w, fo, wo, co, single, keep);
        }
        return bad;
    }
    for (ptrdiff_t j = lo; j < hi; j++) {
        const double *bj = basis + j * k;
        double cont = 0.0;
        for (ptrdiff_t q = 0; q < k; q++) cont += coef[q] * bj[q];
        bad += cont_divide(j, cont, f, w, fo, wo, co, single, keep);
    }
    return bad;
}

/* cont_divide_run for the survey's case (float spectra, degree 3, no continuum kept),
 * written so that GCC vectorizes it: 64-bit lanes throughout (double compares, an int64
 * count), no branches. The same operations on the same values as cont_divide, hence
 * the same results to the bit. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-trapping-math")))
#endif
static ptrdiff_t cont_divide_f32_k4(const double *basis, const double *coef, ptrdiff_t lo,
                                    ptrdiff_t hi, const float *restrict f,
                                    const float *restrict w, float *restrict fo,
                                    float *restrict wo)
{
    const double c0 = coef[0], c1 = coef[1], c2 = coef[2], c3 = coef[3];
    int64_t bad = 0;
    for (ptrdiff_t j = lo; j < hi; j++) {
        const double *bj = basis + 4 * j;
        double cont = c0 * bj[0] + c1 * bj[1] + c2 * bj[2] + c3 * bj[3];
        double fj = (double)f[j], wj = (double)w[j];
        int64_t g = (wj > 0.0) & (wj < INFINITY) & (fabs(fj) < INFINITY);
        int64_t ok = g & (cont > 0.0) & (cont < INFINITY);
        double fn = fj / cont, wn = wj * cont * cont;
        fo[j] = ok ? (float)fn : 1.0f;
        wo[j] = ok ? (float)wn : 0.0f;
        bad += g & (ok ^ 1);
    }
    return (ptrdiff_t)bad;
}

/* cont_divide_run with constant flags at each call, so each of the four is specialised:
 * the hot loop has no test of the precision or of co per pixel. */
static ptrdiff_t cont_divide_any(const cont_layout *cl, const double *coef, ptrdiff_t lo,
                                 ptrdiff_t hi, const void *f, const void *w, void *fo,
                                 void *wo, void *co, int single)
{
    if (single && !co && cl->k == 4)
        return cont_divide_f32_k4(cl->basis, coef, lo, hi, f, w, fo, wo);
    if (single) {
        return co ? cont_divide_run(cl, coef, lo, hi, f, w, fo, wo, co, 1, 1)
                  : cont_divide_run(cl, coef, lo, hi, f, w, fo, wo, NULL, 1, 0);
    }
    return co ? cont_divide_run(cl, coef, lo, hi, f, w, fo, wo, co, 0, 1)
              : cont_divide_run(cl, coef, lo, hi, f, w, fo, wo, NULL, 0, 0);
}

/* One star: rows f, w (P,) in; fo, wo, co (P,) (co may be NULL) and st (C,) out, all
 * float if single else double; the fit is in double. The loops and their order are
 * those of the numba kernel, so the results are the same to the bit. */
static inline void cont_one_star(const cont_layout *cl, const void *f, const void *w,
                                 void *fo, void *wo, void *co, int64_t *st, int single)
{
    const ptrdiff_t k = cl->k, n_chips = cl->n_chips;
    const double *basis = cl->basis;
    double a[CF_CONT_MAX_BASIS * CF_CONT_MAX_BASIS], b[CF_CONT_MAX_BASIS];
    double coef[CF_CONT_MAX_BASIS];
    for (ptrdiff_t j = 0; j < cl->n_pix; j++) { /* gaps and pixels of no chip: no data */
        if (in_chip(cl->chip[j], n_chips)) continue;
        put(fo, j, 1.0, single);
        put(wo, j, 0.0, single);
        if (co) put(co, j, 0.0, single);
    }
    for (ptrdiff_t c = 0; c < n_chips; c++) {
        for (ptrdiff_t q = 0; q < k * k; q++) a[q] = 0.0;
        for (ptrdiff_t q = 0; q < k; q++) b[q] = 0.0;
        ptrdiff_t nuse = 0;
        for (ptrdiff_t m = cl->cstart[c]; m < cl->cstart[c + 1]; m++) {
            ptrdiff_t j = cl->cidx[m];
            double wj = ld(w, j, single), fj = ld(f, j, single);
            if (!usable(fj, wj)) continue;
            nuse++;
            const double *bj = basis + j * k;
            for (ptrdiff_t q = 0; q < k; q++) {
                double wb = wj * bj[q];
                b[q] += wb * fj;
                for (ptrdiff_t r = q; r < k; r++) a[q * k + r] += wb * bj[r];
            }
        }
        int64_t code = 0;
        if (nuse < cl->min_pixels || nuse < k) {
            code = CF_CONT_FEW_PIXELS;
            if (nuse == 0) { /* a missing chip has no usable pixel at all */
                code = CF_CONT_NO_PIXELS;
                for (ptrdiff_t r = 0; r < cl->n_runs && code == CF_CONT_NO_PIXELS; r++) {
                    if (cl->run_chip[r] != c) continue;
                    for (ptrdiff_t j = cl->run_lo[r]; j < cl->run_hi[r]; j++) {
                        if (usable(ld(f, j, single), ld(w, j, single))) {
                            code = CF_CONT_FEW_PIXELS;
                            break;
                        }
                    }
                }
            }
        }
        if (code == 0) {
            for (ptrdiff_t q = 0; q < k; q++) {
                for (ptrdiff_t r = 0; r < q; r++) a[q * k + r] = a[r * k + q];
            }
            /* the singular-matrix rule of cf_solve_normal_equations */
            if (cholesky_inplace(a, k)) {
                cho_solve(a, b, coef, k);
            } else {
                code = CF_CONT_BAD_FIT;
            }
        }
        if (code == 0) {
            ptrdiff_t bad = 0;
            for (ptrdiff_t r = 0; r < cl->n_runs; r++) {
                if (cl->run_chip[r] != c) continue;
                bad += cont_divide_any(cl, coef, cl->run_lo[r], cl->run_hi[r], f, w, fo, wo, co,
                                       single);
            }
            if (bad > 0) code = CF_CONT_BAD_FIT; /* positive wherever data carry weight */
        }
        st[c] = code;
        if (code != 0) {
            for (ptrdiff_t r = 0; r < cl->n_runs; r++) {
                if (cl->run_chip[r] != c) continue;
                for (ptrdiff_t j = cl->run_lo[r]; j < cl->run_hi[r]; j++) {
                    put(fo, j, 1.0, single);
                    put(wo, j, 0.0, single);
                    if (co) put(co, j, 0.0, single);
                }
            }
        }
    }
}

/* Bit pattern of element j of a bitmask row of `bytes` bytes per element, as numpy's
 * astype(int64) gives it (signed types sign-extended). */
static inline int64_t mask_at(const void *row, ptrdiff_t j, int bytes, int is_signed)
{
    switch (bytes) {
    case 1: return is_signed ? (int64_t)((const int8_t *)row)[j]
                             : (int64_t)((const uint8_t *)row)[j];
    case 2: return is_signed ? (int64_t)((const int16_t *)row)[j]
                             : (int64_t)((const uint16_t *)row)[j];
    case 4: return is_signed ? (int64_t)((const int32_t *)row)[j]
                             : (int64_t)((const uint32_t *)row)[j];
    default: return ((const int64_t *)row)[j];
    }
}

/* The masking pass of one star: ws = w where no bad bit is set, else 0. Called with
 * constant `bytes`, `is_signed` and `single`, so each loop is specialised (and
 * vectorizable) with no test of the types per pixel. */
static inline void mask_row(const void *w, const void *bm, int64_t bits, ptrdiff_t n_pix,
                            void *ws, int bytes, int is_signed, int single)
{
    for (ptrdiff_t j = 0; j < n_pix; j++) {
        int bad = (mask_at(bm, j, bytes, is_signed) & bits) != 0;
        if (single) {
            float x = ((const float *)w)[j];
            ((float *)ws)[j] = bad ? 0.0f : x;
        } else {
            double x = ((const double *)w)[j];
            ((double *)ws)[j] = bad ? 0.0 : x;
        }
    }
}

static void mask_row_any(const void *w, const void *bm, int64_t bits, ptrdiff_t n_pix,
                         void *ws, int bytes, int is_signed, int single)
{
#define CF_MASK_ROW(B, S)                                                                   \
    do {                                                                                   \
        if (single) mask_row(w, bm, bits, n_pix, ws, B, S, 1);                             \
        else mask_row(w, bm, bits, n_pix, ws, B, S, 0);                                    \
    } while (0)
    switch (bytes * 2 + (is_signed != 0)) {
    case 2: CF_MASK_ROW(1, 0); break;
    case 3: CF_MASK_ROW(1, 1); break;
    case 4: CF_MASK_ROW(2, 0); break;
    case 5: CF_MASK_ROW(2, 1); break;
    case 8: CF_MASK_ROW(4, 0); break;
    case 9: CF_MASK_ROW(4, 1); break;
    default: CF_MASK_ROW(8, 1); break;
    }
#undef CF_MASK_ROW
}

/* Both precisions (single != 0: float spectra); bitmask NULL or (N, P) of mask_bytes
 * bytes per element. */
static int cont_driver(ptrdiff_t n_stars, ptrdiff_t n_pix, ptrdiff_t k, ptrdiff_t n_chips,
                       const void *flux, const void *ivar, const double *basis,
                       const int64_t *chip, const uint8_t *is_cont, ptrdiff_t min_pixels,
                       void *flux_out, void *ivar_out, void *cont_out, int64_t *status_out,
                       int single, const void *bitmask, int mask_bytes, int mask_signed,
                       int64_t bits)
{
    if (bitmask && mask_bytes != 1 && mask_bytes != 2 && mask_bytes != 4 && mask_bytes != 8)
        return CF_ERR_ARG;
    if (n_stars < 0 || n_pix < 0 || n_chips < 0) return CF_ERR_ARG;
    const ptrdiff_t np = n_pix;
    if (k < 1 || k > CF_CONT_MAX_BASIS) { /* every chip a bad fit, as the reference */
        for (ptrdiff_t i = 0; i < n_stars * np; i++) {
            put(flux_out, i, 1.0, single);
            put(ivar_out, i, 0.0, single);
            if (cont_out) put(cont_out, i, 0.0, single);
        }
        for (ptrdiff_t i = 0; i < n_stars * n_chips; i++) status_out[i] = CF_CONT_BAD_FIT;
        return CF_OK;
    }
    if (n_stars == 0) return CF_OK;
    cont_layout cl;
    if (!cont_layout_init(&cl, n_pix, k, n_chips, min_pixels, basis, chip, is_cont))
        return CF_ERR_NOMEM;
    const size_t size = single ? sizeof(float) : sizeof(double);
    const int nthr = team_size(n_stars, CF_PAR_MIN_STARS);
    (void)nthr; /* unused without OpenMP */
    int nomem = 0;
    /* one pass over each spectrum, bound by memory bandwidth (with a bitmask, the masked
     * ivar row goes through a scratch row that stays in cache) */
    CF_OMP(omp parallel if (nthr > 1) num_threads(nthr))
    {
        void *ws = bitmask ? malloc((size_t)np * size + 1) : NULL;
        if (bitmask && !ws) {
            CF_OMP(omp atomic write)
            nomem = 1;
        }
        CF_OMP(omp for schedule(static))
        for (ptrdiff_t i = 0; i < n_stars; i++) {
            if (bitmask && !ws) continue;
            size_t off = (size_t)i * (size_t)np * size;
            const void *f = (const char *)flux + off, *w = (const char *)ivar + off;
            void *fo = (char *)flux_out + off, *wo = (char *)ivar_out + off;
            void *co = cont_out ? (void *)((char *)cont_out + off) : NULL;
            int64_t *st = status_out + i * n_chips;
            if (bitmask) {
                const void *bm = (const char *)bitmask + (size_t)i * (size_t)np * mask_bytes;
                mask_row_any(w, bm, bits, np, ws, mask_bytes, mask_signed, single);
                w = ws;
            }
            if (single) {
                cont_one_star(&cl, f, w, fo, wo, co, st, 1);
            } else {
                cont_one_star(&cl, f, w, fo, wo, co, st, 0);
            }
        }
        free(ws);
    }
    free(cl.block);
    return nomem ? CF_ERR_NOMEM : CF_OK;
}

int cf_continuum_normalize(ptrdiff_t n_stars, ptrdiff_t n_pix, ptrdiff_t n_basis,
                           ptrdiff_t n_chips, const double *flux, const double *ivar,
                           const double *basis, const int64_t *chip, const uint8_t *is_cont,
                           ptrdiff_t min_pixels, double *flux_out, double *ivar_out,
                           double *cont_out, int64_t *status_out)
{
    return cont_driver(n_stars, n_pix, n_basis, n_chips, flux, ivar, basis, chip, is_cont,
                       min_pixels, flux_out, ivar_out, cont_out, status_out, 0, NULL, 0, 0, 0);
}

int cf_continuum_normalize_f32(ptrdiff_t n_stars, ptrdiff_t n_pix, ptrdiff_t n_basis,
                               ptrdiff_t n_chips, const float *flux, const float *ivar,
                               const double *basis, const int64_t *chip,
                               const uint8_t *is_cont, ptrdiff_t min_pixels, float *flux_out,
                               float *ivar_out, float *cont_out, int64_t *status_out)
{
    return cont_driver(n_stars, n_pix, n_basis, n_chips, flux, ivar, basis, chip, is_cont,
                       min_pixels, flux_out, ivar_out, cont_out, status_out, 1, NULL, 0, 0, 0);
}

int cf_continuum_normalize_masked(ptrdiff_t n_stars, ptrdiff_t n_pix, ptrdiff_t n_basis,
                                  ptrdiff_t n_chips, const void *flux, const void *ivar,
                                  const double *basis, const int64_t *chip,
                                  const uint8_t *is_cont, ptrdiff_t min_pixels, void *flux_out,
                                  void *ivar_out, void *cont_out, int64_t *status_out,
                                  int single, const void *bitmask, int mask_bytes,
                                  int mask_signed, int64_t bits)
{
    return cont_driver(n_stars, n_pix, n_basis, n_chips, flux, ivar, basis, chip, is_cont,
                       min_pixels, flux_out, ivar_out, cont_out, status_out, single != 0,
                       bitmask, mask_bytes, mask_signed, bits);
}
