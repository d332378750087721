-- Fused optimiser kernels (c/optim.c, c/reduce.c): fa_sgd_step, fa_adam_step (Adam and AdamW), fa_sumsq.
-- Reference: three steps of torch.optim.SGD / Adam / AdamW on a fixed parameter and gradient sequence
-- (spec/fixtures/optim_kernels.safetensors, made by spec/fixtures/gen_elementwise.py; the hyper-parameters
-- below are the ones in that script), and a plain-Lua float64 Adam for a large (threaded) buffer.
local fa = require 'fastattn'
local H = require 'helpers.check'
local ffi = require 'ffi'

local F = H.fixture('optim_kernels')
local C = fa.C
local STEPS = 3

local SGD = {
  sgd_nesterov = { lr = 0.1, momentum = 0.9, dampening = 0, weight_decay = 0.01, nesterov = 1 },
  sgd_dampening = { lr = 0.05, momentum = 0.8, dampening = 0.3, weight_decay = 0, nesterov = 0 },
  sgd_plain = { lr = 0.1, momentum = 0, dampening = 0, weight_decay = 0.02, nesterov = 0 },
}
local ADAM = {
  adam = { lr = 0.01, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.1, decoupled = 0 },
  adam_nowd = { lr = 0.05, beta1 = 0.8, beta2 = 0.99, eps = 1e-6, weight_decay = 0, decoupled = 0 },
  adamw = { lr = 0.01, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.1, decoupled = 1 },
}
local DT = { f32 = 'float32', f64 = 'float64' }
local TOL = { f32 = { 1e-6, 1e-7 }, f64 = { 1e-13, 1e-15 } } -- agreement is within an ulp or two

local c_error, has = H.c_error, H.has

describe('optimiser kernels', function()
  for dname, dtype in pairs(DT) do
    local rtol, atol = TOL[dname][1], TOL[dname][2]
    for name, h in pairs(SGD) do
      it(string.format('%s matches torch.optim.SGD over %d steps (%s)', name, STEPS, dtype), function()
        local p = F.p0:to(dtype):clone() -- to() returns F.p0 itself for float32
        local buf = h.momentum ~= 0 and fa.zeros_like(p) or nil
        for s = 1, STEPS do
          local g = F.grads:select(1, s):to(dtype)
          fa.check(C.fa_sgd_step(p.desc, g.desc, buf and buf.desc, h.lr, h.momentum, h.dampening, h.weight_decay,
            h.nesterov, s == 1 and 1 or 0))
          H.assert_close(p, F[dname .. '.' .. name]:select(1, s), rtol, atol, name .. ' step ' .. s)
        end
      end)
    end
    for name, h in pairs(ADAM) do
      it(string.format('%s matches torch.optim.%s over %d steps (%s)', name, h.decoupled == 1 and 'AdamW' or 'Adam',
        STEPS, dtype), function()
        local p = F.p0:to(dtype):clone() -- to() returns F.p0 itself for float32
        local m, v = fa.zeros_like(p), fa.zeros_like(p)
        for s = 1, STEPS do
          local g = F.grads:select(1, s):to(dtype)
          fa.check(C.fa_adam_step(p.desc, g.desc, m.desc, v.desc, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay,
            h.decoupled, s))
          H.assert_close(p, F[dname .. '.' .. name]:select(1, s), rtol, atol, name .. ' step ' .. s)
        end
      end)
    end
  end

  it('Adam on a large float64 buffer (threaded) agrees with a plain-Lua Adam', function()
    fa.manualSeed(5)
    local n = 40009
    local p, g = fa.randn(n, 'float64'), fa.randn(n, 'float64')
    local m, v = fa.zeros_like(p), fa.zeros_like(p)
    local pl, gl = p:table(), g:table()
    local ml, vl = {}, {}
    for i = 1, n do ml[i], vl[i] = 0, 0 end
    local lr, b1, b2, eps, wd = 0.003, 0.9, 0.95, 1e-7, 0.05
    for s = 1, 2 do
      fa.check(C.fa_adam_step(p.desc, g.desc, m.desc, v.desc, lr, b1, b2, eps, wd, 1, s))
      local step_size, bc2 = lr / (1 - b1 ^ s), math.sqrt(1 - b2 ^ s)
      for i = 1, n do
        pl[i] = pl[i] * (1 - lr * wd)
        ml[i] = ml[i] * b1 + (1 - b1) * gl[i]
        vl[i] = vl[i] * b2 + (1 - b2) * gl[i] * gl[i]
        pl[i] = pl[i] - step_size * ml[i] / (math.sqrt(vl[i]) / bc2 + eps)
      end
    end
    H.assert_close(p, fa.tensor(pl, 'float64'), 1e-12, 1e-14, 'param')
    H.assert_close(m, fa.tensor(ml, 'float64'), 1e-12, 1e-14, 'exp_avg')
    H.assert_close(v, fa.tensor(vl, 'float64'), 1e-12, 1e-14, 'exp_avg_sq')
  end)

  it('SGD with momentum on a large float32 buffer (threaded) agrees with a plain-Lua SGD', function()
    fa.manualSeed(6)
    local n = 50021
    local p, g = fa.randn(n), fa.randn(n)
    local buf = fa.zeros_like(p)
    local pl, gl, bl = p:double():table(), g:double():table(), {}
    for s = 1, 2 do
      fa.check(C.fa_sgd_step(p.desc, g.desc, buf.desc, 0.1, 0.9, 0, 1e-3, 1, s == 1 and 1 or 0))
      for i = 1, n do
        local d = gl[i] + 1e-3 * pl[i]
        bl[i] = s == 1 and d or 0.9 * bl[i] + d
        pl[i] = pl[i] - 0.1 * (d + 0.9 * bl[i])
      end
    end
    H.assert_close(p, fa.tensor(pl), 1e-5, 1e-6, 'param')
    H.assert_close(buf, fa.tensor(bl), 1e-5, 1e-6, 'momentum buffer')
  end)

  it('sumsq matches the float64 sum of squares, on contiguous and strided inputs', function()
    local out = fa.empty({}, 'float64')
    fa.check(C.fa_sumsq(out.desc, F.grads.desc))
    H.assert_close(out, F.sumsq:view({}), 1e-12, 0, 'sumsq float32 grads')
    local gt = F.grads:t()
    fa.check(C.fa_sumsq(out.desc, gt.desc))
    H.assert_close(out, F.sumsq:view({}), 1e-12, 0, 'sumsq of a transposed view')
    local gd = F.grads:double()
    fa.check(C.fa_sumsq(out.desc, gd.desc))
    H.assert_close(out, F.sumsq:view({}), 1e-14, 0, 'sumsq float64')
    -- large (blocked, threaded) against a plain-Lua sum; independent of the thread count
    fa.manualSeed(9)
    local x = fa.randn(70001, 'float64')
    local ref = 0
    for _, v in ipairs(x:table()) do ref = ref + v * v end
    fa.check(C.fa_sumsq(out.desc, x.desc))
    assert(math.abs(out:item() - ref) <= 1e-12 * ref, 'large sumsq')
    local n0 = fa.getNumThreads()
    fa.setNumThreads(1)
    local one = fa.empty({}, 'float64')
    fa.check(C.fa_sumsq(one.desc, x.desc))
    fa.setNumThreads(n0)
    assert.are.equal(out:item(), one:item())
    local z = fa.empty(0)
    fa.check(C.fa_sumsq(out.desc, z.desc))
    assert.are.equal(0, out:item())
  end)

  it('report bad arguments, naming the function, the argument, expected and got', function()
    local p, g, b = fa.zeros(10), fa.zeros(10), fa.zeros(10)
    has(c_error('fa_sgd_step', p.desc, g.desc, nil, 0.1, 0.9, 0, 0, 0, 1), 'fa_sgd_step', "argument 'momentum_buf'", 'got nothing')
    has(c_error('fa_sgd_step', p.desc, g.desc, b.desc, 0.1, 0.9, 0.1, 0, 1, 1), "argument 'nesterov'", 'dampening')
    has(c_error('fa_sgd_step', p.desc, g.desc, b.desc, 0.1, 0, 0, 0, 1, 1), "argument 'nesterov'", 'momentum > 0')
    has(c_error('fa_sgd_step', p.desc, fa.zeros(11).desc, nil, 0.1, 0, 0, 0, 0, 1), "argument 'grad'", 'expected 10 elements', 'got 11')
    has(c_error('fa_sgd_step', p.desc, fa.zeros(10, 'float64').desc, nil, 0.1, 0, 0, 0, 0, 1), "argument 'grad'", 'expected dtype float32', 'got float64')
    has(c_error('fa_sgd_step', p.desc, g.desc, nil, -0.1, 0, 0, 0, 0, 1), "argument 'lr'", '>= 0', 'got -0.1')
    has(c_error('fa_sgd_step', fa.zeros(2, 5):t().desc, g.desc, nil, 0.1, 0, 0, 0, 0, 1), "argument 'param'", 'contiguous')
    has(c_error('fa_sgd_step', fa.zeros(10, 'int64').desc, g.desc, nil, 0.1, 0, 0, 0, 0, 1), "argument 'param'", 'float32 or float64', 'got int64')
    local m, v = fa.zeros(10), fa.zeros(10)
    has(c_error('fa_adam_step', p.desc, g.desc, m.desc, v.desc, 1e-3, 1.0, 0.999, 1e-8, 0, 0, 1), 'fa_adam_step', "argument 'beta1'", '[0, 1)', 'got 1')
    has(c_error('fa_adam_step', p.desc, g.desc, m.desc, v.desc, 1e-3, 0.9, 0.999, 1e-8, 0, 0, 0), "argument 'step'", '>= 1', 'got 0')
    has(c_error('fa_adam_step', p.desc, g.desc, m.desc, fa.zeros(9).desc, 1e-3, 0.9, 0.999, 1e-8, 0, 0, 1), "argument 'exp_avg_sq'", 'got 9')
    has(c_error('fa_adam_step', p.desc, g.desc, nil, v.desc, 1e-3, 0.9, 0.999, 1e-8, 0, 0, 1), "argument 'exp_avg'", 'got nothing')
    has(c_error('fa_adam_step', p.desc, g.desc, m.desc, v.desc, 1e-3, 0.9, 0.999, -1, 0, 0, 1), "argument 'eps'", 'got -1')
    has(c_error('fa_sumsq', fa.empty({}).desc, g.desc), 'fa_sumsq', "argument 'out'", 'expected dtype float64', 'got float32')
    has(c_error('fa_sumsq', fa.empty(2, 'float64').desc, g.desc), "argument 'out'", '1-element', 'got shape (2,)')
    assert.is_true(p:equal(fa.zeros(10)), 'nothing was written by the failed calls')
  end)
end)
