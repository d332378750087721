/* attention_cpu.c: the float32 CPU kernels of the attention core (c/attention.h); float64 runs the plain reference
 * of c/attention_ref.c. The block products go through single-threaded BLAS (fa_cpu_gemm: OpenBLAS), the rest is
 * 16-lane vector code (GCC vector extensions; compiled for AVX-512, AVX2 and the baseline, picked at load time).
 *
 * Forward: a task is (z, h, block of BM query rows); per block of BN keys: S = scale Q K^T, bias and mask, online
 * softmax (running max m and sum l per row), dropout, acc = acc * corr + P V; no (Lq x Lk) matrix.
 * Backward: a task is one or more whole (z, kv head) problems; per key block, query head of the group and block
 * of rows: S = scale Q K^T, dP = dO V^T, P = exp(S - lse), dS = P (dP - delta) with delta = rowsum(dO O), then
 * dV += P^T dO, dK += scale dS^T Q, dQ += scale dS K, dBias += dS. Every sum runs in a fixed order whatever the
 * thread count: grad_q/grad_k/grad_v are owned by the task of their (z, kv head); grad_bias by the task that owns
 * the bias element: the (z, kv head) dims where the bias broadcasts are looped inside a task (in chunks of a
 * count fixed by the shapes, each chunk adding into its own partial buffer, summed in chunk order).
 * The additive mask term is added before the bias (OpenFold's order: a fully masked row's -1e9 + bias rounds as
 * OpenFold's).
 *
 * Measured (OpenBLAS 0.3.21, an AVX-512 Xeon, one thread; triangle shape B=1, H=4, N=128, D=32):
 *  - Q K^T as an NT product takes OpenBLAS's packing path (12.4 us for 128 x 128 x 32); Q (K^T), with K^T
 *    transposed once per key block (somatcopy, 0.55 us), its small-matrix kernel (7.8 us): S and dP are
 *    products with K^T and V^T. P^T dO and dS^T Q stay TN (8.4 us; transposing P and dS to make them NN costs
 *    2 x 2.5 us and saves 2 x 1.5).
 *  - GCC compiles the widening of uint8 mask lanes to scalar code: the select mask becomes int32 lane masks
 *    once per distinct mask row (the triangle's is the same for every row and head): forward 24 -> 20 ms.
 *  - The strided rows of q, k, v, grad_out, out (one or two cache lines each) miss the hardware prefetcher:
 *    the next task's rows are prefetched a row per row computed: forward 19 -> 16 ms, backward 39 -> 35 ms.
 *  - grad_k/grad_v/grad_q are written by their products (beta 0 first), no buffers and copies: backward -8 ms. */
#pragma GCC optimize("no-trapping-math")
#include "internal.h"
#include "attention.h"
#include <cblas.h>
#include <stdlib.h>

/* c/matmul.c: single-threaded BLAS (row-major C = alpha op(A) op(B) + beta C), deterministic for given shapes */
void fa_blas_single_thread(void);
void fa_cpu_gemm(int dbl, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
                 const void *b, int64_t ldb, double beta, void *c, int64_t ldc);

/* c/attention_ref.c: batch offsets and the dropout factors, shared with the float64 reference */
int64_t fa_attn_zoff(const fa_attn_geom *g, const fa_attn_strides *s, int64_t z);
void fa_attn_keep(const fa_attn_geom *g, uint64_t e, int64_t n, double *f);

enum { BN = 256, BM = 128 }; /* keys and query rows per block */

#define AI static inline __attribute__((always_inline))
/* FA_HOT_CLONES plus an AVX-512 clone: a 16-lane op is one zmm op there (two ymm ops with AVX2) */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__GLIBC__)
#define ATTN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ATTN_CLONES FA_HOT_CLONES
#endif

/* ------------------------------------------------------------------ the grad_bias plan */
/* the grad_bias ownership: the (z, kv head) problems as dims (bs[0..nb), Hkv); a dim is owned when the bias
 * has its own elements along it (gbias stride != 0), else looped inside a task */
typedef struct {
  int nd;
  int64_t size[FA_ATTN_MAX_BATCH + 1];
  int owned[FA_ATTN_MAX_BATCH + 1];
  int64_t n_owned, n_inner, chunks, chunk_len;
} attn_plan;

static void make_plan(const fa_attn_geom *g, int by_bias, int64_t gbias_elems, attn_plan *p) {
  p->nd = g->nb + 1;
  p->n_owned = p->n_inner = 1;
  for (int d = 0; d < p->nd; d++) {
    p->size[d] = d < g->nb ? g->bs[d] : g->Hkv;
    p->owned[d] = !by_bias || (d < g->nb ? g->gbias.b[d] != 0 : g->gbias.h != 0);
    if (p->owned[d]) p->n_owned *= p->size[d];
    else p->n_inner *= p->size[d];
  }
  /* chunks of the inner loop: enough tasks for many threads, from the shapes only (never the thread count) */
  int64_t c = p->n_owned >= 64 ? 1 : (64 + p->n_owned - 1) / p->n_owned;
  if (c > p->n_inner) c = p->n_inner;
  while (c > 1 && (double)c * (double)gbias_elems * 8.0 > (double)(1 << 28)) c /= 2;
  if (c < 1) c = 1;
  p->chunk_len = (p->n_inner + c - 1) / c;
  p->chunks = p->n_inner > 0 ? (p->n_inner + p->chunk_len - 1) / p->chunk_len : 1;
}

/* problem (z, kv head) from an owned index and an inner index */
static void plan_problem(const attn_plan *p, int64_t o, int64_t in, int64_t *z, int64_t *kvh) {
  int64_t idx[FA_ATTN_MAX_BATCH + 1] = {0};
  for (int d = p->nd - 1; d >= 0; d--) {
    if (p->owned[d]) { idx[d] = o % p->size[d]; o /= p->size[d]; }
    else { idx[d] = in % p->size[d]; in /= p->size[d]; }
  }
  int64_t zz = 0;
  for (int d = 0; d < p->nd - 1; d++) zz = zz * p->size[d] + idx[d];
  *z = zz;
  *kvh = idx[p->nd - 1];
}

/* ------------------------------------------------------------------ vector helpers */
/* always inlined into FA_HOT_CLONES functions: no AVX vector ever crosses a call (-Wpsabi warns regardless) */
#pragma GCC diagnostic ignored "-Wpsabi"
enum { W = 16 }; /* lanes */
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

AI vf ldv(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
AI void stv(float *p, vf v) { memcpy(p, &v, sizeof v); }
AI vf splat(float x) { return (vf){0} + x; }
AI vf sel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); } /* m ? a : b per lane */
/* max with NaN lanes of s ignored */
AI vf vmax(vf m, vf s) { return sel(s > m, s, m); }
AI float hmax(vf m) {
  float r = m[0];
  for (int t = 1; t < W; t++) r = m[t] > r ? m[t] : r;
  return r;
}
/* in a fixed order: lanes t and t + W/2 first, and so on */
AI float hsum(vf a) {
  float s[W];
  memcpy(s, &a, sizeof s);
  for (int h = W / 2; h >= 1; h /= 2)
    for (int t = 0; t < h; t++) s[t] += s[t + h];
  return s[0];
}

/* exp for arguments <= 0 (a logit minus the row max or the lse; tiny positive roundings are fine): Cephes' expf
 * without the upper clamp, within about 1 ulp; 0 below -87.3 and for -inf, NaN stays NaN */
AI vf vexp_nonpos(vf x) {
  vi under = x < -87.3f;
  vf xc = sel(under, splat(-87.3f), x);
  vf n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  vf r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  return (vf)(~under & (vi)(p * (vf)bits));
}

/* sum_d a[d] b[d] in a fixed order (W lanes) */
AI float dot(const float *restrict a, const float *restrict b, int64_t D) {
  vf s = splat(0);
  int64_t d = 0;
  for (; d + W <= D; d += W) s += ldv(a + d) * ldv(b + d);
  for (int c = 0; d < D; d++, c++) s[c] += a[d] * b[d];
  return hsum(s);
}

/* The next problem's rows, prefetched (into L2) a few at a time while this one computes: its strided rows (one or
 * two cache lines each) defeat the hardware prefetcher, and their misses took about a tenth of the time; all at
 * once, the prefetches stall on the line fill buffers. */
enum { PF_MAX = 8 };
typedef struct {
  int n;
  const float *p[PF_MAX];
  int64_t rows[PF_MAX], rs[PF_MAX], D, next;
  int write[PF_MAX];
} prefetcher;

/* rows 0..min(rows, cap) of p at stride rs; write: an output */
AI void pf_add(prefetcher *f, const void *p, int64_t rows, int64_t cap, int64_t rs, int write) {
  if (!p) return;
  f->p[f->n] = (const float *)p;
  f->rows[f->n] = rows < cap ? rows : cap;
  f->write[f->n] = write;
  f->rs[f->n++] = rs;
}

/* the next row of each tensor */
AI void pf_step(prefetcher *f) {
  int64_t r = f->next++;
  for (int t = 0; t < f->n; t++)
    if (r < f->rows[t])
      for (int64_t d = 0; d < f->D; d += 16) {
        if (f->write[t]) __builtin_prefetch(f->p[t] + r * f->rs[t] + d, 1, 2);
        else __builtin_prefetch(f->p[t] + r * f->rs[t] + d, 0, 2);
      }
}

/* a BLAS leading dim from a row stride: c/attention.c leaves strides < D (0 for one row) only where one row is
 * read, and any leading dim >= D does then */
AI int64_t ld(int64_t s, int64_t D) { return s >= D && s > 0 ? s : (D > 0 ? D : 1); }

/* the key block j0..j0+n (nw = n rounded up to W) of rows as the logits see them: the bias row and the mask row
 * of row i as unit-stride arrays of nw entries: pointers into the tensors, or copies padded with 0 when strided or
 * n < nw. The select mask becomes lanes of -1 (keep) or 0, converted once per distinct row (tmp->mrow: the triangle's
 * mask row is the same for every row i and head) */
typedef struct {
  const float *b;    /* bias or NULL */
  const int32_t *ms; /* select mask (mode 1) or NULL */
  const float *ma;   /* additive mask (mode 2) or NULL */
} row_src;

typedef struct {
  float *b;
  int32_t *m;
  const void *mrow; /* the select-mask row m holds, NULL: none yet */
} row_tmp;

AI row_src row_sources(const fa_attn_geom *g, const float *bias, const void *mask, int64_t boff, int64_t moff, int64_t j0,
                       int64_t n, int64_t nw, row_tmp *t) {
  row_src s = {NULL, NULL, NULL};
  if (bias) {
    const float *b = bias + boff + j0 * g->bias.c;
    if (g->bias.c == 1 && n == nw) s.b = b;
    else {
      for (int64_t c = 0; c < n; c++) t->b[c] = b[c * g->bias.c];
      for (int64_t c = n; c < nw; c++) t->b[c] = 0;
      s.b = t->b;
    }
  }
  if (g->mask_mode == 1) {
    const uint8_t *m = (const uint8_t *)mask + moff + j0 * g->mask.c;
    if (t->mrow != m) {
      for (int64_t c = 0; c < n; c++) t->m[c] = m[c * g->mask.c] ? -1 : 0;
      for (int64_t c = n; c < nw; c++) t->m[c] = 0;
      t->mrow = m;
    }
    s.ms = t->m;
  } else if (g->mask_mode == 2) {
    const float *m = (const float *)mask + moff + j0 * g->mask.c;
    float *f = (float *)t->m;
    if (g->mask.c == 1 && n == nw) s.ma = m;
    else {
      for (int64_t c = 0; c < n; c++) f[c] = m[c * g->mask.c];
      for (int64_t c = n; c < nw; c++) f[c] = 1;
      s.ma = f;
    }
  }
  return s;
}

/* st[0..nw) (the scaled scores, pad entries from n set to -inf here) += the additive mask term, then the bias;
 * keys the select mask leaves out get -inf. Returns the max (NaNs ignored) of the result and init */
AI float logits(const fa_attn_geom *g, float *restrict st, int64_t n, int64_t nw, row_src s, float init) {
  for (int64_t c = n; c < nw; c++) st[c] = -INFINITY;
  const vf ninf = splat(-INFINITY), one = splat(1), ms = splat((float)g->mask_scale);
  vf mx = splat(init);
  for (int64_t c = 0; c < nw; c += W) {
    vf x = ldv(st + c);
    if (s.ma) x += ms * (ldv(s.ma + c) - one);
    if (s.b) x += ldv(s.b + c);
    if (s.ms) {
      vi keep;
      memcpy(&keep, s.ms + c, sizeof keep);
      x = sel(keep, x, ninf);
    }
    stv(st + c, x);
    mx = vmax(mx, x);
  }
  return hmax(mx);
}

/* ------------------------------------------------------------------ forward */
/* one task: rows i0..i0+nr of (z, h). Scratch: S (BM x BN), acc (BM x D), kT (D x BN), m, l (BM), tb, tm (BN);
 * keep (BN doubles) */
AI void fwd_task(const fa_attn_geom *g, float *out, float *lse, const float *q, const float *k, const float *v,
                 const float *bias, const void *mask, int64_t z, int64_t h, int64_t i0, int64_t nr, float *scr,
                 double *keep, prefetcher *pf) {
  const int64_t D = g->D, Lk = g->Lk, kvh = h / (g->H / g->Hkv);
  float *S = scr, *acc = S + BM * BN, *kT = acc + BM * D, *m = kT + D * BN, *l = m + BM;
  row_tmp tmp = {l + BM, (int32_t *)(l + BM + BN), NULL};
  const float *kz = k + fa_attn_zoff(g, &g->k, z) + kvh * g->k.h, *vz = v + fa_attn_zoff(g, &g->v, z) + kvh * g->v.h;
  const float *qb = q + fa_attn_zoff(g, &g->q, z) + h * g->q.h + i0 * g->q.r;
  int64_t bz = bias ? fa_attn_zoff(g, &g->bias, z) + h * g->bias.h : 0;
  int64_t mz = mask ? fa_attn_zoff(g, &g->mask, z) + h * g->mask.h : 0;
  for (int64_t r = 0; r < nr; r++) { m[r] = -INFINITY; l[r] = 0; }
  for (int64_t e = 0; e < nr * D; e++) acc[e] = 0;
  for (int64_t j0 = 0; j0 < Lk; j0 += BN) {
    int64_t n = Lk - j0 < BN ? Lk - j0 : BN, nw = (n + W - 1) / W * W;
    if (D > 0)
      cblas_somatcopy(CblasRowMajor, CblasTrans, (int)n, (int)D, 1.0f, kz + j0 * g->k.r, (int)ld(g->k.r, D), kT, (int)n);
    fa_cpu_gemm(0, 0, 0, nr, n, D, g->scale, qb, ld(g->q.r, D), kT, n, 0, S, BN);
    for (int64_t r = 0; r < nr; r++) {
      int64_t i = i0 + r;
      float *st = S + r * BN;
      pf_step(pf);
      row_src src = row_sources(g, bias, mask, bz + i * g->bias.r, mz + i * g->mask.r, j0, n, nw, &tmp);
      float mx = logits(g, st, n, nw, src, m[r]);
      if (mx == -INFINITY) { /* every key so far left out, or NaN logits (then the row is NaN) */
        int nan = 0;
        for (int64_t c = 0; c < n; c++) {
          nan |= st[c] != st[c];
          st[c] = 0;
        }
        if (nan) m[r] = l[r] = NAN;
        continue;
      }
      float corr = vexp_nonpos(splat(m[r] - mx))[0];
      m[r] = mx;
      vf sum = splat(0), vm = splat(mx);
      for (int64_t c = 0; c < nw; c += W) {
        vf p = vexp_nonpos(ldv(st + c) - vm);
        stv(st + c, p);
        sum += p;
      }
      l[r] = l[r] * corr + hsum(sum);
      if (corr != 1) {
        float *a = acc + r * D;
        for (int64_t d = 0; d < D; d++) a[d] *= corr;
      }
      if (g->dropout > 0) {
        fa_attn_keep(g, (((uint64_t)z * g->H + h) * g->Lq + i) * Lk + j0, n, keep);
        for (int64_t c = 0; c < n; c++) st[c] *= (float)keep[c];
      }
    }
    fa_cpu_gemm(0, 0, 0, nr, D, n, 1, S, BN, vz + j0 * g->v.r, ld(g->v.r, D), 1, acc, D);
  }
  int64_t ob = fa_attn_zoff(g, &g->o, z) + h * g->o.h, lb = fa_attn_zoff(g, &g->lse, z) + h * g->lse.h;
  for (int64_t r = 0; r < nr; r++) {
    int64_t i = i0 + r;
    float *o = out + ob + i * g->o.r, *a = acc + r * D;
    if (m[r] != -INFINITY) {
      float inv = 1 / l[r];
      for (int64_t d = 0; d < D; d++) o[d] = a[d] * inv;
      lse[lb + i * g->lse.r] = m[r] + logf(l[r]);
    } else { /* every key left out: mean(V), zeros when Lk = 0 */
      for (int64_t d = 0; d < D; d++) a[d] = 0;
      for (int64_t j = 0; j < Lk; j++)
        for (int64_t d = 0; d < D; d++) a[d] += vz[j * g->v.r + d];
      float inv = Lk > 0 ? 1 / (float)Lk : 0;
      for (int64_t d = 0; d < D; d++) o[d] = a[d] * inv;
      lse[lb + i * g->lse.r] = -INFINITY;
    }
  }
}

ATTN_CLONES static void fwd_range(const fa_attn_geom *g, float *out, float *lse, const float *q, const float *k,
                                    const float *v, const float *bias, const void *mask, int64_t t, float *scr,
                                    double *keep) {
  int64_t nblk = (g->Lq + BM - 1) / BM, zh = t / nblk, i0 = (t % nblk) * BM;
  int64_t nr = g->Lq - i0 < BM ? g->Lq - i0 : BM;
  prefetcher pf = {0};
  pf.D = g->D;
  if (t + 1 < g->Z * g->H * nblk) { /* the next task's rows (usually this thread's next) */
    int64_t zh1 = (t + 1) / nblk, z1 = zh1 / g->H, h1 = zh1 % g->H, j1 = ((t + 1) % nblk) * BM;
    int64_t kvh1 = h1 / (g->H / g->Hkv);
    pf_add(&pf, q + fa_attn_zoff(g, &g->q, z1) + h1 * g->q.h + j1 * g->q.r, g->Lq - j1, BM, g->q.r, 0);
    if (j1 == 0) {
      pf_add(&pf, k + fa_attn_zoff(g, &g->k, z1) + kvh1 * g->k.h, g->Lk, BN, g->k.r, 0);
      pf_add(&pf, v + fa_attn_zoff(g, &g->v, z1) + kvh1 * g->v.h, g->Lk, BN, g->v.r, 0);
    }
    pf_add(&pf, out + fa_attn_zoff(g, &g->o, z1) + h1 * g->o.h + j1 * g->o.r, g->Lq - j1, BM, g->o.r, 1);
  }
  fwd_task(g, out, lse, q, k, v, bias, mask, zh / g->H, zh % g->H, i0, nr, scr, keep, &pf);
}

int fa_attn_cpu_forward(const fa_attn_geom *g, void *out, void *lse, const void *q, const void *k, const void *v,
                        const void *bias, const void *mask) {
  int64_t nblk = (g->Lq + BM - 1) / BM, tasks = g->Z * g->H * nblk;
  int64_t per = BM * BN + BM * g->D + g->D * BN + 2 * BM + 2 * BN + 16; /* floats */
  per = (per * (int64_t)sizeof(float) + BN * 8 + 63) / 64 * 64;         /* bytes, + keep */
  int par = (double)g->Z * g->H * g->Lq * (g->Lk + 1) * (g->D + 1) > FA_PARALLEL_GRAIN && tasks > 1;
  int threads = par ? fa_max_threads() : 1;
  char *scr = (char *)fa_alloc(FA_CPU, per * threads);
  if (!scr) return FA_ERR_MEMORY;
  fa_blas_single_thread();
#pragma omp parallel for schedule(dynamic, 1) if (par)
  for (int64_t t = 0; t < tasks; t++) {
    char *mine = scr + per * fa_thread_id();
    fwd_range(g, (float *)out, (float *)lse, (const float *)q, (const float *)k, (const float *)v, (const float *)bias,
              mask, t, (float *)(mine + BN * 8), (double *)mine);
  }
  fa_free(FA_CPU, scr);
  return 0;
}

/* ------------------------------------------------------------------ backward */
typedef struct {
  float *gq, *gk, *gv, *gb;
  const float *go, *q, *k, *v, *o, *lse, *bias;
  const void *mask;
} bwd_bufs;

/* the max m and the sum l = sum_j exp(s_j - m) of row (z, h, i)'s logits over all its keys, each logit from a
 * dot product in the order of the logits above (scale q.k, the additive mask term, the bias; -inf where the
 * select mask leaves the key out): for the rows whose lse is too coarse to give P (l = 0 leaves lse in use) */
static void coarse_row(const fa_attn_geom *g, const bwd_bufs *b, int64_t z, int64_t h, int64_t i, float *m, float *l) {
  const int64_t kvh = h / (g->H / g->Hkv);
  const float *qi = b->q + fa_attn_zoff(g, &g->q, z) + h * g->q.h + i * g->q.r;
  const float *kz = b->k + fa_attn_zoff(g, &g->k, z) + kvh * g->k.h;
  const float *bi = b->bias ? b->bias + fa_attn_zoff(g, &g->bias, z) + h * g->bias.h + i * g->bias.r : NULL;
  int64_t mo = b->mask ? fa_attn_zoff(g, &g->mask, z) + h * g->mask.h + i * g->mask.r : 0;
  float mx = -INFINITY, sum = 0;
  for (int pass = 0; pass < 2; pass++)
    for (int64_t j = 0; j < g->Lk; j++) {
      float x = (float)g->scale * dot(qi, kz + j * g->k.r, g->D);
      if (g->mask_mode == 2) x += (float)g->mask_scale * (((const float *)b->mask)[mo + j * g->mask.c] - 1);
      if (bi) x += bi[j * g->bias.c];
      if (g->mask_mode == 1 && !((const uint8_t *)b->mask)[mo + j * g->mask.c]) x = -INFINITY;
      if (pass == 0) mx = x > mx ? x : mx;
      else sum += vexp_nonpos(splat(x - mx))[0];
    }
  if (mx == -INFINITY || !(sum > 0)) return;
  *m = mx;
  *l = sum;
}

/* one (z, kv head) problem. Scratch: S, dP (BM x BN), kT, vT (D x BN), tb, tm (BN), delta (G*Lq);
 * keep (BN doubles) apart. Per key block, per query head of the group and block of rows: S = scale Q K^T,
 * dP = dO V^T (GEMMs), then per row P, dS; then dV += P^T dO, dK += scale dS^T Q, dQ += scale dS K (GEMMs), all
 * in a fixed order. */
AI void bwd_problem(const fa_attn_geom *g, const bwd_bufs *b, float *gb, int64_t z, int64_t kvh, float *scr,
                    double *keep, prefetcher *pf) {
  const int64_t D = g->D, Lk = g->Lk, Lq = g->Lq, G = g->H / g->Hkv;
  float *S = scr, *dP = S + BM * BN, *kT = dP + BM * BN, *vT = kT + D * BN;
  float *delta = vT + D * BN + 2 * BN, *rm = delta + G * Lq, *rl = rm + G * Lq;
  row_tmp tmp = {vT + D * BN, (int32_t *)(vT + D * BN + BN), NULL};
  const float *kz = b->k + fa_attn_zoff(g, &g->k, z) + kvh * g->k.h, *vz = b->v + fa_attn_zoff(g, &g->v, z) + kvh * g->v.h;
  int64_t qz = fa_attn_zoff(g, &g->q, z), goz = fa_attn_zoff(g, &g->go, z), oz = fa_attn_zoff(g, &g->o, z);
  int64_t lz = fa_attn_zoff(g, &g->lse, z);
  int64_t bz = b->bias ? fa_attn_zoff(g, &g->bias, z) : 0, mz = b->mask ? fa_attn_zoff(g, &g->mask, z) : 0;
  int64_t gqz = b->gq ? fa_attn_zoff(g, &g->gq, z) : 0, gbz = gb ? fa_attn_zoff(g, &g->gbias, z) : 0;
  for (int64_t gi = 0; gi < G; gi++) {
    int64_t h = kvh * G + gi;
    const float *gor = b->go + goz + h * g->go.h, *orow = b->o + oz + h * g->o.h;
    for (int64_t i = 0; i < Lq; i++) {
      if (i + 8 < Lq) { /* strided rows: the hardware prefetcher lags */
        __builtin_prefetch(gor + (i + 8) * g->go.r);
        __builtin_prefetch(orow + (i + 8) * g->o.r);
        __builtin_prefetch(gor + (i + 8) * g->go.r + D - 1);
        __builtin_prefetch(orow + (i + 8) * g->o.r + D - 1);
      }
      delta[gi * Lq + i] = dot(gor + i * g->go.r, orow + i * g->o.r, D);
      float L = b->lse[lz + h * g->lse.h + i * g->lse.r];
      rl[gi * Lq + i] = 0;
      if (Lk > BN && fabsf(L) >= 1024.f && L != INFINITY) /* see coarse_row */
        coarse_row(g, b, z, h, i, &rm[gi * Lq + i], &rl[gi * Lq + i]);
      if (b->gq && Lk == 0) {
        float *dq = b->gq + gqz + h * g->gq.h + i * g->gq.r;
        for (int64_t d = 0; d < D; d++) dq[d] = 0;
      }
    }
  }
  for (int64_t j0 = 0; j0 < Lk; j0 += BN) {
    int64_t n = Lk - j0 < BN ? Lk - j0 : BN, nw = (n + W - 1) / W * W;
    const float *kb = kz + j0 * g->k.r, *vb = vz + j0 * g->v.r;
    /* grad_k and grad_v rows j0..j0+n, written by the first product (beta 0), then added into */
    float *gkb = b->gk ? b->gk + fa_attn_zoff(g, &g->gk, z) + kvh * g->gk.h + j0 * g->gk.r : NULL;
    float *gvb = b->gv ? b->gv + fa_attn_zoff(g, &g->gv, z) + kvh * g->gv.h + j0 * g->gv.r : NULL;
    if (G * Lq == 0)
      for (int64_t c = 0; c < n; c++)
        for (int64_t d = 0; d < D; d++) {
          if (gkb) gkb[c * g->gk.r + d] = 0;
          if (gvb) gvb[c * g->gv.r + d] = 0;
        }
    if (D > 0) {
      cblas_somatcopy(CblasRowMajor, CblasTrans, (int)n, (int)D, 1.0f, kb, (int)ld(g->k.r, D), kT, (int)n);
      cblas_somatcopy(CblasRowMajor, CblasTrans, (int)n, (int)D, 1.0f, vb, (int)ld(g->v.r, D), vT, (int)n);
    }
    for (int64_t gi = 0; gi < G; gi++) {
      int64_t h = kvh * G + gi;
      for (int64_t i0 = 0; i0 < Lq; i0 += BM) {
        int64_t nr = Lq - i0 < BM ? Lq - i0 : BM;
        const float *qb = b->q + qz + h * g->q.h + i0 * g->q.r, *gob = b->go + goz + h * g->go.h + i0 * g->go.r;
        fa_cpu_gemm(0, 0, 0, nr, n, D, g->scale, qb, ld(g->q.r, D), kT, n, 0, S, BN);
        fa_cpu_gemm(0, 0, 0, nr, n, D, 1, gob, ld(g->go.r, D), vT, n, 0, dP, BN);
        for (int64_t r = 0; r < nr; r++) {
          int64_t i = i0 + r;
          float *st = S + r * BN, *dpt = dP + r * BN;
          pf_step(pf);
          float L = b->lse[lz + h * g->lse.h + i * g->lse.r];
          if (L == -INFINITY) { /* every key left out: P = 1/Lk (for dV), dS = 0 */
            float p = 1 / (float)Lk;
            for (int64_t c = 0; c < n; c++) { st[c] = p; dpt[c] = 0; }
            continue;
          }
          row_src src = row_sources(g, b->bias, b->mask, bz + h * g->bias.h + i * g->bias.r,
                                    mz + h * g->mask.h + i * g->mask.r, j0, n, nw, &tmp);
          float mx = logits(g, st, n, nw, src, -INFINITY);
          /* P = exp(S - lse), or, where lse is too coarse (|lse| >= 1024: an additive mask of -1e9 on every key
           * of the row, whose float32 lse is a multiple of 64), exp(S - m) / l from the row's own max and sum, as
           * the forward had them: from this block when it holds the whole row, else from coarse_row */
          vf vl = splat(L), vd = splat(delta[gi * Lq + i]), vs = splat(1);
          if (n == Lk && fabsf(L) >= 1024.f && mx != -INFINITY) {
            vf sum = splat(0);
            vl = splat(mx);
            for (int64_t c = 0; c < nw; c += W) sum += vexp_nonpos(ldv(st + c) - vl);
            vs = splat(1 / hsum(sum));
          } else if (rl[gi * Lq + i] > 0) {
            vl = splat(rm[gi * Lq + i]);
            vs = splat(1 / rl[gi * Lq + i]);
          }
          if (g->dropout > 0) {
            fa_attn_keep(g, (((uint64_t)z * g->H + h) * Lq + i) * Lk + j0, n, keep);
            for (int64_t c = 0; c < nw; c += W) {
              vf p = vexp_nonpos(ldv(st + c) - vl) * vs, f;
              for (int t = 0; t < W; t++) f[t] = c + t < n ? (float)keep[c + t] : 0;
              stv(dpt + c, p * (ldv(dpt + c) * f - vd)); /* dS */
              stv(st + c, p * f);                        /* the weights after dropout, for dV */
            }
          } else {
            for (int64_t c = 0; c < nw; c += W) {
              vf p = vexp_nonpos(ldv(st + c) - vl) * vs;
              stv(st + c, p);
              stv(dpt + c, p * (ldv(dpt + c) - vd));
            }
          }
          if (gb) {
            int64_t bc = g->gbias.c;
            float *gr = gb + gbz + h * g->gbias.h + i * g->gbias.r + j0 * bc;
            if (bc == 1) for (int64_t c = 0; c < n; c++) gr[c] += dpt[c];
            else for (int64_t c = 0; c < n; c++) gr[c * bc] += dpt[c];
          }
        }
        double beta = gi == 0 && i0 == 0 ? 0 : 1;
        if (gvb) fa_cpu_gemm(0, 1, 0, n, D, nr, 1, S, BN, gob, ld(g->go.r, D), beta, gvb, ld(g->gv.r, D));
        if (gkb) fa_cpu_gemm(0, 1, 0, n, D, nr, g->scale, dP, BN, qb, ld(g->q.r, D), beta, gkb, ld(g->gk.r, D));
        if (b->gq)
          fa_cpu_gemm(0, 0, 0, nr, D, n, g->scale, dP, BN, kb, ld(g->k.r, D), j0 == 0 ? 0 : 1,
                      b->gq + gqz + h * g->gq.h + i0 * g->gq.r, ld(g->gq.r, D));
      }
    }
  }
}

ATTN_CLONES static void bwd_task(const fa_attn_geom *g, const bwd_bufs *b, const attn_plan *p, int64_t t, float *gb,
                                   float *scr, double *keep) {
  int64_t o = t / p->chunks, c = t % p->chunks, in0 = c * p->chunk_len;
  int64_t in1 = in0 + p->chunk_len < p->n_inner ? in0 + p->chunk_len : p->n_inner;
  for (int64_t in = in0; in < in1; in++) {
    int64_t z, kvh;
    plan_problem(p, o, in, &z, &kvh);
    prefetcher pf = {0};
    pf.D = g->D;
    /* the next problem's rows (its first query head's): this task's next, or the next task's first (this thread's
     * next, usually) */
    int64_t o1 = o, in_1 = in + 1;
    if (in_1 >= in1 && t + 1 < p->n_owned * p->chunks) {
      o1 = (t + 1) / p->chunks;
      in_1 = ((t + 1) % p->chunks) * p->chunk_len;
    }
    if (in_1 < p->n_inner) {
      int64_t z1, kvh1, h1;
      plan_problem(p, o1, in_1, &z1, &kvh1);
      h1 = kvh1 * (g->H / g->Hkv);
      pf_add(&pf, b->k + fa_attn_zoff(g, &g->k, z1) + kvh1 * g->k.h, g->Lk, BN, g->k.r, 0);
      pf_add(&pf, b->v + fa_attn_zoff(g, &g->v, z1) + kvh1 * g->v.h, g->Lk, BN, g->v.r, 0);
      pf_add(&pf, b->q + fa_attn_zoff(g, &g->q, z1) + h1 * g->q.h, g->Lq, BM, g->q.r, 0);
      pf_add(&pf, b->go + fa_attn_zoff(g, &g->go, z1) + h1 * g->go.h, g->Lq, BM, g->go.r, 0);
      pf_add(&pf, b->o + fa_attn_zoff(g, &g->o, z1) + h1 * g->o.h, g->Lq, BM, g->o.r, 0);
      if (b->gq) pf_add(&pf, b->gq + fa_attn_zoff(g, &g->gq, z1) + h1 * g->gq.h, g->Lq, BM, g->gq.r, 1);
      if (b->gk) pf_add(&pf, b->gk + fa_attn_zoff(g, &g->gk, z1) + kvh1 * g->gk.h, g->Lk, BN, g->gk.r, 1);
      if (b->gv) pf_add(&pf, b->gv + fa_attn_zoff(g, &g->gv, z1) + kvh1 * g->gv.h, g->Lk, BN, g->gv.r, 1);
    }
    bwd_problem(g, b, gb, z, kvh, scr, keep, &pf);
  }
}

int fa_attn_cpu_backward(const fa_attn_geom *g, void *gq, void *gk, void *gv, void *gb, const void *go, const void *q,
                         const void *k, const void *v, const void *o, const void *lse, const void *bias,
                         const void *mask) {
  bwd_bufs b = {(float *)gq, (float *)gk, (float *)gv, (float *)gb, (const float *)go, (const float *)q,
                (const float *)k, (const float *)v, (const float *)o, (const float *)lse, (const float *)bias, mask};
  if (g->Z * g->Hkv == 0) return 0;
  /* grad_bias elements: the span of the dense buffer */
  int64_t gbn = 1;
  if (gb && g->Lq > 0 && g->Lk > 0) {
    int64_t last = 0;
    for (int d = 0; d < g->nb; d++) last += (g->bs[d] - 1) * g->gbias.b[d];
    last += (g->H - 1) * g->gbias.h + (g->Lq - 1) * g->gbias.r + (g->Lk - 1) * g->gbias.c;
    gbn = last + 1;
  }
  attn_plan p;
  make_plan(g, gb != NULL, gbn, &p);
  int64_t tasks = p.n_owned * p.chunks, G = g->H / g->Hkv;
  int64_t per = 2 * BM * BN + 2 * BN * g->D + 2 * BN + 3 * G * g->Lq + 16; /* floats */
  per = (per * (int64_t)sizeof(float) + BN * 8 + 63) / 64 * 64;
  int par = (double)g->Z * g->H * g->Lq * (g->Lk + 1) * (g->D + 1) > FA_PARALLEL_GRAIN && tasks > 1;
  int threads = par ? fa_max_threads() : 1;
  int partial = gb && p.chunks > 1;
  char *scr = (char *)fa_alloc(FA_CPU, per * threads);
  float *parts = partial ? (float *)fa_alloc(FA_CPU, (int64_t)sizeof(float) * gbn * p.chunks) : NULL;
  if (!scr || (partial && !parts)) {
    fa_free(FA_CPU, scr);
    fa_free(FA_CPU, parts);
    return FA_ERR_MEMORY;
  }
  if (partial) memset(parts, 0, sizeof(float) * gbn * p.chunks);
  fa_blas_single_thread();
#pragma omp parallel for schedule(dynamic, 1) if (par)
  for (int64_t t = 0; t < tasks; t++) {
    char *mine = scr + per * fa_thread_id();
    float *dst = partial ? parts + (t % p.chunks) * gbn : (float *)gb;
    bwd_task(g, &b, &p, t, dst, (float *)(mine + BN * 8), (double *)mine);
  }
  if (partial) {
    float *out = (float *)gb;
#pragma omp parallel for schedule(static) if (par)
    for (int64_t e = 0; e < gbn; e++) {
      float s = 0;
      for (int64_t c = 0; c < p.chunks; c++) s += parts[c * gbn + e];
      out[e] = s;
    }
  }
  fa_free(FA_CPU, parts);
  fa_free(FA_CPU, scr);
  return 0;
}
