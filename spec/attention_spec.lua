-- fa.attention and fa.triangle_attention as cases of spec/helpers/op.lua: PyTorch float64 fixtures
-- (spec/fixtures/gen_attention.py), finite differences, threads, errors, and (#gpu) the GPU kernels against the
-- CPU; then what is particular to attention (lse, dropout, layouts, sizes).
local ffi = require 'ffi'
local fa = require 'fastattn'
local H = require 'helpers.check'
local op = require 'helpers.op'

local FX = H.fixture('attention')

local function merge(...)
  local r = {}
  for i = 1, select('#', ...) do
    for k, v in pairs(select(i, ...) or {}) do r[k] = v end
  end
  return r
end

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
  local want = { out = f('out'), q = f('grad_q'), k = f('grad_k'), v = f('grad_v'), bias = f('grad_bias') }
  return x, opts, f('grad_out'), want
end

-- GPU shapes: N, D sweeps at B = 2, H = 3 (the lead's GPU machine)
local A_GPU = {}
for _, N in ipairs({ 1, 16, 17, 65, 100, 128, 130, 200 }) do
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
  fixture = { names = { 'gqa', 'mqa', 'additive' }, load = a_fixture },
  gradcheck = {
    { shape = { 4, 2, 3, 5, 3, batch = { 2 }, bias = { 4, 1, 5 }, mask = { 2, 1, 3, 5 }, dead = true },
      opts = { scale = 0.7 }, what = 'GQA, broadcast bias, dead row' },
    { shape = { 2, 1, 4, 3, 2, batch = { 2, 1, 2 }, bias = { 2, 1, 1, 1, 4, 3 }, mask = { 3 } },
      opts = { mask_scale = 3 }, what = 'MQA, additive mask, three batch dims' },
    { shape = { 1, 1, 3, 70, 2, bias = { 1, 3, 70 } }, what = 'two key blocks' },
  },
  threads = {
    { shape = { 4, 2, 40, 70, 16, batch = { 2 }, bias = { 4, 1, 70 }, mask = { 2, 1, 40, 70 }, dead = true } },
    { shape = { 2, 2, 33, 130, 8, batch = { 3, 2 }, bias = { 1, 2, 1, 33, 130 } } },
    { shape = { 2, 1, 0, 5, 4, batch = { 2 }, bias = { 2, 0, 5 } } },
    { shape = { 2, 1, 5, 0, 4, batch = { 2 }, bias = { 2, 5, 0 } } },
  },
  tol = {
    fixture = { float64 = { 1e-10, 1e-12 }, float32 = { 1e-4, 1e-5 } },
    numgrad = { 1e-6, 1e-8 },
    float32 = { 1e-4, 1e-4 },
    gpu = { float32 = 2e-5, bfloat16 = 1e-2, float16 = 2e-3 },
  },
  gpu = {
    shapes = A_GPU,
    variants = { { name = 'default' }, { name = 'simt', kernel = 'simt' }, { name = 'mma', kernel = 'mma' },
                 { name = 'deterministic', deterministic = true } },
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
local function t_forward(x, o)
  return (fa.triangle_attention(lastc(x.q), lastc(x.k), lastc(x.v), x.bias, x.mask, o))
end
local function t_backward(x, gout, o)
  local fo = merge(o)
  for _, n in ipairs({ 'grad_q', 'grad_k', 'grad_v', 'grad_bias' }) do fo[n] = nil end
  local q, k, v = lastc(x.q), lastc(x.k), lastc(x.v)
  local out, lse, rng = fa.triangle_attention(q, k, v, x.bias, x.mask, fo)
  local bo = merge(o, { rng = rng })
  if rng then bo.seed, bo.offset = nil, nil end
  local gq, gk, gv, gb = fa.triangle_attention_backward(lastc(gout), q, k, v, x.bias, x.mask, out, lse, bo)
  return { q = gq, k = gk, v = gv, bias = gb }
end

-- shape {B, H, N, D, mask = bool, dead = bool, proj = bool}: proj: q, k, v are views of (B, N, N, H, D) buffers
local function t_inputs(s)
  local B, Hh, N, D = s[1], s[2], s[3], s[4]
  local function qkv()
    if s.proj then return fa.randn(B, N, N, Hh, D, 'float64'):permute(1, 4, 2, 3, 5) end
    return fa.randn(B, Hh, N, N, D, 'float64')
  end
  local x = { q = qkv(), k = qkv(), v = qkv(), bias = fa.randn(B, Hh, N, N, 'float64') }
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
for _, N in ipairs({ 1, 16, 17, 65, 100, 128, 130, 200 }) do
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

describe('fa.attention', function()
  op.run(A_CASE)

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

describe('fa.triangle_attention', function()
  op.run(T_CASE)
end)
