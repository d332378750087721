"""What the peer scripts of bench/deform_sdpa.lua and bench/deformable_attention2d.lua share (imported from the
script's own folder): the command line, the timers, extra memory, the safetensors reader and the case loop.

  ap = parser(configs, impls)      --device --configs --dtypes --impls --reps --rounds --threads --check
  print_info(a, peers)             the {"impl": "info", ...} line; peers: {name: 'available' or why not}
  t = timer(device, reps, rounds)  t(fn) -> ms. CUDA: events around each call, a 256 MB buffer write before each
                                   (flushes the L2), 3 warm-up calls, the lower median of reps calls. CPU: wall
                                   clock, the smallest of rounds lower medians
  extra_memory(fn)                 CUDA: MB of peak allocation above what was allocated before fn, its result kept
  run_cases(a, t, parse, setup)    per config, dtype and impl a JSON line: setup(cfg, dtype, impl) -> (fwd, fwdbwd)
  read_safetensors(path)           -> ({name: float32/float64 tensor}, metadata)
"""
import argparse
import json
import struct
import time

import numpy as np
import torch


def first_line(e, n=160):
    return (str(e).splitlines() or [''])[0][:n]


def unavailable(e):
    return 'unavailable (%s: %s)' % (type(e).__name__, first_line(e, 100))


def parser(configs, impls):
    ap = argparse.ArgumentParser()
    ap.add_argument('--device', default='cuda')
    ap.add_argument('--configs', default=configs)
    ap.add_argument('--dtypes', default='float32')
    ap.add_argument('--impls', default=impls)
    ap.add_argument('--reps', type=int, default=15)
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--threads', type=int, default=0)
    ap.add_argument('--check', default='')
    return ap


def print_info(a, peers):
    info = {'impl': 'info', 'torch': torch.__version__, 'device': 'cpu' if a.check else a.device,
            'threads': torch.get_num_threads()}
    info.update(peers)
    if a.device == 'cuda' and not a.check:
        info['gpu'] = torch.cuda.get_device_name()
    print(json.dumps(info), flush=True)


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


def run_cases(a, t, parse, setup):
    """{"impl", "config", "dtype", "fwd_ms", "fwdbwd_ms", "extra_mb_fwd", "extra_mb_fwdbwd"} (or "error_fwd" /
    "error_fwdbwd") per config of a.configs, dtype of a.dtypes and impl of a.impls; setup(parse(config), dtype,
    impl) makes the inputs and returns the two functions timed (an exception: the reason in both errors)"""
    for cs in a.configs.split(','):
        cfg = parse(cs)
        for dt in a.dtypes.split(','):
            dtype = getattr(torch, dt)
            for impl in a.impls.split(','):
                r = {'impl': impl, 'config': cs, 'dtype': dt}
                try:
                    fns = setup(cfg, dtype, impl)
                except Exception as e:  # noqa: BLE001
                    r['error_fwd'] = r['error_fwdbwd'] = first_line(e)
                    print(json.dumps(r), flush=True)
                    continue
                for phase, fn in zip(('fwd', 'fwdbwd'), fns):
                    try:
                        r[phase + '_ms'] = t(fn)
                        if a.device == 'cuda':
                            r['extra_mb_' + phase] = extra_memory(fn)
                    except Exception as e:  # noqa: BLE001
                        r['error_' + phase] = 'OOM' if 'out of memory' in str(e) else first_line(e)
                    if a.device == 'cuda':
                        torch.cuda.empty_cache()
                print(json.dumps(r), flush=True)
                del fns, fn  # the case's tensors go before the next case's are made


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
