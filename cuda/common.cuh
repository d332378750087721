// common.cuh: what every cuda/*.cu shares: the per-device stream and cuBLAS handle, error conversion,
// 16-bit loads/stores with float32 arithmetic, strided indexing and launch sizing.
// Defined in cuda/runtime.cu.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cublas_v2.h>
#include <stdint.h>
#include "internal.h"

// The one stream of `device` (created on first use; cudaSetDevice(device) is called too).
cudaStream_t fa_cu_stream(int device);
// cuBLAS handle bound to fa_cu_stream(device), with the TF32 setting of fa_cuda_allow_tf32.
cublasHandle_t fa_cu_blas(int device);
// 1 when fa_cuda_allow_tf32(1) was called
int fa_cu_tf32_allowed(void);
// Turns a CUDA error into FA_ERR_CUDA with "<fn>: CUDA error: <message>"; 0 for cudaSuccess.
int fa_cu_check(cudaError_t e, const char *fn);
// After a launch: checks cudaGetLastError (launch configuration errors), never synchronises.
int fa_cu_launch_check(const char *fn);
int fa_cu_blas_check(cublasStatus_t s, const char *fn);
// Temporary device memory from the caching allocator (stream-ordered reuse is safe: one stream per device).
void *fa_cu_temp_alloc(int device, int64_t nbytes);   // NULL + error message on failure
void fa_cu_temp_free(int device, void *p);
// number of SMs of device (cached)
int fa_cu_sm_count(int device);
// out += sum of x over dim (0-based; -1 = all), out of x's shape with size 1 at dim; any strides, float
// dtypes, deterministic, float32 accumulation (cuda/reduce.cu; for bias gradients)
int fa_cu_sum_into(fa_tensor *out, const fa_tensor *x, int dim);

// GEMM with the bias added in cuBLASLt's epilogue, to the float32 accumulators before the one rounding to
// D's dtype (no separate pass over D; cuda/matmul.cu). Row-major, for b < batch:
//   D_b (m x n, row stride ldd) = op(A_b) (m x k) @ op(B_b) (k x n) + bias
// bias_on_rows = 1: bias[i] (length m) is added to row i; 0: bias[j] (length n) to column j.
// A is stored (m x k) with row stride lda, or (k x m) when ta; B (k x n) with row stride ldb, or (n x k)
// when tb. A_b = A + b * sa elements (sa = 0: one A for every b); likewise B (sb) and D (sd). A, B, D and
// the bias (dense) are of dtype on device. Returns -1 when cuBLASLt cannot do it (nothing is written: the
// caller falls back to another path), else 0 or an error code (with the message naming fn).
int fa_cu_gemm_bias(int device, int dtype, int64_t batch, int64_t m, int64_t n, int64_t k, const void *A, int ta, int64_t lda,
                    int64_t sa, const void *B, int tb, int64_t ldb, int64_t sb, const void *bias, int bias_on_rows, void *D,
                    int64_t ldd, int64_t sd, const char *fn);

// ---- 16-bit storage, float32 arithmetic
template <typename T> __device__ __forceinline__ float fa_to_f(T v) { return (float)v; }
template <> __device__ __forceinline__ float fa_to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float fa_to_f<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T fa_from_f(float v) { return (T)v; }
template <> __device__ __forceinline__ __nv_bfloat16 fa_from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half fa_from_f<__half>(float v) { return __float2half_rn(v); }

// ---- strided access: a by-value copy of the descriptor's geometry for kernels
struct fa_cu_geom {
  int ndim;
  int64_t shape[FA_MAX_DIMS], stride[FA_MAX_DIMS];
};
static inline fa_cu_geom fa_cu_geom_of(const fa_tensor *t) {
  fa_cu_geom g;
  g.ndim = t->ndim;
  for (int i = 0; i < FA_MAX_DIMS; i++) { g.shape[i] = i < t->ndim ? t->shape[i] : 1; g.stride[i] = i < t->ndim ? t->stride[i] : 0; }
  return g;
}
// element offset of the i-th element in row-major order
__device__ __forceinline__ int64_t fa_cu_offset(const fa_cu_geom &g, int64_t i) {
  int64_t off = 0;
  for (int d = g.ndim - 1; d >= 0; d--) {
    int64_t n = g.shape[d];
    off += (i % n) * g.stride[d];
    i /= n;
  }
  return off;
}

// ---- launch sizing: a grid-stride loop over n elements
static inline unsigned fa_cu_blocks(int64_t n, int threads, int device) {
  int64_t b = (n + threads - 1) / threads;
  int64_t cap = (int64_t)fa_cu_sm_count(device) * 32;
  if (b > cap) b = cap;
  if (b < 1) b = 1;
  return (unsigned)b;
}

// ---- multi-tensor strided iteration (added by the runtime engineer; used by copy/elementwise/optim)
// N tensors of the same shape walked in row-major order; dims that are contiguous in every tensor are merged
// on the host (fa_cu_iter_make) so a broadcast add of (B, C) + (C) walks 2 dims, not 8.
template <int N> struct fa_cu_iter {
  int ndim;
  int64_t shape[FA_MAX_DIMS];
  int64_t stride[N][FA_MAX_DIMS];
};
// ts[k] must all have ts[0]'s number of elements; shapes are taken from ts[0] (callers pass same-shaped
// tensors or contiguous ones, whose strides are recomputed from ts[0]'s shape when shapes differ).
template <int N> static inline fa_cu_iter<N> fa_cu_iter_make(const fa_tensor *const *ts) {
  fa_cu_iter<N> it;
  const fa_tensor *t0 = ts[0];
  int64_t shape[FA_MAX_DIMS], stride[N][FA_MAX_DIMS];
  int nd = t0->ndim;
  for (int d = 0; d < nd; d++) shape[d] = t0->shape[d];
  for (int k = 0; k < N; k++) {
    const fa_tensor *t = ts[k];
    int same = t->ndim == nd;
    for (int d = 0; same && d < nd; d++) same = t->shape[d] == shape[d];
    if (same) {
      for (int d = 0; d < nd; d++) stride[k][d] = t->stride[d];
    } else { // contiguous with another shape (validated by the entry): row-major strides of shape
      int64_t s = 1;
      for (int d = nd - 1; d >= 0; d--) { stride[k][d] = s; s *= shape[d]; }
    }
  }
  // drop size-1 dims, merge an outer dim into the next inner one when every tensor allows it
  int m = 0;
  for (int d = 0; d < nd; d++) {
    if (shape[d] == 1) continue;
    if (m > 0) {
      int ok = 1;
      for (int k = 0; k < N && ok; k++) ok = it.stride[k][m - 1] == stride[k][d] * shape[d];
      if (ok) {
        it.shape[m - 1] *= shape[d];
        for (int k = 0; k < N; k++) it.stride[k][m - 1] = stride[k][d];
        continue;
      }
    }
    it.shape[m] = shape[d];
    for (int k = 0; k < N; k++) it.stride[k][m] = stride[k][d];
    m++;
  }
  it.ndim = m;
  for (int d = m; d < FA_MAX_DIMS; d++) {
    it.shape[d] = 1;
    for (int k = 0; k < N; k++) it.stride[k][d] = 0;
  }
  return it;
}
// offsets of the i-th element in each tensor; I = uint32_t when numel < 2^32 (cheaper divisions)
template <typename I, int N>
__device__ __forceinline__ void fa_cu_iter_offsets(const fa_cu_iter<N> &it, int64_t i64, int64_t (&off)[N]) {
  I i = (I)i64;
#pragma unroll
  for (int k = 0; k < N; k++) off[k] = 0;
  for (int d = it.ndim - 1; d >= 0; d--) {
    I n = (I)it.shape[d];
    I q = i / n, r = i - q * n;
    i = q;
#pragma unroll
    for (int k = 0; k < N; k++) off[k] += (int64_t)r * it.stride[k][d];
  }
}

// ---- Philox4x32-10, bit-identical to fa_philox in c/random.c: counter (lo, hi, 0, 0), key = seed
__device__ __forceinline__ void fa_cu_philox(uint64_t seed, uint64_t counter, uint32_t r[4]) {
  uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#pragma unroll
  for (int i = 0; i < 10; i++) {
    uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c1 = lo1; c3 = lo0; c0 = n0; c2 = n2;
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
  r[0] = c0; r[1] = c1; r[2] = c2; r[3] = c3;
}
// uniform in [0, 1) from 32 bits, as fa_u32_to_unit_float
__device__ __forceinline__ float fa_cu_u32_to_unit_float(uint32_t x) { return (float)(x >> 8) * (1.0f / 16777216.0f); }

// ---- warp reductions
__device__ __forceinline__ float fa_cu_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float fa_cu_warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// 1 when every pointer is 16-byte aligned (vector loads allowed)
static inline int fa_cu_aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

// ---- float dtype dispatch of an entry point: `call` (a template call using T) returned for float32,
// bfloat16 and float16; other dtypes are FA_ERR_UNSUPPORTED with "<fn>: dtype <name> is not supported on CUDA"
#define FA_CU_FLOAT_DISPATCH(fn, dtype, call)                                                                      \
  switch (dtype) {                                                                                                \
    case FA_FLOAT32: { typedef float T; return call; }                                                             \
    case FA_BFLOAT16: { typedef __nv_bfloat16 T; return call; }                                                    \
    case FA_FLOAT16: { typedef __half T; return call; }                                                            \
  }                                                                                                               \
  return fa_error(FA_ERR_UNSUPPORTED, "%s: dtype %s is not supported on CUDA", fn, fa_dtype_name(dtype));
