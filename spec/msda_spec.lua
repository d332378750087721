-- fa.msda / fa.msda_backward on the CPU: against the PyTorch grid_sample reference (spec/fixtures/gen_msda.py),
-- float64 finite differences, awkward shapes, determinism, and every documented error.
local ffi = require 'ffi'
local fa = require 'fastattn'
local H = require 'helpers.check'
local C = fa.C

local F = H.fixture('msda')
local PAD = { [0] = 'zeros', [1] = 'border' }

local function opts_of(case)
  local mode = F[case .. '/mode']
  return { padding = PAD[mode:get(1)], align_corners = mode:get(2) == 1 }
end

local function inputs(case, dtype)
  local t = {}
  for _, k in ipairs({ 'value', 'sampling_locations', 'attention_weights', 'grad_out' }) do
    t[k] = dtype and F[case .. '/' .. k]:to(dtype) or F[case .. '/' .. k]
  end
  t.spatial_shapes, t.level_start_index = F[case .. '/spatial_shapes'], F[case .. '/level_start_index']
  return t
end

local function run(t, opts)
  local out = fa.msda(t.value, t.spatial_shapes, t.level_start_index, t.sampling_locations, t.attention_weights, opts)
  local gv, gl, ga = fa.msda_backward(t.grad_out, t.value, t.spatial_shapes, t.level_start_index,
    t.sampling_locations, t.attention_weights, opts)
  return out, gv, gl, ga
end

-- 1 where the point's pixel coordinates are at least `gap` px away from an integer (the location gradient
-- jumps there; float32 rounding of the location can move a point across), else 0; shape of grad loc
local function away_mask(loc, shapes, opts, gap)
  local N, Lq, M, L, P = loc:size(1), loc:size(2), loc:size(3), loc:size(4), loc:size(5)
  local l64 = loc:double():contiguous()
  local mask = fa.zeros_like(l64)
  local pl, pm = ffi.cast('double*', l64.desc.data), ffi.cast('double*', mask.desc.data)
  local i = 0
  for _ = 1, N * Lq * M do
    for l = 1, L do
      local Hh, W = shapes:get(l, 1), shapes:get(l, 2)
      for _ = 1, P do
        local ok = true
        for axis = 0, 1 do
          local size = axis == 0 and W or Hh
          local x = opts.align_corners and pl[i + axis] * (size - 1) or pl[i + axis] * size - 0.5
          local f = x - math.floor(x)
          if f < gap or f > 1 - gap then ok = false end
        end
        pm[i], pm[i + 1] = ok and 1 or 0, ok and 1 or 0
        i = i + 2
      end
    end
  end
  return mask
end

local CASES = { 'zn', 'za', 'bn', 'ba', 'odd', 'oddb', 'd4', 'd8', 'd32', 'd64', 'd128' }

describe('fa.msda (CPU)', function()
  for _, case in ipairs(CASES) do
    it('matches the PyTorch grid_sample reference in float64: ' .. case, function()
      local t, opts = inputs(case), opts_of(case)
      local out, gv, gl, ga = run(t, opts)
      H.assert_close(out, F[case .. '/out'], 1e-9, 1e-12, case .. ' out')
      H.assert_close(gv, F[case .. '/grad_value'], 1e-9, 1e-12, case .. ' grad_value')
      H.assert_close(gl, F[case .. '/grad_sampling_locations'], 1e-9, 1e-10, case .. ' grad_sampling_locations')
      H.assert_close(ga, F[case .. '/grad_attention_weights'], 1e-9, 1e-12, case .. ' grad_attention_weights')
    end)
    it('matches the reference in float32: ' .. case, function()
      local t, opts = inputs(case, 'float32'), opts_of(case)
      local out, gv, gl, ga = run(t, opts)
      assert.are.equal('float32', out:dtype())
      H.assert_close(out, F[case .. '/out'], 1e-4, 1e-5, case .. ' out')
      H.assert_close(gv, F[case .. '/grad_value'], 1e-4, 1e-5, case .. ' grad_value')
      H.assert_close(ga, F[case .. '/grad_attention_weights'], 1e-4, 1e-5, case .. ' grad_attention_weights')
      -- location gradient away from the cell edges (float32 locations move points by ~1e-7 px)
      local mask = away_mask(F[case .. '/sampling_locations'], t.spatial_shapes, opts, 1e-4)
      H.assert_close(gl:double() * mask, F[case .. '/grad_sampling_locations'] * mask, 1e-3, 1e-4,
        case .. ' grad_sampling_locations')
    end)
  end

  it('skips the gradients given as false and writes into given buffers', function()
    local t, opts = inputs('zn'), opts_of('zn')
    local out = fa.empty(2, 5, 12, 'float64'):fill(0 / 0)
    local r = fa.msda(t.value, t.spatial_shapes, t.level_start_index, t.sampling_locations, t.attention_weights,
      { out = out })
    assert.are.equal(out, r)
    H.assert_close(out, F['zn/out'], 1e-9, 1e-12, 'out buffer')
    local ga = fa.empty_like(t.attention_weights):fill(0 / 0)
    local gv = fa.empty_like(t.value):fill(0 / 0) -- poisoned: must be overwritten everywhere
    local a, b, c = fa.msda_backward(t.grad_out, t.value, t.spatial_shapes, t.level_start_index,
      t.sampling_locations, t.attention_weights,
      { grad_value = gv, grad_sampling_locations = false, grad_attention_weights = ga })
    assert.is_nil(b)
    assert.are.equal(gv, a)
    assert.are.equal(ga, c)
    H.assert_close(gv, F['zn/grad_value'], 1e-9, 1e-12, 'grad_value buffer')
    H.assert_close(ga, F['zn/grad_attention_weights'], 1e-9, 1e-12, 'grad_attention_weights buffer')
    local _, gl = fa.msda_backward(t.grad_out, t.value, t.spatial_shapes, t.level_start_index, t.sampling_locations,
      t.attention_weights, { grad_value = false, grad_attention_weights = false })
    H.assert_close(gl, F['zn/grad_sampling_locations'], 1e-9, 1e-10, 'grad_sampling_locations alone')
  end)

  it('takes spatial_shapes as a table, level_start_index as nil, int32 tensors, and non-contiguous inputs', function()
    local t = inputs('zn')
    local shapes = t.spatial_shapes:table()
    local out1 = fa.msda(t.value, shapes, nil, t.sampling_locations, t.attention_weights)
    H.assert_close(out1, F['zn/out'], 1e-9, 1e-12, 'table shapes')
    local out2 = fa.msda(t.value, t.spatial_shapes:int(), t.level_start_index:int(), t.sampling_locations,
      t.attention_weights)
    assert.is_true(out2:equal(out1))
    -- non-contiguous views with the same values
    local v = t.value:transpose(1, 2):contiguous():transpose(1, 2)
    local l = t.sampling_locations:transpose(2, 3):contiguous():transpose(2, 3)
    local a = t.attention_weights:transpose(1, 5):contiguous():transpose(1, 5)
    assert.is_false(v:isContiguous() or l:isContiguous() or a:isContiguous())
    assert.is_true(fa.msda(v, shapes, nil, l, a):equal(out1))
    local go = t.grad_out:transpose(1, 2):contiguous():transpose(1, 2)
    local gv, gl, ga = fa.msda_backward(go, v, shapes, nil, l, a)
    local gv2, gl2, ga2 = fa.msda_backward(t.grad_out, t.value, shapes, nil, t.sampling_locations, t.attention_weights)
    assert.is_true(gv:equal(gv2) and gl:equal(gl2) and ga:equal(ga2))
  end)

  it('handles Lq = 0 and N = 0 (grad_value is zeroed)', function()
    local shapes = { { 2, 3 }, { 1, 1 } }
    local value = fa.randn(2, 7, 2, 4, 'float64')
    local loc = fa.rand(2, 0, 2, 2, 3, 2, 'float64')
    local attn = fa.rand(2, 0, 2, 2, 3, 'float64')
    local out = fa.msda(value, shapes, nil, loc, attn)
    assert.are.same({ 2, 0, 8 }, out:size())
    local gv, gl, ga = fa.msda_backward(fa.empty(2, 0, 8, 'float64'), value, shapes, nil, loc, attn,
      { grad_value = fa.empty_like(value):fill(5) })
    assert.is_true(gv:equal(fa.zeros_like(value)))
    assert.are.same({ 2, 0, 2, 2, 3, 2 }, gl:size())
    assert.are.same({ 2, 0, 2, 2, 3 }, ga:size())
    local out0 = fa.msda(fa.randn(0, 7, 2, 4), shapes, nil, fa.rand(0, 5, 2, 2, 3, 2), fa.rand(0, 5, 2, 2, 3))
    assert.are.same({ 0, 5, 8 }, out0:size())
  end)

  it('samples zeros outside and the border pixels with padding=border', function()
    -- one level of 1x2 pixels [10, 20], one point far to the right
    local value = fa.tensor({ { { { 10 } }, { { 20 } } } }, 'float64') -- (1, 2, 1, 1)
    local loc = fa.tensor({ 5, 0.5 }, 'float64'):view(1, 1, 1, 1, 1, 2)
    local attn = fa.ones(1, 1, 1, 1, 1, 'float64')
    assert.are.equal(0, fa.msda(value, { { 1, 2 } }, nil, loc, attn):item())
    assert.are.equal(20, fa.msda(value, { { 1, 2 } }, nil, loc, attn, { padding = 'border' }):item())
    -- a pixel centre samples that pixel exactly: x = 0.25*2 - 0.5 = 0
    loc = fa.tensor({ 0.25, 0.5 }, 'float64'):view(1, 1, 1, 1, 1, 2)
    assert.are.equal(10, fa.msda(value, { { 1, 2 } }, nil, loc, attn):item())
    -- there the x gradient is one-sided: a * W * (v1 - v0) = 20 with zeros padding; with border padding
    -- the border itself counts as clamped (PyTorch): 0
    local go = fa.ones(1, 1, 1, 'float64')
    local _, gl = fa.msda_backward(go, value, { { 1, 2 } }, nil, loc, attn)
    assert.are.equal(20, gl:get(1, 1, 1, 1, 1, 1))
    _, gl = fa.msda_backward(go, value, { { 1, 2 } }, nil, loc, attn, { padding = 'border' })
    assert.are.equal(0, gl:get(1, 1, 1, 1, 1, 1))
    -- align_corners: loc 1 is the last pixel
    loc = fa.tensor({ 1, 0 }, 'float64'):view(1, 1, 1, 1, 1, 2)
    assert.are.equal(20, fa.msda(value, { { 1, 2 } }, nil, loc, attn, { align_corners = true }):item())
  end)

  -- float64 central differences of all three gradients on small shapes, points >= 0.05 px from cell edges
  local function random_case(N, Lq, M, D, shapes, P, opts)
    local L = #shapes
    local S = 0
    for _, hw in ipairs(shapes) do S = S + hw[1] * hw[2] end
    local value = fa.randn(N, S, M, D, 'float64')
    local loc = fa.empty(N, Lq, M, L, P, 2, 'float64')
    local u = fa.rand(N * Lq * M * L * P * 2 * 2, 'float64')
    local pl, pu = ffi.cast('double*', loc.desc.data), ffi.cast('double*', u.desc.data)
    local i = 0
    for _ = 1, N * Lq * M do
      for l = 1, L do
        for _ = 1, P do
          for axis = 0, 1 do
            local size = shapes[l][2 - axis]
            if opts.align_corners and size == 1 then
              pl[i] = pu[2 * i] -- any location is pixel 0
            else
              local k = math.floor(pu[2 * i] * (size + 1)) - 1 -- cell -1 .. size-1
              local x = k + 0.05 + 0.9 * pu[2 * i + 1]
              pl[i] = opts.align_corners and x / (size - 1) or (x + 0.5) / size
            end
            i = i + 1
          end
        end
      end
    end
    local attn = fa.rand(N, Lq, M, L, P, 'float64')
    return value, loc, attn
  end

  for _, mode in ipairs({ { 'zeros', false }, { 'zeros', true }, { 'border', false }, { 'border', true } }) do
    it(string.format('backward matches float64 finite differences (%s, align_corners=%s)', mode[1], tostring(mode[2])),
      function()
        fa.manualSeed(11)
        local opts = { padding = mode[1], align_corners = mode[2] }
        local shapes = { { 3, 4 }, { 2, 2 }, { 1, 1 } }
        local value, loc, attn = random_case(1, 2, 2, 3, shapes, 2, opts)
        local gout = fa.randn(1, 2, 6, 'float64')
        local f = function() return fa.msda(value, shapes, nil, loc, attn, opts) end
        local gv, gl, ga = fa.msda_backward(gout, value, shapes, nil, loc, attn, opts)
        H.assert_close(gv, H.numgrad(f, value, gout), 1e-6, 1e-8, 'grad_value vs numgrad')
        H.assert_close(ga, H.numgrad(f, attn, gout), 1e-6, 1e-8, 'grad_attention_weights vs numgrad')
        H.assert_close(gl, H.numgrad(f, loc, gout), 1e-5, 1e-7, 'grad_sampling_locations vs numgrad')
        -- the location gradient is not trivially zero
        assert.is_true(fa.maxAbsDiff(gl, fa.zeros_like(gl)) > 0.1)
      end)
  end

  it('gives bit-identical backward results with 1 and 2 threads (fused and split paths)', function()
    fa.manualSeed(5)
    local nthreads = fa.getNumThreads()
    local shapes = { { 9, 11 }, { 5, 6 }, { 3, 3 }, { 1, 2 } }
    for _, cfg in ipairs({ { 1, 1, 32 }, { 1, 2, 48 }, { 2, 3, 16 } }) do -- N, M, D (N*M < threads -> split)
      local N, M, D = cfg[1], cfg[2], cfg[3]
      local value, loc, attn = random_case(N, 300, M, D, shapes, 4, {})
      local gout = fa.randn(N, 300, M * D, 'float64')
      local v32, l32, a32, g32 = value:float(), loc:float(), attn:float(), gout:float()
      local res = {}
      for k, th in ipairs({ 1, 2, 3 }) do
        fa.setNumThreads(th)
        res[k] = { fa.msda_backward(g32, v32, shapes, nil, l32, a32) }
        res[k][4] = fa.msda(v32, shapes, nil, l32, a32)
      end
      fa.setNumThreads(nthreads)
      for k = 2, 3 do
        for j = 1, 4 do assert.is_true(res[k][j]:equal(res[1][j]), string.format('cfg %d output %d', k, j)) end
      end
      -- and the float32 results agree with float64
      local gv, gl, ga = fa.msda_backward(gout, value, shapes, nil, loc, attn)
      H.assert_close(res[1][1], gv, 1e-4, 1e-4, 'float32 grad_value')
      H.assert_close(res[1][3], ga, 1e-4, 1e-4, 'float32 grad_attention_weights')
      H.assert_close(res[1][2], gl, 1e-3, 1e-2, 'float32 grad_sampling_locations')
    end
  end)

  describe('errors', function()
    local t = inputs('zn')
    local shapes, lsi = t.spatial_shapes, t.level_start_index
    local v, l, a, go = t.value, t.sampling_locations, t.attention_weights, t.grad_out
    local function fwd_err(pattern, value, sh, ls, loc, attn, opts)
      local ok, msg = pcall(fa.msda, value or v, sh or shapes, ls == nil and lsi or ls, loc or l, attn or a, opts)
      assert.is_false(ok, 'expected an error matching ' .. pattern)
      assert.is_truthy(tostring(msg):find(pattern, 1, true), 'message: ' .. tostring(msg) .. '\nexpected: ' .. pattern)
      assert.is_truthy(tostring(msg):find('fa.msda', 1, true))
    end
    it('level_start_index not matching spatial_shapes', function()
      fwd_err("argument 'level_start_index': expected 30 at level 2", nil, nil, fa.tensor({ 0, 29, 39 }, 'int64'))
      fwd_err("argument 'level_start_index': expected 3 entries", nil, nil, fa.tensor({ 0, 30 }, 'int64'))
    end)
    it('sum(H*W) != S', function()
      fwd_err("argument 'value': expected S = 41", nil, fa.tensor({ { 6, 5 }, { 3, 3 }, { 1, 2 } }, 'int64'))
      fwd_err("argument 'value': expected S = 40 (the sum of H*W of spatial_shapes) in dimension 2, got 39",
        v:narrow(2, 1, 39))
    end)
    it('wrong ranks and trailing sizes', function()
      fwd_err("argument 'value': expected a 4-D tensor", v:view(2, 40, 12))
      fwd_err("argument 'sampling_locations': expected a 6-D tensor", nil, nil, nil, l:view(2, 5, 2, 3, 6))
      fwd_err("argument 'attention_weights': expected a 5-D tensor", nil, nil, nil, nil, a:view(2, 5, 2, 9))
      fwd_err("argument 'spatial_shapes': expected shape (L, 2)", nil, fa.tensor({ { 6, 5, 1 }, { 3, 3, 1 }, { 1, 1, 1 } }, 'int64'))
      fwd_err("argument 'spatial_shapes': expected a 2-D tensor", nil, fa.tensor({ 6, 5 }, 'int64'), fa.tensor({ 0 }, 'int64'))
      fwd_err("with 2 (x, y) = 2 in dimension 6", nil, nil, nil, fa.rand(2, 5, 2, 3, 3, 3, 'float64'))
      fwd_err("argument 'spatial_shapes': expected positive (H, W)", nil, fa.tensor({ { 6, 5 }, { 3, 3 }, { 0, 1 } }, 'int64'),
        fa.tensor({ 0, 30, 39 }, 'int64'))
    end)
    it('mismatched N, M, L, P', function()
      fwd_err("argument 'sampling_locations': expected shape (N, Lq, M, L, P, 2) with N (as dimension 1 of 'value') = 2",
        nil, nil, nil, fa.rand(3, 5, 2, 3, 3, 2, 'float64'))
      fwd_err("with M (as dimension 3 of 'value') = 2 in dimension 3", nil, nil, nil, fa.rand(2, 5, 1, 3, 3, 2, 'float64'))
      fwd_err("with L (the rows of 'spatial_shapes') = 3 in dimension 4", nil, nil, nil, fa.rand(2, 5, 2, 2, 3, 2, 'float64'))
      fwd_err("argument 'attention_weights': expected shape (N, Lq, M, L, P) = (2, 5, 2, 3, 3), got (2, 5, 2, 3, 2)",
        nil, nil, nil, nil, fa.rand(2, 5, 2, 3, 2, 'float64'))
      fwd_err("argument 'attention_weights': expected shape (N, Lq, M, L, P) = (2, 5, 2, 3, 3), got (2, 4, 2, 3, 3)",
        nil, nil, nil, nil, fa.rand(2, 4, 2, 3, 3, 'float64'))
    end)
    it('mixed dtypes, bad dtypes and bad options', function()
      fwd_err("argument 'sampling_locations': expected dtype float64 (as 'value'), got float32", nil, nil, nil, l:float())
      fwd_err("argument 'attention_weights': expected dtype float32 (as 'value'), got float64", v:float(), nil, nil,
        l:float())
      fwd_err("argument 'value': expected float32 or float64 on the CPU, got bfloat16", v:bfloat16(), nil, nil, l:float(),
        a:float())
      fwd_err("argument 'spatial_shapes': expected an int64 or int32 tensor, got float32", nil, shapes:float())
      fwd_err("argument 'opts': expected padding 'zeros' or 'border', got reflection", nil, nil, nil, nil, nil,
        { padding = 'reflection' })
      local ok, msg = pcall(fa.msda, nil, shapes, lsi, l, a)
      assert.is_false(ok)
      assert.is_truthy(msg:find("fa.msda: argument 'value': expected a tensor, got nil", 1, true))
      fwd_err("argument 'out': expected shape (N, Lq, M*D) = (2, 5, 12)", nil, nil, nil, nil, nil,
        { out = fa.empty(2, 5, 11, 'float64') })
    end)
    it('the C entry points require contiguous tensors and CPU shapes', function()
      local out = fa.empty(2, 5, 12, 'float64')
      local vt = v:transpose(1, 2):contiguous():transpose(1, 2)
      assert.are.equal(1, C.fa_msda_forward(out.desc, vt.desc, shapes.desc, lsi.desc, l.desc, a.desc, nil))
      assert.is_truthy(ffi.string(C.fa_last_error()):find("fa_msda_forward: argument 'value': expected a contiguous tensor", 1, true))
      local ot = fa.empty(12, 5, 2, 'float64'):transpose(1, 3)
      assert.are.equal(1, C.fa_msda_forward(ot.desc, v.desc, shapes.desc, lsi.desc, l.desc, a.desc, nil))
      assert.is_truthy(ffi.string(C.fa_last_error()):find("argument 'out': expected a contiguous tensor", 1, true))
      local gl = fa.empty_like(l)
      local ok, msg = pcall(fa.msda_backward, go, v, shapes, lsi, l, a, { grad_sampling_locations = fa.empty(3, 3, 'float64') })
      assert.is_false(ok)
      assert.is_truthy(msg:find("fa.msda_backward: argument 'grad_sampling_locations': expected shape", 1, true))
      ok, msg = pcall(fa.msda_backward, go:narrow(3, 1, 11), v, shapes, lsi, l, a)
      assert.is_false(ok)
      assert.is_truthy(msg:find("fa.msda_backward: argument 'grad_out': expected shape (N, Lq, M*D) = (2, 5, 12)", 1, true))
      ok, msg = pcall(fa.msda_backward, go:float(), v, shapes, lsi, l, a, { grad_sampling_locations = gl })
      assert.is_false(ok)
      assert.is_truthy(msg:find("argument 'grad_out': expected dtype float64 (as 'value'), got float32", 1, true))
      -- nothing was written on error
      local poison = fa.empty_like(v):fill(7)
      ok = pcall(fa.msda_backward, go, v, shapes, fa.tensor({ 0, 1, 2 }, 'int64'), l, a, { grad_value = poison })
      assert.is_false(ok)
      assert.is_true(poison:equal(fa.empty_like(v):fill(7)))
    end)
  end)
end)
