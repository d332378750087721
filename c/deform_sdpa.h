/* deform_sdpa.h: fused deformable scaled-dot-product attention (fa.deform_sdpa, DESIGN §4.5), private to
 * c/deform_sdpa.c, c/deform_sdpa_cpu.c and cuda/deform_sdpa.cu. c/deform_sdpa.c validates every argument once,
 * copies inputs whose last dim is not contiguous (and coords when not contiguous), and fills a fa_ds_geom; the
 * kernels see only the geometry and raw pointers.
 *
 * Problem: q, k, v (B, V, NH, L, D) with L = H*W row-major pixels (pixel p = y*W + x), coords (B, V, L, V, S, 2)
 * dense, x first. Query (b, v1, h, l) has V*S keys n = v2*S + s: with (cx, cy) = coords[b, v1, l, v2, s],
 *   u = ((2 cx - 1) + 1) / 2 * (W - 1),  w = ((2 cy - 1) + 1) / 2 * (H - 1)   (grid_sample, align_corners=True,
 *   in double, as fa_bl_src_signed(1, ...)), taps (x0, y0) .. (x0+1, y0+1), x0 = floor(u), bilinear weights;
 *   a tap outside the image reads 0 (padding 'zeros'); a point with no tap inside (wholly outside, or NaN)
 *   gives key 0 and value 0, which still enter the softmax with score 0.
 *   ks_n = sum_taps w_t k[b, v2, h, p_t],  vs_n = sum_taps w_t v[b, v2, h, p_t]
 *   s_n = scale <q[b, v1, h, l], ks_n>,  P = softmax_n(s),  out[b, v1, h, l] = sum_n P_n vs_n,
 *   lse[b, v1, h, l] = logsumexp_n s_n  (-INFINITY and out = 0 when V*S = 0)
 * Backward (delta = <grad_out, out> per query; dP_n = <grad_out, vs_n>; dS_n = P_n (dP_n - delta)):
 *   grad_q = scale sum_n dS_n ks_n;  grad_k[b, v2, h, p_t] += scale dS_n w_t q;  grad_v[...] += P_n w_t grad_out
 *   grad_coords[b, v1, l, v2, s] = sum_h (dS_n scale d<q, ks_n>/d(u, w) + P_n d<grad_out, vs_n>/d(u, w)) * (W - 1, H - 1)
 *   with the derivatives of the bilinear weights (fa_bl_du / fa_bl_dv, c/bilinear.h: grid_sample's rules).
 * Determinism: every result is summed in an order fixed by the shapes: the CPU (any thread count) and the GPU
 * with g->deterministic are bit-identical run to run. */
#ifndef FA_DEFORM_SDPA_H
#define FA_DEFORM_SDPA_H
#include "internal.h"
#ifdef __cplusplus
extern "C" {
#endif

/* strides in elements of a (B, V, NH, L, D) tensor; the last dim has stride 1 */
typedef struct {
  int64_t b, v, h, l;
} fa_ds_strides;

typedef struct {
  int64_t B, V, NH, L, D, W, H, S; /* L = W * H */
  double scale;
  int dtype;          /* q, k, v, out, grad_out, grad_q/k/v */
  int cdtype;         /* coords and grad_coords: g->dtype on the CPU, float32 on CUDA */
  int ldtype;         /* lse: float64 for float64 inputs, else float32 */
  int device;
  int deterministic;  /* fa_deform_sdpa_opts.deterministic (the CPU always is) */
  fa_ds_strides q, k, v, go, o; /* inputs (o: out, read by the backward) */
  /* out, lse, grad_q, grad_k, grad_v, grad_coords and coords are dense (row-major, contiguous) */
} fa_ds_geom;

/* c/deform_sdpa_cpu.c: float32 and float64 (g->dtype). 0 or FA_ERR_MEMORY before anything is written. */
int fa_ds_cpu_forward(const fa_ds_geom *g, void *out, void *lse, const void *q, const void *k, const void *v,
                      const void *coords);
int fa_ds_cpu_backward(const fa_ds_geom *g, void *grad_q, void *grad_k, void *grad_v, void *grad_coords,
                       const void *grad_out, const void *q, const void *k, const void *v, const void *coords,
                       const void *out, const void *lse);

/* cuda/deform_sdpa.cu: q, k, v, out, grad_out, grad_q/k/v in g->dtype (float32, bfloat16, float16), indexed
 * through the strides of g (q, k, v, go, o; last dim stride 1) for the inputs, dense for the outputs; coords and
 * grad_coords float32 dense; lse float32 dense (B, V, NH, L); float32 accumulation. NULL gradient = not wanted;
 * the wanted ones are overwritten (grad_k / grad_v zeroed by the kernel side if it accumulates). Without
 * g->deterministic the scatter into grad_k / grad_v may use float atomics; with it, results are bit-identical
 * run to run. Returns 0 or an error code with fa_error's message (CUDA errors included). */
int fa_cu_deform_sdpa_forward(const fa_ds_geom *g, void *out, float *lse, const void *q, const void *k, const void *v,
                              const float *coords);
int fa_cu_deform_sdpa_backward(const fa_ds_geom *g, void *grad_q, void *grad_k, void *grad_v, float *grad_coords,
                               const void *grad_out, const void *q, const void *k, const void *v, const float *coords,
                               const void *out, const float *lse);

#ifdef __cplusplus
}
#endif
#endif
