/* grid_sample.c: 2-D bilinear grid sampling (PyTorch's F.grid_sample, mode='bilinear'), CPU.
 *
 * input (N, C, H, W), grid (N, Ho, Wo, 2) with (x, y) in [-1, 1] -> out (N, C, Ho, Wo)
 *   with the sampling rules of c/bilinear.h: u = (x + 1) * W / 2 - 0.5 (align_corners: (x + 1) * (W - 1) / 2)
 *   in the input's precision, as PyTorch's CPU kernel, so that points exactly on a pixel centre pick the
 *   same cell; likewise v from y with H; 'zeros' or 'border' padding; out = sum over the 4 taps of
 *   weight * input.
 * backward: grad_input (overwritten) and grad_grid (overwritten); either may be NULL.
 *   grad_input is made by one thread per (n, c) plane, each scattering its own plane in output order:
 *   deterministic, no atomics. grad_grid is a separate pass over output points with a loop over
 *   channels. Every tensor may have any strides. */
/* fp-contract=off: no FMA in the AVX2 clones (FA_HOT_CLONES below), so that the source coordinates are
 * rounded as PyTorch's kernel rounds them (a point on a pixel boundary picks the same cell) and the result
 * does not depend on the machine. Before the includes, so that every function of this file, the inline
 * helpers included, is compiled with the same options. */
#pragma GCC optimize("fp-contract=off")
#include "internal.h"
#include "bilinear.h"
#include <stdlib.h>

static inline double ld(const void *p, int64_t i, int dbl) {
  return dbl ? ((const double *)p)[i] : (double)((const float *)p)[i];
}
static inline void st(void *p, int64_t i, double v, int dbl) {
  if (dbl) ((double *)p)[i] = v;
  else ((float *)p)[i] = (float)v;
}

/* the taps of one sampling point (c/bilinear.h) and du/dgrid_x, dv/dgrid_y */
typedef struct {
  fa_bl_taps b;
  double gxm, gym;
} gs_taps;

static inline void taps(int dbl, double gx, double gy, int64_t H, int64_t W, int border, int align, gs_taps *t) {
  double u = fa_bl_src_signed(dbl, gx, W, align, &t->gxm), v = fa_bl_src_signed(dbl, gy, H, align, &t->gym);
  if (border) {
    u = fa_bl_border(u, W, &t->gxm);
    v = fa_bl_border(v, H, &t->gym);
  }
  if (fa_bl_near(u, v, H, W)) fa_bl_taps_at(u, v, H, W, &t->b);
  else fa_bl_no_taps(&t->b); /* all taps outside (or NaN) */
}

typedef struct {
  int64_t N, C, H, W, Ho, Wo;
  int border, align;
} gs_geom;

static inline void point_taps(int dbl, const gs_geom *g, const fa_tensor *grid, int64_t n, int64_t h, int64_t w,
                              gs_taps *t) {
  const int64_t *s = grid->stride;
  int64_t o = n * s[0] + h * s[1] + w * s[2];
  taps(dbl, ld(grid->data, o, dbl), ld(grid->data, o + s[3], dbl), g->H, g->W, g->border, g->align, t);
}

/* Work is cut into tiles of up to GS_TILE output points of one output row (n, h): the taps of a tile
 * are computed once, then every channel loops over the tile (contiguous along w in the output).
 * The parallel loops are outlined by OpenMP before inlining, so each tile hands the kernels a literal
 * dbl (one branch per tile). */
enum { GS_TILE = 64 };

typedef struct {
  int64_t tiles_per_row, ntiles;
} gs_tiling;

static gs_tiling tiling(const gs_geom *g) {
  gs_tiling t;
  t.tiles_per_row = (g->Wo + GS_TILE - 1) / GS_TILE;
  t.ntiles = g->N * g->Ho * t.tiles_per_row;
  return t;
}

/* tile k -> (n, h, w0, nw) */
static inline void tile_of(const gs_geom *g, const gs_tiling *tl, int64_t k, int64_t *n, int64_t *h, int64_t *w0,
                           int *nw) {
  int64_t row = k / tl->tiles_per_row;
  *n = row / g->Ho;
  *h = row % g->Ho;
  *w0 = (k % tl->tiles_per_row) * GS_TILE;
  *nw = (int)(g->Wo - *w0 < GS_TILE ? g->Wo - *w0 : GS_TILE);
}

/* ------------------------------------------------------------------ forward */
static inline __attribute__((always_inline)) void gs_fwd_tile(int dbl, const gs_geom *g, fa_tensor *out,
                                                              const fa_tensor *input, const fa_tensor *grid, int64_t n,
                                                              int64_t h, int64_t w0, int nw) {
  const int64_t *si = input->stride, *so = out->stride;
  gs_taps t[GS_TILE];
  int64_t off[GS_TILE][4];
  for (int i = 0; i < nw; i++) {
    point_taps(dbl, g, grid, n, h, w0 + i, &t[i]);
    fa_bl_offsets(&t[i].b, si[2], si[3], off[i]);
  }
  int es = dbl ? 8 : 4;
  for (int64_t c = 0; c < g->C; c++) {
    const char *ip = (const char *)input->data + (n * si[0] + c * si[1]) * es;
    int64_t ob = n * so[0] + c * so[1] + h * so[2] + w0 * so[3];
    for (int i = 0; i < nw; i++) {
      double v = 0;
      for (int k = 0; k < 4; k++) /* taps outside are skipped, not multiplied by 0: inf/NaN elsewhere stay out */
        if (t[i].b.in[k]) v += t[i].b.w[k] * ld(ip, off[i][k], dbl);
      st(out->data, ob + i * so[3], v, dbl);
    }
  }
}

/* the tile kernels with a literal dbl, compiled for AVX2 and the baseline (FA_HOT_CLONES), picked at load
 * time; called from the parallel loops */
FA_HOT_CLONES static void gs_fwd_tile_any(int dbl, const gs_geom *g, fa_tensor *out, const fa_tensor *input,
                                          const fa_tensor *grid, int64_t n, int64_t h, int64_t w0, int nw) {
  if (dbl) gs_fwd_tile(1, g, out, input, grid, n, h, w0, nw);
  else gs_fwd_tile(0, g, out, input, grid, n, h, w0, nw);
}

static void gs_forward_cpu(int dbl, const gs_geom *g, fa_tensor *out, const fa_tensor *input, const fa_tensor *grid) {
  gs_tiling tl = tiling(g);
#pragma omp parallel for schedule(static) if (g->N * g->Ho * g->Wo * g->C > FA_PARALLEL_GRAIN / 4)
  for (int64_t k = 0; k < tl.ntiles; k++) {
    int64_t n, h, w0;
    int nw;
    tile_of(g, &tl, k, &n, &h, &w0, &nw);
    gs_fwd_tile_any(dbl, g, out, input, grid, n, h, w0, nw);
  }
}

/* ------------------------------------------------------------------ backward */
/* one precomputed tap set per output point: grad_input offsets (-1 where outside) and weights */
typedef struct {
  int64_t off[4];
  double w[4];
} gs_scatter;

static inline __attribute__((always_inline)) void gs_scatter_tile(int dbl, const gs_geom *g, const fa_tensor *gin,
                                                                  const fa_tensor *grid, gs_scatter *sc, int64_t n,
                                                                  int64_t h, int64_t w0, int nw) {
  for (int i = 0; i < nw; i++) {
    gs_taps t;
    gs_scatter *s = &sc[(n * g->Ho + h) * g->Wo + w0 + i];
    point_taps(dbl, g, grid, n, h, w0 + i, &t);
    fa_bl_offsets(&t.b, gin->stride[2], gin->stride[3], s->off);
    for (int k = 0; k < 4; k++) {
      s->w[k] = t.b.w[k];
      if (!t.b.in[k]) s->off[k] = -1;
    }
  }
}

/* plane (n, c) of grad_input: zeroed, then filled in output-point order by one thread */
static inline __attribute__((always_inline)) void gs_gin_plane(int dbl, const gs_geom *g, fa_tensor *gin,
                                                               const fa_tensor *gout, const gs_scatter *sc, int64_t n,
                                                               int64_t c) {
  const int64_t *sgi = gin->stride, *sgo = gout->stride;
  char *plane = (char *)gin->data + (n * sgi[0] + c * sgi[1]) * (dbl ? 8 : 4);
  for (int64_t y = 0; y < g->H; y++)
    for (int64_t x = 0; x < g->W; x++) st(plane, y * sgi[2] + x * sgi[3], 0.0, dbl);
  const char *gop = (const char *)gout->data + (n * sgo[0] + c * sgo[1]) * (dbl ? 8 : 4);
  const gs_scatter *s = sc + n * g->Ho * g->Wo;
  for (int64_t h = 0; h < g->Ho; h++)
    for (int64_t w = 0; w < g->Wo; w++, s++) {
      double go = ld(gop, h * sgo[2] + w * sgo[3], dbl);
      for (int k = 0; k < 4; k++)
        if (s->off[k] >= 0) st(plane, s->off[k], ld(plane, s->off[k], dbl) + s->w[k] * go, dbl);
    }
}

/* grad_grid of one tile: sums over channels of the bilinear derivatives */
static inline __attribute__((always_inline)) void gs_ggrid_tile(int dbl, const gs_geom *g, fa_tensor *ggrid,
                                                                const fa_tensor *gout, const fa_tensor *input,
                                                                const fa_tensor *grid, int64_t n, int64_t h, int64_t w0,
                                                                int nw) {
  const int64_t *si = input->stride, *sgo = gout->stride, *sg = ggrid->stride;
  gs_taps t[GS_TILE];
  int64_t off[GS_TILE][4];
  double gx[GS_TILE], gy[GS_TILE];
  for (int i = 0; i < nw; i++) {
    point_taps(dbl, g, grid, n, h, w0 + i, &t[i]);
    fa_bl_offsets(&t[i].b, si[2], si[3], off[i]);
    gx[i] = gy[i] = 0;
  }
  int es = dbl ? 8 : 4;
  for (int64_t c = 0; c < g->C; c++) {
    const char *ip = (const char *)input->data + (n * si[0] + c * si[1]) * es;
    const char *gop = (const char *)gout->data + (n * sgo[0] + c * sgo[1] + h * sgo[2] + w0 * sgo[3]) * es;
    for (int i = 0; i < nw; i++) {
      double v[4], go = ld(gop, i * sgo[3], dbl);
      for (int k = 0; k < 4; k++) v[k] = t[i].b.in[k] ? ld(ip, off[i][k], dbl) : 0.0;
      gx[i] += fa_bl_du(v, t[i].b.fy) * go;
      gy[i] += fa_bl_dv(v, t[i].b.fx) * go;
    }
  }
  for (int i = 0; i < nw; i++) {
    int64_t o = n * sg[0] + h * sg[1] + (w0 + i) * sg[2];
    st(ggrid->data, o, gx[i] * t[i].gxm, dbl);
    st(ggrid->data, o + sg[3], gy[i] * t[i].gym, dbl);
  }
}

/* the backward kernels with a literal dbl, compiled for AVX2 and the baseline (FA_HOT_CLONES) */
FA_HOT_CLONES static void gs_scatter_tile_any(int dbl, const gs_geom *g, const fa_tensor *gin, const fa_tensor *grid,
                                              gs_scatter *sc, int64_t n, int64_t h, int64_t w0, int nw) {
  if (dbl) gs_scatter_tile(1, g, gin, grid, sc, n, h, w0, nw);
  else gs_scatter_tile(0, g, gin, grid, sc, n, h, w0, nw);
}
FA_HOT_CLONES static void gs_gin_plane_any(int dbl, const gs_geom *g, fa_tensor *gin, const fa_tensor *gout,
                                           const gs_scatter *sc, int64_t n, int64_t c) {
  if (dbl) gs_gin_plane(1, g, gin, gout, sc, n, c);
  else gs_gin_plane(0, g, gin, gout, sc, n, c);
}
FA_HOT_CLONES static void gs_ggrid_tile_any(int dbl, const gs_geom *g, fa_tensor *ggrid, const fa_tensor *gout,
                                            const fa_tensor *input, const fa_tensor *grid, int64_t n, int64_t h,
                                            int64_t w0, int nw) {
  if (dbl) gs_ggrid_tile(1, g, ggrid, gout, input, grid, n, h, w0, nw);
  else gs_ggrid_tile(0, g, ggrid, gout, input, grid, n, h, w0, nw);
}

static void gs_backward_cpu(int dbl, const gs_geom *g, fa_tensor *gin, fa_tensor *ggrid, const fa_tensor *gout,
                            const fa_tensor *input, const fa_tensor *grid, gs_scatter *sc) {
  gs_tiling tl = tiling(g);
  int64_t P = g->Ho * g->Wo, work = g->N * P * g->C;
  if (gin) {
#pragma omp parallel for schedule(static) if (g->N * P > FA_PARALLEL_GRAIN / 4)
    for (int64_t k = 0; k < tl.ntiles; k++) {
      int64_t n, h, w0;
      int nw;
      tile_of(g, &tl, k, &n, &h, &w0, &nw);
      gs_scatter_tile_any(dbl, g, gin, grid, sc, n, h, w0, nw);
    }
#pragma omp parallel for schedule(static) if (work > FA_PARALLEL_GRAIN / 4)
    for (int64_t nc = 0; nc < g->N * g->C; nc++) {
      gs_gin_plane_any(dbl, g, gin, gout, sc, nc / g->C, nc % g->C);
    }
  }
  if (ggrid) {
#pragma omp parallel for schedule(static) if (work > FA_PARALLEL_GRAIN / 4)
    for (int64_t k = 0; k < tl.ntiles; k++) {
      int64_t n, h, w0;
      int nw;
      tile_of(g, &tl, k, &n, &h, &w0, &nw);
      gs_ggrid_tile_any(dbl, g, ggrid, gout, input, grid, n, h, w0, nw);
    }
  }
}

/* ------------------------------------------------------------------ validation */
static int check_inputs(const char *fn, const fa_tensor *input, const fa_tensor *grid, int padding, gs_geom *g) {
  int rc;
  if ((rc = fa_check_ndim(fn, "input", input, 4)) || (rc = fa_check_float_dtype(fn, "input", input))) return rc;
  if ((rc = fa_check_ndim(fn, "grid", grid, 4)) || (rc = fa_check_same_device(fn, "grid", grid, "input", input)) ||
      (rc = fa_check_same_dtype(fn, "grid", grid, "input", input)))
    return rc;
  char a[256], b[256];
  if (grid->shape[3] != 2)
    return fa_error(FA_ERR_ARG, "%s: argument 'grid': expected shape (N, Ho, Wo, 2) with (x, y) last, got %s", fn,
                    fa_shape_str(grid, a));
  if (grid->shape[0] != input->shape[0])
    return fa_error(FA_ERR_ARG, "%s: argument 'grid': expected batch size %lld (as 'input' of shape %s), got shape %s", fn,
                    (long long)input->shape[0], fa_shape_str(input, a), fa_shape_str(grid, b));
  if (padding != FA_PAD_ZEROS && padding != FA_PAD_BORDER)
    return fa_error(FA_ERR_ARG, "%s: argument 'padding': expected FA_PAD_ZEROS (0) or FA_PAD_BORDER (1), got %d", fn, padding);
  if ((input->shape[2] == 0 || input->shape[3] == 0) && fa_numel(grid) > 0)
    return fa_error(FA_ERR_ARG, "%s: argument 'input': expected non-empty spatial dimensions, got shape %s", fn,
                    fa_shape_str(input, a));
  g->N = input->shape[0];
  g->C = input->shape[1];
  g->H = input->shape[2];
  g->W = input->shape[3];
  g->Ho = grid->shape[1];
  g->Wo = grid->shape[2];
  g->border = padding == FA_PAD_BORDER;
  return 0;
}

/* t has shape (N, C, Ho, Wo) */
static int check_out_shape(const char *fn, const char *arg, const fa_tensor *t, const gs_geom *g) {
  int rc;
  if ((rc = fa_check_ndim(fn, arg, t, 4))) return rc;
  if (t->shape[0] != g->N || t->shape[1] != g->C || t->shape[2] != g->Ho || t->shape[3] != g->Wo) {
    char b[256];
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected shape (%lld, %lld, %lld, %lld) (N, C, Ho, Wo), got %s", fn, arg,
                    (long long)g->N, (long long)g->C, (long long)g->Ho, (long long)g->Wo, fa_shape_str(t, b));
  }
  return 0;
}

int fa_grid_sample_forward(fa_tensor *out, const fa_tensor *input, const fa_tensor *grid, int padding, int align_corners) {
  static const char *fn = "fa_grid_sample_forward";
  int rc;
  gs_geom g;
  if ((rc = check_inputs(fn, input, grid, padding, &g))) return rc;
  g.align = align_corners != 0;
  if ((rc = fa_check_like(fn, "out", out, "input", input)) || (rc = check_out_shape(fn, "out", out, &g))) return rc;
  if (input->device >= 0) return fa_cu_grid_sample_forward(out, input, grid, padding, align_corners);
  if (fa_numel(out) == 0) return 0;
  gs_forward_cpu(input->dtype == FA_FLOAT64, &g, out, input, grid);
  return 0;
}

int fa_grid_sample_backward(fa_tensor *grad_input, fa_tensor *grad_grid, const fa_tensor *grad_out,
                            const fa_tensor *input, const fa_tensor *grid, int padding, int align_corners) {
  static const char *fn = "fa_grid_sample_backward";
  int rc;
  gs_geom g;
  if ((rc = check_inputs(fn, input, grid, padding, &g))) return rc;
  g.align = align_corners != 0;
  if ((rc = fa_check_like(fn, "grad_out", grad_out, "input", input)) || (rc = check_out_shape(fn, "grad_out", grad_out, &g)))
    return rc;
  if (grad_input && ((rc = fa_check_like(fn, "grad_input", grad_input, "input", input)) ||
                     (rc = fa_check_same_shape(fn, "grad_input", grad_input, "input", input))))
    return rc;
  if (grad_grid && ((rc = fa_check_like(fn, "grad_grid", grad_grid, "grid", grid)) ||
                    (rc = fa_check_same_shape(fn, "grad_grid", grad_grid, "grid", grid))))
    return rc;
  if (input->device >= 0)
    return fa_cu_grid_sample_backward(grad_input, grad_grid, grad_out, input, grid, padding, align_corners);
  gs_scatter *sc = NULL;
  if (grad_input && fa_numel(grad_input) > 0 && fa_numel(grid) > 0 &&
      !(sc = fa_alloc(FA_CPU, g.N * g.Ho * g.Wo * (int64_t)sizeof(gs_scatter))))
    return FA_ERR_MEMORY;
  if (grad_input && !sc) { /* nothing samples the input: its gradient is zero */
    if ((rc = fa_fill(grad_input, 0))) return rc;
    grad_input = NULL;
  }
  gs_backward_cpu(input->dtype == FA_FLOAT64, &g, grad_input, grad_grid, grad_out, input, grid, sc);
  fa_free(FA_CPU, sc);
  return 0;
}
