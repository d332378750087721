/* cpb_cpu.c: the CPU kernels of the continuous position bias MLP (c/cpb.h), float32 and float64 (this file
 * includes itself once per type, CPB_REAL). Never the (pairs x C) activations of the whole problem: a tile of
 * pairs (a few query rows x a block of keys of one p) goes through the MLP in scratch memory that stays in cache:
 *   f, df (T x 2) -> h1 = relu(f w1^T + b1) (T x C, vector loop) -> z2 = h1 w2^T (T x C x C, single-threaded
 *   BLAS) -> out = w3 relu(z2 + b2) + b3 (vector loop, written straight into out)
 * Backward, per tile, after recomputing h1 and h2: gw3 += g^T h2, gz2 = (g w3) * [h2 > 0], gw2 += gz2^T h1
 * (BLAS), gh1 = gz2 w2 (BLAS), gz1 = gh1 * [h1 > 0], gw1 += gz1^T f, gf = gz1 w1, gd = gf * df, and
 * grad_kpos[p, j] -= sum_i gd.
 * Determinism: the backward's work is cut into units (p, key block, query split) and tasks (ranges of units),
 * both from the shapes only. A task adds its weight gradients into its own partial, a unit writes its keys'
 * position gradients into its split's partial; both are summed in a fixed order after the parallel loop. */
#ifndef CPB_REAL
#pragma GCC optimize("no-trapping-math")
#include "internal.h"
#include "cpb.h"

/* c/matmul.c: single-threaded BLAS (row-major C = alpha op(A) op(B) + beta C), deterministic for given shapes */
void fa_blas_single_thread(void);
void fa_cpu_gemm(int dbl, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
                 const void *b, int64_t ldb, double beta, void *c, int64_t ldc);

enum {
  TMAX = 512,    /* pairs per tile (OpenBLAS runs T x 128 x 128 at 55 GFLOP/s for T = 128, 130 for T = 512) */
  KB = 128,      /* keys per block */
  TASKS = 48     /* backward tasks at most (each holds a partial of the weight gradients) */
};

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__GLIBC__)
#define CPB_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CPB_CLONES FA_HOT_CLONES
#endif

/* the tiling, from the shapes: key blocks of kb keys, query tiles of ti rows, the backward's query splits */
typedef struct {
  int64_t kb, nkb, ti, nqt; /* keys per block, blocks; query rows per tile, tiles */
  int64_t S, qps;           /* backward: query splits, tiles per split */
  int64_t units, tasks, upt; /* backward: units (p, key block, split), tasks, units per task */
} cpb_tiling;

static void make_tiling(const fa_cpb_geom *g, cpb_tiling *t) {
  t->kb = g->M < KB ? (g->M > 0 ? g->M : 1) : KB;
  t->nkb = (g->M + t->kb - 1) / t->kb;
  t->ti = TMAX / t->kb;
  t->nqt = (g->N + t->ti - 1) / t->ti;
  int64_t pk = g->P * t->nkb;
  t->S = pk >= 32 || pk == 0 ? 1 : (32 + pk - 1) / pk;
  if (t->S > t->nqt) t->S = t->nqt > 0 ? t->nqt : 1;
  t->qps = (t->nqt + t->S - 1) / t->S;
  t->S = t->nqt > 0 ? (t->nqt + t->qps - 1) / t->qps : 1;
  t->units = pk * t->S;
  t->tasks = t->units < TASKS ? t->units : TASKS;
  t->upt = t->tasks > 0 ? (t->units + t->tasks - 1) / t->tasks : 0;
  t->tasks = t->upt > 0 ? (t->units + t->upt - 1) / t->upt : 0;
}

#define CPB_CAT2(a, b) a##_##b
#define CPB_CAT(a, b) CPB_CAT2(a, b)
#define F(name) CPB_CAT(name, CPB_SUF)

#define CPB_REAL float
#define CPB_SUF f32
#define CPB_DBL 0
#define CPB_LOG1P log1pf
#include "cpb_cpu.c"
#undef CPB_REAL
#undef CPB_SUF
#undef CPB_DBL
#undef CPB_LOG1P
#define CPB_REAL double
#define CPB_SUF f64
#define CPB_DBL 1
#define CPB_LOG1P log1p
#include "cpb_cpu.c"

int fa_cpb_cpu_forward(const fa_cpb_geom *g, void *out, const fa_cpb_in *in) {
  return g->dtype == FA_FLOAT64 ? forward_f64(g, out, in) : forward_f32(g, out, in);
}
int fa_cpb_cpu_backward(const fa_cpb_geom *g, const fa_cpb_grads *gr, const void *grad_bias, const fa_cpb_in *in) {
  return g->dtype == FA_FLOAT64 ? backward_f64(g, gr, grad_bias, in) : backward_f32(g, gr, grad_bias, in);
}

#else /* ------------------------------------------------------------------ the kernels for one CPB_REAL */
typedef CPB_REAL F(real);
#define R F(real)

/* the weights as the kernels read them: w1 split into its two columns */
typedef struct {
  const R *w1x, *w1y, *b1, *w2, *w2t, *b2, *w3, *b3; /* w2t = w2^T: h1 w2^T as an NN product (faster) */
} F(weights);

/* f and (when df) the derivative factor of the tile's pairs: rows i0 .. i0+ni of qpos, keys j0 .. j0+nj of kp
 * (pair t = ii * nj + jj) */
static void F(features)(const R *qpos, const R *kp, int64_t i0, int64_t ni, int64_t j0, int64_t nj, R *f, R *df) {
  for (int64_t ii = 0; ii < ni; ii++)
    for (int64_t jj = 0; jj < nj; jj++) {
      int64_t t = ii * nj + jj;
      for (int k = 0; k < 2; k++) {
        R d = qpos[(i0 + ii) * 2 + k] - kp[(j0 + jj) * 2 + k], a = d < 0 ? -d : d, l = CPB_LOG1P(a);
        f[t * 2 + k] = d > 0 ? l : d < 0 ? -l : 0;
        if (df) df[t * 2 + k] = d != 0 ? 1 / (a + 1) : 0;
      }
    }
}

/* h1 = relu(w1 f + b1), T x C */
CPB_CLONES static void F(layer1)(const F(weights) *w, const R *f, int64_t T, int64_t C, R *h1) {
  for (int64_t t = 0; t < T; t++) {
    R f0 = f[2 * t], f1 = f[2 * t + 1], *h = h1 + t * C;
    for (int64_t c = 0; c < C; c++) {
      R z = w->w1x[c] * f0 + w->w1y[c] * f1 + w->b1[c];
      h[c] = z > 0 ? z : 0;
    }
  }
}

/* h2 = relu(z2 + b2) in place; out[o * os + t'] = w3[o] . h2 + b3[o] for the tile's pairs (t' = ii * ldo + jj) */
CPB_CLONES static void F(layer3)(const F(weights) *w, R *z2, int64_t ni, int64_t nj, int64_t C, int64_t O, R *out,
                                 int64_t ldo, int64_t os) {
  for (int64_t ii = 0; ii < ni; ii++)
    for (int64_t jj = 0; jj < nj; jj++) {
      R *h = z2 + (ii * nj + jj) * C;
      for (int64_t c = 0; c < C; c++) {
        R z = h[c] + w->b2[c];
        h[c] = z > 0 ? z : 0;
      }
      for (int64_t o = 0; o < O; o++) {
        const R *w3 = w->w3 + o * C;
        R s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < C; c++) s += w3[c] * h[c];
        out[o * os + ii * ldo + jj] = s + w->b3[o];
      }
    }
}

/* a tile's MLP, f given: h1 (T x C), then h2 (T x C) and the results into out (as layer3) */
static void F(mlp)(const fa_cpb_geom *g, const F(weights) *w, const R *f, int64_t ni, int64_t nj, R *h1, R *h2, R *out,
                   int64_t ldo, int64_t os) {
  int64_t T = ni * nj, C = g->C;
  F(layer1)(w, f, T, C, h1);
  fa_cpu_gemm(CPB_DBL, 0, 0, T, C, C, 1.0, h1, C, w->w2t, C, 0.0, h2, C);
  F(layer3)(w, h2, ni, nj, C, g->O, out, ldo, os);
}

/* the first (C x 2) weights split into columns and w2 transposed, in buf (2C + C*C) */
static void F(split_w1)(const fa_cpb_geom *g, const fa_cpb_in *in, R *buf, F(weights) *w) {
  const R *w1 = (const R *)in->w1;
  for (int64_t c = 0; c < g->C; c++) { buf[c] = w1[2 * c]; buf[g->C + c] = w1[2 * c + 1]; }
  w->w1x = buf;
  w->w1y = buf + g->C;
  w->b1 = (const R *)in->b1;
  w->w2 = (const R *)in->w2;
  R *t2 = buf + 2 * g->C;
  for (int64_t a = 0; a < g->C; a++)
    for (int64_t b = 0; b < g->C; b++) t2[b * g->C + a] = w->w2[a * g->C + b];
  w->w2t = t2;
  w->b2 = (const R *)in->b2;
  w->w3 = (const R *)in->w3;
  w->b3 = (const R *)in->b3;
}

static int F(forward)(const fa_cpb_geom *g, void *outv, const fa_cpb_in *in) {
  cpb_tiling tl;
  make_tiling(g, &tl);
  int64_t C = g->C, tiles = g->P * tl.nkb * tl.nqt;
  int64_t per = (2 * TMAX + 2 * TMAX * C + 16) * (int64_t)sizeof(R); /* f, h1, h2 */
  per = (per + 63) / 64 * 64;
  int par = (double)g->P * g->N * g->M * (C * C + 2 * C + 1) > FA_PARALLEL_GRAIN && tiles > 1;
  int threads = par ? fa_max_threads() : 1;
  char *scr = (char *)fa_alloc(FA_CPU, per * threads + (C * C + 2 * C + 1) * (int64_t)sizeof(R));
  if (!scr) return FA_ERR_MEMORY;
  F(weights) w;
  F(split_w1)(g, in, (R *)(scr + per * threads), &w);
  const R *qpos = (const R *)in->qpos, *kpos = (const R *)in->kpos;
  R *out = (R *)outv;
  fa_blas_single_thread();
#pragma omp parallel for schedule(dynamic, 1) if (par)
  for (int64_t t = 0; t < tiles; t++) {
    R *f = (R *)(scr + per * fa_thread_id()), *h1 = f + 2 * TMAX, *h2 = h1 + TMAX * C;
    int64_t p = t / (tl.nkb * tl.nqt), kb = t / tl.nqt % tl.nkb, qt = t % tl.nqt;
    int64_t j0 = kb * tl.kb, nj = g->M - j0 < tl.kb ? g->M - j0 : tl.kb;
    int64_t i0 = qt * tl.ti, ni = g->N - i0 < tl.ti ? g->N - i0 : tl.ti;
    F(features)(qpos, kpos + p * g->M * 2, i0, ni, j0, nj, f, NULL);
    F(mlp)(g, &w, f, ni, nj, h1, h2, out + (p * g->O * g->N + i0) * g->M + j0, g->M, g->N * g->M);
  }
  fa_free(FA_CPU, scr);
  return 0;
}

/* the weight gradients' partial of a task: gw1x, gw1y, gb1, gb2 (C each), gw2 (C x C), gw3 (O x C), gb3 (O) */
static int64_t F(wlen)(const fa_cpb_geom *g) { return 4 * g->C + g->C * g->C + g->O * g->C + g->O; }

/* the backward of one tile after the MLP's recompute: g (T x O), h1, h2 (T x C); adds into the task's partial
 * wp, and gd (T x 2) = the gradient of d. gz2 (T x C) and gh1 (T x C): scratch */
CPB_CLONES static void F(tile_back_a)(const F(weights) *w, int64_t T, int64_t C, int64_t O, const R *gt, const R *h2,
                                      R *gz2, R *wp) {
  R *gb2 = wp + 3 * C, *gw3 = wp + 4 * C + C * C, *gb3 = gw3 + O * C;
  for (int64_t t = 0; t < T; t++) {
    const R *h = h2 + t * C, *gg = gt + t * O;
    R *gz = gz2 + t * C;
    for (int64_t c = 0; c < C; c++) gz[c] = 0;
    for (int64_t o = 0; o < O; o++) {
      R go = gg[o], *gw = gw3 + o * C;
      const R *w3 = w->w3 + o * C;
      gb3[o] += go;
      for (int64_t c = 0; c < C; c++) {
        gw[c] += go * h[c];
        gz[c] += go * w3[c];
      }
    }
    for (int64_t c = 0; c < C; c++) {
      gz[c] = h[c] > 0 ? gz[c] : 0;
      gb2[c] += gz[c];
    }
  }
}

CPB_CLONES static void F(tile_back_b)(const F(weights) *w, int64_t T, int64_t C, const R *f, const R *df, const R *h1,
                                      const R *gh1, R *gd, R *wp) {
  R *gw1x = wp, *gw1y = wp + C, *gb1 = wp + 2 * C;
  for (int64_t t = 0; t < T; t++) {
    const R *h = h1 + t * C, *gh = gh1 + t * C;
    R f0 = f[2 * t], f1 = f[2 * t + 1], s0 = 0, s1 = 0;
#pragma omp simd reduction(+ : s0, s1)
    for (int64_t c = 0; c < C; c++) {
      R gz = h[c] > 0 ? gh[c] : 0;
      gb1[c] += gz;
      gw1x[c] += gz * f0;
      gw1y[c] += gz * f1;
      s0 += gz * w->w1x[c];
      s1 += gz * w->w1y[c];
    }
    gd[2 * t] = s0 * df[2 * t];
    gd[2 * t + 1] = s1 * df[2 * t + 1];
  }
}

static int F(backward)(const fa_cpb_geom *g, const fa_cpb_grads *gr, const void *grad_bias, const fa_cpb_in *in) {
  cpb_tiling tl;
  make_tiling(g, &tl);
  int64_t C = g->C, O = g->O, WL = F(wlen)(g), KL = g->P * g->M * 2;
  int64_t per = (6 * TMAX + 3 * TMAX * C + TMAX * O + 2 * tl.kb + 16) * (int64_t)sizeof(R); /* f df gd, h1 h2 gz, g */
  per = (per + 63) / 64 * 64;
  int par = (double)g->P * g->N * g->M * (C * C + 2 * C + 1) > FA_PARALLEL_GRAIN && tl.tasks > 1;
  int threads = par ? fa_max_threads() : 1;
  int want_k = gr->kpos != NULL, split = want_k && tl.S > 1;
  /* scratch per thread, the tasks' weight partials, the splits' kpos partials, w1's columns */
  int64_t nR = WL * (tl.tasks > 0 ? tl.tasks : 1) + (split ? tl.S * KL : 0) + C * C + 2 * C + 1;
  char *scr = (char *)fa_alloc(FA_CPU, per * threads + nR * (int64_t)sizeof(R));
  if (!scr) return FA_ERR_MEMORY;
  R *wparts = (R *)(scr + per * threads), *kparts = wparts + WL * (tl.tasks > 0 ? tl.tasks : 1);
  R *w1buf = kparts + (split ? tl.S * KL : 0);
  F(weights) w;
  F(split_w1)(g, in, w1buf, &w);
  memset(wparts, 0, sizeof(R) * WL * (tl.tasks > 0 ? tl.tasks : 1));
  const R *qpos = (const R *)in->qpos, *kpos = (const R *)in->kpos, *gb = (const R *)grad_bias;
  R *gkpos = split ? kparts : (R *)gr->kpos;
  if (want_k && !split && KL > 0 && g->N == 0) memset(gkpos, 0, sizeof(R) * KL);
  fa_blas_single_thread();
#pragma omp parallel for schedule(dynamic, 1) if (par)
  for (int64_t task = 0; task < tl.tasks; task++) {
    R *f = (R *)(scr + per * fa_thread_id()), *df = f + 2 * TMAX, *gd = df + 2 * TMAX, *h1 = gd + 2 * TMAX;
    R *h2 = h1 + TMAX * C, *gz = h2 + TMAX * C, *gt = gz + TMAX * C, *kacc = gt + TMAX * O;
    R *wp = wparts + task * WL;
    int64_t u1 = (task + 1) * tl.upt < tl.units ? (task + 1) * tl.upt : tl.units;
    for (int64_t u = task * tl.upt; u < u1; u++) {
      int64_t p = u / (tl.nkb * tl.S), kb = u / tl.S % tl.nkb, s = u % tl.S;
      int64_t j0 = kb * tl.kb, nj = g->M - j0 < tl.kb ? g->M - j0 : tl.kb;
      int64_t q1 = (s + 1) * tl.qps < tl.nqt ? (s + 1) * tl.qps : tl.nqt;
      const R *kp = kpos + p * g->M * 2;
      for (int64_t j = 0; j < 2 * nj; j++) kacc[j] = 0;
      for (int64_t qt = s * tl.qps; qt < q1; qt++) {
        int64_t i0 = qt * tl.ti, ni = g->N - i0 < tl.ti ? g->N - i0 : tl.ti, T = ni * nj;
        F(features)(qpos, kp, i0, ni, j0, nj, f, df);
        F(layer1)(&w, f, T, C, h1);
        fa_cpu_gemm(CPB_DBL, 0, 0, T, C, C, 1.0, h1, C, w.w2t, C, 0.0, h2, C);
        for (int64_t t = 0; t < T; t++) {
          R *h = h2 + t * C;
          for (int64_t c = 0; c < C; c++) { R z = h[c] + w.b2[c]; h[c] = z > 0 ? z : 0; }
          for (int64_t o = 0; o < O; o++) gt[t * O + o] = gb[((p * O + o) * g->N + i0 + t / nj) * g->M + j0 + t % nj];
        }
        F(tile_back_a)(&w, T, C, O, gt, h2, gz, wp);
        /* gw2 += gz2^T h1; gh1 = gz2 w2 (into h2, no longer needed) */
        fa_cpu_gemm(CPB_DBL, 1, 0, C, C, T, 1.0, gz, C, h1, C, 1.0, wp + 4 * C, C);
        fa_cpu_gemm(CPB_DBL, 0, 0, T, C, C, 1.0, gz, C, w.w2, C, 0.0, h2, C);
        F(tile_back_b)(&w, T, C, f, df, h1, h2, gd, wp);
        for (int64_t t = 0; t < T; t++) {
          kacc[2 * (t % nj)] -= gd[2 * t];
          kacc[2 * (t % nj) + 1] -= gd[2 * t + 1];
        }
      }
      if (want_k) {
        R *dst = gkpos + (split ? s * KL : 0) + (p * g->M + j0) * 2;
        for (int64_t j = 0; j < 2 * nj; j++) dst[j] = kacc[j];
      }
    }
  }
  /* the fixed-order sums: kpos over the splits, the weights over the tasks */
  if (split) {
    R *dst = (R *)gr->kpos;
    for (int64_t e = 0; e < KL; e++) {
      R s = 0;
      for (int64_t k = 0; k < tl.S; k++) s += kparts[k * KL + e];
      dst[e] = s;
    }
  }
  for (int64_t task = 1; task < tl.tasks; task++)
    for (int64_t e = 0; e < WL; e++) wparts[e] += wparts[task * WL + e];
  const R *wp = wparts;
  if (gr->w1)
    for (int64_t c = 0; c < C; c++) { ((R *)gr->w1)[2 * c] = wp[c]; ((R *)gr->w1)[2 * c + 1] = wp[C + c]; }
  if (gr->b1) memcpy(gr->b1, wp + 2 * C, sizeof(R) * C);
  if (gr->b2) memcpy(gr->b2, wp + 3 * C, sizeof(R) * C);
  if (gr->w2) memcpy(gr->w2, wp + 4 * C, sizeof(R) * C * C);
  if (gr->w3) memcpy(gr->w3, wp + 4 * C + C * C, sizeof(R) * O * C);
  if (gr->b3) memcpy(gr->b3, wp + 4 * C + C * C + O * C, sizeof(R) * O);
  fa_free(FA_CPU, scr);
  return 0;
}
#undef R
#endif
