"""The peers of nn.DeformableAttention2D, timed on the shapes of bench/deformable_attention2d.lua.

  python3 bench/peers/deform2d_torch.py --device cuda --configs 1x512x64x64:8:2:64 --dtypes float32,bfloat16
  python3 bench/peers/deform2d_torch.py --device cpu --threads 2 --configs 1x64x16x16:4:2:16 --dtypes float32
  python3 bench/peers/deform2d_torch.py --check FILE   (FILE: a safetensors file written by the bench's --check)

A config is BxDIMxHxW:heads:num_groups:dim_head (downsample factor 4, offset kernel 6, offset_groups = heads,
the reference's defaults).
Implementations (--impls):
  torch       the reference's data flow in plain PyTorch, spec/fixtures/deform2d_ref.py (the spec's fixtures come
              from it: lucidrains' DeformableAttention2D 0.0.20, with the GQA variant's K/V heads repeated by
              repeat_interleave; the CPB MLP materialised over every (group, query, key) pair, as the reference
              does); always available
  lucidrains  deformable_attention.DeformableAttention2D (pip deformable-attention), where importable and
              num_groups = heads
  gqa         deformable_gqa.DeformableAttention2D (AbelHutten/deformable-grouped-query-attention), where importable
The real modules are looked for on the PYTHONPATH (e.g. PYTHONPATH=.peers/deformable-attention:.peers/dgqa);
"unavailable (...)" otherwise.
fwd = forward under no_grad; fwdbwd = forward + backward of a fixed random output gradient to the input and
every parameter. CUDA: CUDA events around each call, a 256 MB buffer write before each (flushes the L2),
3 warm-up calls, the lower median of --reps calls; extra memory = peak allocation above the inputs (module,
input, output gradient), outputs and gradients included. CPU: wall clock, the smallest of --rounds lower
medians. 16-bit dtypes: the module and the input converted with .to(dtype) (no autocast).
Prints one JSON object per line: {"impl": "info", ...}, {"impl": "gemm", "n", "ms", "tflops"} (CUDA: a bf16
matmul cube) and per case {"impl", "config", "dtype", "fwd_ms", "fwdbwd_ms", "extra_mb_fwd", "extra_mb_fwdbwd"}
or "error_fwd" / "error_fwdbwd"; with --check {"impl": "check", "peer", "max_abs_diff", "max_abs"} per peer.
"""
import json
import os
import sys

import torch

from peerlib import first_line, parser, print_info, read_safetensors, run_cases, timer, unavailable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "spec", "fixtures"))
from deform2d_ref import DeformableAttention2D  # noqa: E402


def real_module(impl):
    try:
        if impl == 'lucidrains':
            from deformable_attention import DeformableAttention2D
        else:
            from deformable_gqa import DeformableAttention2D
        return DeformableAttention2D, None
    except Exception as e:  # noqa: BLE001
        return None, unavailable(e)


def build(impl, cfg, device):
    B, dim, H, W, heads, ng, dh = cfg
    if impl == 'torch':
        # num_groups = heads: lucidrains' module (K/V not repeated)
        m = DeformableAttention2D(dim=dim, dim_head=dh, heads=heads, num_groups=ng if ng != heads else None)
        return m.to(device)
    cls, why = real_module(impl)
    if cls is None:
        raise RuntimeError(why)
    if impl == 'lucidrains':
        if ng != heads:
            raise RuntimeError('n/a (num_groups < heads)')
        return cls(dim=dim, dim_head=dh, heads=heads).to(device)
    return cls(dim=dim, dim_head=dh, heads=heads, num_groups=ng, device=device)


def parse_config(s):
    shape, heads, ng, dh = s.split(':')
    B, dim, H, W = (int(v) for v in shape.split('x'))
    return (B, dim, H, W, int(heads), int(ng), int(dh))


def check(path):
    t, meta = read_safetensors(path)
    cfg = parse_config(meta['config'])
    x, want = t.pop('x'), t.pop('output')
    for impl in ('torch', 'lucidrains', 'gqa'):
        try:
            m = build(impl, cfg, 'cpu').double()
            m.load_state_dict(t)
            with torch.no_grad():
                y = m(x)
            print(json.dumps({'impl': 'check', 'peer': impl, 'max_abs_diff': (y - want).abs().max().item(),
                              'max_abs': want.abs().max().item()}))
        except Exception as e:  # noqa: BLE001
            print(json.dumps({'impl': 'check', 'peer': impl, 'error': first_line(e)}))


def main():
    ap = parser('1x512x64x64:8:2:64', 'torch,lucidrains,gqa')
    ap.add_argument('--tf32', type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = bool(a.tf32)
    torch.backends.cudnn.allow_tf32 = bool(a.tf32)
    print_info(a, {impl: real_module(impl)[1] or 'available' for impl in ('lucidrains', 'gqa')})
    if a.check:
        check(a.check)
        return
    t = timer(a.device, a.reps, a.rounds)
    if a.device == 'cuda':
        n = 8192
        x = torch.randn(n, n, device='cuda', dtype=torch.bfloat16)
        ms = t(lambda: x @ x)
        print(json.dumps({'impl': 'gemm', 'n': n, 'ms': ms, 'tflops': 2 * n ** 3 / (ms * 1e-3) / 1e12}), flush=True)
        del x

    def setup(cfg, dtype, impl):
        torch.manual_seed(0)
        m = build(impl, cfg, a.device).to(dtype)
        x = torch.randn(cfg[0], cfg[1], cfg[2], cfg[3], device=a.device, dtype=dtype, requires_grad=True)
        go = torch.randn_like(x)
        params = [x] + list(m.parameters())

        def fwd():
            with torch.no_grad():
                return m(x)

        def fb():
            return torch.autograd.grad(m(x), params, go)
        return fwd, fb
    run_cases(a, t, parse_config, setup)


if __name__ == '__main__':
    main()
