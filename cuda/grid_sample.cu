// grid_sample.cu: 2-D bilinear grid sampling (PyTorch's F.grid_sample, mode='bilinear') on the GPU, the
// same arithmetic as c/grid_sample.c.
//
// input (N, C, H, W), grid (N, Ho, Wo, 2) with (x, y) in [-1, 1] -> out (N, C, Ho, Wo)
//   with the sampling rules of cuda/bilinear.cuh: u = (x + 1) * W / 2 - 0.5 (align_corners: (x + 1) * (W - 1) / 2)
//   in float32 without fused multiply-add (the CPU's and PyTorch's rounding); 'zeros' or 'border' padding.
// backward: grad_input (overwritten; float atomics into a float32 buffer: fast, not bit-reproducible) and
//   grad_grid (overwritten; deterministic: per-channel-chunk partial sums added in chunk order). Either may
//   be NULL.
//
// Parallelism: one thread per (output point, chunk of channels): a thread computes the taps once and
// reuses them for its channels; the chunks give enough threads when N * Ho * Wo is small (batch 1).
// Output writes are coalesced along Wo; the four gathers of neighbouring points hit the same cache lines.
// Every tensor may have any strides. Storage float32, bfloat16 or float16; arithmetic float32.
#include "dense.cuh"
#include "bilinear.cuh"

namespace {

struct GsArgs {
  int64_t N, C, H, W, Ho, Wo;
  int64_t si[4], sg[4], so[4]; // strides of input, grid, out / grad_out
  int border, align;
  int64_t cc;                  // channels per thread
};

struct Taps {
  int64_t x0, y0;
  int64_t off[4];  // element offsets in an input plane (valid where in[k])
  bool in[4];
  float w[4];      // bilinear weights (0 where outside)
  float dx, dy;    // u - x0, v - y0
  float gxm, gym;  // du/dx, dv/dy
};

// the taps of grid point (gx, gy) with the rules of bilinear.cuh (PyTorch's: every tap of a point near the
// image counts, the zero-weight one of a point on u = -1 included)
__device__ __forceinline__ void make_taps(float gx, float gy, const GsArgs &a, int64_t sh, int64_t sw, Taps &t) {
  float u = fa_bl_src_signed(gx, a.W, a.align, t.gxm);
  float v = fa_bl_src_signed(gy, a.H, a.align, t.gym);
  if (a.border) {
    fa_bl_border(u, t.gxm, a.W);
    fa_bl_border(v, t.gym, a.H);
  }
  if (!fa_bl_near(u, v, a.H, a.W)) { // all taps outside, or NaN
    t.dx = t.dy = 0.f;
    t.x0 = t.y0 = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) { t.in[k] = false; t.w[k] = 0.f; t.off[k] = 0; }
    return;
  }
  int64_t x0, y0;
  fa_bl_cell(u, v, x0, y0, t.dx, t.dy);
  t.x0 = x0;
  t.y0 = y0;
  bool vx0, vx1, vy0, vy1;
  fa_bl_inside(x0, y0, a.H, a.W, vx0, vx1, vy0, vy1);
  const unsigned mask = fa_bl_cell_near(x0, y0, a.H, a.W) ? fa_bl_mask(vx0, vx1, vy0, vy1) : 0u;
#pragma unroll
  for (int k = 0; k < 4; k++) t.in[k] = (mask >> k & 1u) != 0;
  const float ex = fa_bl_comp(t.dx), ey = fa_bl_comp(t.dy);
  t.w[0] = t.in[0] ? fa_bl_weight<0>(t.dx, t.dy, ex, ey) : 0.f;
  t.w[1] = t.in[1] ? fa_bl_weight<1>(t.dx, t.dy, ex, ey) : 0.f;
  t.w[2] = t.in[2] ? fa_bl_weight<2>(t.dx, t.dy, ex, ey) : 0.f;
  t.w[3] = t.in[3] ? fa_bl_weight<3>(t.dx, t.dy, ex, ey) : 0.f;
  t.off[0] = y0 * sh + x0 * sw;
  t.off[1] = t.off[0] + sw;
  t.off[2] = t.off[0] + sh;
  t.off[3] = t.off[2] + sw;
}

template <typename T>
__device__ __forceinline__ void point_taps(const T *grid, const GsArgs &a, int64_t n, int64_t h, int64_t w,
                                           int64_t sh, int64_t sw, Taps &t) {
  const T *g = grid + n * a.sg[0] + h * a.sg[1] + w * a.sg[2];
  make_taps(fa_to_f<T>(g[0]), fa_to_f<T>(g[a.sg[3]]), a, sh, sw, t);
}

// ------------------------------------------------------------------ forward
template <typename T>
__global__ void __launch_bounds__(256) gs_fwd(T *out, const T *in, const T *grid, GsArgs a) {
  int64_t P = a.Ho * a.Wo;
  int64_t np = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (np >= a.N * P) return;
  int64_t n = np / P, p = np - n * P, h = p / a.Wo, w = p - h * a.Wo;
  Taps t;
  point_taps(grid, a, n, h, w, a.si[2], a.si[3], t);
  int64_t c0 = (int64_t)blockIdx.y * a.cc, c1 = min(a.C, c0 + a.cc);
  const T *ib = in + n * a.si[0];
  T *ob = out + n * a.so[0] + h * a.so[2] + w * a.so[3];
  // CU channels at a time: 4 * CU independent gathers in flight per thread (one at a time leaves the loop
  // latency-bound when a thread has many channels); 8 for the 16-bit types, whose gathers bring half the
  // bytes each, so that a thread keeps as many bytes in flight as in float32
  constexpr int CU = sizeof(T) == 2 ? 8 : 4;
  int64_t c = c0;
  for (; c + CU <= c1; c += CU) {
    float v[CU][4];
#pragma unroll
    for (int u = 0; u < CU; u++) {
      const T *pl = ib + (c + u) * a.si[1];
#pragma unroll
      for (int k = 0; k < 4; k++) v[u][k] = t.in[k] ? fa_to_f<T>(pl[t.off[k]]) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < CU; u++)
      ob[(c + u) * a.so[1]] = fa_from_f<T>(t.w[0] * v[u][0] + t.w[1] * v[u][1] + t.w[2] * v[u][2] + t.w[3] * v[u][3]);
  }
  for (; c < c1; c++) {
    const T *pl = ib + c * a.si[1];
    float v = 0.f;
#pragma unroll
    for (int k = 0; k < 4; k++)
      if (t.in[k]) v += t.w[k] * fa_to_f<T>(pl[t.off[k]]);
    ob[c * a.so[1]] = fa_from_f<T>(v);
  }
}

// The same with 32-bit element offsets (input and output each span under 2^31 elements) and unconditional
// gathers: a tap outside the image reads the plane's first element, which a select then replaces by 0 (never
// a multiply: 0 * inf is NaN). A gather is then one address instruction and no branch instead of three
// 64-bit operations behind a branch (the PTX of gs_fwd); bfloat16, whose gathers bring half the bytes of
// float32's for the same instructions, was at 54% of the copy bandwidth against float32's 79%.
template <typename T>
__global__ void __launch_bounds__(256) gs_fwd32(T *out, const T *in, const T *grid, GsArgs a) {
  int64_t P = a.Ho * a.Wo;
  int64_t np = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (np >= a.N * P) return;
  int64_t n = np / P, p = np - n * P, h = p / a.Wo, w = p - h * a.Wo;
  Taps t;
  point_taps(grid, a, n, h, w, a.si[2], a.si[3], t);
  const int64_t c0 = (int64_t)blockIdx.y * a.cc, c1 = min(a.C, c0 + a.cc);
  const uint32_t cs = (uint32_t)a.si[1], ocs = (uint32_t)a.so[1];
  uint32_t o[4];
#pragma unroll
  for (int k = 0; k < 4; k++) o[k] = (uint32_t)(n * a.si[0] + c0 * a.si[1] + (t.in[k] ? t.off[k] : 0));
  uint32_t ob = (uint32_t)(n * a.so[0] + c0 * a.so[1] + h * a.so[2] + w * a.so[3]);
  constexpr int CU = sizeof(T) == 2 ? 8 : 4;
  int64_t c = c0;
  for (; c + CU <= c1; c += CU) {
    T raw[CU][4];
#pragma unroll
    for (int u = 0; u < CU; u++)
#pragma unroll
      for (int k = 0; k < 4; k++) raw[u][k] = in[o[k] + u * cs];
#pragma unroll
    for (int u = 0; u < CU; u++) {
      float v[4];
#pragma unroll
      for (int k = 0; k < 4; k++) v[k] = t.in[k] ? fa_to_f<T>(raw[u][k]) : 0.f;
      out[ob + u * ocs] = fa_from_f<T>(t.w[0] * v[0] + t.w[1] * v[1] + t.w[2] * v[2] + t.w[3] * v[3]);
    }
#pragma unroll
    for (int k = 0; k < 4; k++) o[k] += CU * cs;
    ob += CU * ocs;
  }
  for (; c < c1; c++) {
    float v = 0.f;
#pragma unroll
    for (int k = 0; k < 4; k++) {
      T r = in[o[k]];
      if (t.in[k]) v += t.w[k] * fa_to_f<T>(r);
      o[k] += cs;
    }
    out[ob] = fa_from_f<T>(v);
    ob += ocs;
  }
}

// ------------------------------------------------------------------ backward
// gin: dense float32 (N, C, H, W) zeroed, or NULL; part: (chunks, N * Ho * Wo, 2) float32 or NULL
template <typename T>
__global__ void __launch_bounds__(256) gs_bwd(float *gin, float *part, const T *gout, const T *in, const T *grid,
                                              GsArgs a) {
  int64_t P = a.Ho * a.Wo, NP = a.N * P;
  int64_t np = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (np >= NP) return;
  int64_t n = np / P, p = np - n * P, h = p / a.Wo, w = p - h * a.Wo;
  Taps t;
  point_taps(grid, a, n, h, w, a.si[2], a.si[3], t);
  // the same taps in the dense float32 gradient plane (strides W, 1)
  int64_t doff = t.y0 * a.W + t.x0;
  int64_t dof[4] = {doff, doff + 1, doff + a.W, doff + a.W + 1};
  int64_t c0 = (int64_t)blockIdx.y * a.cc, c1 = min(a.C, c0 + a.cc);
  const T *ib = in + n * a.si[0];
  const T *gb = gout + n * a.so[0] + h * a.so[2] + w * a.so[3];
  float ex = 1.f - t.dx, ey = 1.f - t.dy, gx = 0.f, gy = 0.f;
  for (int64_t c = c0; c < c1; c++) {
    float go = fa_to_f<T>(gb[c * a.so[1]]);
    if (gin) {
      float *gp = gin + (n * a.C + c) * a.H * a.W;
#pragma unroll
      for (int k = 0; k < 4; k++)
        if (t.in[k]) atomicAdd(gp + dof[k], t.w[k] * go);
    }
    if (part) {
      const T *pl = ib + c * a.si[1];
      float v[4];
#pragma unroll
      for (int k = 0; k < 4; k++) v[k] = t.in[k] ? fa_to_f<T>(pl[t.off[k]]) : 0.f;
      gx += fa_bl_du(v, t.dy, ey) * go;
      gy += fa_bl_dv(v, t.dx, ex) * go;
    }
  }
  if (part) {
    float *q = part + ((int64_t)blockIdx.y * NP + np) * 2;
    q[0] = gx * t.gxm;
    q[1] = gy * t.gym;
  }
}

// grad_grid[n, h, w, :] = sum over chunks (in chunk order)
template <typename T>
__global__ void gs_grid_final(T *gg, fa_cu_geom g, const float *part, int64_t NP, int64_t Ho, int64_t Wo, int chunks) {
  int64_t np = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (np >= NP) return;
  float sx = 0.f, sy = 0.f;
  for (int k = 0; k < chunks; k++) {
    sx += part[((int64_t)k * NP + np) * 2];
    sy += part[((int64_t)k * NP + np) * 2 + 1];
  }
  int64_t P = Ho * Wo, n = np / P, p = np - n * P, h = p / Wo, w = p - h * Wo;
  int64_t o = n * g.stride[0] + h * g.stride[1] + w * g.stride[2];
  gg[o] = fa_from_f<T>(sx);
  gg[o + g.stride[3]] = fa_from_f<T>(sy);
}

// strided (N, C, H, W) grad_input from the dense float32 buffer
template <typename T>
__global__ void gs_input_final(T *gi, fa_cu_geom g, const float *src, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    gi[fa_cu_offset(g, i)] = fa_from_f<T>(src[i]);
}

static GsArgs args_of(const fa_tensor *input, const fa_tensor *grid, const fa_tensor *out, int padding, int align) {
  GsArgs a;
  a.N = input->shape[0];
  a.C = input->shape[1];
  a.H = input->shape[2];
  a.W = input->shape[3];
  a.Ho = grid->shape[1];
  a.Wo = grid->shape[2];
  for (int d = 0; d < 4; d++) {
    a.si[d] = input->stride[d];
    a.sg[d] = grid->stride[d];
    a.so[d] = out->stride[d];
  }
  a.border = padding == FA_PAD_BORDER;
  a.align = align != 0;
  return a;
}

// one past the largest element offset of t (its strides are non-negative); 0 when empty
static int64_t span(const fa_tensor *t) {
  int64_t m = 0;
  for (int d = 0; d < t->ndim; d++) {
    if (t->shape[d] == 0) return 0;
    m += (t->shape[d] - 1) * t->stride[d];
  }
  return m + 1;
}

// channel chunks: enough (point, chunk) threads to fill the device (about 2048 per SM)
static int64_t chunks_for(const GsArgs &a, int dev) {
  int64_t NP = a.N * a.Ho * a.Wo;
  int64_t want = ((int64_t)fa_cu_sm_count(dev) * 2048 + NP - 1) / NP;
  if (want > a.C) want = a.C;
  if (want > 65535) want = 65535;
  if (want < 1) want = 1;
  return want;
}

template <typename T>
static int forward_t(fa_tensor *out, const fa_tensor *input, const fa_tensor *grid, int padding, int align) {
  int dev = input->device;
  GsArgs a = args_of(input, grid, out, padding, align);
  int64_t NP = a.N * a.Ho * a.Wo;
  int64_t chunks = chunks_for(a, dev);
  a.cc = (a.C + chunks - 1) / chunks;
  chunks = (a.C + a.cc - 1) / a.cc;
  dim3 blocks((unsigned)((NP + 255) / 256), (unsigned)chunks);
  if (span(input) < INT32_MAX && span(out) < INT32_MAX && fa_numel(input) > 0)
    gs_fwd32<T><<<blocks, 256, 0, fa_cu_stream(dev)>>>((T *)out->data, (const T *)input->data, (const T *)grid->data, a);
  else
    gs_fwd<T><<<blocks, 256, 0, fa_cu_stream(dev)>>>((T *)out->data, (const T *)input->data, (const T *)grid->data, a);
  return fa_cu_launch_check("fa_grid_sample_forward");
}

template <typename T>
static int backward_t(fa_tensor *grad_input, fa_tensor *grad_grid, const fa_tensor *grad_out, const fa_tensor *input,
                      const fa_tensor *grid, int padding, int align) {
  static const char *fn = "fa_grid_sample_backward";
  int dev = input->device, rc = 0;
  cudaStream_t st = fa_cu_stream(dev);
  GsArgs a = args_of(input, grid, grad_out, padding, align);
  int64_t NP = a.N * a.Ho * a.Wo, nin = a.N * a.C * a.H * a.W;
  if (grad_input && nin > 0 && (NP == 0 || a.C == 0)) { // nothing samples the input: zero gradient
    if ((rc = fa_fill(grad_input, 0))) return rc;
    grad_input = nullptr;
  }
  if (grad_input && nin == 0) grad_input = nullptr;
  if (grad_grid && NP > 0 && a.C == 0) {
    if ((rc = fa_fill(grad_grid, 0))) return rc;
    grad_grid = nullptr;
  }
  if ((!grad_input && !grad_grid) || NP == 0) return 0;
  int64_t chunks = chunks_for(a, dev);
  a.cc = (a.C + chunks - 1) / chunks;
  chunks = (a.C + a.cc - 1) / a.cc;
  // grad_input: atomics straight into it when it is dense float32, else into a float32 buffer
  bool direct = grad_input && grad_input->dtype == FA_FLOAT32 && fa_is_contiguous(grad_input);
  Temps tmp(dev);
  float *gin = nullptr, *part = nullptr;
  if (grad_input) {
    gin = direct ? (float *)grad_input->data : (float *)tmp.get(nin * 4);
    if (!gin) return FA_ERR_MEMORY;
    rc = fa_cu_check(cudaMemsetAsync(gin, 0, (size_t)nin * 4, st), fn);
  }
  if (!rc && grad_grid && !(part = (float *)tmp.get(chunks * NP * 2 * 4))) rc = FA_ERR_MEMORY;
  if (!rc) {
    dim3 blocks((unsigned)((NP + 255) / 256), (unsigned)chunks);
    gs_bwd<T><<<blocks, 256, 0, st>>>(gin, part, (const T *)grad_out->data, (const T *)input->data, (const T *)grid->data, a);
    rc = fa_cu_launch_check(fn);
  }
  if (!rc && grad_grid) {
    gs_grid_final<T><<<(unsigned)((NP + 255) / 256), 256, 0, st>>>((T *)grad_grid->data, fa_cu_geom_of(grad_grid), part,
                                                                    NP, a.Ho, a.Wo, (int)chunks);
    rc = fa_cu_launch_check(fn);
  }
  if (!rc && grad_input && !direct) {
    gs_input_final<T><<<fa_cu_blocks(nin, 256, dev), 256, 0, st>>>((T *)grad_input->data, fa_cu_geom_of(grad_input), gin, nin);
    rc = fa_cu_launch_check(fn);
  }
  return rc;
}

} // namespace

int fa_cu_grid_sample_forward(fa_tensor *out, const fa_tensor *input, const fa_tensor *grid, int padding, int align_corners) {
  if (fa_numel(out) == 0) return 0;
  FA_CU_FLOAT_DISPATCH("fa_grid_sample_forward", input->dtype, forward_t<T>(out, input, grid, padding, align_corners))
}

int fa_cu_grid_sample_backward(fa_tensor *grad_input, fa_tensor *grad_grid, const fa_tensor *grad_out,
                               const fa_tensor *input, const fa_tensor *grid, int padding, int align_corners) {
  FA_CU_FLOAT_DISPATCH("fa_grid_sample_backward", input->dtype,
                       backward_t<T>(grad_input, grad_grid, grad_out, input, grid, padding, align_corners))
}
