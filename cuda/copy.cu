// copy.cu: fa_cu_copy (host<->device and device<->device, any dtype pair, any strides) and fa_cu_fill.
//
// Casts follow c/copy.c exactly: between the float types (float32, bfloat16, float16) through float, every
// other pair through double (as the CPU's load_as_double/store_from_double), so a cast on the GPU gives
// the CPU's bits. Same-dtype copies move raw elements.
//
// Transfers: a contiguous same-dtype transfer is one cudaMemcpyAsync on the device's stream. Otherwise the
// data is made contiguous where it is cheapest (strided host data is gathered on the host, strided or
// differently-typed device data is cast/gathered on the device into a staging buffer), moved in one
// cudaMemcpyAsync and scattered on the far side. Device-to-host copies synchronise the stream before
// returning (the host reads the data next); host-to-device copies from pageable memory do too, so the
// caller may free or change its buffer at once. Device-to-device copies never synchronise, except across
// devices (rare), where both streams are synchronised around the peer copy.
#include "common.cuh"
#include <stdlib.h>

// ------------------------------------------------------------------ conversions
template <typename T> struct Cv;
template <> struct Cv<float> {
  static constexpr bool fl = true;
  __device__ static float to_f(float v) { return v; }
  __device__ static float from_f(float v) { return v; }
  __device__ static double to_d(float v) { return v; }
  __device__ static float from_d(double v) { return __double2float_rn(v); }
};
template <> struct Cv<__nv_bfloat16> {
  static constexpr bool fl = true;
  __device__ static float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  __device__ static double to_d(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_d(double v) { return __float2bfloat16_rn(__double2float_rn(v)); }
};
template <> struct Cv<__half> {
  static constexpr bool fl = true;
  __device__ static float to_f(__half v) { return __half2float(v); }
  __device__ static __half from_f(float v) { return __float2half_rn(v); }
  __device__ static double to_d(__half v) { return __half2float(v); }
  __device__ static __half from_d(double v) { return __float2half_rn(__double2float_rn(v)); }
};
template <> struct Cv<double> {
  static constexpr bool fl = false;
  __device__ static float to_f(double v) { return (float)v; }
  __device__ static double from_f(float v) { return v; }
  __device__ static double to_d(double v) { return v; }
  __device__ static double from_d(double v) { return v; }
};
template <> struct Cv<int32_t> {
  static constexpr bool fl = false;
  __device__ static float to_f(int32_t v) { return (float)v; }
  __device__ static int32_t from_f(float v) { return (int32_t)v; }
  __device__ static double to_d(int32_t v) { return v; }
  __device__ static int32_t from_d(double v) { return (int32_t)v; }
};
template <> struct Cv<int64_t> {
  static constexpr bool fl = false;
  __device__ static float to_f(int64_t v) { return (float)v; }
  __device__ static int64_t from_f(float v) { return (int64_t)v; }
  __device__ static double to_d(int64_t v) { return (double)v; }
  __device__ static int64_t from_d(double v) { return (int64_t)v; }
};
template <> struct Cv<uint8_t> { // bool
  static constexpr bool fl = false;
  __device__ static float to_f(uint8_t v) { return v != 0; }
  __device__ static uint8_t from_f(float v) { return v != 0; }
  __device__ static double to_d(uint8_t v) { return v != 0; }
  __device__ static uint8_t from_d(double v) { return v != 0; }
};

template <typename To, typename Ti> __device__ __forceinline__ To cast(Ti v) {
  if (Cv<To>::fl && Cv<Ti>::fl) return Cv<To>::from_f(Cv<Ti>::to_f(v));
  return Cv<To>::from_d(Cv<Ti>::to_d(v));
}
enum { CP_THREADS = 256 };

template <typename To, typename Ti>
__global__ void __launch_bounds__(CP_THREADS) k_cast_flat(int64_t n, To *__restrict__ dst, const Ti *__restrict__ src) {
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) dst[i] = cast<To, Ti>(src[i]);
}
template <typename To, typename Ti, typename I>
__global__ void __launch_bounds__(CP_THREADS) k_cast_strided(int64_t n, fa_cu_iter<2> it, To *dst, const Ti *src) {
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    int64_t off[2];
    fa_cu_iter_offsets<I, 2>(it, i, off);
    dst[off[0]] = cast<To, Ti>(src[off[1]]);
  }
}
// same dtype, strided: raw elements of S bytes
template <typename S, typename I>
__global__ void __launch_bounds__(CP_THREADS) k_move_strided(int64_t n, fa_cu_iter<2> it, S *dst, const S *src) {
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    int64_t off[2];
    fa_cu_iter_offsets<I, 2>(it, i, off);
    dst[off[0]] = src[off[1]];
  }
}

// same dtype, a (batched) 2-D transpose: dst has unit stride along its last dim, src along the one before.
// 32x32 tiles go through shared memory so that the reads (along src's unit stride) and the writes (along
// dst's) are both coalesced. bit walks the batch dims (the iterator's leading ndim - 2 dims).
enum { TT = 32, TR = 8 };
template <typename S>
__global__ void __launch_bounds__(TT * TR) k_transpose(int64_t nbatch, int64_t R, int64_t Cn, fa_cu_iter<2> bit, S *dst,
                                                       const S *src, int64_t ds_r, int64_t ss_c) {
  __shared__ S tile[TT][TT + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t tiles_r = (R + TT - 1) / TT, tiles_c = (Cn + TT - 1) / TT, per = tiles_r * tiles_c;
  const int64_t ntiles = nbatch * per;
  for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
    int64_t b = t / per, rem = t - b * per;
    int64_t r0 = (rem / tiles_c) * TT, c0 = (rem % tiles_c) * TT;
    int64_t off[2];
    fa_cu_iter_offsets<int64_t, 2>(bit, b, off);
    for (int k = ty; k < TT; k += TR) { // element (r0 + tx, c0 + k): consecutive tx read consecutive src
      int64_t r = r0 + tx, c = c0 + k;
      if (r < R && c < Cn) tile[k][tx] = src[off[1] + r + c * ss_c];
    }
    __syncthreads();
    for (int k = ty; k < TT; k += TR) { // element (r0 + k, c0 + tx): consecutive tx write consecutive dst
      int64_t r = r0 + k, c = c0 + tx;
      if (r < R && c < Cn) dst[off[0] + r * ds_r + c] = tile[tx][k];
    }
    __syncthreads();
  }
}

template <typename To, typename Ti> static void launch_cast(int device, const fa_tensor *dst, const fa_tensor *src) {
  int64_t n = fa_numel(dst);
  cudaStream_t st = fa_cu_stream(device);
  unsigned blocks = fa_cu_blocks(n, CP_THREADS, device);
  if (fa_is_contiguous(dst) && fa_is_contiguous(src)) {
    k_cast_flat<To, Ti><<<blocks, CP_THREADS, 0, st>>>(n, (To *)dst->data, (const Ti *)src->data);
    return;
  }
  const fa_tensor *ts[2] = {dst, src};
  fa_cu_iter<2> it = fa_cu_iter_make<2>(ts);
  if (n < ((int64_t)1 << 32)) k_cast_strided<To, Ti, uint32_t><<<blocks, CP_THREADS, 0, st>>>(n, it, (To *)dst->data, (const Ti *)src->data);
  else k_cast_strided<To, Ti, int64_t><<<blocks, CP_THREADS, 0, st>>>(n, it, (To *)dst->data, (const Ti *)src->data);
}

template <typename S> static void launch_move(int device, const fa_tensor *dst, const fa_tensor *src) {
  int64_t n = fa_numel(dst);
  cudaStream_t st = fa_cu_stream(device);
  unsigned blocks = fa_cu_blocks(n, CP_THREADS, device);
  const fa_tensor *ts[2] = {dst, src};
  fa_cu_iter<2> it = fa_cu_iter_make<2>(ts);
  const int nd = it.ndim;
  if (nd >= 2 && it.stride[0][nd - 1] == 1 && it.stride[1][nd - 2] == 1 && it.stride[1][nd - 1] != 1 && it.shape[nd - 1] >= 16 &&
      it.shape[nd - 2] >= 16) {
    int64_t R = it.shape[nd - 2], Cn = it.shape[nd - 1];
    fa_cu_iter<2> bit = it;
    bit.ndim = nd - 2;
    int64_t nbatch = n / (R * Cn), ntiles = nbatch * ((R + TT - 1) / TT) * ((Cn + TT - 1) / TT);
    unsigned tb = (unsigned)(ntiles < (int64_t)fa_cu_sm_count(device) * 16 ? ntiles : (int64_t)fa_cu_sm_count(device) * 16);
    k_transpose<S><<<tb, dim3(TT, TR), 0, st>>>(nbatch, R, Cn, bit, (S *)dst->data, (const S *)src->data, it.stride[0][nd - 2],
                                                it.stride[1][nd - 1]);
    return;
  }
  if (n < ((int64_t)1 << 32)) k_move_strided<S, uint32_t><<<blocks, CP_THREADS, 0, st>>>(n, it, (S *)dst->data, (const S *)src->data);
  else k_move_strided<S, int64_t><<<blocks, CP_THREADS, 0, st>>>(n, it, (S *)dst->data, (const S *)src->data);
}

template <typename To> static int cast_from(int device, const fa_tensor *dst, const fa_tensor *src) {
  switch (src->dtype) {
    case FA_FLOAT32: launch_cast<To, float>(device, dst, src); return 0;
    case FA_FLOAT64: launch_cast<To, double>(device, dst, src); return 0;
    case FA_BFLOAT16: launch_cast<To, __nv_bfloat16>(device, dst, src); return 0;
    case FA_FLOAT16: launch_cast<To, __half>(device, dst, src); return 0;
    case FA_INT32: launch_cast<To, int32_t>(device, dst, src); return 0;
    case FA_INT64: launch_cast<To, int64_t>(device, dst, src); return 0;
    case FA_BOOL: launch_cast<To, uint8_t>(device, dst, src); return 0;
  }
  return fa_error(FA_ERR_ARG, "fa_copy: argument 'src': invalid dtype %d", src->dtype);
}

// dst <- src, both on `device` (any dtypes, any strides, same number of elements); stream-ordered, no sync
static int copy_on_device(int device, const fa_tensor *dst, const fa_tensor *src) {
  static const char *fn = "fa_copy";
  int64_t n = fa_numel(dst);
  if (n == 0) return 0;
  int rc = 0;
  if (dst->dtype == src->dtype) {
    int es = fa_dtype_size(dst->dtype);
    if (fa_is_contiguous(dst) && fa_is_contiguous(src)) {
      if (dst->data == src->data) return 0;
      return fa_cu_check(cudaMemcpyAsync(dst->data, src->data, (size_t)(n * es), cudaMemcpyDeviceToDevice, fa_cu_stream(device)), fn);
    }
    switch (es) {
      case 1: launch_move<uint8_t>(device, dst, src); break;
      case 2: launch_move<uint16_t>(device, dst, src); break;
      case 4: launch_move<uint32_t>(device, dst, src); break;
      default: launch_move<uint64_t>(device, dst, src); break;
    }
    return fa_cu_launch_check(fn);
  }
  switch (dst->dtype) {
    case FA_FLOAT32: rc = cast_from<float>(device, dst, src); break;
    case FA_FLOAT64: rc = cast_from<double>(device, dst, src); break;
    case FA_BFLOAT16: rc = cast_from<__nv_bfloat16>(device, dst, src); break;
    case FA_FLOAT16: rc = cast_from<__half>(device, dst, src); break;
    case FA_INT32: rc = cast_from<int32_t>(device, dst, src); break;
    case FA_INT64: rc = cast_from<int64_t>(device, dst, src); break;
    case FA_BOOL: rc = cast_from<uint8_t>(device, dst, src); break;
    default: return fa_error(FA_ERR_ARG, "fa_copy: argument 'dst': invalid dtype %d", dst->dtype);
  }
  if (rc) return rc;
  return fa_cu_launch_check(fn);
}

// a contiguous descriptor with t's shape, the given dtype/device and data
static fa_tensor contiguous_like(const fa_tensor *t, int dtype, int device, void *data) {
  fa_tensor c;
  memset(&c, 0, sizeof c);
  c.data = data;
  c.dtype = dtype;
  c.device = device;
  c.ndim = t->ndim;
  int64_t s = 1;
  for (int d = t->ndim - 1; d >= 0; d--) { c.shape[d] = t->shape[d]; c.stride[d] = s; s *= t->shape[d]; }
  return c;
}

// host -> device
static int copy_h2d(fa_tensor *dst, const fa_tensor *src) {
  static const char *fn = "fa_copy";
  const int dev = dst->device;
  const int64_t n = fa_numel(dst);
  const int64_t sbytes = n * fa_dtype_size(src->dtype);
  cudaStream_t st = fa_cu_stream(dev);
  int rc = 0;
  if (dst->dtype == src->dtype && fa_is_contiguous(dst) && fa_is_contiguous(src)) {
    if ((rc = fa_cu_check(cudaMemcpyAsync(dst->data, src->data, (size_t)sbytes, cudaMemcpyHostToDevice, st), fn))) return rc;
    return fa_cu_check(cudaStreamSynchronize(st), fn);
  }
  // 1. src contiguous on the host (gathered by the CPU copy when strided)
  void *hbuf = NULL;
  const void *hsrc = src->data;
  if (!fa_is_contiguous(src)) {
    hbuf = malloc((size_t)sbytes);
    if (!hbuf) return fa_error(FA_ERR_MEMORY, "%s: out of host memory staging %lld bytes", fn, (long long)sbytes);
    fa_tensor h = contiguous_like(src, src->dtype, FA_CPU, hbuf);
    if ((rc = fa_copy(&h, src))) { free(hbuf); return rc; }
    hsrc = hbuf;
  }
  // 2. straight into dst when it is contiguous of src's dtype, else into a device staging buffer + cast
  if (dst->dtype == src->dtype && fa_is_contiguous(dst)) {
    rc = fa_cu_check(cudaMemcpyAsync(dst->data, hsrc, (size_t)sbytes, cudaMemcpyHostToDevice, st), fn);
  } else {
    void *dbuf = fa_cu_temp_alloc(dev, sbytes);
    if (!dbuf) { free(hbuf); return FA_ERR_MEMORY; }
    rc = fa_cu_check(cudaMemcpyAsync(dbuf, hsrc, (size_t)sbytes, cudaMemcpyHostToDevice, st), fn);
    if (!rc) {
      fa_tensor d = contiguous_like(src, src->dtype, dev, dbuf);
      rc = copy_on_device(dev, dst, &d);
    }
    fa_cu_temp_free(dev, dbuf); // stream-ordered: the cast above runs before any reuse
  }
  int rc2 = fa_cu_check(cudaStreamSynchronize(st), fn); // the host buffer is read until the copy is done
  free(hbuf);
  return rc ? rc : rc2;
}

// device -> host
static int copy_d2h(fa_tensor *dst, const fa_tensor *src) {
  static const char *fn = "fa_copy";
  const int dev = src->device;
  const int64_t n = fa_numel(dst);
  const int64_t dbytes = n * fa_dtype_size(dst->dtype);
  cudaStream_t st = fa_cu_stream(dev);
  int rc = 0;
  if (dst->dtype == src->dtype && fa_is_contiguous(dst) && fa_is_contiguous(src)) {
    if ((rc = fa_cu_check(cudaMemcpyAsync(dst->data, src->data, (size_t)dbytes, cudaMemcpyDeviceToHost, st), fn))) return rc;
    return fa_cu_check(cudaStreamSynchronize(st), fn);
  }
  // 1. on the device: contiguous, of dst's dtype
  void *dbuf = NULL;
  const void *dsrc = src->data;
  if (!(dst->dtype == src->dtype && fa_is_contiguous(src))) {
    dbuf = fa_cu_temp_alloc(dev, dbytes);
    if (!dbuf) return FA_ERR_MEMORY;
    fa_tensor d = contiguous_like(src, dst->dtype, dev, dbuf);
    if ((rc = copy_on_device(dev, &d, src))) { fa_cu_temp_free(dev, dbuf); return rc; }
    dsrc = dbuf;
  }
  // 2. to the host: straight into dst when contiguous, else into a host buffer scattered by the CPU copy
  if (fa_is_contiguous(dst)) {
    rc = fa_cu_check(cudaMemcpyAsync(dst->data, dsrc, (size_t)dbytes, cudaMemcpyDeviceToHost, st), fn);
    if (!rc) rc = fa_cu_check(cudaStreamSynchronize(st), fn);
  } else {
    void *hbuf = malloc((size_t)dbytes);
    if (!hbuf) rc = fa_error(FA_ERR_MEMORY, "%s: out of host memory staging %lld bytes", fn, (long long)dbytes);
    if (!rc) rc = fa_cu_check(cudaMemcpyAsync(hbuf, dsrc, (size_t)dbytes, cudaMemcpyDeviceToHost, st), fn);
    if (!rc) rc = fa_cu_check(cudaStreamSynchronize(st), fn);
    if (!rc) {
      fa_tensor h = contiguous_like(dst, dst->dtype, FA_CPU, hbuf);
      rc = fa_copy(dst, &h);
    }
    free(hbuf);
  }
  if (dbuf) fa_cu_temp_free(dev, dbuf);
  return rc;
}

// device -> another device: contiguous of dst's dtype on the source device, one peer copy, scatter on dst
static int copy_peer(fa_tensor *dst, const fa_tensor *src) {
  static const char *fn = "fa_copy";
  const int sdev = src->device, ddev = dst->device;
  const int64_t n = fa_numel(dst);
  const int64_t bytes = n * fa_dtype_size(dst->dtype);
  int rc = 0;
  void *sbuf = NULL, *dbuf = NULL;
  const void *from = src->data;
  if (!(dst->dtype == src->dtype && fa_is_contiguous(src))) {
    if (!(sbuf = fa_cu_temp_alloc(sdev, bytes))) return FA_ERR_MEMORY;
    fa_tensor d = contiguous_like(src, dst->dtype, sdev, sbuf);
    if ((rc = copy_on_device(sdev, &d, src))) goto done;
    from = sbuf;
  }
  // the source (and its staging) must be complete before the destination stream reads it
  if ((rc = fa_cu_check(cudaStreamSynchronize(fa_cu_stream(sdev)), fn))) goto done;
  {
    void *to = dst->data;
    if (!fa_is_contiguous(dst)) {
      if (!(dbuf = fa_cu_temp_alloc(ddev, bytes))) { rc = FA_ERR_MEMORY; goto done; }
      to = dbuf;
    }
    cudaStream_t dst_stream = fa_cu_stream(ddev);
    if ((rc = fa_cu_check(cudaMemcpyPeerAsync(to, ddev, from, sdev, (size_t)bytes, dst_stream), fn))) goto done;
    if (dbuf) {
      fa_tensor d = contiguous_like(dst, dst->dtype, ddev, dbuf);
      if ((rc = copy_on_device(ddev, dst, &d))) goto done;
    }
    // the source device may reuse its blocks once we return: finish reading them first
    rc = fa_cu_check(cudaStreamSynchronize(dst_stream), fn);
  }
done:
  if (sbuf) fa_cu_temp_free(sdev, sbuf);
  if (dbuf) fa_cu_temp_free(ddev, dbuf);
  return rc;
}

int fa_cu_copy(fa_tensor *dst, const fa_tensor *src) {
  if (fa_numel(dst) == 0) return 0;
  if (dst->device >= 0 && src->device >= 0) {
    if (dst->device == src->device) return copy_on_device(dst->device, dst, src);
    return copy_peer(dst, src);
  }
  if (dst->device >= 0) return copy_h2d(dst, src);
  return copy_d2h(dst, src);
}

// ------------------------------------------------------------------ fill
// raw S-byte pattern; contiguous 16-byte-aligned runs are written 16 bytes at a time
template <typename S>
__global__ void __launch_bounds__(CP_THREADS) k_fill_flat(int64_t n, S *__restrict__ dst, S v) {
  const int64_t step = (int64_t)gridDim.x * blockDim.x, t0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  constexpr int V = 16 / sizeof(S);
  int64_t nv = ((uintptr_t)dst & 15) == 0 ? n / V : 0;
  if (nv) {
    alignas(16) S pack[V];
#pragma unroll
    for (int j = 0; j < V; j++) pack[j] = v;
    uint4 u = *reinterpret_cast<const uint4 *>(pack);
    for (int64_t i = t0; i < nv; i += step) reinterpret_cast<uint4 *>(dst)[i] = u;
  }
  for (int64_t i = nv * V + t0; i < n; i += step) dst[i] = v;
}
template <typename S, typename I>
__global__ void __launch_bounds__(CP_THREADS) k_fill_strided(int64_t n, fa_cu_iter<1> it, S *dst, S v) {
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    int64_t off[1];
    fa_cu_iter_offsets<I, 1>(it, i, off);
    dst[off[0]] = v;
  }
}

template <typename S> static int launch_fill(fa_tensor *dst, S v) {
  int dev = dst->device;
  int64_t n = fa_numel(dst);
  cudaStream_t st = fa_cu_stream(dev);
  if (fa_is_contiguous(dst)) {
    constexpr int V = 16 / sizeof(S);
    k_fill_flat<S><<<fa_cu_blocks(n / V + 1, CP_THREADS, dev), CP_THREADS, 0, st>>>(n, (S *)dst->data, v);
  } else {
    const fa_tensor *ts[1] = {dst};
    fa_cu_iter<1> it = fa_cu_iter_make<1>(ts);
    if (n < ((int64_t)1 << 32)) k_fill_strided<S, uint32_t><<<fa_cu_blocks(n, CP_THREADS, dev), CP_THREADS, 0, st>>>(n, it, (S *)dst->data, v);
    else k_fill_strided<S, int64_t><<<fa_cu_blocks(n, CP_THREADS, dev), CP_THREADS, 0, st>>>(n, it, (S *)dst->data, v);
  }
  return fa_cu_launch_check("fa_fill");
}

// the element's bits are made on the host with the CPU's conversions (store_from_double in c/copy.c)
int fa_cu_fill(fa_tensor *dst, double value) {
  if (fa_numel(dst) == 0) return 0;
  switch (dst->dtype) {
    case FA_FLOAT32: { float f = (float)value; uint32_t u; memcpy(&u, &f, 4); return launch_fill<uint32_t>(dst, u); }
    case FA_FLOAT64: { uint64_t u; memcpy(&u, &value, 8); return launch_fill<uint64_t>(dst, u); }
    case FA_BFLOAT16: return launch_fill<uint16_t>(dst, fa_f32_to_bf16((float)value));
    case FA_FLOAT16: return launch_fill<uint16_t>(dst, fa_f32_to_f16((float)value));
    case FA_INT32: return launch_fill<uint32_t>(dst, (uint32_t)(int32_t)value);
    case FA_INT64: return launch_fill<uint64_t>(dst, (uint64_t)(int64_t)value);
    case FA_BOOL: return launch_fill<uint8_t>(dst, (uint8_t)(value != 0));
  }
  return fa_error(FA_ERR_ARG, "fa_fill: argument 'dst': invalid dtype %d", dst->dtype);
}
