-- nn.MSDeformAttn against Deformable DETR's MSDeformAttn (PyTorch, grid_sample core), written in
-- spec/fixtures/gen_msdeformattn.py: forward and every gradient, 2-d and 4-d reference points, with a
-- padding mask; the default initialisation; finite differences; errors; GPU against CPU.
local fa = require 'fastattn'
local H = require 'helpers.check'
local nn = fa.nn

local FX = H.fixture('msdeformattn')
local CFG = { d_model = 16, n_levels = 3, n_heads = 2, n_points = 2 }
local PARAMS = { 'sampling_offsets.weight', 'sampling_offsets.bias', 'attention_weights.weight',
                 'attention_weights.bias', 'value_proj.weight', 'value_proj.bias', 'output_proj.weight',
                 'output_proj.bias' }

-- the fixture entries of one case, with the prefix removed
local function case(name)
  local c = { param = {}, grad = { param = {} } }
  for k, v in pairs(FX) do
    local rest = k:match('^' .. name .. '%.(.*)$')
    if rest then
      local p = rest:match('^param%.(.*)$')
      local gp = rest:match('^grad%.param%.(.*)$')
      local g = rest:match('^grad%.(.*)$')
      if p then c.param[p] = v
      elseif gp then c.grad.param[gp] = v
      elseif g then c.grad[g] = v
      else c[rest] = v end
    end
  end
  return c
end

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

-- runs forward + backward and compares everything with the fixture
local function check_case(name, dtype, rtol, atol)
  local c = case(name)
  local m = layer(c, dtype)
  local inp = input_of(c, dtype)
  local y = m:forward(inp)
  H.assert_close(y, c.output, rtol, atol, name .. ' output')
  m:zeroGradParameters()
  local g = m:backward(inp, c.grad_output:to(dtype))
  H.assert_close(g[1], c.grad.query, rtol, atol, name .. ' grad query')
  H.assert_close(g[2], c.grad.reference_points, rtol, atol, name .. ' grad reference_points')
  H.assert_close(g[3], c.grad.input_flatten, rtol, atol, name .. ' grad input_flatten')
  assert.is_nil(g[4]); assert.is_nil(g[5]); assert.is_nil(g[6])
  local _, grads = m:parameters()
  local byname = {}
  local ps = m:_paramList()
  for i, e in ipairs(ps) do byname[e.name] = grads[i] end
  for _, p in ipairs(PARAMS) do
    H.assert_close(byname[p], c.grad.param[p], rtol, atol, name .. ' grad ' .. p)
  end
end

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

    for _, name in ipairs({ 'ref2', 'ref4' }) do
      it(name .. ': float64 forward and every gradient (padding mask)', function()
        check_case(name, 'float64', 1e-10, 1e-12)
      end)
      it(name .. ': float32 forward and every gradient (padding mask)', function()
        check_case(name, 'float32', 2e-4, 2e-5)
      end)
    end

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

  describe('gradients by float64 finite differences', function()
    for _, name in ipairs({ 'ref2', 'ref4' }) do
      it(name .. ': query, reference_points, input_flatten and the offset/attention weights', function()
        local c = case(name)
        local m = layer(c, 'float64')
        local inp = input_of(c, 'float64')
        local gout = c.grad_output
        m:forward(inp)
        m:zeroGradParameters()
        local g = m:backward(inp, gout)
        local function f() return m:forward(inp) end
        H.assert_close(g[1], H.numgrad(f, inp[1], gout), 1e-5, 1e-7, 'grad query')
        H.assert_close(g[2], H.numgrad(f, inp[2], gout), 1e-5, 1e-7, 'grad reference_points')
        H.assert_close(g[3], H.numgrad(f, inp[3], gout), 1e-5, 1e-7, 'grad input_flatten')
        for _, p in ipairs({ 'sampling_offsets', 'attention_weights', 'value_proj', 'output_proj' }) do
          H.assert_close(m[p].gradWeight, H.numgrad(f, m[p].weight, gout), 1e-5, 1e-7, 'grad ' .. p .. '.weight')
          H.assert_close(m[p].gradBias, H.numgrad(f, m[p].bias, gout), 1e-5, 1e-7, 'grad ' .. p .. '.bias')
        end
      end)
    end
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

    it('takes non-contiguous inputs and named fields', function()
      local c = case('ref4')
      local m = layer(c, 'float64')
      local q = c.query:transpose(1, 2):contiguous():transpose(1, 2)
      local x = c.input_flatten:transpose(1, 2):contiguous():transpose(1, 2)
      local r = c.reference_points:permute(4, 1, 2, 3):contiguous():permute(2, 3, 4, 1)
      assert.is_false(q:isContiguous() or x:isContiguous() or r:isContiguous())
      local inp = { query = q, reference_points = r, input_flatten = x, spatial_shapes = c.spatial_shapes,
                    level_start_index = c.level_start_index, input_padding_mask = c.input_padding_mask }
      H.assert_close(m:forward(inp), c.output, 1e-10, 1e-12, 'output')
      local g = m:backward(inp, c.grad_output:transpose(1, 2):contiguous():transpose(1, 2))
      H.assert_close(g[1], c.grad.query, 1e-10, 1e-12, 'grad query')
      H.assert_close(g[2], c.grad.reference_points, 1e-10, 1e-12, 'grad reference_points')
      H.assert_close(g[3], c.grad.input_flatten, 1e-10, 1e-12, 'grad input_flatten')
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

  describe('errors', function()
    local c = case('ref2')
    local function inp(over)
      local t = input_of(c, 'float32')
      for k, v in pairs(over or {}) do t[k] = v end
      return t
    end
    local function fails(pattern, fn)
      local ok, err = pcall(fn)
      assert.is_false(ok, 'expected an error matching ' .. pattern)
      assert.matches('MSDeformAttn', err)
      assert.matches(pattern, err, 1, true)
    end
    local m = layer(c, 'float32')

    it('d_model not divisible by n_heads, bad options', function()
      fails("argument 'd_model': expected a multiple of n_heads = 3, got 16", function()
        nn.MSDeformAttn{ d_model = 16, n_heads = 3 }
      end)
      fails("argument 'n_points': expected a positive integer, got 0", function() nn.MSDeformAttn{ n_points = 0 } end)
    end)
    it('wrong ranks and sizes', function()
      fails("argument 'query': expected a 3-D tensor (N, Lq, 16), got 10x16", function()
        m:forward(inp({ [1] = fa.randn(10, 16) }))
      end)
      fails("argument 'query': expected a 3-D tensor (N, Lq, 16), got 2x5x8", function()
        m:forward(inp({ [1] = fa.randn(2, 5, 8) }))
      end)
      fails("argument 'input_flatten': expected a 3-D tensor (N, S, 16), got 84x16", function()
        m:forward(inp({ [3] = fa.randn(84, 16) }))
      end)
      fails("argument 'reference_points': expected a 4-D tensor (N, Lq, L, 2) or (N, Lq, L, 4), got 2x5x6", function()
        m:forward(inp({ [2] = fa.rand(2, 5, 6) }))
      end)
      fails("argument 'query': expected a tensor, got nil", function() m:forward({}) end)
      fails("expected a table {query", function() m:forward(fa.randn(2, 5, 16)) end)
    end)
    it('N and Lq mismatches', function()
      fails("argument 'input_flatten': expected batch size N = 2 (as 'query'), got 3", function()
        m:forward(inp({ [3] = fa.randn(3, 42, 16) }))
      end)
      fails("argument 'reference_points': expected size 2x5x3x2 (N, Lq, n_levels, 2), got 2x4x3x2", function()
        m:forward(inp({ [2] = fa.rand(2, 4, 3, 2) }))
      end)
      fails("argument 'reference_points': expected size 2x5x3x2 (N, Lq, n_levels, 2), got 1x5x3x2", function()
        m:forward(inp({ [2] = fa.rand(1, 5, 3, 2) }))
      end)
    end)
    it('reference point last dim not 2 or 4', function()
      fails("argument 'reference_points': expected the last dimension 2 (points) or 4 (boxes), got 3", function()
        m:forward(inp({ [2] = fa.rand(2, 5, 3, 3) }))
      end)
    end)
    it('level count and spatial shape mismatches', function()
      fails("argument 'reference_points': expected size 2x5x3x2 (N, Lq, n_levels, 2), got 2x5x4x2", function()
        m:forward(inp({ [2] = fa.rand(2, 5, 4, 2) }))
      end)
      fails("argument 'spatial_shapes': expected 3 levels (n_levels), got 2", function()
        m:forward(inp({ [4] = fa.tensor({ { 5, 7 }, { 7, 1 } }, 'int64'), [5] = fa.tensor({ 0, 35 }, 'int64') }))
      end)
      fails("argument 'spatial_shapes': expected shape (L, 2) with L = n_levels = 3, got 3x3", function()
        m:forward(inp({ [4] = fa.ones(3, 3, 'int64') }))
      end)
      fails("argument 'spatial_shapes': expected an int64 tensor (L, 2), got float32", function()
        m:forward(inp({ [4] = fa.ones(3, 2) }))
      end)
      fails("argument 'input_flatten': expected S = 44 (the sum of H*W over spatial_shapes) in dimension 2, got 42", function()
        m:forward(inp({ [4] = fa.tensor({ { 5, 7 }, { 4, 2 }, { 1, 1 } }, 'int64'), [5] = fa.tensor({ 0, 35, 43 }, 'int64') }))
      end)
      fails("argument 'level_start_index': expected 41 at level 3 (the running sum of H*W), got 40", function()
        m:forward(inp({ [5] = fa.tensor({ 0, 35, 40 }, 'int64') }))
      end)
      fails("argument 'level_start_index': expected shape (3), got 2", function()
        m:forward(inp({ [5] = fa.tensor({ 0, 35 }, 'int64') }))
      end)
    end)
    it('mask shape and dtype', function()
      fails("argument 'input_padding_mask': expected size 2x42 (N, S), got 2x41", function()
        m:forward(inp({ [6] = fa.zeros(2, 41, 'bool') }))
      end)
      fails("argument 'input_padding_mask': expected a bool tensor (N, S), got float32", function()
        m:forward(inp({ [6] = fa.zeros(2, 42) }))
      end)
    end)
    it('dtype mismatches and gradOutput', function()
      fails("argument 'input_flatten': expected dtype float32 (as 'query'), got float64", function()
        m:forward(inp({ [3] = fa.randn(2, 42, 16, 'float64') }))
      end)
      fails("argument 'query': expected float32 on cpu (the module's parameters", function()
        m:forward(input_of(c, 'float64'))
      end)
      m:forward(inp())
      fails("argument 'gradOutput': expected size 2x5x16 (N, Lq, d_model), got 2x5x15", function()
        m:backward(inp(), fa.randn(2, 5, 15))
      end)
    end)
  end)
end)

describe('nn.MSDeformAttn on the GPU #gpu', function()
  if fa.C.fa_cuda_device_count() < 1 then
    it('skips: no CUDA device found', function() pending('no CUDA device found') end)
    return
  end
  for _, name in ipairs({ 'ref2', 'ref4' }) do
    it(name .. ': float32 on the GPU equals the fixture and the CPU', function()
      local c = case(name)
      local m = layer(c, 'float32', 'cuda')
      local inp = input_of(c, 'float32', 'cuda')
      local y = m:forward(inp)
      assert.are.equal('cuda:0', y:device())
      H.assert_close(y, c.output, 2e-4, 2e-5, name .. ' output')
      m:zeroGradParameters()
      local g = m:backward(inp, c.grad_output:to('float32', 'cuda'))
      H.assert_close(g[1], c.grad.query, 2e-4, 2e-5, 'grad query')
      H.assert_close(g[2], c.grad.reference_points, 2e-4, 2e-5, 'grad reference_points')
      H.assert_close(g[3], c.grad.input_flatten, 2e-4, 2e-5, 'grad input_flatten')
      for _, e in ipairs(m:_paramList()) do
        H.assert_close(e.grad, c.grad.param[e.name], 2e-4, 2e-5, 'grad ' .. e.name)
      end
      -- the module moved back to the CPU gives the same numbers
      local mc = layer(c, 'float32')
      H.assert_close(y, mc:forward(input_of(c, 'float32')), 1e-4, 1e-5, 'GPU vs CPU')
    end)
  end
  it('takes a padding mask and shapes on the GPU', function()
    local c = case('ref4')
    local m = layer(c, 'float32', 'cuda')
    local inp = input_of(c, 'float32', 'cuda')
    inp[4] = c.spatial_shapes:cuda()
    inp[5] = c.level_start_index:cuda()
    inp[6] = c.input_padding_mask:cuda()
    H.assert_close(m:forward(inp), c.output, 2e-4, 2e-5, 'output')
  end)
end)
