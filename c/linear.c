/* linear.c: fully connected layer, y = x @ W^T + b.
 *
 * x (..., in) contiguous, weight (out, in) any BLAS-readable strides, bias (out) or NULL -> out (..., out)
 * contiguous; the leading dims are flattened into R rows. CPU through BLAS (fa_matmul_forward), CUDA
 * through fa_cu_linear_*. Backward: grad_x (R, in) = grad_out (R, out) @ W (overwritten);
 * grad_weight (out, in) += grad_out^T @ x; grad_bias (out) += column sums of grad_out. */
#include "internal.h"
#include <stdlib.h>

/* defined in matmul.c */
void fa_blas_single_thread(void);

static const char *FWD = "fa_linear_forward", *BWD = "fa_linear_backward";

/* rows x cols 2-D view of a contiguous tensor whose last dim is cols */
static fa_tensor rows_view(const fa_tensor *t, int64_t cols) {
  fa_tensor v = *t;
  int64_t n = fa_numel(t);
  v.ndim = 2;
  v.shape[0] = cols ? n / cols : 0; v.shape[1] = cols;
  v.stride[0] = cols; v.stride[1] = 1;
  return v;
}

/* x (..., in) with in = weight's dim 2; `y` (..., out) with the same leading dims (out or grad_out) */
static int validate(const char *fn, const char *yname, const fa_tensor *y, const fa_tensor *x, const fa_tensor *weight) {
  int rc;
  char s1[256], s2[256];
  if ((rc = fa_check_defined(fn, "x", x)) || (rc = fa_check_float_dtype(fn, "x", x))) return rc;
  if ((rc = fa_check_like(fn, "weight", weight, "x", x)) || (rc = fa_check_ndim(fn, "weight", weight, 2))) return rc;
  if ((rc = fa_check_like(fn, yname, y, "x", x))) return rc;
  if (x->ndim < 1)
    return fa_error(FA_ERR_ARG, "%s: argument 'x': expected at least 1 dimension (..., in_features), got a 0-D tensor", fn);
  int64_t in = weight->shape[1], outf = weight->shape[0];
  if (x->shape[x->ndim - 1] != in)
    return fa_error(FA_ERR_ARG, "%s: argument 'x': expected last dimension %lld (in_features of weight of shape %s), got shape %s",
                    fn, (long long)in, fa_shape_str(weight, s1), fa_shape_str(x, s2));
  if ((rc = fa_check_contiguous(fn, "x", x))) return rc;
  int ok = y->ndim == x->ndim && y->shape[y->ndim - 1] == outf;
  for (int i = 0; ok && i < x->ndim - 1; i++) ok = y->shape[i] == x->shape[i];
  if (!ok) {
    char s3[256];
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected shape %s but with last dimension %lld (out_features of weight of shape %s), got %s",
                    fn, yname, fa_shape_str(x, s1), (long long)outf, fa_shape_str(weight, s2), fa_shape_str(y, s3));
  }
  return fa_check_contiguous(fn, yname, y);
}

static int check_bias(const char *fn, const char *arg, const fa_tensor *bias, const fa_tensor *x, int64_t outf) {
  int rc;
  char s1[256];
  if ((rc = fa_check_like(fn, arg, bias, "x", x))) return rc;
  if (bias->ndim != 1 || bias->shape[0] != outf)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected shape (%lld,) (out_features), got %s", fn, arg, (long long)outf,
                    fa_shape_str(bias, s1));
  return 0;
}

/* value of element i of a 1-D tensor of any stride */
static inline double ld1(const fa_tensor *t, int64_t i) {
  return t->dtype == FA_FLOAT64 ? ((const double *)t->data)[i * t->stride[0]] : ((const float *)t->data)[i * t->stride[0]];
}

int fa_linear_forward(fa_tensor *out, const fa_tensor *x, const fa_tensor *weight, const fa_tensor *bias) {
  int rc;
  if ((rc = fa_check_defined(FWD, "out", out))) return rc;
  if ((rc = validate(FWD, "out", out, x, weight))) return rc;
  int64_t in = weight->shape[1], outf = weight->shape[0];
  if (bias && (rc = check_bias(FWD, "bias", bias, x, outf))) return rc;
  if (fa_numel(out) == 0) return 0;
  if (x->device >= 0) return fa_cu_linear_forward(out, x, weight, bias);
  fa_tensor o2 = rows_view(out, outf), x2 = rows_view(x, in);
  int64_t R = o2.shape[0];
  double beta = 0;
  if (bias) { /* out rows start as the bias, then the GEMM adds x @ W^T */
    if (out->dtype == FA_FLOAT64) {
      double *o = (double *)out->data;
#pragma omp parallel for schedule(static) if (R * outf > FA_PARALLEL_GRAIN)
      for (int64_t r = 0; r < R; r++)
        for (int64_t j = 0; j < outf; j++) o[r * outf + j] = ld1(bias, j);
    } else {
      float *o = (float *)out->data;
#pragma omp parallel for schedule(static) if (R * outf > FA_PARALLEL_GRAIN)
      for (int64_t r = 0; r < R; r++)
        for (int64_t j = 0; j < outf; j++) o[r * outf + j] = (float)ld1(bias, j);
    }
    beta = 1;
  }
  return fa_matmul_forward(&o2, &x2, weight, 0, 1, 1, beta);
}

/* grad_bias[j] += sum_r g[r, j] (g is R x n, contiguous), summed in double in a fixed order */
static void bias_grad_cpu(fa_tensor *grad_bias, const fa_tensor *g, int64_t R, int64_t n) {
  int dbl = g->dtype == FA_FLOAT64;
  int64_t nb = (n + 63) / 64;
#pragma omp parallel for schedule(static) if (R * n > FA_PARALLEL_GRAIN)
  for (int64_t b = 0; b < nb; b++) {
    double acc[64] = {0};
    int64_t j0 = b * 64, j1 = j0 + 64 < n ? j0 + 64 : n;
    for (int64_t r = 0; r < R; r++) {
      if (dbl) {
        const double *p = (const double *)g->data + r * n;
        for (int64_t j = j0; j < j1; j++) acc[j - j0] += p[j];
      } else {
        const float *p = (const float *)g->data + r * n;
        for (int64_t j = j0; j < j1; j++) acc[j - j0] += p[j];
      }
    }
    for (int64_t j = j0; j < j1; j++) {
      if (dbl) ((double *)grad_bias->data)[j * grad_bias->stride[0]] += acc[j - j0];
      else ((float *)grad_bias->data)[j * grad_bias->stride[0]] += (float)acc[j - j0];
    }
  }
}

int fa_linear_backward(fa_tensor *grad_x, fa_tensor *grad_weight, fa_tensor *grad_bias, const fa_tensor *grad_out,
                       const fa_tensor *x, const fa_tensor *weight) {
  int rc;
  if ((rc = fa_check_defined(BWD, "grad_out", grad_out))) return rc;
  if ((rc = validate(BWD, "grad_out", grad_out, x, weight))) return rc;
  int64_t in = weight->shape[1], outf = weight->shape[0];
  if (grad_x) {
    if ((rc = fa_check_like(BWD, "grad_x", grad_x, "x", x)) || (rc = fa_check_same_shape(BWD, "grad_x", grad_x, "x", x)) ||
        (rc = fa_check_contiguous(BWD, "grad_x", grad_x)))
      return rc;
  }
  if (grad_weight) {
    if ((rc = fa_check_like(BWD, "grad_weight", grad_weight, "x", x)) ||
        (rc = fa_check_same_shape(BWD, "grad_weight", grad_weight, "weight", weight)))
      return rc;
  }
  if (grad_bias && (rc = check_bias(BWD, "grad_bias", grad_bias, x, outf))) return rc;
  if (x->device >= 0) return fa_cu_linear_backward(grad_x, grad_weight, grad_bias, grad_out, x, weight);
  fa_tensor g2 = rows_view(grad_out, outf), x2 = rows_view(x, in);
  int64_t R = g2.shape[0];
  fa_blas_single_thread();
  if (grad_x && fa_numel(grad_x) > 0) {
    fa_tensor gx2 = rows_view(grad_x, in);
    if ((rc = fa_matmul_forward(&gx2, &g2, weight, 0, 0, 1, 0))) return rc;
  }
  if (grad_weight && fa_numel(grad_weight) > 0 && R > 0) {
    if ((rc = fa_matmul_forward(grad_weight, &g2, &x2, 1, 0, 1, 1))) return rc;
  }
  if (grad_bias && outf > 0 && R > 0) bias_grad_cpu(grad_bias, grad_out, R, outf);
  return 0;
}
