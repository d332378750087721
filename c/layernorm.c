/* layernorm.c: layer normalisation over the last norm_size elements (PyTorch's nn.LayerNorm), CPU.
 *
 * forward:  x viewed as (rows, n) with n = norm_size, weight/bias (n) or NULL
 *   mean = sum_j x / n, var = sum_j (x - mean)^2 / n (biased), rstd = 1 / sqrt(var + eps)
 *   out  = (x - mean) * rstd * weight + bias;  mean/rstd (rows) saved for backward
 * backward: xhat = (x - mean) * rstd, g = grad_out * weight
 *   grad_x       = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat))     (overwritten)
 *   grad_weight += sum_rows grad_out * xhat,  grad_bias += sum_rows grad_out   (accumulated)
 *
 * x, out, grad_out, grad_x may have any strides (a non-contiguous row is gathered into a per-thread
 * buffer); weight/bias/mean/rstd may too. Statistics accumulate in double (float32 rows: float partial sums
 * over 256 values in 16 lanes, added in double, so rows of any length stay accurate); float32 rows are
 * normalised and their grad_x formed in float (twice the lanes of double, no conversions).
 * The weight/bias gradients are reduced deterministically: rows are cut into a fixed number of
 * partitions (independent of the thread count), each summed in row order into its own buffer, and
 * the partitions are added in partition order. mean/rstd may be NULL in the forward (inference). */
#include "internal.h"
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* number of row partitions for the parameter-gradient reduction: fixed so results never depend on
 * the number of threads */
enum { LN_PARTS = 64 };

static inline double ld(const void *p, int64_t i, int dbl) {
  return dbl ? ((const double *)p)[i] : (double)((const float *)p)[i];
}
static inline void st(void *p, int64_t i, double v, int dbl) {
  if (dbl) ((double *)p)[i] = v;
  else ((float *)p)[i] = (float)v;
}
static inline int64_t eoff(const fa_tensor *t, int contig, int64_t i) { return contig ? i : fa_offset(t, i); }


/* row r of t: a pointer into t when t is contiguous, else gathered into buf */
static const void *row_in(const fa_tensor *t, int contig, int64_t r, int64_t n, void *buf) {
  int es = fa_dtype_size(t->dtype);
  if (contig) return (const char *)t->data + r * n * es;
  for (int64_t j = 0; j < n; j++)
    memcpy((char *)buf + j * es, (const char *)t->data + fa_offset(t, r * n + j) * es, (size_t)es);
  return buf;
}
static void *row_out(fa_tensor *t, int contig, int64_t r, int64_t n, void *buf) {
  return contig ? (char *)t->data + r * n * fa_dtype_size(t->dtype) : buf;
}
static void row_out_done(fa_tensor *t, int contig, int64_t r, int64_t n, const void *buf) {
  if (contig) return;
  int es = fa_dtype_size(t->dtype);
  for (int64_t j = 0; j < n; j++)
    memcpy((char *)t->data + fa_offset(t, r * n + j) * es, (const char *)buf + j * es, (size_t)es);
}

/* a contiguous copy of a small 1-D-like parameter (weight, bias) when it is strided; NULL stays NULL */
static const void *param_ptr(const fa_tensor *t, int64_t n, void *buf) {
  if (!t) return NULL;
  return row_in(t, fa_is_contiguous(t), 0, n, buf);
}

/* ------------------------------------------------------------------ row reductions */
/* Double results. `#pragma omp simd` is lowered before inlining, so a reduction loop vectorises only where
 * its pointer types are fixed: hence a float and a double version of each. Several partial sums (simdlen 8
 * for double, 16 for float) so that the adds are not one long dependency chain; the float versions sum
 * chunks of 256 values in float and add the chunks in double (about 2x faster than double lanes). */
static inline double sum_f32(const float *x, int64_t n) {
  double s = 0;
  for (int64_t j0 = 0; j0 < n; j0 += 256) { /* float partial sums of 16 lanes over 256 values, added in double */
    float f = 0;
    const int64_t m = n - j0 < 256 ? n - j0 : 256;
#pragma omp simd reduction(+ : f) simdlen(16)
    for (int64_t j = 0; j < m; j++) f += x[j0 + j];
    s += f;
  }
  return s;
}
static inline double sum_f64(const double *x, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s) simdlen(8)
  for (int64_t j = 0; j < n; j++) s += x[j];
  return s;
}
static inline double sqdev_f32(const float *x, int64_t n, double mean) {
  double s = 0;
  const float mf = (float)mean;
  for (int64_t j0 = 0; j0 < n; j0 += 256) {
    float f = 0;
    const int64_t m = n - j0 < 256 ? n - j0 : 256;
#pragma omp simd reduction(+ : f) simdlen(16)
    for (int64_t j = 0; j < m; j++) f += (x[j0 + j] - mf) * (x[j0 + j] - mf);
    s += f;
  }
  return s;
}
static inline double sqdev_f64(const double *x, int64_t n, double mean) {
  double s = 0;
#pragma omp simd reduction(+ : s) simdlen(8)
  for (int64_t j = 0; j < n; j++) s += (x[j] - mean) * (x[j] - mean);
  return s;
}
/* sg = sum g, sgx = sum g * (x - mean) with g = go * w (w NULL: 1). Always inlined: an out-of-line
 * (baseline) copy called from the AVX2 clone of the row kernel ran at half speed. */
static inline __attribute__((always_inline)) void gsums_f32(const float *go, const float *x, const float *w,
                                                            int64_t n, double mean, double *sg, double *sgx) {
  double a = 0, b = 0;
  const float mf = (float)mean;
  for (int64_t j0 = 0; j0 < n; j0 += 256) { /* float partials over 256 values, added in double (as sum_f32) */
    float fa_ = 0, fb = 0;
    const int64_t m = n - j0 < 256 ? n - j0 : 256;
    const float *gq = go + j0, *xq = x + j0;
    if (w) {
      const float *wq = w + j0;
#pragma omp simd reduction(+ : fa_, fb) simdlen(16)
      for (int64_t j = 0; j < m; j++) {
        const float g = gq[j] * wq[j];
        fa_ += g;
        fb += g * (xq[j] - mf);
      }
    } else {
#pragma omp simd reduction(+ : fa_, fb) simdlen(16)
      for (int64_t j = 0; j < m; j++) {
        fa_ += gq[j];
        fb += gq[j] * (xq[j] - mf);
      }
    }
    a += fa_;
    b += fb;
  }
  *sg = a;
  *sgx = b;
}
static inline __attribute__((always_inline)) void gsums_f64(const double *go, const double *x, const double *w,
                                                            int64_t n, double mean, double *sg, double *sgx) {
  double a = 0, b = 0;
  if (w) {
#pragma omp simd reduction(+ : a, b) simdlen(8)
    for (int64_t j = 0; j < n; j++) {
      double g = go[j] * w[j];
      a += g;
      b += g * (x[j] - mean);
    }
  } else {
#pragma omp simd reduction(+ : a, b) simdlen(8)
    for (int64_t j = 0; j < n; j++) {
      a += go[j];
      b += go[j] * (x[j] - mean);
    }
  }
  *sg = a;
  *sgx = b;
}

/* ------------------------------------------------------------------ kernels (one row) */
/* x, o (n); w, b (n) or NULL. Called with a literal dbl, so each dtype gets its own loops. */
static inline __attribute__((always_inline)) void ln_fwd_row(int dbl, void *o, const void *x, const void *w,
                                                             const void *b, int64_t n, double eps,
                                                             double *mean_out, double *rstd_out) {
  /* two passes (mean, then squared deviations): no cancellation for rows with a large mean */
  double mean = (dbl ? sum_f64(x, n) : sum_f32(x, n)) / (double)n;
  double var = (dbl ? sqdev_f64(x, n, mean) : sqdev_f32(x, n, mean)) / (double)n;
  double rstd = 1.0 / sqrt(var + eps);
  if (!dbl) { /* normalise with the float32 statistics that are saved, as the backward sees them, in float:
               * twice the lanes of double and no conversions (one rounding per operation) */
    const float mf = (float)mean, rf = (float)rstd, *xf = x, *wf = w, *bf = b;
    float *of = o;
    if (w && b)
      for (int64_t j = 0; j < n; j++) of[j] = (xf[j] - mf) * rf * wf[j] + bf[j];
    else if (w)
      for (int64_t j = 0; j < n; j++) of[j] = (xf[j] - mf) * rf * wf[j];
    else if (b)
      for (int64_t j = 0; j < n; j++) of[j] = (xf[j] - mf) * rf + bf[j];
    else
      for (int64_t j = 0; j < n; j++) of[j] = (xf[j] - mf) * rf;
    *mean_out = mf;
    *rstd_out = rf;
    return;
  }
  if (w && b)
    for (int64_t j = 0; j < n; j++) st(o, j, (ld(x, j, dbl) - mean) * rstd * ld(w, j, dbl) + ld(b, j, dbl), dbl);
  else if (w)
    for (int64_t j = 0; j < n; j++) st(o, j, (ld(x, j, dbl) - mean) * rstd * ld(w, j, dbl), dbl);
  else if (b)
    for (int64_t j = 0; j < n; j++) st(o, j, (ld(x, j, dbl) - mean) * rstd + ld(b, j, dbl), dbl);
  else
    for (int64_t j = 0; j < n; j++) st(o, j, (ld(x, j, dbl) - mean) * rstd, dbl);
  *mean_out = mean;
  *rstd_out = rstd;
}

/* gx (n) or NULL; go, x (n); w (n) or NULL; pdw/pdb (n) double partial sums or NULL */
static inline __attribute__((always_inline)) void ln_bwd_row(int dbl, void *gx, const void *go, const void *x,
                                                             const void *w, double mean, double rstd, int64_t n,
                                                             double *pdw, double *pdb) {
  if (gx && w && pdw && pdb) { /* the training case: grad_x and both partials in one pass after the sums */
    double sg, sgx;
    if (dbl) gsums_f64(go, x, w, n, mean, &sg, &sgx);
    else gsums_f32(go, x, w, n, mean, &sg, &sgx);
    double mg = sg / (double)n, mgx = sgx * rstd / (double)n;
    if (!dbl) { /* float32: grad_x in float (twice the lanes, no conversions); the partials stay double */
      const float *gof = go, *xf = x, *wf = w, mf = (float)mean, rf = (float)rstd, mgf = (float)mg,
                  mxf = (float)(rstd * mgx);
      float *gxf = gx;
      for (int64_t j = 0; j < n; j++) {
        const float g = gof[j], xc = xf[j] - mf;
        pdw[j] += (double)g * ((double)xf[j] - mean) * rstd; /* as the loops below: identical partials */
        pdb[j] += g;
        gxf[j] = rf * (g * wf[j] - mgf - xc * mxf);
      }
      return;
    }
    for (int64_t j = 0; j < n; j++) {
      double g = ld(go, j, dbl), xc = ld(x, j, dbl) - mean;
      pdw[j] += g * xc * rstd; /* the same expressions as below: identical results */
      pdb[j] += g;
      st(gx, j, rstd * (g * ld(w, j, dbl) - mg - xc * rstd * mgx), dbl);
    }
    return;
  }
  if (pdw && pdb) /* one pass for both (the same sums as the two loops below) */
    for (int64_t j = 0; j < n; j++) {
      double g = ld(go, j, dbl);
      pdw[j] += g * (ld(x, j, dbl) - mean) * rstd;
      pdb[j] += g;
    }
  else if (pdw)
    for (int64_t j = 0; j < n; j++) pdw[j] += ld(go, j, dbl) * (ld(x, j, dbl) - mean) * rstd;
  else if (pdb)
    for (int64_t j = 0; j < n; j++) pdb[j] += ld(go, j, dbl);
  if (!gx) return;
  double sg, sgx;
  if (dbl) gsums_f64(go, x, w, n, mean, &sg, &sgx);
  else gsums_f32(go, x, w, n, mean, &sg, &sgx);
  double mg = sg / (double)n, mgx = sgx * rstd / (double)n;
  if (!dbl) { /* float32: as the training case above, so grad_x has the same bits with or without the partials */
    const float *gof = go, *xf = x, *wf = w, mf = (float)mean, rf = (float)rstd, mgf = (float)mg,
                mxf = (float)(rstd * mgx);
    float *gxf = gx;
    if (w)
      for (int64_t j = 0; j < n; j++) gxf[j] = rf * (gof[j] * wf[j] - mgf - (xf[j] - mf) * mxf);
    else
      for (int64_t j = 0; j < n; j++) gxf[j] = rf * (gof[j] - mgf - (xf[j] - mf) * mxf);
    return;
  }
  if (w)
    for (int64_t j = 0; j < n; j++)
      st(gx, j, rstd * (ld(go, j, dbl) * ld(w, j, dbl) - mg - (ld(x, j, dbl) - mean) * rstd * mgx), dbl);
  else
    for (int64_t j = 0; j < n; j++) st(gx, j, rstd * (ld(go, j, dbl) - mg - (ld(x, j, dbl) - mean) * rstd * mgx), dbl);
}

/* ------------------------------------------------------------------ drivers */
/* The parallel loops are outlined by OpenMP before inlining, so dbl would be a run-time value inside
 * them; each iteration hands the row kernels a literal instead (one branch per row). The row functions
 * are compiled for AVX-512, AVX2 + FMA and the baseline (FA_WIDE_CLONES), picked at load time. */
FA_WIDE_CLONES static void ln_fwd_row_any(int dbl, void *o, const void *x, const void *w, const void *b, int64_t n,
                                         double eps, double *mean, double *rstd) {
  if (dbl) ln_fwd_row(1, o, x, w, b, n, eps, mean, rstd);
  else ln_fwd_row(0, o, x, w, b, n, eps, mean, rstd);
}
FA_WIDE_CLONES static void ln_bwd_row_any(int dbl, void *gx, const void *go, const void *x, const void *w, double mean,
                                         double rstd, int64_t n, double *pdw, double *pdb) {
  if (dbl) ln_bwd_row(1, gx, go, x, w, mean, rstd, n, pdw, pdb);
  else ln_bwd_row(0, gx, go, x, w, mean, rstd, n, pdw, pdb);
}

typedef struct {
  fa_tensor *out, *mean, *rstd;
  const fa_tensor *x;
  const void *w, *b;
  int64_t rows, n;
  double eps;
  char *scratch; /* 2 rows per thread, for non-contiguous x/out */
} ln_fwd_args;

static void ln_forward_cpu(int dbl, const ln_fwd_args *a) {
  int64_t rows = a->rows, n = a->n;
  int es = dbl ? 8 : 4;
  int cx = fa_is_contiguous(a->x), co = fa_is_contiguous(a->out);
  int cm = a->mean && fa_is_contiguous(a->mean), cr = a->rstd && fa_is_contiguous(a->rstd);
#pragma omp parallel for schedule(static) if (rows * n > FA_PARALLEL_GRAIN)
  for (int64_t r = 0; r < rows; r++) {
    char *buf = a->scratch ? a->scratch + (size_t)fa_thread_id() * 2 * n * es : NULL;
    const void *xr = row_in(a->x, cx, r, n, buf);
    void *orow = row_out(a->out, co, r, n, buf ? buf + n * es : NULL);
    double mean, rstd;
    ln_fwd_row_any(dbl, orow, xr, a->w, a->b, n, a->eps, &mean, &rstd);
    row_out_done(a->out, co, r, n, orow);
    if (a->mean) st(a->mean->data, eoff(a->mean, cm, r), mean, dbl);
    if (a->rstd) st(a->rstd->data, eoff(a->rstd, cr, r), rstd, dbl);
  }
}

typedef struct {
  fa_tensor *gx;
  const fa_tensor *go, *x, *mean, *rstd;
  const void *w;
  int64_t rows, n, parts;
  double *pdw, *pdb; /* (parts, n) each, or NULL */
  char *scratch;     /* 3 rows per thread, for non-contiguous tensors */
} ln_bwd_args;

static void ln_backward_cpu(int dbl, const ln_bwd_args *a) {
  int64_t rows = a->rows, n = a->n, parts = a->parts;
  int es = dbl ? 8 : 4;
  int cx = fa_is_contiguous(a->x), cgo = fa_is_contiguous(a->go), cgx = a->gx && fa_is_contiguous(a->gx);
  int cm = fa_is_contiguous(a->mean), cr = fa_is_contiguous(a->rstd);
#pragma omp parallel for schedule(static) if (rows * n > FA_PARALLEL_GRAIN)
  for (int64_t p = 0; p < parts; p++) {
    char *buf = a->scratch ? a->scratch + (size_t)fa_thread_id() * 3 * n * es : NULL;
    double *pdw = a->pdw ? a->pdw + p * n : NULL, *pdb = a->pdb ? a->pdb + p * n : NULL;
    for (int64_t r = p * rows / parts; r < (p + 1) * rows / parts; r++) {
      const void *xr = row_in(a->x, cx, r, n, buf);
      const void *gor = row_in(a->go, cgo, r, n, buf ? buf + n * es : NULL);
      void *gxr = a->gx ? row_out(a->gx, cgx, r, n, buf ? buf + 2 * n * es : NULL) : NULL;
      double mean = ld(a->mean->data, eoff(a->mean, cm, r), dbl), rstd = ld(a->rstd->data, eoff(a->rstd, cr, r), dbl);
      ln_bwd_row_any(dbl, gxr, gor, xr, a->w, mean, rstd, n, pdw, pdb);
      if (gxr) row_out_done(a->gx, cgx, r, n, gxr);
    }
  }
}

/* ------------------------------------------------------------------ validation */
/* norm_size must be the product of trailing dims of x (PyTorch's normalized_shape) */
static int check_norm_size(const char *fn, const fa_tensor *x, int64_t norm_size) {
  if (norm_size >= 1) {
    int64_t p = 1;
    if (p == norm_size) return 0;
    for (int d = x->ndim - 1; d >= 0; d--) {
      p *= x->shape[d];
      if (p == norm_size) return 0;
    }
  }
  char b[256];
  return fa_error(FA_ERR_ARG,
                  "%s: argument 'norm_size': expected the product of trailing dimensions of 'x' (shape %s), got %lld", fn,
                  fa_shape_str(x, b), (long long)norm_size);
}

static int check_param(const char *fn, const char *arg, const fa_tensor *t, const fa_tensor *x, int64_t n) {
  int rc;
  if (!t) return 0;
  if ((rc = fa_check_like(fn, arg, t, "x", x))) return rc;
  if (fa_numel(t) != n) {
    char b[256];
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected %lld elements (norm_size), got shape %s", fn, arg,
                    (long long)n, fa_shape_str(t, b));
  }
  return 0;
}

/* mean/rstd: float64 for float64 x, float32 otherwise; rows elements */
static int check_stat(const char *fn, const char *arg, const fa_tensor *t, const fa_tensor *x, int64_t rows) {
  int rc;
  if ((rc = fa_check_defined(fn, arg, t)) || (rc = fa_check_same_device(fn, arg, t, "x", x))) return rc;
  if ((rc = fa_check_dtype(fn, arg, t, x->dtype == FA_FLOAT64 ? FA_FLOAT64 : FA_FLOAT32))) return rc;
  if (fa_numel(t) != rows) {
    char b[256];
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected %lld elements (one per row), got shape %s", fn, arg,
                    (long long)rows, fa_shape_str(t, b));
  }
  return 0;
}

static int needs_scratch(const fa_tensor *const *ts, int k) {
  for (int i = 0; i < k; i++)
    if (ts[i] && !fa_is_contiguous(ts[i])) return 1;
  return 0;
}

int fa_layernorm_forward(fa_tensor *out, fa_tensor *mean, fa_tensor *rstd, const fa_tensor *x,
                         const fa_tensor *weight, const fa_tensor *bias, int64_t norm_size, double eps) {
  static const char *fn = "fa_layernorm_forward";
  int rc;
  if ((rc = fa_check_defined(fn, "x", x)) || (rc = fa_check_float_dtype(fn, "x", x))) return rc;
  if ((rc = check_norm_size(fn, x, norm_size))) return rc;
  if ((rc = fa_check_like(fn, "out", out, "x", x)) || (rc = fa_check_same_shape(fn, "out", out, "x", x))) return rc;
  if ((rc = check_param(fn, "weight", weight, x, norm_size)) || (rc = check_param(fn, "bias", bias, x, norm_size)))
    return rc;
  int64_t n = norm_size, rows = fa_numel(x) / n;
  if (mean && (rc = check_stat(fn, "mean", mean, x, rows))) return rc;
  if (rstd && (rc = check_stat(fn, "rstd", rstd, x, rows))) return rc;
  if (!(eps >= 0)) return fa_error(FA_ERR_ARG, "%s: argument 'eps': expected >= 0, got %g", fn, eps);
  if (x->device >= 0) return fa_cu_layernorm_forward(out, mean, rstd, x, weight, bias, norm_size, eps);
  if (rows == 0) return 0;

  int dbl = x->dtype == FA_FLOAT64, es = dbl ? 8 : 4;
  const fa_tensor *strided[2] = {x, out};
  char *scratch = NULL, *pbuf = NULL;
  if (needs_scratch(strided, 2) && !(scratch = fa_alloc(FA_CPU, (int64_t)fa_max_threads() * 2 * n * es))) return FA_ERR_MEMORY;
  if (!(pbuf = fa_alloc(FA_CPU, 2 * n * es))) {
    fa_free(FA_CPU, scratch);
    return FA_ERR_MEMORY;
  }
  ln_fwd_args a = {out, mean, rstd, x, param_ptr(weight, n, pbuf), param_ptr(bias, n, pbuf + n * es), rows, n, eps,
                   scratch};
  ln_forward_cpu(dbl, &a);
  fa_free(FA_CPU, scratch);
  fa_free(FA_CPU, pbuf);
  return 0;
}

int fa_layernorm_backward(fa_tensor *grad_x, fa_tensor *grad_weight, fa_tensor *grad_bias,
                          const fa_tensor *grad_out, const fa_tensor *x, const fa_tensor *mean,
                          const fa_tensor *rstd, const fa_tensor *weight, int64_t norm_size) {
  static const char *fn = "fa_layernorm_backward";
  int rc;
  if ((rc = fa_check_defined(fn, "x", x)) || (rc = fa_check_float_dtype(fn, "x", x))) return rc;
  if ((rc = check_norm_size(fn, x, norm_size))) return rc;
  if ((rc = fa_check_like(fn, "grad_out", grad_out, "x", x)) || (rc = fa_check_same_shape(fn, "grad_out", grad_out, "x", x)))
    return rc;
  if (grad_x && ((rc = fa_check_like(fn, "grad_x", grad_x, "x", x)) || (rc = fa_check_same_shape(fn, "grad_x", grad_x, "x", x))))
    return rc;
  int64_t n = norm_size, rows = fa_numel(x) / n;
  if ((rc = check_stat(fn, "mean", mean, x, rows)) || (rc = check_stat(fn, "rstd", rstd, x, rows))) return rc;
  if ((rc = check_param(fn, "weight", weight, x, n)) || (rc = check_param(fn, "grad_weight", grad_weight, x, n)) ||
      (rc = check_param(fn, "grad_bias", grad_bias, x, n)))
    return rc;
  if (x->device >= 0)
    return fa_cu_layernorm_backward(grad_x, grad_weight, grad_bias, grad_out, x, mean, rstd, weight, norm_size);
  if (rows == 0) return 0;

  int dbl = x->dtype == FA_FLOAT64, es = dbl ? 8 : 4;
  int64_t parts = rows < LN_PARTS ? rows : LN_PARTS;
  const fa_tensor *strided[3] = {x, grad_out, grad_x};
  char *scratch = NULL, *wbuf = NULL;
  double *pdw = NULL, *pdb = NULL;
  int fail = (needs_scratch(strided, 3) && !(scratch = fa_alloc(FA_CPU, (int64_t)fa_max_threads() * 3 * n * es))) ||
             (weight && !(wbuf = fa_alloc(FA_CPU, n * es))) ||
             (grad_weight && !(pdw = fa_alloc(FA_CPU, parts * n * 8))) ||
             (grad_bias && !(pdb = fa_alloc(FA_CPU, parts * n * 8)));
  if (!fail) {
    if (pdw) memset(pdw, 0, (size_t)(parts * n * 8));
    if (pdb) memset(pdb, 0, (size_t)(parts * n * 8));
    ln_bwd_args a = {grad_x, grad_out, x, mean, rstd, param_ptr(weight, n, wbuf), rows, n, parts, pdw, pdb, scratch};
    ln_backward_cpu(dbl, &a);
    /* partitions summed in a fixed order: deterministic whatever the thread count */
    int cw = grad_weight && fa_is_contiguous(grad_weight), cb = grad_bias && fa_is_contiguous(grad_bias);
#pragma omp parallel for schedule(static) if (parts * n > FA_PARALLEL_GRAIN)
    for (int64_t j = 0; j < n; j++) {
      if (pdw) {
        double s = 0;
        for (int64_t p = 0; p < parts; p++) s += pdw[p * n + j];
        int64_t o = eoff(grad_weight, cw, j);
        st(grad_weight->data, o, ld(grad_weight->data, o, dbl) + s, dbl);
      }
      if (pdb) {
        double s = 0;
        for (int64_t p = 0; p < parts; p++) s += pdb[p * n + j];
        int64_t o = eoff(grad_bias, cb, j);
        st(grad_bias->data, o, ld(grad_bias->data, o, dbl) + s, dbl);
      }
    }
  }
  fa_free(FA_CPU, scratch);
  fa_free(FA_CPU, wbuf);
  fa_free(FA_CPU, pdw);
  fa_free(FA_CPU, pdb);
  return fail ? FA_ERR_MEMORY : 0;
}
