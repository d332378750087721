/* elementwise.c: binary arithmetic (a <op> alpha*b), scale/shift, addcmul and the unary functions, forward
 * and backward, on the CPU. CUDA tensors go to fa_cu_* after validation.
 *
 * Every op here works on tensors of one shape with arbitrary strides (stride 0 = broadcast). ew_loop
 * first simplifies the shape: size-1 dimensions are dropped and adjacent dimensions that are contiguous
 * with each other in every operand are merged (all-contiguous tensors become one flat dimension; a
 * broadcast (4096, 512) + (512) becomes 4096 rows of 512 with the second operand's row stride 0). The
 * elements are then cut into chunks of the flat index (the OpenMP work), and each chunk is walked with
 * an incrementing multi-dimensional counter (no division per element or per row), handing the kernels
 * 2-D blocks: rows of the innermost (merged) dimension. The kernels special-case inner stride 1 (and 0
 * for broadcast operands) so that those loops vectorise. A strided view runs the same arithmetic as its
 * contiguous copy: results are bit-for-bit equal.
 *
 * The float kernels are compiled twice (FA_HOT_CLONES: AVX2 and baseline SSE2, picked at load time),
 * without FMA contraction (below), so the result does not depend on the machine either.
 *
 * dtypes on the CPU: float32 and float64 for everything (float32 computes in float, as PyTorch does);
 * binary, scale and addcmul also take int32/int64 (exact integer arithmetic, wrapping on overflow;
 * integer division truncates toward zero, as torch.div(..., rounding_mode='trunc') and Torch7);
 * neg/abs/sign/relu also take ints. float32 exp, tanh, sigmoid and gelu (and their gradients) use
 * vectorisable approximations (fa_fast_expf; tanh_f32 and phi_f32 below; within 9 ulp, see there);
 * float64 uses libm. */
/* no-trapping-math (PyTorch builds with it too) lets GCC if-convert the selects of the approximations
 * and vectorise them; nothing here reads the floating-point exception flags. fp-contract=off: no FMA
 * in the AVX2 clones, so that they give exactly what the baseline code gives. Before the includes, so
 * that every function of this file, the inline helpers included, is compiled with the same options. */
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
#include "internal.h"
#include <stdint.h>

#define EW_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------ the iteration */
enum { EW_MAX_T = 4, EW_CHUNK = 8192, EW_TILE = 64 };

/* A kernel processes a 2-D block: `rows` rows of `n` elements; p[k] points at the block's first element
 * of operand k (operand 0 is the output by convention); ro[k] and si[k] are operand k's strides
 * (elements) between rows and along a row. */
typedef void (*ew_blk_fn)(const void *ctx, int64_t rows, int64_t n, char *const *p, const int64_t *ro,
                          const int64_t *si);

/* the simplified shape shared by every operand */
typedef struct {
  int nt, nd;                        /* operands, dimensions (>= 1) */
  int64_t tile;                      /* > 0: an operand jumps along the rows: whole rows in column tiles */
  int64_t shape[FA_MAX_DIMS];
  int64_t stride[EW_MAX_T][FA_MAX_DIMS];
  int64_t es[EW_MAX_T];              /* element sizes (bytes) */
  char *data[EW_MAX_T];
} ew_iter;

/* drops size-1 dimensions and merges dimension d into the one before it where every operand has
 * stride[d-1] == stride[d] * shape[d]; n > 0 */
static void ew_plan(int nt, const fa_tensor *const *t, ew_iter *it) {
  const fa_tensor *t0 = t[0];
  it->nt = nt;
  it->nd = 0;
  for (int k = 0; k < nt; k++) {
    it->es[k] = fa_dtype_size(t[k]->dtype);
    it->data[k] = (char *)t[k]->data;
  }
  for (int d = 0; d < t0->ndim; d++) {
    int64_t sz = t0->shape[d];
    if (sz == 1) continue;
    int j = it->nd - 1, merge = j >= 0;
    for (int k = 0; merge && k < nt; k++) merge = it->stride[k][j] == t[k]->stride[d] * sz;
    if (merge) {
      it->shape[j] *= sz;
      for (int k = 0; k < nt; k++) it->stride[k][j] = t[k]->stride[d];
      continue;
    }
    j = it->nd++;
    it->shape[j] = sz;
    for (int k = 0; k < nt; k++) it->stride[k][j] = t[k]->stride[d];
  }
  if (it->nd == 0) { /* one element */
    it->nd = 1;
    it->shape[0] = 1;
    for (int k = 0; k < nt; k++) it->stride[k][0] = 1;
  }
  /* Column tiles for operands whose inner stride is 16 elements or more, so that the lines such an
   * operand touches in one tile stay in L1 for the next rows. L1 is (typically) 64 sets x 8 ways of
   * 64-byte lines; lines `l` lines apart fall into only 64 / gcd(l, 64) sets: a tile of 4 columns per
   * set (half the ways: the other operands need some) and at most EW_TILE, but 8 for one or two sets
   * (power-of-two strides of 2 KiB and more; measured best: 4 and 16 columns were slower). */
  it->tile = 0;
  for (int k = 0; k < nt; k++) {
    int64_t s = it->stride[k][it->nd - 1], l = (s < 0 ? -s : s) * it->es[k] / 64, g = 64;
    if (s > -16 && s < 16) continue;
    for (int64_t a = l % 64; a > 0;) { int64_t r = g % a; g = a; a = r; } /* gcd(l, 64) */
    int64_t sets = 64 / g, w = sets <= 2 ? 8 : (4 * sets < EW_TILE ? 4 * sets : EW_TILE);
    if (it->tile == 0 || w < it->tile) it->tile = w;
  }
  if (it->nd < 2 || it->shape[it->nd - 1] <= it->tile) it->tile = 0;
}

/* the elements [i0, i1) (flat row-major index): a partial row at either end, whole rows in between,
 * as many consecutive rows per call as the row dimension (the second innermost) allows. When an operand
 * jumps along the rows (a transposed view), whole rows go in tiles of it->tile columns (see ew_plan):
 * 3x faster on a transposed (4096, 512) add, where untiled rows or 64-column tiles miss L1 on every
 * element of the transposed operand. */
static void ew_range(const ew_iter *it, ew_blk_fn fn, const void *ctx, int64_t i0, int64_t i1) {
  int nt = it->nt, nd = it->nd, rd = nd - 2; /* rd: the row dimension, -1 for a single row */
  int64_t tile = it->tile;
  int64_t inner = it->shape[nd - 1], idx[FA_MAX_DIMS], ro[EW_MAX_T], si[EW_MAX_T];
  char *p[EW_MAX_T], *q[EW_MAX_T];
  int64_t rest = i0 / inner, j = i0 % inner; /* the only divisions of the range */
  for (int k = 0; k < nt; k++) {
    p[k] = it->data[k];
    si[k] = it->stride[k][nd - 1];
    ro[k] = rd >= 0 ? it->stride[k][rd] : 0;
  }
  for (int d = nd - 2; d >= 0; d--) {
    idx[d] = rest % it->shape[d];
    rest /= it->shape[d];
    for (int k = 0; k < nt; k++) p[k] += idx[d] * it->stride[k][d] * it->es[k];
  }
  for (int64_t i = i0; i < i1;) {
    int64_t cnt = 1;
    if (j == 0 && i1 - i >= inner && rd >= 0) { /* whole rows */
      cnt = (i1 - i) / inner;
      if (cnt > it->shape[rd] - idx[rd]) cnt = it->shape[rd] - idx[rd];
      if (tile && cnt > 1) {
        for (int64_t j0 = 0; j0 < inner; j0 += tile) {
          for (int k = 0; k < nt; k++) q[k] = p[k] + j0 * si[k] * it->es[k];
          fn(ctx, cnt, inner - j0 < tile ? inner - j0 : tile, q, ro, si);
        }
      } else {
        fn(ctx, cnt, inner, p, ro, si);
      }
      i += cnt * inner;
    } else { /* part of one row */
      int64_t len = inner - j < i1 - i ? inner - j : i1 - i;
      for (int k = 0; k < nt; k++) q[k] = p[k] + j * si[k] * it->es[k];
      fn(ctx, 1, len, q, ro, si);
      i += len;
      j += len;
      if (j < inner) break; /* the range ends inside this row */
      j = 0;
    }
    if (rd < 0) break;
    /* the counter: cnt rows further along rd, carrying into the outer dimensions */
    int d = rd;
    idx[d] += cnt;
    for (int k = 0; k < nt; k++) p[k] += cnt * it->stride[k][d] * it->es[k];
    while (d > 0 && idx[d] == it->shape[d]) {
      for (int k = 0; k < nt; k++) p[k] += (it->stride[k][d - 1] - it->shape[d] * it->stride[k][d]) * it->es[k];
      idx[d] = 0;
      idx[--d]++;
    }
  }
}

/* t[0..nt-1]: tensors of one shape (t[0] is the output by convention) */
static void ew_loop(int nt, const fa_tensor *const *t, ew_blk_fn fn, const void *ctx) {
  int64_t n = fa_numel(t[0]);
  if (n == 0) return;
  ew_iter it;
  ew_plan(nt, t, &it);
  /* a tiled walk wants 16 rows per chunk at least (a 64-byte line of a transposed float32 operand) */
  int64_t csize = it.tile && 16 * it.shape[it.nd - 1] > EW_CHUNK ? 16 * it.shape[it.nd - 1] : EW_CHUNK;
  int64_t nchunks = n > FA_PARALLEL_GRAIN ? (n + csize - 1) / csize : 1;
  int64_t chunk = nchunks == 1 ? n : csize;
#pragma omp parallel for schedule(static) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; c++) ew_range(&it, fn, ctx, c * chunk, c * chunk + chunk < n ? c * chunk + chunk : n);
}

/* ------------------------------------------------------------------ scalar helpers */
static inline int64_t ld_i(const char *p, int dtype, int64_t i) {
  return dtype == FA_INT32 ? (int64_t)((const int32_t *)p)[i] : ((const int64_t *)p)[i];
}
static inline void st_i(char *p, int dtype, int64_t i, int64_t v) {
  if (dtype == FA_INT32) ((int32_t *)p)[i] = (int32_t)v; /* wraps, as int32 arithmetic would */
  else ((int64_t *)p)[i] = v;
}
/* two's-complement wrapping arithmetic without signed-overflow UB */
static inline int64_t wadd(int64_t a, int64_t b) { return (int64_t)((uint64_t)a + (uint64_t)b); }
static inline int64_t wsub(int64_t a, int64_t b) { return (int64_t)((uint64_t)a - (uint64_t)b); }
static inline int64_t wmul(int64_t a, int64_t b) { return (int64_t)((uint64_t)a * (uint64_t)b); }
static inline int64_t tdiv(int64_t a, int64_t b) { return b == -1 ? wsub(0, a) : a / b; } /* b != 0 checked */

static inline int is_int(int dtype) { return dtype == FA_INT32 || dtype == FA_INT64; }
/* an integral double that fits int64 (the scalars of integer ops) */
static inline int is_integral(double v) { return v == floor(v) && fabs(v) < 9.2e18; }
/* double -> int64 truncating toward zero, saturating instead of UB out of range (NaN gives 0) */
static inline int64_t sat_i64(double v) {
  if (v != v) return 0;
  if (v >= 9.2233720368547758e18) return INT64_MAX;
  if (v <= -9.2233720368547758e18) return INT64_MIN;
  return (int64_t)v;
}

/* ------------------------------------------------------------------ validation */
/* dtype of an elementwise operand: floats everywhere, ints too where allow_int */
static int check_ew_dtype(const char *fn, const char *arg, const fa_tensor *t, int allow_int) {
  if (allow_int && is_int(t->dtype)) return 0;
  if (t->device < 0 && t->dtype != FA_FLOAT32 && t->dtype != FA_FLOAT64)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected float32 or float64%s on the CPU, got %s", fn, arg,
                    allow_int ? ", int32 or int64" : "", fa_dtype_name(t->dtype));
  if (t->device >= 0 && t->dtype != FA_FLOAT32 && t->dtype != FA_BFLOAT16 && t->dtype != FA_FLOAT16)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected float32, bfloat16 or float16%s on CUDA, got %s", fn, arg,
                    allow_int ? ", int32 or int64" : "", fa_dtype_name(t->dtype));
  return 0;
}
/* t is defined, on ref's device, of ref's dtype and shape */
static int check_same(const char *fn, const char *arg, const fa_tensor *t, const char *ref_arg, const fa_tensor *ref) {
  int rc;
  if ((rc = fa_check_like(fn, arg, t, ref_arg, ref))) return rc;
  return fa_check_same_shape(fn, arg, t, ref_arg, ref);
}

/* ================================================================== binary forward */
/* out, a, b: same shape (any strides).  out = a <op> (alpha * b) */
typedef struct { int op, dtype; double alpha; } binary_ctx;

static inline float bin_f32(int op, float x, float y, float al) {
  switch (op) {
    case FA_ADD: return x + al * y;
    case FA_SUB: return x - al * y;
    case FA_MUL: return x * (al * y);
    default: return x / (al * y);
  }
}
static inline double bin_f64(int op, double x, double y, double al) {
  switch (op) {
    case FA_ADD: return x + al * y;
    case FA_SUB: return x - al * y;
    case FA_MUL: return x * (al * y);
    default: return x / (al * y);
  }
}
static inline int64_t bin_i(int op, int64_t x, int64_t y, int64_t al) {
  int64_t ay = wmul(al, y);
  switch (op) {
    case FA_ADD: return wadd(x, ay);
    case FA_SUB: return wsub(x, ay);
    case FA_MUL: return wmul(x, ay);
    default: return tdiv(x, ay);
  }
}

/* One block for a literal op; the loops with inner strides 1 (and 0: a broadcast operand, read once per
 * row) vectorise. ro/si: row and inner strides of o, a, b. */
EW_INLINE void bin_f32_blk(int op, float al, int64_t rows, int64_t n, float *o, const float *a, const float *b,
                           const int64_t *ro, const int64_t *si) {
  for (int64_t r = 0; r < rows; r++, o += ro[0], a += ro[1], b += ro[2]) {
    if (si[0] == 1 && si[1] == 1 && si[2] == 1) {
      for (int64_t i = 0; i < n; i++) o[i] = bin_f32(op, a[i], b[i], al);
    } else if (si[0] == 1 && si[1] == 1 && si[2] == 0) {
      float y = b[0];
      for (int64_t i = 0; i < n; i++) o[i] = bin_f32(op, a[i], y, al);
    } else if (si[0] == 1 && si[1] == 0 && si[2] == 1) {
      float x = a[0];
      for (int64_t i = 0; i < n; i++) o[i] = bin_f32(op, x, b[i], al);
    } else {
      for (int64_t i = 0; i < n; i++) o[i * si[0]] = bin_f32(op, a[i * si[1]], b[i * si[2]], al);
    }
  }
}
EW_INLINE void bin_f64_blk(int op, double al, int64_t rows, int64_t n, double *o, const double *a, const double *b,
                           const int64_t *ro, const int64_t *si) {
  for (int64_t r = 0; r < rows; r++, o += ro[0], a += ro[1], b += ro[2]) {
    if (si[0] == 1 && si[1] == 1 && si[2] == 1) {
      for (int64_t i = 0; i < n; i++) o[i] = bin_f64(op, a[i], b[i], al);
    } else if (si[0] == 1 && si[1] == 1 && si[2] == 0) {
      double y = b[0];
      for (int64_t i = 0; i < n; i++) o[i] = bin_f64(op, a[i], y, al);
    } else if (si[0] == 1 && si[1] == 0 && si[2] == 1) {
      double x = a[0];
      for (int64_t i = 0; i < n; i++) o[i] = bin_f64(op, x, b[i], al);
    } else {
      for (int64_t i = 0; i < n; i++) o[i * si[0]] = bin_f64(op, a[i * si[1]], b[i * si[2]], al);
    }
  }
}
/* one copy of the loops per op, so that each vectorises */
FA_HOT_CLONES static void binary_f32(int op, float al, int64_t rows, int64_t n, float *o, const float *a, const float *b,
                                     const int64_t *ro, const int64_t *si) {
  switch (op) {
    case FA_ADD: bin_f32_blk(FA_ADD, al, rows, n, o, a, b, ro, si); break;
    case FA_SUB: bin_f32_blk(FA_SUB, al, rows, n, o, a, b, ro, si); break;
    case FA_MUL: bin_f32_blk(FA_MUL, al, rows, n, o, a, b, ro, si); break;
    default: bin_f32_blk(FA_DIV, al, rows, n, o, a, b, ro, si); break;
  }
}
FA_HOT_CLONES static void binary_f64(int op, double al, int64_t rows, int64_t n, double *o, const double *a,
                                     const double *b, const int64_t *ro, const int64_t *si) {
  switch (op) {
    case FA_ADD: bin_f64_blk(FA_ADD, al, rows, n, o, a, b, ro, si); break;
    case FA_SUB: bin_f64_blk(FA_SUB, al, rows, n, o, a, b, ro, si); break;
    case FA_MUL: bin_f64_blk(FA_MUL, al, rows, n, o, a, b, ro, si); break;
    default: bin_f64_blk(FA_DIV, al, rows, n, o, a, b, ro, si); break;
  }
}

static void binary_blk(const void *vc, int64_t rows, int64_t n, char *const *p, const int64_t *ro, const int64_t *si) {
  const binary_ctx *c = vc;
  int op = c->op, dt = c->dtype;
  if (dt == FA_FLOAT32) {
    binary_f32(op, (float)c->alpha, rows, n, (float *)p[0], (const float *)p[1], (const float *)p[2], ro, si);
  } else if (dt == FA_FLOAT64) {
    binary_f64(op, c->alpha, rows, n, (double *)p[0], (const double *)p[1], (const double *)p[2], ro, si);
  } else {
    int64_t al = (int64_t)c->alpha;
    for (int64_t r = 0; r < rows; r++)
      for (int64_t i = 0; i < n; i++)
        st_i(p[0], dt, r * ro[0] + i * si[0], bin_i(op, ld_i(p[1], dt, r * ro[1] + i * si[1]), ld_i(p[2], dt, r * ro[2] + i * si[2]), al));
  }
}

/* integer division: finds a zero divisor (alpha * b == 0) before anything is written */
static int int_div_has_zero(const fa_tensor *b, double alpha) {
  if (alpha == 0) return 1;
  int64_t n = fa_numel(b), zero = 0;
#pragma omp parallel for schedule(static) reduction(|| : zero) if (n > FA_PARALLEL_GRAIN)
  for (int64_t i = 0; i < n; i++)
    if (ld_i((const char *)b->data, b->dtype, fa_offset(b, i)) == 0) zero = 1;
  return (int)zero;
}

int fa_binary_forward(int op, fa_tensor *out, const fa_tensor *a, const fa_tensor *b, double alpha) {
  static const char *fn = "fa_binary_forward";
  int rc;
  if (op < FA_ADD || op > FA_DIV)
    return fa_error(FA_ERR_ARG, "%s: argument 'op': expected FA_ADD, FA_SUB, FA_MUL or FA_DIV (0..3), got %d", fn, op);
  if ((rc = fa_check_defined(fn, "a", a)) || (rc = check_ew_dtype(fn, "a", a, 1)) ||
      (rc = check_same(fn, "b", b, "a", a)) || (rc = check_same(fn, "out", out, "a", a)))
    return rc;
  if (is_int(a->dtype) && !is_integral(alpha))
    return fa_error(FA_ERR_ARG, "%s: argument 'alpha': expected an integer for %s tensors, got %g", fn,
                    fa_dtype_name(a->dtype), alpha);
  if (fa_numel(out) == 0) return 0;
  if (out->device >= 0) return fa_cu_binary_forward(op, out, a, b, alpha);
  if (op == FA_DIV && is_int(a->dtype) && int_div_has_zero(b, alpha))
    return fa_error(FA_ERR_ARG, "%s: argument 'b': integer division by zero (alpha * b has a zero element)", fn);
  binary_ctx c = { op, a->dtype, alpha };
  const fa_tensor *t[3] = { out, a, b };
  ew_loop(3, t, binary_blk, &c);
  return 0;
}


/* ================================================================== binary backward */
/* grads of out = a <op> b (alpha = 1), all of one shape:
 *   add: ga = go, gb = go        sub: ga = go, gb = -go
 *   mul: ga = go*b, gb = go*a    div: ga = go/b, gb = -go*((a/b)/b)   (PyTorch's formulas)
 * grad_a/grad_b must not overlap grad_out, a or b. */
typedef struct { int op, dtype, which; } binback_ctx; /* which: 0 = grad_a, 1 = grad_b */

static inline float binback_f32(int op, int which, float go, float a, float b) {
  switch (op) {
    case FA_ADD: return go;
    case FA_SUB: return which ? -go : go;
    case FA_MUL: return which ? go * a : go * b;
    default: return which ? -go * ((a / b) / b) : go / b;
  }
}
static inline double binback_f64(int op, int which, double go, double a, double b) {
  switch (op) {
    case FA_ADD: return go;
    case FA_SUB: return which ? -go : go;
    case FA_MUL: return which ? go * a : go * b;
    default: return which ? -go * ((a / b) / b) : go / b;
  }
}

/* operands: grad, grad_out, a, b (a or b may be absent when the op does not read it: its pointer is then
 * grad_out's, read but unused) */
EW_INLINE void binback_f32_blk(int op, int w, int64_t rows, int64_t n, float *g, const float *go, const float *a,
                               const float *b, const int64_t *ro, const int64_t *si) {
  for (int64_t r = 0; r < rows; r++, g += ro[0], go += ro[1], a += ro[2], b += ro[3]) {
    if (si[0] == 1 && si[1] == 1 && si[2] == 1 && si[3] == 1)
      for (int64_t i = 0; i < n; i++) g[i] = binback_f32(op, w, go[i], a[i], b[i]);
    else
      for (int64_t i = 0; i < n; i++) g[i * si[0]] = binback_f32(op, w, go[i * si[1]], a[i * si[2]], b[i * si[3]]);
  }
}
EW_INLINE void binback_f64_blk(int op, int w, int64_t rows, int64_t n, double *g, const double *go, const double *a,
                               const double *b, const int64_t *ro, const int64_t *si) {
  for (int64_t r = 0; r < rows; r++, g += ro[0], go += ro[1], a += ro[2], b += ro[3]) {
    if (si[0] == 1 && si[1] == 1 && si[2] == 1 && si[3] == 1)
      for (int64_t i = 0; i < n; i++) g[i] = binback_f64(op, w, go[i], a[i], b[i]);
    else
      for (int64_t i = 0; i < n; i++) g[i * si[0]] = binback_f64(op, w, go[i * si[1]], a[i * si[2]], b[i * si[3]]);
  }
}
/* one copy of the loops per (op, which), so that each vectorises */
FA_HOT_CLONES static void binback_f32_any(int op, int w, int64_t rows, int64_t n, float *g, const float *go,
                                          const float *a, const float *b, const int64_t *ro, const int64_t *si) {
  switch (op + 4 * w) {
    case 0: binback_f32_blk(FA_ADD, 0, rows, n, g, go, a, b, ro, si); break;
    case 1: binback_f32_blk(FA_SUB, 0, rows, n, g, go, a, b, ro, si); break;
    case 2: binback_f32_blk(FA_MUL, 0, rows, n, g, go, a, b, ro, si); break;
    case 3: binback_f32_blk(FA_DIV, 0, rows, n, g, go, a, b, ro, si); break;
    case 4: binback_f32_blk(FA_ADD, 1, rows, n, g, go, a, b, ro, si); break;
    case 5: binback_f32_blk(FA_SUB, 1, rows, n, g, go, a, b, ro, si); break;
    case 6: binback_f32_blk(FA_MUL, 1, rows, n, g, go, a, b, ro, si); break;
    default: binback_f32_blk(FA_DIV, 1, rows, n, g, go, a, b, ro, si); break;
  }
}
FA_HOT_CLONES static void binback_f64_any(int op, int w, int64_t rows, int64_t n, double *g, const double *go,
                                          const double *a, const double *b, const int64_t *ro, const int64_t *si) {
  switch (op + 4 * w) {
    case 0: binback_f64_blk(FA_ADD, 0, rows, n, g, go, a, b, ro, si); break;
    case 1: binback_f64_blk(FA_SUB, 0, rows, n, g, go, a, b, ro, si); break;
    case 2: binback_f64_blk(FA_MUL, 0, rows, n, g, go, a, b, ro, si); break;
    case 3: binback_f64_blk(FA_DIV, 0, rows, n, g, go, a, b, ro, si); break;
    case 4: binback_f64_blk(FA_ADD, 1, rows, n, g, go, a, b, ro, si); break;
    case 5: binback_f64_blk(FA_SUB, 1, rows, n, g, go, a, b, ro, si); break;
    case 6: binback_f64_blk(FA_MUL, 1, rows, n, g, go, a, b, ro, si); break;
    default: binback_f64_blk(FA_DIV, 1, rows, n, g, go, a, b, ro, si); break;
  }
}

static void binback_blk(const void *vc, int64_t rows, int64_t n, char *const *p, const int64_t *ro, const int64_t *si) {
  const binback_ctx *c = vc;
  int op = c->op, w = c->which, dt = c->dtype;
  if (dt == FA_FLOAT32) {
    binback_f32_any(op, w, rows, n, (float *)p[0], (const float *)p[1], (const float *)p[2], (const float *)p[3], ro, si);
  } else if (dt == FA_FLOAT64) {
    binback_f64_any(op, w, rows, n, (double *)p[0], (const double *)p[1], (const double *)p[2], (const double *)p[3], ro,
                    si);
  } else { /* ints: add, sub, mul */
    for (int64_t r = 0; r < rows; r++)
      for (int64_t i = 0; i < n; i++) {
        int64_t go = ld_i(p[1], dt, r * ro[1] + i * si[1]), v;
        if (op == FA_MUL) v = wmul(go, ld_i(p[w ? 2 : 3], dt, r * ro[w ? 2 : 3] + i * si[w ? 2 : 3]));
        else v = (op == FA_SUB && w) ? wsub(0, go) : go;
        st_i(p[0], dt, r * ro[0] + i * si[0], v);
      }
  }
}

int fa_binary_backward(int op, fa_tensor *grad_a, fa_tensor *grad_b, const fa_tensor *grad_out,
                       const fa_tensor *a, const fa_tensor *b) {
  static const char *fn = "fa_binary_backward";
  int rc;
  if (op < FA_ADD || op > FA_DIV)
    return fa_error(FA_ERR_ARG, "%s: argument 'op': expected FA_ADD, FA_SUB, FA_MUL or FA_DIV (0..3), got %d", fn, op);
  if ((rc = fa_check_defined(fn, "grad_out", grad_out)) || (rc = check_ew_dtype(fn, "grad_out", grad_out, 1)))
    return rc;
  if (op == FA_DIV && is_int(grad_out->dtype))
    return fa_error(FA_ERR_ARG, "%s: argument 'grad_out': expected float32 or float64 for FA_DIV (integer division has no gradient), got %s",
                    fn, fa_dtype_name(grad_out->dtype));
  if (grad_a && (rc = check_same(fn, "grad_a", grad_a, "grad_out", grad_out))) return rc;
  if (grad_b && (rc = check_same(fn, "grad_b", grad_b, "grad_out", grad_out))) return rc;
  /* which inputs the requested gradients read */
  int need_a = grad_b && (op == FA_MUL || op == FA_DIV);
  int need_b = (grad_a && (op == FA_MUL || op == FA_DIV)) || (grad_b && op == FA_DIV);
  if (need_a && (rc = check_same(fn, "a", a, "grad_out", grad_out))) return rc;
  if (need_b && (rc = check_same(fn, "b", b, "grad_out", grad_out))) return rc;
  if ((!grad_a && !grad_b) || fa_numel(grad_out) == 0) return 0;
  if (grad_out->device >= 0) return fa_cu_binary_backward(op, grad_a, grad_b, grad_out, a, b);
  const fa_tensor *ta = need_a ? a : grad_out, *tb = need_b ? b : grad_out;
  if (grad_a) {
    binback_ctx c = { op, grad_out->dtype, 0 };
    const fa_tensor *t[4] = { grad_a, grad_out, ta, tb };
    ew_loop(4, t, binback_blk, &c);
  }
  if (grad_b) {
    binback_ctx c = { op, grad_out->dtype, 1 };
    const fa_tensor *t[4] = { grad_b, grad_out, ta, tb };
    ew_loop(4, t, binback_blk, &c);
  }
  return 0;
}

/* ================================================================== scale: out = a*scale + shift */
/* out, a: same shape. Integer tensors: exact integer arithmetic when scale and shift are integers;
 * otherwise computed in double and truncated toward zero (a C cast; exact below 2^53). */
typedef struct { int dtype, exact; double scale, shift; } scale_ctx;

FA_HOT_CLONES static void scale_f32(float sc, float sh, int64_t rows, int64_t n, float *o, const float *a,
                                    const int64_t *ro, const int64_t *si) {
  for (int64_t r = 0; r < rows; r++, o += ro[0], a += ro[1]) {
    if (si[0] == 1 && si[1] == 1)
      for (int64_t i = 0; i < n; i++) o[i] = a[i] * sc + sh;
    else
      for (int64_t i = 0; i < n; i++) o[i * si[0]] = a[i * si[1]] * sc + sh;
  }
}
FA_HOT_CLONES static void scale_f64(double sc, double sh, int64_t rows, int64_t n, double *o, const double *a,
                                    const int64_t *ro, const int64_t *si) {
  for (int64_t r = 0; r < rows; r++, o += ro[0], a += ro[1]) {
    if (si[0] == 1 && si[1] == 1)
      for (int64_t i = 0; i < n; i++) o[i] = a[i] * sc + sh;
    else
      for (int64_t i = 0; i < n; i++) o[i * si[0]] = a[i * si[1]] * sc + sh;
  }
}

static void scale_blk(const void *vc, int64_t rows, int64_t n, char *const *p, const int64_t *ro, const int64_t *si) {
  const scale_ctx *c = vc;
  int dt = c->dtype;
  if (dt == FA_FLOAT32) {
    scale_f32((float)c->scale, (float)c->shift, rows, n, (float *)p[0], (const float *)p[1], ro, si);
  } else if (dt == FA_FLOAT64) {
    scale_f64(c->scale, c->shift, rows, n, (double *)p[0], (const double *)p[1], ro, si);
  } else if (c->exact) {
    int64_t sc = (int64_t)c->scale, sh = (int64_t)c->shift;
    for (int64_t r = 0; r < rows; r++) {
      if (dt == FA_INT64 && si[0] == 1 && si[1] == 1) { /* the 0-based -> 1-based index case */
        int64_t *o = (int64_t *)p[0] + r * ro[0];
        const int64_t *a = (const int64_t *)p[1] + r * ro[1];
        for (int64_t i = 0; i < n; i++) o[i] = wadd(wmul(a[i], sc), sh);
      } else {
        for (int64_t i = 0; i < n; i++)
          st_i(p[0], dt, r * ro[0] + i * si[0], wadd(wmul(ld_i(p[1], dt, r * ro[1] + i * si[1]), sc), sh));
      }
    }
  } else {
    for (int64_t r = 0; r < rows; r++)
      for (int64_t i = 0; i < n; i++)
        st_i(p[0], dt, r * ro[0] + i * si[0], sat_i64((double)ld_i(p[1], dt, r * ro[1] + i * si[1]) * c->scale + c->shift));
  }
}

int fa_scale_forward(fa_tensor *out, const fa_tensor *a, double scale, double shift) {
  static const char *fn = "fa_scale_forward";
  int rc;
  if ((rc = fa_check_defined(fn, "a", a)) || (rc = check_ew_dtype(fn, "a", a, 1)) ||
      (rc = check_same(fn, "out", out, "a", a)))
    return rc;
  if (fa_numel(out) == 0) return 0;
  if (out->device >= 0) return fa_cu_scale_forward(out, a, scale, shift);
  scale_ctx c = { a->dtype, is_integral(scale) && is_integral(shift), scale, shift };
  const fa_tensor *t[2] = { out, a };
  ew_loop(2, t, scale_blk, &c);
  return 0;
}


/* ================================================================== addcmul: out = a + value*b*c */
/* out, a, b, c: same shape; evaluated as a + (value*b)*c, PyTorch's order */
typedef struct { int dtype; double value; } addcmul_ctx;

FA_HOT_CLONES static void addcmul_f32(float v, int64_t rows, int64_t n, float *o, const float *a, const float *b,
                                      const float *d, const int64_t *ro, const int64_t *si) {
  for (int64_t r = 0; r < rows; r++, o += ro[0], a += ro[1], b += ro[2], d += ro[3]) {
    if (si[0] == 1 && si[1] == 1 && si[2] == 1 && si[3] == 1)
      for (int64_t i = 0; i < n; i++) o[i] = a[i] + v * b[i] * d[i];
    else
      for (int64_t i = 0; i < n; i++) o[i * si[0]] = a[i * si[1]] + v * b[i * si[2]] * d[i * si[3]];
  }
}
FA_HOT_CLONES static void addcmul_f64(double v, int64_t rows, int64_t n, double *o, const double *a, const double *b,
                                      const double *d, const int64_t *ro, const int64_t *si) {
  for (int64_t r = 0; r < rows; r++, o += ro[0], a += ro[1], b += ro[2], d += ro[3]) {
    if (si[0] == 1 && si[1] == 1 && si[2] == 1 && si[3] == 1)
      for (int64_t i = 0; i < n; i++) o[i] = a[i] + v * b[i] * d[i];
    else
      for (int64_t i = 0; i < n; i++) o[i * si[0]] = a[i * si[1]] + v * b[i * si[2]] * d[i * si[3]];
  }
}

static void addcmul_blk(const void *vc, int64_t rows, int64_t n, char *const *p, const int64_t *ro, const int64_t *si) {
  const addcmul_ctx *c = vc;
  int dt = c->dtype;
  if (dt == FA_FLOAT32) {
    addcmul_f32((float)c->value, rows, n, (float *)p[0], (const float *)p[1], (const float *)p[2], (const float *)p[3],
                ro, si);
  } else if (dt == FA_FLOAT64) {
    addcmul_f64(c->value, rows, n, (double *)p[0], (const double *)p[1], (const double *)p[2], (const double *)p[3], ro,
                si);
  } else {
    int64_t v = (int64_t)c->value;
    for (int64_t r = 0; r < rows; r++)
      for (int64_t i = 0; i < n; i++)
        st_i(p[0], dt, r * ro[0] + i * si[0],
             wadd(ld_i(p[1], dt, r * ro[1] + i * si[1]),
                  wmul(wmul(v, ld_i(p[2], dt, r * ro[2] + i * si[2])), ld_i(p[3], dt, r * ro[3] + i * si[3]))));
  }
}

int fa_addcmul_forward(fa_tensor *out, const fa_tensor *a, const fa_tensor *b, const fa_tensor *c, double value) {
  static const char *fn = "fa_addcmul_forward";
  int rc;
  if ((rc = fa_check_defined(fn, "a", a)) || (rc = check_ew_dtype(fn, "a", a, 1)) ||
      (rc = check_same(fn, "b", b, "a", a)) || (rc = check_same(fn, "c", c, "a", a)) ||
      (rc = check_same(fn, "out", out, "a", a)))
    return rc;
  if (is_int(a->dtype) && !is_integral(value))
    return fa_error(FA_ERR_ARG, "%s: argument 'value': expected an integer for %s tensors, got %g", fn,
                    fa_dtype_name(a->dtype), value);
  if (fa_numel(out) == 0) return 0;
  if (out->device >= 0) return fa_cu_addcmul_forward(out, a, b, c, value);
  addcmul_ctx ctx = { a->dtype, value };
  const fa_tensor *t[4] = { out, a, b, c };
  ew_loop(4, t, addcmul_blk, &ctx);
  return 0;
}


/* ================================================================== float32 approximations */
/* Plain arithmetic and selects (no branches, no libm calls), so that the loops vectorise. Polynomial
 * coefficients fitted (minimax, float64) for this file; the errors quoted are the largest found over
 * every 7th float32 bit pattern, against libm in double. */

/* tanh: |x| < 0.625: x + x^3 P(x^2); else 1 - 2 / (exp(2|x|) + 1); the sign of x (-0 stays -0).
 * Within 1.4 ulp; +-1 from |x| > 9 on (float rounding), NaN stays NaN. */
static inline float tanh_f32(float x) {
  float ax = fabsf(x), z = ax * ax;
  float p = -5.704986327e-03f;
  p = p * z + 2.063908657e-02f;
  p = p * z - 5.373971485e-02f;
  p = p * z + 1.333144219e-01f;
  p = p * z - 3.333328194e-01f;
  float small = ax + ax * (z * p);
  float large = 1.0f - 2.0f / (fa_fast_expf(2.0f * ax) + 1.0f); /* exp = inf: 1 */
  return copysignf(ax < 0.625f ? small : large, x);
}

/* exp(-x^2 / 2), without the rounding error of x^2 (which would be x^2 * 2^-24, relative, in the
 * result): |x| = h + d with h on a 2^-8 grid, so h^2 is exact; exp(-h^2/2) * exp(-d (2h + d) / 2), the
 * second factor by four Taylor terms (|argument| < 0.03). |x| >= 14.5 (and NaN): 0. */
static inline float gauss_f32(float x) {
  float ax = fabsf(x);
  ax = ax < 14.5f ? ax : 14.5f; /* exp(-105) is 0 in float anyway; NaN -> 14.5 */
  float h = (ax + 49152.0f) - 49152.0f, d = (ax - h) * (ax + h) * 0.5f; /* 49152 = 1.5 * 2^15: rounds to 2^-8 */
  float e2 = 1.0f - d * (1.0f - d * (0.5f - d * (1.0f / 6)));
  return fa_fast_expf(-0.5f * (h * h)) * e2;
}

/* Phi(x) = (1 + erf(x / sqrt 2)) / 2, the normal CDF, accurate in both tails (no 1 + erf cancellation):
 * the upper tail Q(a) = Phi(-a), a = |x|, is exp(-a^2 / 2) M(a) with M(a) = Q(a) exp(a^2 / 2) (0.5 at 0,
 * about 1 / (a sqrt(2 pi)) for large a) a degree-4 / degree-5 rational function of a (minimax fit on
 * [0, 14.5], relative error 6e-9; beyond 14.5 exp(-a^2/2) is 0 in float). Phi = 1 - Q for x > 0, Q for
 * x <= 0. One formula, no selects between ranges: half the cost of a piecewise erf.
 * gelu = x Phi(x) within 8.8 ulp for x >= -12 (below, gelu < 1e-32 goes subnormal, then 0), within 2 ulp
 * for x >= 1. Phi(NaN) = 0, so x * Phi(x) is NaN. */
static inline float phi_f32(float x) {
  float a = fabsf(x), ac = a < 14.5f ? a : 14.5f; /* NaN -> 14.5 */
  float p = 4.115942604e-03f;
  p = p * ac + 4.063101264e-02f;
  p = p * ac + 1.832289427e-01f;
  p = p * ac + 4.382871593e-01f;
  p = p * ac + 5.000000029e-01f;
  float r = 1.031701834e-02f;
  r = r * ac + 1.018532933e-01f;
  r = r * ac + 4.694541595e-01f;
  r = r * ac + 1.202478329e+00f;
  r = r * ac + 1.674459298e+00f;
  r = r * ac + 1.0f;
  float q = gauss_f32(x) * (p / r);
  return x > 0 ? 1.0f - q : q;
}

/* ================================================================== unary forward */
/* out, x: same shape.  gelu is the exact (erf) form, PyTorch's default. */
static const char *unary_name[FA_NUM_UNARY] = { "exp", "log", "sqrt", "abs", "sign", "neg", "relu", "tanh", "sigmoid", "gelu" };
typedef struct { int op, dtype, from_y; } unary_ctx;

static inline float un_f32(int op, float x) {
  switch (op) {
    case FA_EXP: return fa_fast_expf(x);
    case FA_LOG: return logf(x);
    case FA_SQRT: return sqrtf(x);
    case FA_ABS: return fabsf(x);
    case FA_SIGN: return (float)((x > 0) - (x < 0));       /* sign(0) = sign(NaN) = 0, as torch.sign */
    case FA_NEG: return -x;
    case FA_RELU: return x < 0 ? 0.0f : x;                  /* NaN propagates, as torch.relu */
    case FA_TANH: return tanh_f32(x);
    case FA_SIGMOID: return 1.0f / (1.0f + fa_fast_expf(-x));
    default: return x * phi_f32(x);
  }
}
static inline double un_f64(int op, double x) {
  switch (op) {
    case FA_EXP: return exp(x);
    case FA_LOG: return log(x);
    case FA_SQRT: return sqrt(x);
    case FA_ABS: return fabs(x);
    case FA_SIGN: return (double)((x > 0) - (x < 0));
    case FA_NEG: return -x;
    case FA_RELU: return x < 0 ? 0.0 : x;
    case FA_TANH: return tanh(x);
    case FA_SIGMOID: return 1.0 / (1.0 + exp(-x));
    default: return x * (0.5 * erfc(-x * M_SQRT1_2)); /* erfc: no 1 + erf cancellation for x << 0 */
  }
}
static inline int64_t un_i(int op, int64_t x) {
  switch (op) {
    case FA_ABS: return x < 0 ? wsub(0, x) : x;
    case FA_SIGN: return (x > 0) - (x < 0);
    case FA_NEG: return wsub(0, x);
    default: return x < 0 ? 0 : x; /* relu */
  }
}

EW_INLINE void un_f32_blk(int op, int64_t rows, int64_t n, float *o, const float *x, const int64_t *ro, const int64_t *si) {
  for (int64_t r = 0; r < rows; r++, o += ro[0], x += ro[1]) {
    if (si[0] == 1 && si[1] == 1)
      for (int64_t i = 0; i < n; i++) o[i] = un_f32(op, x[i]);
    else
      for (int64_t i = 0; i < n; i++) o[i * si[0]] = un_f32(op, x[i * si[1]]);
  }
}
EW_INLINE void un_f64_blk(int op, int64_t rows, int64_t n, double *o, const double *x, const int64_t *ro,
                          const int64_t *si) {
  for (int64_t r = 0; r < rows; r++, o += ro[0], x += ro[1]) {
    if (si[0] == 1 && si[1] == 1)
      for (int64_t i = 0; i < n; i++) o[i] = un_f64(op, x[i]);
    else
      for (int64_t i = 0; i < n; i++) o[i * si[0]] = un_f64(op, x[i * si[1]]);
  }
}
/* one copy of the loops per op, so that each vectorises (all but log in float32; the float64 ones that
 * call libm do not) */
FA_HOT_CLONES static void unary_f32(int op, int64_t rows, int64_t n, float *o, const float *x, const int64_t *ro,
                                    const int64_t *si) {
  switch (op) {
    case FA_EXP: un_f32_blk(FA_EXP, rows, n, o, x, ro, si); break;
    case FA_LOG: un_f32_blk(FA_LOG, rows, n, o, x, ro, si); break;
    case FA_SQRT: un_f32_blk(FA_SQRT, rows, n, o, x, ro, si); break;
    case FA_ABS: un_f32_blk(FA_ABS, rows, n, o, x, ro, si); break;
    case FA_SIGN: un_f32_blk(FA_SIGN, rows, n, o, x, ro, si); break;
    case FA_NEG: un_f32_blk(FA_NEG, rows, n, o, x, ro, si); break;
    case FA_RELU: un_f32_blk(FA_RELU, rows, n, o, x, ro, si); break;
    case FA_TANH: un_f32_blk(FA_TANH, rows, n, o, x, ro, si); break;
    case FA_SIGMOID: un_f32_blk(FA_SIGMOID, rows, n, o, x, ro, si); break;
    default: un_f32_blk(FA_GELU, rows, n, o, x, ro, si); break;
  }
}
FA_HOT_CLONES static void unary_f64(int op, int64_t rows, int64_t n, double *o, const double *x, const int64_t *ro,
                                    const int64_t *si) {
  switch (op) {
    case FA_EXP: un_f64_blk(FA_EXP, rows, n, o, x, ro, si); break;
    case FA_LOG: un_f64_blk(FA_LOG, rows, n, o, x, ro, si); break;
    case FA_SQRT: un_f64_blk(FA_SQRT, rows, n, o, x, ro, si); break;
    case FA_ABS: un_f64_blk(FA_ABS, rows, n, o, x, ro, si); break;
    case FA_SIGN: un_f64_blk(FA_SIGN, rows, n, o, x, ro, si); break;
    case FA_NEG: un_f64_blk(FA_NEG, rows, n, o, x, ro, si); break;
    case FA_RELU: un_f64_blk(FA_RELU, rows, n, o, x, ro, si); break;
    case FA_TANH: un_f64_blk(FA_TANH, rows, n, o, x, ro, si); break;
    case FA_SIGMOID: un_f64_blk(FA_SIGMOID, rows, n, o, x, ro, si); break;
    default: un_f64_blk(FA_GELU, rows, n, o, x, ro, si); break;
  }
}

static void unary_blk(const void *vc, int64_t rows, int64_t n, char *const *p, const int64_t *ro, const int64_t *si) {
  const unary_ctx *c = vc;
  int op = c->op, dt = c->dtype;
  if (dt == FA_FLOAT32) {
    unary_f32(op, rows, n, (float *)p[0], (const float *)p[1], ro, si);
  } else if (dt == FA_FLOAT64) {
    unary_f64(op, rows, n, (double *)p[0], (const double *)p[1], ro, si);
  } else {
    for (int64_t r = 0; r < rows; r++)
      for (int64_t i = 0; i < n; i++) st_i(p[0], dt, r * ro[0] + i * si[0], un_i(op, ld_i(p[1], dt, r * ro[1] + i * si[1])));
  }
}

static int check_unary_op(const char *fn, int op) {
  if (op < 0 || op >= FA_NUM_UNARY)
    return fa_error(FA_ERR_ARG, "%s: argument 'op': expected a fa_unary_op (0..%d), got %d", fn, FA_NUM_UNARY - 1, op);
  return 0;
}
/* ops that are defined on integers */
static inline int unary_int_ok(int op) { return op == FA_ABS || op == FA_SIGN || op == FA_NEG || op == FA_RELU; }

int fa_unary_forward(int op, fa_tensor *out, const fa_tensor *x) {
  static const char *fn = "fa_unary_forward";
  int rc;
  if ((rc = check_unary_op(fn, op)) || (rc = fa_check_defined(fn, "x", x))) return rc;
  if (is_int(x->dtype) && !unary_int_ok(op))
    return fa_error(FA_ERR_ARG, "%s: argument 'x': %s expects float32 or float64 on the CPU, got %s", fn, unary_name[op],
                    fa_dtype_name(x->dtype));
  if ((rc = check_ew_dtype(fn, "x", x, unary_int_ok(op))) || (rc = check_same(fn, "out", out, "x", x))) return rc;
  if (fa_numel(out) == 0) return 0;
  if (out->device >= 0) return fa_cu_unary_forward(op, out, x);
  unary_ctx c = { op, x->dtype, 0 };
  const fa_tensor *t[2] = { out, x };
  ew_loop(2, t, unary_blk, &c);
  return 0;
}


/* ================================================================== unary backward */
/* grad_x = f'(x) * grad_y. v is y (the forward output) when from_y, else x:
 *   exp: g*y            log: g/x              sqrt: g/(2y)          abs: g*sign(x)   sign: 0
 *   neg: -g             relu: g where y > 0   tanh: g*(1 - y^2)     sigmoid: g*(1 - y)*y
 *   gelu: g*(Phi(x) + x*phi(x))  (x only)
 * exp, sqrt, relu, tanh and sigmoid use y when it is given and recompute it from x otherwise (with the
 * forward's own functions, so both ways agree). */
static inline float ungrad_f32(int op, float g, float v, int from_y) {
  float y;
  switch (op) {
    case FA_EXP: return g * (from_y ? v : fa_fast_expf(v));
    case FA_LOG: return g / v;
    case FA_SQRT: return g / (2.0f * (from_y ? v : sqrtf(v)));
    case FA_ABS: return v > 0 ? g : (v < 0 ? -g : 0.0f);
    case FA_SIGN: return 0.0f;
    case FA_NEG: return -g;
    case FA_RELU: return v > 0 ? g : 0.0f;
    case FA_TANH: y = from_y ? v : tanh_f32(v); return g * (1.0f - y * y);
    case FA_SIGMOID: y = from_y ? v : 1.0f / (1.0f + fa_fast_expf(-v)); return g * (1.0f - y) * y;
    default: {
      float cdf = phi_f32(v);
      float pdf = gauss_f32(v) * (float)(0.5 * M_2_SQRTPI * M_SQRT1_2);
      return g * (cdf + v * pdf);
    }
  }
}
static inline double ungrad_f64(int op, double g, double v, int from_y) {
  double y;
  switch (op) {
    case FA_EXP: return g * (from_y ? v : exp(v));
    case FA_LOG: return g / v;
    case FA_SQRT: return g / (2.0 * (from_y ? v : sqrt(v)));
    case FA_ABS: return v > 0 ? g : (v < 0 ? -g : 0.0);
    case FA_SIGN: return 0.0;
    case FA_NEG: return -g;
    case FA_RELU: return v > 0 ? g : 0.0;
    case FA_TANH: y = from_y ? v : tanh(v); return g * (1.0 - y * y);
    case FA_SIGMOID: y = from_y ? v : 1.0 / (1.0 + exp(-v)); return g * (1.0 - y) * y;
    default: {
      double cdf = 0.5 * erfc(-v * M_SQRT1_2);
      double pdf = exp(-0.5 * v * v) * (0.5 * M_2_SQRTPI * M_SQRT1_2);
      return g * (cdf + v * pdf);
    }
  }
}

/* operands: grad_x, grad_y, v (x or y) */
EW_INLINE void unback_f32_blk(int op, int fy, int64_t rows, int64_t n, float *gx, const float *gy, const float *v,
                              const int64_t *ro, const int64_t *si) {
  for (int64_t r = 0; r < rows; r++, gx += ro[0], gy += ro[1], v += ro[2]) {
    if (si[0] == 1 && si[1] == 1 && si[2] == 1)
      for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f32(op, gy[i], v[i], fy);
    else
      for (int64_t i = 0; i < n; i++) gx[i * si[0]] = ungrad_f32(op, gy[i * si[1]], v[i * si[2]], fy);
  }
}
EW_INLINE void unback_f64_blk(int op, int fy, int64_t rows, int64_t n, double *gx, const double *gy, const double *v,
                              const int64_t *ro, const int64_t *si) {
  for (int64_t r = 0; r < rows; r++, gx += ro[0], gy += ro[1], v += ro[2]) {
    if (si[0] == 1 && si[1] == 1 && si[2] == 1)
      for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f64(op, gy[i], v[i], fy);
    else
      for (int64_t i = 0; i < n; i++) gx[i * si[0]] = ungrad_f64(op, gy[i * si[1]], v[i * si[2]], fy);
  }
}
/* one copy of the loops per op, so that each vectorises where it can */
FA_HOT_CLONES static void unback_f32(int op, int fy, int64_t rows, int64_t n, float *gx, const float *gy, const float *v,
                                     const int64_t *ro, const int64_t *si) {
  switch (op) {
    case FA_EXP: unback_f32_blk(FA_EXP, fy, rows, n, gx, gy, v, ro, si); break;
    case FA_LOG: unback_f32_blk(FA_LOG, fy, rows, n, gx, gy, v, ro, si); break;
    case FA_SQRT: unback_f32_blk(FA_SQRT, fy, rows, n, gx, gy, v, ro, si); break;
    case FA_ABS: unback_f32_blk(FA_ABS, fy, rows, n, gx, gy, v, ro, si); break;
    case FA_SIGN: unback_f32_blk(FA_SIGN, fy, rows, n, gx, gy, v, ro, si); break;
    case FA_NEG: unback_f32_blk(FA_NEG, fy, rows, n, gx, gy, v, ro, si); break;
    case FA_RELU: unback_f32_blk(FA_RELU, fy, rows, n, gx, gy, v, ro, si); break;
    case FA_TANH: unback_f32_blk(FA_TANH, fy, rows, n, gx, gy, v, ro, si); break;
    case FA_SIGMOID: unback_f32_blk(FA_SIGMOID, fy, rows, n, gx, gy, v, ro, si); break;
    default: unback_f32_blk(FA_GELU, fy, rows, n, gx, gy, v, ro, si); break;
  }
}
FA_HOT_CLONES static void unback_f64(int op, int fy, int64_t rows, int64_t n, double *gx, const double *gy,
                                     const double *v, const int64_t *ro, const int64_t *si) {
  switch (op) {
    case FA_EXP: unback_f64_blk(FA_EXP, fy, rows, n, gx, gy, v, ro, si); break;
    case FA_LOG: unback_f64_blk(FA_LOG, fy, rows, n, gx, gy, v, ro, si); break;
    case FA_SQRT: unback_f64_blk(FA_SQRT, fy, rows, n, gx, gy, v, ro, si); break;
    case FA_ABS: unback_f64_blk(FA_ABS, fy, rows, n, gx, gy, v, ro, si); break;
    case FA_SIGN: unback_f64_blk(FA_SIGN, fy, rows, n, gx, gy, v, ro, si); break;
    case FA_NEG: unback_f64_blk(FA_NEG, fy, rows, n, gx, gy, v, ro, si); break;
    case FA_RELU: unback_f64_blk(FA_RELU, fy, rows, n, gx, gy, v, ro, si); break;
    case FA_TANH: unback_f64_blk(FA_TANH, fy, rows, n, gx, gy, v, ro, si); break;
    case FA_SIGMOID: unback_f64_blk(FA_SIGMOID, fy, rows, n, gx, gy, v, ro, si); break;
    default: unback_f64_blk(FA_GELU, fy, rows, n, gx, gy, v, ro, si); break;
  }
}

static void unback_blk(const void *vc, int64_t rows, int64_t n, char *const *p, const int64_t *ro, const int64_t *si) {
  const unary_ctx *c = vc;
  if (c->dtype == FA_FLOAT32)
    unback_f32(c->op, c->from_y, rows, n, (float *)p[0], (const float *)p[1], (const float *)p[2], ro, si);
  else
    unback_f64(c->op, c->from_y, rows, n, (double *)p[0], (const double *)p[1], (const double *)p[2], ro, si);
}

int fa_unary_backward(int op, fa_tensor *grad_x, const fa_tensor *grad_y, const fa_tensor *x, const fa_tensor *y) {
  static const char *fn = "fa_unary_backward";
  int rc;
  if ((rc = check_unary_op(fn, op)) || (rc = fa_check_defined(fn, "grad_y", grad_y)) ||
      (rc = check_ew_dtype(fn, "grad_y", grad_y, 0)) || (rc = check_same(fn, "grad_x", grad_x, "grad_y", grad_y)))
    return rc;
  int can_y = op == FA_EXP || op == FA_SQRT || op == FA_RELU || op == FA_TANH || op == FA_SIGMOID;
  int needs = op != FA_SIGN && op != FA_NEG;
  int from_y = can_y && y != NULL;
  const fa_tensor *v = NULL;
  if (needs) {
    if (from_y) {
      if ((rc = check_same(fn, "y", y, "grad_y", grad_y))) return rc;
      v = y;
    } else {
      if (!x)
        return fa_error(FA_ERR_ARG, "%s: argument 'x': expected a tensor (%s backward needs %s), got nothing", fn,
                        unary_name[op], can_y ? "the output y or the input x" : "the input x");
      if ((rc = check_same(fn, "x", x, "grad_y", grad_y))) return rc;
      v = x;
    }
  }
  if (fa_numel(grad_x) == 0) return 0;
  if (grad_x->device >= 0) return fa_cu_unary_backward(op, grad_x, grad_y, x, y);
  unary_ctx c = { op, grad_y->dtype, from_y };
  const fa_tensor *t[3] = { grad_x, grad_y, v ? v : grad_y };
  ew_loop(3, t, unback_blk, &c);
  return 0;
}
