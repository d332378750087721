#!/usr/bin/env python3
"""bench/peers/torch_gpu.py: the ops of bench/gpu.lua in PyTorch on the same GPU, timed the same way.

    python3 bench/peers/torch_gpu.py [--reps N] [--batches 1,32] [--only SUBSTRING] [--tsv]

Method (as bench/gpu.lua): per op, SETS random input sets rotated; warm-up calls; then REPS timed calls, each
between two CUDA events, each preceded by a write of a 256 MiB buffer, which evicts the 50 MiB L2 (every
timed call starts cold, as in a real layer) and keeps the GPU busy while the host queues the timed call (so
the time is the GPU's, not the launch path's); the median is reported. float32 matrix products and
convolutions run without TF32 (torch.backends.{cuda.matmul,cudnn}.allow_tf32 = False), as fastattn does by
default; the 'tf32' rows allow it on both sides. cudnn.benchmark is on (PyTorch picks its fastest conv).
Grids: the pixel-centre mesh plus random offsets, as bench/gpu.lua. Host overhead: 10 000 calls of a 1-element add, synchronised once, wall clock per call.

--tsv prints lines `name<TAB>dtype<TAB>batch<TAB>ms` that bench/gpu.lua reads.
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument('--reps', type=int, default=25)
p.add_argument('--sets', type=int, default=3)
p.add_argument('--batches', default='1,32')
p.add_argument('--only', default=None)
p.add_argument('--tsv', action='store_true')
args = p.parse_args()

dev = torch.device('cuda')
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.backends.cudnn.benchmark = True
DT = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16, 'tf32': torch.float32}

flush = torch.empty(64 * 1024 * 1024, dtype=torch.float32, device=dev)


def time_op(fn, sets):
    """median ms of fn(k) over args.reps calls, k rotating over the input sets"""
    for i in range(3):
        fn(i % sets)
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(args.reps)]
    for r in range(args.reps):
        flush.fill_(float(r))
        ev[r][0].record()
        fn(r % sets)
        ev[r][1].record()
    torch.cuda.synchronize()
    return statistics.median(e0.elapsed_time(e1) for e0, e1 in ev)


def randn(shape, dt):
    return torch.randn(shape, device=dev, dtype=torch.float32).to(DT[dt])


def mesh(N, Ho, Wo, jitter, dt):
    """the pixel-centre mesh of Ho x Wo points plus uniform offsets in +-jitter (normalised units); x first"""
    ys = (torch.arange(Ho, device=dev, dtype=torch.float32) * 2 + 1) / Ho - 1
    xs = (torch.arange(Wo, device=dev, dtype=torch.float32) * 2 + 1) / Wo - 1
    gy, gx = torch.meshgrid(ys, xs, indexing='ij')
    g = torch.stack((gx, gy), -1).expand(N, Ho, Wo, 2)
    return (g + (torch.rand((N, Ho, Wo, 2), device=dev) * 2 - 1) * jitter).to(DT[dt])


def ops(B):
    """(name, dtype, make) with make(dt) -> fn(k); the same list and shapes as bench/gpu.lua"""
    img = (B, 512, 64, 64)
    S = args.sets

    def copy(dt):
        xs = [randn(img, dt) for _ in range(S)]
        y = torch.empty(img, device=dev, dtype=DT[dt])
        return lambda k: y.copy_(xs[k])

    def add(dt):
        a = [randn(img, dt) for _ in range(S)]
        b = [randn(img, dt) for _ in range(S)]
        c = torch.empty(img, device=dev, dtype=DT[dt])
        return lambda k: torch.add(a[k], b[k], out=c)

    def gelu(dt):
        xs = [randn(img, dt) for _ in range(S)]
        return lambda k: F.gelu(xs[k])

    def softmax(dt):  # DeformableAttention2D's attention: (B, heads 8, queries 4096, keys 256), over the keys
        xs = [randn((B, 8, 4096, 256), dt) for _ in range(S)]
        return lambda k: torch.softmax(xs[k], -1)

    def layernorm(dt):  # tokens (B, 4096, 512), normalised over the 512 channels
        xs = [randn((B, 4096, 512), dt) for _ in range(S)]
        w, b = randn((512,), dt), randn((512,), dt)
        return lambda k: F.layer_norm(xs[k], (512,), w, b, 1e-5)

    def grid_full(dt):  # (B, 512, 64, 64) sampled at a 64x64 grid
        xs = [randn(img, dt) for _ in range(S)]
        gs = [mesh(B, 64, 64, 2 / 64, dt) for _ in range(S)]
        return lambda k: F.grid_sample(xs[k], gs[k], mode='bilinear', padding_mode='zeros', align_corners=False)

    def grid_dat(dt):  # DeformableAttention2D: (B * 8 groups, 64, 64, 64) at the 16x16 downsampled grid
        xs = [randn((B * 8, 64, 64, 64), dt) for _ in range(S)]
        gs = [mesh(B * 8, 16, 16, 8 / 64, dt) for _ in range(S)]
        return lambda k: F.grid_sample(xs[k], gs[k], mode='bilinear', padding_mode='zeros', align_corners=False)

    def dwconv(dt):  # the offset network's depthwise 6x6 stride 4 (padding 1)
        xs = [randn(img, dt) for _ in range(S)]
        w, b = randn((512, 1, 6, 6), dt) / 6, randn((512,), dt)
        return lambda k: F.conv2d(xs[k], w, b, stride=4, padding=1, groups=512)

    def conv1x1(dt):
        xs = [randn(img, dt) for _ in range(S)]
        w, b = randn((512, 512, 1, 1), dt) / 23, randn((512,), dt)
        return lambda k: F.conv2d(xs[k], w, b)

    def conv1x1_bwd(dt):  # grad x, grad w, grad b of the same conv (aten's convolution_backward: what autograd calls)
        xs = [randn(img, dt) for _ in range(S)]
        gos = [randn(img, dt) for _ in range(S)]
        w = randn((512, 512, 1, 1), dt) / 23
        return lambda k: torch.ops.aten.convolution_backward(gos[k], xs[k], w, [512], [1, 1], [0, 0], [1, 1], False,
                                                             [0, 0], 1, [True, True, True])

    def linear(dt):
        xs = [randn((B * 4096, 512), dt) for _ in range(S)]
        w, b = randn((512, 512), dt) / 23, randn((512,), dt)
        return lambda k: F.linear(xs[k], w, b)

    def matmul(dt):  # attention scores q @ k^T: (B * 8, 4096, 64) @ (B * 8, 64, 256)
        q = [randn((B * 8, 4096, 64), dt) for _ in range(S)]
        kk = [randn((B * 8, 256, 64), dt) for _ in range(S)]
        return lambda k: torch.matmul(q[k], kk[k].transpose(-1, -2))

    return [
        ('copy', 'float32', copy), ('add', 'float32', add), ('gelu', 'float32', gelu),
        ('softmax', 'float32', softmax), ('softmax', 'bfloat16', softmax),
        ('layernorm', 'float32', layernorm), ('layernorm', 'bfloat16', layernorm),
        ('grid_sample', 'float32', grid_full), ('grid_sample', 'bfloat16', grid_full),
        ('grid_sample_dat', 'float32', grid_dat),
        ('dwconv6x6s4', 'float32', dwconv), ('dwconv6x6s4', 'bfloat16', dwconv),
        ('conv1x1', 'float32', conv1x1), ('conv1x1', 'tf32', conv1x1), ('conv1x1', 'bfloat16', conv1x1),
        ('conv1x1_bwd', 'float32', conv1x1_bwd), ('conv1x1_bwd', 'tf32', conv1x1_bwd),
        ('conv1x1_bwd', 'bfloat16', conv1x1_bwd),
        ('linear', 'float32', linear), ('linear', 'tf32', linear),
        ('matmul', 'float32', matmul), ('matmul', 'tf32', matmul), ('matmul', 'bfloat16', matmul),
    ]


def host_overhead():
    a = torch.randn(1, device=dev)
    b = torch.randn(1, device=dev)
    c = torch.empty(1, device=dev)
    out = {}
    for name, fn in (('add_out', lambda: torch.add(a, b, out=c)), ('add_', lambda: a.add_(b, alpha=0)),
                     ('a+b', lambda: a + b)):
        for _ in range(1000):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10000):
            fn()
        torch.cuda.synchronize()
        out[name] = (time.perf_counter() - t0) / 10000 * 1e6
    return out


def main():
    rows = []
    for B in [int(b) for b in args.batches.split(',')]:
        for name, dt, make in ops(B):
            if args.only and args.only not in name:
                continue
            tf32 = dt == 'tf32'
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            fn = make(dt)
            ms = time_op(fn, args.sets)
            rows.append((name, dt, B, ms))
            del fn
            torch.cuda.empty_cache()
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    host = host_overhead()
    if args.tsv:
        for name, dt, B, ms in rows:
            print(f'{name}\t{dt}\t{B}\t{ms:.6f}')
        for k, v in host.items():
            print(f'host_{k}\t-\t1\t{v / 1000:.6f}')
    else:
        print(f'# PyTorch {torch.__version__} on {torch.cuda.get_device_name()}, median of {args.reps}, cold L2')
        for name, dt, B, ms in rows:
            print(f'{name:18s} {dt:9s} B={B:<3d} {ms:9.4f} ms')
        for k, v in host.items():
            print(f'host overhead {k:8s} {v:7.2f} us/call')


if __name__ == '__main__':
    sys.exit(main())
