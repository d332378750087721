-- fa_softmax_forward / fa_softmax_backward (softmax and log-softmax, CPU) against PyTorch
-- (spec/fixtures/gen_nnops.py), a plain-Lua reference and float64 finite differences.
local fa = require 'fastattn'
local H = require 'helpers.check'
local C = fa.C

local F = H.fixture('nnops')

local function forward(x, dim, lg, out)
  out = out or fa.empty_like(x)
  fa.check(C.fa_softmax_forward(out.desc, x.desc, dim, lg and 1 or 0))
  return out
end
local function backward(go, y, dim, lg, gx)
  gx = gx or fa.empty_like(y)
  fa.check(C.fa_softmax_backward(gx.desc, go.desc, y.desc, dim, lg and 1 or 0))
  return gx
end

-- same values in a transposed storage
local function strided(t)
  local s = t:size()
  local r = fa.empty(s[3], s[2], s[1], t:dtype()):permute(3, 2, 1)
  assert.is_false(r:isContiguous())
  return r:copy(t)
end

local err_of = H.err_of

describe('fa_softmax', function()
  for d = 0, 2 do
    for _, lg in ipairs({ false, true }) do
      local name = (lg and 'lsm' or 'sm') .. '_'
      for _, dt in ipairs({ 'float64', 'float32' }) do
        local rtol, atol = 1e-11, 1e-13
        if dt == 'float32' then rtol, atol = 1e-5, 1e-6 end
        it(('%s over dim %d (0-based) matches PyTorch (%s)'):format(lg and 'log-softmax' or 'softmax', d, dt), function()
          local x, go = F.sm_x:to(dt), F.sm_go:to(dt)
          local y = forward(x, d, lg)
          H.assert_close(y, F[name .. 'out_' .. d]:to(dt), rtol, atol, 'out')
          H.assert_close(backward(go, y, d, lg), F[name .. 'gx_' .. d]:to(dt), rtol, atol, 'grad_x')
        end)
      end
      it(('%s over dim %d takes non-contiguous tensors'):format(lg and 'log-softmax' or 'softmax', d), function()
        local x, go = strided(F.sm_x), strided(F.sm_go)
        local y = forward(x, d, lg, strided(fa.zeros(3, 4, 5, 'float64')))
        H.assert_close(y, F[name .. 'out_' .. d], 1e-11, 1e-13, 'out')
        local gx = backward(go, y, d, lg, strided(fa.zeros(3, 4, 5, 'float64')))
        H.assert_close(gx, F[name .. 'gx_' .. d], 1e-11, 1e-13, 'grad_x')
      end)
    end
  end

  it('has the gradients of float64 finite differences', function()
    fa.manualSeed(11)
    local x = fa.randn(3, 4, 5, 'float64') * 2
    local gout = fa.randn(3, 4, 5, 'float64')
    for d = 0, 2 do
      for _, lg in ipairs({ false, true }) do
        local f = function() return forward(x, d, lg) end
        local gx = backward(gout, forward(x, d, lg), d, lg)
        H.assert_close(gx, H.numgrad(f, x, gout), 1e-6, 1e-8, ('dim %d log %s'):format(d, tostring(lg)))
      end
    end
  end)

  it('matches a plain-Lua reference on long rows and wide inner blocks', function()
    fa.manualSeed(5)
    -- (3, 7, 150) over dim 1: the inner size 150 spans several blocks; over dim 2: long rows
    local x = fa.randn(3, 7, 150, 'float64') * 4
    local go = fa.randn(3, 7, 150, 'float64')
    local xt, gt = x:table(), go:table()
    for _, d in ipairs({ 1, 2 }) do
      for _, lg in ipairs({ false, true }) do
        local y = forward(x, d, lg)
        local gx = backward(go, y, d, lg)
        local ref, gref = fa.zeros(3, 7, 150, 'float64'), fa.zeros(3, 7, 150, 'float64')
        local len = d == 1 and 7 or 150
        local function at(t, a, k, b) if d == 1 then return t[a][k][b] else return t[a][b][k] end end
        for a = 1, 3 do
          for b = 1, (d == 1 and 150 or 7) do
            local m = -math.huge
            for k = 1, len do m = math.max(m, at(xt, a, k, b)) end
            local s = 0
            for k = 1, len do s = s + math.exp(at(xt, a, k, b) - m) end
            local p, sgp, sg = {}, 0, 0
            for k = 1, len do
              p[k] = math.exp(at(xt, a, k, b) - m) / s
              sgp = sgp + at(gt, a, k, b) * p[k]
              sg = sg + at(gt, a, k, b)
            end
            for k = 1, len do
              local i, j = a, (d == 1 and k or b)
              local l = d == 1 and b or k
              local v = lg and (at(xt, a, k, b) - m - math.log(s)) or p[k]
              local g = lg and (at(gt, a, k, b) - p[k] * sg) or p[k] * (at(gt, a, k, b) - sgp)
              ref:set(i, j, l, v)
              gref:set(i, j, l, g)
            end
          end
        end
        H.assert_close(y, ref, 1e-11, 1e-13, ('out dim %d log %s'):format(d, tostring(lg)))
        H.assert_close(gx, gref, 1e-10, 1e-12, ('grad_x dim %d log %s'):format(d, tostring(lg)))
        if not lg then -- rows sum to one
          H.assert_close(y:sum(d + 1), fa.ones(d == 1 and { 3, 1, 150 } or { 3, 7, 1 }, 'float64'), 1e-12, 1e-12, 'row sums')
        end
      end
    end
  end)

  it('agrees in float32 with the float64 kernel on long rows and wide blocks', function()
    fa.manualSeed(8)
    local x = (fa.randn(3, 7, 150) * 6):float() -- float32 values, exactly representable in float64
    local go = fa.randn(3, 7, 150)
    for _, d in ipairs({ 1, 2 }) do
      for _, lg in ipairs({ false, true }) do
        local y32 = forward(x, d, lg)
        local y64 = forward(x:double(), d, lg)
        H.assert_close(y32, y64, 2e-6, lg and 2e-6 or 1e-9, ('out dim %d log %s'):format(d, tostring(lg)))
        H.assert_close(backward(go, y32, d, lg), backward(go:double(), y64, d, lg), 1e-5, 1e-6,
          ('grad_x dim %d log %s'):format(d, tostring(lg)))
      end
    end
  end)

  it('gives exact zeros for -inf logits (masks) and tiny values for very negative ones', function()
    for _, dt in ipairs({ 'float32', 'float64' }) do
      local x = fa.tensor({ 0, -math.huge, 1, -200 }, dt)
      local y = forward(x, 0, false)
      local e = math.exp(1)
      H.assert_close(y, fa.tensor({ 1 / (1 + e), 0, e / (1 + e), 0 }, dt), 1e-6, 1e-80, 'softmax ' .. dt)
      assert.are.equal(0, y:get(2))
      assert.are.equal(-math.huge, forward(x, 0, true):get(2))
    end
  end)

  it('is stable for large logits and handles a 0-d tensor', function()
    local x = fa.tensor({ 1000, 1001, 1002 }, 'float32')
    local y = forward(x, 0, false)
    H.assert_close(y, fa.tensor({ 0.09003057, 0.24472847, 0.66524096 }), 1e-5, 1e-7, 'softmax of large logits')
    local ly = forward(x, 0, true)
    H.assert_close(ly, fa.tensor({ -2.40760596, -1.40760596, -0.40760596 }), 1e-5, 1e-6, 'log-softmax of large logits')
    local s = fa.full({}, 3.5, 'float64')
    assert.are.equal(1, forward(s, 0, false):item())
    assert.are.equal(0, forward(s, 0, true):item())
  end)

  it('rejects bad arguments with messages naming them', function()
    local x = fa.randn(3, 4)
    local e = err_of(function() forward(x, 2, false) end)
    assert.truthy(e:find("fa_softmax_forward: argument 'dim': expected 0 <= dim < 2", 1, true), e)
    e = err_of(function() forward(x, -1, false) end)
    assert.truthy(e:find("argument 'dim'", 1, true), e)
    e = err_of(function() forward(x, 0, false, fa.empty(4, 3)) end)
    assert.truthy(e:find("argument 'out': expected shape (3, 4)", 1, true), e)
    e = err_of(function() forward(x:long(), 0, false) end)
    assert.truthy(e:find("argument 'x': expected float32 or float64 on the CPU, got int64", 1, true), e)
    e = err_of(function() backward(fa.randn(3, 4, 'float64'), x, 1, false) end)
    assert.truthy(e:find("fa_softmax_backward: argument 'grad_out': expected dtype float32", 1, true), e)
  end)
end)
