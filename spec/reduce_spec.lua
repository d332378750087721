-- Reductions (c/reduce.c): sum, mean, max (+ indices), argmax over a dim or all elements; backward.
-- References: PyTorch (spec/fixtures/reduce.safetensors, made by spec/fixtures/gen_elementwise.py),
-- float64 finite differences, plain-Lua loops for the large (blocked, multi-threaded) cases.
local fa = require 'fastattn'
local H = require 'helpers.check'
local ffi = require 'ffi'

local F = H.fixture('reduce')
local C = fa.C
local SUM, MEAN, MAX, ARGMAX = 0, 1, 2, 3
local SHAPES = { '357', '11', '17' }
local NDIM = { ['357'] = 3, ['11'] = 2, ['17'] = 1 }
local TOL = { f32 = { 2e-6, 1e-6 }, f64 = { 1e-12, 1e-13 } }

local c_error, has = H.c_error, H.has

-- the reduced shape for 0-based dim (-1: a 0-D tensor)
local function reduced(x, dim)
  if dim < 0 then return {} end
  local s = x:size()
  s[dim + 1] = 1
  return s
end
-- direct C call: op over 0-based dim; returns out (and the 0-based int64 indices for MAX)
local function red(op, x, dim)
  local shape = reduced(x, dim)
  local out = fa.empty(shape, op == ARGMAX and 'int64' or x:dtype())
  local idx = op == MAX and fa.empty(shape, 'int64') or nil
  fa.check(C.fa_reduce_forward(op, out.desc, idx and idx.desc, x.desc, dim))
  return out, idx
end
local function red_back(op, x, gout, dim, idx)
  local gx = fa.empty_like(x)
  fa.check(C.fa_reduce_backward(op, gx.desc, gout.desc, idx and idx.desc, dim))
  return gx
end

-- asserts that f() raises a message matching pattern, at a line of this file (not inside the library)
local function raises(pattern, f)
  local ok, err = pcall(f)
  assert.is_false(ok, 'expected an error matching ' .. pattern)
  assert.matches('^spec/reduce_spec.lua:%d+: ' .. pattern, tostring(err))
end

describe('reductions', function()
  for _, dt in ipairs({ 'f32', 'f64' }) do
    for _, tag in ipairs(SHAPES) do
      local p = dt .. '.' .. tag .. '.'
      local rtol, atol = TOL[dt][1], TOL[dt][2]
      it('match PyTorch over each dim and over all, ' .. p, function()
        local x = F[p .. 'x']
        for d = 0, NDIM[tag] - 1 do
          H.assert_close(x:sum(d + 1), F[p .. 'sum' .. d], rtol, atol, 'sum ' .. d)
          H.assert_close(x:mean(d + 1), F[p .. 'mean' .. d], rtol, atol, 'mean ' .. d)
          local v, i = x:max(d + 1)
          assert.is_true(v:equal(F[p .. 'max' .. d]), 'max ' .. d)
          assert.is_true(i:equal(F[p .. 'maxidx' .. d]:add(1)), 'max indices (1-based) ' .. d)
          assert.is_true(x:argmax(d + 1):equal(F[p .. 'argmax' .. d]:add(1)), 'argmax ' .. d)
          -- the C entry: 0-based indices
          local v0, i0 = red(MAX, x, d)
          assert.is_true(v0:equal(F[p .. 'max' .. d]) and i0:equal(F[p .. 'maxidx' .. d]), 'C max ' .. d)
          assert.is_true(red(ARGMAX, x, d):equal(F[p .. 'argmax' .. d]), 'C argmax ' .. d)
        end
        local function near(a, b, what)
          assert(math.abs(a - b) <= atol + rtol * math.abs(b), string.format('%s: %.17g vs %.17g', what, a, b))
        end
        near(x:sum(), F[p .. 'sum']:item(), 'sum')
        near(x:mean(), F[p .. 'mean']:item(), 'mean')
        assert.are.equal(F[p .. 'max']:item(), x:max())
        assert.are.equal(F[p .. 'argmax']:item() + 1, x:argmax())
        local v, i = red(MAX, x, -1)
        assert.are.equal(0, v:dim())
        assert.are.equal(F[p .. 'max']:item(), v:item())
        assert.are.equal(F[p .. 'argmax']:item(), i:item())
        -- a 1-element out of any shape is accepted for dim -1
        local out = fa.empty(1, 1, x:dtype())
        fa.check(C.fa_reduce_forward(SUM, out.desc, nil, x.desc, -1))
        near(out:item(), F[p .. 'sum']:item(), 'sum into (1, 1)')
      end)
    end
  end

  it('return the first maximum on ties, as PyTorch', function()
    local t = F['ties.x']
    for d = 0, 1 do
      local v, i = red(MAX, t, d)
      assert.is_true(v:equal(F['ties.max' .. d]), 'values ' .. d)
      assert.is_true(i:equal(F['ties.maxidx' .. d]), 'indices ' .. d)
      assert.is_true(red(ARGMAX, t, d):equal(F['ties.maxidx' .. d]), 'argmax ' .. d)
      -- the same through the strided path
      local v2, i2 = red(MAX, t:t():contiguous():t(), d)
      assert.is_true(v2:equal(v) and i2:equal(i), 'strided ' .. d)
    end
    assert.are.equal(F['ties.argmax']:item(), red(ARGMAX, t, -1):item())
    -- ties across the blocks of a large all-reduce: the first one still wins
    local big = fa.zeros(100003)
    big:set(40000, 5); big:set(90000, 5)
    assert.are.equal(40000, big:argmax())
    assert.are.equal(39999, red(ARGMAX, big, -1):item())
    -- and in a strided all-reduce, ties are ordered by the view's (row-major) order
    local m = fa.zeros(257, 301)
    m:set(200, 5, 5); m:set(3, 280, 5) -- (5, 200) and (280, 3) of the transpose
    assert.are.equal(4 * 257 + 199, red(ARGMAX, m:t(), -1):item())
    local v, i = red(MAX, m:t(), -1)
    assert.are.equal(5, v:item())
    assert.are.equal(4 * 257 + 199, i:item())
  end)

  it('propagate NaN in max, as PyTorch (the first NaN wins)', function()
    local x = fa.tensor({ 1, 0 / 0, 5, 0 / 0 })
    local v, i = red(MAX, x, 0)
    assert.is_true(v:item() ~= v:item())
    assert.are.equal(1, i:item())
  end)

  it('reduce integers exactly', function()
    local x = F['i64.x']
    for d = 0, 2 do
      assert.is_true(red(SUM, x, d):equal(F['i64.sum' .. d]), 'sum ' .. d)
      local v, i = red(MAX, x, d)
      assert.is_true(v:equal(F['i64.max' .. d]) and i:equal(F['i64.maxidx' .. d]), 'max ' .. d)
      assert.is_true(red(SUM, x:transpose(1, 3):contiguous():transpose(1, 3), d):equal(F['i64.sum' .. d]), 'strided sum ' .. d)
    end
    assert.are.equal(F['i64.sum']:item(), x:sum())
    assert.are.equal(F['i64.max']:item(), x:max())
    assert.are.equal('int64', red(SUM, x, 1):dtype())
  end)

  it('give on strided views what they give on contiguous copies', function()
    for _, dt in ipairs({ 'f32', 'f64' }) do
      local x = F[dt .. '.357.x']
      local xs = x:permute(3, 1, 2)       -- (7, 3, 5), non-contiguous
      local xc = xs:contiguous()
      local rtol = TOL[dt][1]
      for d = 0, 2 do
        H.assert_close(red(SUM, xs, d), red(SUM, xc, d), rtol, 0, dt .. ' sum ' .. d)
        H.assert_close(red(MEAN, xs, d), red(MEAN, xc, d), rtol, 0, dt .. ' mean ' .. d)
        local v, i = red(MAX, xs, d)
        local vc, ic = red(MAX, xc, d)
        assert.is_true(v:equal(vc) and i:equal(ic), dt .. ' max ' .. d)
        -- a strided out: the (d) reduced shape written through a transposed view
        local s = reduced(xs, d)
        local out = fa.empty(s[3], s[2], s[1], xs:dtype()):permute(3, 2, 1)
        fa.check(C.fa_reduce_forward(SUM, out.desc, nil, xs.desc, d))
        H.assert_close(out, red(SUM, xc, d), rtol, 0, dt .. ' strided out ' .. d)
      end
      H.assert_close(red(SUM, xs, -1), red(SUM, xc, -1), rtol, 0, dt .. ' sum all')
      local v, i = red(MAX, xs, -1)
      local vc, ic = red(MAX, xc, -1)
      assert.is_true(v:equal(vc) and i:equal(ic), dt .. ' max all (flat index in the view order)')
    end
  end)

  it('agree with plain Lua loops on large tensors (blocked, threaded paths)', function()
    fa.manualSeed(3)
    local x = fa.randn(301, 257) -- > FA_PARALLEL_GRAIN elements
    local xd = x:double()
    local p = ffi.cast('double*', xd.desc.data)
    local R, K = 301, 257
    local cs, rs, total = {}, {}, 0
    local cmax, cidx = {}, {}
    for j = 0, K - 1 do cs[j] = 0; cmax[j] = -math.huge end
    for r = 0, R - 1 do
      rs[r] = 0
      for j = 0, K - 1 do
        local v = p[r * K + j]
        cs[j] = cs[j] + v; rs[r] = rs[r] + v; total = total + v
        if v > cmax[j] then cmax[j] = v; cidx[j] = r end
      end
    end
    local colsum, rowsum = fa.empty(1, K, 'float64'), fa.empty(R, 1, 'float64')
    local colmax, colidx = fa.empty(1, K, 'float64'), fa.empty(1, K, 'int64')
    for j = 0, K - 1 do colsum:set(1, j + 1, cs[j]); colmax:set(1, j + 1, cmax[j]); colidx:set(1, j + 1, cidx[j]) end
    for r = 0, R - 1 do rowsum:set(r + 1, 1, rs[r]) end
    H.assert_close(red(SUM, x, 0), colsum, 1e-6, 1e-5, 'sum over dim 0 (column tiles)')
    H.assert_close(red(SUM, x, 1), rowsum, 1e-6, 1e-5, 'sum over dim 1 (runs)')
    H.assert_close(red(MEAN, x, 0), colsum:scale(1 / R), 1e-6, 1e-6, 'mean over dim 0')
    local v, i = red(MAX, x, 0)
    assert.is_true(v:equal(colmax) and i:equal(colidx), 'max over dim 0')
    -- transposed: the strided runs path and the strided all-reduce
    H.assert_close(red(SUM, x:t(), 1), colsum:t(), 1e-6, 1e-5, 'sum of the transpose over dim 1')
    local vt, it_ = red(MAX, x:t(), 1)
    assert.is_true(vt:equal(colmax:t()) and it_:equal(colidx:t()), 'max of the transpose')
    assert(math.abs(x:sum() - total) <= 1e-6 * math.abs(total) + 1e-4, 'sum all')
    assert(math.abs(x:t():sum() - total) <= 1e-6 * math.abs(total) + 1e-4, 'sum all, transposed')
    assert(math.abs(xd:sum() - total) <= 1e-10 * (1 + math.abs(total)), 'sum all, float64')
  end)

  it('do not depend on the thread count', function()
    fa.manualSeed(11)
    local x = fa.randn(1000, 997, 'float64')
    local n0 = fa.getNumThreads()
    fa.setNumThreads(1)
    local a, b, c = x:sum(), red(SUM, x, 0), x:t():sum()
    fa.setNumThreads(math.max(2, n0))
    local a2, b2, c2 = x:sum(), red(SUM, x, 0), x:t():sum()
    fa.setNumThreads(n0)
    assert.are.equal(a, a2)
    assert.are.equal(c, c2)
    assert.is_true(b:equal(b2))
  end)

  it('handle empty reductions as PyTorch (sum 0, mean NaN, max an error)', function()
    local x = fa.empty(3, 0)
    assert.are.same({ { 0 }, { 0 }, { 0 } }, red(SUM, x, 1):table())
    local m = red(MEAN, x, 1):get(1, 1)
    assert.is_true(m ~= m)
    assert.are.equal(0, x:sum())
    has(c_error('fa_reduce_forward', MAX, fa.empty(3, 1).desc, nil, x.desc, 1), 'fa_reduce_forward', 'empty')
    assert.are.same({ 1, 0 }, red(SUM, x, 0):size()) -- nothing to reduce into
  end)

  describe('backward', function()
    it('matches float64 finite differences for sum, mean and max over each dim and all', function()
      local x = F['f64.357.x']:clone()
      for _, d in ipairs({ 0, 1, 2, -1 }) do
        local go = fa.randn(reduced(x, d), 'float64')
        for _, op in ipairs({ SUM, MEAN, MAX }) do
          local _, idx = red(op, x, d)
          local gx = red_back(op, x, go, d, idx)
          local num = H.numgrad(function() return (red(op, x, d)) end, x, go)
          H.assert_close(gx, num, 1e-6, 1e-8, string.format('op %d dim %d vs numgrad', op, d))
        end
      end
    end)

    it('overwrites grad_x, writes max gradients at the indices only, and takes strided tensors', function()
      local x = F['f64.357.x']
      local go = fa.randn(3, 5, 1, 'float64')
      local v, idx = red(MAX, x, 2)
      local gx = fa.full({ 3, 5, 7 }, 99, 'float64')
      fa.check(C.fa_reduce_backward(MAX, gx.desc, go.desc, idx.desc, 2))
      for a = 1, 3 do
        for b = 1, 5 do
          for c = 1, 7 do
            local want = (c - 1 == idx:get(a, b, 1)) and go:get(a, b, 1) or 0
            assert.are.equal(want, gx:get(a, b, c))
          end
        end
      end
      -- strided grad_x and grad_out
      local gxs = fa.empty(7, 5, 3, 'float64'):transpose(1, 3)
      local gos = go:transpose(1, 2):contiguous():transpose(1, 2)
      fa.check(C.fa_reduce_backward(MAX, gxs.desc, gos.desc, idx.desc, 2))
      assert.is_true(gxs:equal(gx))
      local gm = fa.empty(7, 5, 3, 'float64'):transpose(1, 3)
      fa.check(C.fa_reduce_backward(MEAN, gm.desc, gos.desc, nil, 2))
      assert.is_true(gm:equal(go:expand(3, 5, 7):scale(1 / 7)))
      local gs = fa.empty_like(x)
      local g0 = fa.tensor(2.5, 'float64'):view({})
      fa.check(C.fa_reduce_backward(SUM, gs.desc, g0.desc, nil, -1))
      assert.is_true(gs:equal(fa.full({ 3, 5, 7 }, 2.5, 'float64')))
    end)
  end)

  it('report bad arguments, naming the function, the argument, expected and got', function()
    local x = fa.zeros(3, 4)
    has(c_error('fa_reduce_forward', SUM, fa.empty(3, 1).desc, nil, x.desc, 2), "argument 'dim'", '0..1', 'got 2')
    has(c_error('fa_reduce_forward', SUM, fa.empty(3, 4).desc, nil, x.desc, 1), "argument 'out'", 'expected shape (3, 1)', 'got (3, 4)')
    has(c_error('fa_reduce_forward', SUM, fa.empty(3).desc, nil, x.desc, 1), "argument 'out'", 'expected shape (3, 1)', 'got (3,)')
    has(c_error('fa_reduce_forward', SUM, fa.empty(2).desc, nil, x.desc, -1), "argument 'out'", '1-element', 'got shape (2,)')
    has(c_error('fa_reduce_forward', SUM, fa.empty(3, 1, 'float64').desc, nil, x.desc, 1), "argument 'out'", 'expected dtype float32', 'got float64')
    has(c_error('fa_reduce_forward', ARGMAX, fa.empty(3, 1).desc, nil, x.desc, 1), "argument 'out'", 'expected dtype int64', 'got float32')
    has(c_error('fa_reduce_forward', SUM, fa.empty(3, 1).desc, fa.empty(3, 1, 'int64').desc, x.desc, 1), "argument 'idx'", 'FA_MAX')
    has(c_error('fa_reduce_forward', MAX, fa.empty(3, 1).desc, fa.empty(3, 1).desc, x.desc, 1), "argument 'idx'", 'int64', 'got float32')
    has(c_error('fa_reduce_forward', MEAN, fa.empty(3, 1, 'int64').desc, nil, fa.zeros(3, 4, 'int64').desc, 1), "argument 'x'", 'int64')
    has(c_error('fa_reduce_forward', 9, fa.empty(3, 1).desc, nil, x.desc, 1), "argument 'op'", 'got 9')
    has(c_error('fa_reduce_backward', ARGMAX, x.desc, fa.empty(3, 1).desc, nil, 1), 'fa_reduce_backward', 'no gradient')
    has(c_error('fa_reduce_backward', MAX, x.desc, fa.zeros(3, 1).desc, nil, 1), "argument 'idx'", 'got nothing')
    local bad = fa.tensor({ { 0 }, { 4 }, { 1 } }, 'int64')
    local gx = fa.full({ 3, 4 }, 7)
    has(c_error('fa_reduce_backward', MAX, gx.desc, fa.zeros(3, 1).desc, bad.desc, 1), "argument 'idx'", '0..3', 'got 4')
    assert.is_true(gx:equal(fa.full({ 3, 4 }, 7)), 'nothing written before the error')
    has(c_error('fa_reduce_backward', SUM, x.desc, fa.zeros(1, 4).desc, nil, 1), "argument 'grad_out'", 'expected shape (3, 1)', 'got (1, 4)')
    -- Tensor methods check the dim (1-based) before the kernel
    local ok, err = pcall(function() return x:sum(3) end)
    assert.is_false(ok)
    assert.matches("^spec/reduce_spec.lua:%d+: Tensor:sum: argument 'dim': expected a dimension in 1..2 or %-2..%-1, got 3$", err)
  end)
end)

describe('reduction and matmul argument checks (Lua side)', function()
  local x = fa.tensor({ { 1, 5, 3 }, { 4, 2, 6 } })
  it('take integer dims in range', function()
    raises("Tensor:sum: argument 'dim': expected a dimension in 1..2 or %-2..%-1, got 1.5$", function() x:sum(1.5) end)
    raises("Tensor:max: argument 'dim': expected a dimension in 1..2 or %-2..%-1, got 0$", function() x:max(0) end)
    raises("Tensor:argmax: argument 'dim': expected a dimension in 1..2 or %-2..%-1, got \"a\"$", function() x:argmax('a') end)
    raises("Tensor:mean: argument 'dim': expected no dimension %(the tensor is 0%-D%), got 1$", function() fa.tensor(2):view({}):mean(1) end)
    raises("Tensor:max: argument 'self': ", function() fa.zeros(0):max() end)
    assert.are.same({ { 5 }, { 6 } }, x:max(-1):table())
    assert.are.same({ { 2 }, { 3 } }, x:argmax(2):table())
  end)
  it('matmul takes tensors of at least one dimension', function()
    raises("Tensor:matmul: argument 'other': expected a tensor, got 5$", function() x:matmul(5) end)
    raises("Tensor:matmul: argument 'other': expected a tensor of at least 1 dimension, got a float32 tensor of size %[%]$",
           function() x:matmul(fa.tensor(1):view({})) end)
    raises('Tensor:matmul: inner sizes differ: 2x3 @ 2x3$', function() x:matmul(x) end)
    raises("Tensor:matmul: argument 'other': expected dtype float32 %(as 'self'%), got float64$", function() x:matmul(x:t():double()) end)
    raises("fa.matmul: argument 'a': expected a tensor, got \"x\"$", function() fa.matmul('x', x) end)
    assert.are.same({ { 35, 32 }, { 32, 56 } }, x:matmul(x:t()):table())
  end)
end)

describe('reductions: keepdim', function()
  local x = fa.tensor({ { 1, 5, 3 }, { 4, 2, 6 } })
  it('keeps the dim by default (Torch7) and drops it with keepdim false (PyTorch)', function()
    assert.are.same({ { 9 }, { 12 } }, x:sum(2):table())
    assert.are.same({ { 9 }, { 12 } }, x:sum(2, true):table())
    assert.are.same({ 9, 12 }, x:sum(2, false):table())
    assert.are.same({ 2.5, 3.5, 4.5 }, x:mean(1, false):table())
    local v, i = x:max(-1, false)
    assert.are.same({ 5, 6 }, v:table())
    assert.are.same({ 2, 3 }, i:table())
    assert.are.equal('int64', i:dtype())
    assert.are.same({ 2, 1, 2 }, x:argmax(1, false):table())
    -- a 1-D tensor reduced without keepdim is 0-D
    local s = fa.tensor({ 1, 2, 3 }):sum(1, false)
    assert.are.equal(0, s:dim())
    assert.are.equal(6, s:item())
  end)
  it('takes true or false, and only with a dim', function()
    raises("Tensor:sum: argument 'keepdim': expected true or false, got 2$", function() x:sum(1, 2) end)
    raises("Tensor:max: argument 'keepdim': expected true or false, got \"yes\"$", function() x:max(1, 'yes') end)
    raises("Tensor:mean: argument 'keepdim': expected nothing without a dim %(a full reduction gives a number%), got true$",
           function() x:mean(nil, true) end)
    raises('Tensor:sum: argument #3: expected nothing %(Tensor:sum takes at most 2 arguments; ', function() x:sum(1, true, 3) end)
  end)
end)
