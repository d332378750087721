/* conv2d.c: 2-D convolution (cross-correlation, as PyTorch's conv2d) on the CPU.
 *
 * x (N, C, H, W), weight (O, C/G, kh, kw), bias (O) or NULL -> out (N, O, Ho, Wo), with
 * Ho = (H + 2*pad_h - dil_h*(kh-1) - 1) / stride_h + 1 (same for W). Backward: grad_x overwritten,
 * grad_weight and grad_bias accumulated (+=).
 *
 * Three algorithms, picked per shape (fa_conv2d_set_algorithm can force the first two):
 * - im2col + GEMM for the general case: per image and group, the receptive fields of a chunk of output
 *   positions are unrolled into col (C/G*kh*kw, positions) and out = W_g @ col. A 1x1 stride-1 unpadded
 *   convolution is the GEMM on x itself, no unrolling. Backward: grad_W += grad_out @ col^T, grad_col =
 *   W^T @ grad_out folded back (col2im).
 * - Winograd F(4x4, 3x3) (Lavin & Gray 2015) for 3x3 stride-1 undilated convolutions: 6x6 input tiles
 *   (stride 4) are transformed, multiplied channel-wise as 36 GEMMs (one per tile element: U[xi] (O, C/G)
 *   @ V[xi] (C/G, tiles)) and transformed back to 4x4 output tiles: 36 multiplications per 16 outputs
 *   instead of 144. The backward is the exact adjoint of that forward (the same 36 GEMMs transposed).
 * - a direct kernel for depthwise convolutions (groups == C, any channel multiplier): one plane per task.
 *
 * Threads: OpenMP only (OpenBLAS runs single-threaded, see matmul.c): many small products (images,
 * groups, Winograd tile elements) run one per thread, one big product is split over the threads. Every
 * reduction is in a fixed order, so results do not change from run to run. */
#include "internal.h"
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* defined in matmul.c: OpenBLAS on one thread; a product on the calling thread / split over OpenMP's */
void fa_blas_single_thread(void);
void fa_cpu_gemm(int dbl, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
                 const void *b, int64_t ldb, double beta, void *c, int64_t ldc);
void fa_cpu_gemm_par(int dbl, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
                     const void *b, int64_t ldb, double beta, void *c, int64_t ldc);

static const char *FWD = "fa_conv2d_forward", *BWD = "fa_conv2d_backward";

static int conv_algo = FA_CONV_AUTO;
int fa_conv2d_set_algorithm(int algo) {
  if (algo < FA_CONV_AUTO || algo > FA_CONV_WINOGRAD) {
    fa_error(FA_ERR_ARG, "fa_conv2d_set_algorithm: argument 'algo': expected 0 (auto), 1 (gemm) or 2 (winograd), got %d", algo);
    return -1;
  }
  int prev = conv_algo;
  conv_algo = algo;
  return prev;
}


typedef struct geom {
  int64_t N, C, H, W, O, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, G, Cg, Og;
} geom;

static inline int64_t cdiv(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); } /* ceil, b > 0 */
static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

/* For positions wo0 + k, k in [0, n), reading column wi = (wo0 + k) * s + off of a row of width W: the
 * in-bounds k are [*lo, *hi). */
static inline void valid_cols(int64_t W, int64_t s, int64_t off, int64_t wo0, int64_t n, int64_t *lo, int64_t *hi) {
  *lo = imin(n, imax(0, cdiv(-off, s) - wo0));
  *hi = imax(*lo, imin(n, cdiv(W - off, s) - wo0));
}

/* ------------------------------------------------------------------ workspace */
/* One cached scratch block per calling thread: the Winograd and im2col buffers run to tens of MB, and a
 * fresh allocation would page-fault all of it on every call. Blocks above WS_KEEP are returned after
 * the call. */
enum { WS_KEEP = 256 << 20 };
static __thread void *ws_ptr;
static __thread size_t ws_cap;

static void *workspace(size_t bytes) {
  if (bytes <= ws_cap) return ws_ptr;
  fa_free(-1, ws_ptr);
  ws_ptr = NULL; ws_cap = 0;
  ws_ptr = fa_alloc(-1, (int64_t)bytes);
  if (ws_ptr) ws_cap = bytes;
  return ws_ptr;
}
static void workspace_trim(void) {
  if (ws_cap > WS_KEEP) { fa_free(-1, ws_ptr); ws_ptr = NULL; ws_cap = 0; }
}
/* carves 64-byte aligned pieces out of a workspace */
static inline size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* ------------------------------------------------------------------ bias */
/* out (N, O, P) += bias (O), any stride */
static void add_bias(int dbl, void *out, const fa_tensor *bias, int64_t N, int64_t O, int64_t P) {
#pragma omp parallel for schedule(static) if (N * O * P > FA_PARALLEL_GRAIN)
  for (int64_t q = 0; q < N * O; q++) {
    int64_t o = q % O;
    if (dbl) {
      double b = ((const double *)bias->data)[o * bias->stride[0]], *p = (double *)out + q * P;
      for (int64_t i = 0; i < P; i++) p[i] += b;
    } else {
      float b = ((const float *)bias->data)[o * bias->stride[0]], *p = (float *)out + q * P;
      for (int64_t i = 0; i < P; i++) p[i] += b;
    }
  }
}

/* grad_bias (O) += sum over n and positions of grad_out (N, O, P); float32 rows summed in float, the
 * totals in double */
static void bias_grad(int dbl, fa_tensor *grad_bias, const void *gy, int64_t N, int64_t O, int64_t P) {
#pragma omp parallel for schedule(static) if (N * O * P > FA_PARALLEL_GRAIN)
  for (int64_t o = 0; o < O; o++) {
    double acc = 0;
    for (int64_t n = 0; n < N; n++) {
      if (dbl) {
        const double *p = (const double *)gy + (n * O + o) * P;
        double s = 0;
        for (int64_t i = 0; i < P; i++) s += p[i];
        acc += s;
      } else {
        const float *p = (const float *)gy + (n * O + o) * P;
        float s = 0;
        for (int64_t i = 0; i < P; i++) s += p[i];
        acc += s;
      }
    }
    if (dbl) ((double *)grad_bias->data)[o * grad_bias->stride[0]] += acc;
    else ((float *)grad_bias->data)[o * grad_bias->stride[0]] += (float)acc;
  }
}

/* ------------------------------------------------------------------ im2col + GEMM */
/* col (Cg*kh*kw, p1 - p0): row r = (c*kh + i)*kw + j holds x[c][ho*sh - ph + i*dh][wo*sw - pw + j*dw]
 * (0 outside) for the output positions p = ho*Wo + wo in [p0, p1); xg is the group's (Cg, H, W). */
static void im2col(int dbl, const void *xg, void *col, const geom *g, int64_t p0, int64_t p1, int par) {
  int64_t K = g->Cg * g->kh * g->kw, P = p1 - p0;
#pragma omp parallel for schedule(static) if (par && K * P > FA_PARALLEL_GRAIN)
  for (int64_t r = 0; r < K; r++) {
    int64_t c = r / (g->kh * g->kw), i = r / g->kw % g->kh, j = r % g->kw;
    int64_t ho = p0 / g->Wo, wo = p0 % g->Wo, q = 0, off = j * g->dw - g->pw;
    while (q < P) {
      int64_t n = imin(g->Wo - wo, P - q), hi = ho * g->sh - g->ph + i * g->dh, lo = n, hiv = n;
      if (hi >= 0 && hi < g->H) valid_cols(g->W, g->sw, off, wo, n, &lo, &hiv);
      int64_t base = (c * g->H + hi) * g->W + wo * g->sw + off; /* x index of k = 0 */
      if (dbl) {
        double *d = (double *)col + r * P + q;
        const double *s = (const double *)xg + base;
        for (int64_t k = 0; k < lo; k++) d[k] = 0;
        for (int64_t k = lo; k < hiv; k++) d[k] = s[k * g->sw];
        for (int64_t k = hiv; k < n; k++) d[k] = 0;
      } else {
        float *d = (float *)col + r * P + q;
        const float *s = (const float *)xg + base;
        for (int64_t k = 0; k < lo; k++) d[k] = 0;
        if (g->sw == 1) for (int64_t k = lo; k < hiv; k++) d[k] = s[k];
        else for (int64_t k = lo; k < hiv; k++) d[k] = s[k * g->sw];
        for (int64_t k = hiv; k < n; k++) d[k] = 0;
      }
      q += n; ho++; wo = 0;
    }
  }
}

/* the adjoint: gxg (Cg, H, W) += col folded back; parallel over channels (each owns its plane) */
static void col2im(int dbl, const void *col, void *gxg, const geom *g, int64_t p0, int64_t p1, int par) {
  int64_t P = p1 - p0, kk = g->kh * g->kw;
#pragma omp parallel for schedule(static) if (par && g->Cg * kk * P > FA_PARALLEL_GRAIN)
  for (int64_t c = 0; c < g->Cg; c++) {
    for (int64_t r = c * kk; r < (c + 1) * kk; r++) {
      int64_t i = r / g->kw % g->kh, j = r % g->kw;
      int64_t ho = p0 / g->Wo, wo = p0 % g->Wo, q = 0, off = j * g->dw - g->pw;
      while (q < P) {
        int64_t n = imin(g->Wo - wo, P - q), hi = ho * g->sh - g->ph + i * g->dh, lo = n, hiv = n;
        if (hi >= 0 && hi < g->H) valid_cols(g->W, g->sw, off, wo, n, &lo, &hiv);
        int64_t base = (c * g->H + hi) * g->W + wo * g->sw + off;
        if (dbl) {
          const double *s = (const double *)col + r * P + q;
          double *d = (double *)gxg + base;
          for (int64_t k = lo; k < hiv; k++) d[k * g->sw] += s[k];
        } else {
          const float *s = (const float *)col + r * P + q;
          float *d = (float *)gxg + base;
          for (int64_t k = lo; k < hiv; k++) d[k * g->sw] += s[k];
        }
        q += n; ho++; wo = 0;
      }
    }
  }
}

static int is_pointwise(const geom *g) {
  return g->kh == 1 && g->kw == 1 && g->sh == 1 && g->sw == 1 && g->ph == 0 && g->pw == 0;
}

/* output positions per im2col chunk: col stays near 4M elements, but at least 256 positions */
static int64_t chunk_positions(const geom *g) {
  int64_t K = g->Cg * g->kh * g->kw, HoWo = g->Ho * g->Wo;
  if (is_pointwise(g)) return HoWo;
  return imax(1, imin(HoWo, imax((int64_t)256, ((int64_t)4 << 20) / imax(K, 1))));
}

/* one OpenMP thread per (image, group) when there are enough of them, each col is small and the whole is
 * worth a parallel region (below ~1 MFLOP the threads' start costs more than they save) */
static int outer_parallel(const geom *g) {
  int nt = fa_max_threads();
  int64_t per = g->Cg * g->kh * g->kw * g->Ho * g->Wo;
  return nt > 1 && g->N * g->G >= nt && per <= ((int64_t)1 << 22) && 2.0 * (double)per * (double)(g->Og * g->N * g->G) > 1e6;
}

/* out = conv(x, w) (no bias), all contiguous */
static int gemm_forward(int dbl, const void *x, const void *w, void *out, const geom *g) {
  int64_t es = dbl ? 8 : 4, K = g->Cg * g->kh * g->kw, HW = g->H * g->W, HoWo = g->Ho * g->Wo;
  int pw = is_pointwise(g);
  if (outer_parallel(g)) {
    int nt = fa_max_threads();
    size_t per = pw ? 0 : align64((size_t)(K * HoWo * es));
    char *ws = pw ? NULL : (char *)workspace(per * nt);
    if (!pw && !ws) return FA_ERR_MEMORY;
#pragma omp parallel for schedule(static)
    for (int64_t q = 0; q < g->N * g->G; q++) {
      int64_t n = q / g->G, gi = q % g->G;
      const char *xg = (const char *)x + (n * g->C + gi * g->Cg) * HW * es;
      const void *col = xg;
      if (!pw) { im2col(dbl, xg, ws + per * fa_thread_id(), g, 0, HoWo, 0); col = ws + per * fa_thread_id(); }
      fa_cpu_gemm(dbl, 0, 0, g->Og, HoWo, K, 1, (const char *)w + gi * g->Og * K * es, K, col, HoWo, 0,
                  (char *)out + (n * g->O + gi * g->Og) * HoWo * es, HoWo);
    }
    return 0;
  }
  int64_t chunk = chunk_positions(g);
  char *col = pw ? NULL : (char *)workspace((size_t)(K * chunk * es));
  if (!pw && !col) return FA_ERR_MEMORY;
  for (int64_t n = 0; n < g->N; n++)
    for (int64_t gi = 0; gi < g->G; gi++) {
      const char *xg = (const char *)x + (n * g->C + gi * g->Cg) * HW * es;
      for (int64_t p0 = 0; p0 < HoWo; p0 += chunk) {
        int64_t p1 = imin(HoWo, p0 + chunk);
        const void *b = pw ? xg + p0 * es : col;
        if (!pw) im2col(dbl, xg, col, g, p0, p1, 1);
        fa_cpu_gemm_par(dbl, 0, 0, g->Og, p1 - p0, K, 1, (const char *)w + gi * g->Og * K * es, K, b, pw ? HW : p1 - p0, 0,
                        (char *)out + ((n * g->O + gi * g->Og) * HoWo + p0) * es, HoWo);
      }
    }
  return 0;
}

/* gx = d/dx (overwritten) and gw += d/dw, either may be NULL */
static int gemm_backward(int dbl, void *gx, void *gw, const void *gy, const void *x, const void *w, const geom *g) {
  int64_t es = dbl ? 8 : 4, K = g->Cg * g->kh * g->kw, HW = g->H * g->W, HoWo = g->Ho * g->Wo;
  int pw = is_pointwise(g);
  if (gx && !pw) memset(gx, 0, (size_t)(g->N * g->C * HW * es));
  if (outer_parallel(g)) {
    /* per-thread col buffer and per-thread partial weight gradient, summed in thread order at the end */
    int nt = fa_max_threads();
    size_t per_col = pw ? 0 : align64((size_t)(K * HoWo * es)), per_gw = gw ? align64((size_t)(g->O * K * es)) : 0;
    char *ws = (char *)workspace((per_col + per_gw) * nt + 64);
    if (!ws) return FA_ERR_MEMORY;
    if (gw) memset(ws + per_col * nt, 0, per_gw * nt);
#pragma omp parallel num_threads(nt)
    {
      int t = fa_thread_id();
      char *col = ws + per_col * t, *pgw = ws + per_col * nt + per_gw * t;
#pragma omp for schedule(static)
      for (int64_t q = 0; q < g->N * g->G; q++) {
        int64_t n = q / g->G, gi = q % g->G;
        const char *xg = (const char *)x + (n * g->C + gi * g->Cg) * HW * es;
        const char *gyg = (const char *)gy + (n * g->O + gi * g->Og) * HoWo * es;
        const char *wg = (const char *)w + gi * g->Og * K * es;
        char *gxg = gx ? (char *)gx + (n * g->C + gi * g->Cg) * HW * es : NULL;
        if (gw) {
          const void *b = xg;
          if (!pw) { im2col(dbl, xg, col, g, 0, HoWo, 0); b = col; }
          fa_cpu_gemm(dbl, 0, 1, g->Og, K, HoWo, 1, gyg, HoWo, b, HoWo, 1, pgw + gi * g->Og * K * es, K);
        }
        if (gx) {
          if (pw) fa_cpu_gemm(dbl, 1, 0, K, HoWo, g->Og, 1, wg, K, gyg, HoWo, 0, gxg, HW);
          else {
            fa_cpu_gemm(dbl, 1, 0, K, HoWo, g->Og, 1, wg, K, gyg, HoWo, 0, col, HoWo);
            col2im(dbl, col, gxg, g, 0, HoWo, 0);
          }
        }
      }
    }
    if (gw) {
      int64_t n = g->O * K;
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
      for (int64_t i = 0; i < n; i++) {
        for (int t = 0; t < nt; t++) {
          const char *p = ws + per_col * nt + per_gw * t;
          if (dbl) ((double *)gw)[i] += ((const double *)p)[i];
          else ((float *)gw)[i] += ((const float *)p)[i];
        }
      }
    }
    return 0;
  }
  int64_t chunk = chunk_positions(g);
  char *col = pw ? NULL : (char *)workspace((size_t)(K * chunk * es));
  if (!pw && !col) return FA_ERR_MEMORY;
  for (int64_t n = 0; n < g->N; n++)
    for (int64_t gi = 0; gi < g->G; gi++) {
      const char *xg = (const char *)x + (n * g->C + gi * g->Cg) * HW * es;
      const char *wg = (const char *)w + gi * g->Og * K * es;
      char *gxg = gx ? (char *)gx + (n * g->C + gi * g->Cg) * HW * es : NULL;
      for (int64_t p0 = 0; p0 < HoWo; p0 += chunk) {
        int64_t p1 = imin(HoWo, p0 + chunk), P = p1 - p0;
        const char *gyg = (const char *)gy + ((n * g->O + gi * g->Og) * HoWo + p0) * es;
        if (gw) {
          const void *b = xg + p0 * es;
          if (!pw) { im2col(dbl, xg, col, g, p0, p1, 1); b = col; }
          fa_cpu_gemm_par(dbl, 0, 1, g->Og, K, P, 1, gyg, HoWo, b, pw ? HW : P, 1, (char *)gw + gi * g->Og * K * es, K);
        }
        if (gx) {
          if (pw) fa_cpu_gemm_par(dbl, 1, 0, K, P, g->Og, 1, wg, K, gyg, HoWo, 0, gxg + p0 * es, HW);
          else {
            fa_cpu_gemm_par(dbl, 1, 0, K, P, g->Og, 1, wg, K, gyg, HoWo, 0, col, P);
            col2im(dbl, col, gxg, g, p0, p1, 1);
          }
        }
      }
    }
  return 0;
}

/* ------------------------------------------------------------------ Winograd F(4x4, 3x3) */
/* Y = A^T [(G w G^T) . (B^T d B)] A on 6x6 input tiles d, 4x4 output tiles Y (Lavin & Gray's matrices,
 * interpolation points 0, +-1, +-2, inf). The tile math runs in double on LW tiles at a time (lanes, which
 * the compiler vectorises) for both dtypes: the float32 path then loses accuracy only in the GEMMs. */
enum { LW = 16 };

/* The tile transforms are compiled three times and picked at load time by the CPU's features (the library
 * itself targets baseline x86-64): vectorised 8 doubles wide with AVX-512 they cost a fraction of the
 * GEMMs, 2 wide with SSE2 they cost as much. */
#define SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

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

static int wino_applies(const geom *g) {
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

static int wino_forward(int dbl, const void *x, const void *w, const fa_tensor *bias, void *out, const geom *g) {
  int64_t es = dbl ? 8 : 4, nth = cdiv(g->Ho, 4), ntw = cdiv(g->Wo, 4), rows = g->N * nth;
  int64_t rpb = wino_rows_per_block(g, es, ntw, rows), TBmax = rpb * ntw;
  size_t szU = align64((size_t)(36 * g->O * g->Cg * es)), szV = align64((size_t)(36 * g->C * TBmax * es));
  size_t szM = align64((size_t)(36 * g->O * TBmax * es));
  char *ws = (char *)workspace(szU + szV + szM);
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

static int wino_backward(int dbl, void *gx, void *gw, const void *gy, const void *x, const void *w, const geom *g) {
  int64_t es = dbl ? 8 : 4, nth = cdiv(g->Ho, 4), ntw = cdiv(g->Wo, 4), rows = g->N * nth;
  int64_t rpb = wino_rows_per_block(g, es, ntw, rows), TBmax = rpb * ntw;
  size_t szU = align64((size_t)(36 * g->O * g->Cg * es)), szV = align64((size_t)(36 * g->C * TBmax * es));
  size_t szM = align64((size_t)(36 * g->O * TBmax * es));
  char *ws = (char *)workspace(szU * (gw ? 2 : 1) + szV + szM);
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

static int dw_forward(int dbl, const void *x, const void *w, const fa_tensor *bias, void *out, const geom *g) {
  int64_t es = dbl ? 8 : 4, mult = g->O / g->C, HW = g->H * g->W, HoWo = g->Ho * g->Wo, kk = g->kh * g->kw;
  dw_layout L = dw_layout_of(g);
  int nt = fa_max_threads();
  size_t szT = align64((size_t)(L.size * es)), szY = align64((size_t)(g->Ho * L.Mw * es));
  size_t szP = align64((size_t)(L.Mh * g->sw * L.Mw * es)), per = szT + szY + szP;
  char *ws = L.tap ? (char *)workspace(per * nt) : NULL;
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
static int dw_backward(int dbl, void *gx, void *gw, const void *gy, const void *x, const void *w, const geom *g) {
  int64_t es = dbl ? 8 : 4, mult = g->O / g->C, HW = g->H * g->W, HoWo = g->Ho * g->Wo, kk = g->kh * g->kw;
  dw_layout L = dw_layout_of(g);
  int nt = fa_max_threads();
  size_t szT = align64((size_t)(L.size * es)), szY = align64((size_t)(g->Ho * L.Mw * es));
  size_t szP = align64((size_t)(L.Mh * g->sw * L.Mw * es));
  size_t accb = align64((size_t)(mult * kk) * sizeof(double)), per = 2 * szT + szY + szP + accb;
  char *ws = L.tap ? (char *)workspace(per * nt) : NULL;
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

/* ------------------------------------------------------------------ validation, dispatch */
static int check_params(const char *fn, const fa_conv2d_params *p) {
  if (!p) return fa_error(FA_ERR_ARG, "%s: argument 'params': expected a fa_conv2d_params, got NULL", fn);
  if (p->stride_h < 1 || p->stride_w < 1)
    return fa_error(FA_ERR_ARG, "%s: argument 'params': expected stride >= 1, got (%d, %d)", fn, p->stride_h, p->stride_w);
  if (p->dilation_h < 1 || p->dilation_w < 1)
    return fa_error(FA_ERR_ARG, "%s: argument 'params': expected dilation >= 1, got (%d, %d)", fn, p->dilation_h, p->dilation_w);
  if (p->pad_h < 0 || p->pad_w < 0)
    return fa_error(FA_ERR_ARG, "%s: argument 'params': expected padding >= 0, got (%d, %d)", fn, p->pad_h, p->pad_w);
  if (p->groups < 1) return fa_error(FA_ERR_ARG, "%s: argument 'params': expected groups >= 1, got %d", fn, p->groups);
  return 0;
}

/* checks x, weight, bias (may be NULL) and the params; fills g */
static int validate(const char *fn, const fa_tensor *x, const fa_tensor *weight, const fa_tensor *bias, const char *bname,
                    const fa_conv2d_params *p, geom *g) {
  int rc;
  char s1[256], s2[256];
  if ((rc = check_params(fn, p))) return rc;
  if ((rc = fa_check_ndim(fn, "x", x, 4)) || (rc = fa_check_float_dtype(fn, "x", x))) return rc;
  if ((rc = fa_check_ndim(fn, "weight", weight, 4)) || (rc = fa_check_like(fn, "weight", weight, "x", x))) return rc;
  g->N = x->shape[0]; g->C = x->shape[1]; g->H = x->shape[2]; g->W = x->shape[3];
  g->O = weight->shape[0]; g->kh = weight->shape[2]; g->kw = weight->shape[3];
  g->sh = p->stride_h; g->sw = p->stride_w; g->ph = p->pad_h; g->pw = p->pad_w; g->dh = p->dilation_h; g->dw = p->dilation_w;
  g->G = p->groups;
  if (g->C % g->G)
    return fa_error(FA_ERR_ARG, "%s: argument 'x': expected in-channels divisible by groups = %lld, got %lld channels (shape %s)", fn,
                    (long long)g->G, (long long)g->C, fa_shape_str(x, s1));
  if (g->O % g->G)
    return fa_error(FA_ERR_ARG, "%s: argument 'weight': expected out-channels (dimension 1) divisible by groups = %lld, got shape %s", fn,
                    (long long)g->G, fa_shape_str(weight, s1));
  g->Cg = g->C / g->G; g->Og = g->O / g->G;
  if (weight->shape[1] != g->Cg)
    return fa_error(FA_ERR_ARG, "%s: argument 'weight': expected %lld in-channels per group in dimension 2 (x has %lld channels, groups = %lld), got shape %s",
                    fn, (long long)g->Cg, (long long)g->C, (long long)g->G, fa_shape_str(weight, s1));
  if (g->kh < 1 || g->kw < 1)
    return fa_error(FA_ERR_ARG, "%s: argument 'weight': expected a kernel of at least 1x1, got shape %s", fn, fa_shape_str(weight, s1));
  int64_t eh = g->dh * (g->kh - 1) + 1, ew = g->dw * (g->kw - 1) + 1;
  if (g->H + 2 * g->ph < eh || g->W + 2 * g->pw < ew)
    return fa_error(FA_ERR_ARG, "%s: argument 'x': input of %lldx%lld (padded to %lldx%lld) is smaller than the dilated kernel %lldx%lld (x %s, weight %s)",
                    fn, (long long)g->H, (long long)g->W, (long long)(g->H + 2 * g->ph), (long long)(g->W + 2 * g->pw),
                    (long long)eh, (long long)ew, fa_shape_str(x, s1), fa_shape_str(weight, s2));
  g->Ho = (g->H + 2 * g->ph - eh) / g->sh + 1;
  g->Wo = (g->W + 2 * g->pw - ew) / g->sw + 1;
  if (bias) {
    if ((rc = fa_check_like(fn, bname, bias, "x", x))) return rc;
    if (bias->ndim != 1 || bias->shape[0] != g->O)
      return fa_error(FA_ERR_ARG, "%s: argument '%s': expected shape (%lld,) (out-channels of weight %s), got %s", fn, bname,
                      (long long)g->O, fa_shape_str(weight, s1), fa_shape_str(bias, s2));
  }
  return 0;
}

/* y must be (N, O, Ho, Wo) */
static int check_out_shape(const char *fn, const char *arg, const fa_tensor *y, const fa_tensor *x, const geom *g) {
  int rc;
  char s1[256], s2[256];
  if ((rc = fa_check_ndim(fn, arg, y, 4)) || (rc = fa_check_like(fn, arg, y, "x", x))) return rc;
  if (y->shape[0] != g->N || y->shape[1] != g->O || y->shape[2] != g->Ho || y->shape[3] != g->Wo)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected shape (%lld, %lld, %lld, %lld) for x of shape %s, got %s", fn, arg,
                    (long long)g->N, (long long)g->O, (long long)g->Ho, (long long)g->Wo, fa_shape_str(x, s1), fa_shape_str(y, s2));
  return 0;
}

/* *data = t's data, or a fresh contiguous copy's (also in *tmp, to be fa_free'd) when t is not contiguous */
static int contiguous_data(const fa_tensor *t, const void **data, void **tmp) {
  *tmp = NULL;
  *data = t->data;
  if (fa_is_contiguous(t)) return 0;
  fa_tensor c = *t;
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; i--) { c.stride[i] = s; s *= t->shape[i]; }
  c.data = fa_alloc(-1, fa_numel(t) * fa_dtype_size(t->dtype));
  if (!c.data) return FA_ERR_MEMORY;
  int rc = fa_copy(&c, t);
  if (rc) { fa_free(-1, c.data); return rc; }
  *tmp = c.data;
  *data = c.data;
  return 0;
}

static int is_depthwise(const geom *g) { return g->Cg == 1 && g->G == g->C && g->G > 1; }
static int use_winograd(const geom *g) {
  if (!wino_applies(g) || conv_algo == FA_CONV_GEMM) return 0;
  if (conv_algo == FA_CONV_WINOGRAD) return 1;
  return g->Cg >= 32 && g->Og >= 32;
}

int fa_conv2d_forward(fa_tensor *out, const fa_tensor *x, const fa_tensor *weight, const fa_tensor *bias,
                      const fa_conv2d_params *p) {
  int rc = 0;
  geom g;
  if ((rc = validate(FWD, x, weight, bias, "bias", p, &g))) return rc;
  if ((rc = fa_check_defined(FWD, "out", out)) || (rc = check_out_shape(FWD, "out", out, x, &g))) return rc;
  if (x->device >= 0) return fa_cu_conv2d_forward(out, x, weight, bias, p);
  if ((rc = fa_check_contiguous(FWD, "out", out))) return rc;
  if (fa_numel(out) == 0) return 0;
  int dbl = x->dtype == FA_FLOAT64;
  void *tx = NULL, *tw = NULL;
  const void *xd, *wd;
  if ((rc = contiguous_data(x, &xd, &tx)) || (rc = contiguous_data(weight, &wd, &tw))) { fa_free(-1, tx); return rc; }
  fa_blas_single_thread();
  if (fa_numel(x) == 0) { /* no input channels: the output is the bias */
    memset(out->data, 0, (size_t)(fa_numel(out) * (dbl ? 8 : 4)));
    if (bias) add_bias(dbl, out->data, bias, g.N, g.O, g.Ho * g.Wo);
  } else if (is_depthwise(&g)) {
    rc = dw_forward(dbl, xd, wd, bias, out->data, &g);
  } else if (use_winograd(&g)) {
    rc = wino_forward(dbl, xd, wd, bias, out->data, &g);
  } else {
    rc = gemm_forward(dbl, xd, wd, out->data, &g);
    if (!rc && bias) add_bias(dbl, out->data, bias, g.N, g.O, g.Ho * g.Wo);
  }
  if (rc == FA_ERR_MEMORY) fa_error(rc, "%s: out of CPU memory for the convolution's workspace", FWD);
  workspace_trim();
  fa_free(-1, tx);
  fa_free(-1, tw);
  return rc;
}

int fa_conv2d_backward(fa_tensor *grad_x, fa_tensor *grad_weight, fa_tensor *grad_bias, const fa_tensor *grad_out,
                       const fa_tensor *x, const fa_tensor *weight, const fa_conv2d_params *p) {
  int rc = 0;
  geom g;
  if ((rc = validate(BWD, x, weight, grad_bias, "grad_bias", p, &g))) return rc;
  if ((rc = fa_check_defined(BWD, "grad_out", grad_out)) || (rc = check_out_shape(BWD, "grad_out", grad_out, x, &g))) return rc;
  if (grad_x) {
    if ((rc = fa_check_like(BWD, "grad_x", grad_x, "x", x)) || (rc = fa_check_same_shape(BWD, "grad_x", grad_x, "x", x))) return rc;
  }
  if (grad_weight) {
    if ((rc = fa_check_like(BWD, "grad_weight", grad_weight, "x", x)) ||
        (rc = fa_check_same_shape(BWD, "grad_weight", grad_weight, "weight", weight)))
      return rc;
  }
  if (x->device >= 0) return fa_cu_conv2d_backward(grad_x, grad_weight, grad_bias, grad_out, x, weight, p);
  if (grad_x && (rc = fa_check_contiguous(BWD, "grad_x", grad_x))) return rc;
  if (grad_weight && (rc = fa_check_contiguous(BWD, "grad_weight", grad_weight))) return rc;
  int dbl = x->dtype == FA_FLOAT64;
  int64_t es = dbl ? 8 : 4;
  if (grad_x && fa_numel(grad_x) > 0 && fa_numel(grad_out) == 0) memset(grad_x->data, 0, (size_t)(fa_numel(grad_x) * es));
  if (fa_numel(grad_out) == 0) return 0;
  void *tx = NULL, *tw = NULL, *tg = NULL;
  const void *gyd, *xd, *wd;
  if ((rc = contiguous_data(grad_out, &gyd, &tg)) || (rc = contiguous_data(x, &xd, &tx)) ||
      (rc = contiguous_data(weight, &wd, &tw))) {
    fa_free(-1, tg); fa_free(-1, tx);
    return rc;
  }
  fa_blas_single_thread();
  if (grad_bias) bias_grad(dbl, grad_bias, gyd, g.N, g.O, g.Ho * g.Wo);
  void *gx = grad_x && fa_numel(grad_x) > 0 ? grad_x->data : NULL;
  void *gw = grad_weight && fa_numel(grad_weight) > 0 ? grad_weight->data : NULL;
  if (gx || gw) {
    if (is_depthwise(&g)) rc = dw_backward(dbl, gx, gw, gyd, xd, wd, &g);
    else if (use_winograd(&g)) rc = wino_backward(dbl, gx, gw, gyd, xd, wd, &g);
    else rc = gemm_backward(dbl, gx, gw, gyd, xd, wd, &g);
  }
  if (rc == FA_ERR_MEMORY) fa_error(rc, "%s: out of CPU memory for the convolution's workspace", BWD);
  workspace_trim();
  fa_free(-1, tg);
  fa_free(-1, tx);
  fa_free(-1, tw);
  return rc;
}
