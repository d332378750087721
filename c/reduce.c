/* reduce.c: sum, mean, max (with indices) and argmax over one dimension or over all elements, forward and
 * backward, and the sum of squares (fa_sumsq, for gradient clipping), on the CPU. CUDA tensors go to
 * fa_cu_* after validation.
 *
 * Around the reduced dim, x is (outer, R, inner) and out is (outer, 1, inner): output o = (oi, j) reduces
 * the R elements x[oi, :, j]. float32 is accumulated in double (its sums then round once, so they agree
 * with PyTorch's to float32 rounding); float64 in double; int32/int64 sums in int64 (wrapping), their max
 * exactly. max/argmax: the first maximum wins and NaN wins over numbers (PyTorch's rules); indices are
 * 0-based, into the reduced dim (or into the row-major flattened x for dim -1).
 *
 * Every result is independent of the thread count: a reduction over all elements adds fixed blocks in a
 * fixed order, and each output of a dim reduction is computed by one thread.
 *
 * Paths: (1) dim -1: blocks of the flat buffer (contiguous x) or of its rows (strided x), then the block
 * partials in order; (2) contiguous float x reduced over a dim that is not the last: tiles of CB columns
 * accumulated row by row (each row a contiguous, vectorisable run); (3) everything else: one strided run
 * of R elements per output, located with fa_offset. */
#include "internal.h"
#include <stdint.h>
#include <stdlib.h>

static const char *reduce_name[] = { "FA_SUM", "FA_MEAN", "FA_MAX", "FA_ARGMAX" };

static inline int is_int(int dtype) { return dtype == FA_INT32 || dtype == FA_INT64; }
static inline double ldf(const char *p, int dt, int64_t i) {
  return dt == FA_FLOAT64 ? ((const double *)p)[i] : (double)((const float *)p)[i];
}
static inline int64_t ldi(const char *p, int dt, int64_t i) {
  return dt == FA_INT64 ? ((const int64_t *)p)[i] : (int64_t)((const int32_t *)p)[i];
}
/* v beats the current best: strictly greater (so the first maximum stays), or the first NaN */
static inline int beats(double v, double best) { return v > best || (v != v && best == best); }

/* the result of reducing a run: sums/max in v (floats) or iv (ints), arg = index of the max in the run */
typedef struct { double v; int64_t iv, arg; } red_val;

/* Contiguous float sums: sixteen partial sums in a fixed order (lanes, then pairwise: 0+1, 2+3, ..., then
 * those in pairs, ...; the tail into lane 0), so the adds are not one dependency chain (four AVX2
 * registers in flight) and the loop vectorises; compiled for AVX2 and the baseline (FA_HOT_CLONES).
 * Deterministic: the same order on every machine and thread count. */
static inline double sum16(double *a) {
  for (int w = 8; w >= 1; w /= 2)
    for (int k = 0; k < w; k++) a[k] = a[2 * k] + a[2 * k + 1];
  return a[0];
}
FA_HOT_CLONES static double sum_run_f32(const float *p, int64_t len) {
  double a[16] = { 0 };
  int64_t i = 0;
  for (; i + 16 <= len; i += 16)
    for (int k = 0; k < 16; k++) a[k] += p[i + k];
  for (; i < len; i++) a[0] += p[i];
  return sum16(a);
}
FA_HOT_CLONES static double sum_run_f64(const double *p, int64_t len) {
  double a[16] = { 0 };
  int64_t i = 0;
  for (; i + 16 <= len; i += 16)
    for (int k = 0; k < 16; k++) a[k] += p[i + k];
  for (; i < len; i++) a[0] += p[i];
  return sum16(a);
}

/* reduces len elements at p (element stride st) */
static red_val reduce_run(int op, const char *p, int dt, int64_t len, int64_t st) {
  red_val r = { 0, 0, 0 };
  int is_max = op == FA_MAX || op == FA_ARGMAX;
  if (is_int(dt)) {
    if (is_max) {
      r.iv = ldi(p, dt, 0);
      for (int64_t i = 1; i < len; i++) {
        int64_t v = ldi(p, dt, i * st);
        if (v > r.iv) { r.iv = v; r.arg = i; }
      }
    } else {
      uint64_t acc = 0; /* wrapping sum */
      for (int64_t i = 0; i < len; i++) acc += (uint64_t)ldi(p, dt, i * st);
      r.iv = (int64_t)acc;
    }
    return r;
  }
  if (is_max) {
    r.v = ldf(p, dt, 0);
    for (int64_t i = 1; i < len; i++) {
      double v = ldf(p, dt, i * st);
      if (beats(v, r.v)) { r.v = v; r.arg = i; }
    }
  } else if (st == 1) {
    r.v = dt == FA_FLOAT64 ? sum_run_f64((const double *)p, len) : sum_run_f32((const float *)p, len);
  } else {
    double acc = 0;
    for (int64_t i = 0; i < len; i++) acc += ldf(p, dt, i * st);
    r.v = acc;
  }
  return r;
}

/* folds b (whose arg counts from `base` in the combined run) into a; a comes first */
static inline void red_combine(int op, int isint, red_val *a, red_val b, int64_t base) {
  if (op == FA_MAX || op == FA_ARGMAX) {
    if (isint ? b.iv > a->iv : beats(b.v, a->v)) { a->v = b.v; a->iv = b.iv; a->arg = b.arg + base; }
  } else {
    a->v += b.v;
    a->iv = (int64_t)((uint64_t)a->iv + (uint64_t)b.iv);
  }
}

/* writes output o (row-major index into out's shape) */
static inline void store_result(int op, fa_tensor *out, fa_tensor *idx, int64_t o, red_val r, int64_t R) {
  int64_t off = fa_offset(out, o);
  if (op == FA_ARGMAX) { ((int64_t *)out->data)[off] = r.arg; return; }
  if (op == FA_MAX && idx) ((int64_t *)idx->data)[fa_offset(idx, o)] = r.arg;
  switch (out->dtype) {
    case FA_FLOAT32: ((float *)out->data)[off] = (float)(op == FA_MEAN ? r.v / (double)R : r.v); break;
    case FA_FLOAT64: ((double *)out->data)[off] = op == FA_MEAN ? r.v / (double)R : r.v; break;
    case FA_INT32: ((int32_t *)out->data)[off] = (int32_t)r.iv; break;
    case FA_INT64: ((int64_t *)out->data)[off] = r.iv; break;
  }
}

enum { RED_BLOCK = 4096, CB = 64 };

/* (1) all elements. x (any strides) -> one result; blocks of >= RED_BLOCK elements in a fixed order */
static int reduce_all_cpu(int op, fa_tensor *out, fa_tensor *idx, const fa_tensor *x) {
  int64_t n = fa_numel(x);
  int dt = x->dtype, es = fa_dtype_size(dt);
  red_val res = { 0, 0, 0 };
  if (n > 0) {
    int contig = fa_is_contiguous(x);
    /* a "row" is a contiguous chunk (contiguous x) or one run of the last dim (strided x) */
    int64_t L = contig ? RED_BLOCK : x->shape[x->ndim - 1];
    int64_t rows = (n + L - 1) / L, st = contig ? 1 : x->stride[x->ndim - 1];
    int64_t B = L >= RED_BLOCK ? 1 : (RED_BLOCK + L - 1) / L; /* rows per block */
    int64_t nblocks = (rows + B - 1) / B;
    red_val one, *part = nblocks == 1 ? &one : malloc((size_t)nblocks * sizeof(red_val));
    if (!part) return fa_error(FA_ERR_MEMORY, "fa_reduce_forward: out of memory for %lld partial results", (long long)nblocks);
    int isint = is_int(dt);
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
    for (int64_t b = 0; b < nblocks; b++) {
      int64_t r0 = b * B, r1 = r0 + B < rows ? r0 + B : rows;
      red_val acc = { 0, 0, 0 };
      for (int64_t r = r0; r < r1; r++) {
        int64_t start = r * L, len = n - start < L ? n - start : L;
        const char *p = (const char *)x->data + (contig ? start : fa_offset(x, start)) * es;
        red_val v = reduce_run(op, p, dt, len, st);
        if (r == r0) { acc = v; acc.arg += start; }
        else red_combine(op, isint, &acc, v, start);
      }
      part[b] = acc;
    }
    res = part[0];
    for (int64_t b = 1; b < nblocks; b++) red_combine(op, isint, &res, part[b], 0);
    if (part != &one) free(part);
  }
  store_result(op, out, idx, 0, res, n);
  return 0;
}

/* acc[j] = sum over r of p[r * inner + j], j < w <= CB, row by row (a vectorised run per row) */
FA_HOT_CLONES static void sum_cols_f32(const float *p, int64_t R, int64_t inner, int64_t w, double *acc) {
  for (int64_t j = 0; j < w; j++) acc[j] = 0;
  for (int64_t r = 0; r < R; r++)
    for (int64_t j = 0; j < w; j++) acc[j] += p[r * inner + j];
}
FA_HOT_CLONES static void sum_cols_f64(const double *p, int64_t R, int64_t inner, int64_t w, double *acc) {
  for (int64_t j = 0; j < w; j++) acc[j] = 0;
  for (int64_t r = 0; r < R; r++)
    for (int64_t j = 0; j < w; j++) acc[j] += p[r * inner + j];
}

/* (2) contiguous float x (outer, R, inner), inner > 1: tiles of CB columns of one outer slice */
static void reduce_cols_cpu(int op, fa_tensor *out, fa_tensor *idx, const fa_tensor *x, int64_t outer, int64_t R,
                            int64_t inner) {
  int dt = x->dtype, es = fa_dtype_size(dt);
  int is_max = op == FA_MAX || op == FA_ARGMAX;
  int64_t tiles = (inner + CB - 1) / CB, ntasks = outer * tiles;
#pragma omp parallel for schedule(static) if (outer * R * inner > FA_PARALLEL_GRAIN)
  for (int64_t t = 0; t < ntasks; t++) {
    int64_t oi = t / tiles, j0 = (t % tiles) * CB, w = inner - j0 < CB ? inner - j0 : CB;
    const char *p0 = (const char *)x->data + (oi * R * inner + j0) * es;
    double acc[CB];
    int64_t arg[CB];
    if (is_max) {
      for (int64_t j = 0; j < w; j++) { acc[j] = ldf(p0, dt, j); arg[j] = 0; }
      for (int64_t r = 1; r < R; r++)
        for (int64_t j = 0; j < w; j++) {
          double v = ldf(p0, dt, r * inner + j);
          if (beats(v, acc[j])) { acc[j] = v; arg[j] = r; }
        }
    } else if (dt == FA_FLOAT64) {
      sum_cols_f64((const double *)p0, R, inner, w, acc);
    } else {
      sum_cols_f32((const float *)p0, R, inner, w, acc);
    }
    for (int64_t j = 0; j < w; j++) {
      red_val v = { acc[j], 0, is_max ? arg[j] : 0 };
      store_result(op, out, idx, oi * inner + j0 + j, v, R);
    }
  }
}

/* (3) any strides: one run of R elements (stride x.stride[dim]) per output */
static void reduce_runs_cpu(int op, fa_tensor *out, fa_tensor *idx, const fa_tensor *x, int dim, int64_t nout) {
  int dt = x->dtype, es = fa_dtype_size(dt);
  int64_t R = x->shape[dim], st = x->stride[dim];
  fa_tensor xr = *x; /* x with the reduced dim collapsed: output o starts at fa_offset(&xr, o) */
  xr.shape[dim] = 1;
#pragma omp parallel for schedule(static) if (nout > 1 && nout * R > FA_PARALLEL_GRAIN)
  for (int64_t o = 0; o < nout; o++) {
    red_val v = { 0, 0, 0 };
    if (R > 0) v = reduce_run(op, (const char *)x->data + fa_offset(&xr, o) * es, dt, R, st);
    store_result(op, out, idx, o, v, R);
  }
}

/* t has the shape of x reduced over dim (size 1 there), or 1 element for dim -1 */
static int check_reduced_shape(const char *fn, const char *arg, const fa_tensor *t, const fa_tensor *x,
                               const char *xarg, int dim) {
  char a[256], b[256], c[256];
  if (dim < 0) {
    if (fa_numel(t) != 1)
      return fa_error(FA_ERR_ARG, "%s: argument '%s': expected a 1-element tensor (reduction over all elements), got shape %s",
                      fn, arg, fa_shape_str(t, a));
    return 0;
  }
  fa_tensor want = *x;
  want.shape[dim] = 1;
  int ok = t->ndim == x->ndim;
  for (int d = 0; ok && d < t->ndim; d++) ok = t->shape[d] == want.shape[d];
  if (!ok)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected shape %s ('%s' %s reduced over dim %d), got %s", fn, arg,
                    fa_shape_str(&want, a), xarg, fa_shape_str(x, b), dim, fa_shape_str(t, c));
  return 0;
}

static int check_dim(const char *fn, const fa_tensor *x, const char *xarg, int dim) {
  if (dim < -1 || dim >= x->ndim) {
    char b[256];
    if (x->ndim == 0)
      return fa_error(FA_ERR_ARG, "%s: argument 'dim': expected -1 (all elements) for the 0-D '%s', got %d", fn, xarg, dim);
    return fa_error(FA_ERR_ARG, "%s: argument 'dim': expected -1 (all elements) or 0..%d for '%s' of shape %s, got %d", fn,
                    x->ndim - 1, xarg, fa_shape_str(x, b), dim);
  }
  return 0;
}

/* x (..., R, ...) -> out (..., 1, ...) [and idx (..., 1, ...) int64 for FA_MAX]; dim -1: x -> 1 element */
int fa_reduce_forward(int op, fa_tensor *out, fa_tensor *idx, const fa_tensor *x, int dim) {
  static const char *fn = "fa_reduce_forward";
  int rc;
  if (op < FA_SUM || op > FA_ARGMAX)
    return fa_error(FA_ERR_ARG, "%s: argument 'op': expected FA_SUM, FA_MEAN, FA_MAX or FA_ARGMAX (0..3), got %d", fn, op);
  if ((rc = fa_check_defined(fn, "x", x))) return rc;
  if (!(is_int(x->dtype) && op != FA_MEAN) && (rc = fa_check_float_dtype(fn, "x", x))) return rc;
  if ((rc = check_dim(fn, x, "x", dim))) return rc;
  if ((rc = fa_check_defined(fn, "out", out)) || (rc = fa_check_same_device(fn, "out", out, "x", x))) return rc;
  if (op == FA_ARGMAX) {
    if ((rc = fa_check_dtype(fn, "out", out, FA_INT64))) return rc;
  } else if ((rc = fa_check_same_dtype(fn, "out", out, "x", x))) {
    return rc;
  }
  if ((rc = check_reduced_shape(fn, "out", out, x, "x", dim))) return rc;
  if (idx) {
    if (op != FA_MAX)
      return fa_error(FA_ERR_ARG, "%s: argument 'idx': expected NULL for %s (only FA_MAX writes indices), got a tensor", fn,
                      reduce_name[op]);
    if ((rc = fa_check_defined(fn, "idx", idx)) || (rc = fa_check_same_device(fn, "idx", idx, "x", x)) ||
        (rc = fa_check_dtype(fn, "idx", idx, FA_INT64)) || (rc = fa_check_same_shape(fn, "idx", idx, "out", out)))
      return rc;
  }
  int64_t R = dim < 0 ? fa_numel(x) : x->shape[dim];
  int64_t nout = fa_numel(out);
  if ((op == FA_MAX || op == FA_ARGMAX) && R == 0 && nout > 0)
    return fa_error(FA_ERR_ARG, "%s: argument 'x': %s of an empty %s (shape has 0 in dim %d): the maximum is undefined", fn,
                    reduce_name[op], dim < 0 ? "tensor" : "dimension", dim);
  if (nout == 0) return 0;
  if (x->device >= 0) return fa_cu_reduce_forward(op, out, idx, x, dim);
  if (dim < 0) return reduce_all_cpu(op, out, idx, x);
  int64_t inner = 1;
  for (int d = dim + 1; d < x->ndim; d++) inner *= x->shape[d];
  if (inner > 1 && R > 0 && !is_int(x->dtype) && fa_is_contiguous(x))
    reduce_cols_cpu(op, out, idx, x, nout / inner, R, inner);
  else
    reduce_runs_cpu(op, out, idx, x, dim, nout);
  return 0;
}

/* grad_x (shape of x) from grad_out (shape of out): sum/mean broadcast grad_out (mean divides by R); max
 * writes grad_out at the index idx (int64, shape of out) and zero elsewhere. grad_x is overwritten. */
int fa_reduce_backward(int op, fa_tensor *grad_x, const fa_tensor *grad_out, const fa_tensor *idx, int dim) {
  static const char *fn = "fa_reduce_backward";
  int rc;
  if (op == FA_ARGMAX)
    return fa_error(FA_ERR_ARG, "%s: argument 'op': FA_ARGMAX has no gradient (expected FA_SUM, FA_MEAN or FA_MAX)", fn);
  if (op < FA_SUM || op > FA_MAX)
    return fa_error(FA_ERR_ARG, "%s: argument 'op': expected FA_SUM, FA_MEAN or FA_MAX (0..2), got %d", fn, op);
  if ((rc = fa_check_defined(fn, "grad_x", grad_x)) || (rc = fa_check_float_dtype(fn, "grad_x", grad_x)) ||
      (rc = check_dim(fn, grad_x, "grad_x", dim)) || (rc = fa_check_like(fn, "grad_out", grad_out, "grad_x", grad_x)) ||
      (rc = check_reduced_shape(fn, "grad_out", grad_out, grad_x, "grad_x", dim)))
    return rc;
  int64_t R = dim < 0 ? fa_numel(grad_x) : grad_x->shape[dim];
  int64_t nout = fa_numel(grad_out);
  if (op == FA_MAX) {
    if (!idx) return fa_error(FA_ERR_ARG, "%s: argument 'idx': expected the int64 indices of the forward max, got nothing", fn);
    if ((rc = fa_check_defined(fn, "idx", idx)) || (rc = fa_check_same_device(fn, "idx", idx, "grad_x", grad_x)) ||
        (rc = fa_check_dtype(fn, "idx", idx, FA_INT64)) || (rc = fa_check_same_shape(fn, "idx", idx, "grad_out", grad_out)))
      return rc;
    if (idx->device < 0) { /* indices in range, checked before anything is written */
      int64_t bad = -1;
      for (int64_t o = 0; o < nout && bad < 0; o++) {
        int64_t k = ((const int64_t *)idx->data)[fa_offset(idx, o)];
        if (k < 0 || k >= R) bad = o;
      }
      if (bad >= 0)
        return fa_error(FA_ERR_ARG, "%s: argument 'idx': expected indices in 0..%lld, got %lld at element %lld", fn,
                        (long long)R - 1, (long long)((const int64_t *)idx->data)[fa_offset(idx, bad)], (long long)bad);
    }
  }
  if (fa_numel(grad_x) == 0) return 0;
  if (grad_x->device >= 0) return fa_cu_reduce_backward(op, grad_x, grad_out, idx, dim);

  if (op == FA_SUM || op == FA_MEAN) {
    /* grad_out seen with grad_x's shape, stride 0 along the reduced dim(s): a broadcast copy */
    fa_tensor e = *grad_x;
    e.data = grad_out->data;
    for (int d = 0; d < e.ndim; d++) e.stride[d] = (dim < 0 || d == dim) ? 0 : grad_out->stride[d];
    return fa_scale_forward(grad_x, &e, op == FA_MEAN ? 1.0 / (double)R : 1.0, 0.0);
  }
  /* FA_MAX: zero, then scatter; each output owns its own slice, so the scatter has no conflicts */
  if ((rc = fa_fill(grad_x, 0))) return rc;
  int dbl = grad_x->dtype == FA_FLOAT64;
  fa_tensor gr = *grad_x;
  if (dim >= 0) gr.shape[dim] = 1;
  int64_t st = dim >= 0 ? grad_x->stride[dim] : 0;
#pragma omp parallel for schedule(static) if (nout > FA_PARALLEL_GRAIN)
  for (int64_t o = 0; o < nout; o++) {
    int64_t k = ((const int64_t *)idx->data)[fa_offset(idx, o)];
    int64_t dst = dim >= 0 ? fa_offset(&gr, o) + k * st : fa_offset(grad_x, k);
    int64_t src = fa_offset(grad_out, o);
    if (dbl) ((double *)grad_x->data)[dst] = ((const double *)grad_out->data)[src];
    else ((float *)grad_x->data)[dst] = ((const float *)grad_out->data)[src];
  }
  return 0;
}

/* ================================================================== sum of squares */
/* x (any shape and strides, float) -> out (1 element): sum of x^2 accumulated in double, in fixed blocks
 * combined in a fixed order, so the result does not depend on the thread count. */
enum { SUMSQ_BLOCK = 4096 };

int fa_sumsq(fa_tensor *out, const fa_tensor *x) {
  static const char *fn = "fa_sumsq";
  int rc;
  if ((rc = fa_check_defined(fn, "x", x)) || (rc = fa_check_float_dtype(fn, "x", x)) ||
      (rc = fa_check_defined(fn, "out", out)) || (rc = fa_check_same_device(fn, "out", out, "x", x)) ||
      (rc = fa_check_dtype(fn, "out", out, x->device >= 0 ? FA_FLOAT32 : FA_FLOAT64)))
    return rc;
  if (fa_numel(out) != 1) {
    char b[256];
    return fa_error(FA_ERR_ARG, "%s: argument 'out': expected a 1-element tensor, got shape %s", fn, fa_shape_str(out, b));
  }
  if (x->device >= 0) return fa_cu_sumsq(out, x);
  int64_t n = fa_numel(x), nb = (n + SUMSQ_BLOCK - 1) / SUMSQ_BLOCK;
  int contig = fa_is_contiguous(x), dbl = x->dtype == FA_FLOAT64;
  double total = 0;
  if (n <= FA_PARALLEL_GRAIN) nb = n > 0; /* small: one block, no allocation */
  double one, *part = nb <= 1 ? &one : fa_alloc(FA_CPU, nb * (int64_t)sizeof(double));
  if (!part) return FA_ERR_MEMORY; /* fa_alloc left the message */
  int64_t bs = nb <= 1 ? n : SUMSQ_BLOCK;
#pragma omp parallel for schedule(static) if (nb > 1)
  for (int64_t b = 0; b < nb; b++) {
    int64_t i0 = b * bs, i1 = i0 + bs < n ? i0 + bs : n;
    double a0 = 0, a1 = 0; /* two chains: halves the add latency */
    int64_t i = i0;
    if (contig && dbl) {
      const double *p = x->data;
      for (; i + 2 <= i1; i += 2) { a0 += p[i] * p[i]; a1 += p[i + 1] * p[i + 1]; }
      for (; i < i1; i++) a0 += p[i] * p[i];
    } else if (contig) {
      const float *p = x->data;
      for (; i + 2 <= i1; i += 2) { a0 += (double)p[i] * p[i]; a1 += (double)p[i + 1] * p[i + 1]; }
      for (; i < i1; i++) a0 += (double)p[i] * p[i];
    } else {
      for (; i < i1; i++) {
        int64_t off = fa_offset(x, i);
        double v = dbl ? ((const double *)x->data)[off] : ((const float *)x->data)[off];
        a0 += v * v;
      }
    }
    part[b] = a0 + a1;
  }
  for (int64_t b = 0; b < nb; b++) total += part[b];
  if (part != &one) fa_free(FA_CPU, part);
  ((double *)out->data)[fa_offset(out, 0)] = total;
  return 0;
}
