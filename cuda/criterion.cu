// criterion.cu: mean-squared error and cross-entropy losses on the GPU, the arithmetic of c/criterion.c.
//
// mse:  x, target (any shape) -> loss: (x - t)^2 (none), its sum (sum) or mean (mean)
//       backward: grad_x = 2 (x - t) * grad_loss (elementwise for none; / numel for mean)
//       Elementwise terms are formed in double and rounded once, as on the CPU.
// cross_entropy: logits (N, C, d1, ...), target int64 (N, d1, ...) class indices
//       per position: lse = log sum_c exp(x_c); loss = (1 - ls) (lse - x_t) + ls * mean_c (lse - x_c);
//       ignored positions (target == ignore_index) give 0 and do not count; mean divides by the count.
//       backward: grad_x_c = s * (softmax_c - ls / C - (1 - ls) [c == t]), s = grad_loss of the position
//       (none), grad_loss (sum) or grad_loss / count (mean); 0 for ignored positions.
//       Targets outside [0, C) that are not ignore_index are an error before anything is written: a check
//       kernel counts them and the host reads the count (one stream synchronisation per call; the count of
//       valid positions, needed by mean, comes back with it).
// Reductions: a fixed number of blocks (a function of the size only) writes double partial sums that one
// block adds in order: deterministic, on every device. Storage float32, bfloat16 or float16; any strides
// (strided logits, targets and losses go through dense temporaries).
#include "dense.cuh"

namespace {

enum { RED_THREADS = 256, RED_MAX_BLOCKS = 1024 };

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// block-wide double sum (fixed tree: deterministic); thread 0 gets the result
__device__ __forceinline__ double block_sum_d(double v) {
  __shared__ double red[RED_THREADS / 32];
  v = warp_sum_d(v);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  double s = 0;
  if (threadIdx.x == 0)
    for (int k = 0; k < RED_THREADS / 32; k++) s += red[k];
  return s;
}

// blocks for a reduction of n terms: a function of n only, so results do not depend on the device
static unsigned red_blocks(int64_t n) {
  int64_t b = (n + 4 * RED_THREADS - 1) / (4 * RED_THREADS);
  if (b > RED_MAX_BLOCKS) b = RED_MAX_BLOCKS;
  return (unsigned)(b < 1 ? 1 : b);
}

// out[0] = (sum of part[0..nb)) * mul, rounded to T
template <typename T> __global__ void __launch_bounds__(RED_THREADS) finish_sum(T *out, const double *part, int nb, double mul) {
  double s = 0;
  for (int k = threadIdx.x; k < nb; k += RED_THREADS) s += part[k];
  s = block_sum_d(s);
  if (threadIdx.x == 0) out[0] = fa_from_f<T>((float)(s * mul));
}

// ================================================================== MSE
template <typename T>
__global__ void __launch_bounds__(RED_THREADS) mse_none(T *loss, const T *x, const T *t, fa_cu_iter<3> it, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t off[3];
    fa_cu_iter_offsets<int64_t, 3>(it, i, off);
    double d = (double)fa_to_f<T>(x[off[1]]) - (double)fa_to_f<T>(t[off[2]]);
    loss[off[0]] = fa_from_f<T>((float)(d * d));
  }
}

template <typename T>
__global__ void __launch_bounds__(RED_THREADS) mse_partial(double *part, const T *x, const T *t, fa_cu_iter<3> it, int64_t n) {
  double s = 0;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t off[3];
    fa_cu_iter_offsets<int64_t, 3>(it, i, off);
    double d = (double)fa_to_f<T>(x[off[1]]) - (double)fa_to_f<T>(t[off[2]]);
    s += d * d;
  }
  s = block_sum_d(s);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}

// gl: grad_loss (one element, or elementwise through offset slot 3)
template <typename T>
__global__ void __launch_bounds__(RED_THREADS) mse_bwd(T *gx, const T *gl, const T *x, const T *t, fa_cu_iter<4> it,
                                                      int64_t n, int elementwise, double div) {
  double g1 = elementwise ? 0.0 : 2.0 * (double)fa_to_f<T>(gl[0]) / div;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t off[4];
    fa_cu_iter_offsets<int64_t, 4>(it, i, off);
    double d = (double)fa_to_f<T>(x[off[1]]) - (double)fa_to_f<T>(t[off[2]]);
    double g = elementwise ? 2.0 * (double)fa_to_f<T>(gl[off[3]]) : g1;
    gx[off[0]] = fa_from_f<T>((float)(d * g));
  }
}

template <typename T> static int mse_forward_t(fa_tensor *loss, const fa_tensor *x, const fa_tensor *target, int reduction) {
  static const char *fn = "fa_mse_forward";
  int dev = x->device, rc;
  cudaStream_t st = fa_cu_stream(dev);
  int64_t n = fa_numel(x);
  if (reduction == FA_REDUCE_NONE) {
    if (n == 0) return 0;
    const fa_tensor *ts[3] = {loss, x, target};
    mse_none<T><<<fa_cu_blocks(n, RED_THREADS, dev), RED_THREADS, 0, st>>>((T *)loss->data, (const T *)x->data,
                                                                         (const T *)target->data, fa_cu_iter_make<3>(ts), n);
    return fa_cu_launch_check(fn);
  }
  unsigned nb = red_blocks(n);
  double *part = (double *)fa_cu_temp_alloc(dev, nb * 8);
  if (!part) return FA_ERR_MEMORY;
  const fa_tensor *ts[3] = {x, x, target};
  mse_partial<T><<<nb, RED_THREADS, 0, st>>>(part, (const T *)x->data, (const T *)target->data, fa_cu_iter_make<3>(ts), n);
  if (!(rc = fa_cu_launch_check(fn))) {
    // mean of nothing is NaN, as the CPU (0 / 0)
    finish_sum<T><<<1, RED_THREADS, 0, st>>>((T *)loss->data, part, (int)nb, reduction == FA_REDUCE_MEAN ? 1.0 / (double)n : 1.0);
    rc = fa_cu_launch_check(fn);
  }
  fa_cu_temp_free(dev, part);
  return rc;
}

template <typename T>
static int mse_backward_t(fa_tensor *grad_x, const fa_tensor *grad_loss, const fa_tensor *x, const fa_tensor *target, int reduction) {
  int dev = x->device;
  int64_t n = fa_numel(x);
  if (n == 0) return 0;
  int ew = reduction == FA_REDUCE_NONE;
  const fa_tensor *ts[4] = {grad_x, x, target, ew ? grad_loss : x};
  mse_bwd<T><<<fa_cu_blocks(n, RED_THREADS, dev), RED_THREADS, 0, fa_cu_stream(dev)>>>(
      (T *)grad_x->data, (const T *)grad_loss->data, (const T *)x->data, (const T *)target->data, fa_cu_iter_make<4>(ts), n,
      ew, reduction == FA_REDUCE_MEAN ? (double)n : 1.0);
  return fa_cu_launch_check("fa_mse_backward");
}

// ================================================================== cross-entropy
struct CeArgs {
  int64_t M, C, inner; // positions, classes, positions per sample (d1 * d2 * ...)
  int64_t ignore_index;
  float ls;
};

// counts valid targets and out-of-range ones; first bad position via atomicMin
__global__ void ce_check_kernel(unsigned long long *st, const int64_t *target, int64_t M, int64_t C, int64_t ignore) {
  unsigned long long valid = 0;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < M; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t t = target[i];
    if (t == ignore) continue;
    if (t < 0 || t >= C) { atomicAdd(&st[1], 1ull); atomicMin(&st[2], (unsigned long long)i); }
    else valid++;
  }
  for (int o = 16; o > 0; o >>= 1) valid += __shfl_xor_sync(0xffffffffu, valid, o);
  if ((threadIdx.x & 31) == 0 && valid) atomicAdd(&st[0], valid);
}

// base offset of position i in dense (N, C, inner) logits
__device__ __forceinline__ int64_t ce_base(const CeArgs &a, int64_t i) {
  int64_t nn = i / a.inner, r = i - nn * a.inner;
  return nn * a.C * a.inner + r;
}

// per-position loss (float) into lp. Warp per position when inner == 1 (rows of C contiguous), else one
// thread per position looping over classes (coalesced across positions).
template <typename T, bool WARP>
__global__ void __launch_bounds__(256) ce_loss(float *lp, const T *x, const int64_t *target, CeArgs a) {
  int64_t i;
  int lane = threadIdx.x & 31, step = 1;
  if (WARP) { i = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); step = 32; }
  else { i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; lane = 0; }
  if (i >= a.M) return;
  int64_t t = target[i];
  if (t == a.ignore_index) { if (lane == 0) lp[i] = 0.f; return; }
  int64_t base = ce_base(a, i), cs = a.inner;
  float m = -INFINITY, s = 0.f, sum = 0.f;
  for (int64_t c = lane; c < a.C; c += step) {
    float v = fa_to_f<T>(x[base + c * cs]);
    online_add(m, s, v);
    sum += v;
  }
  if (WARP) {
    for (int o = 16; o > 0; o >>= 1) {
      float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      online_merge(m, s, m2, s2);
      sum += __shfl_xor_sync(0xffffffffu, sum, o);
    }
  }
  if (lane != 0) return;
  float lse = m + logf(s);
  float xt = (t >= 0 && t < a.C) ? fa_to_f<T>(x[base + t * cs]) : NAN;
  float nll = lse - xt;
  lp[i] = a.ls == 0.f ? nll : (1.f - a.ls) * nll + a.ls * (lse - sum / (float)a.C);
}

template <typename T> __global__ void ce_store_none(T *loss, const float *lp, int64_t M) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < M; i += (int64_t)gridDim.x * blockDim.x)
    loss[i] = fa_from_f<T>(lp[i]);
}
__global__ void __launch_bounds__(RED_THREADS) ce_partial(double *part, const float *lp, int64_t M) {
  double s = 0;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < M; i += (int64_t)gridDim.x * blockDim.x) s += lp[i];
  s = block_sum_d(s);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}

// gl: grad_loss, elementwise (dense, M) or one element scaled by mul
template <typename T, bool WARP>
__global__ void __launch_bounds__(256) ce_grad(T *gx, const T *x, const int64_t *target, const T *gl, int elementwise,
                                              float mul, CeArgs a) {
  int64_t i;
  int lane = threadIdx.x & 31, step = 1;
  if (WARP) { i = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); step = 32; }
  else { i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; lane = 0; }
  if (i >= a.M) return;
  int64_t t = target[i];
  int64_t base = ce_base(a, i), cs = a.inner;
  if (t == a.ignore_index) {
    for (int64_t c = lane; c < a.C; c += step) gx[base + c * cs] = fa_from_f<T>(0.f);
    return;
  }
  float m = -INFINITY, s = 0.f;
  for (int64_t c = lane; c < a.C; c += step) online_add(m, s, fa_to_f<T>(x[base + c * cs]));
  if (WARP) {
    for (int o = 16; o > 0; o >>= 1) {
      float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      online_merge(m, s, m2, s2);
    }
  }
  float inv = 1.f / s, off = a.ls / (float)a.C;
  float scale = elementwise ? fa_to_f<T>(gl[i]) : fa_to_f<T>(gl[0]) * mul;
  for (int64_t c = lane; c < a.C; c += step) {
    float p = expf(fa_to_f<T>(x[base + c * cs]) - m) * inv;
    gx[base + c * cs] = fa_from_f<T>(scale * (p - off - (c == t ? 1.f - a.ls : 0.f)));
  }
}

// the check kernel and the host read: returns the number of counted positions in *count
static int ce_check(const char *fn, const int64_t *target, int64_t M, int64_t C, int64_t ignore, int dev, int64_t *count) {
  cudaStream_t st = fa_cu_stream(dev);
  unsigned long long *d = (unsigned long long *)fa_cu_temp_alloc(dev, 3 * 8);
  if (!d) return FA_ERR_MEMORY;
  unsigned long long h[3] = {0, 0, ~0ull};
  int rc = fa_cu_check(cudaMemcpyAsync(d, h, sizeof h, cudaMemcpyHostToDevice, st), fn);
  if (!rc && M > 0) {
    ce_check_kernel<<<fa_cu_blocks(M, 256, dev), 256, 0, st>>>(d, target, M, C, ignore);
    rc = fa_cu_launch_check(fn);
  }
  if (!rc) rc = fa_cu_check(cudaMemcpyAsync(h, d, sizeof h, cudaMemcpyDeviceToHost, st), fn);
  if (!rc) rc = fa_cu_check(cudaStreamSynchronize(st), fn);
  int64_t bad_value = 0;
  if (!rc && h[1]) rc = fa_cu_check(cudaMemcpy(&bad_value, target + h[2], 8, cudaMemcpyDeviceToHost), fn);
  fa_cu_temp_free(dev, d);
  if (rc) return rc;
  if (h[1])
    return fa_error(FA_ERR_ARG, "%s: argument 'target': class index %lld at position %lld is out of range [0, %lld) (ignore_index %lld)",
                    fn, (long long)bad_value, (long long)h[2], (long long)C, (long long)ignore);
  *count = (int64_t)h[0];
  return 0;
}

static CeArgs ce_args(const fa_tensor *logits, const fa_tensor *target, int64_t ignore, double ls) {
  CeArgs a;
  a.M = fa_numel(target);
  a.C = logits->shape[1];
  a.inner = 1;
  for (int d = 2; d < logits->ndim; d++) a.inner *= logits->shape[d];
  a.ignore_index = ignore;
  a.ls = (float)ls;
  return a;
}

template <typename T>
static int ce_forward_t(fa_tensor *loss, const fa_tensor *logits, const fa_tensor *target, int64_t ignore, double ls,
                        int reduction) {
  static const char *fn = "fa_cross_entropy_forward";
  int dev = logits->device, rc;
  cudaStream_t st = fa_cu_stream(dev);
  CeArgs a = ce_args(logits, target, ignore, ls);
  DenseView dx, dt, dl;
  if ((rc = dt.in(target))) return rc;
  int64_t count = 0;
  if ((rc = ce_check(fn, dt.p<int64_t>(), a.M, a.C, ignore, dev, &count))) return rc;
  if ((rc = dx.in(logits)) || (rc = dl.out(loss))) return rc;
  float *lp = (float *)fa_cu_temp_alloc(dev, (a.M > 0 ? a.M : 1) * 4);
  if (!lp) return FA_ERR_MEMORY;
  if (a.M > 0) {
    if (a.inner == 1) ce_loss<T, true><<<(unsigned)((a.M + 7) / 8), 256, 0, st>>>(lp, dx.p<T>(), dt.p<int64_t>(), a);
    else ce_loss<T, false><<<(unsigned)((a.M + 255) / 256), 256, 0, st>>>(lp, dx.p<T>(), dt.p<int64_t>(), a);
    rc = fa_cu_launch_check(fn);
  }
  double *part = nullptr;
  if (!rc && reduction == FA_REDUCE_NONE) {
    if (a.M > 0) {
      ce_store_none<T><<<fa_cu_blocks(a.M, 256, dev), 256, 0, st>>>(dl.p<T>(), lp, a.M);
      rc = fa_cu_launch_check(fn);
    }
  } else if (!rc) {
    unsigned nb = red_blocks(a.M);
    if (!(part = (double *)fa_cu_temp_alloc(dev, nb * 8))) rc = FA_ERR_MEMORY;
    if (!rc) {
      ce_partial<<<nb, RED_THREADS, 0, st>>>(part, lp, a.M);
      rc = fa_cu_launch_check(fn);
    }
    if (!rc) {
      double mul = reduction == FA_REDUCE_MEAN ? 1.0 / (double)count : 1.0; // count 0: inf * 0 -> NaN, as 0 / 0
      finish_sum<T><<<1, RED_THREADS, 0, st>>>(dl.p<T>(), part, (int)nb, mul);
      rc = fa_cu_launch_check(fn);
    }
  }
  fa_cu_temp_free(dev, lp);
  if (part) fa_cu_temp_free(dev, part);
  return rc ? rc : dl.finish();
}

template <typename T>
static int ce_backward_t(fa_tensor *grad_logits, const fa_tensor *grad_loss, const fa_tensor *logits, const fa_tensor *target,
                         int64_t ignore, double ls, int reduction) {
  static const char *fn = "fa_cross_entropy_backward";
  int dev = logits->device, rc;
  CeArgs a = ce_args(logits, target, ignore, ls);
  DenseView dx, dt, dgl, dgx;
  if ((rc = dt.in(target))) return rc;
  int64_t count = 0;
  if ((rc = ce_check(fn, dt.p<int64_t>(), a.M, a.C, ignore, dev, &count))) return rc;
  if (a.M == 0) return 0;
  if ((rc = dx.in(logits)) || (rc = dgl.in(grad_loss)) || (rc = dgx.out(grad_logits))) return rc;
  int ew = reduction == FA_REDUCE_NONE;
  float mul = reduction == FA_REDUCE_MEAN ? (float)(1.0 / (double)count) : 1.f;
  cudaStream_t st = fa_cu_stream(dev);
  if (a.inner == 1)
    ce_grad<T, true><<<(unsigned)((a.M + 7) / 8), 256, 0, st>>>(dgx.p<T>(), dx.p<T>(), dt.p<int64_t>(), dgl.p<T>(), ew, mul, a);
  else
    ce_grad<T, false><<<(unsigned)((a.M + 255) / 256), 256, 0, st>>>(dgx.p<T>(), dx.p<T>(), dt.p<int64_t>(), dgl.p<T>(), ew, mul, a);
  if ((rc = fa_cu_launch_check(fn))) return rc;
  return dgx.finish();
}

} // namespace

int fa_cu_mse_forward(fa_tensor *loss, const fa_tensor *x, const fa_tensor *target, int reduction) {
  FA_CU_FLOAT_DISPATCH("fa_mse_forward", x->dtype, mse_forward_t<T>(loss, x, target, reduction))
}
int fa_cu_mse_backward(fa_tensor *grad_x, const fa_tensor *grad_loss, const fa_tensor *x, const fa_tensor *target, int reduction) {
  FA_CU_FLOAT_DISPATCH("fa_mse_backward", x->dtype, mse_backward_t<T>(grad_x, grad_loss, x, target, reduction))
}
int fa_cu_cross_entropy_forward(fa_tensor *loss, const fa_tensor *logits, const fa_tensor *target, int64_t ignore_index,
                                double label_smoothing, int reduction) {
  FA_CU_FLOAT_DISPATCH("fa_cross_entropy_forward", logits->dtype,
                ce_forward_t<T>(loss, logits, target, ignore_index, label_smoothing, reduction))
}
int fa_cu_cross_entropy_backward(fa_tensor *grad_logits, const fa_tensor *grad_loss, const fa_tensor *logits,
                                 const fa_tensor *target, int64_t ignore_index, double label_smoothing, int reduction) {
  FA_CU_FLOAT_DISPATCH("fa_cross_entropy_backward", logits->dtype,
                ce_backward_t<T>(grad_logits, grad_loss, logits, target, ignore_index, label_smoothing, reduction))
}
