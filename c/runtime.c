/* runtime.c: version, errors, dtypes, allocation, storage, threads and the validation helpers (the RNG is
 * in random.c). */
#include "internal.h"
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <malloc.h>
#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define FA_VERSION_STRING "0.1.0"

static __thread char fa_errbuf[1024];

const char *fa_version(void) { return FA_VERSION_STRING; }
const char *fa_last_error(void) { return fa_errbuf; }
void fa_clear_error(void) { fa_errbuf[0] = 0; }

int fa_error(int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(fa_errbuf, sizeof fa_errbuf, fmt, ap);
  va_end(ap);
  return code;
}

static const int fa_sizes[FA_NUM_DTYPES] = {4, 8, 2, 2, 4, 8, 1};
static const char *fa_names[FA_NUM_DTYPES] = {"float32", "float64", "bfloat16", "float16", "int32", "int64", "bool"};

int fa_dtype_size(int dtype) { return dtype >= 0 && dtype < FA_NUM_DTYPES ? fa_sizes[dtype] : 0; }
const char *fa_dtype_name(int dtype) { return dtype >= 0 && dtype < FA_NUM_DTYPES ? fa_names[dtype] : "invalid"; }

/* ------------------------------------------------------------------ allocation */
/* glibc serves blocks over 128 KB (dynamically up to 32 MB) with mmap and returns them with munmap, so
 * every fresh tensor of a training step page-faults its memory in again (8 MB: ~1.5 ms). Serve blocks
 * up to 32 MB from the heap and keep freed memory there for reuse. Process-wide, set once. */
static pthread_once_t fa_malloc_once = PTHREAD_ONCE_INIT;
static void fa_malloc_tune(void) {
  mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024);
  mallopt(M_TRIM_THRESHOLD, 128 * 1024 * 1024);
}

void *fa_alloc(int device, int64_t nbytes) {
  if (nbytes < 0) { fa_error(FA_ERR_ARG, "fa_alloc: argument 'nbytes': expected >= 0, got %lld", (long long)nbytes); return NULL; }
  if (device < FA_CPU) { fa_error(FA_ERR_ARG, "fa_alloc: argument 'device': expected -1 (the CPU) or a CUDA device, got %d", device); return NULL; }
  if (device >= 0) {
    void *p = NULL;
    if (fa_cu_alloc(device, nbytes, &p)) return NULL;
    return p;
  }
  size_t n = (size_t)((nbytes + 63) / 64 * 64);
  if (n == 0) n = 64;
  pthread_once(&fa_malloc_once, fa_malloc_tune);
  void *p = NULL;
  if (posix_memalign(&p, 64, n) != 0 || !p) {
    fa_error(FA_ERR_MEMORY, "fa_alloc: out of CPU memory allocating %lld bytes", (long long)nbytes);
    return NULL;
  }
  return p;
}

void fa_free(int device, void *ptr) {
  if (!ptr) return;
  if (device >= 0) fa_cu_free(device, ptr);
  else free(ptr);
}

fa_storage *fa_storage_new(int device, int64_t nbytes) {
  fa_storage *s = (fa_storage *)malloc(sizeof *s);
  if (!s) { fa_error(FA_ERR_MEMORY, "fa_storage_new: out of memory"); return NULL; }
  s->data = fa_alloc(device, nbytes);
  if (!s->data) { free(s); return NULL; }
  s->nbytes = nbytes;
  s->device = device;
  s->refcount = 1;
  return s;
}

void fa_storage_retain(fa_storage *s) {
  if (s) __atomic_add_fetch(&s->refcount, 1, __ATOMIC_RELAXED);
}

void fa_storage_release(fa_storage *s) {
  if (!s) return;
  if (__atomic_sub_fetch(&s->refcount, 1, __ATOMIC_ACQ_REL) == 0) {
    fa_free(s->device, s->data);
    free(s);
  }
}

/* ------------------------------------------------------------------ threads */
/* One thread pool: OpenMP's. OpenBLAS runs single-threaded (its own pool would fight OpenMP's spinning
 * workers for the cores); c/matmul.c splits large products over OpenMP's threads instead. */
void openblas_set_num_threads(int n);

void fa_set_num_threads(int n) {
  if (n < 1) n = 1;
#ifdef _OPENMP
  omp_set_num_threads(n);
#endif
  openblas_set_num_threads(1);
}
int fa_get_num_threads(void) {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/* ------------------------------------------------------------------ float16 */
float fa_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0) {
    if (man == 0) u = sign;
    else { /* subnormal */
      int e = -1;
      do { e++; man <<= 1; } while (!(man & 0x400));
      u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) u = sign | 0x7f800000u | (man << 13);
  else u = sign | ((exp + 112) << 23) | (man << 13);
  float f; memcpy(&f, &u, 4); return f;
}

uint16_t fa_f32_to_f16(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00);            /* NaN */
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);           /* overflow -> inf */
  if (a < 0x38800000u) {                                            /* subnormal or zero */
    if (a < 0x33000000u) return (uint16_t)sign;
    uint32_t man = (a & 0x7fffff) | 0x800000;
    int shift = 113 - (int)(a >> 23) + 13;                          /* 14..24 */
    uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) half++;
    return (uint16_t)(sign | half);
  }
  uint32_t r = a - 0x38000000u;                                     /* rebias exponent */
  r += 0xfffu + ((r >> 13) & 1u);
  return (uint16_t)(sign | (r >> 13));
}

/* ------------------------------------------------------------------ validation */
const char *fa_device_str(int device, char *buf) {
  if (device < 0) strcpy(buf, "cpu");
  else sprintf(buf, "cuda:%d", device);
  return buf;
}

const char *fa_dims_str(const int64_t *shape, int n, char *buf) {
  char *p = buf;
  p += sprintf(p, "(");
  for (int i = 0; i < n && i < FA_MAX_DIMS; i++) p += sprintf(p, i ? ", %lld" : "%lld", (long long)shape[i]);
  sprintf(p, n == 1 ? ",)" : ")");
  return buf;
}

const char *fa_shape_str(const fa_tensor *t, char *buf) { return fa_dims_str(t->shape, t->ndim, buf); }

/* The one check of a descriptor every entry runs first: a rank in 0..8, a known dtype, the CPU or a visible CUDA
 * device, sizes and strides >= 0 (the library makes no negative strides, and a descriptor owns no storage bounds to
 * check one against), and an element count and largest offset that fit in int64 (kernels index with int64). */
int fa_check_defined(const char *fn, const char *arg, const fa_tensor *t) {
  if (!t) return fa_error(FA_ERR_ARG, "%s: argument '%s': expected a tensor, got nothing", fn, arg);
  if (t->ndim < 0 || t->ndim > FA_MAX_DIMS)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected 0 to %d dimensions, got %d", fn, arg, FA_MAX_DIMS, t->ndim);
  if (t->dtype < 0 || t->dtype >= FA_NUM_DTYPES)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected a dtype in 0..%d (fa_dtype), got %d", fn, arg,
                    FA_NUM_DTYPES - 1, t->dtype);
  if (t->device < FA_CPU || (t->device >= 0 && t->device >= fa_cuda_device_count()))
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected the CPU (-1) or a CUDA device in [0, %d), got device %d", fn,
                    arg, fa_cuda_device_count(), t->device);
  int64_t n = 1, last = 0;
  int zero = 0;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] < 0 || t->stride[i] < 0)
      return fa_error(FA_ERR_ARG, "%s: argument '%s': expected sizes and strides >= 0, got size %lld and stride %lld in dimension %d",
                      fn, arg, (long long)t->shape[i], (long long)t->stride[i], i + 1);
    if (t->shape[i] == 0) zero = 1;
  }
  for (int i = 0; !zero && i < t->ndim; i++) {
    int64_t span;
    if (__builtin_mul_overflow(n, t->shape[i], &n) || __builtin_mul_overflow(t->shape[i] - 1, t->stride[i], &span) ||
        __builtin_add_overflow(last, span, &last) || n > ((int64_t)1 << 53))
      return fa_error(FA_ERR_ARG, "%s: argument '%s': too many elements or too large strides (more than 2^53 elements or int64 offsets)",
                      fn, arg);
  }
  if (!t->data && !zero) return fa_error(FA_ERR_ARG, "%s: argument '%s': tensor has no data", fn, arg);
  return 0;
}

int fa_check_ndim(const char *fn, const char *arg, const fa_tensor *t, int ndim) {
  int rc;
  if ((rc = fa_check_defined(fn, arg, t))) return rc;
  if (ndim >= 0 && t->ndim != ndim) {
    char b[256];
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected a %d-D tensor, got a %d-D tensor of shape %s", fn, arg, ndim,
                    t->ndim, fa_shape_str(t, b));
  }
  return 0;
}

int fa_check_shape(const char *fn, const char *arg, const fa_tensor *t, const int64_t *want, int n, const char *what) {
  int same = t->ndim == n;
  for (int i = 0; same && i < n; i++) same = t->shape[i] == want[i];
  if (!same) {
    char a[256], b[256];
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected shape %s = %s, got %s", fn, arg, what, fa_dims_str(want, n, a),
                    fa_shape_str(t, b));
  }
  return 0;
}

int fa_check_dense(const char *fn, const char *arg, const fa_tensor *t) {
  if (!fa_is_contiguous(t))
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected a contiguous tensor (the result is written into it), got a non-contiguous view",
                    fn, arg);
  return 0;
}

int fa_check_dtype(const char *fn, const char *arg, const fa_tensor *t, int dtype) {
  if (t->dtype != dtype)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected dtype %s, got %s", fn, arg, fa_dtype_name(dtype),
                    fa_dtype_name(t->dtype));
  return 0;
}

int fa_check_float_dtype(const char *fn, const char *arg, const fa_tensor *t) {
  if (t->device < 0 && t->dtype != FA_FLOAT32 && t->dtype != FA_FLOAT64)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected float32 or float64 on the CPU, got %s", fn, arg,
                    fa_dtype_name(t->dtype));
  if (t->device >= 0 && t->dtype != FA_FLOAT32 && t->dtype != FA_BFLOAT16 && t->dtype != FA_FLOAT16)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected float32, bfloat16 or float16 on CUDA, got %s", fn, arg,
                    fa_dtype_name(t->dtype));
  return 0;
}

int fa_check_same_dtype(const char *fn, const char *arg, const fa_tensor *t, const char *ref_arg, const fa_tensor *ref) {
  if (t->dtype != ref->dtype)
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected dtype %s (as '%s'), got %s", fn, arg,
                    fa_dtype_name(ref->dtype), ref_arg, fa_dtype_name(t->dtype));
  return 0;
}

int fa_check_same_device(const char *fn, const char *arg, const fa_tensor *t, const char *ref_arg, const fa_tensor *ref) {
  if (t->device != ref->device) {
    char a[32], b[32];
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected a tensor on %s (as '%s'), got one on %s", fn, arg,
                    fa_device_str(ref->device, a), ref_arg, fa_device_str(t->device, b));
  }
  return 0;
}

int fa_check_same_shape(const char *fn, const char *arg, const fa_tensor *t, const char *ref_arg, const fa_tensor *ref) {
  int same = t->ndim == ref->ndim;
  for (int i = 0; same && i < t->ndim; i++) same = t->shape[i] == ref->shape[i];
  if (!same) {
    char a[256], b[256];
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected shape %s (as '%s'), got %s", fn, arg, fa_shape_str(ref, a),
                    ref_arg, fa_shape_str(t, b));
  }
  return 0;
}

int fa_check_contiguous(const char *fn, const char *arg, const fa_tensor *t) {
  if (!fa_is_contiguous(t))
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected a contiguous tensor, got a non-contiguous view (call :contiguous())",
                    fn, arg);
  return 0;
}

int fa_check_dim(const char *fn, const char *arg, const fa_tensor *t, int dim, int64_t size) {
  if (dim >= t->ndim || t->shape[dim] != size) {
    char b[256];
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected size %lld in dimension %d, got shape %s", fn, arg,
                    (long long)size, dim + 1, fa_shape_str(t, b));
  }
  return 0;
}

int fa_check_like(const char *fn, const char *arg, const fa_tensor *t, const char *ref_arg, const fa_tensor *ref) {
  int rc;
  if ((rc = fa_check_defined(fn, arg, t))) return rc;
  if ((rc = fa_check_same_device(fn, arg, t, ref_arg, ref))) return rc;
  return fa_check_same_dtype(fn, arg, t, ref_arg, ref);
}

/* ------------------------------------------------------------------ memory overlap */
/* [lo, hi) bytes of a defined tensor (strides >= 0, checked by fa_check_defined); 0 when it has no element */
static int byte_range(const fa_tensor *t, uintptr_t *lo, uintptr_t *hi) {
  int64_t last = 0;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] == 0) return 0;
    last += (t->shape[i] - 1) * t->stride[i];
  }
  *lo = (uintptr_t)t->data;
  *hi = *lo + (uintptr_t)((last + 1) * fa_dtype_size(t->dtype));
  return 1;
}

int fa_overlaps(const fa_tensor *a, const fa_tensor *b) {
  uintptr_t a0, a1, b0, b1;
  if (!a || !b || a->device != b->device) return 0;
  if (!byte_range(a, &a0, &a1) || !byte_range(b, &b0, &b1)) return 0;
  return a0 < b1 && b0 < a1;
}

int fa_check_no_overlap(const char *fn, const char *arg, const fa_tensor *out, const char *in_arg, const fa_tensor *in) {
  if (fa_overlaps(out, in))
    return fa_error(FA_ERR_ARG, "%s: argument '%s': expected a tensor that shares no memory with argument '%s' (the "
                    "result is written into it), got one that overlaps it", fn, arg, in_arg);
  return 0;
}

int fa_check_no_overlaps(const char *fn, const fa_tensor *const *outs, const char *const *onames, int no,
                         const fa_tensor *const *ins, const char *const *inames, int ni) {
  int rc;
  for (int i = 0; i < no; i++) {
    if (!outs[i]) continue;
    for (int j = 0; j < ni; j++)
      if (ins[j] && (rc = fa_check_no_overlap(fn, onames[i], outs[i], inames[j], ins[j]))) return rc;
    for (int j = 0; j < i; j++)
      if (outs[j] && (rc = fa_check_no_overlap(fn, onames[i], outs[i], onames[j], outs[j]))) return rc;
  }
  return 0;
}
