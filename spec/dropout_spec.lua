-- fa_dropout_forward / fa_dropout_backward (CPU): the mask is drawn from the Philox counter stream
-- (element i uses counter offset + i, kept when its float uniform >= p), so it is checked against
-- fa_uniform on the same (seed, offset), against the keep rate, and across thread counts.
local fa = require 'fastattn'
local ffi = require 'ffi'
local H = require 'helpers.check'
local C = fa.C

local function forward(x, p, seed, offset, out, mask)
  out = out or fa.empty_like(x)
  mask = mask or fa.empty(x:size(), 'bool')
  fa.check(C.fa_dropout_forward(out.desc, mask.desc, x.desc, p, seed, offset))
  return out, mask
end
local function backward(go, mask, p, gx)
  gx = gx or fa.empty_like(go)
  fa.check(C.fa_dropout_backward(gx.desc, go.desc, mask.desc, p))
  return gx
end

-- contiguous data of a tensor as a Lua-indexable pointer (0-based)
local function ptr(t)
  t = t:contiguous()
  local ct = ({ float32 = 'float*', float64 = 'double*', bool = 'uint8_t*' })[t:dtype()]
  return ffi.cast(ct, t.desc.data), t
end

local err_of = H.err_of

describe('fa_dropout', function()
  it('keeps a fraction 1 - p and scales the kept elements by 1 / (1 - p)', function()
    fa.manualSeed(1)
    local n, p = 1000000, 0.3
    local x = fa.randn(n)
    local out, mask = forward(x, p, 1234, 0)
    local xp, xa = ptr(x)
    local op, oa = ptr(out)
    local mp, ma = ptr(mask)
    local kept, bad = 0, 0
    for i = 0, n - 1 do
      if mp[i] ~= 0 then
        kept = kept + 1
        if math.abs(op[i] - xp[i] / (1 - p)) > 1e-6 * (1 + math.abs(xp[i])) then bad = bad + 1 end
      elseif op[i] ~= 0 then
        bad = bad + 1
      end
    end
    assert.are.equal(0, bad)
    -- binomial standard deviation sqrt(p (1 - p) / n) = 4.6e-4: 10 of them
    assert.is_true(math.abs(kept / n - (1 - p)) < 0.0046, 'kept fraction ' .. kept / n)
    local _ = xa, oa, ma
  end)

  it('draws element i from Philox counter offset + i, as fa_uniform does', function()
    local n, p, seed, offset = 5000, 0.45, 987654321, 777
    local x = fa.ones(n, 'float64')
    local _, mask = forward(x, p, seed, offset)
    local u = fa.empty(n, 'float32')
    fa.check(C.fa_uniform(u.desc, 0, 1, seed, offset))
    local up, ua = ptr(u)
    local mp, ma = ptr(mask)
    for i = 0, n - 1 do
      if (mp[i] ~= 0) ~= (up[i] >= p) then error(('element %d: mask %d, uniform %g'):format(i, mp[i], up[i])) end
    end
    -- shifting the offset by k shifts the mask by k elements; another seed gives another mask
    local _, m2 = forward(x, p, seed, offset + 10)
    assert.is_true(m2:narrow(1, 1, n - 10):equal(mask:narrow(1, 11, n - 10)))
    local _, m3 = forward(x, p, seed + 1, offset)
    assert.is_false(m3:equal(mask))
    local _ = ua, ma
  end)

  it('draws the same numbers in the vectorised float32 path, across the 2^32 counter carry', function()
    -- threaded, contiguous float32 chunks; counters offset .. offset + n - 1 cross 2^32 (the high word)
    local n, seed, offset = 70001, 0x123456789, 2 ^ 32 - 30000
    local x = fa.randn(n)
    local u = fa.empty(n, 'float32')
    fa.check(C.fa_uniform(u.desc, 0, 1, seed, offset))
    local up, ua = ptr(u)
    local xp, xa = ptr(x)
    -- p = up[123] sits exactly on the float uniform grid: that element must be kept (u >= p)
    for _, p in ipairs({ 0.25, up[123], 0.9 }) do
      local out, mask = forward(x, p, seed, offset)
      local op, oa = ptr(out)
      local mp, ma = ptr(mask)
      local scale = 1 / (1 - p)
      for i = 0, n - 1 do
        local k = up[i] >= p
        if (mp[i] ~= 0) ~= k then error(('p %g, element %d: mask %d, uniform %.9g'):format(p, i, mp[i], up[i])) end
        local want = k and tonumber(ffi.cast('float', xp[i] * scale)) or 0
        if op[i] ~= want then error(('p %g, element %d: out %.9g, expected %.9g'):format(p, i, op[i], want)) end
      end
      local _ = oa, ma
    end
    local _ = ua, xa
  end)

  it('gives the same mask for the same (seed, offset) with 1 and 2 threads', function()
    local nthreads = fa.getNumThreads()
    local x = fa.randn(300, 301)
    fa.setNumThreads(1)
    local o1, m1 = forward(x, 0.5, 42, 1000)
    fa.setNumThreads(2)
    local o2, m2 = forward(x, 0.5, 42, 1000)
    fa.setNumThreads(nthreads)
    assert.is_true(m1:equal(m2))
    assert.is_true(o1:equal(o2))
  end)

  it('copies for p = 0 and zeroes for p = 1', function()
    local x = fa.randn(17, 3)
    local out, mask = forward(x, 0, 5, 0)
    assert.is_true(out:equal(x))
    assert.is_true(mask:equal(fa.ones(17, 3, 'bool')))
    out, mask = forward(x, 1, 5, 0)
    assert.is_true(out:equal(fa.zeros(17, 3)))
    assert.is_true(mask:equal(fa.zeros(17, 3, 'bool')))
    assert.is_true(backward(fa.randn(17, 3), mask, 1):equal(fa.zeros(17, 3)))
  end)

  it('has backward = grad * mask / (1 - p), equal to float64 finite differences', function()
    local p = 0.4
    local x = fa.randn(4, 5, 'float64')
    local gout = fa.randn(4, 5, 'float64')
    local _, mask = forward(x, p, 99, 3)
    local gx = backward(gout, mask, p)
    H.assert_close(gx, gout * mask:double() / (1 - p), 1e-15, 0, 'grad_x')
    local f = function() return (forward(x, p, 99, 3)) end
    H.assert_close(gx, H.numgrad(f, x, gout), 1e-7, 1e-9, 'grad_x vs finite differences')
    -- float32
    local g32 = backward(gout:float(), mask, p)
    H.assert_close(g32, (gout * mask:double() / (1 - p)):float(), 1e-6, 1e-7, 'grad_x float32')
  end)

  it('takes a NULL mask when none is needed (inference)', function()
    local x = fa.randn(50, 3)
    local out = fa.empty_like(x)
    fa.check(C.fa_dropout_forward(out.desc, nil, x.desc, 0.3, 7, 5))
    assert.is_true(out:equal((forward(x, 0.3, 7, 5))))
  end)

  it('takes non-contiguous tensors (the mask follows the logical element order)', function()
    local x = fa.randn(6, 9)
    local xt = x:t()
    local out, mask = forward(xt:contiguous(), 0.3, 8, 21)
    local out_nc = fa.empty(6, 9):t()
    local mask_nc = fa.empty(6, 9, 'bool'):t()
    forward(xt, 0.3, 8, 21, out_nc, mask_nc)
    assert.is_true(mask_nc:equal(mask))
    assert.is_true(out_nc:equal(out))
    local go = fa.randn(6, 9)
    local gx_nc = fa.empty(6, 9):t()
    backward(go:t(), mask_nc, 0.3, gx_nc)
    assert.is_true(gx_nc:equal(backward(go:t():contiguous(), mask, 0.3)))
  end)

  it('rejects bad arguments with messages naming them', function()
    local x = fa.randn(3, 4)
    local e = err_of(function() forward(x, 1.5, 1, 0) end)
    assert.truthy(e:find("fa_dropout_forward: argument 'p': expected 0 <= p <= 1, got 1.5", 1, true), e)
    e = err_of(function() forward(x, 0.5, 1, 0, nil, fa.empty(3, 4)) end)
    assert.truthy(e:find("argument 'mask': expected dtype bool, got float32", 1, true), e)
    e = err_of(function() forward(x, 0.5, 1, 0, nil, fa.empty(4, 3, 'bool')) end)
    assert.truthy(e:find("argument 'mask': expected shape (3, 4)", 1, true), e)
    e = err_of(function() backward(x, fa.empty(3, 4, 'bool'), -0.1) end)
    assert.truthy(e:find("fa_dropout_backward: argument 'p'", 1, true), e)
  end)
end)
