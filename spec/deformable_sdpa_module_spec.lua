-- nn.DeformableSDPA against the same module restated in float64 PyTorch (spec/fixtures/gen_deform_sdpa_module.py:
-- linear projections, coords = sigmoid(logit(ref) + to_offsets(x)), the fused op as F.grid_sample + softmax), as
-- cases of spec/helpers/op.lua: output, input gradient(s) and every parameter gradient, the offset head's
-- included (one input; two inputs with q/k/v biases; V = 1, S = 1, H = 1, explicit dim_head and scale; offsets
-- that reach the image's edges); float64 finite differences; threads; errors. Then the constructor, the
-- initialisation (the reference points and the ring of samples), the (B, V, H*W, dim) form and module behaviour.
local fa = require 'fastattn'
local H = require 'helpers.check'
local op = require 'helpers.op'
local nn = fa.nn

local FX = H.fixture('deform_sdpa_module')
-- the fixture cases' constructor options (as in gen_deform_sdpa_module.py); random ones: {options, B, H, W}
local CFG = {
  base = { dim = 8, heads = 2, views = 3, samples = 2 },
  kv = { dim = 6, heads = 3, views = 2, samples = 3, qkv_bias = true },
  single = { dim = 4, heads = 1, views = 1, samples = 1, dim_head = 3, scale = 0.7 },
  far = { dim = 4, heads = 2, views = 2, samples = 4 },
  gc_rect = { { dim = 6, heads = 2, views = 2, samples = 3 }, 1, 3, 4 },
  gc_b2 = { { dim = 4, heads = 2, views = 3, samples = 1, dim_head = 3 }, 2, 2, 3 },
  gc_kv = { { dim = 4, heads = 2, views = 2, samples = 2, qkv_bias = true }, 1, 3, 3 },
  th = { { dim = 16, heads = 4, views = 3, samples = 4 }, 2, 5, 7 },
}
local PARAMS = { 'to_q.weight', 'to_k.weight', 'to_v.weight', 'to_offsets.weight', 'to_offsets.bias', 'to_out.weight',
                 'to_out.bias' }
local PARAMS_BIAS = { 'to_q.weight', 'to_q.bias', 'to_k.weight', 'to_k.bias', 'to_v.weight', 'to_v.bias',
                      'to_offsets.weight', 'to_offsets.bias', 'to_out.weight', 'to_out.bias' }

local function cfg_of(name) return CFG[name][1] or CFG[name] end
local function case(name) return H.fixture_case(FX, name) end

local function layer(cfg, dtype, params)
  local m = nn.DeformableSDPA(cfg):to(dtype or 'float64')
  if params then m:loadStateDict(params) end
  return m
end

-- one module per configuration, dtype and device, loaded with the case's parameters at every call
local layers = {}
local function layer_of(x, names)
  local w = x['to_q.weight']
  local key = x.cfg .. w:dtype() .. w:device()
  layers[key] = layers[key] or layer(cfg_of(x.cfg), w:dtype()):to(nil, w:device())
  local p = {}
  for _, n in ipairs(names) do p[n] = x[n] end
  layers[key]:loadStateDict(p)
  return layers[key]
end

local function fixture_inputs(name, names)
  local c = case(name)
  local x = { cfg = name, x = c.x, kv = c.kv }
  for _, n in ipairs(names) do x[n] = c.param[n] end
  return x, c
end

-- random inputs of a small configuration: the default initialisation perturbed, the offset head's strongly
-- (its weight starts at zero), float64 on the CPU
local function random_inputs(name, names, two)
  local cfg, B, Hh, W = unpack(CFG[name])
  local m = layer(cfg)
  local x = { cfg = name, x = fa.randn(B, cfg.views, Hh, W, cfg.dim, 'float64') }
  if two then x.kv = fa.randn(B, cfg.views, Hh, W, cfg.dim, 'float64') end
  local params = m:namedParameters()
  for _, n in ipairs(names) do
    x[n] = params[n] + fa.randn(params[n]:size(), 'float64') * (n:find('offsets') and 0.7 or 0.3)
  end
  return x
end

local function make_case(name, names, two, fixtures)
  local grads = { 'x' }
  if two then grads[2] = 'kv' end
  for _, n in ipairs(names) do grads[#grads + 1] = n end
  local function input(x) return two and { x.x, x.kv } or x.x end
  local C = {
    name = name, convention = false, grads = grads,
    inputs = function(shape)
      return CFG[shape][1] and random_inputs(shape, names, two) or (fixture_inputs(shape, names))
    end,
    forward = function(x) return layer_of(x, names):forward(input(x)):clone() end,
    backward = function(x, gout)
      local m = layer_of(x, names)
      m:forward(input(x))
      m:zeroGradParameters()
      local g = m:backward(input(x), gout)
      local r = two and { x = g[1]:clone(), kv = g[2]:clone() } or { x = g:clone() }
      for n, gp in pairs(m:namedGradParameters()) do r[n] = gp:clone() end
      return r
    end,
    fixture = { names = fixtures, load = function(fname)
      local x, c = fixture_inputs(fname, names)
      local want = { out = c.output, x = c.grad.x, kv = c.grad.kv }
      for _, n in ipairs(names) do want[n] = c.grad.param[n] end
      return x, nil, c.grad_output, want
    end },
    -- float32 (threads): the offset head's weight gradient is a sum over B*V*H*W pixels of terms up to
    -- max|ref| that cancel to small entries: float32 error ~1e-6 max|ref| (2e-4 at max|ref| 65)
    tol = { fixture = { float64 = { 1e-11, 1e-12 }, float32 = { 2e-4, 2e-5 } }, numgrad = { 1e-6, 1e-8 },
            float32 = { 2e-4, 2e-5, ['to_offsets.weight'] = { 2e-4, 2e-4 } } },
  }
  return C
end

local CASE = make_case('nn.DeformableSDPA', PARAMS, false, { 'base', 'single', 'far' })
CASE.gradcheck = { { shape = 'gc_rect', what = 'V 2, S 3, 3x4' },
                   { shape = 'gc_b2', what = 'B 2, V 3, S 1, dim_head 3' } }
CASE.threads = { { shape = 'th' }, { shape = 'base' } }
-- GPU: float32 against the CPU's float64 (TF32 off); |a - ref| <= t (max|ref| + |ref|). Not yet run on a GPU.
CASE.gpu = { shapes = { { shape = 'th', what = 'B 2, V 3, S 4, 5x7' }, { shape = 'base', what = 'fixture base' } },
             dtypes = { 'float32' }, variants = { { name = 'default' } } }
CASE.tol.gpu = { float32 = 1e-4 }
local KV_CASE = make_case('nn.DeformableSDPA {query, key_value}', PARAMS_BIAS, true, { 'kv' })
KV_CASE.gradcheck = { { shape = 'gc_kv', what = 'two inputs, q/k/v biases' } }

local FWD, BWD = 'fa%.nn%.DeformableSDPA:forward: ', 'fa%.nn%.DeformableSDPA:backward: '
CASE.errors = {
  base = function()
    local x, c = fixture_inputs('base', PARAMS)
    for k, t in pairs(x) do if fa.isTensor(t) then x[k] = t:float() end end
    return x, c.grad_output:float()
  end,
  { FWD .. "argument 'input': expected a tensor or a table {query, key_value}, got nil", { x = op.NIL } },
  { FWD .. "argument 'input': expected a float32 tensor %(the module's dtype%), got a float64 tensor",
    { x = fa.randn(2, 3, 3, 4, 8, 'float64') } },
  { FWD .. "argument 'input': expected a tensor of size %(B, 3, H, W, 8%) %(views, height, width, dim; a %(B, V, " ..
    "H%*W, dim%) input needs the height and width options%), got a float32 tensor of size 2x2x3x4x8",
    { x = fa.randn(2, 2, 3, 4, 8) } },
  { FWD .. "argument 'input': expected a tensor of size %(B, 3, H, W, 8%) .*got a float32 tensor of size 2x3x3x4x7",
    { x = fa.randn(2, 3, 3, 4, 7) } },
  { FWD .. "argument 'input': expected a tensor of size %(B, 3, H, W, 8%) .*got a float32 tensor of size 2x3x12x8",
    { x = fa.randn(2, 3, 12, 8) } },
  { BWD .. "argument 'gradOutput': expected a float32 tensor of size 2x3x3x4x8 %(the output's%), got .*2x3x3x4x7",
    { gout = fa.randn(2, 3, 3, 4, 7) }, backward = true },
  { BWD .. "argument 'gradOutput': expected a float32 tensor of size 2x3x3x4x8 %(the output's%), got .*float64",
    { gout = fa.randn(2, 3, 3, 4, 8, 'float64') }, backward = true },
}

describe('nn.DeformableSDPA as an op', function() op.run(CASE) end)
describe('nn.DeformableSDPA with two inputs as an op', function() op.run(KV_CASE) end)

local fails = H.fails

local function sigmoid(t) return 1 / (1 + math.exp(-t)) end

describe('nn.DeformableSDPA', function()
  describe('against the PyTorch module', function()
    it('has its state_dict names and shapes, and the coordinates it computed', function()
      for name, names in pairs({ base = PARAMS, kv = PARAMS_BIAS, single = PARAMS, far = PARAMS }) do
        local c = case(name)
        local sd = nn.DeformableSDPA(CFG[name]):stateDict()
        local got = {}
        for k, v in pairs(sd) do
          got[#got + 1] = k
          assert.are.same(c.param[k]:size(), v:size(), name .. ' ' .. k)
        end
        table.sort(got)
        local want = { unpack(names) }
        table.sort(want)
        assert.are.same(want, got)
        local m = layer(CFG[name], 'float64', c.param)
        m:forward(c.kv and { c.x, c.kv } or c.x)
        H.assert_close(m._coords, c.coords, 1e-14, 1e-15, name .. ' coords')
      end
    end)

    it('"far" reaches the edges: some points within a quarter pixel of the border (the squashed region)', function()
      local c = case('far').coords
      local lo, hi = -c:scale(-1):max(), c:max()
      assert(lo > 0 and hi < 1, 'coordinates stay inside [0, 1]')
      assert(lo < 0.25 / 4 and hi > 1 - 0.25 / 4, string.format('range %.4f .. %.4f', lo, hi))
    end)

    it('loads the PyTorch weights through a safetensors round trip', function()
      local c = case('base')
      local path = os.tmpname()
      fa.save(path, layer(CFG.base, 'float64', c.param):stateDict())
      local m = layer(CFG.base, 'float64', fa.load(path))
      os.remove(path)
      H.assert_close(m:forward(c.x), c.output, 1e-11, 1e-12, 'output after reload')
    end)
  end)

  describe('constructor', function()
    it('has defaults: 8 heads, 4 samples, dim_head = dim / heads, no q/k/v bias, scale dim_head^-1/2', function()
      local m = nn.DeformableSDPA{ dim = 64, views = 3 }
      assert.are.same({ 8, 4, 8, false, false }, { m.heads, m.samples, m.dim_head, m.qkv_bias, m.deterministic })
      assert.are.equal(1 / math.sqrt(8), m.scale)
      assert.are.same({ 64, 64 }, m.to_q.weight:size())
      assert.is_nil(m.to_q.bias)
      assert.are.same({ 3 * 4 * 2, 64 }, m.to_offsets.weight:size())
      assert.are.same({ 64, 64 }, m.to_out.weight:size())
      assert.are.equal('nn.DeformableSDPA(dim 64, heads 8 x 8, views 3, samples 4)', tostring(m))
      local r = nn.DeformableSDPA{ dim = 12, views = 2, heads = 5, dim_head = 7, samples = 1, height = 3, width = 4 }
      assert.are.same({ 35, 12 }, r.to_v.weight:size())
      assert.are.equal('nn.DeformableSDPA(dim 12, heads 5 x 7, views 2, samples 1, 3x4)', tostring(r))
    end)

    it('initialises the offset head: weight zero, sample 1 on the pixel, samples 2..S on a square ring', function()
      local m = nn.DeformableSDPA{ dim = 8, heads = 2, views = 2, samples = 5, offset_init = 0.4 }:double()
      assert.are.equal(0, H.maxabs(m.to_offsets.weight))
      local ring = { 0, 0, 0.4, 0, 0, 0.4, -0.4, 0, 0, -0.4 } -- angles 0, 90, 180, 270 degrees
      local want = {}
      for v = 1, 2 do for i = 1, 10 do want[(v - 1) * 10 + i] = ring[i] end end
      -- (the parameters are made in the default dtype, float32, then converted)
      local function f32(t) return fa.tensor(t, 'float64'):float():double() end
      H.assert_close(m.to_offsets.bias, f32(want), 0, 0, 'ring')
      -- with 3 samples the ring has directions 0 and 180 degrees; diagonals go to the square's corners
      local m3 = nn.DeformableSDPA{ dim = 8, heads = 2, views = 1, samples = 3 }:double()
      H.assert_close(m3.to_offsets.bias, f32({ 0, 0, 0.5, 0, -0.5, 0 }), 0, 0, 'S 3')
      local m9 = nn.DeformableSDPA{ dim = 8, heads = 2, views = 1, samples = 9 }:double()
      H.assert_close(m9.to_offsets.bias:narrow(1, 5, 2), f32({ 0.5, 0.5 }), 0, 0, 'diagonal')
    end)

    it('at initialisation samples the pixel itself (interior), a quarter pixel inside at the edges', function()
      fa.manualSeed(3)
      local m = nn.DeformableSDPA{ dim = 4, heads = 1, views = 2, samples = 2, offset_init = 0.3 }:double()
      local Hh, W = 3, 5
      local b = m.to_offsets.bias:get(3) -- 0.3 in float32 (the default dtype the parameters were made in)
      assert.is_near(0.3, b, 1e-7)
      m:forward(fa.randn(1, 2, Hh, W, 4, 'float64'))
      local c = m:samplingPoints() -- (1, 2, 15, 2, 2, 2)
      assert.are.same({ 1, 2, 15, 2, 2, 2 }, c:size())
      for i = 0, Hh - 1 do
        for j = 0, W - 1 do
          local ex = math.min(math.max(j / (W - 1), 0.25 / (W - 1)), 1 - 0.25 / (W - 1))
          local ey = math.min(math.max(i / (Hh - 1), 0.25 / (Hh - 1)), 1 - 0.25 / (Hh - 1))
          for v1 = 1, 2 do
            for v2 = 1, 2 do
              local p = i * W + j + 1
              assert.is_near(ex, c:get(1, v1, p, v2, 1, 1), 1e-14)
              assert.is_near(ey, c:get(1, v1, p, v2, 1, 2), 1e-14)
              -- sample 2: +0.3 logits in x
              assert.is_near(sigmoid(math.log(ex / (1 - ex)) + b), c:get(1, v1, p, v2, 2, 1), 1e-14)
              assert.is_near(ey, c:get(1, v1, p, v2, 2, 2), 1e-14)
            end
          end
        end
      end
      -- a side of one pixel: 0.5
      local m1 = nn.DeformableSDPA{ dim = 4, heads = 1, views = 1, samples = 1 }:double()
      m1:forward(fa.randn(1, 1, 1, 3, 4, 'float64'))
      assert.are.same({ 0.5, 0.5, 0.5 }, { m1._coords:get(1, 1, 1, 1, 1, 2), m1._coords:get(1, 1, 2, 1, 1, 2),
                                           m1._coords:get(1, 1, 3, 1, 1, 2) })
    end)

    it('reset() redraws the projections and restores the offset head', function()
      local m = nn.DeformableSDPA{ dim = 8, heads = 2, views = 2, samples = 3 }
      local b0 = m.to_offsets.bias:clone()
      m.to_offsets.weight:fill(1)
      m.to_offsets.bias:fill(2)
      local q0 = m.to_q.weight:clone()
      m:reset()
      assert.are.equal(0, H.maxabs(m.to_offsets.weight))
      assert.is_true(m.to_offsets.bias:equal(b0))
      assert.is_false(m.to_q.weight:equal(q0))
    end)

    it('rejects bad options', function()
      local E = 'fa%.nn%.DeformableSDPA: '
      fails(E .. "argument 'dim': expected an integer >= 1, got nil", function() nn.DeformableSDPA{ views = 2 } end)
      fails(E .. "argument 'views': expected an integer >= 1, got nil", function() nn.DeformableSDPA{ dim = 8 } end)
      fails(E .. "argument 'views': expected an integer >= 1, got 0", function()
        nn.DeformableSDPA{ dim = 8, views = 0 } end)
      fails(E .. "argument 'samples': expected an integer >= 1, got 1%.5", function()
        nn.DeformableSDPA{ dim = 8, views = 2, samples = 1.5 } end)
      fails(E .. "argument 'dim': expected a multiple of heads = 8 %(or give dim_head%), got 12", function()
        nn.DeformableSDPA{ dim = 12, views = 2 } end)
      nn.DeformableSDPA{ dim = 12, views = 2, dim_head = 5 } -- with dim_head any dim is fine
      fails(E .. "arguments 'height', 'width': expected both or neither, got height only", function()
        nn.DeformableSDPA{ dim = 8, views = 2, height = 4 } end)
      fails(E .. "argument 'scale': expected a finite number, got inf", function()
        nn.DeformableSDPA{ dim = 8, views = 2, scale = math.huge } end)
      fails(E .. "argument 'offset_init': expected a number, got nan", function()
        nn.DeformableSDPA{ dim = 8, views = 2, offset_init = 0 / 0 } end)
      fails(E .. "argument 'qkv_bias': expected true or false, got 1", function()
        nn.DeformableSDPA{ dim = 8, views = 2, qkv_bias = 1 } end)
      fails(E .. "argument 'opts': unknown option \"sample\"", function()
        nn.DeformableSDPA{ dim = 8, views = 2, sample = 4 } end)
      fails(E .. "arguments 'dim', 'heads', 'dim_head', 'views', 'samples': parameters of .* elements are too large",
            function() nn.DeformableSDPA{ dim = 2 ^ 20, views = 2 ^ 20 } end)
    end)
  end)

  describe('input forms and errors', function()
    it('takes (B, V, H*W, dim) with height and width given, the same numbers as (B, V, H, W, dim)', function()
      local c = case('base')
      local m = layer(op.merge(CFG.base, { height = 3, width = 4 }), 'float64', c.param)
      local y = m:forward(c.x:view(2, 3, 12, 8))
      assert.are.same({ 2, 3, 12, 8 }, y:size())
      H.assert_close(y, c.output:view(2, 3, 12, 8), 1e-11, 1e-12, '4-d output')
      m:zeroGradParameters()
      local g = m:backward(c.x:view(2, 3, 12, 8), c.grad_output:view(2, 3, 12, 8))
      H.assert_close(g, c.grad.x:view(2, 3, 12, 8), 1e-11, 1e-12, '4-d grad')
      H.assert_close(m.to_offsets.gradWeight, c.grad.param['to_offsets.weight'], 1e-11, 1e-12, 'offsets')
      -- 5-d input: must agree with height and width
      H.assert_close(m:forward(c.x), c.output, 1e-11, 1e-12, '5-d output')
      fails("fa%.nn%.DeformableSDPA:forward: argument 'input': expected a tensor of size %(B, 3, 3, 4, 8%) or %(B, " ..
            "3, 12, 8%) %(views, height, width, dim%), got a float64 tensor of size 2x3x4x3x8",
            function() m:forward(c.x:view(2, 3, 4, 3, 8)) end)
      fails("fa%.nn%.DeformableSDPA:forward: argument 'input': expected a tensor of size %(B, 3, 3, 4, 8%) or %(B, " ..
            "3, 12, 8%) .*got a float64 tensor of size 2x3x11x8",
            function() m:forward(fa.randn(2, 3, 11, 8, 'float64')) end)
    end)

    it('two inputs: {query, key_value} or named; the gradients as a table; errors name the entry', function()
      local c = case('kv')
      local m = layer(CFG.kv, 'float64', c.param)
      H.assert_close(m:forward{ query = c.x, key_value = c.kv }, c.output, 1e-11, 1e-12, 'named')
      -- one input is the two-input form with key_value = query
      local one = m:forward(c.x):clone()
      H.assert_close(m:forward{ c.x, c.x }, one, 0, 0, 'kv = query')
      m:zeroGradParameters()
      local g1 = m:backward(c.x, c.grad_output):clone()
      local g2 = m:backward({ c.x, c.x }, c.grad_output)
      H.assert_close(g2[1] + g2[2], g1, 1e-13, 1e-14, 'the two gradients sum to the one-input gradient')
      local F = 'fa%.nn%.DeformableSDPA:forward: '
      fails(F .. "argument 'key_value': expected a tensor, got nil", function() m:forward{ c.x } end)
      fails(F .. "argument 'key_value': expected a tensor of size 1x2x4x3x6 %(as 'query'%), got a float64 tensor of " ..
            'size 1x2x4x3x5', function() m:forward{ c.x, fa.randn(1, 2, 4, 3, 5, 'float64') } end)
      fails(F .. "argument 'query': expected a float64 tensor %(the module's dtype%), got a float32 tensor",
            function() m:forward{ c.x:float(), c.kv } end)
    end)

    it('backward before forward, or with another input size, is an error', function()
      local m = nn.DeformableSDPA{ dim = 4, heads = 1, views = 1, samples = 1 }
      local x = fa.randn(1, 1, 2, 2, 4)
      fails("fa%.nn%.DeformableSDPA:samplingPoints: no forward yet %(call forward first%)",
            function() m:samplingPoints() end)
      fails("fa%.nn%.DeformableSDPA:backward: expected the input of the last forward %(call forward first%)",
            function() m:backward(x, x) end)
      m:forward(x)
      local x2 = fa.randn(1, 1, 2, 3, 4)
      fails("fa%.nn%.DeformableSDPA:backward: expected the input of the last forward", function() m:backward(x2, x2) end)
      fails("fa%.nn%.DeformableSDPA:accGradParameters: call updateGradInput before accGradParameters",
            function() m:accGradParameters(x, x) end)
    end)
  end)

  describe('module behaviour', function()
    it('updateGradInput + accGradParameters equal backward; gradients accumulate; scale', function()
      local c = case('base')
      H.assert_grad_parts(layer(CFG.base, 'float64', c.param), c.x, c.grad_output, c.grad.x, c.grad.param,
                          1e-11, 1e-12)
    end)

    it('the offsets learn: a step against the offset head gradient lowers a loss of the coordinates', function()
      local c = case('far')
      local m = layer(CFG.far, 'float64', c.param)
      local function loss() return (m:forward(c.x):clone() * c.grad_output):sum() end
      local l0 = loss()
      m:zeroGradParameters()
      m:backward(c.x, c.grad_output)
      local gw = m.to_offsets.gradWeight:clone()
      assert(H.maxabs(gw) > 1e-3, 'the offset head has a gradient')
      m.to_offsets.weight:add_(gw, -1e-3)
      local l1 = loss()
      -- first order: the loss falls by about 1e-3 |gw|^2
      local sq = (gw * gw):sum()
      assert(l1 < l0 and math.abs((l0 - l1) - 1e-3 * sq) < 0.05 * 1e-3 * sq,
             string.format('%.6g -> %.6g (expected a fall of %.6g)', l0, l1, 1e-3 * sq))
    end)

    it('reuses its buffers across calls of the same size', function()
      local c = case('base')
      H.assert_reuses_buffers(layer(CFG.base, 'float64', c.param), c.x, c.grad_output,
                              { '_coords', '_oa', '_gcoords', '_gqa', '_gT' })
    end)

    it('batches: each sample as alone', function()
      local c = case('base')
      H.assert_sample_alone(layer(CFG.base, 'float64', c.param), c.x, 1e-13, 1e-14)
    end)

    it('deterministic = true gives the same numbers on the CPU', function()
      local c = case('base')
      local a = layer(CFG.base, 'float64', c.param)
      local b = layer(op.merge(CFG.base, { deterministic = true }), 'float64', c.param)
      assert.is_true(b:forward(c.x):equal(a:forward(c.x)))
      assert.is_true(b:backward(c.x, c.grad_output):equal(a:backward(c.x, c.grad_output)))
    end)
  end)
end)
