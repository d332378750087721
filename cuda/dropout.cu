// dropout.cu: inverted dropout on the GPU, bit-compatible with c/dropout.c.
//
// forward:  x (any shape) -> mask (same shape, bool) or NULL, out = x * mask / (1 - p)
// backward: grad_x = grad_out * mask / (1 - p)
//
// Element i (row-major index, whatever the strides) is kept when u >= p, u = fa_cu_u32_to_unit_float(r[0]),
// r = Philox4x32-10(seed, offset + i): the CPU's rule, so CPU and GPU draw the same mask. u = k / 2^24 with
// k = r[0] >> 8, hence u >= p <=> k >= ceil(p * 2^24), an integer compare. The product x * (1 / (1 - p)) is
// formed in double and rounded once, as on the CPU, so float32 outputs equal the CPU's bit for bit.
// Storage float32, bfloat16 or float16; any strides (dims merged by fa_cu_iter).
#include "common.cuh"

namespace {

template <typename T, bool DENSE>
__global__ void __launch_bounds__(256) dropout_fwd(T *out, uint8_t *mask, const T *x, fa_cu_iter<3> it, int64_t n,
                                                  uint32_t thresh, double scale, uint64_t seed, uint64_t offset) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t off[3] = {i, i, i};
    if (!DENSE) fa_cu_iter_offsets<int64_t, 3>(it, i, off);
    uint32_t r[4];
    fa_cu_philox(seed, offset + (uint64_t)i, r);
    bool keep = (r[0] >> 8) >= thresh;
    if (mask) mask[off[1]] = keep;
    out[off[0]] = fa_from_f<T>(keep ? (float)((double)fa_to_f<T>(x[off[2]]) * scale) : 0.f);
  }
}

template <typename T, bool DENSE>
__global__ void __launch_bounds__(256) dropout_bwd(T *gx, const T *go, const uint8_t *mask, fa_cu_iter<3> it,
                                                  int64_t n, double scale) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t off[3] = {i, i, i};
    if (!DENSE) fa_cu_iter_offsets<int64_t, 3>(it, i, off);
    gx[off[0]] = fa_from_f<T>(mask[off[2]] ? (float)((double)fa_to_f<T>(go[off[1]]) * scale) : 0.f);
  }
}

template <typename T>
static int forward_t(fa_tensor *out, fa_tensor *mask, const fa_tensor *x, double p, uint64_t seed, uint64_t offset) {
  int64_t n = fa_numel(x);
  int dev = x->device;
  const fa_tensor *ts[3] = {out, mask ? mask : out, x};
  fa_cu_iter<3> it = fa_cu_iter_make<3>(ts);
  bool dense = it.ndim <= 1 && it.stride[0][0] == 1 && it.stride[1][0] == 1 && it.stride[2][0] == 1;
  double th = ceil(p * 16777216.0);
  uint32_t thresh = (uint32_t)(th > 16777216.0 ? 16777216.0 : th);
  double scale = p < 1 ? 1.0 / (1.0 - p) : 0.0;
  unsigned blocks = fa_cu_blocks(n, 256, dev);
  cudaStream_t st = fa_cu_stream(dev);
  uint8_t *m = mask ? (uint8_t *)mask->data : nullptr;
  if (dense) dropout_fwd<T, true><<<blocks, 256, 0, st>>>((T *)out->data, m, (const T *)x->data, it, n, thresh, scale, seed, offset);
  else dropout_fwd<T, false><<<blocks, 256, 0, st>>>((T *)out->data, m, (const T *)x->data, it, n, thresh, scale, seed, offset);
  return fa_cu_launch_check("fa_dropout_forward");
}

template <typename T>
static int backward_t(fa_tensor *gx, const fa_tensor *go, const fa_tensor *mask, double p) {
  int64_t n = fa_numel(go);
  int dev = go->device;
  const fa_tensor *ts[3] = {gx, go, mask};
  fa_cu_iter<3> it = fa_cu_iter_make<3>(ts);
  bool dense = it.ndim <= 1 && it.stride[0][0] == 1 && it.stride[1][0] == 1 && it.stride[2][0] == 1;
  double scale = p < 1 ? 1.0 / (1.0 - p) : 0.0;
  unsigned blocks = fa_cu_blocks(n, 256, dev);
  cudaStream_t st = fa_cu_stream(dev);
  if (dense) dropout_bwd<T, true><<<blocks, 256, 0, st>>>((T *)gx->data, (const T *)go->data, (const uint8_t *)mask->data, it, n, scale);
  else dropout_bwd<T, false><<<blocks, 256, 0, st>>>((T *)gx->data, (const T *)go->data, (const uint8_t *)mask->data, it, n, scale);
  return fa_cu_launch_check("fa_dropout_backward");
}

} // namespace

int fa_cu_dropout_forward(fa_tensor *out, fa_tensor *mask, const fa_tensor *x, double p, uint64_t seed, uint64_t offset) {
  if (fa_numel(x) == 0) return 0;
  FA_CU_FLOAT_DISPATCH("fa_dropout_forward", x->dtype, forward_t<T>(out, mask, x, p, seed, offset))
}

int fa_cu_dropout_backward(fa_tensor *grad_x, const fa_tensor *grad_out, const fa_tensor *mask, double p) {
  if (fa_numel(grad_out) == 0) return 0;
  FA_CU_FLOAT_DISPATCH("fa_dropout_backward", grad_out->dtype, backward_t<T>(grad_x, grad_out, mask, p))
}
