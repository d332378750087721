// optim.cu: the fused optimiser steps (SGD, Adam, AdamW) on the GPU, one elementwise kernel each over the
// flat contiguous buffers (c/optim.c validates and dispatches here).
//
// The arithmetic is c/optim.c's float path operation by operation (scalars prepared in double on the host
// and cast to float where the CPU casts them), with explicitly rounded operations so that nvcc does not
// contract them into FMAs: float32 steps are bit-identical to the CPU's. bfloat16/float16 buffers are read
// into float32, updated, and rounded back to 16 bits.
#include "ew.cuh"
#include <math.h>

// in = (param, grad, buf), out = (param, buf); PyTorch's torch.optim.SGD step:
//   d = grad + wd*param; buf = first ? d : buf*momentum + (1 - dampening)*d;
//   d = nesterov ? d + momentum*buf : buf; param = param + (-lr)*d
struct SgdF {
  float neg_lr, mom, omd, wd;
  int use_wd, use_mom, nesterov, first;
  __device__ __forceinline__ void operator()(const float (&x)[3], float (&r)[2]) const {
    float p = x[0], d = x[1], b = x[2];
    if (use_wd) d = __fadd_rn(d, __fmul_rn(wd, p));
    if (use_mom) {
      b = first ? d : __fadd_rn(__fmul_rn(b, mom), __fmul_rn(omd, d));
      d = nesterov ? __fadd_rn(d, __fmul_rn(mom, b)) : b;
    }
    r[0] = __fadd_rn(p, __fmul_rn(neg_lr, d));
    r[1] = b;
  }
};
// without a momentum buffer: in = (param, grad), out = (param)
struct SgdPlainF {
  float neg_lr, wd;
  int use_wd;
  __device__ __forceinline__ void operator()(const float (&x)[2], float (&r)[1]) const {
    float p = x[0], d = x[1];
    if (use_wd) d = __fadd_rn(d, __fmul_rn(wd, p));
    r[0] = __fadd_rn(p, __fmul_rn(neg_lr, d));
  }
};

template <typename T>
static int sgd_t(fa_tensor *param, const fa_tensor *grad, fa_tensor *buf, double lr, double momentum, double dampening,
                 double wd, int nesterov, int first) {
  static const char *fn = "fa_sgd_step";
  if (momentum != 0) {
    SgdF f{(float)-lr, (float)momentum, (float)(1.0 - dampening), (float)wd, wd != 0, 1, nesterov != 0, first != 0};
    const fa_tensor *o[2] = {param, buf}, *in[3] = {param, grad, buf};
    return ew_launch<T, 3, 2>(fn, o, in, f);
  }
  SgdPlainF f{(float)-lr, (float)wd, wd != 0};
  const fa_tensor *o[1] = {param}, *in[2] = {param, grad};
  return ew_launch<T, 2, 1>(fn, o, in, f);
}

int fa_cu_sgd_step(fa_tensor *param, const fa_tensor *grad, fa_tensor *momentum_buf, double lr, double momentum,
                   double dampening, double weight_decay, int nesterov, int first) {
  switch (param->dtype) {
    case FA_FLOAT32: return sgd_t<float>(param, grad, momentum_buf, lr, momentum, dampening, weight_decay, nesterov, first);
    case FA_BFLOAT16: return sgd_t<__nv_bfloat16>(param, grad, momentum_buf, lr, momentum, dampening, weight_decay, nesterov, first);
    case FA_FLOAT16: return sgd_t<__half>(param, grad, momentum_buf, lr, momentum, dampening, weight_decay, nesterov, first);
  }
  return fa_error(FA_ERR_UNSUPPORTED, "fa_sgd_step: dtype %s is not supported on CUDA", fa_dtype_name(param->dtype));
}

// in = (param, grad, m, v), out = (param, m, v); PyTorch's single-tensor Adam / AdamW, step t:
//   AdamW: param = param*(1 - lr*wd)        Adam: g = grad + wd*param
//   m = m*b1 + (1 - b1)*g;  v = v*b2 + ((1 - b2)*g)*g
//   denom = sqrt(v)/sqrt(1 - b2^t) + eps;  param = param + ((-lr/(1 - b1^t))*m)/denom
struct AdamF {
  float b1, omb1, b2, omb2, eps, wd, decay, neg_step, bc2;
  int l2, dec;
  __device__ __forceinline__ void operator()(const float (&x)[4], float (&r)[3]) const {
    float p = x[0], g = x[1];
    if (dec) p = __fmul_rn(p, decay);
    if (l2) g = __fadd_rn(g, __fmul_rn(wd, p));
    float m = __fadd_rn(__fmul_rn(x[2], b1), __fmul_rn(omb1, g));
    float v = __fadd_rn(__fmul_rn(x[3], b2), __fmul_rn(__fmul_rn(omb2, g), g));
    float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2), eps);
    r[0] = __fadd_rn(p, __fdiv_rn(__fmul_rn(neg_step, m), denom));
    r[1] = m;
    r[2] = v;
  }
};

template <typename T> static int adam_t(fa_tensor *param, const fa_tensor *grad, fa_tensor *m, fa_tensor *v, const AdamF &f) {
  const fa_tensor *o[3] = {param, m, v}, *in[4] = {param, grad, m, v};
  return ew_launch<T, 4, 3>("fa_adam_step", o, in, f);
}

int fa_cu_adam_step(fa_tensor *param, const fa_tensor *grad, fa_tensor *exp_avg, fa_tensor *exp_avg_sq, double lr,
                    double beta1, double beta2, double eps, double weight_decay, int decoupled, int64_t step) {
  decoupled = decoupled != 0;
  double step_size = lr / (1.0 - pow(beta1, (double)step)); // Python floats, as in torch.optim
  double bc2_sqrt = sqrt(1.0 - pow(beta2, (double)step));
  AdamF f;
  f.b1 = (float)beta1;
  f.omb1 = (float)(1.0 - beta1);
  f.b2 = (float)beta2;
  f.omb2 = (float)(1.0 - beta2);
  f.eps = (float)eps;
  f.wd = (float)weight_decay;
  f.decay = (float)(1.0 - lr * weight_decay);
  f.neg_step = (float)-step_size;
  f.bc2 = (float)bc2_sqrt;
  f.l2 = !decoupled && weight_decay != 0;
  f.dec = decoupled && weight_decay != 0;
  switch (param->dtype) {
    case FA_FLOAT32: return adam_t<float>(param, grad, exp_avg, exp_avg_sq, f);
    case FA_BFLOAT16: return adam_t<__nv_bfloat16>(param, grad, exp_avg, exp_avg_sq, f);
    case FA_FLOAT16: return adam_t<__half>(param, grad, exp_avg, exp_avg_sq, f);
  }
  return fa_error(FA_ERR_UNSUPPORTED, "fa_adam_step: dtype %s is not supported on CUDA", fa_dtype_name(param->dtype));
}
