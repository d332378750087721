/* conv2d.h: what the three CPU convolution algorithms share; private to c/conv2d.c (entry points,
 * validation, workspace, im2col + GEMM), c/conv2d_winograd.c and c/conv2d_depthwise.c. */
#ifndef FA_CONV2D_H
#define FA_CONV2D_H
#include "internal.h"
#include <stdlib.h>

/* defined in matmul.c: OpenBLAS on one thread; a product on the calling thread / split over OpenMP's */
void fa_blas_single_thread(void);
void fa_cpu_gemm(int dbl, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
                 const void *b, int64_t ldb, double beta, void *c, int64_t ldc);
void fa_cpu_gemm_par(int dbl, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
                     const void *b, int64_t ldb, double beta, void *c, int64_t ldc);

typedef struct geom {
  int64_t N, C, H, W, O, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, G, Cg, Og;
} geom;

static inline int64_t cdiv(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); } /* ceil, b > 0 */
static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

/* For positions wo0 + k, k in [0, n), reading column wi = (wo0 + k) * s + off of a row of width W: the
 * in-bounds k are [*lo, *hi). */
static inline void valid_cols(int64_t W, int64_t s, int64_t off, int64_t wo0, int64_t n, int64_t *lo, int64_t *hi) {
  *lo = imin(n, imax(0, cdiv(-off, s) - wo0));
  *hi = imax(*lo, imin(n, cdiv(W - off, s) - wo0));
}

/* carves 64-byte aligned pieces out of a workspace */
static inline size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* one cached scratch block per calling thread (conv2d.c); valid until the next call on the thread */
void *fa_conv2d_workspace(size_t bytes);

/* The Winograd tile transforms and the depthwise plane kernels are compiled three times and picked at
 * load time by the CPU's features (the library itself targets baseline x86-64): vectorised 8 doubles wide
 * with AVX-512 they cost a fraction of the GEMMs, 2 wide with SSE2 they cost as much. */
#define SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

/* conv2d_winograd.c: Winograd F(4x4, 3x3), for 3x3 stride-1 undilated convolutions */
int fa_conv2d_wino_applies(const geom *g);
int fa_conv2d_wino_forward(int dbl, const void *x, const void *w, const fa_tensor *bias, void *out, const geom *g);
int fa_conv2d_wino_backward(int dbl, void *gx, void *gw, const void *gy, const void *x, const void *w, const geom *g);
/* conv2d_depthwise.c: the direct depthwise kernel (groups == C) */
int fa_conv2d_dw_forward(int dbl, const void *x, const void *w, const fa_tensor *bias, void *out, const geom *g);
int fa_conv2d_dw_backward(int dbl, void *gx, void *gw, const void *gy, const void *x, const void *w, const geom *g);

#endif
