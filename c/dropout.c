/* dropout.c: inverted dropout, CPU.
 *
 * forward:  x (any shape) -> mask (same shape, bool), out = x * mask / (1 - p)
 * backward: grad_x = grad_out * mask / (1 - p)
 *
 * The mask is a pure function of (seed, offset, element index): element i (row-major index, whatever
 * the strides) is kept when u >= p, where u = fa_u32_to_unit_float(r[0]) and r = fa_philox(seed,
 * offset + i). So it does not depend on the thread count, on the strides, or on the device (the CUDA
 * kernel draws the same numbers). A call uses counters offset .. offset + numel - 1; the caller advances
 * its offset by numel. p = 0 keeps everything (u >= 0 always); p = 1 drops everything and the output is
 * exactly zero (no 0 * inf). */
/* no-trapping-math (PyTorch builds with it too): lets GCC if-convert the `keep ? x * scale : 0` loops and
 * vectorise them; nothing here reads the floating-point exception flags. Before the includes, so that
 * every function of this file, the inline helpers included, is compiled with the same options. */
#pragma GCC optimize("no-trapping-math")
#include "internal.h"

static inline double ld(const void *p, int64_t i, int dbl) {
  return dbl ? ((const double *)p)[i] : (double)((const float *)p)[i];
}
static inline void st(void *p, int64_t i, double v, int dbl) {
  if (dbl) ((double *)p)[i] = v;
  else ((float *)p)[i] = (float)v;
}

/* The first word of Philox4x32-10 for (seed, counter): the arithmetic of fa_philox (random.c), inline
 * and in plain integer operations, so that a loop over consecutive counters vectorises (the 32x32 -> 64
 * multiplies become vpmuludq) instead of calling fa_philox once per element. The mask spec compares it
 * with fa_uniform, which calls fa_philox. */
static inline uint32_t philox_r0(uint64_t seed, uint64_t counter) {
  uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int i = 0; i < 10; i++) {
    uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)p1;
    c3 = (uint32_t)p0;
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

/* u = fa_u32_to_unit_float(r) = (r >> 8) / 2^24 is >= p exactly when (r >> 8) >= ceil(p * 2^24) (an
 * integer compare, the same decision): the threshold for p in [0, 1] */
static inline uint32_t keep_threshold(double p) { return (uint32_t)ceil(p * 16777216.0); }
static inline int keep(uint64_t seed, uint64_t offset, int64_t i, uint32_t thr) {
  return (philox_r0(seed, offset + (uint64_t)i) >> 8) >= thr;
}

/* Elements are processed in chunks of DO_CHUNK; the parallel loops are outlined by OpenMP before
 * inlining, so each chunk hands the kernels a literal dbl (one branch per chunk). */
enum { DO_CHUNK = 4096 };

/* contiguous chunk [i0, i1): the mask (into m, or a local buffer) in one vectorised loop, then the output */
static inline __attribute__((always_inline)) void dropout_fwd_contig(int dbl, void *out, uint8_t *m, const void *x,
                                                                     double scale, uint64_t seed, uint64_t offset,
                                                                     uint32_t thr, int64_t i0, int64_t i1) {
  uint8_t buf[DO_CHUNK];
  uint8_t *k = m ? m + i0 : buf;
  int64_t n = i1 - i0;
  for (int64_t i = 0; i < n; i++) k[i] = (philox_r0(seed, offset + (uint64_t)(i0 + i)) >> 8) >= thr;
  if (dbl) {
    double *o = (double *)out + i0;
    const double *xd = (const double *)x + i0;
    for (int64_t i = 0; i < n; i++) o[i] = k[i] ? xd[i] * scale : 0.0;
  } else { /* in double, then rounded once, as before */
    float *o = (float *)out + i0;
    const float *xf = (const float *)x + i0;
    for (int64_t i = 0; i < n; i++) o[i] = (float)(k[i] ? (double)xf[i] * scale : 0.0);
  }
}

static inline __attribute__((always_inline)) void dropout_fwd_chunk(int dbl, fa_tensor *out, fa_tensor *mask,
                                                                    const fa_tensor *x, uint32_t thr, double scale,
                                                                    uint64_t seed, uint64_t offset, int contig,
                                                                    int64_t i0, int64_t i1) {
  uint8_t *m = mask ? (uint8_t *)mask->data : NULL;
  if (contig) {
    dropout_fwd_contig(dbl, out->data, m, x->data, scale, seed, offset, thr, i0, i1);
    return;
  }
  for (int64_t i = i0; i < i1; i++) {
    int k = keep(seed, offset, i, thr);
    int64_t ox = fa_offset(x, i), oo = fa_offset(out, i);
    if (m) m[fa_offset(mask, i)] = (uint8_t)k;
    st(out->data, oo, k ? ld(x->data, ox, dbl) * scale : 0.0, dbl);
  }
}

/* the chunk kernels with a literal dbl, compiled for AVX2 and the baseline (FA_HOT_CLONES) */
FA_HOT_CLONES static void dropout_fwd_chunk_any(int dbl, fa_tensor *out, fa_tensor *mask, const fa_tensor *x,
                                                uint32_t thr, double scale, uint64_t seed, uint64_t offset, int contig,
                                                int64_t i0, int64_t i1) {
  if (dbl) dropout_fwd_chunk(1, out, mask, x, thr, scale, seed, offset, contig, i0, i1);
  else dropout_fwd_chunk(0, out, mask, x, thr, scale, seed, offset, contig, i0, i1);
}

static void dropout_fwd_cpu(fa_tensor *out, fa_tensor *mask, const fa_tensor *x, double p, uint64_t seed,
                            uint64_t offset) {
  int64_t n = fa_numel(x), nch = (n + DO_CHUNK - 1) / DO_CHUNK;
  int dbl = x->dtype == FA_FLOAT64;
  int contig = fa_is_contiguous(out) && fa_is_contiguous(x) && (!mask || fa_is_contiguous(mask));
  double scale = p < 1 ? 1.0 / (1.0 - p) : 0.0;
  uint32_t thr = keep_threshold(p);
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN / 16)
  for (int64_t k = 0; k < nch; k++) {
    int64_t i0 = k * DO_CHUNK, i1 = i0 + DO_CHUNK < n ? i0 + DO_CHUNK : n;
    dropout_fwd_chunk_any(dbl, out, mask, x, thr, scale, seed, offset, contig, i0, i1);
  }
}

static inline __attribute__((always_inline)) void dropout_bwd_chunk(int dbl, fa_tensor *gx, const fa_tensor *go,
                                                                    const fa_tensor *mask, double scale, int contig,
                                                                    int64_t i0, int64_t i1) {
  const uint8_t *m = (const uint8_t *)mask->data;
  if (contig) { /* the data pointers in locals: a store through gx->data could change gx->data */
    void *g = gx->data;
    const void *o = go->data;
    for (int64_t i = i0; i < i1; i++) st(g, i, m[i] ? ld(o, i, dbl) * scale : 0.0, dbl);
    return;
  }
  for (int64_t i = i0; i < i1; i++)
    st(gx->data, fa_offset(gx, i), m[fa_offset(mask, i)] ? ld(go->data, fa_offset(go, i), dbl) * scale : 0.0, dbl);
}

FA_HOT_CLONES static void dropout_bwd_chunk_any(int dbl, fa_tensor *gx, const fa_tensor *go, const fa_tensor *mask,
                                                double scale, int contig, int64_t i0, int64_t i1) {
  if (dbl) dropout_bwd_chunk(1, gx, go, mask, scale, contig, i0, i1);
  else dropout_bwd_chunk(0, gx, go, mask, scale, contig, i0, i1);
}

static void dropout_bwd_cpu(fa_tensor *gx, const fa_tensor *go, const fa_tensor *mask, double p) {
  int64_t n = fa_numel(go), nch = (n + DO_CHUNK - 1) / DO_CHUNK;
  int dbl = go->dtype == FA_FLOAT64;
  int contig = fa_is_contiguous(gx) && fa_is_contiguous(go) && fa_is_contiguous(mask);
  double scale = p < 1 ? 1.0 / (1.0 - p) : 0.0;
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
  for (int64_t k = 0; k < nch; k++) {
    int64_t i0 = k * DO_CHUNK, i1 = i0 + DO_CHUNK < n ? i0 + DO_CHUNK : n;
    dropout_bwd_chunk_any(dbl, gx, go, mask, scale, contig, i0, i1);
  }
}

static int check_p(const char *fn, double p) {
  if (!(p >= 0 && p <= 1)) return fa_error(FA_ERR_ARG, "%s: argument 'p': expected 0 <= p <= 1, got %g", fn, p);
  return 0;
}

static int check_mask(const char *fn, const fa_tensor *mask, const char *ref_arg, const fa_tensor *ref) {
  int rc;
  if ((rc = fa_check_defined(fn, "mask", mask)) || (rc = fa_check_dtype(fn, "mask", mask, FA_BOOL)) ||
      (rc = fa_check_same_device(fn, "mask", mask, ref_arg, ref)) || (rc = fa_check_same_shape(fn, "mask", mask, ref_arg, ref)))
    return rc;
  return 0;
}

/* mask may be NULL when it is not needed (no backward) */
int fa_dropout_forward(fa_tensor *out, fa_tensor *mask, const fa_tensor *x, double p, uint64_t seed, uint64_t offset) {
  static const char *fn = "fa_dropout_forward";
  int rc;
  if ((rc = fa_check_defined(fn, "x", x)) || (rc = fa_check_float_dtype(fn, "x", x))) return rc;
  if ((rc = fa_check_like(fn, "out", out, "x", x)) || (rc = fa_check_same_shape(fn, "out", out, "x", x))) return rc;
  if (mask && (rc = check_mask(fn, mask, "x", x))) return rc;
  if ((rc = check_p(fn, p))) return rc;
  if (x->device >= 0) return fa_cu_dropout_forward(out, mask, x, p, seed, offset);
  if (fa_numel(x) == 0) return 0;
  dropout_fwd_cpu(out, mask, x, p, seed, offset);
  return 0;
}

int fa_dropout_backward(fa_tensor *grad_x, const fa_tensor *grad_out, const fa_tensor *mask, double p) {
  static const char *fn = "fa_dropout_backward";
  int rc;
  if ((rc = fa_check_defined(fn, "grad_out", grad_out)) || (rc = fa_check_float_dtype(fn, "grad_out", grad_out))) return rc;
  if ((rc = fa_check_like(fn, "grad_x", grad_x, "grad_out", grad_out)) ||
      (rc = fa_check_same_shape(fn, "grad_x", grad_x, "grad_out", grad_out)))
    return rc;
  if ((rc = check_mask(fn, mask, "grad_out", grad_out))) return rc;
  if ((rc = check_p(fn, p))) return rc;
  if (grad_out->device >= 0) return fa_cu_dropout_backward(grad_x, grad_out, mask, p);
  if (fa_numel(grad_out) == 0) return 0;
  dropout_bwd_cpu(grad_x, grad_out, mask, p);
  return 0;
}
