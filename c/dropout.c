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
#include "internal.h"

static inline double ld(const void *p, int64_t i, int dbl) {
  return dbl ? ((const double *)p)[i] : (double)((const float *)p)[i];
}
static inline void st(void *p, int64_t i, double v, int dbl) {
  if (dbl) ((double *)p)[i] = v;
  else ((float *)p)[i] = (float)v;
}

static inline int keep(uint64_t seed, uint64_t offset, int64_t i, double p) {
  uint32_t r[4];
  fa_philox(seed, offset + (uint64_t)i, r);
  return (double)fa_u32_to_unit_float(r[0]) >= p;
}

/* Elements are processed in chunks of DO_CHUNK; the parallel loops are outlined by OpenMP before
 * inlining, so each chunk hands the kernels a literal dbl (one branch per chunk). */
enum { DO_CHUNK = 4096 };

static inline __attribute__((always_inline)) void dropout_fwd_chunk(int dbl, fa_tensor *out, fa_tensor *mask,
                                                                    const fa_tensor *x, double p, double scale,
                                                                    uint64_t seed, uint64_t offset, int contig,
                                                                    int64_t i0, int64_t i1) {
  uint8_t *m = mask ? (uint8_t *)mask->data : NULL;
  for (int64_t i = i0; i < i1; i++) {
    int k = keep(seed, offset, i, p);
    int64_t ox = contig ? i : fa_offset(x, i), oo = contig ? i : fa_offset(out, i);
    if (m) m[contig ? i : fa_offset(mask, i)] = (uint8_t)k;
    st(out->data, oo, k ? ld(x->data, ox, dbl) * scale : 0.0, dbl);
  }
}

static void dropout_fwd_cpu(fa_tensor *out, fa_tensor *mask, const fa_tensor *x, double p, uint64_t seed,
                            uint64_t offset) {
  int64_t n = fa_numel(x), nch = (n + DO_CHUNK - 1) / DO_CHUNK;
  int dbl = x->dtype == FA_FLOAT64;
  int contig = fa_is_contiguous(out) && fa_is_contiguous(x) && (!mask || fa_is_contiguous(mask));
  double scale = p < 1 ? 1.0 / (1.0 - p) : 0.0;
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN / 16)
  for (int64_t k = 0; k < nch; k++) {
    int64_t i0 = k * DO_CHUNK, i1 = i0 + DO_CHUNK < n ? i0 + DO_CHUNK : n;
    if (dbl) dropout_fwd_chunk(1, out, mask, x, p, scale, seed, offset, contig, i0, i1);
    else dropout_fwd_chunk(0, out, mask, x, p, scale, seed, offset, contig, i0, i1);
  }
}

static inline __attribute__((always_inline)) void dropout_bwd_chunk(int dbl, fa_tensor *gx, const fa_tensor *go,
                                                                    const fa_tensor *mask, double scale, int contig,
                                                                    int64_t i0, int64_t i1) {
  const uint8_t *m = (const uint8_t *)mask->data;
  if (contig) {
    for (int64_t i = i0; i < i1; i++) st(gx->data, i, m[i] ? ld(go->data, i, dbl) * scale : 0.0, dbl);
    return;
  }
  for (int64_t i = i0; i < i1; i++)
    st(gx->data, fa_offset(gx, i), m[fa_offset(mask, i)] ? ld(go->data, fa_offset(go, i), dbl) * scale : 0.0, dbl);
}

static void dropout_bwd_cpu(fa_tensor *gx, const fa_tensor *go, const fa_tensor *mask, double p) {
  int64_t n = fa_numel(go), nch = (n + DO_CHUNK - 1) / DO_CHUNK;
  int dbl = go->dtype == FA_FLOAT64;
  int contig = fa_is_contiguous(gx) && fa_is_contiguous(go) && fa_is_contiguous(mask);
  double scale = p < 1 ? 1.0 / (1.0 - p) : 0.0;
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
  for (int64_t k = 0; k < nch; k++) {
    int64_t i0 = k * DO_CHUNK, i1 = i0 + DO_CHUNK < n ? i0 + DO_CHUNK : n;
    if (dbl) dropout_bwd_chunk(1, gx, go, mask, scale, contig, i0, i1);
    else dropout_bwd_chunk(0, gx, go, mask, scale, contig, i0, i1);
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
