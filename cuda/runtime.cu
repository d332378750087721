// runtime.cu: the CUDA runtime of fastattn: devices, one non-blocking stream and one cuBLAS handle per
// device, the caching device allocator, memory statistics, events, and CUDA error conversion.
//
// Allocator (DESIGN §2, issue 3): cudaMalloc/cudaFree synchronise the device, so freed blocks are kept in
// per-device free lists keyed by their rounded size and handed out again without any CUDA call. Sizes
// round up to 512 B below 1 MiB and to 2 MiB multiples above, so a training loop that allocates the same
// tensors every step reuses the same blocks. Reuse is stream-ordered and needs no event: every kernel on
// device d runs on the one stream of d, so work that uses a block after its reuse is queued after the work
// that used it before. When cudaMalloc fails the cache is released (cudaFree) and the allocation retried.
#include "common.cuh"
#include <map>
#include <mutex>
#include <unordered_map>
#include <stdio.h>

enum { FA_CU_MAX_DEVICES = 64 };

// ------------------------------------------------------------------ errors
int fa_cu_check(cudaError_t e, const char *fn) {
  if (e == cudaSuccess) return 0;
  cudaGetLastError(); // clear a non-sticky error so that the next call starts clean
  return fa_error(FA_ERR_CUDA, "%s: CUDA error: %s (%s)", fn, cudaGetErrorString(e), cudaGetErrorName(e));
}

int fa_cu_launch_check(const char *fn) { return fa_cu_check(cudaGetLastError(), fn); }

int fa_cu_blas_check(cublasStatus_t s, const char *fn) {
  if (s == CUBLAS_STATUS_SUCCESS) return 0;
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    return fa_error(FA_ERR_CUDA, "%s: cuBLAS error: %s (CUDA error: %s)", fn, cublasGetStatusString(s), cudaGetErrorString(e));
  return fa_error(FA_ERR_CUDA, "%s: cuBLAS error: %s", fn, cublasGetStatusString(s));
}

// ------------------------------------------------------------------ devices, streams, handles
static std::mutex g_dev_mu;                       // guards lazy creation below
static cudaStream_t g_stream[FA_CU_MAX_DEVICES];
static cublasHandle_t g_blas[FA_CU_MAX_DEVICES];
static int g_blas_tf32[FA_CU_MAX_DEVICES];        // math mode the handle was last set to
static int g_sm[FA_CU_MAX_DEVICES];
static int g_tf32 = 0;
static int g_count = -1;
static __thread int t_current = -1;               // the device this thread last made current (cache)

static int device_count(void) {
  if (g_count < 0) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) { cudaGetLastError(); n = 0; }
    if (n > FA_CU_MAX_DEVICES) n = FA_CU_MAX_DEVICES;
    g_count = n;
  }
  return g_count;
}

static int check_device(const char *fn, int device) {
  int n = device_count();
  if (device < 0 || device >= n)
    return fa_error(FA_ERR_ARG, "%s: argument 'device': expected a CUDA device in [0, %d), got %d%s", fn, n, device,
                    n == 0 ? " (no CUDA device found)" : "");
  return 0;
}

// makes device current for this thread (cudaSetDevice only when it changes)
static int use_device(int device, const char *fn) {
  if (t_current == device) return 0;
  int rc = fa_cu_check(cudaSetDevice(device), fn);
  if (!rc) t_current = device;
  return rc;
}

cudaStream_t fa_cu_stream(int device) {
  if (device < 0 || device >= FA_CU_MAX_DEVICES) return 0;
  use_device(device, "fa_cu_stream");
  if (!g_stream[device]) {
    std::lock_guard<std::mutex> lk(g_dev_mu);
    if (!g_stream[device]) {
      cudaStream_t s;
      if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess) g_stream[device] = s;
      else { cudaGetLastError(); return 0; }
    }
  }
  return g_stream[device];
}

cublasHandle_t fa_cu_blas(int device) {
  if (device < 0 || device >= FA_CU_MAX_DEVICES) return NULL;
  cudaStream_t s = fa_cu_stream(device);
  if (!g_blas[device]) {
    std::lock_guard<std::mutex> lk(g_dev_mu);
    if (!g_blas[device]) {
      cublasHandle_t h;
      if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) { cudaGetLastError(); return NULL; }
      cublasSetStream(h, s);
      cublasSetMathMode(h, CUBLAS_DEFAULT_MATH);
      g_blas_tf32[device] = 0;
      g_blas[device] = h;
    }
  }
  if (g_blas_tf32[device] != g_tf32) {
    cublasSetMathMode(g_blas[device], g_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH);
    g_blas_tf32[device] = g_tf32;
  }
  return g_blas[device];
}

int fa_cu_tf32_allowed(void) { return g_tf32; }

int fa_cu_sm_count(int device) {
  if (device < 0 || device >= FA_CU_MAX_DEVICES) return 1;
  if (!g_sm[device]) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v < 1) {
      cudaGetLastError();
      v = 1;
    }
    g_sm[device] = v;
  }
  return g_sm[device];
}

// ------------------------------------------------------------------ caching allocator
namespace {
struct DevPool {
  std::multimap<size_t, void *> free_blocks;   // rounded size -> block (all on this device)
  int64_t in_use = 0, cached = 0, peak = 0, since_gc = 0;
};
struct Live { size_t size; int device; };
std::mutex g_mem_mu;
// heap-allocated and never destroyed: a tensor finalizer may still free a block while the process exits
DevPool *const g_pool = new DevPool[FA_CU_MAX_DEVICES];
std::unordered_map<void *, Live> &g_live = *new std::unordered_map<void *, Live>(); // block -> size, device
} // namespace

static size_t round_size(int64_t nbytes) {
  const size_t small = 512, big = (size_t)2 << 20;
  size_t n = nbytes < 1 ? 1 : (size_t)nbytes;
  if (n < ((size_t)1 << 20)) return (n + small - 1) / small * small;
  return (n + big - 1) / big * big;
}

// frees every cached block of device (caller holds g_mem_mu); cudaFree waits for the device
static int release_cache(int device) {
  DevPool &p = g_pool[device];
  int rc = 0;
  if (p.free_blocks.empty()) return 0;
  use_device(device, "fa_cuda_empty_cache");
  for (auto &kv : p.free_blocks) {
    cudaError_t e = cudaFree(kv.second);
    if (e != cudaSuccess && !rc) rc = fa_cu_check(e, "fa_cuda_empty_cache");
  }
  p.free_blocks.clear();
  p.cached = 0;
  return rc;
}

int fa_cu_alloc(int device, int64_t nbytes, void **ptr) {
  *ptr = NULL;
  int rc;
  if ((rc = check_device("fa_alloc", device))) return rc;
  size_t size = round_size(nbytes);
  std::lock_guard<std::mutex> lk(g_mem_mu);
  DevPool &p = g_pool[device];
  void *blk = NULL;
  auto it = p.free_blocks.find(size);
  if (it != p.free_blocks.end()) {
    blk = it->second;
    p.free_blocks.erase(it);
    p.cached -= (int64_t)size;
  } else {
    if ((rc = use_device(device, "fa_alloc"))) return rc;
    cudaError_t e = cudaMalloc(&blk, size);
    if (e == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      release_cache(device);
      e = cudaMalloc(&blk, size);
    }
    if (e != cudaSuccess) {
      cudaGetLastError();
      size_t fr = 0, tot = 0;
      cudaMemGetInfo(&fr, &tot);
      cudaGetLastError();
      return fa_error(e == cudaErrorMemoryAllocation ? FA_ERR_MEMORY : FA_ERR_CUDA,
                      "fa_alloc: CUDA out of memory allocating %lld bytes on cuda:%d (%lld in use by fastattn, "
                      "%lld free of %lld on the device): %s",
                      (long long)nbytes, device, (long long)p.in_use, (long long)fr, (long long)tot, cudaGetErrorString(e));
    }
  }
  g_live[blk] = Live{size, device};
  p.in_use += (int64_t)size;
  p.since_gc += (int64_t)size;
  if (p.in_use > p.peak) p.peak = p.in_use;
  *ptr = blk;
  return 0;
}

// never synchronises: the block goes back to the free list (see the comment at the top)
void fa_cu_free(int device, void *ptr) {
  if (!ptr) return;
  std::lock_guard<std::mutex> lk(g_mem_mu);
  auto it = g_live.find(ptr);
  if (it == g_live.end()) return; // not ours (or freed twice): ignore rather than corrupt the pool
  Live l = it->second;
  g_live.erase(it);
  DevPool &p = g_pool[l.device];
  p.in_use -= (int64_t)l.size;
  p.cached += (int64_t)l.size;
  p.free_blocks.emplace(l.size, ptr);
}

void *fa_cu_temp_alloc(int device, int64_t nbytes) {
  void *p = NULL;
  if (fa_cu_alloc(device, nbytes, &p)) return NULL;
  return p;
}
void fa_cu_temp_free(int device, void *p) { fa_cu_free(device, p); }

// ------------------------------------------------------------------ public runtime API
extern "C" {

int fa_has_cuda(void) { return 1; }

int fa_cuda_device_count(void) { return device_count(); }

int fa_cuda_set_device(int device) {
  int rc;
  if ((rc = check_device("fa_cuda_set_device", device))) return rc;
  return use_device(device, "fa_cuda_set_device");
}

int fa_cuda_get_device(void) {
  if (device_count() == 0) return -1;
  int d = 0;
  if (cudaGetDevice(&d) != cudaSuccess) { cudaGetLastError(); return -1; }
  return d;
}

// device < 0: the current device
int fa_cuda_synchronize(int device) {
  int rc;
  if (device < 0) device = fa_cuda_get_device();
  if ((rc = check_device("fa_cuda_synchronize", device))) return rc;
  if ((rc = use_device(device, "fa_cuda_synchronize"))) return rc;
  return fa_cu_check(cudaDeviceSynchronize(), "fa_cuda_synchronize");
}

int fa_cuda_memory_stats(int device, int64_t *stats) {
  int rc;
  if ((rc = check_device("fa_cuda_memory_stats", device))) return rc;
  std::lock_guard<std::mutex> lk(g_mem_mu);
  DevPool &p = g_pool[device];
  stats[0] = p.in_use;
  stats[1] = p.cached;
  stats[2] = p.peak;
  stats[3] = p.since_gc;
  return 0;
}

int fa_cuda_reset_peak_stats(int device) {
  int rc;
  if ((rc = check_device("fa_cuda_reset_peak_stats", device))) return rc;
  std::lock_guard<std::mutex> lk(g_mem_mu);
  g_pool[device].peak = g_pool[device].in_use;
  return 0;
}

int fa_cuda_empty_cache(int device) {
  int rc;
  if ((rc = check_device("fa_cuda_empty_cache", device))) return rc;
  std::lock_guard<std::mutex> lk(g_mem_mu);
  return release_cache(device);
}

void fa_cuda_gc_reset(int device) {
  if (device < 0 || device >= device_count()) return;
  std::lock_guard<std::mutex> lk(g_mem_mu);
  g_pool[device].since_gc = 0;
}

int fa_cuda_allow_tf32(int allow) {
  g_tf32 = allow ? 1 : 0;
  return 0;
}

int fa_cuda_device_name(int device, char *buf, int buflen) {
  int rc;
  if ((rc = check_device("fa_cuda_device_name", device))) return rc;
  if (!buf || buflen < 1) return fa_error(FA_ERR_ARG, "fa_cuda_device_name: argument 'buf': expected a buffer, got none");
  cudaDeviceProp prop;
  if ((rc = fa_cu_check(cudaGetDeviceProperties(&prop, device), "fa_cuda_device_name"))) return rc;
  snprintf(buf, (size_t)buflen, "%s", prop.name);
  return 0;
}

int fa_cuda_event_create(void **event) {
  if (!event) return fa_error(FA_ERR_ARG, "fa_cuda_event_create: argument 'event': expected a pointer, got NULL");
  *event = NULL;
  if (device_count() == 0) return fa_error(FA_ERR_CUDA, "fa_cuda_event_create: no CUDA device found");
  cudaEvent_t e;
  int rc;
  if ((rc = fa_cu_check(cudaEventCreate(&e), "fa_cuda_event_create"))) return rc;
  *event = (void *)e;
  return 0;
}

int fa_cuda_event_destroy(void *event) {
  if (!event) return 0;
  return fa_cu_check(cudaEventDestroy((cudaEvent_t)event), "fa_cuda_event_destroy");
}

// records on the stream of device (where every fastattn kernel of that device runs)
int fa_cuda_event_record(void *event, int device) {
  int rc;
  if (!event) return fa_error(FA_ERR_ARG, "fa_cuda_event_record: argument 'event': expected an event, got NULL");
  if (device < 0) device = fa_cuda_get_device();
  if ((rc = check_device("fa_cuda_event_record", device))) return rc;
  cudaStream_t s = fa_cu_stream(device);
  return fa_cu_check(cudaEventRecord((cudaEvent_t)event, s), "fa_cuda_event_record");
}

int fa_cuda_event_synchronize(void *event) {
  if (!event) return fa_error(FA_ERR_ARG, "fa_cuda_event_synchronize: argument 'event': expected an event, got NULL");
  return fa_cu_check(cudaEventSynchronize((cudaEvent_t)event), "fa_cuda_event_synchronize");
}

int fa_cuda_event_elapsed(float *ms, void *start, void *end) {
  if (!ms || !start || !end)
    return fa_error(FA_ERR_ARG, "fa_cuda_event_elapsed: expected an output pointer and two recorded events");
  return fa_cu_check(cudaEventElapsedTime(ms, (cudaEvent_t)start, (cudaEvent_t)end), "fa_cuda_event_elapsed");
}

} // extern "C"
