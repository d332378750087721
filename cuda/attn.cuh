// attn.cuh: the pieces of a flash-style attention that every attention kernel shares (cuda/attention.cu now,
// deform_sdpa later): batch offsets of a fa_attn_strides, the exp2-domain online softmax, the log-sum-exp of a
// finished row, dropout's Philox keep test (c/attention.h's indexing) and rowsum(dO * O) of the backward.
#pragma once
#include "common.cuh"
#include "attention.h"

constexpr float FA_ATTN_LOG2E = 1.4426950408889634f;
constexpr float FA_ATTN_LN2 = 0.6931471805599453f;

// Coordinates of the linear batch index z over g->bs (row-major), taken apart once per CTA.
struct FaAttnBatch {
  int64_t c[FA_ATTN_MAX_BATCH];
};
__device__ __forceinline__ FaAttnBatch fa_attn_batch(const fa_attn_geom &g, int64_t z) {
  FaAttnBatch b;
#pragma unroll
  for (int d = FA_ATTN_MAX_BATCH - 1; d >= 0; d--) {
    if (d < g.nb) {
      b.c[d] = z % g.bs[d];
      z /= g.bs[d];
    } else {
      b.c[d] = 0;
    }
  }
  return b;
}
// element offset of (z, h, row) in a tensor with strides s (64-bit: B*H*N*N*D passes 2^32 at N = 4096)
__device__ __forceinline__ int64_t fa_attn_off(const fa_attn_strides &s, const FaAttnBatch &b, int64_t h, int64_t row) {
  int64_t o = h * s.h + row * s.r;
#pragma unroll
  for (int d = 0; d < FA_ATTN_MAX_BATCH; d++) o += b.c[d] * s.b[d];
  return o;
}

// ---- online softmax in the exp2 domain (scores already multiplied by log2 e). A row that has seen only
// left-out keys keeps m = -inf and l = 0; its exponentials are 0 (never exp2(-inf - -inf) = NaN).
// Moves the running max m to max(m, tile_max) and returns the factor that rescales what was accumulated.
__device__ __forceinline__ float fa_attn_rescale(float &m, float tile_max) {
  const float mn = fmaxf(m, tile_max);
  const float a = mn == -INFINITY ? 1.f : exp2f(m - mn);
  m = mn;
  return a;
}
// exp2(x - m) with the convention above
__device__ __forceinline__ float fa_attn_exp(float x, float m) { return m == -INFINITY ? 0.f : exp2f(x - m); }
// natural log-sum-exp of a finished row from (m, l): -inf when every key was left out (or Lk = 0)
__device__ __forceinline__ float fa_attn_lse(float m, float l) {
  return l > 0.f ? (m + log2f(l)) * FA_ATTN_LN2 : -INFINITY;
}

// ---- dropout (c/attention.h): weight e = ((z*H + h)*Lq + i)*Lk + j is kept when u(e) >= p
__device__ __forceinline__ bool fa_attn_keep(uint64_t seed, uint64_t offset, int64_t e, float p) {
  uint32_t r[4];
  fa_cu_philox(seed, offset + ((uint64_t)e >> 2), r);
  return fa_cu_u32_to_unit_float(r[e & 3]) >= p;
}

// ---- rowsum(dO * O) of one row of n elements by the lanes of a warp (float32, a fixed shuffle order);
// every lane gets the total
template <typename T>
__device__ __forceinline__ float fa_attn_rowdot(const T *a, const T *b, int64_t n, int lane) {
  float s = 0.f;
  for (int64_t d = lane; d < n; d += 32) s = fmaf(fa_to_f<T>(a[d]), fa_to_f<T>(b[d]), s);
  return fa_cu_warp_sum(s);
}
