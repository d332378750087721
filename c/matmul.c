/* matmul.c: matrix products through BLAS (OpenBLAS sgemm/dgemm on the CPU, fa_cu_matmul_forward on CUDA),
 * and the CPU GEMM helpers that linear.c and conv2d.c share (declared at the top of linear.c and in conv2d.h).
 *
 * fa_matmul_forward: out (B, m, n) = alpha * op(a) (Ba, m, k) @ op(b) (Bb, k, n) + beta * out, Ba and Bb
 * each B or 1 (broadcast); 2-D operands are batch 1. Strided operands go to BLAS directly when one of
 * their last two dims is unit-stride (a transposed view is a flipped trans flag); others are copied. */
#include "internal.h"
#include <cblas.h>
#include <limits.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ------------------------------------------------------------------ BLAS threads */
/* One thread pool: OpenBLAS (a pthread build with its own pool) always runs on one thread, and the large
 * products are split over OpenMP's threads here (fa_cpu_gemm_par). Two pools on the same cores fight:
 * OpenMP's workers spin for a while after every parallel region, and an OpenBLAS thread started then
 * shares a core with one of them (measured: a 4096x512x512 sgemm after an OpenMP loop took 14 ms
 * instead of 9.6 on 2 cores). The split costs nothing measurable (each thread packs its own panels). */
void fa_blas_single_thread(void) {
  if (openblas_get_num_threads() != 1) openblas_set_num_threads(1);
}

/* Row-major C (m x n) = alpha * op(A) @ op(B) + beta * C with leading dimensions in elements; dbl picks
 * dgemm. k == 0 scales C by beta (0 clears it, NaNs included), as BLAS would if it were asked. */
void fa_cpu_gemm(int dbl, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
                 const void *b, int64_t ldb, double beta, void *c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; i++)
      for (int64_t j = 0; j < n; j++) {
        if (dbl) { double *p = (double *)c + i * ldc + j; *p = beta == 0 ? 0 : beta * *p; }
        else { float *p = (float *)c + i * ldc + j; *p = beta == 0 ? 0.f : (float)beta * *p; }
      }
    return;
  }
  enum CBLAS_TRANSPOSE TA = ta ? CblasTrans : CblasNoTrans, TB = tb ? CblasTrans : CblasNoTrans;
  if (dbl)
    cblas_dgemm(CblasRowMajor, TA, TB, (int)m, (int)n, (int)k, alpha, (const double *)a, (int)lda, (const double *)b,
                (int)ldb, beta, (double *)c, (int)ldc);
  else
    cblas_sgemm(CblasRowMajor, TA, TB, (int)m, (int)n, (int)k, (float)alpha, (const float *)a, (int)lda,
                (const float *)b, (int)ldb, (float)beta, (float *)c, (int)ldc);
}

/* fa_cpu_gemm over OpenMP's threads: C is cut into blocks of rows (or of columns when it is wider than
 * tall), multiples of 16, one single-threaded BLAS call each. Small products (< 4 MFLOP) and calls from
 * inside a parallel region run on the calling thread. */
void fa_cpu_gemm_par(int dbl, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
                     const void *b, int64_t ldb, double beta, void *c, int64_t ldc) {
  int nt = 1;
#ifdef _OPENMP
  if (!omp_in_parallel()) nt = omp_get_max_threads();
#endif
  if (nt <= 1 || 2.0 * (double)m * (double)n * (double)k < 4e6 || (m < 32 && n < 32)) {
    fa_cpu_gemm(dbl, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  int64_t es = dbl ? 8 : 4, split_m = m >= n, dim = split_m ? m : n;
  int64_t chunk = ((dim + nt - 1) / nt + 15) / 16 * 16, nchunks = (dim + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(nchunks < nt ? (int)nchunks : nt)
  for (int64_t t = 0; t < nchunks; t++) {
    int64_t s = t * chunk, e = s + chunk < dim ? s + chunk : dim;
    if (split_m)
      fa_cpu_gemm(dbl, ta, tb, e - s, n, k, alpha, (const char *)a + (ta ? s : s * lda) * es, lda, b, ldb, beta,
                  (char *)c + s * ldc * es, ldc);
    else
      fa_cpu_gemm(dbl, ta, tb, m, e - s, k, alpha, a, lda, (const char *)b + (tb ? s * ldb : s) * es, ldb, beta,
                  (char *)c + s * es, ldc);
  }
}

/* ------------------------------------------------------------------ validation */
/* the 2-D matrix of a 2-D or 3-D operand: rows, cols, batch (1 for 2-D), strides */
typedef struct mat3 {
  char *data;
  int64_t batch, rows, cols, sb, sr, sc;
} mat3;

static mat3 mat_of(const fa_tensor *t) {
  mat3 m;
  int d = t->ndim;
  m.data = (char *)t->data;
  m.batch = d == 3 ? t->shape[0] : 1;
  m.sb = d == 3 ? t->stride[0] : 0;
  m.rows = t->shape[d - 2]; m.cols = t->shape[d - 1];
  m.sr = t->stride[d - 2]; m.sc = t->stride[d - 1];
  if (m.batch == 1) m.sb = 0;
  return m;
}

/* How BLAS can read a (rows x cols) strided matrix: 0 = row-major with leading dim *ld, 1 = as the
 * transpose of a row-major (cols x rows) matrix with leading dim *ld, -1 = not at all (copy it). */
static int mat_layout(const mat3 *m, int64_t *ld) {
  int64_t r = m->rows, c = m->cols;
  if ((c <= 1 || m->sc == 1) && (r <= 1 || m->sr >= (c > 1 ? c : 1))) {
    *ld = r <= 1 ? (c > 1 ? c : 1) : m->sr;
    return 0;
  }
  if ((r <= 1 || m->sr == 1) && (c <= 1 || m->sc >= (r > 1 ? r : 1))) {
    *ld = c <= 1 ? (r > 1 ? r : 1) : m->sc;
    return 1;
  }
  return -1;
}

static int check_blas_size(const char *fn, const char *arg, int64_t v) {
  if (v > INT_MAX)
    return fa_error(FA_ERR_UNSUPPORTED, "%s: argument '%s': a matrix dimension or stride of %lld exceeds the BLAS limit of %d",
                    fn, arg, (long long)v, INT_MAX);
  return 0;
}

/* a contiguous copy of t (same shape, dtype, device) in *tmp; the caller fa_free's tmp->data */
static int contiguous_copy(fa_tensor *tmp, const fa_tensor *t) {
  *tmp = *t;
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; i--) { tmp->stride[i] = s; s *= t->shape[i]; }
  tmp->data = fa_alloc(t->device, fa_numel(t) * fa_dtype_size(t->dtype));
  if (!tmp->data) return FA_ERR_MEMORY;
  int rc = fa_copy(tmp, t);
  if (rc) { fa_free(t->device, tmp->data); tmp->data = NULL; }
  return rc;
}

static int matmul_validate(const char *fn, const char *oname, const fa_tensor *out, const fa_tensor *a, const fa_tensor *b,
                           int ta, int tb) {
  int rc;
  char s1[256], s2[256], s3[256], s4[256];
  if ((rc = fa_check_defined(fn, "a", a)) || (rc = fa_check_float_dtype(fn, "a", a))) return rc;
  if ((rc = fa_check_like(fn, "b", b, "a", a)) || (rc = fa_check_like(fn, oname, out, "a", a))) return rc;
  if (a->ndim < 2 || a->ndim > 3) return fa_error(FA_ERR_ARG, "%s: argument 'a': expected a 2-D or 3-D tensor, got %d-D of shape %s", fn, a->ndim, fa_shape_str(a, s1));
  if (b->ndim < 2 || b->ndim > 3) return fa_error(FA_ERR_ARG, "%s: argument 'b': expected a 2-D or 3-D tensor, got %d-D of shape %s", fn, b->ndim, fa_shape_str(b, s1));
  if (out->ndim < 2 || out->ndim > 3) return fa_error(FA_ERR_ARG, "%s: argument '%s': expected a 2-D or 3-D tensor, got %d-D of shape %s", fn, oname, out->ndim, fa_shape_str(out, s1));
  mat3 A = mat_of(a), B = mat_of(b);
  int64_t m = ta ? A.cols : A.rows, ka = ta ? A.rows : A.cols;
  int64_t kb = tb ? B.cols : B.rows, n = tb ? B.rows : B.cols;
  if (ka != kb)
    return fa_error(FA_ERR_ARG, "%s: argument 'b': inner sizes differ: op(a) is %lldx%lld (a of shape %s%s), op(b) is %lldx%lld (b of shape %s%s)",
                    fn, (long long)m, (long long)ka, fa_shape_str(a, s1), ta ? ", transposed" : "", (long long)kb, (long long)n,
                    fa_shape_str(b, s2), tb ? ", transposed" : "");
  if (A.batch != 1 && B.batch != 1 && A.batch != B.batch)
    return fa_error(FA_ERR_ARG, "%s: argument 'b': batch sizes differ: a has %lld (shape %s), b has %lld (shape %s); one must be 1 or both equal",
                    fn, (long long)A.batch, fa_shape_str(a, s1), (long long)B.batch, fa_shape_str(b, s2));
  int64_t batch = A.batch > B.batch ? A.batch : B.batch;
  int three = a->ndim == 3 || b->ndim == 3;
  int ok = out->ndim == 3 || batch == 1;
  if (ok) {
    mat3 O = mat_of(out);
    ok = O.rows == m && O.cols == n && O.batch == batch;
  }
  if (!ok) {
    if (three || out->ndim == 3)
      sprintf(s3, "(%lld, %lld, %lld)", (long long)batch, (long long)m, (long long)n);
    else
      sprintf(s3, "(%lld, %lld)", (long long)m, (long long)n);
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected shape %s for a of shape %s%s and b of shape %s%s, got %s", fn, oname,
                    s3, fa_shape_str(a, s1), ta ? " (transposed)" : "", fa_shape_str(b, s2), tb ? " (transposed)" : "",
                    fa_shape_str(out, s4));
  }
  return 0;
}

/* ------------------------------------------------------------------ forward */
static int matmul_cpu(fa_tensor *out, const fa_tensor *a, const fa_tensor *b, int ta, int tb, double alpha, double beta) {
  static const char *fn = "fa_matmul_forward";
  int rc = 0, dbl = a->dtype == FA_FLOAT64;
  int64_t es = dbl ? 8 : 4;
  fa_tensor ca, cb, co;
  const fa_tensor *pa = a, *pb = b;
  fa_tensor *po = out;
  void *fa_ = NULL, *fb_ = NULL, *fo_ = NULL;
  int64_t lda, ldb, ldc;
  mat3 A = mat_of(a), B = mat_of(b), O = mat_of(out);
  int la = mat_layout(&A, &lda), lb = mat_layout(&B, &ldb), lo = mat_layout(&O, &ldc);
  /* operands BLAS cannot read are copied (a strided slice, say); the copy is contiguous: layout 0 */
  if (la < 0) { if ((rc = contiguous_copy(&ca, a))) goto done; fa_ = ca.data; pa = &ca; A = mat_of(pa); la = mat_layout(&A, &lda); }
  if (lb < 0) { if ((rc = contiguous_copy(&cb, b))) goto done; fb_ = cb.data; pb = &cb; B = mat_of(pb); lb = mat_layout(&B, &ldb); }
  if (lo < 0) {
    if (beta != 0) { if ((rc = contiguous_copy(&co, out))) goto done; }
    else {
      co = *out;
      int64_t s = 1;
      for (int i = out->ndim - 1; i >= 0; i--) { co.stride[i] = s; s *= out->shape[i]; }
      if (!(co.data = fa_alloc(-1, fa_numel(out) * es))) { rc = FA_ERR_MEMORY; goto done; }
    }
    fo_ = co.data; po = &co; O = mat_of(po); lo = mat_layout(&O, &ldc);
  }
  (void)pa; (void)pb;
  if ((rc = check_blas_size(fn, "a", lda)) || (rc = check_blas_size(fn, "b", ldb)) || (rc = check_blas_size(fn, "out", ldc)) ||
      (rc = check_blas_size(fn, "out", O.rows)) || (rc = check_blas_size(fn, "out", O.cols)) ||
      (rc = check_blas_size(fn, "a", A.rows)) || (rc = check_blas_size(fn, "a", A.cols)))
    goto done;
  {
    int64_t m = O.rows, n = O.cols, k = ta ? A.rows : A.cols, batch = O.batch;
    /* op(A) with A read as stored: flipping the storage layout flips the transpose flag */
    int eta = ta ^ la, etb = tb ^ lb;
    const char *pda = A.data, *pdb = B.data;
    char *pdo = O.data;
    int64_t sba = A.sb * es, sbb = B.sb * es, sbo = O.sb * es;
    if (lo == 1) {
      /* out stored transposed: out^T (n x m) = op(b)^T @ op(a)^T */
      const char *tp = pda; pda = pdb; pdb = tp;
      int64_t tl = lda; lda = ldb; ldb = tl;
      int64_t ts = sba; sba = sbb; sbb = ts;
      int t = eta; eta = !etb; etb = !t;
      int64_t tm = m; m = n; n = tm;
    }
    fa_blas_single_thread();
    double flops = 2.0 * (double)m * (double)n * (double)k;
    if (batch > 1 && flops < 4e6 && flops * (double)batch > 1e6 && fa_get_num_threads() > 1) {
      /* many small products: one per OpenMP thread */
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < batch; i++)
        fa_cpu_gemm(dbl, eta, etb, m, n, k, alpha, pda + i * sba, lda, pdb + i * sbb, ldb, beta, pdo + i * sbo, ldc);
    } else {
      for (int64_t i = 0; i < batch; i++)
        fa_cpu_gemm_par(dbl, eta, etb, m, n, k, alpha, pda + i * sba, lda, pdb + i * sbb, ldb, beta, pdo + i * sbo, ldc);
    }
  }
  if (fo_) rc = fa_copy(out, &co);
done:
  if (fa_) fa_free(-1, fa_);
  if (fb_) fa_free(-1, fb_);
  if (fo_) fa_free(-1, fo_);
  return rc;
}

int fa_matmul_forward(fa_tensor *out, const fa_tensor *a, const fa_tensor *b, int trans_a, int trans_b, double alpha,
                      double beta) {
  static const char *fn = "fa_matmul_forward";
  int rc;
  if ((rc = fa_check_defined(fn, "out", out))) return rc;
  if ((rc = matmul_validate(fn, "out", out, a, b, trans_a, trans_b))) return rc;
  if (fa_numel(out) == 0) return 0;
  if (a->device >= 0) return fa_cu_matmul_forward(out, a, b, trans_a, trans_b, alpha, beta);
  return matmul_cpu(out, a, b, trans_a, trans_b, alpha, beta);
}

/* ------------------------------------------------------------------ backward */
/* the i-th 2-D matrix of a 2-D/3-D tensor, as a 2-D descriptor (device pointers are offset the same way) */
static fa_tensor slice2(const fa_tensor *t, int64_t i) {
  fa_tensor s = *t;
  if (t->ndim == 3) {
    s.data = (char *)t->data + i * t->stride[0] * fa_dtype_size(t->dtype);
    s.ndim = 2;
    s.shape[0] = t->shape[1]; s.shape[1] = t->shape[2];
    s.stride[0] = t->stride[1]; s.stride[1] = t->stride[2];
  }
  return s;
}

/* (B, r, c) as (B*r, c) when the batch stride is r rows (so the batches stack into one matrix) */
static int stack_rows(const fa_tensor *t, fa_tensor *s) {
  if (t->ndim != 3) { *s = *t; return 1; }
  if (t->shape[0] > 1 && t->stride[0] != t->shape[1] * t->stride[1]) return 0;
  if (t->stride[2] != 1 && t->shape[2] > 1) return 0;
  *s = *t;
  s->ndim = 2;
  s->shape[0] = t->shape[0] * t->shape[1]; s->shape[1] = t->shape[2];
  s->stride[0] = t->stride[1]; s->stride[1] = t->stride[2];
  return 1;
}

/* d(sum) over a broadcast operand: g (1 or 2-D) = sum_i op(x_i) @ op(y_i) over the batch of the
 * other operand, by stacking into one product when the layout allows, else product by product. */
static int reduce_product(fa_tensor *g, const fa_tensor *x, const fa_tensor *y, int tx, int ty, int64_t batch) {
  fa_tensor g2 = slice2(g, 0), xs, ys;
  /* sum_i x_i^T @ y_i = X^T @ Y with X, Y the row-stacked batches */
  if (tx && !ty && stack_rows(x, &xs) && stack_rows(y, &ys) && x->ndim == 3 && y->ndim == 3)
    return fa_matmul_forward(&g2, &xs, &ys, 1, 0, 1, 0);
  int rc;
  if (batch == 0) return fa_fill(g, 0);
  for (int64_t i = 0; i < batch; i++) {
    fa_tensor xi = slice2(x, x->ndim == 3 && x->shape[0] > 1 ? i : 0), yi = slice2(y, y->ndim == 3 && y->shape[0] > 1 ? i : 0);
    if ((rc = fa_matmul_forward(&g2, &xi, &yi, tx, ty, 1, i == 0 ? 0 : 1))) return rc;
  }
  return 0;
}

int fa_matmul_backward(fa_tensor *grad_a, fa_tensor *grad_b, const fa_tensor *grad_out, const fa_tensor *a,
                       const fa_tensor *b) {
  static const char *fn = "fa_matmul_backward";
  int rc;
  if ((rc = fa_check_defined(fn, "grad_out", grad_out))) return rc;
  if ((rc = matmul_validate(fn, "grad_out", grad_out, a, b, 0, 0))) return rc;
  if (grad_a) {
    if ((rc = fa_check_like(fn, "grad_a", grad_a, "a", a)) || (rc = fa_check_same_shape(fn, "grad_a", grad_a, "a", a))) return rc;
  }
  if (grad_b) {
    if ((rc = fa_check_like(fn, "grad_b", grad_b, "b", b)) || (rc = fa_check_same_shape(fn, "grad_b", grad_b, "b", b))) return rc;
  }
  mat3 A = mat_of(a), B = mat_of(b);
  int64_t batch = A.batch > B.batch ? A.batch : B.batch;
  if (grad_a && fa_numel(grad_a) > 0) {
    if (A.batch == batch) {
      if ((rc = fa_matmul_forward(grad_a, grad_out, b, 0, 1, 1, 0))) return rc;
    } else if ((rc = reduce_product(grad_a, grad_out, b, 0, 1, batch))) return rc;
  }
  if (grad_b && fa_numel(grad_b) > 0) {
    if (B.batch == batch) {
      if ((rc = fa_matmul_forward(grad_b, a, grad_out, 1, 0, 1, 0))) return rc;
    } else if ((rc = reduce_product(grad_b, a, grad_out, 1, 0, batch))) return rc;
  }
  return 0;
}
