/* conv2d_depthwise.c: the direct depthwise convolution (groups == C) of c/conv2d.c (which validates and picks it). */
#include "conv2d.h"

/* ------------------------------------------------------------------ depthwise (groups == C) */
/* Direct kernel, one channel plane per task, on a 2-D polyphase copy of the zero-padded plane:
 *   T[qh][qw][mh][mw] = x[mh*sh + qh - ph][mw*sw + qw - pw]   (0 in the padding)
 * with Mh = Ho + ((kh-1)*dh)/sh rows and Mw = Wo + ((kw-1)*dw)/sw columns per phase. Kernel tap (i, j) then
 * reads, for every output (ho, wo), T[(i*dh)%sh][(j*dw)%sw][ho + (i*dh)/sh][wo + (j*dw)/sw]: the output
 * plane, computed Mw wide (columns Wo..Mw-1 are scratch), is one contiguous multiply-add over Ho*Mw
 * elements per tap, vectorised and without bounds tests. The reads of a tap run at most (kw-1)*dw/sw
 * elements past its phase, into the scratch columns only (hence the slack at the end of T). */
typedef struct dw_layout {
  int64_t Mh, Mw, phase, size; /* phase = Mh*Mw; size = sh*sw*phase + slack */
  int64_t *tap;                /* kh*kw offsets into T: tap[i*kw + j] */
} dw_layout;

static dw_layout dw_layout_of(const geom *g) {
  dw_layout l;
  l.Mh = g->Ho + ((g->kh - 1) * g->dh) / g->sh;
  l.Mw = g->Wo + ((g->kw - 1) * g->dw) / g->sw;
  l.phase = l.Mh * l.Mw;
  l.size = g->sh * g->sw * l.phase + ((g->kw - 1) * g->dw) / g->sw + 16;
  l.tap = (int64_t *)malloc(sizeof(int64_t) * (size_t)(g->kh * g->kw));
  if (l.tap)
    for (int64_t i = 0; i < g->kh; i++)
      for (int64_t j = 0; j < g->kw; j++)
        l.tap[i * g->kw + j] = (((i * g->dh) % g->sh) * g->sw + (j * g->dw) % g->sw) * l.phase +
                               ((i * g->dh) / g->sh) * l.Mw + (j * g->dw) / g->sw;
  return l;
}

/* Rows of phase group qh, zero-padded and still interleaved: P[mh][v] = x[mh*sh + qh - ph][v - pw] for
 * v in [0, sw*Mw). Flattened, P[k*sw + qw] = T[qh][qw][k] for k = mh*Mw + mw: one long deinterleave. */
SIMD_CLONES static void dw_pad_rows(int dbl, const void *xc, void *P, const geom *g, const dw_layout *L, int64_t qh) {
  int64_t pitch = g->sw * L->Mw;
  int64_t lead = imin(g->pw, pitch), ncopy = imax(0, imin(g->W, pitch - g->pw));
  for (int64_t mh = 0; mh < L->Mh; mh++) { /* rows are short: plain loops, not libc calls */
    int64_t h = mh * g->sh + qh - g->ph, n = h < 0 || h >= g->H ? 0 : ncopy, a = n ? lead : 0;
    if (dbl) {
      double *d = (double *)P + mh * pitch;
      const double *x = (const double *)xc + h * g->W;
      for (int64_t v = 0; v < a; v++) d[v] = 0;
      for (int64_t v = 0; v < n; v++) d[a + v] = x[v];
      for (int64_t v = a + n; v < pitch; v++) d[v] = 0;
    } else {
      float *d = (float *)P + mh * pitch;
      const float *x = (const float *)xc + h * g->W;
      for (int64_t v = 0; v < a; v++) d[v] = 0;
      for (int64_t v = 0; v < n; v++) d[a + v] = x[v];
      for (int64_t v = a + n; v < pitch; v++) d[v] = 0;
    }
  }
}

/* T[qh] (sw phases of n = Mh*Mw elements, ps apart) <-> P (n*sw interleaved), either direction */
SIMD_CLONES static void dw_interleave(int dbl, void *T, void *P, int64_t n, int64_t sw, int64_t ps, int to_phases) {
  if (dbl) {
    double *t = (double *)T, *p = (double *)P;
    if (to_phases) {
      if (sw == 2) for (int64_t k = 0; k < n; k++) { t[k] = p[2 * k]; t[ps + k] = p[2 * k + 1]; }
      else if (sw == 4) for (int64_t k = 0; k < n; k++) { t[k] = p[4 * k]; t[ps + k] = p[4 * k + 1]; t[2 * ps + k] = p[4 * k + 2]; t[3 * ps + k] = p[4 * k + 3]; }
      else for (int64_t q = 0; q < sw; q++) for (int64_t k = 0; k < n; k++) t[q * ps + k] = p[k * sw + q];
    } else {
      if (sw == 2) for (int64_t k = 0; k < n; k++) { p[2 * k] = t[k]; p[2 * k + 1] = t[ps + k]; }
      else if (sw == 4) for (int64_t k = 0; k < n; k++) { p[4 * k] = t[k]; p[4 * k + 1] = t[ps + k]; p[4 * k + 2] = t[2 * ps + k]; p[4 * k + 3] = t[3 * ps + k]; }
      else for (int64_t q = 0; q < sw; q++) for (int64_t k = 0; k < n; k++) p[k * sw + q] = t[q * ps + k];
    }
  } else {
    float *t = (float *)T, *p = (float *)P;
    if (to_phases) {
      if (sw == 2) for (int64_t k = 0; k < n; k++) { t[k] = p[2 * k]; t[ps + k] = p[2 * k + 1]; }
      else if (sw == 4) for (int64_t k = 0; k < n; k++) { t[k] = p[4 * k]; t[ps + k] = p[4 * k + 1]; t[2 * ps + k] = p[4 * k + 2]; t[3 * ps + k] = p[4 * k + 3]; }
      else for (int64_t q = 0; q < sw; q++) for (int64_t k = 0; k < n; k++) t[q * ps + k] = p[k * sw + q];
    } else {
      if (sw == 2) for (int64_t k = 0; k < n; k++) { p[2 * k] = t[k]; p[2 * k + 1] = t[ps + k]; }
      else if (sw == 4) for (int64_t k = 0; k < n; k++) { p[4 * k] = t[k]; p[4 * k + 1] = t[ps + k]; p[4 * k + 2] = t[2 * ps + k]; p[4 * k + 3] = t[3 * ps + k]; }
      else for (int64_t q = 0; q < sw; q++) for (int64_t k = 0; k < n; k++) p[k * sw + q] = t[q * ps + k];
    }
  }
}

/* T from the plane xc (H, W); P is scratch of Mh*sw*Mw elements (unused for sw == 1) */
static void dw_split(int dbl, const void *xc, void *T, void *P, const geom *g, const dw_layout *L) {
  int64_t es = dbl ? 8 : 4;
  for (int64_t qh = 0; qh < g->sh; qh++) {
    char *Tq = (char *)T + qh * g->sw * L->phase * es;
    if (g->sw == 1) { dw_pad_rows(dbl, xc, Tq, g, L, qh); continue; }
    dw_pad_rows(dbl, xc, P, g, L, qh);
    dw_interleave(dbl, Tq, P, L->phase, g->sw, L->phase, 1);
  }
}

/* the adjoint, overwriting: gxc (H, W) from gT; input pixels that no output reads get 0 */
static void dw_merge(int dbl, void *gT, void *P, void *gxc, const geom *g, const dw_layout *L) {
  int64_t es = dbl ? 8 : 4, pitch = g->sw * L->Mw;
  int64_t lead = imin(g->pw, pitch), ncopy = imax(0, imin(g->W, pitch - g->pw));
  for (int64_t h = 0; h < g->H; h++) /* rows past the last phase row: no output reads them */
    if ((h + g->ph) / g->sh >= L->Mh) memset((char *)gxc + h * g->W * es, 0, (size_t)(g->W * es));
  for (int64_t qh = 0; qh < g->sh; qh++) {
    char *Tq = (char *)gT + qh * g->sw * L->phase * es, *R = (char *)P;
    if (g->sw == 1) R = Tq;
    else dw_interleave(dbl, Tq, P, L->phase, g->sw, L->phase, 0);
    for (int64_t mh = 0; mh < L->Mh; mh++) {
      int64_t h = mh * g->sh + qh - g->ph;
      if (h < 0 || h >= g->H) continue;
      char *d = (char *)gxc + h * g->W * es;
      memcpy(d, R + (mh * pitch + lead) * es, (size_t)(ncopy * es));
      memset(d + ncopy * es, 0, (size_t)((g->W - ncopy) * es)); /* columns past the last phase column */
    }
  }
}

/* yo (Ho, Wo) = bias + sum over taps; Y is an Ho*Mw scratch plane */
SIMD_CLONES static void dw_forward_plane(int dbl, const void *T, const void *wk, void *Y, void *yo, double bias,
                                         const geom *g, const dw_layout *L) {
  int64_t n = g->Ho * L->Mw;
  if (dbl) {
    double *y = (double *)Y;
    const double *t = (const double *)T, *w = (const double *)wk;
    for (int64_t k = 0; k < n; k++) y[k] = bias;
    for (int64_t e = 0; e < g->kh * g->kw; e += 3) { /* three or six taps per pass over y */
      const double *t0 = t + L->tap[e];
      double w0 = w[e];
      if (e + 6 <= g->kh * g->kw) {
        const double *t1 = t + L->tap[e + 1], *t2 = t + L->tap[e + 2], *t3 = t + L->tap[e + 3], *t4 = t + L->tap[e + 4], *t5 = t + L->tap[e + 5];
        double w1 = w[e + 1], w2 = w[e + 2], w3 = w[e + 3], w4 = w[e + 4], w5 = w[e + 5];
        for (int64_t k = 0; k < n; k++) y[k] += w0 * t0[k] + w1 * t1[k] + w2 * t2[k] + w3 * t3[k] + w4 * t4[k] + w5 * t5[k];
        e += 3;
      } else if (e + 3 <= g->kh * g->kw) {
        const double *t1 = t + L->tap[e + 1], *t2 = t + L->tap[e + 2];
        double w1 = w[e + 1], w2 = w[e + 2];
        for (int64_t k = 0; k < n; k++) y[k] += w0 * t0[k] + w1 * t1[k] + w2 * t2[k];
      } else {
        for (int64_t k = 0; k < n; k++) y[k] += w0 * t0[k];
        if (e + 2 == g->kh * g->kw) { const double *t1 = t + L->tap[e + 1]; double w1 = w[e + 1]; for (int64_t k = 0; k < n; k++) y[k] += w1 * t1[k]; }
      }
    }
    for (int64_t ho = 0; ho < g->Ho; ho++) memcpy((double *)yo + ho * g->Wo, y + ho * L->Mw, (size_t)g->Wo * 8);
  } else {
    float *y = (float *)Y;
    const float *t = (const float *)T, *w = (const float *)wk;
    for (int64_t k = 0; k < n; k++) y[k] = (float)bias;
    for (int64_t e = 0; e < g->kh * g->kw; e += 3) {
      const float *t0 = t + L->tap[e];
      float w0 = w[e];
      if (e + 6 <= g->kh * g->kw) {
        const float *t1 = t + L->tap[e + 1], *t2 = t + L->tap[e + 2], *t3 = t + L->tap[e + 3], *t4 = t + L->tap[e + 4], *t5 = t + L->tap[e + 5];
        float w1 = w[e + 1], w2 = w[e + 2], w3 = w[e + 3], w4 = w[e + 4], w5 = w[e + 5];
        for (int64_t k = 0; k < n; k++) y[k] += w0 * t0[k] + w1 * t1[k] + w2 * t2[k] + w3 * t3[k] + w4 * t4[k] + w5 * t5[k];
        e += 3;
      } else if (e + 3 <= g->kh * g->kw) {
        const float *t1 = t + L->tap[e + 1], *t2 = t + L->tap[e + 2];
        float w1 = w[e + 1], w2 = w[e + 2];
        for (int64_t k = 0; k < n; k++) y[k] += w0 * t0[k] + w1 * t1[k] + w2 * t2[k];
      } else {
        for (int64_t k = 0; k < n; k++) y[k] += w0 * t0[k];
        if (e + 2 == g->kh * g->kw) { const float *t1 = t + L->tap[e + 1]; float w1 = w[e + 1]; for (int64_t k = 0; k < n; k++) y[k] += w1 * t1[k]; }
      }
    }
    for (int64_t ho = 0; ho < g->Ho; ho++) memcpy((float *)yo + ho * g->Wo, y + ho * L->Mw, (size_t)g->Wo * 4);
  }
}

/* one output plane gyo: Y = gyo widened to Mw columns with zeros; per tap acc[ij] += <Y, tap of T> (float
 * sums per plane for float32, double totals) and tap of gT += w[i][j] * Y */
SIMD_CLONES static void dw_backward_plane(int dbl, const void *T, void *gT, const void *gyo, void *Y, const void *wk,
                                          double *acc, const geom *g, const dw_layout *L) {
  int64_t n = g->Ho * L->Mw;
  if (dbl) {
    double *y = (double *)Y;
    for (int64_t ho = 0; ho < g->Ho; ho++) {
      memcpy(y + ho * L->Mw, (const double *)gyo + ho * g->Wo, (size_t)g->Wo * 8);
      for (int64_t k = g->Wo; k < L->Mw; k++) y[ho * L->Mw + k] = 0;
    }
    for (int64_t i = 0; i < g->kh; i++)
      for (int64_t j = 0; j < g->kw; j++) {
        int64_t off = L->tap[i * g->kw + j];
        if (T) {
          const double *t = (const double *)T + off;
          double a = 0;
#pragma omp simd reduction(+ : a)
          for (int64_t k = 0; k < n; k++) a += y[k] * t[k];
          acc[i * g->kw + j] += a;
        }
        if (gT) { double wv = ((const double *)wk)[i * g->kw + j], *d = (double *)gT + off; for (int64_t k = 0; k < n; k++) d[k] += wv * y[k]; }
      }
  } else {
    float *y = (float *)Y;
    for (int64_t ho = 0; ho < g->Ho; ho++) {
      memcpy(y + ho * L->Mw, (const float *)gyo + ho * g->Wo, (size_t)g->Wo * 4);
      for (int64_t k = g->Wo; k < L->Mw; k++) y[ho * L->Mw + k] = 0;
    }
    for (int64_t i = 0; i < g->kh; i++)
      for (int64_t j = 0; j < g->kw; j++) {
        int64_t off = L->tap[i * g->kw + j];
        if (T) { /* lane-wise partial sums (a fixed order for a given build and CPU) */
          const float *t = (const float *)T + off;
          float a = 0;
#pragma omp simd reduction(+ : a)
          for (int64_t k = 0; k < n; k++) a += y[k] * t[k];
          acc[i * g->kw + j] += a;
        }
        if (gT) { float wv = ((const float *)wk)[i * g->kw + j], *d = (float *)gT + off; for (int64_t k = 0; k < n; k++) d[k] += wv * y[k]; }
      }
  }
}

int fa_conv2d_dw_forward(int dbl, const void *x, const void *w, const fa_tensor *bias, void *out, const geom *g) {
  int64_t es = dbl ? 8 : 4, mult = g->O / g->C, HW = g->H * g->W, HoWo = g->Ho * g->Wo, kk = g->kh * g->kw;
  dw_layout L = dw_layout_of(g);
  int nt = fa_max_threads();
  size_t szT = align64((size_t)(L.size * es)), szY = align64((size_t)(g->Ho * L.Mw * es));
  size_t szP = align64((size_t)(L.Mh * g->sw * L.Mw * es)), per = szT + szY + szP;
  char *ws = L.tap ? (char *)fa_conv2d_workspace(per * nt) : NULL;
  if (!ws) { free(L.tap); return FA_ERR_MEMORY; }
  /* one task per (image, channel): split the plane once, then its mult output planes */
#pragma omp parallel for schedule(static) if (g->N * g->O * HoWo * kk > FA_PARALLEL_GRAIN)
  for (int64_t q = 0; q < g->N * g->C; q++) {
    int64_t n = q / g->C, c = q % g->C;
    char *T = ws + per * fa_thread_id(), *Y = T + szT, *P = Y + szY;
    dw_split(dbl, (const char *)x + q * HW * es, T, P, g, &L);
    for (int64_t m = 0; m < mult; m++) {
      int64_t o = c * mult + m;
      double b = !bias ? 0 : dbl ? ((const double *)bias->data)[o * bias->stride[0]] : ((const float *)bias->data)[o * bias->stride[0]];
      dw_forward_plane(dbl, T, (const char *)w + o * kk * es, Y, (char *)out + (n * g->O + o) * HoWo * es, b, g, &L);
    }
  }
  free(L.tap);
  return 0;
}

/* one task per channel c, over all images: gx[n][c] (overwritten) gathers its mult outputs' gradients,
 * gw[o] += the correlations summed over n in double; each task owns its planes and weights */
int fa_conv2d_dw_backward(int dbl, void *gx, void *gw, const void *gy, const void *x, const void *w, const geom *g) {
  int64_t es = dbl ? 8 : 4, mult = g->O / g->C, HW = g->H * g->W, HoWo = g->Ho * g->Wo, kk = g->kh * g->kw;
  dw_layout L = dw_layout_of(g);
  int nt = fa_max_threads();
  size_t szT = align64((size_t)(L.size * es)), szY = align64((size_t)(g->Ho * L.Mw * es));
  size_t szP = align64((size_t)(L.Mh * g->sw * L.Mw * es));
  size_t accb = align64((size_t)(mult * kk) * sizeof(double)), per = 2 * szT + szY + szP + accb;
  char *ws = L.tap ? (char *)fa_conv2d_workspace(per * nt) : NULL;
  if (!ws) { free(L.tap); return FA_ERR_MEMORY; }
#pragma omp parallel for schedule(static) if (g->N * g->O * HoWo * kk > FA_PARALLEL_GRAIN)
  for (int64_t c = 0; c < g->C; c++) {
    char *base = ws + per * fa_thread_id();
    char *T = gw ? base : NULL, *gT = gx ? base + szT : NULL, *Y = base + 2 * szT, *P = Y + szY;
    double *acc = (double *)(P + szP);
    for (int64_t e = 0; e < mult * kk; e++) acc[e] = 0;
    for (int64_t n = 0; n < g->N; n++) {
      if (T) dw_split(dbl, (const char *)x + (n * g->C + c) * HW * es, T, P, g, &L);
      if (gT) memset(gT, 0, (size_t)(L.size * es));
      for (int64_t m = 0; m < mult; m++) {
        int64_t o = c * mult + m;
        dw_backward_plane(dbl, T, gT, (const char *)gy + (n * g->O + o) * HoWo * es, Y, (const char *)w + o * kk * es,
                          acc + m * kk, g, &L);
      }
      if (gT) dw_merge(dbl, gT, P, (char *)gx + (n * g->C + c) * HW * es, g, &L);
    }
    if (gw)
      for (int64_t e = 0; e < mult * kk; e++) {
        if (dbl) ((double *)gw)[c * mult * kk + e] += acc[e];
        else ((float *)gw)[c * mult * kk + e] += (float)acc[e];
      }
  }
  free(L.tap);
  return 0;
}
