"""The peers of fa.triangle_attention, timed on the shapes and input distributions of bench/triangle_attention.lua.

  python3 bench/peers/triangle_torch.py --device cuda --ns 256,512,1024,2048 --dtypes bfloat16,float32
  python3 bench/peers/triangle_torch.py --device cpu --threads 2 --ns 64,96,128 --dtypes float32

Implementations (--impls):
  sdpa     torch's scaled_dot_product_attention with the bias and the mask combined into one float attn_mask
           (bias broadcast over the row i plus -1e9 where a key is masked), as a PyTorch user writes it: q/k/v
           are (B*N, H, N, D) views of the (B, N, N, H, D) projections; the mask is materialised
           (B*N, H, N, N). torch 1.x (no public SDPA) uses its private F._scaled_dot_product_attention.
  eager    OpenFold's attention: softmax(q k^T * s + bias + 1e9 * (mask - 1)) v, in the input dtype.
  trifast  TriFast's triangle_attention(q, k, v, bias, mask) (mask True = masked), where importable; only
           for --trifast-dtypes (default bfloat16: its float32 runs IEEE dots and autotunes for minutes).
Inputs (bench/triangle_attention.lua draws the same distributions, not the same numbers): the projections
(B, N, N, H, D), bias (B, H, N, N) and the output gradient ~ N(0, 1); the mask valid with probability 1/2.
fwd = forward under no_grad; fwdbwd = forward + torch.autograd.grad of q, k, v and the bias for a fixed
random output gradient.

Prints one JSON object per line: {"impl": "info", ...}, {"impl": "gemm", "ms", "tflops"} (CUDA: a bf16
--gemm-size cube) and per case {"impl", "n", "dtype", "fwd_ms", "fwdbwd_ms", "extra_mb_fwd",
"extra_mb_fwdbwd"}, or "error_fwd" / "error_fwdbwd" ("OOM" or the first line of the error).
CUDA: CUDA events around each call, each call after a 256 MB buffer write (flushes the L2, keeps the GPU busy
while the host queues the call), 3 warm-up calls, the lower median of --reps calls rotating over --sets input
sets (bench/lib.lua's gpuTimer). Extra memory: peak allocation during the calls above what was allocated
before them (inputs and the output gradient), outputs and gradients included. CPU: wall clock, the smallest of
--rounds lower medians.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

B, H, D = 1, 4, 32
INF = 1e9


def sdpa_fn():
    if hasattr(F, "scaled_dot_product_attention"):
        return lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    if hasattr(F, "_scaled_dot_product_attention"):  # torch 1.13: (out, weights)
        return lambda q, k, v, m: F._scaled_dot_product_attention(q, k, v, m, 0.0, False, False)[0]
    return None


SDPA = sdpa_fn()


def trifast_fn():
    try:
        from trifast import triangle_attention
        return triangle_attention, None
    except Exception as e:  # noqa: BLE001
        return None, "unavailable (%s: %s)" % (type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "")


TRIFAST, TRIFAST_WHY = trifast_fn()


def make_inputs(n, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    qp, kp, vp = (torch.randn(B, n, n, H, D, generator=g) for _ in range(3))
    bias = torch.randn(B, H, n, n, generator=g)
    valid = torch.rand(B, n, n, generator=g) < 0.5
    go = torch.randn(B, n, n, H, D, generator=g)
    dev = torch.device(device)
    return {"qp": qp.to(dev, dtype), "kp": kp.to(dev, dtype), "vp": vp.to(dev, dtype),
            "bias": bias.to(dev, dtype), "valid": valid.to(dev), "go": go.to(dev, dtype)}


# Each implementation maps the (B, N, N, H, D) projections, the bias and the valid mask to the output in the
# (B, N, N, H, D) layout (a view where the implementation's own layout differs).
def run_sdpa(qp, kp, vp, bias, valid):
    n = qp.shape[1]
    q4, k4, v4 = (x.view(B * n, n, H, D).transpose(1, 2) for x in (qp, kp, vp))       # (B*N, H, N, D)
    m = bias.unsqueeze(1) + ((valid.to(bias.dtype) - 1) * INF).view(B, n, 1, 1, n)       # (B, N, H, N, N)
    o = SDPA(q4, k4, v4, m.view(B * n, H, n, n))                                       # (B*N, H, N, D)
    return o.view(B, n, H, n, D).transpose(2, 3)


def run_eager(qp, kp, vp, bias, valid):
    # OpenFold primitives.Attention: q/k/v [*, I, H, J, D], biases [*, 1, H, J, K] and [*, I, 1, 1, K]
    q, k, v = (x.transpose(-2, -3) for x in (qp, kp, vp))
    a = torch.matmul(q * (D ** -0.5), k.transpose(-1, -2))
    a = a + bias.unsqueeze(1) + (INF * (valid.to(bias.dtype) - 1)).unsqueeze(-2).unsqueeze(-2)
    a = torch.softmax(a, dim=-1)
    return torch.matmul(a, v).transpose(-2, -3)


def run_trifast(qp, kp, vp, bias, valid):
    q, k, v = (x.permute(0, 3, 1, 2, 4) for x in (qp, kp, vp))                          # (B, H, N, N, D) views
    o = TRIFAST(q, k, v, bias, ~valid)
    return o.permute(0, 2, 3, 1, 4)


IMPLS = {"sdpa": run_sdpa, "eager": run_eager, "trifast": run_trifast}


def available(name, dtype_name, a):
    if name == "trifast" and dtype_name not in a.trifast_dtypes.split(","):
        return "skipped (--trifast-dtypes %s)" % a.trifast_dtypes
    if name == "sdpa" and SDPA is None:
        return "unavailable (torch %s has no scaled_dot_product_attention)" % torch.__version__
    if name == "trifast" and TRIFAST is None:
        return TRIFAST_WHY
    return None


def lower_median(t):
    t = sorted(t)
    return t[(len(t) + 1) // 2 - 1]


def time_cuda(fn, nsets, reps, flush, warmup=3):
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(warmup):
        fn(i % nsets)
    for r in range(reps):
        flush.fill_(r)
        start[r].record()
        fn(r % nsets)
        end[r].record()
    torch.cuda.synchronize()
    return lower_median([s.elapsed_time(e) for s, e in zip(start, end)])


def time_cpu(fn, nsets, reps, warmup=1):
    for i in range(warmup):
        fn(i % nsets)
    t = []
    for r in range(reps):
        t0 = time.perf_counter()
        fn(r % nsets)
        t.append((time.perf_counter() - t0) * 1e3)
    return lower_median(t)


def describe(e):
    s = str(e)
    if isinstance(e, MemoryError) or "out of memory" in s.lower():
        return "OOM"
    first = s.splitlines()[0] if s else ""
    return ("%s: %s" % (type(e).__name__, first))[:200].replace('"', "'").replace("\\", "/")


def gemm(n, reps, flush):
    a, b = (torch.randn(n, n, device="cuda").to(torch.bfloat16) for _ in range(2))
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_cuda(lambda _: torch.matmul(a, b, out=c), 1, reps, flush)
    return {"impl": "gemm", "n": n, "dtype": "bfloat16", "ms": ms, "tflops": 2 * n ** 3 / (ms * 1e-3) / 1e12}


def bench_case(name, n, dtype_name, sets, a, flush):
    fn = IMPLS[name]
    cuda = a.device == "cuda"
    rec = {"impl": name, "n": n, "dtype": dtype_name}
    leaves = []
    for s in sets:
        leaves.append([s[k].detach().clone().requires_grad_(True) for k in ("qp", "kp", "vp", "bias")])

    def fwd(i):
        s = sets[i]
        with torch.no_grad():
            return fn(s["qp"], s["kp"], s["vp"], s["bias"], s["valid"])

    def fwdbwd(i):
        qp, kp, vp, bias = leaves[i]
        o = fn(qp, kp, vp, bias, sets[i]["valid"])
        return torch.autograd.grad(o, (qp, kp, vp, bias), sets[i]["go"])

    for phase, f in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        try:
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                rec[phase + "_ms"] = time_cuda(f, len(sets), a.reps, flush)
                rec["extra_mb_" + phase] = (torch.cuda.max_memory_allocated() - base) / 1e6
            else:
                rec[phase + "_ms"] = min(time_cpu(f, len(sets), a.reps) for _ in range(a.rounds))
        except Exception as e:  # noqa: BLE001 (OOM and the implementation's own refusals, reported per case)
            rec["error_" + phase] = describe(e)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
    del leaves
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--ns", default="256,512,1024,2048")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--impls", default="sdpa,eager,trifast")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--sets", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, help="CPU: medians taken, the smallest reported")
    ap.add_argument("--trifast-dtypes", default="bfloat16")
    ap.add_argument("--gemm-size", type=int, default=8192, help="bf16 GEMM cube (CUDA; 0: skip)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    impls = [x for x in a.impls.split(",") if x]
    for x in impls:
        if x not in IMPLS:
            ap.error("--impls: %r is not one of %s" % (x, ",".join(IMPLS)))
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch finds no CUDA device")
    info = {"impl": "info", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu"}
    for x in impls:
        info[x] = (available(x, None, a) or "ok") if x != "trifast" else (TRIFAST_WHY or "ok")
    print(json.dumps(info), flush=True)
    flush = None
    if a.device == "cuda":
        flush = torch.empty(256 * 1024 * 1024 // 4, device="cuda")
        if a.gemm_size:
            print(json.dumps(gemm(a.gemm_size, a.reps, flush)), flush=True)
    for n in (int(x) for x in a.ns.split(",")):
        for dtype_name in a.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            try:
                sets = [make_inputs(n, dtype, a.device, 1000 * k + n) for k in range(1, a.sets + 1)]
            except Exception as e:  # noqa: BLE001
                for x in impls:
                    print(json.dumps({"impl": x, "n": n, "dtype": dtype_name, "error_fwd": describe(e),
                                      "error_fwdbwd": describe(e)}), flush=True)
                continue
            for x in impls:
                why = available(x, dtype_name, a)
                if why:
                    rec = {"impl": x, "n": n, "dtype": dtype_name, "error_fwd": why, "error_fwdbwd": why}
                else:
                    rec = bench_case(x, n, dtype_name, sets, a, flush)
                    fl = 4 * B * H * n ** 3 * D
                    if "fwd_ms" in rec:
                        rec["fwd_tflops"] = fl / (rec["fwd_ms"] * 1e-3) / 1e12
                    if "fwdbwd_ms" in rec:
                        rec["fwdbwd_tflops"] = 3.5 * fl / (rec["fwdbwd_ms"] * 1e-3) / 1e12
                print(json.dumps(rec), flush=True)
            del sets
            if a.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
