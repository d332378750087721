-- fa_layernorm_forward / fa_layernorm_backward (CPU) against PyTorch (spec/fixtures/gen_nnops.py) and
-- float64 finite differences.
local fa = require 'fastattn'
local H = require 'helpers.check'
local C = fa.C

local F = H.fixture('nnops')

local function stat_dtype(x) return x:dtype() == 'float64' and 'float64' or 'float32' end

-- out, mean, rstd; `out` may be given (e.g. a non-contiguous view)
local function forward(x, w, b, n, out, eps)
  local rows = math.floor(x:numel() / n) -- C reports a norm_size that does not divide
  out = out or fa.empty_like(x)
  local mean, rstd = fa.empty(rows, stat_dtype(x)), fa.empty(rows, stat_dtype(x))
  fa.check(C.fa_layernorm_forward(out.desc, mean.desc, rstd.desc, x.desc, w and w.desc, b and b.desc, n, eps or 1e-5))
  return out, mean, rstd
end

-- grad_x (fresh unless given); gw/gb accumulate when given
local function backward(go, x, mean, rstd, w, n, gw, gb, gx)
  gx = gx or fa.empty_like(x)
  fa.check(C.fa_layernorm_backward(gx.desc, gw and gw.desc, gb and gb.desc, go.desc, x.desc, mean.desc, rstd.desc,
    w and w.desc, n))
  return gx
end

local function err_of(f)
  local ok, e = pcall(f)
  assert.is_false(ok, 'expected an error')
  return e
end

describe('fa_layernorm', function()
  for _, tag in ipairs({ '7', '35' }) do
    local n = tonumber(tag)
    for _, dt in ipairs({ 'float64', 'float32' }) do
      local rtol, atol = 1e-10, 1e-12
      if dt == 'float32' then rtol, atol = 1e-5, 2e-5 end
      local x, go = F.ln_x:to(dt), F.ln_go:to(dt)

      it(('matches PyTorch over the last %s elements with affine (%s)'):format(tag, dt), function()
        local w, b = F['ln' .. tag .. '_w']:to(dt), F['ln' .. tag .. '_b']:to(dt)
        local out, mean, rstd = forward(x, w, b, n)
        H.assert_close(out, F['ln' .. tag .. '_aff_out']:to(dt), rtol, atol, 'out')
        H.assert_close(mean, F['ln' .. tag .. '_mean']:to(dt), rtol, atol, 'mean')
        H.assert_close(rstd, F['ln' .. tag .. '_rstd']:to(dt), rtol, atol, 'rstd')
        local gw, gb = fa.zeros_like(w), fa.zeros_like(b)
        local gx = backward(go, x, mean, rstd, w, n, gw, gb)
        H.assert_close(gx, F['ln' .. tag .. '_aff_gx']:to(dt), rtol, atol, 'grad_x')
        H.assert_close(gw, F['ln' .. tag .. '_aff_gw']:to(dt), rtol, atol, 'grad_weight')
        H.assert_close(gb, F['ln' .. tag .. '_aff_gb']:to(dt), rtol, atol, 'grad_bias')
        -- parameter gradients accumulate, grad_x is overwritten
        backward(go, x, mean, rstd, w, n, gw, gb, gx)
        H.assert_close(gx, F['ln' .. tag .. '_aff_gx']:to(dt), rtol, atol, 'grad_x (second call)')
        H.assert_close(gw, F['ln' .. tag .. '_aff_gw']:to(dt) * 2, rtol, atol, 'grad_weight accumulated')
        H.assert_close(gb, F['ln' .. tag .. '_aff_gb']:to(dt) * 2, rtol, atol, 'grad_bias accumulated')
      end)

      it(('matches PyTorch over the last %s elements without affine (%s)'):format(tag, dt), function()
        local out, mean, rstd = forward(x, nil, nil, n)
        H.assert_close(out, F['ln' .. tag .. '_out']:to(dt), rtol, atol, 'out')
        local gx = backward(go, x, mean, rstd, nil, n)
        H.assert_close(gx, F['ln' .. tag .. '_gx']:to(dt), rtol, atol, 'grad_x')
      end)
    end
  end

  it('takes non-contiguous x, out, grad_out, grad_x, weight', function()
    local function strided(t) -- same values, transposed storage
      local s = t:size()
      local r = fa.empty(s[3], s[2], s[1], t:dtype()):permute(3, 2, 1)
      assert.is_false(r:isContiguous())
      return r:copy(t)
    end
    local x, go = strided(F.ln_x), strided(F.ln_go)
    local w = fa.empty(7, 5, 'float64'):t():copy(F.ln35_w)
    local b = F.ln35_b
    local out = strided(fa.zeros(3, 5, 7, 'float64'))
    local _, mean, rstd = forward(x, w, b, 35, out)
    H.assert_close(out, F.ln35_aff_out, 1e-10, 1e-12, 'out')
    local gx = strided(fa.zeros(3, 5, 7, 'float64'))
    local gw = fa.zeros(7, 5, 'float64'):t()
    backward(go, x, mean, rstd, w, 35, gw, nil, gx)
    H.assert_close(gx, F.ln35_aff_gx, 1e-10, 1e-12, 'grad_x')
    H.assert_close(gw, F.ln35_aff_gw, 1e-10, 1e-12, 'grad_weight')
  end)

  it('has the gradients of float64 finite differences', function()
    fa.manualSeed(7)
    for _, affine in ipairs({ true, false }) do
      local x = fa.randn(2, 3, 5, 'float64') * 1.5 + 0.3
      local w = affine and fa.randn(5, 'float64') or nil
      local b = affine and fa.randn(5, 'float64') or nil
      local gout = fa.randn(2, 3, 5, 'float64')
      local f = function() return (forward(x, w, b, 5)) end
      local _, mean, rstd = forward(x, w, b, 5)
      local gw = affine and fa.zeros(5, 'float64') or nil
      local gb = affine and fa.zeros(5, 'float64') or nil
      local gx = backward(gout, x, mean, rstd, w, 5, gw, gb)
      H.assert_close(gx, H.numgrad(f, x, gout), 1e-6, 1e-8, 'grad_x vs finite differences')
      if affine then
        H.assert_close(gw, H.numgrad(f, w, gout), 1e-6, 1e-8, 'grad_weight vs finite differences')
        H.assert_close(gb, H.numgrad(f, b, gout), 1e-6, 1e-8, 'grad_bias vs finite differences')
      end
    end
  end)

  it('gives the same gradients with 1 and 2 threads', function()
    local nthreads = fa.getNumThreads()
    fa.manualSeed(3)
    local x, go = fa.randn(500, 97), fa.randn(500, 97)
    local w, b = fa.randn(97), fa.randn(97)
    local res = {}
    for _, nt in ipairs({ 1, 2 }) do
      fa.setNumThreads(nt)
      local out, mean, rstd = forward(x, w, b, 97)
      local gw, gb = fa.zeros(97), fa.zeros(97)
      local gx = backward(go, x, mean, rstd, w, 97, gw, gb)
      res[nt] = { out, gx, gw, gb }
    end
    fa.setNumThreads(nthreads)
    for i = 1, 4 do assert.is_true(res[1][i]:equal(res[2][i]), 'result ' .. i) end
  end)

  it('gives grad_x the same bits with and without the parameter gradients', function()
    for _, dt in ipairs({ 'float32', 'float64' }) do
      fa.manualSeed(4)
      local x, go, w = fa.randn(40, 600, dt), fa.randn(40, 600, dt), fa.randn(600, dt)
      local _, mean, rstd = forward(x, w, nil, 600)
      local both = backward(go, x, mean, rstd, w, 600, fa.zeros(600, dt), fa.zeros(600, dt))
      assert.is_true(backward(go, x, mean, rstd, w, 600):equal(both), dt .. ': grad_x alone')
      assert.is_true(backward(go, x, mean, rstd, w, 600, fa.zeros(600, dt)):equal(both), dt .. ': with grad_weight')
    end
  end)

  it('rejects bad arguments with messages naming them', function()
    local x = fa.randn(3, 5, 7)
    local e = err_of(function() forward(x, nil, nil, 6) end)
    assert.truthy(e:find("fa_layernorm_forward: argument 'norm_size'", 1, true), e)
    e = err_of(function() forward(x, fa.ones(5), nil, 7) end)
    assert.truthy(e:find("argument 'weight': expected 7 elements", 1, true), e)
    e = err_of(function() forward(x, fa.ones(7, 'float64'), nil, 7) end)
    assert.truthy(e:find("argument 'weight': expected dtype float32", 1, true), e)
    e = err_of(function()
      local out, mean = fa.empty_like(x), fa.empty(15, 'float64')
      fa.check(C.fa_layernorm_forward(out.desc, mean.desc, nil, x.desc, nil, nil, 7, 1e-5))
    end)
    assert.truthy(e:find("argument 'mean': expected dtype float32", 1, true), e)
    e = err_of(function()
      local _, mean, rstd = forward(x, nil, nil, 7)
      backward(fa.randn(3, 5, 6), x, mean, rstd, nil, 7)
    end)
    assert.truthy(e:find("fa_layernorm_backward: argument 'grad_out': expected shape (3, 5, 7)", 1, true), e)
  end)
end)
