// bilinear.cuh: the bilinear sampling rules of the GPU kernels, once (grid_sample, msda; c/bilinear.h is the
// CPU twin, with the same rules in double). float32 arithmetic; the rounding of the source coordinate is
// pinned with _rn intrinsics (no fused multiply-add where the CPU and PyTorch round twice), so that every
// kernel picks the same cell for the same point.
//
// Source coordinate u along an axis of `size` pixels (centres at 0..size-1), and du/d(coordinate) in scale:
//   unit   (msda, loc in [0, 1]):  u = loc * size - 0.5 (one rounding),  align_corners: loc * (size - 1)
//   signed (grid_sample, [-1, 1]): u = (g + 1) * size / 2 - 0.5,          align_corners: (g + 1) * (size - 1) / 2
// Padding 'border': u clamped to [0, size - 1], gradient 0 where clamped (the borders too, as PyTorch), NaN to 0.
// Padding 'zeros': taps outside read 0. Taps k = 0..3: (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1), weights
// (1-fx)(1-fy), fx(1-fy), (1-fx)fy, fx fy. Gradient of sum_k w_k g_k: fa_bl_du, fa_bl_dv (times scale).
#pragma once
#include <stdint.h>

__device__ __forceinline__ float fa_bl_src_unit(float loc, float size, bool align, float &scale) {
  if (align) {
    scale = size - 1.f;
    return __fmul_rn(loc, scale);
  }
  scale = size;
  return __fmaf_rn(loc, size, -0.5f);
}

__device__ __forceinline__ float fa_bl_src_signed(float g, int64_t size, int align, float &scale) {
  scale = align ? (float)(size - 1) / 2.f : (float)size / 2.f;
  float u = __fmul_rn(__fadd_rn(g, 1.0f), scale);
  return align ? u : __fsub_rn(u, 0.5f);
}

// padding 'border': last = size - 1 as a float
__device__ __forceinline__ void fa_bl_border(float &u, float &scale, float last) {
  if (!(u > 0.f)) { u = 0.f; scale = 0.f; }
  else if (u >= last) { u = last; scale = 0.f; }
}

// msda's test: some tap of (u, v) can be inside with a non-zero weight (points on u = -1 or v = -1 are
// skipped); false for NaN
__device__ __forceinline__ bool fa_bl_touches(float u, float v, float w, float h) {
  return u > -1.f && u < w && v > -1.f && v < h;
}
// grid_sample's test: the taps can be computed as PyTorch does (the zero-weight tap of a point on u = -1 still
// counts for the gradient); false for NaN
__device__ __forceinline__ bool fa_bl_near(float u, float v, int64_t H, int64_t W) {
  return u > -2.f && u < (float)W + 1.f && v > -2.f && v < (float)H + 1.f;
}

// floor(u), and u - floor(u) in frac
__device__ __forceinline__ float fa_bl_floor(float u, float &frac) {
  const float f = floorf(u);
  frac = __fsub_rn(u, f);
  return f;
}

// the four weights (taps outside are masked by the caller)
__device__ __forceinline__ void fa_bl_weights(float fx, float fy, float (&w)[4]) {
  const float hx = __fsub_rn(1.f, fx), hy = __fsub_rn(1.f, fy);
  w[0] = __fmul_rn(hx, hy);
  w[1] = __fmul_rn(fx, hy);
  w[2] = __fmul_rn(hx, fy);
  w[3] = __fmul_rn(fx, fy);
}

// 1 when the cell (x0, y0) has a tap inside an H x W image (x0 in [-1, W-1], y0 in [-1, H-1])
template <typename I> __device__ __forceinline__ bool fa_bl_cell_near(I x0, I y0, I H, I W) {
  return x0 >= -1 && x0 < W && y0 >= -1 && y0 < H;
}
// bit k set when tap k is inside; the cell must be near (fa_bl_cell_near, or a point that passed
// fa_bl_touches or the border clamp)
template <typename I> __device__ __forceinline__ unsigned fa_bl_mask(I x0, I y0, I H, I W) {
  const bool vx0 = x0 >= 0, vx1 = x0 + 1 < W, vy0 = y0 >= 0, vy1 = y0 + 1 < H;
  return (vx0 && vy0 ? 1u : 0u) | (vx1 && vy0 ? 2u : 0u) | (vx0 && vy1 ? 4u : 0u) | (vx1 && vy1 ? 8u : 0u);
}

// d/du and d/dv of sum_k w_k g_k (g_k = 0 for taps outside)
__device__ __forceinline__ float fa_bl_du(const float (&g)[4], float fy) {
  return (1.f - fy) * (g[1] - g[0]) + fy * (g[3] - g[2]);
}
__device__ __forceinline__ float fa_bl_dv(const float (&g)[4], float fx) {
  return (1.f - fx) * (g[2] - g[0]) + fx * (g[3] - g[1]);
}
