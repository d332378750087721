// attention_fwd.cu: the attention core's forward on the GPU (fa_cu_attention_forward): the SIMT rows_kernel
// (cuda/attn.cuh) or the mma.sync kernel below, as the planner (plan in cuda/attn.cuh) says.
#include "dense.cuh"
#include "attn.cuh"

namespace fa_attn {

template <bool B> struct Flag { static constexpr bool value = B; };

// exp2 for the probabilities: a subnormal result (p < 2^-126 of the row's max, nothing next to l >= 1 and the
// 16-bit P operand) flushes to 0; exp2f's non-ftz path costs a compare and two predicated multiplies more
__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ST: the bias / select-mask tiles of each key tile come through shared memory with K and V (stage_bm)
template <typename T, int D, bool ST>
__global__ void __launch_bounds__(THREADS) mma_fwd_kernel(Params p, T *out, float *lse, const T *q, const T *k,
                                                          const T *v, const float *bias, const void *mask) {
  constexpr int PD = D + 8, KD = D / 16, NT = MBN / 8, OT = D / 8;
  extern __shared__ __align__(16) unsigned char smraw[];
  T *Qs = (T *)smraw, *KV = Qs + MBM * PD;  // K/V tiles double-buffered: K0 V0 K1 V1
  float *mv = (float *)(KV + 4 * MBN * PD);
  const fa_attn_geom &g = p.g;
  // ST: 2 key-limit rows (MBN floats), 2 bias tiles (MBM x SBP), then 2 mask tiles (MBM x SMP, a row mask only)
  float *Wf = mv + D, *Bs = Wf + 2 * MBN;
  unsigned char *Ms = (unsigned char *)(Bs + (g.has_bias ? 2 * MBM * SBP : 0));
  const int mrows = g.mask.r == 0 ? 1 : MBM;
  // ST with no mask or a key-vector one (mask.r == 0): key j's limit +inf (kept) or -inf (left out: masked or
  // j >= Lk) is staged per key tile, loaded into wreg by threads < MBN when the tile is fetched and stored to Wf
  // once the load had a tile's time to land; the scores then take fminf(x, limit) (a NaN score of a masked key
  // still becomes -inf, as the select did)
  const bool kvec = g.mask_mode == 0 || g.mask.r == 0;
  float wreg = 0.f;
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, gi = lane >> 2, ti = lane & 3;
  const int64_t ntiles = (g.Lq + MBM - 1) / MBM;
  const int64_t zh = blockIdx.x / ntiles, row0 = (blockIdx.x % ntiles) * MBM;
  const int64_t z = zh / g.H, h = zh % g.H, hk = h / p.G;
  const FaAttnBatch b = fa_attn_batch(g, z);
  cp_tile<T, D>(Qs, q + fa_attn_off(g.q, b, h, row0), g.q.r, MBM, (int)min((int64_t)MBM, g.Lq - row0));
  cp_commit();
  const T *kb = k + fa_attn_off(g.k, b, hk, 0), *vb = v + fa_attn_off(g.v, b, hk, 0);
  const int nrow = (int)min((int64_t)MBM, g.Lq - row0);
  const float *bt = ST && g.has_bias ? bias + fa_attn_off(g.bias, b, h, row0) : nullptr;
  const unsigned char *mt =
      ST && g.mask_mode == 1 ? (const unsigned char *)mask + fa_attn_off(g.mask, b, h, row0) : nullptr;
  auto fetch = [&](int64_t j0, int buf) {  // one commit group per key tile
    const int nk = (int)min((int64_t)MBN, g.Lk - j0);
    bool kvdone = false;
    if constexpr (FULL_ROWS<D, MBN>) {
      if (nk == MBN) {
        cp_rows_full<T, D, MBN>(KV + buf * 2 * MBN * PD, kb + j0 * g.k.r, g.k.r);
        cp_rows_full<T, D, MBN>(KV + (buf * 2 + 1) * MBN * PD, vb + j0 * g.v.r, g.v.r);
        kvdone = true;
      }
    }
    if (!kvdone) {
      cp_tile<T, D>(KV + buf * 2 * MBN * PD, kb + j0 * g.k.r, g.k.r, MBN, nk);
      cp_tile<T, D>(KV + (buf * 2 + 1) * MBN * PD, vb + j0 * g.v.r, g.v.r, MBN, nk);
    }
    if (ST) {
      // a bias tile of full rows and keys: stage_bm's copies (thread t: 16 bytes at column 4 (t & 15) of rows
      // t / 16 + 8 i) with the index math once per tile
      const bool full = bt && nrow == MBM && nk == MBN;
      if (full) {
        const float *src = bt + j0 + (int64_t)(threadIdx.x >> 4) * g.bias.r + (threadIdx.x & 15) * 4;
        const int64_t step = 8 * g.bias.r;
        const uint32_t dst = smem_addr(Bs + buf * MBM * SBP + (threadIdx.x >> 4) * SBP + (threadIdx.x & 15) * 4);
#pragma unroll
        for (int i = 0; i < MBM / 8; i++, src += step)
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst + i * 8 * SBP * 4), "l"(src) : "memory");
      }
      stage_bm<MBM, SBP>(g, Bs + buf * MBM * SBP, Ms + buf * mrows * SMP, bt && !full ? bt + j0 : nullptr,
                         mt && !kvec ? mt + j0 : nullptr, nrow, nk);
      if (kvec && threadIdx.x < MBN)
        wreg = (int)threadIdx.x < nk && (!mt || mt[j0 + threadIdx.x]) ? INFINITY : -INFINITY;
    }
    cp_commit();
  };
  if (g.Lk > 0) {
    fetch(0, 0);
    if (ST && kvec && threadIdx.x < MBN) Wf[threadIdx.x] = wreg;
    cp_wait_group<1>();  // Q has landed
  } else {
    cp_wait_all();
  }
  __syncthreads();
  uint32_t qf[KD][4];
#pragma unroll
  for (int kk = 0; kk < KD; kk++) ldsm_x4(qf[kk], Qs + (w * 16 + (lane & 15)) * PD + kk * 16 + (lane >> 4) * 8);

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

  for (int64_t j0 = 0, it = 0; j0 < g.Lk; j0 += MBN, it++) {
    const T *Ks = KV + (it & 1) * 2 * MBN * PD, *Vs = Ks + MBN * PD;
    const bool more = j0 + MBN < g.Lk;
    if (more) {  // the next tile streams in while this one is used
      fetch(j0 + MBN, (int)(it & 1) ^ 1);
      cp_wait_group<1>();
    } else {
      cp_wait_all();
    }
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
    if constexpr (ST) {  // logit2's arithmetic on the staged values
      const float *Bt = Bs + (it & 1) * MBM * SBP;
      const int nk = (int)min((int64_t)MBN, g.Lk - j0);
      // kvec: no per-score bounds or mask tests (rows past Lq have zero Q and bias, finite scores, and are never
      // written); KM: the tile has a left-out key (mask or past Lk), HB: bias
      auto scores = [&](auto km, auto hb) {
        constexpr bool KM = decltype(km)::value, HB = decltype(hb)::value;
        const float *Wt = Wf + (it & 1) * MBN;
#pragma unroll
        for (int n = 0; n < NT; n++) {
          const int cl = n * 8 + 2 * ti;
          const float2 wv = KM ? *reinterpret_cast<const float2 *>(Wt + cl) : make_float2(0.f, 0.f);
#pragma unroll
          for (int u = 0; u < 2; u++) {
            const int rl = w * 16 + gi + 8 * u;
            const float2 bv = HB ? *reinterpret_cast<const float2 *>(Bt + rl * SBP + cl) : make_float2(0.f, 0.f);
#pragma unroll
            for (int c = 0; c < 2; c++) {
              float x = s[n][2 * u + c] * p.scale2;
              if (HB) x = fmaf(c ? bv.y : bv.x, FA_ATTN_LOG2E, x);
              if (KM) x = fminf(x, c ? wv.y : wv.x);
              s[n][2 * u + c] = x;
              mx[u] = fmaxf(mx[u], x);
            }
          }
        }
      };
      if (kvec) {
        const bool km = mt || nk < MBN;
        if (bt) {
          if (km) scores(Flag<true>(), Flag<true>());
          else scores(Flag<false>(), Flag<true>());
        } else {
          if (km) scores(Flag<true>(), Flag<false>());
          else scores(Flag<false>(), Flag<false>());
        }
      } else {  // a mask per row: the staged byte per score
        const unsigned char *Mt = Ms + (it & 1) * mrows * SMP;
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
          for (int u = 0; u < 2; u++) {
            const int rl = w * 16 + gi + 8 * u, cl = n * 8 + 2 * ti;
            const float2 bv = bt ? *reinterpret_cast<const float2 *>(Bt + rl * SBP + cl) : make_float2(0.f, 0.f);
            const uchar2 mk = *reinterpret_cast<const uchar2 *>(Mt + rl * SMP + cl);
#pragma unroll
            for (int c = 0; c < 2; c++) {
              float x = s[n][2 * u + c] * p.scale2;
              if (bt) x = fmaf(c ? bv.y : bv.x, FA_ATTN_LOG2E, x);
              if (!rv[u] || cl + c >= nk || (c ? mk.y : mk.x) == 0) x = -INFINITY;
              s[n][2 * u + c] = x;
              mx[u] = fmaxf(mx[u], x);
            }
          }
      }
    } else {
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
    // fa_attn_exp with its -inf guard once per row: m == -inf only when every score of the row is -inf so far,
    // and exp2(-inf - 0) = 0
    float mu[2];
#pragma unroll
    for (int u = 0; u < 2; u++) mu[u] = m[u] == -INFINITY ? 0.f : m[u];
    uint32_t pa[MBN / 16][4];
    if (p.pdrop > 0.f) {  // uniform: no per-score test without dropout
#pragma unroll
      for (int n = 0; n < NT; n++) {
        float pe[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int u = e >> 1;
          float x = ex2_ftz(s[n][e] - mu[u]);
          l[u] += x;
          if (x > 0.f) x *= drop_factor(p, (zh * g.Lq + ri[u]) * g.Lk + j0 + n * 8 + 2 * ti + (e & 1));
          pe[e] = x;
        }
        pa[n >> 1][(n & 1) * 2] = Mma<T>::pack(pe[0], pe[1]);
        pa[n >> 1][(n & 1) * 2 + 1] = Mma<T>::pack(pe[2], pe[3]);
      }
    } else {
#pragma unroll
      for (int n = 0; n < NT; n++) {
        float pe[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
          pe[e] = ex2_ftz(s[n][e] - mu[e >> 1]);
          l[e >> 1] += pe[e];
        }
        pa[n >> 1][(n & 1) * 2] = Mma<T>::pack(pe[0], pe[1]);
        pa[n >> 1][(n & 1) * 2 + 1] = Mma<T>::pack(pe[2], pe[3]);
      }
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
    if (ST && kvec && more && threadIdx.x < MBN) Wf[((it & 1) ^ 1) * MBN + threadIdx.x] = wreg;
    __syncthreads();  // before the next fetch overwrites this tile's buffer (and the next tile's limits are in)
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
    const bool st = stageable(g, bias, mask);
    const size_t msmem = (size_t)(MBM + 4 * MBN) * (g->D + 8) * sizeof(T) + (size_t)g->D * sizeof(float),
                 ssmem = msmem + 2 * MBN * sizeof(float) + stage_bytes(g, MBM, SBP, 2);
#define ATTN_MMA_FWD(DD)                                                                                                  \
  return st && pick_staged(g->device, mma_fwd_kernel<T, DD, true>, ssmem, mma_fwd_kernel<T, DD, false>, msmem)          \
             ? launch(fn, g->device, mma_fwd_kernel<T, DD, true>, mblocks, ssmem, p, out, lse, q, k, v, bias, mask)    \
             : launch(fn, g->device, mma_fwd_kernel<T, DD, false>, mblocks, msmem, p, out, lse, q, k, v, bias, mask)
    switch (g->D) {
      case 16: ATTN_MMA_FWD(16);
      case 32: ATTN_MMA_FWD(32);
      case 48: ATTN_MMA_FWD(48);
      case 64: ATTN_MMA_FWD(64);
      case 80: ATTN_MMA_FWD(80);
      case 96: ATTN_MMA_FWD(96);
      case 112: ATTN_MMA_FWD(112);
      default: ATTN_MMA_FWD(128);
    }
#undef ATTN_MMA_FWD
   }
  }
  const int64_t blocks = g->Z * g->H * ((g->Lq + ROWS - 1) / ROWS);
  const size_t smem = (size_t)(2 * BN * p.ld + ROWS * g->D) * sizeof(float);
  ATTN_DT_SWITCH(pl.dt, return launch(fn, g->device, rows_kernel<T, DT_, false>, blocks, smem, p, out, lse, q, k, v,
                                      bias, mask, (const T *)nullptr, RowStats{}))
}

}  // namespace fa_attn

int fa_cu_attention_forward(const fa_attn_geom *g, void *out, float *lse, const void *q, const void *k, const void *v,
                            const float *bias, const void *mask) {
  FA_CU_FLOAT_DISPATCH("fa_attention_forward", g->dtype,
                       fa_attn::forward_t<T>(g, (T *)out, lse, (const T *)q, (const T *)k, (const T *)v, bias, mask))
}
