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

// ------------------------------------------------------------------------------------------------ host
enum Family { SIMT = FA_ATTN_KERNEL_SIMT, MMA = FA_ATTN_KERNEL_MMA, WGMMA = FA_ATTN_KERNEL_WGMMA };

struct Plan {
  Params p;
  int family, dt;
};

static int plan(const char *fn, Plan &pl, const fa_attn_geom *g) {
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
  switch (g->kernel) {
    case FA_ATTN_KERNEL_AUTO:
    case FA_ATTN_KERNEL_SIMT: pl.family = SIMT; break;
    case FA_ATTN_KERNEL_MMA:
      return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'opts': the mma.sync kernel family (kernel = %d) is not in this build", fn,
                      g->kernel);
    case FA_ATTN_KERNEL_WGMMA:
      return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'opts': the wgmma kernel family (kernel = %d) is not in this build", fn,
                      g->kernel);
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
  int rc = plan(fn, pl, g);
  if (rc) return rc;
  if (g->Z == 0 || g->H == 0 || g->Lq == 0) return 0;
  const Params &p = pl.p;
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
  int rc = plan(fn, pl, g);
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
