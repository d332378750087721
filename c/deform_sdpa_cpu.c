/* deform_sdpa_cpu.c: the CPU kernels of fused deformable SDPA (c/deform_sdpa.h), float32 and float64 (this file
 * includes itself once per type, DS_REAL). Never a (queries x samples x D) buffer: the sampled keys and values are
 * read through their bilinear taps on the fly.
 * Forward, per query position (b, v1, l) (a thread's unit; every head of it, since the heads share the coords):
 * the V*S samples' taps once, then per head the V*S scores (4 tap dot products each), their max, and the
 * exponentials with the values' taps accumulated into out (one softmax pass over a row of V*S scores).
 * Backward in two passes. Pass 1, per query position: recompute the scores, P = exp(s - lse), dP and dS, grad_q,
 * grad_coords (summed over the heads in head order), and keep P and dS (queries x heads x samples, no D).
 * Pass 2, per key map (b, v2, h) (an owner: no two threads write one map): grad_k and grad_v of that map summed
 * over (v1, l, s, tap) in that order. Every sum's order is fixed by the shapes, so results are bit-identical for
 * any thread count. */
#ifndef DS_REAL
#pragma GCC optimize("no-trapping-math")
#include "internal.h"
#include "deform_sdpa.h"
#include "bilinear.h"

/* one sample's taps: element offsets of the 4 pixels in a map (p * stride of a row), weights (0 outside) */
typedef struct {
  int64_t p[4];  /* pixel index y * W + x; -1 for a tap outside */
  double w[4];
  double fx, fy;
} ds_tap;

/* the taps of coords (cx, cy) in a W x H map (grid_sample, align_corners=True, padding 'zeros') */
static inline void ds_taps(double cx, double cy, int64_t W, int64_t H, ds_tap *t) {
  double su, sv;
  double u = fa_bl_src_signed(1, 2 * cx - 1, W, 1, &su), v = fa_bl_src_signed(1, 2 * cy - 1, H, 1, &sv);
  fa_bl_taps bt;
  if (fa_bl_near(u, v, H, W)) fa_bl_taps_at(u, v, H, W, &bt);
  else fa_bl_no_taps(&bt);
  int64_t base = bt.y0 * W + bt.x0, d[4] = {0, 1, W, W + 1};
  for (int k = 0; k < 4; k++) {
    t->p[k] = bt.in[k] ? base + d[k] : -1;
    t->w[k] = bt.w[k];
  }
  t->fx = bt.fx;
  t->fy = bt.fy;
}

#define DS_CAT2(a, b) a##_##b
#define DS_CAT(a, b) DS_CAT2(a, b)
#define F(name) DS_CAT(name, DS_SUF)

#define DS_REAL float
#define DS_SUF f32
#define DS_EXP fa_fast_expf
#define DS_LOG logf
#include "deform_sdpa_cpu.c"
#undef DS_REAL
#undef DS_SUF
#undef DS_EXP
#undef DS_LOG
#define DS_REAL double
#define DS_SUF f64
#define DS_EXP exp
#define DS_LOG log
#include "deform_sdpa_cpu.c"

int fa_ds_cpu_forward(const fa_ds_geom *g, void *out, void *lse, const void *q, const void *k, const void *v,
                      const void *coords) {
  return g->dtype == FA_FLOAT64 ? forward_f64(g, out, lse, q, k, v, coords) : forward_f32(g, out, lse, q, k, v, coords);
}
int fa_ds_cpu_backward(const fa_ds_geom *g, void *grad_q, void *grad_k, void *grad_v, void *grad_coords,
                       const void *grad_out, const void *q, const void *k, const void *v, const void *coords,
                       const void *out, const void *lse) {
  return (g->dtype == FA_FLOAT64 ? backward_f64 : backward_f32)(g, grad_q, grad_k, grad_v, grad_coords, grad_out, q, k, v,
                                                                coords, out, lse);
}

#else /* ------------------------------------------------------------------ the kernels for one DS_REAL */
typedef DS_REAL F(real);
#define R F(real)

static inline R F(dot)(const R *a, const R *b, int64_t D) {
  R s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; d++) s += a[d] * b[d];
  return s;
}

/* the taps of the V*S samples of query position (b, v1, l) */
static void F(taps_of)(const fa_ds_geom *g, const R *coords, int64_t b, int64_t v1, int64_t l, ds_tap *tp) {
  int64_t VS = g->V * g->S;
  const R *c = coords + ((b * g->V + v1) * g->L + l) * VS * 2;
  for (int64_t n = 0; n < VS; n++) ds_taps(c[2 * n], c[2 * n + 1], g->W, g->H, &tp[n]);
}

/* one query position, every head: sc (V*S scores) and acc (D) are scratch */
FA_HOT_CLONES static void F(fwd_query)(const fa_ds_geom *g, int64_t b, int64_t v1, int64_t l, const ds_tap *tp, R *out,
                                       R *lse, const R *q, const R *k, const R *v, R *sc, R *acc) {
  int64_t V = g->V, S = g->S, VS = V * S, D = g->D;
  R scale = (R)g->scale;
  for (int64_t h = 0; h < g->NH; h++) {
    const R *qr = q + b * g->q.b + v1 * g->q.v + h * g->q.h + l * g->q.l;
    int64_t row = ((b * V + v1) * g->NH + h) * g->L + l;
    R *o = out + row * D;
    R m = -INFINITY;
    for (int64_t n = 0; n < VS; n++) {
      const R *kb = k + b * g->k.b + (n / S) * g->k.v + h * g->k.h;
      const ds_tap *t = &tp[n];
      R s = 0;
      for (int c = 0; c < 4; c++)
        if (t->p[c] >= 0) s += (R)t->w[c] * F(dot)(qr, kb + t->p[c] * g->k.l, D);
      s *= scale;
      sc[n] = s;
      if (s > m) m = s;
    }
    for (int64_t d = 0; d < D; d++) acc[d] = 0;
    R sum = 0;
    for (int64_t n = 0; n < VS; n++) {
      R p = DS_EXP(sc[n] - m);
      sum += p;
      const R *vb = v + b * g->v.b + (n / S) * g->v.v + h * g->v.h;
      const ds_tap *t = &tp[n];
      for (int c = 0; c < 4; c++)
        if (t->p[c] >= 0) {
          R a = p * (R)t->w[c];
          const R *vr = vb + t->p[c] * g->v.l;
#pragma omp simd
          for (int64_t d = 0; d < D; d++) acc[d] += a * vr[d];
        }
    }
    if (VS == 0) {
      for (int64_t d = 0; d < D; d++) o[d] = 0;
      lse[row] = -INFINITY;
      continue;
    }
    R inv = 1 / sum;
    for (int64_t d = 0; d < D; d++) o[d] = acc[d] * inv;
    lse[row] = m + DS_LOG(sum);
  }
}

static int F(forward)(const fa_ds_geom *g, void *outv, void *lsev, const void *qv, const void *kv, const void *vv,
                      const void *cv) {
  int64_t VS = g->V * g->S, units = g->B * g->V * g->L;
  int64_t per = VS * (int64_t)sizeof(ds_tap) + (VS + g->D + 16) * (int64_t)sizeof(R);
  per = (per + 63) / 64 * 64;
  int par = (double)units * VS * g->NH * (g->D + 4) > FA_PARALLEL_GRAIN && units > 1;
  int threads = par ? fa_max_threads() : 1;
  char *scr = (char *)fa_alloc(FA_CPU, per * threads + 64);
  if (!scr) return FA_ERR_MEMORY;
  const R *q = (const R *)qv, *k = (const R *)kv, *v = (const R *)vv, *coords = (const R *)cv;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t u = 0; u < units; u++) {
    char *my = scr + per * fa_thread_id();
    ds_tap *tp = (ds_tap *)my;
    R *sc = (R *)(my + VS * (int64_t)sizeof(ds_tap)), *acc = sc + VS;
    int64_t b = u / (g->V * g->L), v1 = u / g->L % g->V, l = u % g->L;
    F(taps_of)(g, coords, b, v1, l, tp);
    F(fwd_query)(g, b, v1, l, tp, (R *)outv, (R *)lsev, q, k, v, sc, acc);
  }
  fa_free(FA_CPU, scr);
  return 0;
}

/* pass 1 for one query position: grad_q (when gq), grad_coords (when gc), and P / dS of its (head, sample)
 * pairs into pp / pds (when not NULL); gK, gV: scratch (V*S*4 each), gcacc (V*S*2 doubles) */
FA_HOT_CLONES static void F(bwd_query)(const fa_ds_geom *g, int64_t b, int64_t v1, int64_t l, const ds_tap *tp, R *gq,
                                       R *gc, R *pp, R *pds, const R *go, const R *q, const R *k, const R *v,
                                       const R *out, const R *lse, double *gcacc) {
  int64_t V = g->V, S = g->S, VS = V * S, D = g->D;
  R scale = (R)g->scale;
  if (gc)
    for (int64_t n = 0; n < 2 * VS; n++) gcacc[n] = 0;
  for (int64_t h = 0; h < g->NH; h++) {
    const R *qr = q + b * g->q.b + v1 * g->q.v + h * g->q.h + l * g->q.l;
    const R *gor = go + b * g->go.b + v1 * g->go.v + h * g->go.h + l * g->go.l;
    const R *orow = out + b * g->o.b + v1 * g->o.v + h * g->o.h + l * g->o.l;
    int64_t row = ((b * V + v1) * g->NH + h) * g->L + l;
    R *gqr = gq ? gq + row * D : NULL;
    if (gqr)
      for (int64_t d = 0; d < D; d++) gqr[d] = 0;
    R delta = F(dot)(gor, orow, D), lz = lse[row];
    for (int64_t n = 0; n < VS; n++) {
      const ds_tap *t = &tp[n];
      int64_t kb = b * g->k.b + (n / S) * g->k.v + h * g->k.h, vb = b * g->v.b + (n / S) * g->v.v + h * g->v.h;
      double gk4[4] = {0, 0, 0, 0}, gv4[4] = {0, 0, 0, 0};
      R s = 0, dp = 0;
      for (int c = 0; c < 4; c++)
        if (t->p[c] >= 0) {
          R a = F(dot)(qr, k + kb + t->p[c] * g->k.l, D), e = F(dot)(gor, v + vb + t->p[c] * g->v.l, D);
          gk4[c] = a;
          gv4[c] = e;
          s += (R)t->w[c] * a;
          dp += (R)t->w[c] * e;
        }
      R p = DS_EXP(s * scale - lz), ds = p * (dp - delta);
      if (pp) {
        pp[h * VS + n] = p;
        pds[h * VS + n] = ds;
      }
      if (gqr)
        for (int c = 0; c < 4; c++)
          if (t->p[c] >= 0) {
            R a = scale * ds * (R)t->w[c];
            const R *kr = k + kb + t->p[c] * g->k.l;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) gqr[d] += a * kr[d];
          }
      if (gc) {
        double cs = (double)scale * ds, cp = p;
        gcacc[2 * n] += cs * fa_bl_du(gk4, t->fy) + cp * fa_bl_du(gv4, t->fy);
        gcacc[2 * n + 1] += cs * fa_bl_dv(gk4, t->fx) + cp * fa_bl_dv(gv4, t->fx);
      }
    }
  }
  if (gc) {
    R *dst = gc + ((b * V + v1) * g->L + l) * VS * 2;
    double sx = (double)(g->W - 1), sy = (double)(g->H - 1);
    for (int64_t n = 0; n < VS; n++) {
      dst[2 * n] = (R)(gcacc[2 * n] * sx);
      dst[2 * n + 1] = (R)(gcacc[2 * n + 1] * sy);
    }
  }
}

/* pass 2 for key map (b, v2, h): grad_k and grad_v of it, over every query position's samples of view v2 */
FA_HOT_CLONES static void F(bwd_map)(const fa_ds_geom *g, int64_t b, int64_t v2, int64_t h, R *gk, R *gv, const R *pp,
                                     const R *pds, const R *go, const R *q, const R *coords) {
  int64_t V = g->V, S = g->S, VS = V * S, D = g->D, L = g->L, NH = g->NH;
  R scale = (R)g->scale;
  int64_t map = ((b * V + v2) * NH + h) * L * D;
  R *gkm = gk ? gk + map : NULL, *gvm = gv ? gv + map : NULL;
  if (gkm) memset(gkm, 0, sizeof(R) * L * D);
  if (gvm) memset(gvm, 0, sizeof(R) * L * D);
  for (int64_t v1 = 0; v1 < V; v1++)
    for (int64_t l = 0; l < L; l++) {
      const R *qr = q + b * g->q.b + v1 * g->q.v + h * g->q.h + l * g->q.l;
      const R *gor = go + b * g->go.b + v1 * g->go.v + h * g->go.h + l * g->go.l;
      int64_t pq = (((b * V + v1) * L + l) * NH + h) * VS + v2 * S;
      const R *c = coords + (((b * V + v1) * L + l) * V + v2) * S * 2;
      for (int64_t s = 0; s < S; s++) {
        ds_tap t;
        ds_taps(c[2 * s], c[2 * s + 1], g->W, g->H, &t);
        R p = pp[pq + s], ds = pds[pq + s] * scale;
        for (int cc = 0; cc < 4; cc++) {
          if (t.p[cc] < 0) continue;
          R w = (R)t.w[cc];
          if (gkm) {
            R a = ds * w, *dst = gkm + t.p[cc] * D;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) dst[d] += a * qr[d];
          }
          if (gvm) {
            R a = p * w, *dst = gvm + t.p[cc] * D;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) dst[d] += a * gor[d];
          }
        }
      }
    }
}

static int F(backward)(const fa_ds_geom *g, void *gqv, void *gkv, void *gvv, void *gcv, const void *gov, const void *qv,
                       const void *kv, const void *vv, const void *cv, const void *ov, const void *lsev) {
  int64_t V = g->V, VS = V * g->S, units = g->B * V * g->L, maps = g->B * V * g->NH;
  int want_kv = gkv || gvv;
  int64_t per = VS * (int64_t)sizeof(ds_tap) + 2 * VS * (int64_t)sizeof(double) + 64;
  per = (per + 63) / 64 * 64;
  double work = (double)units * VS * g->NH * (g->D + 4);
  int par = work > FA_PARALLEL_GRAIN && units > 1;
  int threads = par ? fa_max_threads() : 1;
  int64_t npd = want_kv ? units * g->NH * VS : 0; /* P and dS */
  char *scr = (char *)fa_alloc(FA_CPU, per * threads + 2 * npd * (int64_t)sizeof(R) + 64);
  if (!scr) return FA_ERR_MEMORY;
  R *P = want_kv ? (R *)(scr + per * threads) : NULL, *DS = want_kv ? P + npd : NULL;
  const R *go = (const R *)gov, *q = (const R *)qv, *k = (const R *)kv, *v = (const R *)vv, *coords = (const R *)cv;
  const R *out = (const R *)ov, *lse = (const R *)lsev;
  if (gqv || gcv || want_kv) {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t u = 0; u < units; u++) {
      char *my = scr + per * fa_thread_id();
      ds_tap *tp = (ds_tap *)my;
      double *gcacc = (double *)(my + VS * (int64_t)sizeof(ds_tap));
      int64_t b = u / (V * g->L), v1 = u / g->L % V, l = u % g->L;
      F(taps_of)(g, coords, b, v1, l, tp);
      F(bwd_query)(g, b, v1, l, tp, (R *)gqv, (R *)gcv, P ? P + u * g->NH * VS : NULL, DS ? DS + u * g->NH * VS : NULL,
                   go, q, k, v, out, lse, gcacc);
    }
  }
  if (want_kv) {
    int par2 = par && maps > 1;
#pragma omp parallel for schedule(dynamic, 1) if (par2)
    for (int64_t m = 0; m < maps; m++)
      F(bwd_map)(g, m / (V * g->NH), m / g->NH % V, m % g->NH, (R *)gkv, (R *)gvv, P, DS, go, q, coords);
  }
  fa_free(FA_CPU, scr);
  return 0;
}
#undef R
#endif
