"""The PyTorch grid_sample reference of multi-scale deformable attention (Deformable DETR's
ms_deform_attn_core_pytorch), timed on the same shapes and input distributions as bench/msda.lua.

  python3 bench/peers/msda_torch.py --device cuda --configs enc,dec,tri --dtypes float32,bfloat16
  python3 bench/peers/msda_torch.py --device cpu --threads 2 --configs cpu

Prints one JSON object per line: {"impl", "config", "dtype", "locs", "fwd_ms", "fwdbwd_ms", "extra_mb"...}.
CUDA: CUDA events, the L2 flushed (256 MB buffer zeroed) before every call, warm-up, median of --reps.
CPU: wall clock, median. Also reports whether the Triton/CUDA peers (msda-triton, DCNv4) can be imported.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "spec", "fixtures"))
from msda_ref import ms_deform_attn_core_pytorch  # noqa: E402

CONFIGS = {
    # name: (N, Lq or None (= S), M, D, P, levels)
    "enc": (2, None, 8, 32, 4, [(100, 150), (50, 75), (25, 38), (13, 19)]),
    "dec": (2, 300, 8, 32, 4, [(100, 150), (50, 75), (25, 38), (13, 19)]),
    "tri": (4, 10000, 8, 32, 4, [(64, 64), (32, 32), (16, 16), (8, 8)]),
    "cpu": (1, None, 8, 32, 4, [(50, 75), (25, 38), (13, 19), (7, 10)]),
}


def make_inputs(cfg, dtype, device, locs, seed=0):
    """the distributions of bench/msda.lua: value, grad ~ N(0,1); weights softmax(N(0,1)) over L*P;
    locations uniform in [0,1] ('uniform') or reference point + the MSDeformAttn initial radial offsets
    (p+1 px in head m's direction) + N(0, 0.5 px) ('local'); encoder queries are the pixels of every level
    in order, decoder/tri queries random reference points."""
    N, Lq, M, D, P, levels = CONFIGS[cfg]
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in levels)
    Lq = Lq or S
    L = len(levels)
    value = torch.randn(N, S, M, D, generator=g)
    attn = torch.randn(N, Lq, M, L * P, generator=g).softmax(-1).view(N, Lq, M, L, P)
    if locs == "uniform":
        loc = torch.rand(N, Lq, M, L, P, 2, generator=g)
    else:
        if Lq == S:
            refs = []
            for h, w in levels:
                ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
                refs.append(torch.stack([xs.reshape(-1) / w, ys.reshape(-1) / h], -1))
            ref = torch.cat(refs, 0).unsqueeze(0).expand(N, S, 2)
        else:
            ref = torch.rand(N, Lq, 2, generator=g)
        theta = torch.arange(M, dtype=torch.float32) * (2.0 * math.pi / M)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]                          # (M, 2)
        off = grid.view(M, 1, 1, 2) * torch.arange(1, P + 1, dtype=torch.float32).view(1, 1, P, 1)
        off = off.expand(M, L, P, 2) + 0.5 * torch.randn(N, Lq, M, L, P, 2, generator=g)
        wh = torch.tensor([[w, h] for h, w in levels], dtype=torch.float32).view(1, 1, 1, L, 1, 2)
        loc = ref.view(N, Lq, 1, 1, 1, 2) + off / wh
    grad = torch.randn(N, Lq, M * D, generator=g)
    dev = torch.device(device)
    return (value.to(dev, dtype), levels, loc.to(dev), attn.to(dev), grad.to(dev, dtype))


def peers_available():
    res = {}
    for name in ("msda_triton", "DCNv4"):
        try:
            __import__(name)
            res[name] = True
        except Exception as e:  # noqa: BLE001
            res[name] = "unavailable (%s)" % type(e).__name__
    return res


def time_cuda(fn, reps, flush):
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for _ in range(3):
        fn()
    for i in range(reps):
        flush.zero_()
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    t = sorted(s.elapsed_time(e) for s, e in zip(start, end))
    return t[len(t) // 2]


def time_cpu(fn, reps):
    fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append((time.perf_counter() - t0) * 1e3)
    t.sort()
    return t[len(t) // 2]


def time_msda_triton(cfg, dtype_name, locs, value, levels, loc, attn, grad, reps, flush):
    """msda-triton (rziga/msda-triton, where importable) on the same inputs: padding 'zeros', align_corners=False
    (Deformable DETR's grid_sample semantics, as ours). It takes float16/float32/float64 only: a bfloat16 row is
    timed in float16 (same bytes). Also its forward's largest difference from the float64 reference."""
    rec = {"impl": "msda-triton", "config": cfg, "dtype": dtype_name, "locs": locs}
    try:
        from msda_triton.frontend import triton_multiscale_deformable_attention as msda
    except Exception as e:  # noqa: BLE001
        rec["error_fwd"] = rec["error_fwdbwd"] = "unavailable (%s)" % type(e).__name__
        return rec
    dt = torch.float16 if value.dtype == torch.bfloat16 else value.dtype
    if dt != value.dtype:
        rec["timed_dtype"] = "float16"
    shapes = torch.tensor(levels, dtype=torch.int64, device=value.device)
    val, lo, at, gr = value.to(dt), loc.to(dt), attn.to(dt), grad.to(dt)
    try:
        def fwd():
            with torch.no_grad():
                return msda(val, shapes, lo, at, "zeros", False)

        v = val.clone().requires_grad_(True)
        l = lo.clone().requires_grad_(True)
        w = at.clone().requires_grad_(True)

        def fwdbwd():
            out = msda(v, shapes, l, w, "zeros", False)
            torch.autograd.grad(out, (v, l, w), gr.view(out.shape))

        ref = ms_deform_attn_core_pytorch(value.double(), levels, loc.double(), attn.double())
        rec["fwd_max_abs_err"] = (fwd().double().reshape(ref.shape) - ref).abs().max().item()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        rec["fwd_ms"] = time_cuda(fwd, reps, flush)
        rec["extra_mb_fwd"] = (torch.cuda.max_memory_allocated() - base) / 1e6
        torch.cuda.reset_peak_memory_stats()
        rec["fwdbwd_ms"] = time_cuda(fwdbwd, reps, flush)
        rec["extra_mb_fwdbwd"] = (torch.cuda.max_memory_allocated() - base) / 1e6
    except Exception as e:  # noqa: BLE001
        msg = "error: %s %s" % (type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "")
        for phase in ("fwd", "fwdbwd"):
            if phase + "_ms" not in rec:
                rec["error_" + phase] = msg
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--configs", default="enc,dec,tri")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--locs", default="uniform,local")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--triton", type=int, default=1, help="also time msda-triton where importable (cuda)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(json.dumps({"impl": "info", "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "peers": peers_available(),
                      "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu"}), flush=True)
    flush = torch.empty(256 * 1024 * 1024 // 4, device="cuda") if a.device == "cuda" else None
    for cfg in a.configs.split(","):
        for dtype_name in a.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for locs in a.locs.split(","):
                value, levels, loc, attn, grad = make_inputs(cfg, dtype, a.device, locs)
                # grid_sample needs one dtype: the 16-bit run casts locations and weights to it
                locd, attnd = loc.to(dtype), attn.to(dtype)
                v = value.clone().requires_grad_(True)
                l = locd.clone().requires_grad_(True)
                w = attnd.clone().requires_grad_(True)

                def fwd():
                    with torch.no_grad():
                        return ms_deform_attn_core_pytorch(value, levels, locd, attnd)

                def fwdbwd():
                    out = ms_deform_attn_core_pytorch(v, levels, l, w)
                    torch.autograd.grad(out, (v, l, w), grad)

                rec = {"impl": "torch-grid_sample", "config": cfg, "dtype": dtype_name, "locs": locs}
                if a.device == "cuda":
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    rec["fwd_ms"] = time_cuda(fwd, a.reps, flush)
                    rec["extra_mb_fwd"] = (torch.cuda.max_memory_allocated() - base) / 1e6
                    torch.cuda.reset_peak_memory_stats()
                    rec["fwdbwd_ms"] = time_cuda(fwdbwd, a.reps, flush)
                    rec["extra_mb_fwdbwd"] = (torch.cuda.max_memory_allocated() - base) / 1e6
                else:
                    rec["fwd_ms"] = time_cpu(fwd, a.reps)
                    rec["fwdbwd_ms"] = time_cpu(fwdbwd, a.reps)
                print(json.dumps(rec), flush=True)
                if a.device == "cuda" and a.triton:
                    print(json.dumps(time_msda_triton(cfg, dtype_name, locs, value, levels, loc, attn, grad,
                                                      a.reps, flush)), flush=True)
                del value, loc, attn, grad, v, l, w, locd, attnd


if __name__ == "__main__":
    main()
