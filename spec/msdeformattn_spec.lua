-- nn.MSDeformAttn against Deformable DETR's MSDeformAttn (PyTorch, grid_sample core), written in
-- spec/fixtures/gen_msdeformattn.py, as a case of spec/helpers/op.lua: forward and every gradient
-- (inputs and parameters), 2-d and 4-d reference points, with a padding mask, in float64 and float32;
-- finite differences; threads; errors; GPU against CPU. Then the default initialisation and the module's
-- own behaviour.
local fa = require 'fastattn'
local H = require 'helpers.check'
local op = require 'helpers.op'
local nn = fa.nn

local FX = H.fixture('msdeformattn')
local CFG = { d_model = 16, n_levels = 3, n_heads = 2, n_points = 2 }
local PARAMS = { 'sampling_offsets.weight', 'sampling_offsets.bias', 'attention_weights.weight',
                 'attention_weights.bias', 'value_proj.weight', 'value_proj.bias', 'output_proj.weight',
                 'output_proj.bias' }
local INPUTS = { 'query', 'reference_points', 'input_flatten', 'spatial_shapes', 'level_start_index',
                 'input_padding_mask' }

-- the fixture entries of one case, with the prefix removed
local function case(name) return H.fixture_case(FX, name) end

local function input_of(c, dtype, device, mask)
  local function f(t) return t:to(dtype, device) end
  local inp = { f(c.query), f(c.reference_points), f(c.input_flatten), c.spatial_shapes, c.level_start_index }
  if mask ~= false then inp[6] = c.input_padding_mask end
  return inp
end

local function layer(c, dtype, device)
  local m = nn.MSDeformAttn(CFG)
  m:to(dtype, device)
  m:loadStateDict(c.param)
  return m
end

---------------------------------------------------------------------------- the case: the module's inputs
-- and parameters are the op's inputs (x), its gradients the op's gradients
local layers = {}
local function layer_of(x)
  local w = x['value_proj.weight']
  local key = w:dtype() .. w:device()
  layers[key] = layers[key] or nn.MSDeformAttn(CFG):to(w:dtype(), w:device())
  local p = {}
  for _, n in ipairs(PARAMS) do p[n] = x[n] end
  layers[key]:loadStateDict(p)
  return layers[key]
end
local function inputs_of(x)
  local t = {}
  for i, n in ipairs(INPUTS) do t[i] = x[n] end
  return t
end
local function fixture_inputs(name)
  local c = case(name)
  local x = {}
  for _, n in ipairs(INPUTS) do x[n] = c[n] end
  for _, n in ipairs(PARAMS) do x[n] = c.param[n] end
  return x, c
end

local CASE = {
  name = 'nn.MSDeformAttn', convention = false,
  grads = { 'query', 'reference_points', 'input_flatten', unpack(PARAMS) },
  inputs = function(name) return (fixture_inputs(name)) end,
  forward = function(x) return layer_of(x):forward(inputs_of(x)):clone() end,
  backward = function(x, gout)
    local m, inp = layer_of(x), inputs_of(x)
    m:forward(inp)
    m:zeroGradParameters()
    local g = m:backward(inp, gout)
    assert.are.equal(3, #g)
    local r = { query = g[1]:clone(), reference_points = g[2]:clone(), input_flatten = g[3]:clone() }
    for _, e in ipairs(m:_paramList()) do r[e.name] = e.grad:clone() end
    return r
  end,
  fixture = { names = { 'ref2', 'ref4' }, load = function(name)
    local x, c = fixture_inputs(name)
    local want = { out = c.output, query = c.grad.query, reference_points = c.grad.reference_points,
                   input_flatten = c.grad.input_flatten }
    for _, n in ipairs(PARAMS) do want[n] = c.grad.param[n] end
    return x, nil, c.grad_output, want
  end },
  gradcheck = { { shape = 'ref2', what = 'points' }, { shape = 'ref4', what = 'boxes' } },
  threads = { { shape = 'ref2' }, { shape = 'ref4' } },
  gpu = { shapes = { { shape = 'ref2' }, { shape = 'ref4' } }, dtypes = { 'float32' }, variants = { {} } },
  tol = { fixture = { float64 = { 1e-10, 1e-12 }, float32 = { 2e-4, 2e-5 } }, numgrad = { 1e-5, 1e-7 },
          float32 = { 2e-4, 2e-5 }, gpu = { float32 = 5e-5 } }, -- (CPU float32 against float64: under 1e-6)
}

local function fwd(s) return "fa%.nn%.MSDeformAttn:forward: argument " .. s end
local i64 = function(t) return fa.tensor(t, 'int64') end
CASE.errors = {
  base = function()
    local x, c = fixture_inputs('ref2')
    for k, t in pairs(x) do if t:isFloatingPoint() then x[k] = t:float() end end
    return x, c.grad_output:float()
  end,
  { fwd "'query': expected a tensor, got nil", { query = op.NIL } },
  { fwd "'query': expected size %(N, Lq, 16%), got .*10x16", { query = fa.randn(10, 16) } },
  { fwd "'query': expected size %(N, Lq, 16%), got .*2x5x8", { query = fa.randn(2, 5, 8) } },
  { fwd "'input_flatten': expected size %(N, S, 16%) with N = 2 %(as 'query'%), got .*84x16",
    { input_flatten = fa.randn(84, 16) } },
  { fwd "'input_flatten': expected size %(N, S, 16%) with N = 2 %(as 'query'%), got .*3x42x16",
    { input_flatten = fa.randn(3, 42, 16) } },
  { fwd "'reference_points': expected size 2x5x3x2 or 2x5x3x4 .*got .*2x5x6", { reference_points = fa.rand(2, 5, 6) } },
  { fwd "'reference_points': expected size 2x5x3x2 or 2x5x3x4 .*got .*2x4x3x2",
    { reference_points = fa.rand(2, 4, 3, 2) } },
  { fwd "'reference_points': expected size 2x5x3x2 or 2x5x3x4 .*got .*1x5x3x2",
    { reference_points = fa.rand(1, 5, 3, 2) } },
  { fwd "'reference_points': expected size 2x5x3x2 or 2x5x3x4 .*got .*2x5x3x3",
    { reference_points = fa.rand(2, 5, 3, 3) } },
  { fwd "'reference_points': expected size 2x5x3x2 or 2x5x3x4 .*got .*2x5x4x2",
    { reference_points = fa.rand(2, 5, 4, 2) } },
  { fwd "'spatial_shapes': expected 3 levels %(n_levels%), got 2 levels",
    { spatial_shapes = i64({ { 5, 7 }, { 7, 1 } }), level_start_index = i64({ 0, 35 }) } },
  { fwd "'spatial_shapes': expected an %(L, 2%) tensor, got .*3x3", { spatial_shapes = fa.ones(3, 3, 'int64') } },
  { fwd "'spatial_shapes': expected {{H, W}, ...} or an %(L, 2%) tensor, got \"5x7\"", { spatial_shapes = '5x7' } },
  { fwd "'input_padding_mask': expected a bool tensor of size 2x42 %(N, S%) or nil, got .*2x41",
    { input_padding_mask = fa.zeros(2, 41, 'bool') } },
  { fwd "'input_padding_mask': expected a bool tensor of size 2x42 %(N, S%) or nil, got .*float32",
    { input_padding_mask = fa.zeros(2, 42) } },
  { fwd "'input_flatten': expected a float32 tensor on cpu %(the module's parameters.*got .*float64",
    { input_flatten = fa.randn(2, 42, 16, 'float64') } },
  { fwd "'query': expected a float32 tensor on cpu %(the module's parameters.*got .*float64",
    { query = fa.randn(2, 5, 16, 'float64') } },
  { fwd "'spatial_shapes': expected an int64 or int32 %(L, 2%) tensor, got .*float32", { spatial_shapes = fa.ones(3, 2) } },
  { fwd "'input_flatten': expected size %(N, S, 16%) with S = 44 %(the sum of H%*W over spatial_shapes%), got .*2x42x16",
    { spatial_shapes = i64({ { 5, 7 }, { 4, 2 }, { 1, 1 } }), level_start_index = i64({ 0, 35, 43 }) } },
  { fwd "'spatial_shapes%[2%]': expected an integer in 0..2147483647, got 2%.5", { spatial_shapes = { { 5, 7 }, { 2.5, 2 }, { 1, 1 } } } },
  -- level_start_index against the levels: checked by the op
  { "fa%.msda: argument 'level_start_index': expected 41 at level 3.*got 40", { level_start_index = i64({ 0, 35, 40 }) } },
  { "fa%.msda: argument 'level_start_index': expected 3 entries", { level_start_index = i64({ 0, 35 }) } },
  { "fa%.nn%.MSDeformAttn:backward: argument 'gradOutput': expected size 2x5x16 %(N, Lq, d_model%), got .*2x5x15",
    { gout = fa.randn(2, 5, 15) }, backward = true },
}

describe('nn.MSDeformAttn as an op', function()
  op.run(CASE)
end)

describe('nn.MSDeformAttn', function()
  describe('against the PyTorch MSDeformAttn', function()
    it('has the reference state_dict names and shapes', function()
      local m = nn.MSDeformAttn(CFG)
      local names = {}
      for k, v in pairs(m:stateDict()) do
        names[#names + 1] = k
        assert.are.same(case('ref2').param[k]:size(), v:size())
      end
      table.sort(names)
      local want = { unpack(PARAMS) }
      table.sort(want)
      assert.are.same(want, names)
    end)

    it('the padding mask matters (the fixture is not mask-invariant)', function()
      local c = case('ref2')
      local m = layer(c, 'float64')
      local a = m:forward(input_of(c, 'float64')):clone()
      local b = m:forward(input_of(c, 'float64', nil, false))
      assert.is_true(fa.maxAbsDiff(a, b) > 1e-3)
    end)

    it('loads the reference weights through a safetensors round trip', function()
      local c = case('ref4')
      local m = layer(c, 'float64')
      local path = os.tmpname()
      fa.save(path, m:stateDict())
      local m2 = nn.MSDeformAttn(CFG):double()
      m2:loadStateDict(fa.load(path))
      os.remove(path)
      H.assert_close(m2:forward(input_of(c, 'float64')), c.output, 1e-10, 1e-12, 'output after reload')
    end)
  end)

  describe('default initialisation', function()
    for tag, cfg in pairs({ small = CFG, default = {}, m3 = { d_model = 12, n_levels = 2, n_heads = 3, n_points = 3 } }) do
      it('equals the reference (' .. tag .. ')', function()
        local m = nn.MSDeformAttn(cfg)
        H.assert_close(m.sampling_offsets.bias, FX['init.' .. tag .. '.sampling_offsets.bias'], 0, 1e-7,
                       'sampling_offsets.bias')
        assert.are.equal(0, m.sampling_offsets.weight:abs():max())
        assert.are.equal(0, m.attention_weights.weight:abs():max())
        assert.are.equal(0, m.attention_weights.bias:abs():max())
        assert.are.equal(0, m.value_proj.bias:abs():max())
        assert.are.equal(0, m.output_proj.bias:abs():max())
        local d = m.d_model
        local bound = math.sqrt(6 / (2 * d))
        for _, w in ipairs({ m.value_proj.weight, m.output_proj.weight }) do
          local mx = w:abs():max()
          assert.is_true(mx <= bound and mx > 0.8 * bound, 'xavier bound')
        end
      end)
    end
    it('defaults to d_model 256, 4 levels, 8 heads, 4 points', function()
      local m = nn.MSDeformAttn()
      assert.are.same({ 256, 4, 8, 4 }, { m.d_model, m.n_levels, m.n_heads, m.n_points })
      assert.are.same({ 256, 256 }, m.sampling_offsets.weight:size())
      assert.are.same({ 128, 256 }, m.attention_weights.weight:size())
    end)
    it('samples on the radial grid at the start (attention uniform over L*P)', function()
      -- with the default init and zero query, each head samples at ref + bias/(W, H) with weights 1/(L*P)
      local m = nn.MSDeformAttn(CFG):double()
      local c = case('ref2')
      local q = fa.zeros(2, 5, 16, 'float64')
      m:forward({ q, c.reference_points, c.input_flatten, c.spatial_shapes, c.level_start_index })
      local A = m._attn
      H.assert_close(A, fa.full(A:size(), 1 / 6, 'float64'), 1e-12, 1e-14, 'attention')
    end)
  end)

  describe('module behaviour', function()
    it('updateGradInput + accGradParameters equal backward; gradients accumulate; scale', function()
      local c = case('ref4')
      local m = layer(c, 'float64')
      local inp = input_of(c, 'float64')
      m:forward(inp)
      m:zeroGradParameters()
      local g = m:updateGradInput(inp, c.grad_output)
      local g1 = { g[1]:clone(), g[2]:clone(), g[3]:clone() }
      m:accGradParameters(inp, c.grad_output, 1)
      local _, grads = m:getParameters()
      local once = grads:clone()
      m:backward(inp, c.grad_output, 0.5)
      H.assert_close(grads, once * 1.5, 1e-12, 1e-14, 'accumulated grads')
      for i = 1, 3 do H.assert_close(m.gradInput[i], g1[i], 1e-12, 1e-14, 'gradInput ' .. i) end
      H.assert_close(g1[1], c.grad.query, 1e-10, 1e-12, 'updateGradInput query')
    end)

    it('takes the inputs as named fields', function()
      local c = case('ref4')
      local m = layer(c, 'float64')
      local inp = {}
      for i, n in ipairs(INPUTS) do inp[n] = input_of(c, 'float64')[i] end
      H.assert_close(m:forward(inp), c.output, 1e-10, 1e-12, 'output')
      local g = m:backward(inp, c.grad_output)
      H.assert_close(g[2], c.grad.reference_points, 1e-10, 1e-12, 'grad reference_points')
    end)

    it('accepts spatial shapes as a table and no level_start_index', function()
      local c = case('ref2')
      local m = layer(c, 'float64')
      local inp = input_of(c, 'float64')
      inp[4] = { { 5, 7 }, { 3, 2 }, { 1, 1 } }
      inp[5] = nil
      H.assert_close(m:forward(inp), c.output, 1e-10, 1e-12, 'output')
    end)

    it('reuses its buffers across calls of the same size', function()
      local c = case('ref2')
      local m = layer(c, 'float64')
      local inp = input_of(c, 'float64')
      local y1 = m:forward(inp)
      local p1 = tostring(y1.desc.data)
      local g1 = m:backward(inp, c.grad_output)
      local gp = { tostring(g1[1].desc.data), tostring(g1[2].desc.data), tostring(g1[3].desc.data),
                   tostring(m._loc.desc.data), tostring(m._gLoc.desc.data) }
      local y2 = m:forward(inp)
      local g2 = m:backward(inp, c.grad_output)
      assert.are.equal(p1, tostring(y2.desc.data))
      assert.are.same(gp, { tostring(g2[1].desc.data), tostring(g2[2].desc.data), tostring(g2[3].desc.data),
                            tostring(m._loc.desc.data), tostring(m._gLoc.desc.data) })
    end)

    it('handles other batch sizes and Lq = 1 (against a per-sample run)', function()
      local c = case('ref2')
      local m = layer(c, 'float64')
      -- sample 2, query 3 alone must give the same row as in the batched run
      local inp = input_of(c, 'float64')
      local full = m:forward(inp):clone()
      local one = { c.query:narrow(1, 2, 1):narrow(2, 3, 1), c.reference_points:narrow(1, 2, 1):narrow(2, 3, 1),
                    c.input_flatten:narrow(1, 2, 1), c.spatial_shapes, c.level_start_index,
                    c.input_padding_mask:narrow(1, 2, 1) }
      local y = m:forward(one)
      assert.are.same({ 1, 1, 16 }, y:size())
      H.assert_close(y, full:narrow(1, 2, 1):narrow(2, 3, 1), 1e-12, 1e-14, 'row')
    end)

    it('takes Lq = 0 (empty output, zero input_flatten gradient)', function()
      local c = case('ref4')
      local m = layer(c, 'float64')
      local inp = { c.query:narrow(2, 1, 0), c.reference_points:narrow(2, 1, 0), c.input_flatten, c.spatial_shapes,
                    c.level_start_index, c.input_padding_mask }
      assert.are.same({ 2, 0, 16 }, m:forward(inp):size())
      m:zeroGradParameters()
      local g = m:backward(inp, fa.zeros(2, 0, 16, 'float64'))
      assert.are.same({ 2, 0, 16 }, g[1]:size())
      assert.are.same({ 2, 0, 3, 4 }, g[2]:size())
      assert.are.equal(0, g[3]:abs():max())
      assert.are.equal(0, m.value_proj.gradWeight:abs():max())
    end)

    it('converts with :float() and prints', function()
      local m = nn.MSDeformAttn(CFG):double():float()
      assert.are.equal('float32', m.value_proj.weight:dtype())
      assert.matches('MSDeformAttn', tostring(m))
    end)
  end)

  it('reports bad options and inputs that are not a table', function()
    local fails = H.fails
    fails("fa%.nn%.MSDeformAttn: argument 'd_model': expected a multiple of n_heads = 3, got 16", function()
      nn.MSDeformAttn{ d_model = 16, n_heads = 3 }
    end)
    fails("fa%.nn%.MSDeformAttn: argument 'n_points': expected an integer >= 1, got 0", function()
      nn.MSDeformAttn{ n_points = 0 }
    end)
    fails("fa%.nn%.MSDeformAttn: argument 'n_heads': expected an integer >= 1, got 2%.5", function()
      nn.MSDeformAttn{ n_heads = 2.5 }
    end)
    fails("fa%.nn%.MSDeformAttn: argument 'opts': unknown option \"n_point\"", function() nn.MSDeformAttn{ n_point = 2 } end)
    local m = nn.MSDeformAttn(CFG)
    fails("fa%.nn%.MSDeformAttn:forward: argument 'input': expected a table {query, .*got a float32 tensor", function()
      m:forward(fa.randn(2, 5, 16))
    end)
    fails("fa%.nn%.MSDeformAttn:backward: expected the input of the last forward", function()
      local c = case('ref2')
      m:backward(input_of(c, 'float32'), c.grad_output:float())
    end)
  end)
end)

op.describe_gpu('nn.MSDeformAttn on the GPU', function()
  it('takes a padding mask and shapes on the GPU', function()
    local c = case('ref4')
    local m = layer(c, 'float32', 'cuda')
    local inp = input_of(c, 'float32', 'cuda')
    inp[4] = c.spatial_shapes:cuda()
    inp[5] = c.level_start_index:cuda()
    inp[6] = c.input_padding_mask:cuda()
    local y = m:forward(inp)
    assert.are.equal('cuda:0', y:device())
    H.assert_close(y, c.output, 2e-4, 2e-5, 'output')
  end)
end)
