"""The peers of fa.deform_sdpa, timed on the shapes of bench/deform_sdpa.lua.

  python3 bench/peers/deform_sdpa_torch.py --device cuda --configs 2:8:32:8:32:18x18 --dtypes float32,bfloat16
  python3 bench/peers/deform_sdpa_torch.py --device cpu --threads 2 --configs 1:4:8:4:32:12x12 --dtypes float32
  python3 bench/peers/deform_sdpa_torch.py --check FILE   (FILE: a safetensors file written by the bench's --check)

A config is B:views:samples:heads:dim_head:HxW (q, k, v (B, V, heads, H*W, D), coords (B, V, H*W, V, S, 2) uniform
in [0, 1], scale dim_head^-1/2).
Implementations (--impls):
  torch   F.grid_sample(map, 2 coords - 1, mode='bilinear', padding_mode='zeros', align_corners=True) per view (the
          heads packed as channels: one grid for all heads), then softmax(scale q.k) v over the V*S sampled keys
          (the formulation of the issue and of the Triton peer's ops/torch.py); the sampled keys and values
          (B, V, heads, H*W, V*S, D) are materialised; always available. fwd+bwd: gradients of q, k, v and coords.
  triton  the fused deformable SDPA in Triton (Alexander0Yang/fused-deform-multi-head-scaled-dot-product-attention-
          triton: `from ops.triton import deform_sdpa_triton`), where importable from the PYTHONPATH (e.g.
          PYTHONPATH=.peers/fused-deform-sdpa); CUDA only. It has no coordinates' gradient: its fwd+bwd gives q, k, v.
fwd = forward under no_grad; fwdbwd = forward + backward of a fixed random output gradient. CUDA: CUDA events around
each call, a 256 MB buffer write before each (flushes the L2), 3 warm-up calls, the lower median of --reps calls;
extra memory = peak allocation above the inputs (q, k, v, coords, output gradient), outputs and gradients included.
CPU: wall clock, the smallest of --rounds lower medians. 16-bit dtypes: q, k, v (and the grid handed to
grid_sample, which must match) in that dtype; coords float32.
Prints one JSON object per line: {"impl": "info", ...} and per case {"impl", "config", "dtype", "fwd_ms",
"fwdbwd_ms", "extra_mb_fwd", "extra_mb_fwdbwd"} or "error_fwd" / "error_fwdbwd"; with --check
{"impl": "check", "peer", "max_abs_diff", "max_abs"} per peer and result.
"""
import json
import os
import sys

import torch

from peerlib import parser, print_info, read_safetensors, run_cases, timer, unavailable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'spec', 'fixtures'))
from deform_sdpa_ref import deform_sdpa_reference as deform_sdpa_torch  # noqa: E402


def triton_peer():
    try:
        from ops.triton import deform_sdpa_triton
        return deform_sdpa_triton, None
    except Exception as e:  # noqa: BLE001
        return None, unavailable(e)


def parse_config(s):
    B, V, S, NH, D, hw = s.split(':')
    H, W = (int(x) for x in hw.split('x'))
    return int(B), int(V), int(S), int(NH), int(D), H, W


def check(path):
    """our output and gradients (float64, CPU) against the torch formulation; the Triton peer needs CUDA"""
    t, meta = read_safetensors(path)
    W, H, scale = int(meta['W']), int(meta['H']), float(meta['scale'])
    x = [t[n].clone().requires_grad_(True) for n in ('q', 'k', 'v', 'coords')]
    out = deform_sdpa_torch(*x, W, H, scale)
    grads = torch.autograd.grad(out, x, t['grad_out'])
    for name, got, want in [('out', out, t['out'])] + [('grad_' + n, g, t['grad_' + n])
                                                       for n, g in zip(('q', 'k', 'v', 'coords'), grads)]:
        print(json.dumps({'impl': 'check', 'peer': 'torch', 'result': name,
                          'max_abs_diff': (got - want).abs().max().item(), 'max_abs': want.abs().max().item()}))
    fn, why = triton_peer()
    if fn is None or not torch.cuda.is_available():
        print(json.dumps({'impl': 'check', 'peer': 'triton', 'error': why or 'unavailable (no CUDA device)'}))
        return
    xs = [t[n].float().cuda() for n in ('q', 'k', 'v', 'coords')]
    y = fn(*xs, W, H, scale).double().cpu()
    print(json.dumps({'impl': 'check', 'peer': 'triton', 'result': 'out (float32)',
                      'max_abs_diff': (y - t['out']).abs().max().item(), 'max_abs': t['out'].abs().max().item()}))


def main():
    a = parser('2:8:32:8:32:18x18', 'torch,triton').parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    fn_triton, why = triton_peer()
    print_info(a, {'triton': why or 'available'})
    if a.check:
        check(a.check)
        return

    def setup(cfg, dtype, impl):
        B, V, S, NH, D, H, W = cfg
        L, scale = H * W, D ** -0.5
        if impl == 'triton':
            if fn_triton is None:
                raise RuntimeError(why)
            if a.device != 'cuda':
                raise RuntimeError('n/a (CUDA only)')
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, V, NH, L, D, device=a.device).to(dtype).requires_grad_(True) for _ in range(3))
        coords = torch.rand(B, V, L, V, S, 2, device=a.device, requires_grad=impl == 'torch')
        go = torch.randn(B, V, NH, L, D, device=a.device).to(dtype)
        wrt = [q, k, v] + ([coords] if impl == 'torch' else [])
        f = deform_sdpa_torch if impl == 'torch' else fn_triton

        def fwd():
            with torch.no_grad():
                return f(q, k, v, coords, W, H, scale)

        def fb():
            return torch.autograd.grad(f(q, k, v, coords, W, H, scale), wrt, go)
        return fwd, fb
    run_cases(a, timer(a.device, a.reps, a.rounds), parse_config, setup)


if __name__ == '__main__':
    main()
