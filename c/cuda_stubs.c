/* cuda_stubs.c: what a build without CUDA answers. Every symbol here is weak: when the CUDA objects are
 * linked in, their definitions replace these. */
#include "internal.h"
#include "msda.h"
#include "attention.h"
#include "cpb.h"
#include "deform_sdpa.h"

#define FA_NO_CUDA(fn) fa_error(FA_ERR_UNSUPPORTED, "%s: this fastattn was built without CUDA (rebuild where nvcc is found, without FA_CUDA=0)", fn)
#define WEAK __attribute__((weak))

WEAK int fa_cu_alloc(int device, int64_t nbytes, void **ptr) { *ptr = NULL; return FA_NO_CUDA("fa_alloc"); }
WEAK void fa_cu_free(int device, void *ptr) {}
WEAK int fa_cu_copy(fa_tensor *dst, const fa_tensor *src) { return FA_NO_CUDA("fa_copy"); }
WEAK int fa_cu_fill(fa_tensor *dst, double value) { return FA_NO_CUDA("fa_fill"); }
WEAK int fa_cu_uniform(fa_tensor *out, double lo, double hi, uint64_t seed, uint64_t offset) { return FA_NO_CUDA("fa_uniform"); }
WEAK int fa_cu_normal(fa_tensor *out, double mean, double std, uint64_t seed, uint64_t offset) { return FA_NO_CUDA("fa_normal"); }
WEAK int fa_cu_binary_forward(int op, fa_tensor *out, const fa_tensor *a, const fa_tensor *b, double alpha) { return FA_NO_CUDA("fa_binary_forward"); }
WEAK int fa_cu_binary_backward(int op, fa_tensor *grad_a, fa_tensor *grad_b, const fa_tensor *grad_out, const fa_tensor *a,
                               const fa_tensor *b) { return FA_NO_CUDA("fa_binary_backward"); }
WEAK int fa_cu_scale_forward(fa_tensor *out, const fa_tensor *a, double scale, double shift) { return FA_NO_CUDA("fa_scale_forward"); }
WEAK int fa_cu_addcmul_forward(fa_tensor *out, const fa_tensor *a, const fa_tensor *b, const fa_tensor *c, double value) { return FA_NO_CUDA("fa_addcmul_forward"); }
WEAK int fa_cu_unary_forward(int op, fa_tensor *out, const fa_tensor *x) { return FA_NO_CUDA("fa_unary_forward"); }
WEAK int fa_cu_unary_backward(int op, fa_tensor *grad_x, const fa_tensor *grad_y, const fa_tensor *x, const fa_tensor *y) { return FA_NO_CUDA("fa_unary_backward"); }
WEAK int fa_cu_reduce_forward(int op, fa_tensor *out, fa_tensor *idx, const fa_tensor *x, int dim) { return FA_NO_CUDA("fa_reduce_forward"); }
WEAK int fa_cu_reduce_backward(int op, fa_tensor *grad_x, const fa_tensor *grad_out, const fa_tensor *idx, int dim) { return FA_NO_CUDA("fa_reduce_backward"); }
WEAK int fa_cu_matmul_forward(fa_tensor *out, const fa_tensor *a, const fa_tensor *b, int trans_a, int trans_b, double alpha,
                              double beta) { return FA_NO_CUDA("fa_matmul_forward"); }
WEAK int fa_cu_linear_forward(fa_tensor *out, const fa_tensor *x, const fa_tensor *weight, const fa_tensor *bias) { return FA_NO_CUDA("fa_linear_forward"); }
WEAK int fa_cu_linear_backward(fa_tensor *grad_x, fa_tensor *grad_weight, fa_tensor *grad_bias, const fa_tensor *grad_out,
                               const fa_tensor *x, const fa_tensor *weight) { return FA_NO_CUDA("fa_linear_backward"); }
WEAK int fa_cu_conv2d_forward(fa_tensor *out, const fa_tensor *x, const fa_tensor *weight, const fa_tensor *bias,
                              const fa_conv2d_params *p) { return FA_NO_CUDA("fa_conv2d_forward"); }
WEAK int fa_cu_conv2d_backward(fa_tensor *grad_x, fa_tensor *grad_weight, fa_tensor *grad_bias, const fa_tensor *grad_out,
                               const fa_tensor *x, const fa_tensor *weight, const fa_conv2d_params *p) { return FA_NO_CUDA("fa_conv2d_backward"); }
WEAK int fa_cu_layernorm_forward(fa_tensor *out, fa_tensor *mean, fa_tensor *rstd, const fa_tensor *x, const fa_tensor *weight,
                                 const fa_tensor *bias, int64_t norm_size, double eps) { return FA_NO_CUDA("fa_layernorm_forward"); }
WEAK int fa_cu_layernorm_backward(fa_tensor *grad_x, fa_tensor *grad_weight, fa_tensor *grad_bias, const fa_tensor *grad_out,
                                  const fa_tensor *x, const fa_tensor *mean, const fa_tensor *rstd, const fa_tensor *weight,
                                  int64_t norm_size) { return FA_NO_CUDA("fa_layernorm_backward"); }
WEAK int fa_cu_softmax_forward(fa_tensor *out, const fa_tensor *x, int dim, int log) { return FA_NO_CUDA("fa_softmax_forward"); }
WEAK int fa_cu_softmax_backward(fa_tensor *grad_x, const fa_tensor *grad_out, const fa_tensor *out, int dim, int log) { return FA_NO_CUDA("fa_softmax_backward"); }
WEAK int fa_cu_dropout_forward(fa_tensor *out, fa_tensor *mask, const fa_tensor *x, double p, uint64_t seed, uint64_t offset) { return FA_NO_CUDA("fa_dropout_forward"); }
WEAK int fa_cu_dropout_backward(fa_tensor *grad_x, const fa_tensor *grad_out, const fa_tensor *mask, double p) { return FA_NO_CUDA("fa_dropout_backward"); }
WEAK int fa_cu_grid_sample_forward(fa_tensor *out, const fa_tensor *input, const fa_tensor *grid, int padding,
                                   int align_corners) { return FA_NO_CUDA("fa_grid_sample_forward"); }
WEAK int fa_cu_grid_sample_backward(fa_tensor *grad_input, fa_tensor *grad_grid, const fa_tensor *grad_out,
                                    const fa_tensor *input, const fa_tensor *grid, int padding, int align_corners) { return FA_NO_CUDA("fa_grid_sample_backward"); }
WEAK int fa_cu_mse_forward(fa_tensor *loss, const fa_tensor *x, const fa_tensor *target, int reduction) { return FA_NO_CUDA("fa_mse_forward"); }
WEAK int fa_cu_mse_backward(fa_tensor *grad_x, const fa_tensor *grad_loss, const fa_tensor *x, const fa_tensor *target,
                            int reduction) { return FA_NO_CUDA("fa_mse_backward"); }
WEAK int fa_cu_cross_entropy_forward(fa_tensor *loss, const fa_tensor *logits, const fa_tensor *target, int64_t ignore_index,
                                     double label_smoothing, int reduction) { return FA_NO_CUDA("fa_cross_entropy_forward"); }
WEAK int fa_cu_cross_entropy_backward(fa_tensor *grad_logits, const fa_tensor *grad_loss, const fa_tensor *logits,
                                      const fa_tensor *target, int64_t ignore_index, double label_smoothing,
                                      int reduction) { return FA_NO_CUDA("fa_cross_entropy_backward"); }
WEAK int fa_cu_sgd_step(fa_tensor *param, const fa_tensor *grad, fa_tensor *momentum_buf, double lr, double momentum,
                        double dampening, double weight_decay, int nesterov, int first) { return FA_NO_CUDA("fa_sgd_step"); }
WEAK int fa_cu_adam_step(fa_tensor *param, const fa_tensor *grad, fa_tensor *exp_avg, fa_tensor *exp_avg_sq, double lr,
                         double beta1, double beta2, double eps, double weight_decay, int decoupled, int64_t step) { return FA_NO_CUDA("fa_adam_step"); }
WEAK int fa_cu_sumsq(fa_tensor *out, const fa_tensor *x) { return FA_NO_CUDA("fa_sumsq"); }
WEAK int fa_cu_msda_forward(const fa_msda_geom *g, void *out, const void *value, const float *loc, const float *attn) {
  return FA_NO_CUDA("fa_msda_forward");
}
WEAK int fa_cu_msda_backward(const fa_msda_geom *g, void *grad_value, float *grad_loc, float *grad_attn,
                             const void *grad_out, const void *value, const float *loc, const float *attn) {
  return FA_NO_CUDA("fa_msda_backward");
}

WEAK int fa_cu_attention_forward(const fa_attn_geom *g, void *out, float *lse, const void *q, const void *k, const void *v,
                                 const float *bias, const void *mask) {
  return FA_NO_CUDA("fa_attention_forward");
}
WEAK int fa_cu_attention_backward(const fa_attn_geom *g, void *grad_q, void *grad_k, void *grad_v, float *grad_bias,
                                  const void *grad_out, const void *q, const void *k, const void *v, const void *out,
                                  const float *lse, const float *bias, const void *mask) {
  return FA_NO_CUDA("fa_attention_backward");
}

/* public CUDA runtime: no device */
WEAK int fa_has_cuda(void) { return 0; }
WEAK int fa_cuda_device_count(void) { return 0; }
WEAK int fa_cuda_set_device(int device) { return FA_NO_CUDA("fa_cuda_set_device"); }
WEAK int fa_cuda_get_device(void) { return -1; }
WEAK int fa_cuda_synchronize(int device) { return FA_NO_CUDA("fa_cuda_synchronize"); }
WEAK int fa_cuda_memory_stats(int device, int64_t *stats) { return FA_NO_CUDA("fa_cuda_memory_stats"); }
WEAK int fa_cuda_reset_peak_stats(int device) { return FA_NO_CUDA("fa_cuda_reset_peak_stats"); }
WEAK int fa_cuda_empty_cache(int device) { return FA_NO_CUDA("fa_cuda_empty_cache"); }
WEAK void fa_cuda_gc_reset(int device) {}
WEAK int fa_cuda_allow_tf32(int allow) { return FA_NO_CUDA("fa_cuda_allow_tf32"); }
WEAK int fa_cuda_device_name(int device, char *buf, int buflen) { return FA_NO_CUDA("fa_cuda_device_name"); }
WEAK int fa_cuda_event_create(void **event) { return FA_NO_CUDA("fa_cuda_event_create"); }
WEAK int fa_cuda_event_destroy(void *event) { return FA_NO_CUDA("fa_cuda_event_destroy"); }
WEAK int fa_cuda_event_record(void *event, int device) { return FA_NO_CUDA("fa_cuda_event_record"); }
WEAK int fa_cuda_event_synchronize(void *event) { return FA_NO_CUDA("fa_cuda_event_synchronize"); }
WEAK int fa_cuda_event_elapsed(float *ms, void *start, void *end) { return FA_NO_CUDA("fa_cuda_event_elapsed"); }
WEAK int fa_cu_cpb_forward(const fa_cpb_geom *g, float *out, const fa_cpb_in *in) { return FA_NO_CUDA("fa_cpb_forward"); }
WEAK int fa_cu_cpb_backward(const fa_cpb_geom *g, const fa_cpb_grads *gr, const float *grad_bias, const fa_cpb_in *in) {
  return FA_NO_CUDA("fa_cpb_backward");
}
WEAK int fa_cu_deform_sdpa_forward(const fa_ds_geom *g, void *out, float *lse, const void *q, const void *k, const void *v,
                                   const float *coords) {
  return FA_NO_CUDA("fa_deform_sdpa_forward");
}
WEAK int fa_cu_deform_sdpa_backward(const fa_ds_geom *g, void *grad_q, void *grad_k, void *grad_v, float *grad_coords,
                                    const void *grad_out, const void *q, const void *k, const void *v, const float *coords,
                                    const void *out, const float *lse) {
  return FA_NO_CUDA("fa_deform_sdpa_backward");
}
