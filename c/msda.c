/* msda.c: multi-scale deformable attention (Deformable DETR's MSDeformAttn core), entry points and CPU.
 *
 * value (N, S, M, D), spatial_shapes int64 (L, 2) = (H_l, W_l), level_start_index int64 (L),
 * sampling_locations (N, Lq, M, L, P, 2) with x first, attention_weights (N, Lq, M, L, P)
 *   -> out (N, Lq, M*D)
 * out[n,q,m,:] = sum_{l,p} A[n,q,m,l,p] * bilinear_l(value[n, start_l : start_l + H_l*W_l, m, :], x, y)
 *   x = loc_x * W_l - 0.5 (align_corners: loc_x * (W_l - 1)), likewise y with H_l: F.grid_sample's
 *   unnormalisation of grid = 2*loc - 1. padding 'zeros': taps outside the level read 0;
 *   'border': x clamped to [0, W_l - 1] with a zero gradient where clamped (the borders themselves count
 *   as clamped, as PyTorch).
 * backward (grad_out (N, Lq, M*D)): grad_value (overwritten), grad_sampling_locations,
 *   grad_attention_weights (overwritten); NULL = not needed.
 *
 * All tensors must be contiguous (the Lua fa.msda makes them so). spatial_shapes / level_start_index are
 * read by the host and live on the CPU. float32 (accumulated in float) and float64 on the CPU; the GPU
 * (cuda/msda.cu) also takes bfloat16/float16 values, with float32 locations and weights.
 *
 * CPU backward, deterministic always and independent of the thread count:
 *  - grad_value: each task owns a slice (n, m, channel chunk) of grad_value and scatters into it in
 *    query order, so every element sums its contributions in the same order whatever the thread count;
 *  - grad_attention_weights / grad_sampling_locations: per sampling point, from the four corner dot
 *    products <grad_out, value corner>, computed with a fixed-order 8-lane dot.
 *  When there are at least as many (n, m) slices as threads both happen in one pass per slice; otherwise
 *  the slices are split by channels and the point gradients come from a second pass over queries (the
 *  same arithmetic, so the same bits). */
#include "internal.h"
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ------------------------------------------------------------------ validation (shared with CUDA) */
typedef struct {
  int64_t N, S, M, D, L, Lq, P;
  int64_t *H, *W, *start; /* L entries each */
} msda_geom;

static int msda_read_levels(const char *fn, const fa_tensor *shapes, const fa_tensor *lsi, int64_t S,
                            msda_geom *g) {
  int64_t L = g->L, acc = 0;
  for (int64_t l = 0; l < L; l++) {
    int64_t h = ((const int64_t *)shapes->data)[fa_offset(shapes, 2 * l)];
    int64_t w = ((const int64_t *)shapes->data)[fa_offset(shapes, 2 * l + 1)];
    int64_t s = ((const int64_t *)lsi->data)[fa_offset(lsi, l)];
    if (h < 1 || w < 1)
      return fa_error(FA_ERR_ARG, "%s: argument 'spatial_shapes': expected positive (H, W) for every level, got (%lld, %lld) at level %lld",
                      fn, (long long)h, (long long)w, (long long)l + 1);
    if (s != acc)
      return fa_error(FA_ERR_ARG, "%s: argument 'level_start_index': expected %lld at level %lld (the running sum of H*W of spatial_shapes), got %lld",
                      fn, (long long)acc, (long long)l + 1, (long long)s);
    g->H[l] = h;
    g->W[l] = w;
    g->start[l] = s;
    if (h > ((int64_t)1 << 31) / w || acc + h * w > ((int64_t)1 << 40))
      return fa_error(FA_ERR_ARG, "%s: argument 'spatial_shapes': level %lld of %lld x %lld pixels is too large", fn,
                      (long long)l + 1, (long long)h, (long long)w);
    acc += h * w;
  }
  if (acc != S)
    return fa_error(FA_ERR_ARG, "%s: argument 'value': expected S = %lld (the sum of H*W of spatial_shapes) in dimension 2, got %lld",
                    fn, (long long)acc, (long long)S);
  return 0;
}

/* checks every argument; fills g (g->H etc. point into `lv`, 3*L entries, malloc'd here; the caller frees
 * *lv even on error) */
static int msda_check(const char *fn, const fa_tensor *out, const char *out_name, const fa_tensor *value,
                      const fa_tensor *shapes, const fa_tensor *lsi, const fa_tensor *loc, const fa_tensor *attn,
                      const fa_msda_opts *opts, msda_geom *g, int64_t **lv) {
  int rc;
  char b1[256];
  *lv = NULL;
  if ((rc = fa_check_ndim(fn, "value", value, 4)) || (rc = fa_check_float_dtype(fn, "value", value)) ||
      (rc = fa_check_contiguous(fn, "value", value)))
    return rc;
  if ((rc = fa_check_ndim(fn, "spatial_shapes", shapes, 2)) || (rc = fa_check_dtype(fn, "spatial_shapes", shapes, FA_INT64)))
    return rc;
  if (shapes->device != FA_CPU)
    return fa_error(FA_ERR_ARG, "%s: argument 'spatial_shapes': expected a tensor on cpu (it is read by the host), got one on %s",
                    fn, fa_device_str(shapes->device, b1));
  if (shapes->shape[1] != 2)
    return fa_error(FA_ERR_ARG, "%s: argument 'spatial_shapes': expected shape (L, 2), got %s", fn, fa_shape_str(shapes, b1));
  if ((rc = fa_check_ndim(fn, "level_start_index", lsi, 1)) || (rc = fa_check_dtype(fn, "level_start_index", lsi, FA_INT64)))
    return rc;
  if (lsi->device != FA_CPU)
    return fa_error(FA_ERR_ARG, "%s: argument 'level_start_index': expected a tensor on cpu (it is read by the host), got one on %s",
                    fn, fa_device_str(lsi->device, b1));
  if (lsi->shape[0] != shapes->shape[0])
    return fa_error(FA_ERR_ARG, "%s: argument 'level_start_index': expected %lld entries (one per level of spatial_shapes), got %lld",
                    fn, (long long)shapes->shape[0], (long long)lsi->shape[0]);
  if ((rc = fa_check_ndim(fn, "sampling_locations", loc, 6))) return rc;
  if ((rc = fa_check_ndim(fn, "attention_weights", attn, 5))) return rc;
  g->N = value->shape[0];
  g->S = value->shape[1];
  g->M = value->shape[2];
  g->D = value->shape[3];
  g->L = shapes->shape[0];
  g->Lq = loc->shape[1];
  g->P = loc->shape[4];
  {
    const int64_t want[6] = {g->N, g->Lq, g->M, g->L, g->P, 2};
    static const char *what[6] = {"N (as dimension 1 of 'value')", "Lq", "M (as dimension 3 of 'value')",
                                  "L (the rows of 'spatial_shapes')", "P", "2 (x, y)"};
    for (int i = 0; i < 6; i++)
      if (loc->shape[i] != want[i])
        return fa_error(FA_ERR_ARG, "%s: argument 'sampling_locations': expected shape (N, Lq, M, L, P, 2) with %s = %lld in dimension %d, got %s",
                        fn, what[i], (long long)want[i], i + 1, fa_shape_str(loc, b1));
    for (int i = 0; i < 5; i++)
      if (attn->shape[i] != want[i])
        return fa_error(FA_ERR_ARG, "%s: argument 'attention_weights': expected shape (N, Lq, M, L, P) = (%lld, %lld, %lld, %lld, %lld), got %s",
                        fn, (long long)g->N, (long long)g->Lq, (long long)g->M, (long long)g->L, (long long)g->P,
                        fa_shape_str(attn, b1));
  }
  if ((rc = fa_check_same_device(fn, "sampling_locations", loc, "value", value)) ||
      (rc = fa_check_same_device(fn, "attention_weights", attn, "value", value)))
    return rc;
  if (value->dtype == FA_BFLOAT16 || value->dtype == FA_FLOAT16) {
    /* 16-bit locations would cost ~0.07 px at W = 150: they stay float32 */
    if ((rc = fa_check_dtype(fn, "sampling_locations", loc, FA_FLOAT32)) ||
        (rc = fa_check_dtype(fn, "attention_weights", attn, FA_FLOAT32)))
      return rc;
  } else if ((rc = fa_check_same_dtype(fn, "sampling_locations", loc, "value", value)) ||
             (rc = fa_check_same_dtype(fn, "attention_weights", attn, "value", value))) {
    return rc;
  }
  if ((rc = fa_check_contiguous(fn, "sampling_locations", loc)) ||
      (rc = fa_check_contiguous(fn, "attention_weights", attn)))
    return rc;
  if (out) {
    if ((rc = fa_check_ndim(fn, out_name, out, 3)) || (rc = fa_check_like(fn, out_name, out, "value", value)) ||
        (rc = fa_check_contiguous(fn, out_name, out)))
      return rc;
    if (out->shape[0] != g->N || out->shape[1] != g->Lq || out->shape[2] != g->M * g->D)
      return fa_error(FA_ERR_ARG, "%s: argument '%s': expected shape (N, Lq, M*D) = (%lld, %lld, %lld), got %s", fn,
                      out_name, (long long)g->N, (long long)g->Lq, (long long)(g->M * g->D), fa_shape_str(out, b1));
  }
  if (opts && opts->padding != FA_PAD_ZEROS && opts->padding != FA_PAD_BORDER)
    return fa_error(FA_ERR_ARG, "%s: argument 'opts': expected padding 0 (zeros) or 1 (border), got %d", fn, opts->padding);
  *lv = (int64_t *)malloc(sizeof(int64_t) * (size_t)(3 * g->L + 1));
  if (!*lv) return fa_error(FA_ERR_MEMORY, "%s: out of memory", fn);
  g->H = *lv;
  g->W = *lv + g->L;
  g->start = *lv + 2 * g->L;
  return msda_read_levels(fn, shapes, lsi, g->S, g);
}

/* ------------------------------------------------------------------ one sampling point */
/* The bilinear footprint of one point on one level: the four corners (y0,x0), (y0,x0+1), (y0+1,x0),
 * (y0+1,x0+1) as level-relative pixel indices (-1 when outside), their weights, and the factors of the
 * location gradient. Coordinates in double for both dtypes (exact enough to pick PyTorch's cell). */
typedef struct {
  int64_t idx[4];
  double w[4];
  double fx, fy; /* fractional position inside the cell */
  double sx, sy; /* d(pixel x)/d(loc x), d(pixel y)/d(loc y): W or W-1, 0 where border-clamped */
} msda_pt;

/* returns 0 when the point touches no pixel (zeros padding, or NaN) */
static inline int msda_point(double lx, double ly, int64_t H, int64_t W, int border, int align, msda_pt *t) {
  double sx = align ? (double)(W - 1) : (double)W, sy = align ? (double)(H - 1) : (double)H;
  double x = align ? lx * sx : lx * sx - 0.5, y = align ? ly * sy : ly * sy - 0.5;
  if (border) {
    if (!(x > 0)) { x = 0; sx = 0; } else if (x >= (double)(W - 1)) { x = (double)(W - 1); sx = 0; }
    if (!(y > 0)) { y = 0; sy = 0; } else if (y >= (double)(H - 1)) { y = (double)(H - 1); sy = 0; }
  } else if (!(x > -1 && x < (double)W && y > -1 && y < (double)H)) {
    return 0;
  }
  double x0f = floor(x), y0f = floor(y);
  int64_t x0 = (int64_t)x0f, y0 = (int64_t)y0f;
  double fx = x - x0f, fy = y - y0f, ex = 1 - fx, ey = 1 - fy;
  int inx0 = x0 >= 0, inx1 = x0 + 1 < W, iny0 = y0 >= 0, iny1 = y0 + 1 < H;
  t->idx[0] = inx0 && iny0 ? y0 * W + x0 : -1;
  t->idx[1] = inx1 && iny0 ? y0 * W + x0 + 1 : -1;
  t->idx[2] = inx0 && iny1 ? (y0 + 1) * W + x0 : -1;
  t->idx[3] = inx1 && iny1 ? (y0 + 1) * W + x0 + 1 : -1;
  t->w[0] = ex * ey;
  t->w[1] = fx * ey;
  t->w[2] = ex * fy;
  t->w[3] = fx * fy;
  t->fx = fx;
  t->fy = fy;
  t->sx = sx;
  t->sy = sy;
  return 1;
}

/* ------------------------------------------------------------------ channel loops */
/* acc[d] += sum_c wa[c] * v[c][d]; corners outside come with weight 0 and a valid pointer */
static inline void axpy4_f(float *restrict acc, const float *restrict v0, const float *restrict v1,
                           const float *restrict v2, const float *restrict v3, const float wa[4], int64_t D) {
  float w0 = wa[0], w1 = wa[1], w2 = wa[2], w3 = wa[3];
  for (int64_t d = 0; d < D; d++) acc[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d];
}
static inline void axpy4_d(double *restrict acc, const double *restrict v0, const double *restrict v1,
                           const double *restrict v2, const double *restrict v3, const double wa[4], int64_t D) {
  double w0 = wa[0], w1 = wa[1], w2 = wa[2], w3 = wa[3];
  for (int64_t d = 0; d < D; d++) acc[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d];
}

/* sum_d a[d] * b[d] in a fixed order: 8 interleaved partial sums, then combined pairwise. The order does
 * not depend on the caller, so the fused and the split backward give the same bits; it vectorises. */
static inline float dot_f(const float *restrict a, const float *restrict b, int64_t D) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int k = 0; k < 8; k++) s[k] += a[d + k] * b[d + k];
  for (int k = 0; d < D; d++, k++) s[k] += a[d] * b[d];
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}
static inline double dot_d(const double *restrict a, const double *restrict b, int64_t D) {
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int k = 0; k < 8; k++) s[k] += a[d + k] * b[d + k];
  for (int k = 0; d < D; d++, k++) s[k] += a[d] * b[d];
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

/* y[d] += alpha * x[d] */
static inline void axpy_f(float *restrict y, const float *restrict x, float alpha, int64_t D) {
  for (int64_t d = 0; d < D; d++) y[d] += alpha * x[d];
}
static inline void axpy_d(double *restrict y, const double *restrict x, double alpha, int64_t D) {
  for (int64_t d = 0; d < D; d++) y[d] += alpha * x[d];
}

static inline double ld(const void *p, int64_t i, int dbl) {
  return dbl ? ((const double *)p)[i] : (double)((const float *)p)[i];
}
static inline void st(void *p, int64_t i, double v, int dbl) {
  if (dbl) ((double *)p)[i] = v;
  else ((float *)p)[i] = (float)v;
}

typedef struct {
  msda_geom g;
  int border, align, dbl;
} msda_cfg;

/* ------------------------------------------------------------------ forward */
/* one (n, q) row: out[n, q, :, :] */
static inline __attribute__((always_inline)) void fwd_row(const msda_cfg *c, int dbl, void *out, const void *value,
                                                          const void *loc, const void *attn, int64_t n, int64_t q) {
  const msda_geom *g = &c->g;
  int64_t M = g->M, D = g->D, L = g->L, P = g->P, MD = M * D;
  for (int64_t m = 0; m < M; m++) {
    int64_t orow = ((n * g->Lq + q) * M + m) * D;
    for (int64_t d = 0; d < D; d++) st(out, orow + d, 0.0, dbl);
    for (int64_t l = 0; l < L; l++) {
      int64_t vbase = ((n * g->S + g->start[l]) * M + m) * D; /* element offset of pixel 0, head m */
      for (int64_t p = 0; p < P; p++) {
        int64_t i = (((n * g->Lq + q) * M + m) * L + l) * P + p;
        msda_pt t;
        if (!msda_point(ld(loc, 2 * i, dbl), ld(loc, 2 * i + 1, dbl), g->H[l], g->W[l], c->border, c->align, &t)) continue;
        double a = ld(attn, i, dbl);
        int64_t off[4];
        for (int k = 0; k < 4; k++) off[k] = vbase + (t.idx[k] >= 0 ? t.idx[k] : 0) * MD;
        if (dbl) {
          double wa[4];
          for (int k = 0; k < 4; k++) wa[k] = t.idx[k] >= 0 ? t.w[k] * a : 0.0;
          const double *v = (const double *)value;
          axpy4_d((double *)out + orow, v + off[0], v + off[1], v + off[2], v + off[3], wa, D);
        } else {
          float wa[4];
          for (int k = 0; k < 4; k++) wa[k] = t.idx[k] >= 0 ? (float)(t.w[k] * a) : 0.0f;
          const float *v = (const float *)value;
          axpy4_f((float *)out + orow, v + off[0], v + off[1], v + off[2], v + off[3], wa, D);
        }
      }
    }
  }
}

static inline __attribute__((always_inline)) void fwd_cpu(const msda_cfg *c, int dbl, void *out, const void *value,
                                                          const void *loc, const void *attn) {
  const msda_geom *g = &c->g;
  int64_t rows = g->N * g->Lq, work = rows * g->M * g->L * g->P * (g->D + 8);
  (void)work;
#pragma omp parallel for schedule(static) if (work > FA_PARALLEL_GRAIN)
  for (int64_t r = 0; r < rows; r++) fwd_row(c, dbl, out, value, loc, attn, r / g->Lq, r % g->Lq);
}
static void fwd_f32(const msda_cfg *c, void *o, const void *v, const void *l, const void *a) { fwd_cpu(c, 0, o, v, l, a); }
static void fwd_f64(const msda_cfg *c, void *o, const void *v, const void *l, const void *a) { fwd_cpu(c, 1, o, v, l, a); }

/* ------------------------------------------------------------------ backward */
/* the point gradients from the four corner dot products gv[k] = <grad_out row, value corner k> */
static inline void point_grads(const msda_pt *t, double a, const double gv[4], double *dA, double *dx, double *dy) {
  *dA = t->w[0] * gv[0] + t->w[1] * gv[1] + t->w[2] * gv[2] + t->w[3] * gv[3];
  *dx = a * t->sx * ((1 - t->fy) * (gv[1] - gv[0]) + t->fy * (gv[3] - gv[2]));
  *dy = a * t->sy * ((1 - t->fx) * (gv[2] - gv[0]) + t->fx * (gv[3] - gv[1]));
}

typedef struct {
  void *gv, *gloc, *gattn;
  const void *gout, *value, *loc, *attn;
} msda_bufs;

/* One slice of grad_value: (n, m), channels [c0, c1). Scatters in query order. When `points` is set the
 * slice covers all channels and also writes the point gradients (dot products over all D). */
static inline __attribute__((always_inline)) void bwd_slice(const msda_cfg *c, int dbl, const msda_bufs *b,
                                                            int64_t n, int64_t m, int64_t c0, int64_t c1,
                                                            int points) {
  const msda_geom *g = &c->g;
  int64_t M = g->M, D = g->D, L = g->L, P = g->P, MD = M * D, S = g->S, C = c1 - c0;
  if (b->gv) /* zero the slice (grad_value is overwritten) */
    for (int64_t s = 0; s < S; s++) {
      int64_t o = ((n * S + s) * M + m) * D;
      for (int64_t d = c0; d < c1; d++) st(b->gv, o + d, 0.0, dbl);
    }
  for (int64_t q = 0; q < g->Lq; q++) {
    int64_t grow = ((n * g->Lq + q) * M + m) * D;
    for (int64_t l = 0; l < L; l++) {
      int64_t vbase = ((n * S + g->start[l]) * M + m) * D;
      for (int64_t p = 0; p < P; p++) {
        int64_t i = (((n * g->Lq + q) * M + m) * L + l) * P + p;
        msda_pt t;
        double a = ld(b->attn, i, dbl), gvk[4] = {0, 0, 0, 0};
        int hit = msda_point(ld(b->loc, 2 * i, dbl), ld(b->loc, 2 * i + 1, dbl), g->H[l], g->W[l], c->border,
                             c->align, &t);
        if (hit) {
          for (int k = 0; k < 4; k++) {
            if (t.idx[k] < 0) continue;
            int64_t off = vbase + t.idx[k] * MD;
            if (dbl) {
              const double *go = (const double *)b->gout + grow;
              if (points) gvk[k] = dot_d(go, (const double *)b->value + off, D);
              if (b->gv) axpy_d((double *)b->gv + off + c0, go + c0, t.w[k] * a, C);
            } else {
              const float *go = (const float *)b->gout + grow;
              if (points) gvk[k] = dot_f(go, (const float *)b->value + off, D);
              if (b->gv) axpy_f((float *)b->gv + off + c0, go + c0, (float)(t.w[k] * a), C);
            }
          }
        }
        if (points) {
          double dA = 0, dx = 0, dy = 0;
          if (hit) point_grads(&t, a, gvk, &dA, &dx, &dy);
          if (b->gattn) st(b->gattn, i, dA, dbl);
          if (b->gloc) { st(b->gloc, 2 * i, dx, dbl); st(b->gloc, 2 * i + 1, dy, dbl); }
        }
      }
    }
  }
}

/* point gradients of one (n, q) row (the split path's second pass) */
static inline __attribute__((always_inline)) void bwd_points_row(const msda_cfg *c, int dbl, const msda_bufs *b,
                                                                 int64_t n, int64_t q) {
  const msda_geom *g = &c->g;
  int64_t M = g->M, D = g->D, L = g->L, P = g->P, MD = M * D;
  for (int64_t m = 0; m < M; m++) {
    int64_t grow = ((n * g->Lq + q) * M + m) * D;
    for (int64_t l = 0; l < L; l++) {
      int64_t vbase = ((n * g->S + g->start[l]) * M + m) * D;
      for (int64_t p = 0; p < P; p++) {
        int64_t i = (((n * g->Lq + q) * M + m) * L + l) * P + p;
        msda_pt t;
        double a = ld(b->attn, i, dbl), gvk[4] = {0, 0, 0, 0}, dA = 0, dx = 0, dy = 0;
        if (msda_point(ld(b->loc, 2 * i, dbl), ld(b->loc, 2 * i + 1, dbl), g->H[l], g->W[l], c->border, c->align, &t)) {
          for (int k = 0; k < 4; k++) {
            if (t.idx[k] < 0) continue;
            int64_t off = vbase + t.idx[k] * MD;
            gvk[k] = dbl ? dot_d((const double *)b->gout + grow, (const double *)b->value + off, D)
                         : (double)dot_f((const float *)b->gout + grow, (const float *)b->value + off, D);
          }
          point_grads(&t, a, gvk, &dA, &dx, &dy);
        }
        if (b->gattn) st(b->gattn, i, dA, dbl);
        if (b->gloc) { st(b->gloc, 2 * i, dx, dbl); st(b->gloc, 2 * i + 1, dy, dbl); }
      }
    }
  }
}

static inline __attribute__((always_inline)) void bwd_cpu(const msda_cfg *c, int dbl, const msda_bufs *b) {
  const msda_geom *g = &c->g;
  int64_t NM = g->N * g->M, D = g->D;
  int64_t work = g->N * g->Lq * g->M * g->L * g->P * (g->D + 8);
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  int par = work > FA_PARALLEL_GRAIN;
  int points = b->gloc || b->gattn;
  if (!par) threads = 1;
  if (b->gv && (NM >= threads || D <= (dbl ? 8 : 16))) {
    /* fused: one task per (n, m) slice does both */
#pragma omp parallel for schedule(dynamic, 1) if (par && NM > 1)
    for (int64_t t = 0; t < NM; t++) bwd_slice(c, dbl, b, t / g->M, t % g->M, 0, D, points);
    return;
  }
  if (b->gv) {
    /* split grad_value by channel chunks of >= 64 bytes (no false sharing) until every thread has a task */
    int64_t cmin = dbl ? 8 : 16, chunks = (threads + NM - 1) / NM, cs;
    if (chunks > (D + cmin - 1) / cmin) chunks = (D + cmin - 1) / cmin;
    if (chunks < 1) chunks = 1;
    cs = (D + chunks - 1) / chunks;
    cs = (cs + cmin - 1) / cmin * cmin;
    chunks = (D + cs - 1) / cs;
#pragma omp parallel for schedule(dynamic, 1) if (par)
    for (int64_t t = 0; t < NM * chunks; t++) {
      int64_t nm = t / chunks, k = t % chunks, c0 = k * cs, c1 = c0 + cs < D ? c0 + cs : D;
      bwd_slice(c, dbl, b, nm / g->M, nm % g->M, c0, c1, 0);
    }
  }
  if (points) {
    int64_t rows = g->N * g->Lq;
#pragma omp parallel for schedule(static) if (par)
    for (int64_t r = 0; r < rows; r++) bwd_points_row(c, dbl, b, r / g->Lq, r % g->Lq);
  }
}
static void bwd_f32(const msda_cfg *c, const msda_bufs *b) { bwd_cpu(c, 0, b); }
static void bwd_f64(const msda_cfg *c, const msda_bufs *b) { bwd_cpu(c, 1, b); }

/* ------------------------------------------------------------------ entry points */
static void cfg_from(msda_cfg *c, const fa_msda_opts *opts, int dtype) {
  c->border = opts ? opts->padding == FA_PAD_BORDER : 0;
  c->align = opts ? opts->align_corners != 0 : 0;
  c->dbl = dtype == FA_FLOAT64;
}

int fa_msda_forward(fa_tensor *out, const fa_tensor *value, const fa_tensor *spatial_shapes,
                    const fa_tensor *level_start_index, const fa_tensor *sampling_locations,
                    const fa_tensor *attention_weights, const fa_msda_opts *opts) {
  static const char *fn = "fa_msda_forward";
  int rc;
  int64_t *lv = NULL;
  msda_cfg c;
  if ((rc = fa_check_defined(fn, "out", out)) || (rc = fa_check_defined(fn, "value", value)) ||
      (rc = fa_check_defined(fn, "spatial_shapes", spatial_shapes)) ||
      (rc = fa_check_defined(fn, "level_start_index", level_start_index)) ||
      (rc = fa_check_defined(fn, "sampling_locations", sampling_locations)) ||
      (rc = fa_check_defined(fn, "attention_weights", attention_weights)))
    return rc;
  rc = msda_check(fn, out, "out", value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                  opts, &c.g, &lv);
  if (rc || fa_numel(out) == 0) { free(lv); return rc; }
  if (value->device >= 0) {
    free(lv);
    return fa_cu_msda_forward(out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, opts);
  }
  cfg_from(&c, opts, value->dtype);
  if (c.dbl) fwd_f64(&c, out->data, value->data, sampling_locations->data, attention_weights->data);
  else fwd_f32(&c, out->data, value->data, sampling_locations->data, attention_weights->data);
  free(lv);
  return 0;
}

/* a gradient tensor shaped, typed and placed as its input */
static int check_grad(const char *fn, const char *arg, const fa_tensor *t, const char *ref_arg, const fa_tensor *ref) {
  int rc;
  if (!t) return 0;
  if ((rc = fa_check_like(fn, arg, t, ref_arg, ref)) || (rc = fa_check_same_shape(fn, arg, t, ref_arg, ref)) ||
      (rc = fa_check_contiguous(fn, arg, t)))
    return rc;
  return 0;
}

int fa_msda_backward(fa_tensor *grad_value, fa_tensor *grad_sampling_locations, fa_tensor *grad_attention_weights,
                     const fa_tensor *grad_out, const fa_tensor *value, const fa_tensor *spatial_shapes,
                     const fa_tensor *level_start_index, const fa_tensor *sampling_locations,
                     const fa_tensor *attention_weights, const fa_msda_opts *opts) {
  static const char *fn = "fa_msda_backward";
  int rc;
  int64_t *lv = NULL;
  msda_cfg c;
  if ((rc = fa_check_defined(fn, "grad_out", grad_out)) || (rc = fa_check_defined(fn, "value", value)) ||
      (rc = fa_check_defined(fn, "spatial_shapes", spatial_shapes)) ||
      (rc = fa_check_defined(fn, "level_start_index", level_start_index)) ||
      (rc = fa_check_defined(fn, "sampling_locations", sampling_locations)) ||
      (rc = fa_check_defined(fn, "attention_weights", attention_weights)))
    return rc;
  rc = msda_check(fn, grad_out, "grad_out", value, spatial_shapes, level_start_index, sampling_locations,
                  attention_weights, opts, &c.g, &lv);
  if (!rc) rc = check_grad(fn, "grad_value", grad_value, "value", value);
  if (!rc) rc = check_grad(fn, "grad_sampling_locations", grad_sampling_locations, "sampling_locations", sampling_locations);
  if (!rc) rc = check_grad(fn, "grad_attention_weights", grad_attention_weights, "attention_weights", attention_weights);
  if (rc) { free(lv); return rc; }
  if (value->device >= 0) {
    free(lv);
    return fa_cu_msda_backward(grad_value, grad_sampling_locations, grad_attention_weights, grad_out, value,
                               spatial_shapes, level_start_index, sampling_locations, attention_weights, opts);
  }
  cfg_from(&c, opts, value->dtype);
  msda_bufs b = {grad_value && fa_numel(grad_value) ? grad_value->data : NULL,
                 grad_sampling_locations && fa_numel(grad_sampling_locations) ? grad_sampling_locations->data : NULL,
                 grad_attention_weights && fa_numel(grad_attention_weights) ? grad_attention_weights->data : NULL,
                 grad_out->data, value->data, sampling_locations->data, attention_weights->data};
  if (b.gv || b.gloc || b.gattn) {
    if (c.dbl) bwd_f64(&c, &b);
    else bwd_f32(&c, &b);
  }
  free(lv);
  return 0;
}
