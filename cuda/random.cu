// random.cu: fa_cu_uniform and fa_cu_normal with the CPU's counter scheme (c/random.c): element i (in
// row-major order, whatever the strides) draws Philox4x32-10 at counter offset + i under key seed, and the
// bits become a number by the same double-precision formulas, so the CPU and the GPU give the same numbers
// for the same (seed, offset). The double arithmetic uses explicitly rounded operations so that nvcc does
// not contract it into FMAs (the CPU build has none). normal uses CUDA's double log/cos, which may differ
// from glibc's in the last bit of a double: invisible after rounding to float32 but for rare ties.
//
// out: any shape and strides; float32, float64, bfloat16 or float16.
#include "common.cuh"

enum { RNG_THREADS = 256 };

template <typename T> __device__ __forceinline__ void store_d(T *p, double v) { *p = fa_from_f<T>(__double2float_rn(v)); }
template <> __device__ __forceinline__ void store_d<float>(float *p, double v) { *p = __double2float_rn(v); }
template <> __device__ __forceinline__ void store_d<double>(double *p, double v) { *p = v; }

// uniform [0, 1) in double: 24 bits for the float types, 53 for float64 (fa_u64_to_unit_double)
template <typename T> __device__ __forceinline__ double unit(const uint32_t r[4]) { return (double)fa_cu_u32_to_unit_float(r[0]); }
template <> __device__ __forceinline__ double unit<double>(const uint32_t r[4]) {
  return (double)(((((uint64_t)r[0]) << 32) | r[1]) >> 11) * (1.0 / 9007199254740992.0);
}

// normal == 0: lo + (hi - lo) * u, with a = lo, b = hi - lo
// normal == 1: mean + std * z, with a = mean, b = std, z by Box-Muller on (r0, r1)
template <typename T, int NORMAL, typename I>
__global__ void __launch_bounds__(RNG_THREADS) k_random(int64_t n, fa_cu_iter<1> it, T *out, double a, double b, uint64_t seed,
                                                        uint64_t offset) {
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    uint32_t r[4];
    fa_cu_philox(seed, offset + (uint64_t)i, r);
    double v;
    if (NORMAL) {
      double u1 = __dmul_rn((double)r[0] + 1.0, 1.0 / 4294967296.0); // (0, 1]
      double u2 = __dmul_rn((double)r[1], 1.0 / 4294967296.0);
      double z = __dmul_rn(sqrt(__dmul_rn(-2.0, log(u1))), cos(__dmul_rn(6.283185307179586, u2)));
      v = __dadd_rn(a, __dmul_rn(b, z));
    } else {
      v = __dadd_rn(a, __dmul_rn(b, unit<T>(r)));
    }
    int64_t off[1];
    fa_cu_iter_offsets<I, 1>(it, i, off);
    store_d<T>(out + off[0], v);
  }
}

template <typename T, int NORMAL> static int launch(fa_tensor *out, double a, double b, uint64_t seed, uint64_t offset) {
  const int dev = out->device;
  const int64_t n = fa_numel(out);
  if (n == 0) return 0;
  const fa_tensor *ts[1] = {out};
  fa_cu_iter<1> it = fa_cu_iter_make<1>(ts);
  cudaStream_t st = fa_cu_stream(dev);
  unsigned blocks = fa_cu_blocks(n, RNG_THREADS, dev);
  if (n < ((int64_t)1 << 32)) k_random<T, NORMAL, uint32_t><<<blocks, RNG_THREADS, 0, st>>>(n, it, (T *)out->data, a, b, seed, offset);
  else k_random<T, NORMAL, int64_t><<<blocks, RNG_THREADS, 0, st>>>(n, it, (T *)out->data, a, b, seed, offset);
  return fa_cu_launch_check(NORMAL ? "fa_normal" : "fa_uniform");
}

template <int NORMAL> static int dispatch(fa_tensor *out, double a, double b, uint64_t seed, uint64_t offset) {
  switch (out->dtype) {
    case FA_FLOAT32: return launch<float, NORMAL>(out, a, b, seed, offset);
    case FA_FLOAT64: return launch<double, NORMAL>(out, a, b, seed, offset);
    case FA_BFLOAT16: return launch<__nv_bfloat16, NORMAL>(out, a, b, seed, offset);
    case FA_FLOAT16: return launch<__half, NORMAL>(out, a, b, seed, offset);
  }
  return fa_error(FA_ERR_ARG, "%s: argument 'out': expected a floating-point tensor, got %s", NORMAL ? "fa_normal" : "fa_uniform",
                  fa_dtype_name(out->dtype));
}

int fa_cu_uniform(fa_tensor *out, double lo, double hi, uint64_t seed, uint64_t offset) {
  return dispatch<0>(out, lo, hi - lo, seed, offset);
}
int fa_cu_normal(fa_tensor *out, double mean, double std, uint64_t seed, uint64_t offset) {
  return dispatch<1>(out, mean, std, seed, offset);
}
