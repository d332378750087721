/* attention_ref.c: the float64 CPU kernels of the attention core (c/attention.h), a plain reference beside the
 * BLAS-blocked float32 kernels of c/attention_cpu.c (as llm.c keeps a CPU reference beside each fast kernel).
 * Straight loops, every sum in a fixed order, one task per output row, rows in parallel.
 *
 * Forward: a task is one query row (z, h, i): all its logits, a two-pass softmax, out = sum_j w_j v_j / l.
 * Backward: dS[i][j] = P (dP f - delta_i) and the weight P f (f the dropout factor) are functions of (z, h, i, j)
 * and three numbers per row (S recomputed, P = exp(S - m_i) / l_i, dP = <dO_i, v_j>, delta_i = <dO_i, O_i>), so
 * every gradient element is a sum owned by one task that recomputes what it needs:
 *   grad_q row (z, h, i)    = scale sum_j dS_ij k_j                      (over j)
 *   grad_k, grad_v row (z, kv head, j) = sum over the group's heads, then rows i, of scale dS_ij q_i, P f go_i
 *   grad_bias row            = sum over the (z, h, i) that share it (row-major), then over keys j where the bias
 *                              broadcasts along them, of dS_ij
 * Nothing depends on the thread count. The row max m_i and sum l_i are recomputed as the forward has them, not
 * taken from lse = m + log l: with OpenFold's additive mask (-1e9 on every key of a fully masked row) lse carries
 * an ulp of 1.2e-7, and exp(S - lse) would be off by that relatively, where autograd through a softmax is not.
 * lse = -inf still marks the fully masked rows (P = 1/Lk, dS = 0). The float32 kernels share zoff and the
 * dropout factors (fa_attn_*). */
#pragma GCC optimize("fp-contract=off") /* the same bits from the AVX2 clones (FA_HOT_CLONES) and the baseline */
#include "internal.h"
#include "attention.h"

/* element offset of batch index z (row-major over g->bs) for strides s */
int64_t fa_attn_zoff(const fa_attn_geom *g, const fa_attn_strides *s, int64_t z) {
  int64_t off = 0;
  for (int d = g->nb - 1; d >= 0; d--) {
    off += (z % g->bs[d]) * s->b[d];
    z /= g->bs[d];
  }
  return off;
}

/* dropout: f[c] = 1/(1-p) where weight e + c (e = ((z*H + h)*Lq + i)*Lk + j) is kept, 0 where dropped (c < n) */
void fa_attn_keep(const fa_attn_geom *g, uint64_t e, int64_t n, double *f) {
  double p = g->dropout, s = 1.0 / (1.0 - p);
  uint32_t r[4];
  uint64_t blk = UINT64_MAX;
  for (int64_t c = 0; c < n; c++, e++) {
    if ((e >> 2) != blk) {
      blk = e >> 2;
      fa_philox(g->seed, g->offset + blk, r);
    }
    double u = (double)(r[e & 3] >> 8) * (1.0 / 16777216.0);
    f[c] = u >= p ? s : 0.0;
  }
}

typedef struct {
  const double *q, *k, *v, *bias, *go, *o, *lse;
  const double *stat; /* backward: (delta, m, l) per row (z, h, i) */
  const void *mask;
} ref_in;

/* one query row (z, h, i) resolved: its q (and dO) row, bias and mask rows, the key and value rows' base */
typedef struct {
  const double *q, *go, *k, *v, *bias, *lsep, *stat; /* lsep, stat: of row 0 (head_of) */
  const void *mask;
  double lse, delta, m, l;
  uint64_t e; /* dropout index of key 0 */
} ref_row;

/* row 0 of (z, h): the batch offsets, computed once per head (rows then add their row strides) */
static ref_row head_of(const fa_attn_geom *g, const ref_in *in, int64_t z, int64_t h) {
  ref_row r;
  int64_t kvh = h / (g->H / g->Hkv);
  r.q = in->q + fa_attn_zoff(g, &g->q, z) + h * g->q.h;
  r.k = in->k + fa_attn_zoff(g, &g->k, z) + kvh * g->k.h;
  r.v = in->v + fa_attn_zoff(g, &g->v, z) + kvh * g->v.h;
  r.bias = in->bias ? in->bias + fa_attn_zoff(g, &g->bias, z) + h * g->bias.h : NULL;
  r.mask = NULL;
  if (in->mask) {
    int64_t m = fa_attn_zoff(g, &g->mask, z) + h * g->mask.h;
    r.mask = g->mask_mode == 1 ? (const void *)((const uint8_t *)in->mask + m) : (const void *)((const double *)in->mask + m);
  }
  r.go = in->go ? in->go + fa_attn_zoff(g, &g->go, z) + h * g->go.h : NULL;
  r.lsep = in->lse ? in->lse + fa_attn_zoff(g, &g->lse, z) + h * g->lse.h : NULL;
  r.stat = in->stat ? in->stat + 3 * (z * g->H + h) * g->Lq : NULL;
  r.lse = r.delta = r.m = r.l = 0;
  r.e = ((uint64_t)z * g->H + h) * g->Lq * g->Lk;
  return r;
}

/* row i of the head h0 = head_of(z, h) */
static ref_row row_at(const fa_attn_geom *g, const ref_row *h0, int64_t i) {
  ref_row r = *h0;
  r.q += i * g->q.r;
  if (r.bias) r.bias += i * g->bias.r;
  if (r.mask)
    r.mask = g->mask_mode == 1 ? (const void *)((const uint8_t *)r.mask + i * g->mask.r)
                               : (const void *)((const double *)r.mask + i * g->mask.r);
  if (r.go) r.go += i * g->go.r;
  r.lse = r.lsep ? r.lsep[i * g->lse.r] : 0;
  const double *st = r.stat ? r.stat + 3 * i : NULL;
  r.delta = st ? st[0] : 0;
  r.m = st ? st[1] : 0;
  r.l = st ? st[2] : 0;
  r.e = h0->e + (uint64_t)i * g->Lk;
  return r;
}

static ref_row row_of(const fa_attn_geom *g, const ref_in *in, int64_t z, int64_t h, int64_t i) {
  ref_row h0 = head_of(g, in, z, h);
  return row_at(g, &h0, i);
}

/* the logit of key j: scale <q, k_j>, then the additive mask term, then the bias (OpenFold's order); -inf for a
 * key the select mask leaves out */
static inline double logit(const fa_attn_geom *g, const ref_row *r, int64_t j) {
  double s = g->scale * fa_dot_d(r->q, r->k + j * g->k.r, g->D);
  if (g->mask_mode == 1 && !((const uint8_t *)r->mask)[j * g->mask.c]) return -INFINITY;
  if (g->mask_mode == 2) s += g->mask_scale * (((const double *)r->mask)[j * g->mask.c] - 1);
  if (r->bias) s += r->bias[j * g->bias.c];
  return s;
}

/* backward, key j of row r: *w = the weight after dropout (for grad_v), returns dS (0 on a fully masked row,
 * where the weight is 1/Lk) */
static inline double dscore(const fa_attn_geom *g, const ref_row *r, int64_t j, double *w) {
  if (r->lse == -INFINITY) {
    *w = 1.0 / (double)g->Lk;
    return 0;
  }
  double p = exp(logit(g, r, j) - r->m) / r->l, dp = fa_dot_d(r->go, r->v + j * g->v.r, g->D), f = 1;
  if (g->dropout > 0) fa_attn_keep(g, r->e + j, 1, &f);
  *w = p * f;
  return p * (dp * f - r->delta);
}

/* s = the logits of row r, *m their max (NaN when all are NaN, -inf when every key is left out) and the sum
 * l = sum_j exp(s_j - m), in key order; s becomes those exponentials. Returns 0 for a row with every key left
 * out (or Lk = 0) */
static inline int softmax_row(const fa_attn_geom *g, const ref_row *r, double *s, double *m, double *l) {
  double mx = -INFINITY, sum = 0;
  int nan = 0;
  for (int64_t j = 0; j < g->Lk; j++) {
    s[j] = logit(g, r, j);
    if (s[j] > mx) mx = s[j];
    nan |= s[j] != s[j];
  }
  if (mx == -INFINITY && !nan) {
    *m = -INFINITY;
    *l = 0;
    return 0;
  }
  if (mx == -INFINITY) mx = NAN; /* only NaN logits: the row is NaN */
  for (int64_t j = 0; j < g->Lk; j++) {
    s[j] = exp(s[j] - mx);
    sum += s[j];
  }
  *m = mx;
  *l = sum;
  return 1;
}

/* ------------------------------------------------------------------ forward */
/* row (z, h, i). Scratch: s, f (Lk each), acc (D) */
FA_HOT_CLONES static void fwd_row(const fa_attn_geom *g, const ref_in *in, double *out, double *lse, int64_t z, int64_t h, int64_t i,
                    double *s, double *f, double *acc) {
  const int64_t Lk = g->Lk, D = g->D;
  ref_row r = row_of(g, in, z, h, i);
  double m, l;
  int any = softmax_row(g, &r, s, &m, &l);
  double *o = out + fa_attn_zoff(g, &g->o, z) + h * g->o.h + i * g->o.r;
  double *L = lse + fa_attn_zoff(g, &g->lse, z) + h * g->lse.h + i * g->lse.r;
  for (int64_t d = 0; d < D; d++) acc[d] = 0;
  if (!any) { /* every key left out (or Lk = 0): mean(V), zeros when Lk = 0 */
    for (int64_t j = 0; j < Lk; j++)
      for (int64_t d = 0; d < D; d++) acc[d] += r.v[j * g->v.r + d];
    for (int64_t d = 0; d < D; d++) o[d] = Lk > 0 ? acc[d] / (double)Lk : 0;
    *L = -INFINITY;
    return;
  }
  if (g->dropout > 0) fa_attn_keep(g, r.e, Lk, f);
  for (int64_t j = 0; j < Lk; j++) {
    double w = g->dropout > 0 ? s[j] * f[j] : s[j];
    for (int64_t d = 0; d < D; d++) acc[d] += w * r.v[j * g->v.r + d];
  }
  for (int64_t d = 0; d < D; d++) o[d] = acc[d] / l;
  *L = m + log(l);
}

static int work_parallel(const fa_attn_geom *g, int64_t tasks) {
  return (double)g->Z * g->H * g->Lq * (g->Lk + 1) * (g->D + 1) > FA_PARALLEL_GRAIN && tasks > 1;
}

int fa_attn_ref_forward(const fa_attn_geom *g, void *out, void *lse, const void *q, const void *k, const void *v,
                        const void *bias, const void *mask) {
  ref_in in = {(const double *)q, (const double *)k, (const double *)v, (const double *)bias, NULL, NULL, NULL, NULL,
               mask};
  int64_t rows = g->Z * g->H * g->Lq, per = 2 * g->Lk + g->D + 8;
  int par = work_parallel(g, rows);
  double *scr = (double *)fa_alloc(FA_CPU, (int64_t)sizeof(double) * per * (par ? fa_max_threads() : 1));
  if (!scr) return FA_ERR_MEMORY;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < rows; t++) {
    double *s = scr + per * fa_thread_id();
    int64_t zh = t / g->Lq;
    fwd_row(g, &in, (double *)out, (double *)lse, zh / g->H, zh % g->H, t % g->Lq, s, s + g->Lk, s + 2 * g->Lk);
  }
  fa_free(FA_CPU, scr);
  return 0;
}

/* ------------------------------------------------------------------ backward */
/* grad_q row (z, h, i) */
FA_HOT_CLONES static void gq_row(const fa_attn_geom *g, const ref_in *in, double *gq, int64_t z, int64_t h, int64_t i, double *acc) {
  ref_row r = row_of(g, in, z, h, i);
  double w;
  for (int64_t d = 0; d < g->D; d++) acc[d] = 0;
  for (int64_t j = 0; j < g->Lk; j++) {
    double ds = dscore(g, &r, j, &w);
    for (int64_t d = 0; d < g->D; d++) acc[d] += ds * r.k[j * g->k.r + d];
  }
  double *o = gq + fa_attn_zoff(g, &g->gq, z) + h * g->gq.h + i * g->gq.r;
  for (int64_t d = 0; d < g->D; d++) o[d] = g->scale * acc[d];
}

/* grad_k and grad_v rows (z, kv head, j) */
FA_HOT_CLONES static void gkv_row(const fa_attn_geom *g, const ref_in *in, double *gk, double *gv, int64_t z, int64_t kvh, int64_t j,
                    double *ak, double *av) {
  const int64_t D = g->D, G = g->H / g->Hkv;
  for (int64_t d = 0; d < D; d++) ak[d] = av[d] = 0;
  for (int64_t h = kvh * G; h < (kvh + 1) * G; h++) {
    ref_row h0 = head_of(g, in, z, h);
    for (int64_t i = 0; i < g->Lq; i++) {
      ref_row r = row_at(g, &h0, i);
      double w, ds = dscore(g, &r, j, &w);
      for (int64_t d = 0; d < D; d++) {
        ak[d] += ds * r.q[d];
        av[d] += w * r.go[d];
      }
    }
  }
  if (gk) {
    double *o = gk + fa_attn_zoff(g, &g->gk, z) + kvh * g->gk.h + j * g->gk.r;
    for (int64_t d = 0; d < D; d++) o[d] = g->scale * ak[d];
  }
  if (gv) {
    double *o = gv + fa_attn_zoff(g, &g->gv, z) + kvh * g->gv.h + j * g->gv.r;
    for (int64_t d = 0; d < D; d++) o[d] = av[d];
  }
}

/* the grad_bias row owned by row t = (z, h, i) when t's index is 0 along every dim where the bias broadcasts
 * (dims bs[0..nb), H, Lq); it sums dS over the rows that share it, row-major, then over keys */
FA_HOT_CLONES static void gbias_row(const fa_attn_geom *g, const ref_in *in, double *gb, int64_t t) {
  enum { ND = FA_ATTN_MAX_BATCH + 2 };
  int64_t size[ND], idx[ND], stride[ND];
  int nd = g->nb + 2, bc[ND], nbc = 0;
  for (int d = 0; d < nd; d++) {
    size[d] = d < g->nb ? g->bs[d] : d == g->nb ? g->H : g->Lq;
    stride[d] = d < g->nb ? g->gbias.b[d] : d == g->nb ? g->gbias.h : g->gbias.r;
  }
  for (int d = nd - 1; d >= 0; d--) {
    idx[d] = t % size[d];
    t /= size[d];
    if (stride[d] == 0 && size[d] > 1) {
      if (idx[d] != 0) return; /* another row owns it */
      bc[nbc++] = d;
    }
  }
  int64_t off = 0, n = 1;
  for (int d = 0; d < nd; d++) off += idx[d] * stride[d];
  for (int c = 0; c < nbc; c++) n *= size[bc[c]];
  double *o = gb + off;
  for (int64_t u = 0; u < n; u++) {
    int64_t x = u; /* the broadcast dims' indices, row-major (bc[] lists them last dim first) */
    for (int c = 0; c < nbc; c++) {
      idx[bc[c]] = x % size[bc[c]];
      x /= size[bc[c]];
    }
    int64_t z = 0;
    for (int d = 0; d < g->nb; d++) z = z * size[d] + idx[d];
    ref_row r = row_of(g, in, z, idx[g->nb], idx[g->nb + 1]);
    for (int64_t j = 0; j < g->Lk; j++) {
      double w;
      o[j * g->gbias.c] += dscore(g, &r, j, &w);
    }
  }
}

int fa_attn_ref_backward(const fa_attn_geom *g, void *grad_q, void *grad_k, void *grad_v, void *grad_bias,
                         const void *grad_out, const void *q, const void *k, const void *v, const void *out,
                         const void *lse, const void *bias, const void *mask) {
  const int64_t rows = g->Z * g->H * g->Lq, krows = g->Z * g->Hkv * g->Lk, D = g->D;
  int par = work_parallel(g, rows > krows ? rows : krows);
  int64_t per = g->Lk + 2 * D + 8, threads = par ? fa_max_threads() : 1;
  double *scr = (double *)fa_alloc(FA_CPU, (int64_t)sizeof(double) * (per * threads + 3 * rows));
  if (!scr) return FA_ERR_MEMORY;
  double *stat = scr + per * threads;
  ref_in in = {(const double *)q, (const double *)k, (const double *)v, (const double *)bias, (const double *)grad_out,
               (const double *)out, (const double *)lse, NULL, mask};
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < rows; t++) {
    int64_t zh = t / g->Lq, z = zh / g->H, h = zh % g->H, i = t % g->Lq;
    ref_row r = row_of(g, &in, z, h, i);
    stat[3 * t] = fa_dot_d(r.go, in.o + fa_attn_zoff(g, &g->o, z) + h * g->o.h + i * g->o.r, D);
    softmax_row(g, &r, scr + per * fa_thread_id(), &stat[3 * t + 1], &stat[3 * t + 2]);
  }
  in.stat = stat;
  if (grad_q) {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t t = 0; t < rows; t++) {
      int64_t zh = t / g->Lq;
      gq_row(g, &in, (double *)grad_q, zh / g->H, zh % g->H, t % g->Lq, scr + per * fa_thread_id());
    }
  }
  if (grad_k || grad_v) {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t t = 0; t < krows; t++) {
      int64_t zh = t / g->Lk;
      double *a = scr + per * fa_thread_id();
      gkv_row(g, &in, (double *)grad_k, (double *)grad_v, zh / g->Hkv, zh % g->Hkv, t % g->Lk, a, a + D);
    }
  }
  if (grad_bias) {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t t = 0; t < rows; t++) gbias_row(g, &in, (double *)grad_bias, t);
  }
  fa_free(FA_CPU, scr);
  return 0;
}
