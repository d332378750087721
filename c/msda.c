/* msda.c: multi-scale deformable attention (Deformable DETR's MSDeformAttn core): the entry points, which
 * validate every argument once (messages name the Lua arguments), and the CPU kernels.
 *
 * value (N, S, M, D), spatial_shapes int64/int32 (L, 2) = (H_l, W_l), level_start_index (L) or NULL,
 * sampling_locations (N, Lq, M, L, P, 2) with x first, attention_weights (N, Lq, M, L, P)
 *   -> out (N, Lq, M*D)
 * out[n,q,m,:] = sum_{l,p} A[n,q,m,l,p] * bilinear_l(value[n, start_l : start_l + H_l*W_l, m, :], x, y)
 *   with the sampling rules of c/bilinear.h (x = loc_x * W_l - 0.5, or loc_x * (W_l - 1) with align_corners:
 *   F.grid_sample's unnormalisation of grid = 2*loc - 1; 'zeros' or 'border' padding).
 * backward (grad_out (N, Lq, M*D)): grad_value, grad_sampling_locations, grad_attention_weights, overwritten;
 *   NULL = not needed.
 *
 * The call: fa_msda_forward/backward check everything and fill a fa_msda_geom (c/msda.h); inputs that are
 * not contiguous are copied (fa_contiguous_data); then the CPU kernels below or fa_cu_msda_* (cuda/msda.cu)
 * run on the geometry and raw pointers. float32 (accumulated in float) and float64 on the CPU.
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
#include "msda.h"
#include "bilinear.h"
#include <stdlib.h>

/* ------------------------------------------------------------------ validation */
static int64_t int_at(const fa_tensor *t, int64_t i) {
  int64_t o = fa_offset(t, i);
  return t->dtype == FA_INT64 ? ((const int64_t *)t->data)[o] : (int64_t)((const int32_t *)t->data)[o];
}

/* spatial_shapes / level_start_index: integer tensors on the CPU (the host reads them) */
static int check_levels_tensor(const char *fn, const char *arg, const fa_tensor *t, int ndim) {
  int rc;
  char b[256];
  if ((rc = fa_check_ndim(fn, arg, t, ndim))) return rc;
  if (t->dtype != FA_INT64 && t->dtype != FA_INT32)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected an int64 or int32 tensor, got %s", fn, arg,
                    fa_dtype_name(t->dtype));
  if (t->device != FA_CPU)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected a tensor on cpu (it is read by the host), got one on %s",
                    fn, arg, fa_device_str(t->device, b));
  return 0;
}

/* H, W, start of every level into g (lv: 3L entries, malloc'd here; the caller frees it even on error) */
static int read_levels(const char *fn, const fa_tensor *shapes, const fa_tensor *lsi, fa_msda_geom *g, int64_t **lv) {
  int64_t L = g->L, acc = 0, sx = 0;
  int gpu = g->device >= 0;
  if (!(*lv = (int64_t *)malloc(sizeof(int64_t) * (size_t)(3 * L + 1)))) return fa_error(FA_ERR_MEMORY, "%s: out of memory", fn);
  int64_t *H = *lv, *W = *lv + L, *start = *lv + 2 * L;
  if (gpu && L > FA_MSDA_CUDA_MAX_LEVELS)
    return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'spatial_shapes': expected at most %d levels on CUDA, got %lld", fn,
                    FA_MSDA_CUDA_MAX_LEVELS, (long long)L);
  for (int64_t l = 0; l < L; l++) {
    int64_t h = int_at(shapes, 2 * l), w = int_at(shapes, 2 * l + 1), s = lsi ? int_at(lsi, l) : acc;
    if (h < 1 || w < 1)
      return fa_error(FA_ERR_ARG, "%s: argument 'spatial_shapes': expected positive (H, W) for every level, got (%lld, %lld) at level %lld",
                      fn, (long long)h, (long long)w, (long long)l + 1);
    if (s != acc)
      return fa_error(FA_ERR_ARG, "%s: argument 'level_start_index': expected %lld at level %lld (the running sum of H*W over spatial_shapes), got %lld",
                      fn, (long long)acc, (long long)l + 1, (long long)s);
    if (h > ((int64_t)1 << 31) / w || acc + h * w > ((int64_t)1 << 40))
      return fa_error(FA_ERR_ARG, "%s: argument 'spatial_shapes': level %lld of %lld x %lld pixels is too large", fn,
                      (long long)l + 1, (long long)h, (long long)w);
    if (gpu && (h >= (1 << 25) || w >= (1 << 25)))
      return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'spatial_shapes': expected levels of less than 2^25 pixels a side on CUDA, got %lld x %lld at level %lld",
                      fn, (long long)h, (long long)w, (long long)l + 1);
    H[l] = h;
    W[l] = w;
    start[l] = s;
    acc += h * w;
    sx += (h + 1) * (w + 1);
  }
  if (acc != g->S)
    return fa_error(FA_ERR_ARG, "%s: argument 'value': expected S = %lld (the sum of H*W over spatial_shapes) in dimension 2, got %lld",
                    fn, (long long)acc, (long long)g->S);
  g->H = H;
  g->W = W;
  g->start = start;
  g->Sx = sx;
  if (gpu) { /* the CUDA kernels index points, pixels and keys with 32 bits */
    const int64_t big = (int64_t)1 << 31, N = g->N, S = g->S, M = g->M, D = g->D, NLqM = g->N * g->Lq * g->M;
    if (N * S * M * D >= big * 8 || N * S >= big / 2 || NLqM * L * g->P >= big || N * M * sx >= big / 2 || NLqM * D >= big * 8)
      return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'value': too large for the CUDA kernels (32-bit point and pixel indices)", fn);
  }
  return 0;
}

static int check_opts(const char *fn, const fa_msda_opts *o, fa_msda_geom *g) {
  fa_msda_opts z = {0, 0, 0, 0, 0};
  if (!o) o = &z;
  if (o->padding != FA_PAD_ZEROS && o->padding != FA_PAD_BORDER)
    return fa_error(FA_ERR_ARG, "%s: argument 'opts': expected padding FA_PAD_ZEROS (0) or FA_PAD_BORDER (1), got %d", fn, o->padding);
  if (o->order < FA_MSDA_ORDER_AUTO || o->order > FA_MSDA_ORDER_HEAD)
    return fa_error(FA_ERR_ARG, "%s: argument 'opts': expected order FA_MSDA_ORDER_AUTO (0), _QUERY (1) or _HEAD (2), got %d", fn, o->order);
  if (o->merge < FA_MSDA_AUTO || o->merge > FA_MSDA_ON)
    return fa_error(FA_ERR_ARG, "%s: argument 'opts': expected merge FA_MSDA_AUTO (0), FA_MSDA_OFF (1) or FA_MSDA_ON (2), got %d", fn, o->merge);
  g->border = o->padding == FA_PAD_BORDER;
  g->align = o->align_corners != 0;
  g->deterministic = o->deterministic != 0;
  g->order = o->order;
  g->merge = o->merge;
  return 0;
}

/* checks every argument but the backward's gradients and fills g; `out` is the forward's out or the
 * backward's grad_out (both (N, Lq, M*D) like value) */
static int msda_check(const char *fn, const fa_tensor *out, const char *out_name, const fa_tensor *value,
                      const fa_tensor *shapes, const fa_tensor *lsi, const fa_tensor *loc, const fa_tensor *attn,
                      const fa_msda_opts *opts, fa_msda_geom *g, int64_t **lv) {
  int rc;
  char b1[256];
  *lv = NULL;
  if ((rc = fa_check_ndim(fn, "value", value, 4)) || (rc = fa_check_float_dtype(fn, "value", value))) return rc;
  if ((rc = check_levels_tensor(fn, "spatial_shapes", shapes, 2))) return rc;
  if (shapes->shape[1] != 2)
    return fa_error(FA_ERR_ARG, "%s: argument 'spatial_shapes': expected shape (L, 2), got %s", fn, fa_shape_str(shapes, b1));
  if (lsi) {
    if ((rc = check_levels_tensor(fn, "level_start_index", lsi, 1))) return rc;
    if (lsi->shape[0] != shapes->shape[0])
      return fa_error(FA_ERR_ARG, "%s: argument 'level_start_index': expected %lld entries (one per level of spatial_shapes), got %lld",
                      fn, (long long)shapes->shape[0], (long long)lsi->shape[0]);
  }
  if ((rc = fa_check_ndim(fn, "sampling_locations", loc, 6))) return rc;
  if ((rc = fa_check_ndim(fn, "attention_weights", attn, 5))) return rc;
  memset(g, 0, sizeof *g);
  g->N = value->shape[0];
  g->S = value->shape[1];
  g->M = value->shape[2];
  g->D = value->shape[3];
  g->L = shapes->shape[0];
  g->Lq = loc->shape[1];
  g->P = loc->shape[4];
  g->dtype = value->dtype;
  g->device = value->device;
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
  if (value->device >= 0) {
    /* CUDA: locations and weights are float32 for every value dtype (16-bit locations would cost ~0.07 px at
     * W = 150) */
    if ((rc = fa_check_dtype(fn, "sampling_locations", loc, FA_FLOAT32)) ||
        (rc = fa_check_dtype(fn, "attention_weights", attn, FA_FLOAT32)))
      return rc;
  } else if ((rc = fa_check_same_dtype(fn, "sampling_locations", loc, "value", value)) ||
             (rc = fa_check_same_dtype(fn, "attention_weights", attn, "value", value))) {
    return rc;
  }
  if ((rc = fa_check_ndim(fn, out_name, out, 3)) || (rc = fa_check_like(fn, out_name, out, "value", value))) return rc;
  if (out->shape[0] != g->N || out->shape[1] != g->Lq || out->shape[2] != g->M * g->D)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected shape (N, Lq, M*D) = (%lld, %lld, %lld), got %s", fn,
                    out_name, (long long)g->N, (long long)g->Lq, (long long)(g->M * g->D), fa_shape_str(out, b1));
  if ((rc = check_opts(fn, opts, g))) return rc;
  return read_levels(fn, shapes, lsi, g, lv);
}

/* a gradient: shaped, typed and placed as ref, contiguous; NULL = not wanted */
static int check_output(const char *fn, const char *arg, const fa_tensor *t, const char *ref_arg, const fa_tensor *ref) {
  int rc;
  if (!t) return 0;
  if ((rc = fa_check_like(fn, arg, t, ref_arg, ref)) || (rc = fa_check_same_shape(fn, arg, t, ref_arg, ref)) ||
      (rc = fa_check_dense(fn, arg, t)))
    return rc;
  return 0;
}

/* an output (NULL: not wanted) against every input: the kernels read the inputs while they write it */
static int no_overlap(const char *fn, const char *arg, const fa_tensor *t, const fa_tensor *shapes, const fa_tensor *lsi,
                      const fa_tensor *loc, const fa_tensor *attn, const fa_tensor *value, const fa_tensor *grad_out) {
  int rc;
  if (!t) return 0;
  if ((rc = fa_check_no_overlap(fn, arg, t, "value", value)) || (rc = fa_check_no_overlap(fn, arg, t, "spatial_shapes", shapes)) ||
      (rc = fa_check_no_overlap(fn, arg, t, "level_start_index", lsi)) ||
      (rc = fa_check_no_overlap(fn, arg, t, "sampling_locations", loc)) ||
      (rc = fa_check_no_overlap(fn, arg, t, "attention_weights", attn)) ||
      (rc = fa_check_no_overlap(fn, arg, t, "grad_out", grad_out)))
    return rc;
  return 0;
}

/* ------------------------------------------------------------------ one sampling point */
/* the taps of point (lx, ly) on level l and d(pixel)/d(loc) (0 where border-clamped); 0 when the point
 * touches no pixel (zeros padding, or NaN). Coordinates in double for both dtypes. */
static inline int msda_taps(const fa_msda_geom *g, int64_t l, double lx, double ly, fa_bl_taps *t, double *sx,
                            double *sy) {
  int64_t H = g->H[l], W = g->W[l];
  double x = fa_bl_src_unit(lx, W, g->align, sx), y = fa_bl_src_unit(ly, H, g->align, sy);
  if (g->border) {
    x = fa_bl_border(x, W, sx);
    y = fa_bl_border(y, H, sy);
  } else if (fa_bl_outside(x, y, H, W)) {
    return 0;
  }
  fa_bl_taps_at(x, y, H, W, t);
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

/* ------------------------------------------------------------------ forward */
/* one (n, q) row: out[n, q, :, :] */
static inline __attribute__((always_inline)) void fwd_row(const fa_msda_geom *g, int dbl, void *out, const void *value,
                                                          const void *loc, const void *attn, int64_t n, int64_t q) {
  int64_t M = g->M, D = g->D, L = g->L, P = g->P, MD = M * D;
  for (int64_t m = 0; m < M; m++) {
    int64_t orow = ((n * g->Lq + q) * M + m) * D;
    for (int64_t d = 0; d < D; d++) st(out, orow + d, 0.0, dbl);
    for (int64_t l = 0; l < L; l++) {
      int64_t vbase = ((n * g->S + g->start[l]) * M + m) * D; /* element offset of pixel 0, head m */
      for (int64_t p = 0; p < P; p++) {
        int64_t i = (((n * g->Lq + q) * M + m) * L + l) * P + p;
        fa_bl_taps t;
        double sx, sy;
        if (!msda_taps(g, l, ld(loc, 2 * i, dbl), ld(loc, 2 * i + 1, dbl), &t, &sx, &sy)) continue;
        double a = ld(attn, i, dbl);
        int64_t off[4];
        fa_bl_offsets(&t, g->W[l], 1, off);
        for (int k = 0; k < 4; k++) off[k] = vbase + off[k] * MD;
        if (dbl) {
          double wa[4];
          for (int k = 0; k < 4; k++) wa[k] = t.in[k] ? t.w[k] * a : 0.0;
          const double *v = (const double *)value;
          axpy4_d((double *)out + orow, v + off[0], v + off[1], v + off[2], v + off[3], wa, D);
        } else {
          float wa[4];
          for (int k = 0; k < 4; k++) wa[k] = t.in[k] ? (float)(t.w[k] * a) : 0.0f;
          const float *v = (const float *)value;
          axpy4_f((float *)out + orow, v + off[0], v + off[1], v + off[2], v + off[3], wa, D);
        }
      }
    }
  }
}

static inline __attribute__((always_inline)) void fwd_cpu(const fa_msda_geom *g, int dbl, void *out, const void *value,
                                                          const void *loc, const void *attn) {
  int64_t rows = g->N * g->Lq, work = rows * g->M * g->L * g->P * (g->D + 8);
  (void)work;
#pragma omp parallel for schedule(static) if (work > FA_PARALLEL_GRAIN)
  for (int64_t r = 0; r < rows; r++) fwd_row(g, dbl, out, value, loc, attn, r / g->Lq, r % g->Lq);
}
static void fwd_f32(const fa_msda_geom *g, void *o, const void *v, const void *l, const void *a) { fwd_cpu(g, 0, o, v, l, a); }
static void fwd_f64(const fa_msda_geom *g, void *o, const void *v, const void *l, const void *a) { fwd_cpu(g, 1, o, v, l, a); }

/* ------------------------------------------------------------------ backward */
/* the point gradients from the four corner dot products gv[k] = <grad_out row, value corner k> */
static inline void point_grads(const fa_bl_taps *t, double sx, double sy, double a, const double gv[4], double *dA,
                               double *dx, double *dy) {
  *dA = t->w[0] * gv[0] + t->w[1] * gv[1] + t->w[2] * gv[2] + t->w[3] * gv[3];
  *dx = a * sx * fa_bl_du(gv, t->fy);
  *dy = a * sy * fa_bl_dv(gv, t->fx);
}

typedef struct {
  void *gv, *gloc, *gattn;
  const void *gout, *value, *loc, *attn;
} msda_bufs;

/* One slice of grad_value: (n, m), channels [c0, c1). Scatters in query order. When `points` is set the
 * slice covers all channels and also writes the point gradients (dot products over all D). */
static inline __attribute__((always_inline)) void bwd_slice(const fa_msda_geom *g, int dbl, const msda_bufs *b,
                                                            int64_t n, int64_t m, int64_t c0, int64_t c1,
                                                            int points) {
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
        fa_bl_taps t;
        double a = ld(b->attn, i, dbl), gvk[4] = {0, 0, 0, 0}, sx, sy;
        int hit = msda_taps(g, l, ld(b->loc, 2 * i, dbl), ld(b->loc, 2 * i + 1, dbl), &t, &sx, &sy);
        if (hit) {
          int64_t offs[4];
          fa_bl_offsets(&t, g->W[l], 1, offs);
          for (int k = 0; k < 4; k++) {
            if (!t.in[k]) continue;
            int64_t off = vbase + offs[k] * MD;
            if (dbl) {
              const double *go = (const double *)b->gout + grow;
              if (points) gvk[k] = fa_dot_d(go, (const double *)b->value + off, D);
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
          if (hit) point_grads(&t, sx, sy, a, gvk, &dA, &dx, &dy);
          if (b->gattn) st(b->gattn, i, dA, dbl);
          if (b->gloc) { st(b->gloc, 2 * i, dx, dbl); st(b->gloc, 2 * i + 1, dy, dbl); }
        }
      }
    }
  }
}

/* point gradients of one (n, q) row (the split path's second pass) */
static inline __attribute__((always_inline)) void bwd_points_row(const fa_msda_geom *g, int dbl, const msda_bufs *b,
                                                                 int64_t n, int64_t q) {
  int64_t M = g->M, D = g->D, L = g->L, P = g->P, MD = M * D;
  for (int64_t m = 0; m < M; m++) {
    int64_t grow = ((n * g->Lq + q) * M + m) * D;
    for (int64_t l = 0; l < L; l++) {
      int64_t vbase = ((n * g->S + g->start[l]) * M + m) * D;
      for (int64_t p = 0; p < P; p++) {
        int64_t i = (((n * g->Lq + q) * M + m) * L + l) * P + p;
        fa_bl_taps t;
        double a = ld(b->attn, i, dbl), gvk[4] = {0, 0, 0, 0}, dA = 0, dx = 0, dy = 0, sx, sy;
        if (msda_taps(g, l, ld(b->loc, 2 * i, dbl), ld(b->loc, 2 * i + 1, dbl), &t, &sx, &sy)) {
          int64_t offs[4];
          fa_bl_offsets(&t, g->W[l], 1, offs);
          for (int k = 0; k < 4; k++) {
            if (!t.in[k]) continue;
            int64_t off = vbase + offs[k] * MD;
            gvk[k] = dbl ? fa_dot_d((const double *)b->gout + grow, (const double *)b->value + off, D)
                         : (double)dot_f((const float *)b->gout + grow, (const float *)b->value + off, D);
          }
          point_grads(&t, sx, sy, a, gvk, &dA, &dx, &dy);
        }
        if (b->gattn) st(b->gattn, i, dA, dbl);
        if (b->gloc) { st(b->gloc, 2 * i, dx, dbl); st(b->gloc, 2 * i + 1, dy, dbl); }
      }
    }
  }
}

static inline __attribute__((always_inline)) void bwd_cpu(const fa_msda_geom *g, int dbl, const msda_bufs *b) {
  int64_t NM = g->N * g->M, D = g->D;
  int64_t work = g->N * g->Lq * g->M * g->L * g->P * (g->D + 8);
  int threads = fa_max_threads();
  int par = work > FA_PARALLEL_GRAIN;
  int points = b->gloc || b->gattn;
  if (!par) threads = 1;
  if (b->gv && (NM >= threads || D <= (dbl ? 8 : 16))) {
    /* fused: one task per (n, m) slice does both */
#pragma omp parallel for schedule(dynamic, 1) if (par && NM > 1)
    for (int64_t t = 0; t < NM; t++) bwd_slice(g, dbl, b, t / g->M, t % g->M, 0, D, points);
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
      bwd_slice(g, dbl, b, nm / g->M, nm % g->M, c0, c1, 0);
    }
  }
  if (points) {
    int64_t rows = g->N * g->Lq;
#pragma omp parallel for schedule(static) if (par)
    for (int64_t r = 0; r < rows; r++) bwd_points_row(g, dbl, b, r / g->Lq, r % g->Lq);
  }
}
static void bwd_f32(const fa_msda_geom *g, const msda_bufs *b) { bwd_cpu(g, 0, b); }
static void bwd_f64(const fa_msda_geom *g, const msda_bufs *b) { bwd_cpu(g, 1, b); }

/* ------------------------------------------------------------------ entry points */
int fa_msda_forward(fa_tensor *out, const fa_tensor *value, const fa_tensor *spatial_shapes,
                    const fa_tensor *level_start_index, const fa_tensor *sampling_locations,
                    const fa_tensor *attention_weights, const fa_msda_opts *opts) {
  static const char *fn = "fa_msda_forward";
  int rc;
  int64_t *lv = NULL;
  fa_msda_geom g;
  rc = msda_check(fn, out, "out", value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                  opts, &g, &lv);
  if (!rc) rc = fa_check_dense(fn, "out", out);
  if (!rc) rc = no_overlap(fn, "out", out, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                           value, NULL);
  if (rc || fa_numel(out) == 0) { free(lv); return rc; }
  const fa_tensor *in[3] = {value, sampling_locations, attention_weights};
  const void *p[3];
  void *tmp[3];
  if (!(rc = fa_dense_inputs(in, 3, p, tmp))) {
    if (g.device >= 0) rc = fa_cu_msda_forward(&g, out->data, p[0], (const float *)p[1], (const float *)p[2]);
    else if (g.dtype == FA_FLOAT64) fwd_f64(&g, out->data, p[0], p[1], p[2]);
    else fwd_f32(&g, out->data, p[0], p[1], p[2]);
  }
  for (int i = 0; i < 3; i++) fa_free(g.device, tmp[i]);
  free(lv);
  return rc;
}

int fa_msda_backward(fa_tensor *grad_value, fa_tensor *grad_sampling_locations, fa_tensor *grad_attention_weights,
                     const fa_tensor *grad_out, const fa_tensor *value, const fa_tensor *spatial_shapes,
                     const fa_tensor *level_start_index, const fa_tensor *sampling_locations,
                     const fa_tensor *attention_weights, const fa_msda_opts *opts) {
  static const char *fn = "fa_msda_backward";
  int rc;
  int64_t *lv = NULL;
  fa_msda_geom g;
  rc = msda_check(fn, grad_out, "grad_out", value, spatial_shapes, level_start_index, sampling_locations,
                  attention_weights, opts, &g, &lv);
  if (!rc) rc = check_output(fn, "grad_value", grad_value, "value", value);
  if (!rc) rc = check_output(fn, "grad_sampling_locations", grad_sampling_locations, "sampling_locations", sampling_locations);
  if (!rc) rc = check_output(fn, "grad_attention_weights", grad_attention_weights, "attention_weights", attention_weights);
  /* every gradient against every input and the other gradients */
  if (!rc) rc = no_overlap(fn, "grad_value", grad_value, spatial_shapes, level_start_index, sampling_locations,
                           attention_weights, value, grad_out);
  if (!rc) rc = no_overlap(fn, "grad_sampling_locations", grad_sampling_locations, spatial_shapes, level_start_index,
                           sampling_locations, attention_weights, value, grad_out);
  if (!rc) rc = no_overlap(fn, "grad_attention_weights", grad_attention_weights, spatial_shapes, level_start_index,
                           sampling_locations, attention_weights, value, grad_out);
  if (!rc && grad_value) rc = fa_check_no_overlap(fn, "grad_sampling_locations", grad_sampling_locations, "grad_value", grad_value);
  if (!rc && grad_value) rc = fa_check_no_overlap(fn, "grad_attention_weights", grad_attention_weights, "grad_value", grad_value);
  if (!rc && grad_sampling_locations)
    rc = fa_check_no_overlap(fn, "grad_attention_weights", grad_attention_weights, "grad_sampling_locations",
                             grad_sampling_locations);
  void *gv = grad_value && fa_numel(grad_value) ? grad_value->data : NULL;
  void *gl = grad_sampling_locations && fa_numel(grad_sampling_locations) ? grad_sampling_locations->data : NULL;
  void *ga = grad_attention_weights && fa_numel(grad_attention_weights) ? grad_attention_weights->data : NULL;
  if (rc || !(gv || gl || ga)) { free(lv); return rc; }
  const fa_tensor *in[4] = {grad_out, value, sampling_locations, attention_weights};
  const void *p[4];
  void *tmp[4];
  if (!(rc = fa_dense_inputs(in, 4, p, tmp))) {
    if (g.device >= 0) {
      rc = fa_cu_msda_backward(&g, gv, (float *)gl, (float *)ga, p[0], p[1], (const float *)p[2], (const float *)p[3]);
    } else {
      msda_bufs b = {gv, gl, ga, p[0], p[1], p[2], p[3]};
      if (g.dtype == FA_FLOAT64) bwd_f64(&g, &b);
      else bwd_f32(&g, &b);
    }
  }
  for (int i = 0; i < 4; i++) fa_free(g.device, tmp[i]);
  free(lv);
  return rc;
}
