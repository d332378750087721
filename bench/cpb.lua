-- bench/cpb.lua: the fused continuous position bias MLP (fa.cpb, forward and forward+backward) against the
-- PyTorch CPB of lucidrains' DeformableAttention2D (bench/peers/cpb_torch.py), in one run.
--
--   bin/fastattn bench/cpb.lua          GPU: the README layer and the small one; float32, tf32, bfloat16
--   bin/fastattn bench/cpb.lua --cpu    CPU: the same layers with fewer queries (N/16, N/4), float32
-- options: --sizes readme,small  --dtypes float32,tf32,bfloat16  --reps 25  --sets 2  --peer 0  --python PATH
--          --chunk Q (the peer's queries per chunk)  --threads N (CPU)  --out FILE  (--help: all)
--
-- Sizes (issue 10): readme = B 1, dim 512 (C = 128), heads 8, offset_groups 8 (P = 8, O = 1), a 64x64 query grid
-- (N = 4096) and 16x16 keys (M = 256); small = B 8, dim 128 (C = 32), heads 4, groups 4 (P = 32, O = 1),
-- N = 32x32, M = 8x8. Inputs: queries uniform in [-1, 1], keys in [-1.4, 1.4], weights at nn.Linear's scale,
-- grad_bias ~ N(0, 1). dtypes: float32 (exact: 3xTF32 split products on tensor cores), tf32 (float32 under fa.cuda.allowTF32(true)), bfloat16
-- (bfloat16 weights, float32 positions and bias; the peer: torch.autocast).
-- FLOPs per (query, key) pair (the model's, the recompute not counted): forward 2(2C + C² + C·O); backward
-- 2·C·O each for grad w3 and grad h2, 2·C² each for grad w2 and grad h1, 2·2C each for grad w1 and grad d:
-- 4·C·O + 4·C² + 8·C; fwd+bwd the sum. "% GEMM": TFLOP/s over the rate of an 8192³ bf16 fa.matmul in this run.
-- GPU timing: bench/lib.lua's gpuTimer (3 warm-up calls, CUDA events around each call, the L2 flushed by a
-- 256 MiB write before each, the lower median of --reps, rotating over --sets input sets); our calls write into
-- preallocated buffers. The peer times the same way (its activations in query chunks that fit).
local fa = require 'fastattn'
local bench = require 'bench.lib'

local SIZES = {
  readme = { P = 8, N = 4096, M = 256, C = 128, O = 1, cpuN = 256, what = 'B 1, dim 512, heads 8, groups 8, 64x64 q, 16x16 k' },
  small = { P = 32, N = 1024, M = 64, C = 32, O = 1, cpuN = 256, what = 'B 8, dim 128, heads 4, groups 4, 32x32 q, 8x8 k' },
}

local opt = bench.args({
  prog = 'bench/cpb.lua',
  usage = 'bin/fastattn bench/cpb.lua [--cpu] [options]',
  about = 'fa.cpb (the CPB MLP of DeformableAttention2D, forward and forward+backward) against the PyTorch CPB,\n' ..
          'on the GPU (needs a CUDA GPU) or, with --cpu, on the CPU.',
  footer = 'bench/CPB_NOTES.md says what the numbers mean.',
  options = {
    { 'cpu', 'flag', help = 'the CPU comparison (float32, fewer queries) instead of the GPU one' },
    { 'sizes', 'list', { 'readme', 'small' }, choices = { 'readme', 'small' }, help = 'layers' },
    { 'n', 'int', nil, min = 1, default_text = 'the size\'s (GPU), 256 (CPU)', help = 'queries N (overrides)' },
    { 'dtypes', 'list', { 'float32', 'tf32', 'bfloat16' }, choices = { 'float32', 'tf32', 'bfloat16', 'float16' },
      help = 'GPU dtypes (the CPU runs float32)' },
    { 'reps', 'int', nil, min = 1, default_text = '25 (GPU), 5 (CPU)', help = 'timed calls (the median is reported)' },
    { 'sets', 'int', 2, min = 1, help = 'random input sets, rotated (GPU)' },
    { 'peer', 'choice', '1', choices = { '0', '1' }, help = 'run the PyTorch peer (0: skip it)' },
    { 'chunk', 'int', 0, min = 0, help = 'the peer\'s queries per chunk (0: the most that fit)' },
    { 'python', 'string', nil, meta = 'PATH', default_text = '$PYTHON or python3', help = 'python with torch for the peer' },
    { 'threads', 'int', nil, min = 1, default_text = 'all cores', help = 'CPU threads, ours and torch (--cpu)' },
    { 'out', 'path', nil, help = 'also write the markdown output here' },
  },
}, arg)
if not opt.cpu then bench.needGPU('bench/cpb.lua', 'or use --cpu for the CPU comparison') end
local REPS = opt.reps or (opt.cpu and 5 or 25)
local device = opt.cpu and 'cpu' or 'cuda'
if opt.cpu and opt.threads then fa.setNumThreads(opt.threads) end

local function flops(s)
  local pairs_ = s.P * s.N * s.M
  local f = 2 * (2 * s.C + s.C * s.C + s.C * s.O)
  local b = 4 * s.C * s.O + 4 * s.C * s.C + 8 * s.C
  return f * pairs_, (f + b) * pairs_
end
local function tflops(fl, ms) return ms and fl / (ms * 1e-3) / 1e12 end

-- one input set: weights in `wdtype`, positions and grad_bias float32 (float32 throughout on the CPU)
local function make_set(s, wdtype, seed)
  fa.manualSeed(seed)
  local function r(...) return fa.rand({ ... }, { dtype = 'float32', device = device }) end
  local function n(...) return fa.randn({ ... }, { dtype = 'float32', device = device }) end
  local x = { qpos = r(s.N, 2) * 2 - 1, kpos = r(s.P, s.M, 2) * 2.8 - 1.4 }
  local w = { w1 = n(s.C, 2) * 0.7, b1 = n(s.C) * 0.7, w2 = n(s.C, s.C) * (1 / math.sqrt(s.C)), b2 = n(s.C) * 0.1,
              w3 = n(s.O, s.C) * (1 / math.sqrt(s.C)), b3 = n(s.O) * 0.1 }
  for k, v in pairs(w) do x[k] = wdtype ~= 'float32' and v:to(wdtype) or v end
  x.grad = n(s.P, s.O, s.N, s.M)
  return x
end

local function buffers(s, wdtype)
  local function e(...) return fa.empty({ ... }, { dtype = wdtype, device = device }) end
  return { out = fa.empty({ s.P, s.O, s.N, s.M }, { dtype = 'float32', device = device }),
           grad = { grad_kpos = fa.empty({ s.P, s.M, 2 }, { dtype = 'float32', device = device }),
                    grad_w1 = e(s.C, 2), grad_b1 = e(s.C), grad_w2 = e(s.C, s.C), grad_b2 = e(s.C),
                    grad_w3 = e(s.O, s.C), grad_b3 = e(s.O) } }
end

local function fwd(x, b) fa.cpb(x.qpos, x.kpos, x.w1, x.b1, x.w2, x.b2, x.w3, x.b3, { out = b.out }) end
local function fwdbwd(x, b)
  fwd(x, b)
  fa.cpb_backward(x.grad, x.qpos, x.kpos, x.w1, x.b1, x.w2, x.b2, x.w3, x.b3, b.grad)
end

-- the peer: fwd ms, fwd+bwd ms (or the reason), its chunk
local function peer(s, dtype)
  if opt.peer == '0' then return nil, nil, 'skipped' end
  local args = string.format('%d %d %d %d %d --device %s --dtype %s --reps %d --chunk %d%s', s.P, s.N, s.M, s.C, s.O,
                             device, dtype, REPS, opt.chunk, opt.threads and (' --threads ' .. opt.threads) or '')
  local lines, err = bench.runPeer('cpb_torch.py', args, { python = opt.python })
  if err then return nil, nil, err end
  local a, b, c = (lines[#lines] or ''):match('^(%S+) (%S+) (%d+)$')
  return tonumber(a) or a, tonumber(b) or b, c
end

local function cell(v, digits) return type(v) == 'number' and bench.fmt(v, digits) or (v or '-') end

local R = bench.report()
local T = bench.table({ { 'layer' }, { 'dtype' }, { 'pairs', right = true }, { 'fwd ms', right = true },
                        { 'TFLOP/s', right = true }, { '% GEMM', right = true }, { 'fwd+bwd ms', right = true },
                        { 'TFLOP/s', right = true }, { '% GEMM', right = true }, { 'torch fwd ms', right = true },
                        { 'torch f+b ms', right = true }, { 'fwd x', right = true }, { 'f+b x', right = true } })

local time, gemm_tf
if opt.cpu then
  time = function(fn) return bench.cpuTime(function() fn(1) end, { runs = REPS, warmup = 1 }) * 1e3 end
  R:line(string.format('## fa.cpb on the CPU (%d threads), float32; queries N = %s (the GPU layers have 4096 and 1024)',
                       fa.getNumThreads and fa.getNumThreads() or 0, opt.n or 256))
else
  local free
  time, free = bench.gpuTimer{ reps = REPS }
  local GN = 8192
  local a = fa.randn({ GN, GN }, { dtype = 'float32', device = 'cuda' }):to('bfloat16')
  local b = fa.randn({ GN, GN }, { dtype = 'float32', device = 'cuda' }):to('bfloat16')
  local c = fa.empty({ GN, GN }, { dtype = 'bfloat16', device = 'cuda' })
  local ms = time(function() fa.check(fa.C.fa_matmul_forward(c.desc, a.desc, b.desc, 0, 0, 1, 0)) end, 1)
  gemm_tf = tflops(2 * GN ^ 3, ms)
  a, b, c = nil, nil, nil
  collectgarbage()
  R:line(string.format('## fa.cpb on %s; %d³ bf16 fa.matmul %.0f TFLOP/s (the "%% GEMM" base); L2 flushed before every call',
                       fa.cuda.deviceName(), GN, gemm_tf))
end
R:line('')

for _, name in ipairs(opt.sizes) do
  local s = {}
  for k, v in pairs(SIZES[name]) do s[k] = v end
  if opt.n then s.N = opt.n elseif opt.cpu then s.N = s.cpuN end
  local fl_f, fl_fb = flops(s)
  for _, dtype in ipairs(opt.cpu and { 'float32' } or opt.dtypes) do
    local wdtype = dtype == 'tf32' and 'float32' or dtype
    local sets = {}
    for i = 1, opt.cpu and 1 or opt.sets do sets[i] = make_set(s, wdtype, 100 + i) end
    local b = buffers(s, wdtype)
    if dtype == 'tf32' then fa.cuda.allowTF32(true) end
    local ok, err = pcall(function()
      local tf = time(function(k) fwd(sets[k], b) end, #sets)
      local tfb = time(function(k) fwdbwd(sets[k], b) end, #sets)
      local pf, pfb, chunk = peer(s, dtype == 'float16' and 'bfloat16' or dtype)
      local function pct(fl, ms) return gemm_tf and bench.pct(tflops(fl, ms), gemm_tf) or '-' end
      local dig = opt.cpu and 3 or 1
      T:add({ name, dtype, string.format('%.2fM', s.P * s.N * s.M / 1e6), bench.fmt(tf, 3),
              bench.fmt(tflops(fl_f, tf), dig), pct(fl_f, tf), bench.fmt(tfb, 3), bench.fmt(tflops(fl_fb, tfb), dig),
              pct(fl_fb, tfb), cell(pf, 3), cell(pfb, 3),
              type(pf) == 'number' and bench.ratio(pf, tf, 1, 'x') or '-',
              type(pfb) == 'number' and bench.ratio(pfb, tfb, 1, 'x') or '-' })
      if chunk and not tonumber(chunk) then R:line('torch peer: ' .. chunk)
      elseif chunk and tonumber(chunk) < s.N then
        R:line(string.format('torch peer (%s %s): queries in chunks of %s', name, dtype, chunk))
      end
    end)
    if dtype == 'tf32' then fa.cuda.allowTF32(false) end
    if not ok then error(err, 0) end
    sets, b = nil, nil
    collectgarbage()
  end
end
R:line('')
R:lines_of(T:markdown())
R:line('')
R:line('FLOPs per pair: forward 2(2C + C² + C·O), backward 4·C·O + 4·C² + 8·C (the model\'s; our backward also '
       .. 'recomputes the forward up to h2, not counted). "x": torch time / ours.')
for _, name in ipairs(opt.sizes) do
  R:line(string.format('%s: P %d, M %d, C %d, O %d (%s)', name, SIZES[name].P, SIZES[name].M, SIZES[name].C,
                       SIZES[name].O, SIZES[name].what))
end
if opt.out then R:save(opt.out) end
