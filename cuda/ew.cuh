// ew.cuh: the generic elementwise launcher of cuda/elementwise.cu and cuda/optim.cu.
//
// ew_launch<T, NI, NO>(fn, outs, ins, op) runs op over every element of NO output and NI input tensors of
// one shape (any strides, stride 0 = broadcast), all of storage type T, with arithmetic in EwMath<T>::M
// (float for the float types, int64 for the integer ones). Three kernels, picked on the host:
//   - every tensor contiguous and 16-byte aligned: 16-byte vector loads/stores (4 floats, 8 halves);
//   - contiguous but misaligned (a narrowed view): the same loop with scalar accesses;
//   - otherwise: one offset computation per element over the host-merged geometry (fa_cu_iter).
// op is a functor with `__device__ void operator()(const M (&in)[NI], M (&out)[NO]) const`.
#pragma once
#include "common.cuh"

template <typename T> struct EwMath { typedef float M; };
template <> struct EwMath<double> { typedef double M; };
template <> struct EwMath<int32_t> { typedef int64_t M; };
template <> struct EwMath<int64_t> { typedef int64_t M; };

template <typename T> __device__ __forceinline__ typename EwMath<T>::M ew_load(T v) { return fa_to_f<T>(v); }
template <> __device__ __forceinline__ double ew_load<double>(double v) { return v; }
template <> __device__ __forceinline__ int64_t ew_load<int32_t>(int32_t v) { return v; }
template <> __device__ __forceinline__ int64_t ew_load<int64_t>(int64_t v) { return v; }
template <typename T> __device__ __forceinline__ T ew_store(typename EwMath<T>::M v) { return fa_from_f<T>(v); }
template <> __device__ __forceinline__ double ew_store<double>(double v) { return v; }
template <> __device__ __forceinline__ int32_t ew_store<int32_t>(int64_t v) { return (int32_t)(uint32_t)(uint64_t)v; } // wraps
template <> __device__ __forceinline__ int64_t ew_store<int64_t>(int64_t v) { return v; }

template <typename T, int NI, int NO> struct EwPtrs {
  const T *in[NI > 0 ? NI : 1];
  T *out[NO];
};

enum { EW_THREADS = 256 };

// contiguous, 16-byte aligned: V elements per access, then a scalar tail
template <typename T, int NI, int NO, typename Op>
__global__ void __launch_bounds__(EW_THREADS) k_ew_vec(int64_t n, EwPtrs<T, NI, NO> p, Op op) {
  typedef typename EwMath<T>::M M;
  constexpr int V = 16 / sizeof(T);
  const int64_t nv = n / V, step = (int64_t)gridDim.x * blockDim.x;
  const int64_t t0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  for (int64_t v = t0; v < nv; v += step) {
    alignas(16) T xin[NI > 0 ? NI : 1][V];
    alignas(16) T xout[NO][V];
#pragma unroll
    for (int k = 0; k < NI; k++) *reinterpret_cast<uint4 *>(xin[k]) = *reinterpret_cast<const uint4 *>(p.in[k] + v * V); // plain load: out may alias in
#pragma unroll
    for (int j = 0; j < V; j++) {
      M a[NI > 0 ? NI : 1], r[NO];
#pragma unroll
      for (int k = 0; k < NI; k++) a[k] = ew_load<T>(xin[k][j]);
      op(a, r);
#pragma unroll
      for (int k = 0; k < NO; k++) xout[k][j] = ew_store<T>(r[k]);
    }
#pragma unroll
    for (int k = 0; k < NO; k++) *reinterpret_cast<uint4 *>(p.out[k] + v * V) = *reinterpret_cast<const uint4 *>(xout[k]);
  }
  for (int64_t i = nv * V + t0; i < n; i += step) {
    M a[NI > 0 ? NI : 1], r[NO];
#pragma unroll
    for (int k = 0; k < NI; k++) a[k] = ew_load<T>(p.in[k][i]);
    op(a, r);
#pragma unroll
    for (int k = 0; k < NO; k++) p.out[k][i] = ew_store<T>(r[k]);
  }
}

// contiguous, any alignment
template <typename T, int NI, int NO, typename Op>
__global__ void __launch_bounds__(EW_THREADS) k_ew_flat(int64_t n, EwPtrs<T, NI, NO> p, Op op) {
  typedef typename EwMath<T>::M M;
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    M a[NI > 0 ? NI : 1], r[NO];
#pragma unroll
    for (int k = 0; k < NI; k++) a[k] = ew_load<T>(p.in[k][i]);
    op(a, r);
#pragma unroll
    for (int k = 0; k < NO; k++) p.out[k][i] = ew_store<T>(r[k]);
  }
}

// strided: iterator tensors are the outputs then the inputs
template <typename T, int NI, int NO, typename Op, typename I>
__global__ void __launch_bounds__(EW_THREADS) k_ew_strided(int64_t n, fa_cu_iter<NI + NO> it, EwPtrs<T, NI, NO> p, Op op) {
  typedef typename EwMath<T>::M M;
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    int64_t off[NI + NO];
    fa_cu_iter_offsets<I, NI + NO>(it, i, off);
    M a[NI > 0 ? NI : 1], r[NO];
#pragma unroll
    for (int k = 0; k < NI; k++) a[k] = ew_load<T>(p.in[k][off[NO + k]]);
    op(a, r);
#pragma unroll
    for (int k = 0; k < NO; k++) p.out[k][off[k]] = ew_store<T>(r[k]);
  }
}

// outs[NO], ins[NI]: descriptors of one shape (checked by the entry); data pointers must be of type T
template <typename T, int NI, int NO, typename Op>
static int ew_launch(const char *fn, const fa_tensor *const *outs, const fa_tensor *const *ins, Op op) {
  const int device = outs[0]->device;
  const int64_t n = fa_numel(outs[0]);
  if (n == 0) return 0;
  cudaStream_t st = fa_cu_stream(device);
  EwPtrs<T, NI, NO> p;
  int contig = 1, aligned = 1;
  for (int k = 0; k < NO; k++) {
    p.out[k] = (T *)outs[k]->data;
    contig &= fa_is_contiguous(outs[k]);
    aligned &= fa_cu_aligned16(outs[k]->data);
  }
  for (int k = 0; k < NI; k++) {
    p.in[k] = (const T *)ins[k]->data;
    contig &= fa_is_contiguous(ins[k]);
    aligned &= fa_cu_aligned16(ins[k]->data);
  }
  if (contig && aligned) {
    constexpr int V = 16 / sizeof(T);
    int64_t work = n / V > 0 ? n / V : n;
    k_ew_vec<T, NI, NO, Op><<<fa_cu_blocks(work, EW_THREADS, device), EW_THREADS, 0, st>>>(n, p, op);
  } else if (contig) {
    k_ew_flat<T, NI, NO, Op><<<fa_cu_blocks(n, EW_THREADS, device), EW_THREADS, 0, st>>>(n, p, op);
  } else {
    const fa_tensor *ts[NI + NO];
    for (int k = 0; k < NO; k++) ts[k] = outs[k];
    for (int k = 0; k < NI; k++) ts[NO + k] = ins[k];
    fa_cu_iter<NI + NO> it = fa_cu_iter_make<NI + NO>(ts);
    if (n < ((int64_t)1 << 32))
      k_ew_strided<T, NI, NO, Op, uint32_t><<<fa_cu_blocks(n, EW_THREADS, device), EW_THREADS, 0, st>>>(n, it, p, op);
    else
      k_ew_strided<T, NI, NO, Op, int64_t><<<fa_cu_blocks(n, EW_THREADS, device), EW_THREADS, 0, st>>>(n, it, p, op);
  }
  return fa_cu_launch_check(fn);
}
