/* cpb.h: the continuous position bias MLP (fa.cpb), private to c/cpb.c, c/cpb_cpu.c and cuda/cpb.cu.
 * c/cpb.c validates every argument once, copies non-contiguous inputs, and fills a fa_cpb_geom; the kernels see
 * only the geometry and raw pointers to dense buffers:
 *   qpos (N, 2), kpos (P, M, 2), w1 (C, 2), b1 (C), w2 (C, C), b2 (C), w3 (O, C), b3 (O), out/grad_bias (P, O, N, M)
 *   d = qpos[i] - kpos[p, j], f = sign(d) log(|d| + 1), h1 = relu(w1 f + b1), h2 = relu(w2 h1 + b2),
 *   out[p, o, i, j] = w3[o] . h2 + b3[o]
 * Backward: d f / d d = 1 / (|d| + 1), and 0 at d == 0 (PyTorch's autograd of sign(d) * log(|d| + 1)); relu' = 0
 * at 0. grad_kpos[p, j] = -sum_i grad_d. Every sum runs in an order fixed by the shapes (never the thread
 * count or the schedule): per-chunk partials reduced in chunk order. */
#ifndef FA_CPB_H
#define FA_CPB_H
#include "internal.h"
#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  int64_t P, N, M, C, O;
  int dtype;          /* of the weights and biases; the positions, out and grad_bias: the same on the CPU, float32
                       * on CUDA (grad_bias converted by c/cpb.c) */
  int device;
  int deterministic;  /* fa_cpb_opts.deterministic (the CPU always is) */
} fa_cpb_geom;

/* dense inputs; qpos, kpos in the positions' dtype, the rest in g->dtype */
typedef struct {
  const void *qpos, *kpos, *w1, *b1, *w2, *b2, *w3, *b3;
} fa_cpb_in;

/* gradients, dense and shaped as their inputs, overwritten; NULL = not wanted */
typedef struct {
  void *kpos, *w1, *b1, *w2, *b2, *w3, *b3;
} fa_cpb_grads;

/* c/cpb_cpu.c: float32 and float64 (g->dtype). 0 or FA_ERR_MEMORY before anything is written. */
int fa_cpb_cpu_forward(const fa_cpb_geom *g, void *out, const fa_cpb_in *in);
int fa_cpb_cpu_backward(const fa_cpb_geom *g, const fa_cpb_grads *gr, const void *grad_bias, const fa_cpb_in *in);

/* cuda/cpb.cu: out and grad_bias float32; the positions float32; weights g->dtype (float32, bfloat16, float16).
 * float32 uses TF32 tensor cores only when fa.cuda.allowTF32(true) (fa_cu_tf32_allowed()). */
int fa_cu_cpb_forward(const fa_cpb_geom *g, float *out, const fa_cpb_in *in);
int fa_cu_cpb_backward(const fa_cpb_geom *g, const fa_cpb_grads *gr, const float *grad_bias, const fa_cpb_in *in);

#ifdef __cplusplus
}
#endif
#endif
