// softmax.cu: softmax and log-softmax over one dimension, on the GPU.
//
// x viewed as (outer, D, inner) around dim:
//   forward:  y = exp(x - max) / sum exp(x - max)         log: y = x - max - log(sum exp(x - max))
//   backward: grad_x = y * (g - sum_k g*y)                 log: grad_x = g - exp(y) * sum_k g
//   (y the forward output, g = grad_out, sums along dim)
//
// Storage float32, bfloat16 or float16; arithmetic float32. Paths (tensors made dense first when strided):
//   dim innermost, D <= 1024 (2048 for 16-bit): one warp per row, the row in registers, 16-byte loads:
//     one DRAM read and one write per element;
//   dim innermost, longer rows: one block per row, running (max, sum) in one pass, then a writing pass;
//   dim not innermost: one thread per (outer, inner) line, adjacent threads on adjacent inner positions so
//     every load along dim is coalesced.
#include "dense.cuh"

namespace {

// ------------------------------------------------------------------ warp per row
template <typename T, int VEC, int NV, bool LOG>
__global__ void __launch_bounds__(256) sm_fwd_warp(T *y, const T *x, int64_t rows, int D) {
  int lane = threadIdx.x & 31;
  int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T *xr = x + row * D;
  float v[NV][VEC];
  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < NV; k++) {
    int j = (k * 32 + lane) * VEC;
    if (j < D) load_vec<T, VEC>(v[k], xr + j);
    else
#pragma unroll
      for (int e = 0; e < VEC; e++) v[k][e] = -INFINITY;
#pragma unroll
    for (int e = 0; e < VEC; e++) m = fmaxf(m, v[k][e]);
  }
  m = fa_cu_warp_max(m);
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < NV; k++) {
    if ((k * 32 + lane) * VEC < D) {
#pragma unroll
      for (int e = 0; e < VEC; e++) {
        float ex = expf(v[k][e] - m);
        s += ex;
        if (!LOG) v[k][e] = ex;
      }
    }
  }
  s = fa_cu_warp_sum(s);
  float c = LOG ? m + logf(s) : 1.f / s;
  T *yr = y + row * D;
#pragma unroll
  for (int k = 0; k < NV; k++) {
    int j = (k * 32 + lane) * VEC;
    if (j < D) {
      float o[VEC];
#pragma unroll
      for (int e = 0; e < VEC; e++) o[e] = LOG ? v[k][e] - c : v[k][e] * c;
      store_vec<T, VEC>(yr + j, o);
    }
  }
}

template <typename T, int VEC, int NV, bool LOG>
__global__ void __launch_bounds__(256) sm_bwd_warp(T *gx, const T *g, const T *y, int64_t rows, int D) {
  int lane = threadIdx.x & 31;
  int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T *gr = g + row * D, *yr = y + row * D;
  float gv[NV][VEC], yv[NV][VEC];
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < NV; k++) {
    int j = (k * 32 + lane) * VEC;
    if (j < D) {
      load_vec<T, VEC>(gv[k], gr + j);
      load_vec<T, VEC>(yv[k], yr + j);
#pragma unroll
      for (int e = 0; e < VEC; e++) s += LOG ? gv[k][e] : gv[k][e] * yv[k][e];
    }
  }
  s = fa_cu_warp_sum(s);
  T *o = gx + row * D;
#pragma unroll
  for (int k = 0; k < NV; k++) {
    int j = (k * 32 + lane) * VEC;
    if (j < D) {
      float r[VEC];
#pragma unroll
      for (int e = 0; e < VEC; e++) r[e] = LOG ? gv[k][e] - expf(yv[k][e]) * s : yv[k][e] * (gv[k][e] - s);
      store_vec<T, VEC>(o + j, r);
    }
  }
}

// ------------------------------------------------------------------ block per row (long rows)
template <typename T, bool LOG>
__global__ void __launch_bounds__(512) sm_fwd_block(T *y, const T *x, int64_t D) {
  __shared__ float rm[32], rs[32];
  const T *xr = x + (int64_t)blockIdx.x * D;
  T *yr = y + (int64_t)blockIdx.x * D;
  float m = -INFINITY, s = 0.f;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) online_add(m, s, fa_to_f<T>(xr[j]));
  for (int o = 16; o > 0; o >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    online_merge(m, s, m2, s2);
  }
  int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) { rm[wid] = m; rs[wid] = s; }
  __syncthreads();
  m = rm[0];
  s = rs[0];
  for (int k = 1; k < nw; k++) online_merge(m, s, rm[k], rs[k]); // same order in every thread
  float c = LOG ? m + logf(s) : 1.f / s;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    float v = fa_to_f<T>(xr[j]);
    yr[j] = fa_from_f<T>(LOG ? v - c : expf(v - m) * c);
  }
}

template <typename T, bool LOG>
__global__ void __launch_bounds__(512) sm_bwd_block(T *gx, const T *g, const T *y, int64_t D) {
  __shared__ float red[32];
  int64_t base = (int64_t)blockIdx.x * D;
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x)
    s += LOG ? fa_to_f<T>(g[base + j]) : fa_to_f<T>(g[base + j]) * fa_to_f<T>(y[base + j]);
  s = fa_cu_warp_sum(s);
  int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) red[wid] = s;
  __syncthreads();
  s = 0.f;
  for (int k = 0; k < nw; k++) s += red[k];
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    float gv = fa_to_f<T>(g[base + j]), yv = fa_to_f<T>(y[base + j]);
    gx[base + j] = fa_from_f<T>(LOG ? gv - expf(yv) * s : yv * (gv - s));
  }
}

// ------------------------------------------------------------------ dim not innermost: thread per line
template <typename T, bool LOG>
__global__ void __launch_bounds__(256) sm_fwd_col(T *y, const T *x, int64_t outer, int64_t D, int64_t inner) {
  int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= outer * inner) return;
  int64_t o = t / inner, i = t - o * inner;
  int64_t base = o * D * inner + i;
  float m = -INFINITY, s = 0.f;
  for (int64_t k = 0; k < D; k++) online_add(m, s, fa_to_f<T>(x[base + k * inner]));
  float c = LOG ? m + logf(s) : 1.f / s;
  for (int64_t k = 0; k < D; k++) {
    float v = fa_to_f<T>(x[base + k * inner]);
    y[base + k * inner] = fa_from_f<T>(LOG ? v - c : expf(v - m) * c);
  }
}

template <typename T, bool LOG>
__global__ void __launch_bounds__(256) sm_bwd_col(T *gx, const T *g, const T *y, int64_t outer, int64_t D,
                                                  int64_t inner) {
  int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= outer * inner) return;
  int64_t o = t / inner, i = t - o * inner;
  int64_t base = o * D * inner + i;
  float s = 0.f;
  for (int64_t k = 0; k < D; k++) {
    int64_t e = base + k * inner;
    s += LOG ? fa_to_f<T>(g[e]) : fa_to_f<T>(g[e]) * fa_to_f<T>(y[e]);
  }
  for (int64_t k = 0; k < D; k++) {
    int64_t e = base + k * inner;
    float gv = fa_to_f<T>(g[e]), yv = fa_to_f<T>(y[e]);
    gx[e] = fa_from_f<T>(LOG ? gv - expf(yv) * s : yv * (gv - s));
  }
}

// ------------------------------------------------------------------ launchers
struct Geom { int64_t outer, D, inner; };
static Geom geom_of(const fa_tensor *t, int dim) {
  Geom g{1, 1, 1};
  if (t->ndim == 0) return g;
  for (int d = 0; d < dim; d++) g.outer *= t->shape[d];
  for (int d = dim + 1; d < t->ndim; d++) g.inner *= t->shape[d];
  g.D = t->shape[dim];
  return g;
}

#define SM_NV_CASES(KERNEL, VEC, LOG, ...)                                                        \
  switch (nv) {                                                                                   \
    case 1: KERNEL<T, VEC, 1, LOG><<<grid, 256, 0, st>>>(__VA_ARGS__); break;                     \
    case 2: KERNEL<T, VEC, 2, LOG><<<grid, 256, 0, st>>>(__VA_ARGS__); break;                     \
    case 4: KERNEL<T, VEC, 4, LOG><<<grid, 256, 0, st>>>(__VA_ARGS__); break;                     \
    case 8: KERNEL<T, VEC, 8, LOG><<<grid, 256, 0, st>>>(__VA_ARGS__); break;                     \
    case 16: if (VEC == 1) KERNEL<T, 1, 16, LOG><<<grid, 256, 0, st>>>(__VA_ARGS__); break;       \
    case 32: if (VEC == 1) KERNEL<T, 1, 32, LOG><<<grid, 256, 0, st>>>(__VA_ARGS__); break;       \
  }

template <typename T, int VEC, bool LOG>
static void fwd_warp(int nv, dim3 grid, cudaStream_t st, T *y, const T *x, int64_t rows, int D) {
  SM_NV_CASES(sm_fwd_warp, VEC, LOG, y, x, rows, D)
}
template <typename T, int VEC, bool LOG>
static void bwd_warp(int nv, dim3 grid, cudaStream_t st, T *gx, const T *g, const T *y, int64_t rows, int D) {
  SM_NV_CASES(sm_bwd_warp, VEC, LOG, gx, g, y, rows, D)
}

template <typename T, bool LOG>
static int forward_t(T *y, const T *x, Geom g, int dev) {
  cudaStream_t st = fa_cu_stream(dev);
  if (g.inner == 1) {
    const void *ptrs[2] = {y, x};
    int vec = vec_ok<T>(g.D, ptrs, 2);
    int nv = vec ? pick_nv(g.D, 16 / (int)sizeof(T), 8) : pick_nv(g.D, 1, 32);
    dim3 grid((unsigned)((g.outer + 7) / 8));
    if (nv && vec) fwd_warp<T, 16 / sizeof(T), LOG>(nv, grid, st, y, x, g.outer, (int)g.D);
    else if (nv) fwd_warp<T, 1, LOG>(nv, grid, st, y, x, g.outer, (int)g.D);
    else sm_fwd_block<T, LOG><<<(unsigned)g.outer, 512, 0, st>>>(y, x, g.D);
  } else {
    sm_fwd_col<T, LOG><<<(unsigned)((g.outer * g.inner + 255) / 256), 256, 0, st>>>(y, x, g.outer, g.D, g.inner);
  }
  return fa_cu_launch_check("fa_softmax_forward");
}

template <typename T, bool LOG>
static int backward_t(T *gx, const T *gy, const T *y, Geom g, int dev) {
  cudaStream_t st = fa_cu_stream(dev);
  if (g.inner == 1) {
    const void *ptrs[3] = {gx, gy, y};
    int vec = vec_ok<T>(g.D, ptrs, 3);
    int nv = vec ? pick_nv(g.D, 16 / (int)sizeof(T), 8) : pick_nv(g.D, 1, 32);
    dim3 grid((unsigned)((g.outer + 7) / 8));
    if (nv && vec) bwd_warp<T, 16 / sizeof(T), LOG>(nv, grid, st, gx, gy, y, g.outer, (int)g.D);
    else if (nv) bwd_warp<T, 1, LOG>(nv, grid, st, gx, gy, y, g.outer, (int)g.D);
    else sm_bwd_block<T, LOG><<<(unsigned)g.outer, 512, 0, st>>>(gx, gy, y, g.D);
  } else {
    sm_bwd_col<T, LOG><<<(unsigned)((g.outer * g.inner + 255) / 256), 256, 0, st>>>(gx, gy, y, g.outer, g.D, g.inner);
  }
  return fa_cu_launch_check("fa_softmax_backward");
}

template <typename T> static int forward_d(T *y, const T *x, Geom g, int log, int dev) {
  return log ? forward_t<T, true>(y, x, g, dev) : forward_t<T, false>(y, x, g, dev);
}
template <typename T> static int backward_d(T *gx, const T *gy, const T *y, Geom g, int log, int dev) {
  return log ? backward_t<T, true>(gx, gy, y, g, dev) : backward_t<T, false>(gx, gy, y, g, dev);
}

} // namespace

int fa_cu_softmax_forward(fa_tensor *out, const fa_tensor *x, int dim, int log) {
  if (fa_numel(x) == 0) return 0;
  Geom g = geom_of(x, dim);
  DenseView dx, dy;
  int rc;
  if ((rc = dx.in(x)) || (rc = dy.out(out))) return rc;
  switch (x->dtype) {
    case FA_FLOAT32: rc = forward_d<float>(dy.p<float>(), dx.p<float>(), g, log, x->device); break;
    case FA_BFLOAT16: rc = forward_d<__nv_bfloat16>(dy.p<__nv_bfloat16>(), dx.p<__nv_bfloat16>(), g, log, x->device); break;
    case FA_FLOAT16: rc = forward_d<__half>(dy.p<__half>(), dx.p<__half>(), g, log, x->device); break;
    default: return fa_error(FA_ERR_UNSUPPORTED, "fa_softmax_forward: dtype %s is not supported on CUDA", fa_dtype_name(x->dtype));
  }
  return rc ? rc : dy.finish();
}

int fa_cu_softmax_backward(fa_tensor *grad_x, const fa_tensor *grad_out, const fa_tensor *out, int dim, int log) {
  if (fa_numel(out) == 0) return 0;
  Geom g = geom_of(out, dim);
  DenseView dgy, dy, dgx;
  int rc;
  if ((rc = dgy.in(grad_out)) || (rc = dy.in(out)) || (rc = dgx.out(grad_x))) return rc;
  switch (out->dtype) {
    case FA_FLOAT32: rc = backward_d<float>(dgx.p<float>(), dgy.p<float>(), dy.p<float>(), g, log, out->device); break;
    case FA_BFLOAT16:
      rc = backward_d<__nv_bfloat16>(dgx.p<__nv_bfloat16>(), dgy.p<__nv_bfloat16>(), dy.p<__nv_bfloat16>(), g, log, out->device);
      break;
    case FA_FLOAT16: rc = backward_d<__half>(dgx.p<__half>(), dgy.p<__half>(), dy.p<__half>(), g, log, out->device); break;
    default: return fa_error(FA_ERR_UNSUPPORTED, "fa_softmax_backward: dtype %s is not supported on CUDA", fa_dtype_name(out->dtype));
  }
  return rc ? rc : dgx.finish();
}
