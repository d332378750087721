/* bilinear.h: the bilinear sampling rules of the CPU kernels, once (grid_sample, msda; cuda/bilinear.cuh is
 * the GPU twin). All in double; the caller loads and stores its own dtype.
 *
 * Source coordinate u of a normalised coordinate along an axis of `size` pixels (pixel centres at 0..size-1):
 *   unit   (msda, loc in [0, 1]):  u = loc * size - 0.5,          align_corners: loc * (size - 1)
 *   signed (grid_sample, [-1, 1]): u = (g + 1) * size / 2 - 0.5,   align_corners: (g + 1) * (size - 1) / 2
 * with du/d(coordinate) in *scale. Padding 'border' clamps u to [0, size - 1] and its gradient is 0 where
 * clamped, the borders themselves included (as PyTorch); NaN goes to 0. Padding 'zeros': taps outside read 0.
 * Taps k = 0..3: (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1) with x0 = floor(u), y0 = floor(v), weights
 * (1-fx)(1-fy), fx(1-fy), (1-fx)fy, fx fy (fx = u - x0), 0 for taps outside.
 * Gradient of sum_k w_k g_k with respect to u and v (g_k = the tap values, or dot products with them):
 * fa_bl_du, fa_bl_dv; times *scale for the normalised coordinate. */
#ifndef FA_BILINEAR_H
#define FA_BILINEAR_H
#include <stdint.h>

/* msda's unnormalisation (double arithmetic) */
static inline double fa_bl_src_unit(double loc, int64_t size, int align, double *scale) {
  double s = align ? (double)(size - 1) : (double)size;
  *scale = s;
  return align ? loc * s : loc * s - 0.5;
}

/* grid_sample's unnormalisation, in the input's precision as PyTorch's CPU kernel (so that points exactly on
 * a pixel centre pick the same cell) */
static inline double fa_bl_src_signed(int dbl, double g, int64_t size, int align, double *scale) {
  if (dbl) {
    double s = align ? (double)(size - 1) / 2 : (double)size / 2, u = (g + 1) * s;
    *scale = s;
    return align ? u : u - 0.5;
  }
  float s = align ? (float)(size - 1) / 2 : (float)size / 2, v = ((float)g + 1.0f) * s;
  if (!align) v -= 0.5f;
  *scale = s;
  return v;
}

/* padding 'border': clamp to [0, size - 1], zero gradient where clamped */
static inline double fa_bl_border(double u, int64_t size, double *scale) {
  if (!(u > 0)) { *scale = 0; return 0; }
  if (u >= (double)(size - 1)) { *scale = 0; return (double)(size - 1); }
  return u;
}

/* msda's test: 1 when no tap of (u, v) can be inside an H x W image with a non-zero weight (points on the
 * lines u = -1, v = -1 are skipped, as on the GPU); 1 for NaN */
static inline int fa_bl_outside(double u, double v, int64_t H, int64_t W) {
  return !(u > -1 && u < (double)W && v > -1 && v < (double)H);
}
/* 1 when the taps of (u, v) can be computed as PyTorch does (grid_sample's test: the floor fits, and the
 * zero-weight tap of a point on u = -1 still counts for the gradient); 0 for NaN */
static inline int fa_bl_near(double u, double v, int64_t H, int64_t W) {
  return u > -2 && u < (double)W + 1 && v > -2 && v < (double)H + 1;
}

typedef struct {
  int64_t x0, y0;
  int in[4];     /* tap inside the image */
  double w[4];   /* bilinear weights, 0 for taps outside */
  double fx, fy; /* u - x0, v - y0 */
} fa_bl_taps;

/* the taps of (u, v) inside an H x W image; u, v must have passed fa_bl_near (or fa_bl_outside, or the border
 * clamp) */
static inline void fa_bl_taps_at(double u, double v, int64_t H, int64_t W, fa_bl_taps *t) {
  /* floor of a value in (-2, size + 1), without a libm call */
  t->x0 = (int64_t)u - ((double)(int64_t)u > u);
  t->y0 = (int64_t)v - ((double)(int64_t)v > v);
  t->fx = u - (double)t->x0;
  t->fy = v - (double)t->y0;
  int inx0 = t->x0 >= 0 && t->x0 < W, inx1 = t->x0 + 1 >= 0 && t->x0 + 1 < W;
  int iny0 = t->y0 >= 0 && t->y0 < H, iny1 = t->y0 + 1 >= 0 && t->y0 + 1 < H;
  t->in[0] = inx0 && iny0;
  t->in[1] = inx1 && iny0;
  t->in[2] = inx0 && iny1;
  t->in[3] = inx1 && iny1;
  double ex = 1 - t->fx, ey = 1 - t->fy;
  t->w[0] = t->in[0] ? ex * ey : 0;
  t->w[1] = t->in[1] ? t->fx * ey : 0;
  t->w[2] = t->in[2] ? ex * t->fy : 0;
  t->w[3] = t->in[3] ? t->fx * t->fy : 0;
}

/* no tap (a point that touches nothing) */
static inline void fa_bl_no_taps(fa_bl_taps *t) {
  t->x0 = t->y0 = 0;
  t->fx = t->fy = 0;
  for (int k = 0; k < 4; k++) { t->in[k] = 0; t->w[k] = 0; }
}

/* element offsets of the taps in a plane with strides (sh, sw); 0 for taps outside */
static inline void fa_bl_offsets(const fa_bl_taps *t, int64_t sh, int64_t sw, int64_t off[4]) {
  off[0] = t->in[0] ? t->y0 * sh + t->x0 * sw : 0;
  off[1] = t->in[1] ? t->y0 * sh + (t->x0 + 1) * sw : 0;
  off[2] = t->in[2] ? (t->y0 + 1) * sh + t->x0 * sw : 0;
  off[3] = t->in[3] ? (t->y0 + 1) * sh + (t->x0 + 1) * sw : 0;
}

/* d/du and d/dv of sum_k w_k g_k (g_k = 0 for taps outside) */
static inline double fa_bl_du(const double g[4], double fy) { return (1 - fy) * (g[1] - g[0]) + fy * (g[3] - g[2]); }
static inline double fa_bl_dv(const double g[4], double fx) { return (1 - fx) * (g[2] - g[0]) + fx * (g[3] - g[1]); }

#endif
