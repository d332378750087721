/* cpb.c: the continuous position bias MLP (fa.cpb, c/cpb.h): the entry points validate every argument once
 * (messages name the Lua arguments: qpos, kpos, w1 .. b3, out, grad_bias, grad_*), copy inputs that are not
 * contiguous, fill a fa_cpb_geom, and run c/cpb_cpu.c or fa_cu_cpb_* (cuda/cpb.cu). Nothing is written before
 * validation ends. */
#include "internal.h"
#include "cpb.h"

enum { NIN = 8 }; /* qpos, kpos, w1, b1, w2, b2, w3, b3 */
static const char *const IN_NAMES[NIN] = {"qpos", "kpos", "w1", "b1", "w2", "b2", "w3", "b3"};

/* the positions' dtype: the weights' on the CPU, float32 on CUDA */
static int pos_dtype(const fa_cpb_geom *g) { return g->device < 0 ? g->dtype : FA_FLOAT32; }

/* the eight inputs (in[] in IN_NAMES order) and the options: fills g */
static int cpb_check(const char *fn, const fa_tensor *const *in, const fa_cpb_opts *opts, fa_cpb_geom *g) {
  int rc;
  const fa_tensor *qpos = in[0], *kpos = in[1], *w1 = in[2], *w2 = in[4], *w3 = in[6];
  for (int i = 0; i < NIN; i++)
    if ((rc = fa_check_defined(fn, IN_NAMES[i], in[i]))) return rc;
  /* ranks, then sizes: C from w1, O from w3, N from qpos, (P, M) from kpos */
  if ((rc = fa_check_ndim(fn, "qpos", qpos, 2)) || (rc = fa_check_ndim(fn, "kpos", kpos, 3)) ||
      (rc = fa_check_ndim(fn, "w1", w1, 2)) || (rc = fa_check_ndim(fn, "w3", w3, 2)))
    return rc;
  memset(g, 0, sizeof *g);
  g->C = w1->shape[0];
  g->O = w3->shape[0];
  g->N = qpos->shape[0];
  g->P = kpos->shape[0];
  g->M = kpos->shape[1];
  {
    int64_t s_w1[2] = {g->C, 2}, s_c[1] = {g->C}, s_w2[2] = {g->C, g->C}, s_w3[2] = {g->O, g->C}, s_o[1] = {g->O};
    int64_t s_q[2] = {g->N, 2}, s_k[3] = {g->P, g->M, 2};
    if ((rc = fa_check_shape(fn, "w1", w1, s_w1, 2, "(C, 2)")) ||
        (rc = fa_check_shape(fn, "qpos", qpos, s_q, 2, "(N, 2)")) ||
        (rc = fa_check_shape(fn, "kpos", kpos, s_k, 3, "(P, M, 2)")) ||
        (rc = fa_check_shape(fn, "b1", in[3], s_c, 1, "(C) with C the rows of 'w1'")) ||
        (rc = fa_check_shape(fn, "w2", w2, s_w2, 2, "(C, C) with C the rows of 'w1'")) ||
        (rc = fa_check_shape(fn, "b2", in[5], s_c, 1, "(C) with C the rows of 'w1'")) ||
        (rc = fa_check_shape(fn, "w3", w3, s_w3, 2, "(O, C) with C the rows of 'w1'")) ||
        (rc = fa_check_shape(fn, "b3", in[7], s_o, 1, "(O) with O the rows of 'w3'")))
      return rc;
  }
  /* dtypes and devices: the weights all as w1; the positions as w1 on the CPU, float32 on CUDA */
  if ((rc = fa_check_float_dtype(fn, "w1", w1))) return rc;
  for (int i = 3; i < NIN; i++)
    if ((rc = fa_check_like(fn, IN_NAMES[i], in[i], "w1", w1))) return rc;
  g->dtype = w1->dtype;
  g->device = w1->device;
  for (int i = 0; i < 2; i++) {
    if ((rc = fa_check_same_device(fn, IN_NAMES[i], in[i], "w1", w1))) return rc;
    if (in[i]->dtype != pos_dtype(g))
      return fa_error(FA_ERR_ARG, "%s: argument '%s': expected dtype %s (%s), got %s", fn, IN_NAMES[i],
                      fa_dtype_name(pos_dtype(g)), g->device < 0 ? "as 'w1' on the CPU" : "positions are float32 on CUDA",
                      fa_dtype_name(in[i]->dtype));
  }
  if (opts && opts->deterministic != 0 && opts->deterministic != 1)
    return fa_error(FA_ERR_ARG, "%s: argument 'deterministic': expected 0 or 1, got %d", fn, (int)opts->deterministic);
  g->deterministic = opts ? opts->deterministic : 0;
  return 0;
}

/* out or grad_bias: (P, O, N, M) on the weights' device; dtype: the weights' on the CPU, float32 on CUDA (or,
 * for grad_bias, the weights' 16-bit dtype: c/cpb.c converts it) */
static int check_bias_like(const char *fn, const char *arg, const fa_tensor *t, const fa_tensor *w1, const fa_cpb_geom *g,
                           int allow16) {
  int rc;
  int64_t s[4] = {g->P, g->O, g->N, g->M};
  if ((rc = fa_check_defined(fn, arg, t)) || (rc = fa_check_same_device(fn, arg, t, "w1", w1)) ||
      (rc = fa_check_shape(fn, arg, t, s, 4, "(P, O, N, M)")))
    return rc;
  if (t->dtype != pos_dtype(g) && !(allow16 && g->device >= 0 && t->dtype == g->dtype))
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected dtype %s%s, got %s", fn, arg, fa_dtype_name(pos_dtype(g)),
                    g->device < 0 ? " (as 'w1' on the CPU)"
                    : allow16 && g->dtype != FA_FLOAT32 ? " or the dtype of 'w1' on CUDA" : " on CUDA",
                    fa_dtype_name(t->dtype));
  return 0;
}

/* an output against every input (and the outputs before it): the kernels read the inputs while they write */
static int check_no_overlap(const char *fn, const char *arg, const fa_tensor *t, const fa_tensor *const *in, int nin,
                            const char *const *in_names, const fa_tensor *const *prev, const char *const *prev_names, int np) {
  int rc;
  for (int i = 0; i < nin; i++)
    if (in[i] && (rc = fa_check_no_overlap(fn, arg, t, in_names[i], in[i]))) return rc;
  for (int i = 0; i < np; i++)
    if (prev[i] && (rc = fa_check_no_overlap(fn, arg, t, prev_names[i], prev[i]))) return rc;
  return 0;
}

static void set_in(fa_cpb_in *x, const void **d) {
  x->qpos = d[0]; x->kpos = d[1]; x->w1 = d[2]; x->b1 = d[3]; x->w2 = d[4]; x->b2 = d[5]; x->w3 = d[6]; x->b3 = d[7];
}

int fa_cpb_forward(fa_tensor *out, const fa_tensor *qpos, const fa_tensor *kpos, const fa_tensor *w1, const fa_tensor *b1,
                   const fa_tensor *w2, const fa_tensor *b2, const fa_tensor *w3, const fa_tensor *b3,
                   const fa_cpb_opts *opts) {
  static const char *fn = "fa_cpb_forward";
  const fa_tensor *in[NIN] = {qpos, kpos, w1, b1, w2, b2, w3, b3};
  fa_cpb_geom g;
  int rc;
  if ((rc = cpb_check(fn, in, opts, &g))) return rc;
  if ((rc = check_bias_like(fn, "out", out, w1, &g, 0)) || (rc = fa_check_dense(fn, "out", out)) ||
      (rc = check_no_overlap(fn, "out", out, in, NIN, IN_NAMES, NULL, NULL, 0)))
    return rc;
  if (fa_numel(out) == 0) return 0;
  const void *d[NIN];
  void *tmp[NIN];
  fa_cpb_in x;
  if (!(rc = fa_dense_inputs(in, NIN, d, tmp))) {
    set_in(&x, d);
    rc = g.device >= 0 ? fa_cu_cpb_forward(&g, (float *)out->data, &x) : fa_cpb_cpu_forward(&g, out->data, &x);
  }
  for (int i = 0; i < NIN; i++) fa_free(g.device, tmp[i]);
  return rc;
}

int fa_cpb_backward(fa_tensor *grad_kpos, fa_tensor *grad_w1, fa_tensor *grad_b1, fa_tensor *grad_w2, fa_tensor *grad_b2,
                    fa_tensor *grad_w3, fa_tensor *grad_b3, const fa_tensor *grad_bias, const fa_tensor *qpos,
                    const fa_tensor *kpos, const fa_tensor *w1, const fa_tensor *b1, const fa_tensor *w2,
                    const fa_tensor *b2, const fa_tensor *w3, const fa_tensor *b3, const fa_cpb_opts *opts) {
  static const char *fn = "fa_cpb_backward";
  enum { NG = 7 };
  static const char *const GNAMES[NG] = {"grad_kpos", "grad_w1", "grad_b1", "grad_w2", "grad_b2", "grad_w3", "grad_b3"};
  static const char *const ALL_NAMES[NIN + 1] = {"qpos", "kpos", "w1", "b1", "w2", "b2", "w3", "b3", "grad_bias"};
  const fa_tensor *in[NIN + 1] = {qpos, kpos, w1, b1, w2, b2, w3, b3, grad_bias};
  fa_tensor *gt[NG] = {grad_kpos, grad_w1, grad_b1, grad_w2, grad_b2, grad_w3, grad_b3};
  fa_cpb_geom g;
  int rc;
  if ((rc = cpb_check(fn, in, opts, &g))) return rc;
  if ((rc = check_bias_like(fn, "grad_bias", grad_bias, w1, &g, 1))) return rc;
  for (int i = 0; i < NG; i++) {
    const fa_tensor *t = gt[i], *ref = in[i + 1]; /* grad_kpos: kpos; grad_w1: w1, ... */
    if (!t) continue;
    if ((rc = fa_check_like(fn, GNAMES[i], t, IN_NAMES[i + 1], ref)) ||
        (rc = fa_check_same_shape(fn, GNAMES[i], t, IN_NAMES[i + 1], ref)) || (rc = fa_check_dense(fn, GNAMES[i], t)) ||
        (rc = check_no_overlap(fn, GNAMES[i], t, in, NIN + 1, ALL_NAMES, (const fa_tensor *const *)gt, GNAMES, i)))
      return rc;
  }
  int any = 0;
  for (int i = 0; i < NG; i++) any |= gt[i] && fa_numel(gt[i]) > 0;
  if (!any) return 0;
  /* --- validation done --- */
  const void *d[NIN + 1];
  void *tmp[NIN + 2];
  tmp[NIN + 1] = NULL;
  fa_cpb_in x;
  fa_cpb_grads gr;
  void **gp[NG] = {&gr.kpos, &gr.w1, &gr.b1, &gr.w2, &gr.b2, &gr.w3, &gr.b3};
  for (int i = 0; i < NG; i++) *gp[i] = gt[i] && fa_numel(gt[i]) > 0 ? gt[i]->data : NULL;
  if ((rc = fa_dense_inputs(in, NIN + 1, d, tmp))) goto done;
  set_in(&x, d);
  const void *gb = d[NIN];
  if (g.device >= 0 && grad_bias->dtype != FA_FLOAT32) { /* a 16-bit grad_bias on CUDA: the kernels read float32 */
    fa_tensor c = *grad_bias;
    int64_t s = 1;
    for (int i = c.ndim - 1; i >= 0; i--) { c.stride[i] = s; s *= c.shape[i]; }
    c.dtype = FA_FLOAT32;
    if (!(c.data = tmp[NIN + 1] = fa_alloc(g.device, (s > 0 ? s : 1) * 4))) {
      rc = FA_ERR_MEMORY;
      goto done;
    }
    if ((rc = fa_copy(&c, grad_bias))) goto done;
    gb = c.data;
  }
  rc = g.device >= 0 ? fa_cu_cpb_backward(&g, &gr, (const float *)gb, &x) : fa_cpb_cpu_backward(&g, &gr, gb, &x);
done:
  for (int i = 0; i < NIN + 2; i++) fa_free(g.device, tmp[i]);
  return rc;
}
