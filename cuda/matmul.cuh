// matmul.cuh: a strided (batch, rows, cols) matrix as cuBLAS reads it; private to matmul.cu and linear.cu.
#pragma once
#include "common.cuh"

namespace {
struct Mat {
  char *data;
  int64_t batch, rows, cols, sb, sr, sc;
};
inline Mat mat_of(const fa_tensor *t) {
  Mat m;
  int d = t->ndim;
  m.data = (char *)t->data;
  m.batch = d == 3 ? t->shape[0] : 1;
  m.sb = d == 3 ? t->stride[0] : 0;
  m.rows = t->shape[d - 2];
  m.cols = t->shape[d - 1];
  m.sr = t->stride[d - 2];
  m.sc = t->stride[d - 1];
  if (m.batch == 1) m.sb = 0;
  return m;
}
// 0 = row-major with leading dim *ld, 1 = the transpose of a row-major (cols x rows) matrix, -1 = copy it
inline int mat_layout(const Mat &m, int64_t *ld) {
  int64_t r = m.rows, c = m.cols;
  if ((c <= 1 || m.sc == 1) && (r <= 1 || m.sr >= (c > 1 ? c : 1))) {
    *ld = r <= 1 ? (c > 1 ? c : 1) : m.sr;
    return 0;
  }
  if ((r <= 1 || m.sr == 1) && (c <= 1 || m.sc >= (r > 1 ? r : 1))) {
    *ld = c <= 1 ? (r > 1 ? r : 1) : m.sc;
    return 1;
  }
  return -1;
}
} // namespace
