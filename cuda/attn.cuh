// attn.cuh: the pieces of a flash-style attention that every attention kernel shares (cuda/attention_*.cu now,
// deform_sdpa later): batch offsets of a fa_attn_strides, the exp2-domain online softmax, the log-sum-exp of a
// finished row, dropout's Philox keep test (c/attention.h's indexing) and rowsum(dO * O) of the backward.
#pragma once
#include "common.cuh"
#include "attention.h"

constexpr float FA_ATTN_LOG2E = 1.4426950408889634f;
constexpr float FA_ATTN_LN2 = 0.6931471805599453f;

// Coordinates of the linear batch index z over g->bs (row-major), taken apart once per CTA.
struct FaAttnBatch {
  int64_t c[FA_ATTN_MAX_BATCH];
};
__device__ __forceinline__ FaAttnBatch fa_attn_batch(const fa_attn_geom &g, int64_t z) {
  FaAttnBatch b;
#pragma unroll
  for (int d = FA_ATTN_MAX_BATCH - 1; d >= 0; d--) {
    if (d < g.nb) {
      b.c[d] = z % g.bs[d];
      z /= g.bs[d];
    } else {
      b.c[d] = 0;
    }
  }
  return b;
}
// element offset of (z, h, row) in a tensor with strides s (64-bit: B*H*N*N*D passes 2^32 at N = 4096)
__device__ __forceinline__ int64_t fa_attn_off(const fa_attn_strides &s, const FaAttnBatch &b, int64_t h, int64_t row) {
  int64_t o = h * s.h + row * s.r;
#pragma unroll
  for (int d = 0; d < FA_ATTN_MAX_BATCH; d++) o += b.c[d] * s.b[d];
  return o;
}

// ---- online softmax in the exp2 domain (scores already multiplied by log2 e). A row that has seen only
// left-out keys keeps m = -inf and l = 0; its exponentials are 0 (never exp2(-inf - -inf) = NaN).
// Moves the running max m to max(m, tile_max) and returns the factor that rescales what was accumulated.
__device__ __forceinline__ float fa_attn_rescale(float &m, float tile_max) {
  const float mn = fmaxf(m, tile_max);
  const float a = mn == -INFINITY ? 1.f : exp2f(m - mn);
  m = mn;
  return a;
}
// exp2(x - m) with the convention above
__device__ __forceinline__ float fa_attn_exp(float x, float m) { return m == -INFINITY ? 0.f : exp2f(x - m); }
// natural log-sum-exp of a finished row from (m, l): -inf when every key was left out (or Lk = 0)
__device__ __forceinline__ float fa_attn_lse(float m, float l) {
  return l > 0.f ? (m + log2f(l)) * FA_ATTN_LN2 : -INFINITY;
}

// ---- dropout (c/attention.h): weight e = ((z*H + h)*Lq + i)*Lk + j is kept when u(e) >= p
__device__ __forceinline__ bool fa_attn_keep(uint64_t seed, uint64_t offset, int64_t e, float p) {
  uint32_t r[4];
  fa_cu_philox(seed, offset + ((uint64_t)e >> 2), r);
  return fa_cu_u32_to_unit_float(r[e & 3]) >= p;
}

// ---- rowsum(dO * O) of one row of n elements by the lanes of a warp (float32, a fixed shuffle order);
// every lane gets the total
template <typename T>
__device__ __forceinline__ float fa_attn_rowdot(const T *a, const T *b, int64_t n, int lane) {
  float s = 0.f;
  for (int64_t d = lane; d < n; d += 32) s = fmaf(fa_to_f<T>(a[d]), fa_to_f<T>(b[d]), s);
  return fa_cu_warp_sum(s);
}

// ---- The attention core's kernels (cuda/attention_fwd.cu, cuda/attention_bwd.cu): what they share.
//
// c/attention.c has validated everything and hands over a fa_attn_geom (c/attention.h) with strided operands;
// these files plan the launches (plan) and check the device's limits only. Kernel families (g->kernel forces
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
//
// mma.sync family (sm_80+; 16-bit dtypes, D a multiple of 16 up to 128, 16-byte aligned rows). Forward: a CTA
// of 4 warps takes 64 query rows of one (z, h) (16 per warp, Q fragments kept in registers for the whole key
// loop), K and V tiles of 64 keys come through shared memory by cp.async (rows padded by 16 bytes: ldmatrix
// conflict-free), S = Q K^T and O += P V on m16n8k16 tensor cores with float32 accumulators; the score
// accumulators become P's A fragments in registers (FlashAttention-2's layout trick). Each thread holds two
// rows (lane/4 and lane/4 + 8 of its warp's 16); row max / sum over the 4 lanes of a quad.
//   Backward (cuda/attention_bwd.cu): mma_bwd_kernel, key-tile major with dK/dV in registers; mma_dq_kernel,
//     query-major like the forward, recomputing S and dP: dQ without atomics or scratch; mma_dbias_kernel for a
//     bias over every (row, key) (the triangle's, shared by the batch rows): a CTA owns a 64x64 tile of the
//     gradient and loops over the broadcast dims recomputing dS, no atomics. A bias shared by the rows or keys:
//     float32 atomics from mma_bwd_kernel (a tile's rows summed first), or the SIMT fixed-order kernel in
//     deterministic mode. Every mma.sync gradient but that atomic one is deterministic.
// sm_90a runs the same mma.sync kernels; this build has no wgmma family (forcing it: FA_ERR_UNSUPPORTED).
#include <limits.h>
#include <string.h>

namespace fa_attn {

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
  int staged;    // bias / select-mask tiles through shared memory by cp.async (stageable(), the mma kernels' ST)
  int bias_inv;  // the bias is the same for every broadcast (reduced) combination of dbias (mma_dbias_kernel)
};

// The backward's per-row statistics (delta_kernel), each at r = (z*H + h)*Lq + i: delta = rowsum(dO * O); L2 =
// lse * log2 e (-inf: every key left out) and C2 = 0, so that P = exp2((x - L2) - C2) = exp2(x - L2) exactly; or,
// for a row whose float32 lse is too coarse to give P (|lse| >= 1024: an additive mask of -1e9 on every key, where
// lse is a multiple of 64 and exp2(x - L2) would be 1 for each key), L2 = the row's max and C2 = log2 of its sum.
struct RowStats {
  const float *delta, *L2, *C2;
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
                                                       RowStats rs) {
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
  float m[R], l[R], L2[R], C2[R], dl[R], acc[R][DT], sv[DT];
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
    L2[r] = BWD && rv[r] ? rs.L2[zh * g.Lq + i] : -INFINITY;
    C2[r] = BWD && rv[r] ? rs.C2[zh * g.Lq + i] : 0.f;
    dl[r] = BWD && rv[r] ? rs.delta[zh * g.Lq + i] : 0.f;
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
          const float e = exp2f((x - L2[r]) - C2[r]);
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


// ---- the SIMT backward's dK/dV and dBias kernels (cuda/attention_bwd.cu launches them)
// dK, dV of BK keys of one (z, kv head), summed over the G query heads and every query row
template <typename T, int DT>
__global__ void __launch_bounds__(THREADS) dkdv_kernel(Params p, T *gk, T *gv, const T *q, const T *k, const T *v,
                                                       const float *bias, const void *mask, const T *go,
                                                       RowStats rs) {
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
      const float L2 = rv ? rs.L2[zh * g.Lq + i] : 0.f, C2 = rv ? rs.C2[zh * g.Lq + i] : 0.f;
      const bool lost = rv && L2 == -INFINITY;  // every key left out: P = 1/Lk, dS = 0
      const float dl = rv ? rs.delta[zh * g.Lq + i] : 0.f;
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
              const float e = exp2f((x - L2) - C2), f = drop_factor(p, (zh * g.Lq + i) * g.Lk + j);
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
                                                        RowStats rs) {
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
          const float L2 = rs.L2[zh * g.Lq + i];
          if (L2 == -INFINITY) continue;
          const void *mrow = g.mask_mode == 1 ? (const void *)((const unsigned char *)mask + fa_attn_off(g.mask, b, h, i))
                             : g.mask_mode == 2 ? (const void *)((const float *)mask + fa_attn_off(g.mask, b, h, i))
                                                : nullptr;
          const float xl = logit2(p, s[r], bias + fa_attn_off(g.bias, b, h, i), mrow, j);
          if (xl == -INFINITY) continue;
          const float e = exp2f((xl - L2) - rs.C2[zh * g.Lq + i]);
          acc[r] += e * (dp[r] * drop_factor(p, (zh * g.Lq + i) * g.Lk + j) - rs.delta[zh * g.Lq + i]);
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

// ---- mma.sync, ldmatrix and cp.async
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
// cp_tile of ROWS full rows when the 16-byte chunks of a row divide the CTA (thread t: chunk t % C of rows
// t / C + i THREADS / C): the 64-bit row offset added, not multiplied, per copy and no zero-fill lengths; the
// same bytes land in the same places. FULL_ROWS: the D for which it applies. The forward's K/V tiles and the
// backward's tiles.
template <int D, int ROWS> constexpr bool FULL_ROWS = THREADS % (D / 8) == 0 && ROWS % (THREADS / (D / 8)) == 0;
template <typename T, int D, int ROWS>
__device__ __forceinline__ void cp_rows_full(T *dst, const T *src, int64_t rs) {
  constexpr int C = D / 8, RS = THREADS / C;
  const int r = threadIdx.x / C, c = threadIdx.x % C;
  src += (int64_t)r * rs + c * 8;
  const int64_t step = RS * rs;
  const uint32_t d = smem_addr(dst + r * (D + 8) + c * 8);
#pragma unroll
  for (int i = 0; i < ROWS / RS; i++, src += step)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d + i * RS * (D + 8) * (int)sizeof(T)), "l"(src)
                 : "memory");
}
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
template <int N> __device__ __forceinline__ void cp_wait_group() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// 16 bytes global -> shared of which the first n are read (0 <= n <= 16), the rest zero-filled
__device__ __forceinline__ void cp16n(void *dst, const void *src, int n) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(n) : "memory");
}

// 4 bytes global -> shared (zero when !ok)
__device__ __forceinline__ void cp4(void *dst, const void *src, bool ok) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(ok ? 4 : 0) : "memory");
}

// Shared-memory pitches of staged tiles: SBP floats for a bias tile read query-major (float2 at row gi, column
// 2*ti: conflict-free), SBT floats read key-major (row 2*ti, column gi: conflict-free), SMP bytes for the mask.
constexpr int SBP = 72, SBT = 68, SMP = 80;

// The bias (float32) and select-mask (uint8) values of a ROWS x 64 (row, key) tile into shared memory by
// cp.async (the caller commits): Bs pitch BP floats, Ms pitch SMP bytes, one row when the mask is shared by the
// rows (mask.r == 0); zeros outside nr x nk. bb / mb point at the tile's (row 0, key 0) element, NULL when
// absent. Needs stageable(): unit column strides and 16-byte aligned rows.
template <int ROWS, int BP>
__device__ __forceinline__ void stage_bm(const fa_attn_geom &g, float *Bs, unsigned char *Ms, const float *bb,
                                         const unsigned char *mb, int nr, int nk) {
  if (bb)
    for (int e = threadIdx.x; e < ROWS * 16; e += THREADS) {
      const int r = e >> 4, c = (e & 15) * 4;
      cp16n(Bs + r * BP + c, bb + (int64_t)r * g.bias.r + c, r < nr ? min(max(nk - c, 0), 4) * 4 : 0);
    }
  if (mb) {
    const int mr = g.mask.r == 0 ? 1 : ROWS;
    for (int e = threadIdx.x; e < mr * 4; e += THREADS) {
      const int r = e >> 2, c = (e & 3) * 16;
      cp16n(Ms + r * SMP + c, mb + (int64_t)r * g.mask.r + c, r < nr ? min(max(nk - c, 0), 16) : 0);
    }
  }
}

// n rows of D 16-bit elements (row pitch rs elements in global, D + 8 in shared), rows >= valid zero-filled
template <typename T, int D>
__device__ __forceinline__ void cp_tile(T *dst, const T *src, int64_t rs, int n, int valid) {
  constexpr int C = D / 8;  // 16-byte chunks per row
  for (int e = threadIdx.x; e < n * C; e += THREADS) {
    const int r = e / C, c = e - r * C;
    cp16(dst + r * (D + 8) + c * 8, src + (int64_t)r * rs + c * 8, r < valid);
  }
}


// ---- host: the planner and the launcher
// ------------------------------------------------------------------------------------------------ host
enum Family { SIMT = FA_ATTN_KERNEL_SIMT, MMA = FA_ATTN_KERNEL_MMA, WGMMA = FA_ATTN_KERNEL_WGMMA };

struct Plan {
  Params p;
  int family, dt;
};

// the mma.sync family serves 16-bit dtypes with D a multiple of 16 up to 128 whose q, k, v (and grad_out in
// the backward) rows start on 16 bytes (cp.async): NULL when it can, else what is missing
static const char *mma_gap(const fa_attn_geom *g, const void *const *ptrs, bool backward) {
  if (g->dtype != FA_BFLOAT16 && g->dtype != FA_FLOAT16) return "bfloat16 or float16 inputs";
  if (g->D % 16 || g->D == 0 || g->D > 128) return "a head size (last dim) that is a multiple of 16 up to 128";
  const fa_attn_strides *ss[4] = {&g->q, &g->k, &g->v, &g->go};
  for (int t = 0; t < (backward ? 4 : 3); t++) {
    if (!fa_cu_aligned16(ptrs[t])) return backward ? "q, k, v and grad_out aligned to 16 bytes" : "q, k and v aligned to 16 bytes";
    bool ok = ss[t]->h % 8 == 0 && ss[t]->r % 8 == 0;
    for (int d = 0; d < g->nb; d++) ok = ok && ss[t]->b[d] % 8 == 0;
    if (!ok)
      return backward ? "q, k, v and grad_out strides that are multiples of 8 elements"
                      : "q, k and v strides that are multiples of 8 elements";
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
  const char *gap = mma_gap(g, ptrs, backward);
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
  p.bias_inv = 1;
  for (int n = 0; n < p.nred; n++) {
    const int d = p.red[n];
    if ((d == FA_ATTN_MAX_BATCH ? g->bias.h : g->bias.b[d]) != 0) p.bias_inv = 0;
  }
  p.ri = g->gbias.r == 0 && g->Lq > 1;
  p.rj = g->gbias.c == 0 && g->Lk > 1;
  return 0;
}

// the mma kernels may stage bias / mask tiles (stage_bm) when the bias (float32) has unit column stride and
// 16-byte aligned rows, and the mask is absent or a select mask (uint8) with unit column stride and 16-byte
// aligned rows (or shared by the rows: row stride 0); the additive mask keeps the per-score path
static bool stageable(const fa_attn_geom *g, const float *bias, const void *mask) {
  if (g->has_bias) {
    bool ok = fa_cu_aligned16(bias) && g->bias.c == 1 && g->bias.r % 4 == 0 && g->bias.h % 4 == 0;
    for (int d = 0; d < g->nb; d++) ok = ok && g->bias.b[d] % 4 == 0;
    if (!ok) return false;
  }
  if (g->mask_mode == 2) return false;
  if (g->mask_mode == 1) {
    bool ok = fa_cu_aligned16(mask) && g->mask.c == 1 && g->mask.r % 16 == 0 && g->mask.h % 16 == 0;
    for (int d = 0; d < g->nb; d++) ok = ok && g->mask.b[d] % 16 == 0;
    if (!ok) return false;
  }
  return true;
}
// shared memory of staged tiles of rows x 64 (row, key), nbuf buffers, bias pitch bp
static size_t stage_bytes(const fa_attn_geom *g, int rows, int bp, int nbuf) {
  return (g->has_bias ? (size_t)nbuf * rows * bp * sizeof(float) : 0) +
         (g->mask_mode == 1 ? (size_t)nbuf * (g->mask.r == 0 ? 1 : rows) * SMP : 0);
}

// resident CTAs of THREADS threads per SM for kern with smem bytes of dynamic shared memory (registers, shared
// memory with its 1 KB per block reserve, threads); 0 when the runtime cannot say
template <typename... KA>
static int ctas_per_sm(int dev, void (*kern)(KA...), size_t smem) {
  cudaFuncAttributes a;
  int smsm = 0;
  if (cudaFuncGetAttributes(&a, (const void *)kern) != cudaSuccess ||
      cudaDeviceGetAttribute(&smsm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  const int wregs = (a.numRegs * 32 + 255) / 256 * 256;
  const int by_regs = wregs > 0 ? 65536 / (wregs * NW) : 2048 / THREADS;
  const int by_smem = (int)((size_t)smsm / (smem + a.sharedSizeBytes + 1024));
  return min(min(by_regs, by_smem), 2048 / THREADS);
}
// the staged variant (ks, smem_s) unless its shared memory costs residency: it must keep at least
// min(3, the plain variant's) CTAs per SM
template <typename... KA>
static bool pick_staged(int dev, void (*ks)(KA...), size_t smem_s, void (*kp)(KA...), size_t smem_p) {
  return ctas_per_sm(dev, ks, smem_s) >= min(3, ctas_per_sm(dev, kp, smem_p));
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


}  // namespace fa_attn
