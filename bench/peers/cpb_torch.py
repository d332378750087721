"""PyTorch peer of fa.cpb (bench/cpb.lua): lucidrains' CPB MLP (deformable-attention 0.0.20) by plain torch ops on
the CPU, forward and forward+backward (autograd to the key positions and the six weights).
  python3 bench/peers/cpb_torch.py P N M C O threads reps   -> prints 'fwd_ms fwdbwd_ms'
The whole problem at once, as the reference computes it (its (P, N, M, C) activations in memory)."""
import sys
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
    P, N, M, C, O, threads, reps = map(int, sys.argv[1:8])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    q = torch.rand(N, 2) * 2 - 1
    k = (torch.rand(P, M, 2) * 2.8 - 1.4).requires_grad_(True)
    ws = [torch.randn(C, 2) * 0.7, torch.randn(C) * 0.7, torch.randn(C, C) / C ** 0.5, torch.randn(C) * 0.1,
          torch.randn(O, C) / C ** 0.5, torch.randn(O) * 0.1]
    ws = [w.requires_grad_(True) for w in ws]
    g = torch.randn(P, O, N, M)

    def best(f):
        f()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return min(ts) * 1e3

    with torch.no_grad():
        fwd = best(lambda: cpb(q, k, *ws).contiguous())
    fb = best(lambda: torch.autograd.grad(cpb(q, k, *ws), [k] + ws, g))
    print("%.3f %.3f" % (fwd, fb))


if __name__ == "__main__":
    main()
