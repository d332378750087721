-- bench/deform_sdpa.lua: the fused deformable scaled-dot-product attention (fa.deform_sdpa, forward; forward +
-- fa.deform_sdpa_backward with every gradient, the coordinates' included) against the PyTorch reference (grid_sample
-- per view + softmax attention) and, where it is on the PYTHONPATH, the Triton peer (its module ops.triton), in one
-- run.
--
--   bin/fastattn bench/deform_sdpa.lua          GPU: 2:8:32:8:32:18x18 (DESIGN §6) and the peer's README config
--                                               2:8:32:16:32:14x14, float32 and bfloat16
--   bin/fastattn bench/deform_sdpa.lua --cpu    CPU: a reduced size, float32, against torch on the CPU (same threads)
--   bin/fastattn bench/deform_sdpa.lua --check  our output and gradients against the PyTorch reference's (float64, CPU)
-- options: --configs 2:8:32:8:32:18x18  --dtypes float32,bfloat16  --reps 15  --peer 0  --python PATH
--          --out FILE (markdown)  --tsv FILE  --threads N  --rounds 3  --deterministic    (--help: all)
--
-- A config is B:views:samples:heads:dim_head:HxW: q, k, v (B, V, heads, H*W, D) ~ N(0, 1), coords
-- (B, V, H*W, V, S, 2) uniform in [0, 1] (float32), scale dim_head^-1/2, the output gradient ~ N(0, 1).
-- GPU timing (bench/lib.lua's gpuTimer): CUDA events, the L2 flushed before every call, 3 warm-up calls, the lower
-- median of --reps calls. Outputs and gradients go into buffers made once, so the timed calls allocate nothing.
-- Extra memory: the peak allocation of one forward (fwd) and one forward + backward (fwd+bwd) above the inputs
-- (q, k, v, coords, output gradient), outputs, log-sum-exp and gradients included. Floor: the bytes the forward
-- must move at least (q, k, v and coords read once, out and lse written once) over the copy bandwidth measured in
-- the same run. The Triton peer's fwd+bwd has no coordinates' gradient (it returns none); ours and torch's have it.
local fa = require 'fastattn'
local bench = require 'bench.lib'

local opt = bench.args({
  prog = 'bench/deform_sdpa.lua',
  usage = 'bin/fastattn bench/deform_sdpa.lua [--cpu | --check] [options]',
  about = 'fa.deform_sdpa (fused deformable scaled-dot-product attention) against the PyTorch grid_sample\n' ..
          'reference and the Triton peer (where importable), on the GPU (needs a CUDA GPU) or, with --cpu, on the CPU.',
  footer = 'bench/RESULTS.md has the numbers and what they mean.',
  options = {
    { 'cpu', 'flag', help = 'the CPU comparison (float32, against torch on the CPU) instead of the GPU one' },
    { 'check', 'flag', help = 'only compare our output and gradients with the peers\' (float64, CPU)' },
    { 'configs', 'list', nil, default_text = '2:8:32:8:32:18x18,2:8:32:16:32:14x14 (GPU), 1:4:8:4:32:12x12 (CPU)',
      help = 'B:views:samples:heads:dim_head:HxW' },
    { 'dtypes', 'list', { 'float32', 'bfloat16' }, choices = { 'float32', 'bfloat16', 'float16' },
      help = 'GPU dtypes (the CPU runs float32)' },
    { 'reps', 'int', nil, min = 1, default_text = '15 (GPU), 5 (CPU)', help = 'timed calls (the median is reported)' },
    { 'peer', 'choice', '1', choices = { '0', '1' }, help = 'run the PyTorch and Triton peers (0: skip them)' },
    { 'python', 'string', nil, meta = 'PATH', default_text = '$PYTHON or python3',
      help = 'python with torch for the peers' },
    { 'out', 'path', nil, help = 'also write the markdown output here' },
    { 'tsv', 'path', nil, help = 'also write the result table as tab-separated text here' },
    { 'threads', 'int', nil, min = 1, default_text = 'all cores', help = 'CPU threads, ours and torch (--cpu)' },
    { 'rounds', 'int', 3, min = 1, help = 'CPU: medians taken, the smallest reported' },
    { 'deterministic', 'flag', help = 'our backward with opts.deterministic (bit-identical run to run)' },
  },
}, arg)
if not opt.cpu and not opt.check then bench.needGPU('bench/deform_sdpa.lua', 'or use --cpu for the CPU comparison') end
local CONFIGS = opt.configs or (opt.cpu and { '1:4:8:4:32:12x12' } or { '2:8:32:8:32:18x18', '2:8:32:16:32:14x14' })
local REPS = opt.reps or (opt.cpu and 5 or 15)
local fmt = bench.fmt
local R = bench.report()
local result

local function parse(s)
  local B, V, S, NH, D, Hh, W = s:match('^(%d+):(%d+):(%d+):(%d+):(%d+):(%d+)x(%d+)$')
  if not B then
    io.stderr:write(string.format('bench/deform_sdpa.lua: option --configs: expected ' ..
                                  'B:views:samples:heads:dim_head:HxW, got "%s"\n', s))
    os.exit(1)
  end
  return { B = tonumber(B), V = tonumber(V), S = tonumber(S), NH = tonumber(NH), D = tonumber(D), H = tonumber(Hh),
           W = tonumber(W) }
end

-- runs bench/peers/deform_sdpa_torch.py: its JSON lines as tables, and its info line or why not
local function run_peer(args)
  return bench.peerRecords('deform_sdpa_torch.py', args, { python = opt.python, skip = opt.peer == '0' })
end

local peer_ms = bench.peerMs
-- "fwd / fwd+bwd" ms, or the one reason when neither ran for the same reason
local function peer_both(p)
  if p and not p.fwd_ms and not p.fwdbwd_ms and p.error_fwd and p.error_fwd == p.error_fwdbwd then return p.error_fwd end
  return peer_ms(p, 'fwd') .. ' / ' .. peer_ms(p, 'fwdbwd')
end

-- the inputs of config c in dtype on device (coords float32, float64 for float64)
local function inputs(c, dtype, device)
  local L = c.H * c.W
  local cdt = dtype == 'float64' and 'float64' or 'float32'
  local function r(...) return fa.randn({ ... }, { dtype = 'float32', device = device }):to(dtype) end
  local x = { q = r(c.B, c.V, c.NH, L, c.D), k = r(c.B, c.V, c.NH, L, c.D), v = r(c.B, c.V, c.NH, L, c.D) }
  x.coords = fa.rand({ c.B, c.V, L, c.V, c.S, 2 }, { dtype = 'float32', device = device }):to(cdt)
  x.gout = r(c.B, c.V, c.NH, L, c.D)
  return x
end

---------------------------------------------------------------------------- --check
local function run_check()
  local cs = opt.configs and CONFIGS[1] or '1:3:4:2:8:5x7'
  local c = parse(cs)
  fa.manualSeed(1)
  local x = inputs(c, 'float64', 'cpu')
  local scale = 1 / math.sqrt(c.D)
  local out, lse = fa.deform_sdpa(x.q, x.k, x.v, x.coords, c.W, c.H, scale)
  local gq, gk, gv, gc = fa.deform_sdpa_backward(x.gout, x.q, x.k, x.v, x.coords, c.W, c.H, scale, out, lse)
  local path = os.tmpname()
  fa.save(path, { q = x.q, k = x.k, v = x.v, coords = x.coords, grad_out = x.gout, out = out, grad_q = gq, grad_k = gk,
                  grad_v = gv, grad_coords = gc },
          { config = cs, W = tostring(c.W), H = tostring(c.H), scale = string.format('%.17g', scale) })
  local recs, info = run_peer('--check ' .. path)
  os.remove(path)
  R:line(string.format('## fa.deform_sdpa against the peers: %s, float64, CPU', cs))
  R:line('')
  R:line('peer: ' .. tostring(info))
  R:line('')
  result = bench.table({ { 'peer' }, { 'result' }, { 'max |ours - peer|', right = true }, { 'max |peer|', right = true } })
  for _, r in ipairs(recs) do
    if r.impl == 'check' then
      result:add({ r.peer, r.result or '-', r.error or string.format('%.3g', r.max_abs_diff), fmt(r.max_abs, 3) })
    end
  end
  R:lines_of(result:markdown())
end

---------------------------------------------------------------------------- timing
-- ours on the device in dtype: fwd, fwd+bwd (ms) and the extra memory (bytes) of each
local function ours(c, dtype, device, time)
  local r = {}
  local ok, err = pcall(function()
    fa.manualSeed(0)
    local x = inputs(c, dtype, device)
    local scale = 1 / math.sqrt(c.D)
    local out, lse = fa.deform_sdpa(x.q, x.k, x.v, x.coords, c.W, c.H, scale)
    local fo = { out = out, lse = lse }
    local bo = { grad_q = fa.empty_like(x.q), grad_k = fa.empty_like(x.k), grad_v = fa.empty_like(x.v),
                 grad_coords = fa.empty_like(x.coords), deterministic = opt.deterministic or nil }
    local function fwd() fa.deform_sdpa(x.q, x.k, x.v, x.coords, c.W, c.H, scale, fo) end
    local function fb()
      fwd()
      fa.deform_sdpa_backward(x.gout, x.q, x.k, x.v, x.coords, c.W, c.H, scale, out, lse, bo)
    end
    r.fwd, r.fb = time(fwd), time(fb)
    if device == 'cuda' then
      out, lse, fo, bo = nil, nil, nil, nil
      for _, phase in ipairs({ 'fwd', 'fb' }) do
        r['mem_' .. phase] = bench.extraMemory(function()
          local o, l = fa.deform_sdpa(x.q, x.k, x.v, x.coords, c.W, c.H, scale)
          if phase == 'fb' then
            local g = { fa.deform_sdpa_backward(x.gout, x.q, x.k, x.v, x.coords, c.W, c.H, scale, o, l,
                                                { deterministic = opt.deterministic or nil }) }
            assert(#g == 4)
          end
        end)
      end
    end
  end)
  if not ok then r.err = tostring(err):gsub('\n', ' ') end
  return r
end

-- the forward's bytes at least: q, k, v, coords read, out and lse written
local function fwd_bytes(c, dtype)
  local L = c.B * c.V * c.NH * c.H * c.W
  local e = fa.C.fa_dtype_size(fa.dtype_id(dtype))
  return 4 * L * c.D * e + c.B * c.V * c.H * c.W * c.V * c.S * 2 * 4 + L * 4
end

local function bench_run(device)
  local threads = opt.threads or fa.getNumThreads()
  local time, free, bw
  if device == 'cuda' then
    local t
    t, free = bench.gpuTimer{ reps = REPS }
    time = function(f) return t(function() f() end) end
    bw = bench.copyBandwidth()
    R:line(string.format('## fa.deform_sdpa on %s; copy bandwidth %.0f GB/s (the floor); L2 flushed before every call%s',
                         fa.cuda.deviceName(), bw / 1e9, opt.deterministic and '; backward deterministic' or ''))
  else
    fa.setNumThreads(threads)
    time = function(f) return bench.cpuBest(f, opt.rounds, REPS) end
    R:line(string.format('## fa.deform_sdpa on the CPU, float32, %d threads; the smallest of %d medians of %d runs',
                         threads, opt.rounds, REPS))
  end
  R:line('')
  local dtypes = device == 'cuda' and opt.dtypes or { 'float32' }
  local rows = bench.cases{ configs = CONFIGS, dtypes = dtypes, parse = parse, device = device,
                            run = function(c, dtype) return ours(c, dtype, device, time) end,
                            note = function(r) return string.format('fwd %.3f ms, fwd+bwd %.3f ms', r.fwd, r.fb) end }
  if free then free() end
  local peer = {}
  local recs, info = run_peer(string.format('--device %s --configs %s --dtypes %s --reps %d --rounds %d%s', device,
    table.concat(CONFIGS, ','), table.concat(dtypes, ','), REPS, opt.rounds,
    device == 'cpu' and (' --threads ' .. threads) or ''))
  for _, p in ipairs(recs) do
    if p.config then peer[p.impl .. '/' .. p.config .. '/' .. p.dtype] = p end
  end
  R:line('peer: ' .. tostring(info))
  R:line('')
  result = bench.table({ { 'config' }, { 'dtype' }, { 'fwd ms', right = true }, { 'fwd floor', right = true },
                         { 'fwd+bwd ms', right = true }, { 'extra MB fwd / fwd+bwd', right = true },
                         { 'torch fwd / fwd+bwd ms', right = true }, { 'vs torch fwd / fwd+bwd', right = true },
                         { 'torch extra MB fwd / fwd+bwd', right = true }, { 'triton fwd / fwd+bwd ms', right = true },
                         { 'vs triton fwd / fwd+bwd', right = true }, { 'triton extra MB fwd / fwd+bwd', right = true } })
  local function mb(a, b) return fmt(a and a / 1e6, 1) .. ' / ' .. fmt(b and b / 1e6, 1) end
  for _, r in ipairs(rows) do
    if r.err then
      result:add({ r.config, r.dtype, 'error: ' .. r.err })
    else
      local c = parse(r.config)
      local key = '/' .. r.config .. '/' .. r.dtype
      local t, tr = peer['torch' .. key], peer['triton' .. key]
      local floor = bw and bench.pct(fwd_bytes(c, r.dtype) / bw * 1e3, r.fwd) or '-'
      local function vs(p)
        return bench.ratio(p and p.fwd_ms, r.fwd, 1, 'x') .. ' / ' .. bench.ratio(p and p.fwdbwd_ms, r.fb, 1, 'x')
      end
      local function pmb(p) return fmt(p and p.extra_mb_fwd, 1) .. ' / ' .. fmt(p and p.extra_mb_fwdbwd, 1) end
      result:add({ r.config, r.dtype, fmt(r.fwd, 3), floor, fmt(r.fb, 3), mb(r.mem_fwd, r.mem_fb),
                   peer_both(t), vs(t), pmb(t), peer_both(tr), vs(tr), pmb(tr) })
    end
  end
  R:lines_of(result:markdown())
  R:line('')
  R:line('vs: the peer\'s time over ours (above 1: ours is faster). Ours and torch\'s fwd+bwd give the gradients of q, k, '
         .. 'v and coords; the Triton peer\'s of q, k, v only. Floor: the forward\'s least bytes over the copy bandwidth, '
         .. 'as a share of our time.')
end

if opt.check then run_check() else bench_run(opt.cpu and 'cpu' or 'cuda') end
if opt.out then R:save(opt.out) end
if opt.tsv and result then bench.write(opt.tsv, result:tsv()) end
