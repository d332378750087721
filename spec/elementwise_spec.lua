-- Elementwise kernels (c/elementwise.c): binary ops, scale, addcmul, unary functions, forward and backward.
-- References: PyTorch (spec/fixtures/elementwise.safetensors, made by spec/fixtures/gen_elementwise.py),
-- float64 finite differences, plain-Lua arithmetic for the large (multi-threaded) cases.
local fa = require 'fastattn'
local H = require 'helpers.check'
local ffi = require 'ffi'

local F = H.fixture('elementwise')
local C = fa.C
local SHAPES = { '357', '11', '17' }
local UNARY = { 'exp', 'log', 'sqrt', 'abs', 'sign', 'neg', 'relu', 'tanh', 'sigmoid', 'gelu' }
local POSITIVE = { log = true, sqrt = true }
local OP = { add = 0, sub = 1, mul = 2, div = 3 }
local TOL = { f32 = { 2e-6, 1e-6 }, f64 = { 1e-12, 1e-13 } } -- rtol, atol

local c_error, has = H.c_error, H.has

-- asserts that f() raises a message matching pattern, at a line of this file (not inside the library)
local function raises(pattern, f)
  local ok, err = pcall(f)
  assert.is_false(ok, 'expected an error matching ' .. pattern)
  assert.matches('^spec/elementwise_spec.lua:%d+: ' .. pattern, tostring(err))
end

describe('binary ops', function()
  for _, dt in ipairs({ 'f32', 'f64' }) do
    for _, tag in ipairs(SHAPES) do
      local p = dt .. '.' .. tag .. '.'
      local rtol, atol = TOL[dt][1], TOL[dt][2]
      it('match PyTorch, ' .. p, function()
        local a, b, c = F[p .. 'a'], F[p .. 'b'], F[p .. 'c']
        H.assert_close(a:add(b), F[p .. 'add'], rtol, atol, 'add')
        H.assert_close(a + b, F[p .. 'add'], rtol, atol, 'a + b')
        H.assert_close(a:add(b, 2.5), F[p .. 'add_alpha'], rtol, atol, 'add alpha')
        H.assert_close(a:sub(b), F[p .. 'sub'], rtol, atol, 'sub')
        H.assert_close(a - b, F[p .. 'sub'], rtol, atol, 'a - b')
        H.assert_close(a:sub(b, -0.75), F[p .. 'sub_alpha'], rtol, atol, 'sub alpha')
        H.assert_close(a * b, F[p .. 'mul'], rtol, atol, 'mul')
        H.assert_close(a / b, F[p .. 'div'], rtol, atol, 'div')
        H.assert_close(a:scale(2.5, -0.75), F[p .. 'scale'], rtol, atol, 'scale')
        H.assert_close(a * 2.5 - 0.75, F[p .. 'scale'], rtol, atol, 'a*2.5 - 0.75')
        H.assert_close(a:addcmul(b, c, 0.7), F[p .. 'addcmul'], rtol, atol, 'addcmul')
      end)
      it('work in place (out aliases a), ' .. p, function()
        local a, b, c = F[p .. 'a'], F[p .. 'b'], F[p .. 'c']
        H.assert_close(a:clone():add_(b, 2.5), F[p .. 'add_alpha'], rtol, atol, 'add_')
        H.assert_close(a:clone():div_(b), F[p .. 'div'], rtol, atol, 'div_')
        H.assert_close(a:clone():scale_(2.5, -0.75), F[p .. 'scale'], rtol, atol, 'scale_')
        H.assert_close(a:clone():addcmul_(b, c, 0.7), F[p .. 'addcmul'], rtol, atol, 'addcmul_')
      end)
      it('backward matches PyTorch autograd, ' .. p, function()
        local a, b, go = F[p .. 'a'], F[p .. 'b'], F[p .. 'go']
        for name, op in pairs(OP) do
          local ga, gb = fa.empty_like(a), fa.empty_like(b)
          fa.check(C.fa_binary_backward(op, ga.desc, gb.desc, go.desc, a.desc, b.desc))
          H.assert_close(ga, F[p .. name .. '.ga'], rtol, atol, name .. ' grad_a')
          H.assert_close(gb, F[p .. name .. '.gb'], rtol, atol, name .. ' grad_b')
          -- one gradient at a time (the other NULL), and only the inputs each one reads
          local ga2 = fa.empty_like(a)
          fa.check(C.fa_binary_backward(op, ga2.desc, nil, go.desc, nil, (name == 'mul' or name == 'div') and b.desc or nil))
          assert.is_true(ga2:equal(ga), name .. ': grad_a alone')
          local gb2 = fa.empty_like(b)
          fa.check(C.fa_binary_backward(op, nil, gb2.desc, go.desc, (name == 'mul' or name == 'div') and a.desc or nil,
            name == 'div' and b.desc or nil))
          assert.is_true(gb2:equal(gb), name .. ': grad_b alone')
        end
      end)
    end
  end

  it('backward matches float64 finite differences', function()
    local a, b, go = F['f64.357.a']:clone(), F['f64.357.b']:clone(), F['f64.357.go']
    for name, op in pairs(OP) do
      local ga, gb = fa.empty_like(a), fa.empty_like(b)
      fa.check(C.fa_binary_backward(op, ga.desc, gb.desc, go.desc, a.desc, b.desc))
      local f = function() return a[name](a, b) end
      H.assert_close(ga, H.numgrad(f, a, go), 1e-6, 1e-8, name .. ' grad_a vs numgrad')
      H.assert_close(gb, H.numgrad(f, b, go), 1e-6, 1e-8, name .. ' grad_b vs numgrad')
    end
  end)

  it('broadcast through the Tensor operators (3x1 with 1x4)', function()
    local x, y = F['bc.x'], F['bc.y']
    H.assert_close(x + y, F['bc.add'], 1e-6, 1e-6, 'x + y')
    H.assert_close(x - y, F['bc.sub'], 1e-6, 1e-6, 'x - y')
    H.assert_close(x * y, F['bc.mul'], 1e-6, 1e-6, 'x * y')
    H.assert_close(x / y, F['bc.div'], 1e-6, 1e-6, 'x / y')
    H.assert_close(y + x, F['bc.add'], 1e-6, 1e-6, 'y + x')
    assert.are.same({ 3, 4 }, (x + y):size())
    -- a number on either side
    H.assert_close(2 - x, x:scale(-1, 2), 0, 0, '2 - x')
    H.assert_close(1 / y, fa.ones(1, 4) / y, 0, 0, '1 / y')
  end)

  it('give on strided views exactly what they give on contiguous copies', function()
    for _, dt in ipairs({ 'f32', 'f64' }) do
      local p = dt .. '.357.'
      local a, b, c = F[p .. 'a'], F[p .. 'b'], F[p .. 'c']
      -- non-contiguous views of the same numbers in (7, 5, 3) order
      local at, bt, ct = a:transpose(1, 3), b:permute(3, 2, 1), c:transpose(1, 3)
      assert.is_false(at:isContiguous())
      local ac, bc, cc = at:contiguous(), bt:contiguous(), ct:contiguous()
      for name in pairs(OP) do
        assert.is_true(at[name](at, bt, 1.5):equal(ac[name](ac, bc, 1.5)), dt .. ' ' .. name)
      end
      assert.is_true(at:addcmul(bt, ct, 0.7):equal(ac:addcmul(bc, cc, 0.7)), dt .. ' addcmul')
      assert.is_true(at:scale(3, 1):equal(ac:scale(3, 1)), dt .. ' scale')
      -- a mix: contiguous a, transposed b
      assert.is_true(ac:mul(bt):equal(ac:mul(bc)), dt .. ' mixed')
      -- a strided output
      local out = fa.empty(3, 5, 7, a:dtype()):transpose(1, 3)
      fa.check(C.fa_binary_forward(OP.sub, out.desc, at.desc, bt.desc, 1))
      assert.is_true(out:equal(ac - bc), dt .. ' strided out')
      -- backward on views
      local go = F[p .. 'go']:transpose(1, 3)
      local ga, gb = fa.empty(7, 5, 3, a:dtype()), fa.empty(3, 5, 7, a:dtype()):transpose(1, 3)
      fa.check(C.fa_binary_backward(OP.div, ga.desc, gb.desc, go.desc, at.desc, bt.desc))
      local ga2, gb2 = fa.empty_like(ac), fa.empty_like(bc)
      local goc = go:contiguous()
      fa.check(C.fa_binary_backward(OP.div, ga2.desc, gb2.desc, goc.desc, ac.desc, bc.desc))
      assert.is_true(ga:equal(ga2) and gb:equal(gb2), dt .. ' backward on views')
    end
  end)

  it('agree with plain Lua arithmetic on large tensors (threaded paths)', function()
    fa.manualSeed(7)
    local a, b = fa.randn(301, 257), fa.randn(301, 257):abs():add(0.5) -- > FA_PARALLEL_GRAIN elements
    local function check_against(out, f, what)
      local A, B, O = a:double(), b:double(), out:double()
      local pa, pb = ffi.cast('double*', A.desc.data), ffi.cast('double*', B.desc.data)
      local ref = fa.empty(301, 257, 'float64')
      local pr = ffi.cast('double*', ref.desc.data)
      for i = 0, a:numel() - 1 do pr[i] = f(pa[i], pb[i]) end
      H.assert_close(O, ref, 1e-6, 1e-6, what)
    end
    check_against(a:add(b, 2.5), function(x, y) return x + 2.5 * y end, 'add')
    check_against(a / b, function(x, y) return x / y end, 'div')
    check_against(a:addcmul(a, b, -0.5), function(x, y) return x - 0.5 * x * y end, 'addcmul')
    -- strided (transposed) large operands: the row path, also threaded
    local at, bt = a:t(), b:t()
    assert.is_true((at * bt):equal((a * b):t():contiguous()), 'transposed mul')
    assert.is_true(at:tanh():equal(a:tanh():t():contiguous()), 'transposed tanh')
  end)

  describe('on integers', function()
    for _, dt in ipairs({ 'i64', 'i32' }) do
      local p = dt .. '.'
      it('compute exactly as PyTorch, ' .. dt, function()
        local a, b, c = F[p .. 'a'], F[p .. 'b'], F[p .. 'c']
        assert.are.equal(dt == 'i64' and 'int64' or 'int32', a:dtype())
        local r = a:add(b, 3)
        assert.are.equal(a:dtype(), r:dtype())
        assert.is_true(r:equal(F[p .. 'add_alpha']), 'add alpha')
        assert.is_true((a - b):equal(F[p .. 'sub']), 'sub')
        assert.is_true((a * b):equal(F[p .. 'mul']), 'mul')
        assert.is_true((a / b):equal(F[p .. 'div']), 'div truncates')
        assert.is_true(a:scale(3, 7):equal(F[p .. 'scale']), 'scale')
        assert.is_true((a * 3 + 7):equal(F[p .. 'scale']), 'a*3 + 7')
        assert.is_true(a:addcmul(b, c, 2):equal(F[p .. 'addcmul']), 'addcmul')
        assert.is_true(a:neg():equal(F[p .. 'neg']), 'neg')
        assert.is_true((-a):equal(F[p .. 'neg']), '-a')
        assert.is_true(a:abs():equal(F[p .. 'abs']), 'abs')
        assert.is_true(a:sign():equal(F[p .. 'sign']), 'sign')
        assert.is_true(a:relu():equal(F[p .. 'relu']), 'relu')
        assert.is_true(a:transpose(1, 3):add(b:transpose(1, 3), 3):equal(F[p .. 'add_alpha']:transpose(1, 3)), 'strided add')
        -- backward of add/sub/mul
        local ga, gb = fa.empty_like(a), fa.empty_like(b)
        fa.check(C.fa_binary_backward(OP.mul, ga.desc, gb.desc, c.desc, a.desc, b.desc))
        assert.is_true(ga:equal(c * b) and gb:equal(c * a), 'mul backward')
      end)
    end
    it('keep int64 exact beyond 2^53 (no trip through double)', function()
      local big = fa.tensor({ 0 }, 'int64')
      big:fill(2 ^ 60)
      local x = big:scale(1, 1) -- 2^60 + 1: not a double
      local y = x:sub(big)
      assert.are.equal(1, y:item())
      local z = x:add(x, -1)
      assert.are.equal(0, z:item())
    end)
    it('make 1-based indices from the 0-based ones (the math.lua idiom)', function()
      local i = fa.tensor({ 0, 4, 2 }, 'int64')
      assert.are.same({ 1, 5, 3 }, i:add_(1):table())
    end)
    it('reject division by zero, a non-integer alpha and float-only ops', function()
      local a, b = F['i64.a'], F['i64.b']:clone()
      b:view(-1):set(5, 0)
      local out = fa.empty_like(a)
      local before = out:clone()
      has(c_error('fa_binary_forward', OP.div, out.desc, a.desc, b.desc, 1), 'fa_binary_forward', "'b'", 'division by zero')
      assert.is_true(out:equal(before), 'nothing written')
      has(c_error('fa_binary_forward', OP.add, out.desc, a.desc, F['i64.b'].desc, 0.5), "argument 'alpha'", 'integer', '0.5')
      has(c_error('fa_addcmul_forward', out.desc, a.desc, a.desc, a.desc, 0.5), "argument 'value'", 'integer')
      has(c_error('fa_unary_forward', 0, out.desc, a.desc), 'fa_unary_forward', "argument 'x'", 'exp', 'int64')
      has(c_error('fa_binary_backward', OP.div, out.desc, nil, a.desc, a.desc, b.desc), 'FA_DIV', 'int64')
    end)
  end)

  it('report bad arguments, naming the function, the argument, expected and got', function()
    local a, b = fa.zeros(3, 4), fa.zeros(4, 3)
    local out = fa.empty(3, 4)
    has(c_error('fa_binary_forward', OP.add, out.desc, a.desc, b.desc, 1),
      'fa_binary_forward', "argument 'b'", 'expected shape (3, 4)', 'got (4, 3)')
    has(c_error('fa_binary_forward', OP.add, out.desc, a.desc, fa.zeros(3, 4, 'float64').desc, 1),
      "argument 'b'", 'expected dtype float32', 'got float64')
    has(c_error('fa_binary_forward', OP.add, fa.empty(3, 4, 'float64').desc, a.desc, a.desc, 1),
      "argument 'out'", 'expected dtype float32', 'got float64')
    has(c_error('fa_binary_forward', 7, out.desc, a.desc, a.desc, 1), "argument 'op'", 'got 7')
    has(c_error('fa_binary_forward', OP.add, out.desc, nil, a.desc, 1), "argument 'a'", 'got nothing')
    has(c_error('fa_binary_forward', OP.add, out.desc, fa.zeros(3, 4, 'bool').desc, fa.zeros(3, 4, 'bool').desc, 1),
      "argument 'a'", 'expected float32 or float64, int32 or int64', 'got bool')
    has(c_error('fa_scale_forward', fa.empty(4, 3).desc, a.desc, 1, 0), 'fa_scale_forward', "argument 'out'", 'expected shape (3, 4)')
    has(c_error('fa_addcmul_forward', out.desc, a.desc, a.desc, b.desc, 1), 'fa_addcmul_forward', "argument 'c'", 'got (4, 3)')
    has(c_error('fa_unary_forward', 12, out.desc, a.desc), 'fa_unary_forward', "argument 'op'")
    has(c_error('fa_unary_forward', 0, fa.empty(2, 6).desc, a.desc), "argument 'out'", 'expected shape (3, 4)', 'got (2, 6)')
    has(c_error('fa_binary_backward', OP.mul, fa.empty(3, 4).desc, nil, a.desc, a.desc, nil), 'fa_binary_backward', "argument 'b'")
    has(c_error('fa_binary_backward', OP.add, b.desc, nil, a.desc, nil, nil), "argument 'grad_a'", 'got (4, 3)')
    has(c_error('fa_unary_backward', 1, out.desc, a.desc, nil, a.desc), 'fa_unary_backward', "argument 'x'", 'log backward')
    has(c_error('fa_unary_backward', 0, out.desc, a.desc, nil, nil), "argument 'x'", 'the output y or the input x')
    -- broadcasting errors come from Tensor methods before any kernel runs
    local ok, err = pcall(function() return fa.zeros(3, 2) + fa.zeros(4) end)
    assert.is_false(ok)
    has(err, 'Tensor:add', 'cannot be broadcast')
  end)
end)

describe('unary ops', function()
  for _, dt in ipairs({ 'f32', 'f64' }) do
    for _, tag in ipairs(SHAPES) do
      local p = dt .. '.' .. tag .. '.'
      local rtol, atol = TOL[dt][1], TOL[dt][2]
      it('match PyTorch forward and backward, ' .. p, function()
        for _, name in ipairs(UNARY) do
          local x = POSITIVE[name] and F[p .. 'xpos'] or F[p .. 'x']
          local y = x[name](x)
          H.assert_close(y, F[p .. 'un.' .. name], rtol, atol, name)
          local xi = x:clone()
          xi[name .. '_'](xi)
          assert.is_true(xi:equal(y), name .. '_ in place')
          local gx = fa.empty_like(x)
          fa.check(C.fa_unary_backward(fa.UNARY[name], gx.desc, F[p .. 'gy'].desc, x.desc, y.desc))
          H.assert_close(gx, F[p .. 'ungrad.' .. name], rtol, atol, name .. ' backward')
          -- from x alone (recomputing y where it is used) and, where documented, from y alone
          local gx2 = fa.empty_like(x)
          fa.check(C.fa_unary_backward(fa.UNARY[name], gx2.desc, F[p .. 'gy'].desc, x.desc, nil))
          H.assert_close(gx2, F[p .. 'ungrad.' .. name], rtol, atol, name .. ' backward from x')
          if name == 'exp' or name == 'sqrt' or name == 'tanh' or name == 'sigmoid' or name == 'relu' then
            local gx3 = fa.empty_like(x)
            fa.check(C.fa_unary_backward(fa.UNARY[name], gx3.desc, F[p .. 'gy'].desc, nil, y.desc))
            assert.is_true(gx3:equal(gx), name .. ' backward from y')
          end
        end
      end)
    end
  end

  it('backward matches float64 finite differences for every op', function()
    local gy = F['f64.357.gy']
    for _, name in ipairs(UNARY) do
      local x = (POSITIVE[name] and F['f64.357.xpos'] or F['f64.357.x']):clone()
      local y = x[name](x)
      local gx = fa.empty_like(x)
      fa.check(C.fa_unary_backward(fa.UNARY[name], gx.desc, gy.desc, x.desc, y.desc))
      local num = H.numgrad(function() return x[name](x) end, x, gy)
      H.assert_close(gx, num, 1e-6, 1e-8, name .. ' vs numgrad')
    end
  end)

  it('give on strided views exactly what they give on contiguous copies', function()
    for _, dt in ipairs({ 'f32', 'f64' }) do
      local x = F[dt .. '.357.x']:permute(2, 3, 1)
      local xc = x:contiguous()
      local gy = F[dt .. '.357.gy']:transpose(2, 3)
      gy = gy:reshape(3, 5, 7):permute(2, 3, 1) -- another non-contiguous layout, same shape as x
      for _, name in ipairs(UNARY) do
        local xin = POSITIVE[name] and x:abs() or x
        local xinc = xin:contiguous()
        local y, yc = xin[name](xin), xinc[name](xinc)
        assert.is_true(y:equal(yc), dt .. ' ' .. name)
        local gx = fa.empty(7, 3, 5, xin:dtype()):permute(3, 1, 2) -- strided output (5, 7, 3)
        fa.check(C.fa_unary_backward(fa.UNARY[name], gx.desc, gy.desc, xin.desc, y.desc))
        local gxc = fa.empty_like(xinc)
        local gyc = gy:contiguous()
        fa.check(C.fa_unary_backward(fa.UNARY[name], gxc.desc, gyc.desc, xinc.desc, yc.desc))
        assert.is_true(gx:equal(gxc), dt .. ' ' .. name .. ' backward')
      end
    end
  end)

  it('handle the special values as PyTorch 1.13 does', function()
    local x = fa.tensor({ 0, -0.0, 1 / 0, -1 / 0, 0 / 0 }, 'float64')
    local function same(a, b) return a == b or (a ~= a and b ~= b) end
    local expect = {
      sign = { 0, 0, 1, -1, 0 }, relu = { 0, 0, 1 / 0, 0, 0 / 0 }, abs = { 0, 0, 1 / 0, 1 / 0, 0 / 0 },
      sigmoid = { 0.5, 0.5, 1, 0, 0 / 0 }, tanh = { 0, 0, 1, -1, 0 / 0 }, gelu = { 0, 0, 1 / 0, 0 / 0, 0 / 0 },
    }
    for name, e in pairs(expect) do
      local got = x[name](x):table()
      for i = 1, #e do assert(same(got[i], e[i]), string.format('%s(%s) = %s, expected %s', name, x:get(i), got[i], e[i])) end
    end
  end)
end)

describe('the iteration over strided and broadcast operands', function()
  -- plain-Lua float64 reference of f over every element of (out-shaped) views, read through their strides
  local function ref_of(shape, f, ...)
    local ins = { ... }
    local dins = {}
    for i, t in ipairs(ins) do dins[i] = t:double():contiguous() end
    local n = 1
    for _, s in ipairs(shape) do n = n * s end
    local r = fa.empty(shape, 'float64')
    local pr = ffi.cast('double*', r.desc.data)
    local ps = {}
    for i, t in ipairs(dins) do ps[i] = ffi.cast('double*', t.desc.data) end
    for i = 0, n - 1 do
      local v = {}
      for k = 1, #ps do v[k] = ps[k][i] end
      pr[i] = f(unpack(v))
    end
    return r
  end

  it('merge, broadcast and walk chunk boundaries inside rows (threaded sizes)', function()
    fa.manualSeed(11)
    -- (257, 129, 3): 99459 elements, > FA_PARALLEL_GRAIN, so chunks of 8192 split rows of 3 and of 387
    local a = fa.randn(257, 129, 3)
    local b = fa.randn(129, 3):expand(257, 129, 3)       -- stride 0 along dim 1; dims 2-3 merge
    local c = fa.randn(257, 1, 3):expand(257, 129, 3)    -- stride 0 in the middle
    local d = fa.randn(3, 129, 257):permute(3, 2, 1)      -- fully transposed
    local e = fa.randn(257, 129, 1):expand(257, 129, 3)  -- stride 0 innermost (short broadcast rows)
    local sh = { 257, 129, 3 }
    local function close(got, ref, what) H.assert_close(got:double(), ref, 1e-6, 1e-6, what) end
    close(a + b, ref_of(sh, function(x, y) return x + y end, a, b), 'a + b (row broadcast)')
    close(c * d, ref_of(sh, function(x, y) return x * y end, c, d), 'c * d (middle broadcast, transposed)')
    close(e - a, ref_of(sh, function(x, y) return x - y end, e, a), 'e - a (innermost broadcast)')
    close(d:add(e, 2.5), ref_of(sh, function(x, y) return x + 2.5 * y end, d, e), 'transposed + innermost broadcast')
    close(b:addcmul(d, e, 0.5), ref_of(sh, function(x, y, z) return x + 0.5 * y * z end, b, d, e), 'addcmul on views')
    close(d:scale(2, 1), ref_of(sh, function(x) return 2 * x + 1 end, d), 'scale of a transposed view')
    -- transposed operands with long rows (the column-tiled walk), threaded, partial tiles and rows
    local x, y = fa.randn(257, 387), fa.randn(387, 257):t()
    close(x + y, ref_of({ 257, 387 }, function(u, v) return u + v end, x, y), 'x + transposed y (tiled)')
    close(y:addcmul(y, x, 0.25), ref_of({ 257, 387 }, function(u, v) return u + 0.25 * u * v end, y, x), 'tiled addcmul')
    local yo = fa.empty(387, 257):t()
    fa.check(C.fa_binary_forward(OP.div, yo.desc, x.desc, y.desc, 1))
    close(yo, ref_of({ 257, 387 }, function(u, v) return u / v end, x, y), 'transposed output (tiled)')
    -- a strided output: every other element of a wider buffer
    local out = fa.empty(257, 129, 6):narrow(3, 2, 3)
    fa.check(C.fa_binary_forward(OP.mul, out.desc, d.desc, b.desc, 1))
    close(out, ref_of(sh, function(x, y) return x * y end, d, b), 'strided out')
    -- the same numbers, bit for bit, on contiguous copies (one arithmetic for every layout)
    assert.is_true((c * d):equal(c:contiguous() * d:contiguous()), 'c * d equals its contiguous version')
    assert.is_true((e - a):equal(e:contiguous() - a), 'e - a equals its contiguous version')
    assert.is_true(d:gelu():equal(d:contiguous():gelu()), 'gelu of a transposed view')
    -- integers through the same walk
    local ai, bi = a:scale(100):to('int64'), b:scale(100):to('int64')
    local ri = ai:add(bi, 3)
    local ref = ref_of(sh, function(x, y) return x + 3 * y end, ai, bi)
    assert.is_true(ri:to('float64'):equal(ref), 'int64 add with a broadcast operand')
  end)

  it('handle size-1 dimensions, 0-d tensors and empty tensors', function()
    local a = fa.randn(1, 5, 1, 4, 1)
    local b = fa.randn(1, 1, 1, 4, 1):expand(1, 5, 1, 4, 1)
    H.assert_close((a + b):double(), ref_of({ 1, 5, 1, 4, 1 }, function(x, y) return x + y end, a, b), 1e-6, 1e-6, 'size-1 dims')
    local s, t = fa.tensor(2.5), fa.tensor(-1)
    assert.are.equal(1.5, (s + t):item())
    local z = fa.empty(3, 0, 2)
    assert.are.equal(0, (z * z):numel())
  end)
end)

describe('float32 exp, tanh, sigmoid and gelu (vectorised approximations)', function()
  -- every 4099th float32 from -20 to 20 (both signs, all exponents down to 1e-30), and a fine grid
  local function sweep(lo, hi)
    local v = {}
    for i = 0, 40000 do v[#v + 1] = lo + (hi - lo) * i / 40000 end
    local x = 1e-30
    while x < hi do
      v[#v + 1] = x
      v[#v + 1] = -x
      x = x * 1.37
    end
    return fa.tensor(v):float()
  end
  -- float32 results within ~ulps of the float64 (libm) results for the same inputs: |d| <= rtol |ref| + atol
  local cases = {
    { 'exp', -87, 88, 3e-7, 0 },
    { 'tanh', -20, 20, 2e-7, 1e-38 },
    { 'sigmoid', -80, 80, 4e-7, 1e-38 },
    { 'gelu', -12, 20, 6e-7, 1e-37 }, -- 8.8 ulp (phi_f32 in c/elementwise.c)
  }
  for _, c in ipairs(cases) do
    local name, lo, hi, rtol, atol = c[1], c[2], c[3], c[4], c[5]
    it(name .. ' forward and backward match float64 over a dense range', function()
      local x = sweep(lo, hi)
      local xd = x:double()
      local y, yd = x[name](x), xd[name](xd)
      H.assert_close(y:double(), yd, rtol, atol, name)
      local gy = fa.ones_like(x)
      local gx, gxd = fa.empty_like(x), fa.empty_like(xd)
      fa.check(C.fa_unary_backward(fa.UNARY[name], gx.desc, gy.desc, x.desc, nil))
      fa.check(C.fa_unary_backward(fa.UNARY[name], gxd.desc, gy:double().desc, xd.desc, nil))
      -- derivatives: cancellation (1 - y^2 near |y| = 1, gelu' near its zero) needs an absolute term
      H.assert_close(gx:double(), gxd, 2 * rtol, 3e-7, name .. ' backward')
    end)
  end

  it('give the special values of the float64 path', function()
    local x = fa.tensor({ 0, -0.0, 1 / 0, -1 / 0, 0 / 0, 50, -50, 1e-30, -1e-30 }, 'float32')
    local xd = x:double()
    local function same(a, b) return a == b or (a ~= a and b ~= b) end
    for _, name in ipairs({ 'exp', 'tanh', 'sigmoid', 'gelu' }) do
      local got, want = x[name](x):table(), xd[name](xd):float():table()
      for i = 1, #want do
        assert(same(got[i], want[i]), string.format('%s(%s) = %s, expected %s', name, xd:get(i), got[i], want[i]))
      end
    end
    -- tanh keeps the sign of zero
    assert.are.equal(-1 / 0, 1 / fa.tensor({ -0.0 }):tanh():item())
  end)
end)

describe('elementwise argument checks (Lua side, before any kernel)', function()
  local x, y = fa.tensor({ { 1, 2, 3 }, { 4, 5, 6 } }), fa.tensor({ { 1, 1, 1 }, { 2, 2, 2 } })
  it('take numbers and tensors only, with the argument named', function()
    raises("Tensor:add: argument 'other': expected a tensor or a number, got \"a\"$", function() x:add('a') end)
    raises("Tensor:add: argument 'alpha': expected a number, got \"x\"$", function() x:add(y, 'x') end)
    raises("Tensor:add: argument 'alpha': expected a number, got nan$", function() x:add(y, 0 / 0) end)
    raises("Tensor:mul: argument 'other': expected a tensor or a number, got \"a\"$", function() return x * 'a' end)
    raises("Tensor:sub: argument 'self': expected a tensor or a number, got \"a\"$", function() return 'a' - x end)
    raises("Tensor:addcmul: argument 'tensor1': expected a tensor, got 2$", function() x:addcmul(2, 3) end)
    raises("Tensor:addcmul: argument 'tensor2': expected a tensor, got nil$", function() x:addcmul(y) end)
    raises("Tensor:addcmul: argument 'value': expected a number, got \"v\"$", function() x:addcmul(y, y, 'v') end)
    raises("Tensor:addcmul: argument 'tensor2': expected shape %(2, 3%) %(as 'self'%), got %(3, 2%)$", function() x:addcmul(y, y:t()) end)
    raises("Tensor:scale: argument 'scale': expected a number, got \"a\"$", function() x:scale('a') end)
    raises("Tensor:scale_: argument 'shift': expected a number, got true$", function() x:scale_(1, true) end)
    raises("fa.exp: argument 'input': expected a tensor, got 5$", function() fa.exp(5) end)
    raises("fa.add: argument 'a': expected a tensor %(or a number beside a tensor%), got 1$", function() fa.add(1, 2) end)
    raises("Tensor:add: argument 'self': expected a tensor %(call it as x:add%(...%), with a colon%), got 2$", function() x.add(2) end)
    raises("Tensor:add: argument 'other': expected dtype float32 %(as 'self'%), got float64$", function() x:add(y:double()) end)
    assert.are.same({ { 1, 2, 3 }, { 4, 5, 6 } }, x:table())
  end)
  it('take integer numbers only with integer tensors (no silent truncation of 1 + 0.5)', function()
    local i = fa.tensor({ 1, 2, 3 }, 'int64')
    local msg = "argument '%s': expected an integer for an int64 tensor %%(convert it with :double%%(%%) first%%), got %s$"
    raises('Tensor:add: ' .. msg:format('other', '0.5'), function() i:add(0.5) end)
    raises('Tensor:mul: ' .. msg:format('other', '0.5'), function() return 0.5 * i end)
    raises('Tensor:div: ' .. msg:format('other', '2.5'), function() return i / 2.5 end)
    raises('Tensor:sub: ' .. msg:format('other', '1.5'), function() return 1.5 - i end)
    raises('Tensor:add: ' .. msg:format('other', 'nan'), function() return i + 0 / 0 end)
    raises('Tensor:add: ' .. msg:format('alpha', '0.5'), function() return i:add(2, 0.5) end)
    raises('Tensor:scale: ' .. msg:format('scale', '0.5'), function() return i:scale(0.5) end)
    raises('Tensor:scale_: ' .. msg:format('shift', '0.25'), function() return i:scale_(1, 0.25) end)
    assert.are.same({ 1, 2, 3 }, i:table())
    assert.are.same({ 3, 5, 7 }, (i * 2 + 1):table())
    assert.are.same({ 0, 1, 1 }, i:div(2):table()) -- integer division truncates, as documented
    assert.are.same({ 1.5, 2.5, 3.5 }, i:double():add(0.5):table())
  end)
  it('refuse an in-place op whose broadcast result does not fit self', function()
    local z = fa.zeros(3)
    raises("Tensor:add_: the result of size 2x3 does not fit in self of size 3 %(in%-place ops do not broadcast self%)$",
           function() z:add_(x) end)
    assert.are.same({ 0, 0, 0 }, z:table())
    assert.are.same({ 1, 2, 3 }, z:add_(fa.tensor({ 1, 2, 3 })):table()) -- broadcasting other into self is fine
    assert.are.same({ { 2, 3, 4 }, { 5, 6, 7 } }, x:clone():add_(fa.ones(3)):table())
  end)
  it('compare tensors of one size only', function()
    raises("fa.allclose: argument 'b': expected a tensor, got 5$", function() fa.allclose(x, 5) end)
    raises("fa.allclose: argument 'rtol': expected a number >= 0, got %-1$", function() fa.allclose(x, y, -1) end)
    raises("fa.allclose: argument 'atol': expected a number >= 0, got nan$", function() fa.allclose(x, y, 0, 0 / 0) end)
    raises("Tensor:equal: argument 'other': expected a tensor, got \"x\"$", function() x:equal('x') end)
    raises("fa.maxAbsDiff: argument 'b': expected a tensor of size 2x3 %(as 'a'%), got a float32 tensor of size 7$",
           function() fa.maxAbsDiff(x, fa.zeros(7)) end)
    raises("fa.maxAbsDiff: argument 'b': expected a tensor of size 2x3 %(as 'a'%), got a float32 tensor of size 3x2$",
           function() fa.maxAbsDiff(x, x:t()) end)
    assert.is_false(fa.allclose(x, fa.zeros(7)))
    assert.are.equal(4, fa.maxAbsDiff(x, y:t():contiguous():view(2, 3))) -- {{1,2,1},{2,1,2}}
  end)
end)

describe('extra arguments (x:log(a) is not Torch7\'s log of a into x here)', function()
  local x, a = fa.tensor({ { 1, 2, 3 }, { 4, 5, 6 } }), fa.tensor({ { 2, 2, 2 }, { 3, 3, 3 } })
  it('are refused by unary methods and functions, which leave self as it was', function()
    for _, name in ipairs(UNARY) do
      local before = x:clone()
      raises('Tensor:' .. name .. ': argument #1: expected nothing %(Tensor:' .. name .. ' takes no arguments; .*%), got ' ..
             'a float32 tensor of size 2x3$', function() x[name](x, a) end)
      raises('Tensor:' .. name .. '_: argument #1: expected nothing', function() x[name .. '_'](x, a) end)
      raises('fa.' .. name .. ': argument #2: expected nothing %(fa.' .. name .. ' takes at most 1 argument; ',
             function() fa[name](x, a) end)
      assert.is_true(x:equal(before))
    end
  end)
  it('are refused by binary ops past alpha; trailing nils are no arguments', function()
    raises('Tensor:add: argument #3: expected nothing %(Tensor:add takes at most 2 arguments; .*%), got 5$',
           function() x:add(a, 1, 5) end)
    raises('fa.mul: argument #4: expected nothing', function() fa.mul(x, a, 1, {}) end)
    assert.are.same({ { 3, 4, 5 }, { 7, 8, 9 } }, x:add(a, nil, nil):table())
  end)
  it('name the multiple results of a call passed last', function()
    local ok, err = pcall(fa.maxAbsDiff, x, x:max(2)) -- max(2) gives values and indices: three arguments
    assert.is_false(ok)
    assert.matches('fa.maxAbsDiff: argument #3: expected nothing %(fa.maxAbsDiff takes at most 2 arguments; a call as ' ..
                   'the last argument passes all its results, %(f%(...%)%) passes one%), got an int64 tensor of size 2x1$', err)
    assert.are.equal(0, fa.maxAbsDiff(x:max(2), (x:max(2))))
  end)
end)
