"""The peers of nn.DeformableAttention2D, timed on the shapes of bench/deformable_attention2d.lua.

  python3 bench/peers/deform2d_torch.py --device cuda --configs 1x512x64x64:8:2:64 --dtypes float32,bfloat16
  python3 bench/peers/deform2d_torch.py --device cpu --threads 2 --configs 1x64x16x16:4:2:16 --dtypes float32
  python3 bench/peers/deform2d_torch.py --check FILE   (FILE: a safetensors file written by the bench's --check)

A config is BxDIMxHxW:heads:num_groups:dim_head (downsample factor 4, offset kernel 6, offset_groups = heads,
the reference's defaults).
Implementations (--impls):
  torch       the reference's data flow written here in plain PyTorch (lucidrains' DeformableAttention2D 0.0.20
              with the GQA variant's K/V heads repeated by repeat_interleave; the CPB MLP materialised over every
              (group, query, key) pair, as the reference does); always available
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
import argparse
import json
import struct
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def create_grid_like(t, dim=0):
    h, w = t.shape[-2:]
    grid = torch.stack(torch.meshgrid(torch.arange(w, device=t.device), torch.arange(h, device=t.device),
                                      indexing='xy'), dim=dim)
    return grid.type_as(t)


def normalize_grid(grid, dim=1, out_dim=-1):
    h, w = grid.shape[-2:]
    gx, gy = grid.unbind(dim=dim)
    return torch.stack((2.0 * gx / max(h - 1, 1) - 1.0, 2.0 * gy / max(w - 1, 1) - 1.0), dim=out_dim)


class Scale(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


class CPB(nn.Module):
    def __init__(self, dim, *, heads, offset_groups, depth):
        super().__init__()
        self.offset_groups = offset_groups
        self.mlp = nn.ModuleList([nn.Sequential(nn.Linear(2, dim), nn.ReLU())])
        for _ in range(depth - 1):
            self.mlp.append(nn.Sequential(nn.Linear(dim, dim), nn.ReLU()))
        self.mlp.append(nn.Linear(dim, heads // offset_groups))

    def forward(self, grid_q, grid_kv):
        grid_q = grid_q.reshape(1, -1, 2)
        grid_kv = grid_kv.reshape(grid_kv.shape[0], -1, 2)
        pos = grid_q[:, :, None, :] - grid_kv[:, None, :, :]
        bias = torch.sign(pos) * torch.log(pos.abs() + 1)
        for layer in self.mlp:
            bias = layer(bias)
        bg, i, j, o = bias.shape
        g = self.offset_groups
        return bias.view(bg // g, g, i, j, o).permute(0, 1, 4, 2, 3).reshape(bg // g, g * o, i, j)


class Deform2D(nn.Module):
    """The reference's data flow (the names of its state_dict); num_groups < heads as the GQA variant."""

    def __init__(self, *, dim, dim_head=64, heads=8, num_groups=None, downsample_factor=4, offset_kernel_size=6):
        super().__init__()
        G = heads
        num_groups = num_groups or heads
        inner, inner_kv = dim_head * heads, dim_head * num_groups
        self.scale, self.heads, self.num_groups, self.G = dim_head ** -0.5, heads, num_groups, G
        od = inner // G
        self.to_offsets = nn.Sequential(
            nn.Conv2d(od, od, offset_kernel_size, groups=od, stride=downsample_factor,
                      padding=(offset_kernel_size - downsample_factor) // 2),
            nn.GELU(), nn.Conv2d(od, 2, 1, bias=False), nn.Tanh(), Scale(downsample_factor))
        self.rel_pos_bias = CPB(dim // 4, offset_groups=G, heads=heads, depth=2)
        self.to_q = nn.Conv2d(dim, inner, 1, groups=G, bias=False)
        self.to_k = nn.Conv2d(dim, inner_kv, 1, groups=G, bias=False)
        self.to_v = nn.Conv2d(dim, inner_kv, 1, groups=G, bias=False)
        self.to_out = nn.Conv2d(inner, dim, 1)

    def forward(self, x):
        b, h, w, G, heads = x.shape[0], x.shape[2], x.shape[3], self.G, self.heads

        def group(t):
            return t.reshape(t.shape[0] * G, t.shape[1] // G, *t.shape[2:])

        q = self.to_q(x)
        offsets = self.to_offsets(group(q))
        vgrid = create_grid_like(offsets) + offsets
        vgrid_scaled = normalize_grid(vgrid)
        kv = F.grid_sample(group(x), vgrid_scaled, mode='bilinear', padding_mode='zeros', align_corners=False)
        kv = kv.reshape(b, -1, *kv.shape[2:])
        k, v = self.to_k(kv), self.to_v(kv)
        q = q * self.scale

        def heads_of(t, n):
            return t.reshape(t.shape[0], n, t.shape[1] // n, -1).transpose(2, 3)

        q, k, v = heads_of(q, heads), heads_of(k, self.num_groups), heads_of(v, self.num_groups)
        if self.num_groups != heads:
            k, v = (torch.repeat_interleave(t, heads // self.num_groups, dim=1) for t in (k, v))
        sim = q @ k.transpose(-1, -2)
        sim = sim + self.rel_pos_bias(normalize_grid(create_grid_like(x), dim=0), vgrid_scaled)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = sim.softmax(dim=-1) @ v
        return self.to_out(out.transpose(2, 3).reshape(b, -1, h, w))


def real_module(impl):
    try:
        if impl == 'lucidrains':
            from deformable_attention import DeformableAttention2D
        else:
            from deformable_gqa import DeformableAttention2D
        return DeformableAttention2D, None
    except Exception as e:  # noqa: BLE001
        return None, 'unavailable (%s: %s)' % (type(e).__name__, (str(e).splitlines() or [''])[0][:100])


def build(impl, cfg, device):
    B, dim, H, W, heads, ng, dh = cfg
    if impl == 'torch':
        return Deform2D(dim=dim, dim_head=dh, heads=heads, num_groups=ng).to(device)
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


def timer(device, reps, rounds):
    if device == 'cuda':
        flush = torch.empty(64 * 1024 * 1024, device='cuda')
        e0 = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        e1 = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]

        def t(fn):
            for _ in range(3):
                fn()
            for r in range(reps):
                flush.fill_(r)
                e0[r].record()
                fn()
                e1[r].record()
            torch.cuda.synchronize()
            ts = sorted(e0[r].elapsed_time(e1[r]) for r in range(reps))
            return ts[(len(ts) - 1) // 2]
        return t

    def t(fn):
        fn()
        best = float('inf')
        for _ in range(rounds):
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            ts.sort()
            best = min(best, ts[(len(ts) - 1) // 2])
        return best
    return t


def extra_memory(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    keep = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del keep
    return peak / 1e6


def read_safetensors(path):
    with open(path, 'rb') as f:
        n = struct.unpack('<Q', f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    dts = {'F32': np.float32, 'F64': np.float64}
    out = {}
    for k, v in header.items():
        if k == '__metadata__':
            continue
        a, b = v['data_offsets']
        out[k] = torch.from_numpy(np.frombuffer(data[a:b], dtype=dts[v['dtype']]).reshape(v['shape']).copy())
    return out, header.get('__metadata__', {})


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
            print(json.dumps({'impl': 'check', 'peer': impl, 'error': (str(e).splitlines() or [''])[0][:160]}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--device', default='cuda')
    ap.add_argument('--configs', default='1x512x64x64:8:2:64')
    ap.add_argument('--dtypes', default='float32')
    ap.add_argument('--impls', default='torch,lucidrains,gqa')
    ap.add_argument('--reps', type=int, default=15)
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--threads', type=int, default=0)
    ap.add_argument('--tf32', type=int, default=0)
    ap.add_argument('--check', default='')
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = bool(a.tf32)
    torch.backends.cudnn.allow_tf32 = bool(a.tf32)
    info = {'impl': 'info', 'torch': torch.__version__, 'device': 'cpu' if a.check else a.device,
            'threads': torch.get_num_threads()}
    for impl in ('lucidrains', 'gqa'):
        cls, why = real_module(impl)
        info[impl] = why or 'available'
    if a.device == 'cuda' and not a.check:
        info['gpu'] = torch.cuda.get_device_name()
    print(json.dumps(info), flush=True)
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
    for cs in a.configs.split(','):
        cfg = parse_config(cs)
        for dt in a.dtypes.split(','):
            dtype = getattr(torch, dt)
            for impl in a.impls.split(','):
                r = {'impl': impl, 'config': cs, 'dtype': dt}
                try:
                    torch.manual_seed(0)
                    m = build(impl, cfg, a.device).to(dtype)
                    x = torch.randn(cfg[0], cfg[1], cfg[2], cfg[3], device=a.device, dtype=dtype, requires_grad=True)
                    go = torch.randn_like(x)
                    params = [x] + list(m.parameters())
                except Exception as e:  # noqa: BLE001
                    r['error_fwd'] = r['error_fwdbwd'] = (str(e).splitlines() or [''])[0][:160]
                    print(json.dumps(r), flush=True)
                    continue

                def fwd():
                    with torch.no_grad():
                        return m(x)

                def fb():
                    return torch.autograd.grad(m(x), params, go)
                for phase, fn in (('fwd', fwd), ('fwdbwd', fb)):
                    try:
                        r[phase + '_ms'] = t(fn)
                        if a.device == 'cuda':
                            r['extra_mb_' + phase] = extra_memory(fn)
                    except torch.cuda.OutOfMemoryError if hasattr(torch.cuda, 'OutOfMemoryError') else RuntimeError as e:
                        r['error_' + phase] = 'OOM' if 'out of memory' in str(e) else (str(e).splitlines() or [''])[0][:160]
                    except Exception as e:  # noqa: BLE001
                        r['error_' + phase] = (str(e).splitlines() or [''])[0][:160]
                    if a.device == 'cuda':
                        torch.cuda.empty_cache()
                print(json.dumps(r), flush=True)
                del m, x, go, params


if __name__ == '__main__':
    main()
