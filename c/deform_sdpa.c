/* deform_sdpa.c: fused deformable scaled-dot-product attention (fa.deform_sdpa, c/deform_sdpa.h): the entry points
 * validate every argument once (messages name the Lua arguments: q, k, v, coords, W, H, scale, out, lse, grad_*),
 * copy inputs whose last dim is not contiguous (coords: when not contiguous), fill a fa_ds_geom, and run
 * c/deform_sdpa_cpu.c or fa_cu_deform_sdpa_* (cuda/deform_sdpa.cu). Nothing is written before validation ends. */
#include "internal.h"
#include "deform_sdpa.h"

/* q, k, v, coords, W, H, scale and the options: fills g (strides of q, k, v as given) */
static int ds_check(const char *fn, const fa_tensor *q, const fa_tensor *k, const fa_tensor *v, const fa_tensor *coords,
                    int64_t W, int64_t H, double scale, const fa_deform_sdpa_opts *opts, fa_ds_geom *g) {
  int rc;
  char b1[256];
  if ((rc = fa_check_defined(fn, "q", q)) || (rc = fa_check_defined(fn, "k", k)) ||
      (rc = fa_check_defined(fn, "v", v)) || (rc = fa_check_defined(fn, "coords", coords)))
    return rc;
  if ((rc = fa_check_ndim(fn, "q", q, 5))) return rc;
  if ((rc = fa_check_float_dtype(fn, "q", q))) return rc;
  if ((rc = fa_check_like(fn, "k", k, "q", q)) || (rc = fa_check_like(fn, "v", v, "q", q)) ||
      (rc = fa_check_same_shape(fn, "k", k, "q", q)) || (rc = fa_check_same_shape(fn, "v", v, "q", q)))
    return rc;
  if (W < 1) return fa_error(FA_ERR_ARG, "%s: argument 'W': expected an integer >= 1, got %lld", fn, (long long)W);
  if (H < 1) return fa_error(FA_ERR_ARG, "%s: argument 'H': expected an integer >= 1, got %lld", fn, (long long)H);
  if (W > (int64_t)1 << 30 || H > (int64_t)1 << 30)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected an integer <= 2^30, got %lld", fn, W > (int64_t)1 << 30 ? "W" : "H",
                    (long long)(W > (int64_t)1 << 30 ? W : H));
  if (q->shape[3] != W * H)
    return fa_error(FA_ERR_ARG, "%s: argument 'q': expected H*W = %lld rows in dimension 4 (W = %lld, H = %lld), got shape %s",
                    fn, (long long)(W * H), (long long)W, (long long)H, fa_shape_str(q, b1));
  memset(g, 0, sizeof *g);
  g->B = q->shape[0];
  g->V = q->shape[1];
  g->NH = q->shape[2];
  g->L = q->shape[3];
  g->D = q->shape[4];
  g->W = W;
  g->H = H;
  g->dtype = q->dtype;
  g->device = q->device;
  g->cdtype = g->device < 0 ? g->dtype : FA_FLOAT32;
  g->ldtype = g->dtype == FA_FLOAT64 ? FA_FLOAT64 : FA_FLOAT32;
  if ((rc = fa_check_same_device(fn, "coords", coords, "q", q)) || (rc = fa_check_ndim(fn, "coords", coords, 6)))
    return rc;
  g->S = coords->shape[4];
  {
    int64_t want[6] = {g->B, g->V, g->L, g->V, g->S, 2};
    if ((rc = fa_check_shape(fn, "coords", coords, want, 6, "(B, V, H*W, V, S, 2) for 'q' (B, V, heads, H*W, D)")))
      return rc;
  }
  if (coords->dtype != g->cdtype)
    return fa_error(FA_ERR_ARG, "%s: argument 'coords': expected dtype %s (%s), got %s", fn, fa_dtype_name(g->cdtype),
                    g->device < 0 ? "as 'q' on the CPU" : "coordinates are float32 on CUDA", fa_dtype_name(coords->dtype));
  if (!isfinite(scale)) return fa_error(FA_ERR_ARG, "%s: argument 'scale': expected a finite number, got %g", fn, scale);
  g->scale = scale;
  if (opts && opts->deterministic != 0 && opts->deterministic != 1)
    return fa_error(FA_ERR_ARG, "%s: argument 'deterministic': expected 0 or 1, got %d", fn, (int)opts->deterministic);
  g->deterministic = opts ? opts->deterministic : 0;
  return 0;
}

/* a result: like ref (dtype, device, shape), contiguous (written in place) */
static int check_result(const char *fn, const char *arg, const fa_tensor *t, const char *ref_arg, const fa_tensor *ref) {
  int rc;
  if ((rc = fa_check_like(fn, arg, t, ref_arg, ref)) || (rc = fa_check_same_shape(fn, arg, t, ref_arg, ref))) return rc;
  return fa_check_dense(fn, arg, t);
}

/* lse (B, V, heads, H*W): float32, float64 for float64 inputs; contiguous when written */
static int check_lse(const char *fn, const fa_tensor *lse, const fa_tensor *q, const fa_ds_geom *g, int written) {
  int rc;
  if ((rc = fa_check_defined(fn, "lse", lse)) || (rc = fa_check_same_device(fn, "lse", lse, "q", q)) ||
      (rc = fa_check_shape(fn, "lse", lse, q->shape, 4, "(B, V, heads, H*W) as 'q' without D")))
    return rc;
  if (lse->dtype != g->ldtype)
    return fa_error(FA_ERR_ARG, "%s: argument 'lse': expected dtype %s (for %s inputs), got %s", fn, fa_dtype_name(g->ldtype),
                    fa_dtype_name(g->dtype), fa_dtype_name(lse->dtype));
  return written ? fa_check_dense(fn, "lse", lse) : 0;
}

/* a (B, V, NH, L, D) input as the kernels read it: its data and strides, or a dense copy (*tmp, fa_free after)
 * when its last dim is not contiguous */
static int qkv_view(const fa_tensor *t, const void **data, fa_ds_strides *s, void **tmp) {
  *tmp = NULL;
  *data = t->data;
  const int64_t *st = t->stride;
  int64_t dense[5];
  if (t->shape[4] > 1 && t->stride[4] != 1) {
    int rc = fa_contiguous_data(t, data, tmp);
    if (rc) return rc;
    int64_t m = 1;
    for (int i = 4; i >= 0; i--) { dense[i] = m; m *= t->shape[i]; }
    st = dense;
  }
  s->b = st[0]; s->v = st[1]; s->h = st[2]; s->l = st[3];
  return 0;
}

int fa_deform_sdpa_forward(fa_tensor *out, fa_tensor *lse, const fa_tensor *q, const fa_tensor *k, const fa_tensor *v,
                           const fa_tensor *coords, int64_t W, int64_t H, double scale, const fa_deform_sdpa_opts *opts) {
  static const char *fn = "fa_deform_sdpa_forward";
  fa_ds_geom g;
  int rc;
  if ((rc = ds_check(fn, q, k, v, coords, W, H, scale, opts, &g))) return rc;
  if ((rc = check_result(fn, "out", out, "q", q)) || (rc = check_lse(fn, lse, q, &g, 1))) return rc;
  {
    const fa_tensor *outs[2] = {out, lse};
    static const char *const onames[2] = {"out", "lse"};
    const fa_tensor *ins[4] = {q, k, v, coords};
    static const char *const inames[4] = {"q", "k", "v", "coords"};
    if ((rc = fa_check_no_overlaps(fn, outs, onames, 2, ins, inames, 4))) return rc;
  }
  if (fa_numel(lse) == 0) return 0;
  /* --- validation done --- */
  const void *dq, *dk, *dv, *dc;
  void *tmp[4] = {NULL, NULL, NULL, NULL};
  if (!(rc = qkv_view(q, &dq, &g.q, &tmp[0])) && !(rc = qkv_view(k, &dk, &g.k, &tmp[1])) &&
      !(rc = qkv_view(v, &dv, &g.v, &tmp[2])) && !(rc = fa_contiguous_data(coords, &dc, &tmp[3])))
    rc = g.device >= 0 ? fa_cu_deform_sdpa_forward(&g, out->data, (float *)lse->data, dq, dk, dv, (const float *)dc)
                       : fa_ds_cpu_forward(&g, out->data, lse->data, dq, dk, dv, dc);
  for (int i = 0; i < 4; i++) fa_free(g.device, tmp[i]);
  return rc;
}

int fa_deform_sdpa_backward(fa_tensor *grad_q, fa_tensor *grad_k, fa_tensor *grad_v, fa_tensor *grad_coords,
                            const fa_tensor *grad_out, const fa_tensor *q, const fa_tensor *k, const fa_tensor *v,
                            const fa_tensor *coords, int64_t W, int64_t H, double scale, const fa_tensor *out,
                            const fa_tensor *lse, const fa_deform_sdpa_opts *opts) {
  static const char *fn = "fa_deform_sdpa_backward";
  fa_ds_geom g;
  int rc;
  if ((rc = ds_check(fn, q, k, v, coords, W, H, scale, opts, &g))) return rc;
  if ((rc = fa_check_like(fn, "grad_out", grad_out, "q", q)) ||
      (rc = fa_check_same_shape(fn, "grad_out", grad_out, "q", q)) || (rc = fa_check_like(fn, "out", out, "q", q)) ||
      (rc = fa_check_same_shape(fn, "out", out, "q", q)) || (rc = check_lse(fn, lse, q, &g, 0)))
    return rc;
  if ((grad_q && (rc = check_result(fn, "grad_q", grad_q, "q", q))) ||
      (grad_k && (rc = check_result(fn, "grad_k", grad_k, "k", k))) ||
      (grad_v && (rc = check_result(fn, "grad_v", grad_v, "v", v))) ||
      (grad_coords && (rc = check_result(fn, "grad_coords", grad_coords, "coords", coords))))
    return rc;
  {
    const fa_tensor *outs[4] = {grad_q, grad_k, grad_v, grad_coords};
    static const char *const onames[4] = {"grad_q", "grad_k", "grad_v", "grad_coords"};
    const fa_tensor *ins[7] = {q, k, v, coords, grad_out, out, lse};
    static const char *const inames[7] = {"q", "k", "v", "coords", "grad_out", "out", "lse"};
    if ((rc = fa_check_no_overlaps(fn, outs, onames, 4, ins, inames, 7))) return rc;
  }
  void *gq = grad_q && fa_numel(grad_q) ? grad_q->data : NULL;
  void *gk = grad_k && fa_numel(grad_k) ? grad_k->data : NULL;
  void *gv = grad_v && fa_numel(grad_v) ? grad_v->data : NULL;
  void *gc = grad_coords && fa_numel(grad_coords) ? grad_coords->data : NULL;
  if (!(gq || gk || gv || gc)) return 0;
  /* --- validation done --- */
  const void *dq, *dk, *dv, *dc, *dgo, *dout, *dlse;
  void *tmp[7] = {NULL, NULL, NULL, NULL, NULL, NULL, NULL};
  if (!(rc = qkv_view(q, &dq, &g.q, &tmp[0])) && !(rc = qkv_view(k, &dk, &g.k, &tmp[1])) &&
      !(rc = qkv_view(v, &dv, &g.v, &tmp[2])) && !(rc = fa_contiguous_data(coords, &dc, &tmp[3])) &&
      !(rc = qkv_view(grad_out, &dgo, &g.go, &tmp[4])) && !(rc = qkv_view(out, &dout, &g.o, &tmp[5])) &&
      !(rc = fa_contiguous_data(lse, &dlse, &tmp[6])))
    rc = g.device >= 0 ? fa_cu_deform_sdpa_backward(&g, gq, gk, gv, (float *)gc, dgo, dq, dk, dv, (const float *)dc, dout,
                                                    (const float *)dlse)
                       : fa_ds_cpu_backward(&g, gq, gk, gv, gc, dgo, dq, dk, dv, dc, dout, dlse);
  for (int i = 0; i < 7; i++) fa_free(g.device, tmp[i]);
  return rc;
}
