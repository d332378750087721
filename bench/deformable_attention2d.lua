-- bench/deformable_attention2d.lua: nn.DeformableAttention2D (forward, forward + backward to the input and every
-- parameter) and its fused CPB (fa.cpb) against a PyTorch module of the same data flow and, where they are on the
-- PYTHONPATH, lucidrains' DeformableAttention2D and the GQA variant's, in one run.
--
--   bin/fastattn bench/deformable_attention2d.lua          GPU: the README size and 8x128x32x32, float32, TF32, bfloat16
--   bin/fastattn bench/deformable_attention2d.lua --cpu    CPU: a reduced size, float32, against torch on the CPU
--   bin/fastattn bench/deformable_attention2d.lua --check  our output against each peer's, same weights (float64, CPU)
-- options: --configs 1x512x64x64:8:2:64  --dtypes float32,tf32,bfloat16  --reps 15  --peer 0  --python PATH
--          --out FILE (markdown)  --tsv FILE  --threads N  --rounds 3    (--help: all)
--
-- A config is BxDIMxHxW:heads:num_groups:dim_head, the other options the reference's defaults (downsample factor 4,
-- offset kernel 6, offset_groups = heads). Input and output gradient ~ N(0, 1), PyTorch's default initialisation.
-- 'tf32' is float32 under fa.cuda.allowTF32(true) (the peers with torch's allow_tf32); 16-bit: the module in that
-- dtype (the positions and the bias float32, as the layer keeps them).
-- GPU timing (bench/lib.lua's gpuTimer): CUDA events, the L2 flushed before every call, 3 warm-up calls, the lower
-- median of --reps calls. The module keeps its buffers, so the timed calls allocate nothing. Extra memory: the
-- peak allocation of one forward + backward of a fresh module above what was allocated before it (its
-- parameters, the input and the output gradient): its kept buffers, the output and every gradient included.
-- CPB: P*N*M pairs (P = B*heads), each 2*(2C + C^2 + C*O) FLOPs forward (C = dim/4, O = heads/G); its TFLOP/s
-- against an 8192^3 bf16 fa.matmul timed the same way in the same run.
local fa = require 'fastattn'
local bench = require 'bench.lib'

local opt = bench.args({
  prog = 'bench/deformable_attention2d.lua',
  usage = 'bin/fastattn bench/deformable_attention2d.lua [--cpu | --check] [options]',
  about = 'nn.DeformableAttention2D and fa.cpb against a PyTorch module of the same data flow and lucidrains\' and\n' ..
          'the GQA variant\'s modules (where importable), on the GPU (needs a CUDA GPU) or, with --cpu, on the CPU.',
  footer = '`make bench` runs it. bench/RESULTS.md has the numbers and what they mean.',
  options = {
    { 'cpu', 'flag', help = 'the CPU comparison (float32, against torch on the CPU) instead of the GPU one' },
    { 'check', 'flag', help = 'only compare our output with each available peer\'s, same weights (float64, CPU)' },
    { 'configs', 'list', nil, default_text = '1x512x64x64:8:2:64,8x128x32x32:4:2:32 (GPU), 1x64x32x32:4:2:16 (CPU)',
      help = 'BxDIMxHxW:heads:num_groups:dim_head' },
    { 'dtypes', 'list', { 'float32', 'tf32', 'bfloat16' }, choices = { 'float32', 'tf32', 'bfloat16', 'float16' },
      help = 'GPU dtypes (the CPU runs float32)' },
    { 'reps', 'int', nil, min = 1, default_text = '15 (GPU), 5 (CPU)', help = 'timed calls (the median is reported)' },
    { 'peer', 'choice', '1', choices = { '0', '1' }, help = 'run the PyTorch peers (0: skip them)' },
    { 'python', 'string', nil, meta = 'PATH', default_text = '$PYTHON or python3', help = 'python with torch for the peers' },
    { 'out', 'path', nil, help = 'also write the markdown output here' },
    { 'tsv', 'path', nil, help = 'also write the result table as tab-separated text here' },
    { 'threads', 'int', nil, min = 1, default_text = 'all cores', help = 'CPU threads, ours and torch (--cpu)' },
    { 'rounds', 'int', 3, min = 1, help = 'CPU: medians taken, the smallest reported' },
  },
}, arg)
if not opt.cpu and not opt.check then
  bench.needGPU('bench/deformable_attention2d.lua', 'or use --cpu for the CPU comparison')
end
local CONFIGS = opt.configs or (opt.cpu and { '1x64x32x32:4:2:16' } or { '1x512x64x64:8:2:64', '8x128x32x32:4:2:32' })
local REPS = opt.reps or (opt.cpu and 5 or 15)
local fmt = bench.fmt
local R = bench.report()
local result

local function parse(s)
  local B, dim, H, W, heads, ng, dh = s:match('^(%d+)x(%d+)x(%d+)x(%d+):(%d+):(%d+):(%d+)$')
  if not B then
    io.stderr:write(string.format('bench/deformable_attention2d.lua: option --configs: expected BxDIMxHxW:heads:' ..
                                  'num_groups:dim_head, got "%s"\n', s))
    os.exit(1)
  end
  return { B = tonumber(B), dim = tonumber(dim), H = tonumber(H), W = tonumber(W), heads = tonumber(heads),
           num_groups = tonumber(ng), dim_head = tonumber(dh) }
end

local function layer(c) return fa.nn.DeformableAttention2D{ dim = c.dim, heads = c.heads, num_groups = c.num_groups,
                                                             dim_head = c.dim_head } end

-- the CPB's forward FLOPs
local function cpb_flops(c)
  local Hk, Wk = math.floor(c.H / 4), math.floor(c.W / 4)
  local C, O = math.floor(c.dim / 4), 1
  return c.B * c.heads * c.H * c.W * Hk * Wk * 2 * (2 * C + C * C + C * O)
end

-- runs bench/peers/deform2d_torch.py: its JSON lines as tables, and its info line or why not
local function run_peer(args)
  return bench.peerRecords('deform2d_torch.py', args, { python = opt.python, skip = opt.peer == '0' })
end

local peer_ms = bench.peerMs

---------------------------------------------------------------------------- --check
local function run_check()
  local cs = CONFIGS[1] or '1x32x16x16:4:2:8'
  if not opt.configs then cs = '1x32x16x16:4:2:8' end
  local c = parse(cs)
  fa.manualSeed(1)
  local m = layer(c):double()
  local t = m:stateDict()
  t.x = fa.randn(c.B, c.dim, c.H, c.W, 'float64')
  t.output = m:forward(t.x):clone()
  local path = os.tmpname()
  fa.save(path, t, { config = cs })
  local recs, info = run_peer('--check ' .. path)
  os.remove(path)
  R:line(string.format('## nn.DeformableAttention2D against the peers, same weights: %s, float64, CPU', cs))
  R:line('')
  R:line('peer: ' .. tostring(info))
  R:line('')
  result = bench.table({ { 'peer' }, { 'max |ours - peer|', right = true }, { 'max |output|', right = true } })
  for _, r in ipairs(recs) do
    if r.impl == 'check' then
      result:add({ r.peer, r.error or string.format('%.3g', r.max_abs_diff), fmt(r.max_abs, 3) })
    end
  end
  R:lines_of(result:markdown())
end

---------------------------------------------------------------------------- timing
-- our module on the device in dtype: fwd, fwd+bwd (ms), the CPB's forward (ms) and the extra memory (bytes)
local function ours(c, dtype, device, time)
  local tf32 = dtype == 'tf32'
  local dt = tf32 and 'float32' or dtype
  if tf32 then fa.cuda.allowTF32(true) end
  local r = {}
  local ok, err = pcall(function()
    fa.manualSeed(0)
    local m = layer(c):to(dt, device)
    local x = fa.randn({ c.B, c.dim, c.H, c.W }, { dtype = 'float32', device = device }):to(dt)
    local gy = fa.randn({ c.B, c.dim, c.H, c.W }, { dtype = 'float32', device = device }):to(dt)
    r.fwd = time(function() m:forward(x) end)
    r.fb = time(function() m:forward(x); m:backward(x, gy) end)
    local w1, w2, w3 = m:_mlp()
    local kp = m._kpos:view(m._kpos:size(1), -1, 2)
    local qp, bias = m._const.qpos, m._bias
    r.cpb = time(function()
      fa.cpb(qp, kp, w1.weight, w1.bias, w2.weight, w2.bias, w3.weight, w3.bias, { out = bias })
    end)
    if device == 'cuda' then
      local m2 = layer(c):to(dt, device)
      r.mem = bench.extraMemory(function()
        m2:forward(x)
        m2:backward(x, gy)
      end)
    end
  end)
  if tf32 then fa.cuda.allowTF32(false) end
  if not ok then r.err = tostring(err):gsub('\n', ' ') end
  return r
end

local function bench_run(device)
  local threads = opt.threads or fa.getNumThreads()
  local time, free, gemm_tf
  if device == 'cuda' then
    local t
    t, free = bench.gpuTimer{ reps = REPS }
    time = function(f) return t(function() f() end) end
    local GN = 8192
    local a = fa.randn({ GN, GN }, { dtype = 'float32', device = 'cuda' }):to('bfloat16')
    local c = fa.empty({ GN, GN }, { dtype = 'bfloat16', device = 'cuda' })
    gemm_tf = 2 * GN ^ 3 / (time(function() fa.check(fa.C.fa_matmul_forward(c.desc, a.desc, a.desc, 0, 0, 1, 0)) end)
                            * 1e-3) / 1e12
    a, c = nil, nil
    collectgarbage()
    R:line(string.format('## nn.DeformableAttention2D on %s; 8192³ bf16 fa.matmul %.0f TFLOP/s (the CPB %% base); L2 '
                         .. 'flushed before every call', fa.cuda.deviceName(), gemm_tf))
  else
    fa.setNumThreads(threads)
    time = function(f) return bench.cpuBest(f, opt.rounds, REPS) end
    R:line(string.format('## nn.DeformableAttention2D on the CPU, float32, %d threads; the smallest of %d medians of %d '
                         .. 'runs', threads, opt.rounds, REPS))
  end
  R:line('')
  local dtypes = device == 'cuda' and opt.dtypes or { 'float32' }
  local rows = bench.cases{ configs = CONFIGS, dtypes = dtypes, parse = parse, device = device,
                            run = function(c, dtype) return ours(c, dtype, device, time) end,
                            note = function(r)
                              return string.format('fwd %.3f ms, fwd+bwd %.3f ms, cpb %.3f ms', r.fwd, r.fb, r.cpb)
                            end }
  if free then free() end
  -- the peers (tf32 runs as float32 with torch's TF32 switch: a second call)
  local peer, info = {}, nil
  local function add_peer(dts, tf32)
    if #dts == 0 then return end
    local recs
    recs, info = run_peer(string.format('--device %s --configs %s --dtypes %s --reps %d --rounds %d --tf32 %d%s', device,
      table.concat(CONFIGS, ','), table.concat(dts, ','), REPS, opt.rounds, tf32 and 1 or 0,
      device == 'cpu' and (' --threads ' .. threads) or ''))
    for _, p in ipairs(recs) do
      if p.config then peer[p.impl .. '/' .. p.config .. '/' .. (tf32 and 'tf32' or p.dtype)] = p end
    end
  end
  local plain, has_tf32 = {}, false
  for _, d in ipairs(dtypes) do if d == 'tf32' then has_tf32 = true else plain[#plain + 1] = d end end
  add_peer(plain, false)
  if has_tf32 then add_peer({ 'float32' }, true) end
  R:line('peer: ' .. tostring(info))
  R:line('')
  result = bench.table({ { 'config' }, { 'dtype' }, { 'fwd ms', right = true }, { 'fwd+bwd ms', right = true },
                         { 'CPB fwd ms', right = true }, { 'CPB TFLOP/s', right = true }, { 'CPB % bf16 GEMM', right = true },
                         { 'extra MB fwd+bwd', right = true }, { 'torch fwd ms', right = true },
                         { 'torch fwd+bwd ms', right = true }, { 'vs torch fwd', right = true },
                         { 'vs torch fwd+bwd', right = true }, { 'lucidrains fwd / fwd+bwd ms', right = true },
                         { 'gqa fwd / fwd+bwd ms', right = true }, { 'torch extra MB fwd+bwd', right = true } })
  for _, r in ipairs(rows) do
    if r.err then
      result:add({ r.config, r.dtype, 'error: ' .. r.err })
    else
      local c = parse(r.config)
      local tf = cpb_flops(c) / (r.cpb * 1e-3) / 1e12
      local key = '/' .. r.config .. '/' .. r.dtype
      local t, l, g = peer['torch' .. key], peer['lucidrains' .. key], peer['gqa' .. key]
      result:add({ r.config, r.dtype, fmt(r.fwd, 3), fmt(r.fb, 3), fmt(r.cpb, 3), fmt(tf, 2),
                   gemm_tf and bench.pct(tf, gemm_tf) or '-', r.mem and fmt(r.mem / 1e6, 1) or '-',
                   peer_ms(t, 'fwd'), peer_ms(t, 'fwdbwd'), bench.ratio(t and t.fwd_ms, r.fwd, 1, 'x'),
                   bench.ratio(t and t.fwdbwd_ms, r.fb, 1, 'x'), peer_ms(l, 'fwd') .. ' / ' .. peer_ms(l, 'fwdbwd'),
                   peer_ms(g, 'fwd') .. ' / ' .. peer_ms(g, 'fwdbwd'), fmt(t and t.extra_mb_fwdbwd, 1) })
    end
  end
  R:lines_of(result:markdown())
  R:line('')
  R:line('vs torch: the PyTorch module\'s time over ours (above 1: ours is faster). Extra memory: the peak above the '
         .. 'parameters, input and output gradient, with the outputs, gradients and (ours) the kept buffers.')
end

if opt.check then run_check() else bench_run(opt.cpu and 'cpu' or 'cuda') end
if opt.out then R:save(opt.out) end
if opt.tsv and result then bench.write(opt.tsv, result:tsv()) end
