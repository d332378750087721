-- fa.attention and fa.triangle_attention as cases of spec/helpers/op.lua: PyTorch float64 fixtures
-- (spec/fixtures/gen_attention.py), finite differences, threads, errors, and (#gpu) the GPU kernels against the
-- CPU; then what is particular to attention (lse, dropout, layouts, sizes).
local ffi = require 'ffi'
local fa = require 'fastattn'
local H = require 'helpers.check'
local op = require 'helpers.op'

local FX = H.fixture('attention')

local merge = op.merge

-- op.lua's "non-contiguous inputs" check moves dim 1 innermost; q, k, v and grad_out need a contiguous last dim
-- (DESIGN §2.1), so those get a layout that keeps it (the bias and the mask keep the harness's)
local RAW = setmetatable({}, { __mode = 'k' }) -- tensors passed as they are (the error tests)
local function raw(t) RAW[t] = true return t end
local function lastc(t)
  if RAW[t] or t == nil or not fa.isTensor(t) or t:dim() == 0 or t:size(t:dim()) <= 1 or t:stride(t:dim()) == 1 then return t end
  return t:contiguous()
end

---------------------------------------------------------------------------- fa.attention
local function a_forward(x, o)
  return (fa.attention(lastc(x.q), lastc(x.k), lastc(x.v), merge(o, { bias = x.bias, mask = x.mask })))
end
local function a_backward(x, gout, o)
  local q, k, v = lastc(x.q), lastc(x.k), lastc(x.v)
  local fo = merge(o, { bias = x.bias, mask = x.mask })
  for _, n in ipairs({ 'grad_q', 'grad_k', 'grad_v', 'grad_bias' }) do fo[n] = nil end
  local out, lse, rng = fa.attention(q, k, v, fo)
  local bo = merge(o, { bias = x.bias, mask = x.mask, rng = rng })
  if rng then bo.seed, bo.offset = nil, nil end
  local gq, gk, gv, gb = fa.attention_backward(lastc(gout), q, k, v, out, lse, bo)
  return { q = gq, k = gk, v = gv, bias = gb }
end

-- shape {batch = {...}, H, Hkv, Lq, Lk, D, bias = shape or nil, mask = shape or nil, dead = bool}: random inputs;
-- the mask 0/1 float64 with key 1 kept, and with `dead` row 1 of the first mask row fully masked
local function rand_mask(shape, dead)
  local m = fa.rand(shape, 'float64')
  local p = ffi.cast('double*', m.desc.data)
  local Lk = shape[#shape]
  for i = 0, m:numel() - 1 do p[i] = (p[i] > 0.3 or i % Lk == 0) and 1 or 0 end
  if dead then for j = 0, Lk - 1 do p[j] = 0 end end
  return m
end

local function a_inputs(s)
  local b = s.batch or {}
  local function sh(...)
    local r = {}
    for i, v in ipairs(b) do r[i] = v end
    for _, v in ipairs({ ... }) do r[#r + 1] = v end
    return r
  end
  local Hq, Hkv, Lq, Lk, D = s[1], s[2], s[3], s[4], s[5]
  local x = { q = fa.randn(sh(Hq, Lq, D), 'float64'), k = fa.randn(sh(Hkv, Lk, D), 'float64'),
              v = fa.randn(sh(Hkv, Lk, D), 'float64') }
  if s.bias then x.bias = fa.randn(s.bias, 'float64') end
  if s.mask then x.mask = rand_mask(s.mask, s.dead) end
  return x
end

local function a_fixture(name)
  local f = function(k) return FX[name .. '/' .. k] end
  local x = { q = f('q'), k = f('k'), v = f('v'), bias = f('bias'), mask = f('mask') }
  local o = f('opts')
  local opts = { scale = o:get(1) ~= 0 and o:get(1) or nil, mask_scale = o:get(2) }
  if o:get(3) > 0 then opts.dropout, opts.seed, opts.offset = o:get(3), o:get(4), o:get(5) end
  local want = { out = f('out'), q = f('grad_q'), k = f('grad_k'), v = f('grad_v'), bias = f('grad_bias') }
  return x, opts, f('grad_out'), want
end

-- GPU shapes: N, D sweeps at B = 2, H = 3 (the lead's GPU machine)
local A_GPU = {}
-- (N = 1, one key, has gradients of k and bias that are 0 up to rounding: a relative check cannot hold; that size
-- is the Lq = 1 case here and a check of its own below)
A_GPU[1] = { shape = { 3, 3, 1, 16, 32, batch = { 2 }, bias = { 3, 1, 16 }, mask = { 2, 1, 1, 16 }, dead = true },
             what = 'Lq = 1' }
for _, N in ipairs({ 16, 17, 65, 100, 128, 130, 200 }) do
  A_GPU[#A_GPU + 1] = { shape = { 3, 3, N, N, 32, batch = { 2 }, bias = { 3, N, N }, mask = { 2, 1, 1, N }, dead = true },
                        what = 'N = ' .. N }
end
for _, D in ipairs({ 16, 64, 128 }) do
  A_GPU[#A_GPU + 1] = { shape = { 3, 1, 65, 100, D, batch = { 2 }, bias = { 2, 1, 65, 100 }, mask = { 65, 100 } },
                        what = 'MQA, D = ' .. D }
end

local fq, fk, fv, fb, fm = FX['gqa/q'], FX['gqa/k'], FX['gqa/v'], FX['gqa/bias'], FX['gqa/mask']
local function gqa() local x, _, gout = a_fixture('gqa') return x, gout end

local A_CASE = {
  name = 'fa.attention', inputs = a_inputs, forward = a_forward, backward = a_backward,
  grads = { 'q', 'k', 'v', 'bias' },
  fixture = { names = { 'gqa', 'mqa', 'additive', 'dropout' }, load = a_fixture },
  gradcheck = {
    { shape = { 4, 2, 3, 5, 3, batch = { 2 }, bias = { 4, 1, 5 }, mask = { 2, 1, 3, 5 }, dead = true },
      opts = { scale = 0.7 }, what = 'GQA, broadcast bias, dead row' },
    { shape = { 2, 1, 4, 3, 2, batch = { 2, 1, 2 }, bias = { 2, 1, 1, 1, 4, 3 }, mask = { 3 } },
      opts = { mask_scale = 3 }, what = 'MQA, additive mask, three batch dims' },
    { shape = { 1, 1, 3, 300, 2, bias = { 1, 3, 300 } }, what = 'two key blocks' },
    { shape = { 2, 1, 3, 9, 3, batch = { 2 }, bias = { 2, 1, 3, 9 }, mask = { 2, 1, 1, 9 }, dead = true },
      opts = { dropout = 0.3, seed = 5, offset = 11 }, what = 'dropout (the same mask forward and backward)' },
  },
  threads = {
    { shape = { 4, 2, 40, 70, 16, batch = { 2 }, bias = { 4, 1, 70 }, mask = { 2, 1, 40, 70 }, dead = true } },
    { shape = { 2, 2, 33, 130, 8, batch = { 3, 2 }, bias = { 1, 2, 1, 33, 130 } } },
    { shape = { 2, 1, 0, 5, 4, batch = { 2 }, bias = { 2, 0, 5 } } },
    { shape = { 2, 1, 5, 0, 4, batch = { 2 }, bias = { 2, 5, 0 } } },
    { shape = { 3, 1, 130, 300, 8, bias = { 130, 300 }, mask = { 3, 1, 300 } }, opts = { dropout = 0.2, seed = 3 } },
  },
  tol = {
    fixture = { float64 = { 1e-10, 1e-12 }, float32 = { 1e-4, 1e-5 } },
    numgrad = { 1e-6, 1e-8 },
    float32 = { 1e-4, 1e-4 },
    gpu = { float32 = 2e-5, bfloat16 = 1e-2, float16 = 2e-3 },
  },
  gpu = {
    shapes = A_GPU,
    variants = { { name = 'default' }, { name = 'simt', kernel = 'simt' }, { name = 'deterministic', deterministic = true } },
  },
  errors = {
    base = gqa,
    { "fa%.attention: argument 'q': expected a tensor, got nil", { q = op.NIL } },
    { "fa%.attention: argument 'q': expected a tensor of at least 3 dimensions", { q = fq:select(1, 1):select(1, 1) } },
    { "fa%.attention: argument 'k': expected dtype float64 %(as 'q'%), got float32", { k = fk:float() } },
    { "fa%.attention: argument 'q': expected float32 or float64 on the CPU, got bfloat16",
      { q = fq:bfloat16(), k = fk:bfloat16(), v = fv:bfloat16() } },
    { "fa%.attention: argument 'k': expected 4 dimensions %(as 'q'", { k = fk:select(1, 1) } },
    { "fa%.attention: argument 'v': expected the leading %(batch%) dims of 'q'", { v = fv:narrow(1, 1, 1) } },
    { "fa%.attention: argument 'v': expected shape %(2, 2, 7, 8%) %(as 'k'%)", { v = fv:narrow(3, 1, 6) } },
    { "fa%.attention: argument 'k': expected D = 8", { k = fk:narrow(4, 1, 7), v = fv:narrow(4, 1, 7) } },
    { "fa%.attention: argument 'k': expected a number of heads %(dimension 2%) that divides the 4 heads of 'q', got 3",
      { k = fa.randn(2, 3, 7, 8, 'float64'), v = fa.randn(2, 3, 7, 8, 'float64') } },
    { "fa%.attention: argument 'q': expected a contiguous last dimension %(stride 1%)",
      { q = raw(fa.randn(2, 4, 8, 5, 'float64'):transpose(3, 4)) } },
    { "fa%.attention: argument 'opts%.bias': expected a tensor broadcastable to %(%.%.%., H, Lq, Lk%) = %(2, 4, 5, 7%)",
      { bias = fa.randn(3, 1, 7, 'float64') } },
    { "fa%.attention: argument 'opts%.bias': expected a tensor broadcastable", { bias = fa.randn(1, 2, 4, 5, 7, 'float64') } },
    { "fa%.attention: argument 'opts%.bias': expected float32 or float64 on the CPU, got int64",
      { bias = fa.zeros(4, 1, 7, 'int64') } },
    { "fa%.attention: argument 'opts%.bias': expected a tensor or nil, got 3", { bias = 3 } },
    { "fa%.attention: argument 'opts%.mask': expected a tensor broadcastable to %(%.%.%., H, Lq, Lk%) = %(2, 4, 5, 7%)",
      { mask = fa.ones(2, 1, 5, 6, 'bool') } },
    { "fa%.attention: argument 'opts%.scale': expected a finite number, got inf", { opts = { scale = math.huge } } },
    { "fa%.attention: argument 'opts%.scale': expected a number, got nan", { opts = { scale = 0 / 0 } } },
    { "fa%.attention: argument 'opts%.mask_scale': expected a finite number >= 0, got %-1", { opts = { mask_scale = -1 } } },
    { "fa%.attention: argument 'opts%.dropout': expected a probability in %[0, 1%), got 1", { opts = { dropout = 1 } } },
    { "fa%.attention: argument 'opts%.kernel': expected 'auto', 'simt', 'mma' or 'wgmma', got \"tensor\"",
      { opts = { kernel = 'tensor' } } },
    { "fa%.attention: argument 'opts': unknown option \"dropout_p\"", { opts = { dropout_p = 0.1 } } },
    { "fa%.attention: argument 'opts%.seed': expected an integer in 0%.%.2%^64%-1, got %-1", { opts = { seed = -1 } } },
    { "fa%.attention: argument 'opts%.out': expected shape %(2, 4, 5, 8%) %(as 'q'%), got %(2, 4, 5, 7%)",
      { opts = { out = fa.empty(2, 4, 5, 7, 'float64') } } },
    { "fa%.attention: argument 'opts%.out': expected dtype float64 %(as 'q'%), got float32",
      { opts = { out = fa.empty(2, 4, 5, 8) } } },
    { "fa%.attention: argument 'opts%.out': expected a contiguous last dimension",
      { opts = { out = fa.empty(2, 4, 8, 5, 'float64'):transpose(3, 4) } } },
    { "fa%.attention: argument 'opts%.out': expected rows that do not overlap %(a stride >= 8 in dimension 3%), got stride 0",
      { opts = { out = fa.empty(2, 4, 1, 8, 'float64'):expand(2, 4, 5, 8) } } },
    { "fa%.attention: argument 'opts%.out': expected a tensor that shares no memory with argument 'q'",
      { opts = { out = fq } } },
    { "fa%.attention: argument 'opts%.lse': expected shape %(%.%.%., H, Lq%) as 'q' without D = %(2, 4, 5%), got %(2, 4, 6%)",
      { opts = { lse = fa.empty(2, 4, 6, 'float64') } } },
    { "fa%.attention: argument 'opts%.lse': expected dtype float64 %(for float64 inputs%), got float32",
      { opts = { lse = fa.empty(2, 4, 5) } } },
    { "fa%.attention_backward: argument 'grad_out': expected shape %(2, 4, 5, 8%) %(as 'q'%)",
      { gout = FX['gqa/grad_out']:narrow(3, 1, 4) }, backward = true },
    { "fa%.attention_backward: argument 'opts%.grad_k': expected shape %(2, 2, 7, 8%) %(as 'k'%)",
      { opts = { grad_k = fa.empty(2, 4, 7, 8, 'float64') } }, backward = true },
    { "fa%.attention_backward: argument 'opts%.grad_bias': expected shape %(4, 1, 7%) %(as 'opts%.bias'%)",
      { opts = { grad_bias = fa.empty(4, 5, 7, 'float64') } }, backward = true },
    { "fa%.attention_backward: argument 'opts%.grad_bias': expected nothing %(no 'bias' was given%)",
      { bias = op.NIL, opts = { grad_bias = fa.empty(4, 1, 7, 'float64') } }, backward = true },
    { "fa%.attention_backward: argument 'opts%.grad_v': expected a tensor that shares no memory with argument 'v'",
      { opts = { grad_v = fv } }, backward = true },
    { "fa%.attention_backward: argument 'opts%.grad_q': expected a contiguous last dimension",
      { opts = { grad_q = fa.empty(2, 4, 8, 5, 'float64'):transpose(3, 4) } }, backward = true },
  },
}

---------------------------------------------------------------------------- fa.triangle_attention
-- x.proj: q, k, v handed over as views of (B, N, N, H, D) buffers (the projection's layout), on any device
local function layout(x, t)
  t = lastc(t)
  if not x.proj then return t end
  local B, Hh, N, D = t:size(1), t:size(2), t:size(3), t:size(5)
  local p = fa.empty({ B, N, N, Hh, D }, { dtype = t:dtype(), device = t:device() }):permute(1, 4, 2, 3, 5)
  p:copy(t)
  return p
end
local function t_forward(x, o)
  return (fa.triangle_attention(layout(x, x.q), layout(x, x.k), layout(x, x.v), x.bias, x.mask, o))
end
local function t_backward(x, gout, o)
  local fo = merge(o)
  for _, n in ipairs({ 'grad_q', 'grad_k', 'grad_v', 'grad_bias' }) do fo[n] = nil end
  local q, k, v = layout(x, x.q), layout(x, x.k), layout(x, x.v)
  local out, lse, rng = fa.triangle_attention(q, k, v, x.bias, x.mask, fo)
  local bo = merge(o, { rng = rng })
  if rng then bo.seed, bo.offset = nil, nil end
  local gq, gk, gv, gb = fa.triangle_attention_backward(lastc(gout), q, k, v, x.bias, x.mask, out, lse, bo)
  return { q = gq, k = gk, v = gv, bias = gb }
end

-- shape {B, H, N, D, mask = bool, dead = bool, proj = bool}: proj: q, k, v go in as views of (B, N, N, H, D) buffers
local function t_inputs(s)
  local B, Hh, N, D = s[1], s[2], s[3], s[4]
  local function qkv() return fa.randn(B, Hh, N, N, D, 'float64') end
  local x = { q = qkv(), k = qkv(), v = qkv(), bias = fa.randn(B, Hh, N, N, 'float64'), proj = s.proj }
  if s.mask then x.mask = rand_mask({ B, N, N }, s.dead) end
  return x
end

local function t_fixture(name)
  local f = function(k) return FX[name .. '/' .. k] end
  local x = { q = f('q'), k = f('k'), v = f('v'), bias = f('bias'), mask = f('mask') }
  local o = f('opts')
  local want = { out = f('out'), q = f('grad_q'), k = f('grad_k'), v = f('grad_v'), bias = f('grad_bias') }
  return x, { scale = o:get(1) ~= 0 and o:get(1) or nil }, f('grad_out'), want
end

local T_GPU = {}
for _, N in ipairs({ 16, 17, 65, 100, 128, 130, 200 }) do -- N = 1: its own check below
  for _, D in ipairs({ 16, 32, 64, 128 }) do
    if N <= 130 or D == 32 then
      T_GPU[#T_GPU + 1] = { shape = { 2, 3, N, D, mask = true, dead = N > 1, proj = D == 32 },
                            what = string.format('N = %d, D = %d', N, D) }
    end
  end
end

local tq, tk, tv_, tb, tm = FX['tri/q'], FX['tri/k'], FX['tri/v'], FX['tri/bias'], FX['tri/mask']
local function tri() local x, _, gout = t_fixture('tri') return x, gout end

local T_CASE = {
  name = 'fa.triangle_attention', inputs = t_inputs, forward = t_forward, backward = t_backward,
  grads = { 'q', 'k', 'v', 'bias' },
  fixture = { names = { 'tri', 'tri_nomask' }, load = t_fixture },
  gradcheck = {
    { shape = { 1, 2, 4, 3, mask = true, dead = true }, what = 'mask with a dead row' },
    { shape = { 2, 1, 3, 2, proj = true }, opts = { scale = 0.5 }, what = 'projection layout, no mask' },
  },
  threads = {
    { shape = { 2, 3, 24, 16, mask = true, dead = true } },
    { shape = { 1, 4, 33, 8, mask = true, proj = true } },
  },
  tol = A_CASE.tol,
  gpu = {
    shapes = T_GPU,
    variants = A_CASE.gpu.variants,
  },
  errors = {
    base = tri,
    { "fa%.triangle_attention: argument 'q': expected a 5%-D tensor %(B, H, N, N, D%), got a float64 tensor of size 2x2x6x6",
      { q = tq:select(5, 1) } },
    { "fa%.triangle_attention: argument 'q': expected a tensor of shape %(B, H, N, N, D%) %(dims 3 and 4 equal%)",
      { q = tq:narrow(4, 1, 5) } },
    { "fa%.triangle_attention: argument 'k': expected a tensor of shape %(B, H, N, N, D%) = %(2, 2, 6, 6, D%) as 'q'",
      { k = tk:narrow(2, 1, 1) } },
    { "fa%.triangle_attention: argument 'bias': expected a tensor of shape %(B, H, N, N%) = %(2, 2, 6, 6%)",
      { bias = tb:narrow(3, 1, 5) } },
    { "fa%.triangle_attention: argument 'bias': expected a tensor, got nil", { bias = op.NIL } },
    { "fa%.triangle_attention: argument 'mask': expected a tensor of shape %(B, N, N%) = %(2, 6, 6%) or nil",
      { mask = tm:select(1, 1) } },
    { "fa%.triangle_attention: argument 'k': expected dtype float64 %(as 'q'%), got float32", { k = tk:float() } },
    { "fa%.triangle_attention: argument 'bias': expected float32 or float64 on the CPU, got int32",
      { bias = fa.zeros(2, 2, 6, 6, 'int32') } },
    { "fa%.triangle_attention: argument 'q': expected a contiguous last dimension",
      { q = raw(fa.randn(2, 2, 6, 4, 6, 'float64'):transpose(4, 5):transpose(3, 4)) } },
    { "fa%.triangle_attention: argument 'opts%.out': expected a tensor that shares no memory with argument 'v'",
      { opts = { out = tv_ } } },
    { "fa%.triangle_attention: argument 'opts': unknown option \"bias\"", { opts = { bias = tb } } },
    { "fa%.triangle_attention_backward: argument 'grad_out': expected a 5%-D tensor",
      { gout = FX['tri/grad_out']:select(1, 1) }, backward = true },
    { "fa%.triangle_attention_backward: argument 'opts%.grad_bias': expected a 4%-D tensor %(B, H, N, N%)",
      { opts = { grad_bias = fa.empty(2, 2, 6, 6, 1, 'float64') } }, backward = true },
  },
}

-- the mma.sync kernels in the 16-bit dtypes (float32 would be TF32 there, only under fa.cuda.allowTF32(true))
local function mma_case(case)
  return { name = case.name .. ' (mma)', inputs = case.inputs, forward = case.forward, backward = case.backward,
           grads = case.grads, tol = case.tol,
           gpu = { shapes = case.gpu.shapes, dtypes = { 'bfloat16', 'float16' },
                   variants = { { name = 'mma', kernel = 'mma' }, { name = 'mma deterministic', kernel = 'mma', deterministic = true } } } }
end

-- A row under an additive mask of -1e9 on every key: float32 scores -1e9 + O(1) all round to -1e9 (ulp 64), so
-- the row's softmax is uniform, and so is its lse only to a multiple of 64: P must not come from exp(S - lse).
-- grad_out is 0 on the other rows, so grad_v's rows are grad_out/Lk and grad_q's row is
-- scale/Lk sum_j (g.v_j - g.mean(v)) k_j. Expectations from the inputs as rounded to dtype, in float64.
local function coarse_row_case(dtype, device, kernel, D, Lks)
  local tol = dtype == 'float32' and { 1e-5, 1e-4 } or { 2e-2, 3e-2 } -- out/grad_v, grad_q (relative)
  fa.manualSeed(9)
  for _, Lk in ipairs(Lks) do
    local c = function(t) return t:to(dtype, device) end
    local q, k, v = c(fa.randn(1, 3, D)), c(fa.randn(1, Lk, D)), c(fa.randn(1, Lk, D))
    local mask = fa.ones(1, 3, Lk); mask:select(2, 2):fill(0)
    local o = { bias = c(fa.randn(3, Lk)), mask = c(mask), mask_scale = 1e9, kernel = kernel }
    local go = fa.zeros(1, 3, D); go:select(2, 2):copy(fa.randn(D)); go = c(go)
    local out, lse = fa.attention(q, k, v, o)
    local gq, _, gv = fa.attention_backward(go, q, k, v, out, lse, o)
    local f64 = function(t) return t:to('float64', 'cpu') end
    local k64, v64 = f64(k), f64(v)
    local g, vm = f64(go:select(2, 2)):view(D), v64:mean(2):view(D)
    local what = string.format('%s %s %s, Lk = %d: ', dtype, device, kernel or 'auto', Lk)
    H.assert_close(f64(out:select(2, 2)):view(D), vm, tol[1], tol[1] * H.maxabs(vm), what .. 'out = mean(v)')
    local gvw = (g / Lk):view(1, D):expand(Lk, D)
    H.assert_close(f64(gv):view(Lk, D), gvw, tol[1], tol[1] * H.maxabs(gvw), what .. 'grad_v')
    local want, gm = {}, 0
    for d = 1, D do want[d] = 0; gm = gm + g:get(d) * vm:get(d) end
    for j = 1, Lk do
      local gvj = 0
      for d = 1, D do gvj = gvj + g:get(d) * v64:get(1, j, d) end
      for d = 1, D do want[d] = want[d] + k64:get(1, j, d) * (gvj - gm) / Lk / math.sqrt(D) end
    end
    want = fa.tensor(want, 'float64')
    H.assert_close(f64(gq:select(2, 2)):view(D), want, tol[2], tol[2] * H.maxabs(want), what .. 'grad_q')
  end
end

describe('fa.attention', function()
  op.run(A_CASE)
  op.run(mma_case(A_CASE))

  it('returns lse = logsumexp of the logits (-inf for a fully masked row), as the fixture', function()
    for _, name in ipairs({ 'gqa', 'mqa', 'additive' }) do
      local x, o = a_fixture(name)
      for _, dt in ipairs({ 'float64', 'float32' }) do
        local c = function(t) return t and (t:isFloatingPoint() and t:to(dt) or t) end
        local _, lse = fa.attention(c(x.q), c(x.k), c(x.v), merge(o, { bias = c(x.bias), mask = c(x.mask) }))
        local want = FX[name .. '/lse']
        assert.are.equal(dt, lse:dtype())
        local n, pa, pb = want:numel(), ffi.cast('double*', lse:double():contiguous().desc.data),
                          ffi.cast('double*', want:contiguous().desc.data)
        local dead = 0
        for e = 0, n - 1 do
          if pb[e] == -math.huge then
            dead = dead + 1
            assert.are.equal(-math.huge, pa[e], name .. ' ' .. dt .. ': -inf row')
          else
            local tol = dt == 'float64' and 1e-12 or 1e-5
            assert(math.abs(pa[e] - pb[e]) <= tol * (1 + math.abs(pb[e])), name .. ' ' .. dt .. ' lse ' .. pa[e] .. ' vs ' .. pb[e])
          end
        end
        if name == 'gqa' then assert.are.equal(4, dead) end -- one masked row of batch 2, for its 4 heads
      end
    end
  end)
end)

describe('fa.attention dropout', function()
  local x = a_inputs({ 2, 1, 6, 9, 4, batch = { 2 }, bias = { 2, 6, 9 } })
  local gout = fa.randn(2, 2, 6, 4, 'float64')

  it("draws (seed, offset) from fa's generator, returns them, and the backward takes them as opts.rng", function()
    fa.manualSeed(77)
    local o = { bias = x.bias, dropout = 0.4 }
    local out1, lse1, rng1 = fa.attention(x.q, x.k, x.v, o)
    local out2, _, rng2 = fa.attention(x.q, x.k, x.v, o)
    assert.are.equal(77, rng1.seed)
    assert.are.equal(rng1.seed, rng2.seed)
    assert.are.equal(rng1.offset + math.ceil(2 * 2 * 6 * 9 / 4), rng2.offset) -- one counter per 4 weights
    assert.is_false(out1:equal(out2)) -- a fresh mask each call
    -- the same stream given explicitly: the same bits; and the backward with rng = with seed/offset
    local out3 = fa.attention(x.q, x.k, x.v, { bias = x.bias, dropout = 0.4, seed = rng1.seed, offset = rng1.offset })
    assert.is_true(out3:equal(out1))
    local a = { fa.attention_backward(gout, x.q, x.k, x.v, out1, lse1, { bias = x.bias, dropout = 0.4, rng = rng1 }) }
    local b = { fa.attention_backward(gout, x.q, x.k, x.v, out1, lse1,
                                      { bias = x.bias, dropout = 0.4, seed = rng1.seed, offset = rng1.offset }) }
    for i = 1, 4 do assert.is_true(a[i]:equal(b[i])) end
    -- with a seed given, no stream is drawn and none returned
    local _, _, none = fa.attention(x.q, x.k, x.v, { dropout = 0.4, seed = 1 })
    assert.is_nil(none)
  end)

  it('keeps about 1 - p of the weights, scaled by 1/(1-p): out with V = ones is the kept fraction / (1-p)', function()
    local q, k = fa.randn(1, 1, 64, 4, 'float64'), fa.zeros(1, 1, 1000, 4, 'float64') -- uniform weights 1/1000
    local v = fa.ones(1, 1, 1000, 1, 'float64'):expand(1, 1, 1000, 4)
    local out = fa.attention(q, k, v:contiguous(), { dropout = 0.25, seed = 9, offset = 0 })
    local mean = out:mean()
    assert(math.abs(mean - 1) < 0.02, 'mean of out ' .. mean) -- E = 1, sd ~ 0.002
    -- every value is a multiple of 1/(1000 * 0.75)
    local o = out:contiguous()
    for i = 1, 64 do
      local c = o:get(1, 1, i, 1) * 750
      assert(math.abs(c - math.floor(c + 0.5)) < 1e-9, 'not a count of kept weights: ' .. c)
    end
  end)

  it('needs the stream in the backward when dropout > 0', function()
    local out, lse = fa.attention(x.q, x.k, x.v, { dropout = 0.2, seed = 1 })
    local ok, msg = pcall(fa.attention_backward, gout, x.q, x.k, x.v, out, lse, { dropout = 0.2 })
    assert.is_false(ok)
    assert.matches("^spec/attention_spec%.lua:%d+: fa%.attention_backward: argument 'opts%.rng': expected the forward's dropout stream", msg)
    ok, msg = pcall(fa.attention_backward, gout, x.q, x.k, x.v, out, lse, { dropout = 0.2, seed = 1, rng = { seed = 1, offset = 0 } })
    assert.matches("fa%.attention_backward: argument 'opts%.rng': expected either opts%.rng or opts%.seed and opts%.offset, got both", msg)
    ok, msg = pcall(fa.attention_backward, gout, x.q, x.k, x.v, out, lse, { dropout = 0.2, rng = 5 })
    assert.matches("fa%.attention_backward: argument 'opts%.rng': expected a table {seed =, offset =}", msg)
    ok, msg = pcall(fa.attention, x.q, x.k, x.v, { dropout = 0.2, seed = 1.5 })
    assert.matches("fa%.attention: argument 'opts%.seed': expected an integer in 0%.%.2%^64%-1, got 1%.5", msg)
  end)
end)

describe('fa.attention shapes', function()
  it('gives mean(V) and lse = -inf for fully masked rows, zeros for Lk = 0', function()
    local q, k, v = fa.randn(2, 3, 4, 'float64'), fa.randn(2, 5, 4, 'float64'), fa.randn(2, 5, 4, 'float64')
    local mask = fa.ones(2, 3, 5, 'bool')
    mask:select(1, 2):select(1, 3):fill(0)
    local out, lse = fa.attention(q, k, v, { mask = mask, bias = fa.randn(3, 5, 'float64') })
    H.assert_close(out:select(1, 2):select(1, 3), v:select(1, 2):mean(1):view(4), 1e-14, 1e-14, 'mean(V)')
    assert.are.equal(-math.huge, lse:get(2, 3))
    assert(lse:get(1, 3) > -math.huge)
    local g = { fa.attention_backward(fa.ones(2, 3, 4, 'float64'), q, k, v, out, lse,
                                      { mask = mask, bias = fa.randn(3, 5, 'float64') }) }
    -- the dead row adds 1/Lk * grad_out to every key's grad_v and nothing to grad_q
    assert.are.equal(0, g[1]:select(1, 2):select(1, 3):abs():max())
    local out0, lse0 = fa.attention(q, fa.empty(2, 0, 4, 'float64'), fa.empty(2, 0, 4, 'float64'))
    assert.is_true(out0:equal(fa.zeros(2, 3, 4, 'float64')))
    assert.is_true(lse0:equal(fa.full({ 2, 3 }, -math.huge, 'float64')))
  end)

  it("adds the additive mask term before the bias (OpenFold's order), in float64 and float32", function()
    -- One fully masked row, scale 1, D = 2 and integer k: the logits q.k are computed here as the kernels do, so
    -- the scores are exactly (q.k - mask_scale) + bias, rounded twice in the dtype (float64 with mask_scale 1e9: on
    -- the 1.2e-7 grid; float32 with 2.5e5: on the 0.016 grid), where the other order rounds once. Expected: the
    -- softmax of those scores computed here in double, its output and grad_bias (dS = P (dP - delta)); the other
    -- order is far from both. float64's q has bits below the grid; float32's q.k is exact (multiples of 2^-12).
    local Lk, D = 6, 2
    local kv = { { 3, 1 }, { -1, 2 }, { 0, 1 }, { 2, 2 }, { -3, 0 }, { 1, -1 } }
    local QV = { float64 = { 0.37, -1.21 }, float32 = { 1365 / 4096, -2731 / 4096 } }
    local bv = { 0.3, -0.7, 0.11, 1.3, -0.45, 0.9 }
    local vv = { { 0.5, -1 }, { 2, 0.25 }, { -1.5, 1 }, { 0.75, 0.5 }, { 1, -2 }, { -0.25, 1.5 } }
    local gov = { 0.6, -1.1 }
    local f32 = ffi.new('float[1]')
    local function round32(x) f32[0] = x return f32[0] end
    local function expect(dt, ms, mask_first)
      local rd = dt == 'float32' and round32 or function(x) return x end
      local qv, a, mx = QV[dt], {}, -math.huge
      for j = 1, Lk do
        local s, b = qv[1] * kv[j][1] + qv[2] * kv[j][2], rd(bv[j])
        a[j] = mask_first and rd(rd(s - ms) + b) or rd(rd(s + b) - ms)
        mx = math.max(mx, a[j])
      end
      local p, sum, out = {}, 0, { 0, 0 }
      for j = 1, Lk do p[j] = math.exp(a[j] - mx); sum = sum + p[j] end
      for j = 1, Lk do
        p[j] = p[j] / sum
        for d = 1, D do out[d] = out[d] + p[j] * rd(vv[j][d]) end
      end
      local delta, gb = gov[1] * out[1] + gov[2] * out[2], {}
      for j = 1, Lk do gb[j] = p[j] * ((rd(gov[1]) * rd(vv[j][1]) + rd(gov[2]) * rd(vv[j][2])) - delta) end
      return fa.tensor({ { out } }, 'float64'), fa.tensor({ { gb } }, 'float64')
    end
    for _, c in ipairs({ { 'float64', 1e9, 1e-12, 1e-14 }, { 'float32', 2.5e5, 2e-6, 1e-7 } }) do
      local dt, ms, rtol, atol = c[1], c[2], c[3], c[4]
      local want_out, want_gb = expect(dt, ms, true)
      local other_out, other_gb = expect(dt, ms, false)
      assert(fa.maxAbsDiff(want_out, other_out) > 100 * rtol and fa.maxAbsDiff(want_gb, other_gb) > 100 * rtol,
             dt .. ': the two orders should differ') -- the test can fail
      local q, k = fa.tensor({ { QV[dt] } }, dt), fa.tensor({ kv }, dt):view(1, Lk, D)
      local v, b = fa.tensor({ vv }, dt):view(1, Lk, D), fa.tensor({ { bv } }, dt)
      local o = { bias = b, mask = fa.zeros(1, 1, Lk, dt), mask_scale = ms, scale = 1 }
      local out, lse = fa.attention(q, k, v, o)
      local _, _, _, gb = fa.attention_backward(fa.tensor({ { gov } }, dt), q, k, v, out, lse, o)
      H.assert_close(out, want_out, rtol, atol, dt .. ' out')
      H.assert_close(gb, want_gb, rtol, atol, dt .. ' grad_bias')
    end
  end)

  it('float32: a row under an additive mask of -1e9 on every key has uniform weights in the backward too (one and two key blocks)', function()
    coarse_row_case('float32', 'cpu', nil, 4, { 7, 300 })
  end)

  it('takes one-row inputs and k, v, grad_out expanded over their rows (stride 0), as their contiguous copies', function()
    local q1, k1, v1 = fa.randn(2, 3, 1, 4, 'float64'), fa.randn(2, 3, 1, 4, 'float64'), fa.randn(2, 3, 1, 4, 'float64')
    local o1 = fa.attention(q1, k1, v1)
    assert.is_true(o1:equal(v1)) -- one key: weight 1
    local q = fa.randn(2, 3, 6, 4, 'float64')
    local ke, ve = k1:expand(2, 3, 5, 4), v1:expand(2, 3, 5, 4)
    local ge = fa.ones(1, 1, 1, 4, 'float64'):expand(2, 3, 6, 4)
    local c = function(t) return t:contiguous() end
    local o = { bias = fa.randn(6, 5, 'float64') }
    local out, lse = fa.attention(q, ke, ve, o)
    local outc, lsec = fa.attention(q, c(ke), c(ve), o)
    H.assert_close(out, v1:expand(2, 3, 6, 4), 1e-14, 1e-14, 'equal keys and values')
    assert.is_true(out:equal(outc) and lse:equal(lsec))
    local a = { fa.attention_backward(ge, q, ke, ve, out, lse, o) }
    local b = { fa.attention_backward(c(ge), q, c(ke), c(ve), outc, lsec, o) }
    for i = 1, 4 do assert.is_true(a[i]:equal(b[i]), 'gradient ' .. i) end
  end)

  it('gives NaN rows for NaN inputs (not the mean(V) of a fully masked row)', function()
    for _, dt in ipairs({ 'float32', 'float64' }) do
      local q, k, v = fa.randn(1, 3, 4, dt), fa.randn(1, 300, 4, dt), fa.randn(1, 300, 4, dt)
      q:select(2, 2):fill(0 / 0) -- row 2: every logit NaN
      k:select(2, 290):fill(0 / 0) -- key 290 (second key block): every row NaN
      local out, lse = fa.attention(q:narrow(2, 1, 2), k:narrow(2, 1, 100), v:narrow(2, 1, 100))
      local o = out:double()
      assert(o:get(1, 1, 1) == o:get(1, 1, 1), dt .. ': row 1 finite')
      assert(o:get(1, 2, 1) ~= o:get(1, 2, 1) and lse:get(1, 2) ~= lse:get(1, 2), dt .. ': NaN row')
      out = fa.attention(q, k, v):double()
      for i = 1, 3 do assert(out:get(1, i, 3) ~= out:get(1, i, 3), dt .. ': row ' .. i .. ' not NaN') end
    end
  end)

  it('takes a bias and a mask with stride-0 (expanded) dims, and sums grad_bias over them', function()
    local q, k, v = fa.randn(2, 2, 3, 4, 'float64'), fa.randn(2, 2, 5, 4, 'float64'), fa.randn(2, 2, 5, 4, 'float64')
    local b = fa.randn(1, 2, 1, 5, 'float64')
    local be = b:expand(2, 2, 3, 5)
    local gout = fa.randn(2, 2, 3, 4, 'float64')
    local out, lse = fa.attention(q, k, v, { bias = b })
    local out_e = fa.attention(q, k, v, { bias = be })
    assert.is_true(out:equal(out_e))
    local g = { fa.attention_backward(gout, q, k, v, out, lse, { bias = b }) }
    local ge = { fa.attention_backward(gout, q, k, v, out, lse, { bias = be }) }
    assert.are.same({ 2, 2, 3, 5 }, ge[4]:size())
    H.assert_close(g[4], ge[4]:sum(1):sum(3), 1e-13, 1e-13, 'grad_bias summed over its broadcast dims')
    -- a float32 grad_bias for float64 inputs is cast at the end
    local g32 = select(4, fa.attention_backward(gout, q, k, v, out, lse, { bias = b, grad_bias = fa.empty(1, 2, 1, 5) }))
    H.assert_close(g32:double(), g[4], 1e-6, 1e-7, 'float32 grad_bias')
  end)
end)

describe('fa.triangle_attention', function()
  op.run(T_CASE)
  op.run(mma_case(T_CASE))

  it('equals fa.attention on the permuted views; out has the layout of q, lse is (B, H, N, N)', function()
    local x = t_inputs({ 2, 3, 7, 4, mask = true, dead = true, proj = true })
    x.q, x.k, x.v = layout(x, x.q), layout(x, x.k), layout(x, x.v)
    local out, lse = fa.triangle_attention(x.q, x.k, x.v, x.bias, x.mask)
    assert.are.same({ 2, 3, 7, 7, 4 }, out:size())
    assert.are.same({ 2, 3, 7, 7 }, lse:size())
    -- q is a view of a (B, N, N, H, D) buffer: so is out
    assert.are.same(x.q:stride(), out:stride())
    assert.are.same({ 7 * 7 * 3 * 4, 4, 7 * 3 * 4, 3 * 4, 1 }, out:stride())
    local tr = function(t) return t:transpose(2, 3) end
    local ref, rlse = fa.attention(tr(x.q), tr(x.k), tr(x.v), { bias = x.bias:unsqueeze(2),
                                                                mask = x.mask:unsqueeze(3):unsqueeze(3) })
    assert.is_true(tr(ref):equal(out))
    assert.is_true(tr(rlse):equal(lse))
    -- contiguous inputs: contiguous out, the same values
    local c = function(t) return t:contiguous() end
    local out_c = fa.triangle_attention(c(x.q), c(x.k), c(x.v), x.bias, x.mask)
    assert.is_true(out_c:isContiguous())
    assert.is_true(out_c:equal(out))
    -- the mask as float, int32, int64 or bool: the same result
    for _, dt in ipairs({ 'float32', 'int32', 'int64', 'bool' }) do
      assert.is_true(fa.triangle_attention(x.q, x.k, x.v, x.bias, x.mask:to(dt)):equal(out), dt .. ' mask')
    end
    -- gradients in the layout of their inputs
    local g = { fa.triangle_attention_backward(fa.randn(2, 3, 7, 7, 4, 'float64'), x.q, x.k, x.v, x.bias, x.mask, out, lse) }
    assert.are.same(x.q:stride(), g[1]:stride())
    assert.are.same({ 2, 3, 7, 7 }, g[4]:size())
  end)

  it("reproduces OpenFold's additive mask inf * (mask - 1) with opts.mask_scale", function()
    local x = t_inputs({ 1, 2, 5, 4, mask = true })
    local out = fa.triangle_attention(x.q, x.k, x.v, x.bias, x.mask, { mask_scale = 1e9 })
    local ref = fa.triangle_attention(x.q, x.k, x.v, x.bias, x.mask)
    H.assert_close(out, ref, 1e-6, 1e-7, 'additive vs select (no fully masked row)')
  end)
end)

op.describe_gpu('fa.triangle_attention N = 1', function()
  it('gives out = v (one key, weight 1; the fully masked row too), grad_v = grad_out and zero other gradients', function()
    fa.manualSeed(1)
    for _, dtype in ipairs(op.GPU_DTYPES) do
      for _, D in ipairs({ 16, 32, 64, 128 }) do
        local x = t_inputs({ 2, 3, 1, D, mask = true, dead = true })
        local c = function(t) return t:to(dtype, 'cuda') end
        local q, k, v, bias, mask = c(x.q), c(x.k), c(x.v), c(x.bias), x.mask:cuda()
        for _, kernel in ipairs({ 'auto', 'simt' }) do
          local out, lse = fa.triangle_attention(q, k, v, bias, mask, { kernel = kernel })
          H.assert_near(out, v:double(), dtype == 'float32' and 1e-6 or 1e-2, dtype .. ' D ' .. D .. ' out')
          local gout = c(fa.randn(2, 3, 1, 1, D, 'float64'))
          local gq, gk, gv, gb = fa.triangle_attention_backward(gout, q, k, v, bias, mask, out, lse, { kernel = kernel })
          H.assert_near(gv, gout:double(), dtype == 'float32' and 1e-6 or 1e-2, dtype .. ' D ' .. D .. ' grad_v')
          local tiny = (dtype == 'float32' and 1e-5 or 2e-2) * H.maxabs(gout:double()) * H.maxabs(v:double())
          for name, g in pairs({ grad_q = gq, grad_k = gk, grad_bias = gb }) do
            assert(H.maxabs(g:double()) <= tiny * math.max(1, H.maxabs(q:double())), dtype .. ' ' .. name .. ' not ~0')
          end
        end
      end
    end
  end)
end)

op.describe_gpu('fa.attention with no query rows or no keys on CUDA', function()
  -- the tensor-core backward's dBias plan once divided by the number of (row, key) tiles: 0 here (a SIGFPE in
  -- dev/attn_check on the H200)
  it('returns empty or zero gradients, grad_bias zeros, in every dtype and kernel', function()
    for _, dtype in ipairs(op.GPU_DTYPES) do
      for _, kernel in ipairs({ 'auto', 'simt' }) do
        for _, L in ipairs({ { 0, 9 }, { 5, 0 } }) do
          local Lq, Lk = L[1], L[2]
          local c = function(...) return fa.randn(...):to(dtype, 'cuda') end
          local q, k, v, bias = c(2, 2, Lq, 32), c(2, 2, Lk, 32), c(2, 2, Lk, 32), c(2, 2, Lq, Lk)
          local o = { bias = bias, kernel = kernel }
          local out, lse = fa.attention(q, k, v, o)
          assert.are.same({ 2, 2, Lq, 32 }, out:size())
          if Lq > 0 then assert.are.equal(0, H.maxabs(out:double())) end
          local gq, gk, gv, gb = fa.attention_backward(c(2, 2, Lq, 32), q, k, v, out, lse, o)
          assert.are.same({ 2, 2, Lq, Lk }, gb:size())
          for name, g in pairs({ grad_q = gq, grad_k = gk, grad_v = gv }) do
            if g:numel() > 0 then assert.are.equal(0, H.maxabs(g:double()), dtype .. ' ' .. kernel .. ' ' .. name) end
          end
        end
      end
    end
  end)
end)

op.describe_gpu('fa.attention: a row under an additive mask of -1e9 on every key, on CUDA', function()
  -- the backward kernels take P = exp2((x - L2) - C2) with the row's own max and sum for such a row (delta_kernel)
  it('has uniform weights in the backward, SIMT float32 and the tensor-core kernels in bfloat16 and float16', function()
    coarse_row_case('float32', 'cuda', 'simt', 4, { 7, 300 })
    coarse_row_case('float32', 'cuda', nil, 32, { 7, 300 })
    for _, dtype in ipairs({ 'bfloat16', 'float16' }) do coarse_row_case(dtype, 'cuda', 'mma', 32, { 7, 130 }) end
  end)
end)

op.describe_gpu('fa.triangle_attention N = 4096', function()
  it('runs the forward at N = 4096 (offsets past 2^31 elements) and matches a CPU float64 computation of rows', function()
    fa.manualSeed(4096)
    local B, Hh, N, D = 1, 4, 4096, 32 -- q, k, v of 2^31 elements each (8 GB), views of (B, N, N, H, D)
    local function proj() return fa.randn(B, N, N, Hh, D, { dtype = 'float32', device = 'cuda' }):permute(1, 4, 2, 3, 5) end
    local q, k, v = proj(), proj(), proj()
    local bias = fa.randn(B, Hh, N, N, { dtype = 'float32', device = 'cuda' })
    local mask = rand_mask({ B, N, N }, true):to('bool') -- row i = 1 fully masked
    local out, lse = fa.triangle_attention(q, k, v, bias, mask:cuda())
    for _, i in ipairs({ 1, 2, 2049, 4096 }) do
      -- row i of the triangle op: fa.attention of q[:, :, i] against k[:, :, i], v[:, :, i], the bias, mask[:, i]
      local row = function(t) return t:select(3, i):to('float64', 'cpu') end
      local ref, rlse = fa.attention(row(q), row(k), row(v), { bias = bias:to('float64', 'cpu'),
                                                               mask = mask:select(2, i):view(B, 1, 1, N) })
      H.assert_near(out:select(3, i), ref, 2e-5, 'out, row i = ' .. i)
      local l = lse:select(3, i):to('float64', 'cpu')
      if i == 1 then
        assert.is_true(l:equal(fa.full(l:size(), -math.huge, 'float64')), 'lse of the fully masked row')
      else
        H.assert_near(l, rlse, 1e-6, 'lse, row i = ' .. i)
      end
    end
  end)
end)
