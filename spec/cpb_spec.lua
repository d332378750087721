-- fa.cpb / fa.cpb_backward as a case of spec/helpers/op.lua: PyTorch fixtures of lucidrains' CPB MLP
-- (spec/fixtures/gen_cpb.py), finite differences, threads, errors, and (#gpu) float32, TF32 and the 16-bit
-- weights against the CPU; then what is particular to the op (f's zero gradient at d == 0, the layout).
local fa = require 'fastattn'
local H = require 'helpers.check'
local op = require 'helpers.op'

local FX = H.fixture('cpb')
local WEIGHTS = { 'w1', 'b1', 'w2', 'b2', 'w3', 'b3' }
local GRADS = { 'kpos', 'w1', 'b1', 'w2', 'b2', 'w3', 'b3' }

local function forward(x, o)
  return fa.cpb(x.qpos, x.kpos, x.w1, x.b1, x.w2, x.b2, x.w3, x.b3, o)
end
local function backward(x, gout, o)
  local r = { fa.cpb_backward(gout, x.qpos, x.kpos, x.w1, x.b1, x.w2, x.b2, x.w3, x.b3, o) }
  local t = {}
  for i, n in ipairs(GRADS) do t[n] = r[i] end
  return t
end

-- shape {P, N, M, C, O}: query positions on a grid in [-1, 1], keys in [-1.4, 1.4] (some outside), weights with
-- PyTorch's default scale (random keys: d == 0 never happens, where finite differences would disagree)
local function inputs(s)
  local P, N, M, C, O = unpack(s)
  local qt = {}
  for i = 1, N do qt[i] = { N > 1 and 2 * (i - 1) / (N - 1) - 1 or 0.1, math.sin(i) * 0.9 } end
  local q = N > 0 and fa.tensor(qt, 'float64') or fa.empty(0, 2, 'float64')
  local k = fa.rand(P, M, 2, 'float64') * 2.8 - 1.4
  local function lin(fin, fout)
    local b = 1 / math.sqrt(math.max(fin, 1))
    return fa.rand(fout, fin, 'float64') * (2 * b) - b, fa.rand(fout, 'float64') * (2 * b) - b
  end
  local x = { qpos = q, kpos = k }
  x.w1, x.b1 = lin(2, C)
  x.w2, x.b2 = lin(C, C)
  x.w3, x.b3 = lin(C, O)
  return x
end

local function fixture(name)
  local f = function(k) return FX[name .. '/' .. k] end
  local x = { qpos = f('qpos'), kpos = f('kpos') }
  for _, w in ipairs(WEIGHTS) do x[w] = f(w) end
  return x, nil, op.fixture_expect(f, GRADS)
end

local small = function() local x, _, gout = fixture('small') return x, gout end
local S = function(k) return FX['small/' .. k] end
local f64 = function(...) return fa.empty({ ... }, 'float64') end

local CASE = {
  name = 'fa.cpb', inputs = inputs, forward = forward, backward = backward, grads = GRADS,
  float32_on_gpu = { qpos = true, kpos = true },
  fixture = { names = { 'small', 'groups', 'wide', 'blocks' }, load = fixture },
  gradcheck = { { shape = { 2, 5, 7, 6, 3 }, what = 'P 2, N 5, M 7, C 6, O 3' },
                { shape = { 1, 3, 130, 3, 1 }, what = 'two key blocks, O 1' } },
  threads = { { shape = { 2, 40, 150, 16, 2 } },   -- two key blocks, query splits
              { shape = { 5, 9, 20, 8, 3 } },
              { shape = { 40, 3, 4, 5, 2 } },      -- more units than tasks
              { shape = { 2, 0, 5, 4, 2 } }, { shape = { 2, 3, 0, 4, 2 } }, { shape = { 0, 3, 5, 4, 2 } },
              { shape = { 2, 3, 4, 0, 2 } }, { shape = { 2, 3, 4, 5, 0 } } },
  gpu = {
    shapes = { { shape = { 2, 12, 6, 8, 2 }, what = 'small' },
               { shape = { 4, 64, 64, 32, 2 }, what = 'C 32' },
               { shape = { 2, 256, 64, 128, 2 }, what = 'C 128 (the README layer)' },
               { shape = { 3, 37, 29, 128, 4 }, what = 'C 128, odd N and M' },
               { shape = { 1, 5, 300, 64, 1 }, what = 'C 64, O 1' },
               { shape = { 2, 33, 17, 24, 3 }, what = 'C 24 (not a multiple of 16)' },
               { shape = { 2, 20, 33, 128, 1 }, what = 'C 128, O 1 (the float32 tensor-core backward)' },
               { shape = { 1, 9, 70, 40, 8 }, what = 'O 8 (the tensor-core backward at its limit)' },
               { shape = { 1, 5, 40, 24, 9 }, what = 'O 9 (the WMMA backward)' },
               { shape = { 2, 0, 5, 16, 2 }, what = 'N 0' }, { shape = { 2, 3, 0, 16, 2 }, what = 'M 0' } },
    variants = { { name = 'default' }, { name = 'deterministic', deterministic = true } },
    errors = function() return { -- (made in the #gpu block: they hold GPU tensors)
      base = function()
        local x, gout = small()
        for k, t in pairs(x) do x[k] = t:float():cuda() end
        return x, gout:float():cuda()
      end,
      { "fa%.cpb: argument 'kpos': expected .*cuda:0 %(as 'w1'%), got ", { kpos = S('kpos'):float() } },
      { "fa%.cpb: argument 'qpos': expected dtype float32 %(positions are float32 on CUDA%), got bfloat16",
        { qpos = S('qpos'):bfloat16():cuda() } },
      { "fa%.cpb: argument 'b2': expected dtype float32 %(as 'w1'%), got bfloat16", { b2 = S('b2'):bfloat16():cuda() } },
      { "fa%.cpb: argument 'w1': expected float32, bfloat16 or float16 on CUDA, got float64",
        { w1 = S('w1'):cuda(), b1 = S('b1'):cuda(), w2 = S('w2'):cuda(), b2 = S('b2'):cuda(), w3 = S('w3'):cuda(),
          b3 = S('b3'):cuda() } },
      { "fa%.cpb: argument 'opts.out': expected dtype float32 on CUDA, got bfloat16",
        { opts = { out = fa.empty(2, 2, 12, 6, { dtype = 'bfloat16', device = 'cuda' }) } } },
      { "fa%.cpb_backward: argument 'grad_bias': expected .*cuda:0 %(as 'w1'%), got ",
        { gout = FX['small/grad_out']:float() }, backward = true },
    } end,
  },
  errors = {
    base = small,
    { "fa%.cpb: argument 'qpos': expected a tensor, got nil", { qpos = op.NIL } },
    { "fa%.cpb: argument 'b3': expected a tensor, got 3", { b3 = 3 } },
    { "fa%.cpb: argument 'qpos': expected a 2%-D tensor, got a 3%-D tensor", { qpos = S('qpos'):view(12, 1, 2) } },
    { "fa%.cpb: argument 'kpos': expected a 3%-D tensor", { kpos = S('kpos'):view(12, 2) } },
    { "fa%.cpb: argument 'w1': expected a 2%-D tensor", { w1 = S('w1'):view(16) } },
    { "fa%.cpb: argument 'w3': expected a 2%-D tensor", { w3 = S('w3'):view(16) } },
    { "fa%.cpb: argument 'w1': expected shape %(C, 2%) = %(4, 2%), got %(4, 4%)", { w1 = S('w1'):view(4, 4) } },
    { "fa%.cpb: argument 'qpos': expected shape %(N, 2%) = %(8, 2%), got %(8, 3%)", { qpos = f64(8, 3) } },
    { "fa%.cpb: argument 'kpos': expected shape %(P, M, 2%) = %(2, 4, 2%), got %(2, 4, 3%)", { kpos = f64(2, 4, 3) } },
    { "fa%.cpb: argument 'b1': expected shape %(C%) with C the rows of 'w1' = %(8,%), got %(7,%)", { b1 = f64(7) } },
    { "fa%.cpb: argument 'w2': expected shape %(C, C%) with C the rows of 'w1' = %(8, 8%), got %(8, 7%)",
      { w2 = f64(8, 7) } },
    { "fa%.cpb: argument 'b2': expected shape %(C%) .* = %(8,%), got %(8, 1%)", { b2 = f64(8, 1) } },
    { "fa%.cpb: argument 'w3': expected shape %(O, C%) with C the rows of 'w1' = %(2, 8%), got %(2, 9%)",
      { w3 = f64(2, 9) } },
    { "fa%.cpb: argument 'b3': expected shape %(O%) with O the rows of 'w3' = %(2,%), got %(3,%)", { b3 = f64(3) } },
    { "fa%.cpb: argument 'w2': expected dtype float64 %(as 'w1'%), got float32", { w2 = S('w2'):float() } },
    { "fa%.cpb: argument 'b3': expected dtype float64 %(as 'w1'%), got int64", { b3 = fa.zeros(2, 'int64') } },
    { "fa%.cpb: argument 'qpos': expected dtype float64 %(as 'w1' on the CPU%), got float32", { qpos = S('qpos'):float() } },
    { "fa%.cpb: argument 'kpos': expected dtype float32 %(as 'w1' on the CPU%), got float64",
      { qpos = S('qpos'):float(), w1 = S('w1'):float(), b1 = S('b1'):float(), w2 = S('w2'):float(),
        b2 = S('b2'):float(), w3 = S('w3'):float(), b3 = S('b3'):float() } },
    { "fa%.cpb: argument 'w1': expected float32 or float64 on the CPU, got bfloat16", { w1 = S('w1'):bfloat16() } },
    { "fa%.cpb: argument 'opts.out': expected shape %(P, O, N, M%) = %(2, 2, 12, 6%), got %(2, 2, 12, 5%)",
      { opts = { out = f64(2, 2, 12, 5) } } },
    { "fa%.cpb: argument 'opts.out': expected dtype float64 %(as 'w1' on the CPU%), got float32",
      { opts = { out = fa.empty(2, 2, 12, 6) } } },
    { "fa%.cpb: argument 'opts.out': expected a contiguous tensor", { opts = { out = f64(6, 2, 12, 2):transpose(1, 4) } } },
    { "fa%.cpb: argument 'opts.out': expected a tensor or nil, got \"o\"", { opts = { out = 'o' } } },
    { "fa%.cpb: argument 'opts': unknown option \"grad_w1\"", { opts = { grad_w1 = false } } },
    { "fa%.cpb: argument 'opts.deterministic': expected true or false, got 1", { opts = { deterministic = 1 } } },
    { "fa%.cpb_backward: argument 'grad_bias': expected a tensor, got \"g\"", { gout = 'g' }, backward = true },
    { "fa%.cpb_backward: argument 'grad_bias': expected shape %(P, O, N, M%) = %(2, 2, 12, 6%), got %(2, 2, 6, 12%)",
      { gout = f64(2, 2, 6, 12) }, backward = true },
    { "fa%.cpb_backward: argument 'grad_bias': expected dtype float64 %(as 'w1' on the CPU%), got float32",
      { gout = fa.empty(2, 2, 12, 6) }, backward = true },
    { "fa%.cpb_backward: argument 'kpos': expected a 3%-D tensor", { kpos = S('kpos'):view(12, 2) }, backward = true },
    { "fa%.cpb_backward: argument 'opts.grad_w2': expected shape %(8, 8%) %(as 'w2'%), got %(8, 4%)",
      { opts = { grad_w2 = f64(8, 4) } }, backward = true },
    { "fa%.cpb_backward: argument 'opts.grad_b1': expected dtype float64 %(as 'b1'%), got float32",
      { opts = { grad_b1 = fa.empty(8) } }, backward = true },
    { "fa%.cpb_backward: argument 'opts.grad_kpos': expected a contiguous tensor",
      { opts = { grad_kpos = f64(2, 6, 2):transpose(1, 3) } }, backward = true },
    { "fa%.cpb_backward: argument 'opts.grad_w3': expected a tensor, got true", { opts = { grad_w3 = true } },
      backward = true },
    { "fa%.cpb_backward: argument 'opts': unknown option \"out\"", { opts = { out = f64(2, 2, 12, 6) } }, backward = true },
    { "fa%.cpb_backward: argument 'opts.grad_b2': expected a tensor that shares no memory with argument 'b2'",
      { opts = { grad_b2 = S('b2') } }, backward = true },
    { "fa%.cpb_backward: argument 'opts.grad_w1': expected a tensor that shares no memory with argument 'grad_bias'",
      { opts = { grad_w1 = FX['small/grad_out']:view(288):narrow(1, 1, 16):view(8, 2) } }, backward = true },
  },
  tol = {
    fixture = { float64 = { 1e-10, 1e-12 }, float32 = { 1e-4, 2e-5, kpos = { 1e-3, 1e-4 } } },
    numgrad = { 1e-6, 1e-8 },
    float32 = { 1e-4, 1e-4, kpos = { 1e-3, 1e-3 } },
    -- |a - ref| <= t * (max|ref| + |ref|). float32: exact products, sums over C and over the pairs. 16-bit: per
    -- result at most 2x the largest t over the gpu shapes of the kernel's roundings emulated on these very inputs
    -- (spec/fixtures/emulate_cpb.py, scheme h1split: h1 = hi + lo into the z2 product, gz2 and h1 rounded in the
    -- gw2 and gh1 products, the gradients rounded to the dtype). The weight gradients' floor is that last
    -- rounding; above it, rare relu flips of h2 (bfloat16's hi + lo holds 16 bits; w2 in case 5 is one flip).
    gpu = { float32 = 2e-5,
            bfloat16 = { out = 1.1e-5, kpos = 1.6e-2, w1 = 8.9e-3, b1 = 8.6e-3, w2 = 4.1e-2, b2 = 1.9e-2, w3 = 3.1e-3,
                         b3 = 2.7e-3 },
            float16 = { out = 1.0e-6, kpos = 5.7e-4, w1 = 6.0e-4, b1 = 5.1e-4, w2 = 1.1e-3, b2 = 3.7e-4, w3 = 3.3e-4,
                        b3 = 2.7e-4 } },
  },
}

describe('fa.cpb', function()
  op.run(CASE)

  it('gives f a zero gradient at d == 0 and the gradient 1/(|d|+1) next to it (PyTorch autograd)', function()
    -- one query at (0.25, -0.5), one key on it and one 0.5 to the right: w1 = identity-like, so the gradient of
    -- the key position is -(grad of f) * 1/(|d|+1) per axis
    local q = fa.tensor({ { 0.25, -0.5 } }, 'float64')
    local k = fa.tensor({ { { 0.25, -0.5 }, { -0.25, -0.5 } } }, 'float64')
    local w1, b1 = fa.tensor({ { 1, 0 }, { 0, 1 } }, 'float64'), fa.tensor({ 5, 5 }, 'float64')
    local w2, b2 = fa.tensor({ { 1, 0 }, { 0, 1 } }, 'float64'), fa.zeros(2, 'float64')
    local w3, b3 = fa.tensor({ { 2, 3 } }, 'float64'), fa.zeros(1, 'float64')
    local out = fa.cpb(q, k, w1, b1, w2, b2, w3, b3)
    -- key 1: f = 0: out = 2*5 + 3*5; key 2: f = (log 1.5, 0): out = 2*(5 + log 1.5) + 15
    H.assert_close(out:view(2), fa.tensor({ 25, 25 + 2 * math.log(1.5) }, 'float64'), 1e-15, 1e-15, 'out')
    local gk, gw1 = fa.cpb_backward(fa.ones(1, 1, 1, 2, 'float64'), q, k, w1, b1, w2, b2, w3, b3)
    H.assert_close(gk, fa.tensor({ { { 0, 0 }, { -2 / 1.5, 0 } } }, 'float64'), 1e-15, 0, 'grad_kpos')
    H.assert_close(gw1, fa.tensor({ { 2 * math.log(1.5), 0 }, { 3 * math.log(1.5), 0 } }, 'float64'), 1e-15, 0, 'grad_w1')
  end)

  it('lays the bias out as (P, O, N, M): bias[p, o, i, j] from query i and key j of p', function()
    fa.manualSeed(3)
    local x = inputs({ 3, 4, 5, 6, 2 })
    local out = forward(x)
    assert.are.same({ 3, 2, 4, 5 }, out:size())
    -- pair (p=3, i=2, j=4) alone: the same numbers
    local one = fa.cpb(x.qpos:narrow(1, 2, 1), x.kpos:narrow(1, 3, 1):narrow(2, 4, 1), x.w1, x.b1, x.w2, x.b2, x.w3,
                       x.b3)
    H.assert_close(one:view(2), out:select(1, 3):select(2, 2):select(2, 4):contiguous(), 1e-14, 1e-14, 'pair')
  end)

  it('returns its out buffer and skips false gradients', function()
    local x, gout = small()
    local out = f64(2, 2, 12, 6)
    assert.are.equal(out, forward(x, { out = out }))
    local r = { fa.cpb_backward(gout, x.qpos, x.kpos, x.w1, x.b1, x.w2, x.b2, x.w3, x.b3,
                                { grad_kpos = false, grad_w1 = false, grad_b1 = false, grad_w2 = false,
                                  grad_b2 = false, grad_w3 = false }) }
    for i = 1, 6 do assert.is_nil(r[i]) end
    H.assert_close(r[7], FX['small/grad_b3'], 1e-12, 1e-12, 'grad_b3 alone')
  end)

  it('rejects arguments past opts', function()
    local x = small()
    local ok, err = pcall(fa.cpb, x.qpos, x.kpos, x.w1, x.b1, x.w2, x.b2, x.w3, x.b3, nil, 5)
    assert.is_false(ok)
    assert.matches('^spec/cpb_spec.lua:%d+: fa%.cpb: argument #10: expected nothing', tostring(err))
  end)

  -- 2x the t of spec/fixtures/emulate_d2d.py's emulation of this very case (cuda/cpb.cu's TF32 path as of
  -- b349186: z2 = h1 w2^T, gw2 = gz2^T h1 and gh1 = gz2 w2 with one TF32 operand each, no hi + lo split; relu flips
  -- of h2 move the weight gradients); b3 (a float32 sum of grad_bias, no TF32) as the float32 case
  local TF32_TOL = { out = 6.2e-4, kpos = 3.2e-2, w1 = 2.4e-2, b1 = 2.8e-2, w2 = 5.2e-2, b2 = 4.2e-2, w3 = 5.6e-4,
                     b3 = 2e-5 }
  op.describe_gpu('fa.cpb on CUDA, TF32', function()
    it('matches the CPU with fa.cuda.allowTF32(true) within TF32 rounding', function()
      fa.manualSeed(4)
      local x64 = inputs({ 2, 64, 48, 128, 2 })
      local gout = fa.randn(2, 2, 64, 48, 'float64')
      local xr = {}
      for k, t in pairs(x64) do xr[k] = t:float():double() end
      local ref = backward(xr, gout:float():double())
      ref.out = forward(xr)
      local x = {}
      for k, t in pairs(x64) do x[k] = t:float():cuda() end
      fa.cuda.allowTF32(true)
      local ok, err = pcall(function()
        local r = backward(x, gout:float():cuda())
        r.out = forward(x)
        for k, v in pairs(ref) do H.assert_near(r[k], v, TF32_TOL[k], 'TF32 ' .. k) end
      end)
      fa.cuda.allowTF32(false)
      assert(ok, err)
    end)
  end)
end)
