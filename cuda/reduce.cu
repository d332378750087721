// reduce.cu: sum, mean, max (with indices) and argmax over one dimension or over all elements, forward and
// backward, and fa_cu_sumsq (c/reduce.c validates and dispatches here).
//
// x (..., R, ...) -> out (..., 1, ...) [idx int64, same shape, for max]; dim -1: x -> 1 element.
// Semantics are the CPU's: the first maximum wins, NaN wins over numbers; indices are 0-based along the
// reduced dim (into the row-major flattened x for dim -1); int32/int64 sums wrap in int64, their max is
// exact. Float sums accumulate in float32 (sumsq in double), so they differ from the CPU's (double) by
// rounding; every result is deterministic (fixed partition, fixed combination order, no atomics).
//
// Kernels (x is any strided tensor; "row" = the R elements reduced into one output):
//   k_red_rows: one warp per (row, split) reading along r, for rows whose elements are adjacent (stride
//               along r is 1, or dim -1); warp-shuffle combination.
//   k_red_cols: a thread per output and a split of r, for rows whose *outputs* are adjacent (reducing a dim
//               that is not the innermost: consecutive threads read consecutive addresses), with 8 threads
//               per output along r combined in shared memory (1 when R is small).
//   k_red_final: combines the per-split partials of each output (a warp each, fixed order) when a row was split over
//               several warps/blocks (few long rows), and writes the result.
#include "common.cuh"
#include <algorithm>
#include <type_traits>

enum { RED_OP_SUMSQ = 100 };   // internal op: sum of squares (fa_cu_sumsq)
enum { RED_THREADS = 256 };

// accumulator: float for the float dtypes, int64 for the integer ones, double for the sum of squares
template <typename T, int OP> struct RedAcc { typedef float A; };
template <int OP> struct RedAcc<int32_t, OP> { typedef int64_t A; };
template <int OP> struct RedAcc<int64_t, OP> { typedef int64_t A; };
template <> struct RedAcc<float, RED_OP_SUMSQ> { typedef double A; };
template <> struct RedAcc<__nv_bfloat16, RED_OP_SUMSQ> { typedef double A; };
template <> struct RedAcc<__half, RED_OP_SUMSQ> { typedef double A; };

template <typename T, typename A> __device__ __forceinline__ A red_load(T v) { return (A)fa_to_f<T>(v); }
template <> __device__ __forceinline__ int64_t red_load<int32_t, int64_t>(int32_t v) { return v; }
template <> __device__ __forceinline__ int64_t red_load<int64_t, int64_t>(int64_t v) { return v; }

template <typename A> __device__ __forceinline__ A red_lowest();
template <> __device__ __forceinline__ float red_lowest<float>() { return -INFINITY; }
template <> __device__ __forceinline__ double red_lowest<double>() { return -INFINITY; }
template <> __device__ __forceinline__ int64_t red_lowest<int64_t>() { return INT64_MIN; }

template <typename A> __device__ __forceinline__ bool red_isnan(A v) { return v != v; }
template <> __device__ __forceinline__ bool red_isnan<int64_t>(int64_t) { return false; }
template <typename A> __device__ __forceinline__ A red_add(A a, A b) { return a + b; }
template <> __device__ __forceinline__ int64_t red_add<int64_t>(int64_t a, int64_t b) { return (int64_t)((uint64_t)a + (uint64_t)b); }

// (value, index) accumulator. For max: does (bv, bi) beat (av, ai)? NaN beats numbers, then the larger
// value, then (ties) the smaller index, which makes the result independent of the combination order.
template <typename A> __device__ __forceinline__ bool red_beats(A bv, int64_t bi, A av, int64_t ai) {
  if (red_isnan(bv)) return !red_isnan(av) || bi < ai;
  if (red_isnan(av)) return false;
  return bv > av || (bv == av && bi < ai);
}

template <int OP> struct RedIsMax { static constexpr bool v = OP == FA_MAX || OP == FA_ARGMAX; };

template <typename A, int OP> struct RedVal {
  A v;
  int64_t i;
  __device__ __forceinline__ void init() {
    if (RedIsMax<OP>::v) { v = red_lowest<A>(); i = INT64_MAX; }
    else { v = (A)0; i = 0; }
  }
  __device__ __forceinline__ void push(A x, int64_t r) { // one element (index r)
    if (RedIsMax<OP>::v) { if (red_beats(x, r, v, i)) { v = x; i = r; } }
    else if (OP == RED_OP_SUMSQ) v = red_add(v, x * x);
    else v = red_add(v, x);
  }
  __device__ __forceinline__ void merge(A ov, int64_t oi) {
    if (RedIsMax<OP>::v) { if (red_beats(ov, oi, v, i)) { v = ov; i = oi; } }
    else v = red_add(v, ov);
  }
  __device__ __forceinline__ void warp_merge() {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      A ov = __shfl_xor_sync(0xffffffffu, v, o);
      int64_t oi = RedIsMax<OP>::v ? (int64_t)__shfl_xor_sync(0xffffffffu, (long long)i, o) : 0;
      merge(ov, oi);
    }
  }
};

// everything a reduction kernel needs; iterator tensors: out, idx (or out), x at r = 0 of each output
struct RedArgs {
  const void *x;
  void *out;
  int64_t *idx;
  int64_t O, R, sr;          // outputs, row length, x stride along the row
  int64_t splits, chunk;     // each row cut into `splits` runs of `chunk` elements
  fa_cu_iter<3> oit;
  fa_cu_iter<1> xit;         // dim -1 on a strided x: element r of the single row is at xit offset r
  void *pv;                  // partials (O * splits values, split-minor) when splits > 1
  int64_t *pi;
  int accumulate;            // out += result (linear's bias gradient) instead of out = result
};

// writes output o
template <typename T, typename OT, typename A, int OP>
__device__ __forceinline__ void red_write(const RedArgs &a, int64_t o, A v, int64_t i) {
  int64_t off[3];
  fa_cu_iter_offsets<int64_t, 3>(a.oit, o, off);
  if (OP == FA_ARGMAX) { ((int64_t *)a.out)[off[0]] = i; return; }
  if (OP == FA_MAX && a.idx) a.idx[off[1]] = i;
  OT *p = (OT *)a.out + off[0];
  if (std::is_integral<A>::value) { // integer results
    *p = (OT)(a.accumulate ? red_add<A>((A)*p, v) : v);
    return;
  }
  float r = OP == FA_MEAN ? (float)v / (float)a.R : (float)v;
  if (a.accumulate) r = __fadd_rn(fa_to_f<OT>(*p), r);
  *p = fa_from_f<OT>(r);
}

template <typename T, typename OT, int OP, bool XIT>
__global__ void __launch_bounds__(RED_THREADS) k_red_rows(RedArgs a) {
  typedef typename RedAcc<T, OP>::A A;
  const T *x = (const T *)a.x;
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (int64_t)gridDim.x * (RED_THREADS / 32);
  const int64_t ntasks = a.O * a.splits;
  for (int64_t t = (int64_t)blockIdx.x * (RED_THREADS / 32) + (threadIdx.x >> 5); t < ntasks; t += nwarps) {
    int64_t o = t / a.splits, s = t - o * a.splits;
    int64_t r0 = s * a.chunk, r1 = min(a.R, r0 + a.chunk);
    int64_t base = 0;
    if (!XIT) {
      int64_t off[3];
      fa_cu_iter_offsets<int64_t, 3>(a.oit, o, off);
      base = off[2];
    }
    RedVal<A, OP> acc;
    acc.init();
    if (XIT) {
      for (int64_t r = r0 + lane; r < r1; r += 32) {
        int64_t q[1];
        fa_cu_iter_offsets<int64_t, 1>(a.xit, r, q);
        acc.push(red_load<T, A>(x[q[0]]), r);
      }
    } else if (a.sr == 1) {
      // unit stride: scalar head up to a 16-byte boundary, 16-byte vector loads, scalar tail
      constexpr int V = 16 / sizeof(T);
      const T *xr = x + base;
      int64_t mis = (int64_t)(((16 - ((uintptr_t)(xr + r0) & 15)) & 15) / sizeof(T));
      int64_t rh = min(r1, r0 + mis);
      for (int64_t r = r0 + lane; r < rh; r += 32) acc.push(red_load<T, A>(xr[r]), r);
      const int64_t nvec = (r1 - rh) / V;
      const uint4 *pv = reinterpret_cast<const uint4 *>(xr + rh);
#pragma unroll 4
      for (int64_t v = lane; v < nvec; v += 32) {
        alignas(16) T e[V];
        *reinterpret_cast<uint4 *>(e) = pv[v];
#pragma unroll
        for (int j = 0; j < V; j++) acc.push(red_load<T, A>(e[j]), rh + v * V + j);
      }
      for (int64_t r = rh + nvec * V + lane; r < r1; r += 32) acc.push(red_load<T, A>(xr[r]), r);
    } else {
#pragma unroll 4
      for (int64_t r = r0 + lane; r < r1; r += 32) acc.push(red_load<T, A>(x[base + r * a.sr]), r);
    }
    acc.warp_merge();
    if (lane == 0) {
      if (a.splits == 1) red_write<T, OT, A, OP>(a, o, acc.v, acc.i);
      else { ((A *)a.pv)[t] = acc.v; if (RedIsMax<OP>::v) a.pi[t] = acc.i; }
    }
  }
}

// blockDim = (256 / by, by): threadIdx.x -> output, threadIdx.y -> every by-th element of the run
template <typename T, typename OT, int OP>
__global__ void __launch_bounds__(RED_THREADS) k_red_cols(RedArgs a, int64_t ntiles) {
  typedef typename RedAcc<T, OP>::A A;
  __shared__ A sv[RED_THREADS];
  __shared__ int64_t si[RedIsMax<OP>::v ? RED_THREADS : 1];
  const T *x = (const T *)a.x;
  const int bx = blockDim.x, by = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int64_t s = blockIdx.y;
  const int64_t r0 = s * a.chunk, r1 = min(a.R, r0 + a.chunk);
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    int64_t o = tile * bx + tx;
    RedVal<A, OP> acc;
    acc.init();
    if (o < a.O) {
      int64_t off[3];
      fa_cu_iter_offsets<int64_t, 3>(a.oit, o, off);
#pragma unroll 4
      for (int64_t r = r0 + ty; r < r1; r += by) acc.push(red_load<T, A>(x[off[2] + r * a.sr]), r);
    }
    if (by > 1) {
      sv[ty * bx + tx] = acc.v;
      if (RedIsMax<OP>::v) si[ty * bx + tx] = acc.i;
      __syncthreads();
      if (ty == 0)
        for (int k = 1; k < by; k++) acc.merge(sv[k * bx + tx], RedIsMax<OP>::v ? si[k * bx + tx] : 0);
      __syncthreads();
    }
    if (ty == 0 && o < a.O) {
      if (a.splits == 1) red_write<T, OT, A, OP>(a, o, acc.v, acc.i);
      else { ((A *)a.pv)[o * a.splits + s] = acc.v; if (RedIsMax<OP>::v) a.pi[o * a.splits + s] = acc.i; }
    }
  }
}

// one warp per output: lane l combines partials l, l+32, ... in order, then the fixed shuffle tree
template <typename T, typename OT, int OP>
__global__ void __launch_bounds__(RED_THREADS) k_red_final(RedArgs a) {
  typedef typename RedAcc<T, OP>::A A;
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (int64_t)gridDim.x * (RED_THREADS / 32);
  for (int64_t o = (int64_t)blockIdx.x * (RED_THREADS / 32) + (threadIdx.x >> 5); o < a.O; o += nwarps) {
    RedVal<A, OP> acc;
    acc.init();
    for (int64_t s = lane; s < a.splits; s += 32)
      acc.merge(((const A *)a.pv)[o * a.splits + s], RedIsMax<OP>::v ? a.pi[o * a.splits + s] : 0);
    acc.warp_merge();
    if (lane == 0) red_write<T, OT, A, OP>(a, o, acc.v, acc.i);
  }
}

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// out (shape of x with dim -> 1, or 1 element for dim -1), idx (same, int64) or NULL
template <typename T, typename OT, int OP>
static int reduce_t(const char *fn, fa_tensor *out, fa_tensor *idx, const fa_tensor *x, int dim, int accumulate) {
  typedef typename RedAcc<T, OP>::A A;
  const int dev = x->device;
  cudaStream_t st = fa_cu_stream(dev);
  const int sm = fa_cu_sm_count(dev);
  RedArgs a;
  memset(&a, 0, sizeof a);
  a.x = x->data;
  a.out = out->data;
  a.idx = idx ? (int64_t *)idx->data : NULL;
  a.accumulate = accumulate;
  const int64_t n = fa_numel(x);
  a.O = fa_numel(out);
  a.R = dim < 0 ? n : x->shape[dim];
  bool xit = false, rows;
  {
    fa_tensor xb = *x; // x at r = 0 of each output, with out's shape
    if (dim >= 0) xb.shape[dim] = 1;
    else xb = *out;
    const fa_tensor *ts[3] = {out, idx ? idx : out, &xb};
    a.oit = fa_cu_iter_make<3>(ts);
  }
  if (dim < 0) {
    rows = true;
    a.sr = 1;
    if (!fa_is_contiguous(x)) {
      xit = true;
      const fa_tensor *ts[1] = {x};
      a.xit = fa_cu_iter_make<1>(ts);
    }
  } else {
    a.sr = x->stride[dim];
    int64_t inner = 1;
    for (int d = dim + 1; d < x->ndim; d++) inner *= x->shape[d];
    rows = (a.sr == 1 || inner == 1) && a.R >= 16;
  }
  // splits: enough warps/blocks to fill the GPU when there are few outputs, each split >= 256 elements
  int by = 1;
  int64_t ntiles = 0;
  if (rows) {
    int64_t target = (int64_t)sm * 64; // warps
    a.splits = a.O >= target ? 1 : std::min(cdiv(target, a.O), std::max<int64_t>(1, cdiv(a.R, 256)));
  } else {
    by = a.R >= 16 ? 8 : 1;
    ntiles = cdiv(a.O, RED_THREADS / by);
    int64_t target = (int64_t)sm * 8; // blocks
    a.splits = ntiles >= target ? 1 : std::min(cdiv(target, ntiles), std::max<int64_t>(1, cdiv(a.R, by * 32)));
    a.splits = std::min<int64_t>(a.splits, 65535);
  }
  a.chunk = std::max<int64_t>(1, cdiv(a.R, a.splits));
  a.splits = a.R > 0 ? cdiv(a.R, a.chunk) : 1;
  if (a.splits > 1) {
    int64_t np = a.O * a.splits;
    a.pv = fa_cu_temp_alloc(dev, np * (int64_t)sizeof(A));
    if (!a.pv) return FA_ERR_MEMORY;
    if (RedIsMax<OP>::v) {
      a.pi = (int64_t *)fa_cu_temp_alloc(dev, np * 8);
      if (!a.pi) { fa_cu_temp_free(dev, a.pv); return FA_ERR_MEMORY; }
    }
  }
  if (rows) {
    unsigned blocks = (unsigned)std::min<int64_t>(cdiv(a.O * a.splits, RED_THREADS / 32), (int64_t)sm * 32);
    if (xit) k_red_rows<T, OT, OP, true><<<blocks, RED_THREADS, 0, st>>>(a);
    else k_red_rows<T, OT, OP, false><<<blocks, RED_THREADS, 0, st>>>(a);
  } else {
    dim3 grid((unsigned)std::min<int64_t>(ntiles, (int64_t)sm * 32), (unsigned)a.splits);
    k_red_cols<T, OT, OP><<<grid, dim3(RED_THREADS / by, by), 0, st>>>(a, ntiles);
  }
  if (a.splits > 1) {
    unsigned blocks = (unsigned)std::min<int64_t>(cdiv(a.O, RED_THREADS / 32), (int64_t)sm * 32);
    k_red_final<T, OT, OP><<<blocks, RED_THREADS, 0, st>>>(a);
  }
  int rc = fa_cu_launch_check(fn);
  if (a.pv) fa_cu_temp_free(dev, a.pv); // stream-ordered: the kernels above finish before any reuse
  if (a.pi) fa_cu_temp_free(dev, a.pi);
  return rc;
}

template <typename T> static int reduce_op(int op, fa_tensor *out, fa_tensor *idx, const fa_tensor *x, int dim, int acc) {
  static const char *fn = "fa_reduce_forward";
  switch (op) {
    case FA_SUM: return reduce_t<T, T, FA_SUM>(fn, out, idx, x, dim, acc);
    case FA_MEAN: return reduce_t<T, T, FA_MEAN>(fn, out, idx, x, dim, acc);
    case FA_MAX: return reduce_t<T, T, FA_MAX>(fn, out, idx, x, dim, acc);
    case FA_ARGMAX: return reduce_t<T, T, FA_ARGMAX>(fn, out, idx, x, dim, acc);
  }
  return fa_error(FA_ERR_ARG, "%s: argument 'op': invalid reduction %d", fn, op);
}
template <typename T> static int reduce_op_int(int op, fa_tensor *out, fa_tensor *idx, const fa_tensor *x, int dim, int acc) {
  static const char *fn = "fa_reduce_forward";
  switch (op) {
    case FA_SUM: return reduce_t<T, T, FA_SUM>(fn, out, idx, x, dim, acc);
    case FA_MAX: return reduce_t<T, T, FA_MAX>(fn, out, idx, x, dim, acc);
    case FA_ARGMAX: return reduce_t<T, T, FA_ARGMAX>(fn, out, idx, x, dim, acc);
  }
  return fa_error(FA_ERR_ARG, "%s: argument 'op': reduction %d is not defined for integer tensors", fn, op);
}

static int reduce_any(int op, fa_tensor *out, fa_tensor *idx, const fa_tensor *x, int dim, int acc) {
  switch (x->dtype) {
    case FA_FLOAT32: return reduce_op<float>(op, out, idx, x, dim, acc);
    case FA_BFLOAT16: return reduce_op<__nv_bfloat16>(op, out, idx, x, dim, acc);
    case FA_FLOAT16: return reduce_op<__half>(op, out, idx, x, dim, acc);
    case FA_INT32: return reduce_op_int<int32_t>(op, out, idx, x, dim, acc);
    case FA_INT64: return reduce_op_int<int64_t>(op, out, idx, x, dim, acc);
  }
  return fa_error(FA_ERR_UNSUPPORTED, "fa_reduce_forward: dtype %s is not supported on CUDA", fa_dtype_name(x->dtype));
}

int fa_cu_reduce_forward(int op, fa_tensor *out, fa_tensor *idx, const fa_tensor *x, int dim) {
  if (fa_numel(out) == 0) return 0;
  return reduce_any(op, out, op == FA_MAX ? idx : NULL, x, dim, 0);
}

// out (shape of x reduced over dim) += sum over dim of x (float types; used for bias gradients)
int fa_cu_sum_into(fa_tensor *out, const fa_tensor *x, int dim) {
  if (fa_numel(out) == 0) return 0;
  return reduce_any(FA_SUM, out, NULL, x, dim, 1);
}

// ------------------------------------------------------------------ backward
// max: grad_x[e] = grad_out[o(e)] where e is the maximum's position (idx[o(e)] == r(e)), else 0.
// Iterator tensors: grad_x, grad_out and idx seen with grad_x's shape (stride 0 along the reduced dim).
template <typename T, typename I>
__global__ void __launch_bounds__(RED_THREADS) k_max_backward(int64_t n, fa_cu_iter<3> it, T *gx, const T *go, const int64_t *idx,
                                                                 int64_t inner, int64_t R, int all) {
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += step) {
    int64_t off[3];
    fa_cu_iter_offsets<I, 3>(it, e, off);
    int64_t r = all ? e : (e / inner) % R;
    gx[off[0]] = idx[off[2]] == r ? go[off[1]] : fa_from_f<T>(0.0f);
  }
}

template <typename T> static int max_backward_t(fa_tensor *grad_x, const fa_tensor *grad_out, const fa_tensor *idx, int dim) {
  const int dev = grad_x->device;
  const int64_t n = fa_numel(grad_x);
  fa_tensor gb = *grad_x, ib = *grad_x;
  gb.data = grad_out->data;
  ib.data = idx->data;
  ib.dtype = FA_INT64;
  for (int d = 0; d < grad_x->ndim; d++) {
    int red = dim < 0 || d == dim;
    gb.stride[d] = red ? 0 : grad_out->stride[d];
    ib.stride[d] = red ? 0 : idx->stride[d];
  }
  int64_t inner = 1, R = dim < 0 ? n : grad_x->shape[dim];
  if (dim >= 0)
    for (int d = dim + 1; d < grad_x->ndim; d++) inner *= grad_x->shape[d];
  const fa_tensor *ts[3] = {grad_x, &gb, &ib};
  fa_cu_iter<3> it = fa_cu_iter_make<3>(ts);
  cudaStream_t st = fa_cu_stream(dev);
  unsigned blocks = fa_cu_blocks(n, RED_THREADS, dev);
  if (n < ((int64_t)1 << 32))
    k_max_backward<T, uint32_t><<<blocks, RED_THREADS, 0, st>>>(n, it, (T *)grad_x->data, (const T *)grad_out->data,
                                                                (const int64_t *)idx->data, inner, R, dim < 0);
  else
    k_max_backward<T, int64_t><<<blocks, RED_THREADS, 0, st>>>(n, it, (T *)grad_x->data, (const T *)grad_out->data,
                                                               (const int64_t *)idx->data, inner, R, dim < 0);
  return fa_cu_launch_check("fa_reduce_backward");
}

int fa_cu_reduce_backward(int op, fa_tensor *grad_x, const fa_tensor *grad_out, const fa_tensor *idx, int dim) {
  if (fa_numel(grad_x) == 0) return 0;
  if (op == FA_SUM || op == FA_MEAN) {
    // as the CPU: grad_out broadcast along the reduced dim(s), times 1/R for the mean
    int64_t R = dim < 0 ? fa_numel(grad_x) : grad_x->shape[dim];
    fa_tensor e = *grad_x;
    e.data = grad_out->data;
    for (int d = 0; d < e.ndim; d++) e.stride[d] = (dim < 0 || d == dim) ? 0 : grad_out->stride[d];
    return fa_cu_scale_forward(grad_x, &e, op == FA_MEAN ? 1.0 / (double)R : 1.0, 0.0);
  }
  if (op != FA_MAX) return fa_error(FA_ERR_ARG, "fa_reduce_backward: argument 'op': %d has no gradient", op);
  switch (grad_x->dtype) {
    case FA_FLOAT32: return max_backward_t<float>(grad_x, grad_out, idx, dim);
    case FA_BFLOAT16: return max_backward_t<__nv_bfloat16>(grad_x, grad_out, idx, dim);
    case FA_FLOAT16: return max_backward_t<__half>(grad_x, grad_out, idx, dim);
  }
  return fa_error(FA_ERR_UNSUPPORTED, "fa_reduce_backward: dtype %s is not supported on CUDA", fa_dtype_name(grad_x->dtype));
}

// ------------------------------------------------------------------ sum of squares
// x (any shape, strides, float dtype) -> out (1 element, float32), accumulated in double
int fa_cu_sumsq(fa_tensor *out, const fa_tensor *x) {
  static const char *fn = "fa_sumsq";
  if (fa_numel(x) == 0) return fa_cu_fill(out, 0.0);
  switch (x->dtype) {
    case FA_FLOAT32: return reduce_t<float, float, RED_OP_SUMSQ>(fn, out, NULL, x, -1, 0);
    case FA_BFLOAT16: return reduce_t<__nv_bfloat16, float, RED_OP_SUMSQ>(fn, out, NULL, x, -1, 0);
    case FA_FLOAT16: return reduce_t<__half, float, RED_OP_SUMSQ>(fn, out, NULL, x, -1, 0);
  }
  return fa_error(FA_ERR_UNSUPPORTED, "%s: dtype %s is not supported on CUDA", fn, fa_dtype_name(x->dtype));
}
