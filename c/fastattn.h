/* fastattn.h: the whole public C API of libfastattn.
 *
 * lua/fastattn/ffi.lua feeds this file to ffi.cdef after stripping preprocessor lines, so the
 * declarations below must stay plain C that LuaJIT's FFI parses: no macros inside declarations,
 * enums for constants.
 *
 * Conventions (DESIGN §2):
 * - every entry point returns 0 on success or an FA_ERR_* code; the message is read with
 *   fa_last_error() (thread-local). Nothing here exits, aborts or prints.
 * - tensors are passed as fa_tensor descriptors that own nothing; strides are in elements.
 *   device -1 is the CPU, >= 0 a CUDA ordinal.
 * - one entry per op direction, fa_<op>_forward / fa_<op>_backward, outputs first.
 * - backward entries that produce parameter gradients ADD into them (Torch's accGradParameters);
 *   input gradients are overwritten. A NULL gradient pointer means "not needed".
 * - optional tensors (bias, ...) are NULL when absent.
 */
#ifndef FASTATTN_H
#define FASTATTN_H
#include <stdint.h>
#include <stddef.h>
#ifdef __cplusplus
extern "C" {
#endif

enum { FA_MAX_DIMS = 8 };
enum { FA_CPU = -1 };

typedef enum fa_dtype {
  FA_FLOAT32 = 0, FA_FLOAT64 = 1, FA_BFLOAT16 = 2, FA_FLOAT16 = 3,
  FA_INT32 = 4, FA_INT64 = 5, FA_BOOL = 6, FA_NUM_DTYPES = 7
} fa_dtype;

typedef enum fa_status {
  FA_OK = 0, FA_ERR_ARG = 1, FA_ERR_MEMORY = 2, FA_ERR_CUDA = 3, FA_ERR_UNSUPPORTED = 4
} fa_status;

typedef struct fa_tensor {
  void *data;
  int32_t dtype, device, ndim;
  int64_t shape[8], stride[8];
} fa_tensor;

/* Reference-counted storage; the Lua Tensor holds one reference per view. */
typedef struct fa_storage {
  void *data;
  int64_t nbytes;
  int32_t device;
  int32_t refcount;
} fa_storage;

/* ---------------------------------------------------------------- runtime */
const char *fa_version(void);
const char *fa_last_error(void);
int fa_dtype_size(int dtype);
const char *fa_dtype_name(int dtype);
int fa_has_cuda(void);                 /* 1 when the library was built with CUDA kernels */

void *fa_alloc(int device, int64_t nbytes);   /* 64-byte aligned on the CPU; NULL + error on failure */
void fa_free(int device, void *ptr);
fa_storage *fa_storage_new(int device, int64_t nbytes);
void fa_storage_retain(fa_storage *s);
void fa_storage_release(fa_storage *s);

void fa_set_num_threads(int n);
int fa_get_num_threads(void);

/* Counter-based RNG (Philox4x32-10). Element i of a call draws from counter (offset + i) under key
 * seed, so results depend on (seed, offset) only, never on the thread count or the device. */
int fa_uniform(fa_tensor *out, double lo, double hi, uint64_t seed, uint64_t offset);
int fa_normal(fa_tensor *out, double mean, double std, uint64_t seed, uint64_t offset);

/* ---------------------------------------------------------------- copy, fill */
/* dst <- src: same number of elements (shapes may differ only when both are contiguous), any strides,
 * any dtype pair (cast), CPU<->CUDA when built with CUDA. */
int fa_copy(fa_tensor *dst, const fa_tensor *src);
int fa_fill(fa_tensor *dst, double value);

/* ---------------------------------------------------------------- elementwise */
typedef enum fa_binary_op { FA_ADD = 0, FA_SUB = 1, FA_MUL = 2, FA_DIV = 3 } fa_binary_op;
/* out = a <op> (alpha * b); a, b, out have the same shape (broadcast by zero strides), any strides. */
int fa_binary_forward(int op, fa_tensor *out, const fa_tensor *a, const fa_tensor *b, double alpha);
/* grads of out = a <op> b (alpha = 1): grad_a, grad_b same shape as a, b (no broadcasting; reduce in Lua). */
int fa_binary_backward(int op, fa_tensor *grad_a, fa_tensor *grad_b, const fa_tensor *grad_out,
                       const fa_tensor *a, const fa_tensor *b);
/* out = a * scale + shift */
int fa_scale_forward(fa_tensor *out, const fa_tensor *a, double scale, double shift);
/* out = a + value * b * c */
int fa_addcmul_forward(fa_tensor *out, const fa_tensor *a, const fa_tensor *b, const fa_tensor *c, double value);

typedef enum fa_unary_op {
  FA_EXP = 0, FA_LOG = 1, FA_SQRT = 2, FA_ABS = 3, FA_SIGN = 4, FA_NEG = 5,
  FA_RELU = 6, FA_TANH = 7, FA_SIGMOID = 8, FA_GELU = 9, FA_NUM_UNARY = 10
} fa_unary_op;
int fa_unary_forward(int op, fa_tensor *out, const fa_tensor *x);
/* grad_x = dy/dx * grad_y; x is the input, y the forward output (each op uses what it needs). */
int fa_unary_backward(int op, fa_tensor *grad_x, const fa_tensor *grad_y, const fa_tensor *x, const fa_tensor *y);

/* ---------------------------------------------------------------- reductions */
typedef enum fa_reduce_op { FA_SUM = 0, FA_MEAN = 1, FA_MAX = 2, FA_ARGMAX = 3 } fa_reduce_op;
/* dim is 0-based; dim = -1 reduces over all elements. out keeps the reduced dim with size 1 (or is a
 * 1-element tensor for dim -1). FA_MAX writes indices (int64) into idx when idx is not NULL; FA_ARGMAX
 * writes int64 indices into out. */
int fa_reduce_forward(int op, fa_tensor *out, fa_tensor *idx, const fa_tensor *x, int dim);
/* grad_x from grad_out (same shapes as forward); idx is needed for FA_MAX. */
int fa_reduce_backward(int op, fa_tensor *grad_x, const fa_tensor *grad_out, const fa_tensor *idx, int dim);

/* ---------------------------------------------------------------- matrix products */
/* out(..., m, n) = alpha * op(a)(..., m, k) @ op(b)(..., k, n) + beta * out; 2-D or batched 3-D
 * (batch dim broadcast when one side has batch 1). op = transpose when trans_* is set. */
int fa_matmul_forward(fa_tensor *out, const fa_tensor *a, const fa_tensor *b, int trans_a, int trans_b,
                      double alpha, double beta);
/* grads of out = a @ b: grad_a = grad_out @ b^T, grad_b = a^T @ grad_out (overwritten). */
int fa_matmul_backward(fa_tensor *grad_a, fa_tensor *grad_b, const fa_tensor *grad_out,
                       const fa_tensor *a, const fa_tensor *b);

/* x (..., in), weight (out, in), bias (out) or NULL -> out (..., out) */
int fa_linear_forward(fa_tensor *out, const fa_tensor *x, const fa_tensor *weight, const fa_tensor *bias);
int fa_linear_backward(fa_tensor *grad_x, fa_tensor *grad_weight, fa_tensor *grad_bias,
                       const fa_tensor *grad_out, const fa_tensor *x, const fa_tensor *weight);

/* ---------------------------------------------------------------- convolution */
typedef struct fa_conv2d_params {
  int32_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups;
} fa_conv2d_params;
/* x (N, C, H, W), weight (O, C/groups, kh, kw), bias (O) or NULL -> out (N, O, Ho, Wo) */
int fa_conv2d_forward(fa_tensor *out, const fa_tensor *x, const fa_tensor *weight, const fa_tensor *bias,
                      const fa_conv2d_params *p);
int fa_conv2d_backward(fa_tensor *grad_x, fa_tensor *grad_weight, fa_tensor *grad_bias,
                       const fa_tensor *grad_out, const fa_tensor *x, const fa_tensor *weight,
                       const fa_conv2d_params *p);
/* [conv2d section, added with c/conv2d.c] CPU algorithm for the convolutions that can use either:
 * FA_CONV_AUTO picks per shape (Winograd F(4x4,3x3) for 3x3 stride-1 undilated convolutions with at least
 * 32 in- and out-channels per group: 4x fewer multiplications, float32 error about 1e-5 relative instead
 * of 1e-6); FA_CONV_GEMM forces im2col + GEMM; FA_CONV_WINOGRAD forces Winograd wherever it applies.
 * Depthwise convolutions (groups == in-channels) always use the direct kernel. Process-wide; returns the
 * previous setting, or -1 (and an error) for an unknown value. */
typedef enum fa_conv2d_algo { FA_CONV_AUTO = 0, FA_CONV_GEMM = 1, FA_CONV_WINOGRAD = 2 } fa_conv2d_algo;
int fa_conv2d_set_algorithm(int algo);

/* ---------------------------------------------------------------- normalisation, softmax */
/* Normalises over the last `norm_size` elements (the product of the normalized_shape).
 * x (rows, norm_size) viewed; weight/bias (norm_size) or NULL; mean/rstd (rows) float32 (float64 for
 * float64 x), saved for backward. */
int fa_layernorm_forward(fa_tensor *out, fa_tensor *mean, fa_tensor *rstd, const fa_tensor *x,
                         const fa_tensor *weight, const fa_tensor *bias, int64_t norm_size, double eps);
int fa_layernorm_backward(fa_tensor *grad_x, fa_tensor *grad_weight, fa_tensor *grad_bias,
                          const fa_tensor *grad_out, const fa_tensor *x, const fa_tensor *mean,
                          const fa_tensor *rstd, const fa_tensor *weight, int64_t norm_size);

/* softmax (log_softmax when log != 0) over dim (0-based) */
int fa_softmax_forward(fa_tensor *out, const fa_tensor *x, int dim, int log);
int fa_softmax_backward(fa_tensor *grad_x, const fa_tensor *grad_out, const fa_tensor *out, int dim, int log);

/* out = x * mask / (1 - p); mask (same shape, bool) drawn from (seed, offset) */
int fa_dropout_forward(fa_tensor *out, fa_tensor *mask, const fa_tensor *x, double p, uint64_t seed, uint64_t offset);
int fa_dropout_backward(fa_tensor *grad_x, const fa_tensor *grad_out, const fa_tensor *mask, double p);

/* ---------------------------------------------------------------- grid sampling */
typedef enum fa_padding { FA_PAD_ZEROS = 0, FA_PAD_BORDER = 1 } fa_padding;
/* Bilinear. input (N, C, H, W), grid (N, Ho, Wo, 2) with (x, y) in [-1, 1] -> out (N, C, Ho, Wo) */
int fa_grid_sample_forward(fa_tensor *out, const fa_tensor *input, const fa_tensor *grid,
                           int padding, int align_corners);
int fa_grid_sample_backward(fa_tensor *grad_input, fa_tensor *grad_grid, const fa_tensor *grad_out,
                            const fa_tensor *input, const fa_tensor *grid, int padding, int align_corners);

/* ---------------------------------------------------------------- criterions */
typedef enum fa_reduction { FA_REDUCE_NONE = 0, FA_REDUCE_MEAN = 1, FA_REDUCE_SUM = 2 } fa_reduction;
/* loss is a 1-element tensor for mean/sum, x's shape for none */
int fa_mse_forward(fa_tensor *loss, const fa_tensor *x, const fa_tensor *target, int reduction);
int fa_mse_backward(fa_tensor *grad_x, const fa_tensor *grad_loss, const fa_tensor *x, const fa_tensor *target,
                    int reduction);
/* logits (N, C) or (N, C, d1...), target int64 (N) or (N, d1...) class indices; rows whose target is
 * ignore_index count for nothing (mean divides by the number of counted rows); label_smoothing as
 * PyTorch's. loss: 1 element for mean/sum, target's shape for none. */
int fa_cross_entropy_forward(fa_tensor *loss, const fa_tensor *logits, const fa_tensor *target,
                             int64_t ignore_index, double label_smoothing, int reduction);
int fa_cross_entropy_backward(fa_tensor *grad_logits, const fa_tensor *grad_loss, const fa_tensor *logits,
                              const fa_tensor *target, int64_t ignore_index, double label_smoothing,
                              int reduction);

/* ---------------------------------------------------------------- optimisers (fused, flat buffers) */
/* PyTorch's torch.optim.SGD semantics; momentum_buf may be NULL when momentum == 0. `first` = 1 on the
 * first step (the buffer is set to the gradient, as PyTorch does). */
int fa_sgd_step(fa_tensor *param, const fa_tensor *grad, fa_tensor *momentum_buf, double lr, double momentum,
                double dampening, double weight_decay, int nesterov, int first);
/* torch.optim.Adam (decoupled = 0, L2 added to the gradient) and AdamW (decoupled = 1); step counts from 1. */
int fa_adam_step(fa_tensor *param, const fa_tensor *grad, fa_tensor *exp_avg, fa_tensor *exp_avg_sq, double lr,
                 double beta1, double beta2, double eps, double weight_decay, int decoupled, int64_t step);
/* sum of squares of x (any dtype float) into out (1 element, float64 on the CPU, float32 on CUDA) */
int fa_sumsq(fa_tensor *out, const fa_tensor *x);

/* ---------------------------------------------------------------- multi-scale deformable attention */
typedef enum fa_msda_order { FA_MSDA_ORDER_AUTO = 0, FA_MSDA_ORDER_QUERY = 1, FA_MSDA_ORDER_HEAD = 2 } fa_msda_order;
typedef enum fa_msda_switch { FA_MSDA_AUTO = 0, FA_MSDA_OFF = 1, FA_MSDA_ON = 2 } fa_msda_switch;
/* A zeroed struct (or NULL) is the default: zeros padding, align_corners off, atomics, the planner's kernels. */
typedef struct fa_msda_opts {
  int32_t padding;        /* fa_padding: FA_PAD_ZEROS or FA_PAD_BORDER */
  int32_t align_corners;  /* 0 or 1 */
  int32_t deterministic;  /* 1: GPU backward without float atomics (sort and gather); the CPU always is */
  int32_t order; /* GPU kernel choice, for tests and benchmarks: FA_MSDA_ORDER_AUTO (0, the planner), FA_MSDA_ORDER_QUERY (1: groups (n,q,m)), FA_MSDA_ORDER_HEAD (2: groups (n,m,q)) */
  int32_t merge;  /* backward: FA_MSDA_AUTO (0), FA_MSDA_OFF (1), FA_MSDA_ON (2) */
                  /* (the warp merge: groups of a warp that sample the same cell of the same head add up
                   * before the atomics; the planner picks (n,m,q) order and the merge when Lq == S). The
                   * merge exists in head order only: ON with FA_MSDA_ORDER_QUERY runs the query-order
                   * kernel without it (there a warp's neighbouring groups are mostly other heads). Ignored
                   * by the forward and by the deterministic backward (no atomics to merge). */
} fa_msda_opts;
/* value (N, S, M, D), spatial_shapes int64 or int32 (L, 2) as (H, W), level_start_index int64 or int32 (L),
 * or NULL (then the running sum of H*W), sampling_locations (N, Lq, M, L, P, 2) x first, attention_weights
 * (N, Lq, M, L, P) -> out (N, Lq, M*D), contiguous. Inputs may be strided views (copied when they are not
 * contiguous). spatial_shapes and level_start_index live on the CPU (they are small and read by the host).
 * CPU: float32 or float64 throughout. CUDA: float32, bfloat16 or float16 value (and out, grad_out), float32
 * locations and weights. Backward: gradients overwritten, NULL = not wanted. */
int fa_msda_forward(fa_tensor *out, const fa_tensor *value, const fa_tensor *spatial_shapes,
                    const fa_tensor *level_start_index, const fa_tensor *sampling_locations,
                    const fa_tensor *attention_weights, const fa_msda_opts *opts);
int fa_msda_backward(fa_tensor *grad_value, fa_tensor *grad_sampling_locations, fa_tensor *grad_attention_weights,
                     const fa_tensor *grad_out, const fa_tensor *value, const fa_tensor *spatial_shapes,
                     const fa_tensor *level_start_index, const fa_tensor *sampling_locations,
                     const fa_tensor *attention_weights, const fa_msda_opts *opts);

/* ---------------------------------------------------------------- attention (fa.attention) */
/* GPU kernel families, for tests and benchmarks (the planner picks one when AUTO) */
typedef enum fa_attn_kernel {
  FA_ATTN_KERNEL_AUTO = 0,
  FA_ATTN_KERNEL_SIMT = 1,  /* CUDA cores: every dtype, exact float32 */
  FA_ATTN_KERNEL_MMA = 2,   /* mma.sync tensor cores (sm_80 and later): bfloat16, float16, TF32 float32 */
  FA_ATTN_KERNEL_WGMMA = 3  /* Hopper wgmma (sm_90a) */
} fa_attn_kernel;
/* A zeroed struct (or NULL) is the default: no bias, no mask, scale D^-1/2, no dropout, the planner's kernel. */
typedef struct fa_attention_opts {
  const fa_tensor *bias;  /* NULL or broadcastable to (..., H, Lq, Lk) (size-1 or missing leading dims) */
  const fa_tensor *mask;  /* NULL or broadcastable like bias; bool, integer or float; nonzero = keep */
  double scale;           /* used when has_scale = 1, else D^-1/2 */
  int32_t has_scale;
  double mask_scale;      /* 0: the mask selects keys; > 0: it is added as mask_scale * (mask - 1) (OpenFold) */
  double dropout;         /* probability of dropping an attention weight, 0 <= p < 1 */
  uint64_t seed, offset;  /* dropout's Philox stream (the forward and the backward must get the same) */
  int32_t deterministic;  /* GPU backward bit-identical run to run (the CPU always is) */
  int32_t kernel;         /* fa_attn_kernel */
} fa_attention_opts;
/* q (..., H, Lq, D), k and v (..., Hkv, Lk, D), the same leading dims, H a multiple of Hkv: query head h reads
 * kv head h / (H / Hkv). out (..., H, Lq, D), lse (..., H, Lq) float32 (float64 for float64 inputs). Every
 * tensor may be a strided view; q, k, v, out and the gradients need a contiguous last dim. CPU: float32 or
 * float64. CUDA: float32, bfloat16 or float16 (float32 accumulation); the bias float32 or q's dtype.
 * Backward: grad_q/k/v like q/k/v, grad_bias like the bias (summed over its broadcast dims); overwritten;
 * NULL = not wanted. */
int fa_attention_forward(fa_tensor *out, fa_tensor *lse, const fa_tensor *q, const fa_tensor *k, const fa_tensor *v,
                         const fa_attention_opts *opts);
int fa_attention_backward(fa_tensor *grad_q, fa_tensor *grad_k, fa_tensor *grad_v, fa_tensor *grad_bias,
                          const fa_tensor *grad_out, const fa_tensor *q, const fa_tensor *k, const fa_tensor *v,
                          const fa_tensor *out, const fa_tensor *lse, const fa_attention_opts *opts);

/* ---------------------------------------------------------------- continuous position bias (fa.cpb) */
/* A zeroed struct (or NULL) is the default. */
typedef struct fa_cpb_opts {
  int32_t deterministic;  /* GPU backward bit-identical run to run (the CPU always is, for any thread count) */
} fa_cpb_opts;
/* The CPB MLP of DeformableAttention2D over every (p, query i, key j) pair:
 *   d = qpos[i] - kpos[p, j], f = sign(d) log(|d| + 1), h1 = relu(w1 f + b1), h2 = relu(w2 h1 + b2),
 *   out[p, o, i, j] = (w3 h2 + b3)[o]
 * qpos (N, 2), kpos (P, M, 2) x first, w1 (C, 2), b1 (C), w2 (C, C), b2 (C), w3 (O, C), b3 (O) -> out (P, O, N, M),
 * contiguous. Inputs may be strided views (copied when they are not contiguous). CPU: float32 or float64
 * throughout. CUDA: float32 throughout, or bfloat16/float16 weights and biases with float32 positions, out and
 * grad_out (grad_out may also have the weights' dtype). Backward: grad_kpos (P, M, 2) and the weight gradients
 * shaped and typed as their inputs, contiguous, overwritten; NULL = not wanted. No gradient for qpos; the
 * gradient of f at d == 0 is 0 (as PyTorch's autograd of sign(d) * log1p(|d|)). */
int fa_cpb_forward(fa_tensor *out, const fa_tensor *qpos, const fa_tensor *kpos, const fa_tensor *w1, const fa_tensor *b1,
                   const fa_tensor *w2, const fa_tensor *b2, const fa_tensor *w3, const fa_tensor *b3,
                   const fa_cpb_opts *opts);
int fa_cpb_backward(fa_tensor *grad_kpos, fa_tensor *grad_w1, fa_tensor *grad_b1, fa_tensor *grad_w2, fa_tensor *grad_b2,
                    fa_tensor *grad_w3, fa_tensor *grad_b3, const fa_tensor *grad_bias, const fa_tensor *qpos,
                    const fa_tensor *kpos, const fa_tensor *w1, const fa_tensor *b1, const fa_tensor *w2,
                    const fa_tensor *b2, const fa_tensor *w3, const fa_tensor *b3, const fa_cpb_opts *opts);

/* ---------------------------------------------------------------- fused deformable SDPA (fa.deform_sdpa) */
/* A zeroed struct (or NULL) is the default. */
typedef struct fa_deform_sdpa_opts {
  int32_t deterministic;  /* GPU backward bit-identical run to run (the CPU always is, for any thread count) */
} fa_deform_sdpa_opts;
/* q, k, v (B, V, heads, H*W, D) (row-major pixels), coords (B, V, H*W, V, S, 2) in [0, 1], x first: query
 * (b, v1, h, l) attends to the keys and values of every view v2 sampled at coords[b, v1, l, v2, s] as
 * F.grid_sample(map, 2 coords - 1, mode='bilinear', padding_mode='zeros', align_corners=True) (taps outside read
 * 0; a point wholly outside gives key 0 and value 0, still a softmax term): out = softmax(scale q.k) v (B, V,
 * heads, H*W, D), lse (B, V, heads, H*W) float32 (float64 for float64 inputs). W, H >= 1. q, k, v, grad_out
 * and out may be strided views; coords is copied when not contiguous; results are contiguous. CPU: float32 or
 * float64 throughout. CUDA: q, k, v in float32, bfloat16 or float16, coords float32. Backward: grad_q/k/v like
 * q/k/v, grad_coords like coords, overwritten; NULL = not wanted. */
int fa_deform_sdpa_forward(fa_tensor *out, fa_tensor *lse, const fa_tensor *q, const fa_tensor *k, const fa_tensor *v,
                           const fa_tensor *coords, int64_t W, int64_t H, double scale, const fa_deform_sdpa_opts *opts);
int fa_deform_sdpa_backward(fa_tensor *grad_q, fa_tensor *grad_k, fa_tensor *grad_v, fa_tensor *grad_coords,
                            const fa_tensor *grad_out, const fa_tensor *q, const fa_tensor *k, const fa_tensor *v,
                            const fa_tensor *coords, int64_t W, int64_t H, double scale, const fa_tensor *out,
                            const fa_tensor *lse, const fa_deform_sdpa_opts *opts);

/* ---------------------------------------------------------------- CUDA runtime */
/* All of these exist in a build without CUDA: they report no device (count 0) or return FA_ERR_UNSUPPORTED. */
int fa_cuda_device_count(void);
int fa_cuda_set_device(int device);
int fa_cuda_get_device(void);
int fa_cuda_synchronize(int device);
/* stats[0] = bytes in use, [1] = bytes cached (held by the allocator, free), [2] = peak in use,
 * [3] = bytes allocated since the last fa_cuda_gc_reset (drives the Lua GC hook) */
int fa_cuda_memory_stats(int device, int64_t *stats);
int fa_cuda_reset_peak_stats(int device);
int fa_cuda_empty_cache(int device);
void fa_cuda_gc_reset(int device);
int fa_cuda_allow_tf32(int allow);
int fa_cuda_device_name(int device, char *buf, int buflen);
/* events: an opaque handle */
int fa_cuda_event_create(void **event);
int fa_cuda_event_destroy(void *event);
int fa_cuda_event_record(void *event, int device);
int fa_cuda_event_synchronize(void *event);
int fa_cuda_event_elapsed(float *ms, void *start, void *end);

#ifdef __cplusplus
}
#endif
#endif
