/* conv2d_winograd.c: the Winograd F(4x4, 3x3) convolution of c/conv2d.c (which validates and picks it). */
#include "conv2d.h"

/* ------------------------------------------------------------------ Winograd F(4x4, 3x3) */
/* Y = A^T [(G w G^T) . (B^T d B)] A on 6x6 input tiles d, 4x4 output tiles Y (Lavin & Gray's matrices,
 * interpolation points 0, +-1, +-2, inf). The tile math runs in double on LW tiles at a time (lanes, which
 * the compiler vectorises) for both dtypes: the float32 path then loses accuracy only in the GEMMs. */
enum { LW = 16 };

/* 1-D transforms of 6 (or 3, 4) lane vectors; in/out stride is `st` lane vectors */
static inline void bt6(double *o, const double *d, int st) { /* B^T d */
  for (int l = 0; l < LW; l++) {
    double d0 = d[0 * st * LW + l], d1 = d[1 * st * LW + l], d2 = d[2 * st * LW + l], d3 = d[3 * st * LW + l],
           d4 = d[4 * st * LW + l], d5 = d[5 * st * LW + l];
    o[0 * st * LW + l] = 4 * d0 - 5 * d2 + d4;
    o[1 * st * LW + l] = -4 * (d1 + d2) + d3 + d4;
    o[2 * st * LW + l] = 4 * (d1 - d2) - d3 + d4;
    o[3 * st * LW + l] = 2 * (d3 - d1) - d2 + d4;
    o[4 * st * LW + l] = 2 * (d1 - d3) - d2 + d4;
    o[5 * st * LW + l] = 4 * d1 - 5 * d3 + d5;
  }
}
static inline void b6(double *o, const double *v, int st) { /* B v: the adjoint of bt6 */
  for (int l = 0; l < LW; l++) {
    double v0 = v[0 * st * LW + l], v1 = v[1 * st * LW + l], v2 = v[2 * st * LW + l], v3 = v[3 * st * LW + l],
           v4 = v[4 * st * LW + l], v5 = v[5 * st * LW + l];
    o[0 * st * LW + l] = 4 * v0;
    o[1 * st * LW + l] = 4 * (v2 - v1) + 2 * (v4 - v3) + 4 * v5;
    o[2 * st * LW + l] = -5 * v0 - 4 * (v1 + v2) - v3 - v4;
    o[3 * st * LW + l] = v1 - v2 + 2 * (v3 - v4) - 5 * v5;
    o[4 * st * LW + l] = v0 + v1 + v2 + v3 + v4;
    o[5 * st * LW + l] = v5;
  }
}
static inline void at6(double *o, const double *m, int sti, int sto) { /* A^T m: 6 -> 4 */
  for (int l = 0; l < LW; l++) {
    double m0 = m[0 * sti * LW + l], m1 = m[1 * sti * LW + l], m2 = m[2 * sti * LW + l], m3 = m[3 * sti * LW + l],
           m4 = m[4 * sti * LW + l], m5 = m[5 * sti * LW + l];
    double p12 = m1 + m2, n12 = m1 - m2, p34 = m3 + m4, n34 = m3 - m4;
    o[0 * sto * LW + l] = m0 + p12 + p34;
    o[1 * sto * LW + l] = n12 + 2 * n34;
    o[2 * sto * LW + l] = p12 + 4 * p34;
    o[3 * sto * LW + l] = n12 + 8 * n34 + m5;
  }
}
static inline void a6(double *o, const double *y, int sti, int sto) { /* A y: 4 -> 6, the adjoint of at6 */
  for (int l = 0; l < LW; l++) {
    double y0 = y[0 * sti * LW + l], y1 = y[1 * sti * LW + l], y2 = y[2 * sti * LW + l], y3 = y[3 * sti * LW + l];
    o[0 * sto * LW + l] = y0;
    o[1 * sto * LW + l] = y0 + y1 + y2 + y3;
    o[2 * sto * LW + l] = y0 - y1 + y2 - y3;
    o[3 * sto * LW + l] = y0 + 2 * y1 + 4 * y2 + 8 * y3;
    o[4 * sto * LW + l] = y0 - 2 * y1 + 4 * y2 - 8 * y3;
    o[5 * sto * LW + l] = y3;
  }
}
static inline void g3(double *o, const double *w, int sti, int sto) { /* G w: 3 -> 6 */
  for (int l = 0; l < LW; l++) {
    double w0 = w[0 * sti * LW + l], w1 = w[1 * sti * LW + l], w2 = w[2 * sti * LW + l];
    o[0 * sto * LW + l] = w0 / 4;
    o[1 * sto * LW + l] = -(w0 + w1 + w2) / 6;
    o[2 * sto * LW + l] = -(w0 - w1 + w2) / 6;
    o[3 * sto * LW + l] = w0 / 24 + w1 / 12 + w2 / 6;
    o[4 * sto * LW + l] = w0 / 24 - w1 / 12 + w2 / 6;
    o[5 * sto * LW + l] = w2;
  }
}
static inline void gt6(double *o, const double *u, int sti, int sto) { /* G^T u: 6 -> 3, the adjoint of g3 */
  for (int l = 0; l < LW; l++) {
    double u0 = u[0 * sti * LW + l], u1 = u[1 * sti * LW + l], u2 = u[2 * sti * LW + l], u3 = u[3 * sti * LW + l],
           u4 = u[4 * sti * LW + l], u5 = u[5 * sti * LW + l];
    o[0 * sto * LW + l] = u0 / 4 - (u1 + u2) / 6 + (u3 + u4) / 24;
    o[1 * sto * LW + l] = (u2 - u1) / 6 + (u3 - u4) / 12;
    o[2 * sto * LW + l] = (u3 + u4 - u1 - u2) / 6 + u5;
  }
}

/* Tiles: output tile (th, tw) covers rows 4th..4th+3, columns 4tw..4tw+3; its input tile starts at
 * (4th - ph, 4tw - pw). A block holds whole tile rows R (R = n*nth + th) in [R0, R1); within a block tile
 * (R, tw) has index t = (R - R0)*ntw + tw and transformed arrays are (36, channels, TBb). */
typedef struct wino {
  int64_t nth, ntw, TBb, R0;
} wino;

/* V[xi][c][t] for the tiles of row R of channel c: xc is channel c of image n (H, W); v points at
 * V + c*TBb + t(R, 0); xi planes are vs apart */
SIMD_CLONES static void wino_input_row(int dbl, const void *xc, void *v, int64_t vs, const geom *g, int64_t th, int64_t ntw) {
  double d[36 * LW], t[36 * LW];
  for (int64_t tw0 = 0; tw0 < ntw; tw0 += LW) {
    int64_t L = imin(LW, ntw - tw0);
    for (int r = 0; r < 6; r++) {
      int64_t hi = th * 4 - g->ph + r;
      for (int s = 0; s < 6; s++) {
        double *dd = d + (r * 6 + s) * LW;
        int64_t off = s - g->pw, lo = 0, hv = 0;
        if (hi >= 0 && hi < g->H) valid_cols(g->W, 4, off, tw0, L, &lo, &hv);
        for (int64_t l = 0; l < LW; l++) dd[l] = 0;
        if (dbl) { const double *p = (const double *)xc + hi * g->W + tw0 * 4 + off; for (int64_t l = lo; l < hv; l++) dd[l] = p[l * 4]; }
        else { const float *p = (const float *)xc + hi * g->W + tw0 * 4 + off; for (int64_t l = lo; l < hv; l++) dd[l] = p[l * 4]; }
      }
    }
    for (int s = 0; s < 6; s++) bt6(t + s * LW, d + s * LW, 6);   /* columns: t = B^T d */
    for (int i = 0; i < 6; i++) bt6(d + i * 6 * LW, t + i * 6 * LW, 1); /* rows: d = t B */
    for (int e = 0; e < 36; e++) {
      if (dbl) { double *p = (double *)v + e * vs + tw0; for (int64_t l = 0; l < L; l++) p[l] = d[e * LW + l]; }
      else { float *p = (float *)v + e * vs + tw0; for (int64_t l = 0; l < L; l++) p[l] = (float)d[e * LW + l]; }
    }
  }
}

/* out rows of tile row th of output plane yo from M[xi][o][t] (m points at M + o*TBb + t(R, 0)), + bias */
SIMD_CLONES static void wino_output_row(int dbl, const void *m, int64_t ms, void *yo, double bias, const geom *g, int64_t th, int64_t ntw) {
  double a[36 * LW], t[24 * LW];
  for (int64_t tw0 = 0; tw0 < ntw; tw0 += LW) {
    int64_t L = imin(LW, ntw - tw0);
    for (int e = 0; e < 36; e++) {
      double *aa = a + e * LW;
      if (dbl) { const double *p = (const double *)m + e * ms + tw0; for (int64_t l = 0; l < L; l++) aa[l] = p[l]; }
      else { const float *p = (const float *)m + e * ms + tw0; for (int64_t l = 0; l < L; l++) aa[l] = p[l]; }
      for (int64_t l = L; l < LW; l++) aa[l] = 0;
    }
    for (int j = 0; j < 6; j++) at6(t + j * LW, a + j * LW, 6, 6);       /* t (4 rows, 6 cols) = A^T a */
    for (int i = 0; i < 4; i++) at6(a + i * 4 * LW, t + i * 6 * LW, 1, 1); /* a (4x4) = t A */
    for (int i = 0; i < 4; i++) {
      int64_t ho = th * 4 + i;
      if (ho >= g->Ho) break;
      for (int64_t l = 0; l < L; l++)
        for (int j = 0; j < 4; j++) {
          int64_t wo = (tw0 + l) * 4 + j;
          if (wo >= g->Wo) break;
          if (dbl) ((double *)yo)[ho * g->Wo + wo] = a[(i * 4 + j) * LW + l] + bias;
          else ((float *)yo)[ho * g->Wo + wo] = (float)(a[(i * 4 + j) * LW + l] + bias);
        }
    }
  }
}

/* dM[xi][o][t] = A gy A^T of the 4x4 gradient tiles of row th of gradient plane gyo (0 past Ho, Wo) */
SIMD_CLONES static void wino_grad_output_row(int dbl, const void *gyo, void *m, int64_t ms, const geom *g, int64_t th, int64_t ntw) {
  double y[16 * LW], t[24 * LW], a[36 * LW];
  for (int64_t tw0 = 0; tw0 < ntw; tw0 += LW) {
    int64_t L = imin(LW, ntw - tw0);
    for (int i = 0; i < 4; i++)
      for (int j = 0; j < 4; j++) {
        double *yy = y + (i * 4 + j) * LW;
        int64_t ho = th * 4 + i;
        for (int64_t l = 0; l < LW; l++) {
          int64_t wo = (tw0 + l) * 4 + j;
          yy[l] = 0;
          if (l < L && ho < g->Ho && wo < g->Wo)
            yy[l] = dbl ? ((const double *)gyo)[ho * g->Wo + wo] : ((const float *)gyo)[ho * g->Wo + wo];
        }
      }
    for (int j = 0; j < 4; j++) a6(t + j * LW, y + j * LW, 4, 4);     /* t (6 rows, 4 cols) = A y */
    for (int i = 0; i < 6; i++) a6(a + i * 6 * LW, t + i * 4 * LW, 1, 1); /* a (6x6) = t A^T */
    for (int e = 0; e < 36; e++) {
      if (dbl) { double *p = (double *)m + e * ms + tw0; for (int64_t l = 0; l < L; l++) p[l] = a[e * LW + l]; }
      else { float *p = (float *)m + e * ms + tw0; for (int64_t l = 0; l < L; l++) p[l] = (float)a[e * LW + l]; }
    }
  }
}

/* gxc (channel c of image n) += B dV B^T of the tiles of row th; tiles overlap, so lanes add in order */
SIMD_CLONES static void wino_grad_input_row(int dbl, const void *v, int64_t vs, void *gxc, const geom *g, int64_t th, int64_t ntw) {
  double a[36 * LW], t[36 * LW];
  for (int64_t tw0 = 0; tw0 < ntw; tw0 += LW) {
    int64_t L = imin(LW, ntw - tw0);
    for (int e = 0; e < 36; e++) {
      double *aa = a + e * LW;
      if (dbl) { const double *p = (const double *)v + e * vs + tw0; for (int64_t l = 0; l < L; l++) aa[l] = p[l]; }
      else { const float *p = (const float *)v + e * vs + tw0; for (int64_t l = 0; l < L; l++) aa[l] = p[l]; }
      for (int64_t l = L; l < LW; l++) aa[l] = 0;
    }
    for (int s = 0; s < 6; s++) b6(t + s * LW, a + s * LW, 6);
    for (int i = 0; i < 6; i++) b6(a + i * 6 * LW, t + i * 6 * LW, 1);
    for (int r = 0; r < 6; r++) {
      int64_t hi = th * 4 - g->ph + r;
      if (hi < 0 || hi >= g->H) continue;
      for (int64_t l = 0; l < L; l++)
        for (int s = 0; s < 6; s++) {
          int64_t wi = (tw0 + l) * 4 - g->pw + s;
          if (wi < 0 || wi >= g->W) continue;
          if (dbl) ((double *)gxc)[hi * g->W + wi] += a[(r * 6 + s) * LW + l];
          else ((float *)gxc)[hi * g->W + wi] += (float)a[(r * 6 + s) * LW + l];
        }
    }
  }
}

/* U[xi][o][c] = (G w[o][c] G^T)[xi] for all c of output channel o (w is (O, Cg, 3, 3)) */
SIMD_CLONES static void wino_weight(int dbl, const void *w, void *U, const geom *g, int64_t o) {
  double k[9 * LW], t[18 * LW], u[36 * LW];
  int64_t OC = g->O * g->Cg;
  for (int64_t c0 = 0; c0 < g->Cg; c0 += LW) {
    int64_t L = imin(LW, g->Cg - c0);
    for (int e = 0; e < 9; e++)
      for (int64_t l = 0; l < LW; l++) {
        int64_t i = (o * g->Cg + c0 + l) * 9 + e;
        k[e * LW + l] = l >= L ? 0 : dbl ? ((const double *)w)[i] : ((const float *)w)[i];
      }
    for (int j = 0; j < 3; j++) g3(t + j * LW, k + j * LW, 3, 3);     /* t (6 rows, 3 cols) = G k */
    for (int i = 0; i < 6; i++) g3(u + i * 6 * LW, t + i * 3 * LW, 1, 1); /* u (6x6) = t G^T */
    for (int e = 0; e < 36; e++) {
      int64_t base = e * OC + o * g->Cg + c0;
      if (dbl) { for (int64_t l = 0; l < L; l++) ((double *)U)[base + l] = u[e * LW + l]; }
      else { for (int64_t l = 0; l < L; l++) ((float *)U)[base + l] = (float)u[e * LW + l]; }
    }
  }
}

/* gw[o][c] += G^T dU[.][o][c] G */
SIMD_CLONES static void wino_grad_weight(int dbl, const void *dU, void *gw, const geom *g, int64_t o) {
  double u[36 * LW], t[18 * LW], k[9 * LW];
  int64_t OC = g->O * g->Cg;
  for (int64_t c0 = 0; c0 < g->Cg; c0 += LW) {
    int64_t L = imin(LW, g->Cg - c0);
    for (int e = 0; e < 36; e++) {
      int64_t base = e * OC + o * g->Cg + c0;
      for (int64_t l = 0; l < LW; l++)
        u[e * LW + l] = l >= L ? 0 : dbl ? ((const double *)dU)[base + l] : ((const float *)dU)[base + l];
    }
    for (int j = 0; j < 6; j++) gt6(t + j * LW, u + j * LW, 6, 6);     /* t (3 rows, 6 cols) = G^T u */
    for (int i = 0; i < 3; i++) gt6(k + i * 3 * LW, t + i * 6 * LW, 1, 1); /* k (3x3) = t G */
    for (int e = 0; e < 9; e++)
      for (int64_t l = 0; l < L; l++) {
        int64_t i = (o * g->Cg + c0 + l) * 9 + e;
        if (dbl) ((double *)gw)[i] += k[e * LW + l];
        else ((float *)gw)[i] += (float)k[e * LW + l];
      }
  }
}

int fa_conv2d_wino_applies(const geom *g) {
  return g->kh == 3 && g->kw == 3 && g->sh == 1 && g->sw == 1 && g->dh == 1 && g->dw == 1;
}

/* tile rows per block: the transformed tiles of a block (36 * TBb * (C + O) elements) stay near 48 MB */
static int64_t wino_rows_per_block(const geom *g, int64_t es, int64_t ntw, int64_t rows) {
  int64_t per_row = 36 * ntw * (g->C + g->O) * es;
  return imax(1, imin(rows, ((int64_t)48 << 20) / imax(per_row, 1)));
}

/* the 36*G GEMMs of a block: one per OpenMP thread with single-threaded BLAS when there are enough,
 * else one after another with BLAS's threads */
static int wino_jobs_parallel(int64_t njobs, double flops) { return fa_max_threads() > 1 && njobs >= fa_max_threads() && flops > 1e6; }

int fa_conv2d_wino_forward(int dbl, const void *x, const void *w, const fa_tensor *bias, void *out, const geom *g) {
  int64_t es = dbl ? 8 : 4, nth = cdiv(g->Ho, 4), ntw = cdiv(g->Wo, 4), rows = g->N * nth;
  int64_t rpb = wino_rows_per_block(g, es, ntw, rows), TBmax = rpb * ntw;
  size_t szU = align64((size_t)(36 * g->O * g->Cg * es)), szV = align64((size_t)(36 * g->C * TBmax * es));
  size_t szM = align64((size_t)(36 * g->O * TBmax * es));
  char *ws = (char *)fa_conv2d_workspace(szU + szV + szM);
  if (!ws) return FA_ERR_MEMORY;
  char *U = ws, *V = ws + szU, *M = ws + szU + szV;
  int64_t HW = g->H * g->W, HoWo = g->Ho * g->Wo, njobs = 36 * g->G;
#pragma omp parallel for schedule(static) if (36 * g->O * g->Cg > FA_PARALLEL_GRAIN)
  for (int64_t o = 0; o < g->O; o++) wino_weight(dbl, w, U, g, o);
  for (int64_t R0 = 0; R0 < rows; R0 += rpb) {
    int64_t R1 = imin(rows, R0 + rpb), TBb = (R1 - R0) * ntw;
#pragma omp parallel for collapse(2) schedule(static) if (36 * g->C * TBb > FA_PARALLEL_GRAIN)
    for (int64_t c = 0; c < g->C; c++)
      for (int64_t R = R0; R < R1; R++) {
        int64_t n = R / nth, th = R % nth;
        wino_input_row(dbl, (const char *)x + (n * g->C + c) * HW * es, V + (c * TBb + (R - R0) * ntw) * es, g->C * TBb, g, th, ntw);
      }
    if (wino_jobs_parallel(njobs, 2.0 * (double)(g->Og * g->Cg * TBb) * (double)njobs)) {
#pragma omp parallel for schedule(dynamic, 1)
      for (int64_t j = 0; j < njobs; j++) {
        int64_t e = j / g->G, gi = j % g->G;
        fa_cpu_gemm(dbl, 0, 0, g->Og, TBb, g->Cg, 1, U + (e * g->O + gi * g->Og) * g->Cg * es, g->Cg,
                    V + (e * g->C + gi * g->Cg) * TBb * es, TBb, 0, M + (e * g->O + gi * g->Og) * TBb * es, TBb);
      }
    } else {
      for (int64_t j = 0; j < njobs; j++) {
        int64_t e = j / g->G, gi = j % g->G;
        fa_cpu_gemm_par(dbl, 0, 0, g->Og, TBb, g->Cg, 1, U + (e * g->O + gi * g->Og) * g->Cg * es, g->Cg,
                    V + (e * g->C + gi * g->Cg) * TBb * es, TBb, 0, M + (e * g->O + gi * g->Og) * TBb * es, TBb);
      }
    }
#pragma omp parallel for collapse(2) schedule(static) if (36 * g->O * TBb > FA_PARALLEL_GRAIN)
    for (int64_t o = 0; o < g->O; o++)
      for (int64_t R = R0; R < R1; R++) {
        int64_t n = R / nth, th = R % nth;
        double b = !bias ? 0 : dbl ? ((const double *)bias->data)[o * bias->stride[0]] : ((const float *)bias->data)[o * bias->stride[0]];
        wino_output_row(dbl, M + (o * TBb + (R - R0) * ntw) * es, g->O * TBb, (char *)out + (n * g->O + o) * HoWo * es, b, g, th, ntw);
      }
  }
  return 0;
}

int fa_conv2d_wino_backward(int dbl, void *gx, void *gw, const void *gy, const void *x, const void *w, const geom *g) {
  int64_t es = dbl ? 8 : 4, nth = cdiv(g->Ho, 4), ntw = cdiv(g->Wo, 4), rows = g->N * nth;
  int64_t rpb = wino_rows_per_block(g, es, ntw, rows), TBmax = rpb * ntw;
  size_t szU = align64((size_t)(36 * g->O * g->Cg * es)), szV = align64((size_t)(36 * g->C * TBmax * es));
  size_t szM = align64((size_t)(36 * g->O * TBmax * es));
  char *ws = (char *)fa_conv2d_workspace(szU * (gw ? 2 : 1) + szV + szM);
  if (!ws) return FA_ERR_MEMORY;
  char *U = ws, *V = ws + szU, *M = ws + szU + szV, *dU = gw ? ws + szU + szV + szM : NULL;
  int64_t HW = g->H * g->W, HoWo = g->Ho * g->Wo, njobs = 36 * g->G;
  if (gx) {
    memset(gx, 0, (size_t)(g->N * g->C * HW * es));
#pragma omp parallel for schedule(static) if (36 * g->O * g->Cg > FA_PARALLEL_GRAIN)
    for (int64_t o = 0; o < g->O; o++) wino_weight(dbl, w, U, g, o);
  }
  if (gw) memset(dU, 0, szU);
  for (int64_t R0 = 0; R0 < rows; R0 += rpb) {
    int64_t R1 = imin(rows, R0 + rpb), TBb = (R1 - R0) * ntw;
#pragma omp parallel for collapse(2) schedule(static) if (36 * g->O * TBb > FA_PARALLEL_GRAIN)
    for (int64_t o = 0; o < g->O; o++)
      for (int64_t R = R0; R < R1; R++) {
        int64_t n = R / nth, th = R % nth;
        wino_grad_output_row(dbl, (const char *)gy + (n * g->O + o) * HoWo * es, M + (o * TBb + (R - R0) * ntw) * es, g->O * TBb, g, th, ntw);
      }
    if (gw) {
#pragma omp parallel for collapse(2) schedule(static) if (36 * g->C * TBb > FA_PARALLEL_GRAIN)
      for (int64_t c = 0; c < g->C; c++)
        for (int64_t R = R0; R < R1; R++) {
          int64_t n = R / nth, th = R % nth;
          wino_input_row(dbl, (const char *)x + (n * g->C + c) * HW * es, V + (c * TBb + (R - R0) * ntw) * es, g->C * TBb, g, th, ntw);
        }
    }
    /* per job: dU += dM V^T, then dV = U^T dM over V's slice (which that job alone reads) */
    /* with too few jobs for the threads, each product is split over them instead (fa_cpu_gemm_par runs
     * on the calling thread inside a parallel region) */
    int par = wino_jobs_parallel(njobs, 4.0 * (double)(g->Og * g->Cg * TBb) * (double)njobs);
#pragma omp parallel for schedule(dynamic, 1) if (par)
    for (int64_t j = 0; j < njobs; j++) {
      int64_t e = j / g->G, gi = j % g->G;
      char *Mj = M + (e * g->O + gi * g->Og) * TBb * es, *Vj = V + (e * g->C + gi * g->Cg) * TBb * es;
      int64_t uoff = (e * g->O + gi * g->Og) * g->Cg * es;
      if (gw) fa_cpu_gemm_par(dbl, 0, 1, g->Og, g->Cg, TBb, 1, Mj, TBb, Vj, TBb, 1, dU + uoff, g->Cg);
      if (gx) fa_cpu_gemm_par(dbl, 1, 0, g->Cg, TBb, g->Og, 1, U + uoff, g->Cg, Mj, TBb, 0, Vj, TBb);
    }
    if (gx) {
#pragma omp parallel for schedule(static) if (36 * g->C * TBb > FA_PARALLEL_GRAIN)
      for (int64_t c = 0; c < g->C; c++)
        for (int64_t R = R0; R < R1; R++) { /* rows in order: neighbouring tile rows overlap */
          int64_t n = R / nth, th = R % nth;
          wino_grad_input_row(dbl, V + (c * TBb + (R - R0) * ntw) * es, g->C * TBb, (char *)gx + (n * g->C + c) * HW * es, g, th, ntw);
        }
    }
  }
  if (gw) {
#pragma omp parallel for schedule(static) if (36 * g->O * g->Cg > FA_PARALLEL_GRAIN)
    for (int64_t o = 0; o < g->O; o++) wino_grad_weight(dbl, dU, gw, g, o);
  }
  return 0;
}
