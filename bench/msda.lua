-- bench/msda.lua: multi-scale deformable attention, ours vs the PyTorch grid_sample reference, one run.
--
--   bin/fastattn bench/msda.lua                 GPU: enc/dec/tri x float32/bfloat16 x locations uniform/local
--   bin/fastattn bench/msda.lua --cpu           CPU: reduced enc (N=1, Lq=S=5017) vs torch on the CPU, same threads
-- options: --configs enc,dec,tri  --dtypes float32,bfloat16  --locs uniform,local  --reps 25  --sets 3
--          --variants default,mq,qm,qmmerge,gather,redundant,staged,bstaged,bstaged40  --peer 0 (skip torch)  --python PATH
--          --out FILE (markdown)
--          --threads N (CPU)
--
-- GPU timing: CUDA events around each call, the L2 flushed before every call by writing a 256 MB buffer
-- (which also keeps the GPU busy while the host queues the call: the events measure GPU time), warm-up,
-- median over --reps calls rotating over --sets input sets. The HBM floor is the compulsory bytes (every
-- input read once, every output written once) over the device-to-device copy bandwidth measured in the
-- same run. Input distributions (bench/peers/msda_torch.py draws the same): value, grad ~ N(0,1),
-- attention = softmax over L*P of N(0,1); locations 'uniform' in [0,1], or 'local': reference point
-- (encoder: the query's own pixel centre; dec/tri: uniform) + MSDeformAttn's initial radial offsets
-- (p+1 px along head m's direction) + N(0, 0.5 px).
local ffi = require 'ffi'
local fa = require 'fastattn'

-- (pcall: another module may have declared them already)
pcall(ffi.cdef, 'int setenv(const char *name, const char *value, int overwrite);')
pcall(ffi.cdef, 'int unsetenv(const char *name);')

---------------------------------------------------------------------------- options
local opt = { configs = nil, dtypes = 'float32,bfloat16', locs = 'uniform,local', reps = 25, sets = 3,
              variants = 'default,staged', peer = '1', python = nil, out = nil, threads = nil }
local i = 1
while i <= #arg do
  local a = arg[i]
  if a == '--cpu' then opt.cpu = true
  elseif a:match('^%-%-') and arg[i + 1] then opt[a:sub(3)] = arg[i + 1]; i = i + 1
  else error('bench/msda.lua: unknown argument ' .. a) end
  i = i + 1
end
local function list(s) local t = {}; for w in s:gmatch('[^,]+') do t[#t + 1] = w end; return t end

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

local function median(t)
  local s = { unpack(t) }
  table.sort(s)
  return s[math.floor((#s + 1) / 2)]
end

local function now_ms() return fa.clock() * 1e3 end

---------------------------------------------------------------------------- the torch peer
local function find_python()
  if opt.python then return opt.python end
  for _, p in ipairs({ os.getenv('PYTHON') or '', 'python3', '/usr/bin/python3' }) do
    if p ~= '' and os.execute(p .. ' -c "import torch" >/dev/null 2>&1') == 0 then return p end
  end
end

-- runs bench/peers/msda_torch.py and returns {key -> record} with key = config/dtype/locs
local function run_peer(args)
  local py = find_python()
  if not py or opt.peer == '0' then return {}, 'torch not found (or --peer 0)' end
  local here = (debug.getinfo(1, 'S').source:match('^@(.*)/[^/]*$')) or 'bench'
  local cmd = string.format('%s %s/peers/msda_torch.py %s 2>&1', py, here, args)
  io.stderr:write('peer: ' .. cmd .. '\n')
  local f = io.popen(cmd)
  local res, info = {}, nil
  for line in f:lines() do
    io.stderr:write('  ' .. line .. '\n')
    local impl = line:match('"impl": "([^"]+)"')
    if impl == 'info' then info = line
    elseif impl then
      local r = {}
      for k, v in line:gmatch('"([%w_]+)": ([%d%.e%-]+)') do r[k] = tonumber(v) end
      r.config, r.dtype, r.locs = line:match('"config": "(%w+)"'), line:match('"dtype": "(%w+)"'), line:match('"locs": "(%w+)"')
      res[r.config .. '/' .. r.dtype .. '/' .. r.locs] = r
    end
  end
  f:close()
  return res, info
end

---------------------------------------------------------------------------- output
local lines = {}
local function emit(s) print(s); lines[#lines + 1] = s end
local function fmt(x, d) return x and string.format('%.' .. (d or 3) .. 'f', x) or '-' end

---------------------------------------------------------------------------- CPU
local function bench_cpu()
  local threads = tonumber(opt.threads) or fa.getNumThreads()
  fa.setNumThreads(threads)
  local cfg = CONFIGS.cpu
  local shapes, lsi = levels_tensors(cfg)
  local reps = tonumber(opt.reps) < 25 and tonumber(opt.reps) or 7
  emit(string.format('## MSDA on the CPU: N=%d, Lq=S=%d, M=%d, D=%d, L=%d, P=%d, float32, %d threads',
    cfg.N, cfg.S, cfg.M, cfg.D, cfg.L, cfg.P, threads))
  emit('')
  local peer, info = run_peer(string.format('--device cpu --threads %d --configs cpu --dtypes float32 --locs %s --reps %d',
    threads, opt.locs, reps))
  emit('peer: ' .. tostring(info))
  emit('')
  emit('| locations | ours fwd ms | ours fwd+bwd ms | torch fwd ms | torch fwd+bwd ms | speed-up fwd | speed-up fwd+bwd |')
  emit('|---|---|---|---|---|---|---|')
  for _, locs in ipairs(list(opt.locs)) do
    local x = make_inputs(cfg, locs, 1)
    local out, gv, gl, ga = fa.empty(cfg.N, cfg.Lq, cfg.M * cfg.D), fa.empty_like(x.value), fa.empty_like(x.loc),
        fa.empty_like(x.attn)
    local o = { out = out, grad_value = gv, grad_sampling_locations = gl, grad_attention_weights = ga }
    local function fwd() fa.msda(x.value, shapes, lsi, x.loc, x.attn, o) end
    local function fb() fwd(); fa.msda_backward(x.grad, x.value, shapes, lsi, x.loc, x.attn, o) end
    local tf, tb = {}, {}
    fwd(); fb()
    for r = 1, reps do
      local t0 = now_ms(); fwd(); tf[r] = now_ms() - t0
      t0 = now_ms(); fb(); tb[r] = now_ms() - t0
    end
    local p = peer['cpu/float32/' .. locs] or {}
    local mf, mb = median(tf), median(tb)
    emit(string.format('| %s | %s | %s | %s | %s | %s | %s |', locs, fmt(mf, 2), fmt(mb, 2), fmt(p.fwd_ms, 1),
      fmt(p.fwdbwd_ms, 1), p.fwd_ms and fmt(p.fwd_ms / mf, 1) .. 'x' or '-',
      p.fwdbwd_ms and fmt(p.fwdbwd_ms / mb, 1) .. 'x' or '-'))
  end
end

---------------------------------------------------------------------------- GPU
-- kernel variants (cuda/msda.cu reads these environment variables at every call)
local ENVS = { 'FA_MSDA_FWD', 'FA_MSDA_BWD', 'FA_MSDA_ORDER', 'FA_MSDA_MERGE', 'FA_MSDA_SMEM', 'FA_MSDA_FSMEM' }
local VARIANT_ENV = {
  default = {},                                           -- the library's choice (cuda/msda.cu make_plan)
  mq = { FA_MSDA_ORDER = 'mq', FA_MSDA_MERGE = '0' },     -- groups in (n, q, m) order
  qm = { FA_MSDA_ORDER = 'qm', FA_MSDA_MERGE = '0' },     -- groups in (n, m, q) order
  qmmerge = { FA_MSDA_ORDER = 'qm', FA_MSDA_MERGE = '1' },-- (n, m, q) + same-footprint groups add before the atomics
  gather = { FA_MSDA_BWD = 'gather' },                    -- the deterministic backward (sort + gather)
  redundant = { FA_MSDA_FWD = 'redundant' },              -- forward: every lane computes every footprint
  -- persistent kernels with the coarse levels in shared memory (run 4: slower except tri bf16 backward)
  staged = { FA_MSDA_SMEM = '200', FA_MSDA_FSMEM = '200' }, -- forward and backward, levels that fit in 200 KB
  bstaged = { FA_MSDA_SMEM = '200' },                     -- backward only
  bstaged40 = { FA_MSDA_SMEM = '40' },                    -- backward only, levels that fit in 40 KB
}
local function bench_gpu()
  assert(fa.cuda.isAvailable(), 'bench/msda.lua: no GPU (use --cpu for the CPU comparison)')
  local dev = fa.cuda.deviceName()
  local reps, nsets = tonumber(opt.reps), tonumber(opt.sets)
  -- copy bandwidth (bytes read + written), 1 GiB
  local src = fa.empty(256 * 1024 * 1024, { device = 'cuda' }):fill(1)
  local dst = fa.empty_like(src)
  local tc = fa.cuda.time(function() dst:copy(src) end, 10, 2)
  local bw = 2 * src:numel() * 4 / (tc * 1e-3) -- bytes/s
  src, dst = nil, nil
  collectgarbage()
  local flush = fa.empty(64 * 1024 * 1024, { device = 'cuda' }) -- 256 MB
  emit(string.format('## MSDA on %s: device-to-device copy %.2f TB/s (read + write), L2 flushed before every call', dev, bw / 1e12))
  emit('')
  local e0, e1 = fa.cuda.Event(), fa.cuda.Event()
  local function timed(fn, sets)
    for k = 1, 3 do fn(sets[(k - 1) % #sets + 1]) end
    local t = {}
    for r = 1, reps do
      local s = sets[(r - 1) % #sets + 1]
      flush:zero()
      e0:record()
      fn(s)
      e1:record()
      t[r] = e0:elapsedTime(e1)
    end
    return median(t)
  end
  local results = {}
  local configs, dtypes, locss, variants = list(opt.configs or 'enc,dec,tri'), list(opt.dtypes), list(opt.locs),
      list(opt.variants)
  for _, cname in ipairs(configs) do
    local cfg = CONFIGS[cname]
    local shapes, lsi = levels_tensors(cfg)
    for _, dtype in ipairs(dtypes) do
      local es = (dtype == 'float32') and 4 or 2
      local bf, bfb = bytes_of(cfg, es)
      for _, locs in ipairs(locss) do
        local sets = {}
        for k = 1, nsets do
          local x = make_inputs(cfg, locs, 1000 * k + #cname)
          local s = { value = x.value:to(dtype):cuda(), loc = x.loc:cuda(), attn = x.attn:cuda(),
                      grad = x.grad:to(dtype):cuda() }
          s.o = { out = fa.empty({ cfg.N, cfg.Lq, cfg.M * cfg.D }, { dtype = dtype, device = 'cuda' }),
                  grad_value = fa.empty_like(s.value), grad_sampling_locations = fa.empty_like(s.loc),
                  grad_attention_weights = fa.empty_like(s.attn) }
          sets[k] = s
        end
        for _, var in ipairs(variants) do
          for _, e in ipairs(ENVS) do ffi.C.unsetenv(e) end
          for e, v in pairs(VARIANT_ENV[var] or {}) do ffi.C.setenv(e, v, 1) end
          local function fwd(s) fa.msda(s.value, shapes, lsi, s.loc, s.attn, s.o) end
          local function bwd(s) fa.msda_backward(s.grad, s.value, shapes, lsi, s.loc, s.attn, s.o) end
          local r = { config = cname, dtype = dtype, locs = locs, variant = var }
          r.fwd = timed(fwd, sets)
          r.bwd = timed(bwd, sets)
          r.fb = timed(function(s) fwd(s); bwd(s) end, sets)
          r.floor_f, r.floor_fb = bf / bw * 1e3, bfb / bw * 1e3
          results[#results + 1] = r
          io.stderr:write(string.format('%s %s %s %s: fwd %.4f bwd %.4f fwd+bwd %.4f ms\n', cname, dtype, locs, var,
            r.fwd, r.bwd, r.fb))
        end
        for _, e in ipairs(ENVS) do ffi.C.unsetenv(e) end
        sets = nil
        collectgarbage()
      end
    end
  end
  flush = nil
  collectgarbage()
  fa.cuda.emptyCache()
  local peer, info = run_peer(string.format('--device cuda --configs %s --dtypes %s --locs %s --reps %d',
    table.concat(configs, ','), table.concat(dtypes, ','), opt.locs, math.min(reps, 15)))
  emit('peer: ' .. tostring(info))
  emit('')
  emit('| config | dtype | locations | variant | fwd ms | fwd % of HBM floor | bwd ms | fwd+bwd ms | fwd+bwd % of floor | torch fwd ms | torch fwd+bwd ms | vs torch fwd | vs torch fwd+bwd |')
  emit('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  for _, r in ipairs(results) do
    local p = peer[r.config .. '/' .. r.dtype .. '/' .. r.locs] or {}
    emit(string.format('| %s | %s | %s | %s | %s | %d%% | %s | %s | %d%% | %s | %s | %s | %s |', r.config, r.dtype,
      r.locs, r.variant, fmt(r.fwd, 4), math.floor(100 * r.floor_f / r.fwd + 0.5), fmt(r.bwd, 4), fmt(r.fb, 4),
      math.floor(100 * r.floor_fb / r.fb + 0.5), fmt(p.fwd_ms, 3), fmt(p.fwdbwd_ms, 3),
      p.fwd_ms and fmt(p.fwd_ms / r.fwd, 1) .. 'x' or '-', p.fwdbwd_ms and fmt(p.fwdbwd_ms / r.fb, 1) .. 'x' or '-'))
  end
  emit('')
  emit(string.format('HBM floors (compulsory bytes / %.2f TB/s): ', bw / 1e12) .. (function()
    local t = {}
    for _, cname in ipairs(configs) do
      for _, dtype in ipairs(dtypes) do
        local a, b = bytes_of(CONFIGS[cname], dtype == 'float32' and 4 or 2)
        t[#t + 1] = string.format('%s %s fwd %.1f MB %.4f ms, fwd+bwd %.1f MB %.4f ms', cname, dtype, a / 1e6,
          a / bw * 1e3, b / 1e6, b / bw * 1e3)
      end
    end
    return table.concat(t, '; ')
  end)())
end

if opt.cpu then bench_cpu() else bench_gpu() end
if opt.out then
  local f = assert(io.open(opt.out, 'w'))
  f:write(table.concat(lines, '\n') .. '\n')
  f:close()
end
