-- bench/gpu.lua: GPU timings of fastattn's core ops against PyTorch on the same GPU, in one run.
--
--   bin/fastattn bench/gpu.lua [--reps N] [--sets N] [--batches 1,32] [--only SUBSTRING] [--no-torch]
--                              [--torch-tsv FILE] [--python PATH] [--out FILE] [--tsv FILE]     (--help: all)
--
-- Shapes: the DeformableAttention2D README layer (input 1x512x64x64: 4096 tokens of 512 channels, 8 heads,
-- 16x16 downsampled keys) and the same at batch 32. Method (bench/lib.lua's gpuTimer; bench/peers/torch_gpu.py
-- does the same): per op, 3 random input sets rotated; 3 warm-up calls; then --reps (default 25) timed calls,
-- each between two CUDA events and each preceded by a write of a 256 MiB buffer, which evicts the L2 (every
-- timed call starts cold) and keeps the GPU busy while the host queues the timed call, so the time is the
-- kernel's, not the launch path's; the median is reported. Our ops are called through their C entry points
-- with preallocated outputs; PyTorch's through torch.* (which allocate from its caching allocator, off the
-- GPU's critical path).
-- Columns: ours and PyTorch's median ms, their ratio (ours / torch: below 1 is faster), the bytes each op
-- must move (inputs read once, outputs written once) over our time, and that as a percentage of the
-- device-to-device copy bandwidth measured in the same run (the batch-32 copy: 2 x 268 MB); TFLOP/s for
-- the matrix products. Grids: the pixel-centre mesh plus random offsets (+-1 pixel for the 64x64 grid, +-4
-- for the 16x16 one), as the layer's offset network makes them. float32 products without TF32 unless the dtype says tf32 (both sides then allow it).
-- Host overhead: 10 000 calls of a 1-element add from Lua, synchronised once: wall clock per call.
local fa = require 'fastattn'
local ffi = require 'ffi'
local bench = require 'bench.lib'
local C = fa.C
local cuda = fa.cuda

local opts = bench.args({
  prog = 'bench/gpu.lua',
  usage = 'bin/fastattn bench/gpu.lua [options]',
  about = "GPU timings of fastattn's core ops (copy, add, gelu, softmax, layernorm, grid_sample, convs, linear,\n" ..
          "matmul) against PyTorch's on the same GPU, in one run. Needs a CUDA GPU.",
  footer = '`make bench` runs it (then bench/msda.lua).',
  options = {
    { 'reps', 'int', 25, min = 1, help = 'timed calls per op (the median is reported)' },
    { 'sets', 'int', 3, min = 1, help = 'random input sets, rotated' },
    { 'batches', 'ints', { 1, 32 }, min = 1, help = 'batch sizes' },
    { 'only', 'string', nil, help = 'only the ops whose name contains this' },
    { 'no-torch', 'flag', help = 'do not run the PyTorch peer' },
    { 'torch-tsv', 'file', nil, help = "PyTorch's numbers from this file (torch_gpu.py --tsv)" },
    { 'python', 'string', nil, meta = 'PATH', default_text = '$PYTHON or python3', help = 'python with torch for the peer' },
    { 'out', 'path', nil, help = 'also write the markdown tables here' },
    { 'tsv', 'path', nil, help = 'also write the op table as tab-separated text here' },
  },
}, arg)
bench.needGPU('bench/gpu.lua')

local now = bench.now
local time_op, time_free = bench.gpuTimer{ reps = opts.reps }

local function chk(rc)
  if rc ~= 0 then error(ffi.string(C.fa_last_error()), 2) end
end

local function randn(shape, dt)
  local x = fa.randn(shape, { dtype = 'float32', device = 'cuda' })
  return dt == 'float32' and x or x:to(dt)
end
local function empty(shape, dt) return fa.empty(shape, { dtype = dt, device = 'cuda' }) end
local function sets(f)
  local t = {}
  for k = 1, opts.sets do t[k] = f() end
  return t
end
local function numel(s)
  local n = 1
  for _, v in ipairs(s) do n = n * v end
  return n
end
local ES = { float32 = 4, tf32 = 4, bfloat16 = 2, float16 = 2 }
local function storage(dt) return dt == 'tf32' and 'float32' or dt end

-- a sampling grid as DeformableAttention2D makes one: the pixel-centre mesh of Ho x Wo points over the image
-- plus offsets (here uniform in +-jitter, normalised units); x first
local function mesh(N, Ho, Wo, jitter, dt)
  local g = fa.empty({ N, Ho, Wo, 2 }, 'float32')
  local p = ffi.cast('float*', g.desc.data)
  for n = 0, N - 1 do
    for h = 0, Ho - 1 do
      for w = 0, Wo - 1 do
        local o = ((n * Ho + h) * Wo + w) * 2
        p[o], p[o + 1] = (2 * w + 1) / Wo - 1, (2 * h + 1) / Ho - 1
      end
    end
  end
  local gg = g:cuda()
  gg:add_(fa.rand({ N, Ho, Wo, 2 }, { dtype = 'float32', device = 'cuda' }):scale(2 * jitter, -jitter))
  return dt == 'float32' and gg or gg:to(dt)
end

-- each op: make(B, dt) -> fn(k), bytes (or nil), flops (or nil), shape string
local OPS = {}
local function op(name, dts, make) OPS[#OPS + 1] = { name = name, dts = dts, make = make } end

op('copy', { 'float32' }, function(B, dt)
  local s = { B, 512, 64, 64 }
  local xs, y = sets(function() return randn(s, dt) end), empty(s, dt)
  return function(k) chk(C.fa_copy(y.desc, xs[k].desc)) end, 2 * numel(s) * ES[dt], nil, 'Bx512x64x64'
end)
op('add', { 'float32' }, function(B, dt)
  local s = { B, 512, 64, 64 }
  local a, b, c = sets(function() return randn(s, dt) end), sets(function() return randn(s, dt) end), empty(s, dt)
  return function(k) chk(C.fa_binary_forward(0, c.desc, a[k].desc, b[k].desc, 1)) end, 3 * numel(s) * ES[dt], nil, 'Bx512x64x64'
end)
op('gelu', { 'float32' }, function(B, dt)
  local s = { B, 512, 64, 64 }
  local xs, y = sets(function() return randn(s, dt) end), empty(s, dt)
  return function(k) chk(C.fa_unary_forward(9, y.desc, xs[k].desc)) end, 2 * numel(s) * ES[dt], nil, 'Bx512x64x64'
end)
op('softmax', { 'float32', 'bfloat16' }, function(B, dt)
  local s = { B, 8, 4096, 256 }
  local xs, y = sets(function() return randn(s, dt) end), empty(s, dt)
  return function(k) chk(C.fa_softmax_forward(y.desc, xs[k].desc, 3, 0)) end, 2 * numel(s) * ES[dt], nil, 'Bx8x4096x256, last dim'
end)
op('layernorm', { 'float32', 'bfloat16' }, function(B, dt)
  local s = { B, 4096, 512 }
  local xs, y = sets(function() return randn(s, dt) end), empty(s, dt)
  local w, b = randn({ 512 }, dt), randn({ 512 }, dt)
  local m, r = empty({ B * 4096 }, 'float32'), empty({ B * 4096 }, 'float32')
  return function(k) chk(C.fa_layernorm_forward(y.desc, m.desc, r.desc, xs[k].desc, w.desc, b.desc, 512, 1e-5)) end,
    2 * numel(s) * ES[dt] + B * 4096 * 8, nil, 'Bx4096x512, over 512'
end)
op('grid_sample', { 'float32', 'bfloat16' }, function(B, dt)
  local s, gs = { B, 512, 64, 64 }, { B, 64, 64, 2 }
  local xs = sets(function() return randn(s, dt) end)
  local grids = sets(function() return mesh(B, 64, 64, 2 / 64, dt) end)
  local y = empty(s, dt)
  return function(k) chk(C.fa_grid_sample_forward(y.desc, xs[k].desc, grids[k].desc, 0, 0)) end,
    (2 * numel(s) + numel(gs)) * ES[dt], nil, 'Bx512x64x64 at 64x64'
end)
op('grid_sample_dat', { 'float32' }, function(B, dt)
  local s, gs = { B * 8, 64, 64, 64 }, { B * 8, 16, 16, 2 }
  local xs = sets(function() return randn(s, dt) end)
  local grids = sets(function() return mesh(B * 8, 16, 16, 8 / 64, dt) end)
  local y = empty({ B * 8, 64, 16, 16 }, dt)
  -- touches a fraction of the input only: no bytes floor
  return function(k) chk(C.fa_grid_sample_forward(y.desc, xs[k].desc, grids[k].desc, 0, 0)) end, nil, nil, '(8B)x64x64x64 at 16x16'
end)
op('dwconv6x6s4', { 'float32', 'bfloat16' }, function(B, dt)
  local s = { B, 512, 64, 64 }
  local xs = sets(function() return randn(s, dt) end)
  local w, b = randn({ 512, 1, 6, 6 }, dt), randn({ 512 }, dt)
  local y = empty({ B, 512, 16, 16 }, dt)
  local p = ffi.new('fa_conv2d_params', 4, 4, 1, 1, 1, 1, 512)
  return function(k) chk(C.fa_conv2d_forward(y.desc, xs[k].desc, w.desc, b.desc, p)) end,
    (numel(s) + B * 512 * 256 + 512 * 37) * ES[dt], nil, 'Bx512x64x64 -> Bx512x16x16'
end)
op('conv1x1', { 'float32', 'tf32', 'bfloat16' }, function(B, dt)
  local st = storage(dt)
  local s = { B, 512, 64, 64 }
  local xs = sets(function() return randn(s, st) end)
  local w, b = randn({ 512, 512, 1, 1 }, st), randn({ 512 }, st)
  local y = empty(s, st)
  local p = ffi.new('fa_conv2d_params', 1, 1, 0, 0, 1, 1, 1)
  return function(k) chk(C.fa_conv2d_forward(y.desc, xs[k].desc, w.desc, b.desc, p)) end, nil, 2 * B * 4096 * 512 * 512,
    'Bx512x64x64, 512 -> 512'
end)
-- backward of the same 1x1 conv: grad_x, grad_weight and grad_bias (PyTorch: aten's convolution_backward, the
-- call autograd makes)
op('conv1x1_bwd', { 'float32', 'tf32', 'bfloat16' }, function(B, dt)
  local st = storage(dt)
  local s = { B, 512, 64, 64 }
  local xs, gos = sets(function() return randn(s, st) end), sets(function() return randn(s, st) end)
  local w = randn({ 512, 512, 1, 1 }, st)
  local gx, gw, gb = empty(s, st), empty({ 512, 512, 1, 1 }, st):fill(0), empty({ 512 }, st):fill(0)
  local p = ffi.new('fa_conv2d_params', 1, 1, 0, 0, 1, 1, 1)
  return function(k) chk(C.fa_conv2d_backward(gx.desc, gw.desc, gb.desc, gos[k].desc, xs[k].desc, w.desc, p)) end, nil,
    4 * B * 4096 * 512 * 512, 'Bx512x64x64, 512 -> 512, grad x/w/b'
end)
op('linear', { 'float32', 'tf32' }, function(B, dt)
  local st = storage(dt)
  local xs = sets(function() return randn({ B * 4096, 512 }, st) end)
  local w, b = randn({ 512, 512 }, st), randn({ 512 }, st)
  local y = empty({ B * 4096, 512 }, st)
  return function(k) chk(C.fa_linear_forward(y.desc, xs[k].desc, w.desc, b.desc)) end, nil, 2 * B * 4096 * 512 * 512,
    '(4096B)x512 @ 512x512^T + b'
end)
op('matmul', { 'float32', 'tf32', 'bfloat16' }, function(B, dt)
  local st = storage(dt)
  local q = sets(function() return randn({ B * 8, 4096, 64 }, st) end)
  local kk = sets(function() return randn({ B * 8, 256, 64 }, st) end)
  local y = empty({ B * 8, 4096, 256 }, st)
  return function(k) chk(C.fa_matmul_forward(y.desc, q[k].desc, kk[k].desc, 0, 1, 1, 0)) end, nil, 2 * B * 8 * 4096 * 256 * 64,
    '(8B)x4096x64 @ (8B)x64x256'
end)

-- host overhead of a 1-element add from Lua: raw FFI call, in-place Tensor method, allocating operator
local function host_overhead()
  local a, b, c = randn({ 1 }, 'float32'), randn({ 1 }, 'float32'), empty({ 1 }, 'float32')
  local variants = {
    { 'add_out', function() C.fa_binary_forward(0, c.desc, a.desc, b.desc, 1) end },
    { 'add_', function() a:add_(b, 0) end },
    { 'a+b', function() local _ = a + b end },
  }
  local res = {}
  for _, v in ipairs(variants) do
    local f = v[2]
    for _ = 1, 1000 do f() end
    cuda.synchronize()
    local t0 = now()
    for _ = 1, 10000 do f() end
    cuda.synchronize()
    res[#res + 1] = { v[1], (now() - t0) / 10000 * 1e6 }
  end
  return res
end

---------------------------------------------------------------------------- run
local rows = {}
for _, B in ipairs(opts.batches) do
  for _, o in ipairs(OPS) do
    if not opts.only or o.name:find(opts.only, 1, true) then
      for _, dt in ipairs(o.dts) do
        C.fa_cuda_allow_tf32(dt == 'tf32' and 1 or 0)
        local ok, fn, bytes, flops, shape = pcall(o.make, B, dt)
        local row = { name = o.name, dt = dt, B = B, bytes = bytes, flops = flops, shape = shape }
        if ok then
          local ok2, ms = pcall(time_op, fn, opts.sets)
          if ok2 then row.ms = ms else row.err = tostring(ms) end
        else
          row.err = tostring(fn)
        end
        rows[#rows + 1] = row
        fn = nil
        collectgarbage('collect')
        cuda.emptyCache()
      end
    end
  end
end
C.fa_cuda_allow_tf32(0)
local host = host_overhead()
time_free()

-- PyTorch's numbers: from --torch-tsv, or by running the peer now
local torch, peer_note = {}, nil
local lines
if opts.torch_tsv then
  local f = assert(io.open(opts.torch_tsv)) -- checked readable with the options
  lines = {}
  for line in f:lines() do lines[#lines + 1] = line end
  f:close()
elseif not opts.no_torch then
  lines, peer_note = bench.runPeer('torch_gpu.py', string.format('--tsv --reps %d --sets %d --batches %s%s', opts.reps,
    opts.sets, table.concat(opts.batches, ','), opts.only and (" --only '" .. opts.only .. "'") or ''), { python = opts.python, echo = false })
end
for _, line in ipairs(lines or {}) do
  local name, dt, B, ms = line:match('^(%S+)\t(%S+)\t(%d+)\t([%d%.e%-]+)$')
  if name then torch[name .. '|' .. dt .. '|' .. B] = tonumber(ms)
  else io.stderr:write('torch peer: ' .. line .. '\n') end
end

-- copy bandwidth: the largest batch's copy
local copy_bw
for _, r in ipairs(rows) do
  if r.name == 'copy' and r.ms then copy_bw = r.bytes / (r.ms * 1e-3) end
end

local R = bench.report()
R:line(string.format('## fastattn %s vs PyTorch on %s: median of %d, cold L2, %d input sets', fa.version, cuda.deviceName(),
  opts.reps, opts.sets))
if peer_note then R:line('torch peer: ' .. peer_note) end
R:line('')
local T = bench.table({ { 'op' }, { 'dtype' }, { 'B' }, { 'shape' }, { 'ours ms', right = true }, { 'torch ms', right = true },
                        { 'ours/torch', right = true }, { 'GB/s or TFLOP/s', right = true }, { '% of copy BW', right = true } })
for _, r in ipairs(rows) do
  local tm = torch[r.name .. '|' .. r.dt .. '|' .. r.B]
  local rate, pct = '', ''
  if r.ms and r.bytes then
    rate = string.format('%.0f GB/s', r.bytes / (r.ms * 1e-3) / 1e9)
    if copy_bw then pct = bench.pct(r.bytes / copy_bw * 1e3, r.ms) end
  elseif r.ms and r.flops then
    rate = string.format('%.1f TFLOP/s', r.flops / (r.ms * 1e-3) / 1e12)
  end
  T:add({ r.name, r.dt, r.B, r.shape or '', r.ms and string.format('%.4f', r.ms) or ('error: ' .. (r.err or '?'):gsub('\n', ' ')),
          bench.fmt(tm, 4), bench.ratio(r.ms, tm, 2), rate, pct })
end
R:lines_of(T:markdown())
R:line('')
local H = bench.table({ { 'host overhead, 1-element add, 10 000 calls' }, { 'ours µs/call', right = true },
                        { 'torch µs/call', right = true } })
for _, h in ipairs(host) do
  local tm = torch['host_' .. h[1] .. '|-|1']
  H:add({ h[1], string.format('%.2f', h[2]), tm and string.format('%.2f', tm * 1000) or '-' })
end
R:lines_of(H:markdown())
if opts.out then R:save(opts.out) end
if opts.tsv then bench.write(opts.tsv, T:tsv()) end
