// layernorm.cu: layer normalisation over the last n = norm_size elements, on the GPU.
//
// forward:  x viewed as (rows, n); weight/bias (n) or NULL
//   mean = sum_j x / n, var = sum_j (x - mean)^2 / n, rstd = 1 / sqrt(var + eps)
//   out = (x - mean) * rstd * weight + bias; mean/rstd (rows) float32, saved for backward (may be NULL)
// backward: xhat = (x - mean) * rstd, g = grad_out * weight
//   grad_x       = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat))            (overwritten)
//   grad_weight += sum_rows grad_out * xhat, grad_bias += sum_rows grad_out      (accumulated)
//
// Storage float32, bfloat16 or float16; arithmetic float32. Rows of up to 1024 (float32) or 2048 (16-bit)
// elements: one warp per row, the row held in registers (one DRAM read of x, 16-byte loads when n allows).
// Longer rows: one block per row, re-reading the row from L1/L2 for the second pass. The weight/bias
// gradients are reduced deterministically: fixed row slices give per-slice partial sums (columns across a
// warp, so the loads coalesce), added in slice order by a second kernel. Strided views are copied to dense
// temporaries first (DenseView).
#include "dense.cuh"

namespace {

// sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result; red has 32 floats
__device__ __forceinline__ float block_sum(float v, float *red) {
  int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = fa_cu_warp_sum(v);
  __syncthreads(); // red may still be read by a previous call
  if (lane == 0) red[wid] = v;
  __syncthreads();
  float s = lane < nw ? red[lane] : 0.f;
  return fa_cu_warp_sum(s);
}

// ------------------------------------------------------------------ forward
// one warp per row; lane l holds elements (k*32 + l)*VEC .. +VEC-1 for k < NV
template <typename T, int VEC, int NV>
__global__ void __launch_bounds__(256) ln_fwd_warp(T *out, float *mean, float *rstd, const T *x, const T *w,
                                                   const T *b, int64_t rows, int n, float eps) {
  int lane = threadIdx.x & 31;
  int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T *xr = x + row * n;
  float v[NV][VEC];
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < NV; k++) {
    int j = (k * 32 + lane) * VEC;
    if (j < n) load_vec<T, VEC>(v[k], xr + j);
    else
#pragma unroll
      for (int e = 0; e < VEC; e++) v[k][e] = 0.f;
#pragma unroll
    for (int e = 0; e < VEC; e++) s += v[k][e];
  }
  float mu = fa_cu_warp_sum(s) / (float)n;
  float q = 0.f;
#pragma unroll
  for (int k = 0; k < NV; k++) {
    if ((k * 32 + lane) * VEC < n) {
#pragma unroll
      for (int e = 0; e < VEC; e++) { float d = v[k][e] - mu; q += d * d; }
    }
  }
  float rs = 1.0f / sqrtf(fa_cu_warp_sum(q) / (float)n + eps);
  if (lane == 0) {
    if (mean) mean[row] = mu;
    if (rstd) rstd[row] = rs;
  }
  T *orow = out + row * n;
#pragma unroll
  for (int k = 0; k < NV; k++) {
    int j = (k * 32 + lane) * VEC;
    if (j < n) {
      float wv[VEC], bv[VEC], o[VEC];
      if (w) load_vec<T, VEC>(wv, w + j);
      if (b) load_vec<T, VEC>(bv, b + j);
#pragma unroll
      for (int e = 0; e < VEC; e++) {
        float y = (v[k][e] - mu) * rs;
        if (w) y *= wv[e];
        if (b) y += bv[e];
        o[e] = y;
      }
      store_vec<T, VEC>(orow + j, o);
    }
  }
}

// one block per row, any n: two reading passes (mean, then squared deviations) and a writing pass
template <typename T>
__global__ void __launch_bounds__(512) ln_fwd_block(T *out, float *mean, float *rstd, const T *x, const T *w,
                                                    const T *b, int n, float eps) {
  __shared__ float red[32];
  int64_t row = blockIdx.x;
  const T *xr = x + row * n;
  T *orow = out + row * n;
  float s = 0.f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) s += fa_to_f<T>(xr[j]);
  float mu = block_sum(s, red) / (float)n;
  float q = 0.f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) { float d = fa_to_f<T>(xr[j]) - mu; q += d * d; }
  float rs = 1.0f / sqrtf(block_sum(q, red) / (float)n + eps);
  if (threadIdx.x == 0) {
    if (mean) mean[row] = mu;
    if (rstd) rstd[row] = rs;
  }
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    float y = (fa_to_f<T>(xr[j]) - mu) * rs;
    if (w) y *= fa_to_f<T>(w[j]);
    if (b) y += fa_to_f<T>(b[j]);
    orow[j] = fa_from_f<T>(y);
  }
}

// ------------------------------------------------------------------ backward: grad_x
template <typename T, int VEC, int NV>
__global__ void __launch_bounds__(256) ln_bwd_warp(T *gx, const T *gy, const T *x, const float *mean,
                                                   const float *rstd, const T *w, int64_t rows, int n) {
  int lane = threadIdx.x & 31;
  int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T *xr = x + row * n, *gr = gy + row * n;
  float mu = mean[row], rs = rstd[row];
  float xh[NV][VEC], g[NV][VEC];
  float sg = 0.f, sgx = 0.f;
#pragma unroll
  for (int k = 0; k < NV; k++) {
    int j = (k * 32 + lane) * VEC;
    if (j < n) {
      float xv[VEC], wv[VEC];
      load_vec<T, VEC>(xv, xr + j);
      load_vec<T, VEC>(g[k], gr + j);
      if (w) load_vec<T, VEC>(wv, w + j);
#pragma unroll
      for (int e = 0; e < VEC; e++) {
        xh[k][e] = (xv[e] - mu) * rs;
        if (w) g[k][e] *= wv[e];
        sg += g[k][e];
        sgx += g[k][e] * xh[k][e];
      }
    }
  }
  float mg = fa_cu_warp_sum(sg) / (float)n, mgx = fa_cu_warp_sum(sgx) / (float)n;
  T *orow = gx + row * n;
#pragma unroll
  for (int k = 0; k < NV; k++) {
    int j = (k * 32 + lane) * VEC;
    if (j < n) {
      float o[VEC];
#pragma unroll
      for (int e = 0; e < VEC; e++) o[e] = rs * (g[k][e] - mg - xh[k][e] * mgx);
      store_vec<T, VEC>(orow + j, o);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(512) ln_bwd_block(T *gx, const T *gy, const T *x, const float *mean,
                                                    const float *rstd, const T *w, int n) {
  __shared__ float red[32];
  int64_t row = blockIdx.x;
  const T *xr = x + row * n, *gr = gy + row * n;
  float mu = mean[row], rs = rstd[row];
  float sg = 0.f, sgx = 0.f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    float g = fa_to_f<T>(gr[j]) * (w ? fa_to_f<T>(w[j]) : 1.f);
    sg += g;
    sgx += g * (fa_to_f<T>(xr[j]) - mu) * rs;
  }
  float mg = block_sum(sg, red) / (float)n;
  float mgx = block_sum(sgx, red) / (float)n;
  T *orow = gx + row * n;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    float g = fa_to_f<T>(gr[j]) * (w ? fa_to_f<T>(w[j]) : 1.f);
    float xh = (fa_to_f<T>(xr[j]) - mu) * rs;
    orow[j] = fa_from_f<T>(rs * (g - mg - xh * mgx));
  }
}

// ------------------------------------------------------------------ backward: weight/bias gradients
// block (32, 8) covers 32 columns of the row slice blockIdx.y; partial sums pw/pb (slices, n)
template <typename T>
__global__ void __launch_bounds__(256) ln_param_partial(float *pw, float *pb, const T *gy, const T *x,
                                                        const float *mean, const float *rstd, int64_t rows, int n,
                                                        int64_t slice) {
  __shared__ float sw[8][33], sb[8][33];
  int tx = threadIdx.x, ty = threadIdx.y;
  int j = blockIdx.x * 32 + tx;
  int64_t r0 = (int64_t)blockIdx.y * slice, r1 = min(rows, r0 + slice);
  float aw = 0.f, ab = 0.f;
  if (j < n) {
    for (int64_t r = r0 + ty; r < r1; r += 8) {
      float g = fa_to_f<T>(gy[r * n + j]);
      if (pw) aw += g * (fa_to_f<T>(x[r * n + j]) - mean[r]) * rstd[r];
      ab += g;
    }
  }
  sw[ty][tx] = aw;
  sb[ty][tx] = ab;
  __syncthreads();
  if (ty == 0 && j < n) {
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int k = 0; k < 8; k++) { s1 += sw[k][tx]; s2 += sb[k][tx]; }
    if (pw) pw[(int64_t)blockIdx.y * n + j] = s1;
    if (pb) pb[(int64_t)blockIdx.y * n + j] = s2;
  }
}

// grad[j] += sum over slices (in slice order); grad may be a strided view
template <typename T>
__global__ void ln_param_final(T *gw, fa_cu_geom gwg, T *gb, fa_cu_geom gbg, const float *pw, const float *pb,
                               int slices, int n) {
  int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  if (gw) {
    float s = 0.f;
    for (int k = 0; k < slices; k++) s += pw[(int64_t)k * n + j];
    int64_t o = fa_cu_offset(gwg, j);
    gw[o] = fa_from_f<T>(fa_to_f<T>(gw[o]) + s);
  }
  if (gb) {
    float s = 0.f;
    for (int k = 0; k < slices; k++) s += pb[(int64_t)k * n + j];
    int64_t o = fa_cu_offset(gbg, j);
    gb[o] = fa_from_f<T>(fa_to_f<T>(gb[o]) + s);
  }
}

// ------------------------------------------------------------------ launchers

template <typename T, int VEC>
static void fwd_warp_launch(int nv, dim3 grid, cudaStream_t st, T *out, float *mean, float *rstd, const T *x,
                            const T *w, const T *b, int64_t rows, int n, float eps) {
  switch (nv) {
    case 1: ln_fwd_warp<T, VEC, 1><<<grid, 256, 0, st>>>(out, mean, rstd, x, w, b, rows, n, eps); break;
    case 2: ln_fwd_warp<T, VEC, 2><<<grid, 256, 0, st>>>(out, mean, rstd, x, w, b, rows, n, eps); break;
    case 4: ln_fwd_warp<T, VEC, 4><<<grid, 256, 0, st>>>(out, mean, rstd, x, w, b, rows, n, eps); break;
    case 8: ln_fwd_warp<T, VEC, 8><<<grid, 256, 0, st>>>(out, mean, rstd, x, w, b, rows, n, eps); break;
    case 16: if (VEC == 1) ln_fwd_warp<T, 1, 16><<<grid, 256, 0, st>>>(out, mean, rstd, x, w, b, rows, n, eps); break;
    case 32: if (VEC == 1) ln_fwd_warp<T, 1, 32><<<grid, 256, 0, st>>>(out, mean, rstd, x, w, b, rows, n, eps); break;
  }
}
template <typename T, int VEC>
static void bwd_warp_launch(int nv, dim3 grid, cudaStream_t st, T *gx, const T *gy, const T *x, const float *mean,
                            const float *rstd, const T *w, int64_t rows, int n) {
  switch (nv) {
    case 1: ln_bwd_warp<T, VEC, 1><<<grid, 256, 0, st>>>(gx, gy, x, mean, rstd, w, rows, n); break;
    case 2: ln_bwd_warp<T, VEC, 2><<<grid, 256, 0, st>>>(gx, gy, x, mean, rstd, w, rows, n); break;
    case 4: ln_bwd_warp<T, VEC, 4><<<grid, 256, 0, st>>>(gx, gy, x, mean, rstd, w, rows, n); break;
    case 8: ln_bwd_warp<T, VEC, 8><<<grid, 256, 0, st>>>(gx, gy, x, mean, rstd, w, rows, n); break;
    case 16: if (VEC == 1) ln_bwd_warp<T, 1, 16><<<grid, 256, 0, st>>>(gx, gy, x, mean, rstd, w, rows, n); break;
    case 32: if (VEC == 1) ln_bwd_warp<T, 1, 32><<<grid, 256, 0, st>>>(gx, gy, x, mean, rstd, w, rows, n); break;
  }
}

template <typename T>
static int forward_t(const DenseView &out, float *mean, float *rstd, const DenseView &x, const DenseView &w,
                     const DenseView &b, int64_t rows, int64_t n, float eps, int dev) {
  static const char *fn = "fa_layernorm_forward";
  cudaStream_t st = fa_cu_stream(dev);
  const int V = 16 / (int)sizeof(T);
  const void *ptrs[4] = {out.t.data, x.t.data, w.t.data, b.t.data};
  int vec = vec_ok<T>(n, ptrs, 4);
  int nv = vec ? pick_nv(n, V, 8) : pick_nv(n, 1, 32);
  if (nv) {
    dim3 grid((unsigned)((rows + 7) / 8));
    if (vec) fwd_warp_launch<T, 16 / sizeof(T)>(nv, grid, st, out.p<T>(), mean, rstd, x.p<T>(), w.p<T>(), b.p<T>(), rows, (int)n, eps);
    else fwd_warp_launch<T, 1>(nv, grid, st, out.p<T>(), mean, rstd, x.p<T>(), w.p<T>(), b.p<T>(), rows, (int)n, eps);
  } else {
    ln_fwd_block<T><<<(unsigned)rows, 512, 0, st>>>(out.p<T>(), mean, rstd, x.p<T>(), w.p<T>(), b.p<T>(), (int)n, eps);
  }
  return fa_cu_launch_check(fn);
}

template <typename T>
static int backward_t(const DenseView &gx, fa_tensor *grad_weight, fa_tensor *grad_bias, const DenseView &gy,
                      const DenseView &x, const float *mean, const float *rstd, const DenseView &w, int64_t rows,
                      int64_t n, int dev) {
  static const char *fn = "fa_layernorm_backward";
  cudaStream_t st = fa_cu_stream(dev);
  int rc;
  if (gx.t.data) {
    const int V = 16 / (int)sizeof(T);
    const void *ptrs[4] = {gx.t.data, gy.t.data, x.t.data, w.t.data};
    int vec = vec_ok<T>(n, ptrs, 4);
    int nv = vec ? pick_nv(n, V, 8) : pick_nv(n, 1, 32);
    if (nv) {
      dim3 grid((unsigned)((rows + 7) / 8));
      if (vec) bwd_warp_launch<T, 16 / sizeof(T)>(nv, grid, st, gx.p<T>(), gy.p<T>(), x.p<T>(), mean, rstd, w.p<T>(), rows, (int)n);
      else bwd_warp_launch<T, 1>(nv, grid, st, gx.p<T>(), gy.p<T>(), x.p<T>(), mean, rstd, w.p<T>(), rows, (int)n);
    } else {
      ln_bwd_block<T><<<(unsigned)rows, 512, 0, st>>>(gx.p<T>(), gy.p<T>(), x.p<T>(), mean, rstd, w.p<T>(), (int)n);
    }
    if ((rc = fa_cu_launch_check(fn))) return rc;
  }
  if (!grad_weight && !grad_bias) return 0;
  // row slices: enough blocks to fill the device, at least 8 rows each; fixed for a given shape and device
  int64_t colb = (n + 31) / 32;
  int64_t slices = (4 * (int64_t)fa_cu_sm_count(dev) + colb - 1) / colb;
  if (slices > (rows + 7) / 8) slices = (rows + 7) / 8;
  if (slices > 1024) slices = 1024;
  if (slices < 1) slices = 1;
  int64_t slice = (rows + slices - 1) / slices;
  slices = (rows + slice - 1) / slice;
  float *part = (float *)fa_cu_temp_alloc(dev, 2 * slices * n * (int64_t)sizeof(float));
  if (!part) return FA_ERR_MEMORY;
  float *pw = grad_weight ? part : nullptr, *pb = grad_bias ? part + slices * n : nullptr;
  ln_param_partial<T><<<dim3((unsigned)colb, (unsigned)slices), dim3(32, 8), 0, st>>>(pw, pb, gy.p<T>(), x.p<T>(), mean,
                                                                                      rstd, rows, (int)n, slice);
  rc = fa_cu_launch_check(fn);
  if (!rc) {
    fa_cu_geom gwg = grad_weight ? fa_cu_geom_of(grad_weight) : fa_cu_geom{}, gbg = grad_bias ? fa_cu_geom_of(grad_bias) : fa_cu_geom{};
    ln_param_final<T><<<(unsigned)((n + 255) / 256), 256, 0, st>>>(grad_weight ? (T *)grad_weight->data : nullptr, gwg,
                                                                   grad_bias ? (T *)grad_bias->data : nullptr, gbg, pw,
                                                                   pb, (int)slices, (int)n);
    rc = fa_cu_launch_check(fn);
  }
  fa_cu_temp_free(dev, part);
  return rc;
}

} // namespace

int fa_cu_layernorm_forward(fa_tensor *out, fa_tensor *mean, fa_tensor *rstd, const fa_tensor *x,
                            const fa_tensor *weight, const fa_tensor *bias, int64_t norm_size, double eps) {
  static const char *fn = "fa_layernorm_forward";
  int64_t n = norm_size, rows = fa_numel(x) / n;
  if (rows == 0) return 0;
  if (n > INT32_MAX) return fa_error(FA_ERR_UNSUPPORTED, "%s: norm_size %lld is too large for the GPU kernels", fn, (long long)n);
  int dev = x->device, rc;
  DenseView dx, dout, dw, db, dm, dr;
  if ((rc = dx.in(x)) || (rc = dw.in(weight)) || (rc = db.in(bias)) || (rc = dout.out(out)) || (rc = dm.out(mean)) ||
      (rc = dr.out(rstd)))
    return rc;
  float *m = dm.p<float>(), *r = dr.p<float>();
  switch (x->dtype) {
    case FA_FLOAT32: rc = forward_t<float>(dout, m, r, dx, dw, db, rows, n, (float)eps, dev); break;
    case FA_BFLOAT16: rc = forward_t<__nv_bfloat16>(dout, m, r, dx, dw, db, rows, n, (float)eps, dev); break;
    case FA_FLOAT16: rc = forward_t<__half>(dout, m, r, dx, dw, db, rows, n, (float)eps, dev); break;
    default: return fa_error(FA_ERR_UNSUPPORTED, "%s: dtype %s is not supported on CUDA", fn, fa_dtype_name(x->dtype));
  }
  if (rc || (rc = dout.finish()) || (rc = dm.finish()) || (rc = dr.finish())) return rc;
  return 0;
}

int fa_cu_layernorm_backward(fa_tensor *grad_x, fa_tensor *grad_weight, fa_tensor *grad_bias,
                             const fa_tensor *grad_out, const fa_tensor *x, const fa_tensor *mean,
                             const fa_tensor *rstd, const fa_tensor *weight, int64_t norm_size) {
  static const char *fn = "fa_layernorm_backward";
  int64_t n = norm_size, rows = fa_numel(x) / n;
  if (rows == 0 || (!grad_x && !grad_weight && !grad_bias)) return 0;
  if (n > INT32_MAX) return fa_error(FA_ERR_UNSUPPORTED, "%s: norm_size %lld is too large for the GPU kernels", fn, (long long)n);
  int dev = x->device, rc;
  DenseView dgx, dgy, dx, dm, dr, dw;
  if ((rc = dgy.in(grad_out)) || (rc = dx.in(x)) || (rc = dm.in(mean)) || (rc = dr.in(rstd)) || (rc = dw.in(weight)) ||
      (rc = dgx.out(grad_x)))
    return rc;
  const float *m = dm.p<float>(), *r = dr.p<float>();
  switch (x->dtype) {
    case FA_FLOAT32: rc = backward_t<float>(dgx, grad_weight, grad_bias, dgy, dx, m, r, dw, rows, n, dev); break;
    case FA_BFLOAT16: rc = backward_t<__nv_bfloat16>(dgx, grad_weight, grad_bias, dgy, dx, m, r, dw, rows, n, dev); break;
    case FA_FLOAT16: rc = backward_t<__half>(dgx, grad_weight, grad_bias, dgy, dx, m, r, dw, rows, n, dev); break;
    default: return fa_error(FA_ERR_UNSUPPORTED, "%s: dtype %s is not supported on CUDA", fn, fa_dtype_name(x->dtype));
  }
  if (rc || (rc = dgx.finish())) return rc;
  return 0;
}
