// cpb.cu: the continuous position bias MLP on the GPU (fa.cpb, c/cpb.h). c/cpb.c validated everything and hands
// dense buffers; this file prepares the weights, plans the launches and checks the device's limits.
//
// Two kernel families, chosen at launch by the dtype, fa.cuda.allowTF32 and the shapes:
// - mma.sync (C <= 128, hidden units padded to 16/32/64/128; the backward also needs O <= 8 and its shared memory
//   to fit, which for float32 at C 128 means O <= 2): mma_fwd_kernel and mma_bwd_kernel below. w2 in shared memory
//   once per CTA, h1 built in registers as A fragments, z2 and the gradient products accumulated in registers.
// - WMMA through shared memory (the rest): fwd_kernel, bwd_kernel. A CTA loops over tiles of pairs (TP
//   consecutive pairs u = i*M + j of one p). Per tile: f (smem), h1 = relu(w1 f + b1) into smem in the product's
//   dtype, z2 = h1 w2^T on tensor cores, h2 = relu(z2 + b2), then the O outputs (float32, coalesced along the
//   keys). w2 is read from a padded (CP x CP) copy in global memory (L1/L2-resident).
// Products: bfloat16/float16 16x16x16 (m16n8k16); TF32 under fa.cuda.allowTF32(true) (h1 and w2 rounded to tf32,
// one product); float32 otherwise: 3xTF32 (a = a_hi + a_lo, b = b_hi + b_lo, each tf32; c += a_lo b_hi + a_hi b_lo
// + a_hi b_hi: about 2^-21 relative per product, float32 accumulation).
// 16-bit weights: h1 enters the products as two 16-bit parts, hi + lo (lo = h1 - hi rounded), z2 = hi w2^T +
// lo w2^T, nearly the float32 product (w2 itself is exact). With h1 rounded alone, z2 erred by 2^-9 / 2^-12 and
// h2's relu flipped at pairs near 0, each flip moving a whole term of the weight gradients: errors of a few % of
// max|grad| in the first GPU run, float16 no better than bfloat16 (spec/fixtures/emulate_cpb.py reproduces them).
// Backward, per tile after the recompute: gw3 += g^T h2, gz2 = (g w3) [h2 > 0], gw2 += gz2^T h1, gh1 = gz2 w2,
// gz1 = gh1 [h1 > 0], gw1 += gz1^T f, gd = (gz1 w1) df per pair into a (P, N*M, 2) buffer (gz2 and h1's hi part
// rounded to the dtype in the gw2 and gh1 products; relu masks from float32 pre-activations). The weight sums go
// into per-CTA partials; then two fixed-order reductions: the partials over the CTAs, grad_kpos[p, j] = -sum_i gd
// over the queries. No float atomics: the backward is deterministic always (opts.deterministic changes nothing).
#include "common.cuh"
#include "cpb.h"
#include <mma.h>
#include <type_traits>

namespace {
using namespace nvcuda;

constexpr int THREADS = 128, WARPS = THREADS / 32;
constexpr int TPF = 64, TPB = 32; // pairs per tile: forward, backward
constexpr int MAXC = 256;         // hidden units at most (the shared memory of a forward tile)
enum { TF32 = 1, HALF16 = 2, X3 = 3 }; // X3: float32 without TF32, 3xTF32 split products

template <int MODE, typename T> struct Compute { typedef float type; };
template <typename T> struct Compute<HALF16, T> { typedef T type; };

// the weights as the kernels read them: float32 vectors padded to CP (zeros), w2 (CP x CP) in the product's dtype
struct W {
  const float *w1x, *w1y, *b1, *b2, *w3, *b3; // w3: (O x CP)
  const void *w2;                              // (CP x CP), row n = output unit
  int C, CP, O;
};

__device__ __forceinline__ void feature(float q, float k, float &f, float &df) {
  float d = q - k, a = fabsf(d), l = log1pf(a);
  f = d > 0.f ? l : d < 0.f ? -l : 0.f;
  df = d != 0.f ? 1.f / (a + 1.f) : 0.f;
}

template <typename T>
__global__ void prep_kernel(float *small, void *w2p, const T *w1, const T *b1, const T *w2, const T *b2, const T *w3,
                            const T *b3, int C, int CP, int O, int w2_half) {
  int64_t nsmall = 4 * (int64_t)CP + (int64_t)O * CP + O, n = nsmall + (int64_t)CP * CP;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    if (e < nsmall) {
      int64_t part = e / CP, c = e % CP;
      float v = 0.f;
      if (part == 0) v = c < C ? fa_to_f(w1[2 * c]) : 0.f;
      else if (part == 1) v = c < C ? fa_to_f(w1[2 * c + 1]) : 0.f;
      else if (part == 2) v = c < C ? fa_to_f(b1[c]) : 0.f;
      else if (part == 3) v = c < C ? fa_to_f(b2[c]) : 0.f;
      else if (e < 4 * (int64_t)CP + (int64_t)O * CP) {
        int64_t r = e - 4 * (int64_t)CP, o = r / CP, cc = r % CP;
        v = cc < C ? fa_to_f(w3[o * C + cc]) : 0.f;
      } else {
        v = fa_to_f(b3[e - 4 * (int64_t)CP - (int64_t)O * CP]);
      }
      small[e] = v;
    } else {
      int64_t r = e - nsmall, a = r / CP, b = r % CP;
      float v = a < C && b < C ? fa_to_f(w2[a * C + b]) : 0.f;
      if (w2_half) ((T *)w2p)[r] = fa_from_f<T>(v);
      else ((float *)w2p)[r] = v;
    }
  }
}

// Cs (Mr x Nc, float, row-major, ldc) (+)= A (Mr x K) B (K x Nc) (+ A2 B: A2 as A, nullptr = none). A(r, k) =
// A[r*lda + k] (ARow) or A[k*lda + r]; B(k, n) = B[k*ldb + n] (BRow) or B[n*ldb + k]. Mr, Nc, K multiples of 16;
// the block's warps share the work.
template <int MODE, typename TC, bool ARow, bool BRow>
__device__ __forceinline__ void bgemm(int Mr, int Nc, int K, const TC *A, int lda, const TC *B, int ldb, float *Cs, int ldc,
                                      bool acc, const TC *A2 = nullptr) {
  typedef typename std::conditional<MODE == TF32 || MODE == X3, wmma::precision::tf32, TC>::type FT;
  constexpr int KS = MODE == HALF16 ? 16 : 8;
  typedef typename std::conditional<ARow, wmma::row_major, wmma::col_major>::type AL;
  typedef typename std::conditional<BRow, wmma::row_major, wmma::col_major>::type BL;
  const int warp = threadIdx.x / 32, nb = Nc / 16, blocks = (Mr / 16) * nb;
  for (int blk = warp; blk < blocks; blk += WARPS) {
    const int r0 = blk / nb * 16, n0 = blk % nb * 16;
    wmma::fragment<wmma::accumulator, 16, 16, KS, float> c;
    if (acc) wmma::load_matrix_sync(c, Cs + (int64_t)r0 * ldc + n0, ldc, wmma::mem_row_major);
    else wmma::fill_fragment(c, 0.f);
    for (int k0 = 0; k0 < K; k0 += KS) {
      wmma::fragment<wmma::matrix_a, 16, 16, KS, FT, AL> a;
      wmma::fragment<wmma::matrix_b, 16, 16, KS, FT, BL> b;
      wmma::load_matrix_sync(a, ARow ? A + (int64_t)r0 * lda + k0 : A + (int64_t)k0 * lda + r0, lda);
      wmma::load_matrix_sync(b, BRow ? B + (int64_t)k0 * ldb + n0 : B + (int64_t)n0 * ldb + k0, ldb);
      if constexpr (MODE == TF32) {
        for (int i = 0; i < a.num_elements; i++) a.x[i] = wmma::__float_to_tf32(a.x[i]);
        for (int i = 0; i < b.num_elements; i++) b.x[i] = wmma::__float_to_tf32(b.x[i]);
      }
      if constexpr (MODE == X3) { // a = hi + lo, b = hi + lo; c += a_lo b_hi + a_hi b_lo + a_hi b_hi
        wmma::fragment<wmma::matrix_a, 16, 16, KS, FT, AL> alo;
        wmma::fragment<wmma::matrix_b, 16, 16, KS, FT, BL> blo;
        for (int i = 0; i < a.num_elements; i++) {
          const float v = a.x[i];
          a.x[i] = wmma::__float_to_tf32(v);
          alo.x[i] = wmma::__float_to_tf32(v - a.x[i]);
        }
        for (int i = 0; i < b.num_elements; i++) {
          const float v = b.x[i];
          b.x[i] = wmma::__float_to_tf32(v);
          blo.x[i] = wmma::__float_to_tf32(v - b.x[i]);
        }
        wmma::mma_sync(c, alo, b, c);
        wmma::mma_sync(c, a, blo, c);
      }
      wmma::mma_sync(c, a, b, c);
      if (A2) {
        wmma::load_matrix_sync(a, ARow ? A2 + (int64_t)r0 * lda + k0 : A2 + (int64_t)k0 * lda + r0, lda);
        if constexpr (MODE == TF32)
          for (int i = 0; i < a.num_elements; i++) a.x[i] = wmma::__float_to_tf32(a.x[i]);
        wmma::mma_sync(c, a, b, c);
      }
    }
    wmma::store_matrix_sync(Cs + (int64_t)r0 * ldc + n0, c, ldc, wmma::mem_row_major);
  }
}

// row pitches: h1/gz (the product's dtype) and z (float32), padded against bank conflicts, multiples of 32 bytes
template <typename TC> __host__ __device__ constexpr int pitch_h(int CP) { return CP + (int)(32 / sizeof(TC)) / 2 * 2; }
__host__ __device__ constexpr int pitch_z(int CP) { return CP + 8; }

// h1 in two 16-bit parts (hi, lo) with 16-bit weights; in float32 (TF32, X3) one
template <int MODE> __host__ __device__ constexpr int h_parts() { return MODE == HALF16 ? 2 : 1; }

template <int MODE, typename TC> static size_t fwd_smem(int CP) {
  return h_parts<MODE>() * (size_t)TPF * pitch_h<TC>(CP) * sizeof(TC) + (size_t)TPF * pitch_z(CP) * 4 + TPF * 2 * 4 + 64;
}

// f of the tile's pairs (0 past the end), then h1 = relu(w1 f + b1) (h1lo: nullptr, or h1 = h1 + h1lo in 16 bits)
template <typename TC, int TP>
__device__ __forceinline__ void tile_h1(const W &w, const float *qpos, const float *kp, int64_t u0, int64_t NM, int64_t M,
                                        float *f, float *df, TC *h1, TC *h1lo, int ldh) {
  for (int t = threadIdx.x; t < TP; t += THREADS) {
    int64_t u = u0 + t;
    float f0 = 0.f, f1 = 0.f, d0 = 0.f, d1 = 0.f;
    if (u < NM) {
      int64_t i = u / M, j = u % M;
      feature(qpos[2 * i], kp[2 * j], f0, d0);
      feature(qpos[2 * i + 1], kp[2 * j + 1], f1, d1);
    }
    f[2 * t] = f0;
    f[2 * t + 1] = f1;
    if (df) { df[2 * t] = d0; df[2 * t + 1] = d1; }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < TP * w.CP; e += THREADS) {
    int t = e / w.CP, c = e % w.CP;
    float z = fmaf(w.w1x[c], f[2 * t], fmaf(w.w1y[c], f[2 * t + 1], w.b1[c])), v = z > 0.f ? z : 0.f;
    TC hi = fa_from_f<TC>(v);
    h1[t * ldh + c] = hi;
    if (h1lo) h1lo[t * ldh + c] = fa_from_f<TC>(v - fa_to_f<TC>(hi)); // v - hi is exact in float32
  }
  __syncthreads();
}

template <typename T, int MODE>
__global__ void __launch_bounds__(THREADS) fwd_kernel(const fa_cpb_geom g, W w, float *out, const float *qpos,
                                                      const float *kpos) {
  typedef typename Compute<MODE, T>::type TC;
  extern __shared__ __align__(128) unsigned char smem[];
  const int CP = w.CP, ldh = pitch_h<TC>(CP), ldz = pitch_z(CP);
  constexpr int NH = h_parts<MODE>();
  TC *h1 = (TC *)smem, *h1lo = NH == 2 ? h1 + (size_t)TPF * ldh : nullptr;
  float *z = (float *)(smem + NH * (size_t)TPF * ldh * sizeof(TC)), *f = z + (size_t)TPF * ldz;
  const int64_t NM = g.N * g.M, tpp = (NM + TPF - 1) / TPF, tiles = g.P * tpp;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t p = tile / tpp, u0 = tile % tpp * TPF;
    tile_h1<TC, TPF>(w, qpos, kpos + p * g.M * 2, u0, NM, g.M, f, nullptr, h1, h1lo, ldh);
    bgemm<MODE, TC, true, false>(TPF, CP, CP, h1, ldh, (const TC *)w.w2, CP, z, ldz, false, h1lo);
    __syncthreads();
    for (int e = threadIdx.x; e < TPF * w.O; e += THREADS) {
      int t = e % TPF, o = e / TPF;
      int64_t u = u0 + t;
      const float *zr = z + t * ldz, *w3 = w.w3 + o * CP;
      float s = 0.f;
      for (int c = 0; c < w.C; c++) s = fmaf(w3[c], fmaxf(zr[c] + w.b2[c], 0.f), s);
      if (u < NM) out[(p * w.O + o) * NM + u] = s + w.b3[o];
    }
    __syncthreads();
  }
}

// ---- the mma.sync forward (CP = 16, 32, 64 or 128: the hidden units padded to a power of two; wider layers
// take fwd_kernel). A CTA of FW warps stages w2 in shared memory once (rows padded by 16 bytes: ldmatrix without
// bank conflicts) and each warp loops over tiles of 16 pairs on its own: f of its two rows (g, g + 8) in
// registers, h1's A fragments built per k-step in registers from f (the first layer has 2 inputs), z2 = h1 w2^T
// in float32 accumulators (16 x CP per warp), then h2 = relu(z2 + b2) and the O outputs reduced over the quad.
// Roundings: HALF16 as fwd_kernel (h1 = hi + lo in the dtype, w2 in the dtype, float32 accumulation); TF32 as
// fwd_kernel (h1 and w2 rounded to tf32, cvt.rna as wmma::__float_to_tf32); X3 (float32 without TF32): 3xTF32,
// a = a_hi + a_lo and b = b_hi + b_lo split to tf32, z2 += a_lo b_hi + a_hi b_lo + a_hi b_hi (float32 to
// ~2^-21 per product).
constexpr int FW = 8, FTHREADS = FW * 32;

__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return r;
}
template <typename T> struct Mma16;
template <> struct Mma16<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // v0 (lower column) and v1 as hi + lo, each packed as the A fragment's register wants it
  static __device__ __forceinline__ void split(float v0, float v1, uint32_t &hi, uint32_t &lo) {
    __nv_bfloat162 h = __floats2bfloat162_rn(v0, v1);
    __nv_bfloat162 l = __floats2bfloat162_rn(v0 - __low2float(h), v1 - __high2float(h));
    hi = *reinterpret_cast<uint32_t *>(&h);
    lo = *reinterpret_cast<uint32_t *>(&l);
  }
};
template <> struct Mma16<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void split(float v0, float v1, uint32_t &hi, uint32_t &lo) {
    __half2 h = __floats2half2_rn(v0, v1);
    __half2 l = __floats2half2_rn(v0 - __low2float(h), v1 - __high2float(h));
    hi = *reinterpret_cast<uint32_t *>(&h);
    lo = *reinterpret_cast<uint32_t *>(&l);
  }
};
__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int MODE, typename T> struct W2S { typedef float type; };
template <typename T> struct W2S<HALF16, T> { typedef T type; };
template <int MODE, typename T> __host__ __device__ constexpr int w2_pitch(int CP) {
  return CP + 16 / (int)sizeof(typename W2S<MODE, T>::type);
}
template <int MODE, typename T> static size_t mma_fwd_smem(int CP, int O) {
  return (MODE == X3 ? 2 : 1) * (size_t)CP * w2_pitch<MODE, T>(CP) * sizeof(typename W2S<MODE, T>::type) +
         (4 * (size_t)CP + (size_t)O * CP + O) * 4;
}
// x = hi + lo, both tf32
__device__ __forceinline__ void split_tf32(float x, uint32_t &hi, uint32_t &lo) {
  hi = to_tf32(x);
  lo = to_tf32(x - __uint_as_float(hi));
}

// Shared by mma_fwd_kernel and mma_bwd_kernel (the backward's recompute must give the forward's relu masks).
// h1 = relu(w1 f + b1) of k-step kk as the A fragments of the lane's rows gq (r = 0) and gq + 8 (r = 1), from f
// (f0 = x, f1 = y of the two rows): 16-bit hi + lo, columns kk*16 + 2tq + 8h (+1) (m16n8k16); tf32 hi (X3: + lo),
// columns kk*8 + tq + 4h (m16n8k8); fragment register 2h + r. h1row (backward, else nullptr): the lane's row gq of
// h1s (pitch ldh), which gets h1 (16-bit: the hi part, the value the gw2 product uses; float32: the value).
template <typename T, int MODE>
__device__ __forceinline__ void h1_frag(int kk, int tq, const float (&f0)[2], const float (&f1)[2], const float *w1x,
                                        const float *w1y, const float *b1, uint32_t (&ahi)[4], uint32_t (&alo)[4],
                                        typename W2S<MODE, T>::type *h1row, int ldh) {
  if constexpr (MODE == HALF16) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int c = kk * 16 + 2 * tq + 8 * h;
      const float2 wx = *(const float2 *)(w1x + c), wy = *(const float2 *)(w1y + c), bb = *(const float2 *)(b1 + c);
#pragma unroll
      for (int r = 0; r < 2; r++) {
        float v0 = fmaf(wx.x, f0[r], fmaf(wy.x, f1[r], bb.x)), v1 = fmaf(wx.y, f0[r], fmaf(wy.y, f1[r], bb.y));
        v0 = v0 > 0.f ? v0 : 0.f;
        v1 = v1 > 0.f ? v1 : 0.f;
        Mma16<T>::split(v0, v1, ahi[2 * h + r], alo[2 * h + r]);
        if (h1row) *(uint32_t *)(h1row + 8 * r * ldh + c) = ahi[2 * h + r];
      }
    }
  } else {
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int c = kk * 8 + tq + 4 * h;
      const float wx = w1x[c], wy = w1y[c], bb = b1[c];
#pragma unroll
      for (int r = 0; r < 2; r++) {
        float v = fmaf(wx, f0[r], fmaf(wy, f1[r], bb));
        v = v > 0.f ? v : 0.f;
        ahi[2 * h + r] = to_tf32(v);
        if constexpr (MODE == X3) alo[2 * h + r] = to_tf32(v - __uint_as_float(ahi[2 * h + r]));
        if (h1row) h1row[8 * r * ldh + c] = v;
      }
    }
  }
}

// z2 += h1 w2^T over k-step kk for the NTC n-tiles from n-tile nb (even): acc[i] is n-tile nb + i. w2's B fragments
// by ldmatrix.x4 at bbase (the lane's row (lane & 7) + ((lane >> 4) << 3), column half (lane >> 3) & 1): b0, b1 of
// an n-tile pair's first tile, b2, b3 of its second. 16-bit: hi then lo per n-tile; TF32: one product; X3: w2 =
// hi + lo, its lo parts in shared memory lo_off bytes on (LOS) or split here, c += a_lo b_hi + a_hi b_lo + a_hi b_hi.
template <typename T, int MODE, int LD, int NTC, bool LOS>
__device__ __forceinline__ void z2_step(float (&acc)[NTC][4], int nb, int kk, const uint32_t (&ahi)[4],
                                        const uint32_t (&alo)[4], uint32_t bbase, uint32_t lo_off) {
  typedef typename W2S<MODE, T>::type TS;
  constexpr int KS = MODE == HALF16 ? 16 : 8;
#pragma unroll
  for (int np = 0; np < NTC / 2; np++) {
    uint32_t b[4];
    const uint32_t addr = bbase + (uint32_t)(((nb + 2 * np) * 8 * LD + kk * KS) * sizeof(TS));
    ldsm4(b, addr);
    if constexpr (MODE == HALF16) {
      Mma16<T>::run(acc[2 * np], ahi, b[0], b[1]);
      Mma16<T>::run(acc[2 * np], alo, b[0], b[1]);
      Mma16<T>::run(acc[2 * np + 1], ahi, b[2], b[3]);
      Mma16<T>::run(acc[2 * np + 1], alo, b[2], b[3]);
    } else if constexpr (MODE == TF32) {
      mma_tf32(acc[2 * np], ahi, b[0], b[1]);
      mma_tf32(acc[2 * np + 1], ahi, b[2], b[3]);
    } else {
      uint32_t bh[4], bl[4];
      if constexpr (LOS) {
        ldsm4(bl, addr + lo_off);
#pragma unroll
        for (int q = 0; q < 4; q++) bh[q] = b[q];
      } else {
#pragma unroll
        for (int q = 0; q < 4; q++) split_tf32(__uint_as_float(b[q]), bh[q], bl[q]);
      }
      mma_tf32(acc[2 * np], alo, bh[0], bh[1]);
      mma_tf32(acc[2 * np], ahi, bl[0], bl[1]);
      mma_tf32(acc[2 * np], ahi, bh[0], bh[1]);
      mma_tf32(acc[2 * np + 1], alo, bh[2], bh[3]);
      mma_tf32(acc[2 * np + 1], ahi, bl[2], bl[3]);
      mma_tf32(acc[2 * np + 1], ahi, bh[2], bh[3]);
    }
  }
}

// f and df = d f / d d of the lane's rows gq, gq + 8 of the warp's 16 pairs from u0 (0 past the end)
__device__ __forceinline__ void pair_features(const float *qpos, const float *kp, int64_t u0, int gq, int64_t NM,
                                              int64_t M, float (&f0)[2], float (&f1)[2], float (&d0)[2], float (&d1)[2]) {
#pragma unroll
  for (int r = 0; r < 2; r++) {
    const int64_t u = u0 + gq + 8 * r;
    f0[r] = f1[r] = d0[r] = d1[r] = 0.f;
    if (u < NM) {
      const int64_t i = u / M, j = u % M;
      feature(qpos[2 * i], kp[2 * j], f0[r], d0[r]);
      feature(qpos[2 * i + 1], kp[2 * j + 1], f1[r], d1[r]);
    }
  }
}

template <typename T, int MODE, int CP>
__global__ void __launch_bounds__(FTHREADS) mma_fwd_kernel(const fa_cpb_geom g, W w, float *out, const float *qpos,
                                                           const float *kpos) {
  typedef typename W2S<MODE, T>::type TS;
  constexpr int KS = MODE == HALF16 ? 16 : 8, LD = w2_pitch<MODE, T>(CP), NT = CP / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  TS *w2s = (TS *)smem; // (CP x LD), then for X3 the lo parts (CP x LD)
  float *sm = (float *)(smem + (MODE == X3 ? 2 : 1) * (size_t)CP * LD * sizeof(TS));
  const int O = w.O, nsmall = 4 * CP + O * CP + O;
  for (int e = threadIdx.x; e < CP * CP; e += FTHREADS) {
    const int n = e / CP, k = e % CP;
    if constexpr (MODE == HALF16) {
      w2s[n * LD + k] = ((const T *)w.w2)[e];
    } else {
      const float v = ((const float *)w.w2)[e];
      const uint32_t hi = to_tf32(v);
      w2s[n * LD + k] = __uint_as_float(hi);
      if constexpr (MODE == X3) w2s[CP * LD + n * LD + k] = __uint_as_float(to_tf32(v - __uint_as_float(hi)));
    }
  }
  for (int e = threadIdx.x; e < nsmall; e += FTHREADS) sm[e] = w.w1x[e]; // w1x, w1y, b1, b2, w3, b3: contiguous
  __syncthreads();
  const float *w1x = sm, *w1y = sm + CP, *b1 = sm + 2 * CP, *b2 = sm + 3 * CP, *w3 = sm + 4 * CP, *b3 = w3 + O * CP;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;
  const uint32_t bbase = smem_u32(w2s + ((lane & 7) + ((lane >> 4) << 3)) * LD + ((lane >> 3) & 1) * (KS / 2));
  const int64_t NM = g.N * g.M, M = g.M, tpp = (NM + 15) / 16, tiles = g.P * tpp;
  for (int64_t tile = (int64_t)blockIdx.x * FW + warp; tile < tiles; tile += (int64_t)gridDim.x * FW) {
    const int64_t p = tile / tpp, u0 = tile % tpp * 16;
    float f0[2], f1[2], d0[2], d1[2];
    pair_features(qpos, kpos + p * M * 2, u0, gq, NM, M, f0, f1, d0, d1);
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < CP / KS; kk++) {
      uint32_t ahi[4], alo[4];
      h1_frag<T, MODE>(kk, tq, f0, f1, w1x, w1y, b1, ahi, alo, nullptr, 0);
      z2_step<T, MODE, LD, NT, true>(acc, 0, kk, ahi, alo, bbase, (uint32_t)(CP * LD * sizeof(TS)));
    }
    // h2 = relu(z2 + b2) in place: acc[nt][0..1] row gq, acc[nt][2..3] row gq + 8, columns nt*8 + 2tq + (0, 1)
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
      const float2 bb = *(const float2 *)(b2 + nt * 8 + 2 * tq);
      acc[nt][0] = fmaxf(acc[nt][0] + bb.x, 0.f);
      acc[nt][1] = fmaxf(acc[nt][1] + bb.y, 0.f);
      acc[nt][2] = fmaxf(acc[nt][2] + bb.x, 0.f);
      acc[nt][3] = fmaxf(acc[nt][3] + bb.y, 0.f);
    }
    for (int o = 0; o < O; o++) {
      float s0 = 0.f, s1 = 0.f;
#pragma unroll
      for (int nt = 0; nt < NT; nt++) {
        const float2 ww = *(const float2 *)(w3 + o * CP + nt * 8 + 2 * tq);
        s0 = fmaf(ww.x, acc[nt][0], fmaf(ww.y, acc[nt][1], s0));
        s1 = fmaf(ww.x, acc[nt][2], fmaf(ww.y, acc[nt][3], s1));
      }
      s0 += __shfl_xor_sync(0xffffffffu, s0, 1);
      s1 += __shfl_xor_sync(0xffffffffu, s1, 1);
      s0 += __shfl_xor_sync(0xffffffffu, s0, 2);
      s1 += __shfl_xor_sync(0xffffffffu, s1, 2);
      if (tq == 0) {
        const int64_t u = u0 + gq;
        float *dst = out + (p * O + o) * NM;
        if (u < NM) dst[u] = s0 + b3[o];
        if (u + 8 < NM) dst[u + 8] = s1 + b3[o];
      }
    }
  }
}

// the CTA's partial: gw2 (CP x CP) first (32-byte aligned for WMMA), then gw1x, gw1y, gb1, gb2 (CP each), gw3
// (O x CP), gb3 (O); the slice length rounded up to 64 floats
__host__ __device__ inline int64_t part_len(int CP, int O) { return ((int64_t)CP * CP + 4 * (int64_t)CP + (int64_t)O * CP + O + 63) / 64 * 64; }

template <int MODE, typename TC> static size_t bwd_smem(int CP, int O) {
  return (1 + h_parts<MODE>()) * (size_t)TPB * pitch_h<TC>(CP) * sizeof(TC) + (size_t)TPB * pitch_z(CP) * 4 +
         ((size_t)TPB * (4 + O) + 4 * CP + (size_t)O * CP + O) * 4 + 128;
}

template <typename T, int MODE>
__global__ void __launch_bounds__(THREADS) bwd_kernel(const fa_cpb_geom g, W w, float *part, float *gd,
                                                      const float *grad_bias, const float *qpos, const float *kpos) {
  typedef typename Compute<MODE, T>::type TC;
  extern __shared__ __align__(128) unsigned char smem[];
  const int CP = w.CP, O = w.O, ldh = pitch_h<TC>(CP), ldz = pitch_z(CP);
  constexpr int NH = h_parts<MODE>();
  TC *h1 = (TC *)smem, *gz = h1 + (size_t)TPB * ldh, *h1lo = NH == 2 ? gz + (size_t)TPB * ldh : nullptr;
  float *z = (float *)(gz + NH * (size_t)TPB * ldh), *f = z + (size_t)TPB * ldz, *df = f + 2 * TPB, *gg = df + 2 * TPB;
  float *acc = gg + TPB * O; // gw1x, gw1y, gb1, gb2 (CP each), gw3 (O x CP), gb3 (O): as the partial after gw2
  const int nacc = 4 * CP + O * CP + O;
  float *mine = part + blockIdx.x * part_len(CP, O);
  for (int e = threadIdx.x; e < CP * CP; e += THREADS) mine[e] = 0.f;
  for (int e = threadIdx.x; e < nacc; e += THREADS) acc[e] = 0.f;
  float *gw1x = acc, *gw1y = acc + CP, *gb1 = acc + 2 * CP, *gb2 = acc + 3 * CP, *gw3 = acc + 4 * CP, *gb3 = gw3 + O * CP;
  __syncthreads();
  const int64_t NM = g.N * g.M, tpp = (NM + TPB - 1) / TPB, tiles = g.P * tpp;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t p = tile / tpp, u0 = tile % tpp * TPB;
    for (int e = threadIdx.x; e < TPB * O; e += THREADS) {
      int t = e % TPB, o = e / TPB;
      int64_t u = u0 + t;
      gg[t * O + o] = u < NM ? grad_bias[(p * O + o) * NM + u] : 0.f;
    }
    tile_h1<TC, TPB>(w, qpos, kpos + p * g.M * 2, u0, NM, g.M, f, df, h1, h1lo, ldh);
    // z2 as the forward's (the same parts, the same order): the same relu masks
    bgemm<MODE, TC, true, false>(TPB, CP, CP, h1, ldh, (const TC *)w.w2, CP, z, ldz, false, h1lo);
    __syncthreads();
    for (int e = threadIdx.x; e < TPB * CP; e += THREADS) {
      int t = e / CP, c = e % CP;
      z[t * ldz + c] = fmaxf(z[t * ldz + c] + w.b2[c], 0.f); // h2
    }
    __syncthreads();
    // gw3, gb3 (one thread per element), gz2 and gb2 (one thread per hidden unit)
    for (int e = threadIdx.x; e < O * CP + O; e += THREADS) {
      float s = 0.f;
      if (e < O * CP) {
        int o = e / CP, c = e % CP;
        for (int t = 0; t < TPB; t++) s = fmaf(gg[t * O + o], z[t * ldz + c], s);
        gw3[e] += s;
      } else {
        for (int t = 0; t < TPB; t++) s += gg[t * O + e - O * CP];
        gb3[e - O * CP] += s;
      }
    }
    for (int c = threadIdx.x; c < CP; c += THREADS) {
      float sb = 0.f;
      for (int t = 0; t < TPB; t++) {
        float s = 0.f;
        for (int o = 0; o < O; o++) s = fmaf(gg[t * O + o], w.w3[o * CP + c], s);
        s = z[t * ldz + c] > 0.f ? s : 0.f;
        gz[t * ldh + c] = fa_from_f<TC>(s);
        sb += s;
      }
      gb2[c] += sb;
    }
    __syncthreads();
    // gw2 += gz2^T h1 (the CTA's partial, global); gh1 = gz2 w2 (into z). gz2 and h1 rounded to 16 bits here
    // (hi only) err by 2^-9 / 2^-12 relative per term, with nothing discontinuous after them
    bgemm<MODE, TC, false, true>(CP, CP, TPB, gz, ldh, h1, ldh, mine, CP, true);
    bgemm<MODE, TC, true, true>(TPB, CP, CP, gz, ldh, (const TC *)w.w2, CP, z, ldz, false);
    __syncthreads();
    // gz1 = gh1 [h1 > 0] (h1 recomputed in float32: the mask of the forward's float32 pre-activation)
    for (int c = threadIdx.x; c < CP; c += THREADS) {
      float a0 = 0.f, a1 = 0.f, ab = 0.f;
      for (int t = 0; t < TPB; t++) {
        float pre = fmaf(w.w1x[c], f[2 * t], fmaf(w.w1y[c], f[2 * t + 1], w.b1[c]));
        float s = pre > 0.f ? z[t * ldz + c] : 0.f;
        ab += s;
        a0 = fmaf(s, f[2 * t], a0);
        a1 = fmaf(s, f[2 * t + 1], a1);
      }
      gb1[c] += ab;
      gw1x[c] += a0;
      gw1y[c] += a1;
    }
    for (int t = threadIdx.x; t < TPB; t += THREADS) {
      float s0 = 0.f, s1 = 0.f;
      for (int c = 0; c < w.C; c++) {
        float pre = fmaf(w.w1x[c], f[2 * t], fmaf(w.w1y[c], f[2 * t + 1], w.b1[c]));
        float s = pre > 0.f ? z[t * ldz + c] : 0.f;
        s0 = fmaf(s, w.w1x[c], s0);
        s1 = fmaf(s, w.w1y[c], s1);
      }
      int64_t u = u0 + t;
      if (u < NM) {
        gd[(p * NM + u) * 2] = s0 * df[2 * t];
        gd[(p * NM + u) * 2 + 1] = s1 * df[2 * t + 1];
      }
    }
    __syncthreads();
  }
  for (int e = threadIdx.x; e < nacc; e += THREADS) mine[(int64_t)CP * CP + e] = acc[e];
}

// grad weights = the CTAs' partials summed in CTA order
template <typename T>
__global__ void reduce_w_kernel(const float *part, int ncta, int C, int CP, int O, T *gw1, T *gb1, T *gw2, T *gb2,
                                T *gw3, T *gb3) {
  const int64_t L = part_len(CP, O), n = (int64_t)CP * CP + 4 * (int64_t)CP + (int64_t)O * CP + O;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    float s = 0.f;
    for (int b = 0; b < ncta; b++) s += part[b * L + e];
    T v = fa_from_f<T>(s);
    if (e < (int64_t)CP * CP) {
      int64_t a = e / CP, b = e % CP;
      if (gw2 && a < C && b < C) gw2[a * C + b] = v;
      continue;
    }
    int64_t r = e - (int64_t)CP * CP, k = r / CP, c = r % CP;
    if (k < 4) {
      if (c >= C) continue;
      if (k == 0 && gw1) gw1[2 * c] = v;
      if (k == 1 && gw1) gw1[2 * c + 1] = v;
      if (k == 2 && gb1) gb1[c] = v;
      if (k == 3 && gb2) gb2[c] = v;
    } else if (r < 4 * (int64_t)CP + (int64_t)O * CP) {
      int64_t o = (r - 4 * CP) / CP, cc = (r - 4 * CP) % CP;
      if (gw3 && cc < C) gw3[o * C + cc] = v;
    } else if (gb3) {
      gb3[r - 4 * (int64_t)CP - (int64_t)O * CP] = v;
    }
  }
}

// grad_kpos[p, j] = -sum_i gd[p, i*M + j]. A CTA per 32 consecutive outputs e = p*2M + 2j + axis: its KR rows of
// threads sum the queries i = r, r + KR, ... in order, then row 0 adds the KR partial sums in row order (a fixed
// order: deterministic). One thread per output (the kernel before) left the GPU idle: 4096 threads at the README
// size, each summing 4096 values.
constexpr int KR = 32;
__global__ void __launch_bounds__(32 * KR) reduce_k_kernel(const float *gd, float *gk, int64_t P, int64_t N, int64_t M) {
  __shared__ float ps[KR][33];
  const int64_t n = P * M * 2;
  for (int64_t e0 = blockIdx.x * (int64_t)32; e0 < n; e0 += (int64_t)gridDim.x * 32) { // uniform over the CTA
    const int64_t e = e0 + threadIdx.x;
    float s = 0.f;
    if (e < n) {
      const int64_t p = e / (2 * M), jk = e % (2 * M);
      const float *src = gd + p * N * M * 2 + jk;
      for (int64_t i = threadIdx.y; i < N; i += KR) s += src[i * M * 2];
    }
    ps[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && e < n) {
      float t = 0.f;
      for (int r = 0; r < KR; r++) t += ps[r][threadIdx.x];
      gk[e] = 0.f - t;
    }
    __syncthreads();
  }
}

// ---- the mma.sync backward (CP = 16, 32, 64 or 128, O <= BOMAX; else bwd_kernel). A CTA of BW warps (16; 8
// where 16 warps' shared memory does not fit: C 128 in float32 or with O > 2) stages w2 once and loops over tiles
// of BW*16 pairs of one p, 16 per warp. Per warp: the recompute of z2 (h1_frag and z2_step, as mma_fwd_kernel:
// the same masks), h2, gz2 = (g w3) [h2 > 0] (16 warps at C 128: in two column halves, 32 accumulators each, h1's
// fragments recomputed per half, so that the kernel fits 128 registers), gh1 = gz2 w2 (16-bit: A by ldmatrix from
// the warp's rounded gz2 rows in shared memory; float32: from z2's accumulators; w2 by ldmatrix.trans or scalar
// loads), gz1 = gh1 [pre1 > 0], gd. The sums over pairs of one column (gw3, gb2, gw1, gb1) go through a butterfly
// over the 8 lane groups (a fixed order) into the warp's own accumulators in shared memory. Then, after a barrier,
// gw2 += gz2^T h1 over the CTA's pairs (gz2 and h1's hi part staged in shared memory by every warp): warp w owns a
// stripe of gw2's rows (and a part of its columns) in registers for the whole kernel. Roundings as bwd_kernel: gz2
// and h1 (hi) rounded to the dtype in the gw2 and gh1 products, float32 accumulation. At the end the CTA's partial
// (part_len layout) is written: gw2 from the registers, the rest summed over the warps in warp order;
// reduce_w_kernel does the rest.
constexpr int BOMAX = 8;

__device__ __forceinline__ void ldsm4t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm2t(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
template <typename T> __device__ __forceinline__ uint32_t pack16(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack16<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&h);
}
template <> __device__ __forceinline__ uint32_t pack16<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&h);
}

// v[i] (i < V, V >= 8 a power of two): one lane's values of V columns; summed over the 8 lane groups gq (xor 16,
// 8, 4), each step keeping half (the lane with the mask's bit set keeps the upper half). On return v[i], i < V/8,
// holds the sum of index (V/8)*gq + i.
template <int V, int H, int MASK> __device__ __forceinline__ void group_step(float (&v)[V], int lane) {
  const bool b = (lane & MASK) != 0;
#pragma unroll
  for (int i = 0; i < H; i++) {
    const float send = b ? v[i] : v[i + H], keep = b ? v[i + H] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, MASK);
  }
}
template <int V> __device__ __forceinline__ void group_sum(float (&v)[V], int lane) {
  group_step<V, V / 2, 16>(v, lane);
  group_step<V, V / 4, 8>(v, lane);
  group_step<V, V / 8, 4>(v, lane);
}
// adds the group sums of v (value index i < NV of the lane: column cbase + (i >> 1) * 8 + 2 tq + (i & 1); the rest
// padding) into dst
template <int V, int NV>
__device__ __forceinline__ void add_columns(float (&v)[V], float *dst, int cbase, int CP, int lane) {
  group_sum<V>(v, lane);
  const int base = (V / 8) * (lane >> 2), tq = lane & 3;
#pragma unroll
  for (int i = 0; i < V / 8; i++) {
    const int idx = base + i, c = cbase + (idx >> 1) * 8 + 2 * tq + (idx & 1);
    if (idx < NV && c < CP) dst[c] += v[i];
  }
}
// add_columns of the accumulators' two rows per column: a[nt][e] * r0 + a[nt][2 + e] * r1 (WEIGHTED), else their sum
template <bool WEIGHTED, int V, int NT>
__device__ __forceinline__ void add_row_pairs(const float (&a)[NT][4], float r0, float r1, float *dst, int cbase,
                                              int CP, int lane) {
  float v[V];
#pragma unroll
  for (int i = 0; i < V; i++) v[i] = 0.f;
#pragma unroll
  for (int nt = 0; nt < NT; nt++)
#pragma unroll
    for (int e = 0; e < 2; e++)
      v[2 * nt + e] = WEIGHTED ? fmaf(a[nt][2 + e], r1, a[nt][e] * r0) : a[nt][e] + a[nt][2 + e];
  add_columns<V, 2 * NT>(v, dst, cbase, CP, lane);
}

// w2 (CP x w2_pitch), h1 and gz2 of the CTA's pairs (BW*16 x (CP + 8) each, in the dtype or float32), then
// 16-bit: the small weights, the warps' accumulators, the warps' grad_bias rows; float32: the warps' accumulators
template <int MODE, typename T, int BW> static size_t mma_bwd_smem(int CP, int O) {
  const size_t es = sizeof(typename W2S<MODE, T>::type), nacc = 4 * (size_t)CP + (size_t)O * CP + O;
  return (size_t)CP * w2_pitch<MODE, T>(CP) * es + 2 * (size_t)BW * 16 * (CP + 8) * es +
         (MODE == HALF16 ? nacc * 4 * (1 + BW) + (size_t)BW * 16 * O * 4 : nacc * 4 * BW);
}
template <typename T, int MODE, int CP, int BW>
__global__ void __launch_bounds__(BW * 32, 1) mma_bwd_kernel(const fa_cpb_geom g, W w, float *part, float *gd,
                                                             const float *grad_bias, const float *qpos,
                                                             const float *kpos) {
  typedef typename W2S<MODE, T>::type TS; // w2, h1s, gzs: the dtype (HALF16) or float32 (TF32: w2 tf32-rounded)
  constexpr bool H16 = MODE == HALF16;
  constexpr int NTH = BW * 32, LD = w2_pitch<MODE, T>(CP), LH = CP + 8, NT = CP / 8, KT = CP / 16, TP = BW * 16;
  // gw2's stripes: WS of 16 rows; NP parts of its columns (GNT n-tiles each); warps past WS * NP idle there
  constexpr int WS = KT, NP = (BW / WS < NT ? BW / WS : NT), GNT = NT / NP;
  // z2 in ZC chunks of NTC n-tiles (16 warps at C 128: 128 registers; h1's fragments recomputed per chunk), gh1
  // in chunks of HNT n-tiles; the butterflies' vector lengths
  constexpr int ZC = H16 && BW == 16 && NT == 16 ? 2 : 1, NTC = NT / ZC, HNT = NT < 4 ? NT : 4,
                HV = 2 * HNT < 8 ? 8 : 2 * HNT, ZV = 2 * NTC < 8 ? 8 : 2 * NTC;
  static_assert(H16 || ZC == 1, "float32: gh1's A fragments come from z2's accumulators");
  extern __shared__ __align__(128) unsigned char smem[];
  TS *w2s = (TS *)smem, *h1s = w2s + CP * LD, *gzs = h1s + TP * LH;
  float *sm = (float *)(gzs + TP * LH);
  const int O = w.O, nacc = 4 * CP + O * CP + O;
  // 16-bit: the small weights, the warps' accumulators and grad_bias rows in shared memory. float32 (its shared
  // memory is tight at C 128): the small weights read from global memory (L1), the warp's grad_bias rows in the
  // padding columns of its gzs rows (8 floats x 16 rows >= 16 O; never read as gz2)
  float *accw = H16 ? sm + nacc : sm;
  const float *smw = H16 ? sm : w.w1x;
  for (int e = threadIdx.x; e < CP * CP; e += NTH) {
    if constexpr (MODE == HALF16) w2s[e / CP * LD + e % CP] = ((const T *)w.w2)[e];
    else if constexpr (MODE == TF32) w2s[e / CP * LD + e % CP] = __uint_as_float(to_tf32(((const float *)w.w2)[e]));
    else w2s[e / CP * LD + e % CP] = ((const float *)w.w2)[e]; // X3: split where read
  }
  if (H16)
    for (int e = threadIdx.x; e < nacc; e += NTH) sm[e] = w.w1x[e]; // w1x, w1y, b1, b2, w3, b3
  for (int e = threadIdx.x; e < BW * nacc; e += NTH) accw[e] = 0.f;
  __syncthreads();
  const float *w1x = smw, *w1y = smw + CP, *b1 = smw + 2 * CP, *b2 = smw + 3 * CP, *w3 = smw + 4 * CP;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;
  // this warp's accumulators (the partial's layout after gw2) and grad_bias rows
  float *aw = accw + warp * nacc, *gw1xa = aw, *gw1ya = aw + CP, *gb1a = aw + 2 * CP, *gb2a = aw + 3 * CP,
        *gw3a = aw + 4 * CP, *gb3a = gw3a + O * CP, *ggw = accw + BW * nacc + warp * 16 * O;
  auto gg = [&](int e) -> float & { // grad_bias of the warp's row e / O, output e % O
    if constexpr (H16) return ggw[e];
    else return ((float *)gzs)[(warp * 16 + (e >> 3)) * LH + CP + (e & 7)];
  };
  constexpr int KS = H16 ? 16 : 8;
  const uint32_t bbase = smem_u32(w2s + ((lane & 7) + ((lane >> 4) << 3)) * LD + ((lane >> 3) & 1) * (KS / 2));
  // ldmatrix.trans lane offsets: B of gh1 (rows k of w2, columns n), B of gw2 (rows = pairs of h1s, columns n):
  // matrix q = lane / 8 at row (lane & 7) + (q & 1) * 8, column (q >> 1) * 8; A of gw2 from gzs (rows = pairs, columns
  // = m): row (lane & 7) + (q >> 1) * 8, column (q & 1) * 8. A of gh1 (16-bit) from the warp's gzs rows by ldmatrix
  // (no .trans): row lane & 15, column (lane >> 4) * 8 (a0..a3 = rows 0-7 / 8-15 x k 0-7, then k 8-15)
  const int tr_r = (lane & 7) + ((lane >> 3) & 1) * 8, tr_c = (lane >> 4) * 8;
  const uint32_t w2t = smem_u32(w2s + tr_r * LD + tr_c);
  const uint32_t gha = smem_u32(gzs + (warp * 16 + (lane & 15)) * LH + (lane >> 4) * 8);
  const int stripe = warp % WS, npart = warp / WS;
  const bool gw2_mine = warp < WS * NP;
  const uint32_t gza = smem_u32(gzs + ((lane & 7) + (lane >> 4) * 8) * LH + stripe * 16 + ((lane >> 3) & 1) * 8);
  const uint32_t h1b = smem_u32(h1s + tr_r * LH + npart * GNT * 8 + tr_c);
  TS *const h1row = h1s + (warp * 16 + gq) * LH;
  float gw2[GNT][4];
#pragma unroll
  for (int n = 0; n < GNT; n++) gw2[n][0] = gw2[n][1] = gw2[n][2] = gw2[n][3] = 0.f;

  const int64_t NM = g.N * g.M, M = g.M, tpp = (NM + TP - 1) / TP, tiles = g.P * tpp;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t p = tile / tpp, u0 = tile % tpp * TP + warp * 16;
    // grad_bias's loads issued before the positions' (their latencies overlap), stored after the features
    constexpr int GL = (16 * BOMAX + 31) / 32;
    float gv[GL];
#pragma unroll
    for (int k = 0; k < GL; k++) {
      const int e = lane + 32 * k, t = e % 16, o = e / 16;
      gv[k] = e < 16 * O && u0 + t < NM ? grad_bias[(p * O + o) * NM + u0 + t] : 0.f;
    }
    float f0[2], f1[2], d0[2], d1[2];
    pair_features(qpos, kpos + p * M * 2, u0, gq, NM, M, f0, f1, d0, d1);
    __syncwarp();
#pragma unroll
    for (int k = 0; k < GL; k++) {
      const int e = lane + 32 * k, t = e % 16, o = e / 16;
      if (e < 16 * O) gg(t * O + o) = gv[k];
    }
    __syncwarp();
    // per chunk of z2's columns: z2 as mma_fwd_kernel (the same products in the same order per element: the same
    // masks; h1 into h1s with the first chunk), h2, gw3 and gb3, gz2 = (g w3) [h2 > 0], gb2, gz2 into gzs
    // (16-bit: rounded; it is the A operand of gh1 and gw2)
    float acc[NTC][4];
#pragma unroll 1 // rolled: the ncu profile of the old kernel showed 55% of stalls on instruction fetch
    for (int zc = 0; zc < ZC; zc++) {
      const int nb = zc * NTC, cb = nb * 8;
#pragma unroll
      for (int nt = 0; nt < NTC; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll 2 // (instruction cache)
      for (int kk = 0; kk < CP / KS; kk++) {
        uint32_t ahi[4], alo[4];
        h1_frag<T, MODE>(kk, tq, f0, f1, w1x, w1y, b1, ahi, alo, zc == 0 ? h1row : nullptr, LH);
        z2_step<T, MODE, LD, NTC, false>(acc, nb, kk, ahi, alo, bbase, 0);
      }
#pragma unroll
      for (int nt = 0; nt < NTC; nt++) {
        const float2 bb = *(const float2 *)(b2 + cb + nt * 8 + 2 * tq);
        acc[nt][0] = fmaxf(acc[nt][0] + bb.x, 0.f);
        acc[nt][1] = fmaxf(acc[nt][1] + bb.y, 0.f);
        acc[nt][2] = fmaxf(acc[nt][2] + bb.x, 0.f);
        acc[nt][3] = fmaxf(acc[nt][3] + bb.y, 0.f);
      }
      for (int o = 0; o < O; o++) {
        add_row_pairs<true, ZV>(acc, gg(gq * O + o), gg((gq + 8) * O + o), gw3a + o * CP, cb, CP, lane);
        if (zc == 0 && lane == 0) {
          float s = 0.f;
          for (int t = 0; t < 16; t++) s += gg(t * O + o);
          gb3a[o] += s;
        }
      }
      if (O == 1) { // (the layer's usual case: g hoisted, w3 by pairs; fmaf(., ., 0) as the loop's first step)
        const float g0 = gg(gq), g1 = gg(gq + 8);
#pragma unroll
        for (int nt = 0; nt < NTC; nt++) {
          const float2 ww = *(const float2 *)(w3 + cb + nt * 8 + 2 * tq);
          acc[nt][0] = acc[nt][0] > 0.f ? fmaf(g0, ww.x, 0.f) : 0.f;
          acc[nt][1] = acc[nt][1] > 0.f ? fmaf(g0, ww.y, 0.f) : 0.f;
          acc[nt][2] = acc[nt][2] > 0.f ? fmaf(g1, ww.x, 0.f) : 0.f;
          acc[nt][3] = acc[nt][3] > 0.f ? fmaf(g1, ww.y, 0.f) : 0.f;
        }
      } else {
#pragma unroll
        for (int nt = 0; nt < NTC; nt++) {
#pragma unroll
          for (int e = 0; e < 4; e++) {
            const int c = cb + nt * 8 + 2 * tq + (e & 1), t = gq + (e >> 1) * 8;
            float s = 0.f;
#pragma unroll 1
            for (int o = 0; o < O; o++) s = fmaf(gg(t * O + o), w3[o * CP + c], s);
            acc[nt][e] = acc[nt][e] > 0.f ? s : 0.f;
          }
        }
      }
      add_row_pairs<false, ZV>(acc, 0.f, 0.f, gb2a, cb, CP, lane);
      if constexpr (H16) {
        // n-tiles 2jj, 2jj + 1 of the chunk = k-step j of gh1: row gq / gq + 8, columns j*16 + 8h + 2tq (+1)
#pragma unroll
        for (int jj = 0; jj < NTC / 2; jj++) {
#pragma unroll
          for (int h = 0; h < 2; h++) {
            uint32_t *row = (uint32_t *)(gzs + (warp * 16 + gq) * LH + cb + jj * 16 + h * 8 + 2 * tq);
            row[0] = pack16<T>(acc[2 * jj + h][0], acc[2 * jj + h][1]);
            row[4 * LH] = pack16<T>(acc[2 * jj + h][2], acc[2 * jj + h][3]); // 8 rows down (LH / 2 words per row)
          }
        }
      } else {
#pragma unroll
        for (int nt = 0; nt < NTC; nt++) {
          float *row = gzs + (warp * 16 + gq) * LH + cb + nt * 8 + 2 * tq;
          *(float2 *)row = make_float2(acc[nt][0], acc[nt][1]);
          *(float2 *)(row + 8 * LH) = make_float2(acc[nt][2], acc[nt][3]);
        }
      }
    }
    __syncwarp(); // the warp's gzs rows: read back by ldmatrix (16-bit gh1) in other lanes
    // gh1 = gz2 w2 in chunks of HNT n-tiles; gz1 = gh1 [pre1 > 0]; gw1, gb1 column sums; gd
    float s0[2] = {0.f, 0.f}, s1[2] = {0.f, 0.f};
#pragma unroll 1 // rolled (instruction cache)
    for (int ch = 0; ch < NT / HNT; ch++) {
      const int hb = ch * HNT * 8;
      float hacc[HNT][4];
#pragma unroll
      for (int nt = 0; nt < HNT; nt++) hacc[nt][0] = hacc[nt][1] = hacc[nt][2] = hacc[nt][3] = 0.f;
      if constexpr (H16) {
#pragma unroll
        for (int j = 0; j < KT; j++) {
          uint32_t a[4];
          ldsm4(a, gha + (uint32_t)(j * 16 * sizeof(TS)));
#pragma unroll
          for (int np = 0; np < HNT / 2; np++) {
            uint32_t b[4];
            ldsm4t(b, w2t + (uint32_t)((j * 16 * LD + hb + np * 16) * sizeof(TS)));
            Mma16<T>::run(hacc[2 * np], a, b[0], b[1]);
            Mma16<T>::run(hacc[2 * np + 1], a, b[2], b[3]);
          }
        }
      } else {
        // k-step = gz2's n-tile kt, its k order permuted to the accumulators' (k = t <-> column 2t, t + 4 <-> 2t + 1),
        // so A comes from the accumulators as they are and B rows 2t, 2t + 1 of the n-tile (w2 row = k)
#pragma unroll
        for (int kt = 0; kt < NT; kt++) {
          uint32_t ah[4], al[4];
          const float av[4] = {acc[kt][0], acc[kt][2], acc[kt][1], acc[kt][3]};
#pragma unroll
          for (int q = 0; q < 4; q++) {
            if constexpr (MODE == X3) split_tf32(av[q], ah[q], al[q]);
            else ah[q] = to_tf32(av[q]);
          }
          const TS *brow = w2s + (kt * 8 + 2 * tq) * LD + hb + gq;
#pragma unroll
          for (int nt = 0; nt < HNT; nt++) {
            const float x0 = brow[nt * 8], x1 = brow[LD + nt * 8];
            if constexpr (MODE == X3) {
              uint32_t h0, l0, h1, l1;
              split_tf32(x0, h0, l0);
              split_tf32(x1, h1, l1);
              mma_tf32(hacc[nt], al, h0, h1);
              mma_tf32(hacc[nt], ah, l0, l1);
              mma_tf32(hacc[nt], ah, h0, h1);
            } else {
              mma_tf32(hacc[nt], ah, __float_as_uint(x0), __float_as_uint(x1));
            }
          }
        }
      }
      // gz1 in place (masked by the float32 pre-activation); the lane's columns hb + nt*8 + 2tq + e
#pragma unroll
      for (int nt = 0; nt < HNT; nt++) {
        const int c = hb + nt * 8 + 2 * tq;
        const float2 wx = *(const float2 *)(w1x + c), wy = *(const float2 *)(w1y + c), bb = *(const float2 *)(b1 + c);
        const float wxe[2] = {wx.x, wx.y}, wye[2] = {wy.x, wy.y}, be[2] = {bb.x, bb.y};
#pragma unroll
        for (int e = 0; e < 2; e++)
#pragma unroll
          for (int r = 0; r < 2; r++) {
            const float pre = fmaf(wxe[e], f0[r], fmaf(wye[e], f1[r], be[e]));
            const float z = pre > 0.f ? hacc[nt][2 * r + e] : 0.f;
            hacc[nt][2 * r + e] = z;
            s0[r] = fmaf(z, wxe[e], s0[r]);
            s1[r] = fmaf(z, wye[e], s1[r]);
          }
      }
      add_row_pairs<false, HV>(hacc, 0.f, 0.f, gb1a, hb, CP, lane);
      add_row_pairs<true, HV>(hacc, f0[0], f0[1], gw1xa, hb, CP, lane);
      add_row_pairs<true, HV>(hacc, f1[0], f1[1], gw1ya, hb, CP, lane);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
      s0[r] += __shfl_xor_sync(0xffffffffu, s0[r], 1);
      s1[r] += __shfl_xor_sync(0xffffffffu, s1[r], 1);
      s0[r] += __shfl_xor_sync(0xffffffffu, s0[r], 2);
      s1[r] += __shfl_xor_sync(0xffffffffu, s1[r], 2);
      const int64_t u = u0 + gq + 8 * r;
      if (tq == 0 && u < NM) {
        gd[(p * NM + u) * 2] = s0[r] * d0[r];
        gd[(p * NM + u) * 2 + 1] = s1[r] * d1[r];
      }
    }
    // gw2 += gz2^T h1 over the CTA's TP pairs: this warp's stripe of rows, its part of the columns
    __syncthreads();
    if (gw2_mine) {
      if constexpr (H16) {
#pragma unroll
        for (int kp = 0; kp < TP / 16; kp++) {
          uint32_t a[4];
          ldsm4t(a, gza + (uint32_t)(kp * 16 * LH * sizeof(TS)));
          if constexpr (GNT == 1) {
            uint32_t b[2];
            ldsm2t(b, h1b + (uint32_t)(kp * 16 * LH * sizeof(TS)));
            Mma16<T>::run(gw2[0], a, b[0], b[1]);
          } else {
#pragma unroll
            for (int np = 0; np < GNT / 2; np++) {
              uint32_t b[4];
              ldsm4t(b, h1b + (uint32_t)((kp * 16 * LH + np * 16) * sizeof(TS)));
              Mma16<T>::run(gw2[2 * np], a, b[0], b[1]);
              Mma16<T>::run(gw2[2 * np + 1], a, b[2], b[3]);
            }
          }
        }
      } else {
        // A(m = c2, k = pair) = gzs[pair][c2], B(k = pair, n = c1) = h1s[pair][c1]; k-steps of 8 pairs
#pragma unroll 2
        for (int kp = 0; kp < TP / 8; kp++) {
          const float *ar = gzs + (kp * 8 + tq) * LH + stripe * 16 + gq;
          const float av[4] = {ar[0], ar[8], ar[4 * LH], ar[4 * LH + 8]};
          uint32_t ah[4], al[4];
#pragma unroll
          for (int q = 0; q < 4; q++) {
            if constexpr (MODE == X3) split_tf32(av[q], ah[q], al[q]);
            else ah[q] = to_tf32(av[q]);
          }
          const float *br = h1s + (kp * 8 + tq) * LH + npart * GNT * 8 + gq;
#pragma unroll
          for (int n = 0; n < GNT; n++) {
            const float x0 = br[n * 8], x1 = br[4 * LH + n * 8];
            if constexpr (MODE == X3) {
              uint32_t h0, l0, h1, l1;
              split_tf32(x0, h0, l0);
              split_tf32(x1, h1, l1);
              mma_tf32(gw2[n], al, h0, h1);
              mma_tf32(gw2[n], ah, l0, l1);
              mma_tf32(gw2[n], ah, h0, h1);
            } else {
              mma_tf32(gw2[n], ah, to_tf32(x0), to_tf32(x1));
            }
          }
        }
      }
    }
    __syncthreads();
  }
  float *mine = part + blockIdx.x * part_len(CP, O);
  if (gw2_mine) {
#pragma unroll
    for (int n = 0; n < GNT; n++) {
      const int c1 = npart * GNT * 8 + n * 8 + 2 * tq, c2 = stripe * 16 + gq;
      mine[c2 * CP + c1] = gw2[n][0];
      mine[c2 * CP + c1 + 1] = gw2[n][1];
      mine[(c2 + 8) * CP + c1] = gw2[n][2];
      mine[(c2 + 8) * CP + c1 + 1] = gw2[n][3];
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < nacc; e += NTH) {
    float s = 0.f;
    for (int k = 0; k < BW; k++) s += accw[k * nacc + e];
    mine[(int64_t)CP * CP + e] = s;
  }
}

template <typename T> int mode_of(int tf32);
template <> int mode_of<float>(int tf32) { return tf32 ? TF32 : X3; }
template <> int mode_of<__nv_bfloat16>(int) { return HALF16; }
template <> int mode_of<__half>(int) { return HALF16; }

template <typename K> static int set_smem(K kernel, size_t bytes, int dev, int64_t C, const char *fn) {
  int optin = 0;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (bytes > (size_t)optin)
    return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'w1': %lld hidden units need %zu bytes of shared memory per block, the device allows %d",
                    fn, (long long)C, bytes, optin);
  return fa_cu_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes), fn);
}

// the padded weights in one temporary buffer: small floats, then w2 (CP x CP)
struct Prep {
  void *buf = nullptr;
  W w;
};
template <typename T, int MODE>
static int prepare(const fa_cpb_geom *g, const fa_cpb_in *in, Prep &pr, const char *fn, int cp = 0) {
  int dev = g->device;
  int CP = cp > 0 ? cp : (int)((g->C + 15) / 16 * 16), O = (int)g->O;
  if (CP == 0) CP = 16;
  int64_t nsmall = 4 * (int64_t)CP + (int64_t)O * CP + O, off = (nsmall * 4 + 255) / 256 * 256;
  size_t es = MODE == HALF16 ? sizeof(T) : 4;
  pr.buf = fa_cu_temp_alloc(dev, off + (int64_t)CP * CP * es);
  if (!pr.buf) return FA_ERR_MEMORY;
  float *small = (float *)pr.buf;
  void *w2p = (char *)pr.buf + off;
  int64_t n = nsmall + (int64_t)CP * CP;
  prep_kernel<T><<<fa_cu_blocks(n, 256, dev), 256, 0, fa_cu_stream(dev)>>>(
      small, w2p, (const T *)in->w1, (const T *)in->b1, (const T *)in->w2, (const T *)in->b2, (const T *)in->w3,
      (const T *)in->b3, (int)g->C, CP, O, MODE == HALF16);
  int rc = fa_cu_launch_check(fn);
  if (rc) return rc;
  pr.w.w1x = small;
  pr.w.w1y = small + CP;
  pr.w.b1 = small + 2 * CP;
  pr.w.b2 = small + 3 * CP;
  pr.w.w3 = small + 4 * CP;
  pr.w.b3 = small + 4 * CP + (int64_t)O * CP;
  pr.w.w2 = w2p;
  pr.w.C = (int)g->C;
  pr.w.CP = CP;
  pr.w.O = O;
  return 0;
}

static int check_limits(const fa_cpb_geom *g, const char *fn) {
  if (g->C > MAXC)
    return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'w1': expected at most %d hidden units (rows) on CUDA, got %lld", fn, MAXC,
                    (long long)g->C);
  if (g->O > 64)
    return fa_error(FA_ERR_UNSUPPORTED, "%s: argument 'w3': expected at most 64 outputs (rows) on CUDA, got %lld", fn,
                    (long long)g->O);
  return 0;
}

template <typename T, int MODE> static int forward_t(const fa_cpb_geom *g, float *out, const fa_cpb_in *in) {
  static const char *fn = "fa_cpb_forward";
  typedef typename Compute<MODE, T>::type TC;
  int dev = g->device, rc;
  Prep pr;
  if ((rc = prepare<T, MODE>(g, in, pr, fn))) return rc;
  size_t sm = fwd_smem<MODE, TC>(pr.w.CP);
  if (!(rc = set_smem(fwd_kernel<T, MODE>, sm, dev, g->C, fn))) {
    int64_t tiles = g->P * ((g->N * g->M + TPF - 1) / TPF);
    int64_t grid = (int64_t)fa_cu_sm_count(dev) * 4;
    if (grid > tiles) grid = tiles;
    fwd_kernel<T, MODE><<<(unsigned)grid, THREADS, sm, fa_cu_stream(dev)>>>(*g, pr.w, out, (const float *)in->qpos,
                                                                           (const float *)in->kpos);
    rc = fa_cu_launch_check(fn);
  }
  fa_cu_temp_free(dev, pr.buf);
  return rc;
}

template <typename T, int MODE>
static int backward_t(const fa_cpb_geom *g, const fa_cpb_grads *gr, const float *grad_bias, const fa_cpb_in *in) {
  static const char *fn = "fa_cpb_backward";
  typedef typename Compute<MODE, T>::type TC;
  int dev = g->device, rc;
  cudaStream_t st = fa_cu_stream(dev);
  Prep pr;
  if ((rc = prepare<T, MODE>(g, in, pr, fn))) return rc;
  const int CP = pr.w.CP, O = pr.w.O;
  int64_t NM = g->N * g->M, tiles = g->P * ((NM + TPB - 1) / TPB);
  int64_t grid = (int64_t)fa_cu_sm_count(dev) * 3; // fixed by the device: the partials' order is too
  if (grid > tiles) grid = tiles;
  if (grid < 1) grid = 1;
  float *part = (float *)fa_cu_temp_alloc(dev, grid * part_len(CP, O) * 4);
  float *gd = (float *)fa_cu_temp_alloc(dev, (g->P * NM * 2 > 0 ? g->P * NM * 2 : 1) * 4);
  size_t sm = bwd_smem<MODE, TC>(CP, O);
  if (!part || !gd) rc = FA_ERR_MEMORY;
  if (!rc) rc = set_smem(bwd_kernel<T, MODE>, sm, dev, g->C, fn);
  if (!rc) {
    bwd_kernel<T, MODE><<<(unsigned)grid, THREADS, sm, st>>>(*g, pr.w, part, gd, grad_bias, (const float *)in->qpos,
                                                             (const float *)in->kpos);
    rc = fa_cu_launch_check(fn);
  }
  if (!rc) {
    int64_t n = (int64_t)CP * CP + 4 * (int64_t)CP + (int64_t)O * CP + O;
    reduce_w_kernel<T><<<fa_cu_blocks(n, 256, dev), 256, 0, st>>>(part, (int)grid, (int)g->C, CP, O, (T *)gr->w1,
                                                                   (T *)gr->b1, (T *)gr->w2, (T *)gr->b2, (T *)gr->w3,
                                                                   (T *)gr->b3);
    rc = fa_cu_launch_check(fn);
  }
  if (!rc && gr->kpos && g->P * g->M > 0) {
    reduce_k_kernel<<<fa_cu_blocks(g->P * g->M * 2, 32, dev), dim3(32, KR), 0, st>>>(gd, (float *)gr->kpos, g->P,
                                                                                     g->N, g->M);
    rc = fa_cu_launch_check(fn);
  }
  fa_cu_temp_free(dev, gd);
  fa_cu_temp_free(dev, part);
  fa_cu_temp_free(dev, pr.buf);
  return rc;
}

// the mma.sync forward's padded width: the hidden units rounded up to 16, 32, 64 or 128; 0 = wider (fwd_kernel)
static int fast_cp(int64_t C) { return C <= 16 ? 16 : C <= 32 ? 32 : C <= 64 ? 64 : C <= 128 ? 128 : 0; }

template <typename T, int MODE, int CP>
static int mma_forward_cp(const fa_cpb_geom *g, float *out, const fa_cpb_in *in, const Prep &pr, const char *fn) {
  const int dev = g->device;
  const size_t sm = mma_fwd_smem<MODE, T>(CP, pr.w.O);
  auto kern = mma_fwd_kernel<T, MODE, CP>;
  int rc = set_smem(kern, sm, dev, g->C, fn);
  if (rc) return rc;
  int nb = 0;
  if ((rc = fa_cu_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kern, FTHREADS, sm), fn))) return rc;
  if (nb < 1) nb = 1;
  const int64_t tiles = g->P * ((g->N * g->M + 15) / 16), need = (tiles + FW - 1) / FW;
  int64_t grid = (int64_t)fa_cu_sm_count(dev) * nb;
  if (grid > need) grid = need;
  kern<<<(unsigned)grid, FTHREADS, sm, fa_cu_stream(dev)>>>(*g, pr.w, out, (const float *)in->qpos,
                                                            (const float *)in->kpos);
  return fa_cu_launch_check(fn);
}

template <typename T, int MODE> static int mma_forward(const fa_cpb_geom *g, float *out, const fa_cpb_in *in) {
  static const char *fn = "fa_cpb_forward";
  const int cp = fast_cp(g->C);
  Prep pr;
  int rc = prepare<T, MODE>(g, in, pr, fn, cp);
  if (rc) return rc;
  switch (cp) {
  case 16: rc = mma_forward_cp<T, MODE, 16>(g, out, in, pr, fn); break;
  case 32: rc = mma_forward_cp<T, MODE, 32>(g, out, in, pr, fn); break;
  case 64: rc = mma_forward_cp<T, MODE, 64>(g, out, in, pr, fn); break;
  default: rc = mma_forward_cp<T, MODE, 128>(g, out, in, pr, fn); break;
  }
  fa_cu_temp_free(g->device, pr.buf);
  return rc;
}

static int smem_optin(int dev) {
  int optin = 0;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return optin;
}

// C <= 128 and the shared memory fits: the mma.sync forward (float32: TF32 under fa.cuda.allowTF32(true), else
// 3xTF32); else fwd_kernel
template <typename T, int MODE> static bool mma_fwd_fits(const fa_cpb_geom *g) {
  const int cp = fast_cp(g->C);
  return cp > 0 && mma_fwd_smem<MODE, T>(cp, (int)g->O) <= (size_t)smem_optin(g->device);
}
template <typename T> static int forward_d(const fa_cpb_geom *g, float *out, const fa_cpb_in *in) {
  int m = mode_of<T>(fa_cu_tf32_allowed());
  if constexpr (std::is_same<T, float>::value) {
    if (m == TF32) return mma_fwd_fits<T, TF32>(g) ? mma_forward<T, TF32>(g, out, in) : forward_t<T, TF32>(g, out, in);
    return mma_fwd_fits<T, X3>(g) ? mma_forward<T, X3>(g, out, in) : forward_t<T, X3>(g, out, in);
  } else {
    return mma_fwd_fits<T, HALF16>(g) ? mma_forward<T, HALF16>(g, out, in) : forward_t<T, HALF16>(g, out, in);
  }
}
// the weight partials (grid CTAs, part_len(CP, O) each) and gd reduced in fixed orders into the gradients
template <typename T>
static int reduce_grads(const fa_cpb_geom *g, const fa_cpb_grads *gr, const float *part, int64_t grid, int CP,
                        const float *gd, const char *fn) {
  const int dev = g->device, O = (int)g->O;
  cudaStream_t st = fa_cu_stream(dev);
  int64_t n = (int64_t)CP * CP + 4 * (int64_t)CP + (int64_t)O * CP + O;
  reduce_w_kernel<T><<<fa_cu_blocks(n, 256, dev), 256, 0, st>>>(part, (int)grid, (int)g->C, CP, O, (T *)gr->w1,
                                                                 (T *)gr->b1, (T *)gr->w2, (T *)gr->b2, (T *)gr->w3,
                                                                 (T *)gr->b3);
  int rc = fa_cu_launch_check(fn);
  if (!rc && gr->kpos && g->P * g->M > 0) {
    reduce_k_kernel<<<fa_cu_blocks(g->P * g->M * 2, 32, dev), dim3(32, KR), 0, st>>>(gd, (float *)gr->kpos, g->P,
                                                                                     g->N, g->M);
    rc = fa_cu_launch_check(fn);
  }
  return rc;
}

template <typename T, int MODE, int CP, int BW>
static int mma_backward_bw(const fa_cpb_geom *g, const fa_cpb_grads *gr, const float *grad_bias, const fa_cpb_in *in,
                           const Prep &pr, const char *fn) {
  const int dev = g->device, O = (int)g->O;
  const size_t sm = mma_bwd_smem<MODE, T, BW>(CP, O);
  auto kern = mma_bwd_kernel<T, MODE, CP, BW>;
  int rc = set_smem(kern, sm, dev, g->C, fn);
  if (rc) return rc;
  int nb = 0;
  if ((rc = fa_cu_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kern, BW * 32, sm), fn))) return rc;
  if (nb < 1) nb = 1;
  const int64_t NM = g->N * g->M, tiles = g->P * ((NM + BW * 16 - 1) / (BW * 16));
  int64_t grid = (int64_t)fa_cu_sm_count(dev) * nb; // fixed by the device: the partials' order is too
  if (grid > tiles) grid = tiles;
  if (grid < 1) grid = 1;
  float *part = (float *)fa_cu_temp_alloc(dev, grid * part_len(CP, O) * 4);
  float *gd = (float *)fa_cu_temp_alloc(dev, (g->P * NM * 2 > 0 ? g->P * NM * 2 : 1) * 4);
  if (!part || !gd) rc = FA_ERR_MEMORY;
  if (!rc) {
    kern<<<(unsigned)grid, BW * 32, sm, fa_cu_stream(dev)>>>(*g, pr.w, part, gd, grad_bias, (const float *)in->qpos,
                                                             (const float *)in->kpos);
    rc = fa_cu_launch_check(fn);
  }
  if (!rc) rc = reduce_grads<T>(g, gr, part, grid, CP, gd, fn);
  fa_cu_temp_free(dev, gd);
  fa_cu_temp_free(dev, part);
  return rc;
}

// mma_bwd_kernel's warps per CTA: 16 where their shared memory fits (never float32 at C 128), else 8 (C >= 64;
// 16-bit C 128 with O > 2, float32 C 128, devices with less shared memory); 0: neither fits (bwd_kernel)
template <typename T, int MODE, int CP> static int bwd_warps(const fa_cpb_geom *g) {
  const size_t optin = (size_t)smem_optin(g->device);
  const int O = (int)g->O;
  if constexpr (MODE == HALF16 || CP < 128)
    if (mma_bwd_smem<MODE, T, 16>(CP, O) <= optin) return 16;
  if constexpr (CP >= 64)
    if (mma_bwd_smem<MODE, T, 8>(CP, O) <= optin) return 8;
  return 0;
}

template <typename T, int MODE, int CP>
static int mma_backward_cp(const fa_cpb_geom *g, const fa_cpb_grads *gr, const float *grad_bias, const fa_cpb_in *in,
                           const Prep &pr, const char *fn) {
  if constexpr (MODE != HALF16 && CP == 128) return mma_backward_bw<T, MODE, CP, 8>(g, gr, grad_bias, in, pr, fn);
  else if constexpr (CP < 64) return mma_backward_bw<T, MODE, CP, 16>(g, gr, grad_bias, in, pr, fn);
  else
    return bwd_warps<T, MODE, CP>(g) == 16 ? mma_backward_bw<T, MODE, CP, 16>(g, gr, grad_bias, in, pr, fn)
                                           : mma_backward_bw<T, MODE, CP, 8>(g, gr, grad_bias, in, pr, fn);
}

template <typename T, int MODE>
static int mma_backward(const fa_cpb_geom *g, const fa_cpb_grads *gr, const float *grad_bias, const fa_cpb_in *in) {
  static const char *fn = "fa_cpb_backward";
  const int cp = fast_cp(g->C);
  Prep pr;
  int rc = prepare<T, MODE>(g, in, pr, fn, cp);
  if (rc) return rc;
  switch (cp) {
  case 16: rc = mma_backward_cp<T, MODE, 16>(g, gr, grad_bias, in, pr, fn); break;
  case 32: rc = mma_backward_cp<T, MODE, 32>(g, gr, grad_bias, in, pr, fn); break;
  case 64: rc = mma_backward_cp<T, MODE, 64>(g, gr, grad_bias, in, pr, fn); break;
  default: rc = mma_backward_cp<T, MODE, 128>(g, gr, grad_bias, in, pr, fn); break;
  }
  fa_cu_temp_free(g->device, pr.buf);
  return rc;
}

// C <= 128, O <= BOMAX and the shared memory fits: mma_bwd_kernel; else bwd_kernel (WMMA)
template <typename T, int MODE> static bool mma_bwd_fits(const fa_cpb_geom *g) {
  if (g->O > BOMAX) return false;
  switch (fast_cp(g->C)) {
  case 16: return bwd_warps<T, MODE, 16>(g) > 0;
  case 32: return bwd_warps<T, MODE, 32>(g) > 0;
  case 64: return bwd_warps<T, MODE, 64>(g) > 0;
  case 128: return bwd_warps<T, MODE, 128>(g) > 0;
  default: return false;
  }
}
template <typename T>
static int backward_d(const fa_cpb_geom *g, const fa_cpb_grads *gr, const float *gb, const fa_cpb_in *in) {
  int m = mode_of<T>(fa_cu_tf32_allowed());
  if constexpr (std::is_same<T, float>::value) {
    if (m == TF32) return mma_bwd_fits<T, TF32>(g) ? mma_backward<T, TF32>(g, gr, gb, in) : backward_t<T, TF32>(g, gr, gb, in);
    return mma_bwd_fits<T, X3>(g) ? mma_backward<T, X3>(g, gr, gb, in) : backward_t<T, X3>(g, gr, gb, in);
  } else {
    return mma_bwd_fits<T, HALF16>(g) ? mma_backward<T, HALF16>(g, gr, gb, in) : backward_t<T, HALF16>(g, gr, gb, in);
  }
}
} // namespace

extern "C" int fa_cu_cpb_forward(const fa_cpb_geom *g, float *out, const fa_cpb_in *in) {
  int rc;
  if ((rc = check_limits(g, "fa_cpb_forward"))) return rc;
  if ((rc = fa_cu_check(cudaSetDevice(g->device), "fa_cpb_forward"))) return rc;
  if (g->P * g->N * g->M * g->O == 0) return 0;
  switch (g->dtype) {
  case FA_FLOAT32: return forward_d<float>(g, out, in);
  case FA_BFLOAT16: return forward_d<__nv_bfloat16>(g, out, in);
  default: return forward_d<__half>(g, out, in);
  }
}

extern "C" int fa_cu_cpb_backward(const fa_cpb_geom *g, const fa_cpb_grads *gr, const float *grad_bias, const fa_cpb_in *in) {
  int rc;
  if ((rc = check_limits(g, "fa_cpb_backward"))) return rc;
  if ((rc = fa_cu_check(cudaSetDevice(g->device), "fa_cpb_backward"))) return rc;
  switch (g->dtype) {
  case FA_FLOAT32: return backward_d<float>(g, gr, grad_bias, in);
  case FA_BFLOAT16: return backward_d<__nv_bfloat16>(g, gr, grad_bias, in);
  default: return backward_d<__half>(g, gr, grad_bias, in);
  }
}
