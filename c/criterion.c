/* criterion.c: mean-squared error and cross-entropy losses, CPU (PyTorch's F.mse_loss, F.cross_entropy).
 *
 * mse:  x, target (any shape, same shape) -> loss: (x - t)^2 elementwise (none), its sum (sum) or mean
 *       backward: grad_x = 2 (x - t) * grad_loss (elementwise for none; / numel for mean)
 * cross_entropy: logits (N, C, d1, ...), target int64 (N, d1, ...) class indices
 *       per position: lse = log sum_c exp(x_c); nll = lse - x_t;
 *       loss = (1 - ls) * nll + ls * mean_c (lse - x_c)     (ls = label_smoothing)
 *       positions whose target is ignore_index have loss 0 and do not count; mean divides by the number
 *       of counted positions (0 counted gives NaN, as PyTorch).
 *       backward: grad_x_c = s * (softmax_c - ls / C - (1 - ls) [c == t]), s = grad_loss of the position
 *       (none), grad_loss (sum) or grad_loss / count (mean); 0 for ignored positions.
 * Targets that are not ignore_index and outside [0, C) are an error, found before anything is written.
 * Reductions sum fixed-size chunks in parallel and then the chunk sums in order (double), so the result
 * does not depend on the thread count. Every tensor may have any strides. */
/* -fno-trapping-math (PyTorch builds with it too): lets GCC if-convert and vectorise the fa_fast_expf loops.
 * Nothing here reads the floating-point exception flags. Before the includes, so that every function of
 * this file, the inline helpers included, is compiled with the same options. */
#pragma GCC optimize("no-trapping-math")
#include "internal.h"

enum { MSE_CHUNK = 4096, CE_CHUNK = 64, CE_TILE = 256 };

static inline double ld(const void *p, int64_t i, int dbl) {
  return dbl ? ((const double *)p)[i] : (double)((const float *)p)[i];
}
static inline void st(void *p, int64_t i, double v, int dbl) {
  if (dbl) ((double *)p)[i] = v;
  else ((float *)p)[i] = (float)v;
}
static inline double sqdiff_f32(const float *x, const float *y, int64_t n) {
  double t = 0;
#pragma omp simd reduction(+ : t) simdlen(8)
  for (int64_t k = 0; k < n; k++) t += ((double)x[k] - y[k]) * ((double)x[k] - y[k]);
  return t;
}
static inline double sqdiff_f64(const double *x, const double *y, int64_t n) {
  double t = 0;
#pragma omp simd reduction(+ : t) simdlen(8)
  for (int64_t k = 0; k < n; k++) t += (x[k] - y[k]) * (x[k] - y[k]);
  return t;
}
static inline int64_t eoff(const fa_tensor *t, int contig, int64_t i) { return contig ? i : fa_offset(t, i); }

/* element offset of the l-th line along dim (lines numbered in row-major order of the other dims) */
static int64_t line_base(const fa_tensor *t, int dim, int64_t l) {
  int64_t off = 0;
  for (int d = t->ndim - 1; d >= 0; d--) {
    if (d == dim) continue;
    int64_t n = t->shape[d];
    off += (l % n) * t->stride[d];
    l /= n;
  }
  return off;
}

static int check_reduction(const char *fn, int reduction) {
  if (reduction != FA_REDUCE_NONE && reduction != FA_REDUCE_MEAN && reduction != FA_REDUCE_SUM)
    return fa_error(FA_ERR_ARG, "%s: argument 'reduction': expected FA_REDUCE_NONE (0), FA_REDUCE_MEAN (1) or FA_REDUCE_SUM (2), got %d",
                    fn, reduction);
  return 0;
}

/* loss / grad_loss: `shape_ref`'s shape for none, one element for mean/sum */
static int check_loss(const char *fn, const char *arg, const fa_tensor *t, const char *ref_arg, const fa_tensor *ref,
                      const char *shape_arg, const fa_tensor *shape_ref, int reduction) {
  int rc;
  if ((rc = fa_check_like(fn, arg, t, ref_arg, ref))) return rc;
  if (reduction == FA_REDUCE_NONE) return fa_check_same_shape(fn, arg, t, shape_arg, shape_ref);
  if (fa_numel(t) != 1) {
    char b[256];
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected one element (reduction %s), got shape %s", fn, arg,
                    reduction == FA_REDUCE_MEAN ? "mean" : "sum", fa_shape_str(t, b));
  }
  return 0;
}

/* ================================================================== MSE */
/* [i0, i1) of the elementwise loss (none) or its sum (returned); a literal dbl at every call */
static inline __attribute__((always_inline)) double mse_chunk(int dbl, int sum, fa_tensor *loss, const fa_tensor *x,
                                                              const fa_tensor *t, int contig, int64_t i0, int64_t i1) {
  int es = dbl ? 8 : 4;
  if (contig && sum) {
    const char *xp = (const char *)x->data + i0 * es, *tp = (const char *)t->data + i0 * es;
    return dbl ? sqdiff_f64((const double *)xp, (const double *)tp, i1 - i0)
               : sqdiff_f32((const float *)xp, (const float *)tp, i1 - i0);
  }
  if (contig) { /* the data pointers in locals: a store through loss->data could change x->data */
    void *lp = loss->data;
    const void *xp = x->data, *tp = t->data;
    for (int64_t i = i0; i < i1; i++) {
      double d = ld(xp, i, dbl) - ld(tp, i, dbl);
      st(lp, i, d * d, dbl);
    }
    return 0;
  }
  double s = 0;
  for (int64_t i = i0; i < i1; i++) {
    double d = ld(x->data, fa_offset(x, i), dbl) - ld(t->data, fa_offset(t, i), dbl);
    if (sum) s += d * d;
    else st(loss->data, fa_offset(loss, i), d * d, dbl);
  }
  return s;
}

/* the chunk kernels with a literal dbl, compiled for AVX2 + FMA and the baseline (FA_HOT_CLONES); called
 * from the parallel loops (which OpenMP outlines before inlining) */
FA_HOT_CLONES static double mse_chunk_any(int dbl, int sum, fa_tensor *loss, const fa_tensor *x, const fa_tensor *t,
                                          int contig, int64_t i0, int64_t i1) {
  return dbl ? mse_chunk(1, sum, loss, x, t, contig, i0, i1) : mse_chunk(0, sum, loss, x, t, contig, i0, i1);
}

static int mse_forward_cpu(fa_tensor *loss, const fa_tensor *x, const fa_tensor *t, int reduction) {
  int64_t n = fa_numel(x), nch = (n + MSE_CHUNK - 1) / MSE_CHUNK;
  int dbl = x->dtype == FA_FLOAT64, sum = reduction != FA_REDUCE_NONE;
  int contig = fa_is_contiguous(x) && fa_is_contiguous(t) && (sum || fa_is_contiguous(loss));
  double *part = sum ? fa_alloc(FA_CPU, (nch > 0 ? nch : 1) * 8) : NULL;
  if (sum && !part) return FA_ERR_MEMORY;
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
  for (int64_t k = 0; k < nch; k++) {
    int64_t i0 = k * MSE_CHUNK, i1 = i0 + MSE_CHUNK < n ? i0 + MSE_CHUNK : n;
    double v = mse_chunk_any(dbl, sum, loss, x, t, contig, i0, i1);
    if (part) part[k] = v;
  }
  if (!sum) return 0;
  double s = 0; /* chunk sums in order: the same result for any thread count */
  for (int64_t k = 0; k < nch; k++) s += part[k];
  fa_free(FA_CPU, part);
  st(loss->data, 0, reduction == FA_REDUCE_MEAN ? s / (double)n : s, dbl);
  return 0;
}

static inline __attribute__((always_inline)) void mse_grad_chunk(int dbl, int none, fa_tensor *gx, const fa_tensor *gl,
                                                                 const fa_tensor *x, const fa_tensor *t, int contig,
                                                                 double g1, int64_t i0, int64_t i1) {
  if (contig) { /* the data pointers in locals (see mse_chunk) */
    void *gp = gx->data;
    const void *glp = gl->data, *xp = x->data, *tp = t->data;
    for (int64_t i = i0; i < i1; i++) {
      double g = none ? 2 * ld(glp, i, dbl) : g1;
      st(gp, i, (ld(xp, i, dbl) - ld(tp, i, dbl)) * g, dbl);
    }
    return;
  }
  for (int64_t i = i0; i < i1; i++) {
    double g = none ? 2 * ld(gl->data, fa_offset(gl, i), dbl) : g1;
    st(gx->data, fa_offset(gx, i), (ld(x->data, fa_offset(x, i), dbl) - ld(t->data, fa_offset(t, i), dbl)) * g, dbl);
  }
}

FA_HOT_CLONES static void mse_grad_chunk_any(int dbl, int none, fa_tensor *gx, const fa_tensor *gl, const fa_tensor *x,
                                             const fa_tensor *t, int contig, double g1, int64_t i0, int64_t i1) {
  if (dbl) mse_grad_chunk(1, none, gx, gl, x, t, contig, g1, i0, i1);
  else mse_grad_chunk(0, none, gx, gl, x, t, contig, g1, i0, i1);
}

static void mse_backward_cpu(fa_tensor *gx, const fa_tensor *gl, const fa_tensor *x, const fa_tensor *t, int reduction) {
  int64_t n = fa_numel(x), nch = (n + MSE_CHUNK - 1) / MSE_CHUNK;
  int dbl = x->dtype == FA_FLOAT64, none = reduction == FA_REDUCE_NONE;
  int contig = fa_is_contiguous(x) && fa_is_contiguous(t) && fa_is_contiguous(gx) && (!none || fa_is_contiguous(gl));
  double g1 = none ? 0 : 2 * ld(gl->data, 0, dbl) / (reduction == FA_REDUCE_MEAN ? (double)n : 1.0);
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
  for (int64_t k = 0; k < nch; k++) {
    int64_t i0 = k * MSE_CHUNK, i1 = i0 + MSE_CHUNK < n ? i0 + MSE_CHUNK : n;
    mse_grad_chunk_any(dbl, none, gx, gl, x, t, contig, g1, i0, i1);
  }
}

int fa_mse_forward(fa_tensor *loss, const fa_tensor *x, const fa_tensor *target, int reduction) {
  static const char *fn = "fa_mse_forward";
  int rc;
  if ((rc = fa_check_defined(fn, "x", x)) || (rc = fa_check_float_dtype(fn, "x", x))) return rc;
  if ((rc = fa_check_like(fn, "target", target, "x", x)) || (rc = fa_check_same_shape(fn, "target", target, "x", x))) return rc;
  if ((rc = check_reduction(fn, reduction))) return rc;
  if ((rc = check_loss(fn, "loss", loss, "x", x, "x", x, reduction))) return rc;
  if (x->device >= 0) return fa_cu_mse_forward(loss, x, target, reduction);
  return mse_forward_cpu(loss, x, target, reduction);
}

int fa_mse_backward(fa_tensor *grad_x, const fa_tensor *grad_loss, const fa_tensor *x, const fa_tensor *target,
                    int reduction) {
  static const char *fn = "fa_mse_backward";
  int rc;
  if ((rc = fa_check_defined(fn, "x", x)) || (rc = fa_check_float_dtype(fn, "x", x))) return rc;
  if ((rc = fa_check_like(fn, "target", target, "x", x)) || (rc = fa_check_same_shape(fn, "target", target, "x", x))) return rc;
  if ((rc = check_reduction(fn, reduction))) return rc;
  if ((rc = check_loss(fn, "grad_loss", grad_loss, "x", x, "x", x, reduction))) return rc;
  if ((rc = fa_check_like(fn, "grad_x", grad_x, "x", x)) || (rc = fa_check_same_shape(fn, "grad_x", grad_x, "x", x))) return rc;
  if (x->device >= 0) return fa_cu_mse_backward(grad_x, grad_loss, x, target, reduction);
  if (fa_numel(x) == 0) return 0;
  mse_backward_cpu(grad_x, grad_loss, x, target, reduction);
  return 0;
}

/* ================================================================== cross-entropy */
typedef struct {
  int64_t N, C, M; /* batch, classes, positions (N * d1 * ...) */
  int64_t count;   /* positions whose target is not ignore_index */
  int64_t ignore_index;
  double ls;
} ce_geom;

/* shapes of logits and target; then (CPU) every target in range, counting the non-ignored ones */
static int ce_check(const char *fn, const fa_tensor *logits, const fa_tensor *target, int64_t ignore_index,
                    double label_smoothing, int reduction, ce_geom *g) {
  int rc;
  char a[256], b[256];
  if ((rc = fa_check_defined(fn, "logits", logits)) || (rc = fa_check_float_dtype(fn, "logits", logits))) return rc;
  if (logits->ndim < 2)
    return fa_error(FA_ERR_ARG, "%s: argument 'logits': expected (N, C) or (N, C, d1, ...), got shape %s", fn,
                    fa_shape_str(logits, a));
  if (logits->shape[1] < 1)
    return fa_error(FA_ERR_ARG, "%s: argument 'logits': expected at least one class, got shape %s", fn, fa_shape_str(logits, a));
  if ((rc = fa_check_defined(fn, "target", target)) || (rc = fa_check_same_device(fn, "target", target, "logits", logits)))
    return rc;
  if (target->dtype != FA_INT64)
    return fa_error(FA_ERR_ARG, "%s: argument 'target': expected dtype int64 (class indices), got %s", fn,
                    fa_dtype_name(target->dtype));
  int same = target->ndim == logits->ndim - 1 && target->shape[0] == logits->shape[0];
  for (int d = 1; same && d < target->ndim; d++) same = target->shape[d] == logits->shape[d + 1];
  if (!same)
    return fa_error(FA_ERR_ARG, "%s: argument 'target': expected shape (N, d1, ...) matching 'logits' of shape %s without its class dimension, got %s",
                    fn, fa_shape_str(logits, a), fa_shape_str(target, b));
  if ((rc = check_reduction(fn, reduction))) return rc;
  if (!(label_smoothing >= 0 && label_smoothing <= 1))
    return fa_error(FA_ERR_ARG, "%s: argument 'label_smoothing': expected 0 <= label_smoothing <= 1, got %g", fn, label_smoothing);
  g->N = logits->shape[0];
  g->C = logits->shape[1];
  g->M = fa_numel(target);
  g->ignore_index = ignore_index;
  g->ls = label_smoothing;
  g->count = 0;
  if (target->device >= 0) return 0; /* the CUDA side checks its targets itself */
  const int64_t *tp = (const int64_t *)target->data;
  int ct = fa_is_contiguous(target);
  int64_t count = 0;
  for (int64_t i = 0; i < g->M; i++) {
    int64_t t = tp[eoff(target, ct, i)];
    if (t == ignore_index) continue;
    if (t < 0 || t >= g->C)
      return fa_error(FA_ERR_ARG, "%s: argument 'target': class index %lld at position %lld is out of range [0, %lld) (ignore_index %lld)",
                      fn, (long long)t, (long long)i, (long long)g->C, (long long)ignore_index);
    count++;
  }
  g->count = count;
  return 0;
}

/* float32 max and exp(x - m): exact / accurate in float, so these loops stay 4-wide */
static inline float max_f32(const float *x, int64_t s, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < n; k++) m = x[k * s] > m ? x[k * s] : m;
  return m;
}
static inline double max_f64(const double *x, int64_t s, int64_t n) {
  double m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < n; k++) m = x[k * s] > m ? x[k * s] : m;
  return m;
}

/* log-sum-exp of one line x (C elements, stride sx); *sum_x = sum of x when sum_x is not NULL.
 * The exps go through a small typed tile so that both loops vectorise. */
static inline __attribute__((always_inline)) double ce_lse(int dbl, const void *x, int64_t sx, int64_t C, double *sum_x) {
  double m = dbl ? max_f64((const double *)x, sx, C) : max_f32((const float *)x, sx, C), s = 0;
  for (int64_t c0 = 0; c0 < C; c0 += CE_TILE) {
    int64_t n = C - c0 < CE_TILE ? C - c0 : CE_TILE;
    if (dbl) {
      const double *xd = (const double *)x + c0 * sx;
      double tile[CE_TILE];
      for (int64_t c = 0; c < n; c++) tile[c] = exp(xd[c * sx] - m);
      s += fa_sum_f64(tile, 1, n);
    } else {
      const float *xf = (const float *)x + c0 * sx;
      float tile[CE_TILE], mf = (float)m;
      for (int64_t c = 0; c < n; c++) tile[c] = fa_fast_expf(xf[c * sx] - mf);
      s += fa_sum_f32(tile, 1, n);
    }
  }
  if (sum_x) *sum_x = dbl ? fa_sum_f64((const double *)x, sx, C) : fa_sum_f32((const float *)x, sx, C);
  return m + log(s);
}

/* loss of one position whose target t is not ignored */
static inline __attribute__((always_inline)) double ce_line_loss(int dbl, const void *x, int64_t sx, int64_t C, int64_t t,
                                                                 double ls) {
  double sum_x = 0, lse = ce_lse(dbl, x, sx, C, ls > 0 ? &sum_x : NULL), nll = lse - ld(x, t * sx, dbl);
  if (ls == 0) return nll;
  return (1 - ls) * nll + ls * (lse - sum_x / (double)C);
}

/* gradient of one position: gx_c = scale * (softmax_c - ls / C - (1 - ls) [c == t]); the exps are
 * stored in gx first and scaled in place (one exp per element) */
static inline __attribute__((always_inline)) void ce_line_grad(int dbl, void *gx, int64_t sgx, const void *x, int64_t sx,
                                                               int64_t C, int64_t t, double ls, double scale) {
  double inv, off = ls / (double)C, et;
  if (dbl) {
    const double *xd = (const double *)x;
    double *gd = (double *)gx, m = max_f64(xd, sx, C);
    for (int64_t c = 0; c < C; c++) gd[c * sgx] = exp(xd[c * sx] - m);
    inv = 1.0 / fa_sum_f64(gd, sgx, C);
    et = gd[t * sgx];
    for (int64_t c = 0; c < C; c++) gd[c * sgx] = scale * (gd[c * sgx] * inv - off);
  } else {
    const float *xf = (const float *)x;
    float *gf = (float *)gx, m = max_f32(xf, sx, C);
    for (int64_t c = 0; c < C; c++) gf[c * sgx] = fa_fast_expf(xf[c * sx] - m);
    inv = 1.0 / fa_sum_f32(gf, sgx, C);
    et = gf[t * sgx];
    float a = (float)(scale * inv), b = (float)(-scale * off);
    for (int64_t c = 0; c < C; c++) gf[c * sgx] = gf[c * sgx] * a + b;
  }
  st(gx, t * sgx, scale * (et * inv - off - (1 - ls)), dbl);
}

/* what the per-position kernels need */
typedef struct {
  const fa_tensor *logits, *target, *gl;
  fa_tensor *gx;
  const int64_t *tp;
  int64_t C, sx, sgx;
  int flat, ct, cgl, es;
  double ls;
} ce_ctx;

/* The parallel loops are outlined by OpenMP before inlining, so dbl would be a run-time value inside
 * them: these hand the kernels literal constants (dbl, flat), one branch per position. The two *_any
 * functions are compiled for AVX2 + FMA and the baseline (FA_HOT_CLONES), picked at load time. */
static inline __attribute__((always_inline)) double ce_pos_loss(int dbl, int flat, const ce_ctx *c, int64_t i, int64_t t) {
  const char *xp = (const char *)c->logits->data;
  if (flat) return ce_line_loss(dbl, xp + i * c->C * c->es, 1, c->C, t, c->ls);
  return ce_line_loss(dbl, xp + line_base(c->logits, 1, i) * c->es, c->sx, c->C, t, c->ls);
}
FA_HOT_CLONES static double ce_pos_loss_any(int dbl, const ce_ctx *c, int64_t i, int64_t t) {
  if (dbl) return c->flat ? ce_pos_loss(1, 1, c, i, t) : ce_pos_loss(1, 0, c, i, t);
  return c->flat ? ce_pos_loss(0, 1, c, i, t) : ce_pos_loss(0, 0, c, i, t);
}
static inline __attribute__((always_inline)) void ce_pos_grad(int dbl, int flat, const ce_ctx *c, int64_t i, int64_t t,
                                                              double scale) {
  const char *xp = (const char *)c->logits->data;
  char *gp = (char *)c->gx->data;
  if (flat) ce_line_grad(dbl, gp + i * c->C * c->es, 1, xp + i * c->C * c->es, 1, c->C, t, c->ls, scale);
  else
    ce_line_grad(dbl, gp + line_base(c->gx, 1, i) * c->es, c->sgx, xp + line_base(c->logits, 1, i) * c->es, c->sx, c->C,
                 t, c->ls, scale);
}
FA_HOT_CLONES static void ce_pos_grad_any(int dbl, const ce_ctx *c, int64_t i, int64_t t, double scale) {
  if (dbl) {
    if (c->flat) ce_pos_grad(1, 1, c, i, t, scale);
    else ce_pos_grad(1, 0, c, i, t, scale);
  } else {
    if (c->flat) ce_pos_grad(0, 1, c, i, t, scale);
    else ce_pos_grad(0, 0, c, i, t, scale);
  }
}

static int ce_forward_cpu(const ce_geom *g, fa_tensor *loss, const fa_tensor *logits, const fa_tensor *target,
                          int reduction) {
  int64_t M = g->M, C = g->C;
  int dbl = logits->dtype == FA_FLOAT64, cl = fa_is_contiguous(loss);
  ce_ctx c = {logits, target, NULL, NULL, (const int64_t *)target->data, C, logits->stride[1], 0,
              logits->ndim == 2 && fa_is_contiguous(logits), fa_is_contiguous(target), 0, dbl ? 8 : 4, g->ls};
  if (reduction == FA_REDUCE_NONE) {
#pragma omp parallel for schedule(static) if (M * C > FA_PARALLEL_GRAIN)
    for (int64_t i = 0; i < M; i++) {
      int64_t t = c.tp[eoff(target, c.ct, i)];
      st(loss->data, eoff(loss, cl, i), t == g->ignore_index ? 0.0 : ce_pos_loss_any(dbl, &c, i, t), dbl);
    }
    return 0;
  }
  int64_t nch = (M + CE_CHUNK - 1) / CE_CHUNK;
  double *part = fa_alloc(FA_CPU, (nch > 0 ? nch : 1) * 8);
  if (!part) return FA_ERR_MEMORY;
#pragma omp parallel for schedule(static) if (M * C > FA_PARALLEL_GRAIN)
  for (int64_t k = 0; k < nch; k++) {
    double s = 0;
    int64_t e = (k + 1) * CE_CHUNK < M ? (k + 1) * CE_CHUNK : M;
    for (int64_t i = k * CE_CHUNK; i < e; i++) {
      int64_t t = c.tp[eoff(target, c.ct, i)];
      if (t != g->ignore_index) s += ce_pos_loss_any(dbl, &c, i, t);
    }
    part[k] = s;
  }
  double s = 0; /* chunk sums in order: the same result for any thread count */
  for (int64_t k = 0; k < nch; k++) s += part[k];
  fa_free(FA_CPU, part);
  st(loss->data, 0, reduction == FA_REDUCE_MEAN ? s / (double)g->count : s, dbl);
  return 0;
}

static void ce_backward_cpu(const ce_geom *g, fa_tensor *gx, const fa_tensor *gl, const fa_tensor *logits,
                            const fa_tensor *target, int reduction) {
  int64_t M = g->M, C = g->C;
  int dbl = logits->dtype == FA_FLOAT64;
  ce_ctx c = {logits, target, gl, gx, (const int64_t *)target->data, C, logits->stride[1], gx->stride[1],
              logits->ndim == 2 && fa_is_contiguous(logits) && fa_is_contiguous(gx), fa_is_contiguous(target),
              fa_is_contiguous(gl), dbl ? 8 : 4, g->ls};
  double s1 = 0;
  if (reduction != FA_REDUCE_NONE) s1 = ld(gl->data, 0, dbl) / (reduction == FA_REDUCE_MEAN ? (double)g->count : 1.0);
#pragma omp parallel for schedule(static) if (M * C > FA_PARALLEL_GRAIN)
  for (int64_t i = 0; i < M; i++) {
    int64_t t = c.tp[eoff(target, c.ct, i)];
    if (t == g->ignore_index) {
      char *gxr = (char *)gx->data + (c.flat ? i * C : line_base(gx, 1, i)) * c.es;
      int64_t sg = c.flat ? 1 : c.sgx;
      for (int64_t k = 0; k < C; k++) st(gxr, k * sg, 0.0, dbl);
      continue;
    }
    double scale = reduction == FA_REDUCE_NONE ? ld(gl->data, eoff(gl, c.cgl, i), dbl) : s1;
    ce_pos_grad_any(dbl, &c, i, t, scale);
  }
}

int fa_cross_entropy_forward(fa_tensor *loss, const fa_tensor *logits, const fa_tensor *target,
                             int64_t ignore_index, double label_smoothing, int reduction) {
  static const char *fn = "fa_cross_entropy_forward";
  int rc;
  ce_geom g;
  if ((rc = ce_check(fn, logits, target, ignore_index, label_smoothing, reduction, &g))) return rc;
  if ((rc = check_loss(fn, "loss", loss, "logits", logits, "target", target, reduction))) return rc;
  if (logits->device >= 0) return fa_cu_cross_entropy_forward(loss, logits, target, ignore_index, label_smoothing, reduction);
  return ce_forward_cpu(&g, loss, logits, target, reduction);
}

int fa_cross_entropy_backward(fa_tensor *grad_logits, const fa_tensor *grad_loss, const fa_tensor *logits,
                              const fa_tensor *target, int64_t ignore_index, double label_smoothing,
                              int reduction) {
  static const char *fn = "fa_cross_entropy_backward";
  int rc;
  ce_geom g;
  if ((rc = ce_check(fn, logits, target, ignore_index, label_smoothing, reduction, &g))) return rc;
  if ((rc = check_loss(fn, "grad_loss", grad_loss, "logits", logits, "target", target, reduction))) return rc;
  if ((rc = fa_check_like(fn, "grad_logits", grad_logits, "logits", logits)) ||
      (rc = fa_check_same_shape(fn, "grad_logits", grad_logits, "logits", logits)))
    return rc;
  if (logits->device >= 0)
    return fa_cu_cross_entropy_backward(grad_logits, grad_loss, logits, target, ignore_index, label_smoothing, reduction);
  if (g.M == 0) return 0;
  ce_backward_cpu(&g, grad_logits, grad_loss, logits, target, reduction);
  return 0;
}
