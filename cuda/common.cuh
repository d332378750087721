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
