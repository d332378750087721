"""PyTorch CPU timings for the shapes of bench/cpu.lua (same names, same order).

    /usr/bin/python3 bench/peers/torch_cpu.py [--threads N] [--runs N] [--rounds R] [--only SUBSTRING] [--tsv FILE]

Wall-clock milliseconds, as bench/cpu.lua: the median of N runs after 2 warm-up runs, taken R times (default
3), the smallest median reported. Forward (under no_grad) and forward + backward
(autograd, every input that fastattn differentiates requires grad; .grad reset to None each run).
--tsv also writes name \\t shape \\t fwd_ms \\t fwdbwd_ms for `bin/fastattn bench/cpu.lua --compare FILE`.
"""
import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--runs", type=int, default=11)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--only", default=None)
ap.add_argument("--tsv", default=None)
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)


def median_time(fn, runs):
    fn()
    fn()
    ts = []
    start = time.perf_counter()
    for i in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        if time.perf_counter() - start > 20 and i >= 2:
            break
    ts.sort()
    return ts[(len(ts) - 1) // 2]


cases = []


def case(name, shape):
    def deco(setup):
        cases.append((name, shape, setup))
        return setup
    return deco


def conv_case(name, shape, N, C, H, W, O, k, stride, pad, groups):
    @case(name, shape)
    def setup():
        x = torch.randn(N, C, H, W, requires_grad=True)
        w = (torch.randn(O, C // groups, k, k) / math.sqrt(C // groups * k * k)).requires_grad_()
        b = torch.randn(O, requires_grad=True)
        y0 = F.conv2d(x, w, b, stride=stride, padding=pad, groups=groups)
        gout = torch.randn_like(y0)

        def fwd():
            with torch.no_grad():
                F.conv2d(x, w, b, stride=stride, padding=pad, groups=groups)

        def both():
            x.grad = w.grad = b.grad = None
            F.conv2d(x, w, b, stride=stride, padding=pad, groups=groups).backward(gout)
        return fwd, both


conv_case("conv2d 3x3 pad 1", "1x512x64x64 -> 512", 1, 512, 64, 64, 512, 3, 1, 1, 1)
conv_case("conv2d 3x3 pad 1", "1x128x64x64 -> 128", 1, 128, 64, 64, 128, 3, 1, 1, 1)
conv_case("conv2d depthwise 6x6 s4 p1", "1x512x64x64, groups 512", 1, 512, 64, 64, 512, 6, 4, 1, 512)


@case("linear", "4096x512 -> 512")
def _():
    x = torch.randn(4096, 512, requires_grad=True)
    w = (torch.randn(512, 512) / math.sqrt(512)).requires_grad_()
    b = torch.randn(512, requires_grad=True)
    gout = torch.randn(4096, 512)

    def fwd():
        with torch.no_grad():
            F.linear(x, w, b)

    def both():
        x.grad = w.grad = b.grad = None
        F.linear(x, w, b).backward(gout)
    return fwd, both


@case("layer norm", "4096x512, over 512")
def _():
    x = torch.randn(4096, 512, requires_grad=True)
    w = torch.randn(512, requires_grad=True)
    b = torch.randn(512, requires_grad=True)
    gout = torch.randn(4096, 512)

    def fwd():
        with torch.no_grad():
            F.layer_norm(x, (512,), w, b, 1e-5)

    def both():
        x.grad = w.grad = b.grad = None
        F.layer_norm(x, (512,), w, b, 1e-5).backward(gout)
    return fwd, both


@case("softmax", "8x4096x256, last dim")
def _():
    x = torch.randn(8, 4096, 256, requires_grad=True)
    gout = torch.randn(8, 4096, 256)

    def fwd():
        with torch.no_grad():
            torch.softmax(x, -1)

    def both():
        x.grad = None
        torch.softmax(x, -1).backward(gout)
    return fwd, both


@case("grid_sample bilinear", "1x512x64x64, grid 16x16")
def _():
    inp = torch.randn(1, 512, 64, 64, requires_grad=True)
    grid = (torch.rand(1, 16, 16, 2) * 2.2 - 1.1).requires_grad_()
    gout = torch.randn(1, 512, 16, 16)

    def fwd():
        with torch.no_grad():
            F.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def both():
        inp.grad = grid.grad = None
        F.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=False).backward(gout)
    return fwd, both


print(f"PyTorch {torch.__version__} CPU benchmark: {torch.get_num_threads()} threads, "
      f"best of {args.rounds} medians of up to {args.runs} runs after 2 warm-up runs (ms)")
print(f"mkldnn enabled={torch.backends.mkldnn.is_available()}  OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}")
print(f"{'op':<28} {'shape':<26} {'fwd':>9} {'fwd+bwd':>9}")
rows = []
for name, shape, setup in cases:
    if args.only and args.only not in f"{name} {shape}":
        continue
    fwd, both = setup()
    tf = min(median_time(fwd, args.runs) for _ in range(args.rounds)) * 1e3
    tb = min(median_time(both, args.runs) for _ in range(args.rounds)) * 1e3
    rows.append((name, shape, tf, tb))
    print(f"{name:<28} {shape:<26} {tf:9.3f} {tb:9.3f}", flush=True)
if args.tsv:
    with open(args.tsv, "w") as f:
        for r in rows:
            f.write(f"{r[0]}\t{r[1]}\t{r[2]:.4f}\t{r[3]:.4f}\n")
