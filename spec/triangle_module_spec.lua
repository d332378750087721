-- nn.TriangleAttention against OpenFold's TriangleAttention (written from its formulas in
-- spec/fixtures/gen_triangle.py), as a case of spec/helpers/op.lua: output and the gradients of z and of every
-- parameter, starting and ending node, select mask (with fully masked rows), OpenFold's additive mask, no mask,
-- in float64 and float32; finite differences; threads; errors. Then the exact additive mask on fully masked rows,
-- the default initialisation, loading an OpenFold state_dict, and the module's own behaviour.
local fa = require 'fastattn'
local H = require 'helpers.check'
local op = require 'helpers.op'
local nn = fa.nn

local FX = H.fixture('triangle')
local CFG = { c_in = 6, c_hidden = 3, no_heads = 2 }
local PARAMS = { 'layer_norm.weight', 'layer_norm.bias', 'linear.weight', 'mha.linear_q.weight', 'mha.linear_k.weight',
                 'mha.linear_v.weight', 'mha.linear_o.weight', 'mha.linear_o.bias', 'mha.linear_g.weight',
                 'mha.linear_g.bias' }
-- fixture case -> the module's options
local CASES = {
  start = { starting = true }, ['end'] = { starting = false },
  start_exact = { starting = true, exact_mask = true }, end_exact = { starting = false, exact_mask = true },
  start_partial = { starting = true, exact_mask = true }, end_partial = { starting = false, exact_mask = true },
  nomask = { starting = false, exact_mask = true },
}

-- the fixture entries of one case, with the prefix removed
local function case(name) return H.fixture_case(FX, name) end

-- CFG with the options o on top
local function config(o) return op.merge(CFG, o) end

local function layer(name, dtype)
  local c = case(name)
  local m = nn.TriangleAttention(config(CASES[name])):to(dtype or 'float64')
  m:loadStateDict(c.param)
  return m, c
end

---------------------------------------------------------------------------- the case: z, the mask and the
-- parameters are the op's inputs (x), the gradients of z and the parameters its gradients
local layers = {}
local function layer_of(x, opts)
  opts = opts or {}
  local w = x['linear.weight']
  local key = w:dtype() .. w:device() .. tostring(opts.starting) .. tostring(opts.exact_mask)
  layers[key] = layers[key] or nn.TriangleAttention(config(opts)):to(w:dtype(), w:device())
  local p = {}
  for _, n in ipairs(PARAMS) do p[n] = x[n] end
  layers[key]:loadStateDict(p)
  return layers[key]
end
local function fixture_inputs(name)
  local c = case(name)
  local x = { z = c.z, mask = c.mask }
  for _, n in ipairs(PARAMS) do x[n] = c.param[n] end
  return x, c
end

local CASE = {
  name = 'nn.TriangleAttention', convention = false,
  grads = { 'z', unpack(PARAMS) },
  inputs = function(name) return (fixture_inputs(name)) end,
  forward = function(x, opts) return layer_of(x, opts):forward({ x.z, x.mask }):clone() end,
  backward = function(x, gout, opts)
    local m, inp = layer_of(x, opts), { x.z, x.mask }
    m:forward(inp)
    m:zeroGradParameters()
    local g = m:backward(inp, gout)
    assert.are.equal(1, #g)
    local r = { z = g[1]:clone() }
    for _, e in ipairs(m:_paramList()) do r[e.name] = e.grad:clone() end
    return r
  end,
  fixture = { names = { 'start', 'end', 'start_partial', 'end_partial', 'nomask' }, load = function(name)
    local x, c = fixture_inputs(name)
    local want = { out = c.output, z = c.grad.z }
    for _, n in ipairs(PARAMS) do want[n] = c.grad.param[n] end
    return x, CASES[name], c.grad_output, want
  end },
  gradcheck = { { shape = 'start', opts = CASES.start, what = 'starting, select mask, a fully masked row' },
                { shape = 'end', opts = CASES['end'], what = 'ending, select mask, a fully masked row' },
                { shape = 'end_partial', opts = CASES.end_partial, what = 'ending, additive mask' } },
  threads = { { shape = 'start', opts = CASES.start }, { shape = 'end_partial', opts = CASES.end_partial } },
  tol = { fixture = { float64 = { 1e-10, 1e-12 }, float32 = { 1e-4, 1e-5 } }, numgrad = { 1e-6, 1e-8 },
          float32 = { 1e-4, 1e-5 } },
}

local function fwd(s) return "fa%.nn%.TriangleAttention:forward: argument " .. s end
CASE.errors = {
  base = function()
    local x, c = fixture_inputs('start')
    for k, t in pairs(x) do if t:isFloatingPoint() then x[k] = t:float() end end
    return x, c.grad_output:float()
  end,
  { fwd "'input%[1%]': expected a tensor, got nil", { z = op.NIL } },
  { fwd "'input%[1%]': expected a tensor of size %(B, N, N, 6%) %(c_in = 6%), got a float32 tensor of size 2x5x5$",
    { z = fa.randn(2, 5, 5) } },
  { fwd "'input%[1%]': expected a tensor of size %(B, N, N, 6%) %(c_in = 6%), got a float32 tensor of size 2x5x4x6",
    { z = fa.randn(2, 5, 4, 6) } },
  { fwd "'input%[1%]': expected a tensor of size %(B, N, N, 6%) %(c_in = 6%), got a float32 tensor of size 2x5x5x7",
    { z = fa.randn(2, 5, 5, 7) } },
  { fwd "'input%[1%]': expected a float32 tensor on cpu %(the module's parameters; convert with :type%(%)/:cuda%(%)%), " ..
        "got a float64 tensor of size 2x5x5x6", { z = fa.randn(2, 5, 5, 6, 'float64') } },
  { fwd "'input%[2%]': expected a mask of size 2x5x5 %(B, N, N, as 'input%[1%]'%) or nil, got a float32 tensor of size 2x5x4",
    { mask = fa.ones(2, 5, 4) } },
  { fwd "'input%[2%]': expected a mask of size 2x5x5 %(B, N, N, as 'input%[1%]'%) or nil, got a float32 tensor of size 1x5x5",
    { mask = fa.ones(1, 5, 5) } },
  { fwd "'input%[2%]': expected a tensor or nil, got \"all\"", { mask = 'all' } },
  { "fa%.nn%.TriangleAttention:backward: argument 'gradOutput': expected a float32 tensor of size 2x5x5x6 %(the output's%), " ..
    "got a float32 tensor of size 2x5x5x5", { gout = fa.randn(2, 5, 5, 5) }, backward = true },
  { "fa%.nn%.TriangleAttention:backward: argument 'gradOutput': expected a float32 tensor of size 2x5x5x6 %(the output's%), " ..
    "got a float64 tensor of size 2x5x5x6", { gout = fa.randn(2, 5, 5, 6, 'float64') }, backward = true },
}

describe('nn.TriangleAttention as an op', function()
  op.run(CASE)
end)

describe('nn.TriangleAttention', function()
  describe("OpenFold's additive mask on fully masked rows (exact_mask = true)", function()
    -- A fully masked row gets inf * (mask - 1) = -1e9 on every score, where the ulp is 1.2e-7: the op adds the
    -- mask term before the pair bias, as OpenFold does, so those scores round as OpenFold's, and the float64
    -- backward takes P from the row's max and sum (not exp(S - lse), lse being off by up to an ulp of 1e9). The
    -- result is OpenFold's softmax of those scores, not the select's mean(V): the whole output and every gradient
    -- (the pair-bias gradient sums over rows) match OpenFold to 1e-10, and the fully masked row is far from the
    -- select's.
    for _, name in ipairs({ 'start_exact', 'end_exact' }) do
      it('matches OpenFold in float64 on fully masked rows too (' .. name .. ')', function()
        local m, c = layer(name)
        local inp = { c.z, c.mask }
        H.assert_close(m:forward(inp), c.output, 1e-10, 1e-12, 'output')
        m:zeroGradParameters()
        H.assert_close(m:backward(inp, c.grad_output)[1], c.grad.z, 1e-10, 1e-12, 'grad z')
        for k, g in pairs(m:namedGradParameters()) do H.assert_close(g, c.grad.param[k], 1e-10, 1e-12, k) end
        -- the fully masked row differs from the select's mean(V) by far more than that
        local sel = case(name:gsub('_exact', ''))
        local a, b = m:forward(inp), sel.output
        local row = name == 'start_exact' and a[2]:select(1, 3) or a[1]:select(2, 4) -- (b, i) = (2, 3) / (b, j) = (1, 4)
        local rowSel = name == 'start_exact' and b[2]:select(1, 3) or b[1]:select(2, 4)
        assert(fa.maxAbsDiff(row, rowSel) > 1e-2, 'the fully masked row should differ from the select mask')
        -- every other row is the select's
        local d = (a - b):abs():max(4):squeeze(4)
        local n = 0
        for bb = 1, 2 do for i = 1, 5 do for j = 1, 5 do
          local full = (name == 'start_exact' and bb == 2 and i == 3) or (name == 'end_exact' and bb == 1 and j == 4)
          if not full then assert(d:get(bb, i, j) < 1e-12, 'row ' .. bb .. ',' .. i .. ',' .. j); n = n + 1 end
        end end end
        assert.are.equal(45, n)
      end)
    end

    it('the select and the additive mask agree where a row has a valid key (float64, 1e-12)', function()
      for _, name in ipairs({ 'start_partial', 'end_partial' }) do
        local m, c = layer(name)
        m.exact_mask = false
        H.assert_close(m:forward({ c.z, c.mask }), c.output, 1e-10, 1e-12, name .. ' with the select mask')
      end
    end)

    it('takes bool and int64 masks (the same result as the float mask)', function()
      for _, name in ipairs({ 'start', 'end_partial' }) do
        local m, c = layer(name)
        for _, dt in ipairs({ 'bool', 'int64', 'int32' }) do
          H.assert_close(m:forward({ c.z, c.mask:to(dt) }), c.output, 1e-10, 1e-12, name .. ' ' .. dt .. ' mask')
        end
      end
    end)

    it('the mask matters (the fixtures are not mask-invariant)', function()
      local m, c = layer('start')
      assert(fa.maxAbsDiff(m:forward({ c.z, c.mask }):clone(), m:forward({ c.z })) > 1e-2)
    end)
  end)

  describe('default initialisation', function()
    it("is OpenFold's (ones/zeros LayerNorm, normal pair bias, glorot q/k/v, gating ones, final zeros)", function()
      fa.manualSeed(5)
      local m = nn.TriangleAttention()
      assert.are.same({ 128, 32, 4, true, 1e9, false }, { m.c_in, m.c_hidden, m.no_heads, m.starting, m.inf, m.exact_mask })
      assert.are.same({ 4, 128 }, m.linear.weight:size())
      for _, n in ipairs({ 'q', 'k', 'v', 'g' }) do assert.are.same({ 128, 128 }, m.mha['linear_' .. n].weight:size()) end
      assert.are.same({ 128, 128 }, m.mha.linear_o.weight:size())
      assert(m.layer_norm.weight:equal(fa.ones(128)))
      assert.are.equal(0, m.layer_norm.bias:abs():max())
      assert.are.equal(0, m.mha.linear_o.weight:abs():max())
      assert.are.equal(0, m.mha.linear_o.bias:abs():max())
      assert.are.equal(0, m.mha.linear_g.weight:abs():max())
      assert(m.mha.linear_g.bias:equal(fa.ones(128)))
      -- linear: kaiming_normal_(nonlinearity = 'linear'): N(0, 1/128), not truncated (512 draws: std within 10%,
      -- some beyond 2 std)
      local w = m.linear.weight:double()
      local std = math.sqrt((w * w):mean())
      assert(math.abs(std * math.sqrt(128) - 1) < 0.1, 'std ' .. std)
      assert(w:abs():max() > 2.2 / math.sqrt(128), 'a normal, not truncated at 2 std')
      -- q/k/v: xavier_uniform_: U(-b, b), b = sqrt(6 / (128 + 128))
      local b = math.sqrt(6 / 256)
      for _, n in ipairs({ 'q', 'k', 'v' }) do
        local a = m.mha['linear_' .. n].weight:abs():max()
        assert(a <= b and a > 0.98 * b, n .. ' bound ' .. a)
      end
      -- linear_o is zero: the layer starts as the identity update 0 (a residual block starts as the identity)
      local z = fa.randn(1, 3, 3, 128)
      assert.are.equal(0, m:forward({ z }):abs():max())
    end)
  end)

  describe('an OpenFold state_dict saved as safetensors', function()
    it('loads with loadStateDict(fa.load(path)) and gives OpenFold\'s float32 output', function()
      local sd = fa.load(H.fixtures_dir .. '/triangle_openfold_state.safetensors')
      local m = nn.TriangleAttention{ c_in = 16, c_hidden = 4, no_heads = 2, starting = false, exact_mask = true }
      local missing, unexpected = m:loadStateDict(sd)
      assert.are.same({}, missing)
      assert.are.same({}, unexpected)
      H.assert_close(m:forward({ FX['sd.z'], FX['sd.mask'] }), FX['sd.output'], 1e-4, 1e-5, 'output')
      -- the names are exactly OpenFold's
      local names = {}
      for k in pairs(m:stateDict()) do names[#names + 1] = k end
      table.sort(names)
      local want = {}
      for k in pairs(sd) do want[#want + 1] = k end
      table.sort(want)
      assert.are.same(want, names)
      local p = {}
      for _, n in ipairs(PARAMS) do p[#p + 1] = n end
      table.sort(p)
      assert.are.same(p, names)
    end)
  end)

  describe('module behaviour', function()
    it('updateGradInput + accGradParameters equal backward; gradients accumulate; scale', function()
      local m, c = layer('end')
      local inp = { c.z, c.mask }
      m:forward(inp)
      m:zeroGradParameters()
      local g1 = m:updateGradInput(inp, c.grad_output)[1]:clone()
      H.assert_close(g1, c.grad.z, 1e-10, 1e-12, 'updateGradInput')
      m:accGradParameters(inp, c.grad_output, 1)
      local _, grads = m:getParameters()
      local once = grads:clone()
      for k, g in pairs(m:namedGradParameters()) do H.assert_close(g, c.grad.param[k], 1e-10, 1e-12, k) end
      m:backward(inp, c.grad_output, 0.5)
      H.assert_close(grads, once * 1.5, 1e-12, 1e-14, 'accumulated grads')
      H.assert_close(m.gradInput[1], c.grad.z, 1e-10, 1e-12, 'gradInput')
    end)

    it('the ending node is the starting node on z and the mask transposed (no copies of z)', function()
      local ms, c = layer('start')
      local me = layer('end')
      local zt = c.z:transpose(2, 3):contiguous()
      local mt = c.mask:transpose(2, 3):contiguous()
      local a = me:forward({ c.z, c.mask }):clone()
      local b = ms:forward({ zt, mt }):transpose(2, 3)
      H.assert_close(a, b, 1e-12, 1e-14, 'ending = starting transposed')
      -- the op saw views of the module's own (B, N, N, H, D) projection and of the caller's mask
      assert.are.equal(me._mask.storage, c.mask.storage)
      assert.is_false(me._q:isContiguous())
    end)

    it('reuses its buffers across calls of one size (no new output or gradient tensors)', function()
      local m, c = layer('start', 'float32')
      local inp = { c.z:float(), c.mask:float() }
      local out = m:forward(inp)
      local g = m:backward(inp, c.grad_output:float())[1]
      local o2 = m:forward(inp)
      local g2 = m:backward(inp, c.grad_output:float())[1]
      local lse = m._lse
      assert.are.equal(out, o2)
      assert.are.equal(g, g2)
      m:forward(inp)
      assert.are.equal(lse, m._lse)
      assert.are.equal('float32', lse:dtype())
    end)

    it('backward before forward, and a backward of another size, are refused', function()
      local m = nn.TriangleAttention(config())
      local z = fa.randn(1, 4, 4, 6)
      local e = H.err_of(function() m:backward({ z }, fa.randn(1, 4, 4, 6)) end)
      H.has(e, 'fa.nn.TriangleAttention:backward: expected the input of the last forward (call forward first)')
      m:forward({ z })
      e = H.err_of(function() m:backward({ fa.randn(1, 5, 5, 6) }, fa.randn(1, 5, 5, 6)) end)
      H.has(e, 'fa.nn.TriangleAttention:backward: expected the input of the last forward (call forward first)')
    end)

    it('rejects bad options and inputs with messages at the caller', function()
      local cases = {
        { function() nn.TriangleAttention{ c_in = 0 } end, "fa.nn.TriangleAttention: argument 'c_in': expected an integer >= 1, got 0" },
        { function() nn.TriangleAttention{ c_hidden = 2.5 } end, "fa.nn.TriangleAttention: argument 'c_hidden': expected an integer >= 1, got 2.5" },
        { function() nn.TriangleAttention{ no_heads = 'four' } end, "fa.nn.TriangleAttention: argument 'no_heads': expected an integer >= 1, got \"four\"" },
        { function() nn.TriangleAttention{ starting = 1 } end, "fa.nn.TriangleAttention: argument 'starting': expected true or false, got 1" },
        { function() nn.TriangleAttention{ inf = -1 } end, "fa.nn.TriangleAttention: argument 'inf': expected a finite positive number, got -1" },
        { function() nn.TriangleAttention{ inf = math.huge } end, "fa.nn.TriangleAttention: argument 'inf': expected a finite positive number, got inf" },
        { function() nn.TriangleAttention{ inf = 0 / 0 } end, "fa.nn.TriangleAttention: argument 'inf': expected a number, got nan" },
        { function() nn.TriangleAttention{ exact_mask = 'yes' } end, "fa.nn.TriangleAttention: argument 'exact_mask': expected true or false, got \"yes\"" },
        { function() nn.TriangleAttention{ heads = 4 } end, "fa.nn.TriangleAttention: argument 'opts': unknown option \"heads\" (known: c_hidden, c_in, exact_mask, inf, no_heads, starting)" },
        { function() nn.TriangleAttention(128) end, "fa.nn.TriangleAttention: argument 'opts': expected a table of options or nil, got 128" },
        { function() nn.TriangleAttention{ c_in = 2 ^ 40 } end, "fa.nn.TriangleAttention: arguments 'c_in', 'c_hidden', 'no_heads': parameters of" },
        { function() nn.TriangleAttention(config())(fa.randn(1, 3, 3, 6)) end, "fa.nn.TriangleAttention:forward: argument 'input': expected a table {z, mask} (mask may be nil), got a float32 tensor of size 1x3x3x6" },
      }
      for _, c in ipairs(cases) do
        local e = H.err_of(c[1])
        H.has(e, c[2])
        assert(e:find('triangle_module_spec.lua', 1, true), 'raised at the caller: ' .. e)
      end
    end)

    it('prints its configuration', function()
      assert.are.equal('nn.TriangleAttention(c_in 6, c_hidden 3, no_heads 2, ending node, exact additive mask)',
                       tostring(nn.TriangleAttention(config(CASES.end_exact))))
      assert.are.equal('nn.TriangleAttention(c_in 128, c_hidden 32, no_heads 4, starting node)',
                       tostring(nn.TriangleAttention()))
    end)
  end)
end)
