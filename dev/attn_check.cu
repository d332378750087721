// attn_check.cu: standalone correctness and timing check of the CUDA attention core (cuda/attention_fwd.cu, cuda/attention_bwd.cu)
// against a double-precision CPU reference written here, through the private kernel entry points
// fa_cu_attention_forward/backward (c/attention.h). Build and run on a GPU machine, from the repository root:
//
//   FA_CUDA=1 make -j all
//   nvcc -O2 -std=c++17 -Ic -arch=sm_90a dev/attn_check.cu -Lbuild -lfastattn -Xlinker -rpath,$PWD/build -o build/attn_check
//   build/attn_check            # every case, the N = 4096 triangle (AUTO and SIMT; ~36 GB of GPU memory, a
//                               # minute of CPU reference), then the timings
//   build/attn_check quick      # the small cases only
//
// One line per case: PASS/FAIL/SKIP, the case, max errors (relative to the largest reference magnitude of each
// tensor) of out, lse, gq, gk, gv, gbias, and "det ok" when a deterministic backward ran twice bit-identically.
// SKIP = the forced kernel family answered FA_ERR_UNSUPPORTED (its message is printed); "backward SKIP": the
// forward ran and passed or failed, the family has no backward.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <string>
#include <vector>
#include "attention.h"
#include "fastattn.h"

#define CK(x)                                                                                      \
  do {                                                                                             \
    cudaError_t e_ = (x);                                                                          \
    if (e_ != cudaSuccess) {                                                                       \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));          \
      exit(2);                                                                                     \
    }                                                                                              \
  } while (0)

static uint64_t rng_state = 0x12345678abcdefULL;
static double urand() {  // [0, 1), xorshift64*
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return (double)((rng_state * 2685821657736338717ULL) >> 11) * (1.0 / 9007199254740992.0);
}

static int dsize(int dtype) { return dtype == FA_FLOAT32 ? 4 : 2; }
static double round_to(int dtype, double x) {
  if (dtype == FA_BFLOAT16) return (double)__bfloat162float(__float2bfloat16((float)x));
  if (dtype == FA_FLOAT16) return (double)__half2float(__float2half((float)x));
  return (double)(float)x;
}
static const char *dname(int dtype) { return dtype == FA_FLOAT32 ? "f32" : dtype == FA_BFLOAT16 ? "bf16" : "f16"; }

// a strided operand: storage of n elements of dtype ("u8" for a select mask: dtype = -1), host copy in double
struct Ten {
  fa_attn_strides s;
  int64_t n = 0;
  int dtype = FA_FLOAT32;
  std::vector<double> h;
  void *d = nullptr;
  void alloc(int64_t n_, int dt) {
    n = n_;
    dtype = dt;
    h.assign((size_t)n, 0.0);
    CK(cudaMalloc(&d, (size_t)(n > 0 ? n : 1) * esize()));
    CK(cudaMemset(d, 0, (size_t)(n > 0 ? n : 1) * esize()));
  }
  int esize() const { return dtype < 0 ? 1 : dsize(dtype); }
  void upload() {
    std::vector<unsigned char> b((size_t)(n > 0 ? n : 1) * esize());
    for (int64_t e = 0; e < n; e++) {
      if (dtype < 0) b[e] = h[e] != 0;
      else if (dtype == FA_FLOAT32) ((float *)b.data())[e] = (float)h[e];
      else if (dtype == FA_BFLOAT16) ((__nv_bfloat16 *)b.data())[e] = __float2bfloat16((float)h[e]);
      else ((__half *)b.data())[e] = __float2half((float)h[e]);
    }
    CK(cudaMemcpy(d, b.data(), b.size(), cudaMemcpyHostToDevice));
  }
  std::vector<double> download() const {
    std::vector<unsigned char> b((size_t)(n > 0 ? n : 1) * esize());
    CK(cudaMemcpy(b.data(), d, b.size(), cudaMemcpyDeviceToHost));
    std::vector<double> r((size_t)n);
    for (int64_t e = 0; e < n; e++) {
      if (dtype == FA_FLOAT32) r[e] = ((float *)b.data())[e];
      else if (dtype == FA_BFLOAT16) r[e] = __bfloat162float(((__nv_bfloat16 *)b.data())[e]);
      else r[e] = __half2float(((__half *)b.data())[e]);
    }
    return r;
  }
  std::vector<unsigned char> bytes() const {
    std::vector<unsigned char> b((size_t)n * esize());
    if (n) CK(cudaMemcpy(b.data(), d, b.size(), cudaMemcpyDeviceToHost));
    return b;
  }
  void zero() { CK(cudaMemset(d, 0, (size_t)(n > 0 ? n : 1) * esize())); }
  void release() { if (d) cudaFree(d); d = nullptr; }
};

static fa_attn_strides zs() { fa_attn_strides s; memset(&s, 0, sizeof s); return s; }

struct Case {
  std::string name;
  int dtype, kernel;
  int tri;                 // 1: triangle layout, q/k/v/out views of (I, J, H, D); batch = I
  int nb;
  int64_t bs[2], H, Hkv, Lq, Lk, D;
  int bias;                // 0 none, 1 full, 2 shared by the batch (H, Lq, Lk), 3 (1, H, 1, Lk), 4 shared by heads
  int mask;                // 0 none, 1 select (Z,H,Lq,Lk) with a fully masked row, 2 select key mask (Z,1,1,Lk)
                           // with a fully masked batch entry, 3 additive key mask (scale 3)
  double dropout;
  int det;
};

struct Problem {
  fa_attn_geom g;
  Ten q, k, v, o, lse, bias, mask, go, gq, gk, gv, gb;
};

static int64_t zcoord(const fa_attn_geom &g, int64_t z, int d) {
  for (int e = g.nb - 1; e > d; e--) z /= g.bs[e];
  return z % g.bs[d];
}
static int64_t off(const fa_attn_geom &g, const fa_attn_strides &s, int64_t z, int64_t h, int64_t r, int64_t c) {
  int64_t o = h * s.h + r * s.r + c * s.c;
  for (int d = 0; d < g.nb; d++) o += zcoord(g, z, d) * s.b[d];
  return o;
}
// dense row-major strides for logical (batch..., h, r, c) sizes (Hs, Rs, Cs); size-0 dims are broadcast (stride 0)
static fa_attn_strides dense(const fa_attn_geom &g, const int *bkeep, int64_t Hs, int64_t Rs, int64_t Cs, int64_t &n) {
  fa_attn_strides s = zs();
  int64_t st = 1;
  s.c = Cs ? st : 0; st *= Cs ? Cs : 1;
  s.r = Rs ? st : 0; st *= Rs ? Rs : 1;
  s.h = Hs ? st : 0; st *= Hs ? Hs : 1;
  for (int d = g.nb - 1; d >= 0; d--) {
    s.b[d] = bkeep[d] ? st : 0;
    st *= bkeep[d] ? g.bs[d] : 1;
  }
  n = st;
  return s;
}

static void build(Problem &P, const Case &c) {
  fa_attn_geom &g = P.g;
  memset(&g, 0, sizeof g);
  g.nb = c.nb;
  g.Z = 1;
  for (int d = 0; d < c.nb; d++) { g.bs[d] = c.bs[d]; g.Z *= c.bs[d]; }
  g.H = c.H; g.Hkv = c.Hkv; g.Lq = c.Lq; g.Lk = c.Lk; g.D = c.D;
  g.dtype = c.dtype;
  g.device = 0;
  g.scale = 1.0 / sqrt((double)(c.D > 0 ? c.D : 1));
  g.dropout = c.dropout;
  g.seed = 1234567;
  g.offset = 42;
  g.deterministic = c.det;
  g.kernel = c.kernel;
  int all[2] = {1, 1}, none[2] = {0, 0};
  int64_t n;
  if (c.tri) {  // (I, J, H, D) storage; batch dim 0 = I, rows = J
    const int64_t N = c.Lq, H = c.H, D = c.D;
    fa_attn_strides s = zs();
    s.b[0] = N * H * D; s.h = D; s.r = H * D; s.c = 1;
    for (Ten *t : {&P.q, &P.k, &P.v, &P.o, &P.go, &P.gq, &P.gk, &P.gv}) { t->s = s; t->alloc(N * N * H * D, c.dtype); }
  } else {
    P.q.s = dense(g, all, c.H, c.Lq, c.D, n); P.q.alloc(n, c.dtype);
    P.o.s = P.q.s; P.o.alloc(n, c.dtype);
    P.go.s = P.q.s; P.go.alloc(n, c.dtype);
    P.gq.s = P.q.s; P.gq.alloc(n, c.dtype);
    P.k.s = dense(g, all, c.Hkv, c.Lk, c.D, n); P.k.alloc(n, c.dtype);
    for (Ten *t : {&P.v, &P.gk, &P.gv}) { t->s = P.k.s; t->alloc(n, c.dtype); }
  }
  P.lse.s = dense(g, all, c.H, c.Lq, 1, n); P.lse.alloc(n, FA_FLOAT32);
  g.q = P.q.s; g.k = P.k.s; g.v = P.v.s; g.o = P.o.s; g.lse = P.lse.s;
  g.go = P.go.s; g.gq = P.gq.s; g.gk = P.gk.s; g.gv = P.gv.s;
  g.has_bias = c.bias != 0;
  if (c.bias) {
    fa_attn_strides s;
    if (c.bias == 1) s = dense(g, all, c.H, c.Lq, c.Lk, n);
    else if (c.bias == 2) s = dense(g, none, c.H, c.Lq, c.Lk, n);
    else if (c.bias == 3) s = dense(g, none, c.H, 0, c.Lk, n);
    else s = dense(g, all, 0, c.Lq, c.Lk, n);
    P.bias.s = P.gb.s = s;
    P.bias.alloc(n, FA_FLOAT32);
    P.gb.alloc(n, FA_FLOAT32);
    for (auto &x : P.bias.h) x = (float)(2.0 * urand() - 1.0);
    g.bias = g.gbias = s;
  }
  g.mask_mode = c.mask == 0 ? 0 : c.mask == 3 ? 2 : 1;
  g.mask_scale = 3.0;
  if (c.mask) {
    fa_attn_strides s = c.mask == 1 ? dense(g, all, c.H, c.Lq, c.Lk, n) : dense(g, all, 0, 0, c.Lk, n);
    if (c.tri && c.mask != 1) { s = zs(); s.b[0] = c.Lk; s.c = 1; n = c.Lq * c.Lk; }  // (I, K): key mask per row i
    P.mask.s = s;
    P.mask.alloc(n, c.mask == 3 ? FA_FLOAT32 : -1);
    for (auto &x : P.mask.h) x = urand() < 0.3 ? 0.0 : 1.0;
    if (c.mask == 1) {  // row (z=0, h=0, i=Lq-1) fully masked
      for (int64_t j = 0; j < c.Lk; j++) P.mask.h[off(g, s, 0, 0, c.Lq - 1, j)] = 0.0;
    } else {  // batch entry z = min(1, Z-1) fully masked
      const int64_t z = g.Z > 1 ? 1 : 0;
      for (int64_t j = 0; j < c.Lk; j++) P.mask.h[off(g, s, z, 0, 0, j)] = 0.0;
    }
    g.mask = s;
  }
  for (Ten *t : {&P.q, &P.k, &P.v, &P.go})
    for (auto &x : t->h) x = round_to(c.dtype, 2.0 * urand() - 1.0);
  for (Ten *t : {&P.q, &P.k, &P.v, &P.go, &P.bias, &P.mask}) if (t->n) t->upload();
}

static bool keep_ref(const fa_attn_geom &g, int64_t e) {
  uint32_t r[4];
  fa_philox(g.seed, g.offset + ((uint64_t)e >> 2), r);
  return (double)(r[e & 3] >> 8) * (1.0 / 16777216.0) >= g.dropout;
}

struct Ref {
  std::vector<double> o, lse, gq, gk, gv, gb;  // in the storage index of each tensor
  // the same sums of dS's terms in absolute value, P (|dP| + |delta|): the size of what cancels in gq, gk, gb
  std::vector<double> mq, mk, mb;
};

// double-precision reference of c/attention.h's semantics
static void reference(const Problem &P, Ref &R) {
  const fa_attn_geom &g = P.g;
  const int64_t G = g.H / g.Hkv, D = g.D, Lk = g.Lk;
  R.o.assign(P.o.n, 0); R.lse.assign(P.lse.n, 0); R.gq.assign(P.gq.n, 0); R.gk.assign(P.gk.n, 0);
  R.gv.assign(P.gv.n, 0); R.gb.assign(P.gb.n, 0);
  R.mq.assign(P.gq.n, 0); R.mk.assign(P.gk.n, 0); R.mb.assign(P.gb.n, 0);
  std::vector<double> s(Lk), pr(Lk), dr(Lk), dp(Lk);
  std::vector<char> in(Lk);
  for (int64_t z = 0; z < g.Z; z++)
    for (int64_t h = 0; h < g.H; h++)
      for (int64_t i = 0; i < g.Lq; i++) {
        const int64_t hk = h / G;
        const double *q = &P.q.h[off(g, g.q, z, h, i, 0)], *go = &P.go.h[off(g, g.go, z, h, i, 0)];
        double m = -INFINITY;
        for (int64_t j = 0; j < Lk; j++) {
          const double *k = &P.k.h[off(g, g.k, z, hk, j, 0)];
          double d = 0;
          for (int64_t c = 0; c < D; c++) d += q[c] * k[c];
          d *= g.scale;
          if (g.has_bias) d += P.bias.h[off(g, g.bias, z, h, i, j)];
          in[j] = 1;
          if (g.mask_mode == 1) in[j] = P.mask.h[off(g, g.mask, z, h, i, j)] != 0;
          if (g.mask_mode == 2) d += g.mask_scale * (P.mask.h[off(g, g.mask, z, h, i, j)] - 1.0);
          s[j] = d;
          if (in[j] && d > m) m = d;
        }
        double l = 0;
        for (int64_t j = 0; j < Lk; j++) l += in[j] ? exp(s[j] - m) : 0.0;
        double *o = &R.o[off(g, g.o, z, h, i, 0)];
        double *gq = &R.gq[off(g, g.gq, z, h, i, 0)];
        const bool lost = l == 0;
        const double lse = lost ? -INFINITY : m + log(l);
        R.lse[off(g, g.lse, z, h, i, 0)] = lse;
        for (int64_t j = 0; j < Lk; j++) {
          pr[j] = lost ? 1.0 / Lk : in[j] ? exp(s[j] - lse) : 0.0;
          const int64_t e = ((z * g.H + h) * g.Lq + i) * Lk + j;
          dr[j] = lost || g.dropout == 0 ? 1.0 : keep_ref(g, e) ? 1.0 / (1.0 - g.dropout) : 0.0;
          const double *v = &P.v.h[off(g, g.v, z, hk, j, 0)];
          double *gv = &R.gv[off(g, g.gv, z, hk, j, 0)];
          for (int64_t c = 0; c < D; c++) {
            o[c] += pr[j] * dr[j] * v[c];
            gv[c] += pr[j] * dr[j] * go[c];
          }
          double x = 0;
          for (int64_t c = 0; c < D; c++) x += go[c] * v[c];
          dp[j] = x * dr[j];
        }
        if (lost) continue;
        double Dl = 0;
        for (int64_t j = 0; j < Lk; j++) Dl += pr[j] * dp[j];
        for (int64_t j = 0; j < Lk; j++) {
          if (!in[j]) continue;
          const double ds = pr[j] * (dp[j] - Dl), dm = pr[j] * (fabs(dp[j]) + fabs(Dl));
          const double *k = &P.k.h[off(g, g.k, z, hk, j, 0)];
          double *gk = &R.gk[off(g, g.gk, z, hk, j, 0)];
          double *mq = &R.mq[off(g, g.gq, z, h, i, 0)], *mk = &R.mk[off(g, g.gk, z, hk, j, 0)];
          for (int64_t c = 0; c < D; c++) {
            gq[c] += g.scale * ds * k[c];
            gk[c] += g.scale * ds * q[c];
            mq[c] += g.scale * dm * fabs(k[c]);
            mk[c] += g.scale * dm * fabs(q[c]);
          }
          if (g.has_bias) {
            R.gb[off(g, g.gbias, z, h, i, j)] += ds;
            R.mb[off(g, g.gbias, z, h, i, j)] += dm;
          }
        }
      }
}

// max |a - b| over the logical elements (z, h, r, c < C) of a tensor, relative to max |b|. With mag (the
// magnitude of the terms that cancel in b): when the exact b vanishes by cancellation (max |b| <= 1e-6 max mag,
// e.g. dS = 0 with a single key), the error is measured against max mag instead (an absolute tolerance scaled by
// the inputs), since b's own size is then double rounding noise.
static double cmp(const Problem &P, const fa_attn_strides &s, int64_t Hs, int64_t Rs, int64_t Cs,
                  const std::vector<double> &a, const std::vector<double> &b, const std::vector<double> *mag = nullptr) {
  double err = 0, mx = 0, mm = 0;
  for (int64_t z = 0; z < P.g.Z; z++)
    for (int64_t h = 0; h < Hs; h++)
      for (int64_t r = 0; r < Rs; r++)
        for (int64_t c = 0; c < Cs; c++) {
          const int64_t e = off(P.g, s, z, h, r, c);
          const double x = a[e], y = b[e];
          if (isinf(y) || isinf(x)) {
            if (x != y) err = INFINITY;
            continue;
          }
          if (x != x) { err = NAN; continue; }
          err = fmax(err, fabs(x - y));
          mx = fmax(mx, fabs(y));
          if (mag) mm = fmax(mm, (*mag)[e]);
        }
  if (mx <= 1e-6 * mm) mx = mm;
  return err / fmax(mx, 1e-6);
}

static int run_case(const Case &c) {
  Problem P;
  build(P, c);
  const fa_attn_geom &g = P.g;
  char line[512];
  int n = snprintf(line, sizeof line, "%-6s %-5s k%d %-12s Z=%lld H=%lld/%lld Lq=%lld Lk=%lld D=%lld bias%d mask%d p=%.1f det%d",
                   "", dname(c.dtype), c.kernel, c.name.c_str(), (long long)g.Z, (long long)g.H, (long long)g.Hkv,
                   (long long)g.Lq, (long long)g.Lk, (long long)g.D, c.bias, c.mask, c.dropout, c.det);
  (void)n;
  int rc = fa_cu_attention_forward(&g, P.o.d, (float *)P.lse.d, P.q.d, P.k.d, P.v.d, (const float *)P.bias.d, P.mask.d);
  CK(cudaDeviceSynchronize());
  int status = 0;  // 0 pass, 1 fail, 2 skip
  if (rc == FA_ERR_UNSUPPORTED) {
    printf("SKIP %s: %s\n", line + 7, fa_last_error());
    status = 2;
  } else if (rc) {
    printf("FAIL %s: forward rc %d: %s\n", line + 7, rc, fa_last_error());
    status = 1;
  }
  if (status == 0) {
    Ref R;
    reference(P, R);
    const std::vector<double> o = P.o.download(), lse = P.lse.download();
    const double eo = cmp(P, g.o, g.H, g.Lq, g.D, o, R.o), el = cmp(P, g.lse, g.H, g.Lq, 1, lse, R.lse);
    auto backward = [&]() {
      if (P.gb.n) P.gb.zero();
      int r = fa_cu_attention_backward(&g, P.gq.d, P.gk.d, P.gv.d, (float *)P.gb.d, P.go.d, P.q.d, P.k.d, P.v.d, P.o.d,
                                       (const float *)P.lse.d, (const float *)P.bias.d, P.mask.d);
      CK(cudaDeviceSynchronize());
      return r;
    };
    rc = backward();
    double eq = 0, ek = 0, ev = 0, eb = 0;
    bool det_ok = true;
    const double tol = c.dtype == FA_FLOAT32 ? 2e-4 : c.dtype == FA_FLOAT16 ? 5e-3 : 4e-2;
    const double tolg = c.dtype == FA_FLOAT32 ? 2e-4 : c.dtype == FA_FLOAT16 ? 1e-2 : 6e-2;
    if (rc == FA_ERR_UNSUPPORTED) {  // a forced family without this backward: the forward still counts
      const bool ok = eo <= tol && el <= tol;
      status = ok ? 3 : 1;
      printf("%s %s: out %.2e lse %.2e; backward SKIP: %s\n", ok ? "PASS" : "FAIL", line + 7, eo, el, fa_last_error());
    } else if (rc) {
      printf("FAIL %s: backward rc %d: %s\n", line + 7, rc, fa_last_error());
      status = 1;
    } else {
      eq = cmp(P, g.gq, g.H, g.Lq, g.D, P.gq.download(), R.gq, &R.mq);
      ek = cmp(P, g.gk, g.Hkv, g.Lk, g.D, P.gk.download(), R.gk, &R.mk);
      ev = cmp(P, g.gv, g.Hkv, g.Lk, g.D, P.gv.download(), R.gv);
      if (g.has_bias) eb = cmp(P, g.gbias, g.H, g.Lq, g.Lk, P.gb.download(), R.gb, &R.mb);
      if (c.det) {
        auto b1 = P.gq.bytes(), b2 = P.gk.bytes(), b3 = P.gv.bytes(), b4 = P.gb.bytes();
        rc = backward();
        det_ok = !rc && b1 == P.gq.bytes() && b2 == P.gk.bytes() && b3 == P.gv.bytes() && b4 == P.gb.bytes();
      }
      const bool ok = eo <= tol && el <= tol && eq <= tolg && ek <= tolg && ev <= tolg && eb <= tolg && det_ok;
      status = ok ? 0 : 1;
      printf("%s %s: out %.2e lse %.2e gq %.2e gk %.2e gv %.2e gbias %.2e%s\n", ok ? "PASS" : "FAIL", line + 7, eo, el,
             eq, ek, ev, eb, c.det ? (det_ok ? " det ok" : " DET MISMATCH") : "");
    }
  }
  for (Ten *t : {&P.q, &P.k, &P.v, &P.o, &P.lse, &P.bias, &P.mask, &P.go, &P.gq, &P.gk, &P.gv, &P.gb}) t->release();
  return status;
}

// the triangle shape of the speed goals: B=1, H=4, D=32, bias (H, N, N) shared by every row i, 50% key mask
static void timing(int64_t N, int kernel) {
  Case c{"bench", FA_BFLOAT16, kernel, 1, 1, {N, 0}, 4, 4, N, N, 32, 2, 2, 0.0, 0};
  Problem P;
  build(P, c);
  for (auto &x : P.mask.h) x = urand() < 0.5 ? 0.0 : 1.0;
  P.mask.upload();
  const fa_attn_geom &g = P.g;
  auto fwd = [&]() {
    return fa_cu_attention_forward(&g, P.o.d, (float *)P.lse.d, P.q.d, P.k.d, P.v.d, (const float *)P.bias.d, P.mask.d);
  };
  fa_attn_geom gbk = g;  // a forced family without a backward: the planner's backward after its forward
  {
    int r = fa_cu_attention_backward(&gbk, P.gq.d, P.gk.d, P.gv.d, (float *)P.gb.d, P.go.d, P.q.d, P.k.d, P.v.d, P.o.d,
                                     (const float *)P.lse.d, (const float *)P.bias.d, P.mask.d);
    if (r == FA_ERR_UNSUPPORTED) gbk.kernel = FA_ATTN_KERNEL_AUTO;
    CK(cudaDeviceSynchronize());
  }
  auto bwd = [&]() {
    return fa_cu_attention_backward(&gbk, P.gq.d, P.gk.d, P.gv.d, (float *)P.gb.d, P.go.d, P.q.d, P.k.d, P.v.d, P.o.d,
                                    (const float *)P.lse.d, (const float *)P.bias.d, P.mask.d);
  };
  if (fwd() || bwd()) {
    printf("time N=%lld kernel %d: %s\n", (long long)N, kernel, fa_last_error());
    CK(cudaDeviceSynchronize());
    return;
  }
  CK(cudaDeviceSynchronize());
  void *e0, *e1;
  fa_cuda_event_create(&e0);
  fa_cuda_event_create(&e1);
  const int reps = N <= 256 ? 20 : N <= 512 ? 10 : 3;
  float tf = 0, tb = 0;
  fa_cuda_event_record(e0, 0);
  for (int r = 0; r < reps; r++) fwd();
  fa_cuda_event_record(e1, 0);
  fa_cuda_event_synchronize(e1);
  fa_cuda_event_elapsed(&tf, e0, e1);
  fa_cuda_event_record(e0, 0);
  for (int r = 0; r < reps; r++) { fwd(); bwd(); }
  fa_cuda_event_record(e1, 0);
  fa_cuda_event_synchronize(e1);
  fa_cuda_event_elapsed(&tb, e0, e1);
  const double fl = 4.0 * 4 * (double)N * N * N * 32;
  printf("time bf16 triangle N=%lld H=4 D=32 kernel %d: fwd %.3f ms (%.1f TFLOP/s)  fwd+bwd %.3f ms (%.1f TFLOP/s)\n",
         (long long)N, kernel, tf / reps, fl / (tf / reps * 1e9), tb / reps, 3.5 * fl / (tb / reps * 1e9));
  fa_cuda_event_destroy(e0);
  fa_cuda_event_destroy(e1);
  for (Ten *t : {&P.q, &P.k, &P.v, &P.o, &P.lse, &P.bias, &P.mask, &P.go, &P.gq, &P.gk, &P.gv, &P.gb}) t->release();
}


// ---- N = 4096 triangle (bf16, B=1, H=4, D=32, bias (H, N, N)): every offset past 2^32 elements. Inputs come
// from a hash of their storage index (filled on the device, recomputed here), so nothing of size N^2*H*D lives
// on the host; out/lse/grad_q of a few rows, grad_k/grad_v of a key and one grad_bias element are checked.
static __host__ __device__ float hval(uint64_t e, uint32_t salt) {
  uint32_t x = (uint32_t)(e * 0x9E3779B97F4A7C15ULL >> 32) ^ (uint32_t)e ^ salt;
  x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
  return (float)(x >> 8) * (1.0f / 16777216.0f) * 2.f - 1.f;
}
__global__ void fill_bf16(__nv_bfloat16 *p, int64_t n, uint32_t salt) {
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x)
    p[e] = __float2bfloat16(hval((uint64_t)e, salt));
}
__global__ void fill_f32(float *p, int64_t n, uint32_t salt) {
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x)
    p[e] = hval((uint64_t)e, salt);
}
static double hb(uint64_t e, uint32_t salt) { return (double)__bfloat162float(__float2bfloat16(hval(e, salt))); }

static int big_case(int kernel) {
  const int64_t N = 4096, H = 4, D = 32, n = N * N * H * D;
  fa_attn_geom g;
  memset(&g, 0, sizeof g);
  g.nb = 1; g.bs[0] = N; g.Z = N; g.H = H; g.Hkv = H; g.Lq = N; g.Lk = N; g.D = D;
  g.dtype = FA_BFLOAT16; g.scale = 1.0 / sqrt((double)D); g.kernel = kernel; g.has_bias = 1;
  fa_attn_strides s = zs();
  s.b[0] = N * H * D; s.h = D; s.r = H * D; s.c = 1;
  g.q = g.k = g.v = g.o = g.go = g.gq = g.gk = g.gv = s;
  fa_attn_strides sl = zs();
  sl.b[0] = H * N; sl.h = N; sl.r = 1;
  g.lse = sl;
  fa_attn_strides sb = zs();
  sb.h = N * N; sb.r = N; sb.c = 1;
  g.bias = g.gbias = sb;
  void *buf[8];
  for (int t = 0; t < 8; t++) CK(cudaMalloc(&buf[t], (size_t)n * 2));
  float *lse, *bias, *gb;
  CK(cudaMalloc(&lse, (size_t)N * N * H * 4));
  CK(cudaMalloc(&bias, (size_t)H * N * N * 4));
  CK(cudaMalloc(&gb, (size_t)H * N * N * 4));
  CK(cudaMemset(gb, 0, (size_t)H * N * N * 4));
  enum { Q, K, V, O, GO, GQ, GK, GV };
  const uint32_t salt[5] = {11, 22, 33, 0, 55};
  for (int t : {Q, K, V, GO}) fill_bf16<<<4096, 256>>>((__nv_bfloat16 *)buf[t], n, salt[t == GO ? 4 : t]);
  fill_f32<<<4096, 256>>>(bias, H * N * N, 77);
  CK(cudaDeviceSynchronize());
  int rc = fa_cu_attention_forward(&g, buf[O], lse, buf[Q], buf[K], buf[V], bias, nullptr);
  if (!rc)
    rc = fa_cu_attention_backward(&g, buf[GQ], buf[GK], buf[GV], gb, buf[GO], buf[Q], buf[K], buf[V], buf[O], lse, bias,
                                  nullptr);
  CK(cudaDeviceSynchronize());
  int status = 0;
  if (rc) {
    printf("%s big N=4096 kernel %d: rc %d: %s\n", rc == FA_ERR_UNSUPPORTED ? "SKIP" : "FAIL", kernel, rc, fa_last_error());
    status = rc == FA_ERR_UNSUPPORTED ? 2 : 1;
  } else {
    auto at = [&](int64_t i, int64_t h, int64_t j, int64_t d) { return (uint64_t)(((i * N + j) * H + h) * D + d); };
    auto get16 = [&](int t, uint64_t e) {
      __nv_bfloat16 x;
      CK(cudaMemcpy(&x, (char *)buf[t] + e * 2, 2, cudaMemcpyDeviceToHost));
      return (double)__bfloat162float(x);
    };
    // row statistics of (i, h, j): P over keys, Dl
    auto row = [&](int64_t i, int64_t h, int64_t j, std::vector<double> &P, std::vector<double> &dP, double &lse_r,
                   double &Dl) {
      std::vector<double> sc(N);
      double m = -INFINITY;
      for (int64_t kk = 0; kk < N; kk++) {
        double d = 0;
        for (int64_t c = 0; c < D; c++) d += hb(at(i, h, j, c), salt[Q]) * hb(at(i, h, kk, c), salt[K]);
        sc[kk] = d * g.scale + (double)hval((uint64_t)((h * N + j) * N + kk), 77);
        m = fmax(m, sc[kk]);
      }
      double l = 0;
      for (int64_t kk = 0; kk < N; kk++) l += exp(sc[kk] - m);
      lse_r = m + log(l);
      P.resize(N); dP.resize(N);
      Dl = 0;
      for (int64_t kk = 0; kk < N; kk++) {
        P[kk] = exp(sc[kk] - lse_r);
        double x = 0;
        for (int64_t c = 0; c < D; c++) x += hb(at(i, h, j, c), salt[4]) * hb(at(i, h, kk, c), salt[V]);
        dP[kk] = x;
        Dl += P[kk] * x;
      }
    };
    double eo = 0, el = 0, eq = 0, mo = 0, mq = 0;
    const int64_t rows[3][3] = {{0, 0, 0}, {N / 2 + 1, 2, 17}, {N - 1, H - 1, N - 1}};
    for (auto &r3 : rows) {
      const int64_t i = r3[0], h = r3[1], j = r3[2];
      std::vector<double> P, dP;
      double L, Dl;
      row(i, h, j, P, dP, L, Dl);
      float lg;
      CK(cudaMemcpy(&lg, lse + (i * H + h) * N + j, 4, cudaMemcpyDeviceToHost));
      el = fmax(el, fabs(lg - L));
      for (int64_t c = 0; c < D; c++) {
        double o = 0, gq = 0;
        for (int64_t kk = 0; kk < N; kk++) {
          o += P[kk] * hb(at(i, h, kk, c), salt[V]);
          gq += g.scale * P[kk] * (dP[kk] - Dl) * hb(at(i, h, kk, c), salt[K]);
        }
        eo = fmax(eo, fabs(get16(O, at(i, h, j, c)) - o)); mo = fmax(mo, fabs(o));
        eq = fmax(eq, fabs(get16(GQ, at(i, h, j, c)) - gq)); mq = fmax(mq, fabs(gq));
      }
    }
    // grad_v and grad_k of key (i, h, kk), and grad_bias (h, j, kk): sums over rows j / over batch rows i
    const int64_t bi = N - 1, bh = H - 1, bk = N - 2, bj = 5;
    std::vector<double> gv(D, 0), gk(D, 0);
    double gbias = 0;
    for (int64_t j = 0; j < N; j++) {
      std::vector<double> P, dP;
      double L, Dl;
      row(bi, bh, j, P, dP, L, Dl);
      for (int64_t c = 0; c < D; c++) {
        gv[c] += P[bk] * hb(at(bi, bh, j, c), salt[4]);
        gk[c] += g.scale * P[bk] * (dP[bk] - Dl) * hb(at(bi, bh, j, c), salt[Q]);
      }
    }
    for (int64_t i = 0; i < N; i += 1) {
      std::vector<double> P, dP;
      double L, Dl;
      row(i, bh, bj, P, dP, L, Dl);
      gbias += P[bk] * (dP[bk] - Dl);
    }
    double ek = 0, ev = 0, mk = 0, mv = 0;
    for (int64_t c = 0; c < D; c++) {
      ek = fmax(ek, fabs(get16(GK, at(bi, bh, bk, c)) - gk[c])); mk = fmax(mk, fabs(gk[c]));
      ev = fmax(ev, fabs(get16(GV, at(bi, bh, bk, c)) - gv[c])); mv = fmax(mv, fabs(gv[c]));
    }
    float gbg;
    CK(cudaMemcpy(&gbg, gb + (bh * N + bj) * N + bk, 4, cudaMemcpyDeviceToHost));
    const double eb = fabs(gbg - gbias) / fmax(fabs(gbias), 1e-3);
    eo /= fmax(mo, 1e-6); eq /= fmax(mq, 1e-6); ek /= fmax(mk, 1e-6); ev /= fmax(mv, 1e-6);
    const bool ok = eo < 4e-2 && el < 4e-2 && eq < 6e-2 && ek < 6e-2 && ev < 6e-2 && eb < 6e-2;
    printf("%s big   bf16  k%d triangle N=4096 H=4 D=32 bias: out %.2e lse %.2e gq %.2e gk %.2e gv %.2e gbias %.2e\n",
           ok ? "PASS" : "FAIL", kernel, eo, el, eq, ek, ev, eb);
    status = ok ? 0 : 1;
  }
  for (int t = 0; t < 8; t++) cudaFree(buf[t]);
  cudaFree(lse); cudaFree(bias); cudaFree(gb);
  return status;
}

int main(int argc, char **argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);  // a line per case even when a case crashes the process
  const bool quick = argc > 1 && !strcmp(argv[1], "quick");
  std::vector<Case> base = {
      // name, dtype, kernel, tri, nb, bs, H, Hkv, Lq, Lk, D, bias, mask, dropout, det
      {"tri", 0, 0, 1, 1, {17, 0}, 2, 2, 17, 17, 32, 2, 2, 0.0, 0},
      {"tri-det", 0, 0, 1, 1, {65, 0}, 3, 3, 65, 65, 16, 2, 2, 0.0, 1},
      {"tri-add", 0, 0, 1, 1, {130, 0}, 2, 2, 130, 130, 64, 2, 3, 0.0, 0},
      {"gqa", 0, 0, 0, 1, {2, 0}, 6, 2, 65, 17, 64, 1, 1, 0.0, 1},
      {"nobias", 0, 0, 0, 2, {2, 3}, 2, 2, 130, 130, 128, 0, 0, 0.0, 0},
      {"dropout", 0, 0, 0, 1, {2, 0}, 2, 1, 65, 65, 32, 4, 1, 0.2, 1},
      {"n1", 0, 0, 0, 1, {3, 0}, 2, 2, 1, 1, 16, 1, 2, 0.0, 0},
      {"rowbias", 0, 0, 0, 1, {2, 0}, 2, 2, 1, 130, 128, 3, 0, 0.0, 1},
      {"rowbias2", 0, 0, 0, 1, {3, 0}, 4, 2, 33, 70, 128, 3, 1, 0.0, 0},
      {"d40", 0, 0, 0, 1, {2, 0}, 2, 2, 33, 70, 40, 1, 1, 0.0, 0},
      {"d200", 0, 0, 0, 1, {2, 0}, 2, 2, 20, 37, 200, 2, 2, 0.1, 0},
      {"lk0", 0, 0, 0, 1, {2, 0}, 2, 2, 5, 0, 32, 0, 0, 0.0, 0},
      {"lq0", 0, 0, 0, 1, {2, 0}, 2, 2, 0, 9, 32, 1, 0, 0.0, 0},
  };
  int fails = 0, skips = 0, passes = 0, fwd_only = 0;
  const int dtypes[3] = {FA_FLOAT32, FA_BFLOAT16, FA_FLOAT16};
  const int kernels[4] = {FA_ATTN_KERNEL_AUTO, FA_ATTN_KERNEL_SIMT, FA_ATTN_KERNEL_MMA, FA_ATTN_KERNEL_WGMMA};
  for (int dt : dtypes)
    for (int kn : kernels)
      for (Case c : base) {
        c.dtype = dt;
        c.kernel = kn;
        const int st = run_case(c);
        fails += st == 1;
        skips += st == 2;
        passes += st == 0 || st == 3;
        fwd_only += st == 3;
      }
  if (!quick)
    for (int kn : {FA_ATTN_KERNEL_AUTO, FA_ATTN_KERNEL_SIMT}) {
      const int st = big_case(kn);
      fails += st == 1;
      skips += st == 2;
      passes += st == 0;
    }
  printf("%d passed (%d of them forward only), %d failed, %d skipped (unsupported by a forced family)\n", passes,
         fwd_only, fails, skips);
  if (!quick)
    for (int64_t N : {256, 512, 1024})
      for (int kn : {FA_ATTN_KERNEL_AUTO, FA_ATTN_KERNEL_SIMT, FA_ATTN_KERNEL_MMA}) timing(N, kn);
  return fails ? 1 : 0;
}
