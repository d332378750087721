// matmul.cu: matrix products through cuBLAS (c/matmul.c validates and dispatches here), and fa_cu_gemm_bias,
// the cublasLt GEMM with a bias epilogue shared by linear.cu and conv2d.cu.
//
// fa_cu_matmul_forward: out (B, m, n) = alpha * op(a) (Ba, m, k) @ op(b) (Bb, k, n) + beta * out, Ba and Bb
// each B or 1 (broadcast: batch stride 0); 2-D operands are batch 1. One cublasGemmStridedBatchedEx per
// call. As on the CPU, an operand with a unit stride in one of its last two dims is read in place (a
// transposed view only flips the transpose flag); others are copied to a contiguous buffer first.
// dtypes: float32 (FP32 compute; TF32 tensor cores only after fa_cuda_allow_tf32(1)), bfloat16 and float16
// (inputs and output in 16 bits, FP32 accumulation).
//
// Row-major C = op(A) @ op(B) is column-major C^T = op(B)^T @ op(A)^T, so cuBLAS is called with the
// operands swapped and m, n exchanged; no data moves.
#include "common.cuh"
#include "matmul.cuh"
#include <cublasLt.h>
#include <limits.h>
#include <array>
#include <map>
#include <mutex>
#include <set>

namespace {
// a contiguous device copy of t (same shape/dtype/device) in *tmp; copy_values = 0 leaves it uninitialised
int contiguous_tmp(fa_tensor *tmp, const fa_tensor *t, int copy_values) {
  *tmp = *t;
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; i--) { tmp->stride[i] = s; s *= t->shape[i]; }
  tmp->data = fa_cu_temp_alloc(t->device, fa_numel(t) * fa_dtype_size(t->dtype));
  if (!tmp->data) return FA_ERR_MEMORY;
  int rc = copy_values ? fa_cu_copy(tmp, t) : 0;
  if (rc) { fa_cu_temp_free(t->device, tmp->data); tmp->data = NULL; }
  return rc;
}
int check_int(const char *fn, const char *arg, int64_t v) {
  if (v > INT_MAX)
    return fa_error(FA_ERR_UNSUPPORTED, "%s: argument '%s': a matrix dimension or stride of %lld exceeds the cuBLAS limit of %d", fn,
                    arg, (long long)v, INT_MAX);
  return 0;
}
cudaDataType_t cuda_type(int dtype) {
  return dtype == FA_BFLOAT16 ? CUDA_R_16BF : dtype == FA_FLOAT16 ? CUDA_R_16F : CUDA_R_32F;
}
} // namespace

int fa_cu_matmul_forward(fa_tensor *out, const fa_tensor *a, const fa_tensor *b, int ta, int tb, double alpha, double beta) {
  static const char *fn = "fa_matmul_forward";
  const int dev = out->device;
  const int64_t es = fa_dtype_size(out->dtype);
  int rc = 0;
  fa_tensor ca, cb, co;
  void *fa_ = NULL, *fb_ = NULL, *fo_ = NULL;
  int64_t lda = 0, ldb = 0, ldc = 0;
  Mat A = mat_of(a), B = mat_of(b), O = mat_of(out);
  int la = mat_layout(A, &lda), lb = mat_layout(B, &ldb), lo = mat_layout(O, &ldc);
  if (la < 0) { if ((rc = contiguous_tmp(&ca, a, 1))) goto done; fa_ = ca.data; A = mat_of(&ca); la = mat_layout(A, &lda); }
  if (lb < 0) { if ((rc = contiguous_tmp(&cb, b, 1))) goto done; fb_ = cb.data; B = mat_of(&cb); lb = mat_layout(B, &ldb); }
  if (lo < 0) {
    if ((rc = contiguous_tmp(&co, out, beta != 0))) goto done;
    fo_ = co.data; O = mat_of(&co); lo = mat_layout(O, &ldc);
  }
  if ((rc = check_int(fn, "a", lda)) || (rc = check_int(fn, "b", ldb)) || (rc = check_int(fn, "out", ldc)) ||
      (rc = check_int(fn, "out", O.rows)) || (rc = check_int(fn, "out", O.cols)) || (rc = check_int(fn, "a", A.rows)) ||
      (rc = check_int(fn, "a", A.cols)) || (rc = check_int(fn, "out", O.batch)))
    goto done;
  {
    int64_t m = O.rows, n = O.cols, k = ta ? A.rows : A.cols, batch = O.batch;
    if (k == 0) { // no products: out = beta * out (0 clears it, NaNs included)
      fa_tensor *t = fo_ ? &co : out;
      rc = beta == 0 ? fa_cu_fill(t, 0.0) : fa_cu_scale_forward(t, t, beta, 0.0);
      goto copy_back;
    }
    int eta = ta ^ la, etb = tb ^ lb; // op(A) with A read as stored: a flipped layout flips the flag
    const char *pda = A.data, *pdb = B.data;
    char *pdo = O.data;
    int64_t sba = A.sb, sbb = B.sb, sbo = O.sb;
    if (lo == 1) { // out stored transposed: out^T (n x m) = op(b)^T @ op(a)^T
      const char *tp = pda; pda = pdb; pdb = tp;
      int64_t tl = lda; lda = ldb; ldb = tl;
      int64_t ts = sba; sba = sbb; sbb = ts;
      int t = eta; eta = !etb; etb = !t;
      int64_t tm = m; m = n; n = tm;
    }
    cublasHandle_t h = fa_cu_blas(dev);
    if (!h) { rc = fa_error(FA_ERR_CUDA, "%s: could not create a cuBLAS handle on cuda:%d", fn, dev); goto done; }
    cudaDataType_t ty = cuda_type(out->dtype);
    cublasComputeType_t ct = out->dtype == FA_FLOAT32 && fa_cu_tf32_allowed() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    float fal = (float)alpha, fbe = (float)beta;
    // row-major (m x n) = op(A) (m x k) @ op(B) (k x n)  ==  column-major (n x m) = op(B) @ op(A)
    cublasStatus_t s;
    if (batch == 1)
      s = cublasGemmEx(h, etb ? CUBLAS_OP_T : CUBLAS_OP_N, eta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)n, (int)m, (int)k, &fal, pdb,
                       ty, (int)ldb, pda, ty, (int)lda, &fbe, pdo, ty, (int)ldc, ct, CUBLAS_GEMM_DEFAULT);
    else
      s = cublasGemmStridedBatchedEx(h, etb ? CUBLAS_OP_T : CUBLAS_OP_N, eta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)n, (int)m, (int)k,
                                     &fal, pdb, ty, (int)ldb, (long long)sbb, pda, ty, (int)lda, (long long)sba, &fbe, pdo, ty,
                                     (int)ldc, (long long)sbo, (int)batch, ct, CUBLAS_GEMM_DEFAULT);
    (void)es;
    if ((rc = fa_cu_blas_check(s, fn))) goto done;
  }
copy_back:
  if (!rc && fo_) rc = fa_cu_copy(out, &co);
done:
  // stream-ordered frees: the GEMM and the copy back run before any reuse of these blocks
  if (fa_) fa_cu_temp_free(dev, fa_);
  if (fb_) fa_cu_temp_free(dev, fb_);
  if (fo_) fa_cu_temp_free(dev, fo_);
  return rc;
}

// ------------------------------------------------------------------ cublasLt: GEMM + bias epilogue
namespace {
enum { LT_MAX_DEVICES = 64 };
const size_t LT_WORKSPACE = (size_t)4 << 20;
std::mutex g_lt_mu;
cublasLtHandle_t g_lt[LT_MAX_DEVICES];
void *g_lt_ws[LT_MAX_DEVICES];   // cudaMalloc'ed once per device, outside the caching allocator's counts
// heuristic results, keyed on everything the choice depends on (see fa_cu_gemm_bias)
typedef std::array<int64_t, 20> LtKey;
std::map<LtKey, cublasLtMatmulAlgo_t> &g_lt_algos = *new std::map<LtKey, cublasLtMatmulAlgo_t>();
// cases cuBLASLt has no algorithm for: answered -1 at once, without asking the heuristic on every call
std::set<LtKey> &g_lt_none = *new std::set<LtKey>();

int lt_align(const void *p) { // largest power-of-two alignment of p, up to 256 bytes
  uintptr_t a = (uintptr_t)p;
  int al = 256;
  while (al > 1 && (a & (uintptr_t)(al - 1))) al >>= 1;
  return al;
}
// alignment of every matrix of a strided batch: that of the first, reduced by that of the batch stride
int lt_align_batch(const void *p, int64_t stride_bytes, int64_t batch) {
  int al = lt_align(p);
  if (batch > 1)
    while (al > 1 && stride_bytes % al) al >>= 1;
  return al;
}
// a layout of rows x cols with leading dimension ld (row order when row), batched when batch > 1
cublasLtMatrixLayout_t lt_layout(cudaDataType_t ty, int64_t rows, int64_t cols, int64_t ld, bool row, int64_t batch,
                                 int64_t stride) {
  cublasLtMatrixLayout_t l = NULL;
  if (cublasLtMatrixLayoutCreate(&l, ty, (uint64_t)rows, (uint64_t)cols, ld) != CUBLAS_STATUS_SUCCESS) return NULL;
  cublasLtOrder_t order = CUBLASLT_ORDER_ROW;
  int32_t bc = (int32_t)batch;
  if ((row && cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_ORDER, &order, sizeof order) != CUBLAS_STATUS_SUCCESS) ||
      (batch > 1 && (cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &bc, sizeof bc) != CUBLAS_STATUS_SUCCESS ||
                     cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride) !=
                         CUBLAS_STATUS_SUCCESS))) {
    cublasLtMatrixLayoutDestroy(l);
    return NULL;
  }
  return l;
}
} // namespace

// Declared in common.cuh. Two formulations, both with the bias per row of cuBLASLt's D ("bias vector length
// must match matrix D rows"):
//   bias on columns (linear): the usual swap, column-major D^T (n x m, ld ldd) = op(B)^T @ op(A)^T, whose
//     rows are the columns of D;
//   bias on rows (1x1 convolution): every layout in row order (CUBLASLT_ORDER_ROW), D (m x n) = op(A) @ op(B)
//     as stored.
int fa_cu_gemm_bias(int device, int dtype, int64_t batch, int64_t m, int64_t n, int64_t k, const void *A, int ta, int64_t lda,
                    int64_t sa, const void *B, int tb, int64_t ldb, int64_t sb, const void *bias, int bias_on_rows, void *D,
                    int64_t ldd, int64_t sd, const char *fn) {
  const int dev = device;
  if (dev < 0 || dev >= LT_MAX_DEVICES) return -1;
  if (batch < 1 || m < 1 || n < 1 || k < 1 || batch > INT_MAX || m > INT_MAX || n > INT_MAX || k > INT_MAX || lda > INT_MAX ||
      ldb > INT_MAX || ldd > INT_MAX)
    return -1;
  const int64_t es = fa_dtype_size(dtype);
  int ab = lt_align(bias);
  if (ab < 16) return -1;
  int aa = lt_align_batch(A, sa * es, batch), abb = lt_align_batch(B, sb * es, batch), ad = lt_align_batch(D, sd * es, batch);
  cublasComputeType_t ct = dtype == FA_FLOAT32 && fa_cu_tf32_allowed() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  const LtKey key = {dev, dtype, (int64_t)ct, bias_on_rows, ta, tb, m, n, k, lda, ldb, ldd, batch, sa, sb, sd, aa, abb, ad, ab};
  cudaStream_t st = fa_cu_stream(dev);
  {
    std::lock_guard<std::mutex> lk(g_lt_mu);
    if (g_lt_none.count(key)) return -1;
    if (!g_lt[dev]) {
      cublasLtHandle_t h;
      if (cublasLtCreate(&h) != CUBLAS_STATUS_SUCCESS) return -1;
      void *ws = NULL;
      if (cudaMalloc(&ws, LT_WORKSPACE) != cudaSuccess) { cudaGetLastError(); cublasLtDestroy(h); return -1; }
      g_lt[dev] = h;
      g_lt_ws[dev] = ws;
    }
  }
  cublasLtHandle_t lt = g_lt[dev];
  cudaDataType_t ty = cuda_type(dtype);
  // cuBLASLt's operands: L1 @ L2 -> D
  const void *p1, *p2;
  cublasOperation_t op1, op2;
  cublasLtMatrixLayout_t l1 = NULL, l2 = NULL, ld_ = NULL;
  int al1, al2;
  if (bias_on_rows) { // row order: A (m x k, or k x m when ta) and B (k x n, or n x k when tb) as stored
    p1 = A; op1 = ta ? CUBLAS_OP_T : CUBLAS_OP_N; al1 = aa;
    p2 = B; op2 = tb ? CUBLAS_OP_T : CUBLAS_OP_N; al2 = abb;
    l1 = ta ? lt_layout(ty, k, m, lda, true, batch, sa) : lt_layout(ty, m, k, lda, true, batch, sa);
    l2 = tb ? lt_layout(ty, n, k, ldb, true, batch, sb) : lt_layout(ty, k, n, ldb, true, batch, sb);
    ld_ = lt_layout(ty, m, n, ldd, true, batch, sd);
  } else { // column order: row-major B (k x n, ld ldb) is the column-major (n x k) B^T; likewise A
    p1 = B; op1 = tb ? CUBLAS_OP_T : CUBLAS_OP_N; al1 = abb;
    p2 = A; op2 = ta ? CUBLAS_OP_T : CUBLAS_OP_N; al2 = aa;
    l1 = tb ? lt_layout(ty, k, n, ldb, false, batch, sb) : lt_layout(ty, n, k, ldb, false, batch, sb);
    l2 = ta ? lt_layout(ty, m, k, lda, false, batch, sa) : lt_layout(ty, k, m, lda, false, batch, sa);
    ld_ = lt_layout(ty, n, m, ldd, false, batch, sd);
  }
  cublasLtMatmulDesc_t desc = NULL;
  cublasLtMatmulPreference_t pref = NULL;
  int rc = -1;
  cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
  float alpha = 1.0f, beta = 0.0f;
  if (!l1 || !l2 || !ld_) goto done;
  if (cublasLtMatmulDescCreate(&desc, ct, CUDA_R_32F) != CUBLAS_STATUS_SUCCESS) goto done;
  if (cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op1, sizeof op1) != CUBLAS_STATUS_SUCCESS ||
      cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op2, sizeof op2) != CUBLAS_STATUS_SUCCESS ||
      cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi) != CUBLAS_STATUS_SUCCESS ||
      cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias) != CUBLAS_STATUS_SUCCESS)
    goto done;
  {
    cublasLtMatmulAlgo_t algo;
    bool have = false;
    {
      std::lock_guard<std::mutex> lk(g_lt_mu);
      auto it = g_lt_algos.find(key);
      if (it != g_lt_algos.end()) { algo = it->second; have = true; }
    }
    if (!have) {
      if (cublasLtMatmulPreferenceCreate(&pref) != CUBLAS_STATUS_SUCCESS) goto done;
      size_t wsb = LT_WORKSPACE;
      uint32_t a_al = (uint32_t)al1, b_al = (uint32_t)al2, c_al = (uint32_t)ad;
      if (cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb) != CUBLAS_STATUS_SUCCESS ||
          cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &a_al, sizeof a_al) != CUBLAS_STATUS_SUCCESS ||
          cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &b_al, sizeof b_al) != CUBLAS_STATUS_SUCCESS ||
          cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &c_al, sizeof c_al) != CUBLAS_STATUS_SUCCESS ||
          cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &c_al, sizeof c_al) != CUBLAS_STATUS_SUCCESS)
        goto done;
      cublasLtMatmulHeuristicResult_t res;
      int nres = 0;
      if (cublasLtMatmulAlgoGetHeuristic(lt, desc, l1, l2, ld_, ld_, pref, 1, &res, &nres) != CUBLAS_STATUS_SUCCESS || nres < 1 ||
          res.state != CUBLAS_STATUS_SUCCESS) {
        cudaGetLastError();
        std::lock_guard<std::mutex> lk(g_lt_mu);
        g_lt_none.insert(key);
        goto done;
      }
      algo = res.algo;
      std::lock_guard<std::mutex> lk(g_lt_mu);
      g_lt_algos[key] = algo;
    }
    cublasStatus_t s = cublasLtMatmul(lt, desc, &alpha, p1, l1, p2, l2, &beta, D, ld_, D, ld_, &algo, g_lt_ws[dev], LT_WORKSPACE, st);
    if (s == CUBLAS_STATUS_NOT_SUPPORTED || s == CUBLAS_STATUS_INVALID_VALUE) {
      cudaGetLastError();
      std::lock_guard<std::mutex> lk(g_lt_mu);
      g_lt_algos.erase(key); // rc stays -1: the caller falls back, now and in later calls
      g_lt_none.insert(key);
    } else {
      rc = fa_cu_blas_check(s, fn);
    }
  }
done:
  if (pref) cublasLtMatmulPreferenceDestroy(pref);
  if (l1) cublasLtMatrixLayoutDestroy(l1);
  if (l2) cublasLtMatrixLayoutDestroy(l2);
  if (ld_) cublasLtMatrixLayoutDestroy(ld_);
  if (desc) cublasLtMatmulDescDestroy(desc);
  return rc;
}
