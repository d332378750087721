-- matmul and linear (c/matmul.c, c/linear.c) against PyTorch fixtures (spec/fixtures/gen_conv.py), float64
-- finite differences, strided and transposed operands, broadcast batches, errors.
local fa = require 'fastattn'
local ffi = require 'ffi'
local H = require 'helpers.check'
local C = fa.C

local function mm(a, b, ta, tb, alpha, beta, out)
  local m = ta == 1 and a:size(-1) or a:size(-2)
  local n = tb == 1 and b:size(-2) or b:size(-1)
  local batch = math.max(a:dim() == 3 and a:size(1) or 1, b:dim() == 3 and b:size(1) or 1)
  out = out or fa.zeros((a:dim() == 3 or b:dim() == 3) and { batch, m, n } or { m, n }, a:dtype())
  fa.check(C.fa_matmul_forward(out.desc, a.desc, b.desc, ta or 0, tb or 0, alpha or 1, beta or 0))
  return out
end
local function mm_back(gout, a, b)
  local ga, gb = fa.full(a:size(), 5, a:dtype()), fa.full(b:size(), 5, b:dtype())
  fa.check(C.fa_matmul_backward(ga.desc, gb.desc, gout.desc, a.desc, b.desc))
  return ga, gb
end
-- same values, transposed strides: t:transpose(-2,-1):contiguous():transpose(-2,-1)
local function tview(t)
  local d = t:dim()
  return t:transpose(d - 1, d):contiguous():transpose(d - 1, d)
end

local TOL = { float64 = { 1e-12, 1e-12 }, float32 = { 1e-5, 1e-5 } }

describe('fa_matmul', function()
  local f = H.fixture('matmul')
  for _, name in ipairs({ 'm2d', 'batched', 'bcast_a', 'bcast_b', 'vec' }) do
    for _, dt in ipairs({ 'float64', 'float32' }) do
      it(name .. ' ' .. dt .. ': forward and gradients as PyTorch', function()
        local a, b, g = f[name .. '.a']:to(dt), f[name .. '.b']:to(dt), f[name .. '.gout']:to(dt)
        local r, at = TOL[dt][1], TOL[dt][2]
        H.assert_close(mm(a, b), f[name .. '.out'], r, at, 'out')
        local ga, gb = mm_back(g, a, b)
        H.assert_close(ga, f[name .. '.ga'], r, at, 'grad a')
        H.assert_close(gb, f[name .. '.gb'], r, at, 'grad b')
        -- transposed views go to BLAS as flipped trans flags
        H.assert_close(mm(tview(a), tview(b)), f[name .. '.out'], r, at, 'out from transposed views')
        local ga2, gb2 = mm_back(tview(g), tview(a), b)
        H.assert_close(ga2, f[name .. '.ga'], r, at, 'grad a from transposed views')
        H.assert_close(gb2, f[name .. '.gb'], r, at, 'grad b from transposed views')
      end)
    end
  end

  it('applies trans flags, alpha and beta', function()
    local a, b = f['batched.a'], f['batched.b']
    local ref = f['batched.out']
    local at = a:transpose(2, 3):contiguous() -- (2, 5, 3) holding a^T
    local bt = b:transpose(2, 3):contiguous()
    H.assert_close(mm(at, bt, 1, 1), ref, 1e-12, 1e-12, 'a^T^T @ b^T^T')
    local out0 = fa.randn(ref:size(), 'float64')
    local out = mm(a, bt, 0, 1, 2, 0.5, out0:clone())
    H.assert_close(out, ref * 2 + out0 * 0.5, 1e-12, 1e-12, '2 a b + 0.5 out')
  end)

  it('writes through a transposed or strided output and reads strided slices', function()
    local a, b, ref = f['m2d.a'], f['m2d.b'], f['m2d.out']
    -- a (3, 5) as every other column of a (3, 10): no unit stride, copied
    local wide = fa.zeros(3, 5, 2, 'float64')
    wide:select(3, 1):copy(a)
    local as = wide:select(3, 1)
    assert.are.same({ 10, 2 }, as:stride())
    H.assert_close(mm(as, b), ref, 1e-12, 1e-12, 'strided a')
    -- transposed output: out (3, 4) stored as (4, 3)
    local ot = fa.zeros(4, 3, 'float64'):t()
    mm(a, b, 0, 0, 1, 0, ot)
    H.assert_close(ot, ref, 1e-12, 1e-12, 'transposed out')
    -- strided output with beta = 1 keeps what was there
    local store = fa.ones(3, 4, 2, 'float64')
    local os = store:select(3, 2)
    mm(a, b, 0, 0, 1, 1, os)
    H.assert_close(os, ref + 1, 1e-12, 1e-12, 'strided out, beta 1')
    H.assert_close(store:select(3, 1), fa.ones(3, 4, 'float64'), 0, 0, 'untouched neighbours')
  end)

  it('many small products (one per thread) equal one at a time', function()
    fa.manualSeed(11)
    local a, b = fa.randn(64, 40, 30, 'float64'), fa.randn(64, 30, 20, 'float64') -- 48 kFLOP each, 3 MFLOP in all
    local out = mm(a, b)
    for i = 1, 64, 9 do
      H.assert_close(out:select(1, i), mm(a:select(1, i), b:select(1, i)), 1e-13, 1e-13, 'batch ' .. i)
    end
  end)

  it('large products split over threads (by rows or by columns) equal row-by-row products', function()
    fa.manualSeed(15)
    for _, s in ipairs({ { 300, 200, 50 }, { 40, 200, 333 } }) do -- m >= n splits rows, m < n columns
      local m, k, n = s[1], s[2], s[3]
      for ta = 0, 1 do
        for tb = 0, 1 do
          local a = ta == 1 and fa.randn(k, m, 'float64') or fa.randn(m, k, 'float64')
          local b = tb == 1 and fa.randn(n, k, 'float64') or fa.randn(k, n, 'float64')
          local out = mm(a, b, ta, tb)
          local ac = ta == 1 and a:t():contiguous() or a
          local bc = tb == 1 and b:t():contiguous() or b
          for i = 1, m, 37 do -- each row alone is a small product on one thread
            H.assert_close(out:narrow(1, i, 1), mm(ac:narrow(1, i, 1), bc), 1e-12, 1e-12,
              string.format('%dx%dx%d ta %d tb %d row %d', m, k, n, ta, tb, i))
          end
        end
      end
    end
  end)

  it('gradients by finite differences (float64, broadcast batch)', function()
    fa.manualSeed(12)
    local a, b = fa.randn(3, 4, 5, 'float64'), fa.randn(1, 5, 2, 'float64')
    local g = fa.randn(3, 4, 2, 'float64')
    local ga, gb = mm_back(g, a, b)
    local fn = function() return mm(a, b) end
    H.assert_close(ga, H.numgrad(fn, a, g), 1e-7, 1e-8, 'grad a')
    H.assert_close(gb, H.numgrad(fn, b, g), 1e-7, 1e-8, 'grad b')
  end)

  it('Tensor:matmul uses it for 2-D and batched shapes', function()
    H.assert_close(f['m2d.a']:matmul(f['m2d.b']), f['m2d.out'], 1e-12, 1e-12, '2-D')
    H.assert_close(f['bcast_a.a']:matmul(f['bcast_a.b']), f['bcast_a.out'], 1e-12, 1e-12, 'broadcast')
  end)

  it('reports bad arguments', function()
    local a, b = fa.randn(3, 5), fa.randn(4, 2)
    local function err(out, x, y, ta, tb)
      assert.are_not.equal(0, C.fa_matmul_forward(out.desc, x.desc, y.desc, ta or 0, tb or 0, 1, 0))
      return ffi.string(C.fa_last_error())
    end
    assert.matches("fa_matmul_forward: argument 'b': inner sizes differ: op(a) is 3x5 (a of shape (3, 5)), op(b) is 4x2",
      err(fa.empty(3, 2), a, b), 1, true)
    assert.matches("argument 'b': batch sizes differ: a has 2", err(fa.empty(3, 3, 3), fa.randn(2, 3, 5), fa.randn(3, 5, 3)), 1, true)
    assert.matches("argument 'out': expected shape (3, 2) for a of shape (3, 5) and b of shape (5, 2), got (3, 3)",
      err(fa.empty(3, 3), a, fa.randn(5, 2)), 1, true)
    assert.matches("argument 'b': expected dtype float32 (as 'a'), got float64", err(fa.empty(3, 2), a, fa.randn(5, 2, 'float64')), 1, true)
    assert.matches("argument 'a': expected a 2-D or 3-D tensor", err(fa.empty(3, 2), fa.randn(5), fa.randn(5, 2)), 1, true)
    local ga = fa.empty(3, 4)
    assert.are_not.equal(0, C.fa_matmul_backward(ga.desc, nil, fa.randn(3, 2).desc, a.desc, fa.randn(5, 2).desc))
    assert.matches("argument 'grad_a': expected shape (3, 5) (as 'a'), got (3, 4)", ffi.string(C.fa_last_error()), 1, true)
  end)
end)

describe('fa_linear', function()
  local f = H.fixture('linear')
  local function lin(x, w, b)
    local s = x:size()
    s[#s] = w:size(1)
    local out = fa.empty(s, x:dtype())
    fa.check(C.fa_linear_forward(out.desc, x.desc, w.desc, b and b.desc or nil))
    return out
  end
  for _, name in ipairs({ 'x3d_nobias', 'x2d_bias', 'x1d_bias' }) do
    for _, dt in ipairs({ 'float64', 'float32' }) do
      it(name .. ' ' .. dt .. ': forward and gradients as PyTorch (parameter gradients accumulate)', function()
        local x, w, g = f[name .. '.x']:to(dt), f[name .. '.w']:to(dt), f[name .. '.gout']:to(dt)
        local b = f[name .. '.b'] and f[name .. '.b']:to(dt)
        local r, at = TOL[dt][1], TOL[dt][2]
        H.assert_close(lin(x, w, b), f[name .. '.out'], r, at, 'out')
        local gx = fa.full(x:size(), 3, dt)
        local gw = fa.ones(w:size(), dt)
        local gb = b and fa.ones(b:size(), dt)
        fa.check(C.fa_linear_backward(gx.desc, gw.desc, gb and gb.desc or nil, g.desc, x.desc, w.desc))
        H.assert_close(gx, f[name .. '.gx'], r, at, 'grad x')
        H.assert_close(gw, f[name .. '.gw'] + 1, r, at, 'grad weight')
        if b then H.assert_close(gb, f[name .. '.gb'] + 1, r, at, 'grad bias') end
        -- a transposed weight view (tied weights) reads the same
        H.assert_close(lin(x, tview(w), b), f[name .. '.out'], r, at, 'out with a transposed weight view')
      end)
    end
  end

  it('gradients by finite differences (float64)', function()
    fa.manualSeed(13)
    local x, w, b = fa.randn(2, 3, 4, 'float64'), fa.randn(5, 4, 'float64'), fa.randn(5, 'float64')
    local g = fa.randn(2, 3, 5, 'float64')
    local gx, gw, gb = fa.empty(2, 3, 4, 'float64'), fa.zeros(5, 4, 'float64'), fa.zeros(5, 'float64')
    fa.check(C.fa_linear_backward(gx.desc, gw.desc, gb.desc, g.desc, x.desc, w.desc))
    local fn = function() return lin(x, w, b) end
    H.assert_close(gx, H.numgrad(fn, x, g), 1e-7, 1e-8, 'grad x')
    H.assert_close(gw, H.numgrad(fn, w, g), 1e-7, 1e-8, 'grad weight')
    H.assert_close(gb, H.numgrad(fn, b, g), 1e-7, 1e-8, 'grad bias')
  end)

  it('a bias gradient over many rows sums accurately in float32', function()
    fa.manualSeed(14)
    local g = fa.randn(5000, 70)
    local x, w = fa.randn(5000, 3), fa.randn(70, 3)
    local gb = fa.zeros(70)
    fa.check(C.fa_linear_backward(nil, nil, gb.desc, g.desc, x.desc, w.desc))
    local ref = g:double():sum(1):view(70)
    H.assert_close(gb, ref, 1e-6, 1e-5, 'grad bias')
  end)

  it('reports bad arguments', function()
    local x, w, b = fa.randn(4, 3), fa.randn(2, 3), fa.randn(2)
    local out = fa.empty(4, 2)
    local function err(o, xx, ww, bb)
      assert.are_not.equal(0, C.fa_linear_forward(o.desc, xx.desc, ww.desc, bb and bb.desc or nil))
      return ffi.string(C.fa_last_error())
    end
    fa.check(C.fa_linear_forward(out.desc, x.desc, w.desc, b.desc))
    assert.matches("fa_linear_forward: argument 'weight': expected a 2-D tensor, got a 3-D tensor", err(out, x, w:view(2, 3, 1)), 1, true)
    assert.matches("argument 'x': expected last dimension 3 (in_features of weight of shape (2, 3)), got shape (4, 2)",
      err(out, fa.randn(4, 2), w), 1, true)
    assert.matches("argument 'bias': expected shape (2,) (out_features), got (3,)", err(out, x, w, fa.randn(3)), 1, true)
    assert.matches("argument 'weight': expected dtype float32 (as 'x'), got float64", err(out, x, w:double()), 1, true)
    assert.matches("argument 'out': expected shape (4, 3) but with last dimension 2", err(fa.empty(4, 3), x, w), 1, true)
    assert.matches("argument 'x': expected a contiguous tensor", err(fa.empty(3, 2), fa.randn(3, 3):t(), w), 1, true)
  end)
end)
