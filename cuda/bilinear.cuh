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

// (x, y) and (sx, sy) of a point at (lx, ly) on a level of fw x fh pixels (as floats)
__device__ __forceinline__ void fa_bl_src_unit(float lx, float ly, float fw, float fh, bool align, float &x, float &y,
                                               float &sx, float &sy) {
  if (align) {
    sx = fw - 1.f; sy = fh - 1.f;
    x = __fmul_rn(lx, sx); y = __fmul_rn(ly, sy);
  } else {
    sx = fw; sy = fh;
    x = __fmaf_rn(lx, fw, -0.5f); y = __fmaf_rn(ly, fh, -0.5f);
  }
}

__device__ __forceinline__ float fa_bl_src_signed(float g, int64_t size, int align, float &scale) {
  scale = align ? (float)(size - 1) / 2.f : (float)size / 2.f;
  float u = __fmul_rn(__fadd_rn(g, 1.0f), scale);
  return align ? u : __fsub_rn(u, 0.5f);
}

// padding 'border' on an axis of `size` pixels (msda: the size as a float; grid_sample: as an integer, the last
// pixel's coordinate converted once, as PyTorch)
__device__ __forceinline__ void fa_bl_border(float &u, float &scale, float size) {
  if (!(u > 0.f)) { u = 0.f; scale = 0.f; }
  else if (u >= size - 1.f) { u = size - 1.f; scale = 0.f; }
}
__device__ __forceinline__ void fa_bl_border(float &u, float &scale, int64_t size) {
  if (!(u > 0.f)) { u = 0.f; scale = 0.f; }
  else if (u >= (float)(size - 1)) { u = (float)(size - 1); scale = 0.f; }
}

// msda's test: no tap of (u, v) can be inside with a non-zero weight (points on u = -1 or v = -1 are skipped);
// true for NaN
__device__ __forceinline__ bool fa_bl_outside(float u, float v, float w, float h) {
  return !(u > -1.f && u < w && v > -1.f && v < h);
}
// grid_sample's test: the taps can be computed as PyTorch does (the zero-weight tap of a point on u = -1 still
// counts for the gradient); false for NaN
__device__ __forceinline__ bool fa_bl_near(float u, float v, int64_t H, int64_t W) {
  return u > -2.f && u < (float)W + 1.f && v > -2.f && v < (float)H + 1.f;
}

// the cell of (x, y): top-left tap (x0, y0) = floor, fractions (fx, fy)
template <typename I> __device__ __forceinline__ void fa_bl_cell(float x, float y, I &x0, I &y0, float &fx, float &fy) {
  const float xf = floorf(x), yf = floorf(y);
  fx = __fsub_rn(x, xf);
  fy = __fsub_rn(y, yf);
  x0 = (I)xf;
  y0 = (I)yf;
}

// which taps are inside an H x W image, per axis: vx0 = column x0, vx1 = column x0 + 1, likewise rows. The
// cell must be near: x0 in [-1, W-1], y0 in [-1, H-1] (fa_bl_cell_near, or a point that passed
// fa_bl_outside or the border clamp)
template <typename I>
__device__ __forceinline__ void fa_bl_inside(I x0, I y0, I H, I W, bool &vx0, bool &vx1, bool &vy0, bool &vy1) {
  vx0 = x0 >= 0; vx1 = x0 + 1 < W; vy0 = y0 >= 0; vy1 = y0 + 1 < H;
}
// bit k set when tap k is inside
__device__ __forceinline__ unsigned fa_bl_mask(bool vx0, bool vx1, bool vy0, bool vy1) {
  return (vx0 && vy0 ? 1u : 0u) | (vx1 && vy0 ? 2u : 0u) | (vx0 && vy1 ? 4u : 0u) | (vx1 && vy1 ? 8u : 0u);
}
// 1 when the cell (x0, y0) has a tap inside an H x W image
template <typename I> __device__ __forceinline__ bool fa_bl_cell_near(I x0, I y0, I H, I W) {
  return x0 >= -1 && x0 < W && y0 >= -1 && y0 < H;
}

// the weight of tap k (taps outside are masked by the caller); hx = 1 - fx, hy = 1 - fy (fa_bl_comp)
__device__ __forceinline__ float fa_bl_comp(float f) { return __fsub_rn(1.f, f); }
template <int K> __device__ __forceinline__ float fa_bl_weight(float fx, float fy, float hx, float hy) {
  return K == 0 ? __fmul_rn(hx, hy) : K == 1 ? __fmul_rn(fx, hy) : K == 2 ? __fmul_rn(hx, fy) : __fmul_rn(fx, fy);
}

// d/du and d/dv of sum_k w_k g_k (g_k = 0 for taps outside); hx = 1 - fx, hy = 1 - fy
__device__ __forceinline__ float fa_bl_du(const float (&g)[4], float fy, float hy) {
  return hy * (g[1] - g[0]) + fy * (g[3] - g[2]);
}
__device__ __forceinline__ float fa_bl_dv(const float (&g)[4], float fx, float hx) {
  return hx * (g[2] - g[0]) + fx * (g[3] - g[1]);
}
