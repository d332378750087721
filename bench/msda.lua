-- bench/msda.lua: multi-scale deformable attention, ours vs the PyTorch grid_sample reference and, where it is on
-- the PYTHONPATH, msda-triton (its bfloat16 row timed in float16: it has no bfloat16), one run.
--
--   bin/fastattn bench/msda.lua                 GPU: enc/dec/tri x float32/bfloat16 x locations uniform/local
--   bin/fastattn bench/msda.lua --cpu           CPU: reduced enc (N=1, Lq=S=5017) vs torch on the CPU, same threads
-- options: --configs enc,dec,tri  --dtypes float32,bfloat16  --locs uniform,local  --reps 25  --sets 3
--          --variants default,mq,qm,qmmerge,gather  --peer 0 (skip torch)  --python PATH
--          --out FILE (markdown)  --tsv FILE (the result table, tab-separated)
--          --threads N (CPU)                                              (--help: all, with defaults)
--
-- Kernel variants, forced through the msda options (DESIGN §2.1; the library picks by itself otherwise):
-- default = the planner's choice; mq = groups in (n, q, m) order (order = 'query'), qm = (n, m, q) order
-- (order = 'head'), both without the warp merge; qmmerge = (n, m, q) + the backward's warp merge;
-- gather = the deterministic backward (sort + gather). The staged and redundant variants left the library
-- (bench/MSDA_NOTES.md keeps their numbers); asking for them prints a note and skips them.
--
-- GPU timing (bench/lib.lua's gpuTimer): CUDA events around each call, the L2 flushed before every call by
-- writing a 256 MB buffer (which also keeps the GPU busy while the host queues the call: the events measure
-- GPU time), warm-up, median over --reps calls rotating over --sets input sets; each call's events are read
-- before the next is queued (as this bench always did, so runs before and after a change compare). The HBM
-- floor is the compulsory bytes (every input read once, every output written once) over the device-to-device
-- copy bandwidth measured in the same run. Input distributions (bench/peers/msda_torch.py draws the same):
-- value, grad ~ N(0,1), attention = softmax over L*P of N(0,1); locations 'uniform' in [0,1], or 'local':
-- reference point (encoder: the query's own pixel centre; dec/tri: uniform) + MSDeformAttn's initial radial
-- offsets (p+1 px along head m's direction) + N(0, 0.5 px).
local ffi = require 'ffi'
local fa = require 'fastattn'
local bench = require 'bench.lib'

---------------------------------------------------------------------------- options
-- kernel variants: the msda options of the forward and of the backward
local VARIANTS = {
  default = { fwd = {}, bwd = {} },
  mq = { fwd = { order = 'query' }, bwd = { order = 'query', merge = false } },
  qm = { fwd = { order = 'head' }, bwd = { order = 'head', merge = false } },
  qmmerge = { fwd = { order = 'head' }, bwd = { order = 'head', merge = true } },
  gather = { fwd = {}, bwd = { deterministic = true } },
}
local VARIANT_NAMES = { 'default', 'mq', 'qm', 'qmmerge', 'gather' }
local REMOVED = { redundant = true, staged = true, bstaged = true, bstaged40 = true }

local opt = bench.args({
  prog = 'bench/msda.lua',
  usage = 'bin/fastattn bench/msda.lua [--cpu] [options]',
  about = 'multi-scale deformable attention (fa.msda forward and backward) against the PyTorch grid_sample\n' ..
          'reference, on the GPU (needs a CUDA GPU) or, with --cpu, on the CPU.',
  footer = '`make bench` runs it (after bench/gpu.lua). bench/MSDA_NOTES.md has the numbers and what they mean.',
  options = {
    { 'cpu', 'flag', help = 'the CPU comparison (a reduced encoder) instead of the GPU one' },
    { 'configs', 'list', { 'enc', 'dec', 'tri' }, choices = { 'enc', 'dec', 'tri', 'cpu' }, help = 'GPU shapes' },
    { 'dtypes', 'list', { 'float32', 'bfloat16' }, choices = { 'float32', 'bfloat16', 'float16' }, help = 'GPU dtypes' },
    { 'locs', 'list', { 'uniform', 'local' }, choices = { 'uniform', 'local' }, help = 'sampling-location distributions' },
    { 'reps', 'int', 25, min = 1, help = 'timed calls (the median is reported; the CPU takes 7 unless below 25)' },
    { 'sets', 'int', 3, min = 1, help = 'random input sets, rotated (GPU)' },
    { 'variants', 'list', { 'default' }, help = 'GPU kernel variants: ' .. table.concat(VARIANT_NAMES, ', ') },
    { 'peer', 'choice', '1', choices = { '0', '1' }, help = 'run the PyTorch peer (0: skip it)' },
    { 'python', 'string', nil, meta = 'PATH', default_text = '$PYTHON or python3', help = 'python with torch for the peer' },
    { 'out', 'path', nil, help = 'also write the markdown output here' },
    { 'tsv', 'path', nil, help = 'also write the result table as tab-separated text here' },
    { 'threads', 'int', nil, min = 1, default_text = 'all cores', help = 'CPU threads (--cpu)' },
  },
  check = function(o)
    for _, v in ipairs(o.variants) do
      if not VARIANTS[v] and not REMOVED[v] then
        return string.format('option --variants: expected a comma-separated list of %s, got %q (%q is not one of them)',
                             table.concat(VARIANT_NAMES, ', '), table.concat(o.variants, ','), v)
      end
    end
  end,
}, arg)
local variants = {}
for _, v in ipairs(opt.variants) do
  if REMOVED[v] then
    io.stderr:write(string.format('bench/msda.lua: variant %s left the library (issue 8; bench/MSDA_NOTES.md has its '
                                  .. 'numbers): skipped\n', v))
  else
    variants[#variants + 1] = v
  end
end
if not opt.cpu then bench.needGPU('bench/msda.lua', 'or use --cpu for the CPU comparison') end

local CONFIGS = {
  enc = { N = 2, M = 8, D = 32, P = 4, levels = { { 100, 150 }, { 50, 75 }, { 25, 38 }, { 13, 19 } } },
  dec = { N = 2, Lq = 300, M = 8, D = 32, P = 4, levels = { { 100, 150 }, { 50, 75 }, { 25, 38 }, { 13, 19 } } },
  tri = { N = 4, Lq = 10000, M = 8, D = 32, P = 4, levels = { { 64, 64 }, { 32, 32 }, { 16, 16 }, { 8, 8 } } },
  -- the CPU comparison: the encoder at a quarter of the resolution (S = 5017)
  cpu = { N = 1, M = 8, D = 32, P = 4, levels = { { 50, 75 }, { 25, 38 }, { 13, 19 }, { 7, 10 } } },
}
for _, c in pairs(CONFIGS) do
  c.S = 0
  for _, hw in ipairs(c.levels) do c.S = c.S + hw[1] * hw[2] end
  c.Lq = c.Lq or c.S
  c.L = #c.levels
end

---------------------------------------------------------------------------- inputs
local function make_inputs(cfg, locs, seed)
  fa.manualSeed(seed)
  local N, Lq, M, D, L, P, S = cfg.N, cfg.Lq, cfg.M, cfg.D, cfg.L, cfg.P, cfg.S
  local value = fa.randn(N, S, M, D)
  local logits = fa.randn(N, Lq, M, L * P)
  local attn = fa.empty(N, Lq, M, L, P)
  do -- softmax over L*P
    local pz, pa = ffi.cast('float*', logits.desc.data), ffi.cast('float*', attn.desc.data)
    local LP = L * P
    for r = 0, N * Lq * M - 1 do
      local b, mx, s = r * LP, -math.huge, 0
      for k = 0, LP - 1 do if pz[b + k] > mx then mx = pz[b + k] end end
      for k = 0, LP - 1 do local e = math.exp(pz[b + k] - mx); pa[b + k] = e; s = s + e end
      for k = 0, LP - 1 do pa[b + k] = pa[b + k] / s end
    end
  end
  local loc
  if locs == 'uniform' then
    loc = fa.rand(N, Lq, M, L, P, 2)
  else
    loc = fa.empty(N, Lq, M, L, P, 2)
    local noise = fa.randn(N, Lq, M, L, P, 2)
    local ref = fa.rand(Lq, 2)
    local pl, pn, pr = ffi.cast('float*', loc.desc.data), ffi.cast('float*', noise.desc.data),
        ffi.cast('float*', ref.desc.data)
    if Lq == S then -- encoder: query q is pixel q of the concatenated levels
      local q = 0
      for _, hw in ipairs(cfg.levels) do
        for y = 0, hw[1] - 1 do
          for x = 0, hw[2] - 1 do
            pr[2 * q], pr[2 * q + 1] = (x + 0.5) / hw[2], (y + 0.5) / hw[1]
            q = q + 1
          end
        end
      end
    end
    local dir = {}
    for m = 0, M - 1 do
      local t = 2 * math.pi * m / M
      local cx, cy = math.cos(t), math.sin(t)
      local mx = math.max(math.abs(cx), math.abs(cy))
      dir[m] = { cx / mx, cy / mx }
    end
    local k = 0
    for _ = 0, N - 1 do
      for q = 0, Lq - 1 do
        local rx, ry = pr[2 * q], pr[2 * q + 1]
        for m = 0, M - 1 do
          local dx, dy = dir[m][1], dir[m][2]
          for l = 1, L do
            local W, Hh = cfg.levels[l][2], cfg.levels[l][1]
            for p = 1, P do
              pl[k] = rx + (dx * p + 0.5 * pn[k]) / W
              pl[k + 1] = ry + (dy * p + 0.5 * pn[k + 1]) / Hh
              k = k + 2
            end
          end
        end
      end
    end
  end
  local grad = fa.randn(N, Lq, M * D)
  return { value = value, loc = loc, attn = attn, grad = grad }
end

local function levels_tensors(cfg)
  local shapes = fa.tensor(cfg.levels, 'int64')
  local lsi, acc = {}, 0
  for l, hw in ipairs(cfg.levels) do lsi[l] = acc; acc = acc + hw[1] * hw[2] end
  return shapes, fa.tensor(lsi, 'int64')
end

-- compulsory bytes: fwd reads value, loc, attn and writes out; bwd reads grad, value, loc, attn and writes the
-- three gradients
local function bytes_of(cfg, es)
  local nv, no = cfg.N * cfg.S * cfg.M * cfg.D, cfg.N * cfg.Lq * cfg.M * cfg.D
  local npts = cfg.N * cfg.Lq * cfg.M * cfg.L * cfg.P
  local fwd = nv * es + npts * 12 + no * es
  local bwd = no * es + nv * es + npts * 12 + nv * es + npts * 12
  return fwd, fwd + bwd
end

---------------------------------------------------------------------------- the torch peer
-- runs bench/peers/msda_torch.py: {key -> torch record} and {key -> msda-triton record} with key =
-- config/dtype/locs, and its info line (or why not)
local function run_peer(args)
  local recs, info = bench.peerRecords('msda_torch.py', args, { python = opt.python, skip = opt.peer == '0' })
  local torch, triton = {}, {}
  for _, r in ipairs(recs) do
    local t = r.impl == 'msda-triton' and triton or torch
    t[r.config .. '/' .. r.dtype .. '/' .. r.locs] = r
  end
  return torch, info, triton
end

---------------------------------------------------------------------------- output
local R = bench.report()
local fmt = bench.fmt
local result -- the result table (--tsv)

-- preallocated outputs: the forward's and the backward's options
local function buffers(x, cfg, dtype, device)
  return { out = fa.empty({ cfg.N, cfg.Lq, cfg.M * cfg.D }, { dtype = dtype, device = device }) },
         { grad_value = fa.empty_like(x.value), grad_sampling_locations = fa.empty_like(x.loc),
           grad_attention_weights = fa.empty_like(x.attn) }
end
-- a's keys, then b's
local function with(a, b)
  local t = {}
  for k, v in pairs(a) do t[k] = v end
  for k, v in pairs(b) do t[k] = v end
  return t
end

---------------------------------------------------------------------------- CPU
local function bench_cpu()
  local threads = opt.threads or fa.getNumThreads()
  fa.setNumThreads(threads)
  local cfg = CONFIGS.cpu
  local shapes, lsi = levels_tensors(cfg)
  local reps = opt.reps < 25 and opt.reps or 7
  R:line(string.format('## MSDA on the CPU: N=%d, Lq=S=%d, M=%d, D=%d, L=%d, P=%d, float32, %d threads',
    cfg.N, cfg.S, cfg.M, cfg.D, cfg.L, cfg.P, threads))
  R:line('')
  local peer, info = run_peer(string.format('--device cpu --threads %d --configs cpu --dtypes float32 --locs %s --reps %d',
    threads, table.concat(opt.locs, ','), reps))
  R:line('peer: ' .. tostring(info))
  R:line('')
  result = bench.table({ { 'locations' }, { 'ours fwd ms' }, { 'ours fwd+bwd ms' }, { 'torch fwd ms' }, { 'torch fwd+bwd ms' },
                         { 'speed-up fwd' }, { 'speed-up fwd+bwd' } })
  for _, locs in ipairs(opt.locs) do
    local x = make_inputs(cfg, locs, 1)
    local fo, bo = buffers(x, cfg, 'float32', 'cpu')
    local function fwd() fa.msda(x.value, shapes, lsi, x.loc, x.attn, fo) end
    local function fb() fwd(); fa.msda_backward(x.grad, x.value, shapes, lsi, x.loc, x.attn, bo) end
    local mf = bench.cpuTime(fwd, { runs = reps, warmup = 1 }) * 1e3
    local mb = bench.cpuTime(fb, { runs = reps, warmup = 1 }) * 1e3
    local p = peer['cpu/float32/' .. locs] or {}
    result:add({ locs, fmt(mf, 2), fmt(mb, 2), fmt(p.fwd_ms, 1), fmt(p.fwdbwd_ms, 1), bench.ratio(p.fwd_ms, mf, 1, 'x'),
                 bench.ratio(p.fwdbwd_ms, mb, 1, 'x') })
  end
  R:lines_of(result:markdown())
end

---------------------------------------------------------------------------- GPU
local function bench_gpu()
  local dev = fa.cuda.deviceName()
  local bw = bench.copyBandwidth() -- bytes/s
  local time, free = bench.gpuTimer{ reps = opt.reps, syncEach = true }
  R:line(string.format('## MSDA on %s: device-to-device copy %.2f TB/s (read + write), L2 flushed before every call', dev, bw / 1e12))
  R:line('')
  local results = {}
  for _, cname in ipairs(opt.configs) do
    local cfg = CONFIGS[cname]
    local shapes, lsi = levels_tensors(cfg)
    for _, dtype in ipairs(opt.dtypes) do
      local es = (dtype == 'float32') and 4 or 2
      local bf, bfb = bytes_of(cfg, es)
      for _, locs in ipairs(opt.locs) do
        local sets = {}
        for k = 1, opt.sets do
          local x = make_inputs(cfg, locs, 1000 * k + #cname)
          local s = { value = x.value:to(dtype):cuda(), loc = x.loc:cuda(), attn = x.attn:cuda(),
                      grad = x.grad:to(dtype):cuda() }
          s.fo, s.bo = buffers(s, cfg, dtype, 'cuda')
          sets[k] = s
        end
        for _, var in ipairs(variants) do
          local vf, vb = VARIANTS[var].fwd, VARIANTS[var].bwd
          for _, s in ipairs(sets) do s.f, s.b = with(s.fo, vf), with(s.bo, vb) end
          local function fwd(k) local s = sets[k]; fa.msda(s.value, shapes, lsi, s.loc, s.attn, s.f) end
          local function bwd(k) local s = sets[k]; fa.msda_backward(s.grad, s.value, shapes, lsi, s.loc, s.attn, s.b) end
          local r = { config = cname, dtype = dtype, locs = locs, variant = var }
          local ok, err = pcall(function()
            r.fwd = time(fwd, #sets)
            r.bwd = time(bwd, #sets)
            r.fb = time(function(k) fwd(k); bwd(k) end, #sets)
          end)
          if not ok then r.err = tostring(err):gsub('\n', ' ') end
          r.floor_f, r.floor_fb = bf / bw * 1e3, bfb / bw * 1e3
          results[#results + 1] = r
          io.stderr:write(ok and string.format('%s %s %s %s: fwd %.4f bwd %.4f fwd+bwd %.4f ms\n', cname, dtype, locs, var,
                                               r.fwd, r.bwd, r.fb)
                          or string.format('%s %s %s %s: error: %s\n', cname, dtype, locs, var, r.err))
        end
        sets = nil
        collectgarbage()
      end
    end
  end
  free()
  local peer, info, tpeer = run_peer(string.format('--device cuda --configs %s --dtypes %s --locs %s --reps %d',
    table.concat(opt.configs, ','), table.concat(opt.dtypes, ','), table.concat(opt.locs, ','), math.min(opt.reps, 15)))
  R:line('peer: ' .. tostring(info))
  R:line('')
  result = bench.table({ { 'config' }, { 'dtype' }, { 'locations' }, { 'variant' }, { 'fwd ms' }, { 'fwd % of HBM floor' },
                         { 'bwd ms' }, { 'fwd+bwd ms' }, { 'fwd+bwd % of floor' }, { 'torch fwd ms' }, { 'torch fwd+bwd ms' },
                         { 'vs torch fwd' }, { 'vs torch fwd+bwd' }, { 'msda-triton fwd ms' },
                         { 'msda-triton fwd+bwd ms' }, { 'vs msda-triton fwd' }, { 'vs msda-triton fwd+bwd' } })
  for _, r in ipairs(results) do
    local key = r.config .. '/' .. r.dtype .. '/' .. r.locs
    local p, tp = peer[key] or {}, tpeer[key]
    -- msda-triton has no bfloat16: its float16 time stands in (marked)
    local tmark = tp and tp.timed_dtype and ' (' .. tp.timed_dtype .. ')' or ''
    local function tms(phase) return bench.peerMs(tp, phase) .. (tp and tp[phase .. '_ms'] and tmark or '') end
    if r.err then
      result:add({ r.config, r.dtype, r.locs, r.variant, 'error: ' .. r.err, '-', '-', '-', '-', fmt(p.fwd_ms, 3),
                   fmt(p.fwdbwd_ms, 3), '-', '-', tms('fwd'), tms('fwdbwd'), '-', '-' })
    else
      result:add({ r.config, r.dtype, r.locs, r.variant, fmt(r.fwd, 4), bench.pct(r.floor_f, r.fwd), fmt(r.bwd, 4),
                   fmt(r.fb, 4), bench.pct(r.floor_fb, r.fb), fmt(p.fwd_ms, 3), fmt(p.fwdbwd_ms, 3),
                   bench.ratio(p.fwd_ms, r.fwd, 1, 'x'), bench.ratio(p.fwdbwd_ms, r.fb, 1, 'x'), tms('fwd'),
                   tms('fwdbwd'), bench.ratio(tp and tp.fwd_ms, r.fwd, 1, 'x'),
                   bench.ratio(tp and tp.fwdbwd_ms, r.fb, 1, 'x') })
    end
  end
  R:lines_of(result:markdown())
  R:line('')
  local t = {}
  for _, cname in ipairs(opt.configs) do
    for _, dtype in ipairs(opt.dtypes) do
      local a, b = bytes_of(CONFIGS[cname], dtype == 'float32' and 4 or 2)
      t[#t + 1] = string.format('%s %s fwd %.1f MB %.4f ms, fwd+bwd %.1f MB %.4f ms', cname, dtype, a / 1e6,
        a / bw * 1e3, b / 1e6, b / bw * 1e3)
    end
  end
  R:line(string.format('HBM floors (compulsory bytes / %.2f TB/s): ', bw / 1e12) .. table.concat(t, '; '))
end

if opt.cpu then bench_cpu() else bench_gpu() end
if opt.out then R:save(opt.out) end
if opt.tsv and result then bench.write(opt.tsv, result:tsv()) end
