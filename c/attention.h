/* attention.h: the shared attention core (fa.attention; triangle attention is the same op with strides), private
 * to c/attention.c and cuda/attention.cu. c/attention.c validates every argument once, converts the bias and the
 * mask (see below) and fills a fa_attn_geom; the kernels see only the geometry and raw pointers.
 *
 * Problem: for every batch index z (the leading dims, row-major over bs[0..nb)) and query head h:
 *   S[i][j] = scale * <q[z,h,i,:], k[z,h/G,j,:]> + bias[z,h,i,j]          G = H / Hkv (GQA, MQA)
 *   select mask (mask_mode 1): keys with mask[z,h,i,j] == 0 are left out of the softmax
 *   additive mask (mask_mode 2): S += mask_scale * (mask[z,h,i,j] - 1)   (OpenFold's inf * (mask - 1))
 *   P = softmax_j(S), dropout on P (Philox, below), out[z,h,i,:] = P V,  lse[z,h,i] = logsumexp_j S
 * A row whose keys are all left out (select mask), or with Lk = 0, has lse = -INFINITY and gives
 * out = mean_j v (zeros when Lk = 0); in the backward it has P = 1/Lk and dS = 0 (so it adds to gv only).
 * Dropout: weight (z,h,i,j) with linear index e = ((z*H + h)*Lq + i)*Lk + j is kept when
 * u >= p, u = (r[e & 3] >> 8) * 2^-24 with r = fa_philox(seed, offset + (e >> 2)), and kept weights are scaled
 * by 1/(1-p); the backward recomputes the same mask. The same on the CPU and the GPU. */
#ifndef FA_ATTENTION_H
#define FA_ATTENTION_H
#include "internal.h"
#ifdef __cplusplus
extern "C" {
#endif

enum { FA_ATTN_MAX_BATCH = 5 }; /* leading dims: a descriptor has 8, three are (H, L, D) */

/* strides in elements: per batch dim, head, row, column (the last dim: 1 for q, k, v, out and their
 * gradients; any for bias and mask; unused for lse). 0 = broadcast. */
typedef struct {
  int64_t b[FA_ATTN_MAX_BATCH], h, r, c;
} fa_attn_strides;

typedef struct {
  int nb;                          /* batch dims (size-1 dims dropped) */
  int64_t bs[FA_ATTN_MAX_BATCH];   /* their sizes */
  int64_t Z;                       /* product of bs (1 when nb = 0) */
  int64_t H, Hkv, Lq, Lk, D;       /* H is a multiple of Hkv */
  int dtype, device;               /* of q, k, v, out, grad_out, grad_q, grad_k, grad_v (all the same) */
  double scale;
  int has_bias;                    /* bias and grad_bias: float64 when dtype is float64, else float32 */
  int mask_mode;                   /* 0 none, 1 select (uint8, nonzero = keep), 2 additive (the bias's dtype) */
  double mask_scale;               /* mask_mode 2 */
  double dropout;                  /* 0 <= p < 1 */
  uint64_t seed, offset;
  int deterministic;               /* backward bit-identical run to run (the CPU always is, for any thread count) */
  int tf32;                        /* float32 on the GPU may use TF32 tensor cores (fa.cuda.allowTF32(true)) */
  int kernel;                      /* fa_attention_opts.kernel: FA_ATTN_KERNEL_AUTO or a forced GPU family */
  fa_attn_strides q, k, v, o, lse; /* k and v index kv heads; lse is float32 (float64 with float64 inputs) */
  fa_attn_strides bias, mask;      /* broadcast dims stride 0 */
  fa_attn_strides go, gq, gk, gv;  /* backward */
  fa_attn_strides gbias;           /* the gradient buffer: the bias's own shape, dense, stride 0 where the bias
                                    * broadcasts, so every (z,h,i,j) adds into its element; zeroed by c/attention.c,
                                    * float32 (float64 for float64 inputs) */
} fa_attn_geom;

/* CUDA kernels. q, k, v, out, grad_*: g->dtype; lse, bias, grad_bias: float32; mask: uint8 (mode 1) or float32
 * (mode 2). NULL gradient = not wanted. grad_q/k/v are overwritten (grad_k/v summed over the G query heads that
 * share a kv head); grad_bias is added into (zeroed beforehand). */
int fa_cu_attention_forward(const fa_attn_geom *g, void *out, float *lse, const void *q, const void *k, const void *v,
                            const float *bias, const void *mask);
int fa_cu_attention_backward(const fa_attn_geom *g, void *grad_q, void *grad_k, void *grad_v, float *grad_bias,
                             const void *grad_out, const void *q, const void *k, const void *v, const void *out,
                             const float *lse, const float *bias, const void *mask);

#ifdef __cplusplus
}
#endif
#endif
