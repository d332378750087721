-- fa.nn modules (lua/fastattn/nn/) and fa.F: forward and backward against PyTorch (spec/fixtures/nn.safetensors,
-- made by spec/fixtures/gen_nn.py, float64), float64 finite differences, the Module API (getParameters,
-- stateDict, clone, type, training/evaluate, buffer reuse) and error messages.
local fa = require 'fastattn'
local H = require 'helpers.check'
local nn = fa.nn
local F = fa.F

local FX = H.fixture('nn')

-- the fixture entries under `prefix.` (prefix stripped)
local function under(prefix, tbl)
  local out = {}
  for k, v in pairs(tbl or FX) do
    if k:sub(1, #prefix + 1) == prefix .. '.' then out[k:sub(#prefix + 2)] = v end
  end
  return out
end

local function keys(t)
  local ks = {}
  for k in pairs(t) do ks[#ks + 1] = k end
  table.sort(ks)
  return ks
end

-- float64: the fixture's precision; float32: the kernels' float32 accumulation
local TOL = { float64 = { 1e-9, 1e-11 }, float32 = { 2e-4, 2e-5 } }

-- runs module m (built by make()) on fixture `prefix` in dtype; compares output, gradInput and the
-- parameter gradients (by their PyTorch state_dict names)
local function check_module(prefix, make, dtype)
  local f = under(prefix)
  local m = make():type(dtype)
  local sd = under('sd', f)
  if next(sd) then m:loadStateDict(sd) end
  assert.are.same(keys(under('grad', f)), keys(m:namedParameters()))
  local rtol, atol = TOL[dtype][1], TOL[dtype][2]
  local x, gy = f.x:to(dtype), f.gy:to(dtype)
  m:zeroGradParameters()
  local y = m:forward(x)
  H.assert_close(y, f.y, rtol, atol, prefix .. ' output')
  local gx = m:backward(x, gy)
  H.assert_close(gx, f.gx, rtol, atol, prefix .. ' gradInput')
  local _, grads = m:parameters()
  local named = m:namedParameters()
  local gradOf = {}
  local ps = m:parameters()
  for i, p in ipairs(ps) do gradOf[p] = grads[i] end
  for name, p in pairs(named) do
    H.assert_close(gradOf[p], f['grad.' .. name], rtol, atol, prefix .. ' grad ' .. name)
  end
  return m
end

local MODULES = {
  seq = function()
    return nn.Sequential()
      :add(nn.Conv2d(3, 4, 3, 2, 1))
      :add(nn.GELU())
      :add(nn.Conv2d{ 4, 4, 3, groups = 2 })
      :add(nn.ReLU())
      :add(nn.Flatten())
      :add(nn.Linear(48, 10))
      :add(nn.LayerNorm(10))
      :add(nn.Linear(10, 5))
  end,
  linear = function() return nn.Linear(7, 5) end,
  linear_nobias = function() return nn.Linear(7, 1, false) end,
  conv = function()
    return nn.Conv2d{ in_channels = 3, out_channels = 6, kernel_size = { 3, 2 }, stride = { 2, 1 }, padding = { 1, 0 },
                      dilation = { 1, 2 }, groups = 3 }
  end,
  conv_nobias = function() return nn.Conv2d(2, 3, 1, 1, 0, 1, 1, false) end,
  layernorm = function() return nn.LayerNorm({ 3, 4 }) end,
  layernorm_noaffine = function() return nn.LayerNorm(6, 1e-3, false) end,
  gelu = function() return nn.GELU() end,
  relu = function() return nn.ReLU() end,
  tanh = function() return nn.Tanh() end,
  sigmoid = function() return nn.Sigmoid() end,
  softmax = function() return nn.Softmax(2) end,
  logsoftmax = function() return nn.LogSoftmax(-1) end,
}

describe('fa.nn modules match PyTorch', function()
  for _, name in ipairs(keys(MODULES)) do
    for _, dtype in ipairs({ 'float64', 'float32' }) do
      it(name .. ' (' .. dtype .. ')', function() check_module(name, MODULES[name], dtype) end)
    end
  end

  it('Sequential parameter names are PyTorch state_dict names', function()
    local names = keys(MODULES.seq():namedParameters())
    assert.are.same({ '0.bias', '0.weight', '2.bias', '2.weight', '5.bias', '5.weight', '6.bias', '6.weight',
                      '7.bias', '7.weight' }, names)
    assert.are.same(keys(under('seq.sd')), keys(MODULES.seq():stateDict()))
  end)

  for _, name in ipairs({ 'gs_zeros', 'gs_border' }) do
    it('GridSample ' .. name, function()
      local f = under(name)
      local m = name == 'gs_zeros' and nn.GridSample() or nn.GridSample{ padding_mode = 'border', align_corners = true }
      for _, dtype in ipairs({ 'float64', 'float32' }) do
        local rtol, atol = TOL[dtype][1], TOL[dtype][2]
        local inp, grid = f.input:to(dtype), f.grid:to(dtype)
        m:type(dtype)
        H.assert_close(m:forward({ inp, grid }), f.y, rtol, atol, 'output')
        local g = m:backward({ inp, grid }, f.gy:to(dtype))
        H.assert_close(g[1], f.ginput, rtol, atol, 'gradInput')
        H.assert_close(g[2], f.ggrid, rtol, atol * 10, 'gradGrid')
        local opts = name == 'gs_zeros' and {} or { padding_mode = 'border', align_corners = true }
        H.assert_close(fa.grid_sample(inp, grid, opts), f.y, rtol, atol, 'fa.grid_sample')
        H.assert_close(F.grid_sample(inp, grid, 'bilinear', opts.padding_mode, opts.align_corners), f.y, rtol, atol,
                       'F.grid_sample positional')
      end
    end)
  end
end)

describe('criterions match PyTorch', function()
  for _, red in ipairs({ 'mean', 'sum', 'none' }) do
    it('MSECriterion ' .. red, function()
      local f = under('mse_' .. red)
      for _, dtype in ipairs({ 'float64', 'float32' }) do
        local rtol, atol = TOL[dtype][1], TOL[dtype][2]
        local c = nn.MSECriterion(red)
        local x, t = f.x:to(dtype), f.t:to(dtype)
        local loss = c:forward(x, t)
        if red == 'none' then
          H.assert_close(loss, f.loss, rtol, atol, 'loss')
          H.assert_close(c:backward(x, t, f.gl:to(dtype)), f.gx, rtol, atol, 'gradInput')
        else
          assert.is_number(loss)
          assert.is_near(f.loss:item(), loss, atol + rtol * math.abs(loss))
          H.assert_close(c:backward(x, t), f.gx, rtol, atol, 'gradInput')
          H.assert_close(F.mse_loss(x, t, red):view(1), f.loss:view(1), rtol, atol, 'F.mse_loss')
        end
      end
    end)
  end

  local CE = {
    ce_mean = function() return nn.CrossEntropyCriterion{ label_smoothing = 0.1 } end,   -- ignore_index -100
    ce_sum = function() return nn.CrossEntropyCriterion{ ignore_index = 3, reduction = 'sum' } end, -- class 2 (0-based)
    ce_none = function() return nn.CrossEntropyCriterion{ reduction = 'none' } end,
  }
  for _, name in ipairs(keys(CE)) do
    it('CrossEntropyCriterion ' .. name, function()
      local f = under(name)
      -- fixture targets are PyTorch's 0-based classes; fa's are 1-based (-100 stays -100)
      local t1 = f.t:clone()
      local tt = t1:view(-1)
      for i = 1, tt:numel() do
        local v = tt:get(i)
        if v >= 0 then tt:set(i, v + 1) end
      end
      for _, dtype in ipairs({ 'float64', 'float32' }) do
        local rtol, atol = TOL[dtype][1], TOL[dtype][2]
        local c = CE[name]()
        local x = f.x:to(dtype)
        local loss = c:forward(x, t1)
        if name == 'ce_none' then
          H.assert_close(loss, f.loss, rtol, atol, 'loss')
          H.assert_close(c:backward(x, t1, f.gl:to(dtype)), f.gx, rtol, atol, 'gradInput')
        else
          assert.is_near(f.loss:item(), loss, atol + rtol * math.abs(loss))
          H.assert_close(c:backward(x, t1), f.gx, rtol, atol, 'gradInput')
          assert.is_near(f.loss:item(), c(x, t1), atol + rtol * math.abs(loss)) -- c(x, t) = c:forward(x, t)
        end
      end
      if name == 'ce_mean' then
        local l = F.cross_entropy(f.x, t1, { label_smoothing = 0.1 })
        assert.is_near(f.loss:item(), l:item(), 1e-10)
      end
    end)
  end
end)

describe('gradients by float64 finite differences', function()
  local function fd_check(m, x)
    m:double()
    x = x:double()
    local y = m:forward(x)
    local gy = fa.randn(y:size(), 'float64')
    m:zeroGradParameters()
    local gx = m:backward(x, gy):clone()
    local _, grads = m:parameters()
    local analytic = {}
    for i, g in ipairs(grads) do analytic[i] = g:clone() end
    local function f() return m:forward(x) end
    H.assert_close(gx, H.numgrad(f, x, gy), 1e-6, 1e-8, 'gradInput')
    local ps = m:parameters()
    for i, p in ipairs(ps) do
      H.assert_close(analytic[i], H.numgrad(f, p, gy), 1e-6, 1e-8, 'gradient of parameter ' .. i)
    end
  end

  it('a small Sequential (Conv2d, GELU, Flatten, Linear, LayerNorm, Tanh, Linear, Sigmoid)', function()
    fa.manualSeed(7)
    local m = nn.Sequential(
      nn.Conv2d(2, 3, { 2, 3 }, 1, 1, 1, 1), nn.GELU(), nn.Flatten(), nn.Linear(3 * 5 * 2, 5),
      nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3), nn.Sigmoid())
    -- non-default LayerNorm affine parameters so their gradients are exercised
    m:get(5).weight:uniform(0.5, 1.5)
    m:get(5).bias:uniform(-0.5, 0.5)
    fd_check(m, fa.randn(2, 2, 4, 2))
  end)

  it('Softmax, LogSoftmax and ReLU', function()
    fa.manualSeed(8)
    fd_check(nn.Sequential(nn.Linear(4, 5), nn.Softmax(2)), fa.randn(3, 4))
    fd_check(nn.Sequential(nn.Linear(4, 5), nn.LogSoftmax(1)), fa.randn(3, 4))
    fd_check(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)), fa.randn(3, 4))
  end)

  it('the criterions', function()
    fa.manualSeed(9)
    local x = fa.randn(4, 3, 'float64')
    local t = fa.tensor({ 1, 3, 2, 3 }, 'int64')
    local c = nn.CrossEntropyCriterion{ label_smoothing = 0.2 }
    local g = c:backward(x, t):clone()
    local one = fa.ones({}, 'float64')
    H.assert_close(g, H.numgrad(function() return fa.full({}, c:forward(x, t), 'float64') end, x, one), 1e-6, 1e-8,
                   'cross entropy')
    local tgt = fa.randn(4, 3, 'float64')
    local mse = nn.MSECriterion('sum')
    g = mse:backward(x, tgt):clone()
    H.assert_close(g, H.numgrad(function() return fa.full({}, mse:forward(x, tgt), 'float64') end, x, one), 1e-6,
                   1e-8, 'mse')
  end)

  it('backward accumulates parameter gradients; zeroGradParameters clears them', function()
    fa.manualSeed(10)
    local m = nn.Linear(3, 2)
    local x, gy = fa.randn(4, 3), fa.randn(4, 2)
    m:zeroGradParameters()
    m:backward(x, gy)
    local g1 = m.gradWeight:clone()
    m:backward(x, gy)
    H.assert_close(m.gradWeight, g1 * 2, 1e-6, 1e-6, 'accumulated')
    m:backward(x, gy, 0.5)
    H.assert_close(m.gradWeight, g1 * 2.5, 1e-6, 1e-6, 'accumulated with scale')
    m:zeroGradParameters()
    assert.are.equal(0, m.gradWeight:abs():sum())
    assert.are.equal(0, m.gradBias:abs():sum())
  end)
end)

describe('Module API', function()
  it('getParameters: one storage, idempotent, and the modules still train through it', function()
    fa.manualSeed(1)
    local m = MODULES.seq()
    local x = fa.randn(2, 3, 9, 11)
    local y0 = m:forward(x):clone()
    local p, g = m:getParameters()
    assert.are.equal(753, p:numel())
    assert.are.equal(p:numel(), g:numel())
    H.assert_close(m:forward(x), y0, 0, 0, 'output unchanged by flattening')
    local p2, g2 = m:getParameters()
    assert.is_true(p2.storage == p.storage and g2.storage == g.storage)
    assert.are.equal(p:numel(), p2:numel())
    -- module tensors are views of the flat storage
    local lin = m:get(6)
    p:uniform(-0.3, 0.3)
    local o5w = 108 + 4 + 72 + 4 -- 5.weight comes after 0.weight, 0.bias, 2.weight, 2.bias
    assert.are.equal(p:get(o5w + 2 * 48 + 7), lin.weight:get(3, 7))
    lin.bias:fill(-1)
    assert.are.equal(-1, p:get(o5w + 480 + 1))
    -- gradients land in the flat gradient tensor
    g:zero()
    m:forward(x)
    m:backward(x, fa.ones(2, 5))
    H.assert_close(g:narrow(1, 1, 108):view(4, 3, 3, 3), m:get(1).gradWeight, 0, 0, 'flat grad view')
    assert.is_true(g:abs():sum() > 0)
    -- a step on the flat tensor moves the module's weights
    local before = lin.weight:clone()
    fa.optim.sgd(function() return 0, g end, p, { learningRate = 0.1 })
    assert.is_false(lin.weight:equal(before))
  end)

  it('stateDict round-trips through fa.save / fa.load', function()
    fa.manualSeed(2)
    local a, b = MODULES.seq(), MODULES.seq()
    local path = os.tmpname()
    fa.save(path, a:stateDict())
    b:loadStateDict(fa.load(path))
    os.remove(path)
    local x = fa.randn(2, 3, 9, 11)
    H.assert_close(b:forward(x), a:forward(x), 0, 0, 'same output after loading')
    for k, v in pairs(a:stateDict()) do assert.is_true(b:stateDict()[k]:equal(v), k) end
  end)

  it('loadStateDict checks everything before copying', function()
    local m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    local before = m:get(1).weight:clone()
    local sd = {}
    for k, v in pairs(m:stateDict()) do sd[k] = fa.zeros_like(v) end
    sd['2.weight'] = fa.zeros(2, 4)
    local ok, err = pcall(m.loadStateDict, m, sd)
    assert.is_false(ok)
    assert.truthy(err:find("^spec/nn_spec.lua:%d+: fa.nn.Sequential:loadStateDict: argument 'dict': expected a tensor of size 2x3 under '2.weight', got a float32 tensor of size 2x4$"), err)
    assert.is_true(m:get(1).weight:equal(before)) -- nothing written
    sd['2.weight'] = nil
    ok, err = pcall(m.loadStateDict, m, sd)
    assert.truthy(err:find('missing: 2.weight', 1, true), err)
    sd['2.weight'], sd['extra'] = fa.zeros(2, 3), fa.zeros(1)
    ok, err = pcall(m.loadStateDict, m, sd)
    assert.truthy(err:find('unexpected: extra', 1, true), err)
    local missing, unexpected = m:loadStateDict(sd, false)
    assert.are.same({}, missing)
    assert.are.same({ 'extra' }, unexpected)
    assert.are.equal(0, m:get(1).weight:abs():sum())
  end)

  it('clone is independent; clone(names) shares them', function()
    local m = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
    local c = m:clone()
    c:get(1).weight:fill(5)
    assert.is_false(m:get(1).weight:equal(c:get(1).weight))
    local x = fa.randn(2, 3)
    c:get(1):loadStateDict(m:get(1):stateDict())
    H.assert_close(c:forward(x), m:forward(x), 0, 0, 'clone computes the same')
    assert.are_not.equal(m:get(1).output, c:get(1).output)
    local s = m:clone('weight', 'bias')
    s:get(1).weight:fill(3)
    assert.are.equal(3, m:get(1).weight:get(1, 1))
  end)

  it('type conversion moves parameters, gradients and buffers', function()
    local m = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    m:forward(fa.randn(4, 3))
    m:double()
    assert.are.equal('fa.DoubleTensor', m:type())
    assert.are.equal('float64', m:get(1).gradWeight:dtype())
    assert.are.equal('float64', m:get(2).gradBias:dtype())
    assert.are.equal('float64', m:get(1).output:dtype())
    assert.are.equal('float64', m:forward(fa.randn(4, 3, 'float64')):dtype())
    m:float()
    assert.are.equal('fa.FloatTensor', m:type())
    m:type('torch.DoubleTensor')
    assert.are.equal('float64', m:get(1).weight:dtype())
  end)

  it("initialises parameters as PyTorch's defaults", function()
    fa.manualSeed(11)
    local function check_uniform(t, bound, what)
      local v = t:view(-1):table()
      local mx, s2 = 0, 0
      for _, x in ipairs(v) do
        mx = math.max(mx, math.abs(x))
        s2 = s2 + x * x
      end
      assert(mx <= bound, what .. ': |value| ' .. mx .. ' above the bound ' .. bound)
      assert(mx > 0.9 * bound, what .. ': values do not fill U(-bound, bound)')
      local std = math.sqrt(s2 / #v)
      assert.is_near(bound / math.sqrt(3), std, 0.1 * bound / math.sqrt(3)) -- U(-b, b) has std b/sqrt(3)
    end
    local lin = nn.Linear(50, 40)
    check_uniform(lin.weight, 1 / math.sqrt(50), 'Linear weight')
    check_uniform(nn.Linear(3, 400).bias, 1 / math.sqrt(3), 'Linear bias')
    local conv = nn.Conv2d(4, 60, 3, 1, 0, 1, 2)
    check_uniform(conv.weight, 1 / math.sqrt(2 * 9), 'Conv2d weight (fan_in = in/groups * kh * kw)')
    check_uniform(conv.bias, 1 / math.sqrt(2 * 9), 'Conv2d bias')
    local ln = nn.LayerNorm({ 2, 3 })
    assert.are.same({ { 1, 1, 1 }, { 1, 1, 1 } }, ln.weight:table())
    assert.are.same({ { 0, 0, 0 }, { 0, 0, 0 } }, ln.bias:table())
    assert.is_nil(nn.LayerNorm(4, 1e-5, false).weight)
    assert.is_nil(nn.Linear(3, 2, false).bias)
    -- the same seed gives the same model
    fa.manualSeed(12)
    local a = nn.Linear(5, 3)
    fa.manualSeed(12)
    assert.is_true(nn.Linear(5, 3).weight:equal(a.weight))
  end)

  it('reuses its output and gradInput buffers across calls', function()
    local m = nn.Sequential(nn.Linear(5, 4), nn.GELU(), nn.LayerNorm(4))
    local x, gy = fa.randn(3, 5), fa.randn(3, 4)
    local y1 = m:forward(x)
    local p1 = tostring(y1.desc.data)
    local g1 = m:backward(x, gy)
    local q1 = tostring(g1.desc.data)
    local y2 = m:forward(x)
    local g2 = m:backward(x, gy)
    assert.are.equal(p1, tostring(y2.desc.data))
    assert.are.equal(q1, tostring(g2.desc.data))
    assert.is_true(rawequal(y1, y2))
  end)

  it('m(x) is m:forward(x), and modules print as Torch7 does', function()
    local m = nn.Linear(4, 3)
    local x = fa.randn(2, 4)
    H.assert_close(m(x):clone(), m:forward(x), 0, 0, 'call')
    assert.are.equal('nn.Linear(4 -> 3)', tostring(m))
    local s = tostring(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    assert.truthy(s:find('(1): nn.Linear(4 -> 3)', 1, true), s)
    assert.truthy(s:find('(2): nn.ReLU', 1, true), s)
  end)

  it('accepts non-contiguous inputs', function()
    fa.manualSeed(3)
    local m = nn.Linear(4, 3)
    local xt = fa.randn(4, 5):t()
    local y = m:forward(xt):clone()
    H.assert_close(y, m:forward(xt:contiguous()), 1e-6, 1e-6, 'Linear on a transposed input')
    local ln = nn.LayerNorm(5)
    local z = fa.randn(5, 3):t()
    H.assert_close(ln:forward(z):clone(), ln:forward(z:contiguous()), 1e-6, 1e-6, 'LayerNorm on a transposed input')
  end)

  it('the functional API matches the modules', function()
    fa.manualSeed(4)
    local x = fa.randn(2, 3, 6, 5)
    local conv = nn.Conv2d(3, 4, 3, 1, 1)
    H.assert_close(F.conv2d(x, conv.weight, conv.bias, 1, 1), conv:forward(x), 1e-6, 1e-6, 'conv2d')
    H.assert_close(F.conv2d(x, conv.weight, conv.bias, { padding = 1 }), conv:forward(x), 1e-6, 1e-6, 'conv2d opts')
    local lin = nn.Linear(5, 2)
    H.assert_close(F.linear(x, lin.weight, lin.bias), lin:forward(x), 1e-6, 1e-6, 'linear')
    local ln = nn.LayerNorm(5)
    H.assert_close((F.layer_norm(x, 5, ln.weight, ln.bias)), ln:forward(x), 1e-6, 1e-6, 'layer_norm')
    H.assert_close(F.softmax(x, 2), nn.Softmax(2):forward(x), 1e-6, 1e-6, 'softmax')
    H.assert_close(F.log_softmax(x), nn.LogSoftmax():forward(x), 1e-6, 1e-6, 'log_softmax')
    for _, a in ipairs({ 'gelu', 'relu', 'tanh', 'sigmoid' }) do
      H.assert_close(F[a](x), x[a](x), 1e-6, 1e-6, a)
    end
  end)
end)

describe('Dropout', function()
  it('drops about p, scales the rest by 1/(1-p), and backward uses the same mask', function()
    fa.manualSeed(5)
    local d = nn.Dropout(0.3)
    local x = fa.ones(100, 100)
    local y = d:forward(x)
    local t = y:view(-1):table()
    local nz = 0
    for _, v in ipairs(t) do
      if v ~= 0 then
        nz = nz + 1
        assert.is_near(1 / 0.7, v, 1e-6)
      end
    end
    assert.is_near(0.7, nz / 10000, 0.03)
    local gy = fa.randn(100, 100)
    local gx = d:backward(x, gy)
    H.assert_close(gx, y * gy, 1e-6, 1e-6, 'gradInput = mask/(1-p) * gradOutput')
    -- reproducible from the seed
    fa.manualSeed(5)
    local y2 = nn.Dropout(0.3):forward(x)
    assert.is_true(y2:equal(y))
  end)

  it('F.dropout returns the output and its mask', function()
    fa.manualSeed(6)
    local x = fa.randn(50, 40)
    local y, mask = F.dropout(x, 0.4)
    assert.are.equal('bool', mask:dtype())
    H.assert_close(y, x * mask:float() / 0.6, 1e-6, 1e-6, 'x * mask / (1 - p)')
    local kept = mask:float():sum() / 2000
    assert.is_near(0.6, kept, 0.05)
    assert.are.equal(x, (F.dropout(x, 0.4, false)))
    assert.are.equal(0, F.dropout(x, 1):abs():sum())
  end)

  it('is the identity in evaluate() mode (and for p = 0)', function()
    local m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    local x = fa.randn(8, 4)
    m:evaluate()
    assert.is_false(m:get(2).train)
    local y1 = m:forward(x):clone()
    local y2 = m:forward(x):clone()
    assert.is_true(y1:equal(y2))
    H.assert_close(y1, m:get(1):forward(x), 0, 0, 'dropout off')
    local gy = fa.randn(8, 4)
    assert.is_true(m:get(2):backward(m:get(1).output, gy):equal(gy))
    m:training()
    assert.is_true(m:get(2).train)
    assert.is_false(m:forward(x):equal(y1))
    assert.is_true(nn.Dropout(0):forward(x):equal(x))
  end)
end)

describe('error messages', function()
  local err_of, has = H.err_of, H.has

  it('Linear names itself and the sizes', function()
    local m = nn.Linear(4, 3)
    has(err_of(m.forward, m, fa.randn(2, 5)), "fa.nn.Linear:forward: argument 'input': expected a tensor of size (..., 4), got a float32 tensor of size 2x5")
  end)

  it('Sequential names the failing child', function()
    local m = nn.Sequential(nn.Linear(5, 4), nn.Linear(3, 2))
    local e = err_of(m.forward, m, fa.randn(2, 5))
    has(e, "fa.nn.Sequential:forward: module 2 (fa.nn.Linear): argument 'input': expected a tensor of size (..., 3), got a float32 tensor of size 2x4")
    -- nested
    local outer = nn.Sequential(nn.Identity(), m)
    has(err_of(outer.forward, outer, fa.randn(2, 5)), 'fa.nn.Sequential:forward: module 2 (fa.nn.Sequential): module 2 (fa.nn.Linear): argument')
  end)

  it('Conv2d, LayerNorm, Softmax, criterions and F name what is wrong', function()
    local conv = nn.Conv2d(3, 4, 3)
    has(err_of(conv.forward, conv, fa.randn(1, 2, 5, 5)), "fa.nn.Conv2d:forward: argument 'input': expected a tensor of size (N, 3, H, W), got a float32 tensor of size 1x2x5x5")
    has(err_of(conv.forward, conv, fa.randn(1, 3, 2, 2)), "argument 'input': expected a tensor of size (N, C, H, W) with H + 2*padding >= 3 and W + 2*padding >= 3 (the dilated kernel 3x3, padding 0x0), got a float32 tensor of size 1x3x2x2")
    local ln = nn.LayerNorm({ 3, 4 })
    has(err_of(ln.forward, ln, fa.randn(2, 4, 3)), "fa.nn.LayerNorm:forward: argument 'input': expected a tensor of size (..., 3, 4) (normalized_shape), got a float32 tensor of size 2x4x3")
    local sm = nn.Softmax(3)
    has(err_of(sm.forward, sm, fa.randn(2, 4)), "fa.nn.Softmax:forward: argument 'dim'", 'got 3')
    local ce = nn.CrossEntropyCriterion()
    has(err_of(ce.forward, ce, fa.randn(4, 3), fa.tensor({ 1, 2, 3 }, 'int64')), "argument 'target'", 'expected a tensor of size 4', 'int64 tensor of size 3')
    has(err_of(ce.forward, ce, fa.randn(4, 3), fa.tensor({ 1, 2, 3, 1 })), 'expected an int64 tensor of class indices')
    local mse = nn.MSECriterion()
    has(err_of(mse.forward, mse, fa.randn(4, 3), fa.randn(3, 4)), "argument 'target'", 'expected a tensor of size 4x3', 'got a float32 tensor of size 3x4')
    has(err_of(F.linear, fa.randn(2, 3), fa.randn(4, 5)), "fa.F.linear: argument 'input': expected a tensor of size (..., 5), got a float32 tensor of size 2x3")
    has(err_of(F.conv2d, fa.randn(2, 3, 5, 5), fa.randn(4, 3, 3)), "fa.F.conv2d: argument 'weight': expected a 4-D")
    has(err_of(F.grid_sample, fa.randn(1, 2, 3, 3), fa.randn(1, 2, 2, 3)), "fa.F.grid_sample: argument 'grid'", 'got a float32 tensor of size 1x2x2x3')
    has(err_of(F.grid_sample, fa.randn(1, 2, 3, 3), fa.randn(1, 2, 2, 2), { padding_mode = 'reflection' }), "'padding_mode'")
    has(err_of(nn.Dropout, 1.5), "fa.nn.Dropout: argument 'p'")
    has(err_of(nn.Conv2d, 3, 4, 3, 1, 0, 1, 2), "argument 'groups': expected a divisor of in_channels 3 and out_channels 4, got 2")
  end)

  it('the C layer errors come through with the Lua names', function()
    local m = nn.Linear(3, 2)
    m:forward(fa.randn(2, 3))
    local e = err_of(m.backward, m, fa.randn(2, 3), fa.randn(2, 5))
    has(e, "fa.nn.Linear:backward: argument 'gradOutput'")
  end)
end)

require('helpers.op').describe_gpu('fa.nn on the GPU', function()
  local tol = { 2e-4, 2e-5 }

  it('modules match PyTorch on cuda (float32), through :cuda()', function()
    for _, name in ipairs(keys(MODULES)) do
      local f = under(name)
      local m = MODULES[name]()
      local sd = under('sd', f)
      if next(sd) then m:loadStateDict(sd) end
      m:cuda()
      local x, gy = f.x:float():cuda(), f.gy:float():cuda()
      local y = m:forward(x)
      assert.are.equal('cuda:0', y:device())
      H.assert_close(y, f.y, tol[1], tol[2], name .. ' output')
      H.assert_close(m:backward(x, gy), f.gx, tol[1], tol[2], name .. ' gradInput')
      local ps, gs = m:parameters()
      local gradOf = {}
      for i, p in ipairs(ps) do gradOf[p] = gs[i] end
      for pname, p in pairs(m:namedParameters()) do
        assert.are.equal('cuda:0', p:device())
        H.assert_close(gradOf[p], f['grad.' .. pname], tol[1], tol[2], name .. ' grad ' .. pname)
      end
    end
  end)

  it('GridSample, criterions and Dropout on cuda', function()
    local f = under('gs_border')
    local m = nn.GridSample{ padding_mode = 'border', align_corners = true }
    local inp, grid = f.input:float():cuda(), f.grid:float():cuda()
    H.assert_close(m:forward({ inp, grid }), f.y, tol[1], tol[2], 'grid_sample output')
    local g = m:backward({ inp, grid }, f.gy:float():cuda())
    H.assert_close(g[1], f.ginput, tol[1], tol[2], 'gradInput')
    H.assert_close(g[2], f.ggrid, tol[1], tol[2] * 10, 'gradGrid')
    f = under('ce_sum')
    local t1 = f.t:clone():add(1)
    local c = nn.CrossEntropyCriterion{ ignore_index = 3, reduction = 'sum' }
    local x = f.x:float():cuda()
    assert.is_near(f.loss:item(), c:forward(x, t1:cuda()), 1e-4 * math.abs(f.loss:item()))
    H.assert_close(c:backward(x, t1:cuda()), f.gx, tol[1], tol[2], 'cross entropy gradInput')
    local d = nn.Dropout(0.25):cuda()
    local ones = fa.ones(64, 64):cuda()
    local y = d:forward(ones):cpu()
    local kept = 0
    for _, v in ipairs(y:view(-1):table()) do if v ~= 0 then kept = kept + 1 end end
    assert.is_near(0.75, kept / 4096, 0.04)
    d:evaluate()
    assert.is_true(d:forward(ones):equal(ones))
  end)

  it('getParameters on cuda; the example trains on cuda', function()
    local ex = H.load_example('examples/train_convnet.lua')
    math.randomseed(5)
    fa.manualSeed(5)
    local model = ex.makeModel()
    local tx, ty = ex.makeBatch(200)
    local losses = ex.train(model, { steps = 120, batch = 48, lr = 3e-3, every = 0, clip = 1.0, device = 'cuda' })
    local p = model:getParameters()
    assert.are.equal('cuda:0', p:device())
    local a, b = 0, 0
    for i = 1, 10 do a, b = a + losses[i], b + losses[#losses - 10 + i] end
    assert(b < 0.7 * a, string.format('loss did not fall on cuda: %.4f -> %.4f', a / 10, b / 10))
    assert.is_true(ex.accuracy(model, tx, ty, 'cuda') > 0.5)
  end)
end)

describe('fa.F buffer convention', function()
  local same = function(a, b) assert.are.equal(0, fa.maxAbsDiff(a, b)) end
  local function garbage(t) return fa.full(t:size(), 7.5, { dtype = t:dtype() }) end

  it('forwards write into opts.out and return it, bit-identical to the allocating call', function()
    fa.manualSeed(3)
    local x, w, b = fa.randn(2, 3, 4):double(), fa.randn(5, 4):double(), fa.randn(5):double()
    local y = F.linear(x, w, b)
    local out = garbage(y)
    assert.are.equal(out, F.linear(x, w, b, { out = out }))
    same(out, y)
    -- y = x W^T + b, computed another way
    H.assert_close(y:view(6, 5), x:view(6, 4):matmul(w:t()):add(b:view(1, 5):expand(6, 5)), 1e-12, 1e-12)

    local xi, wc = fa.randn(2, 3, 6, 6), fa.randn(4, 3, 3, 3)
    local c = F.conv2d(xi, wc, nil, { padding = 1 })
    local co = garbage(c)
    assert.are.equal(co, F.conv2d(xi, wc, nil, { padding = 1, out = co }))
    same(co, c)
    local co2 = garbage(c)
    F.conv2d(xi, wc, nil, 1, 1, 1, 1, { out = co2 })
    same(co2, c)

    local lo, lm, lr = F.layer_norm(xi, { 6, 6 })
    local o, m, r = garbage(lo), garbage(lm), garbage(lr)
    local o2, m2, r2 = F.layer_norm(xi, { 6, 6 }, nil, nil, 1e-5, { out = o, mean = m, rstd = r })
    assert.are.equal(o, o2); assert.are.equal(m, m2); assert.are.equal(r, r2)
    same(o, lo); same(m, lm); same(r, lr)

    for _, name in ipairs({ 'softmax', 'log_softmax' }) do
      local s = F[name](xi, 2)
      local so = garbage(s)
      assert.are.equal(so, F[name](xi, 2, { out = so }))
      same(so, s)
    end
    for _, name in ipairs({ 'gelu', 'relu', 'tanh', 'sigmoid' }) do
      local s = F[name](xi)
      local so = garbage(s)
      assert.are.equal(so, F[name](xi, { out = so }))
      same(so, s)
    end

    local grid = fa.rand(2, 5, 5, 2):mul(2):add(-1)
    local g = F.grid_sample(xi, grid, { padding_mode = 'border' })
    local go = garbage(g)
    assert.are.equal(go, F.grid_sample(xi, grid, { padding_mode = 'border', out = go }))
    same(go, g)

    local t = fa.randn(2, 3, 6, 6)
    local l = F.mse_loss(xi, t, 'sum')
    local lo1 = fa.empty({})
    assert.are.equal(lo1, F.mse_loss(xi, t, { reduction = 'sum', out = lo1 }))
    same(lo1, l)

    local logits, target = fa.randn(4, 3), fa.tensor({ 1, 3, 2, 3 }, 'int64')
    local ce = F.cross_entropy(logits, target, { reduction = 'none' })
    local ceo = garbage(ce)
    assert.are.equal(ceo, F.cross_entropy(logits, target, { reduction = 'none', out = ceo }))
    same(ceo, ce)

    fa.manualSeed(9)
    local d, mask = F.dropout(xi, 0.3)
    fa.manualSeed(9)
    local dout, mout = garbage(d), fa.empty(xi:size(), 'bool')
    local d2, m2b = F.dropout(xi, 0.3, true, { out = dout, mask = mout })
    assert.are.equal(dout, d2); assert.are.equal(mout, m2b)
    same(dout, d); same(mout, mask)
    -- not training: the output is the input (copied into out when given)
    assert.are.equal(xi, (F.dropout(xi, 0.3, false)))
    local ev = garbage(xi)
    same(F.dropout(xi, 0.3, false, { out = ev }), xi)
  end)

  it('backwards: a given input gradient is overwritten, a given parameter gradient accumulated, false skips', function()
    fa.manualSeed(4)
    local x, w, go = fa.randn(3, 4):double(), fa.randn(5, 4):double(), fa.randn(3, 5):double()
    local gi, gw, gb = F.linear_backward(go, x, w)
    -- independent: grad_input = go W, grad_weight = go^T x, grad_bias = column sums of go
    H.assert_close(gi, go:matmul(w), 1e-12, 1e-12)
    H.assert_close(gw, go:t():matmul(x), 1e-12, 1e-12)
    H.assert_close(gb, go:sum(1):view(5), 1e-12, 1e-12)
    local gi2, gw2, gb2 = garbage(gi), fa.ones(5, 4):double(), fa.ones(5):double()
    local a, b, c = F.linear_backward(go, x, w, { grad_input = gi2, grad_weight = gw2, grad_bias = gb2 })
    assert.are.equal(gi2, a); assert.are.equal(gw2, b); assert.are.equal(gb2, c)
    same(gi2, gi)
    H.assert_close(gw2, gw:add(1), 1e-12, 1e-12)
    H.assert_close(gb2, gb:add(1), 1e-12, 1e-12)
    local n1, n2, n3 = F.linear_backward(go, x, w, { grad_input = false, grad_bias = false })
    assert.is_nil(n1); assert.is_nil(n3)
    H.assert_close(n2, go:t():matmul(x), 1e-12, 1e-12)

    -- conv2d: the same rules
    local xi, wc = fa.randn(2, 3, 6, 6):double(), fa.randn(4, 3, 3, 3):double()
    local gco = fa.randn(2, 4, 6, 6):double()
    local ci, cw, cb = F.conv2d_backward(gco, xi, wc, { padding = 1 })
    local ci2, cw2 = garbage(ci), fa.ones(4, 3, 3, 3):double()
    local r1, r2, r3 = F.conv2d_backward(gco, xi, wc, { padding = 1, grad_input = ci2, grad_weight = cw2, grad_bias = false })
    assert.are.equal(ci2, r1); assert.are.equal(cw2, r2); assert.is_nil(r3)
    same(ci2, ci); H.assert_close(cw2, cw:add(1), 1e-12, 1e-12)
    H.assert_close(cb, gco:sum(4):sum(3):sum(1):view(4), 1e-12, 1e-12)

    -- layer_norm, softmax, activations, dropout, grid_sample, losses: given == allocated
    local lw, lb = fa.randn(6):double(), fa.randn(6):double()
    local y, mean, rstd = F.layer_norm(xi, 6, lw, lb)
    local lgo = fa.randn(xi:size()):double()
    local li, lgw, lgb = F.layer_norm_backward(lgo, xi, mean, rstd, lw, 6)
    local li2, lgw2 = garbage(li), fa.ones(6):double()
    F.layer_norm_backward(lgo, xi, mean, rstd, lw, 6, { grad_input = li2, grad_weight = lgw2, grad_bias = false })
    same(li2, li); H.assert_close(lgw2, lgw:add(1), 1e-12, 1e-12)
    H.assert_close(lgb, lgo:sum(3):sum(2):sum(1):view(6), 1e-12, 1e-12)

    local s = F.softmax(xi, 3)
    local sg = F.softmax_backward(lgo, s, 3)
    local sg2 = garbage(sg)
    assert.are.equal(sg2, F.softmax_backward(lgo, s, 3, { grad_input = sg2 }))
    same(sg2, sg)
    -- softmax backward: s * (g - sum(g * s))
    local dot = lgo:mul(s):sum(3, true)
    H.assert_close(sg, s:mul(lgo:sub(dot:expand(xi:size()))), 1e-12, 1e-12)
    local ls = F.log_softmax(xi, 3)
    local lsg = F.log_softmax_backward(lgo, ls, 3)
    H.assert_close(lsg, lgo:sub(ls:exp():mul(lgo:sum(3, true):expand(xi:size()))), 1e-12, 1e-12)

    local t = F.tanh(xi)
    local tg = F.tanh_backward(lgo, xi, { output = t })
    H.assert_close(tg, lgo:mul(t:mul(t):mul(-1):add(1)), 1e-12, 1e-12)
    same(F.tanh_backward(lgo, xi), tg)
    local tg2 = garbage(tg)
    assert.are.equal(tg2, F.tanh_backward(lgo, xi, { grad_input = tg2 }))
    same(tg2, tg)

    local d, mask = F.dropout(xi, 0.25)
    local dg = F.dropout_backward(lgo, mask, 0.25)
    H.assert_close(dg, lgo:mul(mask:double()):mul(1 / 0.75), 1e-12, 1e-12)

    local grid = fa.rand(2, 4, 4, 2):double():mul(2):add(-1)
    local ggo = fa.randn(2, 3, 4, 4):double()
    local gi1, gg1 = F.grid_sample_backward(ggo, xi, grid)
    local gi3, gg3 = garbage(gi1), garbage(gg1)
    local q1, q2 = F.grid_sample_backward(ggo, xi, grid, { grad_input = gi3, grad_grid = gg3 })
    assert.are.equal(gi3, q1); assert.are.equal(gg3, q2)
    same(gi3, gi1); same(gg3, gg1)
    local z1, z2 = F.grid_sample_backward(ggo, xi, grid, { grad_input = false })
    assert.is_nil(z1); same(z2, gg1)

    local tgt = fa.randn(xi:size()):double()
    -- mse 'sum': 2 (x - t) * gradLoss
    H.assert_close(F.mse_loss_backward(3, xi, tgt, 'sum'), xi:sub(tgt):mul(6), 1e-12, 1e-12)
    local mg = garbage(xi)
    assert.are.equal(mg, F.mse_loss_backward(nil, xi, tgt, { reduction = 'sum', grad_input = mg }))
    H.assert_close(mg, xi:sub(tgt):mul(2), 1e-12, 1e-12)

    local logits, target = fa.randn(4, 3):double(), fa.tensor({ 1, 3, 2, 3 }, 'int64')
    local cg = F.cross_entropy_backward(nil, logits, target, { reduction = 'sum' })
    -- softmax(logits) - onehot(target)
    local oh = fa.zeros(4, 3):double()
    for i, c in ipairs({ 1, 3, 2, 3 }) do oh[i][c] = 1 end
    H.assert_close(cg, F.softmax(logits, 2):sub(oh), 1e-12, 1e-12)
    local cg2 = garbage(cg)
    assert.are.equal(cg2, F.cross_entropy_backward(1, logits, target, { reduction = 'sum', grad_input = cg2 }))
    same(cg2, cg)
  end)
end)

-- every row: a call made on this file's line, and the whole message it must raise (a Lua pattern,
-- anchored at this file, so the error is reported at the caller's line and not inside the library)
describe('messages name the function and argument, at the caller line', function()
  local function err(f)
    local ok, e = pcall(f)
    assert.is_false(ok, 'expected an error')
    return tostring(e)
  end
  local function q(s) return (s:gsub('[%^%$%(%)%%%.%[%]%*%+%-%?]', '%%%0')) end
  local AT = '^spec/nn_spec%.lua:%d+: '

  local x = fa.randn(2, 3)
  local rows = {
    { function() local m = nn.Linear(3, 2); m:forward(x); m:backward(x) end,
      "fa.nn.Linear:backward: argument 'gradOutput': expected a tensor, got nil" },
    { function() nn.Dropout(0 / 0) end, "fa.nn.Dropout: argument 'p': expected a probability in [0, 1], got nan" },
    { function() nn.Dropout(1.5) end, "fa.nn.Dropout: argument 'p': expected a probability in [0, 1], got 1.5" },
    { function() nn.Dropout('x') end, 'fa.nn.Dropout: argument \'p\': expected a probability in [0, 1], got "x"' },
    { function() nn.Linear(0.5, 3) end, "fa.nn.Linear: argument 'inputSize': expected an integer >= 1, got 0.5" },
    { function() nn.Linear('a', 3) end, 'fa.nn.Linear: argument \'inputSize\': expected an integer >= 1, got "a"' },
    { function() nn.Linear(3, 0) end, "fa.nn.Linear: argument 'outputSize': expected an integer >= 1, got 0" },
    { function() nn.Linear(3, 2, 'no') end, 'fa.nn.Linear: argument \'bias\': expected true or false, got "no"' },
    { function() nn.Linear { in_features = 3, out_features = 2, biass = false } end,
      'fa.nn.Linear: argument \'opts\': unknown option "biass" (known: bias, in_features, out_features)' },
    { function() nn.Linear(3, 2):forward(x:double()) end,
      "fa.nn.Linear:forward: argument 'input': expected a float32 tensor (the module's dtype), got a float64 tensor of size 2x3" },
    { function() nn.Linear(3, 2):double():forward(x) end,
      "fa.nn.Linear:forward: argument 'input': expected a float64 tensor (the module's dtype), got a float32 tensor of size 2x3" },
    { function() nn.Linear(3, 2):forward(fa.randn(3)) end, nil }, -- 1-D input of the right size: fine
    { function() nn.Linear(3, 2):forward(fa.randn(2, 4)) end,
      "fa.nn.Linear:forward: argument 'input': expected a tensor of size (..., 3), got a float32 tensor of size 2x4" },
    { function() nn.Linear(3, 2):forward({ x }) end, "fa.nn.Linear:forward: argument 'input': expected a tensor, got a table" },
    { function() nn.Linear(3, 2)() end, "fa.nn.Linear:forward: argument 'input': expected a tensor, got nil" },
    { function() local m = nn.Linear(3, 2); m:forward(x); m:backward(x, fa.randn(2, 3)) end,
      "fa.nn.Linear:backward: argument 'gradOutput': expected a float32 tensor of size 2x2 (the output's), got a float32 tensor of size 2x3" },
    { function() local m = nn.Linear(3, 2); m:forward(x); m:backward(x, fa.randn(2, 2), 'x') end,
      'fa.nn.Linear:backward: argument \'scale\': expected a number, got "x"' },
    { function() nn.Conv2d(3, 4, 3):forward(fa.randn(3, 5, 5)) end,
      "fa.nn.Conv2d:forward: argument 'input': expected a tensor of size (N, 3, H, W), got a float32 tensor of size 3x5x5" },
    { function() nn.Conv2d(3, 4, 3):forward(fa.randn(1, 3, 5, 5):double()) end,
      "fa.nn.Conv2d:forward: argument 'input': expected a float32 tensor (the module's dtype), got a float64 tensor of size 1x3x5x5" },
    { function() nn.Conv2d(3, 4, 2.5) end, "fa.nn.Conv2d: argument 'kernel_size': expected a positive integer or {h, w}, got 2.5" },
    { function() nn.Conv2d(3, 4, 3, 0) end, "fa.nn.Conv2d: argument 'stride': expected an integer >= 1 or {h, w}, got 0" },
    { function() nn.Conv2d(3, 4, 3, 1, 1.5) end, "fa.nn.Conv2d: argument 'padding': expected an integer >= 0 or {h, w}, got 1.5" },
    { function() nn.LayerNorm(3):forward(x:double()) end,
      "fa.nn.LayerNorm:forward: argument 'input': expected a float32 tensor (the module's dtype), got a float64 tensor of size 2x3" },
    { function() nn.LayerNorm(4):forward(x) end,
      "fa.nn.LayerNorm:forward: argument 'input': expected a tensor of size (..., 4) (normalized_shape), got a float32 tensor of size 2x3" },
    { function() nn.LayerNorm(2.5) end, "fa.nn.LayerNorm: argument 'normalized_shape[1]': expected an integer >= 1, got 2.5" },
    { function() nn.LayerNorm(3, 'x') end, 'fa.nn.LayerNorm: argument \'eps\': expected a number, got "x"' },
    { function() nn.Softmax(3):forward(x) end,
      "fa.nn.Softmax:forward: argument 'dim': expected a dimension in 1..2 (or -2..-1), got 3" },
    { function() nn.Softmax(1.5) end, "fa.nn.Softmax: argument 'dim': expected a dimension (1-based, or negative from the end), got 1.5" },
    { function() nn.Softmax():forward(fa.tensor({ 1, 2 }, 'int64')) end,
      "fa.nn.Softmax:forward: argument 'input': expected float32 or float64 on the CPU, got int64" },
    { function() nn.GELU { approximate = 'tanh' } end, 'fa.nn.GELU: argument \'approximate\': expected \'none\', got "tanh"' },
    { function() nn.Tanh():forward('x') end, 'fa.nn.Tanh:forward: argument \'input\': expected a tensor, got "x"' },
    { function() nn.Dropout(0.5):forward(3) end, "fa.nn.Dropout:forward: argument 'input': expected a tensor, got 3" },
    { function() nn.GridSample():forward(fa.randn(1, 2, 3, 3)) end,
      "fa.nn.GridSample:forward: argument 'input': expected a table {input, grid}, got a float32 tensor of size 1x2x3x3" },
    { function() nn.GridSample():forward({ fa.randn(1, 2, 3, 3), fa.randn(1, 2, 2, 3) }) end,
      "fa.nn.GridSample:forward: argument 'grid': expected a tensor of size (1, Ho, Wo, 2), got a float32 tensor of size 1x2x2x3" },
    { function() nn.GridSample { padding_mode = 'reflection' } end,
      'fa.nn.GridSample: argument \'padding_mode\': expected \'zeros\' or \'border\', got "reflection"' },
    { function() nn.MSECriterion():forward(x, x:double()) end,
      "fa.nn.MSECriterion:forward: argument 'target': expected a float32 tensor (as 'input'), got a float64 tensor of size 2x3" },
    { function() nn.MSECriterion('avg') end, 'fa.nn.MSECriterion: argument \'reduction\': expected \'none\', \'mean\' or \'sum\', got "avg"' },
    { function() nn.View(4):forward(x) end,
      "fa.nn.View:forward: argument 'input': expected a tensor of 4 elements (to view as 4), got a float32 tensor of size 2x3" },
    { function() nn.View(2.5) end, "fa.nn.View: argument 'size[1]': expected an integer >= -1, got 2.5" },
    { function() nn.View() end, 'fa.nn.View: expected sizes, got none' },
    { function() nn.View(nil, 3) end, "fa.nn.View: argument 'size[1]': expected an integer >= -1, got nil" },
    { function() local m = nn.View(6); m:forward(x); m:backward(x, fa.randn(5)) end,
      "fa.nn.View:backward: argument 'gradOutput': expected a tensor of 6 elements (the input's), got a float32 tensor of size 5" },
    { function() local m = nn.Flatten(); m:forward(x); m:backward(x) end,
      "fa.nn.Flatten:backward: argument 'gradOutput': expected a tensor, got nil" },
    { function() nn.Conv2d(3, 4, 1 / 0) end, "fa.nn.Conv2d: argument 'kernel_size': expected a positive integer or {h, w}, got inf" },
    { function() nn.Conv2d(3, 4, 3, 2 ^ 40) end, "fa.nn.Conv2d: argument 'stride': expected an integer in 1..2147483647 or {h, w}, got 1099511627776" },
    { function() nn.Flatten(3):forward(x) end,
      "fa.nn.Flatten:forward: argument 'input': expected a tensor with dims 3..-1, got a float32 tensor of size 2x3" },
    { function() nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(5, 2)):forward(x) end,
      "fa.nn.Sequential:forward: module 3 (fa.nn.Linear): argument 'input': expected a tensor of size (..., 5), got a float32 tensor of size 2x4" },
    { function() local s = nn.Sequential(nn.Linear(3, 4)); s:forward(x); s:backward(x) end,
      "fa.nn.Sequential:backward: module 1 (fa.nn.Linear): argument 'gradOutput': expected a tensor, got nil" },
    { function() nn.Sequential():add(5) end, "fa.nn.Sequential:add: argument 'module': expected a module, got 5" },
    { function() nn.Sequential():remove(1) end, "fa.nn.Sequential:remove: argument 'index': expected an index into the modules, but the container is empty, got 1" },
    { function() nn.ModuleList({ nn.ReLU() }):forward(x) end,
      'fa.nn.ModuleList:forward: a ModuleList has no forward: call its modules' },
    { function() nn.Linear(3, 2):type('int64') end,
      'fa.nn.Linear:type: argument \'dtype\': expected a floating-point dtype (float32, float64, bfloat16, float16) or nil, got "int64"' },
    { function() nn.Linear(3, 2):to(nil, 'gpu') end,
      'fa.nn.Linear:to: argument \'device\': expected \'cpu\', \'cuda\', \'cuda:N\' or nil, got "gpu"' },
    { function() nn.Linear(3, 2):loadStateDict(5) end,
      "fa.nn.Linear:loadStateDict: argument 'dict': expected a table {name = tensor}, got 5" },
    { function() return nn.Linaer end, "fa.nn: no module 'Linaer' (did you mean 'Linear'?)" },
    { function() return nn.sequential end, "fa.nn: no module 'sequential' (did you mean 'Sequential'?)" },
    { function() return nn.Qwertyuiop end, "fa.nn: no module 'Qwertyuiop'" },
    -- fa.F
    { function() F.linear(fa.tensor({ { 1, 2, 3 } }, 'int64'), fa.randn(2, 3)) end,
      "fa.F.linear: argument 'input': expected float32 or float64 on the CPU, got int64" },
    { function() F.linear(x, fa.randn(2, 3), nil, { outt = x }) end,
      'fa.F.linear: argument \'opts\': unknown option "outt" (known: out)' },
    { function() F.linear(x, fa.randn(2, 3), nil, { out = fa.empty(2, 3) }) end, "fa.F.linear: argument 'out': " },
    { function() F.linear_backward(fa.randn(2, 2), x, fa.randn(2, 3), { grad_weight = 5 }) end,
      "fa.F.linear_backward: argument 'grad_weight': expected a tensor, false or nil, got 5" },
    { function() F.grid_sample(fa.randn(1, 2, 3, 3), fa.randn(1, 2, 2, 3)) end,
      "fa.F.grid_sample: argument 'grid': expected a tensor of size (1, Ho, Wo, 2), got a float32 tensor of size 1x2x2x3" },
    { function() F.softmax_backward(x, x:double(), 2) end,
      "fa.F.softmax_backward: argument 'gradOutput': expected dtype float64 (as 'output'), got float32" },
    { function() F.linear_backward(fa.randn(2, 3), x:double(), fa.randn(3, 3)) end,
      "fa.F.linear_backward: argument 'weight': expected dtype float64 (as 'input'), got float32" },
    { function() F.grid_sample(fa.randn(1, 2, 3, 3), 5) end, "fa.F.grid_sample: argument 'grid': expected a tensor, got 5" },
    { function() F.softmax(x, 0) end, "fa.F.softmax: argument 'dim': expected a dimension in 1..2 (or -2..-1), got 0" },
    { function() F.dropout(x, 0 / 0) end, "fa.F.dropout: argument 'p': expected a probability in [0, 1], got nan" },
    { function() F.dropout(x, 0.5, 'yes') end, 'fa.F.dropout: argument \'training\': expected true or false, got "yes"' },
    { function() F.conv2d(fa.randn(1, 3, 5, 5), fa.randn(4, 3, 3, 3), nil, { stride = 1.5 }) end,
      "fa.F.conv2d: argument 'stride': expected an integer >= 1 or {h, w}, got 1.5" },
    { function() F.layer_norm(x, 3, nil, nil, 0 / 0) end, "fa.F.layer_norm: argument 'eps': expected a number, got nan" },
    { function() F.mse_loss(x, x, 'avg') end, 'fa.F.mse_loss: argument \'reduction\': expected \'none\', \'mean\' or \'sum\', got "avg"' },
  }
  for i, r in ipairs(rows) do
    it('row ' .. i .. (r[2] and (': ' .. r[2]:sub(1, 60)) or ': no error'), function()
      if r[2] == nil then
        r[1]()
        return
      end
      local e = err(r[1])
      -- whole messages, except rows ending in ': ' (the rest is the C layer's wording)
      local pat = AT .. q(r[2]) .. (r[2]:sub(-2) == ': ' and '' or '$')
      assert.truthy(e:find(pat), string.format('\n got:  %s\n want: %s', e, pat))
    end)
  end
end)

describe('getParameters after a structural change', function()
  local function step(params, grads, lr)
    fa.optim.sgd(function() grads:fill(1); return 0, grads end, params, { lr = lr or 1 })
  end

  it('a second call returns views of the same storage: the first tensors stay right', function()
    local m = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    local p1, g1 = m:getParameters()
    local p2, g2 = m:getParameters()
    local w = m:get(1).weight:clone()
    step(p1, g1)
    H.assert_close(m:get(1).weight, w:add(-1), 0, 0)
    step(p2, g2)
    H.assert_close(m:get(1).weight, w:add(-2), 0, 0)
    assert.are.equal(0, fa.maxAbsDiff(p1, p2))
    -- same dtype: float() changes nothing, the views stay right
    m:float()
    step(p1, g1)
    H.assert_close(m:get(1).weight, w:add(-3), 0, 0)
  end)

  it(':add() of a new child: a step through the old views raises, naming getParameters', function()
    local m = nn.Sequential(nn.Linear(3, 2))
    local p, g = m:getParameters()
    m:add(nn.Linear(2, 1))
    local ok, e = pcall(step, p, g)
    assert.is_false(ok)
    assert.truthy(e:find("^spec/nn_spec%.lua:%d+: fa%.optim%.sgd: argument 'x': these flat parameters from fa%.nn%.Sequential:getParameters%(%) no longer hold the module's parameters.*call getParameters%(%) again"), e)
    -- after a new getParameters(), the old views are still refused (their storage no longer holds the
    -- parameters), and the new ones train every child
    local p2, g2 = m:getParameters()
    assert.are.equal(3 * 2 + 2 + 2 + 1, p2:numel())
    assert.is_false(pcall(step, p, g))
    local w2 = m:get(2).weight:clone()
    step(p2, g2, 0.5)
    H.assert_close(m:get(2).weight, w2:add(-0.5), 0, 0)
    -- the gradient from an old getParameters() is refused as well
    local ok2, e2 = pcall(fa.optim.sgd, function() return 0, g end, p2, { lr = 1 })
    assert.is_false(ok2)
    assert.truthy(e2:find("argument 'gradient': these flat gradients", 1, true), e2)
  end)

  it(':double() and :type(): the old views raise; new ones work', function()
    local m = nn.Linear(3, 2)
    local p, g = m:getParameters()
    m:double()
    local ok, e = pcall(step, p, g)
    assert.is_false(ok)
    assert.truthy(e:find("getParameters() again", 1, true), e)
    local p2, g2 = m:getParameters()
    assert.are.equal('float64', p2:dtype())
    local b = m.bias:clone()
    step(p2, g2)
    H.assert_close(m.bias, b:add(-1), 0, 0)
    m:type('torch.FloatTensor')
    assert.is_false(pcall(step, p2, g2))
    for _, o in ipairs({ 'adam', 'adamw' }) do
      local ok3, e3 = pcall(fa.optim[o], function() return 0, g2 end, p2, {})
      assert.is_false(ok3)
      assert.truthy(e3:find('fa.optim.' .. o .. ": argument 'x': these flat parameters", 1, true), e3)
    end
  end)
end)

describe('namedGradParameters', function()
  it('gives each gradient under its parameter name', function()
    local m = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.LayerNorm(2))
    local ps, gs = m:namedParameters(), m:namedGradParameters()
    local names = keys(ps)
    assert.are.same({ '0.bias', '0.weight', '2.bias', '2.weight' }, names)
    assert.are.same(names, keys(gs))
    assert.are.equal(m:get(1).gradWeight, gs['0.weight'])
    assert.are.equal(m:get(3).gradBias, gs['2.bias'])
    -- a backward fills them: gradWeight of the Linear = gradOutput^T x
    local x, go = fa.randn(4, 3):double(), fa.randn(4, 2):double()
    local lin = nn.Linear(3, 2):double()
    lin:forward(x)
    lin:backward(x, go)
    H.assert_close(lin:namedGradParameters().weight, go:t():matmul(x), 1e-12, 1e-12)
    H.assert_close(lin:namedGradParameters().bias, go:sum(1):view(2), 1e-12, 1e-12)
  end)
end)

describe('hardening (issue 7): aliasing, names, containers', function()
  local AT = '^spec/nn_spec%.lua:%d+: '
  local function q(s) return (s:gsub('[%^%$%(%)%%%.%[%]%*%+%-%?]', '%%%0')) end
  -- the message of f(), which must fail at this file's line with exactly `want`
  local function fails(want, f)
    local ok, e = pcall(f)
    assert.is_false(ok, 'no error raised')
    assert.truthy(tostring(e):find(AT .. q(want) .. '$'), string.format('\n got:  %s\n want: %s', tostring(e), want))
  end

  it('F ops whose output buffer overlaps an input compute from a copy', function()
    fa.manualSeed(7)
    local x, w = fa.randn(2, 3), fa.randn(3, 3)
    local want = F.linear(x, w)
    F.linear(x, w, nil, { out = x }) -- out is the input itself
    assert.is_true(fa.maxAbsDiff(x, want) < 1e-6)
    -- out overlapping the input in part: row 2 of a 3x3 buffer as the output of its first two rows
    local z = fa.randn(3, 3)
    local want2 = F.linear(z:narrow(1, 1, 2), w)
    F.linear(z:narrow(1, 1, 2), w, nil, { out = z:narrow(1, 2, 2) })
    assert.is_true(fa.maxAbsDiff(z:narrow(1, 2, 2), want2) < 1e-6)
    local i, wc = fa.randn(1, 3, 5, 5), fa.randn(3, 3, 3, 3)
    local wantc = F.conv2d(i, wc, nil, { padding = 1 })
    F.conv2d(i, wc, nil, { padding = 1, out = i })
    assert.is_true(fa.maxAbsDiff(i, wantc) < 1e-4)
    local gi, gr = fa.randn(1, 2, 3, 3), fa.rand(1, 3, 3, 2) * 2 - 1
    local wantg = F.grid_sample(gi, gr)
    F.grid_sample(gi, gr, { out = gi })
    assert.is_true(fa.maxAbsDiff(gi, wantg) < 1e-6)
  end)

  it('a backward whose gradient buffer is its input computes the other gradients from the input', function()
    fa.manualSeed(8)
    local x, w, g = fa.randn(2, 3), fa.randn(3, 3), fa.randn(2, 3)
    local gi0, gw0 = F.linear_backward(g, x, w)
    local xx = x:clone()
    local gi, gw = F.linear_backward(g, xx, w, { grad_input = xx })
    assert.are.equal(xx, gi)
    assert.is_true(fa.maxAbsDiff(gi, gi0) < 1e-6)
    assert.is_true(fa.maxAbsDiff(gw, gw0) < 1e-6)
  end)

  it('expanded or mutually overlapping output buffers are refused', function()
    local x, e = fa.randn(2, 3), fa.zeros(1, 3):expand(2, 3)
    fails("fa.F.relu: argument 'out': expected a tensor whose elements are distinct in memory, got an expanded view " ..
          "(stride 0 in dimension 1 of size 2x3); write into a :clone() of it", function() F.relu(x, { out = e }) end)
    local buf = fa.zeros(9)
    fails("fa.F.linear_backward: argument 'grad_bias': expected a tensor that does not share memory with 'grad_weight', " ..
          "got a float32 tensor of size 3", function()
      F.linear_backward(fa.randn(2, 3), x, fa.randn(3, 3), { grad_weight = buf:view(3, 3), grad_bias = buf:narrow(1, 1, 3) })
    end)
  end)

  it('conv2d arguments: the bad element, the kernel against the input, an output too large to allocate', function()
    local i, w = fa.randn(1, 3, 5, 5), fa.randn(4, 3, 3, 3)
    fails("fa.F.conv2d: argument 'stride[2]': expected an integer >= 1, got 0", function() F.conv2d(i, w, nil, { 1, 0 }) end)
    fails("fa.F.conv2d: argument 'padding[2]': expected an integer >= 0, got -1", function() F.conv2d(i, w, nil, 1, { 1, -1 }) end)
    fails("fa.F.conv2d: argument 'input': expected a tensor of size (N, C, H, W) with H + 2*padding >= 201 and " ..
          "W + 2*padding >= 201 (the dilated kernel 201x201, padding 0x0), got a float32 tensor of size 1x3x5x5",
          function() F.conv2d(i, w, nil, 1, 0, 100) end)
    fails("fa.F.conv2d: the output of size 1x4x2000003x2000003 (64000192000144 bytes) is too large to allocate " ..
          '(more than the memory and swap of this machine)',
          function() F.conv2d(i, w, nil, 1, 1e6, 1, 1, { out = nil }) end)
  end)

  it('updateGradInput and accGradParameters report their own names, backward its own', function()
    local x = fa.randn(2, 3)
    local m = nn.Linear(3, 4)
    m:forward(x)
    fails("fa.nn.Linear:updateGradInput: argument 'gradOutput': expected a tensor, got nil", function() m:updateGradInput(x) end)
    fails("fa.nn.Linear:accGradParameters: argument 'gradOutput': expected a float32 tensor of size 2x4 (the output's), " ..
          "got a float32 tensor of size 2x3", function() m:accGradParameters(x, x) end)
    fails("fa.nn.Linear:backward: argument 'gradOutput': expected a float32 tensor of size 2x4 (the output's), " ..
          "got a float32 tensor of size 2x3", function() m:backward(x, x, 0.5) end) -- (the scaled path: Module.backward)
    local s = nn.Sigmoid()
    s:forward(x)
    fails("fa.nn.Sigmoid:backward: argument 'gradOutput': expected a float32 tensor of size 2x3 (the output's), " ..
          "got a float32 tensor of size 3x2", function() s:backward(x, fa.randn(3, 2)) end)
    fails("fa.nn.Sigmoid:updateGradInput: argument 'gradOutput': expected a float32 tensor of size 2x3 (the output's), " ..
          "got a float64 tensor of size 2x3", function() s:updateGradInput(x, x:double()) end)
    -- after a failed backward, a direct call names itself again
    fails("fa.nn.Sigmoid:updateGradInput: argument 'gradOutput': expected a tensor, got nil", function() s:updateGradInput(x) end)
    local c = nn.MSECriterion()
    c:forward(x, x)
    fails("fa.nn.MSECriterion:backward: argument 'gradOutput': expected a number, got \"a\"", function() c:backward(x, x, 'a') end)
    fails("fa.nn.MSECriterion:updateGradInput: argument 'gradOutput': expected a number, got \"a\"",
          function() c:updateGradInput(x, x, 'a') end)
  end)

  it('abstract bases, sizes too large, View dimensions, apply', function()
    local x = fa.randn(2, 3)
    fails('fa.nn.Module:forward: nn.Module is abstract: a module class must implement updateOutput (this one has none)',
          function() nn.Module():forward(x) end)
    fails('fa.nn.Criterion:forward: nn.Criterion is abstract: a module class must implement updateOutput (this one has none)',
          function() nn.Criterion():forward(x, x) end)
    fails("fa.nn.Linear: arguments 'inputSize', 'outputSize': a parameter of size 1099511627776x1099511627776 " ..
          '(1.209e+24 elements) is too large to allocate', function() nn.Linear(2 ^ 40, 2 ^ 40) end)
    fails("fa.nn.View: argument 'sizes': expected at most 8 sizes, got 9", function() nn.View(1, 1, 1, 1, 1, 1, 1, 1, 1) end)
    fails("fa.nn.Linear:apply: argument 'fn': expected a function, got \"x\"", function() nn.Linear(3, 4):apply('x') end)
    fails("fa.nn.MSDeformAttn: argument 'padding': expected 'zeros' or 'border', got \"reflect\"",
          function() nn.MSDeformAttn { padding = 'reflect' } end)
    fails("fa.nn.MSDeformAttn: arguments 'd_model', 'n_levels', 'n_heads', 'n_points': parameters of 2.418e+24 elements " ..
          'are too large to allocate', function() nn.MSDeformAttn { d_model = 2 ^ 40, n_heads = 1 } end)
  end)

  it('containers refuse a module already in them and cycles; get() checks its index', function()
    local s = nn.Sequential()
    fails("fa.nn.Sequential:add: argument 'module': expected a module that does not contain this container, got the " ..
          'container itself', function() s:add(s) end)
    fails("fa.nn.Sequential:add: argument 'module': expected a module that does not contain this container, got an " ..
          'nn.Sequential that contains it (a cycle)', function() s:add(nn.Sequential():add(s)) end)
    local l = nn.Linear(3, 3)
    s:add(l)
    fails("fa.nn.Sequential:add: argument 'module': expected a module not already in this container (use :clone() or " ..
          'share parameters), got an nn.Linear that is already in it', function() s:add(l) end)
    fails("fa.nn.Sequential:add: argument 'module': expected a module not already in this container (use :clone() or " ..
          'share parameters), got a module containing an nn.Linear that is already in it',
          function() s:add(nn.Sequential(nn.ReLU(), l)) end)
    assert.are.equal(1, s:size()) -- nothing added by the refused calls
    fails("fa.nn.Sequential: argument 'modules[2]': expected a module, got \"x\"", function() nn.Sequential(l, 'x') end)
    fails("fa.nn.Sequential:get: argument 'index': expected an integer in 1..1, got 5", function() s:get(5) end)
    assert.are.equal(l, s:get(1))
  end)

  it('a module fed its own output buffer computes the right result', function()
    fa.manualSeed(9)
    local x = fa.randn(2, 3)
    local s = nn.Sequential():add(nn.Linear(3, 3))
    local o = s:forward(x)
    local want = F.linear(o, s:get(1).weight, s:get(1).bias)
    assert.is_true(fa.maxAbsDiff(s:forward(o), want) < 1e-6)
    local c = nn.Conv2d(3, 3, 3, 1, 1)
    local oc = c:forward(fa.randn(1, 3, 5, 5))
    local wantc = F.conv2d(oc, c.weight, c.bias, { padding = 1 })
    assert.is_true(fa.maxAbsDiff(c:forward(oc), wantc) < 1e-5)
  end)

  it('gradOutput is checked against what the module needs (GridSample, criterions)', function()
    local m, i = nn.GridSample(), { fa.randn(1, 2, 3, 3), fa.rand(1, 3, 3, 2) }
    m:forward(i)
    fails("fa.nn.GridSample:backward: argument 'gradOutput': expected a float32 tensor of size 1x2x3x3 (the output's), " ..
          'got a float32 tensor of size 1x2x3x2', function() m:backward(i, fa.randn(1, 2, 3, 2)) end)
    local x = fa.randn(2, 3)
    local c = nn.MSECriterion('none')
    c:forward(x, x)
    fails("fa.nn.MSECriterion:backward: argument 'gradOutput': expected a float32 tensor of size 2x3 (the loss's, " ..
          "reduction 'none'), got a float32 tensor of size 3x2", function() c:backward(x, x, fa.randn(3, 2)) end)
    local ce, t = nn.CrossEntropyCriterion(), fa.tensor({ 1, 2 }, 'int64')
    ce:forward(x, t)
    fails("fa.nn.CrossEntropyCriterion:backward: argument 'gradOutput': expected a float32 tensor of size [] (one " ..
          'element: the loss is reduced), got a float32 tensor of size 2', function() ce:backward(x, t, fa.randn(2)) end)
    -- a one-element tensor scales the gradient of a reduced loss
    local g1 = ce:backward(x, t):clone()
    assert.is_true(fa.maxAbsDiff(ce:backward(x, t, fa.full({ 1 }, 2)), g1 * 2) < 1e-6)
    fails("fa.nn.Sequential:insert: argument 'index': expected an integer in 1..1, got 3",
          function() nn.Sequential():insert(nn.Linear(2, 2), 3) end)
  end)

  it('MSDeformAttn checks the levels against input_flatten itself', function()
    local m = nn.MSDeformAttn { d_model = 4, n_levels = 2, n_heads = 1, n_points = 1 }
    local inp = { fa.randn(1, 2, 4), fa.rand(1, 2, 2, 2), fa.randn(1, 6, 4), { { 2, 2 }, { 1, 1 } } }
    fails("fa.nn.MSDeformAttn:forward: argument 'input_flatten': expected size (N, S, 4) with S = 5 (the sum of H*W " ..
          'over spatial_shapes), got a float32 tensor of size 1x6x4', function() m:forward(inp) end)
    inp[3], inp[4] = fa.randn(1, 5, 4), { { 2.5, 2 }, { 1, 1 } }
    fails("fa.nn.MSDeformAttn:forward: argument 'spatial_shapes[1]': expected an integer in 0..2147483647, got 2.5",
          function() m:forward(inp) end)
  end)
end)
