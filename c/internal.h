/* internal.h: helpers shared by the C sources (not part of the public API).
 * Validation helpers set the thread-local error message and return an FA_ERR_* code so that an entry
 * point can write `if ((rc = fa_check_...(...))) return rc;` before any kernel runs. */
#ifndef FA_INTERNAL_H
#define FA_INTERNAL_H
#include "fastattn.h"
#include <string.h>
#include <math.h>
#ifdef __cplusplus
extern "C" {
#endif

/* sets the message (printf-style) and returns code */
int fa_error(int code, const char *fmt, ...)
#ifdef __GNUC__
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void fa_clear_error(void);

static inline int64_t fa_numel(const fa_tensor *t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
  return n;
}
static inline int fa_is_contiguous(const fa_tensor *t) {
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    if (t->shape[i] != 1 && t->stride[i] != s) return 0;
    s *= t->shape[i];
  }
  return 1;
}
static inline int fa_is_float(int dtype) {
  return dtype == FA_FLOAT32 || dtype == FA_FLOAT64 || dtype == FA_BFLOAT16 || dtype == FA_FLOAT16;
}
/* element offset of the i-th element (row-major order) of a strided tensor */
static inline int64_t fa_offset(const fa_tensor *t, int64_t i) {
  int64_t off = 0;
  for (int d = t->ndim - 1; d >= 0; d--) {
    int64_t n = t->shape[d];
    if (n == 0) return 0;
    off += (i % n) * t->stride[d];
    i /= n;
  }
  return off;
}
/* writes "(2, 3, 4)" into buf (a caller-owned buffer of >= 200 bytes); returns buf */
const char *fa_shape_str(const fa_tensor *t, char *buf);
const char *fa_dims_str(const int64_t *shape, int n, char *buf); /* the same for n sizes */
const char *fa_device_str(int device, char *buf);

/* ---- validation: each names the function (fn) and the argument (arg) in its message ---- */
int fa_check_defined(const char *fn, const char *arg, const fa_tensor *t);
/* ndim < 0: any rank */
int fa_check_ndim(const char *fn, const char *arg, const fa_tensor *t, int ndim);
int fa_check_dtype(const char *fn, const char *arg, const fa_tensor *t, int dtype);
/* float32/float64 on the CPU; float32/bfloat16/float16 on CUDA, unless cpu16 etc.: kernels that
 * take every float check with fa_check_float_dtype */
int fa_check_float_dtype(const char *fn, const char *arg, const fa_tensor *t);
int fa_check_same_dtype(const char *fn, const char *arg, const fa_tensor *t, const char *ref_arg, const fa_tensor *ref);
int fa_check_same_device(const char *fn, const char *arg, const fa_tensor *t, const char *ref_arg, const fa_tensor *ref);
int fa_check_same_shape(const char *fn, const char *arg, const fa_tensor *t, const char *ref_arg, const fa_tensor *ref);
int fa_check_contiguous(const char *fn, const char *arg, const fa_tensor *t);
/* t has exactly the n sizes want; what names them in the message, e.g. "(C, 2)" */
int fa_check_shape(const char *fn, const char *arg, const fa_tensor *t, const int64_t *want, int n, const char *what);
/* a result written in place: it must be contiguous */
int fa_check_dense(const char *fn, const char *arg, const fa_tensor *t);
/* t->shape[dim] == size */
int fa_check_dim(const char *fn, const char *arg, const fa_tensor *t, int dim, int64_t size);
/* all three at once: defined, same device and dtype as ref */
int fa_check_like(const char *fn, const char *arg, const fa_tensor *t, const char *ref_arg, const fa_tensor *ref);
/* do two defined tensors share memory? Byte ranges on one device, so interleaved views that share no element
 * count too (a false alarm costs an error or a copy, never a wrong result); NULL or empty: no */
int fa_overlaps(const fa_tensor *a, const fa_tensor *b);
/* an output must not share memory with an input (or another output) it is computed from */
int fa_check_no_overlap(const char *fn, const char *arg, const fa_tensor *out, const char *in_arg, const fa_tensor *in);
/* every pair (outs[i], ins[j]) and (outs[i], outs[j < i]) disjoint (fa_check_no_overlap); NULLs skipped */
int fa_check_no_overlaps(const char *fn, const fa_tensor *const *outs, const char *const *onames, int no,
                         const fa_tensor *const *ins, const char *const *inames, int ni);

/* ---- 16-bit float conversions (round to nearest even) ---- */
static inline float fa_bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t fa_f32_to_bf16(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
float fa_f16_to_f32(uint16_t h);
uint16_t fa_f32_to_f16(float f);

/* ---- strided sums with double accumulators (softmax, criterion). `#pragma omp simd` is lowered before
 * inlining, so a reduction loop vectorises only where its pointer types are fixed: hence a float and a
 * double version. simdlen(8): eight partial sums, so that the adds are not one long dependency chain. */
static inline double fa_sum_f32(const float *p, int64_t s, int64_t n) {
  double t = 0;
#pragma omp simd reduction(+ : t) simdlen(8)
  for (int64_t k = 0; k < n; k++) t += p[k * s];
  return t;
}
static inline double fa_sum_f64(const double *p, int64_t s, int64_t n) {
  double t = 0;
#pragma omp simd reduction(+ : t) simdlen(8)
  for (int64_t k = 0; k < n; k++) t += p[k * s];
  return t;
}

/* ---- OpenMP thread count and id (1 and 0 without OpenMP) */
#ifdef _OPENMP
#include <omp.h>
static inline int fa_max_threads(void) { return omp_get_max_threads(); }
static inline int fa_thread_id(void) { return omp_get_thread_num(); }
#else
static inline int fa_max_threads(void) { return 1; }
static inline int fa_thread_id(void) { return 0; }
#endif

/* ---- threads ---- */
/* below this many elements a CPU kernel runs on one thread */
enum { FA_PARALLEL_GRAIN = 32768 };

/* ---- RNG: Philox4x32-10, counter-based; fills r[4] for (seed, counter) ---- */
void fa_philox(uint64_t seed, uint64_t counter, uint32_t r[4]);
/* uniform in [0, 1) from 32 random bits (float) / from 2x32 (double) */
static inline float fa_u32_to_unit_float(uint32_t x) { return (float)(x >> 8) * (1.0f / 16777216.0f); }
static inline double fa_u64_to_unit_double(uint32_t a, uint32_t b) {
  return (double)((((uint64_t)a << 32) | b) >> 11) * (1.0 / 9007199254740992.0);
}

/* ---- runtime ISA dispatch and vectorisable math for the hot CPU loops ----
 * The library is built without -march (it must run on any x86-64), so plain loops get SSE2 only.
 * FA_HOT_CLONES on a function makes GCC compile it twice, for x86-64-v3 (AVX2, FMA, BMI2) and for the
 * baseline, and pick one at load time (an ifunc). Put it on the non-inlined function that holds a hot
 * loop (not on the OpenMP-outlined body: call a cloned function from it). x86-64-v3 allows FMA
 * contraction: a file that needs results identical across machines adds
 * `#pragma GCC optimize("fp-contract=off")` before its includes. */
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && defined(__x86_64__) && defined(__GLIBC__)
#if __GNUC__ >= 11
#define FA_HOT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
/* also AVX-512 (x86-64-v4): for loops that gain from 16 float lanes (layer norm: 1.2-1.3x on Zen 5) */
#define FA_WIDE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FA_HOT_CLONES __attribute__((target_clones("avx2", "default")))
#define FA_WIDE_CLONES FA_HOT_CLONES
#endif
#else
#define FA_HOT_CLONES
#define FA_WIDE_CLONES
#endif

/* exp for the float32 kernels: Cephes' expf (range reduction by ln 2, degree-6 polynomial; within
 * about 1 ulp from -87.3 to 88.37) in plain arithmetic, so that the loops calling it vectorise
 * (libm's expf is an opaque call). 0 below -87.3 (no subnormal results; exp(-inf) = 0 for masked
 * logits), inf above 88.37, NaN stays NaN. Files that use it in loops compile with -fno-trapping-math
 * (`#pragma GCC optimize("no-trapping-math")` before the includes) so that GCC if-converts the clamps. */
static inline float fa_fast_expf(float x) {
  float xc = x < -87.3f ? -87.3f : (x > 88.37f ? 88.37f : x);
  float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23; /* 2^n */
  float s;
  memcpy(&s, &bits, 4);
  float y = p * s;
  return x < -87.3f ? 0.0f : (x > 88.37f ? INFINITY : y);
}

/* sum_d a[d] * b[d] in a fixed order: 8 interleaved partial sums, then combined pairwise. The order does not
 * depend on the caller (the CPU backwards' bit-identity rests on it); it vectorises. */
static inline double fa_dot_d(const double *a, const double *b, int64_t D) {
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int k = 0; k < 8; k++) s[k] += a[d + k] * b[d + k];
  for (int k = 0; d < D; d++, k++) s[k] += a[d] * b[d];
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

/* ---- copy to contiguous, the one helper for the C entries that want dense inputs: *data = t's data, or a
 * fresh contiguous copy's on t's device (also in *tmp: fa_free(t->device, *tmp) when done). */
static inline int fa_contiguous_data(const fa_tensor *t, const void **data, void **tmp) {
  *tmp = NULL;
  *data = t->data;
  if (fa_is_contiguous(t)) return 0;
  fa_tensor c = *t;
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; i--) { c.stride[i] = s; s *= t->shape[i]; }
  c.data = fa_alloc(t->device, fa_numel(t) * fa_dtype_size(t->dtype));
  if (!c.data) return FA_ERR_MEMORY;
  int rc = fa_copy(&c, t);
  if (rc) { fa_free(t->device, c.data); return rc; }
  *tmp = c.data;
  *data = c.data;
  return 0;
}
/* fa_contiguous_data over n inputs (tmp[i] NULL where no copy was made, also after a failure) */
static inline int fa_dense_inputs(const fa_tensor *const *t, int n, const void **data, void **tmp) {
  int rc = 0;
  for (int i = 0; i < n; i++) tmp[i] = NULL;
  for (int i = 0; i < n && !rc; i++) rc = fa_contiguous_data(t[i], &data[i], &tmp[i]);
  return rc;
}

/* ---- CUDA side: one fa_cu_<op> per public entry, same arguments, called after validation when the
 * tensors are on a GPU. Defined in cuda/<op>.cu; c/cuda_stubs.c defines them when built without CUDA.
 * Ops with a private header (c/msda.h) declare theirs there. */
int fa_cu_alloc(int device, int64_t nbytes, void **ptr);
void fa_cu_free(int device, void *ptr);
int fa_cu_copy(fa_tensor *dst, const fa_tensor *src);           /* any side on a GPU */
int fa_cu_fill(fa_tensor *dst, double value);
int fa_cu_uniform(fa_tensor *out, double lo, double hi, uint64_t seed, uint64_t offset);
int fa_cu_normal(fa_tensor *out, double mean, double std, uint64_t seed, uint64_t offset);
int fa_cu_binary_forward(int op, fa_tensor *out, const fa_tensor *a, const fa_tensor *b, double alpha);
int fa_cu_binary_backward(int op, fa_tensor *grad_a, fa_tensor *grad_b, const fa_tensor *grad_out,
                          const fa_tensor *a, const fa_tensor *b);
int fa_cu_scale_forward(fa_tensor *out, const fa_tensor *a, double scale, double shift);
int fa_cu_addcmul_forward(fa_tensor *out, const fa_tensor *a, const fa_tensor *b, const fa_tensor *c, double value);
int fa_cu_unary_forward(int op, fa_tensor *out, const fa_tensor *x);
int fa_cu_unary_backward(int op, fa_tensor *grad_x, const fa_tensor *grad_y, const fa_tensor *x, const fa_tensor *y);
int fa_cu_reduce_forward(int op, fa_tensor *out, fa_tensor *idx, const fa_tensor *x, int dim);
int fa_cu_reduce_backward(int op, fa_tensor *grad_x, const fa_tensor *grad_out, const fa_tensor *idx, int dim);
int fa_cu_matmul_forward(fa_tensor *out, const fa_tensor *a, const fa_tensor *b, int trans_a, int trans_b,
                         double alpha, double beta);
int fa_cu_linear_forward(fa_tensor *out, const fa_tensor *x, const fa_tensor *weight, const fa_tensor *bias);
int fa_cu_linear_backward(fa_tensor *grad_x, fa_tensor *grad_weight, fa_tensor *grad_bias,
                          const fa_tensor *grad_out, const fa_tensor *x, const fa_tensor *weight);
int fa_cu_conv2d_forward(fa_tensor *out, const fa_tensor *x, const fa_tensor *weight, const fa_tensor *bias,
                         const fa_conv2d_params *p);
int fa_cu_conv2d_backward(fa_tensor *grad_x, fa_tensor *grad_weight, fa_tensor *grad_bias,
                          const fa_tensor *grad_out, const fa_tensor *x, const fa_tensor *weight,
                          const fa_conv2d_params *p);
int fa_cu_layernorm_forward(fa_tensor *out, fa_tensor *mean, fa_tensor *rstd, const fa_tensor *x,
                            const fa_tensor *weight, const fa_tensor *bias, int64_t norm_size, double eps);
int fa_cu_layernorm_backward(fa_tensor *grad_x, fa_tensor *grad_weight, fa_tensor *grad_bias,
                             const fa_tensor *grad_out, const fa_tensor *x, const fa_tensor *mean,
                             const fa_tensor *rstd, const fa_tensor *weight, int64_t norm_size);
int fa_cu_softmax_forward(fa_tensor *out, const fa_tensor *x, int dim, int log);
int fa_cu_softmax_backward(fa_tensor *grad_x, const fa_tensor *grad_out, const fa_tensor *out, int dim, int log);
int fa_cu_dropout_forward(fa_tensor *out, fa_tensor *mask, const fa_tensor *x, double p, uint64_t seed, uint64_t offset);
int fa_cu_dropout_backward(fa_tensor *grad_x, const fa_tensor *grad_out, const fa_tensor *mask, double p);
int fa_cu_grid_sample_forward(fa_tensor *out, const fa_tensor *input, const fa_tensor *grid, int padding, int align_corners);
int fa_cu_grid_sample_backward(fa_tensor *grad_input, fa_tensor *grad_grid, const fa_tensor *grad_out,
                               const fa_tensor *input, const fa_tensor *grid, int padding, int align_corners);
int fa_cu_mse_forward(fa_tensor *loss, const fa_tensor *x, const fa_tensor *target, int reduction);
int fa_cu_mse_backward(fa_tensor *grad_x, const fa_tensor *grad_loss, const fa_tensor *x, const fa_tensor *target,
                       int reduction);
int fa_cu_cross_entropy_forward(fa_tensor *loss, const fa_tensor *logits, const fa_tensor *target,
                                int64_t ignore_index, double label_smoothing, int reduction);
int fa_cu_cross_entropy_backward(fa_tensor *grad_logits, const fa_tensor *grad_loss, const fa_tensor *logits,
                                 const fa_tensor *target, int64_t ignore_index, double label_smoothing, int reduction);
int fa_cu_sgd_step(fa_tensor *param, const fa_tensor *grad, fa_tensor *momentum_buf, double lr, double momentum,
                   double dampening, double weight_decay, int nesterov, int first);
int fa_cu_adam_step(fa_tensor *param, const fa_tensor *grad, fa_tensor *exp_avg, fa_tensor *exp_avg_sq, double lr,
                    double beta1, double beta2, double eps, double weight_decay, int decoupled, int64_t step);
int fa_cu_sumsq(fa_tensor *out, const fa_tensor *x);

#ifdef __cplusplus
}
#endif
#endif
