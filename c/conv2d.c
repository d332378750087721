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
 * - Winograd F(4x4, 3x3) (Lavin & Gray 2015; c/conv2d_winograd.c) for 3x3 stride-1 undilated
 *   convolutions: 6x6 input tiles (stride 4) are transformed, multiplied channel-wise as 36 GEMMs (one
 *   per tile element: U[xi] (O, C/G) @ V[xi] (C/G, tiles)) and transformed back to 4x4 output tiles: 36
 *   multiplications per 16 outputs instead of 144. The backward is the exact adjoint of that forward
 *   (the same 36 GEMMs transposed).
 * - a direct kernel for depthwise convolutions (groups == C, any channel multiplier): one plane per task
 *   (c/conv2d_depthwise.c).
 *
 * Threads: OpenMP only (OpenBLAS runs single-threaded, see matmul.c): many small products (images,
 * groups, Winograd tile elements) run one per thread, one big product is split over the threads. Every
 * reduction is in a fixed order, so results do not change from run to run. */
#include "conv2d.h"
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

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

/* ------------------------------------------------------------------ workspace */
/* One cached scratch block per calling thread: the Winograd and im2col buffers run to tens of MB, and a
 * fresh allocation would page-fault all of it on every call. Blocks above WS_KEEP are returned after
 * the call. */
enum { WS_KEEP = 256 << 20 };
static __thread void *ws_ptr;
static __thread size_t ws_cap;

void *fa_conv2d_workspace(size_t bytes) {
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
    char *ws = pw ? NULL : (char *)fa_conv2d_workspace(per * nt);
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
  char *col = pw ? NULL : (char *)fa_conv2d_workspace((size_t)(K * chunk * es));
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
    char *ws = (char *)fa_conv2d_workspace((per_col + per_gw) * nt + 64);
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
  char *col = pw ? NULL : (char *)fa_conv2d_workspace((size_t)(K * chunk * es));
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
  if (!fa_conv2d_wino_applies(g) || conv_algo == FA_CONV_GEMM) return 0;
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
    rc = fa_conv2d_dw_forward(dbl, xd, wd, bias, out->data, &g);
  } else if (use_winograd(&g)) {
    rc = fa_conv2d_wino_forward(dbl, xd, wd, bias, out->data, &g);
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
    if (is_depthwise(&g)) rc = fa_conv2d_dw_backward(dbl, gx, gw, gyd, xd, wd, &g);
    else if (use_winograd(&g)) rc = fa_conv2d_wino_backward(dbl, gx, gw, gyd, xd, wd, &g);
    else rc = gemm_backward(dbl, gx, gw, gyd, xd, wd, &g);
  }
  if (rc == FA_ERR_MEMORY) fa_error(rc, "%s: out of CPU memory for the convolution's workspace", BWD);
  workspace_trim();
  fa_free(-1, tg);
  fa_free(-1, tx);
  fa_free(-1, tw);
  return rc;
}
