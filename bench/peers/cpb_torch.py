"""PyTorch peer of fa.cpb (bench/cpb.lua): lucidrains' CPB MLP (deformable-attention 0.0.20) by plain torch ops,
forward and forward+backward (autograd to the key positions and the six weights).

  python3 bench/peers/cpb_torch.py P N M C O [--device cpu|cuda] [--dtype float32|tf32|bfloat16] [--threads T]
                                   [--reps R] [--chunk Q]
  -> prints one line 'fwd_ms fwdbwd_ms chunk' (medians; 'OOM OOM chunk' when it does not fit)

The reference computes the whole (P, N, M, C) activations at once; here the queries go in chunks of Q (default:
the most whose activations fit in a quarter of the GPU's free memory, all of them on the CPU), the backward
summing each chunk's gradients. bfloat16: torch.autocast (the linears in bfloat16, the rest float32), the
inputs float32 as in a mixed-precision model; tf32: float32 with torch.backends.cuda.matmul.allow_tf32.
GPU timing as bench/lib.lua's gpuTimer: 3 warm-up calls, then each call between two CUDA events after a 256 MiB
write that evicts the L2; the lower median. CPU: wall clock, the lower median.
"""
import argparse
import contextlib
import time

import torch


def cpb(q, k, w1, b1, w2, b2, w3, b3):
    pos = q[None, :, None, :] - k[:, None, :, :]
    x = torch.sign(pos) * torch.log(pos.abs() + 1)
    x = torch.relu(torch.nn.functional.linear(x, w1, b1))
    x = torch.relu(torch.nn.functional.linear(x, w2, b2))
    x = torch.nn.functional.linear(x, w3, b3)
    return x.permute(0, 3, 1, 2)  # (P, O, N, M), as '(b g) i j o -> b (g o) i j'


def main():
    ap = argparse.ArgumentParser()
    for n in ("P", "N", "M", "C", "O"):
        ap.add_argument(n, type=int)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "tf32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=0)
    a = ap.parse_args()
    P, N, M, C, O, dev = a.P, a.N, a.M, a.C, a.O, a.device
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = a.dtype == "tf32"
        torch.backends.cudnn.allow_tf32 = a.dtype == "tf32"
    torch.manual_seed(0)
    f32 = dict(device=dev, dtype=torch.float32)
    q = torch.rand(N, 2, **f32) * 2 - 1
    k = (torch.rand(P, M, 2, **f32) * 2.8 - 1.4).requires_grad_(True)
    ws = [torch.randn(C, 2, **f32) * 0.7, torch.randn(C, **f32) * 0.7, torch.randn(C, C, **f32) / C ** 0.5,
          torch.randn(C, **f32) * 0.1, torch.randn(O, C, **f32) / C ** 0.5, torch.randn(O, **f32) * 0.1]
    ws = [w.requires_grad_(True) for w in ws]
    g = torch.randn(P, O, N, M, **f32)
    chunk = a.chunk
    if chunk <= 0:
        if dev == "cuda":
            free = torch.cuda.mem_get_info()[0]
            per_query = P * M * C * 4 * 8  # ~8 float32 (P, M, C) activations per query kept for the backward
            chunk = max(1, min(N, int(free / 4 // per_query)))
        else:
            chunk = N
    amp = (lambda: torch.autocast(device_type=dev, dtype=torch.bfloat16)) if a.dtype == "bfloat16" else \
        contextlib.nullcontext

    def fwd():
        with torch.no_grad(), amp():
            for i in range(0, N, chunk):
                cpb(q[i:i + chunk], k, *ws)

    def fwdbwd():
        gs = None
        for i in range(0, N, chunk):
            with amp():
                out = cpb(q[i:i + chunk], k, *ws)
            r = torch.autograd.grad(out, [k] + ws, g[:, :, i:i + chunk].to(out.dtype))
            gs = r if gs is None else [x + y for x, y in zip(gs, r)]
        return gs

    def med(ts):
        ts = sorted(ts)
        return ts[(len(ts) - 1) // 2]

    if dev == "cuda":
        flush = torch.empty(64 * 1024 * 1024, device="cuda")

        def timed(f):
            for _ in range(3):
                f()
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(a.reps)]
            for r, (e0, e1) in enumerate(ev):
                flush.fill_(r)
                e0.record()
                f()
                e1.record()
            torch.cuda.synchronize()
            return med([e0.elapsed_time(e1) for e0, e1 in ev])
    else:
        def timed(f):
            f()
            ts = []
            for _ in range(a.reps):
                t = time.perf_counter()
                f()
                ts.append((time.perf_counter() - t) * 1e3)
            return med(ts)

    res = []
    for f in (fwd, fwdbwd):
        try:
            res.append("%.3f" % timed(f))
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if "out of memory" not in str(e):
                raise
            res.append("OOM")
            if dev == "cuda":
                torch.cuda.empty_cache()
    print(res[0], res[1], chunk)


if __name__ == "__main__":
    main()
