// deform_sdpa.cu: fused deformable scaled-dot-product attention on the GPU (fa.deform_sdpa, c/deform_sdpa.h).
//
// q, k, v, grad_out, out (B, V, NH, L, D) T through the strides of the geometry (last dim contiguous), coords
// (B, V, L, V, S, 2) float32 dense, lse float32 (B, V, NH, L); T = float32, bfloat16 or float16, arithmetic
// float32. Sampling rules of cuda/bilinear.cuh (grid_sample, align_corners=True, padding 'zeros').
//
// Layout of the work: a "group" of TPG lanes owns one (query position, head), NC * VEC channels per lane (16-byte
// loads where D, the pointers and the strides allow, else 1 channel per load). A block takes QT query positions
// of one (b, v1) and HT heads; the V*S samples go in rounds of SC: the block computes each sample's footprint
// (cell, tap mask, 4 bilinear weights: the coordinates do not depend on the head) once into shared memory, and
// every head's group reads it from there. Per sample a group loads the taps inside the image (a tap outside
// reads 0; a sample with no tap inside is key 0 / value 0, still a softmax term), blends, reduces q.k over its
// lanes (xor shuffles: every lane holds the same bits) and runs the exp2-domain online softmax of cuda/attn.cuh.
//
// Map mode (the planner's choice where 16-byte vectors work and the k/v maps of one (b, v2, h) fit in shared
// memory): fwd_map_kernel / bwd_map_kernel take many query positions of one (b, head) per block and stage each
// view's maps in shared memory, so that no gather goes to L1/L2 (fwd_kernel / bwd_kernel otherwise).
//
// Backward: P = exp2(scale2 s - lse2) recomputed, delta = <grad_out, out> per row. bwd_kernel (the forward's
// layout) gives grad_q (its own row: no atomics) and the coordinates' gradient: each group reduces its per-tap
// dot products into d/du, d/dv of the sample, the block sums them over its heads in head order through shared
// memory; bwd_map_kernel (one head per block) has one writer per head. Several writers per coordinate (heads, or
// head tiles): float atomics into grad_coords in the default mode, per-writer partials summed in order by
// finish_coords_kernel when deterministic. grad_k/grad_v:
//   fast, where a map (k, v in the dtype) and two float32 accumulators fit in shared memory: kv_kernel (a block
//     per map) recomputes P and dS of every sample landing in its map (no record), scatters into the map in
//     shared memory and writes it once;
//     kv4_kernel, the same with 4 channels per lane where rows allow vectors and D <= 128; for float32 it is the
//     whole default backward (grad_q and grad_coords too, by float atomics; bwd_map_kernel not launched);
//   fast, else: bwd_kernel scatters scale*dS*w*q and P*w*dO into the 4 taps with float32 atomics (vector
//     red.global.add on sm_90) into grad_k/grad_v (float32) or a float32 scratch cast at the end;
//   deterministic: the kernel records (P, dS) per (sample, head); keys_kernel gives every sample the key of
//     its cell on the (H+1)x(W+1) grid of (b, v2) (head-independent: one sort for all heads), a stable CUB radix
//     sort groups the samples by cell in sample order, and gather_kernel takes one grad_k/grad_v row (b, v2, h,
//     pixel) per group and sums over the samples of the 4 cells around the pixel in that fixed order: each row
//     written once, in the dtype, no atomics, bit-identical run to run.
#include "dense.cuh"
#include "bilinear.cuh"
#include "attn.cuh"
#include "deform_sdpa.h"
#include <cub/cub.cuh>

namespace {

constexpr unsigned FULL = 0xffffffffu;
constexpr int SC = 32;  // samples per round (footprints in shared memory)

struct Params {
  int B, V, NH, L, D, W, H, S, VS;
  int QT, HT, nht, ltiles;  // query positions and heads per block, head tiles, query tiles per (b, v1)
  float scale, scale2;      // scale, scale * log2 e
  int64_t qb, qv, qh, ql, kb, kv, kh, kl, vb, vv, vh, vl, gb, gv, gh, gl, ob, ov, oh, ol;
  int Sx;                   // (H+1)*(W+1): the cell grid of one (b, v2)
  int gatom;                // backward, not deterministic: the coordinates' gradient by float atomics into grad_coords
};

// the footprint of a sample: top-left tap pixel y0*W + x0 (may be outside), mask | v2 << 4 (bit k: tap k
// inside; taps (y0,x0), (y0,x0+1), (y0+1,x0), (y0+1,x0+1)), fractions, weights (0 for taps outside)
struct Foot {
  int pix, mv;
  float fx, fy;
  float w[4];
};

// (x0, y0): the cell, for the sort by cell (meaningful when a tap is inside)
__device__ __forceinline__ void footprint(const Params &p, const float *c, int v2, Foot &f, int &x0, int &y0) {
  // u = cx * (W - 1): ((2 cx - 1) + 1) (W - 1) / 2 of grid_sample with one rounding (the CPU's double)
  const float u = __fmul_rn(c[0], (float)(p.W - 1)), v = __fmul_rn(c[1], (float)(p.H - 1));
  f.pix = 0;
  f.mv = v2 << 4;
  f.fx = f.fy = 0.f;
  f.w[0] = f.w[1] = f.w[2] = f.w[3] = 0.f;
  x0 = y0 = 0;
  if (!fa_bl_near(u, v, (int64_t)p.H, (int64_t)p.W)) return;  // NaN too
  fa_bl_cell(u, v, x0, y0, f.fx, f.fy);
  if (!fa_bl_cell_near(x0, y0, p.H, p.W)) return;
  bool vx0, vx1, vy0, vy1;
  fa_bl_inside(x0, y0, p.H, p.W, vx0, vx1, vy0, vy1);
  const unsigned m = fa_bl_mask(vx0, vx1, vy0, vy1);
  const float hx = fa_bl_comp(f.fx), hy = fa_bl_comp(f.fy);
  f.pix = y0 * p.W + x0;
  f.mv |= (int)m;
  f.w[0] = (m & 1u) ? fa_bl_weight<0>(f.fx, f.fy, hx, hy) : 0.f;
  f.w[1] = (m & 2u) ? fa_bl_weight<1>(f.fx, f.fy, hx, hy) : 0.f;
  f.w[2] = (m & 4u) ? fa_bl_weight<2>(f.fx, f.fy, hx, hy) : 0.f;
  f.w[3] = (m & 8u) ? fa_bl_weight<3>(f.fx, f.fy, hx, hy) : 0.f;
}

template <int TPG> __device__ __forceinline__ float gsum(float x) {
#pragma unroll
  for (int o = TPG / 2; o > 0; o >>= 1) x += __shfl_xor_sync(FULL, x, o, TPG);
  return x;
}

// the group sums of a and of b with log2(TPG) + 1 shuffles instead of 2 log2(TPG): the group's lower half sums a,
// its upper half b, then the halves swap (lane: the lane in the group; every lane ends with the same bits)
template <int TPG> __device__ __forceinline__ void gsum2(float a, float b, float &sa, float &sb, int lane) {
  if constexpr (TPG == 1) {
    sa = a;
    sb = b;
  } else {
    const bool up = lane & (TPG / 2);
    float x = up ? b : a;
    x += __shfl_xor_sync(FULL, up ? a : b, TPG / 2, TPG);
#pragma unroll
    for (int o = TPG / 4; o > 0; o >>= 1) x += __shfl_xor_sync(FULL, x, o, TPG);
    const float z = __shfl_xor_sync(FULL, x, TPG / 2, TPG);
    sa = up ? z : x;
    sb = up ? x : z;
  }
}

// VEC channels at p (VEC = 1: a plain load)
template <typename T, int VEC> __device__ __forceinline__ void ld(float (&f)[VEC], const T *p) {
  if constexpr (VEC == 1) f[0] = fa_to_f<T>(*p);
  else load_vec<T, VEC>(f, p);
}
template <typename T, int VEC> __device__ __forceinline__ void st(T *p, const float (&f)[VEC]) {
  if constexpr (VEC == 1) *p = fa_from_f<T>(f[0]);
  else store_vec<T, VEC>(p, f);
}

// p[0 .. VEC) += f (float32 buffer). sm_90 has vector reductions: one instruction per 4 floats.
template <int VEC> __device__ __forceinline__ void red_add(float *p, const float (&f)[VEC]) {
#if __CUDA_ARCH__ >= 900
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4)
      asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p + i), "f"(f[i]), "f"(f[i + 1]),
                   "f"(f[i + 2]), "f"(f[i + 3]) : "memory");
  } else {
#pragma unroll
    for (int i = 0; i < VEC; i++) atomicAdd(p + i, f[i]);
  }
#else
#pragma unroll
  for (int i = 0; i < VEC; i++) atomicAdd(p + i, f[i]);
#endif
}

// p[0], p[1] += x, y (float32 global memory, 8-byte aligned)
__device__ __forceinline__ void red_add2(float *p, float x, float y) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(x), "f"(y) : "memory");
#else
  atomicAdd(p, x);
  atomicAdd(p + 1, y);
#endif
}

// The block's place: (b, v1, query tile) from blockIdx.x, head tile from blockIdx.y; the group (qt, hh) of this
// thread, clamped into range for idle groups (they run along for the shuffles and write nothing).
struct Place {
  int b, v1, l0, qt, h, l, lane;
  bool active;
};
template <int TPG> __device__ __forceinline__ Place place(const Params &p) {
  Place w;
  const int t = blockIdx.x % p.ltiles, bv = blockIdx.x / p.ltiles;
  w.b = bv / p.V;
  w.v1 = bv % p.V;
  w.l0 = t * p.QT;
  w.lane = threadIdx.x % TPG;
  const int grp = threadIdx.x / TPG;
  int qt = grp / p.HT, hh = grp % p.HT;
  const int h = blockIdx.y * p.HT + hh, l = w.l0 + qt;
  w.active = qt < p.QT && h < p.NH && l < p.L;
  w.qt = qt < p.QT ? qt : 0;
  w.h = h < p.NH ? h : p.NH - 1;
  w.l = w.l0 + w.qt < p.L ? w.l0 + w.qt : p.L - 1;
  if (!w.active) w.qt = w.l - w.l0;
  return w;
}

// footprints of samples [n0, n0 + SC) of the block's query positions into fs[qt * SC + j]
__device__ __forceinline__ void stage_feet(const Params &p, Foot *fs, const float *coords, int b, int v1, int l0,
                                           int n0) {
  const int nq = min(p.QT, p.L - l0);
  for (int i = threadIdx.x; i < nq * SC; i += blockDim.x) {
    const int qt = i / SC, j = i % SC, n = n0 + j;
    if (n >= p.VS) continue;
    const int64_t e = (((int64_t)b * p.V + v1) * p.L + l0 + qt) * p.VS + n;
    int x0, y0;
    footprint(p, coords + 2 * e, n / p.S, fs[i], x0, y0);
  }
}

// ------------------------------------------------------------------------------------------------ per-sample steps
// Shared by the kernels that read k / v in global memory (row strides p.kl / p.vl) and those that read the maps
// in shared memory (row stride p.D): kr / vr the rows' base, ks / vs their strides (as the caller's type).

// the group's slice of a query row (q: qr, zero past D), ch[c] = chunk c inside D, acc zeroed
template <typename T, int VEC, int TPG, int NC>
__device__ __forceinline__ void load_q_row(float (&qr)[NC][VEC], float (&acc)[NC][VEC], bool (&ch)[NC], const T *qrow,
                                           int lane, const Params &p) {
#pragma unroll
  for (int c = 0; c < NC; c++) {
    const int d = (c * TPG + lane) * VEC;
    ch[c] = d < p.D;
    if (ch[c]) ld<T, VEC>(qr[c], qrow + d);
#pragma unroll
    for (int e = 0; e < VEC; e++) {
      if (!ch[c]) qr[c][e] = 0.f;
      acc[c][e] = 0.f;
    }
  }
}

// one sample of the forward: the taps blended into k / v, q.k over the group, the online-softmax update
template <typename T, int VEC, int TPG, int NC, typename SK, typename SV>
__device__ __forceinline__ void fwd_sample(float (&acc)[NC][VEC], float &m, float &lsum, const float (&qr)[NC][VEC],
                                           const bool (&ch)[NC], const T *kr, SK ks_, const T *vr, SV vs_,
                                           const int (&off)[4], const float (&wk)[4], int mv, int lane,
                                           const Params &p) {
  float ks[NC][VEC], vs[NC][VEC];
  float part = 0.f;
#pragma unroll
  for (int c = 0; c < NC; c++) {
#pragma unroll
    for (int e = 0; e < VEC; e++) ks[c][e] = vs[c][e] = 0.f;
    if (!ch[c]) continue;
    const int d = (c * TPG + lane) * VEC;
#pragma unroll
    for (int t = 0; t < 4; t++) {
      if (!(mv >> t & 1)) continue;
      float x[VEC], y[VEC];
      ld<T, VEC>(x, kr + off[t] * ks_ + d);
      ld<T, VEC>(y, vr + off[t] * vs_ + d);
#pragma unroll
      for (int e = 0; e < VEC; e++) {
        ks[c][e] = fmaf(wk[t], x[e], ks[c][e]);
        vs[c][e] = fmaf(wk[t], y[e], vs[c][e]);
      }
    }
#pragma unroll
    for (int e = 0; e < VEC; e++) part = fmaf(qr[c][e], ks[c][e], part);
  }
  const float s2 = gsum<TPG>(part) * p.scale2;
  const float alpha = fa_attn_rescale(m, s2);
  const float pe = fa_attn_exp(s2, m);
  lsum = lsum * alpha + pe;
#pragma unroll
  for (int c = 0; c < NC; c++)
#pragma unroll
    for (int e = 0; e < VEC; e++) acc[c][e] = fmaf(pe, vs[c][e], acc[c][e] * alpha);
}

// the forward's output row (acc / lsum) and its log-sum-exp
template <typename T, int VEC, int TPG, int NC>
__device__ __forceinline__ void store_out(T *out, float *lse, int64_t row, const float (&acc)[NC][VEC],
                                          const bool (&ch)[NC], float m, float lsum, int lane, const Params &p) {
  const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
#pragma unroll
  for (int c = 0; c < NC; c++) {
    if (!ch[c]) continue;
    float o[VEC];
#pragma unroll
    for (int e = 0; e < VEC; e++) o[e] = acc[c][e] * inv;
    st<T, VEC>(out + row * p.D + (c * TPG + lane) * VEC, o);
  }
  if (lane == 0) lse[row] = fa_attn_lse(m, lsum);
}

// the backward's rows: q (qr), dO (gr), both zero past D; dq zeroed; returns delta = dO.o over the group
template <typename T, int VEC, int TPG, int NC>
__device__ __forceinline__ float load_bwd_rows(float (&qr)[NC][VEC], float (&gr)[NC][VEC], float (&dq)[NC][VEC],
                                               bool (&ch)[NC], const T *qrow, const T *grow, const T *orow, int lane,
                                               const Params &p) {
  float dpart = 0.f;
#pragma unroll
  for (int c = 0; c < NC; c++) {
    const int d = (c * TPG + lane) * VEC;
    ch[c] = d < p.D;
    float y[VEC];
    if (ch[c]) {
      ld<T, VEC>(qr[c], qrow + d);
      ld<T, VEC>(gr[c], grow + d);
      ld<T, VEC>(y, orow + d);
    }
#pragma unroll
    for (int e = 0; e < VEC; e++) {
      if (!ch[c]) qr[c][e] = gr[c][e] = y[e] = 0.f;
      dq[c][e] = 0.f;
      dpart = fmaf(gr[c][e], y[e], dpart);
    }
  }
  return gsum<TPG>(dpart);
}

// one sample of the backward: the taps of k kept (kt), partial q.k_t (a) and dO.v_t (g) per tap; then P (pr) and
// dS (ds) from the blended scores, and dq += ds * the blended k
template <typename T, int VEC, int TPG, int NC, typename SK, typename SV>
__device__ __forceinline__ void bwd_sample(float (&dq)[NC][VEC], float (&a)[4], float (&g)[4], float &pr, float &ds,
                                           const float (&qr)[NC][VEC], const float (&gr)[NC][VEC],
                                           const bool (&ch)[NC], const T *kr, SK ks_, const T *vr, SV vs_,
                                           const int (&off)[4], const float (&wk)[4], int mv, float lse2, float delta,
                                           int lane, const Params &p) {
  float kt[4][NC][VEC];
#pragma unroll
  for (int t = 0; t < 4; t++) a[t] = g[t] = 0.f;
#pragma unroll
  for (int t = 0; t < 4; t++)
#pragma unroll
    for (int c = 0; c < NC; c++) {
#pragma unroll
      for (int e = 0; e < VEC; e++) kt[t][c][e] = 0.f;
      if (!ch[c] || !(mv >> t & 1)) continue;
      const int d = (c * TPG + lane) * VEC;
      float y[VEC];
      ld<T, VEC>(kt[t][c], kr + off[t] * ks_ + d);
      ld<T, VEC>(y, vr + off[t] * vs_ + d);
#pragma unroll
      for (int e = 0; e < VEC; e++) {
        a[t] = fmaf(qr[c][e], kt[t][c][e], a[t]);
        g[t] = fmaf(gr[c][e], y[e], g[t]);
      }
    }
  const float s = gsum<TPG>(wk[0] * a[0] + wk[1] * a[1] + wk[2] * a[2] + wk[3] * a[3]);
  const float dp = gsum<TPG>(wk[0] * g[0] + wk[1] * g[1] + wk[2] * g[2] + wk[3] * g[3]);
  pr = exp2f(s * p.scale2 - lse2);
  ds = pr * (dp - delta);
#pragma unroll
  for (int c = 0; c < NC; c++)
#pragma unroll
    for (int e = 0; e < VEC; e++)
      dq[c][e] = fmaf(ds, wk[3] * kt[3][c][e] + wk[2] * kt[2][c][e] + wk[1] * kt[1][c][e] + wk[0] * kt[0][c][e],
                      dq[c][e]);
}

// the coordinates' gradient of a sample (du, dv; unscaled), from its tap partials and fractions
__device__ __forceinline__ void coord_grad(const float (&a)[4], const float (&g)[4], float fx, float fy, float sds,
                                           float pr, float &du, float &dv) {
  const float hx = fa_bl_comp(fx), hy = fa_bl_comp(fy);
  du = sds * fa_bl_du(a, fy, hy) + pr * fa_bl_du(g, fy, hy);
  dv = sds * fa_bl_dv(a, fx, hx) + pr * fa_bl_dv(g, fx, hx);
}

// grad_q's row: scale * dq
template <typename T, int VEC, int TPG, int NC>
__device__ __forceinline__ void store_gq(T *gq, int64_t row, const float (&dq)[NC][VEC], const bool (&ch)[NC],
                                         int lane, const Params &p) {
#pragma unroll
  for (int c = 0; c < NC; c++) {
    if (!ch[c]) continue;
    float x[VEC];
#pragma unroll
    for (int e = 0; e < VEC; e++) x[e] = p.scale * dq[c][e];
    st<T, VEC>(gq + row * p.D + (c * TPG + lane) * VEC, x);
  }
}

// ------------------------------------------------------------------------------------------------ forward
template <typename T, int VEC, int TPG, int NC>
__global__ void __launch_bounds__(256) fwd_kernel(T *__restrict__ out, float *__restrict__ lse, const T *__restrict__ q,
                                                  const T *__restrict__ k, const T *__restrict__ v,
                                                  const float *__restrict__ coords, const __grid_constant__ Params p) {
  extern __shared__ float4 smem4[];
  Foot *fs = (Foot *)smem4;
  const Place w = place<TPG>(p);
  float qr[NC][VEC], acc[NC][VEC];
  bool ch[NC];
  load_q_row<T, VEC, TPG, NC>(qr, acc, ch, q + w.b * p.qb + w.v1 * p.qv + w.h * p.qh + w.l * p.ql, w.lane, p);
  const T *kbase = k + w.b * p.kb + w.h * p.kh, *vbase = v + w.b * p.vb + w.h * p.vh;
  float m = -INFINITY, lsum = 0.f;
  for (int n0 = 0; n0 < p.VS; n0 += SC) {
    __syncthreads();
    stage_feet(p, fs, coords, w.b, w.v1, w.l0, n0);
    __syncthreads();
    const int nj = min(SC, p.VS - n0);
    for (int j = 0; j < nj; j++) {
      const float4 *fp = (const float4 *)&fs[w.qt * SC + j];
      const float4 a = fp[0], wt = fp[1];
      const int pix = __float_as_int(a.x), mv = __float_as_int(a.y);
      const float wk[4] = {wt.x, wt.y, wt.z, wt.w};
      const int v2 = mv >> 4;
      const int off[4] = {pix, pix + 1, pix + p.W, pix + p.W + 1};
      fwd_sample<T, VEC, TPG, NC>(acc, m, lsum, qr, ch, kbase + v2 * p.kv, p.kl, vbase + v2 * p.vv, p.vl, off, wk, mv,
                                  w.lane, p);
    }
  }
  if (!w.active) return;
  store_out<T, VEC, TPG, NC>(out, lse, (((int64_t)w.b * p.V + w.v1) * p.NH + w.h) * p.L + w.l, acc, ch, m, lsum,
                             w.lane, p);
}

// the k and v maps (L x D, row strides p.kl / p.vl, 16-byte aligned rows) into km / vm (dense), by the block
template <typename T, int VEC>
__device__ __forceinline__ void copy_maps(T *km, T *vm, const T *ks, const T *vs, const Params &p) {
  const int rowv = p.D / VEC, nvec = p.L * rowv;
  for (int i = threadIdx.x; i < 2 * nvec; i += blockDim.x) {
    const int r = i < nvec ? i : i - nvec, row = r / rowv, c = (r % rowv) * VEC;
    const T *src = i < nvec ? ks + row * p.kl + c : vs + row * p.vl + c;
    T *dst = (i < nvec ? km : vm) + row * p.D + c;
    *(uint4 *)dst = __ldg((const uint4 *)src);
  }
}

// The forward with the maps in shared memory (map_plan: 16-byte vectors, both maps of a (b, v2, h) fit): a
// block takes QT query positions of b (flat over (v1, l): p.ltiles tiles per (b, h)) and one head, and walks the
// views v2 in order: the block copies the k and v maps of (b, v2, h) into shared memory (as stored, in the dtype),
// then each group gathers its query's S samples there. Lane j of a group computes the footprint of sample s0 + j
// (the coordinates: group-wide loads), the group reads it by shuffles. Samples in the order n = v2 * S + s, as
// fwd_kernel. The gathers then read shared memory only; each map leaves global memory once per block.
template <typename T, int VEC, int TPG, int NC>
__global__ void __launch_bounds__(512, 2) fwd_map_kernel(T *__restrict__ out, float *__restrict__ lse,
                                                      const T *__restrict__ q, const T *__restrict__ k,
                                                      const T *__restrict__ v, const float *__restrict__ coords,
                                                      const __grid_constant__ Params p) {
  extern __shared__ float4 smem4[];
  const int LDm = p.L * p.D;  // D a multiple of VEC: every row 16-byte aligned
  T *km = (T *)smem4, *vm = km + LDm;
  const int nq = p.V * p.L;
  const int tile = blockIdx.x % p.ltiles, bh = blockIdx.x / p.ltiles, h = bh % p.NH, b = bh / p.NH;
  const int lane = threadIdx.x % TPG, qi = tile * p.QT + threadIdx.x / TPG;
  const bool active = qi < nq;
  const int qa = active ? qi : nq - 1, v1 = qa / p.L, l = qa % p.L;  // idle groups run along on a valid row
  float qr[NC][VEC], acc[NC][VEC];
  bool ch[NC];
  load_q_row<T, VEC, TPG, NC>(qr, acc, ch, q + b * p.qb + v1 * p.qv + h * p.qh + l * p.ql, lane, p);
  float m = -INFINITY, lsum = 0.f;
  const int64_t e0 = ((int64_t)b * nq + qa) * p.VS;
  for (int v2 = 0; v2 < p.V; v2++) {
    __syncthreads();
    copy_maps<T, VEC>(km, vm, k + b * p.kb + v2 * p.kv + h * p.kh, v + b * p.vb + v2 * p.vv + h * p.vh, p);
    __syncthreads();
    for (int s0 = 0; s0 < p.S; s0 += TPG) {
      Foot f;
      f.pix = 0;
      f.mv = 0;
      f.w[0] = f.w[1] = f.w[2] = f.w[3] = 0.f;
      if (s0 + lane < p.S) {
        int x0, y0;
        footprint(p, coords + 2 * (e0 + v2 * p.S + s0 + lane), v2, f, x0, y0);
      }
      const int ns = min(TPG, p.S - s0);
      for (int j = 0; j < ns; j++) {
        const int pix = __shfl_sync(FULL, f.pix, j, TPG), mv = __shfl_sync(FULL, f.mv, j, TPG);
        float wk[4];
#pragma unroll
        for (int t = 0; t < 4; t++) wk[t] = __shfl_sync(FULL, f.w[t], j, TPG);
        const int off[4] = {pix, pix + 1, pix + p.W, pix + p.W + 1};
        fwd_sample<T, VEC, TPG, NC>(acc, m, lsum, qr, ch, km, p.D, vm, p.D, off, wk, mv, lane, p);
      }
    }
  }
  if (!active) return;
  store_out<T, VEC, TPG, NC>(out, lse, (((int64_t)b * p.V + v1) * p.NH + h) * p.L + l, acc, ch, m, lsum, lane, p);
}

// ------------------------------------------------------------------------------------------------ backward
// grad_q (gq, when wanted), the coordinates' gradient (gc: grad_coords or the head tile's partials, when wanted),
// and grad_k / grad_v: scattered with atomics into gk32 / gv32 (when not NULL), or (P, dS) recorded into pd
// (deterministic; when not NULL)
template <typename T, int VEC, int TPG, int NC>
__global__ void __launch_bounds__(256) bwd_kernel(T *__restrict__ gq, float *__restrict__ gc, float *__restrict__ gk32,
                                                  float *__restrict__ gv32, float2 *__restrict__ pd,
                                                  const T *__restrict__ go, const T *__restrict__ q,
                                                  const T *__restrict__ k, const T *__restrict__ v,
                                                  const float *__restrict__ coords, const T *__restrict__ o,
                                                  const float *__restrict__ lse, const __grid_constant__ Params p) {
  extern __shared__ float4 smem4[];
  Foot *fs = (Foot *)smem4;
  float2 *gcs = (float2 *)(fs + p.QT * SC);  // [qt][hh][j]
  const Place w = place<TPG>(p);
  const int hh = w.h - blockIdx.y * p.HT;
  float qr[NC][VEC], gr[NC][VEC], dq[NC][VEC];
  bool ch[NC];
  const float delta = load_bwd_rows<T, VEC, TPG, NC>(
      qr, gr, dq, ch, q + w.b * p.qb + w.v1 * p.qv + w.h * p.qh + w.l * p.ql,
      go + w.b * p.gb + w.v1 * p.gv + w.h * p.gh + w.l * p.gl, o + w.b * p.ob + w.v1 * p.ov + w.h * p.oh + w.l * p.ol,
      w.lane, p);
  const int64_t row = (((int64_t)w.b * p.V + w.v1) * p.NH + w.h) * p.L + w.l;
  const float lse2 = lse[row] * FA_ATTN_LOG2E;
  const int64_t e0 = (((int64_t)w.b * p.V + w.v1) * p.L + w.l) * p.VS;  // the query position's first sample
  const T *kbase = k + w.b * p.kb + w.h * p.kh, *vbase = v + w.b * p.vb + w.h * p.vh;
  const int64_t LD = (int64_t)p.L * p.D;
  for (int n0 = 0; n0 < p.VS; n0 += SC) {
    __syncthreads();
    stage_feet(p, fs, coords, w.b, w.v1, w.l0, n0);
    __syncthreads();
    const int nj = min(SC, p.VS - n0);
    for (int j = 0; j < nj; j++) {
      const Foot f = fs[w.qt * SC + j];
      const int v2 = f.mv >> 4, mv = f.mv;
      const int off[4] = {f.pix, f.pix + 1, f.pix + p.W, f.pix + p.W + 1};
      float a[4], g[4], pr, ds;  // partial q.k_t, dO.v_t
      bwd_sample<T, VEC, TPG, NC>(dq, a, g, pr, ds, qr, gr, ch, kbase + v2 * p.kv, p.kl, vbase + v2 * p.vv, p.vl, off,
                                  f.w, mv, lse2, delta, w.lane, p);
      const float sds = p.scale * ds;
      if (gc) {
        float du, dv;
        coord_grad(a, g, f.fx, f.fy, sds, pr, du, dv);
        du = gsum<TPG>(du);
        dv = gsum<TPG>(dv);
        if (w.active && w.lane == 0) gcs[(w.qt * p.HT + hh) * SC + j] = make_float2(du, dv);
      }
      if (pd && w.active && w.lane == 0) pd[(e0 + n0 + j) * p.NH + w.h] = make_float2(pr, ds);
      if (gk32 || gv32) {
        if (!w.active) continue;
        const int64_t map = (((int64_t)w.b * p.V + v2) * p.NH + w.h) * LD;
#pragma unroll
        for (int t = 0; t < 4; t++) {
          if (!(mv >> t & 1)) continue;
#pragma unroll
          for (int c = 0; c < NC; c++) {
            if (!ch[c]) continue;
            const int64_t at = map + (int64_t)off[t] * p.D + (c * TPG + w.lane) * VEC;
            float x[VEC];
            if (gk32) {
#pragma unroll
              for (int e = 0; e < VEC; e++) x[e] = sds * f.w[t] * qr[c][e];
              red_add<VEC>(gk32 + at, x);
            }
            if (gv32) {
#pragma unroll
              for (int e = 0; e < VEC; e++) x[e] = pr * f.w[t] * gr[c][e];
              red_add<VEC>(gv32 + at, x);
            }
          }
        }
      }
    }
    if (gc) {  // the round's coordinate gradients, summed over the block's heads in head order
      __syncthreads();
      const int nh = min(p.HT, p.NH - (int)blockIdx.y * p.HT), nq = min(p.QT, p.L - w.l0);
      const bool whole = p.nht == 1;
      for (int i = threadIdx.x; i < nq * nj; i += blockDim.x) {
        const int qt = i / nj, j = i % nj;
        float su = 0.f, sv = 0.f;
        for (int x = 0; x < nh; x++) {
          const float2 r = gcs[(qt * p.HT + x) * SC + j];
          su += r.x;
          sv += r.y;
        }
        const int64_t e = (((int64_t)w.b * p.V + w.v1) * p.L + w.l0 + qt) * p.VS + n0 + j;
        if (whole) {
          gc[2 * e] = su * (float)(p.W - 1);
          gc[2 * e + 1] = sv * (float)(p.H - 1);
        } else if (p.gatom) {  // head tiles add into grad_coords (zeroed); order not fixed
          red_add2(gc + 2 * e, su * (float)(p.W - 1), sv * (float)(p.H - 1));
        } else {
          float *dst = gc + (int64_t)blockIdx.y * p.B * p.V * p.L * p.VS * 2;
          dst[2 * e] = su;
          dst[2 * e + 1] = sv;
        }
      }
    }
  }
  if (!gq || !w.active) return;
  store_gq<T, VEC, TPG, NC>(gq, row, dq, ch, w.lane, p);
}

// bwd_kernel in map mode (the forward's map mode: a block = QT query positions of one (b, h), the views' k/v maps
// staged in shared memory): grad_q, the (P, dS) record pd (deterministic only), and the coordinates' gradient:
// p.gatom: float atomics of every head into grad_coords (gcp = grad_coords, zeroed); else each head into its
// partial gcp[h] (npts x 2, unscaled; finish_coords_kernel sums them in head order). No grad_k / grad_v here.
template <typename T, int VEC, int TPG, int NC>
__global__ void __launch_bounds__(256, 2) bwd_map_kernel(T *__restrict__ gq, float *__restrict__ gcp,
                                                         float2 *__restrict__ pd, const T *__restrict__ go,
                                                         const T *__restrict__ q, const T *__restrict__ k,
                                                         const T *__restrict__ v, const float *__restrict__ coords,
                                                         const T *__restrict__ o, const float *__restrict__ lse,
                                                         const __grid_constant__ Params p) {
  extern __shared__ float4 smem4[];
  const int LDm = p.L * p.D;
  T *km = (T *)smem4, *vm = km + LDm;
  const int nq = p.V * p.L;
  const int tile = blockIdx.x % p.ltiles, bh = blockIdx.x / p.ltiles, h = bh % p.NH, b = bh / p.NH;
  const int lane = threadIdx.x % TPG, qi = tile * p.QT + threadIdx.x / TPG;
  const bool active = qi < nq;
  const int qa = active ? qi : nq - 1, v1 = qa / p.L, l = qa % p.L;
  float qr[NC][VEC], gr[NC][VEC], dq[NC][VEC];
  bool ch[NC];
  const float delta = load_bwd_rows<T, VEC, TPG, NC>(qr, gr, dq, ch, q + b * p.qb + v1 * p.qv + h * p.qh + l * p.ql,
                                                     go + b * p.gb + v1 * p.gv + h * p.gh + l * p.gl,
                                                     o + b * p.ob + v1 * p.ov + h * p.oh + l * p.ol, lane, p);
  const int64_t row = (((int64_t)b * p.V + v1) * p.NH + h) * p.L + l;
  const float lse2 = lse[row] * FA_ATTN_LOG2E;
  const int64_t e0 = ((int64_t)b * nq + qa) * p.VS, npts2 = (int64_t)p.B * nq * p.VS * 2;
  for (int v2 = 0; v2 < p.V; v2++) {
    __syncthreads();
    copy_maps<T, VEC>(km, vm, k + b * p.kb + v2 * p.kv + h * p.kh, v + b * p.vb + v2 * p.vv + h * p.vh, p);
    __syncthreads();
    for (int s0 = 0; s0 < p.S; s0 += TPG) {
      Foot f;
      f.pix = 0;
      f.mv = 0;
      f.fx = f.fy = 0.f;
      f.w[0] = f.w[1] = f.w[2] = f.w[3] = 0.f;
      if (s0 + lane < p.S) {
        int x0, y0;
        footprint(p, coords + 2 * (e0 + v2 * p.S + s0 + lane), v2, f, x0, y0);
      }
      const int ns = min(TPG, p.S - s0);
      for (int j = 0; j < ns; j++) {
        const int pix = __shfl_sync(FULL, f.pix, j, TPG), mv = __shfl_sync(FULL, f.mv, j, TPG);
        const float fx = __shfl_sync(FULL, f.fx, j, TPG), fy = __shfl_sync(FULL, f.fy, j, TPG);
        float wk[4];
#pragma unroll
        for (int t = 0; t < 4; t++) wk[t] = __shfl_sync(FULL, f.w[t], j, TPG);
        const int off[4] = {pix, pix + 1, pix + p.W, pix + p.W + 1};
        float a[4], g[4], pr, ds;  // partial q.k_t, dO.v_t
        bwd_sample<T, VEC, TPG, NC>(dq, a, g, pr, ds, qr, gr, ch, km, p.D, vm, p.D, off, wk, mv, lse2, delta, lane, p);
        const float sds = p.scale * ds;
        const int64_t e = e0 + v2 * p.S + s0 + j;
        if (gcp) {
          float du, dv;
          coord_grad(a, g, fx, fy, sds, pr, du, dv);
          du = gsum<TPG>(du);
          dv = gsum<TPG>(dv);
          if (active && lane == 0) {
            if (p.gatom)  // every head adds into grad_coords (zeroed), scaled; order not fixed
              red_add2(gcp + 2 * e, du * (float)(p.W - 1), dv * (float)(p.H - 1));
            else
              *(float2 *)(gcp + h * npts2 + 2 * e) = make_float2(du, dv);
          }
        }
        if (pd && active && lane == 0) pd[e * p.NH + h] = make_float2(pr, ds);
      }
    }
  }
  if (!gq || !active) return;
  store_gq<T, VEC, TPG, NC>(gq, row, dq, ch, lane, p);
}

// grad_coords = the head tiles' partials summed in tile order, times (W - 1, H - 1)
__global__ void finish_coords_kernel(float *__restrict__ gc, const float *__restrict__ part, int64_t n, int tiles,
                                     float sx, float sy) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float s = 0.f;
    for (int t = 0; t < tiles; t++) s += part[(int64_t)t * n + i];
    gc[i] = s * ((i & 1) ? sy : sx);
  }
}

template <typename T>
__global__ void cast_kernel(T *__restrict__ dst, const float *__restrict__ src, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = fa_from_f<T>(src[i]);
}

// ------------------------------------------------------------------------------------------------ gather
// key of sample i = its cell (x0, y0) on the (H+1)x(W+1) grid of (b, v2); samples with no tap inside get nkeys
// (sorted last, never read); wt[i] = the 4 weights; counts[key] += 1
__global__ void keys_kernel(unsigned *__restrict__ keys, unsigned *__restrict__ ids, float4 *__restrict__ wt,
                            int *__restrict__ counts, const float *__restrict__ coords, const __grid_constant__ Params p,
                            int npts, unsigned nkeys) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < npts; i += gridDim.x * blockDim.x) {
    const int n = i % p.VS, b = i / (p.V * p.L * p.VS), v2 = n / p.S;
    Foot f;
    int x0, y0;
    footprint(p, coords + 2 * (int64_t)i, v2, f, x0, y0);
    unsigned key = nkeys;
    if (f.mv & 15) {
      key = (unsigned)((b * p.V + v2) * p.Sx + (y0 + 1) * (p.W + 1) + (x0 + 1));
      atomicAdd(counts + key, 1);
    }
    keys[i] = key;
    ids[i] = (unsigned)i;
    wt[i] = make_float4(f.w[0], f.w[1], f.w[2], f.w[3]);
  }
}

// one group of TPG lanes per grad_k / grad_v row (b, v2, h, pixel): sums over the samples of the 4 cells around
// the pixel (cell order fixed, samples in sample order within a cell)
template <typename T, int VEC, int TPG, int NC>
__global__ void __launch_bounds__(256) gather_kernel(T *__restrict__ gk, T *__restrict__ gv, const unsigned *__restrict__ ids,
                                                     const float *__restrict__ wt, const int *__restrict__ offs,
                                                     const float2 *__restrict__ pd, const T *__restrict__ q,
                                                     const T *__restrict__ go, const __grid_constant__ Params p,
                                                     int64_t rows) {
  const int lane = threadIdx.x % TPG;
  const int64_t r = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / TPG;
  if (r >= rows) return;  // whole groups leave together (no shuffles below)
  const int pix = (int)(r % p.L), h = (int)(r / p.L % p.NH);
  const int bv = (int)(r / ((int64_t)p.L * p.NH)), b = bv / p.V;
  const int pi = pix / p.W, pj = pix % p.W, Wx = p.W + 1;
  const int kb = bv * p.Sx;
  // cells whose sample has this pixel as tap k: 0 at (pi, pj), 1 at (pi, pj-1), 2 at (pi-1, pj), 3 at (pi-1, pj-1);
  // cell (y0, x0) is key (y0+1)*(W+1) + (x0+1)
  const int k0 = kb + (pi + 1) * Wx + pj + 1, k2 = kb + pi * Wx + pj + 1;
  const int kk[4] = {k0, k0 - 1, k2, k2 - 1};
  float ak[NC][VEC], av[NC][VEC];
#pragma unroll
  for (int c = 0; c < NC; c++)
#pragma unroll
    for (int e = 0; e < VEC; e++) ak[c][e] = av[c][e] = 0.f;
#pragma unroll
  for (int t = 0; t < 4; t++) {
    const int beg = offs[kk[t]], end = offs[kk[t] + 1];
    for (int x = beg; x < end; x++) {
      const unsigned i = ids[x];
      const float wgt = wt[4 * (int64_t)i + t];
      const float2 pds = pd[(int64_t)i * p.NH + h];
      const int qp = (int)(i / (unsigned)p.VS), l = qp % p.L, v1 = qp / p.L % p.V;
      const float cq = p.scale * pds.y * wgt, cg = pds.x * wgt;
      const T *qr = q + b * p.qb + v1 * p.qv + h * p.qh + l * p.ql;
      const T *gr = go + b * p.gb + v1 * p.gv + h * p.gh + l * p.gl;
#pragma unroll
      for (int c = 0; c < NC; c++) {
        const int d = (c * TPG + lane) * VEC;
        if (d >= p.D) continue;
        float y[VEC];
        if (gk) {
          ld<T, VEC>(y, qr + d);
#pragma unroll
          for (int e = 0; e < VEC; e++) ak[c][e] = fmaf(cq, y[e], ak[c][e]);
        }
        if (gv) {
          ld<T, VEC>(y, gr + d);
#pragma unroll
          for (int e = 0; e < VEC; e++) av[c][e] = fmaf(cg, y[e], av[c][e]);
        }
      }
    }
  }
#pragma unroll
  for (int c = 0; c < NC; c++) {
    const int d = (c * TPG + lane) * VEC;
    if (d >= p.D) continue;
    if (gk) st<T, VEC>(gk + r * p.D + d, ak[c]);
    if (gv) st<T, VEC>(gv + r * p.D + d, av[c]);
  }
}

// ------------------------------------------------------------------------------------------------ key side
// kv_kernel's shared memory: the k and v maps [pixel][D] in the dtype, then the float32 accumulators [pixel][D]
// (grad_k, grad_v) as float2, then 2 float4 per thread (the footprint its lane prepared); each part 16-byte aligned
__host__ __device__ __forceinline__ size_t r16(size_t x) { return (x + 15) & ~(size_t)15; }
__host__ __device__ __forceinline__ size_t kv_acc_off(size_t LD, size_t tsize) { return r16(2 * LD * tsize); }
__host__ __device__ __forceinline__ size_t kv_prep_off(size_t LD, size_t tsize) {
  return kv_acc_off(LD, tsize) + r16(8 * LD);
}

// p->x += x, p->y += y (shared memory) as one 64-bit compare-and-swap loop: sm_80 and sm_90 have no native float
// add in shared memory (atomicAdd(float *) there compiles to LDS + FADD + ATOMS.CAS loop per float), so a pair
// per loop halves the loops of grad_k and grad_v
__device__ __forceinline__ void smem_add2(float2 *p, float x, float y) {
  unsigned long long *a = (unsigned long long *)p;
  unsigned long long old = *(volatile unsigned long long *)a, seen;
  do {
    seen = old;
    const float nx = __uint_as_float((unsigned)seen) + x, ny = __uint_as_float((unsigned)(seen >> 32)) + y;
    old = atomicCAS(a, seen, (unsigned long long)__float_as_uint(nx) | (unsigned long long)__float_as_uint(ny) << 32);
  } while (old != seen);
}

// kv_kernel's block size: at most 1024 threads, 512 for D > 64 (NCH >= 4: 64 registers spill for float32)
__host__ __device__ constexpr int kv_max_threads(int nch) { return nch >= 4 ? 512 : 1024; }

// grad_k / grad_v without global atomics and without a (P, dS) record (the default where a map and its
// accumulators fit in shared memory): one block per map (b, v2, h) and query split blockIdx.y of nz. The block
// copies the map's k and v into shared memory and zeroes float32 accumulators; every query position of b visits
// its S samples in v2 and recomputes what the query side computed: s = q . (sum_t w_t k_t), dP = dO . (sum_t w_t
// v_t) (group sums), P = exp2(scale2 s - lse2), dS = P (dP - delta) with delta = <dO, O> of its row (formed here,
// once per (query, map)); then scale dS w_t q and P w_t dO go into the 4 taps with shared-memory atomics, one
// 64-bit CAS per (tap, channel) for the pair (order not fixed: not the deterministic path). nz == 1: the block
// writes its rows once, in the dtype; nz > 1: float32 atomics of the partial maps into gk32 / gv32 (zeroed). A
// group of G lanes per query position, channel d = c * G + lane (consecutive lanes, consecutive banks); lane j of
// a group computes the footprint of sample s0 + j into prep and the group reads it back as 2 broadcast float4.
// mvec > 1: k / v rows allow 16-byte copies.
template <typename T, int G, int NCH>
__global__ void __launch_bounds__(kv_max_threads(NCH), 1)
    kv_kernel(T *__restrict__ gk, T *__restrict__ gv, float *__restrict__ gk32, float *__restrict__ gv32,
              const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, const T *__restrict__ go,
              const T *__restrict__ o, const float *__restrict__ lse, const float *__restrict__ coords,
              const __grid_constant__ Params p, int nz, int mvec) {
  extern __shared__ float4 smem4[];
  const int LD = p.L * p.D;
  T *km = (T *)smem4, *vm = km + LD;
  float2 *acc = (float2 *)((char *)smem4 + kv_acc_off(LD, sizeof(T)));  // (grad_k, grad_v) of [pixel][D]
  float4 *prep = (float4 *)((char *)smem4 + kv_prep_off(LD, sizeof(T)));
  const int map = blockIdx.x, h = map % p.NH, bv = map / p.NH, v2 = bv % p.V, b = bv / p.V;
  const T *ksrc = k + b * p.kb + v2 * p.kv + h * p.kh, *vsrc = v + b * p.vb + v2 * p.vv + h * p.vh;
  if (mvec > 1) {
    copy_maps<T, 16 / (int)sizeof(T)>(km, vm, ksrc, vsrc, p);
  } else {
    for (int i = threadIdx.x; i < 2 * LD; i += blockDim.x) {
      const int r = i < LD ? i : i - LD, row = r / p.D, c = r % p.D;
      if (i < LD) km[r] = ksrc[row * p.kl + c];
      else vm[r] = vsrc[row * p.vl + c];
    }
  }
  for (int i = threadIdx.x; i < LD; i += blockDim.x) acc[i] = make_float2(0.f, 0.f);
  __syncthreads();
  const int lane = threadIdx.x % G, grp = threadIdx.x / G, ngrp = blockDim.x / G;
  const int nq = p.V * p.L, per = (nq + nz - 1) / nz, q0 = blockIdx.y * per, q1 = min(nq, q0 + per);
  const bool wk = gk || gk32, wv = gv || gv32;
  // every group runs the same iterations (whole warps in the shuffles and __syncwarp); idle groups write nothing
  for (int qb = q0; qb < q1; qb += ngrp) {
    const int qi = qb + grp;
    const bool active = qi < q1;
    const int qa = active ? qi : q0, v1 = qa / p.L, l = qa % p.L;
    const T *qrow = q + b * p.qb + v1 * p.qv + h * p.qh + l * p.ql;
    const T *grow = go + b * p.gb + v1 * p.gv + h * p.gh + l * p.gl;
    const T *orow = o + b * p.ob + v1 * p.ov + h * p.oh + l * p.ol;
    float qr[NCH], gr[NCH], dpart = 0.f;
#pragma unroll
    for (int c = 0; c < NCH; c++) {
      const int d = c * G + lane;
      qr[c] = gr[c] = 0.f;
      if (d < p.D) {
        qr[c] = fa_to_f<T>(qrow[d]);
        gr[c] = fa_to_f<T>(grow[d]);
        dpart = fmaf(gr[c], fa_to_f<T>(orow[d]), dpart);
      }
    }
    const float delta = gsum<G>(dpart);
    const float lse2 = lse[(((int64_t)b * p.V + v1) * p.NH + h) * p.L + l] * FA_ATTN_LOG2E;
    const int64_t e0 = ((int64_t)b * nq + qa) * p.VS + (int64_t)v2 * p.S;  // the samples of (query, v2)
    for (int s0 = 0; s0 < p.S; s0 += G) {
      Foot f;
      f.pix = 0;
      f.mv = 0;
      f.w[0] = f.w[1] = f.w[2] = f.w[3] = 0.f;
      if (active && s0 + lane < p.S) {
        int x0, y0;
        footprint(p, coords + 2 * (e0 + s0 + lane), v2, f, x0, y0);
      }
      __syncwarp();  // the previous round's reads of prep are done
      prep[2 * threadIdx.x] = make_float4(__int_as_float(f.pix), __int_as_float(f.mv), 0.f, 0.f);
      prep[2 * threadIdx.x + 1] = make_float4(f.w[0], f.w[1], f.w[2], f.w[3]);
      __syncwarp();
      // two samples per step (their score chains overlap); the second of an odd count is a footprint without
      // taps (lanes past S prepared one): its scores are computed and nothing is written
      const int ns = min(G, p.S - s0);
      for (int j = 0; j < ns; j += 2) {
        int pix[2], mv[2];
        float wt[2][4], pr[2], sds[2];
#pragma unroll
        for (int u = 0; u < 2; u++) {
          const float4 *fp = prep + 2 * (grp * G + j + u);
          const float4 a = fp[0], w4 = fp[1];
          pix[u] = __float_as_int(a.x);
          mv[u] = __float_as_int(a.y);
          wt[u][0] = w4.x;
          wt[u][1] = w4.y;
          wt[u][2] = w4.z;
          wt[u][3] = w4.w;
        }
        float sp[2] = {0.f, 0.f}, gp[2] = {0.f, 0.f};
#pragma unroll
        for (int u = 0; u < 2; u++)
#pragma unroll
          for (int c = 0; c < NCH; c++) {
            const int d = c * G + lane;
            if (d >= p.D) continue;
            float kb = 0.f, vb = 0.f;
#pragma unroll
            for (int t = 0; t < 4; t++) {
              if (!(mv[u] >> t & 1)) continue;  // a tap outside: 0 (its pixel may not exist)
              const int at = (pix[u] + (t & 1) + (t >> 1) * p.W) * p.D + d;
              kb = fmaf(wt[u][t], fa_to_f<T>(km[at]), kb);
              vb = fmaf(wt[u][t], fa_to_f<T>(vm[at]), vb);
            }
            sp[u] = fmaf(qr[c], kb, sp[u]);
            gp[u] = fmaf(gr[c], vb, gp[u]);
          }
#pragma unroll
        for (int u = 0; u < 2; u++) {
          float s, dp;
          gsum2<G>(sp[u], gp[u], s, dp, lane);
          pr[u] = exp2f(s * p.scale2 - lse2);
          sds[u] = p.scale * (pr[u] * (dp - delta));
        }
        if (!active) continue;  // no shuffles below
#pragma unroll
        for (int u = 0; u < 2; u++)
#pragma unroll
          for (int t = 0; t < 4; t++) {
            if (!(mv[u] >> t & 1)) continue;
            const int at = (pix[u] + (t & 1) + (t >> 1) * p.W) * p.D;
            const float ck = sds[u] * wt[u][t], cv = pr[u] * wt[u][t];
#pragma unroll
            for (int c = 0; c < NCH; c++) {
              const int d = c * G + lane;
              if (d >= p.D) continue;
              smem_add2(acc + at + d, wk ? ck * qr[c] : 0.f, wv ? cv * gr[c] : 0.f);
            }
          }
      }
    }
  }
  __syncthreads();
  const int64_t base = (int64_t)map * LD;
  for (int i = threadIdx.x; i < LD; i += blockDim.x) {
    const float2 a = acc[i];
    if (nz == 1) {
      if (gk) gk[base + i] = fa_from_f<T>(a.x);
      if (gv) gv[base + i] = fa_from_f<T>(a.y);
    } else {
      if (gk32) atomicAdd(gk32 + base + i, a.x);
      if (gv32) atomicAdd(gv32 + base + i, a.y);
    }
  }
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 900
// p->x += x, p->y += y as smem_add2, starting from old (a value of *p read before: the first compare-and-swap is
// issued without a dependent load); smem_add4_from's sm_80 half
__device__ __forceinline__ void smem_add2_from(float2 *p, float x, float y, unsigned long long old) {
  unsigned long long *a = (unsigned long long *)p, seen;
  do {
    seen = old;
    const float nx = __uint_as_float((unsigned)seen) + x, ny = __uint_as_float((unsigned)(seen >> 32)) + y;
    old = atomicCAS(a, seen, (unsigned long long)__float_as_uint(nx) | (unsigned long long)__float_as_uint(ny) << 32);
  } while (old != seen);
}
#endif

// p[0] += (k0, v0), p[1] += (k1, v1) (shared memory, p 16-byte aligned), starting from old (a value of p[0 .. 2)
// read before). sm_90: one 128-bit compare-and-swap loop for the four floats (atom.shared.cas.b128 is one
// ATOMS.CAS there: checked on the sm_90a cubin, no loop around it); sm_80: two 64-bit loops.
__device__ __forceinline__ void smem_add4_from(float2 *p, float k0, float v0, float k1, float v1, ulonglong2 old) {
#if __CUDA_ARCH__ >= 900
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  unsigned long long s0, s1;
  do {
    s0 = old.x;
    s1 = old.y;
    const unsigned long long n0 = (unsigned long long)__float_as_uint(__uint_as_float((unsigned)s0) + k0) |
                                  (unsigned long long)__float_as_uint(__uint_as_float((unsigned)(s0 >> 32)) + v0) << 32;
    const unsigned long long n1 = (unsigned long long)__float_as_uint(__uint_as_float((unsigned)s1) + k1) |
                                  (unsigned long long)__float_as_uint(__uint_as_float((unsigned)(s1 >> 32)) + v1) << 32;
    asm volatile(
        "{\n .reg .b128 d, c, n;\n mov.b128 c, {%2, %3};\n mov.b128 n, {%4, %5};\n"
        " atom.shared.cas.b128 d, [%6], c, n;\n mov.b128 {%0, %1}, d;\n}"
        : "=l"(old.x), "=l"(old.y)
        : "l"(s0), "l"(s1), "l"(n0), "l"(n1), "r"(a)
        : "memory");
  } while (old.x != s0 || old.y != s1);
#else
  smem_add2_from(p, k0, v0, old.x);
  smem_add2_from(p + 1, k1, v1, old.y);
#endif
}

// kv_kernel with 4 channels per lane (kv_plan's choice where the rows allow 16-byte vectors and D <= 128): the same
// work and shared memory as kv_kernel (less the prep area), but a group of G lanes per query position (G the least
// power of two >= 2 with 4 G >= D), so that a warp takes 32 / G query positions at once and the per-sample work that
// does not depend on the channel (footprint shuffles, tap masks and addresses, the group sums, exp2, branches) is
// shared by fewer lanes: kv_kernel's warp per query position at D 32 issued ~200 warp instructions per (query,
// sample, head). Gathers: lane j reads channels 4j .. 4j+3 of a tap's row (one 16-byte float32 / 8-byte 16-bit
// load; a group reads a whole row: no bank conflicts for float32 rows of 128 bytes). Scatter: lane j adds the
// channel pairs (2P, 2P+1), P = c' G + j, c' = (c + group in warp) mod 2, c = 0, 1 (q and dO at those channels read
// once per query position), each pair's (grad_k, grad_v) 16 bytes by one 128-bit compare-and-swap loop on sm_90
// (two 64-bit loops on sm_80) that starts from a load of the words issued before (no dependent load per loop).
// float32 (FUSE): the kernel is the whole backward (no bwd_map_kernel): it also adds scale * sum_s dS k_blend of
// its (query, map) into grad_q (gq32: float32, zeroed; red.global.add.v4 on sm_90, 8 maps per row) and each
// sample's d/du, d/dv (bwd_map_kernel's per-tap partials q.k_t, dO.v_t and coord_grad) into grad_coords (gc,
// zeroed; float atomics over heads, as bwd_map_kernel's default mode). 16-bit: grad_q would need a float32 scratch
// (10.6 MB at the main config, past the memory goal), so bwd_map_kernel gives grad_q and grad_coords there.
__host__ __device__ constexpr int kv4_threads(size_t tsize) { return tsize == 4 ? 640 : 1024; }
template <typename T, int G>
__global__ void __launch_bounds__(kv4_threads(sizeof(T)), 1)
    kv4_kernel(T *__restrict__ gk, T *__restrict__ gv, float *__restrict__ gk32, float *__restrict__ gv32,
               const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, const T *__restrict__ go,
               const T *__restrict__ o, const float *__restrict__ lse, const float *__restrict__ coords,
               const __grid_constant__ Params p, int nz, float *__restrict__ gq32, float *__restrict__ gc) {
  constexpr bool FUSE = sizeof(T) == 4;
  extern __shared__ float4 smem4[];
  const int LD = p.L * p.D;
  T *km = (T *)smem4, *vm = km + LD;
  float2 *acc = (float2 *)((char *)smem4 + kv_acc_off(LD, sizeof(T)));  // (grad_k, grad_v) of [pixel][D]
  const int map = blockIdx.x, h = map % p.NH, bv = map / p.NH, v2 = bv % p.V, b = bv / p.V;
  copy_maps<T, 16 / (int)sizeof(T)>(km, vm, k + b * p.kb + v2 * p.kv + h * p.kh, v + b * p.vb + v2 * p.vv + h * p.vh,
                                    p);
  for (int i = threadIdx.x; i < LD; i += blockDim.x) acc[i] = make_float2(0.f, 0.f);
  __syncthreads();
  const int lane = threadIdx.x % G, grp = threadIdx.x / G, ngrp = blockDim.x / G;
  const int rot = (threadIdx.x % 32) / G;  // the group in its warp
  const int d0 = 4 * lane;                 // gather channels d0 .. d0 + 3
  const bool gch = d0 < p.D;               // D a multiple of 4: all four or none
  // scatter channel pair c (0, 1) of the lane: channels 2 P and 2 P + 1, P = ((c + rot) & 1) * G + lane (formed
  // where used: registers)
#define KV4_DSC(c) (2 * ((((c) + rot) & 1) * G + lane))
  const int nq = p.V * p.L, per = (nq + nz - 1) / nz, q0 = blockIdx.y * per, q1 = min(nq, q0 + per);
  const bool wk = gk || gk32, wv = gv || gv32;
  // every group runs the same iterations (whole warps in the shuffles); idle groups write nothing
  for (int qb = q0; qb < q1; qb += ngrp) {
    const int qi = qb + grp;
    const bool active = qi < q1;
    const int qa = active ? qi : q0, v1 = qa / p.L, l = qa % p.L;
    const T *qrow = q + b * p.qb + v1 * p.qv + h * p.qh + l * p.ql;
    const T *grow = go + b * p.gb + v1 * p.gv + h * p.gh + l * p.gl;
    const T *orow = o + b * p.ob + v1 * p.ov + h * p.oh + l * p.ol;
    float qr[4] = {0.f, 0.f, 0.f, 0.f}, gr[4] = {0.f, 0.f, 0.f, 0.f}, qs[4], gs[4], dpart = 0.f;
    if (gch) {
      float orr[4];
      ld<T, 4>(qr, qrow + d0);
      ld<T, 4>(gr, grow + d0);
      ld<T, 4>(orr, orow + d0);
#pragma unroll
      for (int e = 0; e < 4; e++) dpart = fmaf(gr[e], orr[e], dpart);
    }
#pragma unroll
    for (int c = 0; c < 4; c++) {  // qs / gs [2 c' + e]: channel KV4_DSC(c') + e (D even: both or neither)
      const int d = KV4_DSC(c >> 1) + (c & 1);
      qs[c] = wk && d < p.D ? fa_to_f<T>(qrow[d]) : 0.f;
      gs[c] = wv && d < p.D ? fa_to_f<T>(grow[d]) : 0.f;
    }
    const float delta = gsum<G>(dpart);
    const int64_t row = (((int64_t)b * p.V + v1) * p.NH + h) * p.L + l;
    const float lse2 = lse[row] * FA_ATTN_LOG2E;
    const int64_t e0 = ((int64_t)b * nq + qa) * p.VS + (int64_t)v2 * p.S;  // the samples of (query, v2)
    float dq[4] = {0.f, 0.f, 0.f, 0.f};  // FUSE: sum_s dS k_blend over the lane's gather channels
    for (int s0 = 0; s0 < p.S; s0 += G) {
      Foot f;
      f.pix = 0;
      f.mv = 0;
      f.fx = f.fy = 0.f;
      f.w[0] = f.w[1] = f.w[2] = f.w[3] = 0.f;
      if (active && s0 + lane < p.S) {
        int x0, y0;
        footprint(p, coords + 2 * (e0 + s0 + lane), v2, f, x0, y0);
      }
      const int ns = min(G, p.S - s0);
      for (int j = 0; j < ns; j++) {
        const int pix = __shfl_sync(FULL, f.pix, j, G), mv = __shfl_sync(FULL, f.mv, j, G);
        float wt[4];
#pragma unroll
        for (int t = 0; t < 4; t++) wt[t] = __shfl_sync(FULL, f.w[t], j, G);
        float kb[4] = {0.f, 0.f, 0.f, 0.f}, vb[4] = {0.f, 0.f, 0.f, 0.f};
        float a[4] = {0.f, 0.f, 0.f, 0.f}, g[4] = {0.f, 0.f, 0.f, 0.f};  // FUSE: partial q.k_t, dO.v_t per tap
#pragma unroll
        for (int t = 0; t < 4; t++) {
          if (!(mv >> t & 1) || !gch) continue;  // a tap outside: 0 (its pixel may not exist)
          const int at = (pix + (t & 1) + (t >> 1) * p.W) * p.D + d0;
          float kx[4], vx[4];
          ld<T, 4>(kx, km + at);
          ld<T, 4>(vx, vm + at);
#pragma unroll
          for (int e = 0; e < 4; e++) {
            kb[e] = fmaf(wt[t], kx[e], kb[e]);
            if constexpr (FUSE) {  // bwd_map_kernel's order: per-tap dots, then the weights
              a[t] = fmaf(qr[e], kx[e], a[t]);
              g[t] = fmaf(gr[e], vx[e], g[t]);
            } else {
              vb[e] = fmaf(wt[t], vx[e], vb[e]);
            }
          }
        }
        float sp = 0.f, gp = 0.f;
        if constexpr (FUSE) {
          sp = wt[0] * a[0] + wt[1] * a[1] + wt[2] * a[2] + wt[3] * a[3];
          gp = wt[0] * g[0] + wt[1] * g[1] + wt[2] * g[2] + wt[3] * g[3];
        } else {
#pragma unroll
          for (int e = 0; e < 4; e++) {
            sp = fmaf(qr[e], kb[e], sp);
            gp = fmaf(gr[e], vb[e], gp);
          }
        }
        float s, dp;
        gsum2<G>(sp, gp, s, dp, lane);
        const float pr = exp2f(s * p.scale2 - lse2), ds = pr * (dp - delta), sds = p.scale * ds;
        if constexpr (FUSE) {
          if (gc) {  // uniform: every group runs the shuffles
            const float fx = __shfl_sync(FULL, f.fx, j, G), fy = __shfl_sync(FULL, f.fy, j, G);
            float du, dv;
            coord_grad(a, g, fx, fy, sds, pr, du, dv);
            gsum2<G>(du, dv, du, dv, lane);
            if (active && lane == 0)
              red_add2(gc + 2 * (e0 + s0 + j), du * (float)(p.W - 1), dv * (float)(p.H - 1));
          }
#pragma unroll
          for (int e = 0; e < 4; e++) dq[e] = fmaf(ds, kb[e], dq[e]);
        }
        if (!active) continue;  // no shuffles below
#pragma unroll
        for (int t = 0; t < 4; t++) {
          if (!(mv >> t & 1)) continue;
          float2 *arow = acc + (pix + (t & 1) + (t >> 1) * p.W) * p.D;
          const float ck = sds * wt[t], cv = pr * wt[t];
          ulonglong2 old[2];
#pragma unroll
          for (int c = 0; c < 2; c++)
            if (KV4_DSC(c) < p.D) old[c] = *(const ulonglong2 *)(arow + KV4_DSC(c));  // a guess: the CAS checks it
#pragma unroll
          for (int c = 0; c < 2; c++)
            if (KV4_DSC(c) < p.D)
              smem_add4_from(arow + KV4_DSC(c), ck * qs[2 * c], cv * gs[2 * c], ck * qs[2 * c + 1], cv * gs[2 * c + 1],
                             old[c]);
        }
      }
    }
    if constexpr (FUSE) {
      if (gq32 && active && gch) {
        float x[4];
#pragma unroll
        for (int e = 0; e < 4; e++) x[e] = p.scale * dq[e];
        red_add<4>(gq32 + row * p.D + d0, x);
      }
    }
  }
#undef KV4_DSC
  __syncthreads();
  const int64_t base = (int64_t)map * LD;
  for (int i = threadIdx.x; i < LD; i += blockDim.x) {
    const float2 a = acc[i];
    if (nz == 1) {
      if (gk) gk[base + i] = fa_from_f<T>(a.x);
      if (gv) gv[base + i] = fa_from_f<T>(a.y);
    } else {
      if (gk32) atomicAdd(gk32 + base + i, a.x);
      if (gv32) atomicAdd(gv32 + base + i, a.y);
    }
  }
}

// ------------------------------------------------------------------------------------------------ host
struct Plan {
  Params p;
  int vec, tpg, nc, threads;
  size_t smem_fwd, smem_bwd, smem_map;
  dim3 grid;
};

// the launch shape: 16-byte vectors where D, the pointers and every stride allow (else 1 channel per load and
// 32 lanes), TPG lanes * NC vectors per row; blocks of about 256 threads (QT query positions x HT heads)
template <typename T>
static int make_plan(const char *fn, Plan &pl, const fa_ds_geom *g, const void *const *ptrs, int nptrs,
                     const fa_ds_strides *const *strides, int nstrides) {
  if (g->D > 256)
    return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'q': expected at most 256 channels (D) on CUDA, got %lld", fn,
                    (long long)g->D);
  if (g->L >= ((int64_t)1 << 30) || g->B * g->V * g->L * g->V * g->S >= ((int64_t)1 << 31) ||
      g->B * g->V * (g->H + 1) * (g->W + 1) >= ((int64_t)1 << 31))
    return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'coords': expected fewer than 2^31 samples on CUDA, got shape (%lld, %lld, %lld, %lld, %lld, 2)",
                    fn, (long long)g->B, (long long)g->V, (long long)g->L, (long long)g->V, (long long)g->S);
  Params &p = pl.p;
  memset(&p, 0, sizeof p);
  p.B = (int)g->B; p.V = (int)g->V; p.NH = (int)g->NH; p.L = (int)g->L; p.D = (int)g->D;
  p.W = (int)g->W; p.H = (int)g->H; p.S = (int)g->S; p.VS = (int)(g->V * g->S);
  p.scale = (float)g->scale;
  p.scale2 = (float)(g->scale * 1.4426950408889634);
  p.qb = g->q.b; p.qv = g->q.v; p.qh = g->q.h; p.ql = g->q.l;
  p.kb = g->k.b; p.kv = g->k.v; p.kh = g->k.h; p.kl = g->k.l;
  p.vb = g->v.b; p.vv = g->v.v; p.vh = g->v.h; p.vl = g->v.l;
  p.gb = g->go.b; p.gv = g->go.v; p.gh = g->go.h; p.gl = g->go.l;
  p.ob = g->o.b; p.ov = g->o.v; p.oh = g->o.h; p.ol = g->o.l;
  p.Sx = (p.H + 1) * (p.W + 1);
  const int V16 = 16 / (int)sizeof(T);
  bool vec = vec_ok<T>(g->D, ptrs, nptrs);
  for (int i = 0; i < nstrides && vec; i++) {
    const fa_ds_strides *s = strides[i];
    vec = s->b % V16 == 0 && s->v % V16 == 0 && s->h % V16 == 0 && s->l % V16 == 0;
  }
  if (vec) {
    pl.vec = V16;
    const int need = (int)((g->D + V16 - 1) / V16);
    int t = 1;
    while (t < need && t < 32) t *= 2;
    pl.tpg = t;
    pl.nc = need > 32 ? 2 : 1;  // D <= 256: at most 64 float32 vectors
  } else {
    pl.vec = 1;
    pl.tpg = 32;
    pl.nc = g->D <= 64 ? 2 : 8;
  }
  // heads per block: all when they fit (the coordinates' gradient summed in the block), at most 64 groups
  p.HT = (int)(g->NH < 64 ? g->NH : 64);
  if (p.HT * pl.tpg > 256) p.HT = 256 / pl.tpg;
  if (p.HT < 1) p.HT = 1;
  p.nht = (int)((g->NH + p.HT - 1) / p.HT);
  int qt = 256 / (p.HT * pl.tpg);
  if (qt > 64 / p.HT) qt = 64 / p.HT;
  if (qt > 16) qt = 16;
  if (qt < 1) qt = 1;
  if (qt > g->L) qt = (int)g->L;
  p.QT = qt;
  p.ltiles = (p.L + qt - 1) / qt;
  pl.threads = (qt * p.HT * pl.tpg + 31) / 32 * 32;
  pl.smem_fwd = (size_t)qt * SC * sizeof(Foot);
  pl.smem_bwd = pl.smem_fwd + (size_t)qt * p.HT * SC * sizeof(float2);
  const int64_t bx = g->B * g->V * (int64_t)p.ltiles;
  if (bx >= ((int64_t)1 << 31) || p.nht > 65535)
    return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'q': shape too large for CUDA (%lld blocks x %d head tiles)", fn,
                    (long long)bx, p.nht);
  pl.grid = dim3((unsigned)bx, (unsigned)p.nht);
  return 0;
}

// dispatch on (VEC, TPG, NC): a call of `body` with compile-time VEC_, TPG_, NC_
#define DS_SWITCH(pl, T, body)                                                                         \
  do {                                                                                                 \
    constexpr int V16_ = 16 / (int)sizeof(T);                                                          \
    if ((pl).vec == 1) {                                                                               \
      constexpr int VEC_ = 1, TPG_ = 32;                                                               \
      if ((pl).nc == 2) { constexpr int NC_ = 2; body; } else { constexpr int NC_ = 8; body; }         \
    } else {                                                                                           \
      constexpr int VEC_ = V16_, NC_ = 1;                                                              \
      switch ((pl).tpg) {                                                                              \
        case 1: { constexpr int TPG_ = 1; body; } break;                                               \
        case 2: { constexpr int TPG_ = 2; body; } break;                                               \
        case 4: { constexpr int TPG_ = 4; body; } break;                                               \
        case 8: { constexpr int TPG_ = 8; body; } break;                                               \
        case 16: { constexpr int TPG_ = 16; body; } break;                                             \
        default:                                                                                       \
          if ((pl).nc == 2) { constexpr int TPG_ = 32, NC2_ = 2; { constexpr int NC_ = NC2_; body; } }    \
          else { constexpr int TPG_ = 32; body; }                                                      \
      }                                                                                                \
    }                                                                                                  \
  } while (0)

// the map mode (fwd_map_kernel, bwd_map_kernel) where 16-byte vectors work, S >= 1, both maps of a (b, v2, h) fit
// in one block's shared memory, and a block gathers at least as many taps per view as a map has pixels; it
// rewrites pl's QT (query positions per block), ltiles (tiles per (b, h)), threads, smem_map and grid
template <typename T> static bool map_plan(Plan &pl, const fa_ds_geom *g, int dev, int threads) {
  if (pl.vec == 1 || g->S < 1) return false;
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const size_t smem = (size_t)(2 * g->L * g->D) * sizeof(T);
  if (smem > (size_t)optin) return false;
  const int qt = threads / pl.tpg;
  const int64_t nq = g->V * g->L, tiles = (nq + qt - 1) / qt, blocks = g->B * g->NH * tiles;
  if (4 * (qt < nq ? qt : nq) * g->S < g->L || blocks >= ((int64_t)1 << 31)) return false;
  pl.p.QT = qt;
  pl.p.ltiles = (int)tiles;
  pl.threads = threads;
  pl.smem_map = smem;
  pl.grid = dim3((unsigned)blocks, 1);
  return true;
}

// map mode: fewer query positions per block (down to half, whole warps) where that fills the last wave of blocks
// better: per_sm blocks of pl.threads fit an SM (fewer threads never fit fewer); minimises waves x (block size +
// the maps' copy, about L / S query positions' worth)
static void balance(Plan &pl, int per_sm, int dev) {
  const int64_t slots = (int64_t)(per_sm > 0 ? per_sm : 1) * fa_cu_sm_count(dev);
  const int tpg = pl.tpg, qmax = pl.p.QT, step = 32 / tpg > 1 ? 32 / tpg : 1;
  const int64_t nq = (int64_t)pl.p.V * pl.p.L, bh = (int64_t)pl.p.B * pl.p.NH, fixed = pl.p.L / pl.p.S;
  int best = qmax;
  int64_t bcost = -1;
  for (int qt = qmax; qt >= qmax / 2 && qt >= step; qt -= step) {
    const int64_t blocks = bh * ((nq + qt - 1) / qt), cost = (blocks + slots - 1) / slots * (qt + fixed);
    if (bcost < 0 || cost < bcost) { bcost = cost; best = qt; }
  }
  const int64_t tiles = (nq + best - 1) / best;
  if (bh * tiles >= ((int64_t)1 << 31)) return;
  pl.p.QT = best;
  pl.p.ltiles = (int)tiles;
  pl.threads = best * tpg;
  pl.grid = dim3((unsigned)(bh * tiles), 1);
}

template <typename T, int VEC, int TPG, int NC>
static int fwd_map_launch(Plan pl, cudaStream_t st, const char *fn, T *out, float *lse, const T *q, const T *k,
                          const T *v, const float *coords, int dev) {
  int rc, per_sm = 1;
  if ((rc = fa_cu_check(cudaFuncSetAttribute(fwd_map_kernel<T, VEC, TPG, NC>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)pl.smem_map), fn)) ||
      (rc = fa_cu_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fwd_map_kernel<T, VEC, TPG, NC>,
                                                                      pl.threads, pl.smem_map), fn)))
    return rc;
  balance(pl, per_sm, dev);
  fwd_map_kernel<T, VEC, TPG, NC><<<pl.grid, pl.threads, pl.smem_map, st>>>(out, lse, q, k, v, coords, pl.p);
  return fa_cu_launch_check(fn);
}

template <typename T, int VEC, int TPG, int NC>
static int bwd_map_launch(Plan pl, cudaStream_t st, const char *fn, T *gq, float *gcp, float2 *pd, const T *go,
                          const T *q, const T *k, const T *v, const float *coords, const T *o, const float *lse, int dev) {
  int rc, per_sm = 1;
  if ((rc = fa_cu_check(cudaFuncSetAttribute(bwd_map_kernel<T, VEC, TPG, NC>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)pl.smem_map), fn)) ||
      (rc = fa_cu_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, bwd_map_kernel<T, VEC, TPG, NC>,
                                                                      pl.threads, pl.smem_map), fn)))
    return rc;
  balance(pl, per_sm, dev);
  bwd_map_kernel<T, VEC, TPG, NC><<<pl.grid, pl.threads, pl.smem_map, st>>>(gq, gcp, pd, go, q, k, v, coords, o, lse,
                                                                            pl.p);
  return fa_cu_launch_check(fn);
}

template <typename T>
static int forward_t(const fa_ds_geom *g, T *out, float *lse, const T *q, const T *k, const T *v, const float *coords) {
  static const char *fn = "fa_deform_sdpa_forward";
  Plan pl;
  const void *ptrs[4] = {q, k, v, out};
  const fa_ds_strides *ss[3] = {&g->q, &g->k, &g->v};
  int rc = make_plan<T>(fn, pl, g, ptrs, 4, ss, 3);
  if (rc) return rc;
  cudaStream_t st = fa_cu_stream(g->device);
  if (map_plan<T>(pl, g, g->device, 512)) {
    rc = FA_ERR_UNSUPPORTED;  // not reached: the map mode has 16-byte vectors (and NC 2 only for float32 D > 128)
    DS_SWITCH(pl, T, if constexpr (VEC_ > 1 && (NC_ == 1 || sizeof(T) == 4)) rc = (fwd_map_launch<T, VEC_, TPG_, NC_>(pl, st, fn, out, lse, q, k, v, coords, g->device)));
    return rc;
  }
  DS_SWITCH(pl, T, (fwd_kernel<T, VEC_, TPG_, NC_><<<pl.grid, pl.threads, pl.smem_fwd, st>>>(out, lse, q, k, v, coords, pl.p)));
  return fa_cu_launch_check(fn);
}

// the key-side launch (kv_kernel): G lanes x NCH channels per query position, nz query splits, 1024 threads (512 or
// 256 where that lets it fit); false when a map (k and v in the dtype) and its two float32 accumulators do not fit
// in one block's shared memory (bwd_kernel's atomics then). v4: kv4_kernel (G lanes x 4 channels) where the rows
// allow 16-byte vectors (vec > 1: D a multiple of 4) and D <= 128.
struct KvPlan {
  int g, nch, nz, threads;
  bool v4;
  size_t smem;
};
static bool kv_plan(KvPlan &kp, const fa_ds_geom *g, size_t tsize, int dev, int vec) {
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const int64_t maps = g->B * g->V * g->NH, LD = g->L * g->D;
  if (maps >= ((int64_t)1 << 31) || LD >= ((int64_t)1 << 24)) return false;
  kp.v4 = vec > 1 && g->D <= 128;
  if (kp.v4) {
    kp.nch = 1;
    kp.g = 2;
    while (4 * kp.g < g->D) kp.g *= 2;
  } else if (g->D <= 32) {
    kp.nch = 1;
    kp.g = 4;
    while (kp.g < g->D) kp.g *= 2;
  } else {
    kp.g = 32;
    kp.nch = 2;
    while (kp.nch * 32 < g->D) kp.nch *= 2;
  }
  const size_t fixed = kv_prep_off((size_t)LD, tsize), prep = kp.v4 ? 0 : 2 * sizeof(float4);  // v4: no prep
  kp.threads = 0;
  for (int t = kp.v4 ? kv4_threads(tsize) : kv_max_threads(kp.nch); t >= 256 && !kp.threads; t /= 2)
    if (fixed + (size_t)t * prep <= (size_t)optin) kp.threads = t;
  if (!kp.threads) return false;
  kp.smem = fixed + (size_t)kp.threads * prep;
  // about one block per SM or more: split the query positions when there are few maps
  const int64_t sms = fa_cu_sm_count(dev), nq = g->V * g->L, ngrp = kp.threads / kp.g;
  int64_t nz = 1;
  if (2 * maps < sms) {
    nz = (sms + maps - 1) / maps;
    const int64_t most = (nq + ngrp - 1) / ngrp;
    if (nz > most) nz = most;
    if (nz > 65535) nz = 65535;
    if (nz < 1) nz = 1;
  }
  kp.nz = (int)nz;
  return true;
}

#define KV_SWITCH(kp, body)                                                                            \
  do {                                                                                                 \
    if ((kp).nch == 1) {                                                                               \
      constexpr int NCH_ = 1;                                                                          \
      switch ((kp).g) {                                                                                \
        case 4: { constexpr int G_ = 4; body; } break;                                                 \
        case 8: { constexpr int G_ = 8; body; } break;                                                 \
        case 16: { constexpr int G_ = 16; body; } break;                                               \
        default: { constexpr int G_ = 32; body; }                                                      \
      }                                                                                                \
    } else {                                                                                           \
      constexpr int G_ = 32;                                                                           \
      switch ((kp).nch) {                                                                              \
        case 2: { constexpr int NCH_ = 2; body; } break;                                               \
        case 4: { constexpr int NCH_ = 4; body; } break;                                               \
        default: { constexpr int NCH_ = 8; body; }                                                     \
      }                                                                                                \
    }                                                                                                  \
  } while (0)

template <typename T, int G>
static int kv4_launch(const KvPlan &kp, const Params &p, cudaStream_t st, const char *fn, T *gk, T *gv, float *gk32,
                      float *gv32, const T *q, const T *k, const T *v, const T *go, const T *o, const float *lse,
                      const float *coords, float *gq32, float *gc) {
  int rc;
  if ((rc = fa_cu_check(cudaFuncSetAttribute(kv4_kernel<T, G>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)kp.smem), fn)))
    return rc;
  const dim3 grid((unsigned)(p.B * p.V * p.NH), (unsigned)kp.nz);
  kv4_kernel<T, G><<<grid, kp.threads, kp.smem, st>>>(gk, gv, gk32, gv32, q, k, v, go, o, lse, coords, p, kp.nz, gq32,
                                                      gc);
  return fa_cu_launch_check(fn);
}

template <typename T, int G, int NCH>
static int kv_launch(const KvPlan &kp, const Params &p, int mvec, cudaStream_t st, const char *fn, T *gk, T *gv,
                     float *gk32, float *gv32, const T *q, const T *k, const T *v, const T *go, const T *o,
                     const float *lse, const float *coords) {
  int rc;
  if ((rc = fa_cu_check(cudaFuncSetAttribute(kv_kernel<T, G, NCH>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)kp.smem), fn)))
    return rc;
  const dim3 grid((unsigned)(p.B * p.V * p.NH), (unsigned)kp.nz);
  kv_kernel<T, G, NCH><<<grid, kp.threads, kp.smem, st>>>(gk, gv, gk32, gv32, q, k, v, go, o, lse, coords, p, kp.nz,
                                                          mvec);
  return fa_cu_launch_check(fn);
}

template <typename T>
static int backward_t(const fa_ds_geom *g, T *gq, T *gk, T *gv, float *gc, const T *go, const T *q, const T *k,
                      const T *v, const float *coords, const T *o, const float *lse) {
  static const char *fn = "fa_deform_sdpa_backward";
  const int dev = g->device;
  cudaStream_t st = fa_cu_stream(dev);
  const int64_t nkv = g->B * g->V * g->NH * g->L * g->D, npts = g->B * g->V * g->L * g->V * g->S;
  int rc;
  if (g->B * g->V * g->NH * g->L == 0) {  // no rows (NH = 0 leaves grad_coords, a sum over no heads: 0)
    if (gc && npts && (rc = fa_cu_check(cudaMemsetAsync(gc, 0, npts * 2 * sizeof(float), st), fn))) return rc;
    return 0;
  }
  Plan pl;
  const void *ptrs[8] = {q, k, v, go, o, gq, gk, gv};
  const fa_ds_strides *ss[5] = {&g->q, &g->k, &g->v, &g->go, &g->o};
  if ((rc = make_plan<T>(fn, pl, g, ptrs, 8, ss, 5))) return rc;
  Temps tmp(dev);
  const bool det = g->deterministic != 0;
  float *gk32 = nullptr, *gv32 = nullptr, *gcdst = gc;
  float2 *pd = nullptr;
  pl.p.gatom = det ? 0 : 1;
  // grad_k / grad_v: key side (kv_kernel, recomputing P and dS: no record) where a map and its accumulators fit
  // in shared memory, else bwd_kernel's atomics; deterministic: the (P, dS) record, sorted and gathered
  KvPlan kp;
  const bool keyside = !det && (gk || gv) && npts && kv_plan(kp, g, sizeof(T), dev, pl.vec);
  // float32 with kv4_kernel: that kernel gives grad_q and grad_coords as well (float atomics into both, zeroed
  // here), no query-side kernel
  const bool fuse = keyside && kp.v4 && sizeof(T) == 4;
  // the query side: bwd_map_kernel (maps in shared memory, one head per block) unless grad_k / grad_v need
  // bwd_kernel's atomics or the maps do not fit
  Plan pm = pl;
  const bool bmap = !fuse && (det || keyside || !(gk || gv)) && map_plan<T>(pm, g, dev, 256);
  const int gtiles = bmap ? (int)g->NH : pl.p.nht;
  // several writers per coordinate (heads, or head tiles): deterministic, partials summed in order by
  // finish_coords_kernel; else float atomics into grad_coords, zeroed here
  const bool gpart = fuse || bmap || pl.p.nht > 1;
  if (fuse && gq && (rc = fa_cu_check(cudaMemsetAsync(gq, 0, nkv * sizeof(float), st), fn))) return rc;
  if (gc && gpart && npts) {
    if (det) {
      if (!(gcdst = (float *)tmp.get((int64_t)gtiles * npts * 2 * sizeof(float)))) return FA_ERR_MEMORY;
    } else if ((rc = fa_cu_check(cudaMemsetAsync(gc, 0, npts * 2 * sizeof(float), st), fn))) {
      return rc;
    }
  }
  if (!det && (!keyside || kp.nz > 1)) {
    if (gk) {
      gk32 = sizeof(T) == 4 ? (float *)gk : (float *)tmp.get(nkv * sizeof(float));
      if (!gk32) return FA_ERR_MEMORY;
      if ((rc = fa_cu_check(cudaMemsetAsync(gk32, 0, nkv * sizeof(float), st), fn))) return rc;
    }
    if (gv) {
      gv32 = sizeof(T) == 4 ? (float *)gv : (float *)tmp.get(nkv * sizeof(float));
      if (!gv32) return FA_ERR_MEMORY;
      if ((rc = fa_cu_check(cudaMemsetAsync(gv32, 0, nkv * sizeof(float), st), fn))) return rc;
    }
  }
  if (det && (gk || gv) && npts) {
    if (!(pd = (float2 *)tmp.get(npts * g->NH * (int64_t)sizeof(float2)))) return FA_ERR_MEMORY;
  }
  if (bmap && (gq || gc || pd)) {
    rc = FA_ERR_UNSUPPORTED;  // not reached: the map mode has 16-byte vectors (and NC 2 only for float32 D > 128)
    DS_SWITCH(pm, T, if constexpr (VEC_ > 1 && (NC_ == 1 || sizeof(T) == 4)) rc = (bwd_map_launch<T, VEC_, TPG_, NC_>(pm, st, fn, gq, gc ? gcdst : nullptr,
                                                                                       pd, go, q, k, v, coords, o, lse, dev)));
    if (rc) return rc;
  } else if (!fuse && !bmap && (gq || gc || gk32 || gv32 || pd)) {
    float *bk = keyside ? nullptr : gk32, *bv = keyside ? nullptr : gv32;
    DS_SWITCH(pl, T, (bwd_kernel<T, VEC_, TPG_, NC_><<<pl.grid, pl.threads, pl.smem_bwd, st>>>(
                         gq, gc ? gcdst : nullptr, bk, bv, pd, go, q, k, v, coords, o, lse, pl.p)));
    if ((rc = fa_cu_launch_check(fn))) return rc;
  }
  if (gc && gpart && det && npts) {
    finish_coords_kernel<<<fa_cu_blocks(npts * 2, 256, dev), 256, 0, st>>>(gc, gcdst, npts * 2, gtiles,
                                                                          (float)(g->W - 1), (float)(g->H - 1));
    if ((rc = fa_cu_launch_check(fn))) return rc;
  }
  if (!det) {
    if (keyside) {
      const bool own = kp.nz == 1;
      T *ok = own ? gk : nullptr, *ov = own ? gv : nullptr;
      float *ok32 = own ? nullptr : gk32, *ov32 = own ? nullptr : gv32;
      float *fq = fuse ? (float *)gq : nullptr, *fc = fuse ? gc : nullptr;  // float32 only (fuse)
      if (kp.v4) {
        switch (kp.g) {
          case 2: rc = kv4_launch<T, 2>(kp, pl.p, st, fn, ok, ov, ok32, ov32, q, k, v, go, o, lse, coords, fq, fc); break;
          case 4: rc = kv4_launch<T, 4>(kp, pl.p, st, fn, ok, ov, ok32, ov32, q, k, v, go, o, lse, coords, fq, fc); break;
          case 8: rc = kv4_launch<T, 8>(kp, pl.p, st, fn, ok, ov, ok32, ov32, q, k, v, go, o, lse, coords, fq, fc); break;
          case 16: rc = kv4_launch<T, 16>(kp, pl.p, st, fn, ok, ov, ok32, ov32, q, k, v, go, o, lse, coords, fq, fc); break;
          default: rc = kv4_launch<T, 32>(kp, pl.p, st, fn, ok, ov, ok32, ov32, q, k, v, go, o, lse, coords, fq, fc);
        }
      } else {
        KV_SWITCH(kp, rc = (kv_launch<T, G_, NCH_>(kp, pl.p, pl.vec, st, fn, ok, ov, ok32, ov32, q, k, v, go, o, lse,
                                                   coords)));
      }
      if (rc) return rc;
    }
    if (sizeof(T) != 4) {
      if (gk32) cast_kernel<T><<<fa_cu_blocks(nkv, 256, dev), 256, 0, st>>>(gk, gk32, nkv);
      if (gv32) cast_kernel<T><<<fa_cu_blocks(nkv, 256, dev), 256, 0, st>>>(gv, gv32, nkv);
    }
    return fa_cu_launch_check(fn);
  }
  if (!(gk || gv)) return 0;
  if (npts == 0) {  // no samples: nothing attends to the keys
    if (gk && (rc = fa_cu_check(cudaMemsetAsync(gk, 0, nkv * sizeof(T), st), fn))) return rc;
    if (gv && (rc = fa_cu_check(cudaMemsetAsync(gv, 0, nkv * sizeof(T), st), fn))) return rc;
    return 0;
  }
  // deterministic grad_k / grad_v: sort the samples by cell, gather per row
  const int n = (int)npts;
  const unsigned nkeys = (unsigned)(g->B * g->V * (int64_t)pl.p.Sx);
  int bits = 1;
  while (bits < 32 && ((uint64_t)1 << bits) <= nkeys) bits++;
  unsigned *keys = (unsigned *)tmp.get((int64_t)n * 4), *ids = (unsigned *)tmp.get((int64_t)n * 4);
  unsigned *skeys = (unsigned *)tmp.get((int64_t)n * 4), *sids = (unsigned *)tmp.get((int64_t)n * 4);
  float4 *wt = (float4 *)tmp.get((int64_t)n * 16);
  int *counts = (int *)tmp.get(((int64_t)nkeys + 2) * 4), *offs = (int *)tmp.get(((int64_t)nkeys + 2) * 4);
  if (!keys || !ids || !skeys || !sids || !wt || !counts || !offs) return FA_ERR_MEMORY;
  if ((rc = fa_cu_check(cudaMemsetAsync(counts, 0, ((int64_t)nkeys + 2) * 4, st), fn))) return rc;
  keys_kernel<<<fa_cu_blocks(n, 256, dev), 256, 0, st>>>(keys, ids, wt, counts, coords, pl.p, n, nkeys);
  if ((rc = fa_cu_launch_check(fn))) return rc;
  size_t b1 = 0, b2 = 0;
  if ((rc = fa_cu_check(cub::DeviceRadixSort::SortPairs(nullptr, b1, keys, skeys, ids, sids, n, 0, bits, st), fn)) ||
      (rc = fa_cu_check(cub::DeviceScan::ExclusiveSum(nullptr, b2, counts, offs, (int)nkeys + 1, st), fn)))
    return rc;
  void *cubtmp = tmp.get((int64_t)(b1 > b2 ? b1 : b2));
  if (!cubtmp) return FA_ERR_MEMORY;
  if ((rc = fa_cu_check(cub::DeviceScan::ExclusiveSum(cubtmp, b2, counts, offs, (int)nkeys + 1, st), fn)) ||
      (rc = fa_cu_check(cub::DeviceRadixSort::SortPairs(cubtmp, b1, keys, skeys, ids, sids, n, 0, bits, st), fn)))
    return rc;
  const int64_t rows = g->B * g->V * g->NH * g->L;
  const int gpb = 256 / pl.tpg;
  const int64_t blocks = (rows + gpb - 1) / gpb;
  if (blocks >= ((int64_t)1 << 31)) return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'k': too many rows for CUDA", fn);
  DS_SWITCH(pl, T, (gather_kernel<T, VEC_, TPG_, NC_><<<(unsigned)blocks, 256, 0, st>>>(
                       gk, gv, sids, (const float *)wt, offs, pd, q, go, pl.p, rows)));
  return fa_cu_launch_check(fn);
}

}  // namespace

int fa_cu_deform_sdpa_forward(const fa_ds_geom *g, void *out, float *lse, const void *q, const void *k, const void *v,
                              const float *coords) {
  FA_CU_FLOAT_DISPATCH("fa_deform_sdpa_forward", g->dtype,
                       forward_t<T>(g, (T *)out, lse, (const T *)q, (const T *)k, (const T *)v, coords))
}

int fa_cu_deform_sdpa_backward(const fa_ds_geom *g, void *grad_q, void *grad_k, void *grad_v, float *grad_coords,
                               const void *grad_out, const void *q, const void *k, const void *v, const float *coords,
                               const void *out, const float *lse) {
  FA_CU_FLOAT_DISPATCH("fa_deform_sdpa_backward", g->dtype,
                       backward_t<T>(g, (T *)grad_q, (T *)grad_k, (T *)grad_v, grad_coords, (const T *)grad_out,
                                     (const T *)q, (const T *)k, (const T *)v, coords, (const T *)out, lse))
}
