/* elementwise.c: binary arithmetic (a <op> alpha*b), scale/shift, addcmul and the unary functions, forward
 * and backward, on the CPU. CUDA tensors go to fa_cu_* after validation.
 *
 * Every op here works on tensors of one shape with arbitrary strides (stride 0 = broadcast). The work is
 * cut into "rows" by ew_loop: chunks of the flat buffers when every tensor is contiguous (the common
 * case: simple loops that the compiler vectorises), else the last dimension, with one fa_offset per row
 * and a strided inner loop. Both paths call the same row function, so a strided view gives bit-for-bit
 * the result of its contiguous copy.
 *
 * dtypes on the CPU: float32 and float64 for everything (float32 computes in float, as PyTorch does);
 * binary, scale and addcmul also take int32/int64 (exact integer arithmetic, wrapping on overflow;
 * integer division truncates toward zero, as torch.div(..., rounding_mode='trunc') and Torch7);
 * neg/abs/sign/relu also take ints. */
#include "internal.h"
#include <stdint.h>

/* ------------------------------------------------------------------ the row loop */
typedef void (*ew_row_fn)(const void *ctx, int64_t len, char *const *p, const int64_t *s);
enum { EW_MAX_T = 4, EW_CHUNK = 8192 };

/* t[0..nt-1]: tensors of one shape (t[0] is the output by convention). Calls row(ctx, len, p, s) where
 * p[k] points at the row's first element of t[k] and s[k] is t[k]'s stride (elements) along the row. */
static void ew_loop(int nt, const fa_tensor *const *t, ew_row_fn row, const void *ctx) {
  const fa_tensor *t0 = t[0];
  int64_t n = fa_numel(t0);
  if (n == 0) return;
  int contig = 1;
  int64_t es[EW_MAX_T];
  for (int k = 0; k < nt; k++) {
    contig = contig && fa_is_contiguous(t[k]);
    es[k] = fa_dtype_size(t[k]->dtype);
  }
  if (contig) {
    const int64_t s[EW_MAX_T] = { 1, 1, 1, 1 };
    int64_t nchunks = n > FA_PARALLEL_GRAIN ? (n + EW_CHUNK - 1) / EW_CHUNK : 1;
    int64_t chunk = nchunks == 1 ? n : EW_CHUNK;
#pragma omp parallel for schedule(static) if (nchunks > 1)
    for (int64_t c = 0; c < nchunks; c++) {
      int64_t i0 = c * chunk, len = n - i0 < chunk ? n - i0 : chunk;
      char *p[EW_MAX_T];
      for (int k = 0; k < nt; k++) p[k] = (char *)t[k]->data + i0 * es[k];
      row(ctx, len, p, s);
    }
    return;
  }
  int nd = t0->ndim; /* > 0 here: a 0-D tensor is contiguous */
  int64_t inner = t0->shape[nd - 1], rows = n / inner;
  int64_t s[EW_MAX_T];
  for (int k = 0; k < nt; k++) s[k] = t[k]->stride[nd - 1];
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
  for (int64_t r = 0; r < rows; r++) {
    char *p[EW_MAX_T];
    for (int k = 0; k < nt; k++) p[k] = (char *)t[k]->data + fa_offset(t[k], r * inner) * es[k];
    row(ctx, inner, p, s);
  }
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

static void binary_row(const void *vc, int64_t n, char *const *p, const int64_t *s) {
  const binary_ctx *c = vc;
  int op = c->op;
  if (c->dtype == FA_FLOAT32) {
    float *o = (float *)p[0], al = (float)c->alpha;
    const float *a = (const float *)p[1], *b = (const float *)p[2];
    if (s[0] == 1 && s[1] == 1 && s[2] == 1) /* one loop per op, so that each vectorises */
      switch (op) {
        case FA_ADD: for (int64_t i = 0; i < n; i++) o[i] = bin_f32(FA_ADD, a[i], b[i], al); break;
        case FA_SUB: for (int64_t i = 0; i < n; i++) o[i] = bin_f32(FA_SUB, a[i], b[i], al); break;
        case FA_MUL: for (int64_t i = 0; i < n; i++) o[i] = bin_f32(FA_MUL, a[i], b[i], al); break;
        default: for (int64_t i = 0; i < n; i++) o[i] = bin_f32(FA_DIV, a[i], b[i], al); break;
      }
    else
      for (int64_t i = 0; i < n; i++) o[i * s[0]] = bin_f32(op, a[i * s[1]], b[i * s[2]], al);
  } else if (c->dtype == FA_FLOAT64) {
    double *o = (double *)p[0], al = c->alpha;
    const double *a = (const double *)p[1], *b = (const double *)p[2];
    if (s[0] == 1 && s[1] == 1 && s[2] == 1)
      switch (op) {
        case FA_ADD: for (int64_t i = 0; i < n; i++) o[i] = bin_f64(FA_ADD, a[i], b[i], al); break;
        case FA_SUB: for (int64_t i = 0; i < n; i++) o[i] = bin_f64(FA_SUB, a[i], b[i], al); break;
        case FA_MUL: for (int64_t i = 0; i < n; i++) o[i] = bin_f64(FA_MUL, a[i], b[i], al); break;
        default: for (int64_t i = 0; i < n; i++) o[i] = bin_f64(FA_DIV, a[i], b[i], al); break;
      }
    else
      for (int64_t i = 0; i < n; i++) o[i * s[0]] = bin_f64(op, a[i * s[1]], b[i * s[2]], al);
  } else {
    int dt = c->dtype;
    int64_t al = (int64_t)c->alpha;
    for (int64_t i = 0; i < n; i++)
      st_i(p[0], dt, i * s[0], bin_i(op, ld_i(p[1], dt, i * s[1]), ld_i(p[2], dt, i * s[2]), al));
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
  ew_loop(3, t, binary_row, &c);
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

/* p: grad, grad_out, a, b (a or b may be absent when the op does not read it: its pointer is then
 * grad_out's, read but unused) */
static void binback_row(const void *vc, int64_t n, char *const *p, const int64_t *s) {
  const binback_ctx *c = vc;
  int op = c->op, w = c->which;
  if (c->dtype == FA_FLOAT32) {
    float *g = (float *)p[0];
    const float *go = (const float *)p[1], *a = (const float *)p[2], *b = (const float *)p[3];
    if (s[0] == 1 && s[1] == 1 && s[2] == 1 && s[3] == 1)
      switch (op + 4 * w) { /* one loop per (op, which), so that each vectorises */
        case 0: for (int64_t i = 0; i < n; i++) g[i] = binback_f32(FA_ADD, 0, go[i], a[i], b[i]); break;
        case 1: for (int64_t i = 0; i < n; i++) g[i] = binback_f32(FA_SUB, 0, go[i], a[i], b[i]); break;
        case 2: for (int64_t i = 0; i < n; i++) g[i] = binback_f32(FA_MUL, 0, go[i], a[i], b[i]); break;
        case 3: for (int64_t i = 0; i < n; i++) g[i] = binback_f32(FA_DIV, 0, go[i], a[i], b[i]); break;
        case 4: for (int64_t i = 0; i < n; i++) g[i] = binback_f32(FA_ADD, 1, go[i], a[i], b[i]); break;
        case 5: for (int64_t i = 0; i < n; i++) g[i] = binback_f32(FA_SUB, 1, go[i], a[i], b[i]); break;
        case 6: for (int64_t i = 0; i < n; i++) g[i] = binback_f32(FA_MUL, 1, go[i], a[i], b[i]); break;
        case 7: for (int64_t i = 0; i < n; i++) g[i] = binback_f32(FA_DIV, 1, go[i], a[i], b[i]); break;
      }
    else
      for (int64_t i = 0; i < n; i++) g[i * s[0]] = binback_f32(op, w, go[i * s[1]], a[i * s[2]], b[i * s[3]]);
  } else if (c->dtype == FA_FLOAT64) {
    double *g = (double *)p[0];
    const double *go = (const double *)p[1], *a = (const double *)p[2], *b = (const double *)p[3];
    if (s[0] == 1 && s[1] == 1 && s[2] == 1 && s[3] == 1)
      switch (op + 4 * w) { /* one loop per (op, which), so that each vectorises */
        case 0: for (int64_t i = 0; i < n; i++) g[i] = binback_f64(FA_ADD, 0, go[i], a[i], b[i]); break;
        case 1: for (int64_t i = 0; i < n; i++) g[i] = binback_f64(FA_SUB, 0, go[i], a[i], b[i]); break;
        case 2: for (int64_t i = 0; i < n; i++) g[i] = binback_f64(FA_MUL, 0, go[i], a[i], b[i]); break;
        case 3: for (int64_t i = 0; i < n; i++) g[i] = binback_f64(FA_DIV, 0, go[i], a[i], b[i]); break;
        case 4: for (int64_t i = 0; i < n; i++) g[i] = binback_f64(FA_ADD, 1, go[i], a[i], b[i]); break;
        case 5: for (int64_t i = 0; i < n; i++) g[i] = binback_f64(FA_SUB, 1, go[i], a[i], b[i]); break;
        case 6: for (int64_t i = 0; i < n; i++) g[i] = binback_f64(FA_MUL, 1, go[i], a[i], b[i]); break;
        case 7: for (int64_t i = 0; i < n; i++) g[i] = binback_f64(FA_DIV, 1, go[i], a[i], b[i]); break;
      }
    else
      for (int64_t i = 0; i < n; i++) g[i * s[0]] = binback_f64(op, w, go[i * s[1]], a[i * s[2]], b[i * s[3]]);
  } else { /* ints: add, sub, mul */
    int dt = c->dtype;
    for (int64_t i = 0; i < n; i++) {
      int64_t go = ld_i(p[1], dt, i * s[1]), v;
      if (op == FA_MUL) v = wmul(go, ld_i(p[w ? 2 : 3], dt, i * s[w ? 2 : 3]));
      else v = (op == FA_SUB && w) ? wsub(0, go) : go;
      st_i(p[0], dt, i * s[0], v);
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
    ew_loop(4, t, binback_row, &c);
  }
  if (grad_b) {
    binback_ctx c = { op, grad_out->dtype, 1 };
    const fa_tensor *t[4] = { grad_b, grad_out, ta, tb };
    ew_loop(4, t, binback_row, &c);
  }
  return 0;
}

/* ================================================================== scale: out = a*scale + shift */
/* out, a: same shape. Integer tensors: exact integer arithmetic when scale and shift are integers;
 * otherwise computed in double and truncated toward zero (a C cast; exact below 2^53). */
typedef struct { int dtype, exact; double scale, shift; } scale_ctx;

static void scale_row(const void *vc, int64_t n, char *const *p, const int64_t *s) {
  const scale_ctx *c = vc;
  if (c->dtype == FA_FLOAT32) {
    float *o = (float *)p[0], sc = (float)c->scale, sh = (float)c->shift;
    const float *a = (const float *)p[1];
    if (s[0] == 1 && s[1] == 1)
      for (int64_t i = 0; i < n; i++) o[i] = a[i] * sc + sh;
    else
      for (int64_t i = 0; i < n; i++) o[i * s[0]] = a[i * s[1]] * sc + sh;
  } else if (c->dtype == FA_FLOAT64) {
    double *o = (double *)p[0], sc = c->scale, sh = c->shift;
    const double *a = (const double *)p[1];
    if (s[0] == 1 && s[1] == 1)
      for (int64_t i = 0; i < n; i++) o[i] = a[i] * sc + sh;
    else
      for (int64_t i = 0; i < n; i++) o[i * s[0]] = a[i * s[1]] * sc + sh;
  } else if (c->exact) {
    int dt = c->dtype;
    int64_t sc = (int64_t)c->scale, sh = (int64_t)c->shift;
    if (dt == FA_INT64 && s[0] == 1 && s[1] == 1) { /* the 0-based -> 1-based index case */
      int64_t *o = (int64_t *)p[0];
      const int64_t *a = (const int64_t *)p[1];
      for (int64_t i = 0; i < n; i++) o[i] = wadd(wmul(a[i], sc), sh);
    } else {
      for (int64_t i = 0; i < n; i++) st_i(p[0], dt, i * s[0], wadd(wmul(ld_i(p[1], dt, i * s[1]), sc), sh));
    }
  } else {
    int dt = c->dtype;
    for (int64_t i = 0; i < n; i++)
      st_i(p[0], dt, i * s[0], sat_i64((double)ld_i(p[1], dt, i * s[1]) * c->scale + c->shift));
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
  ew_loop(2, t, scale_row, &c);
  return 0;
}

/* ================================================================== addcmul: out = a + value*b*c */
/* out, a, b, c: same shape; evaluated as a + (value*b)*c, PyTorch's order */
typedef struct { int dtype; double value; } addcmul_ctx;

static void addcmul_row(const void *vc, int64_t n, char *const *p, const int64_t *s) {
  const addcmul_ctx *c = vc;
  if (c->dtype == FA_FLOAT32) {
    float *o = (float *)p[0], v = (float)c->value;
    const float *a = (const float *)p[1], *b = (const float *)p[2], *d = (const float *)p[3];
    if (s[0] == 1 && s[1] == 1 && s[2] == 1 && s[3] == 1)
      for (int64_t i = 0; i < n; i++) o[i] = a[i] + v * b[i] * d[i];
    else
      for (int64_t i = 0; i < n; i++) o[i * s[0]] = a[i * s[1]] + v * b[i * s[2]] * d[i * s[3]];
  } else if (c->dtype == FA_FLOAT64) {
    double *o = (double *)p[0], v = c->value;
    const double *a = (const double *)p[1], *b = (const double *)p[2], *d = (const double *)p[3];
    if (s[0] == 1 && s[1] == 1 && s[2] == 1 && s[3] == 1)
      for (int64_t i = 0; i < n; i++) o[i] = a[i] + v * b[i] * d[i];
    else
      for (int64_t i = 0; i < n; i++) o[i * s[0]] = a[i * s[1]] + v * b[i * s[2]] * d[i * s[3]];
  } else {
    int dt = c->dtype;
    int64_t v = (int64_t)c->value;
    for (int64_t i = 0; i < n; i++)
      st_i(p[0], dt, i * s[0],
           wadd(ld_i(p[1], dt, i * s[1]), wmul(wmul(v, ld_i(p[2], dt, i * s[2])), ld_i(p[3], dt, i * s[3]))));
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
  ew_loop(4, t, addcmul_row, &ctx);
  return 0;
}

/* ================================================================== unary forward */
/* out, x: same shape.  gelu is the exact (erf) form, PyTorch's default. */
static const char *unary_name[FA_NUM_UNARY] = { "exp", "log", "sqrt", "abs", "sign", "neg", "relu", "tanh", "sigmoid", "gelu" };
typedef struct { int op, dtype, from_y; } unary_ctx;

static inline float un_f32(int op, float x) {
  switch (op) {
    case FA_EXP: return expf(x);
    case FA_LOG: return logf(x);
    case FA_SQRT: return sqrtf(x);
    case FA_ABS: return fabsf(x);
    case FA_SIGN: return (float)((x > 0) - (x < 0));       /* sign(0) = sign(NaN) = 0, as torch.sign */
    case FA_NEG: return -x;
    case FA_RELU: return x < 0 ? 0.0f : x;                  /* NaN propagates, as torch.relu */
    case FA_TANH: return tanhf(x);
    case FA_SIGMOID: return 1.0f / (1.0f + expf(-x));
    default: return x * 0.5f * (1.0f + erff(x * (float)M_SQRT1_2));
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
    default: return x * 0.5 * (1.0 + erf(x * M_SQRT1_2));
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

static void unary_row(const void *vc, int64_t n, char *const *p, const int64_t *s) {
  const unary_ctx *c = vc;
  int op = c->op;
  if (c->dtype == FA_FLOAT32) {
    float *o = (float *)p[0];
    const float *x = (const float *)p[1];
    if (s[0] == 1 && s[1] == 1)
      switch (op) { /* one loop per op: the cheap ones vectorise */
        case FA_EXP: for (int64_t i = 0; i < n; i++) o[i] = un_f32(FA_EXP, x[i]); break;
        case FA_LOG: for (int64_t i = 0; i < n; i++) o[i] = un_f32(FA_LOG, x[i]); break;
        case FA_SQRT: for (int64_t i = 0; i < n; i++) o[i] = un_f32(FA_SQRT, x[i]); break;
        case FA_ABS: for (int64_t i = 0; i < n; i++) o[i] = un_f32(FA_ABS, x[i]); break;
        case FA_SIGN: for (int64_t i = 0; i < n; i++) o[i] = un_f32(FA_SIGN, x[i]); break;
        case FA_NEG: for (int64_t i = 0; i < n; i++) o[i] = un_f32(FA_NEG, x[i]); break;
        case FA_RELU: for (int64_t i = 0; i < n; i++) o[i] = un_f32(FA_RELU, x[i]); break;
        case FA_TANH: for (int64_t i = 0; i < n; i++) o[i] = un_f32(FA_TANH, x[i]); break;
        case FA_SIGMOID: for (int64_t i = 0; i < n; i++) o[i] = un_f32(FA_SIGMOID, x[i]); break;
        case FA_GELU: for (int64_t i = 0; i < n; i++) o[i] = un_f32(FA_GELU, x[i]); break;
      }
    else
      for (int64_t i = 0; i < n; i++) o[i * s[0]] = un_f32(op, x[i * s[1]]);
  } else if (c->dtype == FA_FLOAT64) {
    double *o = (double *)p[0];
    const double *x = (const double *)p[1];
    if (s[0] == 1 && s[1] == 1)
      switch (op) { /* one loop per op: the cheap ones vectorise */
        case FA_EXP: for (int64_t i = 0; i < n; i++) o[i] = un_f64(FA_EXP, x[i]); break;
        case FA_LOG: for (int64_t i = 0; i < n; i++) o[i] = un_f64(FA_LOG, x[i]); break;
        case FA_SQRT: for (int64_t i = 0; i < n; i++) o[i] = un_f64(FA_SQRT, x[i]); break;
        case FA_ABS: for (int64_t i = 0; i < n; i++) o[i] = un_f64(FA_ABS, x[i]); break;
        case FA_SIGN: for (int64_t i = 0; i < n; i++) o[i] = un_f64(FA_SIGN, x[i]); break;
        case FA_NEG: for (int64_t i = 0; i < n; i++) o[i] = un_f64(FA_NEG, x[i]); break;
        case FA_RELU: for (int64_t i = 0; i < n; i++) o[i] = un_f64(FA_RELU, x[i]); break;
        case FA_TANH: for (int64_t i = 0; i < n; i++) o[i] = un_f64(FA_TANH, x[i]); break;
        case FA_SIGMOID: for (int64_t i = 0; i < n; i++) o[i] = un_f64(FA_SIGMOID, x[i]); break;
        case FA_GELU: for (int64_t i = 0; i < n; i++) o[i] = un_f64(FA_GELU, x[i]); break;
      }
    else
      for (int64_t i = 0; i < n; i++) o[i * s[0]] = un_f64(op, x[i * s[1]]);
  } else {
    int dt = c->dtype;
    for (int64_t i = 0; i < n; i++) st_i(p[0], dt, i * s[0], un_i(op, ld_i(p[1], dt, i * s[1])));
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
  ew_loop(2, t, unary_row, &c);
  return 0;
}

/* ================================================================== unary backward */
/* grad_x = f'(x) * grad_y. v is y (the forward output) when from_y, else x:
 *   exp: g*y            log: g/x              sqrt: g/(2y)          abs: g*sign(x)   sign: 0
 *   neg: -g             relu: g where y > 0   tanh: g*(1 - y^2)     sigmoid: g*(1 - y)*y
 *   gelu: g*(Phi(x) + x*phi(x))  (x only)
 * exp, sqrt, relu, tanh and sigmoid use y when it is given and recompute it from x otherwise. */
static inline float ungrad_f32(int op, float g, float v, int from_y) {
  float y;
  switch (op) {
    case FA_EXP: return g * (from_y ? v : expf(v));
    case FA_LOG: return g / v;
    case FA_SQRT: return g / (2.0f * (from_y ? v : sqrtf(v)));
    case FA_ABS: return v > 0 ? g : (v < 0 ? -g : 0.0f);
    case FA_SIGN: return 0.0f;
    case FA_NEG: return -g;
    case FA_RELU: return v > 0 ? g : 0.0f;
    case FA_TANH: y = from_y ? v : tanhf(v); return g * (1.0f - y * y);
    case FA_SIGMOID: y = from_y ? v : 1.0f / (1.0f + expf(-v)); return g * (1.0f - y) * y;
    default: {
      float cdf = 0.5f * (1.0f + erff(v * (float)M_SQRT1_2));
      float pdf = expf(-0.5f * v * v) * (float)(0.5 * M_2_SQRTPI * M_SQRT1_2);
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
      double cdf = 0.5 * (1.0 + erf(v * M_SQRT1_2));
      double pdf = exp(-0.5 * v * v) * (0.5 * M_2_SQRTPI * M_SQRT1_2);
      return g * (cdf + v * pdf);
    }
  }
}

/* p: grad_x, grad_y, v (x or y) */
static void unback_row(const void *vc, int64_t n, char *const *p, const int64_t *s) {
  const unary_ctx *c = vc;
  int op = c->op, fy = c->from_y;
  if (c->dtype == FA_FLOAT32) {
    float *gx = (float *)p[0];
    const float *gy = (const float *)p[1], *v = (const float *)p[2];
    if (s[0] == 1 && s[1] == 1 && s[2] == 1)
      switch (op) { /* one loop per op, so that each vectorises where it can */
        case FA_EXP: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f32(FA_EXP, gy[i], v[i], fy); break;
        case FA_LOG: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f32(FA_LOG, gy[i], v[i], fy); break;
        case FA_SQRT: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f32(FA_SQRT, gy[i], v[i], fy); break;
        case FA_ABS: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f32(FA_ABS, gy[i], v[i], fy); break;
        case FA_SIGN: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f32(FA_SIGN, gy[i], v[i], fy); break;
        case FA_NEG: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f32(FA_NEG, gy[i], v[i], fy); break;
        case FA_RELU: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f32(FA_RELU, gy[i], v[i], fy); break;
        case FA_TANH: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f32(FA_TANH, gy[i], v[i], fy); break;
        case FA_SIGMOID: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f32(FA_SIGMOID, gy[i], v[i], fy); break;
        case FA_GELU: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f32(FA_GELU, gy[i], v[i], fy); break;
      }
    else
      for (int64_t i = 0; i < n; i++) gx[i * s[0]] = ungrad_f32(op, gy[i * s[1]], v[i * s[2]], fy);
  } else {
    double *gx = (double *)p[0];
    const double *gy = (const double *)p[1], *v = (const double *)p[2];
    if (s[0] == 1 && s[1] == 1 && s[2] == 1)
      switch (op) { /* one loop per op, so that each vectorises where it can */
        case FA_EXP: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f64(FA_EXP, gy[i], v[i], fy); break;
        case FA_LOG: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f64(FA_LOG, gy[i], v[i], fy); break;
        case FA_SQRT: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f64(FA_SQRT, gy[i], v[i], fy); break;
        case FA_ABS: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f64(FA_ABS, gy[i], v[i], fy); break;
        case FA_SIGN: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f64(FA_SIGN, gy[i], v[i], fy); break;
        case FA_NEG: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f64(FA_NEG, gy[i], v[i], fy); break;
        case FA_RELU: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f64(FA_RELU, gy[i], v[i], fy); break;
        case FA_TANH: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f64(FA_TANH, gy[i], v[i], fy); break;
        case FA_SIGMOID: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f64(FA_SIGMOID, gy[i], v[i], fy); break;
        case FA_GELU: for (int64_t i = 0; i < n; i++) gx[i] = ungrad_f64(FA_GELU, gy[i], v[i], fy); break;
      }
    else
      for (int64_t i = 0; i < n; i++) gx[i * s[0]] = ungrad_f64(op, gy[i * s[1]], v[i * s[2]], fy);
  }
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
  ew_loop(3, t, unback_row, &c);
  return 0;
}
