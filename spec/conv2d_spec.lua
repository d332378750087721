-- conv2d (c/conv2d.c): forward and gradients against PyTorch (spec/fixtures/gen_conv.py), float64 finite
-- differences, the three CPU algorithms (im2col+GEMM, Winograd, depthwise direct), strided inputs, errors.
local fa = require 'fastattn'
local ffi = require 'ffi'
local H = require 'helpers.check'
local C = fa.C

local AUTO, GEMM, WINO = C.FA_CONV_AUTO, C.FA_CONV_GEMM, C.FA_CONV_WINOGRAD
local function set_algo(a) return C.fa_conv2d_set_algorithm(a) end

-- p = {sh, sw, ph, pw, dh, dw, groups}
local function params(p)
  return ffi.new('fa_conv2d_params', { p[1], p[2], p[3], p[4], p[5], p[6], p[7] })
end
local function out_shape(x, w, p)
  local N, Hh, W = x:size(1), x:size(3), x:size(4)
  local kh, kw = w:size(3), w:size(4)
  return { N, w:size(1), math.floor((Hh + 2 * p[3] - p[5] * (kh - 1) - 1) / p[1]) + 1,
           math.floor((W + 2 * p[4] - p[6] * (kw - 1) - 1) / p[2]) + 1 }
end
local function conv(x, w, b, p)
  local out = fa.empty(out_shape(x, w, p), x:dtype())
  fa.check(C.fa_conv2d_forward(out.desc, x.desc, w.desc, b and b.desc or nil, params(p)))
  return out
end
-- gradients; gw/gb start from the given tensors (accumulated), gx from garbage (must be overwritten)
local function conv_back(gout, x, w, p, gw0, gb0)
  local gx = fa.full(x:size(), 7, x:dtype())
  local gw = gw0 and gw0:clone() or fa.zeros(w:size(), x:dtype())
  local gb = gb0 and gb0:clone() or nil
  fa.check(C.fa_conv2d_backward(gx.desc, gw.desc, gb and gb.desc or nil, gout.desc, x.desc, w.desc, params(p)))
  return gx, gw, gb
end

local small = H.fixture('conv_small')
local wino = H.fixture('conv_wino')
local function cases(fx)
  local names = {}
  for k in pairs(fx) do
    local n = k:match('^(.*)%.params$')
    if n then names[#names + 1] = n end
  end
  table.sort(names)
  return names
end
local function case(fx, name)
  local c = { p = {} }
  for k, v in pairs(fx) do
    local field = k:match('^' .. name:gsub('%p', '%%%0') .. '%.(.*)$')
    if field then c[field] = v end
  end
  for i = 1, 7 do c.p[i] = c.params:get(i) end
  return c
end
local function is_wino_shape(c)
  return c.w:size(3) == 3 and c.w:size(4) == 3 and c.p[1] == 1 and c.p[2] == 1 and c.p[5] == 1 and c.p[6] == 1
end

-- Tolerances. float64: rounding only. float32: the direct and GEMM paths sum K = C/G*kh*kw products
-- of O(1) terms in float (error ~ sqrt(K) * 6e-8 ~ 1e-6 here); Winograd F(4x4,3x3) amplifies float32
-- rounding by its transform norms (about 10x-30x, Lavin & Gray table 2 / gen_conv's measurement), so its
-- float32 bound is 10x looser.
local TOL = {
  float64 = { rtol = 1e-10, atol = 1e-10 },
  float32 = { rtol = 1e-5, atol = 2e-5 },
  float32w = { rtol = 1e-4, atol = 2e-4 },
}

local function check_case(fx, name, dtype, algo)
  local c = case(fx, name)
  local x, w, gout = c.x:to(dtype), c.w:to(dtype), c.gout:to(dtype)
  local b = c.b and c.b:to(dtype)
  local tol = TOL[dtype]
  if dtype == 'float32' and algo ~= GEMM and is_wino_shape(c) and (algo == WINO or c.w:size(2) >= 32) then tol = TOL.float32w end
  local prev = set_algo(algo)
  local ok, err = pcall(function()
    local what = string.format('%s %s algo %d', name, dtype, algo)
    H.assert_close(conv(x, w, b, c.p), c.out, tol.rtol, tol.atol, what .. ' out')
    -- parameter gradients accumulate: start from ones and expect reference + 1
    local gw0 = fa.ones(w:size(), dtype)
    local gb0 = b and fa.ones(b:size(), dtype)
    local gx, gw, gb = conv_back(gout, x, w, c.p, gw0, gb0)
    H.assert_close(gx, c.gx, tol.rtol, tol.atol, what .. ' grad x')
    H.assert_close(gw, c.gw + 1, tol.rtol, tol.atol, what .. ' grad weight')
    if b then H.assert_close(gb, c.gb + 1, tol.rtol, 10 * tol.atol, what .. ' grad bias') end
  end)
  set_algo(prev)
  if not ok then error(err, 0) end
end

describe('fa_conv2d against PyTorch', function()
  for _, name in ipairs(cases(small)) do
    for _, dtype in ipairs({ 'float64', 'float32' }) do
      it(name .. ' ' .. dtype .. ' (auto)', function() check_case(small, name, dtype, AUTO) end)
      it(name .. ' ' .. dtype .. ' (im2col + GEMM)', function() check_case(small, name, dtype, GEMM) end)
      if is_wino_shape(case(small, name)) then
        it(name .. ' ' .. dtype .. ' (Winograd)', function() check_case(small, name, dtype, WINO) end)
      end
    end
  end
  for _, dtype in ipairs({ 'float64', 'float32' }) do
    it('32 channels, 3x3 (Winograd by default), ' .. dtype, function() check_case(wino, 'w32', dtype, AUTO) end)
    it('32 channels, 3x3 forced to im2col + GEMM, ' .. dtype, function() check_case(wino, 'w32', dtype, GEMM) end)
  end

  it('splits a large im2col into chunks (x, w, grad_out given by formulas)', function()
    local f = H.fixture('conv_formula')
    local function formula(shape, a, b, scale)
      local t = fa.empty(shape, 'float64')
      local p = ffi.cast('double*', t.desc.data)
      for i = 0, t:numel() - 1 do p[i] = math.sin(a * i + b) * scale end
      return t
    end
    local x = formula({ 1, 1024, 20, 19 }, 0.37, 0.1, 1.0)
    local w = formula({ 5, 1024, 4, 4 }, 0.11, 0.3, 1.0 / 128)
    local p = { 1, 1, 1, 1, 1, 1, 1 }
    local out = conv(x, w, nil, p)
    H.assert_close(out, f.out, 1e-9, 1e-9, 'out')
    local gout = formula(out:size(), 0.23, 0.7, 1.0)
    local gx, gw = conv_back(gout, x, w, p)
    local function sample(t, step)
      local flat = t:contiguous():view(-1)
      local n = math.floor((flat:numel() - 1) / step) + 1
      local s = fa.empty({ n }, 'float64')
      for i = 1, n do s:set(i, flat:get((i - 1) * step + 1)) end
      return s
    end
    H.assert_close(sample(gx, 97), f.gx_sample, 1e-9, 1e-9, 'grad x sample')
    H.assert_close(sample(gw, 41), f.gw_sample, 1e-9, 1e-9, 'grad weight sample')
    assert.is_true(math.abs(gx:sum() - f.gx_sum:item()) < 1e-7 * math.abs(f.gx_sum:item()) + 1e-7)
    assert.is_true(math.abs(gw:sum() - f.gw_sum:item()) < 1e-7 * math.abs(f.gw_sum:item()) + 1e-7)
  end)
end)

describe('fa_conv2d gradients by finite differences (float64)', function()
  local specs = {
    { 'plain 3x3 pad 1', { 1, 2, 5, 6 }, { 3, 2, 3, 3 }, { 1, 1, 1, 1, 1, 1, 1 } },
    { 'groups 2, stride (2,1), 3x2 kernel', { 2, 4, 7, 6 }, { 4, 2, 3, 2 }, { 2, 1, 1, 0, 1, 1, 2 } },
    { 'depthwise stride 2', { 1, 3, 7, 6 }, { 3, 1, 3, 3 }, { 2, 2, 1, 1, 1, 1, 3 } },
    { 'depthwise 6x6 stride 4 pad 1', { 1, 2, 9, 10 }, { 2, 1, 6, 6 }, { 4, 4, 1, 1, 1, 1, 2 } },
    { 'dilation 2', { 1, 2, 7, 7 }, { 2, 2, 3, 3 }, { 1, 1, 1, 2, 2, 2, 1 } },
    { '1x1', { 2, 3, 3, 4 }, { 2, 3, 1, 1 }, { 1, 1, 0, 0, 1, 1, 1 } },
    { '3x3 padding (2, 0)', { 1, 2, 6, 7 }, { 2, 2, 3, 3 }, { 1, 1, 2, 0, 1, 1, 1 } },
  }
  for _, algo in ipairs({ GEMM, WINO }) do
    for _, s in ipairs(specs) do
      it(s[1] .. (algo == WINO and ' (Winograd where it applies)' or ''), function()
        fa.manualSeed(7)
        local x = fa.randn(s[2], 'float64')
        local w = fa.randn(s[3], 'float64')
        local b = fa.randn({ s[3][1] }, 'float64')
        local p = s[4]
        local prev = set_algo(algo)
        local ok, err = pcall(function()
          local gout = fa.randn(out_shape(x, w, p), 'float64')
          local gx, gw, gb = conv_back(gout, x, w, p, nil, fa.zeros({ s[3][1] }, 'float64'))
          local f = function() return conv(x, w, b, p) end
          H.assert_close(gx, H.numgrad(f, x, gout), 1e-6, 1e-7, 'grad x')
          H.assert_close(gw, H.numgrad(f, w, gout), 1e-6, 1e-7, 'grad weight')
          H.assert_close(gb, H.numgrad(f, b, gout), 1e-6, 1e-7, 'grad bias')
        end)
        set_algo(prev)
        if not ok then error(err, 0) end
      end)
    end
  end
end)

describe('fa_conv2d algorithms agree on larger shapes', function()
  it('Winograd (several tile blocks, partial tiles, groups) matches im2col + GEMM in float32', function()
    fa.manualSeed(3)
    local x = fa.randn(2, 64, 50, 301)
    local w = fa.randn(64, 32, 3, 3):scale(1 / math.sqrt(32 * 9))
    local b = fa.randn(64)
    local p = { 1, 1, 1, 1, 1, 1, 2 }
    local prev = set_algo(WINO)
    local yw = conv(x, w, b, p)
    local gout = fa.randn(yw:size())
    local gxw, gww, gbw = conv_back(gout, x, w, p, nil, fa.zeros(64))
    set_algo(GEMM)
    local yg = conv(x, w, b, p)
    local gxg, gwg, gbg = conv_back(gout, x, w, p, nil, fa.zeros(64))
    set_algo(prev)
    H.assert_close(yw, yg, 1e-4, 2e-4, 'out')
    H.assert_close(gxw, gxg, 1e-4, 2e-4, 'grad x')
    -- grad weight sums 2*50*301 products per element: scale the bound by its magnitude
    H.assert_close(gww, gwg, 1e-4, 2e-4 * math.sqrt(2 * 50 * 301), 'grad weight')
    H.assert_close(gbw, gbg, 1e-5, 1e-3, 'grad bias')
  end)
  it('many small images (one per thread) match one image at a time', function()
    fa.manualSeed(4)
    local x = fa.randn(9, 16, 21, 20, 'float64') -- 9 MFLOP: enough for one image per thread
    local w = fa.randn(32, 8, 3, 3, 'float64')
    local p = { 2, 1, 1, 1, 1, 1, 2 }
    local y = conv(x, w, nil, p)
    local gout = fa.randn(y:size(), 'float64')
    local gx, gw = conv_back(gout, x, w, p)
    for n = 1, 9, 4 do
      local xn = x:narrow(1, n, 1):contiguous()
      H.assert_close(y:narrow(1, n, 1), conv(xn, w, nil, p), 1e-12, 1e-12, 'out image ' .. n)
      local gxn = conv_back(gout:narrow(1, n, 1):contiguous(), xn, w, p)
      H.assert_close(gx:narrow(1, n, 1), gxn, 1e-12, 1e-12, 'grad x image ' .. n)
    end
    -- the weight gradient is the sum over images
    local acc = fa.zeros(w:size(), 'float64')
    for n = 1, 9 do
      local _, gwn = conv_back(gout:narrow(1, n, 1):contiguous(), x:narrow(1, n, 1):contiguous(), w, p)
      acc:add_(gwn)
    end
    H.assert_close(gw, acc, 1e-10, 1e-10, 'grad weight')
  end)
  it('gives the same bits on every run', function()
    fa.manualSeed(5)
    for _, s in ipairs({ { { 3, 40, 12, 9 }, { 40, 40, 3, 3 }, 1 }, { { 4, 8, 12, 9 }, { 8, 1, 6, 6 }, 8 } }) do
      local x, w = fa.randn(s[1]), fa.randn(s[2])
      local p = { 1, 1, 1, 1, 1, 1, s[3] }
      local gout = fa.randn(out_shape(x, w, p))
      local gx1, gw1 = conv_back(gout, x, w, p)
      local gx2, gw2 = conv_back(gout, x, w, p)
      assert.is_true(gx1:equal(gx2))
      assert.is_true(gw1:equal(gw2))
    end
  end)
end)

describe('fa_conv2d edge sizes', function()
  it('an empty batch gives empty outputs and no work', function()
    local x, w, b = fa.randn(0, 3, 5, 5), fa.randn(4, 3, 3, 3), fa.randn(4)
    local p = { 1, 1, 1, 1, 1, 1, 1 }
    assert.are.same({ 0, 4, 5, 5 }, conv(x, w, b, p):size())
    local gb = fa.zeros(4)
    local gx, gw = conv_back(fa.empty(0, 4, 5, 5), x, w, p, nil, gb)
    assert.are.same({ 0, 3, 5, 5 }, gx:size())
    assert.are.equal(0, gw:abs():max())
  end)
  it('no input channels: the output is the bias, the bias gradient the sum of grad_out', function()
    local x, w, b = fa.randn(2, 0, 4, 3, 'float64'), fa.randn(3, 0, 2, 2, 'float64'), fa.tensor({ 1, 2, 3 }, 'float64')
    local p = { 1, 1, 0, 0, 1, 1, 1 }
    local out = conv(x, w, b, p)
    H.assert_close(out, b:view(1, 3, 1, 1):expand(2, 3, 3, 2), 0, 0, 'out')
    local gout = fa.randn(out:size(), 'float64')
    local _, _, gb = conv_back(gout, x, w, p, nil, fa.zeros(3, 'float64'))
    H.assert_close(gb, gout:sum(4):sum(3):sum(1):view(3), 1e-12, 1e-12, 'grad bias')
  end)
  it('a 1x1 image with padding', function()
    fa.manualSeed(9)
    local x, w, b = fa.randn(1, 2, 1, 1, 'float64'), fa.randn(3, 2, 3, 3, 'float64'), fa.randn(3, 'float64')
    for _, algo in ipairs({ GEMM, WINO }) do
      local prev = set_algo(algo)
      local out = conv(x, w, b, { 1, 1, 1, 1, 1, 1, 1 })
      set_algo(prev)
      -- only the centre tap sees the pixel
      local ref = b:clone()
      for o = 1, 3 do ref:set(o, ref:get(o) + w:get(o, 1, 2, 2) * x:get(1, 1, 1, 1) + w:get(o, 2, 2, 2) * x:get(1, 2, 1, 1)) end
      H.assert_close(out:view(3), ref, 1e-12, 1e-12, 'algo ' .. algo)
    end
  end)
end)

describe('fa_conv2d strided inputs', function()
  it('reads non-contiguous x, weight and grad_out', function()
    local c = case(small, 'groups2')
    local x = c.x:transpose(3, 4):contiguous():transpose(3, 4) -- same values, strides of a transpose
    local w = c.w:permute(2, 1, 3, 4):contiguous():permute(2, 1, 3, 4)
    local gout = c.gout:transpose(1, 2):contiguous():transpose(1, 2)
    assert.is_false(x:isContiguous())
    assert.is_false(w:isContiguous())
    assert.is_false(gout:isContiguous())
    H.assert_close(conv(x, w, c.b, c.p), c.out, 1e-10, 1e-10, 'out')
    local gx, gw = conv_back(gout, x, w, c.p)
    H.assert_close(gx, c.gx, 1e-10, 1e-10, 'grad x')
    H.assert_close(gw, c.gw, 1e-10, 1e-10, 'grad weight')
  end)
  it('refuses a non-contiguous output with a clear error', function()
    local c = case(small, 'k3p1')
    local s = out_shape(c.x, c.w, c.p)
    local out = fa.empty({ s[1], s[2], s[4], s[3] }, 'float64'):transpose(3, 4)
    local rc = C.fa_conv2d_forward(out.desc, c.x.desc, c.w.desc, nil, params(c.p))
    assert.are.equal(1, rc)
    assert.matches("argument 'out': expected a contiguous tensor", ffi.string(C.fa_last_error()), 1, true)
  end)
end)

describe('fa_conv2d errors', function()
  local x = fa.randn(2, 4, 8, 8)
  local w = fa.randn(6, 2, 3, 3)
  local p = { 1, 1, 1, 1, 1, 1, 2 }
  local function err(out, xx, ww, bb, pp)
    local rc = C.fa_conv2d_forward(out.desc, xx.desc, ww.desc, bb and bb.desc or nil, params(pp))
    assert.are_not.equal(0, rc)
    return ffi.string(C.fa_last_error())
  end
  local out = fa.empty(2, 6, 8, 8)
  it('accepts the good call', function()
    fa.check(C.fa_conv2d_forward(out.desc, x.desc, w.desc, nil, params(p)))
  end)
  it('wrong weight rank', function()
    assert.matches("fa_conv2d_forward: argument 'weight': expected a 4-D tensor, got a 3-D tensor of shape (6, 2, 9)",
      err(out, x, w:view(6, 2, 9), nil, p), 1, true)
  end)
  it('channels not divisible by groups', function()
    assert.matches("argument 'x': expected in-channels divisible by groups = 3, got 4 channels",
      err(out, x, fa.randn(6, 1, 3, 3), nil, { 1, 1, 1, 1, 1, 1, 3 }), 1, true)
  end)
  it("weight's in-channels differ from C / groups", function()
    assert.matches("argument 'weight': expected 2 in-channels per group in dimension 2 (x has 4 channels, groups = 2), got shape (6, 4, 3, 3)",
      err(out, x, fa.randn(6, 4, 3, 3), nil, p), 1, true)
  end)
  it('bias of the wrong size', function()
    assert.matches("argument 'bias': expected shape (6,) (out-channels of weight (6, 2, 3, 3)), got (5,)",
      err(out, x, w, fa.randn(5), p), 1, true)
  end)
  it('mixed dtypes', function()
    assert.matches("argument 'weight': expected dtype float32 (as 'x'), got float64", err(out, x, w:double(), nil, p), 1, true)
    assert.matches("argument 'bias': expected dtype float32 (as 'x'), got float64", err(out, x, w, fa.randn(6, 'float64'), p), 1, true)
  end)
  it('output of the wrong size', function()
    assert.matches("argument 'out': expected shape (2, 6, 8, 8) for x of shape (2, 4, 8, 8), got (2, 6, 7, 8)",
      err(fa.empty(2, 6, 7, 8), x, w, nil, p), 1, true)
  end)
  it('input smaller than the kernel', function()
    assert.matches("is smaller than the dilated kernel 5x5",
      err(out, fa.randn(2, 4, 4, 4), w, nil, { 1, 1, 0, 0, 2, 2, 2 }), 1, true)
  end)
  it('bad parameters', function()
    assert.matches("expected stride >= 1, got (0, 1)", err(out, x, w, nil, { 0, 1, 1, 1, 1, 1, 2 }), 1, true)
    assert.matches("expected groups >= 1, got 0", err(out, x, w, nil, { 1, 1, 1, 1, 1, 1, 0 }), 1, true)
  end)
  it('unsupported CPU dtype', function()
    assert.matches("expected float32 or float64 on the CPU, got float16",
      err(out:half(), x:half(), w:half(), nil, p), 1, true)
  end)
  it('backward: grad_weight of the wrong shape', function()
    local gw = fa.zeros(6, 2, 3, 2)
    local rc = C.fa_conv2d_backward(nil, gw.desc, nil, out.desc, x.desc, w.desc, params(p))
    assert.are.equal(1, rc)
    assert.matches("argument 'grad_weight': expected shape (6, 2, 3, 3) (as 'weight'), got (6, 2, 3, 2)",
      ffi.string(C.fa_last_error()), 1, true)
  end)
  it('rejects an unknown algorithm', function()
    assert.are.equal(-1, C.fa_conv2d_set_algorithm(9))
    assert.are.equal(AUTO, C.fa_conv2d_set_algorithm(AUTO))
  end)
end)
