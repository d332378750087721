/* softmax.c: softmax and log-softmax over one dimension, CPU.
 *
 * x viewed as (outer, D, inner) around dim (0-based):
 *   forward:  y = exp(x - max) / sum exp(x - max)          log: y = x - max - log(sum exp(x - max))
 *   backward: grad_x = y * (g - sum_k g*y)                  log: grad_x = g - exp(y) * sum_k g
 *   (y is the forward output, g = grad_out; the sums run along dim)
 *
 * Three paths, same arithmetic: (a) every tensor contiguous and dim innermost: contiguous rows;
 * (b) every tensor contiguous, dim not innermost: blocks of up to SM_BLOCK adjacent inner positions
 * processed together so the loads along dim stay contiguous; (c) any strides: one strided line per
 * (outer, inner) position. Sums accumulate in double; float32 uses a vectorisable expf (fa_fast_expf,
 * internal.h). */
/* -fno-trapping-math (PyTorch builds with it too): lets GCC if-convert and vectorise the fa_fast_expf loops.
 * Nothing here reads the floating-point exception flags. Before the includes, so that every function of
 * this file, the inline helpers included, is compiled with the same options. */
#pragma GCC optimize("no-trapping-math")
#include "internal.h"

enum { SM_BLOCK = 64 };

static inline double ld(const void *p, int64_t i, int dbl) {
  return dbl ? ((const double *)p)[i] : (double)((const float *)p)[i];
}
static inline void st(void *p, int64_t i, double v, int dbl) {
  if (dbl) ((double *)p)[i] = v;
  else ((float *)p)[i] = (float)v;
}
static inline double ex(double v, int dbl) { return dbl ? exp(v) : (double)fa_fast_expf((float)v); }

static inline double vsum(const void *p, int64_t s, int64_t n, int dbl) {
  return dbl ? fa_sum_f64((const double *)p, s, n) : fa_sum_f32((const float *)p, s, n);
}
static inline double dot_f32(const float *a, int64_t sa, const float *b, int64_t sb, int64_t n) {
  double t = 0;
#pragma omp simd reduction(+ : t) simdlen(8)
  for (int64_t k = 0; k < n; k++) t += (double)a[k * sa] * b[k * sb];
  return t;
}
static inline double dot_f64(const double *a, int64_t sa, const double *b, int64_t sb, int64_t n) {
  double t = 0;
#pragma omp simd reduction(+ : t) simdlen(8)
  for (int64_t k = 0; k < n; k++) t += a[k * sa] * b[k * sb];
  return t;
}
static inline double vdot(const void *a, int64_t sa, const void *b, int64_t sb, int64_t n, int dbl) {
  return dbl ? dot_f64((const double *)a, sa, (const double *)b, sb, n) : dot_f32((const float *)a, sa, (const float *)b, sb, n);
}

/* float32 helpers for the forward: the max and exp(x - max) are exact / accurate in float, so those
 * loops stay 4-wide (the sums still accumulate in double) */
static inline float max_f32(const float *x, int64_t s, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < n; k++) m = x[k * s] > m ? x[k * s] : m;
  return m;
}
static inline void exp_shift_f32(float *y, int64_t sy, const float *x, int64_t sx, int64_t n, float m) {
  for (int64_t k = 0; k < n; k++) y[k * sy] = fa_fast_expf(x[k * sx] - m);
}

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

/* ------------------------------------------------------------------ one line: D elements, strides sy, sx */
static inline __attribute__((always_inline)) void fwd_line(int dbl, int lg, void *y, int64_t sy, const void *x,
                                                           int64_t sx, int64_t D) {
  double m = -INFINITY, s;
  /* exp into y first, then its sum: two simple loops that vectorise (one fused loop does not) */
  if (dbl) {
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < D; k++) m = ((const double *)x)[k * sx] > m ? ((const double *)x)[k * sx] : m;
    for (int64_t k = 0; k < D; k++) ((double *)y)[k * sy] = exp(((const double *)x)[k * sx] - m);
    s = fa_sum_f64((const double *)y, sy, D);
  } else {
    float mf = max_f32((const float *)x, sx, D);
    exp_shift_f32((float *)y, sy, (const float *)x, sx, D, mf);
    s = fa_sum_f32((const float *)y, sy, D);
    m = mf;
  }
  if (lg) {
    double lse = m + log(s);
    for (int64_t k = 0; k < D; k++) st(y, k * sy, ld(x, k * sx, dbl) - lse, dbl);
  } else if (dbl) {
    double inv = 1.0 / s;
    for (int64_t k = 0; k < D; k++) ((double *)y)[k * sy] *= inv;
  } else {
    float inv = (float)(1.0 / s);
    for (int64_t k = 0; k < D; k++) ((float *)y)[k * sy] *= inv;
  }
}

static inline __attribute__((always_inline)) void bwd_line(int dbl, int lg, void *gx, int64_t sgx, const void *g,
                                                           int64_t sg, const void *y, int64_t sy, int64_t D) {
  if (lg) {
    double s = vsum(g, sg, D, dbl);
    for (int64_t k = 0; k < D; k++)
      st(gx, k * sgx, ld(g, k * sg, dbl) - ex(ld(y, k * sy, dbl), dbl) * s, dbl);
  } else {
    double s = vdot(g, sg, y, sy, D, dbl);
    for (int64_t k = 0; k < D; k++) st(gx, k * sgx, ld(y, k * sy, dbl) * (ld(g, k * sg, dbl) - s), dbl);
  }
}

/* ------------------------------------------------------------------ a block of nb <= SM_BLOCK inner positions */
/* x, y point at (o, 0, i0) of contiguous (outer, D, inner) tensors */
static inline __attribute__((always_inline)) void fwd_block(int dbl, int lg, void *y, const void *x, int64_t D,
                                                            int64_t inner, int nb) {
  double s[SM_BLOCK], m[SM_BLOCK];
  for (int i = 0; i < nb; i++) s[i] = 0;
  if (dbl) {
    const double *xd = (const double *)x;
    double *yd = (double *)y;
    for (int i = 0; i < nb; i++) m[i] = -INFINITY;
    for (int64_t k = 0; k < D; k++)
      for (int i = 0; i < nb; i++) m[i] = xd[k * inner + i] > m[i] ? xd[k * inner + i] : m[i];
    for (int64_t k = 0; k < D; k++) {
      for (int i = 0; i < nb; i++) yd[k * inner + i] = exp(xd[k * inner + i] - m[i]);
      for (int i = 0; i < nb; i++) s[i] += yd[k * inner + i];
    }
  } else { /* max and exp in float (4-wide), sums in double */
    const float *xf = (const float *)x;
    float *yf = (float *)y, mf[SM_BLOCK];
    for (int i = 0; i < nb; i++) mf[i] = -INFINITY;
    for (int64_t k = 0; k < D; k++)
      for (int i = 0; i < nb; i++) mf[i] = xf[k * inner + i] > mf[i] ? xf[k * inner + i] : mf[i];
    for (int64_t k = 0; k < D; k++) {
      for (int i = 0; i < nb; i++) yf[k * inner + i] = fa_fast_expf(xf[k * inner + i] - mf[i]);
      for (int i = 0; i < nb; i++) s[i] += yf[k * inner + i];
    }
    for (int i = 0; i < nb; i++) m[i] = mf[i];
  }
  if (lg) {
    for (int i = 0; i < nb; i++) s[i] = m[i] + log(s[i]); /* log-sum-exp */
    for (int64_t k = 0; k < D; k++)
      for (int i = 0; i < nb; i++) st(y, k * inner + i, ld(x, k * inner + i, dbl) - s[i], dbl);
  } else if (dbl) {
    for (int i = 0; i < nb; i++) s[i] = 1.0 / s[i];
    for (int64_t k = 0; k < D; k++)
      for (int i = 0; i < nb; i++) ((double *)y)[k * inner + i] *= s[i];
  } else {
    float inv[SM_BLOCK];
    for (int i = 0; i < nb; i++) inv[i] = (float)(1.0 / s[i]);
    for (int64_t k = 0; k < D; k++)
      for (int i = 0; i < nb; i++) ((float *)y)[k * inner + i] *= inv[i];
  }
}

static inline __attribute__((always_inline)) void bwd_block(int dbl, int lg, void *gx, const void *g, const void *y,
                                                            int64_t D, int64_t inner, int nb) {
  double s[SM_BLOCK];
  for (int i = 0; i < nb; i++) s[i] = 0;
  for (int64_t k = 0; k < D; k++)
    for (int i = 0; i < nb; i++) {
      int64_t o = k * inner + i;
      s[i] += lg ? ld(g, o, dbl) : ld(g, o, dbl) * ld(y, o, dbl);
    }
  for (int64_t k = 0; k < D; k++)
    for (int i = 0; i < nb; i++) {
      int64_t o = k * inner + i;
      double r = lg ? ld(g, o, dbl) - ex(ld(y, o, dbl), dbl) * s[i] : ld(y, o, dbl) * (ld(g, o, dbl) - s[i]);
      st(gx, o, r, dbl);
    }
}

/* ------------------------------------------------------------------ drivers */
/* shape bookkeeping shared by forward and backward */
typedef struct {
  int64_t outer, D, inner, lines;
  int dim, dbl, contig, es;
} sm_geom;

static sm_geom geom(const fa_tensor *t, int dim, int contig) {
  sm_geom g;
  g.dim = dim;
  g.outer = 1;
  g.inner = 1;
  for (int d = 0; d < dim; d++) g.outer *= t->shape[d];
  for (int d = dim + 1; d < t->ndim; d++) g.inner *= t->shape[d];
  g.D = t->shape[dim];
  g.lines = g.outer * g.inner;
  g.dbl = t->dtype == FA_FLOAT64;
  g.es = g.dbl ? 8 : 4;
  g.contig = contig;
  return g;
}

/* The parallel loops below are outlined by OpenMP before inlining, so dbl and lg would be run-time
 * values inside them; these dispatchers hand the kernels literal constants instead, so that each of
 * the four (dtype, log) variants is compiled (and vectorised) on its own. One branch per line/block.
 * They are compiled for AVX2 + FMA as well as the baseline (FA_HOT_CLONES), picked at load time. */
FA_HOT_CLONES static void fwd_line_any(int dbl, int lg, void *y, int64_t sy, const void *x, int64_t sx, int64_t D) {
  if (dbl) {
    if (lg) fwd_line(1, 1, y, sy, x, sx, D);
    else fwd_line(1, 0, y, sy, x, sx, D);
  } else {
    if (lg) fwd_line(0, 1, y, sy, x, sx, D);
    else fwd_line(0, 0, y, sy, x, sx, D);
  }
}
FA_HOT_CLONES static void fwd_line_any_contig(int dbl, int lg, void *y, const void *x, int64_t D) {
  if (dbl) {
    if (lg) fwd_line(1, 1, y, 1, x, 1, D);
    else fwd_line(1, 0, y, 1, x, 1, D);
  } else {
    if (lg) fwd_line(0, 1, y, 1, x, 1, D);
    else fwd_line(0, 0, y, 1, x, 1, D);
  }
}
FA_HOT_CLONES static void fwd_block_any(int dbl, int lg, void *y, const void *x, int64_t D, int64_t inner, int nb) {
  if (dbl) {
    if (lg) fwd_block(1, 1, y, x, D, inner, nb);
    else fwd_block(1, 0, y, x, D, inner, nb);
  } else {
    if (lg) fwd_block(0, 1, y, x, D, inner, nb);
    else fwd_block(0, 0, y, x, D, inner, nb);
  }
}
FA_HOT_CLONES static void bwd_line_any(int dbl, int lg, void *gx, int64_t sgx, const void *g, int64_t sg, const void *y,
                                int64_t sy, int64_t D) {
  if (dbl) {
    if (lg) bwd_line(1, 1, gx, sgx, g, sg, y, sy, D);
    else bwd_line(1, 0, gx, sgx, g, sg, y, sy, D);
  } else {
    if (lg) bwd_line(0, 1, gx, sgx, g, sg, y, sy, D);
    else bwd_line(0, 0, gx, sgx, g, sg, y, sy, D);
  }
}
FA_HOT_CLONES static void bwd_line_any_contig(int dbl, int lg, void *gx, const void *g, const void *y, int64_t D) {
  if (dbl) {
    if (lg) bwd_line(1, 1, gx, 1, g, 1, y, 1, D);
    else bwd_line(1, 0, gx, 1, g, 1, y, 1, D);
  } else {
    if (lg) bwd_line(0, 1, gx, 1, g, 1, y, 1, D);
    else bwd_line(0, 0, gx, 1, g, 1, y, 1, D);
  }
}
FA_HOT_CLONES static void bwd_block_any(int dbl, int lg, void *gx, const void *g, const void *y, int64_t D, int64_t inner,
                                 int nb) {
  if (dbl) {
    if (lg) bwd_block(1, 1, gx, g, y, D, inner, nb);
    else bwd_block(1, 0, gx, g, y, D, inner, nb);
  } else {
    if (lg) bwd_block(0, 1, gx, g, y, D, inner, nb);
    else bwd_block(0, 0, gx, g, y, D, inner, nb);
  }
}

static void sm_forward_cpu(int lg, const sm_geom *g, fa_tensor *out, const fa_tensor *x) {
  int64_t D = g->D, inner = g->inner, outer = g->outer, work = g->lines * D;
  char *y = out->data;
  const char *xp = x->data;
  int es = g->es, dbl = g->dbl;
  if (g->contig && inner == 1) {
#pragma omp parallel for schedule(static) if (work > FA_PARALLEL_GRAIN)
    for (int64_t r = 0; r < outer; r++) fwd_line_any_contig(dbl, lg, y + r * D * es, xp + r * D * es, D);
  } else if (g->contig) {
    int64_t nblk = (inner + SM_BLOCK - 1) / SM_BLOCK;
#pragma omp parallel for schedule(static) if (work > FA_PARALLEL_GRAIN)
    for (int64_t t = 0; t < outer * nblk; t++) {
      int64_t o = t / nblk, i0 = (t % nblk) * SM_BLOCK;
      int nb = (int)(inner - i0 < SM_BLOCK ? inner - i0 : SM_BLOCK);
      int64_t base = (o * D * inner + i0) * es;
      fwd_block_any(dbl, lg, y + base, xp + base, D, inner, nb);
    }
  } else {
    int64_t sx = x->stride[g->dim], sy = out->stride[g->dim];
#pragma omp parallel for schedule(static) if (work > FA_PARALLEL_GRAIN)
    for (int64_t l = 0; l < g->lines; l++)
      fwd_line_any(dbl, lg, y + line_base(out, g->dim, l) * es, sy, xp + line_base(x, g->dim, l) * es, sx, D);
  }
}

static void sm_backward_cpu(int lg, const sm_geom *g, fa_tensor *gx, const fa_tensor *go, const fa_tensor *y) {
  int64_t D = g->D, inner = g->inner, outer = g->outer, work = g->lines * D;
  char *gxp = gx->data;
  const char *gp = go->data, *yp = y->data;
  int es = g->es, dbl = g->dbl;
  if (g->contig && inner == 1) {
#pragma omp parallel for schedule(static) if (work > FA_PARALLEL_GRAIN)
    for (int64_t r = 0; r < outer; r++) {
      int64_t b = r * D * es;
      bwd_line_any_contig(dbl, lg, gxp + b, gp + b, yp + b, D);
    }
  } else if (g->contig) {
    int64_t nblk = (inner + SM_BLOCK - 1) / SM_BLOCK;
#pragma omp parallel for schedule(static) if (work > FA_PARALLEL_GRAIN)
    for (int64_t t = 0; t < outer * nblk; t++) {
      int64_t o = t / nblk, i0 = (t % nblk) * SM_BLOCK;
      int nb = (int)(inner - i0 < SM_BLOCK ? inner - i0 : SM_BLOCK);
      int64_t b = (o * D * inner + i0) * es;
      bwd_block_any(dbl, lg, gxp + b, gp + b, yp + b, D, inner, nb);
    }
  } else {
    int d = g->dim;
#pragma omp parallel for schedule(static) if (work > FA_PARALLEL_GRAIN)
    for (int64_t l = 0; l < g->lines; l++)
      bwd_line_any(dbl, lg, gxp + line_base(gx, d, l) * es, gx->stride[d], gp + line_base(go, d, l) * es, go->stride[d],
                   yp + line_base(y, d, l) * es, y->stride[d], D);
  }
}

/* ------------------------------------------------------------------ entry points */
/* a 0-d tensor is treated as a 1-element line */
static fa_tensor as_1d(const fa_tensor *t) {
  fa_tensor r = *t;
  if (r.ndim == 0) {
    r.ndim = 1;
    r.shape[0] = 1;
    r.stride[0] = 1;
  }
  return r;
}

static int check_dim(const char *fn, const char *arg, const fa_tensor *x, int dim) {
  int nd = x->ndim > 0 ? x->ndim : 1;
  if (dim < 0 || dim >= nd) {
    char b[256];
    return fa_error(FA_ERR_ARG, "%s: argument 'dim': expected 0 <= dim < %d (0-based) for '%s' of shape %s, got %d",
                    fn, nd, arg, fa_shape_str(x, b), dim);
  }
  return 0;
}

int fa_softmax_forward(fa_tensor *out, const fa_tensor *x, int dim, int log) {
  static const char *fn = "fa_softmax_forward";
  int rc;
  if ((rc = fa_check_defined(fn, "x", x)) || (rc = fa_check_float_dtype(fn, "x", x))) return rc;
  if ((rc = fa_check_like(fn, "out", out, "x", x)) || (rc = fa_check_same_shape(fn, "out", out, "x", x))) return rc;
  if ((rc = check_dim(fn, "x", x, dim))) return rc;
  if (x->device >= 0) return fa_cu_softmax_forward(out, x, dim, log);
  if (fa_numel(x) == 0) return 0;
  fa_tensor o1 = as_1d(out), x1 = as_1d(x);
  sm_geom g = geom(&x1, dim, fa_is_contiguous(&o1) && fa_is_contiguous(&x1));
  sm_forward_cpu(log != 0, &g, &o1, &x1);
  return 0;
}

int fa_softmax_backward(fa_tensor *grad_x, const fa_tensor *grad_out, const fa_tensor *out, int dim, int log) {
  static const char *fn = "fa_softmax_backward";
  int rc;
  if ((rc = fa_check_defined(fn, "out", out)) || (rc = fa_check_float_dtype(fn, "out", out))) return rc;
  if ((rc = fa_check_like(fn, "grad_out", grad_out, "out", out)) ||
      (rc = fa_check_same_shape(fn, "grad_out", grad_out, "out", out)))
    return rc;
  if ((rc = fa_check_like(fn, "grad_x", grad_x, "out", out)) || (rc = fa_check_same_shape(fn, "grad_x", grad_x, "out", out)))
    return rc;
  if ((rc = check_dim(fn, "out", out, dim))) return rc;
  if (out->device >= 0) return fa_cu_softmax_backward(grad_x, grad_out, out, dim, log);
  if (fa_numel(out) == 0) return 0;
  fa_tensor gx1 = as_1d(grad_x), go1 = as_1d(grad_out), y1 = as_1d(out);
  sm_geom g = geom(&y1, dim, fa_is_contiguous(&gx1) && fa_is_contiguous(&go1) && fa_is_contiguous(&y1));
  sm_backward_cpu(log != 0, &g, &gx1, &go1, &y1);
  return 0;
}
