// conv2d.cu: 2-D convolution on the GPU, forward and backward.
//
//   x (N, C, H, W), weight (O, C/G, kh, kw), bias (O) or NULL -> out (N, O, Ho, Wo)
//   Ho = (H + 2 ph - dh (kh - 1) - 1) / sh + 1, likewise Wo. P = Ho * Wo, kk = kh * kw, Cg = C / G, Og = O / G.
//   backward: grad_x (overwritten), grad_weight and grad_bias (accumulated, +=); each may be NULL.
//
// Paths:
//   depthwise (G == C > 1, any channel multiplier O / C): own kernels. Forward: a block computes a tile of
//     one output plane from an input patch staged in shared memory, so DRAM reads each input element about
//     once (the op is memory-bound: 6x6 stride 4 reads 16x more than it writes). grad_x gathers over the
//     taps that reach each input pixel (no atomics); grad_weight: per-(channel, position slice) partial sums
//     for every tap, added in slice order by a second kernel (deterministic).
//   1x1, stride 1, no padding: with tensor cores (TF32 or 16-bit) and one group, x is transposed to
//     channels-last (plus bias columns) and out_n = Wa @ xt_n^T is one strided-batched GEMM with both operands
//     K-major, bias included; grad_x likewise. Otherwise out_n = W_g @ x_n,g, one strided-batched GEMM per
//     group over the batch, accumulating onto the bias written first. grad_weight: one batched GEMM per group
//     into per-image float32 products, added in image order.
//   general: im2col of a chunk of images into a temporary (at most ~256 MiB), cuBLAS GEMMs per group;
//     grad_x by GEMM into columns and a gathering col2im (deterministic).
// Bias (general and 1x1 paths): written into the output first and the GEMM
// accumulates onto it (beta = 1). grad_bias: per-channel
// partial sums over position slices, added in order. grad_weight of the GEMM paths: the per-image GEMMs
// accumulate (beta = 1) in order into a float32 buffer that is then added to grad_weight.
// Storage float32, bfloat16 or float16, float32 accumulation (cuBLAS compute type 32F; TF32 only after
// fa_cuda_allow_tf32(1)). x may be any strided view; other operands are made dense when they are not.
#include "dense.cuh"
#include <algorithm>

namespace {

static const char *FWD = "fa_conv2d_forward";
static const char *BWD = "fa_conv2d_backward";

struct Conv {
  int64_t N, C, H, W, O, Ho, Wo, P, G, Cg, Og;
  int kh, kw, kk, sh, sw, ph, pw, dh, dw;
  int64_t xs[4]; // strides of x
};

static Conv conv_of(const fa_tensor *x, const fa_tensor *w, const fa_conv2d_params *p) {
  Conv g;
  g.N = x->shape[0]; g.C = x->shape[1]; g.H = x->shape[2]; g.W = x->shape[3];
  g.O = w->shape[0]; g.kh = (int)w->shape[2]; g.kw = (int)w->shape[3]; g.kk = g.kh * g.kw;
  g.sh = p->stride_h; g.sw = p->stride_w; g.ph = p->pad_h; g.pw = p->pad_w; g.dh = p->dilation_h; g.dw = p->dilation_w;
  g.G = p->groups; g.Cg = g.C / g.G; g.Og = g.O / g.G;
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  g.P = g.Ho * g.Wo;
  for (int d = 0; d < 4; d++) g.xs[d] = x->stride[d];
  return g;
}
static bool is_depthwise(const Conv &g) { return g.G == g.C && g.G > 1; }
static bool is_pointwise(const Conv &g) { return g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0; }

// ------------------------------------------------------------------ cuBLAS
static cudaDataType_t cuda_type(int dtype) {
  return dtype == FA_BFLOAT16 ? CUDA_R_16BF : dtype == FA_FLOAT16 ? CUDA_R_16F : CUDA_R_32F;
}

// Row-major, batched: C[b] (m x n) = alpha * op(A[b]) (m x k) @ op(B[b]) (k x n) + beta * C[b].
// A is stored (m x k) with leading dimension lda, or (k x m) when ta; likewise B. ab: dtype of A and B;
// c_f32: C is float32 (else the dtype ab). Column-major cuBLAS computes C^T = op(B)^T op(A)^T.
static int gemm(int dev, int ab, bool c_f32, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void *A, int64_t lda,
                int64_t sA, const void *B, int64_t ldb, int64_t sB, float beta, void *C, int64_t ldc, int64_t sC,
                int64_t batch, const char *fn) {
  if (m <= 0 || n <= 0 || batch <= 0) return 0;
  if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX || lda > INT32_MAX || ldb > INT32_MAX || ldc > INT32_MAX || batch > INT32_MAX)
    return fa_error(FA_ERR_UNSUPPORTED, "%s: matrix sizes beyond cuBLAS's 32-bit limits (m %lld, n %lld, k %lld)", fn,
                    (long long)m, (long long)n, (long long)k);
  cublasHandle_t h = fa_cu_blas(dev);
  if (!h) return fa_error(FA_ERR_CUDA, "%s: could not create the cuBLAS handle of device %d", fn, dev);
  float alpha = 1.f;
  cudaDataType_t tab = cuda_type(ab), tc = c_f32 ? CUDA_R_32F : tab;
  cublasComputeType_t ct = ab == FA_FLOAT32 && fa_cu_tf32_allowed() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  cublasStatus_t s = cublasGemmStridedBatchedEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)n, (int)m,
                                                (int)k, &alpha, B, tab, (int)ldb, sB, A, tab, (int)lda, sA, &beta, C, tc,
                                                (int)ldc, sC, (int)batch, ct, CUBLAS_GEMM_DEFAULT);
  return fa_cu_blas_check(s, fn);
}

// ------------------------------------------------------------------ small kernels
// channels o0 .. o0 + Oc - 1 of out (N, O, P) dense = bias[o] (or 0); rows = N * Oc
template <typename T>
__global__ void bias_fill(T *out, const T *bias, int64_t O, int64_t o0, int64_t Oc, int64_t P, int64_t rows) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    int64_t n = r / Oc, o = o0 + (r - n * Oc);
    T v = bias ? bias[o] : fa_from_f<T>(0.f);
    T *row = out + (n * O + o) * P;
    for (int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; p < P; p += (int64_t)gridDim.x * blockDim.x) row[p] = v;
  }
}

// dst[off(i)] += src[i] for i < n (dst a strided view of n elements)
template <typename T>
__global__ void add_into(T *dst, fa_cu_geom g, const float *src, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t o = fa_cu_offset(g, i);
    dst[o] = fa_from_f<T>(fa_to_f<T>(dst[o]) + src[i]);
  }
}

// partial[s][o] = sum over positions q in slice s of gout[n, o, p] (q = n * P + p); gout dense (N, O, P)
template <typename T>
__global__ void __launch_bounds__(256) chan_sum_partial(float *part, const T *gout, int64_t O, int64_t P, int64_t NP, int64_t slice) {
  __shared__ float red[8];
  int64_t o = blockIdx.x, s = blockIdx.y;
  int64_t q0 = s * slice, q1 = min(NP, q0 + slice);
  float acc = 0.f;
  for (int64_t q = q0 + threadIdx.x; q < q1; q += blockDim.x) {
    int64_t n = q / P, p = q - n * P;
    acc += fa_to_f<T>(gout[(n * O + o) * P + p]);
  }
  acc = fa_cu_warp_sum(acc);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int k = 0; k < 8; k++) t += red[k];
    part[s * O + o] = t;
  }
}
// dst[off(j)] += sum_s part[s][j] (s in order), j < n
template <typename T>
__global__ void add_slices(T *dst, fa_cu_geom g, const float *part, int64_t n, int slices) {
  int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  float s = 0.f;
  for (int k = 0; k < slices; k++) s += part[(int64_t)k * n + j];
  int64_t o = fa_cu_offset(g, j);
  dst[o] = fa_from_f<T>(fa_to_f<T>(dst[o]) + s);
}

// number of position slices for a per-channel reduction over NP positions: enough blocks to fill the device
static int64_t slices_for(int64_t channels, int64_t NP, int threads, int dev) {
  int64_t s = (4 * (int64_t)fa_cu_sm_count(dev) + channels - 1) / channels;
  int64_t cap = (NP + threads - 1) / threads;
  if (s > cap) s = cap;
  if (s > 65535) s = 65535;
  return s < 1 ? 1 : s;
}

template <typename T>
static int bias_grad(fa_tensor *grad_bias, const T *gout, const Conv &g, int dev) {
  int64_t NP = g.N * g.P;
  int64_t slices = slices_for(g.O, NP, 256, dev), slice = (NP + slices - 1) / slices;
  slices = (NP + slice - 1) / slice;
  float *part = (float *)fa_cu_temp_alloc(dev, slices * g.O * 4);
  if (!part) return FA_ERR_MEMORY;
  cudaStream_t st = fa_cu_stream(dev);
  chan_sum_partial<T><<<dim3((unsigned)g.O, (unsigned)slices), 256, 0, st>>>(part, gout, g.O, g.P, NP, slice);
  int rc = fa_cu_launch_check(BWD);
  if (!rc) {
    add_slices<T><<<(unsigned)((g.O + 255) / 256), 256, 0, st>>>((T *)grad_bias->data, fa_cu_geom_of(grad_bias), part, g.O, (int)slices);
    rc = fa_cu_launch_check(BWD);
  }
  fa_cu_temp_free(dev, part);
  return rc;
}

template <typename T>
static int fill_channels(T *out, const T *bias, const Conv &g, int64_t o0, int64_t Oc, cudaStream_t st) {
  int64_t rows = g.N * Oc;
  dim3 grid((unsigned)std::min<int64_t>((g.P + 255) / 256, 64), (unsigned)std::min<int64_t>(rows, 65535));
  bias_fill<T><<<grid, 256, 0, st>>>(out, bias, g.O, o0, Oc, g.P, rows);
  return fa_cu_launch_check(FWD);
}

// ------------------------------------------------------------------ im2col / col2im
// col (nb, C * kk, P) dense <- x images n0 .. n0 + nb - 1 (strided); grid.y walks the rows, so the
// channel/tap split is computed once per row; I: 32-bit index math when sizes allow
template <typename T, typename I>
__global__ void __launch_bounds__(256) im2col(T *col, const T *x, Conv g, int64_t n0, int64_t rows) {
  I P = (I)g.P, Wo = (I)g.Wo, ckk = (I)(g.C * g.kk);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    I img = (I)(r / ckk), row = (I)(r - (int64_t)img * ckk);
    I c = row / g.kk, t = row - c * g.kk;
    int i = (int)(t / g.kw), j = (int)(t - i * g.kw);
    const T *xp = x + (n0 + img) * g.xs[0] + c * g.xs[1];
    T *cp = col + r * (int64_t)P;
    for (I p = blockIdx.x * blockDim.x + threadIdx.x; p < P; p += gridDim.x * blockDim.x) {
      I ho = p / Wo, wo = p - ho * Wo;
      int64_t h = (int64_t)ho * g.sh - g.ph + (int64_t)i * g.dh, w = (int64_t)wo * g.sw - g.pw + (int64_t)j * g.dw;
      cp[p] = (h >= 0 && h < g.H && w >= 0 && w < g.W) ? xp[h * g.xs[2] + w * g.xs[3]] : fa_from_f<T>(0.f);
    }
  }
}

// grad_x (strided view, strides gs) of images n0 .. <- gather of col (nb, C * kk, P) over the taps that
// reach each pixel; grid.y walks (image, channel)
template <typename T, typename I>
__global__ void __launch_bounds__(256) col2im(T *gx, fa_cu_geom gs, const T *col, Conv g, int64_t n0, int64_t planes) {
  I HW = (I)(g.H * g.W), W = (I)g.W;
  for (int64_t r = blockIdx.y; r < planes; r += gridDim.y) {
    int64_t img = r / g.C, c = r - img * g.C;
    const T *cp = col + r * (int64_t)g.kk * g.P;
    T *gp = gx + (n0 + img) * gs.stride[0] + c * gs.stride[1];
    for (I e = blockIdx.x * blockDim.x + threadIdx.x; e < HW; e += gridDim.x * blockDim.x) {
      I h = e / W, w = e - h * W;
      float acc = 0.f;
      for (int i = 0; i < g.kh; i++) {
        int hh = (int)h + g.ph - i * g.dh;
        if (hh < 0) break;
        if (hh % g.sh) continue;
        int ho = hh / g.sh;
        if (ho >= g.Ho) continue;
        for (int j = 0; j < g.kw; j++) {
          int ww = (int)w + g.pw - j * g.dw;
          if (ww < 0) break;
          if (ww % g.sw) continue;
          int wo = ww / g.sw;
          if (wo >= g.Wo) continue;
          acc += fa_to_f<T>(cp[(int64_t)(i * g.kw + j) * g.P + (int64_t)ho * g.Wo + wo]);
        }
      }
      gp[(int64_t)h * gs.stride[2] + (int64_t)w * gs.stride[3]] = fa_from_f<T>(acc);
    }
  }
}

template <typename T>
static int launch_im2col(T *col, const T *x, const Conv &g, int64_t n0, int64_t nb, cudaStream_t st) {
  int64_t rows = nb * g.C * g.kk;
  dim3 grid((unsigned)std::min<int64_t>((g.P + 255) / 256, 64), (unsigned)std::min<int64_t>(rows, 65535));
  bool small = nb * g.C * g.kk * g.P < INT32_MAX;
  if (small) im2col<T, uint32_t><<<grid, 256, 0, st>>>(col, x, g, n0, rows);
  else im2col<T, int64_t><<<grid, 256, 0, st>>>(col, x, g, n0, rows);
  return fa_cu_launch_check("fa_conv2d (im2col)");
}

// ------------------------------------------------------------------ depthwise
struct Dw {
  int TH, TW, PH, PW, RQ, tiles_w, tiles; // output tile, input patch, patch row length per phase plane, tiles per plane
  int mult;                               // output channels per input channel
};

// A block: tile (TH x TW) of output plane (n, o), from its input patch (PH x PW, zero padded) in shared memory.
// The patch is stored as sw phase planes [q % sw][r][q / sw] (row length RQ, padded against bank conflicts):
// the taps of adjacent output columns, sw patch columns apart, are then adjacent words, conflict-free at any
// stride. Each tap's (weight, offset in the planes) pair sits after the patch. The patch is loaded row by row,
// a warp per row and NQ 32-column chunks per lane, 4 rows at a time: no index division, 4 * NQ loads in
// flight per thread (at batch 1 a block is often all an SM has, so latency decides).
// NQ == 0: 16-byte loads instead (x rows contiguous and 16-byte aligned, W a multiple of V = 16 / sizeof(T),
// V a multiple of sw; checked by the host): the patch's in-image part is read as aligned V-element chunks,
// (row, chunk) pairs spread over the block with DWV_U loads in flight per thread, so a 64-column fp32 plane
// is one round trip instead of three; element j of a chunk lands in phase plane (j + pw) % sw. The cells
// outside the image (padding) are zeroed separately.
enum { DWV_U = 4 };
template <typename T>
__device__ __forceinline__ void dw_load_patch_vec(float *patch, const T *xp, const Conv &g, const Dw &d, int ih0, int iw0, int tx0) {
  constexpr int V = 16 / sizeof(T);
  const int plane_words = d.PH * d.RQ, PW = d.PW, PH = d.PH;
  // patch rows [ra, rb) and columns [qa, qb) are inside the image
  const int ra = min(PH, max(0, -ih0)), rb = max(ra, min(PH, (int)g.H - ih0));
  const int qa = min(PW, max(0, -iw0)), qb = max(qa, min(PW, (int)g.W - iw0));
  const int nzr = PH - (rb - ra), npad = PW - (qb - qa);
  for (int e = threadIdx.x; e < nzr * PW; e += blockDim.x) { // whole rows outside the image
    int k = e / PW, q = e - k * PW, r = k < ra ? k : rb + (k - ra);
    patch[(q % g.sw) * plane_words + r * d.RQ + q / g.sw] = 0.f;
  }
  for (int e = threadIdx.x; e < (rb - ra) * npad; e += blockDim.x) { // padding columns of the rows inside
    int k = e / npad, j = e - k * npad, q = j < qa ? j : qb + (j - qa);
    patch[(q % g.sw) * plane_words + (ra + k) * d.RQ + q / g.sw] = 0.f;
  }
  if (qb <= qa || rb <= ra) return;
  // image columns [a, b) = chunks m0 .. m1 (each chunk lies inside the row: W % V == 0)
  const int a = iw0 + qa, b = iw0 + qb, m0 = a / V, nch = (b - 1) / V - m0 + 1;
  // patch column of element j of chunk m: q = V m + j - iw0 = sw (V/sw m - tx0) + (j + pw)
  int jo[V];
#pragma unroll
  for (int j = 0; j < V; j++) jo[j] = ((j + g.pw) % g.sw) * plane_words + (j + g.pw) / g.sw - tx0;
  const int vs = V / g.sw, items = (rb - ra) * nch;
  for (int i0 = threadIdx.x; i0 < items; i0 += DWV_U * blockDim.x) {
    uint4 v[DWV_U];
    int rr[DWV_U], mm[DWV_U];
#pragma unroll
    for (int u = 0; u < DWV_U; u++) {
      int it = i0 + u * blockDim.x;
      rr[u] = -1;
      if (it < items) {
        int k = it / nch;
        rr[u] = ra + k;
        mm[u] = m0 + (it - k * nch);
        v[u] = *reinterpret_cast<const uint4 *>(xp + (int64_t)(ih0 + rr[u]) * g.xs[2] + (int64_t)mm[u] * V);
      }
    }
#pragma unroll
    for (int u = 0; u < DWV_U; u++) {
      if (rr[u] < 0) continue;
      const T *e = reinterpret_cast<const T *>(&v[u]);
      float *pr = patch + rr[u] * d.RQ + vs * mm[u];
      const int iwc = mm[u] * V;
#pragma unroll
      for (int j = 0; j < V; j++)
        if (iwc + j >= a && iwc + j < b) pr[jo[j]] = fa_to_f<T>(e[j]);
    }
  }
}

template <typename T, int NQ>
__global__ void __launch_bounds__(256, NQ == 0 ? 5 : 1) dw_fwd_tiled(T *out, const T *x, const T *w, const T *bias, Conv g, Dw d) {
  extern __shared__ float sm[];
  const int plane_words = d.PH * d.RQ;
  float *patch = sm;
  float2 *taps = reinterpret_cast<float2 *>(sm + ((g.sw * plane_words + 1) & ~1));
  uint32_t plane = blockIdx.x / (uint32_t)d.tiles, tile = blockIdx.x - plane * (uint32_t)d.tiles;
  uint32_t n = plane / (uint32_t)g.O, o = plane - n * (uint32_t)g.O, c = o / (uint32_t)d.mult;
  int ty0 = (int)(tile / d.tiles_w) * d.TH, tx0 = (int)(tile % d.tiles_w) * d.TW;
  int ih0 = ty0 * g.sh - g.ph, iw0 = tx0 * g.sw - g.pw;
  const T *xp = x + (int64_t)n * g.xs[0] + (int64_t)c * g.xs[1];
  for (int t = threadIdx.x; t < g.kk; t += blockDim.x) {
    int i = t / g.kw, j = t - i * g.kw, cq = j * g.dw;
    int off = (cq % g.sw) * plane_words + i * g.dh * d.RQ + cq / g.sw;
    taps[t] = make_float2(fa_to_f<T>(w[(int64_t)o * g.kk + t]), __int_as_float(off));
  }
  if (NQ == 0) {
    dw_load_patch_vec<T>(patch, xp, g, d, ih0, iw0, tx0);
  } else {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    constexpr int NQS = NQ > 0 ? NQ : 1;
    int sidx[NQS];
#pragma unroll
    for (int k = 0; k < NQ; k++) {
      int q = lane + 32 * k;
      sidx[k] = (q % g.sw) * plane_words + q / g.sw;
    }
    for (int r0 = warp; r0 < d.PH; r0 += 4 * nw) {
      float v[4][NQS];
#pragma unroll
      for (int u = 0; u < 4; u++) {
        int r = r0 + u * nw, ih = ih0 + r;
        bool rv = r < d.PH && ih >= 0 && ih < g.H;
        const T *rp = xp + (int64_t)ih * g.xs[2];
#pragma unroll
        for (int k = 0; k < NQ; k++) {
          int q = lane + 32 * k, iw = iw0 + q;
          v[u][k] = (rv && q < d.PW && iw >= 0 && iw < g.W) ? fa_to_f<T>(rp[(int64_t)iw * g.xs[3]]) : 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < 4; u++) {
        int r = r0 + u * nw;
        if (r < d.PH) {
#pragma unroll
          for (int k = 0; k < NQ; k++)
            if (lane + 32 * k < d.PW) patch[sidx[k] + r * d.RQ] = v[u][k];
        }
      }
    }
  } // scalar loads
  __syncthreads();
  float b = bias ? fa_to_f<T>(bias[o]) : 0.f;
  T *op = out + (int64_t)plane * g.P;
  for (int e = threadIdx.x; e < d.TH * d.TW; e += blockDim.x) {
    int ty = e / d.TW, tx = e - ty * d.TW, ho = ty0 + ty, wo = tx0 + tx;
    if (ho >= g.Ho || wo >= g.Wo) continue;
    const float *pp = patch + ty * g.sh * d.RQ + tx; // the window's origin: phase 0, index tx
    float acc = 0.f;
#pragma unroll 4
    for (int t = 0; t < g.kk; t++) {
      float2 tp = taps[t];
      acc += pp[__float_as_int(tp.y)] * tp.x;
    }
    op[(int64_t)ho * g.Wo + wo] = fa_from_f<T>(acc + b);
  }
}

// Pipelined variant of the 16-byte path (dw_fwd_tiled<T, 0>) for planes whose patch loads fit in registers
// (at most DWV_U per thread): a block walks items (plane, tile) with a stride of the grid, and the loads of
// its next item are issued before the current item's taps are computed, so DRAM latency overlaps the
// shared-memory work instead of following it (the one-item-per-block kernel measured bound by
// load -> barrier -> compute -> store in sequence: bfloat16, half the bytes, took as long as float32). The
// taps are read two per 16-byte broadcast load.
struct DwItem {
  const char *xp;          // image n, channel c of x (bytes)
  int64_t plane;           // n * O + o
  int o, ty0, tx0, ih0, iw0, ra, rb, qa, qb, m0, nch;
};
template <typename T>
__device__ __forceinline__ DwItem dw_item(uint32_t item, const T *x, const Conv &g, const Dw &d) {
  constexpr int V = 16 / sizeof(T);
  DwItem r;
  uint32_t plane = item / (uint32_t)d.tiles, tile = item - plane * (uint32_t)d.tiles;
  uint32_t n = plane / (uint32_t)g.O, o = plane - n * (uint32_t)g.O, c = o / (uint32_t)d.mult;
  r.plane = plane;
  r.o = (int)o;
  r.ty0 = (int)(tile / d.tiles_w) * d.TH;
  r.tx0 = (int)(tile % d.tiles_w) * d.TW;
  r.ih0 = r.ty0 * g.sh - g.ph;
  r.iw0 = r.tx0 * g.sw - g.pw;
  r.xp = reinterpret_cast<const char *>(x + (int64_t)n * g.xs[0] + (int64_t)c * g.xs[1]);
  r.ra = min(d.PH, max(0, -r.ih0));
  r.rb = max(r.ra, min(d.PH, (int)g.H - r.ih0));
  r.qa = min(d.PW, max(0, -r.iw0));
  r.qb = max(r.qa, min(d.PW, (int)g.W - r.iw0));
  r.m0 = (r.iw0 + r.qa) / V;
  r.nch = (r.qb > r.qa && r.rb > r.ra) ? (r.iw0 + r.qb - 1) / V - r.m0 + 1 : 0;
  return r;
}
// issue the item's 16-byte loads: (row, chunk) pair threadIdx.x + u * blockDim.x into v[u] (rr[u] = -1: none)
template <typename T>
__device__ __forceinline__ void dw_issue(uint4 (&v)[DWV_U], int (&rr)[DWV_U], int (&mm)[DWV_U], const DwItem &it, const Conv &g) {
  constexpr int V = 16 / sizeof(T);
  const int items = (it.rb - it.ra) * it.nch;
  const T *xp = reinterpret_cast<const T *>(it.xp);
#pragma unroll
  for (int u = 0; u < DWV_U; u++) {
    int e = threadIdx.x + u * blockDim.x;
    rr[u] = -1;
    if (e < items) {
      int k = e / it.nch;
      rr[u] = it.ra + k;
      mm[u] = it.m0 + (e - k * it.nch);
      v[u] = __ldg(reinterpret_cast<const uint4 *>(xp + (int64_t)(it.ih0 + rr[u]) * g.xs[2] + (int64_t)mm[u] * V));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256, 4) dw_fwd_pipe(T *out, const T *x, const T *w, const T *bias, Conv g, Dw d, uint32_t nitems) {
  constexpr int V = 16 / sizeof(T);
  extern __shared__ float sm[];
  const int plane_words = d.PH * d.RQ, PW = d.PW, PH = d.PH, kk2 = (g.kk + 1) & ~1;
  float *patch = sm;
  float4 *taps = reinterpret_cast<float4 *>(sm + ((g.sw * plane_words + 3) & ~3)); // (w, off) pairs, two per float4
  float2 *taps2 = reinterpret_cast<float2 *>(taps);
  uint32_t item = blockIdx.x;
  if (item >= nitems) return;
  int jo[V]; // phase plane and index of element j of a chunk, less the tile origin's index
#pragma unroll
  for (int j = 0; j < V; j++) jo[j] = ((j + g.pw) % g.sw) * plane_words + (j + g.pw) / g.sw;
  uint4 v[DWV_U];
  int rr[DWV_U], mm[DWV_U];
  DwItem cur = dw_item<T>(item, x, g, d);
  dw_issue<T>(v, rr, mm, cur, g);
  for (;;) {
    __syncthreads(); // the previous item's taps and patch are no longer read
    // zero the patch cells outside the image (rows, then the padding columns of the rows inside)
    const int nzr = PH - (cur.rb - cur.ra), npad = PW - (cur.qb - cur.qa);
    for (int e = threadIdx.x; e < nzr * PW; e += blockDim.x) {
      int k = e / PW, q = e - k * PW, r = k < cur.ra ? k : cur.rb + (k - cur.ra);
      patch[(q % g.sw) * plane_words + r * d.RQ + q / g.sw] = 0.f;
    }
    for (int e = threadIdx.x; e < (cur.rb - cur.ra) * npad; e += blockDim.x) {
      int k = e / npad, j = e - k * npad, q = j < cur.qa ? j : cur.qb + (j - cur.qa);
      patch[(q % g.sw) * plane_words + (cur.ra + k) * d.RQ + q / g.sw] = 0.f;
    }
    for (int t = threadIdx.x; t < kk2; t += blockDim.x) {
      float wt = 0.f;
      int off = 0;
      if (t < g.kk) {
        int i = t / g.kw, j = t - i * g.kw, cq = j * g.dw;
        off = (cq % g.sw) * plane_words + i * g.dh * d.RQ + cq / g.sw;
        wt = fa_to_f<T>(w[(int64_t)cur.o * g.kk + t]);
      }
      taps2[t] = make_float2(wt, __int_as_float(off));
    }
    { // the prefetched chunks into the patch: element j of chunk m is patch column V m + j - iw0
      const int a = cur.iw0 + cur.qa, b = cur.iw0 + cur.qb, vs = V / g.sw;
#pragma unroll
      for (int u = 0; u < DWV_U; u++) {
        if (rr[u] < 0) continue;
        const T *e = reinterpret_cast<const T *>(&v[u]);
        float *pr = patch + rr[u] * d.RQ + vs * mm[u] - cur.tx0;
        const int iwc = mm[u] * V;
#pragma unroll
        for (int j = 0; j < V; j++)
          if (iwc + j >= a && iwc + j < b) pr[jo[j]] = fa_to_f<T>(e[j]);
      }
    }
    __syncthreads();
    const DwItem now = cur;
    const uint32_t next = item + gridDim.x;
    if (next < nitems) { // the next item's loads fly while this one is computed
      cur = dw_item<T>(next, x, g, d);
      dw_issue<T>(v, rr, mm, cur, g);
    }
    const float bv = bias ? fa_to_f<T>(bias[now.o]) : 0.f;
    T *op = out + now.plane * g.P;
    for (int e = threadIdx.x; e < d.TH * d.TW; e += blockDim.x) {
      int ty = e / d.TW, tx = e - ty * d.TW, ho = now.ty0 + ty, wo = now.tx0 + tx;
      if (ho >= g.Ho || wo >= g.Wo) continue;
      const float *pp = patch + ty * g.sh * d.RQ + tx;
      float acc0 = 0.f, acc1 = 0.f;
#pragma unroll 3
      for (int t = 0; t + 1 < g.kk; t += 2) {
        float4 tp = taps[t >> 1];
        acc0 += pp[__float_as_int(tp.y)] * tp.x;
        acc1 += pp[__float_as_int(tp.w)] * tp.z;
      }
      if (g.kk & 1) { // no zero-weight pad tap: 0 * inf would make a NaN
        float2 tp = taps2[g.kk - 1];
        acc0 += pp[__float_as_int(tp.y)] * tp.x;
      }
      op[(int64_t)ho * g.Wo + wo] = fa_from_f<T>(acc0 + acc1 + bv);
    }
    if (next >= nitems) break;
    item = next;
  }
}

// fallback when a patch does not fit in shared memory: one thread per output, reading x directly
template <typename T>
__global__ void __launch_bounds__(256) dw_fwd_direct(T *out, const T *x, const T *w, const T *bias, Conv g, int mult, int64_t total) {
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    int64_t plane = e / g.P, p = e - plane * g.P, n = plane / g.O, o = plane - n * g.O, c = o / mult;
    int64_t ho = p / g.Wo, wo = p - ho * g.Wo;
    const T *xp = x + n * g.xs[0] + c * g.xs[1];
    float acc = 0.f;
    for (int i = 0; i < g.kh; i++) {
      int64_t h = ho * g.sh - g.ph + i * g.dh;
      if (h < 0 || h >= g.H) continue;
      for (int j = 0; j < g.kw; j++) {
        int64_t ww = wo * g.sw - g.pw + j * g.dw;
        if (ww < 0 || ww >= g.W) continue;
        acc += fa_to_f<T>(xp[h * g.xs[2] + ww * g.xs[3]]) * fa_to_f<T>(w[o * g.kk + i * g.kw + j]);
      }
    }
    out[e] = fa_from_f<T>(acc + (bias ? fa_to_f<T>(bias[o]) : 0.f));
  }
}

// grad_x[n, c, h, w] = sum over multipliers and over the taps reaching (h, w) of gout * weight (gather)
template <typename T, typename I>
__global__ void __launch_bounds__(256) dw_bwd_input(T *gx, fa_cu_geom gs, const T *gout, const T *w, Conv g, int mult, int64_t total) {
  I H = (I)g.H, W = (I)g.W, C = (I)g.C;
  for (int64_t e64 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e64 < total; e64 += (int64_t)gridDim.x * blockDim.x) {
    I e = (I)e64;
    I ww0 = e % W, r = e / W, h = r % H, r2 = r / H, c = r2 % C, n = r2 / C;
    float acc = 0.f;
    for (int m = 0; m < mult; m++) {
      int64_t o = (int64_t)c * mult + m;
      const T *go = gout + ((int64_t)n * g.O + o) * g.P;
      const T *wo_ = w + o * g.kk;
      for (int i = 0; i < g.kh; i++) {
        int hh = (int)h + g.ph - i * g.dh;
        if (hh < 0) break;
        if (hh % g.sh) continue;
        int ho = hh / g.sh;
        if (ho >= g.Ho) continue;
        for (int j = 0; j < g.kw; j++) {
          int wq = (int)ww0 + g.pw - j * g.dw;
          if (wq < 0) break;
          if (wq % g.sw) continue;
          int wo = wq / g.sw;
          if (wo >= g.Wo) continue;
          acc += fa_to_f<T>(go[(int64_t)ho * g.Wo + wo]) * fa_to_f<T>(wo_[i * g.kw + j]);
        }
      }
    }
    gx[(int64_t)n * gs.stride[0] + (int64_t)c * gs.stride[1] + (int64_t)h * gs.stride[2] + (int64_t)ww0 * gs.stride[3]] = fa_from_f<T>(acc);
  }
}

enum { DWW_THREADS = 128, DWW_TAPS = 64 };
// part[s][o][t0 + t] = sum over positions of slice s of gout[n, o, ho, wo] * x[n, c, tap position], for taps
// t0 .. t0 + nt - 1; each thread keeps its own sums in shared memory (column tid), reduced per tap at the end
template <typename T>
__global__ void __launch_bounds__(DWW_THREADS) dw_bwd_weight(float *part, const T *gout, const T *x, Conv g, int mult,
                                                             int64_t slice, int t0, int nt) {
  extern __shared__ float acc[]; // [nt][DWW_THREADS]
  int64_t o = blockIdx.x, s = blockIdx.y, c = o / mult;
  int64_t NP = g.N * g.P, q0 = s * slice, q1 = min(NP, q0 + slice);
  for (int t = 0; t < nt; t++) acc[t * DWW_THREADS + threadIdx.x] = 0.f;
  for (int64_t q = q0 + threadIdx.x; q < q1; q += DWW_THREADS) {
    int64_t n = q / g.P, p = q - n * g.P, ho = p / g.Wo, wo = p - ho * g.Wo;
    float go = fa_to_f<T>(gout[(n * g.O + o) * g.P + p]);
    const T *xp = x + n * g.xs[0] + c * g.xs[1];
    int64_t hb = ho * g.sh - g.ph, wb = wo * g.sw - g.pw;
    for (int t = 0; t < nt; t++) {
      int tap = t0 + t, i = tap / g.kw, j = tap - i * g.kw;
      int64_t h = hb + (int64_t)i * g.dh, w = wb + (int64_t)j * g.dw;
      if (h >= 0 && h < g.H && w >= 0 && w < g.W) acc[t * DWW_THREADS + threadIdx.x] += go * fa_to_f<T>(xp[h * g.xs[2] + w * g.xs[3]]);
    }
  }
  __syncthreads();
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int t = warp; t < nt; t += DWW_THREADS / 32) {
    float v = 0.f;
    for (int k = lane; k < DWW_THREADS; k += 32) v += acc[t * DWW_THREADS + k];
    v = fa_cu_warp_sum(v);
    if (lane == 0) part[(s * g.O + o) * g.kk + t0 + t] = v;
  }
}

// patch geometry for a TH x TW output tile; RQ padded so that the rows of one warp's outputs fall in
// different banks (checked by simulating the 32 lanes of a warp)
static void dw_patch(const Conv &g, Dw &d) {
  d.PH = (d.TH - 1) * g.sh + (g.kh - 1) * g.dh + 1;
  d.PW = (d.TW - 1) * g.sw + (g.kw - 1) * g.dw + 1;
  int rq0 = (d.PW + g.sw - 1) / g.sw, best = rq0, best_m = 33;
  for (int rq = rq0; rq < rq0 + 32; rq++) {
    int cnt[32] = {0}, m = 0;
    for (int l = 0; l < 32; l++) {
      int bank = (int)((((int64_t)(l / d.TW) * g.sh * rq) + l % d.TW) % 32);
      m = std::max(m, ++cnt[bank]);
    }
    if (m < best_m) { best_m = m; best = rq; }
    if (m == 1) break;
  }
  d.RQ = best;
}
static int64_t dw_smem(const Conv &g, const Dw &d) { return ((int64_t)g.sw * d.PH * d.RQ + 2 + 2 * (int64_t)g.kk) * 4; }
static int64_t dw_smem_pipe(const Conv &g, const Dw &d) { return ((int64_t)g.sw * d.PH * d.RQ + 4 + 2 * (int64_t)(g.kk + 1)) * 4; }
// dw_fwd_pipe's condition: every tile's in-image (row, 16-byte chunk) pairs fit in DWV_U loads per thread
static bool dw_pipe_fits(const Conv &g, const Dw &d, int V, int threads) {
  if (dw_smem_pipe(g, d) > 48 * 1024) return false;
  int64_t tiles_h = (g.Ho + d.TH - 1) / d.TH, rows = 0, chunks = 0;
  if (tiles_h > 65536 || d.tiles_w > 65536) return false;
  for (int64_t t = 0; t < tiles_h; t++) {
    int64_t ih0 = t * d.TH * g.sh - g.ph;
    int64_t ra = std::min<int64_t>(d.PH, std::max<int64_t>(0, -ih0)), rb = std::max(ra, std::min<int64_t>(d.PH, g.H - ih0));
    rows = std::max(rows, rb - ra);
  }
  for (int64_t t = 0; t < d.tiles_w; t++) {
    int64_t iw0 = t * d.TW * g.sw - g.pw;
    int64_t qa = std::min<int64_t>(d.PW, std::max<int64_t>(0, -iw0)), qb = std::max(qa, std::min<int64_t>(d.PW, g.W - iw0));
    if (qb > qa) chunks = std::max(chunks, (iw0 + qb - 1) / V - (iw0 + qa) / V + 1);
  }
  return rows * chunks <= (int64_t)DWV_U * threads;
}

template <typename T>
static int dw_forward(T *out, const T *x, const T *w, const T *bias, const Conv &g, int dev) {
  cudaStream_t st = fa_cu_stream(dev);
  int mult = (int)(g.O / g.C);
  Dw d;
  d.mult = mult;
  d.TW = (int)std::min<int64_t>(g.Wo, 32);
  d.TH = (int)std::min<int64_t>(g.Ho, std::max(1, 256 / d.TW));
  const int64_t limit = 48 * 1024;
  for (;;) {
    dw_patch(g, d);
    if ((dw_smem(g, d) <= limit && d.PW <= 256) || (d.TH == 1 && d.TW == 1)) break;
    if (d.TH > 1) d.TH = (d.TH + 1) / 2;
    else d.TW = (d.TW + 1) / 2;
  }
  int64_t smem = dw_smem(g, d);
  d.tiles_w = (int)((g.Wo + d.TW - 1) / d.TW);
  d.tiles = d.tiles_w * (int)((g.Ho + d.TH - 1) / d.TH);
  int64_t blocks = g.N * g.O * d.tiles;
  int nq = (d.PW + 31) / 32;
  if (smem <= limit && d.PW <= 256 && blocks < INT32_MAX) {
    int threads = (int)std::min<int64_t>(256, ((int64_t)d.TH * d.TW + 31) / 32 * 32);
    unsigned nb = (unsigned)blocks;
    size_t sb = (size_t)smem;
    constexpr int V = 16 / sizeof(T);
    const bool vec = V % g.sw == 0 && g.xs[3] == 1 && g.xs[2] % V == 0 && g.xs[1] % V == 0 && g.xs[0] % V == 0 && g.W % V == 0 &&
                     fa_cu_aligned16(x);
    if (vec && dw_pipe_fits(g, d, V, threads)) {
      const void *kern = (const void *)dw_fwd_pipe<T>;
      size_t sp = (size_t)dw_smem_pipe(g, d);
      int per = 0;
      if (sp > 48 * 1024 || cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, kern, threads, sp) != cudaSuccess || per < 1) {
        cudaGetLastError();
        per = 1;
      }
      int64_t grid = std::min<int64_t>(blocks, (int64_t)per * fa_cu_sm_count(dev));
      dw_fwd_pipe<T><<<(unsigned)grid, threads, sp, st>>>(out, x, w, bias, g, d, (uint32_t)blocks);
    } else if (vec) dw_fwd_tiled<T, 0><<<nb, threads, sb, st>>>(out, x, w, bias, g, d);
    else if (nq == 1) dw_fwd_tiled<T, 1><<<nb, threads, sb, st>>>(out, x, w, bias, g, d);
    else if (nq == 2) dw_fwd_tiled<T, 2><<<nb, threads, sb, st>>>(out, x, w, bias, g, d);
    else if (nq == 3) dw_fwd_tiled<T, 3><<<nb, threads, sb, st>>>(out, x, w, bias, g, d);
    else if (nq == 4) dw_fwd_tiled<T, 4><<<nb, threads, sb, st>>>(out, x, w, bias, g, d);
    else dw_fwd_tiled<T, 8><<<nb, threads, sb, st>>>(out, x, w, bias, g, d);
  } else {
    int64_t total = g.N * g.O * g.P;
    dw_fwd_direct<T><<<fa_cu_blocks(total, 256, dev), 256, 0, st>>>(out, x, w, bias, g, mult, total);
  }
  return fa_cu_launch_check(FWD);
}

template <typename T>
static int dw_backward(fa_tensor *grad_x, float *gw32, const T *gout, const T *x, const T *w, const Conv &g, int dev) {
  cudaStream_t st = fa_cu_stream(dev);
  int mult = (int)(g.O / g.C), rc;
  if (grad_x) {
    int64_t total = g.N * g.C * g.H * g.W;
    if (total < INT32_MAX)
      dw_bwd_input<T, uint32_t><<<fa_cu_blocks(total, 256, dev), 256, 0, st>>>((T *)grad_x->data, fa_cu_geom_of(grad_x), gout, w, g, mult, total);
    else
      dw_bwd_input<T, int64_t><<<fa_cu_blocks(total, 256, dev), 256, 0, st>>>((T *)grad_x->data, fa_cu_geom_of(grad_x), gout, w, g, mult, total);
    if ((rc = fa_cu_launch_check(BWD))) return rc;
  }
  if (!gw32) return 0;
  int64_t NP = g.N * g.P;
  int64_t slices = slices_for(g.O, NP, DWW_THREADS, dev), slice = (NP + slices - 1) / slices;
  slices = (NP + slice - 1) / slice;
  float *part = (float *)fa_cu_temp_alloc(dev, slices * g.O * g.kk * 4);
  if (!part) return FA_ERR_MEMORY;
  rc = 0;
  for (int t0 = 0; t0 < g.kk && !rc; t0 += DWW_TAPS) {
    int nt = std::min(g.kk - t0, (int)DWW_TAPS);
    dw_bwd_weight<T><<<dim3((unsigned)g.O, (unsigned)slices), DWW_THREADS, (size_t)nt * DWW_THREADS * 4, st>>>(part, gout, x, g, mult,
                                                                                                          slice, t0, nt);
    rc = fa_cu_launch_check(BWD);
  }
  if (!rc) { // gw32 (O * kk) = sum over slices, in order
    fa_cu_geom flat = {};
    flat.ndim = 1;
    flat.shape[0] = g.O * g.kk;
    flat.stride[0] = 1;
    for (int k = 1; k < FA_MAX_DIMS; k++) flat.shape[k] = 1;
    add_slices<float><<<(unsigned)((g.O * g.kk + 255) / 256), 256, 0, st>>>(gw32, flat, part, g.O * g.kk, (int)slices);
    rc = fa_cu_launch_check(BWD);
  }
  fa_cu_temp_free(dev, part);
  return rc;
}

// images per im2col chunk: the column buffer stays under ~256 MiB
static int64_t chunk_images(const Conv &g, int es) {
  int64_t per = g.C * g.kk * g.P * es;
  int64_t nb = per > 0 ? ((int64_t)256 << 20) / per : g.N;
  if (nb > g.N) nb = g.N;
  return nb < 1 ? 1 : nb;
}

// ------------------------------------------------------------------ 1x1 on tensor cores: packed operands
// The NCHW layout makes x (C x P per image, P contiguous) the MN-major operand of out_n = W @ x_n, which
// TF32 wgmma cannot read (only 16-bit types may be MN-major) and which the 16-bit kernels read slower than
// K-major: the 1x1 conv measured 1.5-1.75x cuDNN's time while linear (same FLOPs, both operands K-major)
// matched PyTorch. So x is first transposed into xt_n (P x Kp, channels contiguous), and out_n = Wa @ xt_n^T
// is one strided-batched GEMM with both operands K-major (Wa's batch stride 0). The bias rides in the GEMM
// as extra K columns (ones in xt, the bias in Wa), so the output is written once and never re-read; TF32
// splits the bias into a TF32-exact high part and the float32 remainder (two columns), which keeps it to
// 2^-20 (tensor cores may truncate to TF32) where one TF32 column would be off by up to 2^-10.
// Kp: C plus those columns, rounded up to 8 (16-byte rows).
// grad_x likewise: gout transposed to (P x Op) and W^T packed (C x Op).
struct PwPack {
  int64_t s0, s1, s2, s3; // strides of the source (image, channel, row, column)
  int64_t C, Wd, P, Kp;   // channels, row length, positions per image, packed row length
  int ones;               // columns C .. C + ones - 1 are 1 (the bias columns), the rest up to Kp 0
};
static int pw_ones(int dtype, bool has_bias) { return !has_bias ? 0 : dtype == FA_FLOAT32 ? 2 : 1; }
static int64_t pw_kp(int64_t C, int ones) { return (C + ones + 7) / 8 * 8; }
// the packed path: G == 1, tensor cores (16-bit or TF32 allowed; exact float32 keeps the FP32 kernels, whose
// speed does not depend on the layout), packed rows within the grid's y limit
static bool pw_packed(const Conv &g, int dtype) {
  return g.G == 1 && (dtype != FA_FLOAT32 || fa_cu_tf32_allowed()) && pw_kp(std::max(g.C, g.O), 2) / 32 < 65535;
}
// images per chunk: the packed operand stays under ~256 MiB, chunks of equal size
static int64_t pw_chunk(int64_t N, int64_t per_image) {
  int64_t cap = ((int64_t)256 << 20) / std::max<int64_t>(per_image, 1);
  if (cap < 1) cap = 1;
  int64_t chunks = (N + cap - 1) / cap;
  return (N + chunks - 1) / chunks;
}

// dst (nb, P, Kp) dense: dst[i][p][c] = src image n0 + i at (c, p) for c < C, 1 for the ones columns, else 0.
// 32 (p) x 64 (c) tiles through shared memory: reads along p, writes along c, both coalesced; 8 loads in
// flight per thread (a 16-bit warp load is only 64 bytes)
enum { PW_TP = 32, PW_TC = 64 };
template <typename T>
__global__ void __launch_bounds__(256) pw_pack(T *dst, const T *src, PwPack k, int64_t n0, int64_t nb) {
  __shared__ float tile[PW_TC][PW_TP + 1];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t p0 = (int64_t)blockIdx.x * PW_TP, c0 = (int64_t)blockIdx.y * PW_TC, p = p0 + tx;
  int64_t soff = 0;
  if (p < k.P) {
    int64_t h = p / k.Wd;
    soff = h * k.s2 + (p - h * k.Wd) * k.s3;
  }
  for (int64_t i = blockIdx.z; i < nb; i += gridDim.z) {
    const T *sp = src + (n0 + i) * k.s0 + soff;
#pragma unroll
    for (int j = 0; j < PW_TC / 8; j++) {
      int64_t c = c0 + ty + 8 * j;
      float v = 0.f;
      if (p < k.P) {
        if (c < k.C) v = fa_to_f<T>(sp[c * k.s1]);
        else if (c < k.C + k.ones) v = 1.f;
      }
      tile[ty + 8 * j][tx] = v;
    }
    __syncthreads();
    T *dp = dst + i * k.P * k.Kp;
#pragma unroll
    for (int j = 0; j < PW_TP / 8; j++) {
      int64_t pp = p0 + ty + 8 * j;
#pragma unroll
      for (int hc = 0; hc < PW_TC; hc += 32) {
        int64_t c = c0 + hc + tx;
        if (pp < k.P && c < k.Kp) dp[pp * k.Kp + c] = fa_from_f<T>(tile[hc + tx][ty + 8 * j]);
      }
    }
    __syncthreads();
  }
}

// wa (R x Kp) dense: wa[r][c] = src[r * rs + c * cs] for c < K, then the bias columns (ones == 1: bias[r];
// ones == 2: its TF32-exact high part and the float32 rest), then zeros
template <typename T>
__global__ void pw_pack_w(T *wa, const T *src, int64_t rs, int64_t cs, const T *bias, int64_t R, int64_t K, int64_t Kp, int ones) {
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < R * Kp; e += (int64_t)gridDim.x * blockDim.x) {
    int64_t r = e / Kp, c = e - r * Kp;
    T v = fa_from_f<T>(0.f);
    if (c < K) {
      v = src[r * rs + c * cs];
    } else if (c < K + ones) {
      if (ones == 1) {
        v = bias[r];
      } else {
        float b = fa_to_f<T>(bias[r]);
        float hi = isfinite(b) ? __uint_as_float(__float_as_uint(b) & 0xffffe000u) : b;
        v = fa_from_f<T>(c == K ? hi : b - hi);
      }
    }
    wa[e] = v;
  }
}

template <typename T>
static int pw_launch_pack(T *dst, const T *src, const PwPack &k, int64_t n0, int64_t nb, cudaStream_t st, const char *fn) {
  dim3 grid((unsigned)((k.P + PW_TP - 1) / PW_TP), (unsigned)((k.Kp + PW_TC - 1) / PW_TC), (unsigned)std::min<int64_t>(nb, 65535));
  pw_pack<T><<<grid, 256, 0, st>>>(dst, src, k, n0, nb);
  return fa_cu_launch_check(fn);
}

// out (N, O, P) dense = W (O x C) @ x_n + bias, x strided
template <typename T>
static int pw_forward_packed(T *y, const fa_tensor *x, const T *w, const T *b, const Conv &g, int dev) {
  const int dt = x->dtype, es = (int)sizeof(T), ones = pw_ones(dt, b != nullptr);
  const int64_t Kp = pw_kp(g.C, ones), nb = pw_chunk(g.N, g.P * Kp * es);
  cudaStream_t st = fa_cu_stream(dev);
  T *wa = (T *)fa_cu_temp_alloc(dev, g.O * Kp * es);
  if (!wa) return FA_ERR_MEMORY;
  T *xt = (T *)fa_cu_temp_alloc(dev, nb * g.P * Kp * es);
  if (!xt) { fa_cu_temp_free(dev, wa); return FA_ERR_MEMORY; }
  pw_pack_w<T><<<fa_cu_blocks(g.O * Kp, 256, dev), 256, 0, st>>>(wa, w, g.C, 1, b, g.O, g.C, Kp, ones);
  int rc = fa_cu_launch_check(FWD);
  const PwPack k = {g.xs[0], g.xs[1], g.xs[2], g.xs[3], g.C, g.W, g.P, Kp, ones};
  for (int64_t n0 = 0; n0 < g.N && !rc; n0 += nb) {
    int64_t cnt = std::min(nb, g.N - n0);
    if ((rc = pw_launch_pack<T>(xt, (const T *)x->data, k, n0, cnt, st, FWD))) break;
    // out_n (O x P) = Wa (O x Kp) @ xt_n^T, xt_n stored (P x Kp)
    rc = gemm(dev, dt, false, false, true, g.O, g.P, Kp, wa, Kp, 0, xt, Kp, g.P * Kp, 0.f, y + n0 * g.O * g.P, g.P, g.O * g.P, cnt, FWD);
  }
  fa_cu_temp_free(dev, xt);
  fa_cu_temp_free(dev, wa);
  return rc;
}

// gx (N, C, P) dense = W^T (C x O) @ gout_n, gout dense (N, O, P)
template <typename T>
static int pw_grad_x_packed(T *gx, const T *go, const T *w, const Conv &g, int dev, int dt) {
  const int es = (int)sizeof(T);
  const int64_t Op = pw_kp(g.O, 0), nb = pw_chunk(g.N, g.P * Op * es);
  cudaStream_t st = fa_cu_stream(dev);
  T *wt = (T *)fa_cu_temp_alloc(dev, g.C * Op * es);
  if (!wt) return FA_ERR_MEMORY;
  T *gt = (T *)fa_cu_temp_alloc(dev, nb * g.P * Op * es);
  if (!gt) { fa_cu_temp_free(dev, wt); return FA_ERR_MEMORY; }
  pw_pack_w<T><<<fa_cu_blocks(g.C * Op, 256, dev), 256, 0, st>>>(wt, w, 1, g.C, nullptr, g.C, g.O, Op, 0); // wt[c][o] = W[o][c]
  int rc = fa_cu_launch_check(BWD);
  const PwPack k = {g.O * g.P, g.P, g.Wo, 1, g.O, g.Wo, g.P, Op, 0};
  for (int64_t n0 = 0; n0 < g.N && !rc; n0 += nb) {
    int64_t cnt = std::min(nb, g.N - n0);
    if ((rc = pw_launch_pack<T>(gt, go, k, n0, cnt, st, BWD))) break;
    // gx_n (C x P) = Wt (C x Op) @ gt_n^T, gt_n stored (P x Op)
    rc = gemm(dev, dt, false, false, true, g.C, g.P, Op, wt, Op, 0, gt, Op, g.P * Op, 0.f, gx + n0 * g.C * g.P, g.P, g.C * g.P, cnt, BWD);
  }
  fa_cu_temp_free(dev, gt);
  fa_cu_temp_free(dev, wt);
  return rc;
}

// gw32 (O x Cg, float32) += sum over images n, in order, of gout_n,g (Og x P) @ x_n,g^T (P x Cg), per group:
// both operands K-major (P contiguous); one batched GEMM per group and chunk of images into per-image float32
// products, then added in image order (deterministic). A single image accumulates directly (beta = 1).
template <typename T>
static int pw_grad_w(float *gw32, const T *go, const T *xp, const Conv &g, int dev, int dt) {
  const int64_t nw = g.Og * g.Cg;
  cudaStream_t st = fa_cu_stream(dev);
  if (g.N == 1) {
    int rc = 0;
    for (int64_t k = 0; k < g.G && !rc; k++)
      rc = gemm(dev, dt, true, false, true, g.Og, g.Cg, g.P, go + k * g.Og * g.P, g.P, 0, xp + k * g.Cg * g.P, g.P, 0, 1.f,
                gw32 + k * nw, g.Cg, 0, 1, BWD);
    return rc;
  }
  int64_t nb = std::max<int64_t>(2, std::min<int64_t>(g.N, ((int64_t)64 << 20) / std::max<int64_t>(nw * 4, 1)));
  nb = std::min(nb, g.N);
  float *part = (float *)fa_cu_temp_alloc(dev, nb * nw * 4);
  if (!part) return FA_ERR_MEMORY;
  fa_cu_geom flat = {};
  flat.ndim = 1;
  flat.shape[0] = nw;
  flat.stride[0] = 1;
  for (int d = 1; d < FA_MAX_DIMS; d++) flat.shape[d] = 1;
  int rc = 0;
  for (int64_t n0 = 0; n0 < g.N && !rc; n0 += nb) {
    int64_t cnt = std::min(nb, g.N - n0);
    for (int64_t k = 0; k < g.G && !rc; k++) {
      rc = gemm(dev, dt, true, false, true, g.Og, g.Cg, g.P, go + (n0 * g.O + k * g.Og) * g.P, g.P, g.O * g.P,
                xp + (n0 * g.C + k * g.Cg) * g.P, g.P, g.C * g.P, 0.f, part, g.Cg, nw, cnt, BWD);
      if (rc) break;
      add_slices<float><<<(unsigned)((nw + 255) / 256), 256, 0, st>>>(gw32 + k * nw, flat, part, nw, (int)cnt);
      rc = fa_cu_launch_check(BWD);
    }
  }
  fa_cu_temp_free(dev, part);
  return rc;
}

// ------------------------------------------------------------------ forward
template <typename T>
static int forward_t(fa_tensor *out, const fa_tensor *x, const fa_tensor *weight, const fa_tensor *bias, const Conv &g) {
  int dev = x->device, rc, es = (int)sizeof(T), dt = x->dtype;
  cudaStream_t st = fa_cu_stream(dev);
  DenseView dout, dw, db;
  if ((rc = dout.out(out)) || (rc = dw.in(weight)) || (rc = db.in(bias))) return rc;
  T *y = dout.p<T>();
  const T *w = dw.p<T>(), *b = db.p<T>();
  if (g.C == 0 || (!is_depthwise(g) && !is_pointwise(g))) {
    // im2col path (and the empty-input case) start from the bias (or zero when C == 0)
    if (b || g.C == 0) {
      if ((rc = fill_channels<T>(y, b, g, 0, g.O, st))) return rc;
    }
  }
  float beta = b ? 1.f : 0.f;
  if (g.C == 0) {
    rc = 0;
  } else if (is_depthwise(g)) {
    rc = dw_forward<T>(y, (const T *)x->data, w, b, g, dev);
  } else if (is_pointwise(g)) {
    if (pw_packed(g, dt)) {
      rc = pw_forward_packed<T>(y, x, w, b, g, dev); // x read in place, any strides
    } else {
      DenseView dx;
      if ((rc = dx.in(x))) return rc;
      const T *xp = dx.p<T>();
      for (int64_t k = 0; k < g.G && !rc; k++) { // out_n,g (Og x P) = W_g (Og x Cg) @ x_n,g (Cg x P) [+ b_g per row]
        const T *wk = w + k * g.Og * g.Cg, *xk = xp + k * g.Cg * g.P;
        T *yk = y + k * g.Og * g.P;
        // The group's channels start as the bias and the GEMM adds onto them. (The cuBLASLt bias epilogue,
        // fa_cu_gemm_bias, was measured slower here on the H100 with TF32/bf16 at batch 32: 0.80 vs 0.76 ms
        // and 0.55 vs 0.51 ms; linear keeps it.)
        if (b && (rc = fill_channels<T>(y, b, g, k * g.Og, g.Og, st))) break;
        rc = gemm(dev, dt, false, false, false, g.Og, g.P, g.Cg, wk, g.Cg, 0, xk, g.P, g.C * g.P, beta, yk, g.P, g.O * g.P, g.N, FWD);
      }
    }
  } else {
    int64_t nb = chunk_images(g, es), ckk = g.Cg * g.kk;
    T *col = (T *)fa_cu_temp_alloc(dev, nb * g.C * g.kk * g.P * es);
    if (!col) return FA_ERR_MEMORY;
    rc = 0;
    for (int64_t n0 = 0; n0 < g.N && !rc; n0 += nb) {
      int64_t cnt = std::min(nb, g.N - n0);
      if ((rc = launch_im2col<T>(col, (const T *)x->data, g, n0, cnt, st))) break;
      for (int64_t k = 0; k < g.G && !rc; k++) // out_n,g (Og x P) = W_g (Og x Cg kk) @ col_n,g (Cg kk x P)
        rc = gemm(dev, dt, false, false, false, g.Og, g.P, ckk, w + k * g.Og * ckk, ckk, 0, col + k * ckk * g.P, g.P,
                  g.C * g.kk * g.P, beta, y + (n0 * g.O + k * g.Og) * g.P, g.P, g.O * g.P, cnt, FWD);
    }
    fa_cu_temp_free(dev, col);
  }
  if (rc) return rc;
  return dout.finish();
}

// ------------------------------------------------------------------ backward
template <typename T>
static int backward_t(fa_tensor *grad_x, fa_tensor *grad_weight, fa_tensor *grad_bias, const fa_tensor *grad_out,
                      const fa_tensor *x, const fa_tensor *weight, const Conv &g) {
  int dev = x->device, rc, es = (int)sizeof(T), dt = x->dtype;
  cudaStream_t st = fa_cu_stream(dev);
  DenseView dgo, dw;
  if ((rc = dgo.in(grad_out)) || (rc = dw.in(weight))) return rc;
  const T *go = dgo.p<T>(), *w = dw.p<T>();
  if (grad_bias && g.O > 0 && (rc = bias_grad<T>(grad_bias, go, g, dev))) return rc;
  if (grad_x && fa_numel(grad_x) == 0) grad_x = nullptr;
  if (grad_weight && fa_numel(grad_weight) == 0) grad_weight = nullptr;
  if (!grad_x && !grad_weight) return 0;
  // grad_weight accumulates in float32, added to grad_weight at the end
  int64_t nw = g.O * g.Cg * g.kk;
  float *gw32 = nullptr;
  if (grad_weight) {
    if (!(gw32 = (float *)fa_cu_temp_alloc(dev, nw * 4))) return FA_ERR_MEMORY;
    if ((rc = fa_cu_check(cudaMemsetAsync(gw32, 0, (size_t)nw * 4, st), BWD))) { fa_cu_temp_free(dev, gw32); return rc; }
  }
  rc = 0;
  if (is_depthwise(g)) {
    rc = dw_backward<T>(grad_x, gw32, go, (const T *)x->data, w, g, dev);
  } else if (is_pointwise(g)) {
    DenseView dx, dgx;
    if (!(rc = dx.in(x)) && !(rc = dgx.out(grad_x))) {
      const T *xp = dx.p<T>();
      T *gx = dgx.p<T>();
      if (gx && pw_packed(g, dt)) rc = pw_grad_x_packed<T>(gx, go, w, g, dev, dt);
      else
        for (int64_t k = 0; k < g.G && !rc && gx; k++) // gx_n,g (Cg x P) = W_g^T (Cg x Og) @ gout_n,g (Og x P)
          rc = gemm(dev, dt, false, true, false, g.Cg, g.P, g.Og, w + k * g.Og * g.Cg, g.Cg, 0, go + k * g.Og * g.P, g.P, g.O * g.P,
                    0.f, gx + k * g.Cg * g.P, g.P, g.C * g.P, g.N, BWD);
      if (!rc && gw32) rc = pw_grad_w<T>(gw32, go, xp, g, dev, dt);
      if (!rc) rc = dgx.finish();
    }
  } else {
    int64_t nb = chunk_images(g, es), ckk = g.Cg * g.kk, rowsz = g.C * g.kk * g.P;
    T *col = (T *)fa_cu_temp_alloc(dev, nb * rowsz * es);
    if (!col) rc = FA_ERR_MEMORY;
    for (int64_t n0 = 0; n0 < g.N && !rc; n0 += nb) {
      int64_t cnt = std::min(nb, g.N - n0);
      if (gw32) {
        if ((rc = launch_im2col<T>(col, (const T *)x->data, g, n0, cnt, st))) break;
        for (int64_t i = 0; i < cnt && !rc; i++) // gw_g (Og x Cg kk) += gout_n,g (Og x P) @ col_n,g^T (P x Cg kk)
          for (int64_t k = 0; k < g.G && !rc; k++)
            rc = gemm(dev, dt, true, false, true, g.Og, ckk, g.P, go + ((n0 + i) * g.O + k * g.Og) * g.P, g.P, 0,
                      col + i * rowsz + k * ckk * g.P, g.P, 0, 1.f, gw32 + k * g.Og * ckk, ckk, 0, 1, BWD);
      }
      if (grad_x && !rc) {
        for (int64_t k = 0; k < g.G && !rc; k++) // col_n,g (Cg kk x P) = W_g^T (Cg kk x Og) @ gout_n,g (Og x P)
          rc = gemm(dev, dt, false, true, false, ckk, g.P, g.Og, w + k * g.Og * ckk, ckk, 0, go + (n0 * g.O + k * g.Og) * g.P, g.P,
                    g.O * g.P, 0.f, col + k * ckk * g.P, g.P, rowsz, cnt, BWD);
        if (!rc) {
          int64_t planes = cnt * g.C, HW = g.H * g.W;
          dim3 grid((unsigned)std::min<int64_t>((HW + 255) / 256, 64), (unsigned)std::min<int64_t>(planes, 65535));
          if (HW < INT32_MAX) col2im<T, uint32_t><<<grid, 256, 0, st>>>((T *)grad_x->data, fa_cu_geom_of(grad_x), col, g, n0, planes);
          else col2im<T, int64_t><<<grid, 256, 0, st>>>((T *)grad_x->data, fa_cu_geom_of(grad_x), col, g, n0, planes);
          rc = fa_cu_launch_check(BWD);
        }
      }
    }
    if (col) fa_cu_temp_free(dev, col);
  }
  if (!rc && gw32) {
    add_into<T><<<fa_cu_blocks(nw, 256, dev), 256, 0, st>>>((T *)grad_weight->data, fa_cu_geom_of(grad_weight), gw32, nw);
    rc = fa_cu_launch_check(BWD);
  }
  if (gw32) fa_cu_temp_free(dev, gw32);
  return rc;
}

} // namespace

int fa_cu_conv2d_forward(fa_tensor *out, const fa_tensor *x, const fa_tensor *weight, const fa_tensor *bias,
                         const fa_conv2d_params *p) {
  if (fa_numel(out) == 0) return 0;
  Conv g = conv_of(x, weight, p);
  FA_CU_FLOAT_DISPATCH(FWD, x->dtype, forward_t<T>(out, x, weight, bias, g))
}

int fa_cu_conv2d_backward(fa_tensor *grad_x, fa_tensor *grad_weight, fa_tensor *grad_bias, const fa_tensor *grad_out,
                          const fa_tensor *x, const fa_tensor *weight, const fa_conv2d_params *p) {
  Conv g = conv_of(x, weight, p);
  if (fa_numel(grad_out) == 0) { // nothing flows back: grad_x is zero, the parameter gradients unchanged
    if (grad_x && fa_numel(grad_x) > 0) return fa_fill(grad_x, 0);
    return 0;
  }
  FA_CU_FLOAT_DISPATCH(BWD, x->dtype, backward_t<T>(grad_x, grad_weight, grad_bias, grad_out, x, weight, g))
}
