// dense.cuh: helpers shared by the kernels that want dense operands and walk rows (conv2d, layernorm,
// softmax, criterion): dense stand-ins for strided views, 16-byte vector loads/stores with float32
// arithmetic, the warp-per-row sizing, and the running (max, sum of exp) of a softmax.
#pragma once
#include "common.cuh"
#include <string.h>

// A dense stand-in for a tensor that may be a strided view. Inputs: the view itself when contiguous, else a
// dense copy. Outputs: computed into a temporary that finish() copies back. NULL stays NULL.
struct DenseView {
  fa_tensor t;
  fa_tensor *dst = nullptr;
  void *buf = nullptr;
  int dev = 0;
  DenseView() { memset(&t, 0, sizeof t); }
  DenseView(const DenseView &) = delete;
  ~DenseView() { if (buf) fa_cu_temp_free(dev, buf); }
  int alloc_like(const fa_tensor *x) {
    t = *x;
    dev = x->device;
    int64_t s = 1;
    for (int d = t.ndim - 1; d >= 0; d--) { t.stride[d] = s; s *= t.shape[d]; }
    if (!(buf = fa_cu_temp_alloc(dev, (s > 0 ? s : 1) * fa_dtype_size(t.dtype)))) return FA_ERR_MEMORY;
    t.data = buf;
    return 0;
  }
  int in(const fa_tensor *x) {
    if (!x) return 0;
    if (fa_is_contiguous(x)) { t = *x; return 0; }
    int rc = alloc_like(x);
    return rc ? rc : fa_copy(&t, x);
  }
  int out(fa_tensor *x) {
    if (!x) return 0;
    if (fa_is_contiguous(x)) { t = *x; return 0; }
    dst = x;
    return alloc_like(x);
  }
  int finish() { return dst ? fa_copy(dst, &t) : 0; }
  template <typename T> T *p() const { return (T *)t.data; }
};

// ---- VEC elements in one load/store (16 bytes when VEC = 16 / sizeof(T); p aligned to sizeof(T) * VEC)
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };
template <typename T, int VEC> __device__ __forceinline__ void load_vec(float (&f)[VEC], const T *p) {
  Pack<T, VEC> k = *reinterpret_cast<const Pack<T, VEC> *>(p);
#pragma unroll
  for (int e = 0; e < VEC; e++) f[e] = fa_to_f<T>(k.v[e]);
}
template <typename T, int VEC> __device__ __forceinline__ void store_vec(T *p, const float (&f)[VEC]) {
  Pack<T, VEC> k;
#pragma unroll
  for (int e = 0; e < VEC; e++) k.v[e] = fa_from_f<T>(f[e]);
  *reinterpret_cast<Pack<T, VEC> *>(p) = k;
}

// ---- warp-per-row kernels: each lane holds NV * VEC values of a row of n
// NV: the smallest power of two up to max_nv that covers n, 0 when none does (a block per row instead)
static inline int pick_nv(int64_t n, int vec, int max_nv) {
  for (int nv = 1; nv <= max_nv; nv *= 2)
    if ((int64_t)32 * vec * nv >= n) return nv;
  return 0;
}
// 1 when 16-byte vectors fit: n a multiple of 16 / sizeof(T) and every non-NULL ptrs[i] 16-byte aligned,
// so that every row of n elements starts aligned
template <typename T> static inline int vec_ok(int64_t n, const void *const *ptrs, int k) {
  const int V = 16 / (int)sizeof(T);
  if (n % V) return 0;
  for (int i = 0; i < k; i++)
    if (ptrs[i] && !fa_cu_aligned16(ptrs[i])) return 0;
  return 1;
}

// ---- running (max, sum of exp(x - max)) of a softmax; a -inf max contributes nothing (an all -inf line
// gives NaN, as the CPU), NaN propagates
__device__ __forceinline__ void online_add(float &m, float &s, float v) {
  if (v > m) { s = s * expf(m - v) + 1.f; m = v; }
  else if (m != -INFINITY) s += expf(v - m);
  else if (v != v) { m = v; s = v; }
}
__device__ __forceinline__ void online_merge(float &m, float &s, float m2, float s2) {
  float mm = fmaxf(m, m2);
  if (m != m || m2 != m2) { m = s = m + m2; return; }
  if (mm == -INFINITY) return;
  s = (m == -INFINITY ? 0.f : s * expf(m - mm)) + (m2 == -INFINITY ? 0.f : s2 * expf(m2 - mm));
  m = mm;
}

// ---- the temporaries of one call on `dev`, freed on every exit path (msda, grid_sample)
struct Temps {
  int dev;
  void *p[16] = {nullptr};
  int n = 0;
  explicit Temps(int d) : dev(d) {}
  Temps(const Temps &) = delete;
  ~Temps() { for (int i = 0; i < n; i++) fa_cu_temp_free(dev, p[i]); }
  // NULL (and the error message) when out of memory or of slots
  void *get(int64_t bytes) {
    if (n == 16) { fa_error(FA_ERR_MEMORY, "Temps: more than 16 temporaries"); return nullptr; }
    void *q = fa_cu_temp_alloc(dev, bytes > 0 ? bytes : 16);
    if (q) p[n++] = q;
    return q;
  }
};
