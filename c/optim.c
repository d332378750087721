/* optim.c: the fused optimiser steps (SGD, Adam, AdamW) on the CPU (the sum of squares used for gradient
 * clipping, fa_sumsq, is in reduce.c). CUDA tensors go to fa_cu_* after validation.
 *
 * Each step is one pass over flat contiguous buffers (n elements) and follows the arithmetic of PyTorch's
 * single-tensor torch.optim code operation by operation: float32 buffers compute in float with the
 * Python-side scalars (lr, betas, bias corrections) computed in double and cast to float where PyTorch
 * casts them, float64 buffers in double. */
#include "internal.h"
#include <stdint.h>

/* param, grad and the state buffers: float, contiguous, same dtype/device, same number of elements */
static int check_flat(const char *fn, const char *arg, const fa_tensor *t, const fa_tensor *param) {
  int rc;
  if ((rc = fa_check_like(fn, arg, t, "param", param)) || (rc = fa_check_contiguous(fn, arg, t))) return rc;
  if (fa_numel(t) != fa_numel(param)) {
    char b[256];
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected %lld elements (as 'param'), got %lld (shape %s)", fn, arg,
                    (long long)fa_numel(param), (long long)fa_numel(t), fa_shape_str(t, b));
  }
  return 0;
}
static int check_param(const char *fn, const fa_tensor *param) {
  int rc;
  if ((rc = fa_check_defined(fn, "param", param)) || (rc = fa_check_float_dtype(fn, "param", param)) ||
      (rc = fa_check_contiguous(fn, "param", param)))
    return rc;
  return 0;
}
/* a hyper-parameter >= lo (and < hi when hi > lo); NaN fails */
static int check_range(const char *fn, const char *arg, double v, double lo, double hi, const char *want) {
  if (!(v >= lo) || (hi > lo && !(v < hi)) || isinf(v))
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected %s, got %g", fn, arg, want, v);
  return 0;
}

/* ================================================================== SGD */
/* param, grad, buf (n).  PyTorch's torch.optim.SGD step:
 *   d = grad + wd*param                                   (wd != 0)
 *   buf = first ? d : momentum*buf + (1 - dampening)*d     (momentum != 0)
 *   d = nesterov ? d + momentum*buf : buf
 *   param = param - lr*d */
static void sgd_f32(int64_t n, float *p, const float *g, float *buf, double lr, double momentum, double dampening,
                    double wd, int nesterov, int first) {
  const float neg_lr = (float)-lr, mom = (float)momentum, omd = (float)(1.0 - dampening), wdf = (float)wd;
  const int use_wd = wd != 0, use_mom = momentum != 0;
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
  for (int64_t i = 0; i < n; i++) {
    float d = g[i];
    if (use_wd) d = d + wdf * p[i];
    if (use_mom) {
      float b = first ? d : buf[i] * mom + omd * d;
      buf[i] = b;
      d = nesterov ? d + mom * b : b;
    }
    p[i] = p[i] + neg_lr * d;
  }
}
static void sgd_f64(int64_t n, double *p, const double *g, double *buf, double lr, double momentum, double dampening,
                    double wd, int nesterov, int first) {
  const double neg_lr = -lr, omd = 1.0 - dampening;
  const int use_wd = wd != 0, use_mom = momentum != 0;
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
  for (int64_t i = 0; i < n; i++) {
    double d = g[i];
    if (use_wd) d = d + wd * p[i];
    if (use_mom) {
      double b = first ? d : buf[i] * momentum + omd * d;
      buf[i] = b;
      d = nesterov ? d + momentum * b : b;
    }
    p[i] = p[i] + neg_lr * d;
  }
}

int fa_sgd_step(fa_tensor *param, const fa_tensor *grad, fa_tensor *momentum_buf, double lr, double momentum,
                double dampening, double weight_decay, int nesterov, int first) {
  static const char *fn = "fa_sgd_step";
  int rc;
  if ((rc = check_param(fn, param)) || (rc = check_flat(fn, "grad", grad, param)) ||
      (rc = check_range(fn, "lr", lr, 0, 0, "a finite learning rate >= 0")) ||
      (rc = check_range(fn, "momentum", momentum, 0, 0, "a finite momentum >= 0")) ||
      (rc = check_range(fn, "weight_decay", weight_decay, 0, 0, "a finite weight_decay >= 0")))
    return rc;
  if (dampening != dampening || isinf(dampening))
    return fa_error(FA_ERR_ARG, "%s: argument 'dampening': expected a finite number, got %g", fn, dampening);
  if (nesterov && (momentum <= 0 || dampening != 0))
    return fa_error(FA_ERR_ARG, "%s: argument 'nesterov': Nesterov momentum requires momentum > 0 and dampening = 0, got momentum %g, dampening %g",
                    fn, momentum, dampening);
  if (momentum != 0) {
    if (!momentum_buf)
      return fa_error(FA_ERR_ARG, "%s: argument 'momentum_buf': expected a buffer like 'param' (momentum is %g), got nothing", fn, momentum);
    if ((rc = check_flat(fn, "momentum_buf", momentum_buf, param))) return rc;
  }
  int64_t n = fa_numel(param);
  if (n == 0) return 0;
  if (param->device >= 0)
    return fa_cu_sgd_step(param, grad, momentum_buf, lr, momentum, dampening, weight_decay, nesterov, first);
  void *buf = momentum != 0 ? momentum_buf->data : NULL;
  if (param->dtype == FA_FLOAT32)
    sgd_f32(n, param->data, grad->data, buf, lr, momentum, dampening, weight_decay, nesterov, first);
  else
    sgd_f64(n, param->data, grad->data, buf, lr, momentum, dampening, weight_decay, nesterov, first);
  return 0;
}

/* ================================================================== Adam / AdamW */
/* param, grad, m, v (n).  PyTorch's single-tensor Adam (decoupled = 0) / AdamW (decoupled = 1), step t >= 1:
 *   AdamW: param = param * (1 - lr*wd)          Adam: g = grad + wd*param
 *   m = m*b1 + (1 - b1)*g
 *   v = v*b2 + (1 - b2)*g*g
 *   denom = sqrt(v) / sqrt(1 - b2^t) + eps
 *   param = param + (-lr / (1 - b1^t)) * m / denom */
typedef struct {
  double lr, beta1, beta2, eps, wd, step_size, bc2_sqrt;
  int decoupled;
} adam_args;

/* Note: the sqrt keeps these loops scalar: gcc calls sqrtf for its errno unless -fno-math-errno is given
 * (which the Makefile does not pass; the optimize pragma does not reach it in gcc 12). */
static void adam_f32(int64_t n, float *p, const float *g, float *m, float *v, const adam_args *a) {
  const float b1 = (float)a->beta1, omb1 = (float)(1.0 - a->beta1), b2 = (float)a->beta2, omb2 = (float)(1.0 - a->beta2);
  const float eps = (float)a->eps, wd = (float)a->wd, decay = (float)(1.0 - a->lr * a->wd);
  const float neg_step = (float)-a->step_size, bc2 = (float)a->bc2_sqrt;
  const int l2 = !a->decoupled && a->wd != 0, dec = a->decoupled && a->wd != 0;
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
  for (int64_t i = 0; i < n; i++) {
    float pi = p[i], gi = g[i];
    if (dec) pi = pi * decay;
    if (l2) gi = gi + wd * pi;
    float mi = m[i] * b1 + omb1 * gi;
    float vi = v[i] * b2 + omb2 * gi * gi;
    float denom = sqrtf(vi) / bc2 + eps;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi + neg_step * mi / denom;
  }
}
static void adam_f64(int64_t n, double *p, const double *g, double *m, double *v, const adam_args *a) {
  const double b1 = a->beta1, omb1 = 1.0 - a->beta1, b2 = a->beta2, omb2 = 1.0 - a->beta2;
  const double eps = a->eps, wd = a->wd, decay = 1.0 - a->lr * a->wd, neg_step = -a->step_size, bc2 = a->bc2_sqrt;
  const int l2 = !a->decoupled && a->wd != 0, dec = a->decoupled && a->wd != 0;
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
  for (int64_t i = 0; i < n; i++) {
    double pi = p[i], gi = g[i];
    if (dec) pi = pi * decay;
    if (l2) gi = gi + wd * pi;
    double mi = m[i] * b1 + omb1 * gi;
    double vi = v[i] * b2 + omb2 * gi * gi;
    double denom = sqrt(vi) / bc2 + eps;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi + neg_step * mi / denom;
  }
}

int fa_adam_step(fa_tensor *param, const fa_tensor *grad, fa_tensor *exp_avg, fa_tensor *exp_avg_sq, double lr,
                 double beta1, double beta2, double eps, double weight_decay, int decoupled, int64_t step) {
  static const char *fn = "fa_adam_step";
  int rc;
  if ((rc = check_param(fn, param)) || (rc = check_flat(fn, "grad", grad, param)) ||
      (rc = check_flat(fn, "exp_avg", exp_avg, param)) || (rc = check_flat(fn, "exp_avg_sq", exp_avg_sq, param)) ||
      (rc = check_range(fn, "lr", lr, 0, 0, "a finite learning rate >= 0")) ||
      (rc = check_range(fn, "beta1", beta1, 0, 1, "a number in [0, 1)")) ||
      (rc = check_range(fn, "beta2", beta2, 0, 1, "a number in [0, 1)")) ||
      (rc = check_range(fn, "eps", eps, 0, 0, "a finite eps >= 0")) ||
      (rc = check_range(fn, "weight_decay", weight_decay, 0, 0, "a finite weight_decay >= 0")))
    return rc;
  if (step < 1) return fa_error(FA_ERR_ARG, "%s: argument 'step': expected a step count >= 1 (the first step is 1), got %lld", fn,
                                (long long)step);
  int64_t n = fa_numel(param);
  if (n == 0) return 0;
  if (param->device >= 0)
    return fa_cu_adam_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, step);
  adam_args a;
  a.lr = lr; a.beta1 = beta1; a.beta2 = beta2; a.eps = eps; a.wd = weight_decay; a.decoupled = decoupled != 0;
  a.step_size = lr / (1.0 - pow(beta1, (double)step));   /* Python floats, as in torch.optim */
  a.bc2_sqrt = sqrt(1.0 - pow(beta2, (double)step));
  if (param->dtype == FA_FLOAT32)
    adam_f32(n, param->data, grad->data, exp_avg->data, exp_avg_sq->data, &a);
  else
    adam_f64(n, param->data, grad->data, exp_avg->data, exp_avg_sq->data, &a);
  return 0;
}
