/* random.c: the CPU RNG (fa_philox) and the random fills fa_uniform and fa_normal; CUDA tensors go to
 * cuda/random.cu after validation, which draws the same numbers for the same (seed, offset). */
#include "internal.h"

/* Philox4x32-10 (Salmon et al., SC'11): counter (lo, hi of `counter`, 0, 0), key = seed. */
void fa_philox(uint64_t seed, uint64_t counter, uint32_t r[4]) {
  uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int i = 0; i < 10; i++) {
    uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)p1; c3 = (uint32_t)p0; c0 = n0; c2 = n2;
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
  r[0] = c0; r[1] = c1; r[2] = c2; r[3] = c3;
}

static int rng_check(const char *fn, fa_tensor *out) {
  int rc;
  if ((rc = fa_check_defined(fn, "out", out))) return rc;
  if (!fa_is_float(out->dtype))
    return fa_error(FA_ERR_ARG, "%s: argument 'out': expected a floating-point tensor, got %s", fn, fa_dtype_name(out->dtype));
  return 0;
}

static void store_double(fa_tensor *t, int64_t off, double v) {
  switch (t->dtype) {
    case FA_FLOAT32: ((float *)t->data)[off] = (float)v; break;
    case FA_FLOAT64: ((double *)t->data)[off] = v; break;
    case FA_BFLOAT16: ((uint16_t *)t->data)[off] = fa_f32_to_bf16((float)v); break;
    case FA_FLOAT16: ((uint16_t *)t->data)[off] = fa_f32_to_f16((float)v); break;
  }
}

/* element i uses counter offset + i (uniform) so a view fills the same as a fresh tensor */
int fa_uniform(fa_tensor *out, double lo, double hi, uint64_t seed, uint64_t offset) {
  int rc;
  if ((rc = rng_check("fa_uniform", out))) return rc;
  if (out->device >= 0) return fa_cu_uniform(out, lo, hi, seed, offset);
  int64_t n = fa_numel(out);
  int dbl = out->dtype == FA_FLOAT64;
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
  for (int64_t i = 0; i < n; i++) {
    uint32_t r[4];
    fa_philox(seed, offset + (uint64_t)i, r);
    double u = dbl ? fa_u64_to_unit_double(r[0], r[1]) : (double)fa_u32_to_unit_float(r[0]);
    store_double(out, fa_offset(out, i), lo + (hi - lo) * u);
  }
  return 0;
}

/* Box-Muller on (r0, r1) of counter offset + i; one normal per element */
int fa_normal(fa_tensor *out, double mean, double std, uint64_t seed, uint64_t offset) {
  int rc;
  if ((rc = rng_check("fa_normal", out))) return rc;
  if (out->device >= 0) return fa_cu_normal(out, mean, std, seed, offset);
  int64_t n = fa_numel(out);
#pragma omp parallel for schedule(static) if (n > FA_PARALLEL_GRAIN)
  for (int64_t i = 0; i < n; i++) {
    uint32_t r[4];
    fa_philox(seed, offset + (uint64_t)i, r);
    double u1 = ((double)r[0] + 1.0) * (1.0 / 4294967296.0); /* (0, 1] */
    double u2 = (double)r[1] * (1.0 / 4294967296.0);
    double z = sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
    store_double(out, fa_offset(out, i), mean + std * z);
  }
  return 0;
}
