// attention.cu: the shared attention core on the GPU (fa.attention, triangle attention by strides).
//
// c/attention.c has validated everything and hands over a fa_attn_geom (c/attention.h) with strided operands;
// this file plans the launches (plan) and checks the device's limits only. Kernel families (g->kernel forces
// one; FA_ERR_UNSUPPORTED when the forced one cannot serve the problem):
//
// SIMT (every dtype, D <= 256, exact float32; float32 arithmetic throughout). Launches of 128 threads, 4 warps.
//   rows_kernel<FWD>: a CTA takes 16 query rows of one (z, h) (4 per warp) and walks the keys in tiles of 32
//     through shared memory (float, odd row pitch so that lane j reading key j's column is conflict-free); lane
//     j scores key j against the warp's 4 rows, the online softmax (exp2 domain, scale*log2e folded) keeps
//     (max, per-lane partial sum), and the lanes then own output columns d = lane + 32t, taking p_j by shuffle.
//     The plain sum of V rides along for rows whose keys are all left out (out = mean V, lse = -inf).
//   Backward: delta_kernel (rowsum(dO * O), float32, a warp per row); rows_kernel<BWD> recomputes P from the
//     saved lse and writes dQ = scale * dS K directly (query-major: no atomics); dkdv_kernel takes 16 keys of
//     one (z, kv head) (4 per warp, dK/dV in registers) and loops over the G query heads and every query row in
//     tiles of 32 (lane = query row for the scores, then lane = column for the sums): dK, dV written once;
//     dbias_kernel owns a 32x32 tile of the bias gradient's own elements and loops, in a fixed order, over
//     every (batch, head, row tile, key tile) that adds into it (the bias's broadcast dims), recomputing dS:
//     one writer per element, no atomics. The SIMT backward is deterministic in every mode.
#include "dense.cuh"
#include "attn.cuh"
#include <limits.h>

namespace {

constexpr int NW = 4, THREADS = 32 * NW;
constexpr int R = 4, ROWS = NW * R;  // rows_kernel: query rows per warp / per CTA
constexpr int BN = 32;               // keys per tile (one per lane)
constexpr int KPW = 4, BK = NW * KPW; // dkdv_kernel: keys per warp / per CTA
constexpr int RB = 8;                // dbias_kernel: rows per warp (32 per CTA)
constexpr unsigned FULL = 0xffffffffu;
constexpr int MAXO = FA_ATTN_MAX_BATCH + 1;  // dbias: the batch dims and the head

struct Params {
  fa_attn_geom g;
  int64_t G;                   // query heads per kv head
  float scale2;                // scale * log2 e
  float mscale2;               // mask_scale * log2 e (additive mask)
  float pdrop, rdrop;          // dropout p (0: none) and 1 / (1 - p)
  float invLk;                 // 1 / Lk (rows with every key left out)
  int ld;                      // row pitch (floats) of column-read tiles in shared memory: odd
  // dbias_kernel: the "outer" dims (batch dims 0..nb-1, then the head) split into the gradient's own (kept)
  // dims and its broadcast (reduced) ones; ri / rj: it broadcasts over the query rows / the keys
  int nkeep, nred, keep[MAXO], red[MAXO];
  int64_t osize[MAXO], ostride[MAXO], nkeep_all, nred_all;
  int ri, rj;
};

// log2-domain score of key j for a row whose bias / mask rows start at brow / mrow (NULL when absent);
// -inf = left out (select mask)
__device__ __forceinline__ float logit2(const Params &p, float dot, const float *brow, const void *mrow, int64_t j) {
  float x = dot * p.scale2;
  if (brow) x = fmaf(brow[j * p.g.bias.c], FA_ATTN_LOG2E, x);
  if (p.g.mask_mode == 1) {
    if (((const unsigned char *)mrow)[j * p.g.mask.c] == 0) x = -INFINITY;
  } else if (p.g.mask_mode == 2) {
    x = fmaf(p.mscale2, ((const float *)mrow)[j * p.g.mask.c] - 1.f, x);
  }
  return x;
}

// the dropout factor of weight e: 1/(1-p) or 0 (1 without dropout)
__device__ __forceinline__ float drop_factor(const Params &p, int64_t e) {
  if (p.pdrop <= 0.f) return 1.f;
  return fa_attn_keep(p.g.seed, p.g.offset, e, p.pdrop) ? p.rdrop : 0.f;
}

// a tile of n rows x D columns of a strided operand (row pitch rs, base pointer at the tile's first row) into
// shared memory as float with pitch pitch; rows >= valid are zeros
template <typename T>
__device__ __forceinline__ void load_tile(float *dst, int pitch, const T *src, int64_t rs, int n, int valid, int D) {
  for (int e = threadIdx.x; e < n * D; e += THREADS) {
    const int r = e / D, d = e - r * D;
    dst[r * pitch + d] = r < valid ? fa_to_f<T>(src[r * rs + d]) : 0.f;
  }
}

// ---------------------------------------------------------------------------------------------- SIMT kernels
// BWD = false: forward (dst = out, lse written). BWD = true: dQ (dst = grad_q) from go, lse and delta.
template <typename T, int DT, bool BWD>
__global__ void __launch_bounds__(THREADS) rows_kernel(Params p, T *dst, float *lse_out, const T *q, const T *k,
                                                       const T *v, const float *bias, const void *mask, const T *go,
                                                       const float *lse_in, const float *delta) {
  extern __shared__ float sm[];
  const fa_attn_geom &g = p.g;
  const int D = (int)g.D, ld = p.ld;
  float *Ks = sm, *Vs = Ks + BN * ld, *Qs = Vs + BN * ld, *Os = Qs + ROWS * D;
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t ntiles = (g.Lq + ROWS - 1) / ROWS;
  const int64_t zh = blockIdx.x / ntiles, row0 = (blockIdx.x % ntiles) * ROWS;
  const int64_t z = zh / g.H, h = zh % g.H, hk = h / p.G;
  const FaAttnBatch b = fa_attn_batch(g, z);
  const int nrow = (int)min((int64_t)ROWS, g.Lq - row0);
  load_tile<T>(Qs, D, q + fa_attn_off(g.q, b, h, row0), g.q.r, ROWS, nrow, D);
  if (BWD) load_tile<T>(Os, D, go + fa_attn_off(g.go, b, h, row0), g.go.r, ROWS, nrow, D);
  const T *kb = k + fa_attn_off(g.k, b, hk, 0), *vb = v + fa_attn_off(g.v, b, hk, 0);

  const float *brow[R];
  const void *mrow[R];
  bool rv[R];
  int64_t ebase[R];
  float m[R], l[R], L2[R], dl[R], acc[R][DT], sv[DT];
#pragma unroll
  for (int r = 0; r < R; r++) {
    const int64_t i = row0 + w * R + r;
    rv[r] = i < g.Lq;
    brow[r] = g.has_bias && rv[r] ? bias + fa_attn_off(g.bias, b, h, i) : nullptr;
    mrow[r] = g.mask_mode == 1 && rv[r]   ? (const void *)((const unsigned char *)mask + fa_attn_off(g.mask, b, h, i))
              : g.mask_mode == 2 && rv[r] ? (const void *)((const float *)mask + fa_attn_off(g.mask, b, h, i))
                                          : nullptr;
    ebase[r] = (zh * g.Lq + i) * g.Lk;
    m[r] = -INFINITY;
    l[r] = 0.f;
    L2[r] = BWD && rv[r] ? lse_in[fa_attn_off(g.lse, b, h, i)] * FA_ATTN_LOG2E : -INFINITY;
    dl[r] = BWD && rv[r] ? delta[zh * g.Lq + i] : 0.f;
#pragma unroll
    for (int t = 0; t < DT; t++) acc[r][t] = 0.f;
  }
#pragma unroll
  for (int t = 0; t < DT; t++) sv[t] = 0.f;

  for (int64_t j0 = 0; j0 < g.Lk; j0 += BN) {
    const int nk = (int)min((int64_t)BN, g.Lk - j0);
    __syncthreads();
    load_tile<T>(Ks, ld, kb + j0 * g.k.r, g.k.r, BN, nk, D);
    load_tile<T>(Vs, ld, vb + j0 * g.v.r, g.v.r, BN, nk, D);
    __syncthreads();
    float s[R], dp[R];
#pragma unroll
    for (int r = 0; r < R; r++) s[r] = dp[r] = 0.f;
    const float *kr = Ks + lane * ld, *vr = Vs + lane * ld, *qw = Qs + w * R * D, *ow = Os + w * R * D;
#pragma unroll 4
    for (int d = 0; d < D; d++) {
      const float kd = kr[d];
#pragma unroll
      for (int r = 0; r < R; r++) s[r] = fmaf(qw[r * D + d], kd, s[r]);
      if (BWD) {
        const float vd = vr[d];
#pragma unroll
        for (int r = 0; r < R; r++) dp[r] = fmaf(ow[r * D + d], vd, dp[r]);
      }
    }
    const int64_t j = j0 + lane;
    const bool kv = lane < nk;
    float pv[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
      const float x = kv && rv[r] ? logit2(p, s[r], brow[r], mrow[r], j) : -INFINITY;
      if (!BWD) {
        const float a = fa_attn_rescale(m[r], fa_cu_warp_max(x));
        l[r] *= a;
#pragma unroll
        for (int t = 0; t < DT; t++) acc[r][t] *= a;
        const float e = fa_attn_exp(x, m[r]);
        l[r] += e;
        pv[r] = e > 0.f ? e * drop_factor(p, ebase[r] + j) : 0.f;
      } else {
        float ds = 0.f;
        if (x != -INFINITY && L2[r] != -INFINITY) {
          const float e = exp2f(x - L2[r]);
          ds = e * (dp[r] * drop_factor(p, ebase[r] + j) - dl[r]);
        }
        pv[r] = ds;
      }
    }
    const float *src = BWD ? Ks : Vs;
    for (int jj = 0; jj < nk; jj++) {
      float col[DT];
#pragma unroll
      for (int t = 0; t < DT; t++) col[t] = lane + 32 * t < D ? src[jj * ld + lane + 32 * t] : 0.f;
#pragma unroll
      for (int r = 0; r < R; r++) {
        const float pj = __shfl_sync(FULL, pv[r], jj);
#pragma unroll
        for (int t = 0; t < DT; t++) acc[r][t] = fmaf(pj, col[t], acc[r][t]);
      }
      if (!BWD) {
#pragma unroll
        for (int t = 0; t < DT; t++) sv[t] += col[t];
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; r++) {
    const int64_t i = row0 + w * R + r;
    if (!rv[r]) continue;
    if (!BWD) {
      const float lsum = fa_cu_warp_sum(l[r]);
      if (lane == 0) lse_out[fa_attn_off(g.lse, b, h, i)] = fa_attn_lse(m[r], lsum);
      T *orow = dst + fa_attn_off(g.o, b, h, i);
      const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
#pragma unroll
      for (int t = 0; t < DT; t++) {
        const int d = lane + 32 * t;
        if (d < D) orow[d] = fa_from_f<T>(lsum > 0.f ? acc[r][t] * inv : sv[t] * p.invLk);
      }
    } else {
      T *grow = dst + fa_attn_off(g.gq, b, h, i);
      const float sc = (float)g.scale;
#pragma unroll
      for (int t = 0; t < DT; t++) {
        const int d = lane + 32 * t;
        if (d < D) grow[d] = fa_from_f<T>(acc[r][t] * sc);
      }
    }
  }
}

// delta[(z*H + h)*Lq + i] = rowsum(dO * O) in float32, a warp per row
template <typename T>
__global__ void __launch_bounds__(THREADS) delta_kernel(Params p, float *delta, const T *go, const T *o) {
  const fa_attn_geom &g = p.g;
  const int lane = threadIdx.x & 31;
  const int64_t rows = g.Z * g.H * g.Lq;
  for (int64_t r = (int64_t)blockIdx.x * NW + (threadIdx.x >> 5); r < rows; r += (int64_t)gridDim.x * NW) {
    const int64_t i = r % g.Lq, zh = r / g.Lq, z = zh / g.H, h = zh % g.H;
    const FaAttnBatch b = fa_attn_batch(g, z);
    const float s = fa_attn_rowdot<T>(go + fa_attn_off(g.go, b, h, i), o + fa_attn_off(g.o, b, h, i), g.D, lane);
    if (lane == 0) delta[r] = s;
  }
}

// dK, dV of BK keys of one (z, kv head), summed over the G query heads and every query row
template <typename T, int DT>
__global__ void __launch_bounds__(THREADS) dkdv_kernel(Params p, T *gk, T *gv, const T *q, const T *k, const T *v,
                                                       const float *bias, const void *mask, const T *go,
                                                       const float *lse, const float *delta) {
  extern __shared__ float sm[];
  const fa_attn_geom &g = p.g;
  const int D = (int)g.D, ld = p.ld;
  float *Ks = sm, *Vs = Ks + BK * D, *Qs = Vs + BK * D, *Os = Qs + 32 * ld;
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t ntiles = (g.Lk + BK - 1) / BK;
  const int64_t zk = blockIdx.x / ntiles, j0 = (blockIdx.x % ntiles) * BK;
  const int64_t z = zk / g.Hkv, hk = zk % g.Hkv;
  const FaAttnBatch b = fa_attn_batch(g, z);
  const int nk = (int)min((int64_t)BK, g.Lk - j0);
  load_tile<T>(Ks, D, k + fa_attn_off(g.k, b, hk, j0), g.k.r, BK, nk, D);
  load_tile<T>(Vs, D, v + fa_attn_off(g.v, b, hk, j0), g.v.r, BK, nk, D);
  float dk[KPW][DT], dv[KPW][DT];
#pragma unroll
  for (int c = 0; c < KPW; c++)
#pragma unroll
    for (int t = 0; t < DT; t++) dk[c][t] = dv[c][t] = 0.f;
  const float *kw = Ks + w * KPW * D, *vw = Vs + w * KPW * D;

  for (int64_t gh = 0; gh < p.G; gh++) {
    const int64_t h = hk * p.G + gh, zh = z * g.H + h;
    const T *qb = q + fa_attn_off(g.q, b, h, 0), *ob = go + fa_attn_off(g.go, b, h, 0);
    for (int64_t i0 = 0; i0 < g.Lq; i0 += 32) {
      const int nr = (int)min((int64_t)32, g.Lq - i0);
      __syncthreads();
      load_tile<T>(Qs, ld, qb + i0 * g.q.r, g.q.r, 32, nr, D);
      load_tile<T>(Os, ld, ob + i0 * g.go.r, g.go.r, 32, nr, D);
      __syncthreads();
      const int64_t i = i0 + lane;
      const bool rv = lane < nr;
      const float L2 = rv ? lse[fa_attn_off(g.lse, b, h, i)] * FA_ATTN_LOG2E : 0.f;
      const bool lost = rv && L2 == -INFINITY;  // every key left out: P = 1/Lk, dS = 0
      const float dl = rv ? delta[zh * g.Lq + i] : 0.f;
      const float *brow = g.has_bias && rv ? bias + fa_attn_off(g.bias, b, h, i) : nullptr;
      const void *mrow = g.mask_mode == 1 && rv ? (const void *)((const unsigned char *)mask + fa_attn_off(g.mask, b, h, i))
                         : g.mask_mode == 2 && rv ? (const void *)((const float *)mask + fa_attn_off(g.mask, b, h, i))
                                                  : nullptr;
      float s[KPW], dp[KPW];
#pragma unroll
      for (int c = 0; c < KPW; c++) s[c] = dp[c] = 0.f;
      const float *qr = Qs + lane * ld, *orr = Os + lane * ld;
#pragma unroll 4
      for (int d = 0; d < D; d++) {
        const float qd = qr[d], od = orr[d];
#pragma unroll
        for (int c = 0; c < KPW; c++) {
          s[c] = fmaf(qd, kw[c * D + d], s[c]);
          dp[c] = fmaf(od, vw[c * D + d], dp[c]);
        }
      }
      float pv[KPW], ds[KPW];
#pragma unroll
      for (int c = 0; c < KPW; c++) {
        const int64_t j = j0 + w * KPW + c;
        pv[c] = ds[c] = 0.f;
        if (rv && j < g.Lk) {
          if (lost) {
            pv[c] = p.invLk;
          } else {
            const float x = logit2(p, s[c], brow, mrow, j);
            if (x != -INFINITY) {
              const float e = exp2f(x - L2), f = drop_factor(p, (zh * g.Lq + i) * g.Lk + j);
              pv[c] = e * f;
              ds[c] = e * (dp[c] * f - dl);
            }
          }
        }
      }
      for (int ii = 0; ii < nr; ii++) {
        float oc[DT], qc[DT];
#pragma unroll
        for (int t = 0; t < DT; t++) {
          const int d = lane + 32 * t;
          oc[t] = d < D ? Os[ii * ld + d] : 0.f;
          qc[t] = d < D ? Qs[ii * ld + d] : 0.f;
        }
#pragma unroll
        for (int c = 0; c < KPW; c++) {
          const float a = __shfl_sync(FULL, pv[c], ii), e = __shfl_sync(FULL, ds[c], ii);
#pragma unroll
          for (int t = 0; t < DT; t++) {
            dv[c][t] = fmaf(a, oc[t], dv[c][t]);
            dk[c][t] = fmaf(e, qc[t], dk[c][t]);
          }
        }
      }
    }
  }
  const float sc = (float)g.scale;
#pragma unroll
  for (int c = 0; c < KPW; c++) {
    const int64_t j = j0 + w * KPW + c;
    if (j >= g.Lk) continue;
    T *kr = gk ? gk + fa_attn_off(g.gk, b, hk, j) : nullptr, *vr = gv ? gv + fa_attn_off(g.gv, b, hk, j) : nullptr;
#pragma unroll
    for (int t = 0; t < DT; t++) {
      const int d = lane + 32 * t;
      if (d >= D) continue;
      if (kr) kr[d] = fa_from_f<T>(dk[c][t] * sc);
      if (vr) vr[d] = fa_from_f<T>(dv[c][t]);
    }
  }
}

// The bias gradient: a CTA owns a 32 x 32 (row, key) tile of it for one combination of its own (kept) outer
// dims, and adds up dS over its broadcast dims (outer dims, then row tiles when ri, key tiles when rj) in a
// fixed order; then over the rows / keys of the tile (ri / rj); one writer per element, no atomics.
template <typename T, int DT>
__global__ void __launch_bounds__(THREADS) dbias_kernel(Params p, float *gbias, const T *q, const T *k, const T *v,
                                                        const float *bias, const void *mask, const T *go,
                                                        const float *lse, const float *delta) {
  extern __shared__ float sm[];
  const fa_attn_geom &g = p.g;
  const int D = (int)g.D, ld = p.ld;
  float *Ks = sm, *Vs = Ks + 32 * ld, *Qs = Vs + 32 * ld, *Os = Qs + 32 * D, *red = Os + 32 * D;
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t itiles = (g.Lq + 31) / 32, jtiles = (g.Lk + 31) / 32;
  const int64_t nit = p.ri ? 1 : itiles, njt = p.rj ? 1 : jtiles;
  int64_t blk = blockIdx.x;
  const int64_t jt = blk % njt;
  blk /= njt;
  const int64_t it = blk % nit, kz = blk / nit;
  int64_t co[MAXO];
  for (int d = 0; d < MAXO; d++) co[d] = 0;
  int64_t gbo = 0;  // offset of the kept coordinates in grad_bias
  {
    int64_t x = kz;
    for (int n = p.nkeep - 1; n >= 0; n--) {
      const int d = p.keep[n];
      co[d] = x % p.osize[d];
      x /= p.osize[d];
      gbo += co[d] * p.ostride[d];
    }
  }
  float acc[RB];
#pragma unroll
  for (int r = 0; r < RB; r++) acc[r] = 0.f;

  for (int64_t rz = 0; rz < p.nred_all; rz++) {
    int64_t x = rz;
    for (int n = p.nred - 1; n >= 0; n--) {
      const int d = p.red[n];
      co[d] = x % p.osize[d];
      x /= p.osize[d];
    }
    FaAttnBatch b;
    int64_t z = 0;
    for (int d = 0; d < FA_ATTN_MAX_BATCH; d++) {
      b.c[d] = d < g.nb ? co[d] : 0;
      if (d < g.nb) z = z * g.bs[d] + co[d];
    }
    const int64_t h = co[FA_ATTN_MAX_BATCH], hk = h / p.G, zh = z * g.H + h;
    for (int64_t ti = 0; ti < (p.ri ? itiles : 1); ti++) {
      const int64_t i0 = (p.ri ? ti : it) * 32;
      const int nr = (int)min((int64_t)32, g.Lq - i0);
      for (int64_t tj = 0; tj < (p.rj ? jtiles : 1); tj++) {
        const int64_t j0 = (p.rj ? tj : jt) * 32;
        const int nk = (int)min((int64_t)32, g.Lk - j0);
        __syncthreads();
        load_tile<T>(Qs, D, q + fa_attn_off(g.q, b, h, i0), g.q.r, 32, nr, D);
        load_tile<T>(Os, D, go + fa_attn_off(g.go, b, h, i0), g.go.r, 32, nr, D);
        load_tile<T>(Ks, ld, k + fa_attn_off(g.k, b, hk, j0), g.k.r, 32, nk, D);
        load_tile<T>(Vs, ld, v + fa_attn_off(g.v, b, hk, j0), g.v.r, 32, nk, D);
        __syncthreads();
        float s[RB], dp[RB];
#pragma unroll
        for (int r = 0; r < RB; r++) s[r] = dp[r] = 0.f;
        const float *kr = Ks + lane * ld, *vr = Vs + lane * ld, *qw = Qs + w * RB * D, *ow = Os + w * RB * D;
#pragma unroll 2
        for (int d = 0; d < D; d++) {
          const float kd = kr[d], vd = vr[d];
#pragma unroll
          for (int r = 0; r < RB; r++) {
            s[r] = fmaf(qw[r * D + d], kd, s[r]);
            dp[r] = fmaf(ow[r * D + d], vd, dp[r]);
          }
        }
        const int64_t j = j0 + lane;
#pragma unroll
        for (int r = 0; r < RB; r++) {
          const int ir = w * RB + r;
          if (ir >= nr || lane >= nk) continue;
          const int64_t i = i0 + ir;
          const float L2 = lse[fa_attn_off(g.lse, b, h, i)] * FA_ATTN_LOG2E;
          if (L2 == -INFINITY) continue;
          const void *mrow = g.mask_mode == 1 ? (const void *)((const unsigned char *)mask + fa_attn_off(g.mask, b, h, i))
                             : g.mask_mode == 2 ? (const void *)((const float *)mask + fa_attn_off(g.mask, b, h, i))
                                                : nullptr;
          const float xl = logit2(p, s[r], bias + fa_attn_off(g.bias, b, h, i), mrow, j);
          if (xl == -INFINITY) continue;
          const float e = exp2f(xl - L2);
          acc[r] += e * (dp[r] * drop_factor(p, (zh * g.Lq + i) * g.Lk + j) - delta[zh * g.Lq + i]);
        }
      }
    }
  }
  // the tile's own reductions, then one write per element
  const int64_t gr = g.gbias.r, gc = g.gbias.c;
  if (p.rj) {
#pragma unroll
    for (int r = 0; r < RB; r++) acc[r] = fa_cu_warp_sum(acc[r]);
  }
  if (p.ri) {
    float t = 0.f;
#pragma unroll
    for (int r = 0; r < RB; r++) t += acc[r];
    red[w * 32 + lane] = t;
    __syncthreads();
    if (w == 0) {
      float tot = 0.f;
      for (int u = 0; u < NW; u++) tot += red[u * 32 + lane];
      const int64_t j = jt * 32 + lane;
      if (p.rj) {
        if (lane == 0) gbias[gbo] += tot;
      } else if (j < g.Lk) {
        gbias[gbo + j * gc] += tot;
      }
    }
    return;
  }
#pragma unroll
  for (int r = 0; r < RB; r++) {
    const int64_t i = it * 32 + w * RB + r, j = jt * 32 + lane;
    if (i >= g.Lq) continue;
    if (p.rj) {
      if (lane == 0) gbias[gbo + i * gr] += acc[r];
    } else if (j < g.Lk) {
      gbias[gbo + i * gr + j * gc] += acc[r];
    }
  }
}


// ----------------------------------------------------------------------------------------------- MMA kernels
// mma.sync family (sm_80+; 16-bit dtypes, D a multiple of 16 up to 128, 16-byte aligned rows). Forward: a CTA
// of 4 warps takes 64 query rows of one (z, h) (16 per warp, Q fragments kept in registers for the whole key
// loop), K and V tiles of 64 keys come through shared memory by cp.async (rows padded by 16 bytes: ldmatrix
// conflict-free), S = Q K^T and O += P V on m16n8k16 tensor cores with float32 accumulators; the score
// accumulators become P's A fragments in registers (FlashAttention-2's layout trick). Each thread holds two
// rows (lane/4 and lane/4 + 8 of its warp's 16); row max / sum over the 4 lanes of a quad.
constexpr int MBM = 64, MBN = 64;

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct Mma<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
// 16 bytes global -> shared, zero-filled when !ok
__device__ __forceinline__ void cp16(void *dst, const void *src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(ok ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// n rows of D 16-bit elements (row pitch rs elements in global, D + 8 in shared), rows >= valid zero-filled
template <typename T, int D>
__device__ __forceinline__ void cp_tile(T *dst, const T *src, int64_t rs, int n, int valid) {
  constexpr int C = D / 8;  // 16-byte chunks per row
  for (int e = threadIdx.x; e < n * C; e += THREADS) {
    const int r = e / C, c = e - r * C;
    cp16(dst + r * (D + 8) + c * 8, src + (int64_t)r * rs + c * 8, r < valid);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(THREADS) mma_fwd_kernel(Params p, T *out, float *lse, const T *q, const T *k,
                                                          const T *v, const float *bias, const void *mask) {
  constexpr int PD = D + 8, KD = D / 16, NT = MBN / 8, OT = D / 8;
  extern __shared__ __align__(16) unsigned char smraw[];
  T *Qs = (T *)smraw, *Ks = Qs + MBM * PD, *Vs = Ks + MBN * PD;
  float *mv = (float *)(Vs + MBN * PD);
  const fa_attn_geom &g = p.g;
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, gi = lane >> 2, ti = lane & 3;
  const int64_t ntiles = (g.Lq + MBM - 1) / MBM;
  const int64_t zh = blockIdx.x / ntiles, row0 = (blockIdx.x % ntiles) * MBM;
  const int64_t z = zh / g.H, h = zh % g.H, hk = h / p.G;
  const FaAttnBatch b = fa_attn_batch(g, z);
  cp_tile<T, D>(Qs, q + fa_attn_off(g.q, b, h, row0), g.q.r, MBM, (int)min((int64_t)MBM, g.Lq - row0));
  cp_commit();
  cp_wait_all();
  __syncthreads();
  uint32_t qf[KD][4];
#pragma unroll
  for (int kk = 0; kk < KD; kk++) ldsm_x4(qf[kk], Qs + (w * 16 + (lane & 15)) * PD + kk * 16 + (lane >> 4) * 8);
  const T *kb = k + fa_attn_off(g.k, b, hk, 0), *vb = v + fa_attn_off(g.v, b, hk, 0);

  int64_t ri[2];
  bool rv[2];
  const float *brow[2];
  const void *mrow[2];
  float m[2], l[2], o[OT][4];
#pragma unroll
  for (int u = 0; u < 2; u++) {
    ri[u] = row0 + w * 16 + gi + 8 * u;
    rv[u] = ri[u] < g.Lq;
    brow[u] = g.has_bias && rv[u] ? bias + fa_attn_off(g.bias, b, h, ri[u]) : nullptr;
    mrow[u] = g.mask_mode == 1 && rv[u]   ? (const void *)((const unsigned char *)mask + fa_attn_off(g.mask, b, h, ri[u]))
              : g.mask_mode == 2 && rv[u] ? (const void *)((const float *)mask + fa_attn_off(g.mask, b, h, ri[u]))
                                          : nullptr;
    m[u] = -INFINITY;
    l[u] = 0.f;
  }
#pragma unroll
  for (int t = 0; t < OT; t++) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;

  for (int64_t j0 = 0; j0 < g.Lk; j0 += MBN) {
    const int nk = (int)min((int64_t)MBN, g.Lk - j0);
    __syncthreads();
    cp_tile<T, D>(Ks, kb + j0 * g.k.r, g.k.r, MBN, nk);
    cp_tile<T, D>(Vs, vb + j0 * g.v.r, g.v.r, MBN, nk);
    cp_commit();
    cp_wait_all();
    __syncthreads();
    float s[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; kk++)
#pragma unroll
      for (int n2 = 0; n2 < NT / 2; n2++) {
        uint32_t bf[4];
        ldsm_x4(bf, Ks + (n2 * 16 + (lane & 7) + (lane >> 4) * 8) * PD + kk * 16 + ((lane >> 3) & 1) * 8);
        Mma<T>::mma(s[2 * n2], qf[kk], bf[0], bf[1]);
        Mma<T>::mma(s[2 * n2 + 1], qf[kk], bf[2], bf[3]);
      }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int u = e >> 1;
        const int64_t j = j0 + n * 8 + 2 * ti + (e & 1);
        const float x = rv[u] && j < g.Lk ? logit2(p, s[n][e], brow[u], mrow[u], j) : -INFINITY;
        s[n][e] = x;
        mx[u] = fmaxf(mx[u], x);
      }
#pragma unroll
    for (int u = 0; u < 2; u++) {
      mx[u] = fmaxf(mx[u], __shfl_xor_sync(FULL, mx[u], 1));
      mx[u] = fmaxf(mx[u], __shfl_xor_sync(FULL, mx[u], 2));
      const float a = fa_attn_rescale(m[u], mx[u]);
      l[u] *= a;
#pragma unroll
      for (int t = 0; t < OT; t++) {
        o[t][2 * u] *= a;
        o[t][2 * u + 1] *= a;
      }
    }
    uint32_t pa[MBN / 16][4];
#pragma unroll
    for (int n = 0; n < NT; n++) {
      float pe[4];
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int u = e >> 1;
        float x = fa_attn_exp(s[n][e], m[u]);
        l[u] += x;
        if (p.pdrop > 0.f && x > 0.f) x *= drop_factor(p, (zh * g.Lq + ri[u]) * g.Lk + j0 + n * 8 + 2 * ti + (e & 1));
        pe[e] = x;
      }
      pa[n >> 1][(n & 1) * 2] = Mma<T>::pack(pe[0], pe[1]);
      pa[n >> 1][(n & 1) * 2 + 1] = Mma<T>::pack(pe[2], pe[3]);
    }
#pragma unroll
    for (int kk = 0; kk < MBN / 16; kk++)
#pragma unroll
      for (int d2 = 0; d2 < D / 16; d2++) {
        uint32_t bf[4];
        ldsm_x4_t(bf, Vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * PD + d2 * 16 + (lane >> 4) * 8);
        Mma<T>::mma(o[2 * d2], pa[kk], bf[0], bf[1]);
        Mma<T>::mma(o[2 * d2 + 1], pa[kk], bf[2], bf[3]);
      }
  }
  bool lost = false;
#pragma unroll
  for (int u = 0; u < 2; u++) {
    l[u] += __shfl_xor_sync(FULL, l[u], 1);
    l[u] += __shfl_xor_sync(FULL, l[u], 2);
    lost |= rv[u] && !(l[u] > 0.f);
  }
  if (__syncthreads_or(lost)) {  // rows with every key left out: mean V of this (z, kv head)
    for (int d = threadIdx.x; d < D; d += THREADS) {
      float t = 0.f;
      for (int64_t j = 0; j < g.Lk; j++) t += fa_to_f<T>(vb[j * g.v.r + d]);
      mv[d] = t * p.invLk;
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < 2; u++) {
    if (!rv[u]) continue;
    T *orow = out + fa_attn_off(g.o, b, h, ri[u]);
    const bool ok = l[u] > 0.f;
    const float inv = ok ? 1.f / l[u] : 0.f;
#pragma unroll
    for (int t = 0; t < OT; t++) {
      const int d = t * 8 + 2 * ti;
      const float x0 = ok ? o[t][2 * u] * inv : mv[d], x1 = ok ? o[t][2 * u + 1] * inv : mv[d + 1];
      orow[d] = fa_from_f<T>(x0);
      orow[d + 1] = fa_from_f<T>(x1);
    }
    if (ti == 0) lse[fa_attn_off(g.lse, b, h, ri[u])] = fa_attn_lse(m[u], l[u]);
  }
}


// Backward, key-tile major: a CTA owns 64 keys of one (z, kv head) (16 per warp) and loops over the G query
// heads and the query rows in tiles of BQ. Per tile each warp forms S^T = K Q^T and dP^T = V dO^T for its 16
// keys (K, V fragments by ldmatrix, Q and dO as the col-major B operand), P^T = exp2(S^T - lse) and
// dS^T = P^T (dP^T - delta) in registers, and accumulates dV += P^T dO and dK += dS^T Q in registers (the
// accumulator layout is the next A operand): dK, dV written once, no atomics. dQ (when dq != NULL) comes from
// dS^T staged in shared memory: dQ_tile = dS K on the tensor cores, added into a float32 scratch (one atomic
// per element and key tile). dBias (when gbias != NULL) adds dS from a float32 copy of the tile, summed over
// the tile's rows first when the bias is shared by every row. The deterministic mode passes dq = gbias = NULL
// and takes those two from the SIMT kernels.
template <typename T, int D, int BQ>
__global__ void __launch_bounds__(THREADS) mma_bwd_kernel(Params p, T *gk, T *gv, float *dq, float *gbias, const T *q,
                                                          const T *k, const T *v, const float *bias, const void *mask,
                                                          const T *go, const float *lse, const float *delta) {
  constexpr int PD = D + 8, KD = D / 16, NQ = BQ / 8, OT = D / 8, PQ = BQ + 8, PF = BQ + 1;
  extern __shared__ __align__(16) unsigned char smraw[];
  T *Ks = (T *)smraw, *Vs = Ks + 64 * PD, *Qs = Vs + 64 * PD, *Os = Qs + BQ * PD, *St = Os + BQ * PD;
  float *Sf = (float *)(St + 64 * PQ), *Ls = Sf + 64 * PF, *Dls = Ls + BQ;
  const fa_attn_geom &g = p.g;
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, gi = lane >> 2, ti = lane & 3;
  const int64_t ntiles = (g.Lk + 63) / 64;
  const int64_t zk = blockIdx.x / ntiles, j0 = (blockIdx.x % ntiles) * 64;
  const int64_t z = zk / g.Hkv, hk = zk % g.Hkv;
  const FaAttnBatch b = fa_attn_batch(g, z);
  const int nk = (int)min((int64_t)64, g.Lk - j0);
  cp_tile<T, D>(Ks, k + fa_attn_off(g.k, b, hk, j0), g.k.r, 64, nk);
  cp_tile<T, D>(Vs, v + fa_attn_off(g.v, b, hk, j0), g.v.r, 64, nk);
  cp_commit();
  int64_t kj[2];
  bool kv[2];
#pragma unroll
  for (int u = 0; u < 2; u++) {
    kj[u] = j0 + w * 16 + gi + 8 * u;
    kv[u] = kj[u] < g.Lk;
  }
  float dk[OT][4], dv[OT][4];
#pragma unroll
  for (int t = 0; t < OT; t++)
#pragma unroll
    for (int e = 0; e < 4; e++) dk[t][e] = dv[t][e] = 0.f;

  for (int64_t gh = 0; gh < p.G; gh++) {
    const int64_t h = hk * p.G + gh, zh = z * g.H + h;
    const T *qb = q + fa_attn_off(g.q, b, h, 0), *ob = go + fa_attn_off(g.go, b, h, 0);
    const float *bb = g.has_bias ? bias + fa_attn_off(g.bias, b, h, 0) : nullptr;
    const unsigned char *mb8 = g.mask_mode == 1 ? (const unsigned char *)mask + fa_attn_off(g.mask, b, h, 0) : nullptr;
    const float *mbf = g.mask_mode == 2 ? (const float *)mask + fa_attn_off(g.mask, b, h, 0) : nullptr;
    for (int64_t i0 = 0; i0 < g.Lq; i0 += BQ) {
      const int nr = (int)min((int64_t)BQ, g.Lq - i0);
      __syncthreads();
      cp_tile<T, D>(Qs, qb + i0 * g.q.r, g.q.r, BQ, nr);
      cp_tile<T, D>(Os, ob + i0 * g.go.r, g.go.r, BQ, nr);
      cp_commit();
      for (int t = threadIdx.x; t < BQ; t += THREADS) {  // +inf marks rows past Lq (P = 0), -inf lost rows
        Ls[t] = t < nr ? lse[fa_attn_off(g.lse, b, h, i0 + t)] * FA_ATTN_LOG2E : INFINITY;
        Dls[t] = t < nr ? delta[zh * g.Lq + i0 + t] : 0.f;
      }
      cp_wait_all();
      __syncthreads();
      float st[NQ][4], dpt[NQ][4];
#pragma unroll
      for (int n = 0; n < NQ; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) st[n][e] = dpt[n][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KD; kk++) {
        uint32_t kf[4], vf[4];
        ldsm_x4(kf, Ks + (w * 16 + (lane & 15)) * PD + kk * 16 + (lane >> 4) * 8);
        ldsm_x4(vf, Vs + (w * 16 + (lane & 15)) * PD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int n2 = 0; n2 < NQ / 2; n2++) {
          uint32_t bq[4], bo[4];
          const int o = (n2 * 16 + (lane & 7) + (lane >> 4) * 8) * PD + kk * 16 + ((lane >> 3) & 1) * 8;
          ldsm_x4(bq, Qs + o);
          ldsm_x4(bo, Os + o);
          Mma<T>::mma(st[2 * n2], kf, bq[0], bq[1]);
          Mma<T>::mma(st[2 * n2 + 1], kf, bq[2], bq[3]);
          Mma<T>::mma(dpt[2 * n2], vf, bo[0], bo[1]);
          Mma<T>::mma(dpt[2 * n2 + 1], vf, bo[2], bo[3]);
        }
      }
      uint32_t pa[BQ / 16][4], da[BQ / 16][4];
#pragma unroll
      for (int n = 0; n < NQ; n++) {
        float pe[4], de[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int u = e >> 1, il = n * 8 + 2 * ti + (e & 1);
          const int64_t j = kj[u], i = i0 + il;
          const float L2 = Ls[il];
          float pv = 0.f, ds = 0.f;
          if (kv[u] && L2 != INFINITY) {
            if (L2 == -INFINITY) {
              pv = p.invLk;
            } else {
              float x = st[n][e] * p.scale2;
              if (bb) x = fmaf(bb[i * g.bias.r + j * g.bias.c], FA_ATTN_LOG2E, x);
              if (mb8 && mb8[i * g.mask.r + j * g.mask.c] == 0) x = -INFINITY;
              if (mbf) x = fmaf(p.mscale2, mbf[i * g.mask.r + j * g.mask.c] - 1.f, x);
              if (x != -INFINITY) {
                const float ex = exp2f(x - L2), f = drop_factor(p, (zh * g.Lq + i) * g.Lk + j);
                pv = ex * f;
                ds = ex * (dpt[n][e] * f - Dls[il]);
              }
            }
          }
          pe[e] = pv;
          de[e] = ds;
          if (dq || gbias) {
            const int kl = w * 16 + gi + 8 * u;
            St[kl * PQ + il] = fa_from_f<T>(ds);
            Sf[kl * PF + il] = ds;
          }
        }
        pa[n >> 1][(n & 1) * 2] = Mma<T>::pack(pe[0], pe[1]);
        pa[n >> 1][(n & 1) * 2 + 1] = Mma<T>::pack(pe[2], pe[3]);
        da[n >> 1][(n & 1) * 2] = Mma<T>::pack(de[0], de[1]);
        da[n >> 1][(n & 1) * 2 + 1] = Mma<T>::pack(de[2], de[3]);
      }
#pragma unroll
      for (int kq = 0; kq < BQ / 16; kq++)
#pragma unroll
        for (int d2 = 0; d2 < D / 16; d2++) {
          uint32_t bo[4], bq[4];
          const int o = (kq * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * PD + d2 * 16 + (lane >> 4) * 8;
          ldsm_x4_t(bo, Os + o);
          ldsm_x4_t(bq, Qs + o);
          Mma<T>::mma(dv[2 * d2], pa[kq], bo[0], bo[1]);
          Mma<T>::mma(dv[2 * d2 + 1], pa[kq], bo[2], bo[3]);
          Mma<T>::mma(dk[2 * d2], da[kq], bq[0], bq[1]);
          Mma<T>::mma(dk[2 * d2 + 1], da[kq], bq[2], bq[3]);
        }
      if (dq || gbias) __syncthreads();
      if (dq && w < BQ / 16) {  // dQ of the tile's rows w*16 .. w*16+15 over this CTA's 64 keys
        float acc[OT][4];
#pragma unroll
        for (int t = 0; t < OT; t++) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
#pragma unroll
        for (int kb = 0; kb < 4; kb++) {
          uint32_t a[4];
          ldsm_x4_t(a, St + (kb * 16 + (lane & 7) + (lane >> 4) * 8) * PQ + w * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
          for (int d2 = 0; d2 < D / 16; d2++) {
            uint32_t bk[4];
            ldsm_x4_t(bk, Ks + (kb * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * PD + d2 * 16 + (lane >> 4) * 8);
            Mma<T>::mma(acc[2 * d2], a, bk[0], bk[1]);
            Mma<T>::mma(acc[2 * d2 + 1], a, bk[2], bk[3]);
          }
        }
#pragma unroll
        for (int u = 0; u < 2; u++) {
          const int il = w * 16 + gi + 8 * u;
          if (il >= nr) continue;
          float *dr = dq + (zh * g.Lq + i0 + il) * g.D;
#pragma unroll
          for (int t = 0; t < OT; t++) {
            atomicAdd(dr + t * 8 + 2 * ti, acc[t][2 * u]);
            atomicAdd(dr + t * 8 + 2 * ti + 1, acc[t][2 * u + 1]);
          }
        }
      }
      if (gbias) {
        float *gb = gbias + fa_attn_off(g.gbias, b, h, 0);
        if (g.gbias.r == 0) {  // shared by every row: the tile's rows first
          for (int jl = threadIdx.x; jl < nk; jl += THREADS) {
            float t = 0.f;
            for (int il = 0; il < nr; il++) t += Sf[jl * PF + il];
            atomicAdd(gb + (j0 + jl) * g.gbias.c, t);
          }
        } else {
          for (int e = threadIdx.x; e < nr * 64; e += THREADS) {
            const int il = e >> 6, jl = e & 63;
            if (jl < nk) atomicAdd(gb + (i0 + il) * g.gbias.r + (j0 + jl) * g.gbias.c, Sf[jl * PF + il]);
          }
        }
      }
    }
  }
  const float sc = (float)g.scale;
#pragma unroll
  for (int u = 0; u < 2; u++) {
    if (!kv[u]) continue;
    T *kr = gk ? gk + fa_attn_off(g.gk, b, hk, kj[u]) : nullptr, *vr = gv ? gv + fa_attn_off(g.gv, b, hk, kj[u]) : nullptr;
#pragma unroll
    for (int t = 0; t < OT; t++) {
      const int d = t * 8 + 2 * ti;
      if (kr) {
        kr[d] = fa_from_f<T>(dk[t][2 * u] * sc);
        kr[d + 1] = fa_from_f<T>(dk[t][2 * u + 1] * sc);
      }
      if (vr) {
        vr[d] = fa_from_f<T>(dv[t][2 * u]);
        vr[d + 1] = fa_from_f<T>(dv[t][2 * u + 1]);
      }
    }
  }
}

// grad_q = scale * the float32 dQ scratch ((z*H + h)*Lq + i, d), into grad_q's strides
template <typename T>
__global__ void __launch_bounds__(THREADS) dq_cast_kernel(Params p, T *gq, const float *dq) {
  const fa_attn_geom &g = p.g;
  const int64_t n = g.Z * g.H * g.Lq * g.D;
  const float sc = (float)g.scale;
  for (int64_t e = (int64_t)blockIdx.x * THREADS + threadIdx.x; e < n; e += (int64_t)gridDim.x * THREADS) {
    const int64_t d = e % g.D, r = e / g.D, i = r % g.Lq, zh = r / g.Lq;
    const FaAttnBatch b = fa_attn_batch(g, zh / g.H);
    gq[fa_attn_off(g.gq, b, zh % g.H, i) + d] = fa_from_f<T>(dq[e] * sc);
  }
}

// ------------------------------------------------------------------------------------------------ host
enum Family { SIMT = FA_ATTN_KERNEL_SIMT, MMA = FA_ATTN_KERNEL_MMA, WGMMA = FA_ATTN_KERNEL_WGMMA };

struct Plan {
  Params p;
  int family, dt;
};

// the mma.sync family serves 16-bit dtypes with D a multiple of 16 up to 128 whose q, k, v rows start on 16
// bytes (cp.async): NULL when it can, else what is missing
static const char *mma_gap(const fa_attn_geom *g, const void *const *ptrs) {
  if (g->dtype != FA_BFLOAT16 && g->dtype != FA_FLOAT16) return "bfloat16 or float16 inputs";
  if (g->D % 16 || g->D == 0 || g->D > 128) return "a head size (last dim) that is a multiple of 16 up to 128";
  const fa_attn_strides *ss[3] = {&g->q, &g->k, &g->v};
  for (int t = 0; t < 3; t++) {
    if (!fa_cu_aligned16(ptrs[t])) return "q, k and v aligned to 16 bytes";
    bool ok = ss[t]->h % 8 == 0 && ss[t]->r % 8 == 0;
    for (int d = 0; d < g->nb; d++) ok = ok && ss[t]->b[d] % 8 == 0;
    if (!ok) return "q, k and v strides that are multiples of 8 elements";
  }
  return nullptr;
}

static int plan(const char *fn, Plan &pl, const fa_attn_geom *g, bool backward, const void *const *ptrs) {
  Params &p = pl.p;
  memset(&p, 0, sizeof p);
  p.g = *g;
  if (g->D > 256)
    return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'q': expected a head size (last dim) of at most 256 on CUDA, got %lld",
                    fn, (long long)g->D);
  p.G = g->Hkv > 0 ? g->H / g->Hkv : 1;
  p.scale2 = (float)(g->scale * 1.4426950408889634);
  p.mscale2 = (float)(g->mask_scale * 1.4426950408889634);
  p.pdrop = (float)g->dropout;
  p.rdrop = g->dropout > 0 ? (float)(1.0 / (1.0 - g->dropout)) : 1.f;
  p.invLk = g->Lk > 0 ? (float)(1.0 / (double)g->Lk) : 0.f;
  p.ld = (int)(g->D | 1);
  pl.dt = g->D <= 32 ? 1 : g->D <= 64 ? 2 : g->D <= 128 ? 4 : 8;
  const char *gap = mma_gap(g, ptrs);
  switch (g->kernel) {
    case FA_ATTN_KERNEL_AUTO: pl.family = gap ? SIMT : MMA; break;
    case FA_ATTN_KERNEL_SIMT: pl.family = SIMT; break;
    case FA_ATTN_KERNEL_MMA:
      if (gap)
        return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'opts': kernel %d (mma.sync) needs %s (got %s, D = %lld)", fn,
                        g->kernel, gap, fa_dtype_name(g->dtype), (long long)g->D);
      pl.family = MMA;
      break;
    case FA_ATTN_KERNEL_WGMMA:
      return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'opts': kernel %d (wgmma) is not in this build; use the mma.sync (2) or SIMT (1) family",
                      fn, g->kernel);
    default:
      return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'opts': unknown kernel family %d", fn, g->kernel);
  }
  // dbias: outer dims (batch dims, then the head) that the gradient keeps or reduces
  for (int d = 0; d < MAXO; d++) {
    const bool head = d == FA_ATTN_MAX_BATCH;
    if (!head && d >= g->nb) continue;
    const int64_t n = head ? g->H : g->bs[d], s = head ? g->gbias.h : g->gbias.b[d];
    p.osize[d] = n;
    p.ostride[d] = s;
    if (s == 0 && n > 1) p.red[p.nred++] = d;
    else p.keep[p.nkeep++] = d;
  }
  p.nkeep_all = p.nred_all = 1;
  for (int n = 0; n < p.nkeep; n++) p.nkeep_all *= p.osize[p.keep[n]];
  for (int n = 0; n < p.nred; n++) p.nred_all *= p.osize[p.red[n]];
  p.ri = g->gbias.r == 0 && g->Lq > 1;
  p.rj = g->gbias.c == 0 && g->Lk > 1;
  return 0;
}

// one launch of THREADS threads per block; dynamic shared memory beyond 48 KB is opted into (and checked
// against the device's limit)
template <typename... KA, typename... A>
static int launch(const char *fn, int dev, void (*kern)(KA...), int64_t blocks, size_t smem, A... args) {
  if (blocks <= 0) return 0;
  if (blocks > INT_MAX)
    return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'q': the problem needs %lld thread blocks, more than a launch allows", fn,
                    (long long)blocks);
  if (smem > 48 * 1024) {
    int mx = 0;
    int rc = fa_cu_check(cudaDeviceGetAttribute(&mx, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), fn);
    if (rc) return rc;
    if ((int64_t)smem > mx)
      return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'q': a head size this large needs %lld bytes of shared memory per block, the device has %d",
                      fn, (long long)smem, mx);
    if ((rc = fa_cu_check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), fn))) return rc;
  }
  kern<<<(unsigned)blocks, THREADS, smem, fa_cu_stream(dev)>>>(args...);
  return fa_cu_launch_check(fn);
}

#define ATTN_DT_SWITCH(dt, ...)                       \
  switch (dt) {                                       \
    case 1: { constexpr int DT_ = 1; __VA_ARGS__; }   \
    case 2: { constexpr int DT_ = 2; __VA_ARGS__; }   \
    case 4: { constexpr int DT_ = 4; __VA_ARGS__; }   \
    default: { constexpr int DT_ = 8; __VA_ARGS__; }  \
  }

template <typename T>
static int forward_t(const fa_attn_geom *g, T *out, float *lse, const T *q, const T *k, const T *v, const float *bias,
                     const void *mask) {
  static const char *fn = "fa_attention_forward";
  Plan pl;
  const void *ptrs[3] = {q, k, v};
  int rc = plan(fn, pl, g, false, ptrs);
  if (rc) return rc;
  if (g->Z == 0 || g->H == 0 || g->Lq == 0) return 0;
  const Params &p = pl.p;
  if constexpr (sizeof(T) == 2) {
   if (pl.family == MMA) {
    const int64_t mblocks = g->Z * g->H * ((g->Lq + MBM - 1) / MBM);
    const size_t msmem = (size_t)(MBM + 2 * MBN) * (g->D + 8) * sizeof(T) + (size_t)g->D * sizeof(float);
    switch (g->D) {
      case 16: return launch(fn, g->device, mma_fwd_kernel<T, 16>, mblocks, msmem, p, out, lse, q, k, v, bias, mask);
      case 32: return launch(fn, g->device, mma_fwd_kernel<T, 32>, mblocks, msmem, p, out, lse, q, k, v, bias, mask);
      case 48: return launch(fn, g->device, mma_fwd_kernel<T, 48>, mblocks, msmem, p, out, lse, q, k, v, bias, mask);
      case 64: return launch(fn, g->device, mma_fwd_kernel<T, 64>, mblocks, msmem, p, out, lse, q, k, v, bias, mask);
      case 80: return launch(fn, g->device, mma_fwd_kernel<T, 80>, mblocks, msmem, p, out, lse, q, k, v, bias, mask);
      case 96: return launch(fn, g->device, mma_fwd_kernel<T, 96>, mblocks, msmem, p, out, lse, q, k, v, bias, mask);
      case 112: return launch(fn, g->device, mma_fwd_kernel<T, 112>, mblocks, msmem, p, out, lse, q, k, v, bias, mask);
      default: return launch(fn, g->device, mma_fwd_kernel<T, 128>, mblocks, msmem, p, out, lse, q, k, v, bias, mask);
    }
   }
  }
  const int64_t blocks = g->Z * g->H * ((g->Lq + ROWS - 1) / ROWS);
  const size_t smem = (size_t)(2 * BN * p.ld + ROWS * g->D) * sizeof(float);
  ATTN_DT_SWITCH(pl.dt, return launch(fn, g->device, rows_kernel<T, DT_, false>, blocks, smem, p, out, lse, q, k, v,
                                      bias, mask, (const T *)nullptr, (const float *)nullptr, (const float *)nullptr))
}

template <typename T>
static int backward_t(const fa_attn_geom *g, T *gq, T *gk, T *gv, float *gbias, const T *go, const T *q, const T *k,
                      const T *v, const T *o, const float *lse, const float *bias, const void *mask) {
  static const char *fn = "fa_attention_backward";
  Plan pl;
  const void *ptrs[3] = {q, k, v};
  int rc = plan(fn, pl, g, true, ptrs);
  if (rc) return rc;
  if (!g->has_bias) gbias = nullptr;
  if (g->Z == 0 || g->H == 0) return 0;
  const Params &p = pl.p;
  const int dev = g->device;
  Temps tmp(dev);
  float *delta = nullptr;
  const int64_t rows = g->Z * g->H * g->Lq;
  if (rows > 0) {
    if (!(delta = (float *)tmp.get(rows * (int64_t)sizeof(float)))) return FA_ERR_MEMORY;
    if ((rc = launch(fn, dev, delta_kernel<T>, (int64_t)fa_cu_blocks(rows * 32, THREADS, dev), 0, p, delta, go, o)))
      return rc;
  }
  const int64_t D = g->D;
  if constexpr (sizeof(T) == 2) {
    if (pl.family == MMA) {
      const bool det = g->deterministic;
      float *dq32 = nullptr;
      if (gq && !det && rows > 0) {
        if (!(dq32 = (float *)tmp.get(rows * D * (int64_t)sizeof(float)))) return FA_ERR_MEMORY;
        if ((rc = fa_cu_check(cudaMemsetAsync(dq32, 0, rows * D * sizeof(float), fa_cu_stream(dev)), fn))) return rc;
      }
      float *gba = det ? nullptr : gbias;
      const int64_t kblocks = g->Z * g->Hkv * ((g->Lk + 63) / 64);
      if (gk || gv || dq32 || gba) {
#define ATTN_MMA_BWD(DD, BQ)                                                                                            \
  launch(fn, dev, mma_bwd_kernel<T, DD, BQ>, kblocks,                                                                   \
         (size_t)(2 * 64 + 2 * BQ) * (DD + 8) * sizeof(T) + (size_t)64 * (BQ + 8) * sizeof(T) +                         \
             (size_t)(64 * (BQ + 1) + 2 * BQ) * sizeof(float),                                                          \
         p, gk, gv, dq32, gba, q, k, v, bias, mask, go, lse, (const float *)delta)
        switch (D) {
          case 16: rc = ATTN_MMA_BWD(16, 64); break;
          case 32: rc = ATTN_MMA_BWD(32, 64); break;
          case 48: rc = ATTN_MMA_BWD(48, 64); break;
          case 64: rc = ATTN_MMA_BWD(64, 64); break;
          case 80: rc = ATTN_MMA_BWD(80, 32); break;
          case 96: rc = ATTN_MMA_BWD(96, 32); break;
          case 112: rc = ATTN_MMA_BWD(112, 16); break;
          default: rc = ATTN_MMA_BWD(128, 16); break;
        }
#undef ATTN_MMA_BWD
        if (rc) return rc;
      }
      if (dq32 && (rc = launch(fn, dev, dq_cast_kernel<T>, (int64_t)fa_cu_blocks(rows * D, THREADS, dev), 0, p, gq,
                               (const float *)dq32)))
        return rc;
      if (!det) return 0;
      gk = gv = nullptr;  // done; the SIMT kernels below give dQ and dBias without atomics
    }
  }
  ATTN_DT_SWITCH(pl.dt, {
    if (gq && (rc = launch(fn, dev, rows_kernel<T, DT_, true>, g->Z * g->H * ((g->Lq + ROWS - 1) / ROWS),
                           (size_t)(2 * BN * p.ld + 2 * ROWS * D) * sizeof(float), p, gq, (float *)nullptr, q, k, v,
                           bias, mask, go, lse, (const float *)delta)))
      return rc;
    if ((gk || gv) && (rc = launch(fn, dev, dkdv_kernel<T, DT_>, g->Z * g->Hkv * ((g->Lk + BK - 1) / BK),
                                   (size_t)(2 * BK * D + 2 * 32 * p.ld) * sizeof(float), p, gk, gv, q, k, v, bias, mask,
                                   go, lse, (const float *)delta)))
      return rc;
    if (gbias) {
      const int64_t it = p.ri ? 1 : (g->Lq + 31) / 32, jt = p.rj ? 1 : (g->Lk + 31) / 32;
      if ((rc = launch(fn, dev, dbias_kernel<T, DT_>, p.nkeep_all * it * jt,
                       (size_t)(2 * 32 * p.ld + 2 * 32 * D + NW * 32) * sizeof(float), p, gbias, q, k, v, bias, mask,
                       go, lse, (const float *)delta)))
        return rc;
    }
    return 0;
  })
}

}  // namespace

int fa_cu_attention_forward(const fa_attn_geom *g, void *out, float *lse, const void *q, const void *k, const void *v,
                            const float *bias, const void *mask) {
  FA_CU_FLOAT_DISPATCH("fa_attention_forward", g->dtype,
                       forward_t<T>(g, (T *)out, lse, (const T *)q, (const T *)k, (const T *)v, bias, mask))
}

int fa_cu_attention_backward(const fa_attn_geom *g, void *grad_q, void *grad_k, void *grad_v, float *grad_bias,
                             const void *grad_out, const void *q, const void *k, const void *v, const void *out,
                             const float *lse, const float *bias, const void *mask) {
  FA_CU_FLOAT_DISPATCH("fa_attention_backward", g->dtype,
                       backward_t<T>(g, (T *)grad_q, (T *)grad_k, (T *)grad_v, grad_bias, (const T *)grad_out,
                                     (const T *)q, (const T *)k, (const T *)v, (const T *)out, lse, bias, mask))
}
