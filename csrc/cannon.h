/*
 * cannon.h: the Cannon kernels in pure C99 (no Python.h).
 *
 * Same algorithms, names and contracts as cannon_fast/_kernels (numba) and
 * cannon_fast/_reference (numpy, the ground truth); csrc/_ccannon.c wraps
 * them for Python. Every array is C-contiguous and caller-allocated; outputs
 * end in _out. Shapes use the package's letters: N stars, P pixels, L labels,
 * T terms, T2 = T (T + 1) / 2 packed upper-triangle entries, K starts (lm_fit)
 * or basis functions (continuum), C chips.
 *
 * The functions return a CF_* code (never exit or abort); per-pixel or
 * per-star outcomes go into status_out arrays, as in the Python kernels.
 * Loops over pixels or stars run in parallel when compiled with OpenMP
 * (cf_set_num_threads caps them; 1 is safe in a forked child). Results do
 * not depend on the number of threads.
 */
#ifndef CANNON_FAST_CANNON_H
#define CANNON_FAST_CANNON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* return codes of every cf_ function */
#define CF_OK 0
#define CF_ERR_NOMEM (-1) /* a scratch allocation failed; outputs are incomplete */
#define CF_ERR_ARG (-2)   /* an argument is out of range (e.g. n_polish < 1) */

/* per-pixel status of cf_solve_normal_equations and cf_s2_update */
#define CF_SINGULAR 1 /* matrix singular by the CF_CHOL_RTOL rule: theta = cinv = 0 */
#define CF_TOO_FEW 1  /* fewer than two valid stars: s2 = 0 */

/* per-star status bits of cf_lm_fit (= _reference.model_eval) */
#define CF_NOT_CONVERGED 1
#define CF_HIT_BOUND 2
#define CF_STARTS_DISAGREE 4

/* per-chip status of cf_continuum_normalize (= _reference.continuum) */
#define CF_CONT_NO_PIXELS 1  /* no usable pixel at all on the chip */
#define CF_CONT_FEW_PIXELS 2 /* fewer usable continuum pixels than max(min_pixels, K) */
#define CF_CONT_BAD_FIT 3    /* singular normal equations, or a continuum <= 0 on a usable pixel */
#define CF_CONT_MAX_BASIS 8  /* most basis functions per chip (Chebyshev degree <= 7) */

/* constants of _reference.s2_grid, which must be honoured identically */
#define CF_S2_RTOL 1e-4      /* s2 is refined to S2_RTOL / 2 of the maximiser, relative */
#define CF_S2_FLOOR 1e-4     /* grid bottom, as a fraction of the mean noise variance */
#define CF_GRID_PER_DECADE 3 /* grid points per factor of ten */
#define CF_WARM_STEPS 8      /* Newton steps of the warm-started s2 search before the cold one */

/* a squared Cholesky pivot at or below this fraction of the largest diagonal entry
 * means singular (the rule of _reference.normal_equations.solve_normal_equations) */
#define CF_CHOL_RTOL 1e-12

/**
 * Solve A theta = b per pixel by Cholesky and return A^-1 packed.
 * Contract: (t2),(t)->(t),(t2),() over pixels.
 *
 * @param n_pix P: number of pixels.
 * @param n_terms T: number of terms.
 * @param a_packed (P, T2): upper triangles of X^T W_p X, row by row.
 * @param b (P, T): X^T W_p f_p.
 * @param theta_out (P, T): the solutions; 0 where singular.
 * @param cinv_out (P, T2) or NULL: upper triangles of A^-1; NULL skips the inverse.
 * @param status_out (P,): 0, or CF_SINGULAR where A is singular (see CF_CHOL_RTOL).
 * @return CF_OK, CF_ERR_ARG or CF_ERR_NOMEM.
 */
int cf_solve_normal_equations(ptrdiff_t n_pix, ptrdiff_t n_terms, const double *a_packed,
                              const double *b, double *theta_out, double *cinv_out,
                              int8_t *status_out);

/**
 * Maximise the likelihood in s2 at every pixel given the residuals.
 * Contract: (n),(n)->(),() over pixels.
 *
 * A geometric grid over [S2_FLOOR mean(v), max r2] (plus s2 = 0) locates the
 * sign changes of g'(s2); Illinois regula falsi refines each until its bracket is
 * narrower than S2_RTOL of its upper end, and g itself (the logarithms) is evaluated
 * only at those candidates. The result is within max(S2_RTOL / 2 s2*, S2_FLOOR mean(v))
 * of the maximiser s2*: the tolerance stated in _reference.s2_grid.
 *
 * @param n_stars N: number of stars.
 * @param n_pix P: number of pixels.
 * @param resid (N, P): residuals f - theta . v of the training stars.
 * @param ivar (N, P): inverse noise variances; 0 (or NaN) marks the star invalid there.
 * @param s2_out (P,): the maximum-likelihood s2.
 * @param status_out (P,): 0, or CF_TOO_FEW where fewer than two stars are valid.
 * @return CF_OK or CF_ERR_NOMEM.
 */
int cf_s2_update(ptrdiff_t n_stars, ptrdiff_t n_pix, const double *resid, const double *ivar,
                 double *s2_out, int8_t *status_out);

/**
 * cf_s2_update started from a previous s2 at every pixel.
 * Contract: (n),(n),()->(),() over pixels.
 *
 * Newton steps on g' from s2_start until a step is below S2_RTOL / 4 of the root, then
 * one evaluation just across it closes a bracket narrower than S2_RTOL of its upper end
 * (the same tolerance). The cold search where s2_start is not > 0, or where a step
 * meets g'' >= 0 or does not settle in CF_WARM_STEPS. It finds the maximum the start
 * lies in the basin of (what that may miss: _reference.s2_grid).
 *
 * @param s2_start (P,): where to start.
 * Other parameters and the return value as cf_s2_update.
 */
int cf_s2_update_warm(ptrdiff_t n_stars, ptrdiff_t n_pix, const double *resid,
                      const double *ivar, const double *s2_start, double *s2_out,
                      int8_t *status_out);

/**
 * Label vector v(x) and its Jacobian dv/dx for one star.
 * Contract: (l),(t,l)->(t),(t,l).
 *
 * @param n_terms T: number of terms.
 * @param n_labels L: number of labels.
 * @param x (L,): scaled labels.
 * @param exponents (T, L): the exponent of each label in each term.
 * @param v_out (T,): prod_l x_l^e_tl.
 * @param dv_out (T, L): d v_t / d x_l.
 */
void cf_label_vector_and_jacobian(ptrdiff_t n_terms, ptrdiff_t n_labels, const double *x,
                                  const int64_t *exponents, double *v_out, double *dv_out);

/**
 * Label vectors and their Jacobian for a batch of stars.
 * Contract: (l),(t,l)->(t),(t,l) over stars.
 *
 * @param n_stars N: number of stars.
 * @param n_terms T: number of terms.
 * @param n_labels L: number of labels.
 * @param x (N, L): scaled labels.
 * @param exponents (T, L): the exponent of each label in each term.
 * @param v_out (N, T): label vectors.
 * @param dv_out (N, T, L): their Jacobians.
 * @return CF_OK.
 */
int cf_design(ptrdiff_t n_stars, ptrdiff_t n_terms, ptrdiff_t n_labels, const double *x,
              const int64_t *exponents, double *v_out, double *dv_out);

/**
 * Minimise c - 2 h.v(x) + v(x)^T G v(x) per star within bounds, by
 * Levenberg-Marquardt from the n_polish best (lowest first) of the star's K clipped
 * starting points.
 * Contract: (t2),(t),(),(t,l),(k,l),(k),(l),(l),(),(),(),()->(l),(),(),() over stars
 * (starts is per star).
 *
 * @param n_stars N: number of stars.
 * @param n_terms T: number of terms.
 * @param n_labels L: number of labels.
 * @param n_cand K: number of starting points.
 * @param g_packed (N, T2): packed upper triangles of G (or G - B).
 * @param h (N, T): Theta^T W f.
 * @param c (N,): sum_p w_p f_p^2.
 * @param exponents (T, L): the exponent of each label in each term.
 * @param starts (N, K, L): candidate starting points of each star, in scaled labels.
 * @param first (N, K): the objective at each clipped start (the caller's: one BLAS
 *        product for a batch, _reference.model_eval.start_objectives); only its order is used.
 * @param lo (L,): lower bounds in scaled labels.
 * @param hi (L,): upper bounds in scaled labels.
 * @param n_polish LM runs from this many of the best candidates (>= 1).
 * @param max_iter LM iterations per run.
 * @param xtol convergence when the largest step is below this.
 * @param disagree_dchi2 threshold of the CF_STARTS_DISAGREE bit.
 * @param x_out (N, L): the best end point.
 * @param phi_out (N,): the objective there.
 * @param iters_out (N,): LM iterations summed over runs.
 * @param status_out (N,): bit field of CF_NOT_CONVERGED, CF_HIT_BOUND, CF_STARTS_DISAGREE.
 * @return CF_OK, CF_ERR_ARG (K < 1 or n_polish < 1) or CF_ERR_NOMEM.
 */
int cf_lm_fit(ptrdiff_t n_stars, ptrdiff_t n_terms, ptrdiff_t n_labels, ptrdiff_t n_cand,
              const double *g_packed, const double *h, const double *c,
              const int64_t *exponents, const double *starts, const double *first,
              const double *lo, const double *hi, ptrdiff_t n_polish, ptrdiff_t max_iter,
              double xtol, double disagree_dchi2, double *x_out, double *phi_out, int64_t *iters_out,
              int64_t *status_out);

/**
 * Fit weights, weighted residuals from the constant term, their chi2,
 * good-pixel counts and weight moments per star, in one pass over the spectra.
 * Contract: (p),(p),(p),(p),(p),(p)->(p),(p),(),(),(3),() over stars.
 *
 * @param n_stars N: number of stars.
 * @param n_pix P: number of pixels.
 * @param flux (N, P): normalised flux.
 * @param ivar (N, P): inverse variances; ivar <= 0 (or NaN) masks a pixel.
 * @param s2 (P,): intrinsic variance of the model.
 * @param good_pix (P,): nonzero where the model's pixel is usable.
 * @param theta0 (P,): the constant term of the model.
 * @param t_pix (P,): per-pixel scale of Cov(theta_p).
 * @param w_out (N, P): 1 / (1/ivar + s2) in float32; 0 where masked.
 * @param wr_out (N, P): w (f - theta0); 0 where masked.
 * @param c_out (N,): sum_p w (f - theta0)^2.
 * @param npix_out (N,): number of usable pixels.
 * @param moments_out (N, 3): sum w, sum w t and sum w^2 t.
 * @param bad_out (N,): 1 where the star may hold a value check_spectra refuses (the sum of
 *        its ivar, or of its flux where ivar > 0, is not finite, or an ivar is negative),
 *        over all pixels, good or not; check_spectra then decides (a sum can overflow).
 * @return CF_OK.
 */
int cf_star_weights(ptrdiff_t n_stars, ptrdiff_t n_pix, const void *flux, const void *ivar,
                    int single, const double *s2, const uint8_t *good_pix,
                    const double *theta0, const double *t_pix, float *w_out, double *wr_out,
                    double *c_out, int64_t *npix_out, double *moments_out, int64_t *bad_out);

/**
 * Newton steps on the de-biased objective chi^2 - v^T B v from the plain minimum, with the
 * generalized eigenvalues of B_x = dv^T B dv against F = dv^T G dv capped at cap.
 * Contract: (t2),(t),(t2),(t,l),(l),(l),(),(),()->(l),() over stars; the semantics are
 * those of _reference.model_eval.debias_steps.
 *
 * @param g_packed, b_packed (N, T(T+1)/2): packed G and B.
 * @param h (N, T).
 * @param exponents (T, L).
 * @param lo, hi (L,): bounds in scaled labels.
 * @param cap the eigenvalue cap; n_steps, xtol: at most n_steps, until a step < xtol.
 * @param x_inout (N, L): the plain fit in, the de-biased fit out.
 * @param capped_out (N,): 1 where some step met an eigenvalue above cap.
 * @return CF_OK, or CF_ERR_NOMEM.
 */
int cf_debias_steps(ptrdiff_t n_stars, ptrdiff_t n_terms, ptrdiff_t n_labels,
                    const double *g_packed, const double *h, const double *b_packed,
                    const int64_t *exponents, const double *lo, const double *hi, double cap,
                    ptrdiff_t n_steps, double xtol, double *x_inout, int64_t *capped_out);

/**
 * The de-biased fit's covariance in scaled labels, H^-1 (F (1 + kappa v^T Cbar v) + extra)
 * H^-1 with H the capped F - B_x, and the correction the cap withheld in standard errors.
 * Contract: (t2),(t2),(t2),(),(l,l),(l),(t,l),()->(l,l),(),() over stars; the semantics
 * are those of _reference.model_eval.sandwich_covariance.
 *
 * @param g_packed, b_packed (N, T(T+1)/2): packed G and B.
 * @param cbar_packed (T(T+1)/2,): packed Cbar (shared).
 * @param kappa (N,); extra (N, L, L): the two forms of the training-noise term.
 * @param x (N, L): the de-biased fit; exponents (T, L); cap the eigenvalue cap.
 * @param cov_out (N, L, L): NaN where H is singular.
 * @param capped_out (N,): 1 where an eigenvalue exceeds cap at x.
 * @param withheld_out (N,).
 * @return CF_OK, or CF_ERR_NOMEM.
 */
int cf_sandwich_covariance(ptrdiff_t n_stars, ptrdiff_t n_terms, ptrdiff_t n_labels,
                           const double *g_packed, const double *b_packed,
                           const double *cbar_packed, const double *kappa, const double *extra,
                           const double *x, const int64_t *exponents, double cap,
                           double *cov_out, int64_t *capped_out, double *withheld_out);

/**
 * sum_p w m^2 per star (the chi^2 of a model at fitted labels, from its residuals).
 * Contract: (p),(p)->() over stars.
 *
 * @param n_stars N: number of stars.
 * @param n_pix P: number of pixels.
 * @param w (N, P): float32 weights.
 * @param m (N, P): values.
 * @param out (N,): the sums, accumulated in float64.
 * @return CF_OK.
 */
int cf_weighted_square_sum(ptrdiff_t n_stars, ptrdiff_t n_pix, const float *w, const double *m,
                           double *out);

/**
 * Per training star: chi2 at its labels, its pixel count and neighbour-pair sums.
 * Contract: (p),(p),(p),(p),(p),()->(),(),(4) over stars; the semantics are those of
 * _reference.model_eval.training_sums.
 *
 * @param resid, ivar (N, P): residuals at the training labels, inverse variances.
 * @param s2 (P,); use (P,): the pixels fits use; same_seg (P,): pixel p and p + 1 in
 *        one segment; pairs (N,): the stars whose pair sums are wanted.
 * @param chi2_out (N,): sum w r2 over usable pixels (ivar > 0 and use), w = 1/(1/ivar + s2).
 * @param count_out (N,): the number of usable pixels.
 * @param pair_out (N, 4): over pairs of usable neighbours in one segment: their number,
 *        sum z_p z_p+1, sum z_p^2, sum z_p+1^2 with z = r sqrt(w); zeros where !pairs.
 * @return CF_OK or CF_ERR_ARG.
 */
int cf_training_sums(ptrdiff_t n_stars, ptrdiff_t n_pix, const double *resid,
                     const double *ivar, const double *s2, const uint8_t *use,
                     const uint8_t *same_seg, const uint8_t *pairs, double *chi2_out,
                     int64_t *count_out, double *pair_out);

/**
 * Fit and divide out a per-chip weighted least-squares pseudo-continuum, per star.
 * Contract: (p),(p),(p,k),(p),(p),(),()->(p),(p),(p),(c) over stars; the semantics are
 * those of _reference.continuum.continuum_normalize. The fit is in double precision;
 * cf_continuum_normalize_f32 takes and writes float spectra.
 *
 * For each star and chip c, the usable pixels (finite flux, finite ivar > 0) among the
 * continuum pixels of the chip give the weighted normal equations B^T W B coef = B^T W f,
 * solved when there are >= max(min_pixels, K) of them and the matrix is not singular by
 * the rule of cf_solve_normal_equations; the continuum B coef must then be finite and
 * positive at every usable pixel of the chip. A fitted chip gets flux / cont and
 * ivar cont^2 at its usable pixels and (1, 0) elsewhere; a chip not fitted, a gap
 * (chip < 0) and a pixel of no chip (chip >= n_chips) get flux 1, ivar 0, continuum 0.
 *
 * @param n_stars N: number of stars.
 * @param n_pix P: number of pixels.
 * @param n_basis K: basis functions per chip; outside 1..CF_CONT_MAX_BASIS every chip
 *        gets CF_CONT_BAD_FIT.
 * @param n_chips C: number of chips.
 * @param flux (N, P): flux.
 * @param ivar (N, P): inverse variances; 0 (or a non-finite flux or ivar) marks a pixel
 *        that is not usable.
 * @param basis (P, K): basis functions of each pixel's chip.
 * @param chip (P,): chip of each pixel, -1 in the gaps.
 * @param is_cont (P,): nonzero at continuum pixels.
 * @param min_pixels fewest usable continuum pixels to fit a chip.
 * @param flux_out (N, P): normalized flux.
 * @param ivar_out (N, P): its inverse variance.
 * @param cont_out (N, P) or NULL: the continuum (0 where not fitted); NULL skips it.
 * @param status_out (N, C): 0 or a CF_CONT_* code per star and chip.
 * @return CF_OK, CF_ERR_ARG or CF_ERR_NOMEM.
 */
int cf_continuum_normalize(ptrdiff_t n_stars, ptrdiff_t n_pix, ptrdiff_t n_basis,
                           ptrdiff_t n_chips, const double *flux, const double *ivar,
                           const double *basis, const int64_t *chip, const uint8_t *is_cont,
                           ptrdiff_t min_pixels, double *flux_out, double *ivar_out,
                           double *cont_out, int64_t *status_out);

/** cf_continuum_normalize for float spectra (the same results, rounded to float). */
int cf_continuum_normalize_f32(ptrdiff_t n_stars, ptrdiff_t n_pix, ptrdiff_t n_basis,
                               ptrdiff_t n_chips, const float *flux, const float *ivar,
                               const double *basis, const int64_t *chip,
                               const uint8_t *is_cont, ptrdiff_t min_pixels, float *flux_out,
                               float *ivar_out, float *cont_out, int64_t *status_out);

/**
 * cf_continuum_normalize (single == 0: double spectra) or cf_continuum_normalize_f32
 * (single != 0: float spectra, void pointers of that type) with a bitmask: a pixel whose
 * bitmask element, read as an integer of mask_bytes (1, 2, 4 or 8) bytes, signed if
 * mask_signed, and widened to int64 as numpy's astype(int64) does, has a bit of `bits`
 * set is not usable, as if its ivar were 0. NULL bitmask: no masking.
 * @return CF_OK, CF_ERR_ARG (e.g. another mask_bytes) or CF_ERR_NOMEM.
 */
int cf_continuum_normalize_masked(ptrdiff_t n_stars, ptrdiff_t n_pix, ptrdiff_t n_basis,
                                  ptrdiff_t n_chips, const void *flux, const void *ivar,
                                  const double *basis, const int64_t *chip,
                                  const uint8_t *is_cont, ptrdiff_t min_pixels, void *flux_out,
                                  void *ivar_out, void *cont_out, int64_t *status_out,
                                  int single, const void *bitmask, int mask_bytes,
                                  int mask_signed, int64_t bits);

/** Number of threads the parallel loops use (1 without OpenMP). */
int cf_max_threads(void);

/**
 * Cap the threads of the parallel loops (process-wide; no effect without OpenMP).
 *
 * @param n the cap; 0 or less restores OpenMP's default (OMP_NUM_THREADS).
 * @return the previous cap (0: none).
 */
int cf_set_num_threads(int n);

#ifdef __cplusplus
}
#endif

#endif /* CANNON_FAST_CANNON_H */
