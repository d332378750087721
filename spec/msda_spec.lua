-- fa.msda / fa.msda_backward as a case of spec/helpers/op.lua: PyTorch grid_sample fixtures
-- (spec/fixtures/gen_msda.py), finite differences, threads, errors, and (#gpu) every GPU dtype and kernel
-- variant against the CPU; then what is particular to msda.
local ffi = require 'ffi'
local fa = require 'fastattn'
local H = require 'helpers.check'
local op = require 'helpers.op'

local FX = H.fixture('msda')
local GRADS = { 'value', 'sampling_locations', 'attention_weights' }

local function forward(x, o)
  return fa.msda(x.value, x.spatial_shapes, x.level_start_index, x.sampling_locations, x.attention_weights, o)
end
local function backward(x, gout, o)
  local gv, gl, ga = fa.msda_backward(gout, x.value, x.spatial_shapes, x.level_start_index, x.sampling_locations,
                                      x.attention_weights, o)
  return { value = gv, sampling_locations = gl, attention_weights = ga }
end

-- x in pixels of a level (W for axis 0, H for axis 1) <-> the normalised location, for both conventions
local function to_px(u, size, ac) return ac and u * (size - 1) or u * size - 0.5 end
local function from_px(x, size, ac) return ac and x / (size - 1) or (x + 0.5) / size end

-- shape {N, Lq, M, D, {{H, W}, ...}, P, gap = px, clustered = bool}: points at least `gap` px away from
-- integer pixel coordinates (the location gradient jumps there), some fully outside on either side, every
-- 7th attention weight 0 (it still has a gradient); clustered: every query and head samples where query 1,
-- head 1 does (the GPU's warp merge path, which must not merge different heads)
local function inputs(s, opts)
  local N, Lq, M, D, levels, P = unpack(s)
  local ac, gap, L, S = opts and opts.align_corners, s.gap or 0.01, #levels, 0
  for _, hw in ipairs(levels) do S = S + hw[1] * hw[2] end
  local value = fa.randn(N, S, M, D, 'float64')
  local loc = fa.empty(N, Lq, M, L, P, 2, 'float64')
  local u = fa.rand(math.max(1, 2 * loc:numel()), 'float64')
  local pl, pu = ffi.cast('double*', loc.desc.data), ffi.cast('double*', u.desc.data)
  for i = 0, loc:numel() - 1 do
    local size = levels[math.floor(i / (2 * P)) % L + 1][2 - i % 2]
    if ac and size == 1 then
      pl[i] = pu[2 * i] -- any location is pixel 0
    else
      local cell = math.floor(math.floor(pu[2 * i] * (size + 1.4)) - 1.2) -- -2 .. size
      pl[i] = from_px(cell + gap + (1 - 2 * gap) * pu[2 * i + 1], size, ac)
    end
  end
  if s.clustered then loc = loc:narrow(2, 1, 1):narrow(3, 1, 1):expand(N, Lq, M, L, P, 2):contiguous() end
  local attn = fa.rand(N, Lq, M, L, P, 'float64')
  local pa = ffi.cast('double*', attn.desc.data)
  for k = 3, attn:numel() - 1, 7 do pa[k] = 0 end
  return { value = value, spatial_shapes = levels, sampling_locations = loc, attention_weights = attn }
end

local function fixture(name)
  local f = function(k) return FX[name .. '/' .. k] end
  local mode = f('mode')
  local x = { value = f('value'), spatial_shapes = f('spatial_shapes'), level_start_index = f('level_start_index'),
              sampling_locations = f('sampling_locations'), attention_weights = f('attention_weights') }
  return x, { padding = mode:get(1) == 1 and 'border' or 'zeros', align_corners = mode:get(2) == 1 },
         op.fixture_expect(f, GRADS)
end

-- 1 where the point is at least 1e-4 px away from an integer coordinate: a float32 location moves a point
-- by ~1e-7 px, which may cross the jump of the location gradient
local function away_mask(x, opts, name)
  if name ~= 'sampling_locations' then return nil end
  local loc, shapes = x.sampling_locations:contiguous(), x.spatial_shapes
  local L, P = loc:size(4), loc:size(5)
  local mask = fa.zeros_like(loc)
  local pl, pm = ffi.cast('double*', loc.desc.data), ffi.cast('double*', mask.desc.data)
  for i = 0, loc:numel() - 1, 2 do
    local l = math.floor(i / (2 * P)) % L + 1
    local ok = true
    for axis = 0, 1 do
      local px = to_px(pl[i + axis], shapes:get(l, 2 - axis), opts.align_corners)
      local frac = px - math.floor(px)
      if frac < 1e-4 or frac > 1 - 1e-4 then ok = false end
    end
    pm[i], pm[i + 1] = ok and 1 or 0, ok and 1 or 0
  end
  return mask
end

local MODES = { { padding = 'zeros' }, { align_corners = true }, { padding = 'border' },
                { padding = 'border', align_corners = true } }
local FD = { 1, 2, 2, 3, { { 3, 4 }, { 2, 2 }, { 1, 1 } }, 2, gap = 0.05 }
local LEVELS4 = { { 20, 30 }, { 10, 15 }, { 5, 8 }, { 3, 4 } }
local GPU_SHAPES = {
  { { 3, 1, 3, 32, { { 1, 1 }, { 3, 5 }, { 7, 2 } }, 3 }, what = '1x1 level, odd sizes, Lq 1, N 3' },
  { { 2, 300, 8, 32, LEVELS4, 4 }, what = 'encoder-like: many points per pixel' },
  { { 2, 36, 4, 32, { { 5, 6 }, { 2, 3 } }, 4 }, what = 'Lq = S (encoder self-attention)' },
  { { 1, 36, 2, 16, { { 5, 6 }, { 2, 3 } }, 2, clustered = true }, what = 'Lq = S, clustered' },
  { { 2, 0, 2, 4, { { 2, 3 }, { 1, 1 } }, 3 }, what = 'Lq = 0 (grad value zeroed)' },
  { { 0, 5, 2, 4, { { 2, 3 }, { 1, 1 } }, 3 }, what = 'N = 0' },
  { { 2, 500, 8, 32, LEVELS4, 4 }, variants = { { deterministic = true } }, what = 'deterministic, large' },
  -- the planner's default above the small-problem threshold (cuda/msda.cu: group kernels when the rows x lanes
  -- exceed 256 blocks of 256 threads; below it a warp per row)
  { { 1, 4200, 4, 32, LEVELS4, 4 }, variants = { { name = 'default' } }, what = 'above the small-problem size' },
  { { 1, 5, 2, 4, { { 5, 7 }, { 2, 3 } }, 70 }, what = 'small plan, 140 points per row (several rounds)' },
  { { 1, 3, 1, 3, { { 1, 3 } }, 2 }, what = 'N*S*M*D = 9 (16-bit grad_value cast one element at a time)' },
}
for _, D in ipairs({ 4, 8, 32, 64, 128, 6, 24, 40, 256 }) do
  GPU_SHAPES[#GPU_SHAPES + 1] = { { 2, 37, 2, D, { { 5, 7 }, { 1, 1 }, { 2, 3 } }, 4 }, what = 'D = ' .. D }
end
for i = 2, 4 do
  GPU_SHAPES[#GPU_SHAPES + 1] = { { 2, 19, 3, 16, { { 6, 9 }, { 3, 4 }, { 1, 2 } }, 3 }, opts = MODES[i],
                                  what = MODES[i].padding or 'align_corners' }
end
for _, D in ipairs({ 32, 8, 64 }) do
  GPU_SHAPES[#GPU_SHAPES + 1] = { { 2, 45, 3, D, { { 6, 7 }, { 2, 3 }, { 1, 1 } }, 3, clustered = true },
                                  what = 'clustered, D = ' .. D }
  GPU_SHAPES[#GPU_SHAPES + 1] = { { 1, 33, 2, D, { { 6, 7 }, { 2, 3 } }, 2, clustered = true }, opts = MODES[4],
                                  what = 'clustered, border, align_corners, D = ' .. D }
end

local i64 = function(t) return fa.tensor(t, 'int64') end
local zn = function() local x, _, gout = fixture('zn') return x, gout end
local v, l, a = FX['zn/value'], FX['zn/sampling_locations'], FX['zn/attention_weights']

local CASE = {
  name = 'fa.msda', inputs = inputs, forward = forward, backward = backward, grads = GRADS,
  float32_on_gpu = { sampling_locations = true, attention_weights = true },
  fixture = { names = { 'zn', 'za', 'bn', 'ba', 'odd', 'oddb', 'd4', 'd8', 'd32', 'd64', 'd128' }, load = fixture },
  mask = away_mask,
  gradcheck = {},
  threads = { { shape = { 1, 300, 1, 32, { { 9, 11 }, { 5, 6 }, { 3, 3 }, { 1, 2 } }, 4 } }, -- N*M < threads: split
              { shape = { 1, 300, 2, 48, { { 9, 11 }, { 5, 6 }, { 3, 3 }, { 1, 2 } }, 4 } },
              { shape = { 2, 300, 3, 16, { { 9, 11 }, { 5, 6 }, { 3, 3 }, { 1, 2 } }, 4 }, opts = MODES[4] },
              { shape = { 2, 0, 2, 4, { { 2, 3 }, { 1, 1 } }, 3 } }, { shape = { 0, 5, 2, 4, { { 2, 3 } }, 3 } } },
  gpu = {
    shapes = {},
    variants = { { name = 'default' }, { name = 'deterministic', deterministic = true },
                 { name = 'query order', order = 'query', merge = false },
                 { name = 'head order', order = 'head', merge = false },
                 { name = 'warp merge, query order', order = 'query', merge = true },
                 { name = 'warp merge, head order', order = 'head', merge = true } },
    errors = function() return { -- (made in the #gpu block: they hold GPU tensors)
      base = function()
        local x, gout = zn()
        for k, t in pairs(x) do if k ~= 'spatial_shapes' and k ~= 'level_start_index' then x[k] = t:float():cuda() end end
        return x, gout:float():cuda()
      end,
      { "fa%.msda: argument 'sampling_locations': expected .*on cuda:0 %(as 'value'%), got ",
        { sampling_locations = l:float() } },
      { "fa%.msda: argument 'attention_weights': expected .*on cuda:0 %(as 'value'%), got ",
        { attention_weights = a:float() } },
      { "fa%.msda: argument 'sampling_locations': expected .*float32.*got .*bfloat16",
        { value = v:bfloat16():cuda(), sampling_locations = l:bfloat16():cuda() } },
      { "fa%.msda: argument 'value': expected float32, bfloat16 or float16 on CUDA, got .*float64",
        { value = v:cuda(), sampling_locations = l:cuda(), attention_weights = a:cuda() } },
      { "fa%.msda: argument 'spatial_shapes': .*at most 16 levels on CUDA, got 17",
        { value = fa.randn(1, 17, 1, 4):cuda(), spatial_shapes = fa.ones(17, 2, 'int64'), level_start_index = op.NIL,
          sampling_locations = fa.rand(1, 2, 1, 17, 1, 2):cuda(), attention_weights = fa.rand(1, 2, 1, 17, 1):cuda() } },
      { "fa%.msda_backward: argument 'grad_out': expected .*on cuda:0 %(as 'value'%), got ",
        { gout = fa.randn(2, 5, 12) }, backward = true },
    } end,
  },
  errors = {
    base = zn,
    { "fa%.msda: argument 'value': expected a tensor, got nil", { value = op.NIL } },
    { "fa%.msda: argument 'level_start_index': expected 30 at level 2", { level_start_index = i64({ 0, 29, 39 }) } },
    { "fa%.msda: argument 'level_start_index': expected 3 entries", { level_start_index = i64({ 0, 30 }) } },
    { "fa%.msda: argument 'value': expected S = 41", { spatial_shapes = i64({ { 6, 5 }, { 3, 3 }, { 1, 2 } }) } },
    { "fa%.msda: argument 'value': expected S = 40 .* in dimension 2, got 39", { value = v:narrow(2, 1, 39) } },
    { "fa%.msda: argument 'value': expected a 4%-D tensor", { value = v:view(2, 40, 12) } },
    { "fa%.msda: argument 'sampling_locations': expected a 6%-D tensor", { sampling_locations = l:view(2, 5, 2, 3, 6) } },
    { "fa%.msda: argument 'attention_weights': expected a 5%-D tensor", { attention_weights = a:view(2, 5, 2, 9) } },
    { "fa%.msda: argument 'spatial_shapes': expected shape %(L, 2%)", { spatial_shapes = fa.ones(3, 3, 'int64') } },
    { "fa%.msda: argument 'spatial_shapes': expected a 2%-D tensor",
      { spatial_shapes = i64({ 6, 5 }), level_start_index = i64({ 0 }) } },
    { "fa%.msda: argument 'spatial_shapes': expected positive %(H, W%)",
      { spatial_shapes = i64({ { 6, 5 }, { 3, 3 }, { 0, 1 } }), level_start_index = i64({ 0, 30, 39 }) } },
    { "fa%.msda: argument 'sampling_locations': expected .*2 %(x, y%) = 2 in dimension 6",
      { sampling_locations = fa.rand(2, 5, 2, 3, 3, 3, 'float64') } },
    { "fa%.msda: argument 'sampling_locations': expected .*N %(as dimension 1 of 'value'%) = 2",
      { sampling_locations = fa.rand(3, 5, 2, 3, 3, 2, 'float64') } },
    { "fa%.msda: argument 'sampling_locations': expected .*M %(as dimension 3 of 'value'%) = 2 in dimension 3",
      { sampling_locations = fa.rand(2, 5, 1, 3, 3, 2, 'float64') } },
    { "fa%.msda: argument 'sampling_locations': expected .*L %(the rows of 'spatial_shapes'%) = 3 in dimension 4",
      { sampling_locations = fa.rand(2, 5, 2, 2, 3, 2, 'float64') } },
    { "fa%.msda: argument 'attention_weights': expected shape %(N, Lq, M, L, P%) = %(2, 5, 2, 3, 3%), got .*2%D+5%D+2%D+3%D+2",
      { attention_weights = fa.rand(2, 5, 2, 3, 2, 'float64') } },
    { "fa%.msda: argument 'attention_weights': expected shape %(N, Lq, M, L, P%) = %(2, 5, 2, 3, 3%), got .*2%D+4%D+2%D+3%D+3",
      { attention_weights = fa.rand(2, 4, 2, 3, 3, 'float64') } },
    { "fa%.msda: argument 'sampling_locations': expected .*float64 %(as 'value'%), got .*float32",
      { sampling_locations = l:float() } },
    { "fa%.msda: argument 'attention_weights': expected .*float32 %(as 'value'%), got .*float64",
      { value = v:float(), sampling_locations = l:float() } },
    { "fa%.msda: argument 'value': expected float32 or float64 on the CPU, got .*bfloat16",
      { value = v:bfloat16(), sampling_locations = l:float(), attention_weights = a:float() } },
    { "fa%.msda: argument 'spatial_shapes': expected an int64 or int32 tensor, got .*float32",
      { spatial_shapes = fa.ones(3, 2) } },
    { "fa%.msda: argument '[%w_.]+': expected .*'zeros' or 'border'.*reflection", { opts = { padding = 'reflection' } } },
    { "fa%.msda: argument 'out': expected shape %(N, Lq, M%*D%) = %(2, 5, 12%)",
      { opts = { out = fa.empty(2, 5, 11, 'float64') } } },
    { "fa%.msda: argument 'out': expected a contiguous tensor",
      { opts = { out = fa.empty(12, 5, 2, 'float64'):transpose(1, 3) } } },
    { "fa%.msda_backward: argument 'grad_value': expected a contiguous tensor",
      { opts = { grad_value = fa.empty(6, 40, 2, 2, 'float64'):transpose(1, 4) } }, backward = true },
    { "fa%.msda_backward: argument 'grad_sampling_locations': expected shape",
      { opts = { grad_sampling_locations = fa.empty(3, 3, 'float64') } }, backward = true },
    { "fa%.msda_backward: argument 'grad_out': expected shape %(N, Lq, M%*D%) = %(2, 5, 12%)",
      { gout = FX['zn/grad_out']:narrow(3, 1, 11) }, backward = true },
    { "fa%.msda_backward: argument 'grad_out': expected .*float64 %(as 'value'%), got .*float32",
      { gout = FX['zn/grad_out']:float() }, backward = true },
    { "fa%.msda_backward: argument 'level_start_index': expected 30 at level 2.*got 1",
      { level_start_index = i64({ 0, 1, 2 }) }, backward = true },
  },
  tol = {
    fixture = { float64 = { 1e-9, 1e-12, sampling_locations = { 1e-9, 1e-10 } },
                float32 = { 1e-4, 1e-5, sampling_locations = { 1e-3, 1e-4 } } },
    numgrad = { 1e-6, 1e-8, sampling_locations = { 1e-5, 1e-7 } },
    float32 = { 1e-4, 1e-4, sampling_locations = { 1e-3, 1e-2 } },
    -- the point gradients are float32 sums over channels of exact products of the rounded inputs
    gpu = { float32 = { 2e-5, sampling_locations = 1e-4, attention_weights = 1e-5 },
            bfloat16 = { 1e-2, sampling_locations = 2e-4, attention_weights = 1e-4 },
            float16 = { 2e-3, sampling_locations = 2e-4, attention_weights = 1e-4 } },
  },
}
for _, m in ipairs(MODES) do CASE.gradcheck[#CASE.gradcheck + 1] = { shape = FD, opts = m, what = (m.padding or 'zeros') .. (m.align_corners and ', align_corners' or '') } end
for _, s in ipairs(GPU_SHAPES) do CASE.gpu.shapes[#CASE.gpu.shapes + 1] = { shape = s[1], opts = s.opts, what = s.what,
                                                                          variants = s.variants } end

describe('fa.msda', function()
  op.run(CASE)

  it('takes spatial_shapes as a table or int32, level_start_index as nil', function()
    local x = fixture('zn')
    local out = forward(x)
    local shapes = x.spatial_shapes:table()
    assert.is_true(fa.msda(x.value, shapes, nil, x.sampling_locations, x.attention_weights):equal(out))
    assert.is_true(fa.msda(x.value, x.spatial_shapes:int(), x.level_start_index:int(), x.sampling_locations,
                           x.attention_weights):equal(out))
  end)

  it('samples zeros outside and the border pixels with padding = border (exact values)', function()
    -- one level of 1x2 pixels [10, 20]; a point far to the right
    local value = fa.tensor({ { { { 10 } }, { { 20 } } } }, 'float64') -- (1, 2, 1, 1)
    local at = function(x, y) return fa.tensor({ x, y }, 'float64'):view(1, 1, 1, 1, 1, 2) end
    local attn, go = fa.ones(1, 1, 1, 1, 1, 'float64'), fa.ones(1, 1, 1, 'float64')
    assert.are.equal(0, fa.msda(value, { { 1, 2 } }, nil, at(5, 0.5), attn):item())
    assert.are.equal(20, fa.msda(value, { { 1, 2 } }, nil, at(5, 0.5), attn, { padding = 'border' }):item())
    -- a pixel centre samples that pixel exactly: x = 0.25*2 - 0.5 = 0
    assert.are.equal(10, fa.msda(value, { { 1, 2 } }, nil, at(0.25, 0.5), attn):item())
    -- there the x gradient is one-sided: a * W * (v1 - v0) = 20 with zeros padding; with border padding the
    -- border itself counts as clamped (PyTorch): 0
    local _, gl = fa.msda_backward(go, value, { { 1, 2 } }, nil, at(0.25, 0.5), attn)
    assert.are.equal(20, gl:get(1, 1, 1, 1, 1, 1))
    _, gl = fa.msda_backward(go, value, { { 1, 2 } }, nil, at(0.25, 0.5), attn, { padding = 'border' })
    assert.are.equal(0, gl:get(1, 1, 1, 1, 1, 1))
    -- align_corners: location 1 is the last pixel
    assert.are.equal(20, fa.msda(value, { { 1, 2 } }, nil, at(1, 0), attn, { align_corners = true }):item())
  end)

  op.describe_gpu('fa.msda on CUDA, inputs', function()
    it('takes non-contiguous inputs and spatial shapes on the GPU', function()
      fa.manualSeed(2)
      local x = inputs({ 2, 9, 2, 8, { { 2, 3 }, { 1, 1 } }, 2 })
      local vc, lc, ac = x.value:float():cuda(), x.sampling_locations:float():cuda(), x.attention_weights:float():cuda()
      local out = fa.msda(vc, x.spatial_shapes, nil, lc, ac)
      local vt = vc:transpose(1, 2):contiguous():transpose(1, 2)
      assert.is_false(vt:isContiguous())
      assert.is_true(fa.msda(vt, x.spatial_shapes, nil, lc, ac):cpu():equal(out:cpu()))
      local sh = fa.tensor(x.spatial_shapes, 'int64'):cuda()
      assert.is_true(fa.msda(vc, sh, nil, lc, ac):cpu():equal(out:cpu()))
    end)
  end)
end)

describe('fa.msda outputs that share memory with an input', function()
  -- N=1, S=5 (levels 2x2, 1x1), M=1, D=2, Lq=2, L=2, P=1
  local shapes = { { 2, 2 }, { 1, 1 } }
  local function ins()
    fa.manualSeed(7)
    return fa.randn(1, 5, 1, 2, 'float64'), fa.rand(1, 2, 1, 2, 1, 2, 'float64'), fa.rand(1, 2, 1, 2, 1, 'float64')
  end
  local function raises(pattern, f, ...)
    local ok, err = pcall(f, ...)
    assert.is_false(ok, 'expected an error matching ' .. pattern)
    assert.matches('^spec/msda_spec.lua:%d+: ' .. pattern, tostring(err))
  end
  local OV = ": expected a tensor that shares no memory with argument '%s' %%(the result is written into it%%), " ..
             'got one that overlaps it$'
  it('are refused by the forward (out against every input)', function()
    local v, loc, a = ins()
    raises("fa.msda: argument 'out'" .. OV:format('value'), fa.msda, v, shapes, nil, loc, a,
           { out = v:view(10):narrow(1, 1, 4):view(1, 2, 2) })
    raises("fa.msda: argument 'out'" .. OV:format('sampling_locations'), fa.msda, v, shapes, nil, loc, a,
           { out = loc:view(8):narrow(1, 3, 4):view(1, 2, 2) })
    -- out over the last element of the weights
    local buf = fa.zeros(8, 'float64')
    local a2 = buf:narrow(1, 1, 4):view(1, 2, 1, 2, 1):copy(a)
    raises("fa.msda: argument 'out'" .. OV:format('attention_weights'), fa.msda, v, shapes, nil, loc, a2,
           { out = buf:narrow(1, 4, 4):view(1, 2, 2) })
  end)
  it('are taken when they only share a storage, with the result of a fresh out', function()
    local v, loc, a = ins()
    local want = fa.msda(v, shapes, nil, loc, a)
    local buf = fa.zeros(14, 'float64')
    local v2 = buf:narrow(1, 1, 10):view(1, 5, 1, 2):copy(v)
    local out = buf:narrow(1, 11, 4):view(1, 2, 2)
    assert.are.equal(out, fa.msda(v2, shapes, nil, loc, a, { out = out }))
    assert.is_true(out:equal(want))
    assert.is_true(v2:equal(v))
  end)
  it('are refused by the backward (every gradient against every input and the other gradients)', function()
    local v, loc, a = ins()
    local go = fa.randn(1, 2, 2, 'float64')
    raises("fa.msda_backward: argument 'grad_value'" .. OV:format('value'), fa.msda_backward, go, v, shapes, nil, loc, a,
           { grad_value = v })
    raises("fa.msda_backward: argument 'grad_sampling_locations'" .. OV:format('sampling_locations'), fa.msda_backward,
           go, v, shapes, nil, loc, a, { grad_sampling_locations = loc })
    raises("fa.msda_backward: argument 'grad_attention_weights'" .. OV:format('grad_out'), fa.msda_backward,
           go, v, shapes, nil, loc, a, { grad_attention_weights = go:view(1, 2, 1, 2, 1) })
    local buf = fa.zeros(22, 'float64')
    raises("fa.msda_backward: argument 'grad_sampling_locations'" .. OV:format('grad_value'), fa.msda_backward,
           go, v, shapes, nil, loc, a, { grad_value = buf:narrow(1, 1, 10):view(1, 5, 1, 2),
                                         grad_sampling_locations = buf:narrow(1, 10, 8):view(1, 2, 1, 2, 1, 2) })
    raises("fa.msda_backward: argument 'grad_attention_weights'" .. OV:format('grad_sampling_locations'),
           fa.msda_backward, go, v, shapes, nil, loc, a, { grad_value = false,
             grad_sampling_locations = buf:narrow(1, 1, 8):view(1, 2, 1, 2, 1, 2),
             grad_attention_weights = buf:narrow(1, 8, 4):view(1, 2, 1, 2, 1) })
    -- disjoint parts of one buffer: the gradients of separate buffers
    local gv, gl, ga = fa.msda_backward(go, v, shapes, nil, loc, a)
    local bv, bl, ba = buf:narrow(1, 1, 10):view(1, 5, 1, 2), buf:narrow(1, 11, 8):view(1, 2, 1, 2, 1, 2),
                       buf:narrow(1, 19, 4):view(1, 2, 1, 2, 1)
    fa.msda_backward(go, v, shapes, nil, loc, a, { grad_value = bv, grad_sampling_locations = bl,
                                                   grad_attention_weights = ba })
    assert.is_true(bv:equal(gv))
    assert.is_true(bl:equal(gl))
    assert.is_true(ba:equal(ga))
  end)
end)
