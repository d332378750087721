/* copy.c: strided copy with dtype conversion, and fill. Every dtype pair goes through double on the
 * general path (exact for every value of every dtype here except int64 beyond 2^53, which has its own
 * integer path); same-dtype contiguous copies are a memcpy. */
#include "internal.h"
#include <stdint.h>
#include <stdio.h>

static inline double load_as_double(const fa_tensor *t, int64_t off) {
  switch (t->dtype) {
    case FA_FLOAT32: return ((const float *)t->data)[off];
    case FA_FLOAT64: return ((const double *)t->data)[off];
    case FA_BFLOAT16: return fa_bf16_to_f32(((const uint16_t *)t->data)[off]);
    case FA_FLOAT16: return fa_f16_to_f32(((const uint16_t *)t->data)[off]);
    case FA_INT32: return ((const int32_t *)t->data)[off];
    case FA_INT64: return (double)((const int64_t *)t->data)[off];
    case FA_BOOL: return ((const uint8_t *)t->data)[off] != 0;
  }
  return 0;
}

/* double -> integer truncating toward zero, saturating out of range, NaN to 0 (a plain C cast of those is
 * undefined) */
static inline int32_t sat_i32(double v) {
  if (v != v) return 0;
  if (v >= 2147483647.0) return INT32_MAX;
  if (v <= -2147483648.0) return INT32_MIN;
  return (int32_t)v;
}
static inline int64_t sat_i64(double v) {
  if (v != v) return 0;
  if (v >= 9.2233720368547758e18) return INT64_MAX;
  if (v <= -9.2233720368547758e18) return INT64_MIN;
  return (int64_t)v;
}

static inline void store_from_double(fa_tensor *t, int64_t off, double v) {
  switch (t->dtype) {
    case FA_FLOAT32: ((float *)t->data)[off] = (float)v; break;
    case FA_FLOAT64: ((double *)t->data)[off] = v; break;
    case FA_BFLOAT16: ((uint16_t *)t->data)[off] = fa_f32_to_bf16((float)v); break;
    case FA_FLOAT16: ((uint16_t *)t->data)[off] = fa_f32_to_f16((float)v); break;
    case FA_INT32: ((int32_t *)t->data)[off] = sat_i32(v); break;
    case FA_INT64: ((int64_t *)t->data)[off] = sat_i64(v); break;
    case FA_BOOL: ((uint8_t *)t->data)[off] = v != 0; break;
  }
}

static int copy_cpu(fa_tensor *dst, const fa_tensor *src) {
  int64_t n = fa_numel(dst);
  int cd = fa_is_contiguous(dst), cs = fa_is_contiguous(src);
  int es = fa_dtype_size(dst->dtype);
  if (dst->dtype == src->dtype && cd && cs) {
    if (dst->data != src->data) memmove(dst->data, src->data, (size_t)(n * es));
    return 0;
  }
  if (dst->dtype == src->dtype) { /* same dtype: move raw elements, exact for int64 too */
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
    for (int64_t i = 0; i < n; i++) {
      int64_t od = cd ? i : fa_offset(dst, i), os = cs ? i : fa_offset(src, i);
      memcpy((char *)dst->data + od * es, (const char *)src->data + os * es, (size_t)es);
    }
    return 0;
  }
  if (dst->dtype == FA_INT64 && src->dtype == FA_INT32) {
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
    for (int64_t i = 0; i < n; i++)
      ((int64_t *)dst->data)[cd ? i : fa_offset(dst, i)] = ((const int32_t *)src->data)[cs ? i : fa_offset(src, i)];
    return 0;
  }
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
  for (int64_t i = 0; i < n; i++)
    store_from_double(dst, cd ? i : fa_offset(dst, i), load_as_double(src, cs ? i : fa_offset(src, i)));
  return 0;
}

int fa_copy(fa_tensor *dst, const fa_tensor *src) {
  static const char *fn = "fa_copy";
  int rc;
  if ((rc = fa_check_defined(fn, "dst", dst)) || (rc = fa_check_defined(fn, "src", src))) return rc;
  if (fa_numel(dst) != fa_numel(src)) {
    char a[256], b[256];
    return fa_error(FA_ERR_ARG, "%s: argument 'src': expected %lld elements (as 'dst' of shape %s), got %lld (shape %s)", fn,
                    (long long)fa_numel(dst), fa_shape_str(dst, a), (long long)fa_numel(src), fa_shape_str(src, b));
  }
  if (!(fa_is_contiguous(dst) && fa_is_contiguous(src)) && (rc = fa_check_same_shape(fn, "src", src, "dst", dst)))
    return rc;
  if (fa_numel(dst) == 0) return 0;
  if (dst->device >= 0 || src->device >= 0) return fa_cu_copy(dst, src);
  return copy_cpu(dst, src);
}

int fa_fill(fa_tensor *dst, double value) {
  int rc;
  if ((rc = fa_check_defined("fa_fill", "dst", dst))) return rc;
  /* an integer tensor takes integers it can hold (a C cast of NaN, inf or an out-of-range double is undefined) */
  if ((dst->dtype == FA_INT32 && !(value >= -2147483648.0 && value <= 2147483647.0 && value == floor(value))) ||
      (dst->dtype == FA_INT64 && !(value >= -9223372036854775808.0 && value < 9223372036854775808.0 && value == floor(value)))) {
    char got[32];
    if (value != value) strcpy(got, "nan"); /* printf may write -nan */
    else snprintf(got, sizeof got, "%.17g", value);
    return fa_error(FA_ERR_ARG, "fa_fill: argument 'value': expected an integer in the range of %s, got %s",
                    fa_dtype_name(dst->dtype), got);
  }
  /* a finite value that a float tensor can only hold as inf is an error (PyTorch: "cannot be converted without
   * overflow"); inf and NaN themselves are values */
  if (isfinite(value) && ((dst->dtype == FA_FLOAT32 && isinf((float)value)) ||
                          (dst->dtype == FA_BFLOAT16 && isinf(fa_bf16_to_f32(fa_f32_to_bf16((float)value)))) ||
                          (dst->dtype == FA_FLOAT16 && isinf(fa_f16_to_f32(fa_f32_to_f16((float)value))))))
    return fa_error(FA_ERR_ARG, "fa_fill: argument 'value': expected a value in the range of %s, got %.17g",
                    fa_dtype_name(dst->dtype), value);
  int64_t n = fa_numel(dst);
  if (n == 0) return 0;
  if (dst->device >= 0) return fa_cu_fill(dst, value);
  int c = fa_is_contiguous(dst);
  if (c && dst->dtype == FA_FLOAT32) {
    float v = (float)value, *p = (float *)dst->data;
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
    for (int64_t i = 0; i < n; i++) p[i] = v;
    return 0;
  }
  if (c && dst->dtype == FA_FLOAT64) {
    double *p = (double *)dst->data;
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
    for (int64_t i = 0; i < n; i++) p[i] = value;
    return 0;
  }
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
  for (int64_t i = 0; i < n; i++) store_from_double(dst, c ? i : fa_offset(dst, i), value);
  return 0;
}
