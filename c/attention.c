/* attention.c: the shared attention core (fa.attention, c/attention.h): the entry points, which validate every
 * argument once (messages name the Lua arguments: q, k, v, bias, mask, out, lse, grad_*), convert the bias and
 * the mask to the kernels' dtypes, fill a fa_attn_geom, and run the CPU kernels (c/attention_cpu.c; float64:
 * c/attention_ref.c) or fa_cu_attention_* (cuda/attention.cu). Nothing is written before validation ends. */
#include "internal.h"
#include "attention.h"
#include <stdio.h>

/* The CPU kernels: float32 in c/attention_cpu.c (BLAS-blocked), float64 in c/attention_ref.c (plain loops). Bias,
 * gbias, lse and an additive mask in the dtype of q; a select mask uint8. 0, or FA_ERR_MEMORY before anything is
 * written. */
int fa_attn_cpu_forward(const fa_attn_geom *g, void *out, void *lse, const void *q, const void *k, const void *v,
                        const void *bias, const void *mask);
int fa_attn_cpu_backward(const fa_attn_geom *g, void *grad_q, void *grad_k, void *grad_v, void *grad_bias,
                         const void *grad_out, const void *q, const void *k, const void *v, const void *out,
                         const void *lse, const void *bias, const void *mask);
int fa_attn_ref_forward(const fa_attn_geom *g, void *out, void *lse, const void *q, const void *k, const void *v,
                        const void *bias, const void *mask);
int fa_attn_ref_backward(const fa_attn_geom *g, void *grad_q, void *grad_k, void *grad_v, void *grad_bias,
                         const void *grad_out, const void *q, const void *k, const void *v, const void *out,
                         const void *lse, const void *bias, const void *mask);

/* ------------------------------------------------------------------ validation */
/* q, k, v (..., H|Hkv, L, D): at least 3 dims, a contiguous last dim */
static int check_qkv(const char *fn, const char *arg, const fa_tensor *t) {
  int rc;
  char b[256];
  if ((rc = fa_check_defined(fn, arg, t))) return rc;
  if (t->ndim < 3)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected a tensor of at least 3 dimensions (..., heads, length, D), got %s",
                    fn, arg, fa_shape_str(t, b));
  if ((rc = fa_check_float_dtype(fn, arg, t))) return rc;
  return 0;
}

/* the last dim of a tensor the kernels index with unit stride */
static int check_last_contiguous(const char *fn, const char *arg, const fa_tensor *t) {
  if (t->ndim > 0 && t->shape[t->ndim - 1] > 1 && t->stride[t->ndim - 1] != 1)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected a contiguous last dimension (stride 1), got stride %lld",
                    fn, arg, (long long)t->stride[t->ndim - 1]);
  return 0;
}

/* strides of t (aligned right against the n-dim problem shape full[]) for the kept batch dims keep[0..nb) and
 * the last three dims; dims t lacks, and size-1 dims, get stride 0 (broadcast) */
static void fill_strides(fa_attn_strides *s, const fa_tensor *t, int n, const int *keep, int nb) {
  int lead = n - t->ndim;
  memset(s, 0, sizeof *s);
  for (int f = 0; f < n; f++) {
    int d = f - lead;
    int64_t st = d < 0 || t->shape[d] == 1 ? 0 : t->stride[d];
    if (f == n - 3) s->h = st;
    else if (f == n - 2) s->r = st;
    else if (f == n - 1) s->c = st;
    else
      for (int i = 0; i < nb; i++)
        if (keep[i] == f) s->b[i] = st;
  }
}

/* lse-shaped tensors: (..., H, Lq) aligned against the n-dim problem (..., H, Lq, Lk) */
static void fill_strides_lse(fa_attn_strides *s, const fa_tensor *t, int n, const int *keep, int nb) {
  fa_tensor x = *t;
  x.ndim = t->ndim + 1;
  x.shape[t->ndim] = 1;
  x.stride[t->ndim] = 0;
  fill_strides(s, &x, n, keep, nb);
}

/* a bias or a mask: broadcastable to full[0..n) = (..., H, Lq, Lk) */
static int check_broadcast(const char *fn, const char *arg, const fa_tensor *t, const int64_t *full, int n) {
  int rc, ok = t->ndim <= n;
  if ((rc = fa_check_defined(fn, arg, t))) return rc;
  for (int d = 0; ok && d < t->ndim; d++) {
    int64_t want = full[n - t->ndim + d];
    ok = t->shape[d] == want || t->shape[d] == 1;
  }
  if (!ok) {
    char a[256], b[256];
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected a tensor broadcastable to (..., H, Lq, Lk) = %s (sizes equal or 1, "
                    "leading dims may be missing), got shape %s", fn, arg, fa_dims_str(full, n, a), fa_shape_str(t, b));
  }
  return 0;
}

typedef struct {
  int n;                        /* problem rank: q->ndim */
  int64_t full[FA_MAX_DIMS];    /* (..., H, Lq, Lk) */
  int keep[FA_ATTN_MAX_BATCH];  /* the batch dims of size > 1 */
  int acc;                      /* FA_FLOAT64 for float64 inputs, else FA_FLOAT32 */
} attn_shape;

/* q, k, v, bias, mask and the options: fills g and sh */
static int attn_check(const char *fn, const fa_tensor *q, const fa_tensor *k, const fa_tensor *v,
                      const fa_attention_opts *opts, fa_attn_geom *g, attn_shape *sh) {
  int rc;
  char b1[256], b2[256];
  fa_attention_opts z;
  memset(&z, 0, sizeof z);
  if (!opts) opts = &z;
  if ((rc = check_qkv(fn, "q", q)) || (rc = check_qkv(fn, "k", k)) || (rc = check_qkv(fn, "v", v))) return rc;
  if ((rc = fa_check_like(fn, "k", k, "q", q)) || (rc = fa_check_like(fn, "v", v, "q", q))) return rc;
  int n = q->ndim, nbd = n - 3;
  if (k->ndim != n || v->ndim != n)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected %d dimensions (as 'q': the same leading dims, then heads, length, D), got %s",
                    fn, k->ndim != n ? "k" : "v", n, fa_shape_str(k->ndim != n ? k : v, b1));
  for (int d = 0; d < nbd; d++)
    if (k->shape[d] != q->shape[d] || v->shape[d] != q->shape[d]) {
      const fa_tensor *t = k->shape[d] != q->shape[d] ? k : v;
      return fa_error(FA_ERR_ARG, "%s: argument '%s': expected the leading (batch) dims of 'q' %s, got shape %s (dimension %d)", fn,
                      t == k ? "k" : "v", fa_shape_str(q, b1), fa_shape_str(t, b2), d + 1);
    }
  for (int d = nbd; d < n; d++)
    if (v->shape[d] != k->shape[d])
      return fa_error(FA_ERR_ARG, "%s: argument 'v': expected shape %s (as 'k'), got %s", fn, fa_shape_str(k, b1),
                      fa_shape_str(v, b2));
  int64_t H = q->shape[n - 3], Hkv = k->shape[n - 3], Lq = q->shape[n - 2], Lk = k->shape[n - 2], D = q->shape[n - 1];
  if (k->shape[n - 1] != D)
    return fa_error(FA_ERR_ARG, "%s: argument 'k': expected D = %lld (the last dim of 'q'), got shape %s", fn, (long long)D,
                    fa_shape_str(k, b1));
  if (Hkv == 0 ? H != 0 : H % Hkv != 0)
    return fa_error(FA_ERR_ARG, "%s: argument 'k': expected a number of heads (dimension %d) that divides the %lld heads of 'q', got %lld",
                    fn, n - 2, (long long)H, (long long)Hkv);
  if ((rc = check_last_contiguous(fn, "q", q)) || (rc = check_last_contiguous(fn, "k", k)) ||
      (rc = check_last_contiguous(fn, "v", v)))
    return rc;
  /* batch dims: size-1 ones dropped */
  int nb = 0;
  for (int d = 0; d < nbd; d++) {
    if (q->shape[d] == 1) continue;
    if (nb == FA_ATTN_MAX_BATCH)
      return fa_error(FA_ERR_ARG, "%s: argument 'q': expected at most %d leading (batch) dims of size > 1, got shape %s", fn,
                      FA_ATTN_MAX_BATCH, fa_shape_str(q, b1));
    sh->keep[nb++] = d;
  }
  memset(g, 0, sizeof *g);
  sh->n = n;
  for (int d = 0; d < n - 1; d++) sh->full[d] = q->shape[d];
  sh->full[n - 1] = Lk;
  sh->acc = q->dtype == FA_FLOAT64 ? FA_FLOAT64 : FA_FLOAT32;
  g->nb = nb;
  g->Z = 1;
  for (int i = 0; i < nb; i++) g->Z *= (g->bs[i] = q->shape[sh->keep[i]]);
  g->H = H;
  g->Hkv = Hkv;
  g->Lq = Lq;
  g->Lk = Lk;
  g->D = D;
  g->dtype = q->dtype;
  g->device = q->device;
  fill_strides(&g->q, q, n, sh->keep, nb);
  fill_strides(&g->k, k, n, sh->keep, nb);
  fill_strides(&g->v, v, n, sh->keep, nb);
  /* options */
  if (opts->has_scale && !isfinite(opts->scale))
    return fa_error(FA_ERR_ARG, "%s: argument 'scale': expected a finite number, got %g", fn, opts->scale);
  if (!(opts->mask_scale >= 0) || !isfinite(opts->mask_scale))
    return fa_error(FA_ERR_ARG, "%s: argument 'mask_scale': expected a finite number >= 0, got %g", fn, opts->mask_scale);
  if (!(opts->dropout >= 0 && opts->dropout < 1))
    return fa_error(FA_ERR_ARG, "%s: argument 'dropout': expected a probability in [0, 1), got %g", fn, opts->dropout);
  if (opts->kernel < FA_ATTN_KERNEL_AUTO || opts->kernel > FA_ATTN_KERNEL_WGMMA)
    return fa_error(FA_ERR_ARG, "%s: argument 'kernel': expected FA_ATTN_KERNEL_AUTO (0), _SIMT (1), _MMA (2) or _WGMMA (3), got %d",
                    fn, opts->kernel);
  g->scale = opts->has_scale ? opts->scale : (D > 0 ? 1.0 / sqrt((double)D) : 1.0);
  g->mask_mode = opts->mask ? (opts->mask_scale > 0 ? 2 : 1) : 0;
  g->mask_scale = opts->mask_scale;
  g->dropout = opts->dropout;
  g->seed = opts->seed;
  g->offset = opts->offset;
  g->deterministic = opts->deterministic != 0;
  g->kernel = opts->kernel;
  g->tf32 = 0; /* the CUDA side reads fa_cu_tf32_allowed() (C++ linkage, cuda/common.cuh) */
  const fa_tensor *bias = opts->bias, *mask = opts->mask;
  if (bias) {
    if ((rc = check_broadcast(fn, "bias", bias, sh->full, n))) return rc;
    if ((rc = fa_check_same_device(fn, "bias", bias, "q", q))) return rc;
    if (q->device < 0 ? !(bias->dtype == FA_FLOAT32 || bias->dtype == FA_FLOAT64)
                      : !(bias->dtype == FA_FLOAT32 || bias->dtype == q->dtype))
      return fa_error(FA_ERR_ARG, "%s: argument 'bias': expected %s, got %s", fn,
                      q->device < 0 ? "float32 or float64 on the CPU" : "float32 or the dtype of 'q' on CUDA",
                      fa_dtype_name(bias->dtype));
    g->has_bias = 1;
  }
  if (mask) {
    if ((rc = check_broadcast(fn, "mask", mask, sh->full, n))) return rc;
    if ((rc = fa_check_same_device(fn, "mask", mask, "q", q))) return rc;
  }
  return 0;
}

/* a tensor like ref (shape, dtype, device) with a contiguous last dim; an output (written) also with rows that do
 * not overlap */
static int check_like_q(const char *fn, const char *arg, const fa_tensor *t, const char *ref_arg, const fa_tensor *ref,
                        int written) {
  int rc;
  if ((rc = fa_check_like(fn, arg, t, ref_arg, ref)) || (rc = fa_check_same_shape(fn, arg, t, ref_arg, ref)) ||
      (rc = check_last_contiguous(fn, arg, t)))
    return rc;
  int n = t->ndim;
  if (!written) return 0;
  if (t->shape[n - 2] > 1 && t->shape[n - 1] > 0 && t->stride[n - 2] < t->shape[n - 1])
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected rows that do not overlap (a stride >= %lld in dimension %d), got stride %lld",
                    fn, arg, (long long)t->shape[n - 1], n - 1, (long long)t->stride[n - 2]);
  if (t->device < 0 && t->stride[n - 2] > INT32_MAX)
    return fa_error(FA_ERR_UNSUPPORTED, "%s: argument '%s': expected a row stride below 2^31 on the CPU (BLAS), got %lld", fn, arg,
                    (long long)t->stride[n - 2]);
  return 0;
}

/* CPU inputs go through BLAS, which wants rows that do not overlap (stride >= D, < 2^31): others (a k expanded
 * over the keys, say) are copied; *t then describes the copy (fa_free(FA_CPU, *buf) after) */
static int blas_rows(const fa_tensor **t, fa_tensor *copy, void **buf) {
  const fa_tensor *x = *t;
  int n = x->ndim;
  *buf = NULL;
  if (x->device >= 0 || x->shape[n - 2] <= 1 || (x->stride[n - 2] >= x->shape[n - 1] && x->stride[n - 2] <= INT32_MAX))
    return 0;
  const void *data;
  int rc = fa_contiguous_data(x, &data, buf);
  if (rc) return rc;
  *copy = *x;
  copy->data = (void *)data;
  int64_t s = 1;
  for (int i = n - 1; i >= 0; i--) { copy->stride[i] = s; s *= x->shape[i]; }
  *t = copy;
  return 0;
}

/* lse (..., H, Lq): float32, float64 for float64 inputs */
static int check_lse(const char *fn, const fa_tensor *lse, const fa_tensor *q, const attn_shape *sh) {
  int rc;
  if ((rc = fa_check_defined(fn, "lse", lse)) || (rc = fa_check_same_device(fn, "lse", lse, "q", q))) return rc;
  if ((rc = fa_check_shape(fn, "lse", lse, q->shape, q->ndim - 1, "(..., H, Lq) as 'q' without D"))) return rc;
  if (lse->dtype != sh->acc)
    return fa_error(FA_ERR_ARG, "%s: argument 'lse': expected dtype %s (for %s inputs), got %s", fn, fa_dtype_name(sh->acc),
                    fa_dtype_name(q->dtype), fa_dtype_name(lse->dtype));
  return 0;
}

/* ------------------------------------------------------------------ conversions */
/* a dense copy of t's shape in dtype on t's device (*buf = its data, fa_free after); t itself when it has dtype */
static int as_dtype(const fa_tensor *t, int dtype, fa_tensor *out, void **buf) {
  *buf = NULL;
  *out = *t;
  if (t->dtype == dtype) return 0;
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; i--) { out->stride[i] = s; s *= t->shape[i]; }
  out->dtype = dtype;
  out->data = *buf = fa_alloc(t->device, (s > 0 ? s : 1) * fa_dtype_size(dtype));
  if (!out->data) return FA_ERR_MEMORY;
  return fa_copy(out, t);
}

/* the bias and the mask in the kernels' dtypes; their strides into g. tmp[2]: fa_free after */
static int convert_bias_mask(const fa_attn_geom *gc, const fa_attention_opts *opts, const attn_shape *sh,
                             fa_attn_geom *g, const void **bias, const void **mask, void **tmp) {
  int rc;
  fa_tensor t;
  *bias = *mask = NULL;
  tmp[0] = tmp[1] = NULL;
  (void)gc;
  if (opts && opts->bias) {
    if ((rc = as_dtype(opts->bias, sh->acc, &t, &tmp[0]))) return rc;
    fill_strides(&g->bias, &t, sh->n, sh->keep, g->nb);
    *bias = t.data;
  }
  if (opts && opts->mask) {
    int want = g->mask_mode == 1 ? FA_BOOL : sh->acc;
    if ((rc = as_dtype(opts->mask, want, &t, &tmp[1]))) return rc;
    fill_strides(&g->mask, &t, sh->n, sh->keep, g->nb);
    *mask = t.data;
  }
  return 0;
}

/* ------------------------------------------------------------------ entry points */
static const char *const IN_NAMES[6] = {"q", "k", "v", "bias", "mask", "grad_out"};

int fa_attention_forward(fa_tensor *out, fa_tensor *lse, const fa_tensor *q, const fa_tensor *k, const fa_tensor *v,
                         const fa_attention_opts *opts) {
  static const char *fn = "fa_attention_forward";
  int rc;
  fa_attn_geom g;
  attn_shape sh;
  if ((rc = attn_check(fn, q, k, v, opts, &g, &sh))) return rc;
  if ((rc = check_like_q(fn, "out", out, "q", q, 1)) || (rc = check_lse(fn, lse, q, &sh))) return rc;
  {
    const fa_tensor *outs[2] = {out, lse};
    static const char *const onames[2] = {"out", "lse"};
    const fa_tensor *ins[5] = {q, k, v, opts ? opts->bias : NULL, opts ? opts->mask : NULL};
    if ((rc = fa_check_no_overlaps(fn, outs, onames, 2, ins, IN_NAMES, 5))) return rc;
  }
  fill_strides(&g.o, out, sh.n, sh.keep, g.nb);
  fill_strides_lse(&g.lse, lse, sh.n, sh.keep, g.nb);
  if (g.Z * g.H * g.Lq == 0) return 0;
  const void *bias, *mask;
  void *tmp[5] = {NULL, NULL, NULL, NULL, NULL};
  fa_tensor cp[3];
  if (!(rc = convert_bias_mask(&g, opts, &sh, &g, &bias, &mask, tmp)) && !(rc = blas_rows(&q, &cp[0], &tmp[2])) &&
      !(rc = blas_rows(&k, &cp[1], &tmp[3])) && !(rc = blas_rows(&v, &cp[2], &tmp[4]))) {
    fill_strides(&g.q, q, sh.n, sh.keep, g.nb);
    fill_strides(&g.k, k, sh.n, sh.keep, g.nb);
    fill_strides(&g.v, v, sh.n, sh.keep, g.nb);
    if (g.device >= 0)
      rc = fa_cu_attention_forward(&g, out->data, (float *)lse->data, q->data, k->data, v->data, (const float *)bias, mask);
    else if (g.dtype == FA_FLOAT64)
      rc = fa_attn_ref_forward(&g, out->data, lse->data, q->data, k->data, v->data, bias, mask);
    else
      rc = fa_attn_cpu_forward(&g, out->data, lse->data, q->data, k->data, v->data, bias, mask);
  }
  for (int i = 0; i < 5; i++) fa_free(g.device, tmp[i]);
  return rc;
}

int fa_attention_backward(fa_tensor *grad_q, fa_tensor *grad_k, fa_tensor *grad_v, fa_tensor *grad_bias,
                          const fa_tensor *grad_out, const fa_tensor *q, const fa_tensor *k, const fa_tensor *v,
                          const fa_tensor *out, const fa_tensor *lse, const fa_attention_opts *opts) {
  static const char *fn = "fa_attention_backward";
  int rc;
  fa_attn_geom g;
  attn_shape sh;
  if ((rc = attn_check(fn, q, k, v, opts, &g, &sh))) return rc;
  if ((rc = check_like_q(fn, "grad_out", grad_out, "q", q, 0)) || (rc = check_like_q(fn, "out", out, "q", q, 0)) ||
      (rc = check_lse(fn, lse, q, &sh)))
    return rc;
  if (grad_q && (rc = check_like_q(fn, "grad_q", grad_q, "q", q, 1))) return rc;
  if (grad_k && (rc = check_like_q(fn, "grad_k", grad_k, "k", k, 1))) return rc;
  if (grad_v && (rc = check_like_q(fn, "grad_v", grad_v, "v", v, 1))) return rc;
  const fa_tensor *bias = opts ? opts->bias : NULL;
  if (grad_bias) {
    if (!bias) return fa_error(FA_ERR_ARG, "%s: argument 'grad_bias': expected nothing (no 'bias' was given), got a tensor", fn);
    if ((rc = fa_check_defined(fn, "grad_bias", grad_bias)) ||
        (rc = fa_check_same_device(fn, "grad_bias", grad_bias, "bias", bias)) ||
        (rc = fa_check_same_shape(fn, "grad_bias", grad_bias, "bias", bias)))
      return rc;
    if (!fa_is_float(grad_bias->dtype) || (q->device < 0 && grad_bias->dtype != FA_FLOAT32 && grad_bias->dtype != FA_FLOAT64))
      return fa_error(FA_ERR_ARG, "%s: argument 'grad_bias': expected a floating-point dtype%s, got %s", fn,
                      q->device < 0 ? " (float32 or float64 on the CPU)" : "", fa_dtype_name(grad_bias->dtype));
  }
  {
    const fa_tensor *outs[4] = {grad_q, grad_k, grad_v, grad_bias};
    static const char *const onames[4] = {"grad_q", "grad_k", "grad_v", "grad_bias"};
    const fa_tensor *ins[8] = {q, k, v, bias, opts ? opts->mask : NULL, grad_out, out, lse};
    static const char *const inames[8] = {"q", "k", "v", "bias", "mask", "grad_out", "out", "lse"};
    if ((rc = fa_check_no_overlaps(fn, outs, onames, 4, ins, inames, 8))) return rc;
  }
  fill_strides(&g.go, grad_out, sh.n, sh.keep, g.nb);
  fill_strides(&g.o, out, sh.n, sh.keep, g.nb);
  fill_strides_lse(&g.lse, lse, sh.n, sh.keep, g.nb);
  if (grad_q) fill_strides(&g.gq, grad_q, sh.n, sh.keep, g.nb);
  if (grad_k) fill_strides(&g.gk, grad_k, sh.n, sh.keep, g.nb);
  if (grad_v) fill_strides(&g.gv, grad_v, sh.n, sh.keep, g.nb);
  void *gq = grad_q && fa_numel(grad_q) ? grad_q->data : NULL;
  void *gk = grad_k && fa_numel(grad_k) ? grad_k->data : NULL;
  void *gv = grad_v && fa_numel(grad_v) ? grad_v->data : NULL;
  int want_gb = grad_bias && fa_numel(grad_bias) > 0;
  if (!(gq || gk || gv || want_gb)) return 0;
  /* --- validation done: temporaries, then the kernels --- */
  const void *pb, *pm;
  void *tmp[7] = {NULL, NULL, NULL, NULL, NULL, NULL, NULL};
  fa_tensor gbt, cp[4]; /* gbt: the gradient buffer: dense, bias's shape, accumulation dtype */
  if ((rc = convert_bias_mask(&g, opts, &sh, &g, &pb, &pm, tmp)) || (rc = blas_rows(&q, &cp[0], &tmp[3])) ||
      (rc = blas_rows(&k, &cp[1], &tmp[4])) || (rc = blas_rows(&v, &cp[2], &tmp[5])) ||
      (rc = blas_rows(&grad_out, &cp[3], &tmp[6])))
    goto done;
  fill_strides(&g.q, q, sh.n, sh.keep, g.nb);
  fill_strides(&g.k, k, sh.n, sh.keep, g.nb);
  fill_strides(&g.v, v, sh.n, sh.keep, g.nb);
  fill_strides(&g.go, grad_out, sh.n, sh.keep, g.nb);
  void *gb = NULL;
  if (want_gb) {
    gbt = *grad_bias;
    int64_t s = 1;
    for (int i = grad_bias->ndim - 1; i >= 0; i--) { gbt.stride[i] = s; s *= grad_bias->shape[i]; }
    gbt.dtype = g.device >= 0 ? FA_FLOAT32 : sh.acc;
    if (grad_bias->dtype == gbt.dtype && fa_is_contiguous(grad_bias)) {
      gbt.data = grad_bias->data;
    } else if (!(gbt.data = tmp[2] = fa_alloc(g.device, s * fa_dtype_size(gbt.dtype)))) {
      rc = FA_ERR_MEMORY;
      goto done;
    }
    fill_strides(&g.gbias, &gbt, sh.n, sh.keep, g.nb);
    if ((rc = fa_fill(&gbt, 0.0))) goto done;
    gb = gbt.data;
  }
  if (g.device >= 0)
    rc = fa_cu_attention_backward(&g, gq, gk, gv, (float *)gb, grad_out->data, q->data, k->data, v->data, out->data,
                                  (const float *)lse->data, (const float *)pb, pm);
  else
    rc = (g.dtype == FA_FLOAT64 ? fa_attn_ref_backward : fa_attn_cpu_backward)(&g, gq, gk, gv, gb, grad_out->data, q->data,
                                                                              k->data, v->data, out->data, lse->data, pb, pm);
  if (!rc && tmp[2]) rc = fa_copy(grad_bias, &gbt);
done:
  for (int i = 0; i < 7; i++) fa_free(g.device, tmp[i]);
  return rc;
}
