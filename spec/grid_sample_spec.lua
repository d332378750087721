-- fa_grid_sample_forward / fa_grid_sample_backward (bilinear, CPU) against PyTorch's F.grid_sample
-- (spec/fixtures/gen_nnops.py) for zeros/border padding and align_corners true/false, and float64
-- finite differences.
local fa = require 'fastattn'
local H = require 'helpers.check'
local C = fa.C

local F = H.fixture('nnops')
local PAD = { zeros = C.FA_PAD_ZEROS, border = C.FA_PAD_BORDER }

local function forward(input, grid, pad, align, out)
  local s, g = input:size(), grid:size()
  out = out or fa.empty(s[1], s[2], g[2], g[3], input:dtype())
  fa.check(C.fa_grid_sample_forward(out.desc, input.desc, grid.desc, PAD[pad], align))
  return out
end
local function backward(go, input, grid, pad, align, gi, gg)
  gi = gi or fa.empty_like(input)
  gg = gg or fa.empty_like(grid)
  fa.check(C.fa_grid_sample_backward(gi.desc, gg.desc, go.desc, input.desc, grid.desc, PAD[pad], align))
  return gi, gg
end

-- same values, stored in another dimension order (a non-contiguous view)
local function strided(t, perm, inv)
  local s = t:size()
  local ps = {}
  for i, p in ipairs(perm) do ps[i] = s[p] end
  local r = fa.empty(ps, t:dtype()):permute(unpack(inv))
  assert.is_false(r:isContiguous())
  return r:copy(t)
end

local err_of = H.err_of

-- a random grid whose source coordinates stay at least 0.15 pixel away from integers (where the
-- bilinear gradient jumps) and from the border clamps; taps partly outside the image included
local function smooth_grid(N, Ho, Wo, H_, W_, align)
  local g = fa.empty(N, Ho, Wo, 2, 'float64')
  local function coord(size)
    local u = math.random(-1, size - 1) + 0.15 + 0.7 * math.random()
    if align == 1 then return u * 2 / (size - 1) - 1 end
    return (u + 0.5) * 2 / size - 1
  end
  for n = 1, N do
    for h = 1, Ho do
      for w = 1, Wo do
        g:set(n, h, w, 1, coord(W_))
        g:set(n, h, w, 2, coord(H_))
      end
    end
  end
  return g
end

describe('fa_grid_sample', function()
  for _, pad in ipairs({ 'zeros', 'border' }) do
    for _, align in ipairs({ 0, 1 }) do
      local tag = ('gs_%s_a%d'):format(pad, align)
      local what = ('padding %s, align_corners %s'):format(pad, align == 1 and 'true' or 'false')

      it('matches PyTorch in float64 (' .. what .. ')', function()
        local grid = F['gs_grid_a' .. align]
        local out = forward(F.gs_input, grid, pad, align)
        H.assert_close(out, F[tag .. '_out'], 1e-12, 1e-13, 'out')
        local gi, gg = backward(F.gs_go, F.gs_input, grid, pad, align)
        H.assert_close(gi, F[tag .. '_ginput'], 1e-12, 1e-13, 'grad_input')
        H.assert_close(gg, F[tag .. '_ggrid'], 1e-12, 1e-13, 'grad_grid')
      end)

      it('matches PyTorch in float32 (' .. what .. ')', function()
        local input, grid, go = F.gs_input:float(), F['gs_grid_a' .. align]:float(), F.gs_go:float()
        local out = forward(input, grid, pad, align)
        H.assert_close(out, F[tag .. '_out_f32'], 1e-5, 1e-6, 'out')
        local gi, gg = backward(go, input, grid, pad, align)
        H.assert_close(gi, F[tag .. '_ginput_f32'], 1e-5, 1e-6, 'grad_input')
        H.assert_close(gg, F[tag .. '_ggrid_f32'], 1e-5, 1e-5, 'grad_grid')
      end)

      it('takes non-contiguous input, grid, out and gradients (' .. what .. ')', function()
        local input = strided(F.gs_input, { 3, 4, 1, 2 }, { 3, 4, 1, 2 })
        local grid = strided(F['gs_grid_a' .. align], { 4, 1, 2, 3 }, { 2, 3, 4, 1 })
        local go = strided(F.gs_go, { 2, 1, 4, 3 }, { 2, 1, 4, 3 })
        local out = strided(fa.zeros(2, 3, 4, 6, 'float64'), { 4, 3, 2, 1 }, { 4, 3, 2, 1 })
        forward(input, grid, pad, align, out)
        H.assert_close(out, F[tag .. '_out'], 1e-12, 1e-13, 'out')
        local gi = strided(fa.zeros(2, 3, 5, 7, 'float64'), { 4, 3, 2, 1 }, { 4, 3, 2, 1 })
        local gg = strided(fa.zeros(2, 4, 6, 2, 'float64'), { 4, 1, 2, 3 }, { 2, 3, 4, 1 })
        backward(go, input, grid, pad, align, gi, gg)
        H.assert_close(gi, F[tag .. '_ginput'], 1e-12, 1e-13, 'grad_input')
        H.assert_close(gg, F[tag .. '_ggrid'], 1e-12, 1e-13, 'grad_grid')
      end)

      it('has the gradients of float64 finite differences (' .. what .. ')', function()
        math.randomseed(17 + align + 2 * PAD[pad])
        fa.manualSeed(23)
        local input = fa.randn(2, 2, 4, 5, 'float64')
        local grid = smooth_grid(2, 3, 4, 4, 5, align)
        local gout = fa.randn(2, 2, 3, 4, 'float64')
        local f = function() return forward(input, grid, pad, align) end
        local gi, gg = backward(gout, input, grid, pad, align)
        H.assert_close(gi, H.numgrad(f, input, gout), 1e-6, 1e-8, 'grad_input vs finite differences')
        H.assert_close(gg, H.numgrad(f, grid, gout), 1e-6, 1e-8, 'grad_grid vs finite differences')
      end)
    end
  end

  it('has a zero grid gradient where border padding clamps', function()
    local input = fa.randn(1, 2, 3, 4, 'float64')
    local grid = fa.tensor({ { { { -1.5, 0.1 }, { 0.2, 3.0 }, { -1, 0.3 } } } }, 'float64') -- (1, 1, 3, 2)
    local _, gg = backward(fa.ones(1, 2, 1, 3, 'float64'), input, grid, 'border', 1)
    assert.are.equal(0, gg:get(1, 1, 1, 1)) -- x clamped below
    assert.are.equal(0, gg:get(1, 1, 2, 2)) -- y clamped above
    assert.are.equal(0, gg:get(1, 1, 3, 1)) -- x exactly on the border counts as clamped
    assert.are_not.equal(0, gg:get(1, 1, 1, 2))
  end)

  it('gives the same gradients with 1 and 2 threads', function()
    local nthreads = fa.getNumThreads()
    fa.manualSeed(4)
    local input = fa.randn(2, 5, 33, 31)
    local grid = fa.rand(2, 40, 41, 2) * 2.4 - 1.2
    local go = fa.randn(2, 5, 40, 41)
    local res = {}
    for _, nt in ipairs({ 1, 2 }) do
      fa.setNumThreads(nt)
      local out = forward(input, grid, 'zeros', 0)
      local gi, gg = backward(go, input, grid, 'zeros', 0)
      res[nt] = { out, gi, gg }
    end
    fa.setNumThreads(nthreads)
    for i = 1, 3 do assert.is_true(res[1][i]:equal(res[2][i]), 'result ' .. i) end
  end)

  it('rejects bad arguments with messages naming them', function()
    local input = fa.randn(2, 3, 5, 7)
    local e = err_of(function() forward(input, fa.zeros(2, 4, 6, 3), 'zeros', 0) end)
    assert.truthy(e:find("fa_grid_sample_forward: argument 'grid': expected shape (N, Ho, Wo, 2) with (x, y) last, got (2, 4, 6, 3)", 1, true), e)
    e = err_of(function() forward(input, fa.zeros(3, 4, 6, 2), 'zeros', 0, fa.empty(2, 3, 4, 6)) end)
    assert.truthy(e:find("argument 'grid': expected batch size 2 (as 'input' of shape (2, 3, 5, 7)), got shape (3, 4, 6, 2)", 1, true), e)
    e = err_of(function() forward(input, fa.zeros(2, 4, 6, 2, 'float64'), 'zeros', 0) end)
    assert.truthy(e:find("argument 'grid': expected dtype float32 (as 'input'), got float64", 1, true), e)
    e = err_of(function() forward(fa.randn(3, 5, 7), fa.zeros(2, 4, 6, 2), 'zeros', 0, fa.empty(2, 3, 4, 6)) end)
    assert.truthy(e:find("argument 'input': expected a 4-D tensor", 1, true), e)
    e = err_of(function() forward(input, fa.zeros(2, 4, 6, 2), 'zeros', 0, fa.empty(2, 3, 6, 4)) end)
    assert.truthy(e:find("argument 'out': expected shape (2, 3, 4, 6) (N, C, Ho, Wo), got (2, 3, 6, 4)", 1, true), e)
    e = err_of(function()
      local out = fa.empty(2, 3, 4, 6)
      local g0 = fa.zeros(2, 4, 6, 2)
      fa.check(C.fa_grid_sample_forward(out.desc, input.desc, g0.desc, 2, 0))
    end)
    assert.truthy(e:find("argument 'padding'", 1, true), e)
    e = err_of(function() backward(fa.randn(2, 3, 4, 5), input, fa.zeros(2, 4, 6, 2), 'zeros', 0) end)
    assert.truthy(e:find("fa_grid_sample_backward: argument 'grad_out': expected shape (2, 3, 4, 6)", 1, true), e)
  end)
end)
