// linear.cu: fully connected layers through cuBLAS (c/linear.c validates and dispatches here).
//
// fa_cu_linear_forward / backward: x (R, in) rows (contiguous), weight (out, in), bias (out):
//   out = x @ W^T + b: one cublasLt matmul with the bias epilogue (fa_cu_gemm_bias, shared with the 1x1
//   convolution: the bias is added to the float32 accumulators before the single rounding to out's dtype),
//   falling back to a broadcast copy of the bias into out followed by a GEMM with beta = 1 (as the CPU)
//   where cublasLt has no algorithm for the layout;
//   grad_x = grad_out @ W; grad_weight += grad_out^T @ x (beta = 1); grad_bias += column sums of grad_out.
#include "common.cuh"
#include "matmul.cuh"

// rows x cols 2-D view of a contiguous tensor whose last dim is cols
static fa_tensor rows_view(const fa_tensor *t, int64_t cols) {
  fa_tensor v = *t;
  int64_t n = fa_numel(t);
  v.ndim = 2;
  v.shape[0] = cols ? n / cols : 0;
  v.shape[1] = cols;
  v.stride[0] = cols;
  v.stride[1] = 1;
  return v;
}

namespace {
// out2 (R, O) = x2 (R, I) @ W^T + bias, all contiguous but W (any BLAS-readable layout); returns -1 when
// cublasLt cannot do it (the caller falls back), else 0 or an error code.
int linear_lt(const fa_tensor *out2, const fa_tensor *x2, const fa_tensor *w, const fa_tensor *bias) {
  if (bias->shape[0] > 1 && bias->stride[0] != 1) return -1;
  Mat W = mat_of(w);
  int64_t ldw;
  int lw = mat_layout(W, &ldw);
  if (lw < 0) return -1;
  int64_t R = x2->shape[0], I = x2->shape[1], O = w->shape[0];
  // op(B) = W^T (I x O): W row-major (O x I) is stored (n x k): transposed; W stored transposed is W^T
  // row-major (I x O): as is
  return fa_cu_gemm_bias(out2->device, out2->dtype, 1, R, O, I, x2->data, 0, I, 0, w->data, lw == 0, ldw, 0, bias->data, 0,
                         out2->data, O, 0, "fa_linear_forward");
}
} // namespace

int fa_cu_linear_forward(fa_tensor *out, const fa_tensor *x, const fa_tensor *weight, const fa_tensor *bias) {
  int64_t in = weight->shape[1], outf = weight->shape[0];
  fa_tensor o2 = rows_view(out, outf), x2 = rows_view(x, in);
  int rc;
  double beta = 0;
  if (bias && (rc = linear_lt(&o2, &x2, weight, bias)) != -1) return rc;
  if (bias) { // out rows start as the bias (a broadcast copy), then the GEMM adds x @ W^T
    fa_tensor bb = o2;
    bb.data = bias->data;
    bb.stride[0] = 0;
    bb.stride[1] = bias->stride[0];
    if ((rc = fa_cu_copy(&o2, &bb))) return rc;
    beta = 1;
  }
  return fa_cu_matmul_forward(&o2, &x2, weight, 0, 1, 1, beta);
}

int fa_cu_linear_backward(fa_tensor *grad_x, fa_tensor *grad_weight, fa_tensor *grad_bias, const fa_tensor *grad_out,
                          const fa_tensor *x, const fa_tensor *weight) {
  int64_t in = weight->shape[1], outf = weight->shape[0];
  fa_tensor g2 = rows_view(grad_out, outf), x2 = rows_view(x, in);
  int64_t R = g2.shape[0];
  int rc;
  if (grad_x && fa_numel(grad_x) > 0) {
    fa_tensor gx2 = rows_view(grad_x, in);
    if ((rc = fa_cu_matmul_forward(&gx2, &g2, weight, 0, 0, 1, 0))) return rc;
  }
  if (grad_weight && fa_numel(grad_weight) > 0 && R > 0) {
    if ((rc = fa_cu_matmul_forward(grad_weight, &g2, &x2, 1, 0, 1, 1))) return rc;
  }
  if (grad_bias && outf > 0 && R > 0) {
    fa_tensor gb = *grad_bias; // (1, out) view of grad_bias: the column sums of g2 are added into it
    gb.ndim = 2;
    gb.shape[0] = 1;
    gb.shape[1] = outf;
    gb.stride[0] = 0;
    gb.stride[1] = grad_bias->stride[0];
    if ((rc = fa_cu_sum_into(&gb, &g2, 0))) return rc;
  }
  return 0;
}
