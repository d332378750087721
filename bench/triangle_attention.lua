-- bench/triangle_attention.lua: triangle attention (fa.triangle_attention and its backward) against PyTorch SDPA
-- with bias + mask, the eager OpenFold reference and TriFast, in one run.
--
--   bin/fastattn bench/triangle_attention.lua          GPU: B=1, H=4, D=32, N 256..2048, bfloat16 and float32
--   bin/fastattn bench/triangle_attention.lua --cpu    CPU: N 64, 96, 128, float32, against torch on the CPU
-- options: --ns 256,512  --dtypes bfloat16,float32  --kernels auto,simt,mma,wgmma  --deterministic
--          --reps 25  --sets 3  --peer 0 (skip the peers)  --peers sdpa,eager,trifast  --python PATH
--          --out FILE (markdown)  --tsv FILE (the result table)  --threads N (CPU)      (--help: all)
--
-- Inputs, as nn.TriangleAttention makes them: q, k, v are (B, H, N, N, D) views of (B, N, N, H, D) projections
-- (the output and the gradients likewise), bias (B, H, N, N) in the input dtype, mask (B, N, N) bool with
-- 1 = valid, valid with probability 1/2; q, k, v, bias and the output gradient ~ N(0, 1).
-- bench/peers/triangle_torch.py draws the same distributions.
--
-- GPU timing (bench/lib.lua's gpuTimer, bench/peers/triangle_torch.py does the same): CUDA events around each
-- call, the L2 flushed before every call by a 256 MB write (which also keeps the GPU busy while the host queues
-- the call: the events measure GPU time unless a call's host side is longer than the flush), 3 warm-up calls,
-- the lower median of --reps calls rotating over --sets input sets. Our timed calls write into preallocated outputs (out,
-- lse, the gradients).
-- FLOPs (reference/triangle.md §6): forward 4·B·H·N³·D, backward 10·B·H·N³·D, fwd+bwd 14·B·H·N³·D.
-- "% GEMM": TFLOP/s over the rate of an 8192³ bf16 fa.matmul timed the same way in the same run.
-- "% exp": 16-bit forward time over the exponential bound B·H·N³ exps / 3.9e12 exp/s (the MUFU rate of
-- H100/H200 SXM, 16/clk/SM, 132 SMs; FA3's figure; not measured here).
-- Extra memory: the peak allocation of one call above what was allocated before it (the inputs and the output
-- gradient), the call allocating its outputs (out, lse; the four gradients) as the peers do; "workspace" is
-- that minus the outputs and gradients.
local ffi = require 'ffi'
local fa = require 'fastattn'
local bench = require 'bench.lib'

local B, H, D = 1, 4, 32
local KERNELS = { 'auto', 'simt', 'mma', 'wgmma' }
local PEERS = { 'sdpa', 'eager', 'trifast' }
local PEER_NAMES = { sdpa = 'SDPA', eager = 'eager', trifast = 'TriFast' }
local EXP_RATE = 3.9e12
local ES = { float32 = 4, float64 = 8, bfloat16 = 2, float16 = 2, bool = 1, int32 = 4, int64 = 8 }

local opt = bench.args({
  prog = 'bench/triangle_attention.lua',
  usage = 'bin/fastattn bench/triangle_attention.lua [--cpu] [options]',
  about = 'triangle attention (fa.triangle_attention forward and backward) against PyTorch SDPA with bias + mask,\n' ..
          'the eager OpenFold reference and TriFast, on the GPU (needs a CUDA GPU) or, with --cpu, on the CPU.',
  footer = '`make bench` runs it (after bench/msda.lua). bench/RESULTS.md has the numbers and what they mean.',
  options = {
    { 'cpu', 'flag', help = 'the CPU comparison (float32, against torch on the CPU) instead of the GPU one' },
    { 'ns', 'ints', nil, min = 1, default_text = '256,512,1024,2048 (GPU), 64,96,128 (CPU)', help = 'sequence lengths N' },
    { 'dtypes', 'list', { 'bfloat16', 'float32' }, choices = { 'bfloat16', 'float32', 'float16' },
      help = 'GPU dtypes (the CPU runs float32)' },
    { 'kernels', 'list', { 'auto' }, choices = KERNELS, help = 'GPU kernel families, forced through opts.kernel' },
    { 'deterministic', 'flag', help = 'the deterministic backward (opts.deterministic)' },
    { 'reps', 'int', nil, min = 1, default_text = '25 (GPU), 11 (CPU)', help = 'timed calls (the median is reported)' },
    { 'sets', 'int', 3, min = 1, help = 'random input sets, rotated (the CPU uses 1)' },
    { 'peer', 'choice', '1', choices = { '0', '1' }, help = 'run the PyTorch peers (0: skip them)' },
    { 'peers', 'list', PEERS, choices = PEERS, help = 'which peers (trifast: GPU only)' },
    { 'python', 'string', nil, meta = 'PATH', default_text = '$PYTHON or python3', help = 'python with torch for the peers' },
    { 'out', 'path', nil, help = 'also write the markdown output here' },
    { 'tsv', 'path', nil, help = 'also write the result table as tab-separated text here' },
    { 'threads', 'int', nil, min = 1, default_text = 'all cores', help = 'CPU threads, ours and torch (--cpu)' },
    { 'rounds', 'int', 3, min = 1, help = 'CPU: medians taken, the smallest reported (a round disturbed by another '
      .. 'process on a shared machine does not count), ours and torch' },
  },
}, arg)
if not opt.cpu then bench.needGPU('bench/triangle_attention.lua', 'or use --cpu for the CPU comparison') end
local NS = opt.ns or (opt.cpu and { 64, 96, 128 } or { 256, 512, 1024, 2048 })
local REPS = opt.reps or (opt.cpu and 11 or 25)

local function fwd_flops(n) return 4 * B * H * n ^ 3 * D end
local function tflops(fl, ms) return ms and fl / (ms * 1e-3) / 1e12 end
local function bytes(t) return t and t:numel() * ES[t:dtype()] or 0 end

---------------------------------------------------------------------------- inputs
-- (B, N, N) bool, valid with probability 1/2 (fa's CPU generator, so a seed gives the same mask everywhere)
local function random_mask(n)
  local r = fa.rand(B, n, n)
  local m = fa.empty({ B, n, n }, 'bool')
  local pr, pm = ffi.cast('float*', r.desc.data), ffi.cast('uint8_t*', m.desc.data)
  for i = 0, B * n * n - 1 do pm[i] = pr[i] < 0.5 and 1 or 0 end
  return m
end

-- a (B, H, N, N, D) view of a new (B, N, N, H, D) tensor (the layout of the module's projections)
local function proj(n, dtype, device, fill)
  local t
  if fill then
    t = fa.randn({ B, n, n, H, D }, { dtype = 'float32', device = device })
    if dtype ~= 'float32' then t = t:to(dtype) end
  else
    t = fa.empty({ B, n, n, H, D }, { dtype = dtype, device = device })
  end
  return t:permute(1, 4, 2, 3, 5)
end

local function make_set(n, dtype, device, seed)
  fa.manualSeed(seed)
  local mask = random_mask(n)
  local s = { q = proj(n, dtype, device, true), k = proj(n, dtype, device, true), v = proj(n, dtype, device, true),
              grad = proj(n, dtype, device, true), mask = device == 'cuda' and mask:cuda() or mask }
  s.bias = fa.randn({ B, H, n, n }, { dtype = 'float32', device = device })
  if dtype ~= 'float32' then s.bias = s.bias:to(dtype) end
  s.out = proj(n, dtype, device, false)
  s.lse = fa.empty({ B, H, n, n }, { dtype = 'float32', device = device })
  return s
end

-- the gradients' buffers (shared by the sets: only the inputs rotate)
local function grad_buffers(n, dtype, device)
  return { grad_q = proj(n, dtype, device, false), grad_k = proj(n, dtype, device, false),
           grad_v = proj(n, dtype, device, false),
           grad_bias = fa.empty({ B, H, n, n }, { dtype = dtype, device = device }) }
end

local function with(a, b)
  local t = {}
  for k, v in pairs(a) do t[k] = v end
  for k, v in pairs(b or {}) do t[k] = v end
  return t
end

---------------------------------------------------------------------------- the peers
-- runs bench/peers/triangle_torch.py: {impl/n/dtype -> record}, the GEMM record, and its info line (or why not)
local function run_peer(args)
  local recs, info = bench.peerRecords('triangle_torch.py', args, { python = opt.python, skip = opt.peer == '0' })
  local res, gemm = {}, nil
  for _, r in ipairs(recs) do
    if r.impl == 'gemm' then gemm = r else res[r.impl .. '/' .. r.n .. '/' .. r.dtype] = r end
  end
  return res, gemm, info
end


---------------------------------------------------------------------------- output
local R = bench.report()
local fmt = bench.fmt
local result -- the result table (--tsv)

---------------------------------------------------------------------------- CPU
local function bench_cpu()
  local threads = opt.threads or fa.getNumThreads()
  fa.setNumThreads(threads)
  R:line(string.format('## Triangle attention on the CPU: B=%d, H=%d, D=%d, float32, %d threads, 50%% mask; the '
                       .. 'smallest of %d medians of %d runs', B, H, D, threads, opt.rounds, REPS))
  R:line('')
  local peers = {}
  for _, p in ipairs(opt.peers) do if p ~= 'trifast' then peers[#peers + 1] = p end end
  local peer, _, info = {}, nil, 'skipped (no CPU peer chosen)'
  if #peers > 0 then
    peer, _, info = run_peer(string.format('--device cpu --threads %d --ns %s --dtypes float32 --impls %s --reps %d --sets 1 '
      .. '--rounds %d', threads, table.concat(NS, ','), table.concat(peers, ','), REPS, opt.rounds))
  end
  R:line('peer: ' .. tostring(info))
  R:line('')
  local cols = { { 'N' }, { 'ours fwd ms', right = true }, { 'ours fwd+bwd ms', right = true },
                 { 'GFLOP/s fwd', right = true }, { 'GFLOP/s fwd+bwd', right = true } }
  for _, p in ipairs(peers) do
    cols[#cols + 1] = { PEER_NAMES[p] .. ' fwd ms', right = true }
    cols[#cols + 1] = { PEER_NAMES[p] .. ' fwd+bwd ms', right = true }
    cols[#cols + 1] = { 'vs ' .. PEER_NAMES[p] .. ' fwd', right = true }
    cols[#cols + 1] = { 'vs ' .. PEER_NAMES[p] .. ' fwd+bwd', right = true }
  end
  result = bench.table(cols)
  for _, n in ipairs(NS) do
    local s = make_set(n, 'float32', 'cpu', 1000 + n)
    local g = grad_buffers(n, 'float32', 'cpu')
    local function fwd() fa.triangle_attention(s.q, s.k, s.v, s.bias, s.mask, { out = s.out, lse = s.lse }) end
    local function fb()
      fwd()
      fa.triangle_attention_backward(s.grad, s.q, s.k, s.v, s.bias, s.mask, s.out, s.lse, g)
    end
    local mf, mb = math.huge, math.huge
    for _ = 1, opt.rounds do
      mf = math.min(mf, bench.cpuTime(fwd, { runs = REPS, warmup = 1 }) * 1e3)
      mb = math.min(mb, bench.cpuTime(fb, { runs = REPS, warmup = 1 }) * 1e3)
    end
    local row = { n, fmt(mf, 3), fmt(mb, 3), fmt(tflops(fwd_flops(n), mf) * 1e3, 1), fmt(tflops(3.5 * fwd_flops(n), mb) * 1e3, 1) }
    for _, p in ipairs(peers) do
      local r = peer[p .. '/' .. n .. '/float32'] or {}
      row[#row + 1] = bench.peerMs(r, 'fwd')
      row[#row + 1] = bench.peerMs(r, 'fwdbwd')
      row[#row + 1] = bench.ratio(r.fwd_ms, mf, 1, 'x')
      row[#row + 1] = bench.ratio(r.fwdbwd_ms, mb, 1, 'x')
    end
    result:add(row)
    io.stderr:write(string.format('N=%d: fwd %.2f ms, fwd+bwd %.2f ms\n', n, mf, mb))
  end
  R:lines_of(result:markdown())
  R:line('')
  R:line('vs X: X\'s time over ours (above 1: ours is faster). The goal (issue 9): at least 3x PyTorch\'s CPU SDPA at N=128.')
end

---------------------------------------------------------------------------- GPU
-- peak allocation of fn() above what is allocated before it; fn returns the tensors it allocated as outputs
local function extra_memory(fn)
  local outs
  local peak = bench.extraMemory(function() outs = { fn() } end)
  local ob = 0
  for i = 1, table.maxn(outs) do ob = ob + bytes(outs[i]) end
  return peak, peak - ob
end

local function bench_gpu()
  local dev = fa.cuda.deviceName()
  local time, free = bench.gpuTimer{ reps = REPS }
  -- the bf16 GEMM rate, timed the same way
  local GN = 8192
  local gemm_tf
  do
    local a = fa.randn({ GN, GN }, { dtype = 'float32', device = 'cuda' }):to('bfloat16')
    local b = fa.randn({ GN, GN }, { dtype = 'float32', device = 'cuda' }):to('bfloat16')
    local c = fa.empty({ GN, GN }, { dtype = 'bfloat16', device = 'cuda' })
    local ms = time(function() fa.check(fa.C.fa_matmul_forward(c.desc, a.desc, b.desc, 0, 0, 1, 0)) end, 1)
    gemm_tf = tflops(2 * GN ^ 3, ms)
    a, b, c = nil, nil, nil
    collectgarbage()
  end
  R:line(string.format('## Triangle attention on %s: B=%d, H=%d, D=%d, 50%% mask%s; %d³ bf16 fa.matmul %.0f TFLOP/s '
                       .. '(the "%% GEMM" base); L2 flushed before every call', dev, B, H, D,
                       opt.deterministic and ', deterministic backward' or '', GN, gemm_tf))
  R:line('')
  local results = {}
  for _, n in ipairs(NS) do
    for _, dtype in ipairs(opt.dtypes) do
      local ok, err = pcall(function()
        local sets = {}
        for k = 1, opt.sets do sets[k] = make_set(n, dtype, 'cuda', 1000 * k + n) end
        local g = grad_buffers(n, dtype, 'cuda')
        for _, kern in ipairs(opt.kernels) do
          local fo = { kernel = kern }
          local bo = with(g, { kernel = kern, deterministic = opt.deterministic or nil })
          local function fwd(k)
            local s = sets[k]
            fa.triangle_attention(s.q, s.k, s.v, s.bias, s.mask, with(fo, { out = s.out, lse = s.lse }))
          end
          local function bwd(k)
            local s = sets[k]
            fa.triangle_attention_backward(s.grad, s.q, s.k, s.v, s.bias, s.mask, s.out, s.lse, bo)
          end
          local r = { n = n, dtype = dtype, kernel = kern }
          local cok, cerr = pcall(function()
            for k = 1, #sets do fwd(k) end -- every set's out and lse, for the backward
            r.fwd = time(fwd, #sets)
            r.bwd = time(bwd, #sets)
            r.fb = time(function(k) fwd(k); bwd(k) end, #sets)
            local s = sets[1]
            r.mem_f, r.ws_f = extra_memory(function()
              return fa.triangle_attention(s.q, s.k, s.v, s.bias, s.mask, fo)
            end)
            r.mem_fb, r.ws_fb = extra_memory(function()
              local o, l = fa.triangle_attention(s.q, s.k, s.v, s.bias, s.mask, fo)
              local gq, gk, gv, gb = fa.triangle_attention_backward(s.grad, s.q, s.k, s.v, s.bias, s.mask, o, l,
                { kernel = kern, deterministic = opt.deterministic or nil })
              return o, l, gq, gk, gv, gb
            end)
          end)
          if not cok then r.err = tostring(cerr):gsub('\n', ' ') end
          results[#results + 1] = r
          io.stderr:write(cok and string.format('N=%d %s %s: fwd %.4f bwd %.4f fwd+bwd %.4f ms\n', n, dtype, kern,
                                                r.fwd, r.bwd, r.fb)
                          or string.format('N=%d %s %s: error: %s\n', n, dtype, kern, r.err))
        end
      end)
      if not ok then -- the inputs themselves did not fit
        results[#results + 1] = { n = n, dtype = dtype, kernel = '-', err = tostring(err):gsub('\n', ' ') }
        io.stderr:write(string.format('N=%d %s: error: %s\n', n, dtype, results[#results].err))
      end
      collectgarbage()
      fa.cuda.emptyCache()
    end
  end
  free()
  local peer, pgemm, info = run_peer(string.format('--device cuda --ns %s --dtypes %s --impls %s --reps %d --sets %d',
    table.concat(NS, ','), table.concat(opt.dtypes, ','), table.concat(opt.peers, ','), math.min(REPS, 15), opt.sets))
  R:line('peer: ' .. tostring(info))
  if pgemm and pgemm.tflops then
    R:line(string.format('torch %d³ bf16 matmul in the same run: %.0f TFLOP/s', pgemm.n, pgemm.tflops))
  end
  R:line('')

  -- ours
  result = bench.table({ { 'N' }, { 'dtype' }, { 'kernel' }, { 'fwd ms', right = true }, { 'fwd TFLOP/s', right = true },
                         { 'fwd % GEMM', right = true }, { 'fwd % exp', right = true }, { 'bwd ms', right = true },
                         { 'fwd+bwd ms', right = true }, { 'fwd+bwd TFLOP/s', right = true },
                         { 'fwd+bwd % GEMM', right = true }, { 'extra MB fwd', right = true },
                         { 'extra MB fwd+bwd', right = true }, { 'workspace MB fwd+bwd', right = true } })
  for _, r in ipairs(results) do
    if r.err then
      result:add({ r.n, r.dtype, r.kernel, 'error: ' .. r.err })
    else
      local fl = fwd_flops(r.n)
      local tf, tfb = tflops(fl, r.fwd), tflops(3.5 * fl, r.fb)
      result:add({ r.n, r.dtype, r.kernel, fmt(r.fwd, 4), fmt(tf, 1), bench.pct(tf, gemm_tf),
                   r.dtype ~= 'float32' and bench.pct(B * H * r.n ^ 3 / EXP_RATE * 1e3, r.fwd) or '-',
                   fmt(r.bwd, 4), fmt(r.fb, 4), fmt(tfb, 1), bench.pct(tfb, gemm_tf), fmt(r.mem_f / 1e6, 1),
                   fmt(r.mem_fb / 1e6, 1), fmt(r.ws_fb / 1e6, 1) })
    end
  end
  R:line('### fastattn')
  R:line('')
  R:lines_of(result:markdown())
  R:line('')

  -- the peers, and our best kernel's ratio to each
  if opt.peer ~= '0' then
    local best = {}
    for _, r in ipairs(results) do
      local key = r.n .. '/' .. r.dtype
      if not r.err then
        local b = best[key] or {}
        if not b.fwd or r.fwd < b.fwd then b.fwd = r.fwd end
        if not b.fb or r.fb < b.fb then b.fb = r.fb end
        best[key] = b
      end
    end
    local pt = bench.table({ { 'N' }, { 'dtype' }, { 'peer' }, { 'fwd ms', right = true }, { 'fwd TFLOP/s', right = true },
                             { 'fwd+bwd ms', right = true }, { 'fwd+bwd TFLOP/s', right = true },
                             { 'extra MB fwd', right = true }, { 'extra MB fwd+bwd', right = true },
                             { 'ours vs it fwd', right = true }, { 'ours vs it fwd+bwd', right = true } })
    for _, n in ipairs(NS) do
      for _, dtype in ipairs(opt.dtypes) do
        local b = best[n .. '/' .. dtype] or {}
        for _, p in ipairs(opt.peers) do
          local r = peer[p .. '/' .. n .. '/' .. dtype] or {}
          pt:add({ n, dtype, PEER_NAMES[p], bench.peerMs(r, 'fwd'), fmt(r.fwd_tflops, 1), bench.peerMs(r, 'fwdbwd'),
                   fmt(r.fwdbwd_tflops, 1), fmt(r.extra_mb_fwd, 1), fmt(r.extra_mb_fwdbwd, 1),
                   bench.ratio(r.fwd_ms, b.fwd, 2, 'x'), bench.ratio(r.fwdbwd_ms, b.fb, 2, 'x') })
        end
      end
    end
    R:line('### peers (ours vs it: its time over our best kernel\'s; above 1: ours is faster)')
    R:line('')
    R:lines_of(pt:markdown())
    R:line('')
  end
  R:line(string.format('FLOPs: forward 4·B·H·N³·D, fwd+bwd 14·B·H·N³·D. %% GEMM: of the %.0f TFLOP/s above. %% exp: '
                       .. 'B·H·N³ exps at %.1f T/s over the forward time. Extra memory: peak above the inputs, '
                       .. 'outputs and gradients included; workspace: without them.', gemm_tf, EXP_RATE / 1e12))
end

if opt.cpu then bench_cpu() else bench_gpu() end
if opt.out then R:save(opt.out) end
if opt.tsv and result then bench.write(opt.tsv, result:tsv()) end
