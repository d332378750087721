-- nn.DeformableAttention2D against lucidrains' DeformableAttention2D 0.0.20 and its GQA variant, restated in
-- float64 PyTorch in spec/fixtures/gen_deform2d.py, as a case of spec/helpers/op.lua: forward, input gradient
-- and every parameter gradient for num_groups = heads, num_groups 2 and 1, offset_groups < heads, ungrouped
-- projections, downsample factors 2 and 4, a non-square input with both normalisations, zero offsets (the
-- CPB's zero gradient at d == 0); finite differences; threads; errors; GPU against CPU (float32, TF32,
-- bfloat16). Then the constructor's checks (the reference's assertions), initialisation and module behaviour.
local fa = require 'fastattn'
local H = require 'helpers.check'
local op = require 'helpers.op'
local nn = fa.nn

local FX = H.fixture('deform2d')
-- the fixture cases' constructor options (as in gen_deform2d.py)
local CFG = {
  mha = { dim = 16, dim_head = 4, heads = 4, downsample_factor = 2, offset_kernel_size = 4 },
  gqa2 = { dim = 16, dim_head = 4, heads = 4, num_groups = 2, downsample_factor = 4, offset_kernel_size = 6 },
  gqa1 = { dim = 16, dim_head = 4, heads = 4, num_groups = 1, offset_groups = 2, downsample_factor = 2,
           offset_kernel_size = 4 },
  og2 = { dim = 16, dim_head = 4, heads = 4, offset_groups = 2, downsample_factor = 2, offset_kernel_size = 2,
          offset_scale = 1.5 },
  dense = { dim = 12, dim_head = 3, heads = 4, num_groups = 2, offset_groups = 2, downsample_factor = 2,
            offset_kernel_size = 4, group_queries = false, group_key_values = false },
  rect_ref = { dim = 16, dim_head = 4, heads = 2, downsample_factor = 2, offset_kernel_size = 4 },
  rect_cor = { dim = 16, dim_head = 4, heads = 2, downsample_factor = 2, offset_kernel_size = 4,
               normalize = 'corrected' },
  zero = { dim = 8, dim_head = 4, heads = 2, downsample_factor = 2, offset_kernel_size = 2 },
  -- random small configurations (finite differences, threads, GPU): {options, B, H, W}
  gc_rect = { { dim = 8, dim_head = 2, heads = 4, num_groups = 2, offset_groups = 2, downsample_factor = 2,
                offset_kernel_size = 4, normalize = 'corrected' }, 1, 5, 6 },
  gc_gqa1 = { { dim = 8, dim_head = 2, heads = 2, num_groups = 1, downsample_factor = 2, offset_kernel_size = 2 },
              2, 4, 4 },
  gpu_big = { { dim = 32, dim_head = 8, heads = 4, num_groups = 2, downsample_factor = 4 }, 2, 16, 12 },
}
local NAMES = { 'mha', 'gqa2', 'gqa1', 'og2', 'dense', 'rect_ref', 'rect_cor', 'zero' }
local PARAMS = { 'to_offsets.0.weight', 'to_offsets.0.bias', 'to_offsets.2.weight', 'rel_pos_bias.mlp.0.0.weight',
                 'rel_pos_bias.mlp.0.0.bias', 'rel_pos_bias.mlp.1.0.weight', 'rel_pos_bias.mlp.1.0.bias',
                 'rel_pos_bias.mlp.2.weight', 'rel_pos_bias.mlp.2.bias', 'to_q.weight', 'to_k.weight', 'to_v.weight',
                 'to_out.weight', 'to_out.bias' }

local copy = op.merge

-- the fixture entries of a case, with the prefix removed
local function case(name) return H.fixture_case(FX, name) end

local function layer(cfg, dtype, device, params)
  local m = nn.DeformableAttention2D(cfg):to(dtype, device or 'cpu')
  if params then m:loadStateDict(params) end
  return m
end

---------------------------------------------------------------------------- the case: input x and the
-- parameters are the op's inputs, their gradients the op's gradients; the configuration rides in x.cfg
local layers = {}
local function layer_of(x, opts)
  local w = x['to_q.weight']
  local cfg = copy(CFG[x.cfg][1] and CFG[x.cfg][1] or CFG[x.cfg], { dropout = opts and opts.dropout })
  local key = x.cfg .. w:dtype() .. w:device() .. tostring(cfg.dropout)
  layers[key] = layers[key] or layer(cfg, w:dtype(), w:device())
  local p = {}
  for _, n in ipairs(PARAMS) do p[n] = x[n] end
  layers[key]:loadStateDict(p)
  return layers[key]
end

-- a float32 GPU run under TF32 (opts.tf32) or not
local function with_tf32(opts, f)
  if not (opts and opts.tf32) then return f() end
  fa.cuda.allowTF32(true)
  local ok, r = pcall(f)
  fa.cuda.allowTF32(false)
  if not ok then error(r, 0) end
  return r
end

local function fixture_inputs(name)
  local c = case(name)
  local x = { cfg = name, x = c.x }
  for _, n in ipairs(PARAMS) do x[n] = c.param[n] end
  return x, c
end

-- random inputs of a small configuration: the default initialisation perturbed (float64, CPU)
local function random_inputs(name)
  local cfg, B, Hh, W = unpack(CFG[name])
  local m = layer(cfg, 'float64')
  local x = { cfg = name, x = fa.randn(B, cfg.dim, Hh, W, 'float64') }
  local params = m:namedParameters()
  for _, n in ipairs(PARAMS) do x[n] = params[n] + fa.randn(params[n]:size(), 'float64') * 0.2 end -- a fixed draw order
  return x
end

-- the tolerance table of every result: t for each, over[name] where given (every result must be named when t is nil)
local function per_result(t, over)
  local r = { out = over.out or t }
  for _, n in ipairs({ 'x', unpack(PARAMS) }) do r[n] = over[n] or t end
  for n, v in pairs(r) do assert(v, 'no tolerance for ' .. n) end
  return r
end

-- rel_pos_bias.mlp.2.bias's gradient is zero analytically (the bias adds one constant to every key of a row:
-- softmax is invariant to it); the sums over the keys of the attention's bias gradient cancel in it, so its GPU
-- error is judged against S = max over o of sum |grad_bias[:, o]| of the float64 reference, not against max|ref|
-- (float32 rounding of ~1e-15). A gradient of even 1e-3 S fails every dtype's tolerance.
local function zero_grad_scale(name, x, gout)
  if name ~= 'rel_pos_bias.mlp.2.bias' then return nil end
  local m = layer_of(x)
  m:forward(x.x)
  m:zeroGradParameters()
  m:backward(x.x, gout)
  local G = m.offset_groups
  local gb = m._gbias:view(m._gbias:size(1) * G, m.heads / G, -1)
  local S = 0
  for o = 1, m.heads / G do S = math.max(S, gb:narrow(2, o, 1):abs():sum()) end
  assert(S > 0, 'the attention bias gradient is zero: the check would be vacuous')
  return S
end

local CASE = {
  name = 'nn.DeformableAttention2D', convention = false,
  grads = { 'x', unpack(PARAMS) },
  inputs = function(name) return CFG[name][1] and random_inputs(name) or (fixture_inputs(name)) end,
  forward = function(x, opts)
    return with_tf32(opts, function() return layer_of(x, opts):forward(x.x):clone() end)
  end,
  backward = function(x, gout, opts)
    return with_tf32(opts, function()
      local m = layer_of(x, opts)
      m:forward(x.x)
      m:zeroGradParameters()
      local r = { x = m:backward(x.x, gout):clone() }
      for n, g in pairs(m:namedGradParameters()) do r[n] = g:clone() end
      return r
    end)
  end,
  fixture = { names = NAMES, load = function(name)
    local x, c = fixture_inputs(name)
    local want = { out = c.output, x = c.grad.x }
    for _, n in ipairs(PARAMS) do want[n] = c.grad.param[n] end
    return x, nil, c.grad_output, want
  end },
  gradcheck = { { shape = 'gc_rect', what = 'GQA 2, corrected, non-square' },
                { shape = 'gc_gqa1', what = 'one kv head, B 2' } },
  threads = { { shape = 'gc_rect' }, { shape = 'gqa2' } },
  gpu = { shapes = { { shape = 'gqa2', what = 'gqa2' }, { shape = 'rect_ref', what = 'rect' },
                     { shape = 'gpu_big', what = 'dim 32, 16x12' } },
          dtypes = { 'float32', 'bfloat16' }, variants = { { name = 'default' } }, scale = zero_grad_scale },
  -- gpu: |a - ref| <= t (max|ref| + |ref|); rel_pos_bias.mlp.2.bias (zero analytically): |a - ref| <= t S (scale
  -- above). float32: t = 5e-5; S-scaled 2^-23, one float32 ulp of S (emulated: 1.9e-9).
  -- bfloat16: per result 2x the largest t over the gpu shapes of spec/fixtures/emulate_d2d.py (the module's bf16
  -- roundings at the GPU path's places; out keeps 3e-2 >= its 2.7e-2). The offset path (x, to_q.weight,
  -- to_offsets.*) is dominated by jumps: grid_sample's grid gradient is piecewise constant in the key position and
  -- zero outside the image, and a bf16 rounding of q or of the grid moves positions across a cell boundary (in
  -- gqa2 the nearest key is 5e-3 px from one): emulated errors of 0.6 max|ref|, so that check is weak there.
  tol = { fixture = { float64 = { 1e-10, 1e-12 }, float32 = { 2e-4, 2e-5 } }, numgrad = { 1e-5, 1e-7 },
          float32 = { 2e-4, 2e-5 },
          gpu = { float32 = per_result(5e-5, { ['rel_pos_bias.mlp.2.bias'] = 1.2e-7 }),
                  bfloat16 = per_result(nil, {
                    out = 3e-2, x = 1.3, ['to_offsets.0.weight'] = 1.21, ['to_offsets.0.bias'] = 1.02,
                    ['to_offsets.2.weight'] = 1.42, ['rel_pos_bias.mlp.0.0.weight'] = 0.21,
                    ['rel_pos_bias.mlp.0.0.bias'] = 0.30, ['rel_pos_bias.mlp.1.0.weight'] = 0.23,
                    ['rel_pos_bias.mlp.1.0.bias'] = 0.65, ['rel_pos_bias.mlp.2.weight'] = 9.6e-2,
                    ['rel_pos_bias.mlp.2.bias'] = 8.9e-5, ['to_q.weight'] = 1.11, ['to_k.weight'] = 8.9e-2,
                    ['to_v.weight'] = 0.22, ['to_out.weight'] = 8.5e-2, ['to_out.bias'] = 2.8e-3 }) } },
}

-- TF32: the same GPU cases in float32 under fa.cuda.allowTF32(true) (10-bit mantissa products: the convs' GEMMs
-- and the CPB's tensor-core products). Per result 2x the largest t of spec/fixtures/emulate_d2d.py's tf32 mode
-- (those operands rounded to TF32); to_out.bias (a float32 sum over positions, no TF32) and mlp.2.bias (S-scaled)
-- as float32. The CPB's gradients and the offset path have relu flips and position jumps.
local TF32_CASE = { name = 'nn.DeformableAttention2D (TF32)', convention = false, grads = CASE.grads,
  inputs = CASE.inputs, forward = CASE.forward, backward = CASE.backward,
  gpu = { shapes = CASE.gpu.shapes, dtypes = { 'float32' }, variants = { { name = 'tf32', tf32 = true } },
          scale = zero_grad_scale },
  tol = { gpu = { float32 = per_result(nil, {
    out = 1.2e-2, x = 6.8e-2, ['to_offsets.0.weight'] = 6.1e-2, ['to_offsets.0.bias'] = 2.1e-2,
    ['to_offsets.2.weight'] = 1.3e-2, ['rel_pos_bias.mlp.0.0.weight'] = 9.0e-2, ['rel_pos_bias.mlp.0.0.bias'] = 0.12,
    ['rel_pos_bias.mlp.1.0.weight'] = 5.3e-2, ['rel_pos_bias.mlp.1.0.bias'] = 0.16,
    ['rel_pos_bias.mlp.2.weight'] = 1.6e-2, ['rel_pos_bias.mlp.2.bias'] = 1.2e-7, ['to_q.weight'] = 4.9e-2,
    ['to_k.weight'] = 1.9e-2, ['to_v.weight'] = 1.8e-2, ['to_out.weight'] = 1.7e-2, ['to_out.bias'] = 5e-5 }) } } }

local FWD, BWD = 'fa%.nn%.DeformableAttention2D:forward: ', 'fa%.nn%.DeformableAttention2D:backward: '
CASE.errors = {
  base = function()
    local x, c = fixture_inputs('mha')
    for k, t in pairs(x) do if fa.isTensor(t) then x[k] = t:float() end end
    return x, c.grad_output:float()
  end,
  { FWD .. "argument 'input': expected a tensor, got nil", { x = op.NIL } },
  { FWD .. "argument 'input': expected a float32 tensor %(the module's dtype%), got a float64 tensor",
    { x = fa.randn(2, 16, 8, 8, 'float64') } },
  { FWD .. "argument 'input': expected a tensor of size %(B, 16, H, W%) with H, W >= downsample_factor = 2, " ..
    "got a float32 tensor of size 2x15x8x8", { x = fa.randn(2, 15, 8, 8) } },
  { FWD .. "argument 'input': expected a tensor of size %(B, 16, H, W%) .*got a float32 tensor of size 16x8x8",
    { x = fa.randn(16, 8, 8) } },
  { FWD .. "argument 'input': expected a tensor of size %(B, 16, H, W%) with H, W >= downsample_factor = 2, " ..
    "got a float32 tensor of size 2x16x8x1", { x = fa.randn(2, 16, 8, 1) } },
  { BWD .. "argument 'gradOutput': expected a float32 tensor of size 2x16x8x8 %(the output's%), got .*2x16x8x7",
    { gout = fa.randn(2, 16, 8, 7) }, backward = true },
  { BWD .. "argument 'gradOutput': expected a float32 tensor of size 2x16x8x8 %(the output's%), got .*float64",
    { gout = fa.randn(2, 16, 8, 8, 'float64') }, backward = true },
}

describe('nn.DeformableAttention2D as an op', function()
  op.run(CASE)
end)
op.describe_gpu('nn.DeformableAttention2D with TF32', function() op.run(TF32_CASE) end)

local fails = H.fails

describe('nn.DeformableAttention2D', function()
  describe('against the reference', function()
    it('has the reference state_dict names and shapes in every case', function()
      for _, name in ipairs(NAMES) do
        local c = case(name)
        local sd = nn.DeformableAttention2D(CFG[name]):stateDict()
        local names = {}
        for k, v in pairs(sd) do
          names[#names + 1] = k
          assert.are.same(c.param[k]:size(), v:size(), name .. ' ' .. k)
        end
        table.sort(names)
        local want = { unpack(PARAMS) }
        table.sort(want)
        assert.are.same(want, names)
      end
    end)

    it('returns the unnormalised sampling grid (return_vgrid), and its gradient reaches the offset network', function()
      for _, name in ipairs({ 'gqa2', 'rect_cor', 'zero' }) do
        local c = case(name)
        local m = layer(copy(CFG[name], { return_vgrid = true }), 'float64', nil, c.param)
        local y = m:forward(c.x)
        H.assert_close(y[1], c.output, 1e-10, 1e-12, name .. ' output')
        H.assert_close(y[2], c.vgrid, 1e-12, 1e-12, name .. ' vgrid')
        m:zeroGradParameters()
        H.assert_close(m:backward(c.x, { c.grad_output }), c.grad.x, 1e-10, 1e-12, name .. ' grad x, gvgrid nil')
      end
      -- d <vgrid, gv> / d to_offsets.2.weight against finite differences
      local c = case('gqa1')
      local m = layer(copy(CFG.gqa1, { return_vgrid = true }), 'float64', nil, c.param)
      local y = m:forward(c.x)
      local gv = fa.randn(y[2]:size(), 'float64')
      m:zeroGradParameters()
      m:backward(c.x, { fa.zeros_like(y[1]), gv })
      local w = m.to_offsets.modules[3].weight
      local num = H.numgrad(function() return m:forward(c.x)[2]:clone() end, w, gv)
      H.assert_close(m.to_offsets.modules[3].gradWeight, num, 1e-6, 1e-8, 'vgrid path')
      assert(H.maxabs(num) > 1e-3)
    end)

    it("normalize = 'corrected' differs from the reference on non-square inputs only", function()
      local c = case('rect_ref')
      local a = layer(CFG.rect_ref, 'float64', nil, c.param):forward(c.x)
      local b = layer(CFG.rect_cor, 'float64', nil, c.param):forward(c.x)
      assert(fa.maxAbsDiff(a, b) > 1e-3, 'non-square: the normalisations must differ')
      local sq = c.x:narrow(4, 1, 6):contiguous()
      H.assert_close(layer(CFG.rect_ref, 'float64', nil, c.param):forward(sq),
                     layer(CFG.rect_cor, 'float64', nil, c.param):forward(sq), 0, 0, 'square')
    end)

    it('num_groups < heads equals num_groups = heads with each kv head repeated (repeat_interleave)', function()
      -- the ungrouped case: to_k/to_v rows of kv head h // 2 copied to query head h
      local c = case('dense')
      local p4 = copy(c.param)
      for _, n in ipairs({ 'to_k.weight', 'to_v.weight' }) do
        local w = c.param[n]                             -- (2*3, 12, 1, 1)
        local r = fa.empty(4 * 3, 12, 1, 1, 'float64')
        for h = 0, 3 do r:narrow(1, h * 3 + 1, 3):copy(w:narrow(1, math.floor(h / 2) * 3 + 1, 3)) end
        p4[n] = r
      end
      local m4 = layer(copy(CFG.dense, { num_groups = 4 }), 'float64', nil, p4)
      H.assert_close(m4:forward(c.x), c.output, 1e-12, 1e-14, 'repeated kv heads')
    end)

    it('loads the reference weights through a safetensors round trip', function()
      local c = case('gqa1')
      local m = layer(CFG.gqa1, 'float64', nil, c.param)
      local path = os.tmpname()
      fa.save(path, m:stateDict())
      local m2 = layer(CFG.gqa1, 'float64', nil, fa.load(path))
      os.remove(path)
      H.assert_close(m2:forward(c.x), c.output, 1e-10, 1e-12, 'output after reload')
    end)
  end)

  describe('constructor', function()
    it('defaults to the reference defaults', function()
      local m = nn.DeformableAttention2D{ dim = 32 }
      assert.are.same({ 64, 8, 8, 0, 4, 4, 8, 6, true, true, 'reference', false },
                      { m.dim_head, m.heads, m.num_groups, m.dropout, m.downsample_factor, m.offset_scale,
                        m.offset_groups, m.offset_kernel_size, m.group_queries, m.group_key_values, m.normalize,
                        m.return_vgrid })
      assert.are.same({ 512, 4, 1, 1 }, m.to_q.weight:size())     -- groups = offset_groups = 8
      assert.are.same({ 64, 1, 6, 6 }, m.to_offsets.modules[1].weight:size())
      assert.are.same({ 8, 2 }, m.rel_pos_bias.mlp.modules[1].modules[1].weight:size()) -- hidden dim/4
      assert.are.same({ 1, 8 }, m.rel_pos_bias.mlp.modules[3].weight:size())            -- heads/offset_groups
      local g = nn.DeformableAttention2D{ dim = 512, num_groups = 2 }
      assert.are.same({ 128, 64, 1, 1 }, g.to_k.weight:size()) -- the README's GQA layer: Conv2d(512, 128, groups=8)
      assert.matches('DeformableAttention2D%(dim 512, heads 8 x 64, kv heads 2', tostring(g))
    end)

    it('initialises as PyTorch: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for every weight and bias', function()
      fa.manualSeed(5)
      local m = nn.DeformableAttention2D{ dim = 64, dim_head = 16, heads = 4, num_groups = 2 }
      local fan = { ['to_offsets.0.weight'] = 36, ['to_offsets.0.bias'] = 36, ['to_offsets.2.weight'] = 16,
                    ['rel_pos_bias.mlp.0.0.weight'] = 2, ['rel_pos_bias.mlp.0.0.bias'] = 2,
                    ['rel_pos_bias.mlp.1.0.weight'] = 16, ['rel_pos_bias.mlp.1.0.bias'] = 16,
                    ['rel_pos_bias.mlp.2.weight'] = 16, ['rel_pos_bias.mlp.2.bias'] = 16, ['to_q.weight'] = 16,
                    ['to_k.weight'] = 16, ['to_v.weight'] = 16, ['to_out.weight'] = 64, ['to_out.bias'] = 64 }
      for n, p in pairs(m:namedParameters()) do
        local bound = 1 / math.sqrt(fan[n])
        local mx = H.maxabs(p)
        assert(mx <= bound and (mx > 0.5 * bound or p:numel() < 4), n .. ': max ' .. mx .. ', bound ' .. bound)
      end
    end)

    it("raises the reference's assertions and its implicit requirements", function()
      local E = "fa%.nn%.DeformableAttention2D: argument "
      fails(E .. "'offset_kernel_size': expected an integer >= downsample_factor = 4, got 2", function()
        nn.DeformableAttention2D{ dim = 16, offset_kernel_size = 2 } end)
      fails(E .. "'offset_kernel_size': expected downsample_factor = 4 plus an even number, got 7", function()
        nn.DeformableAttention2D{ dim = 16, offset_kernel_size = 7 } end)
      fails(E .. "'offset_groups': expected a divisor of heads = 8, got 3", function()
        nn.DeformableAttention2D{ dim = 24, offset_groups = 3 } end)
      fails(E .. "'dim': expected a multiple of offset_groups = 8, got 12", function()
        nn.DeformableAttention2D{ dim = 12 } end)
      fails(E .. "'num_groups': expected a divisor of heads = 8, got 3", function()
        nn.DeformableAttention2D{ dim = 16, num_groups = 3 } end)
      fails(E .. "'num_groups': expected a value with dim_head %* num_groups a multiple of offset_groups = 8 %(group_key_values; dim_head = 2%), got 2",
            function() nn.DeformableAttention2D{ dim = 16, dim_head = 2, num_groups = 2 } end)
      -- the same without grouped keys and values is fine
      nn.DeformableAttention2D{ dim = 16, dim_head = 2, num_groups = 2, group_key_values = false }
      fails(E .. "'dim': expected an integer >= 4, got nil", function() nn.DeformableAttention2D{} end)
      fails(E .. "'dim': expected an integer >= 4, got 2", function() nn.DeformableAttention2D{ dim = 2, heads = 1 } end)
      fails(E .. "'heads': expected an integer >= 1, got 2%.5", function() nn.DeformableAttention2D{ dim = 16, heads = 2.5 } end)
      fails(E .. "'dropout': expected a probability in %[0, 1%), got 1", function()
        nn.DeformableAttention2D{ dim = 16, dropout = 1 } end)
      fails(E .. "'normalize': expected 'reference' or 'corrected', got \"fixed\"", function()
        nn.DeformableAttention2D{ dim = 16, normalize = 'fixed' } end)
      fails(E .. "'offset_scale': expected a finite number, got inf", function()
        nn.DeformableAttention2D{ dim = 16, offset_scale = math.huge } end)
      fails(E .. "'opts': unknown option \"num_group\"", function() nn.DeformableAttention2D{ dim = 16, num_group = 2 } end)
    end)
  end)

  describe('module behaviour', function()
    it('updateGradInput + accGradParameters equal backward; gradients accumulate; scale', function()
      local c = case('gqa1')
      H.assert_grad_parts(layer(CFG.gqa1, 'float64', nil, c.param), c.x, c.grad_output, c.grad.x, c.grad.param,
                          1e-10, 1e-12)
    end)

    it('reuses its buffers across calls of the same size', function()
      local c = case('mha')
      H.assert_reuses_buffers(layer(CFG.mha, 'float64', nil, c.param), c.x, c.grad_output,
                              { '_bias', '_kpos', '_gbias', '_gkpos' })
    end)

    it('batches: each sample as alone', function()
      local c = case('gqa1')
      H.assert_sample_alone(layer(CFG.gqa1, 'float64', nil, c.param), c.x, 1e-12, 1e-14)
    end)

    it('dropout: in training it drops attention weights (seeded), backward matches finite differences; ' ..
       'evaluate() turns it off', function()
      local x = random_inputs('gc_gqa1')
      local p = {}
      for _, n in ipairs(PARAMS) do p[n] = x[n] end
      local cfg = copy(CFG.gc_gqa1[1], { dropout = 0.3 })
      local m = layer(cfg, 'float64', nil, p)
      local plain = layer(CFG.gc_gqa1[1], 'float64', nil, p):forward(x.x):clone()
      local f = function() fa.manualSeed(7); return m:forward(x.x):clone() end
      local y = f()
      assert(fa.maxAbsDiff(y, plain) > 1e-3, 'dropout changes the output')
      local gout = fa.randn(y:size(), 'float64')
      f()
      m:zeroGradParameters()
      local gx = m:backward(x.x, gout):clone()
      H.assert_close(gx, H.numgrad(f, x.x, gout), 1e-5, 1e-7, 'grad x with dropout')
      m:evaluate()
      H.assert_close(m:forward(x.x), plain, 1e-12, 1e-14, 'evaluate')
    end)

    it('raises module errors at the caller', function()
      local c = case('mha')
      local m = layer(CFG.mha, 'float64', nil, c.param)
      fails("fa%.nn%.DeformableAttention2D:backward: expected the input of the last forward %(call forward first%)",
            function() m:backward(c.x, c.grad_output) end)
      m:forward(c.x)
      fails("fa%.nn%.DeformableAttention2D:backward: expected the input of the last forward",
            function() m:backward(c.x:narrow(1, 1, 1), c.grad_output:narrow(1, 1, 1)) end)
      local mv = layer(copy(CFG.mha, { return_vgrid = true }), 'float64', nil, c.param)
      mv:forward(c.x)
      fails("fa%.nn%.DeformableAttention2D:backward: argument 'gradOutput': expected a table {gradOutput, " ..
            "gradVgrid or nil} %(return_vgrid%), got a float64 tensor", function() mv:backward(c.x, c.grad_output) end)
      fails("fa%.nn%.DeformableAttention2D:backward: argument 'gradOutput': expected a float64 tensor of size " ..
            "8x2x4x4 %(the sampling grid%)", function() mv:backward(c.x, { c.grad_output, fa.zeros(8, 2, 4, 3, 'float64') }) end)
      fails("fa%.nn%.DeformableAttention2D:accGradParameters: call updateGradInput before accGradParameters",
            function() layer(CFG.mha, 'float64', nil, c.param):accGradParameters(c.x, c.grad_output) end)
    end)
  end)
end)
