/* msda.h: multi-scale deformable attention, private to c/msda.c and cuda/msda.cu.
 * c/msda.c validates every argument once and fills a fa_msda_geom; the kernels see only the geometry and raw
 * pointers to contiguous buffers. */
#ifndef FA_MSDA_H
#define FA_MSDA_H
#include "internal.h"
#ifdef __cplusplus
extern "C" {
#endif

/* the CUDA kernels keep the levels in their parameters and index points and pixels with 32 bits */
enum { FA_MSDA_CUDA_MAX_LEVELS = 16 };

typedef struct {
  int64_t N, S, M, D, L, Lq, P;
  const int64_t *H, *W, *start; /* L entries each: level l is H[l] x W[l] pixels from pixel start[l] */
  int64_t Sx;                   /* sum of (H+1)(W+1): the CUDA deterministic backward's key grid per (n, m) */
  int dtype, device;            /* value's; on CUDA locations and weights are float32 */
  int border, align, deterministic;
  int order, merge;             /* fa_msda_opts' forced GPU variants (FA_MSDA_ORDER_*, FA_MSDA_AUTO/OFF/ON):
                                 * cuda/msda.cu's make_plan turns them into kernel template parameters */
} fa_msda_geom;

/* value, grad_out: the value dtype; loc (N, Lq, M, L, P, 2), attn (N, Lq, M, L, P): float32. All dense.
 * Backward: a NULL gradient is not wanted; grad_value, loc and attn gradients are overwritten. */
int fa_cu_msda_forward(const fa_msda_geom *g, void *out, const void *value, const float *loc, const float *attn);
int fa_cu_msda_backward(const fa_msda_geom *g, void *grad_value, float *grad_loc, float *grad_attn,
                        const void *grad_out, const void *value, const float *loc, const float *attn);

#ifdef __cplusplus
}
#endif
#endif
