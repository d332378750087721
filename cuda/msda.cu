// msda.cu: multi-scale deformable attention on the GPU (forward, backward, deterministic backward).
//
// value (N, S, M, D) T, sampling_locations (N, Lq, M, L, P, 2) float32, attention_weights (N, Lq, M, L, P)
// float32 -> out (N, Lq, M*D) T; T = float32, bfloat16 or float16, arithmetic float32. Sampling rules of
// cuda/bilinear.cuh (as c/msda.c). c/msda.c has validated everything and hands over a fa_msda_geom (c/msda.h)
// and dense buffers; this file plans the launches (make_plan) and checks the device's limits only.
//
// Layout of the work: a "group" of TPG lanes owns one (n, q, m) row of D channels, VEC channels per lane
// (16-byte loads: 4 floats or 8 halves). The L*P sampling points of the row are handled in rounds: in each
// round lane j computes the footprint of point s0 + j once (clamped corner pixel, 4 coefficients
// attention * bilinear weight) and the group broadcasts it with shuffles, so the coordinate arithmetic is
// not repeated per channel. Corners outside the level get coefficient 0 and a clamped (valid) address, so
// every load is unconditional.
//
// Backward (fast path): per point the lanes gather the 4 corners (for the location gradient), form partial
// dot products <grad_out, corner> over their channels, and scatter coefficient * grad_out into grad_value
// with vector atomics (red.global.add.v4.f32 on sm_90: one instruction per 4 channels). The 4 partial dots
// of each point of a round are reduced across the group by a reduce-scatter of shuffles (each lane ends up
// with the totals of "its" point: ~4 shuffles per point instead of 4*log2(TPG)), and that lane writes the
// point's attention and location gradients: no atomics there. 16-bit values accumulate grad_value in a
// float32 buffer, cast at the end.
//
// Deterministic backward (opts.deterministic): no float atomics. The point gradients come from the same
// kernel without the scatter (fixed shuffle order). grad_value is gathered: every point gets a key = its
// top-left corner cell on an (H+1)x(W+1) grid per (n, m, level) (a point touches the 4 pixels right/below of
// that cell), keys are sorted stably with CUB (ties keep point order), and one group per grad_value row
// (n, pixel, m) sums coefficient * grad_out over the points of the 4 cells around the pixel, in that fixed
// order. Every row is written once: no memset, 16-bit output written directly.
//
// Variants: make_plan picks the group order and the warp merge (fa_msda_opts' order/merge force them for
// tests and benchmarks). In the backward they are template parameters (HEAD, MERGE, and SCATTER: off in the
// deterministic path's point pass), launch_bwd instantiating only the reachable combinations; the forward
// reads its order from Params.qfast (a uniform branch: as a template parameter it made ptxas allocate the
// hot forwards worse, bench/MSDA_NOTES.md). The rejected v3 staged kernels are in git at 69998e3
// (bench/MSDA_NOTES.md).
#include "dense.cuh"
#include "bilinear.cuh"
#include "msda.h"
#include <cub/cub.cuh>

namespace {

constexpr int MAXL = FA_MSDA_CUDA_MAX_LEVELS;  // levels per call on the GPU (kernel parameters)
constexpr int THREADS = 256;
constexpr unsigned FULL = 0xffffffffu;

struct Params {
  int N, Lq, M, D, L, P, LP, S;
  int border, align;
  int qfast;                      // forward: groups in head order (n, m, q) (a runtime choice: see make_plan)
  int Sx;                         // (H+1)*(W+1) summed over levels: the key grid of one (n, m)
  int H[MAXL], W[MAXL], start[MAXL], xstart[MAXL];
};

// grad_value[p .. p+VEC) += f (float32 buffer). sm_90 has vector reductions: one instruction per 4 floats.
template <int VEC> __device__ __forceinline__ void red_add(float *p, const float (&f)[VEC]) {
#if __CUDA_ARCH__ >= 900
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4)
      asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p + i), "f"(f[i]), "f"(f[i + 1]),
                   "f"(f[i + 2]), "f"(f[i + 3]) : "memory");
  } else if constexpr (VEC == 2) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(f[0]), "f"(f[1]) : "memory");
  } else {
    atomicAdd(p, f[0]);
  }
#else
#pragma unroll
  for (int i = 0; i < VEC; i++) atomicAdd(p + i, f[i]);
#endif
}

// Sum of dot[j][k] over the TPG lanes of a group, in a fixed order. First an all-reduce over the lane bits
// >= R (groups wider than R lanes), then a reduce-scatter over the low bits: at step H the lane keeps the
// half of the points whose bit H matches its own and receives its partner's partials of that half, so
// after log2(R) steps lane j holds in dot[0] the totals of point j % R (4*(R-1) shuffles for R points).
template <int H, int R, int TPG> __device__ __forceinline__ void allreduce_high(float (&dot)[R][4]) {
  if constexpr (H >= R) {
#pragma unroll
    for (int j = 0; j < R; j++)
#pragma unroll
      for (int k = 0; k < 4; k++) dot[j][k] += __shfl_xor_sync(FULL, dot[j][k], H, TPG);
    allreduce_high<H / 2, R, TPG>(dot);
  }
}
template <int H, int R, int TPG> __device__ __forceinline__ void reduce_scatter(float (&dot)[R][4], int lane) {
  if constexpr (H >= 1) {
    const bool up = (lane & H) != 0;
#pragma unroll
    for (int j = 0; j < H; j++)
#pragma unroll
      for (int k = 0; k < 4; k++) {
        const float send = up ? dot[j][k] : dot[j + H][k];
        const float keep = up ? dot[j + H][k] : dot[j][k];
        dot[j][k] = keep + __shfl_xor_sync(FULL, send, H, TPG);
      }
    reduce_scatter<H / 2, R, TPG>(dot, lane);
  }
}

// The cell of a sampling point on level l: top-left corner (x0, y0), fractions (fx, fy) and
// d(pixel)/d(loc) (sx, sy; 0 where border-clamped). false: the point touches no pixel (zeros padding).
__device__ __forceinline__ bool cell(const Params &p, int l, float lx, float ly, int &x0, int &y0, float &fx,
                                     float &fy, float &sx, float &sy) {
  const float fw = (float)p.W[l], fh = (float)p.H[l];
  float x, y;
  fa_bl_src_unit(lx, ly, fw, fh, p.align, x, y, sx, sy);
  if (p.border) {
    fa_bl_border(x, sx, fw);
    fa_bl_border(y, sy, fh);
  } else if (fa_bl_outside(x, y, fw, fh)) {
    return false;
  }
  fa_bl_cell(x, y, x0, y0, fx, fy);
  return true;
}

// The footprint of a point for the channel loops: pixel of the (clamped) top-left corner in value's
// (N*S) pixel numbering, the steps to the right/lower corners (0 where clamped), 4 coefficients
// a * bilinear weight (0 for corners outside) and the mask of corners inside (bit k = corner k:
// 00, 01, 10, 11 = (y0,x0), (y0,x0+1), (y0+1,x0), (y0+1,x0+1)).
struct Foot {
  int pix, step;  // step = (d10 << 5) | (d01 << 4) | mask, d01 in {0,1}, d10 in {0,W}
  float c[4];
  unsigned mask;
};

__device__ __forceinline__ void footprint(const Params &p, int n, int l, int x0, int y0, float fx, float fy, float a,
                                          Foot &f) {
  const int H = p.H[l], W = p.W[l];
  bool vx0, vx1, vy0, vy1;
  fa_bl_inside(x0, y0, H, W, vx0, vx1, vy0, vy1);
  const int xc0 = max(x0, 0), xc1 = min(x0 + 1, W - 1), yc0 = max(y0, 0), yc1 = min(y0 + 1, H - 1);
  const float hx = fa_bl_comp(fx), hy = fa_bl_comp(fy);
  f.pix = n * p.S + p.start[l] + yc0 * W + xc0;
  f.mask = fa_bl_mask(vx0, vx1, vy0, vy1);
  f.step = ((yc1 - yc0) * W << 5) | ((xc1 - xc0) << 4) | (int)f.mask;
  f.c[0] = (f.mask & 1u) ? __fmul_rn(a, fa_bl_weight<0>(fx, fy, hx, hy)) : 0.f;
  f.c[1] = (f.mask & 2u) ? __fmul_rn(a, fa_bl_weight<1>(fx, fy, hx, hy)) : 0.f;
  f.c[2] = (f.mask & 4u) ? __fmul_rn(a, fa_bl_weight<2>(fx, fy, hx, hy)) : 0.f;
  f.c[3] = (f.mask & 8u) ? __fmul_rn(a, fa_bl_weight<3>(fx, fy, hx, hy)) : 0.f;
}

__device__ __forceinline__ void no_footprint(const Params &p, int n, Foot &f) {
  f.pix = n * p.S;
  f.step = 0;
  f.mask = 0;
  f.c[0] = f.c[1] = f.c[2] = f.c[3] = 0.f;
}

// the (n, q, m) row of group gi in head order (n, m, q): neighbouring queries of one head share a block and
// an SM, so their nearby points share L1 lines (in query order the row is gi itself)
__device__ __forceinline__ int head_group(const Params &p, int gi) {
  const int q = gi % p.Lq, t = gi / p.Lq;
  return (t / p.M * p.Lq + q) * p.M + t % p.M;
}

// ------------------------------------------------------------------------------------------------ forward
// grid (ceil(groups*TPG/THREADS), chunks); channel chunk blockIdx.y covers TPG*VEC channels.
template <typename T, int VEC, int TPG>
__global__ void __launch_bounds__(THREADS) fwd_kernel(T *__restrict__ out, const T *__restrict__ value,
                                                      const float *__restrict__ loc, const float *__restrict__ attn,
                                                      const __grid_constant__ Params p, int groups) {
  const int lane = threadIdx.x % TPG;
  const int gid = (int)((blockIdx.x * (unsigned)THREADS + threadIdx.x) / TPG);
  const bool active = gid < groups;
  const int gi = active ? gid : groups - 1;  // idle lanes stay in bounds and in the shuffles
  const int g = p.qfast ? head_group(p, gi) : gi;
  const int m = g % p.M, n = g / (p.M * p.Lq);
  const int c = blockIdx.y * (TPG * VEC) + lane * VEC;
  const bool chan = c < p.D;
  const int64_t MD = (int64_t)p.M * p.D;
  const T *__restrict__ vb = value + (int64_t)m * p.D + (chan ? c : 0);
  const int i0 = g * p.LP;
  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; i++) acc[i] = 0.f;

  auto accumulate = [&](const Foot &f) {
    if (chan && (f.c[0] != 0.f || f.c[1] != 0.f || f.c[2] != 0.f || f.c[3] != 0.f)) {
      const int64_t d01 = (f.step >> 4 & 1) * MD, d10 = (int64_t)(f.step >> 5) * MD;
      const T *b = vb + (int64_t)f.pix * MD;
      float v0[VEC], v1[VEC], v2[VEC], v3[VEC];
      load_vec<T, VEC>(v0, b);
      load_vec<T, VEC>(v1, b + d01);
      load_vec<T, VEC>(v2, b + d10);
      load_vec<T, VEC>(v3, b + d10 + d01);
#pragma unroll
      for (int i = 0; i < VEC; i++)
        acc[i] = fmaf(f.c[3], v3[i], fmaf(f.c[2], v2[i], fmaf(f.c[1], v1[i], fmaf(f.c[0], v0[i], acc[i]))));
    }
  };
  auto point = [&](int s, Foot &f) {
    const int l = s / p.P;
    const float lx = loc[2 * (i0 + s)], ly = loc[2 * (i0 + s) + 1], a = attn[i0 + s];
    int x0, y0;
    float fx, fy, sx, sy;
    if (cell(p, l, lx, ly, x0, y0, fx, fy, sx, sy)) footprint(p, n, l, x0, y0, fx, fy, a, f);
    else no_footprint(p, n, f);
  };

  for (int s0 = 0; s0 < p.LP; s0 += TPG) {
    Foot mine;
    if (s0 + lane < p.LP) point(s0 + lane, mine);
    else no_footprint(p, n, mine);
#pragma unroll
    for (int j = 0; j < TPG; j++) {
      if (s0 + j >= p.LP) break;  // uniform over the warp
      Foot f;
      f.pix = __shfl_sync(FULL, mine.pix, j, TPG);
      f.step = __shfl_sync(FULL, mine.step, j, TPG);
#pragma unroll
      for (int k = 0; k < 4; k++) f.c[k] = __shfl_sync(FULL, mine.c[k], j, TPG);
      accumulate(f);
    }
  }
  if (active && chan) store_vec<T, VEC>(out + (int64_t)g * p.D + c, acc);
}

// ------------------------------------------------------------------------------------------------ backward
// One kernel for the fast path (SCATTER: atomics into gv32; points: attention/location gradients) and for
// the point gradients of the deterministic path (!SCATTER). MERGE: the warp merge before the atomics (head
// order only). With several channel chunks the point gradients are partial sums, written to
// part[chunk][point][3] and added by finish_points_kernel.
template <typename T, int VEC, int TPG, bool HEAD, bool MERGE, bool SCATTER>
__global__ void __launch_bounds__(THREADS) bwd_kernel(float *__restrict__ gv32, float *__restrict__ gloc,
                                                      float *__restrict__ gattn, float *__restrict__ part,
                                                      const T *__restrict__ gout, const T *__restrict__ value,
                                                      const float *__restrict__ loc, const float *__restrict__ attn,
                                                      const __grid_constant__ Params p, int groups, int points) {
  static_assert(SCATTER || !MERGE, "the merge is part of the scatter");
  constexpr int R = TPG < 8 ? TPG : 8;  // points per round (the reduce-scatter keeps R x 4 partials per lane)
  const int lane = threadIdx.x % TPG;
  const int gid = (int)((blockIdx.x * (unsigned)THREADS + threadIdx.x) / TPG);
  const bool active = gid < groups;
  const int gi = active ? gid : groups - 1;
  const int g = HEAD ? head_group(p, gi) : gi;
  const int m = g % p.M, n = g / (p.M * p.Lq);
  const int c0 = blockIdx.y * (TPG * VEC), c = c0 + lane * VEC;
  const bool chan = c < p.D;
  const int64_t MD = (int64_t)p.M * p.D;
  const int64_t coff = (int64_t)m * p.D + (chan ? c : 0);
  const int64_t roff = (int64_t)m * p.D + c0;  // row offset of the chunk (scatter addresses)
  const int wl = threadIdx.x % 32;
  const int i0 = g * p.LP;
  float go[VEC];
  if (chan) load_vec<T, VEC>(go, gout + (int64_t)g * p.D + c);
  else
#pragma unroll
    for (int i = 0; i < VEC; i++) go[i] = 0.f;
  // VEC <= 4 (the planner gives the backward 16-byte float32 / 8-byte 16-bit vectors): one red.v4 per lane
  // and corner, a group's instruction covers the row's float32 channels contiguously (whole sectors). (The
  // scatter is written as one segment of a segmented layout, as when 16-bit lanes held 8 channels in two
  // segments: so the float32 kernels compile to the same PTX as before.)
  static_assert(VEC <= 4, "the backward scatters at most 4 channels per lane");
  constexpr int NSEG = 1, SEGW = VEC;
  float sgo[VEC];
  int segoff[NSEG];
  bool segok[NSEG];
#pragma unroll
  for (int i = 0; i < VEC; i++) sgo[i] = go[i];
  segoff[0] = lane * VEC;
  segok[0] = chan;
  // merge steps: partner groups at lane distance TPG, 2*TPG, ... < 32
  constexpr int NSTEP = TPG >= 32 ? 0 : TPG == 16 ? 1 : TPG == 8 ? 2 : TPG == 4 ? 3 : TPG == 2 ? 4 : 5;

  for (int s0 = 0; s0 < p.LP; s0 += R) {
    // the owner lane (lane < R) of point s0 + lane computes its footprint and keeps what the point
    // gradients need
    const int s = s0 + lane;
    const bool own = lane < R && s < p.LP;
    Foot mine;
    float fx = 0.f, fy = 0.f, gx = 0.f, gy = 0.f;
    no_footprint(p, n, mine);
    if (own) {
      const int l = s / p.P;
      const float lx = loc[2 * (i0 + s)], ly = loc[2 * (i0 + s) + 1], a = attn[i0 + s];
      int x0, y0;
      float sx, sy;
      if (cell(p, l, lx, ly, x0, y0, fx, fy, sx, sy)) {
        footprint(p, n, l, x0, y0, fx, fy, a, mine);
        gx = a * sx;
        gy = a * sy;
      }
    }
    float dot[R][4];
#pragma unroll
    for (int j = 0; j < R; j++) {
#pragma unroll
      for (int k = 0; k < 4; k++) dot[j][k] = 0.f;
      if (s0 + j < p.LP) {  // uniform over the warp
        Foot f;
        f.pix = __shfl_sync(FULL, mine.pix, j, TPG);
        f.step = __shfl_sync(FULL, mine.step, j, TPG);
#pragma unroll
        for (int k = 0; k < 4; k++) f.c[k] = __shfl_sync(FULL, mine.c[k], j, TPG);
        // a point with attention 0 still has an attention gradient: skip only points that touch nothing
        if (points && chan && (f.step & 15)) {
          const int64_t d01 = (f.step >> 4 & 1) * MD, d10 = (int64_t)(f.step >> 5) * MD;
          const int64_t off[4] = {0, d01, d10, d10 + d01};
          const int64_t base = (int64_t)f.pix * MD + coff;
          {
#pragma unroll
            for (int k = 0; k < 4; k++) {
              float v[VEC];
              load_vec<T, VEC>(v, value + base + off[k]);
              float d = 0.f;
#pragma unroll
              for (int i = 0; i < VEC; i++) d = fmaf(go[i], v[i], d);
              dot[j][k] = d;
            }
          }
        }
        if constexpr (SCATTER) {
          // outside the divergent branch: the merge shuffles need the whole warp
          bool alive = active && (f.step & 15) != 0;
          bool mt[NSTEP > 0 ? NSTEP : 1], any[NSTEP > 0 ? NSTEP : 1];
          if constexpr (MERGE) {
#pragma unroll
            for (int t = 0; t < NSTEP; t++) {
              const int d = TPG << t;
              const int opix = __shfl_xor_sync(FULL, f.pix, d), ostep = __shfl_xor_sync(FULL, f.step, d);
              const int oalive = __shfl_xor_sync(FULL, (int)alive, d), om = __shfl_xor_sync(FULL, m, d);
              mt[t] = alive && oalive && opix == f.pix && ostep == f.step && om == m;
              any[t] = __any_sync(FULL, mt[t]);
              if (mt[t] && (wl & d)) alive = false;  // the upper group hands its share to the lower one
            }
          }
          const int64_t rb = (int64_t)f.pix * MD + roff;
          const int64_t d01 = (f.step >> 4 & 1) * MD, d10 = (int64_t)(f.step >> 5) * MD;
          const int64_t off[4] = {0, d01, d10, d10 + d01};
#pragma unroll
          for (int k = 0; k < 4; k++) {
            float u[VEC];
#pragma unroll
            for (int i = 0; i < VEC; i++) u[i] = f.c[k] * sgo[i];
            if constexpr (MERGE) {
#pragma unroll
              for (int t = 0; t < NSTEP; t++) {
                if (!any[t]) continue;  // uniform over the warp
                const int d = TPG << t;
#pragma unroll
                for (int i = 0; i < VEC; i++) {
                  const float o = __shfl_xor_sync(FULL, u[i], d);
                  if (mt[t] && !(wl & d)) u[i] += o;
                }
              }
            }
            const bool need = MERGE ? ((f.step >> k) & 1) != 0 : f.c[k] != 0.f;
            if (alive && need) {
#pragma unroll
              for (int sg = 0; sg < NSEG; sg++) {
                if (!segok[sg]) continue;
                float w[SEGW];
#pragma unroll
                for (int i = 0; i < SEGW; i++) w[i] = u[sg * SEGW + i];
                red_add<SEGW>(gv32 + rb + off[k] + segoff[sg], w);
              }
            }
          }
        }
      }
    }
    if (points) {
      allreduce_high<TPG / 2, R, TPG>(dot);
      reduce_scatter<R / 2, R, TPG>(dot, lane);
      if (own && active) {
        float t[4];
#pragma unroll
        for (int k = 0; k < 4; k++) t[k] = (mine.mask >> k & 1u) ? dot[0][k] : 0.f;
        const float hx = 1.f - fx, hy = 1.f - fy;
        const float dA = hx * hy * t[0] + fx * hy * t[1] + hx * fy * t[2] + fx * fy * t[3];
        const float dx = gx * fa_bl_du(t, fy, hy);
        const float dy = gy * fa_bl_dv(t, fx, hx);
        const int i = i0 + s;
        if (part) {
          float *q = part + ((int64_t)blockIdx.y * groups * p.LP + i) * 3;
          q[0] = dA; q[1] = dx; q[2] = dy;
        } else {
          if (gattn) gattn[i] = dA;
          if (gloc) { gloc[2 * i] = dx; gloc[2 * i + 1] = dy; }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ small problems
// Few rows (the decoder: 4 800 rows of 16 points): the kernels above give a group of TPG lanes per row, i.e.
// ~150 blocks, and walk the row's points one after the other, each point a dependent round trip to HBM. Here a
// warp owns a row: SL = 32 / TPG slices of TPG lanes, slice k takes the points k, k + SL, ... Every lane
// computes the footprints of its own points (redundant across the slice's lanes, no broadcast shuffles) and
// issues the loads of U points at once (unconditional: the addresses are clamped), so a row's corners are in
// flight together. The slices' partial sums meet by shuffles in a fixed order. Query order (n, q, m); one
// channel chunk (TPG <= 16).
template <int TPG> struct Small {
  static constexpr int SL = 32 / TPG;
};

template <typename T, int VEC, int TPG>
__global__ void __launch_bounds__(THREADS) fwd_small_kernel(T *__restrict__ out, const T *__restrict__ value,
                                                            const float *__restrict__ loc,
                                                            const float *__restrict__ attn,
                                                            const __grid_constant__ Params p, int groups) {
  constexpr int SL = Small<TPG>::SL, U = VEC >= 8 ? 2 : 4;
  const int lane = threadIdx.x % TPG, sl = (threadIdx.x % 32) / TPG;
  const int gid = (int)((blockIdx.x * (unsigned)THREADS + threadIdx.x) / 32);
  const bool active = gid < groups;
  const int g = active ? gid : groups - 1;
  const int m = g % p.M, n = g / (p.M * p.Lq);
  const int c = lane * VEC;
  const bool chan = c < p.D;
  const int64_t MD = (int64_t)p.M * p.D;
  const T *__restrict__ vb = value + (int64_t)m * p.D + (chan ? c : 0);
  const int i0 = g * p.LP;
  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; i++) acc[i] = 0.f;
  for (int r0 = 0; r0 < p.LP; r0 += SL * U) {  // uniform over the warp (shuffles inside)
    const int s0 = r0 + sl;
    Foot f[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int s = s0 + u * SL;
      int x0, y0;
      float fx, fy, sx, sy;
      if (s < p.LP && cell(p, s / p.P, loc[2 * (i0 + s)], loc[2 * (i0 + s) + 1], x0, y0, fx, fy, sx, sy))
        footprint(p, n, s / p.P, x0, y0, fx, fy, attn[i0 + s], f[u]);
      else
        no_footprint(p, n, f[u]);
    }
    float v[U][4][VEC];
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int64_t d01 = (f[u].step >> 4 & 1) * MD, d10 = (int64_t)(f[u].step >> 5) * MD;
      const T *b = vb + (int64_t)f[u].pix * MD;
      load_vec<T, VEC>(v[u][0], b);
      load_vec<T, VEC>(v[u][1], b + d01);
      load_vec<T, VEC>(v[u][2], b + d10);
      load_vec<T, VEC>(v[u][3], b + d10 + d01);
    }
#pragma unroll
    for (int u = 0; u < U; u++)
      if (chan && (f[u].c[0] != 0.f || f[u].c[1] != 0.f || f[u].c[2] != 0.f || f[u].c[3] != 0.f))  // as fwd_kernel
#pragma unroll
        for (int i = 0; i < VEC; i++)
          acc[i] = fmaf(f[u].c[3], v[u][3][i],
                        fmaf(f[u].c[2], v[u][2][i], fmaf(f[u].c[1], v[u][1][i], fmaf(f[u].c[0], v[u][0][i], acc[i]))));
  }
#pragma unroll
  for (int d = TPG; d < 32; d *= 2)
#pragma unroll
    for (int i = 0; i < VEC; i++) acc[i] += __shfl_xor_sync(FULL, acc[i], d);
  if (active && chan && sl == 0) store_vec<T, VEC>(out + (int64_t)g * p.D + c, acc);
}

// The backward of the small plan (atomics into gv32, as bwd_kernel without the merge). Per point the lanes of
// a slice form partial dots <grad_out, corner> over their channels, summed over the slice by xor shuffles; lane
// 0 of the slice writes the point's gradients.
template <typename T, int VEC, int TPG>
__global__ void __launch_bounds__(THREADS) bwd_small_kernel(float *__restrict__ gv32, float *__restrict__ gloc,
                                                            float *__restrict__ gattn, const T *__restrict__ gout,
                                                            const T *__restrict__ value, const float *__restrict__ loc,
                                                            const float *__restrict__ attn,
                                                            const __grid_constant__ Params p, int groups, int points) {
  static_assert(VEC <= 4, "the backward scatters at most 4 channels per lane");
  constexpr int SL = Small<TPG>::SL, U = 4;
  const int lane = threadIdx.x % TPG, sl = (threadIdx.x % 32) / TPG;
  const int gid = (int)((blockIdx.x * (unsigned)THREADS + threadIdx.x) / 32);
  const bool active = gid < groups;
  const int g = active ? gid : groups - 1;
  const int m = g % p.M, n = g / (p.M * p.Lq);
  const int c = lane * VEC;
  const bool chan = c < p.D;
  const int64_t MD = (int64_t)p.M * p.D;
  const int64_t coff = (int64_t)m * p.D + (chan ? c : 0);
  const int i0 = g * p.LP;
  float go[VEC];
  if (chan) load_vec<T, VEC>(go, gout + (int64_t)g * p.D + c);
  else
#pragma unroll
    for (int i = 0; i < VEC; i++) go[i] = 0.f;
  for (int r0 = 0; r0 < p.LP; r0 += SL * U) {  // uniform over the warp (shuffles inside)
    const int s0 = r0 + sl;
    Foot f[U];
    float fx[U], fy[U], gx[U], gy[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int s = s0 + u * SL;
      int x0, y0;
      float sx, sy;
      fx[u] = fy[u] = gx[u] = gy[u] = 0.f;
      if (s < p.LP && cell(p, s / p.P, loc[2 * (i0 + s)], loc[2 * (i0 + s) + 1], x0, y0, fx[u], fy[u], sx, sy)) {
        const float a = attn[i0 + s];
        footprint(p, n, s / p.P, x0, y0, fx[u], fy[u], a, f[u]);
        gx[u] = a * sx;
        gy[u] = a * sy;
      } else {
        fx[u] = fy[u] = 0.f;
        no_footprint(p, n, f[u]);
      }
    }
    if (points) {  // uniform over the grid
      float dot[U][4];
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int64_t d01 = (f[u].step >> 4 & 1) * MD, d10 = (int64_t)(f[u].step >> 5) * MD;
        const int64_t off[4] = {0, d01, d10, d10 + d01};
        const T *b = value + (int64_t)f[u].pix * MD + coff;
#pragma unroll
        for (int k = 0; k < 4; k++) {
          float v[VEC];
          load_vec<T, VEC>(v, b + off[k]);
          float d = 0.f;
#pragma unroll
          for (int i = 0; i < VEC; i++) d = fmaf(go[i], v[i], d);
          dot[u][k] = d;
        }
      }
#pragma unroll
      for (int d = TPG / 2; d >= 1; d /= 2)
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
          for (int k = 0; k < 4; k++) dot[u][k] += __shfl_xor_sync(FULL, dot[u][k], d);
      if (lane == 0 && active) {
#pragma unroll
        for (int u = 0; u < U; u++) {
          const int s = s0 + u * SL;
          if (s >= p.LP) break;  // uniform over the slice
          float t[4];
#pragma unroll
          for (int k = 0; k < 4; k++) t[k] = (f[u].mask >> k & 1u) ? dot[u][k] : 0.f;
          const float hx = 1.f - fx[u], hy = 1.f - fy[u];
          const float dA = hx * hy * t[0] + fx[u] * hy * t[1] + hx * fy[u] * t[2] + fx[u] * fy[u] * t[3];
          const int i = i0 + s;
          if (gattn) gattn[i] = dA;
          if (gloc) {
            gloc[2 * i] = gx[u] * fa_bl_du(t, fy[u], hy);
            gloc[2 * i + 1] = gy[u] * fa_bl_dv(t, fx[u], hx);
          }
        }
      }
    }
    if (gv32 && active && chan) {
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int64_t d01 = (f[u].step >> 4 & 1) * MD, d10 = (int64_t)(f[u].step >> 5) * MD;
        const int64_t off[4] = {0, d01, d10, d10 + d01};
        float *b = gv32 + (int64_t)f[u].pix * MD + coff;
#pragma unroll
        for (int k = 0; k < 4; k++) {
          if (f[u].c[k] == 0.f) continue;
          float w[VEC];
#pragma unroll
          for (int i = 0; i < VEC; i++) w[i] = f[u].c[k] * go[i];
          red_add<VEC>(b + off[k], w);
        }
      }
    }
  }
}

// point gradients = sum of the channel chunks' partials, in chunk order
__global__ void finish_points_kernel(float *__restrict__ gloc, float *__restrict__ gattn,
                                     const float *__restrict__ part, int64_t npts, int chunks) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < npts; i += (int64_t)gridDim.x * blockDim.x) {
    float a = 0.f, x = 0.f, y = 0.f;
    for (int k = 0; k < chunks; k++) {
      const float *q = part + ((int64_t)k * npts + i) * 3;
      a += q[0]; x += q[1]; y += q[2];
    }
    if (gattn) gattn[i] = a;
    if (gloc) { gloc[2 * i] = x; gloc[2 * i + 1] = y; }
  }
}

template <typename T>
__global__ void cast_kernel(T *__restrict__ dst, const float *__restrict__ src, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = fa_from_f<T>(src[i]);
}
// the same, 4 elements per thread and step (n4 = n / 4; dst 8-byte and src 16-byte aligned)
template <typename T>
__global__ void cast4_kernel(T *__restrict__ dst, const float *__restrict__ src, int64_t n4) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x) {
    float f[4];
    load_vec<float, 4>(f, src + 4 * i);
    store_vec<T, 4>(dst + 4 * i, f);
  }
}

// ------------------------------------------------------------------------------------------------ gather
// key of each point = its cell (x0, y0) on the (H+1)x(W+1) grid of (n, m, level); points that touch nothing
// get key nkeys (sorted last, never read). coef[i] = the 4 coefficients; counts[key] += 1.
__global__ void keys_kernel(unsigned *__restrict__ keys, unsigned *__restrict__ ids, float4 *__restrict__ coef,
                            int *__restrict__ counts, const float *__restrict__ loc, const float *__restrict__ attn,
                            const __grid_constant__ Params p, int npts, unsigned nkeys) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < npts; i += gridDim.x * blockDim.x) {
    const int g = i / p.LP, s = i - g * p.LP, l = s / p.P, m = g % p.M, n = g / (p.M * p.Lq);
    int x0, y0;
    float fx, fy, sx, sy;
    unsigned key = nkeys;
    Foot f;
    if (cell(p, l, loc[2 * i], loc[2 * i + 1], x0, y0, fx, fy, sx, sy)) {
      footprint(p, n, l, x0, y0, fx, fy, attn[i], f);
      key = (unsigned)((n * p.M + m) * p.Sx + p.xstart[l] + (y0 + 1) * (p.W[l] + 1) + (x0 + 1));
      atomicAdd(counts + key, 1);
    } else {
      no_footprint(p, n, f);
    }
    keys[i] = key;
    ids[i] = (unsigned)i;
    coef[i] = make_float4(f.c[0], f.c[1], f.c[2], f.c[3]);
  }
}

// one group of TPG lanes per grad_value row (n, pixel, m): sums coefficient * grad_out over the points of
// the 4 cells around the pixel (cell order fixed, points in sorted = original order within a cell).
// Rows are taken in reverse order so that the coarse levels (many points per pixel) start first.
template <typename T, int VEC, int TPG>
__global__ void __launch_bounds__(THREADS) gather_kernel(T *__restrict__ gv, const unsigned *__restrict__ ids,
                                                         const float *__restrict__ coef, const int *__restrict__ offs,
                                                         const T *__restrict__ gout, const __grid_constant__ Params p, int rows) {
  const int lane = threadIdx.x % TPG;
  const int gid = (int)((blockIdx.x * (unsigned)THREADS + threadIdx.x) / TPG);
  if (gid >= rows) return;  // whole groups leave together (the shuffles below use the group's mask)
  const unsigned gmask = TPG == 32 ? FULL : (((1u << TPG) - 1u) << ((threadIdx.x % 32) & ~(TPG - 1)));
  const int r = rows - 1 - gid;
  const int m = r % p.M, ns = r / p.M, s = ns % p.S, n = ns / p.S;
  int l = 0;
  while (l + 1 < p.L && p.start[l + 1] <= s) l++;
  const int W = p.W[l], pi = (s - p.start[l]) / W, pj = (s - p.start[l]) - pi * W, Wx = W + 1;
  const int kb = (n * p.M + m) * p.Sx + p.xstart[l];
  // cells whose point has this pixel as corner k: k=0 top-left at (pi, pj), 1 at (pi, pj-1), 2 at (pi-1, pj),
  // 3 at (pi-1, pj-1); on the (H+1)x(W+1) grid the cell (y0, x0) is (y0+1)*(W+1) + (x0+1)
  const int k0 = kb + (pi + 1) * Wx + pj + 1, k2 = kb + pi * Wx + pj + 1;
  const int b0 = offs[k0], b1 = offs[k0 - 1], b2 = offs[k2], b3 = offs[k2 - 1];
  const int c1 = offs[k0 + 1] - b0, c2 = c1 + b0 - b1, c3 = c2 + offs[k2 + 1] - b2, total = c3 + b2 - b3;
  const int c = blockIdx.y * (TPG * VEC) + lane * VEC;
  const bool chan = c < p.D;
  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; i++) acc[i] = 0.f;
  for (int v0 = 0; v0 < total; v0 += TPG) {
    const int v = v0 + lane;
    int row = 0;
    float cf = 0.f;
    if (v < total) {
      const int k = v < c1 ? 0 : v < c2 ? 1 : v < c3 ? 2 : 3;
      const unsigned id = ids[k == 0 ? b0 + v : k == 1 ? b1 + v - c1 : k == 2 ? b2 + v - c2 : b3 + v - c3];
      cf = coef[4 * (int64_t)id + k];
      row = (int)(id / (unsigned)p.LP);
    }
#pragma unroll 4
    for (int j = 0; j < TPG; j++) {
      if (v0 + j >= total) break;  // uniform over the group
      const int rj = __shfl_sync(gmask, row, j, TPG);
      const float cj = __shfl_sync(gmask, cf, j, TPG);
      if (chan) {
        float gg[VEC];
        load_vec<T, VEC>(gg, gout + (int64_t)rj * p.D + c);
#pragma unroll
        for (int i = 0; i < VEC; i++) acc[i] = fmaf(cj, gg[i], acc[i]);
      }
    }
  }
  if (chan) store_vec<T, VEC>(gv + (int64_t)r * p.D + c, acc);
}

// ------------------------------------------------------------------------------------------------ host
struct Plan {
  Params p;
  bool head, merge;  // the variants: head order (else query order), warp merge (head order only)
  bool small;        // the small-problem kernels (a warp per row)
  int vec, tpg, chunks, groups;
  int64_t npts;
};

// Params from the geometry, the variants and the launch shape. Vector width: 16 bytes when D and every
// pointer allow it, else 1 (then 32 lanes per group).
template <typename T>
static int make_plan(const char *fn, Plan &pl, const fa_msda_geom *g, bool backward, const void *const *ptrs,
                     int nptrs) {
  Params &p = pl.p;
  memset(&p, 0, sizeof p);
  p.N = (int)g->N; p.S = (int)g->S; p.M = (int)g->M; p.D = (int)g->D; p.L = (int)g->L; p.Lq = (int)g->Lq;
  p.P = (int)g->P;
  p.LP = (int)(g->L * g->P);
  p.Sx = (int)g->Sx;
  for (int l = 0, x = 0; l < p.L; l++) {  // c/msda.c checked L <= MAXL and the 32-bit sizes
    p.H[l] = (int)g->H[l];
    p.W[l] = (int)g->W[l];
    p.start[l] = (int)g->start[l];
    p.xstart[l] = x;
    x += (p.H[l] + 1) * (p.W[l] + 1);
  }
  p.border = g->border;
  p.align = g->align;
  // Group order and warp merge (measured on the H100, bench/MSDA_NOTES.md): the forward is fastest with
  // (n, m, q) order everywhere (a block's queries share one head's value column in L1). The backward gains
  // from (n, m, q) order plus the warp merge when the queries are the value's own pixels (Lq == S, encoder
  // self-attention: neighbouring queries sample neighbouring cells); otherwise (n, q, m) order is faster
  // (the atomics of concurrent blocks spread over every head's columns, hence over more L2 slices).
  // The merge is only built for head order: in query order a warp's neighbouring groups are mostly other
  // heads, and the planner never pairs the two (a forced merge with query order runs without it).
  const bool self = g->Lq == g->S;
  pl.head = g->order == FA_MSDA_ORDER_QUERY ? false : g->order == FA_MSDA_ORDER_HEAD ? true : backward ? self : true;
  pl.merge = pl.head && (g->merge == FA_MSDA_OFF ? false : g->merge == FA_MSDA_ON ? true : backward && self);
  p.qfast = pl.head;
  // Vectors: 16 bytes in the forward; in the backward 4 channels (16 bytes float32, 8 bytes 16-bit), so that a
  // lane's red.v4 of 4 float32 sums is its whole share of the row and a group's instruction covers the row's
  // float32 channels contiguously, as for float32 (8 channels per lane took two half-row instructions per
  // group: 2x the L2 requests, the bfloat16 backward 0.96 ms against float32's 0.78 on the H200).
  const int vb = backward ? 4 * (int)sizeof(T) : 16;
  bool vok = g->D % (vb / (int)sizeof(T)) == 0;
  for (int i = 0; i < nptrs; i++) vok = vok && (!ptrs[i] || ((uintptr_t)ptrs[i] & (vb - 1)) == 0);
  pl.vec = vok ? vb / (int)sizeof(T) : 1;
  int need = (int)((g->D + pl.vec - 1) / pl.vec), t = 1;
  while (t < need && t < 32) t *= 2;
  pl.tpg = pl.vec == 1 ? 32 : t;
  const int64_t chunks = (g->D + pl.tpg * pl.vec - 1) / (pl.tpg * pl.vec);
  if (chunks > 65535)  // gridDim.y
    return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'value': expected at most %lld channels (D) on CUDA, got %lld", fn,
                    65535LL * pl.tpg * pl.vec, (long long)g->D);
  pl.chunks = (int)chunks;
  pl.groups = (int)(g->N * g->Lq * g->M);
  pl.npts = g->N * g->Lq * g->M * g->L * g->P;
  // Small problems (fwd_small_kernel, bwd_small_kernel): when the group kernels would run fewer than 256
  // blocks (< 2 per SM on 132 SMs; the decoder: 4 800 rows x 8 lanes = 150 blocks) and the planner chooses
  // (order and merge not forced); fast path only (the deterministic backward keeps its kernels).
  pl.small = pl.tpg <= 16 && (int64_t)pl.groups * pl.tpg <= 256 * THREADS && g->order == FA_MSDA_ORDER_AUTO &&
             g->merge == FA_MSDA_AUTO && !(backward && g->deterministic);
  return 0;
}

static dim3 grid_of(const Plan &pl, int64_t groups) {
  return dim3((unsigned)((groups * pl.tpg + THREADS - 1) / THREADS), (unsigned)pl.chunks);
}

// dispatch on the group width (a compile-time constant)
#define MSDA_TPG_SWITCH(tpg, ...)                                     \
  switch (tpg) {                                                      \
    case 1: { constexpr int TPG_ = 1; __VA_ARGS__; } break;           \
    case 2: { constexpr int TPG_ = 2; __VA_ARGS__; } break;           \
    case 4: { constexpr int TPG_ = 4; __VA_ARGS__; } break;           \
    case 8: { constexpr int TPG_ = 8; __VA_ARGS__; } break;           \
    case 16: { constexpr int TPG_ = 16; __VA_ARGS__; } break;         \
    default: { constexpr int TPG_ = 32; __VA_ARGS__; } break;         \
  }

template <typename T>
static void launch_fwd(const Plan &pl, cudaStream_t st, T *out, const T *value, const float *loc, const float *attn) {
  constexpr int V = 16 / sizeof(T);
  if (pl.small) {  // a warp per row (pl.vec == V, pl.tpg <= 16)
    const dim3 grid((unsigned)(((int64_t)pl.groups * 32 + THREADS - 1) / THREADS));
    MSDA_TPG_SWITCH(pl.tpg, if constexpr (TPG_ <= 16) fwd_small_kernel<T, V, TPG_><<<grid, THREADS, 0, st>>>(
                                out, value, loc, attn, pl.p, pl.groups))
    return;
  }
  const dim3 grid = grid_of(pl, pl.groups);
  if (pl.vec == 1) {
    fwd_kernel<T, 1, 32><<<grid, THREADS, 0, st>>>(out, value, loc, attn, pl.p, pl.groups);
    return;
  }
  MSDA_TPG_SWITCH(pl.tpg, fwd_kernel<T, V, TPG_><<<grid, THREADS, 0, st>>>(out, value, loc, attn, pl.p, pl.groups))
}

template <typename T, bool HEAD, bool MERGE, bool SCATTER>
static void launch_bwd_v(const Plan &pl, cudaStream_t st, float *gv32, float *gloc, float *gattn, float *part,
                         const T *gout, const T *value, const float *loc, const float *attn, int points) {
  constexpr int V = 4;  // make_plan: 4 channels per lane in the backward
  const dim3 grid = grid_of(pl, pl.groups);
  if (pl.vec == 1) {
    bwd_kernel<T, 1, 32, HEAD, MERGE, SCATTER><<<grid, THREADS, 0, st>>>(gv32, gloc, gattn, part, gout, value, loc,
                                                                         attn, pl.p, pl.groups, points);
    return;
  }
  MSDA_TPG_SWITCH(pl.tpg, bwd_kernel<T, V, TPG_, HEAD, MERGE, SCATTER><<<grid, THREADS, 0, st>>>(
                              gv32, gloc, gattn, part, gout, value, loc, attn, pl.p, pl.groups, points))
}

// scatter: atomics into gv32 (the fast path with grad_value wanted); without it only the point gradients
// (the deterministic path's first pass), where the merge has nothing to do
template <typename T>
static void launch_bwd(const Plan &pl, cudaStream_t st, float *gv32, float *gloc, float *gattn, float *part,
                       const T *gout, const T *value, const float *loc, const float *attn, bool scatter, int points) {
  if (!scatter) {
    if (pl.head) launch_bwd_v<T, true, false, false>(pl, st, gv32, gloc, gattn, part, gout, value, loc, attn, points);
    else launch_bwd_v<T, false, false, false>(pl, st, gv32, gloc, gattn, part, gout, value, loc, attn, points);
  } else if (!pl.head) {
    launch_bwd_v<T, false, false, true>(pl, st, gv32, gloc, gattn, part, gout, value, loc, attn, points);
  } else if (pl.merge) {
    launch_bwd_v<T, true, true, true>(pl, st, gv32, gloc, gattn, part, gout, value, loc, attn, points);
  } else {
    launch_bwd_v<T, true, false, true>(pl, st, gv32, gloc, gattn, part, gout, value, loc, attn, points);
  }
}

template <typename T>
static void launch_gather(const Plan &pl, cudaStream_t st, T *gv, const unsigned *ids, const float *coef,
                          const int *offs, const T *gout) {
  constexpr int V = 4;  // the backward's plan
  const int rows = pl.p.N * pl.p.S * pl.p.M;
  const dim3 grid = grid_of(pl, rows);
  if (pl.vec == 1) {
    gather_kernel<T, 1, 32><<<grid, THREADS, 0, st>>>(gv, ids, coef, offs, gout, pl.p, rows);
    return;
  }
  MSDA_TPG_SWITCH(pl.tpg, gather_kernel<T, V, TPG_><<<grid, THREADS, 0, st>>>(gv, ids, coef, offs, gout, pl.p, rows))
}

template <typename T>
static int forward_t(const fa_msda_geom *g, T *out, const T *value, const float *loc, const float *attn) {
  static const char *fn = "fa_msda_forward";
  Plan pl;
  const void *ptrs[2] = {value, out};
  int rc = make_plan<T>(fn, pl, g, false, ptrs, 2);
  if (rc) return rc;
  cudaStream_t st = fa_cu_stream(g->device);
  if (pl.npts == 0 || g->D == 0)  // no points (L or P = 0): zeros
    return fa_cu_check(cudaMemsetAsync(out, 0, g->N * g->Lq * g->M * g->D * sizeof(T), st), fn);
  launch_fwd<T>(pl, st, out, value, loc, attn);
  return fa_cu_launch_check(fn);
}

template <typename T>
static int backward_t(const fa_msda_geom *g, T *gv, float *gloc, float *gattn, const T *go, const T *val,
                      const float *lc, const float *at) {
  static const char *fn = "fa_msda_backward";
  const int dev = g->device;
  Plan pl;
  const void *ptrs[3] = {val, go, gv};
  int rc = make_plan<T>(fn, pl, g, true, ptrs, 3);
  if (rc) return rc;
  cudaStream_t st = fa_cu_stream(dev);
  const Params &p = pl.p;
  if (g->D == 0) {  // no channels: every gradient is 0
    if (gloc && (rc = fa_cu_check(cudaMemsetAsync(gloc, 0, pl.npts * 2 * sizeof(float), st), fn))) return rc;
    if (gattn && (rc = fa_cu_check(cudaMemsetAsync(gattn, 0, pl.npts * sizeof(float), st), fn))) return rc;
    return 0;
  }
  Temps tmp(dev);
  const int64_t nv = (int64_t)p.N * p.S * p.M * p.D;
  const bool points = gloc || gattn;
  if (pl.npts == 0) {  // no points: grad_value is zero, the point gradients are empty
    if (gv && nv) return fa_cu_check(cudaMemsetAsync(gv, 0, nv * sizeof(T), st), fn);
    return 0;
  }
  float *part = nullptr;
  if (points && pl.chunks > 1 && !(part = (float *)tmp.get(pl.chunks * pl.npts * 3 * sizeof(float)))) return FA_ERR_MEMORY;
  auto finish_points = [&]() {
    if (part) {
      const int64_t blocks = (pl.npts + 255) / 256 < 4096 ? (pl.npts + 255) / 256 : 4096;
      finish_points_kernel<<<(unsigned)blocks, 256, 0, st>>>(gloc, gattn, part, pl.npts, pl.chunks);
    }
  };
  if (!g->deterministic) {
    float *gv32 = nullptr;
    if (gv) {
      gv32 = sizeof(T) == 4 ? (float *)gv : (float *)tmp.get(nv * sizeof(float));
      if (!gv32) return FA_ERR_MEMORY;
      if ((rc = fa_cu_check(cudaMemsetAsync(gv32, 0, nv * sizeof(float), st), fn))) return rc;
    }
    if (pl.small) {  // pl.vec == 4, pl.tpg <= 16, one chunk (part == nullptr)
      const dim3 grid((unsigned)(((int64_t)pl.groups * 32 + THREADS - 1) / THREADS));
      MSDA_TPG_SWITCH(pl.tpg, if constexpr (TPG_ <= 16) bwd_small_kernel<T, 4, TPG_><<<grid, THREADS, 0, st>>>(
                                  gv32, gloc, gattn, go, val, lc, at, p, pl.groups, points))
    } else {
      launch_bwd<T>(pl, st, gv32, gloc, gattn, part, go, val, lc, at, gv != nullptr, points);
    }
    finish_points();
    if (gv && sizeof(T) != 4) {
      if (nv % 4 == 0 && ((uintptr_t)gv & 7) == 0 && fa_cu_aligned16(gv32))
        cast4_kernel<T><<<fa_cu_blocks(nv / 4, 256, dev), 256, 0, st>>>(gv, gv32, nv / 4);
      else
        cast_kernel<T><<<fa_cu_blocks(nv, 256, dev), 256, 0, st>>>(gv, gv32, nv);
    }
    return fa_cu_launch_check(fn);
  }
  // deterministic: point gradients without atomics, then grad_value by sorting and gathering
  if (points) {
    launch_bwd<T>(pl, st, nullptr, gloc, gattn, part, go, val, lc, at, false, 1);
    finish_points();
    if ((rc = fa_cu_launch_check(fn))) return rc;
  }
  if (!gv) return 0;
  const int npts = (int)pl.npts;
  const unsigned nkeys = (unsigned)((int64_t)p.N * p.M * p.Sx);
  int bits = 1;
  while (bits < 32 && ((uint64_t)1 << bits) <= nkeys) bits++;
  unsigned *keys = (unsigned *)tmp.get((int64_t)npts * 4), *ids = (unsigned *)tmp.get((int64_t)npts * 4);
  unsigned *skeys = (unsigned *)tmp.get((int64_t)npts * 4), *sids = (unsigned *)tmp.get((int64_t)npts * 4);
  float4 *coef = (float4 *)tmp.get((int64_t)npts * 16);
  int *counts = (int *)tmp.get(((int64_t)nkeys + 2) * 4), *offs = (int *)tmp.get(((int64_t)nkeys + 2) * 4);
  if (!keys || !ids || !skeys || !sids || !coef || !counts || !offs) return FA_ERR_MEMORY;
  if ((rc = fa_cu_check(cudaMemsetAsync(counts, 0, ((int64_t)nkeys + 2) * 4, st), fn))) return rc;
  keys_kernel<<<fa_cu_blocks(npts, 256, dev), 256, 0, st>>>(keys, ids, coef, counts, lc, at, p, npts, nkeys);
  if ((rc = fa_cu_launch_check(fn))) return rc;
  size_t b1 = 0, b2 = 0;
  if ((rc = fa_cu_check(cub::DeviceRadixSort::SortPairs(nullptr, b1, keys, skeys, ids, sids, npts, 0, bits, st), fn)) ||
      (rc = fa_cu_check(cub::DeviceScan::ExclusiveSum(nullptr, b2, counts, offs, (int)nkeys + 1, st), fn)))
    return rc;
  void *cubtmp = tmp.get((int64_t)(b1 > b2 ? b1 : b2));
  if (!cubtmp) return FA_ERR_MEMORY;
  if ((rc = fa_cu_check(cub::DeviceScan::ExclusiveSum(cubtmp, b2, counts, offs, (int)nkeys + 1, st), fn)) ||
      (rc = fa_cu_check(cub::DeviceRadixSort::SortPairs(cubtmp, b1, keys, skeys, ids, sids, npts, 0, bits, st), fn)))
    return rc;
  launch_gather<T>(pl, st, gv, sids, (const float *)coef, offs, go);
  return fa_cu_launch_check(fn);
}

}  // namespace

int fa_cu_msda_forward(const fa_msda_geom *g, void *out, const void *value, const float *loc, const float *attn) {
  FA_CU_FLOAT_DISPATCH("fa_msda_forward", g->dtype, forward_t<T>(g, (T *)out, (const T *)value, loc, attn))
}

int fa_cu_msda_backward(const fa_msda_geom *g, void *grad_value, float *grad_loc, float *grad_attn,
                        const void *grad_out, const void *value, const float *loc, const float *attn) {
  FA_CU_FLOAT_DISPATCH("fa_msda_backward", g->dtype,
                       backward_t<T>(g, (T *)grad_value, grad_loc, grad_attn, (const T *)grad_out, (const T *)value,
                                     loc, attn))
}
