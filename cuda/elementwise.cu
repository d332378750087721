// elementwise.cu: binary arithmetic (a <op> alpha*b), its backward, scale/shift, addcmul and the unary
// functions forward and backward on the GPU (c/elementwise.c validates and dispatches here).
//
// Shapes: every tensor of a call has the same shape (broadcast operands come as stride-0 views), any
// strides. dtypes: float32, bfloat16, float16 (16-bit storage, float32 arithmetic) everywhere; int32 and
// int64 for binary, its backward (add/sub/mul), scale, addcmul and abs/sign/neg/relu.
//
// The float formulas are those of c/elementwise.c evaluated in the same order with explicitly rounded
// operations (__fmul_rn, __fadd_rn, ...), so that nvcc does not contract them into FMAs: add, sub, mul,
// div, scale and addcmul then give float32 results bit-identical to the CPU's. Transcendentals (expf,
// tanhf, erff, logf) are CUDA's, within a few ulp of glibc's.
// Integer arithmetic wraps as on the CPU; integer division by zero, which the CPU reports as an error,
// gives 0 here (checking would need a device-to-host round trip).
#include "ew.cuh"

// ------------------------------------------------------------------ integer helpers (wrapping)
__device__ __forceinline__ int64_t wadd(int64_t a, int64_t b) { return (int64_t)((uint64_t)a + (uint64_t)b); }
__device__ __forceinline__ int64_t wsub(int64_t a, int64_t b) { return (int64_t)((uint64_t)a - (uint64_t)b); }
__device__ __forceinline__ int64_t wmul(int64_t a, int64_t b) { return (int64_t)((uint64_t)a * (uint64_t)b); }
__device__ __forceinline__ int64_t tdiv(int64_t a, int64_t b) { return b == 0 ? 0 : (b == -1 ? wsub(0, a) : a / b); }
// double -> int64 truncating toward zero, saturating (NaN gives 0), as sat_i64 in c/elementwise.c
__device__ __forceinline__ int64_t sat_i64(double v) {
  if (v != v) return 0;
  if (v >= 9.2233720368547758e18) return INT64_MAX;
  if (v <= -9.2233720368547758e18) return INT64_MIN;
  return (int64_t)v;
}


// ================================================================== binary forward
// out = a <op> (alpha * b)
struct BinF {
  int op;
  float al;
  __device__ __forceinline__ void operator()(const float (&x)[2], float (&r)[1]) const {
    float ay = __fmul_rn(al, x[1]);
    switch (op) {
      case FA_ADD: r[0] = __fadd_rn(x[0], ay); break;
      case FA_SUB: r[0] = __fsub_rn(x[0], ay); break;
      case FA_MUL: r[0] = __fmul_rn(x[0], ay); break;
      default: r[0] = __fdiv_rn(x[0], ay); break;
    }
  }
};
struct BinI {
  int op;
  int64_t al;
  __device__ __forceinline__ void operator()(const int64_t (&x)[2], int64_t (&r)[1]) const {
    int64_t ay = wmul(al, x[1]);
    switch (op) {
      case FA_ADD: r[0] = wadd(x[0], ay); break;
      case FA_SUB: r[0] = wsub(x[0], ay); break;
      case FA_MUL: r[0] = wmul(x[0], ay); break;
      default: r[0] = tdiv(x[0], ay); break;
    }
  }
};

template <typename T> static int binary_fwd_t(int op, fa_tensor *out, const fa_tensor *a, const fa_tensor *b, double alpha) {
  const fa_tensor *o[1] = {out}, *in[2] = {a, b};
  return ew_launch<T, 2, 1>("fa_binary_forward", o, in, BinF{op, (float)alpha});
}
template <typename T> static int binary_fwd_i(int op, fa_tensor *out, const fa_tensor *a, const fa_tensor *b, double alpha) {
  const fa_tensor *o[1] = {out}, *in[2] = {a, b};
  return ew_launch<T, 2, 1>("fa_binary_forward", o, in, BinI{op, (int64_t)alpha});
}

int fa_cu_binary_forward(int op, fa_tensor *out, const fa_tensor *a, const fa_tensor *b, double alpha) {
  switch (out->dtype) {
    case FA_FLOAT32: return binary_fwd_t<float>(op, out, a, b, alpha);
    case FA_BFLOAT16: return binary_fwd_t<__nv_bfloat16>(op, out, a, b, alpha);
    case FA_FLOAT16: return binary_fwd_t<__half>(op, out, a, b, alpha);
    case FA_INT32: return binary_fwd_i<int32_t>(op, out, a, b, alpha);
    case FA_INT64: return binary_fwd_i<int64_t>(op, out, a, b, alpha);
  }
  return fa_error(FA_ERR_UNSUPPORTED, "fa_binary_forward: dtype %s is not supported on CUDA", fa_dtype_name(out->dtype));
}

// ================================================================== binary backward
// in = (grad_out, a, b); which = 0: grad_a, 1: grad_b, 2: both (out[0] = grad_a, out[1] = grad_b)
//   add: ga = go, gb = go        sub: ga = go, gb = -go
//   mul: ga = go*b, gb = go*a    div: ga = go/b, gb = -go*((a/b)/b)
template <int NO> struct BinBF {
  int op, which;
  __device__ __forceinline__ float ga(float go, float a, float b) const {
    switch (op) {
      case FA_ADD: case FA_SUB: return go;
      case FA_MUL: return __fmul_rn(go, b);
      default: return __fdiv_rn(go, b);
    }
  }
  __device__ __forceinline__ float gb(float go, float a, float b) const {
    switch (op) {
      case FA_ADD: return go;
      case FA_SUB: return -go;
      case FA_MUL: return __fmul_rn(go, a);
      default: return __fmul_rn(-go, __fdiv_rn(__fdiv_rn(a, b), b));
    }
  }
  __device__ __forceinline__ void operator()(const float (&x)[3], float (&r)[NO]) const {
    if (NO == 2) { r[0] = ga(x[0], x[1], x[2]); r[NO - 1] = gb(x[0], x[1], x[2]); }
    else r[0] = which ? gb(x[0], x[1], x[2]) : ga(x[0], x[1], x[2]);
  }
};
template <int NO> struct BinBI {
  int op, which;
  __device__ __forceinline__ int64_t ga(int64_t go, int64_t a, int64_t b) const { return op == FA_MUL ? wmul(go, b) : go; }
  __device__ __forceinline__ int64_t gb(int64_t go, int64_t a, int64_t b) const {
    return op == FA_MUL ? wmul(go, a) : (op == FA_SUB ? wsub(0, go) : go);
  }
  __device__ __forceinline__ void operator()(const int64_t (&x)[3], int64_t (&r)[NO]) const {
    if (NO == 2) { r[0] = ga(x[0], x[1], x[2]); r[NO - 1] = gb(x[0], x[1], x[2]); }
    else r[0] = which ? gb(x[0], x[1], x[2]) : ga(x[0], x[1], x[2]);
  }
};

template <typename T, template <int> class F>
static int binary_bwd_t(int op, fa_tensor *grad_a, fa_tensor *grad_b, const fa_tensor *grad_out, const fa_tensor *a,
                        const fa_tensor *b) {
  static const char *fn = "fa_binary_backward";
  // inputs the op does not read are replaced by grad_out (loaded, never used)
  const fa_tensor *in[3] = {grad_out, a ? a : grad_out, b ? b : grad_out};
  if (grad_a && grad_b) {
    const fa_tensor *o[2] = {grad_a, grad_b};
    return ew_launch<T, 3, 2>(fn, o, in, F<2>{op, 2});
  }
  const fa_tensor *o[1] = {grad_a ? grad_a : grad_b};
  return ew_launch<T, 3, 1>(fn, o, in, F<1>{op, grad_a ? 0 : 1});
}

int fa_cu_binary_backward(int op, fa_tensor *grad_a, fa_tensor *grad_b, const fa_tensor *grad_out, const fa_tensor *a,
                          const fa_tensor *b) {
  if (!grad_a && !grad_b) return 0;
  switch (grad_out->dtype) {
    case FA_FLOAT32: return binary_bwd_t<float, BinBF>(op, grad_a, grad_b, grad_out, a, b);
    case FA_BFLOAT16: return binary_bwd_t<__nv_bfloat16, BinBF>(op, grad_a, grad_b, grad_out, a, b);
    case FA_FLOAT16: return binary_bwd_t<__half, BinBF>(op, grad_a, grad_b, grad_out, a, b);
    case FA_INT32: return binary_bwd_t<int32_t, BinBI>(op, grad_a, grad_b, grad_out, a, b);
    case FA_INT64: return binary_bwd_t<int64_t, BinBI>(op, grad_a, grad_b, grad_out, a, b);
  }
  return fa_error(FA_ERR_UNSUPPORTED, "fa_binary_backward: dtype %s is not supported on CUDA", fa_dtype_name(grad_out->dtype));
}

// ================================================================== scale: out = a*scale + shift
struct ScaleF {
  float sc, sh;
  __device__ __forceinline__ void operator()(const float (&x)[1], float (&r)[1]) const { r[0] = __fadd_rn(__fmul_rn(x[0], sc), sh); }
};
// integers: exact when scale and shift are integers, else through double, truncated (as the CPU)
struct ScaleI {
  int exact;
  int64_t isc, ish;
  double sc, sh;
  __device__ __forceinline__ void operator()(const int64_t (&x)[1], int64_t (&r)[1]) const {
    r[0] = exact ? wadd(wmul(x[0], isc), ish) : sat_i64(__dadd_rn(__dmul_rn((double)x[0], sc), sh));
  }
};
static int integral(double v) { return v == floor(v) && fabs(v) < 9.2e18; }

template <typename T> static int scale_t(fa_tensor *out, const fa_tensor *a, double scale, double shift) {
  const fa_tensor *o[1] = {out}, *in[1] = {a};
  return ew_launch<T, 1, 1>("fa_scale_forward", o, in, ScaleF{(float)scale, (float)shift});
}
template <typename T> static int scale_i(fa_tensor *out, const fa_tensor *a, double scale, double shift) {
  const fa_tensor *o[1] = {out}, *in[1] = {a};
  int exact = integral(scale) && integral(shift);
  ScaleI f{exact, exact ? (int64_t)scale : 0, exact ? (int64_t)shift : 0, scale, shift};
  return ew_launch<T, 1, 1>("fa_scale_forward", o, in, f);
}

int fa_cu_scale_forward(fa_tensor *out, const fa_tensor *a, double scale, double shift) {
  switch (out->dtype) {
    case FA_FLOAT32: return scale_t<float>(out, a, scale, shift);
    case FA_BFLOAT16: return scale_t<__nv_bfloat16>(out, a, scale, shift);
    case FA_FLOAT16: return scale_t<__half>(out, a, scale, shift);
    case FA_INT32: return scale_i<int32_t>(out, a, scale, shift);
    case FA_INT64: return scale_i<int64_t>(out, a, scale, shift);
  }
  return fa_error(FA_ERR_UNSUPPORTED, "fa_scale_forward: dtype %s is not supported on CUDA", fa_dtype_name(out->dtype));
}

// ================================================================== addcmul: out = a + (value*b)*c
struct AddcmulF {
  float v;
  __device__ __forceinline__ void operator()(const float (&x)[3], float (&r)[1]) const {
    r[0] = __fadd_rn(x[0], __fmul_rn(__fmul_rn(v, x[1]), x[2]));
  }
};
struct AddcmulI {
  int64_t v;
  __device__ __forceinline__ void operator()(const int64_t (&x)[3], int64_t (&r)[1]) const {
    r[0] = wadd(x[0], wmul(wmul(v, x[1]), x[2]));
  }
};
template <typename T, typename F>
static int addcmul_t(fa_tensor *out, const fa_tensor *a, const fa_tensor *b, const fa_tensor *c, F f) {
  const fa_tensor *o[1] = {out}, *in[3] = {a, b, c};
  return ew_launch<T, 3, 1>("fa_addcmul_forward", o, in, f);
}

int fa_cu_addcmul_forward(fa_tensor *out, const fa_tensor *a, const fa_tensor *b, const fa_tensor *c, double value) {
  switch (out->dtype) {
    case FA_FLOAT32: return addcmul_t<float>(out, a, b, c, AddcmulF{(float)value});
    case FA_BFLOAT16: return addcmul_t<__nv_bfloat16>(out, a, b, c, AddcmulF{(float)value});
    case FA_FLOAT16: return addcmul_t<__half>(out, a, b, c, AddcmulF{(float)value});
    case FA_INT32: return addcmul_t<int32_t>(out, a, b, c, AddcmulI{(int64_t)value});
    case FA_INT64: return addcmul_t<int64_t>(out, a, b, c, AddcmulI{(int64_t)value});
  }
  return fa_error(FA_ERR_UNSUPPORTED, "fa_addcmul_forward: dtype %s is not supported on CUDA", fa_dtype_name(out->dtype));
}

// ================================================================== unary forward
// the formulas of un_f32 in c/elementwise.c; gelu is the exact (erf) form
__device__ __forceinline__ float un_f32(int op, float x) {
  switch (op) {
    case FA_EXP: return expf(x);
    case FA_LOG: return logf(x);
    case FA_SQRT: return __fsqrt_rn(x);
    case FA_ABS: return fabsf(x);
    case FA_SIGN: return x > 0 ? 1.0f : (x < 0 ? -1.0f : x); // 0 stays 0, NaN stays NaN
    case FA_NEG: return -x;
    case FA_RELU: return x < 0 ? 0.0f : x;                  // NaN propagates
    case FA_TANH: return tanhf(x);
    case FA_SIGMOID: return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-x)));
    default: return __fmul_rn(__fmul_rn(x, 0.5f), __fadd_rn(1.0f, erff(__fmul_rn(x, 0.70710678118654752f))));
  }
}
struct UnF {
  int op;
  __device__ __forceinline__ void operator()(const float (&x)[1], float (&r)[1]) const { r[0] = un_f32(op, x[0]); }
};
struct UnI {
  int op;
  __device__ __forceinline__ void operator()(const int64_t (&x)[1], int64_t (&r)[1]) const {
    int64_t v = x[0];
    switch (op) {
      case FA_ABS: r[0] = v < 0 ? wsub(0, v) : v; break;
      case FA_SIGN: r[0] = (v > 0) - (v < 0); break;
      case FA_NEG: r[0] = wsub(0, v); break;
      default: r[0] = v < 0 ? 0 : v; break; // relu
    }
  }
};
template <typename T, typename F> static int unary_fwd_t(fa_tensor *out, const fa_tensor *x, F f) {
  const fa_tensor *o[1] = {out}, *in[1] = {x};
  return ew_launch<T, 1, 1>("fa_unary_forward", o, in, f);
}

int fa_cu_unary_forward(int op, fa_tensor *out, const fa_tensor *x) {
  switch (out->dtype) {
    case FA_FLOAT32: return unary_fwd_t<float>(out, x, UnF{op});
    case FA_BFLOAT16: return unary_fwd_t<__nv_bfloat16>(out, x, UnF{op});
    case FA_FLOAT16: return unary_fwd_t<__half>(out, x, UnF{op});
    case FA_INT32: return unary_fwd_t<int32_t>(out, x, UnI{op});
    case FA_INT64: return unary_fwd_t<int64_t>(out, x, UnI{op});
  }
  return fa_error(FA_ERR_UNSUPPORTED, "fa_unary_forward: dtype %s is not supported on CUDA", fa_dtype_name(out->dtype));
}

// ================================================================== unary backward
// grad_x = f'(x) * grad_y, v = y (the forward output) when from_y else x; as ungrad_f32 in c/elementwise.c:
//   exp: g*y   log: g/x   sqrt: g/(2y)   abs: g*sign(x)   sign: 0   neg: -g   relu: g where v > 0
//   tanh: g*(1 - y^2)   sigmoid: g*(1 - y)*y   gelu: g*(Phi(x) + x*phi(x))
struct UnBF {
  int op, from_y;
  __device__ __forceinline__ void operator()(const float (&x)[2], float (&r)[1]) const {
    float g = x[0], v = x[1], y;
    switch (op) {
      case FA_EXP: r[0] = __fmul_rn(g, from_y ? v : expf(v)); break;
      case FA_LOG: r[0] = __fdiv_rn(g, v); break;
      case FA_SQRT: r[0] = __fdiv_rn(g, __fmul_rn(2.0f, from_y ? v : __fsqrt_rn(v))); break;
      case FA_ABS: r[0] = v > 0 ? g : (v < 0 ? -g : 0.0f); break;
      case FA_SIGN: r[0] = 0.0f; break;
      case FA_NEG: r[0] = -g; break;
      case FA_RELU: r[0] = v > 0 ? g : 0.0f; break;
      case FA_TANH:
        y = from_y ? v : tanhf(v);
        r[0] = __fmul_rn(g, __fsub_rn(1.0f, __fmul_rn(y, y)));
        break;
      case FA_SIGMOID:
        y = from_y ? v : __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-v)));
        r[0] = __fmul_rn(__fmul_rn(g, __fsub_rn(1.0f, y)), y);
        break;
      default: {
        float cdf = __fmul_rn(0.5f, __fadd_rn(1.0f, erff(__fmul_rn(v, 0.70710678118654752f))));
        float pdf = __fmul_rn(expf(__fmul_rn(__fmul_rn(-0.5f, v), v)), 0.3989422804014327f); // 1/sqrt(2 pi)
        r[0] = __fmul_rn(g, __fadd_rn(cdf, __fmul_rn(v, pdf)));
      }
    }
  }
};
template <typename T>
static int unary_bwd_t(int op, fa_tensor *grad_x, const fa_tensor *grad_y, const fa_tensor *v, int from_y) {
  const fa_tensor *o[1] = {grad_x}, *in[2] = {grad_y, v ? v : grad_y};
  return ew_launch<T, 2, 1>("fa_unary_backward", o, in, UnBF{op, from_y});
}

int fa_cu_unary_backward(int op, fa_tensor *grad_x, const fa_tensor *grad_y, const fa_tensor *x, const fa_tensor *y) {
  // the same choice of v as fa_unary_backward (the entry has checked that it exists)
  int can_y = op == FA_EXP || op == FA_SQRT || op == FA_RELU || op == FA_TANH || op == FA_SIGMOID;
  int needs = op != FA_SIGN && op != FA_NEG;
  int from_y = can_y && y != NULL;
  const fa_tensor *v = needs ? (from_y ? y : x) : NULL;
  switch (grad_x->dtype) {
    case FA_FLOAT32: return unary_bwd_t<float>(op, grad_x, grad_y, v, from_y);
    case FA_BFLOAT16: return unary_bwd_t<__nv_bfloat16>(op, grad_x, grad_y, v, from_y);
    case FA_FLOAT16: return unary_bwd_t<__half>(op, grad_x, grad_y, v, from_y);
  }
  return fa_error(FA_ERR_UNSUPPORTED, "fa_unary_backward: dtype %s is not supported on CUDA", fa_dtype_name(grad_x->dtype));
}
