-- fa.deform_sdpa / fa.deform_sdpa_backward as a case of spec/helpers/op.lua: PyTorch fixtures of the grid_sample
-- formulation (spec/fixtures/gen_deform_sdpa.py: points on pixel centres, half-pixel lines, the borders, partly
-- and wholly outside), float64 finite differences of all four gradients, threads, errors; then what is
-- particular to the op (lse, points wholly outside, pixel-exact points, the layout of the keys).
local fa = require 'fastattn'
local H = require 'helpers.check'
local op = require 'helpers.op'

local FX = H.fixture('deform_sdpa')
local GRADS = { 'q', 'k', 'v', 'coords' }

local function forward(x, o)
  return (fa.deform_sdpa(x.q, x.k, x.v, x.coords, x.W, x.H, x.scale, o))
end
-- (out and lse: the forward's, or x.out and x.lse when given)
local function backward(x, gout, o)
  local out, lse = x.out, x.lse
  if not out then
    out, lse = fa.deform_sdpa(x.q, x.k, x.v, x.coords, x.W, x.H, x.scale, o and { deterministic = o.deterministic })
  end
  local r = { fa.deform_sdpa_backward(gout, x.q, x.k, x.v, x.coords, x.W, x.H, x.scale, out, lse, o) }
  local t = {}
  for i, n in ipairs(GRADS) do t[n] = r[i] end
  return t
end

-- shape {B, V, NH, W, H, S, D}: q, k, v normal, coords uniform in [-0.2, 1.2] (some points partly outside)
local function inputs(s)
  local B, V, NH, W, Hh, S, D = unpack(s)
  return { q = fa.randn(B, V, NH, W * Hh, D, 'float64'), k = fa.randn(B, V, NH, W * Hh, D, 'float64'),
           v = fa.randn(B, V, NH, W * Hh, D, 'float64'),
           coords = fa.rand(B, V, W * Hh, V, S, 2, 'float64') * 1.4 - 0.2,
           W = W, H = Hh, scale = D > 0 and 1 / math.sqrt(D) or 1 }
end

local function fixture(name)
  local f = function(k) return FX[name .. '/' .. k] end
  local size = f('size')
  local x = { q = f('q'), k = f('k'), v = f('v'), coords = f('coords'), W = size:get(1), H = size:get(2),
              scale = size:get(3) }
  return x, nil, op.fixture_expect(f, GRADS)
end

local small = function() local x, _, gout = fixture('small') return x, gout end
local S = function(k) return FX['small/' .. k] end
local f64 = function(...) return fa.empty({ ... }, 'float64') end
-- small: B 1, V 2, NH 2, W 5, H 3 (L 15), S 3, D 4

local CASE = {
  name = 'fa.deform_sdpa', inputs = inputs, forward = forward, backward = backward, grads = GRADS,
  fixture = { names = { 'small', 'edges', 'single', 'line', 'wide' }, load = fixture },
  gradcheck = { { shape = { 1, 2, 2, 4, 3, 3, 5 }, what = 'B 1, V 2, heads 2, 4x3, S 3, D 5' },
                { shape = { 2, 1, 1, 3, 5, 1, 3 }, what = 'V 1, S 1, B 2' },
                { shape = { 1, 3, 1, 5, 1, 2, 2 }, what = 'H 1' } },
  threads = { { shape = { 1, 3, 2, 6, 5, 4, 16 } },   -- parallel in both passes
              { shape = { 2, 2, 3, 7, 3, 5, 9 } },
              { shape = { 1, 1, 1, 9, 9, 2, 8 } },    -- one key map: pass 2 on one thread
              { shape = { 0, 2, 2, 3, 3, 2, 4 } }, { shape = { 1, 2, 2, 3, 3, 0, 4 } },
              { shape = { 1, 2, 0, 3, 3, 2, 4 } }, { shape = { 1, 2, 2, 3, 3, 2, 0 } } },
  errors = {
    base = function() -- with the forward's results, so that the backward's checks run on bad inputs
      local x, gout = small()
      x.out, x.lse = fa.deform_sdpa(x.q, x.k, x.v, x.coords, x.W, x.H, x.scale)
      return x, gout
    end,
    { "fa%.deform_sdpa: argument 'q': expected a tensor, got nil", { q = op.NIL } },
    { "fa%.deform_sdpa: argument 'coords': expected a tensor, got 3", { coords = 3 } },
    { "fa%.deform_sdpa: argument 'W': expected an integer in 1%.%.%d+, got 4%.5", { W = 4.5 } },
    { "fa%.deform_sdpa: argument 'H': expected an integer in 1%.%.%d+, got 0", { H = 0 } },
    { "fa%.deform_sdpa: argument 'W': expected an integer in 1%.%.%d+, got nan", { W = 0 / 0 } },
    { "fa%.deform_sdpa: argument 'scale': expected a number, got \"s\"", { scale = 's' } },
    { "fa%.deform_sdpa: argument 'scale': expected a finite number, got inf", { scale = math.huge } },
    { "fa%.deform_sdpa: argument 'q': expected a 5%-D tensor, got a 4%-D tensor", { q = S('q'):view(2, 2, 15, 4) } },
    { "fa%.deform_sdpa: argument 'q': expected float32 or float64 on the CPU, got int64",
      { q = fa.zeros(1, 2, 2, 15, 4, 'int64') } },
    { "fa%.deform_sdpa: argument 'k': expected dtype float64 %(as 'q'%), got float32", { k = S('k'):float() } },
    { "fa%.deform_sdpa: argument 'v': expected shape %(1, 2, 2, 15, 4%) %(as 'q'%), got %(1, 2, 2, 15, 3%)",
      { v = f64(1, 2, 2, 15, 3) } },
    { "fa%.deform_sdpa: argument 'k': expected shape %(1, 2, 2, 15, 4%) %(as 'q'%), got %(1, 2, 1, 15, 4%)",
      { k = f64(1, 2, 1, 15, 4) } },
    { "fa%.deform_sdpa: argument 'q': expected H%*W = 12 rows in dimension 4 %(W = 4, H = 3%), got shape %(1, 2, 2, 15, 4%)",
      { W = 4 } },
    { "fa%.deform_sdpa: argument 'coords': expected a 6%-D tensor", { coords = S('coords'):view(2, 15, 2, 3, 2) } },
    { "fa%.deform_sdpa: argument 'coords': expected shape %(B, V, H%*W, V, S, 2%) for 'q' %(B, V, heads, H%*W, D%) = %(1, 2, 15, 2, 3, 2%), got %(1, 2, 15, 1, 3, 2%)",
      { coords = f64(1, 2, 15, 1, 3, 2) } },
    { "fa%.deform_sdpa: argument 'coords': expected shape .* = %(1, 2, 15, 2, 3, 2%), got %(1, 2, 15, 2, 3, 3%)",
      { coords = f64(1, 2, 15, 2, 3, 3) } },
    { "fa%.deform_sdpa: argument 'coords': expected dtype float64 %(as 'q' on the CPU%), got float32",
      { coords = S('coords'):float() } },
    { "fa%.deform_sdpa: argument 'opts.out': expected shape %(1, 2, 2, 15, 4%) %(as 'q'%), got %(1, 2, 2, 15, 5%)",
      { opts = { out = f64(1, 2, 2, 15, 5) } } },
    { "fa%.deform_sdpa: argument 'opts.out': expected dtype float64 %(as 'q'%), got float32",
      { opts = { out = fa.empty(1, 2, 2, 15, 4) } } },
    { "fa%.deform_sdpa: argument 'opts.out': expected a contiguous tensor",
      { opts = { out = f64(4, 2, 2, 15, 1):transpose(1, 5) } } },
    { "fa%.deform_sdpa: argument 'opts.out': expected a tensor that shares no memory with argument 'v'",
      { opts = { out = S('v') } } },
    { "fa%.deform_sdpa: argument 'opts.lse': expected dtype float64 %(for float64 inputs%), got float32",
      { opts = { lse = fa.empty(1, 2, 2, 15) } } },
    { "fa%.deform_sdpa: argument 'opts.lse': expected shape %(B, V, heads, H%*W%) as 'q' without D = %(1, 2, 2, 15%), got %(1, 2, 2, 14%)",
      { opts = { lse = f64(1, 2, 2, 14) } } },
    { "fa%.deform_sdpa: argument 'opts.lse': expected a tensor or nil, got \"l\"", { opts = { lse = 'l' } } },
    { "fa%.deform_sdpa: argument 'opts': unknown option \"grad_q\"", { opts = { grad_q = false } } },
    { "fa%.deform_sdpa: argument 'opts.deterministic': expected true or false, got 1", { opts = { deterministic = 1 } } },
    { "fa%.deform_sdpa_backward: argument 'grad_out': expected a tensor, got \"g\"", { gout = 'g' }, backward = true },
    { "fa%.deform_sdpa_backward: argument 'grad_out': expected shape %(1, 2, 2, 15, 4%) %(as 'q'%), got %(1, 2, 2, 4, 15%)",
      { gout = f64(1, 2, 2, 4, 15) }, backward = true },
    { "fa%.deform_sdpa_backward: argument 'grad_out': expected dtype float64 %(as 'q'%), got float32",
      { gout = fa.empty(1, 2, 2, 15, 4) }, backward = true },
    { "fa%.deform_sdpa_backward: argument 'coords': expected dtype float64", { coords = S('coords'):float() },
      backward = true },
    { "fa%.deform_sdpa_backward: argument 'lse': expected dtype float64 %(for float64 inputs%), got float32",
      { lse = fa.empty(1, 2, 2, 15) }, backward = true },
    { "fa%.deform_sdpa_backward: argument 'out': expected shape %(1, 2, 2, 15, 4%) %(as 'q'%), got %(1, 2, 2, 15%)",
      { out = f64(1, 2, 2, 15) }, backward = true },
    { "fa%.deform_sdpa_backward: argument 'W': expected an integer in 1%.%.%d+, got %-1", { W = -1 }, backward = true },
    { "fa%.deform_sdpa_backward: argument 'opts.grad_coords': expected shape %(1, 2, 15, 2, 3, 2%) %(as 'coords'%), got %(1, 2, 15, 2, 3, 1%)",
      { opts = { grad_coords = f64(1, 2, 15, 2, 3, 1) } }, backward = true },
    { "fa%.deform_sdpa_backward: argument 'opts.grad_k': expected dtype float64 %(as 'k'%), got float32",
      { opts = { grad_k = fa.empty(1, 2, 2, 15, 4) } }, backward = true },
    { "fa%.deform_sdpa_backward: argument 'opts.grad_v': expected a contiguous tensor",
      { opts = { grad_v = f64(4, 2, 2, 15, 1):transpose(1, 5) } }, backward = true },
    { "fa%.deform_sdpa_backward: argument 'opts.grad_q': expected a tensor, got true", { opts = { grad_q = true } },
      backward = true },
    { "fa%.deform_sdpa_backward: argument 'opts': unknown option \"out\"", { opts = { out = f64(1, 2, 2, 15, 4) } },
      backward = true },
    { "fa%.deform_sdpa_backward: argument 'opts.grad_q': expected a tensor that shares no memory with argument 'q'",
      { opts = { grad_q = S('q') } }, backward = true },
    { "fa%.deform_sdpa_backward: argument 'opts.grad_v': expected a tensor that shares no memory with argument 'grad_out'",
      { opts = { grad_v = S('grad_out') } }, backward = true },
  },
  tol = {
    fixture = { float64 = { 1e-10, 1e-12 }, float32 = { 1e-4, 1e-5, coords = { 1e-3, 1e-4 } } },
    numgrad = { 1e-6, 1e-8 },
    float32 = { 1e-4, 1e-5, coords = { 1e-3, 1e-4 } },
    -- 16-bit: out is rounded to the dtype, and the backward's delta = <grad_out, out> reads that rounded out
    gpu = { float32 = { out = 2e-5, q = 2e-5, k = 2e-5, v = 2e-5, coords = 1e-4 }, bfloat16 = 1e-2, float16 = 2e-3 },
  },
  float32_on_gpu = { coords = true },
  -- shape {B, V, heads, W, H, S, D}
  gpu = {
    shapes = { { shape = { 1, 1, 2, 5, 3, 1, 8 }, what = 'V 1, S 1, D 8' },
               { shape = { 2, 3, 3, 7, 5, 4, 32 }, what = 'odd 7x5, 3 heads, D 32' },
               { shape = { 1, 2, 8, 9, 7, 5, 64 }, what = '9x7, 8 heads, D 64' },
               { shape = { 1, 2, 2, 6, 5, 3, 128 }, what = 'D 128' },
               { shape = { 1, 2, 1, 5, 3, 2, 256 }, what = 'D 256' },
               { shape = { 2, 2, 3, 4, 3, 2, 20 }, what = 'D 20 (float16/bfloat16: no 16-byte vectors)' },
               { shape = { 1, 1, 1, 1, 1, 3, 4 }, what = '1x1 map' },
               { shape = { 1, 3, 70, 3, 3, 2, 16 }, what = '70 heads (two head tiles: coords partials)' },
               { shape = { 2, 4, 4, 18, 18, 8, 32 }, what = '18x18, 8 samples x 4 views, D 32' },
               { shape = { 1, 2, 2, 3, 3, 0, 8 }, what = 'S 0' }, { shape = { 1, 2, 0, 3, 3, 2, 8 }, what = 'heads 0' },
               { shape = { 1, 2, 2, 3, 3, 2, 0 }, what = 'D 0' } },
    variants = { { name = 'default' }, { name = 'deterministic', deterministic = true } },
    -- with one sampled key (V = S = 1) P = 1 and dS = dP - delta = 0, so grad_q = scale dS k and grad_k (the
    -- bilinear weights times scale dS q) are 0 analytically (the float64 reference ~1e-16): judged against the
    -- size of the cancelling terms dP = <dO, v_n>, delta = <dO, O>: scale * max_row sum_d |dO_d O_d| * max|k| (or |q|)
    scale = function(k, x, gout)
      if (k ~= 'q' and k ~= 'k') or x.coords:size(4) * x.coords:size(5) ~= 1 then return nil end
      local out = fa.deform_sdpa(x.q, x.k, x.v, x.coords, x.W, x.H, x.scale)
      local other = k == 'q' and x.k or x.q
      return x.scale * (gout:abs() * out:abs()):sum(5):max() * other:abs():max()
    end,
  },
}

-- (out, lse) of the four fixture inputs
local function run_fx(name, dtype)
  local x = fixture(name)
  local c = function(t) return t:to(dtype) end
  return fa.deform_sdpa(c(x.q), c(x.k), c(x.v), c(x.coords), x.W, x.H, x.scale)
end

describe('fa.deform_sdpa', function()
  op.run(CASE)

  it('saves the log-sum-exp of the scores (the PyTorch fixtures)', function()
    for _, name in ipairs({ 'small', 'edges', 'single', 'line', 'wide' }) do
      local _, lse = run_fx(name, 'float64')
      assert.are.equal('float64', lse:dtype())
      H.assert_close(lse, FX[name .. '/lse'], 1e-12, 1e-12, name .. ' lse float64')
      local _, lse32 = run_fx(name, 'float32')
      assert.are.equal('float32', lse32:dtype())
      H.assert_close(lse32:double(), FX[name .. '/lse'], 1e-5, 1e-5, name .. ' lse float32')
    end
  end)

  it('gives a point wholly outside key 0 and value 0, still a softmax term', function()
    -- one view, 3x2 map, two samples per query: the first on the pixel centre (x = 1, y = 0) = pixel 1, the second
    -- far outside: out = softmax(scale q.k1, 0) weights on (v1, 0)
    local W, Hh, D = 3, 2, 4
    local q, k, v = fa.randn(1, 1, 1, 6, D, 'float64'), fa.randn(1, 1, 1, 6, D, 'float64'), fa.randn(1, 1, 1, 6, D, 'float64')
    local c = fa.zeros(1, 1, 6, 1, 2, 2, 'float64')
    c:select(5, 1):select(5, 1):fill(0.5)  -- x = 0.5 * (W - 1) = 1
    c:select(5, 2):fill(-3)
    local out, lse = fa.deform_sdpa(q, k, v, c, W, Hh, 0.5)
    local k1, v1 = k:view(6, D)[2], v:view(6, D)[2]
    for l = 1, 6 do
      local s = 0.5 * (q:view(6, D)[l] * k1):sum()
      local p = math.exp(s) / (math.exp(s) + 1)
      H.assert_close(out:view(6, D)[l], v1 * p, 1e-14, 1e-14, 'out row ' .. l)
      assert(math.abs(lse:view(6)[l] - math.log(math.exp(s) + 1)) < 1e-14, 'lse row ' .. l)
    end
    -- every point outside: uniform weights over zero values; lse = log(V*S)
    c:fill(7)
    out, lse = fa.deform_sdpa(q, k, v, c, W, Hh, 0.5)
    assert.are.equal(0, out:abs():max())
    H.assert_close(lse, fa.full({ 1, 1, 1, 6 }, math.log(2), 'float64'), 1e-15, 0, 'lse, all outside')
    local gq, gk, gv, gc = fa.deform_sdpa_backward(fa.randn(1, 1, 1, 6, D, 'float64'), q, k, v, c, W, Hh, 0.5, out, lse)
    assert.are.equal(0, gq:abs():max() + gk:abs():max() + gv:abs():max() + gc:abs():max())
  end)

  it('reads pixel (x, y) at coords (x / (W - 1), y / (H - 1)) from view v2, for every head', function()
    fa.manualSeed(5)
    local B, V, NH, W, Hh, D = 2, 3, 2, 5, 4, 3
    local L = W * Hh
    local q, k, v = fa.randn(B, V, NH, L, D, 'float64'), fa.randn(B, V, NH, L, D, 'float64'), fa.randn(B, V, NH, L, D, 'float64')
    -- query (b, v1, l): one sample, in view v2 = (v1 + 1) % V, at pixel (x, y) = ((l + b) % W, (l + 2) % H)
    local c = fa.full({ B, V, L, V, 1, 2 }, -5, 'float64')
    local function pix(b, l) return (l + b) % W, (l + 2) % Hh end
    for b = 0, B - 1 do
      for v1 = 0, V - 1 do
        for l = 0, L - 1 do
          for v2 = 0, V - 1 do
            if v2 == (v1 + 1) % V then
              local x, y = pix(b, l)
              c[b + 1][v1 + 1][l + 1][v2 + 1][1]:copy(fa.tensor({ x / (W - 1), y / (Hh - 1) }, 'float64'))
            end
          end
        end
      end
    end
    local out = fa.deform_sdpa(q, k, v, c, W, Hh, 0.7)
    -- weights: exp(s) on the pixel, exp(0) for each of the V - 1 samples outside
    for b = 0, B - 1 do
      for v1 = 0, V - 1 do
        for h = 0, NH - 1 do
          for l = 0, L - 1 do
            local x, y = pix(b, l)
            local v2 = (v1 + 1) % V
            local krow, vrow = k[b + 1][v2 + 1][h + 1][y * W + x + 1], v[b + 1][v2 + 1][h + 1][y * W + x + 1]
            local s = 0.7 * (q[b + 1][v1 + 1][h + 1][l + 1] * krow):sum()
            local p = math.exp(s) / (math.exp(s) + V - 1)
            H.assert_close(out[b + 1][v1 + 1][h + 1][l + 1], vrow * p, 1e-14, 1e-14, 'query ' .. b .. v1 .. h .. l)
          end
        end
      end
    end
  end)

  it('reads strided q, k, v, grad_out and out (last dim contiguous) in place, with the same bits', function()
    fa.manualSeed(6)
    local x = inputs({ 2, 2, 3, 4, 3, 2, 5 })
    -- views of (B, V, L, NH, D) buffers (the projection's layout) and of a wider D
    local function view(t) return t:transpose(3, 4):contiguous():transpose(3, 4) end
    local function wide(t)
      local w = fa.randn(2, 2, 3, 12, 8, 'float64')
      w:narrow(5, 2, 5):copy(t)
      return w:narrow(5, 2, 5)
    end
    local xs = { q = view(x.q), k = wide(x.k), v = view(x.v), coords = x.coords, W = x.W, H = x.H, scale = x.scale }
    assert(xs.q:stride(5) == 1 and not xs.q:isContiguous() and not xs.k:isContiguous())
    local gout = fa.randn(2, 2, 3, 12, 5, 'float64')
    local out, lse = fa.deform_sdpa(x.q, x.k, x.v, x.coords, x.W, x.H, x.scale)
    local outs, lses = fa.deform_sdpa(xs.q, xs.k, xs.v, xs.coords, xs.W, xs.H, xs.scale)
    assert(out:equal(outs) and lse:equal(lses), 'forward')
    local a = { fa.deform_sdpa_backward(gout, x.q, x.k, x.v, x.coords, x.W, x.H, x.scale, out, lse) }
    local b = { fa.deform_sdpa_backward(wide(gout), xs.q, xs.k, xs.v, xs.coords, xs.W, xs.H, xs.scale, view(out), lse) }
    for i, n in ipairs(GRADS) do assert(a[i]:equal(b[i]), n) end
  end)

  op.it_gpu('reads strided q, k, v, grad_out and out on CUDA with the same bits (16-byte vectors and not)', function()
    fa.manualSeed(7)
    for _, dtype in ipairs({ 'float32', 'bfloat16', 'float16' }) do
      for _, D in ipairs({ 8, 5 }) do -- 5: one channel per load
        local x = inputs({ 2, 2, 3, 4, 3, 2, D })
        local c = { q = x.q:to(dtype, 'cuda'), k = x.k:to(dtype, 'cuda'), v = x.v:to(dtype, 'cuda'),
                    coords = x.coords:to('float32', 'cuda'), W = x.W, H = x.H, scale = x.scale }
        local function view(t) return t:transpose(3, 4):contiguous():transpose(3, 4) end
        local function wide(t)
          local w = fa.zeros({ 2, 2, 3, 12, D + 8 }, { dtype = dtype, device = 'cuda' })
          w:narrow(5, 9, D):copy(t)
          return w:narrow(5, 9, D)
        end
        local gout = fa.randn(2, 2, 3, 12, D):to(dtype, 'cuda')
        for _, det in ipairs({ false, true }) do
          local o = { deterministic = det }
          local out, lse = fa.deform_sdpa(c.q, c.k, c.v, c.coords, c.W, c.H, c.scale, o)
          local outs, lses = fa.deform_sdpa(view(c.q), wide(c.k), view(c.v), c.coords, c.W, c.H, c.scale, o)
          assert(out:cpu():equal(outs:cpu()) and lse:cpu():equal(lses:cpu()), dtype .. ' forward')
          local a = { fa.deform_sdpa_backward(gout, c.q, c.k, c.v, c.coords, c.W, c.H, c.scale, out, lse, o) }
          local b = { fa.deform_sdpa_backward(wide(gout), view(c.q), wide(c.k), view(c.v), c.coords, c.W, c.H, c.scale,
                                              view(out), lse, o) }
          for i, n in ipairs(GRADS) do
            -- the default mode's grad_k / grad_v (split maps) and grad_coords (summed over heads) come from float
            -- atomics: equal only in deterministic mode
            if det or n == 'q' then assert(a[i]:cpu():equal(b[i]:cpu()), dtype .. ' D ' .. D .. ' ' .. n) end
          end
        end
      end
    end
  end)

  op.it_gpu('rejects D above 256 on CUDA', function()
    local x = inputs({ 1, 1, 1, 2, 2, 1, 257 })
    local ok, err = pcall(fa.deform_sdpa, x.q:float():cuda(), x.k:float():cuda(), x.v:float():cuda(),
                          x.coords:float():cuda(), x.W, x.H, x.scale)
    assert.is_false(ok)
    assert.matches("fa%.deform_sdpa: argument 'q': expected at most 256 channels %(D%) on CUDA, got 257", tostring(err))
  end)

  it('accepts opts.deterministic on the CPU with the same bits', function()
    local x, gout = small()
    local a, b = backward(x, gout), backward(x, gout, { deterministic = true })
    for _, n in ipairs(GRADS) do assert(a[n]:equal(b[n]), n) end
  end)

  it('rejects arguments past opts', function()
    local x = small()
    local ok, err = pcall(fa.deform_sdpa, x.q, x.k, x.v, x.coords, x.W, x.H, x.scale, nil, 5)
    assert.is_false(ok)
    assert.matches('^spec/deform_sdpa_spec.lua:%d+: fa%.deform_sdpa: argument #9: expected nothing', tostring(err))
  end)
end)
