// attention_bwd.cu: the attention core's backward on the GPU (fa_cu_attention_backward): delta pre-pass, then
// the SIMT kernels (rows_kernel<BWD> for dQ, dkdv_kernel, dbias_kernel; deterministic in every mode) or the
// mma.sync kernels (mma_bwd_kernel: dK/dV; mma_dq_kernel: dQ; mma_dbias_kernel: dBias of a bias over every
// (row, key); see cuda/attn.cuh), as the planner says.
#include "dense.cuh"
#include "attn.cuh"

namespace fa_attn {

// exp2 of the backward's probabilities, as the forward's ex2_ftz: a subnormal P (< 2^-126) flushes to 0 (nothing
// next to the 16-bit operands); exp2f's non-ftz path costs a compare and two predicated multiplies more per score
__device__ __forceinline__ float bwd_ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// a row's L2 that the fast path below takes: finite (not a lost row, a row past Lq or NaN)
__device__ __forceinline__ bool fin(float L2) { return L2 > -INFINITY && L2 < INFINITY; }

// stage_bm's bias tile of ROWS full rows and 64 keys (thread t: 16 bytes at key 4 (t % 16) of rows
// t / 16 + 8 i), as cp_rows_full (cuda/attn.cuh) copies T rows: the 64-bit row offset added per copy, no
// zero-fill lengths; the same bytes land in the same places.
template <int ROWS, int BP>
__device__ __forceinline__ void cp_bias_full(float *Bs, const float *src, int64_t rs) {
  src += (int64_t)(threadIdx.x >> 4) * rs + (threadIdx.x & 15) * 4;
  const int64_t step = 8 * rs;
  const uint32_t d = smem_addr(Bs + (threadIdx.x >> 4) * BP + (threadIdx.x & 15) * 4);
#pragma unroll
  for (int i = 0; i < ROWS / 8; i++, src += step)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d + i * 8 * BP * 4), "l"(src) : "memory");
}
// a T tile (cp_tile) and a staged bias / mask tile (stage_bm), by the full-tile copies above where they apply
template <typename T, int D, int ROWS>
__device__ __forceinline__ void cp_tile_rows(T *dst, const T *src, int64_t rs, int valid) {
  if constexpr (FULL_ROWS<D, ROWS>) {
    if (valid == ROWS) {
      cp_rows_full<T, D, ROWS>(dst, src, rs);
      return;
    }
  }
  cp_tile<T, D>(dst, src, rs, ROWS, valid);
}
template <int ROWS, int BP>
__device__ __forceinline__ void stage_tiles(const fa_attn_geom &g, float *Bs, unsigned char *Ms, const float *bb,
                                            const unsigned char *mb, int nr, int nk) {
  static_assert(ROWS % 8 == 0 && THREADS == 128, "16 threads per bias row, 8 rows per pass");
  if (bb && nr == ROWS && nk == 64) {
    cp_bias_full<ROWS, BP>(Bs, bb, g.bias.r);
    bb = nullptr;
  }
  stage_bm<ROWS, BP>(g, Bs, Ms, bb, mb, nr, nk);
}

// The fast per-score path of the three backward kernels (ST, no dropout, every row of the tile inside Lq with a
// finite L2, so that no kept key's score was NaN or +inf in the forward; key limits lim = +inf (kept) or -inf
// (masked or past Lk)): logit2's arithmetic on the staged bias, the limit by fminf (a NaN score of a left-out key
// still becomes -inf), P = exp2((x - L2) - C2), dS = P (dP - delta), and dS = 0 where P = 0 (a left-out key: as
// the per-score path's skip, even for a non-finite dP)
__device__ __forceinline__ void bwd_score(float s, float dp, float b, float lim, float scale2, float L2, float C2,
                                          float dl, float &pv, float &ds) {
  float x = fmaf(b, FA_ATTN_LOG2E, s * scale2);
  x = fminf(x, lim);
  const float ex = bwd_ex2((x - L2) - C2);
  pv = ex;
  ds = ex == 0.f ? 0.f : ex * (dp - dl);
}

// The row statistics (RowStats, cuda/attn.cuh) in st[0, n), st[n, 2n), st[2n, 3n) (n = Z*H*Lq rows): delta =
// rowsum(dO * O) in float32 (a warp per row, fa_attn_rowdot's order); L2, C2 from lse, or for a coarse row from
// its scores, recomputed here by logit2 over every key (such rows are rare: a padding row under OpenFold's
// additive mask). A CTA per (z*H + h, DELTA_R rows), a warp per DELTA_R / NW rows taken 4 at a time: the 64-bit
// divisions and the batch coordinates once per CTA, not per row.
constexpr int DELTA_R = 64;
template <typename T>
__device__ __forceinline__ void delta_coarse(const Params &p, const FaAttnBatch &b, int64_t h, int64_t i, int lane,
                                          const T *q, const T *k, const float *bias, const void *mask, float &L2,
                                          float &C2) {
  const fa_attn_geom &g = p.g;
  const T *qr = q + fa_attn_off(g.q, b, h, i), *kb = k + fa_attn_off(g.k, b, h / p.G, 0);
  const float *brow = g.has_bias ? bias + fa_attn_off(g.bias, b, h, i) : nullptr;
  const void *mrow = g.mask_mode == 1 ? (const void *)((const unsigned char *)mask + fa_attn_off(g.mask, b, h, i))
                     : g.mask_mode == 2 ? (const void *)((const float *)mask + fa_attn_off(g.mask, b, h, i))
                                        : nullptr;
  float m = -INFINITY, l = 0.f;  // online over the lane's keys, then across the lanes
  for (int64_t j = lane; j < g.Lk; j += 32) {
    float dot = 0.f;
    for (int64_t d = 0; d < g.D; d++) dot = fmaf(fa_to_f<T>(qr[d]), fa_to_f<T>(kb[j * g.k.r + d]), dot);
    const float x = logit2(p, dot, brow, mrow, j);
    if (x == -INFINITY) continue;
    if (x > m) {
      l = l * fa_attn_exp(m, x) + 1.f;
      m = x;
    } else {
      l += exp2f(x - m);
    }
  }
  const float mx = fa_cu_warp_max(m);
  l = fa_cu_warp_sum(mx == -INFINITY ? 0.f : l * fa_attn_exp(m, mx));
  if (mx != -INFINITY) {
    L2 = mx;
    C2 = log2f(l);
  }
}
template <typename T>
__global__ void __launch_bounds__(THREADS) delta_kernel(Params p, float *st, const T *go, const T *o, const T *q,
                                                        const T *k, const float *lse, const float *bias,
                                                        const void *mask) {
  constexpr int RW = DELTA_R / NW;
  const fa_attn_geom &g = p.g;
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, D = (int)g.D;
  const int64_t rows = g.Z * g.H * g.Lq, ntiles = (g.Lq + DELTA_R - 1) / DELTA_R;
  const int64_t zh = blockIdx.x / ntiles, i0 = (blockIdx.x - zh * ntiles) * DELTA_R + w * RW;
  const int64_t z = zh / g.H, h = zh - z * g.H;
  const FaAttnBatch b = fa_attn_batch(g, z);
  const T *gob = go + fa_attn_off(g.go, b, h, i0), *ob = o + fa_attn_off(g.o, b, h, i0);
  const float *lb = lse + fa_attn_off(g.lse, b, h, i0);
  const int n = (int)min((int64_t)RW, g.Lq - i0);
  for (int r0 = 0; r0 < n; r0 += 4) {
    float s[4], L[4];
#pragma unroll
    for (int u = 0; u < 4; u++) {
      s[u] = 0.f;
      L[u] = r0 + u < n ? lb[(r0 + u) * g.lse.r] : 0.f;
    }
    for (int d = lane; d < D; d += 32)
#pragma unroll
      for (int u = 0; u < 4; u++)
        if (r0 + u < n)
          s[u] = fmaf(fa_to_f<T>(gob[(r0 + u) * g.go.r + d]), fa_to_f<T>(ob[(r0 + u) * g.o.r + d]), s[u]);
#pragma unroll
    for (int u = 0; u < 4; u++) s[u] = fa_cu_warp_sum(s[u]);
#pragma unroll
    for (int u = 0; u < 4; u++) {
      if (r0 + u >= n) break;
      const int64_t i = i0 + r0 + u, r = zh * g.Lq + i;
      float L2 = L[u] * FA_ATTN_LOG2E, C2 = 0.f;
      if (fabsf(L[u]) >= 1024.f && L[u] != INFINITY) delta_coarse<T>(p, b, h, i, lane, q, k, bias, mask, L2, C2);
      if (lane == 0) {
        st[r] = s[u];
        st[rows + r] = L2;
        st[2 * rows + r] = C2;
      }
    }
  }
}
// element v (a constant after unrolling) of 16 bytes held as 4 words, as fa_to_f<T> gives it (little-endian halves)
template <typename T>
__device__ __forceinline__ float vec_elem(const uint32_t (&w)[4], int v) {
  return __uint_as_float(w[v]);  // float
}
template <>
__device__ __forceinline__ float vec_elem<__nv_bfloat16>(const uint32_t (&w)[4], int v) {
  return __uint_as_float(v & 1 ? w[v >> 1] & 0xffff0000u : w[v >> 1] << 16);
}
template <>
__device__ __forceinline__ float vec_elem<__half>(const uint32_t (&w)[4], int v) {
  return __half2float(__ushort_as_half((unsigned short)(v & 1 ? w[v >> 1] >> 16 : w[v >> 1] & 0xffffu)));
}
// delta_kernel with a thread per row (delta_vec() below: rows of 16-byte aligned chunks): a CTA per (z*H + h,
// THREADS rows), each thread loads its row of dO and O by 16-byte loads, all in flight at once, and forms delta
// in delta_kernel's order exactly: s[l] plays lane l's fmaf chain over d = l, l + 32, ..., then fa_cu_warp_sum's
// xor tree (after the level of offset o every lane l holds s[l % o], so s[l] += s[l + o] for l < o): the same
// float ops, bit-identical delta. L2 and C2 as there; coarse rows (rare) one at a time by the whole warp.
// (The warp-per-row kernel kept each warp's loads at 4 rows x 64 bytes and ran at ~0.6 TB/s: 1.05 ms at N = 1024.)
template <int O>
__device__ __forceinline__ void tree_level(float (&s)[32]) {
#pragma unroll
  for (int l = 0; l < O; l++) s[l] = s[l] + s[l + O];
}
template <typename T>
__global__ void __launch_bounds__(THREADS) delta_vec_kernel(Params p, float *st, const T *go, const T *o, const T *q,
                                                            const T *k, const float *lse, const float *bias,
                                                            const void *mask) {
  constexpr int EL = 16 / (int)sizeof(T), QN = 32 / EL;  // elements per 16-byte load; loads per 32 elements
  const fa_attn_geom &g = p.g;
  const int lane = threadIdx.x & 31, D = (int)g.D;
  const int64_t rows = g.Z * g.H * g.Lq, ntiles = (g.Lq + THREADS - 1) / THREADS;
  const int64_t zh = blockIdx.x / ntiles, i0 = (blockIdx.x - zh * ntiles) * THREADS;
  const int64_t z = zh / g.H, h = zh - z * g.H, i = i0 + threadIdx.x;
  const FaAttnBatch b = fa_attn_batch(g, z);
  const bool rv = i < g.Lq;
  float s[32];
#pragma unroll
  for (int l = 0; l < 32; l++) s[l] = 0.f;
  float L = 0.f;
  if (rv) {
    const T *gr = go + fa_attn_off(g.go, b, h, i), *orow = o + fa_attn_off(g.o, b, h, i);
    L = lse[fa_attn_off(g.lse, b, h, i)];
    for (int c = 0; c < D; c += 32) {
      uint4 a[QN], e[QN];
#pragma unroll
      for (int u = 0; u < QN; u++)
        if (c + u * EL < D) {
          a[u] = __ldg(reinterpret_cast<const uint4 *>(gr + c + u * EL));
          e[u] = __ldg(reinterpret_cast<const uint4 *>(orow + c + u * EL));
        }
#pragma unroll
      for (int u = 0; u < QN; u++)
        if (c + u * EL < D) {
          const uint32_t x[4] = {a[u].x, a[u].y, a[u].z, a[u].w}, y[4] = {e[u].x, e[u].y, e[u].z, e[u].w};
#pragma unroll
          for (int v = 0; v < EL; v++)
            s[u * EL + v] = fmaf(vec_elem<T>(x, v), vec_elem<T>(y, v), s[u * EL + v]);
        }
    }
  }
  tree_level<16>(s);  // fa_cu_warp_sum's levels, each with a constant offset (s stays in registers)
  tree_level<8>(s);
  tree_level<4>(s);
  tree_level<2>(s);
  tree_level<1>(s);
  float L2 = L * FA_ATTN_LOG2E, C2 = 0.f;
  unsigned cm = __ballot_sync(FULL, rv && fabsf(L) >= 1024.f && L != INFINITY);
  while (cm) {  // warp-uniform
    const int src = __ffs(cm) - 1;
    cm &= cm - 1;
    const float Ls = __shfl_sync(FULL, L, src);
    float a2 = Ls * FA_ATTN_LOG2E, c2 = 0.f;
    delta_coarse<T>(p, b, h, i - lane + src, lane, q, k, bias, mask, a2, c2);
    if (lane == src) {
      L2 = a2;
      C2 = c2;
    }
  }
  if (rv) {
    const int64_t r = zh * g.Lq + i;
    st[r] = s[0];
    st[rows + r] = L2;
    st[2 * rows + r] = C2;
  }
}
// delta_vec_kernel applies: dO and O rows of whole 16-byte chunks at 16-byte aligned addresses for every (z, h, i)
template <typename T>
static bool delta_vec(const fa_attn_geom *g, const void *go, const void *o) {
  const int64_t el = 16 / (int64_t)sizeof(T);
  if (g->D % el || ((uintptr_t)go & 15) || ((uintptr_t)o & 15)) return false;
  auto ok = [&](const fa_attn_strides &s) {
    if (s.h % el || s.r % el) return false;
    for (int d = 0; d < g->nb; d++)
      if (s.b[d] % el) return false;
    return true;
  };
  return ok(g->go) && ok(g->o);
}

// Backward, key-tile major: a CTA owns 64 keys of one (z, kv head) (16 per warp) and loops over the G query
// heads and the query rows in tiles of BQ. Per tile each warp forms S^T = K Q^T and dP^T = V dO^T for its 16
// keys (K, V fragments by ldmatrix, Q and dO as the col-major B operand), P^T = exp2(S^T - lse) and
// dS^T = P^T (dP^T - delta) in registers, and accumulates dV += P^T dO and dK += dS^T Q in registers (the
// accumulator layout is the next A operand): dK, dV written once, no atomics. dBias (gbias != NULL, the
// non-deterministic mode) adds dS from a float32 copy of the tile in shared memory, summed over the tile's
// rows first when the bias is shared by every row. dQ comes from mma_dq_kernel. The (head, query tile) pairs
// are one flat loop whose next tile (Q, dO, lse, delta; with ST the bias / select-mask tiles, stage_bm, read
// key-major) streams in by cp.async while the current one is used.
template <typename T, int D, int BQ, bool ST>
__global__ void __launch_bounds__(THREADS, D <= 32 ? 3 : 1) mma_bwd_kernel(Params p, T *gk, T *gv, float *gbias, const T *q,
                                                          const T *k, const T *v, const float *bias, const void *mask,
                                                          const T *go, RowStats rs) {
  constexpr int PD = D + 8, KD = D / 16, NQ = BQ / 8, OT = D / 8, PF = BQ + 1;
  extern __shared__ __align__(16) unsigned char smraw[];
  // K, V; Q and dO double-buffered (Q0 dO0 Q1 dO1); L2, delta, C2 (2 buffers of 3 x BQ); Sf; ST: 2 bias
  // tiles (BQ x SBT), 2 mask tiles (mrows x SMP)
  T *Ks = (T *)smraw, *Vs = Ks + 64 * PD, *QO = Vs + 64 * PD;
  float *LD = (float *)(QO + 4 * BQ * PD), *Sf = LD + 6 * BQ;
  const fa_attn_geom &g = p.g;
  float *Bs = Sf + (gbias ? 64 * PF : 0);
  unsigned char *Ms = (unsigned char *)(Bs + (g.has_bias ? 2 * BQ * SBT : 0));
  const int mrows = g.mask.r == 0 ? 1 : BQ;
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

  // the (query head, query tile) pairs in order, flattened: tile t+1 streams in while tile t is used
  const int64_t qt = (g.Lq + BQ - 1) / BQ, nt = p.G * qt;
  // (query head, first row) of the next tile to fetch and of the tile in use, counted instead of divided
  int64_t fgh = 0, fi0 = 0, cgh = 0, ci0 = 0;
  auto fetch = [&](int buf) {  // one commit group per tile, in order
    const int64_t gh = fgh, i0 = fi0, h = hk * p.G + gh, zh = z * g.H + h;
    if ((fi0 += BQ) >= g.Lq) {
      fi0 = 0;
      fgh++;
    }
    const int nr = (int)min((int64_t)BQ, g.Lq - i0);
    T *Qb = QO + buf * 2 * BQ * PD;
    cp_tile_rows<T, D, BQ>(Qb, q + fa_attn_off(g.q, b, h, i0), g.q.r, nr);
    cp_tile_rows<T, D, BQ>(Qb + BQ * PD, go + fa_attn_off(g.go, b, h, i0), g.go.r, nr);
    if (ST)
      stage_tiles<BQ, SBT>(g, Bs + buf * BQ * SBT, Ms + buf * mrows * SMP,
                           g.has_bias ? bias + fa_attn_off(g.bias, b, h, i0) + j0 : nullptr,
                           g.mask_mode == 1 ? (const unsigned char *)mask + fa_attn_off(g.mask, b, h, i0) + j0 : nullptr,
                           nr, nk);
    float *Lb = LD + buf * 3 * BQ;
    for (int r = threadIdx.x; r < BQ; r += THREADS) {
      const int64_t e = zh * g.Lq + i0 + min(r, nr - 1);
      cp4(Lb + r, rs.L2 + e, r < nr);
      cp4(Lb + BQ + r, rs.delta + e, r < nr);
      cp4(Lb + 2 * BQ + r, rs.C2 + e, r < nr);
    }
    cp_commit();
  };
  if (nt > 0) fetch(0);
  for (int64_t it = 0; it < nt; it++) {
    const int buf = (int)(it & 1);
    if (it + 1 < nt) {
      fetch(buf ^ 1);
      cp_wait_group<1>();
    } else {
      cp_wait_all();
    }
    __syncthreads();
    const int64_t gh = cgh, i0 = ci0, h = hk * p.G + gh, zh = z * g.H + h;
    if ((ci0 += BQ) >= g.Lq) {
      ci0 = 0;
      cgh++;
    }
    const int nr = (int)min((int64_t)BQ, g.Lq - i0);
    const float *bb = g.has_bias ? bias + fa_attn_off(g.bias, b, h, 0) : nullptr;
    const unsigned char *mb8 = g.mask_mode == 1 ? (const unsigned char *)mask + fa_attn_off(g.mask, b, h, 0) : nullptr;
    const float *mbf = g.mask_mode == 2 ? (const float *)mask + fa_attn_off(g.mask, b, h, 0) : nullptr;
    const T *Qs = QO + buf * 2 * BQ * PD, *Os = Qs + BQ * PD;
    const float *Lr = LD + buf * 3 * BQ, *Dls = Lr + BQ, *Cr = Lr + 2 * BQ;  // L2, delta, C2 (rows < nr)
    const float *Bt = Bs + buf * BQ * SBT;
    const unsigned char *Mt = Ms + buf * mrows * SMP;
    {
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
      // ST fast path (bwd_score): a full tile of rows with finite L2, no dropout, the mask absent or shared by the
      // rows (this thread's two keys then have one limit each for the whole tile)
      bool fast = false;
      float lim[2] = {0.f, 0.f};
      if constexpr (ST) {
        bool ok = nr == BQ && p.pdrop <= 0.f && (!mb8 || mrows == 1);
        for (int r = lane; r < BQ; r += 32) ok = ok && fin(Lr[r]);
        fast = __all_sync(FULL, ok);
#pragma unroll
        for (int u = 0; u < 2; u++) lim[u] = kv[u] && (!mb8 || Mt[w * 16 + gi + 8 * u] != 0) ? INFINITY : -INFINITY;
      }
      if (fast) {
#pragma unroll
        for (int n = 0; n < NQ; n++) {
          const int il = n * 8 + 2 * ti;
          const float2 L = *reinterpret_cast<const float2 *>(Lr + il), C = *reinterpret_cast<const float2 *>(Cr + il),
                       Dd = *reinterpret_cast<const float2 *>(Dls + il);
          float pe[4], de[4];
#pragma unroll
          for (int e = 0; e < 4; e++) {
            const int u = e >> 1, c = e & 1, jl = w * 16 + gi + 8 * u;
            bwd_score(st[n][e], dpt[n][e], bb ? Bt[(il + c) * SBT + jl] : 0.f, lim[u], p.scale2, c ? L.y : L.x,
                      c ? C.y : C.x, c ? Dd.y : Dd.x, pe[e], de[e]);
            if (gbias) Sf[jl * PF + il + c] = de[e];
          }
          pa[n >> 1][(n & 1) * 2] = Mma<T>::pack(pe[0], pe[1]);
          pa[n >> 1][(n & 1) * 2 + 1] = Mma<T>::pack(pe[2], pe[3]);
          da[n >> 1][(n & 1) * 2] = Mma<T>::pack(de[0], de[1]);
          da[n >> 1][(n & 1) * 2 + 1] = Mma<T>::pack(de[2], de[3]);
        }
      } else
#pragma unroll
      for (int n = 0; n < NQ; n++) {
        float pe[4], de[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int u = e >> 1, il = n * 8 + 2 * ti + (e & 1);
          const int64_t j = kj[u], i = i0 + il;
          const float L2 = il < nr ? Lr[il] : INFINITY;  // +inf: past Lq (P = 0); -inf: lost
          float pv = 0.f, ds = 0.f;
          if (kv[u] && L2 != INFINITY) {
            if (L2 == -INFINITY) {
              pv = p.invLk;
            } else {
              float x = st[n][e] * p.scale2;
              if constexpr (ST) {
                const int jl = w * 16 + gi + 8 * u;
                if (bb) x = fmaf(Bt[il * SBT + jl], FA_ATTN_LOG2E, x);
                if (mb8 && Mt[(mrows == 1 ? 0 : il) * SMP + jl] == 0) x = -INFINITY;
              } else {
                if (bb) x = fmaf(bb[i * g.bias.r + j * g.bias.c], FA_ATTN_LOG2E, x);
                if (mb8 && mb8[i * g.mask.r + j * g.mask.c] == 0) x = -INFINITY;
                if (mbf) x = fmaf(p.mscale2, mbf[i * g.mask.r + j * g.mask.c] - 1.f, x);
              }
              if (x != -INFINITY) {
                const float ex = exp2f((x - L2) - Cr[il]), f = drop_factor(p, (zh * g.Lq + i) * g.Lk + j);
                pv = ex * f;
                ds = ex * (dpt[n][e] * f - Dls[il]);
              }
            }
          }
          pe[e] = pv;
          de[e] = ds;
          if (gbias) Sf[(w * 16 + gi + 8 * u) * PF + il] = ds;
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
      if (gbias) {
        __syncthreads();
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
    __syncthreads();  // before the next fetch overwrites this tile's buffers (and Sf is written again)
  }
  cp_wait_all();  // no query rows: the K/V copies are still in flight
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

// dQ on the tensor cores, query-major (no atomics, deterministic): a CTA takes 64 query rows of one (z, h) as
// the forward does (Q and dO fragments in registers, K/V tiles double-buffered by cp.async) and per key tile
// recomputes S = Q K^T and dP = dO V^T, forms dS = P (dP - delta) in registers and adds dS K (K as the
// row-major B operand through ldmatrix.trans): dQ written once.
template <typename T, int D, bool ST>
__global__ void __launch_bounds__(THREADS, D <= 48 ? 3 : 1) mma_dq_kernel(Params p, T *gq, const T *q, const T *k, const T *v,
                                                         const float *bias, const void *mask, const T *go,
                                                         RowStats rs) {
  constexpr int PD = D + 8, KD = D / 16, NT = MBN / 8, OT = D / 8;
  extern __shared__ __align__(16) unsigned char smraw[];
  T *Qs = (T *)smraw, *Os = Qs + MBM * PD, *KV = Os + MBM * PD;  // K/V double-buffered: K0 V0 K1 V1
  const fa_attn_geom &g = p.g;
  float *Bs = (float *)(KV + 4 * MBN * PD);  // ST: 2 bias tiles (MBM x SBP), then 2 mask tiles (mrows x SMP)
  unsigned char *Ms = (unsigned char *)(Bs + (g.has_bias ? 2 * MBM * SBP : 0));
  const int mrows = g.mask.r == 0 ? 1 : MBM;
  // ST with no mask or a key-vector one (kvec): 2 key-limit rows (+inf kept, -inf masked or past Lk), loaded into
  // wreg by threads < MBN when a tile is fetched and stored once the load had a tile's time to land (the forward's)
  float *Wf = (float *)(Ms + (g.mask_mode == 1 ? 2 * mrows * SMP : 0));
  const bool kvec = g.mask_mode == 0 || g.mask.r == 0;
  float wreg = 0.f;
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, gi = lane >> 2, ti = lane & 3;
  const int64_t ntiles = (g.Lq + MBM - 1) / MBM;
  const int64_t zh = blockIdx.x / ntiles, row0 = (blockIdx.x % ntiles) * MBM;
  const int64_t z = zh / g.H, h = zh % g.H, hk = h / p.G;
  const FaAttnBatch b = fa_attn_batch(g, z);
  const int nrow = (int)min((int64_t)MBM, g.Lq - row0);
  cp_tile<T, D>(Qs, q + fa_attn_off(g.q, b, h, row0), g.q.r, MBM, nrow);
  cp_tile<T, D>(Os, go + fa_attn_off(g.go, b, h, row0), g.go.r, MBM, nrow);
  cp_commit();
  const T *kb = k + fa_attn_off(g.k, b, hk, 0), *vb = v + fa_attn_off(g.v, b, hk, 0);
  const float *bt = ST && g.has_bias ? bias + fa_attn_off(g.bias, b, h, row0) : nullptr;
  const unsigned char *mt =
      ST && g.mask_mode == 1 ? (const unsigned char *)mask + fa_attn_off(g.mask, b, h, row0) : nullptr;
  auto fetch = [&](int64_t j0, int buf) {
    const int nk = (int)min((int64_t)MBN, g.Lk - j0);
    cp_tile_rows<T, D, MBN>(KV + buf * 2 * MBN * PD, kb + j0 * g.k.r, g.k.r, nk);
    cp_tile_rows<T, D, MBN>(KV + (buf * 2 + 1) * MBN * PD, vb + j0 * g.v.r, g.v.r, nk);
    if (ST) {
      stage_tiles<MBM, SBP>(g, Bs + buf * MBM * SBP, Ms + buf * mrows * SMP, bt ? bt + j0 : nullptr,
                            mt ? mt + j0 : nullptr, nrow, nk);
      if (kvec && threadIdx.x < MBN) wreg = (int)threadIdx.x < nk && (!mt || mt[j0 + threadIdx.x]) ? INFINITY : -INFINITY;
    }
    cp_commit();
  };
  if (g.Lk > 0) {
    fetch(0, 0);
    if (ST && kvec && threadIdx.x < MBN) Wf[threadIdx.x] = wreg;
    cp_wait_group<1>();
  } else {
    cp_wait_all();
  }
  __syncthreads();
  uint32_t qf[KD][4], of[KD][4];
#pragma unroll
  for (int kk = 0; kk < KD; kk++) {
    ldsm_x4(qf[kk], Qs + (w * 16 + (lane & 15)) * PD + kk * 16 + (lane >> 4) * 8);
    ldsm_x4(of[kk], Os + (w * 16 + (lane & 15)) * PD + kk * 16 + (lane >> 4) * 8);
  }
  int64_t ri[2];
  bool live[2];  // a row inside Lq with at least one key kept (lse > -inf)
  const float *brow[2];
  const void *mrow[2];
  float L2[2], C2[2], dl[2], acc[OT][4];
#pragma unroll
  for (int u = 0; u < 2; u++) {
    ri[u] = row0 + w * 16 + gi + 8 * u;
    const bool rv = ri[u] < g.Lq;
    L2[u] = rv ? rs.L2[zh * g.Lq + ri[u]] : -INFINITY;
    C2[u] = rv ? rs.C2[zh * g.Lq + ri[u]] : 0.f;
    live[u] = rv && L2[u] != -INFINITY;
    dl[u] = rv ? rs.delta[zh * g.Lq + ri[u]] : 0.f;
    brow[u] = g.has_bias && rv ? bias + fa_attn_off(g.bias, b, h, ri[u]) : nullptr;
    mrow[u] = g.mask_mode == 1 && rv   ? (const void *)((const unsigned char *)mask + fa_attn_off(g.mask, b, h, ri[u]))
              : g.mask_mode == 2 && rv ? (const void *)((const float *)mask + fa_attn_off(g.mask, b, h, ri[u]))
                                       : nullptr;
  }
#pragma unroll
  for (int t = 0; t < OT; t++) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
  // ST fast path (bwd_score): the warp's 16 rows inside Lq with a finite L2, no dropout, key limits; D <= 64
  // (at D = 128 its registers spill)
  const bool fast = ST && D <= 64 && kvec && p.pdrop <= 0.f &&
                    __all_sync(FULL, ri[1] < g.Lq && fin(L2[0]) && fin(L2[1]));

  for (int64_t j0 = 0, it = 0; j0 < g.Lk; j0 += MBN, it++) {
    const T *Ks = KV + (it & 1) * 2 * MBN * PD, *Vs = Ks + MBN * PD;
    if (j0 + MBN < g.Lk) {
      fetch(j0 + MBN, (int)(it & 1) ^ 1);
      cp_wait_group<1>();
    } else {
      cp_wait_all();
    }
    __syncthreads();
    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; kk++)
#pragma unroll
      for (int n2 = 0; n2 < NT / 2; n2++) {
        uint32_t bk[4], bv[4];
        const int o = (n2 * 16 + (lane & 7) + (lane >> 4) * 8) * PD + kk * 16 + ((lane >> 3) & 1) * 8;
        ldsm_x4(bk, Ks + o);
        ldsm_x4(bv, Vs + o);
        Mma<T>::mma(s[2 * n2], qf[kk], bk[0], bk[1]);
        Mma<T>::mma(s[2 * n2 + 1], qf[kk], bk[2], bk[3]);
        Mma<T>::mma(dp[2 * n2], of[kk], bv[0], bv[1]);
        Mma<T>::mma(dp[2 * n2 + 1], of[kk], bv[2], bv[3]);
      }
    uint32_t da[MBN / 16][4];
    const float *Bt = Bs + (it & 1) * MBM * SBP;
    const unsigned char *Mt = Ms + (it & 1) * mrows * SMP;
    if (fast) {
      const float *Wt = Wf + (it & 1) * MBN;
#pragma unroll
      for (int n = 0; n < NT; n++) {
        const int cl = n * 8 + 2 * ti;
        const float2 wv = *reinterpret_cast<const float2 *>(Wt + cl);
        float de[4];
#pragma unroll
        for (int u = 0; u < 2; u++) {
          const float2 bv = bt ? *reinterpret_cast<const float2 *>(Bt + (w * 16 + gi + 8 * u) * SBP + cl)
                               : make_float2(0.f, 0.f);
          float pv;
          bwd_score(s[n][2 * u], dp[n][2 * u], bv.x, wv.x, p.scale2, L2[u], C2[u], dl[u], pv, de[2 * u]);
          bwd_score(s[n][2 * u + 1], dp[n][2 * u + 1], bv.y, wv.y, p.scale2, L2[u], C2[u], dl[u], pv, de[2 * u + 1]);
        }
        da[n >> 1][(n & 1) * 2] = Mma<T>::pack(de[0], de[1]);
        da[n >> 1][(n & 1) * 2 + 1] = Mma<T>::pack(de[2], de[3]);
      }
    } else
#pragma unroll
    for (int n = 0; n < NT; n++) {
      float de[4];
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int u = e >> 1;
        const int64_t j = j0 + n * 8 + 2 * ti + (e & 1);
        float ds = 0.f;
        if (live[u] && j < g.Lk) {
          float x;
          if constexpr (ST) {  // logit2's arithmetic on the staged values
            const int rl = w * 16 + gi + 8 * u, cl = n * 8 + 2 * ti + (e & 1);
            x = s[n][e] * p.scale2;
            if (bt) x = fmaf(Bt[rl * SBP + cl], FA_ATTN_LOG2E, x);
            if (mt && Mt[(mrows == 1 ? 0 : rl) * SMP + cl] == 0) x = -INFINITY;
          } else {
            x = logit2(p, s[n][e], brow[u], mrow[u], j);
          }
          if (x != -INFINITY) {
            const float ex = exp2f((x - L2[u]) - C2[u]);
            ds = ex * (dp[n][e] * drop_factor(p, (zh * g.Lq + ri[u]) * g.Lk + j) - dl[u]);
          }
        }
        de[e] = ds;
      }
      da[n >> 1][(n & 1) * 2] = Mma<T>::pack(de[0], de[1]);
      da[n >> 1][(n & 1) * 2 + 1] = Mma<T>::pack(de[2], de[3]);
    }
#pragma unroll
    for (int kk = 0; kk < MBN / 16; kk++)
#pragma unroll
      for (int d2 = 0; d2 < D / 16; d2++) {
        uint32_t bk[4];
        ldsm_x4_t(bk, Ks + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * PD + d2 * 16 + (lane >> 4) * 8);
        Mma<T>::mma(acc[2 * d2], da[kk], bk[0], bk[1]);
        Mma<T>::mma(acc[2 * d2 + 1], da[kk], bk[2], bk[3]);
      }
    // the next tile's limits, fetched above: the reads of that buffer ended at this iteration's first barrier
    if (ST && kvec && threadIdx.x < MBN && j0 + MBN < g.Lk) Wf[((it + 1) & 1) * MBN + threadIdx.x] = wreg;
    __syncthreads();
  }
  const float sc = (float)g.scale;
#pragma unroll
  for (int u = 0; u < 2; u++) {
    if (ri[u] >= g.Lq) continue;
    T *row = gq + fa_attn_off(g.gq, b, h, ri[u]);
#pragma unroll
    for (int t = 0; t < OT; t++) {
      const int d = t * 8 + 2 * ti;
      row[d] = fa_from_f<T>(acc[t][2 * u] * sc);
      row[d + 1] = fa_from_f<T>(acc[t][2 * u + 1] * sc);
    }
  }
}

// dBias on the tensor cores when the bias spans every (row, key) (no broadcast over rows or keys; the
// triangle's bias is shared by the batch rows i): a CTA owns a 64 x 64 tile of the gradient for one
// combination of its own outer dims and loops, in a fixed order, over its broadcast outer dims (dbias_kernel's
// plan), recomputing S and dP for each (Q, dO, K, V tiles double-buffered by cp.async) and adding dS in
// registers: one writer per element, no atomics, deterministic.
// ST (needs stageable() and p.bias_inv: the bias is the same for every broadcast combination): the bias tile is
// read once into shared memory, the select-mask tile of each combination comes by cp.async with Q, dO, K, V.
template <typename T, int D, bool ST>
__global__ void __launch_bounds__(THREADS, ST || D >= 64 ? 3 : 1) mma_dbias_kernel(Params p, float *gbias, float *part, int64_t nch,
                                                            const T *q, const T *k, const T *v, const float *bias,
                                                            const void *mask, const T *go, RowStats rs) {
  constexpr int PD = D + 8, KD = D / 16, NT = MBN / 8, TILE = 2 * (MBM + MBN) * PD;
  extern __shared__ __align__(16) unsigned char smraw[];
  T *buf0 = (T *)smraw;  // per buffer: Q, dO (MBM rows), K, V (MBN rows)
  const fa_attn_geom &g = p.g;
  // ST: the bias tile (MBM x SBP); the row statistics (2 buffers of L2, delta, C2 x MBM); ST: 2 mask tiles (mrows x SMP)
  float *Bsm = (float *)(buf0 + 2 * TILE), *LDb = Bsm + (ST ? MBM * SBP : 0);
  unsigned char *Ms = (unsigned char *)(LDb + 6 * MBM);
  const int mrows = g.mask.r == 0 ? 1 : MBM;
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, gi = lane >> 2, ti = lane & 3;
  const int64_t itiles = (g.Lq + MBM - 1) / MBM, jtiles = (g.Lk + MBN - 1) / MBN;
  int64_t blk = blockIdx.x;
  const int64_t jt = blk % jtiles;
  blk /= jtiles;
  const int64_t it = blk % itiles;
  blk /= itiles;
  const int64_t kz = blk % p.nkeep_all, ch = blk / p.nkeep_all;  // ch: this CTA's chunk of the nch
  const int64_t per = (p.nred_all + nch - 1) / nch, r0 = ch * per, r1 = min(p.nred_all, r0 + per);
  const int64_t i0 = it * MBM, j0 = jt * MBN;
  const int nr = (int)min((int64_t)MBM, g.Lq - i0), nk = (int)min((int64_t)MBN, g.Lk - j0);
  int64_t co[MAXO];
  for (int d = 0; d < MAXO; d++) co[d] = 0;
  int64_t gbo = 0;
  {
    int64_t x = kz;
    for (int n = p.nkeep - 1; n >= 0; n--) {
      const int d = p.keep[n];
      co[d] = x % p.osize[d];
      x /= p.osize[d];
      gbo += co[d] * p.ostride[d];
    }
  }
  // the outer coordinates of the rz-th broadcast combination: batch index, its coordinates, head
  auto outer = [&](int64_t rz, FaAttnBatch &b, int64_t &z, int64_t &h) {
    for (int n = p.nred - 1; n >= 0; n--) {
      const int d = p.red[n];
      co[d] = rz % p.osize[d];
      rz /= p.osize[d];
    }
    z = 0;
    for (int d = 0; d < FA_ATTN_MAX_BATCH; d++) {
      b.c[d] = d < g.nb ? co[d] : 0;
      if (d < g.nb) z = z * g.bs[d] + co[d];
    }
    h = co[FA_ATTN_MAX_BATCH];
  };
  // lin: one broadcast dim and it is a batch dim (the triangle's rows i): the offsets of combination rz are
  // those of r0 plus (rz - r0) steps, set up once per CTA (lo[0..5]: q, dO, K, V, mask offsets and zh at r0;
  // lo[6..11]: their steps) instead of outer()'s 64-bit divisions and fa_attn_off's sums per combination
  __shared__ int64_t lo[12];
  const bool lin = p.nred == 1 && p.red[0] < g.nb;
  if (lin && threadIdx.x == 0 && r0 < r1) {
    FaAttnBatch b;
    int64_t z, h;
    outer(r0, b, z, h);
    const int d = p.red[0];
    int64_t zs = 1;
    for (int e = d + 1; e < g.nb; e++) zs *= g.bs[e];
    lo[0] = fa_attn_off(g.q, b, h, i0);
    lo[1] = fa_attn_off(g.go, b, h, i0);
    lo[2] = fa_attn_off(g.k, b, h / p.G, j0);
    lo[3] = fa_attn_off(g.v, b, h / p.G, j0);
    lo[4] = g.mask_mode == 1 ? fa_attn_off(g.mask, b, h, i0) + j0 : 0;
    lo[5] = z * g.H + h;
    lo[6] = g.q.b[d];
    lo[7] = g.go.b[d];
    lo[8] = g.k.b[d];
    lo[9] = g.v.b[d];
    lo[10] = g.mask_mode == 1 ? g.mask.b[d] : 0;
    lo[11] = zs * g.H;
  }
  __syncthreads();
  auto fetch = [&](int64_t rz, int bi) {
    int64_t oq, ogo, okk, ov, om, zh;
    if (lin) {
      const int64_t dr = rz - r0;
      oq = lo[0] + dr * lo[6];
      ogo = lo[1] + dr * lo[7];
      okk = lo[2] + dr * lo[8];
      ov = lo[3] + dr * lo[9];
      om = lo[4] + dr * lo[10];
      zh = lo[5] + dr * lo[11];
    } else {
      FaAttnBatch b;
      int64_t z, h;
      outer(rz, b, z, h);
      oq = fa_attn_off(g.q, b, h, i0);
      ogo = fa_attn_off(g.go, b, h, i0);
      okk = fa_attn_off(g.k, b, h / p.G, j0);
      ov = fa_attn_off(g.v, b, h / p.G, j0);
      om = g.mask_mode == 1 ? fa_attn_off(g.mask, b, h, i0) + j0 : 0;
      zh = z * g.H + h;
    }
    T *Qs = buf0 + bi * TILE, *Os = Qs + MBM * PD, *Ks = Os + MBM * PD, *Vs = Ks + MBN * PD;
    cp_tile_rows<T, D, MBM>(Qs, q + oq, g.q.r, nr);
    cp_tile_rows<T, D, MBM>(Os, go + ogo, g.go.r, nr);
    cp_tile_rows<T, D, MBN>(Ks, k + okk, g.k.r, nk);
    cp_tile_rows<T, D, MBN>(Vs, v + ov, g.v.r, nk);
    if (ST && g.mask_mode == 1)
      stage_bm<MBM, SBP>(g, nullptr, Ms + bi * mrows * SMP, nullptr, (const unsigned char *)mask + om, nr, nk);
    float *Lb = LDb + bi * 3 * MBM;
    for (int r = threadIdx.x; r < MBM; r += THREADS) {
      const int64_t e = zh * g.Lq + i0 + min(r, nr - 1);
      cp4(Lb + r, rs.L2 + e, r < nr);
      cp4(Lb + MBM + r, rs.delta + e, r < nr);
      cp4(Lb + 2 * MBM + r, rs.C2 + e, r < nr);
    }
    cp_commit();
  };
  if (ST) {  // bias_inv: the same bias for every rz, read at rz = 0's outer coordinates
    FaAttnBatch b;
    int64_t z, h;
    outer(0, b, z, h);
    const float *bb = bias + fa_attn_off(g.bias, b, h, i0) + j0 * g.bias.c;
    for (int e = threadIdx.x; e < MBM * MBN; e += THREADS) {
      const int r = e >> 6, c = e & 63;
      Bsm[r * SBP + c] = r < nr && c < nk ? bb[r * g.bias.r + c * g.bias.c] : 0.f;
    }
  }
  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  if (r0 < r1) fetch(r0, (int)(r0 & 1));
  for (int64_t rz = r0; rz < r1; rz++) {
    const T *Qs = buf0 + (rz & 1) * TILE, *Os = Qs + MBM * PD, *Ks = Os + MBM * PD, *Vs = Ks + MBN * PD;
    const unsigned char *Mt = Ms + (rz & 1) * mrows * SMP;
    if (rz + 1 < r1) {
      fetch(rz + 1, (int)(rz & 1) ^ 1);
      cp_wait_group<1>();
    } else {
      cp_wait_all();
    }
    __syncthreads();
    // the outer coordinates only where they are used: the per-score path's bias / mask rows, dropout's index
    int64_t zh = 0;
    const float *brow[2] = {nullptr, nullptr};
    const void *mrow[2] = {nullptr, nullptr};
    int64_t ri[2];
    bool live[2];
    float L2[2], C2[2], dl[2];
    const float *Ls = LDb + (rz & 1) * 3 * MBM;  // L2, delta, C2 of the tile's rows (staged with the tile)
#pragma unroll
    for (int u = 0; u < 2; u++) {
      const int rl = w * 16 + gi + 8 * u;
      ri[u] = i0 + rl;
      const bool rv = ri[u] < g.Lq;
      L2[u] = rv ? Ls[rl] : -INFINITY;
      C2[u] = rv ? Ls[2 * MBM + rl] : 0.f;
      live[u] = rv && L2[u] != -INFINITY;
      dl[u] = rv ? Ls[MBM + rl] : 0.f;
    }
    if (!ST || p.pdrop > 0.f) {
      FaAttnBatch b;
      int64_t z, h;
      outer(rz, b, z, h);
      zh = z * g.H + h;
#pragma unroll
      for (int u = 0; u < 2; u++) {
        const bool rv = ri[u] < g.Lq;
        brow[u] = rv ? bias + fa_attn_off(g.bias, b, h, ri[u]) : nullptr;
        mrow[u] = g.mask_mode == 1 && rv ? (const void *)((const unsigned char *)mask + fa_attn_off(g.mask, b, h, ri[u]))
                  : g.mask_mode == 2 && rv ? (const void *)((const float *)mask + fa_attn_off(g.mask, b, h, ri[u]))
                                           : nullptr;
      }
    }
    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; kk++) {
      uint32_t qf[4], of[4];
      ldsm_x4(qf, Qs + (w * 16 + (lane & 15)) * PD + kk * 16 + (lane >> 4) * 8);
      ldsm_x4(of, Os + (w * 16 + (lane & 15)) * PD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int n2 = 0; n2 < NT / 2; n2++) {
        uint32_t bk[4], bv[4];
        const int o = (n2 * 16 + (lane & 7) + (lane >> 4) * 8) * PD + kk * 16 + ((lane >> 3) & 1) * 8;
        ldsm_x4(bk, Ks + o);
        ldsm_x4(bv, Vs + o);
        Mma<T>::mma(s[2 * n2], qf, bk[0], bk[1]);
        Mma<T>::mma(s[2 * n2 + 1], qf, bk[2], bk[3]);
        Mma<T>::mma(dp[2 * n2], of, bv[0], bv[1]);
        Mma<T>::mma(dp[2 * n2 + 1], of, bv[2], bv[3]);
      }
    }
    // ST fast path (bwd_score): a full tile, the warp's rows with a finite L2, no dropout, the mask absent or a
    // key vector (its staged row gives each key's limit)
    const bool fast = ST && nr == MBM && nk == MBN && p.pdrop <= 0.f && (g.mask_mode == 0 || mrows == 1) &&
                      __all_sync(FULL, fin(L2[0]) && fin(L2[1]));
    if (fast) {
#pragma unroll
      for (int n = 0; n < NT; n++) {
        const int cl = n * 8 + 2 * ti;
        float2 lim = make_float2(INFINITY, INFINITY);
        if (g.mask_mode == 1) {
          const uchar2 mk = *reinterpret_cast<const uchar2 *>(Mt + cl);
          lim = make_float2(mk.x ? INFINITY : -INFINITY, mk.y ? INFINITY : -INFINITY);
        }
#pragma unroll
        for (int u = 0; u < 2; u++) {
          const float2 bv = *reinterpret_cast<const float2 *>(Bsm + (w * 16 + gi + 8 * u) * SBP + cl);
          float pv, ds0, ds1;
          bwd_score(s[n][2 * u], dp[n][2 * u], bv.x, lim.x, p.scale2, L2[u], C2[u], dl[u], pv, ds0);
          bwd_score(s[n][2 * u + 1], dp[n][2 * u + 1], bv.y, lim.y, p.scale2, L2[u], C2[u], dl[u], pv, ds1);
          acc[n][2 * u] += ds0;
          acc[n][2 * u + 1] += ds1;
        }
      }
    } else
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int u = e >> 1;
        const int64_t j = j0 + n * 8 + 2 * ti + (e & 1);
        if (!live[u] || j >= g.Lk) continue;
        const int rl = w * 16 + gi + 8 * u, cl = n * 8 + 2 * ti + (e & 1);
        float x;
        if constexpr (ST) {
          x = fmaf(Bsm[rl * SBP + cl], FA_ATTN_LOG2E, s[n][e] * p.scale2);
          if (g.mask_mode == 1 && Mt[(mrows == 1 ? 0 : rl) * SMP + cl] == 0) x = -INFINITY;
        } else {
          x = logit2(p, s[n][e], brow[u], mrow[u], j);
        }
        if (x == -INFINITY) continue;
        const float ex = exp2f((x - L2[u]) - C2[u]);
        acc[n][e] += ex * (dp[n][e] * drop_factor(p, (zh * g.Lq + ri[u]) * g.Lk + j) - dl[u]);
      }
    __syncthreads();  // before the next fetch overwrites this buffer
  }
  cp_wait_all();
#pragma unroll
  for (int n = 0; n < NT; n++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int64_t i = i0 + w * 16 + gi + 8 * (e >> 1), j = j0 + n * 8 + 2 * ti + (e & 1);
      if (i >= g.Lq || j >= g.Lk) continue;
      if (nch == 1) gbias[gbo + i * g.gbias.r + j * g.gbias.c] += acc[n][e];
      else part[((ch * p.nkeep_all + kz) * g.Lq + i) * g.Lk + j] = acc[n][e];
    }
}

// mma_dbias_kernel's chunk partials part[ch][kz][i][j] summed in chunk order into grad_bias (deterministic)
__global__ void __launch_bounds__(THREADS) dbias_sum_kernel(Params p, float *gbias, const float *part, int64_t nch) {
  const fa_attn_geom &g = p.g;
  const int64_t per = g.Lq * g.Lk, n = p.nkeep_all * per;
  for (int64_t e = (int64_t)blockIdx.x * THREADS + threadIdx.x; e < n; e += (int64_t)gridDim.x * THREADS) {
    const int64_t kz = e / per, ij = e - kz * per, i = ij / g.Lk, j = ij - i * g.Lk;
    int64_t gbo = 0, x = kz;
    for (int c = p.nkeep - 1; c >= 0; c--) {
      const int d = p.keep[c];
      gbo += x % p.osize[d] * p.ostride[d];
      x /= p.osize[d];
    }
    float t = 0.f;
    for (int64_t c = 0; c < nch; c++) t += part[c * n + e];
    gbias[gbo + i * g.gbias.r + j * g.gbias.c] += t;
  }
}

template <typename T>
static int backward_t(const fa_attn_geom *g, T *gq, T *gk, T *gv, float *gbias, const T *go, const T *q, const T *k,
                      const T *v, const T *o, const float *lse, const float *bias, const void *mask) {
  static const char *fn = "fa_attention_backward";
  Plan pl;
  const void *ptrs[4] = {q, k, v, go};
  int rc = plan(fn, pl, g, true, ptrs);
  if (rc) return rc;
  if (!g->has_bias) gbias = nullptr;
  if (g->Z == 0 || g->H == 0) return 0;
  const Params &p = pl.p;
  const int dev = g->device;
  Temps tmp(dev);
  float *stats = nullptr;
  const int64_t rows = g->Z * g->H * g->Lq;
  if (rows > 0) {
    if (!(stats = (float *)tmp.get(3 * rows * (int64_t)sizeof(float)))) return FA_ERR_MEMORY;
    rc = delta_vec<T>(g, go, o)
             ? launch(fn, dev, delta_vec_kernel<T>, g->Z * g->H * ((g->Lq + THREADS - 1) / THREADS), 0, p, stats, go, o,
                      q, k, lse, bias, mask)
             : launch(fn, dev, delta_kernel<T>, g->Z * g->H * ((g->Lq + DELTA_R - 1) / DELTA_R), 0, p, stats, go, o, q,
                      k, lse, bias, mask);
    if (rc) return rc;
  }
  const RowStats rs = {stats, stats + rows, stats + 2 * rows};
  const int64_t D = g->D;
  if constexpr (sizeof(T) == 2) {
    if (pl.family == MMA) {
      // dBias: a bias over every (row, key) from mma_dbias_kernel (fixed order), one shared by the rows or the
      // keys by atomics from the key-major kernel, or (deterministic) from the SIMT fixed-order kernel
      const bool full = !p.ri && !p.rj;
      float *gba = g->deterministic || full ? nullptr : gbias;
      const int64_t kblocks = g->Z * g->Hkv * ((g->Lk + 63) / 64);
      const bool st = stageable(g, bias, mask), stb = st && p.bias_inv;
      if (gk || gv || gba) {
#define ATTN_MMA_BWD_SMEM(DD, BQ, ST)                                                                                   \
  ((size_t)(2 * 64 + 4 * BQ) * (DD + 8) * sizeof(T) + (size_t)(6 * BQ + (gba ? 64 * (BQ + 1) : 0)) * sizeof(float) + \
   (ST ? stage_bytes(g, BQ, SBT, 2) : 0))
#define ATTN_MMA_BWD_(DD, BQ, ST)                                                                                       \
  launch(fn, dev, mma_bwd_kernel<T, DD, BQ, ST>, kblocks, ATTN_MMA_BWD_SMEM(DD, BQ, ST), p, gk, gv, gba, q, k, v, bias, \
         mask, go, rs)
#define ATTN_MMA_BWD(DD, BQ)                                                                                            \
  (st && pick_staged(dev, mma_bwd_kernel<T, DD, BQ, true>, ATTN_MMA_BWD_SMEM(DD, BQ, true),                              \
                     mma_bwd_kernel<T, DD, BQ, false>, ATTN_MMA_BWD_SMEM(DD, BQ, false))                                 \
       ? ATTN_MMA_BWD_(DD, BQ, true)                                                                                   \
       : ATTN_MMA_BWD_(DD, BQ, false))
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
#undef ATTN_MMA_BWD_
#undef ATTN_MMA_BWD_SMEM
        if (rc) return rc;
      }
      if (gq) {
        const int64_t qblocks = g->Z * g->H * ((g->Lq + MBM - 1) / MBM);
#define ATTN_MMA_DQ_SMEM(DD, ST)                                                                                      \
  ((size_t)(2 * MBM + 4 * MBN) * (DD + 8) * sizeof(T) + (ST ? stage_bytes(g, MBM, SBP, 2) + 2 * MBN * sizeof(float) : 0))
#define ATTN_MMA_DQ_(DD, ST)                                                                                          \
  launch(fn, dev, mma_dq_kernel<T, DD, ST>, qblocks, ATTN_MMA_DQ_SMEM(DD, ST), p, gq, q, k, v, bias, mask, go, rs)
#define ATTN_MMA_DQ(DD)                                                                                               \
  (st && pick_staged(dev, mma_dq_kernel<T, DD, true>, ATTN_MMA_DQ_SMEM(DD, true), mma_dq_kernel<T, DD, false>,        \
                     ATTN_MMA_DQ_SMEM(DD, false))                                                                     \
       ? ATTN_MMA_DQ_(DD, true)                                                                                       \
       : ATTN_MMA_DQ_(DD, false))
        switch (D) {
          case 16: rc = ATTN_MMA_DQ(16); break;
          case 32: rc = ATTN_MMA_DQ(32); break;
          case 48: rc = ATTN_MMA_DQ(48); break;
          case 64: rc = ATTN_MMA_DQ(64); break;
          case 80: rc = ATTN_MMA_DQ(80); break;
          case 96: rc = ATTN_MMA_DQ(96); break;
          case 112: rc = ATTN_MMA_DQ(112); break;
          default: rc = ATTN_MMA_DQ(128); break;
        }
#undef ATTN_MMA_DQ
#undef ATTN_MMA_DQ_
#undef ATTN_MMA_DQ_SMEM
        if (rc) return rc;
      }
      // (no tiles when Lq or Lk is 0: grad_bias stays the zeros c/attention.c wrote)
      const int64_t tiles = p.nkeep_all * ((g->Lq + MBM - 1) / MBM) * ((g->Lk + MBN - 1) / MBN);
      if (gbias && full && tiles > 0) {
#define ATTN_MMA_DB_SMEM(DD, ST)                                                                                      \
  ((size_t)4 * (MBM + MBN) * (DD + 8) * sizeof(T) + (ST ? (size_t)MBM * SBP * sizeof(float) : 0) +                   \
   (size_t)6 * MBM * sizeof(float) +                                                                                  \
   (ST && g->mask_mode == 1 ? (size_t)2 * (g->mask.r == 0 ? 1 : MBM) * SMP : 0))
#define ATTN_MMA_DB_ST(DD)                                                                                            \
  (stb && pick_staged(dev, mma_dbias_kernel<T, DD, true>, ATTN_MMA_DB_SMEM(DD, true), mma_dbias_kernel<T, DD, false>, \
                      ATTN_MMA_DB_SMEM(DD, false)))
#define ATTN_MMA_DB_CTAS(DD)                                                                                          \
  (ATTN_MMA_DB_ST(DD) ? ctas_per_sm(dev, mma_dbias_kernel<T, DD, true>, ATTN_MMA_DB_SMEM(DD, true))                 \
                      : ctas_per_sm(dev, mma_dbias_kernel<T, DD, false>, ATTN_MMA_DB_SMEM(DD, false)))
        // the reduction over the broadcast dims split in nch chunks, partials then summed in a fixed order: the
        // nch (at most 16, chunks of at least 32 broadcast combinations, scratch up to 64 MB unless one is all
        // it takes) whose waves of resident CTAs take the fewest chunk iterations (CTAs run for equal times):
        // at H = 4, 3 CTAs per SM on 132 SMs, N = 1024 gives 3 (8 waves of 342 instead of 3 of 1024), N = 256
        // gives 6 (one wave of 43). Fixed per device: deterministic.
        int nsm = 0, per_sm = 0;
        if ((rc = fa_cu_check(cudaDeviceGetAttribute(&nsm, cudaDevAttrMultiProcessorCount, dev), fn))) return rc;
        switch (D) {
          case 16: per_sm = ATTN_MMA_DB_CTAS(16); break;
          case 32: per_sm = ATTN_MMA_DB_CTAS(32); break;
          case 48: per_sm = ATTN_MMA_DB_CTAS(48); break;
          case 64: per_sm = ATTN_MMA_DB_CTAS(64); break;
          case 80: per_sm = ATTN_MMA_DB_CTAS(80); break;
          case 96: per_sm = ATTN_MMA_DB_CTAS(96); break;
          case 112: per_sm = ATTN_MMA_DB_CTAS(112); break;
          default: per_sm = ATTN_MMA_DB_CTAS(128); break;
        }
        const int64_t slots = (int64_t)max(nsm, 1) * max(per_sm, 1), chunk = p.nkeep_all * g->Lq * g->Lk * (int64_t)sizeof(float);
        const int64_t maxch = max((int64_t)1, min((int64_t)16, p.nred_all / 32));
        int64_t nch = 1, best = (tiles + slots - 1) / slots * p.nred_all;
        for (int64_t c = 2; c <= maxch && c * chunk <= ((int64_t)64 << 20); c++) {
          const int64_t cost = (c * tiles + slots - 1) / slots * ((p.nred_all + c - 1) / c);
          if (cost * 20 < best * 19) {  // 5% or more fewer
            best = cost;
            nch = c;
          }
        }
        float *part = nullptr;
        if (nch > 1 && !(part = (float *)tmp.get(nch * chunk))) return FA_ERR_MEMORY;
        const int64_t dblocks = nch * tiles;
#define ATTN_MMA_DB_(DD, ST)                                                                                          \
  launch(fn, dev, mma_dbias_kernel<T, DD, ST>, dblocks, ATTN_MMA_DB_SMEM(DD, ST), p, gbias, part, nch, q, k, v, bias, \
         mask, go, rs)
#define ATTN_MMA_DB(DD) (ATTN_MMA_DB_ST(DD) ? ATTN_MMA_DB_(DD, true) : ATTN_MMA_DB_(DD, false))
        switch (D) {
          case 16: rc = ATTN_MMA_DB(16); break;
          case 32: rc = ATTN_MMA_DB(32); break;
          case 48: rc = ATTN_MMA_DB(48); break;
          case 64: rc = ATTN_MMA_DB(64); break;
          case 80: rc = ATTN_MMA_DB(80); break;
          case 96: rc = ATTN_MMA_DB(96); break;
          case 112: rc = ATTN_MMA_DB(112); break;
          default: rc = ATTN_MMA_DB(128); break;
        }
#undef ATTN_MMA_DB
#undef ATTN_MMA_DB_
#undef ATTN_MMA_DB_CTAS
#undef ATTN_MMA_DB_ST
#undef ATTN_MMA_DB_SMEM
        if (rc || nch == 1) return rc;
        return launch(fn, dev, dbias_sum_kernel, (int64_t)fa_cu_blocks(p.nkeep_all * g->Lq * g->Lk, THREADS, dev), 0, p,
                      gbias, (const float *)part, nch);
      }
      if (gba || !gbias) return 0;
      gq = gk = gv = nullptr;  // done; the SIMT kernel below gives dBias without atomics
    }
  }
  ATTN_DT_SWITCH(pl.dt, {
    if (gq && (rc = launch(fn, dev, rows_kernel<T, DT_, true>, g->Z * g->H * ((g->Lq + ROWS - 1) / ROWS),
                           (size_t)(2 * BN * p.ld + 2 * ROWS * D) * sizeof(float), p, gq, (float *)nullptr, q, k, v,
                           bias, mask, go, rs)))
      return rc;
    if ((gk || gv) && (rc = launch(fn, dev, dkdv_kernel<T, DT_>, g->Z * g->Hkv * ((g->Lk + BK - 1) / BK),
                                   (size_t)(2 * BK * D + 2 * 32 * p.ld) * sizeof(float), p, gk, gv, q, k, v, bias, mask,
                                   go, rs)))
      return rc;
    if (gbias) {
      const int64_t it = p.ri ? 1 : (g->Lq + 31) / 32, jt = p.rj ? 1 : (g->Lk + 31) / 32;
      if ((rc = launch(fn, dev, dbias_kernel<T, DT_>, p.nkeep_all * it * jt,
                       (size_t)(2 * 32 * p.ld + 2 * 32 * D + NW * 32) * sizeof(float), p, gbias, q, k, v, bias, mask,
                       go, rs)))
        return rc;
    }
    return 0;
  })
}

}  // namespace fa_attn

int fa_cu_attention_backward(const fa_attn_geom *g, void *grad_q, void *grad_k, void *grad_v, float *grad_bias,
                             const void *grad_out, const void *q, const void *k, const void *v, const void *out,
                             const float *lse, const float *bias, const void *mask) {
  FA_CU_FLOAT_DISPATCH("fa_attention_backward", g->dtype,
                       fa_attn::backward_t<T>(g, (T *)grad_q, (T *)grad_k, (T *)grad_v, grad_bias, (const T *)grad_out,
                                     (const T *)q, (const T *)k, (const T *)v, (const T *)out, lse, bias, mask))
}
