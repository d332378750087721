-- bench/cpu.lua: CPU timings of fastattn's dense kernels, the same shapes as bench/peers/torch_cpu.py.
--
--   bin/fastattn bench/cpu.lua [--threads N] [--runs N] [--rounds R] [--quick] [--only SUBSTRING]
--                              [--compare torch.tsv | --torch] [--tsv FILE]                       (--help: all)
--
-- Prints a table of wall-clock milliseconds (forward, and forward + backward): the median of N timed runs
-- after 2 warm-up runs (bench/lib.lua's cpuTime), taken R times (default 3) and the smallest of those medians
-- reported, so that a round disturbed by another process on a shared machine does not count. --quick: 3 runs,
-- 1 round (a smoke test, not a measurement).
-- With --compare, reads the TSV that `torch_cpu.py --tsv` writes and adds PyTorch's times and the ratios
-- (ours / torch: below 1 means faster); --torch runs bench/peers/torch_cpu.py first (same threads, runs and
-- rounds) and compares with it; --tsv writes our times in the same TSV format. Threads: N OpenMP threads
-- (default 2); OpenBLAS runs single-threaded inside them (c/matmul.c).
local fa = require 'fastattn'
local ffi = require 'ffi'
local bench = require 'bench.lib'
local C = fa.C

local opts = bench.args({
  prog = 'bench/cpu.lua',
  usage = 'bin/fastattn bench/cpu.lua [options]',
  about = "CPU timings of fastattn's dense kernels (conv2d, linear, layer norm, softmax, grid_sample), forward\n" ..
          'and forward + backward, optionally beside PyTorch on the CPU with the same threads.',
  footer = '`make bench-cpu` runs it.',
  options = {
    { 'threads', 'int', 2, min = 1, help = 'OpenMP threads' },
    { 'runs', 'int', 11, min = 1, help = 'timed runs per median' },
    { 'rounds', 'int', 3, min = 1, help = 'medians taken; the smallest is reported' },
    { 'quick', 'flag', help = 'a smoke test: 3 runs, 1 round' },
    { 'only', 'string', nil, help = 'only the cases whose name and shape contain this' },
    { 'compare', 'file', nil, help = "PyTorch's times from this file (torch_cpu.py --tsv)" },
    { 'torch', 'flag', help = 'run bench/peers/torch_cpu.py now and compare with it' },
    { 'python', 'string', nil, meta = 'PATH', default_text = '$PYTHON or python3', help = 'python with torch (--torch)' },
    { 'tsv', 'path', nil, help = 'write our times as TSV (the format of --compare)' },
  },
  check = function(o)
    if o.compare and o.torch then return 'options --compare and --torch: give one of them' end
  end,
}, arg)
if opts.quick then opts.runs, opts.rounds = 3, 1 end
fa.setNumThreads(opts.threads)

local function median_time(fn, runs) return bench.cpuTime(fn, { runs = runs, warmup = 2, budget = 20 }) end

local cases = {}
local function case(name, shape, setup) cases[#cases + 1] = { name = name, shape = shape, setup = setup } end

local function conv_case(name, shape, N, Cin, Hh, W, O, k, stride, pad, groups)
  case(name, shape, function()
    fa.manualSeed(1)
    local x = fa.randn(N, Cin, Hh, W)
    local w = fa.randn(O, Cin / groups, k, k):scale(1 / math.sqrt(Cin / groups * k * k))
    local b = fa.randn(O)
    local p = ffi.new('fa_conv2d_params', { stride, stride, pad, pad, 1, 1, groups })
    local Ho, Wo = math.floor((Hh + 2 * pad - k) / stride) + 1, math.floor((W + 2 * pad - k) / stride) + 1
    local out, gout = fa.empty(N, O, Ho, Wo), fa.randn(N, O, Ho, Wo)
    local gx, gw, gb = fa.empty(x:size()), fa.zeros(w:size()), fa.zeros(O)
    local function fwd() fa.check(C.fa_conv2d_forward(out.desc, x.desc, w.desc, b.desc, p)) end
    return fwd, function()
      fwd()
      fa.check(C.fa_conv2d_backward(gx.desc, gw.desc, gb.desc, gout.desc, x.desc, w.desc, p))
    end
  end)
end

conv_case('conv2d 3x3 pad 1', '1x512x64x64 -> 512', 1, 512, 64, 64, 512, 3, 1, 1, 1)
conv_case('conv2d 3x3 pad 1', '1x128x64x64 -> 128', 1, 128, 64, 64, 128, 3, 1, 1, 1)
conv_case('conv2d depthwise 6x6 s4 p1', '1x512x64x64, groups 512', 1, 512, 64, 64, 512, 6, 4, 1, 512)

case('linear', '4096x512 -> 512', function()
  fa.manualSeed(2)
  local x, w, b = fa.randn(4096, 512), fa.randn(512, 512):scale(1 / math.sqrt(512)), fa.randn(512)
  local out, gout = fa.empty(4096, 512), fa.randn(4096, 512)
  local gx, gw, gb = fa.empty(4096, 512), fa.zeros(512, 512), fa.zeros(512)
  local function fwd() fa.check(C.fa_linear_forward(out.desc, x.desc, w.desc, b.desc)) end
  return fwd, function()
    fwd()
    fa.check(C.fa_linear_backward(gx.desc, gw.desc, gb.desc, gout.desc, x.desc, w.desc))
  end
end)

case('layer norm', '4096x512, over 512', function()
  fa.manualSeed(3)
  local x, w, b = fa.randn(4096, 512), fa.randn(512), fa.randn(512)
  local out, mean, rstd, gout = fa.empty(4096, 512), fa.empty(4096), fa.empty(4096), fa.randn(4096, 512)
  local gx, gw, gb = fa.empty(4096, 512), fa.zeros(512), fa.zeros(512)
  local function fwd() fa.check(C.fa_layernorm_forward(out.desc, mean.desc, rstd.desc, x.desc, w.desc, b.desc, 512, 1e-5)) end
  return fwd, function()
    fwd()
    fa.check(C.fa_layernorm_backward(gx.desc, gw.desc, gb.desc, gout.desc, x.desc, mean.desc, rstd.desc, w.desc, 512))
  end
end)

case('softmax', '8x4096x256, last dim', function()
  fa.manualSeed(4)
  local x, out, gout, gx = fa.randn(8, 4096, 256), fa.empty(8, 4096, 256), fa.randn(8, 4096, 256), fa.empty(8, 4096, 256)
  local function fwd() fa.check(C.fa_softmax_forward(out.desc, x.desc, 2, 0)) end
  return fwd, function()
    fwd()
    fa.check(C.fa_softmax_backward(gx.desc, gout.desc, out.desc, 2, 0))
  end
end)

case('grid_sample bilinear', '1x512x64x64, grid 16x16', function()
  fa.manualSeed(5)
  local input = fa.randn(1, 512, 64, 64)
  local grid = fa.rand(1, 16, 16, 2):scale(2.2, -1.1) -- a few points outside [-1, 1]
  local out, gout = fa.empty(1, 512, 16, 16), fa.randn(1, 512, 16, 16)
  local gin, ggrid = fa.empty(1, 512, 64, 64), fa.empty(1, 16, 16, 2)
  local function fwd() fa.check(C.fa_grid_sample_forward(out.desc, input.desc, grid.desc, 0, 0)) end
  return fwd, function()
    fwd()
    fa.check(C.fa_grid_sample_backward(gin.desc, ggrid.desc, gout.desc, input.desc, grid.desc, 0, 0))
  end
end)

-- PyTorch's numbers, from `torch_cpu.py --tsv`: name \t shape \t fwd_ms \t fwdbwd_ms
local peer, peer_note = {}, nil
local compare = opts.compare
if opts.torch then
  compare = os.tmpname()
  local _, err = bench.runPeer('torch_cpu.py', string.format("--threads %d --runs %d --rounds %d --tsv %s%s", opts.threads,
    opts.runs, opts.rounds, compare, opts.only and (" --only '" .. opts.only .. "'") or ''), { python = opts.python })
  if err then peer_note, compare = err, nil end
end
if compare then
  local f = assert(io.open(compare, 'r')) -- checked readable with the options (or written by the peer just now)
  for line in f:lines() do
    local name, shape, a, b = line:match('^([^\t]+)\t([^\t]+)\t([^\t]+)\t([^\t]+)$')
    if name then peer[name .. '|' .. shape] = { tonumber(a), tonumber(b) } end
  end
  f:close()
  if opts.torch then os.remove(compare) end
end
local comparing = compare ~= nil or opts.torch

local function fmt(v) return v and string.format('%9.3f', v) or '      n/a' end
local function ratio(a, b) return (a and b) and string.format('%6.2f', a / b) or '   n/a' end

print(string.format('fastattn %s CPU benchmark: %d threads, best of %d medians of up to %d runs after 2 warm-up runs (ms)',
  fa.version, opts.threads, opts.rounds, opts.runs))
print('OPENBLAS_CORETYPE=' .. tostring(os.getenv('OPENBLAS_CORETYPE')) .. '  OMP_NUM_THREADS=' .. tostring(os.getenv('OMP_NUM_THREADS')))
if peer_note then print('torch peer: ' .. peer_note) end
local tsv = {}
local header = string.format('%-28s %-26s %9s %9s', 'op', 'shape', 'fwd', 'fwd+bwd')
if comparing then header = header .. string.format(' %9s %9s %6s %6s', 'torch fwd', 'torch f+b', 'ratio', 'ratio') end
print(header)
for _, c in ipairs(cases) do
  if not opts.only or (c.name .. ' ' .. c.shape):find(opts.only, 1, true) then
    local ok, fwd, both = pcall(c.setup)
    local tf, tb, err
    if ok then
      ok, err = pcall(function()
        for _ = 1, opts.rounds do
          tf = math.min(tf or math.huge, median_time(fwd, opts.runs) * 1e3)
          tb = math.min(tb or math.huge, median_time(both, opts.runs) * 1e3)
        end
      end)
    else err = fwd end
    local line = string.format('%-28s %-26s %s %s', c.name, c.shape, fmt(tf), fmt(tb))
    if comparing then
      local p = peer[c.name .. '|' .. c.shape] or {}
      line = line .. string.format(' %s %s %s %s', fmt(p[1]), fmt(p[2]), ratio(tf, p[1]), ratio(tb, p[2]))
    end
    if not ok then line = line .. '  (' .. tostring(err):gsub('\n.*', '') .. ')' end
    print(line)
    if tf and tb then tsv[#tsv + 1] = string.format('%s\t%s\t%.4f\t%.4f\n', c.name, c.shape, tf, tb) end
    collectgarbage()
  end
end
if opts.tsv then bench.write(opts.tsv, table.concat(tsv)) end
