-- spec/cuda_ops_spec.lua: the GPU kernels of cuda/{conv2d,layernorm,softmax,dropout,grid_sample,criterion}.cu
-- against the CPU library. Inputs are drawn at random, rounded to the storage dtype, and the same rounded
-- values go (as float64) to the CPU entry points, which are checked against PyTorch by their own specs; the
-- GPU result must match that float64 reference within the rounding of its dtype. Awkward sizes (1, odd,
-- prime, more rows/blocks than the device has SMs), every dtype, strided views as inputs and outputs,
-- outputs poisoned with NaN beforehand (every element must be written), accumulated gradients starting from
-- random values. Tagged #gpu; pending where no CUDA device is found.
local fa = require 'fastattn'
local ffi = require 'ffi'
local C = fa.C

local op = require 'helpers.op'
-- FA_GPU_SPEC_ON_CPU=1 runs the same comparisons with the CPU's float32 kernels standing in for the GPU
-- (strided outputs only where the CPU accepts them): a check of this spec itself on a machine without a GPU.
local ON_CPU = os.getenv('FA_GPU_SPEC_ON_CPU') == '1'
local DEV = ON_CPU and 'cpu' or 'cuda'

-- an entry point of the library, or nil when this build lacks it
local function entry(name)
  local ok, f = pcall(function() return C[name] end)
  return ok and f or nil
end

local DTYPES = ON_CPU and { 'float32' } or { 'float32', 'bfloat16', 'float16' }
-- relative tolerance of a GPU result against the float64 reference: float32 arithmetic for float32, and
-- storage rounding (2^-8 bfloat16, 2^-11 float16, with a few roundings in a chain) for 16-bit
local TOL = { float32 = 1e-4, bfloat16 = 3e-2, float16 = 5e-3 }
local NAN = 0 / 0

local function call(name, ...)
  local rc = C[name](...)
  if rc ~= 0 then error(name .. ' failed: ' .. ffi.string(C.fa_last_error()), 2) end
end
local function d(t) return t and t.desc or nil end
local function shape_str(s) return '(' .. table.concat(s, 'x') .. ')' end

-- random input: ref (float64, CPU, contiguous) and dev (GPU tensor of dtype holding the same values).
-- opts.scale, opts.lo/hi (uniform instead of normal), opts.transpose = {a, b}: dev is a transposed view
-- (non-contiguous) of a tensor laid out with those dims swapped; opts.narrow: dev is a narrowed view of a
-- wider tensor (last dim + 3, starting at 2): non-contiguous and, for vector loads, misaligned.
local function rand(shape, dtype, opts)
  opts = opts or {}
  local s = { unpack(shape) }
  local tr = opts.transpose
  if tr then s[tr[1]], s[tr[2]] = s[tr[2]], s[tr[1]] end
  if opts.narrow then s[#s] = s[#s] + 3 end
  local r
  if opts.lo then r = fa.rand(s, 'float64'):scale(opts.hi - opts.lo, opts.lo)
  else r = fa.randn(s, 'float64'):scale(opts.scale or 1, opts.shift or 0) end
  local q = r:to(dtype)
  local ref, dev = q:double(), q:to(DEV)
  if tr then
    ref, dev = ref:transpose(tr[1], tr[2]), dev:transpose(tr[1], tr[2])
  end
  if opts.narrow then
    local n = #shape
    ref, dev = ref:narrow(n, 2, shape[n]), dev:narrow(n, 2, shape[n])
  end
  return ref:contiguous(), dev
end

-- a GPU output poisoned with NaN; a strided view (narrow of a wider tensor) when strided
local function gpu_out(shape, dtype, strided)
  if strided and #shape > 0 then
    local s = { unpack(shape) }
    s[#s] = s[#s] + 3
    return fa.empty(s, { dtype = dtype, device = DEV }):fill(NAN):narrow(#s, 2, shape[#shape])
  end
  return fa.empty(shape, { dtype = dtype, device = DEV }):fill(NAN)
end
local function cpu_out(shape) return fa.empty(shape, 'float64'):fill(NAN) end

-- |got - ref| <= tol * (|ref| + max |ref|) elementwise (max |ref| at least 1e-3); NaN only where ref is NaN
local function close(got, ref, tol, what)
  local a = got:to('float64', 'cpu'):contiguous()
  local b = ref:to('float64', 'cpu'):contiguous()
  if not a:isSameSizeAs(b) then
    error(string.format('%s: shape %s, expected %s', what, shape_str(a:size()), shape_str(b:size())), 2)
  end
  local p, q = ffi.cast('double*', a.desc.data), ffi.cast('double*', b.desc.data)
  local n, scale = a:numel(), 1e-3
  for i = 0, n - 1 do
    local v = math.abs(q[i])
    if v == v and v ~= math.huge and v > scale then scale = v end
  end
  local worst, wi = -1, -1
  for i = 0, n - 1 do
    local u, v = p[i], q[i]
    if v ~= v then
      if u == u then error(string.format('%s: element %d is %.6g, expected NaN', what, i + 1, u), 2) end
    elseif u ~= u then
      error(string.format('%s: element %d is NaN (unwritten or wrong), expected %.6g', what, i + 1, v), 2)
    else
      local e = math.abs(u - v) / (math.abs(v) + scale)
      if e > worst then worst, wi = e, i end
    end
  end
  if worst > tol then
    error(string.format('%s: element %d is %.7g, expected %.7g (relative error %.2e > %.1e; max |ref| %.3g)', what, wi + 1,
      p[wi], q[wi], worst, tol, scale), 2)
  end
end

-- exactly equal (NaN equal to NaN)
local function same(got, ref, what)
  local a = got:to('float64', 'cpu'):contiguous()
  local b = ref:to('float64', 'cpu'):contiguous()
  assert(a:isSameSizeAs(b), what .. ': shapes differ')
  local p, q = ffi.cast('double*', a.desc.data), ffi.cast('double*', b.desc.data)
  for i = 0, a:numel() - 1 do
    if p[i] ~= q[i] and not (p[i] ~= p[i] and q[i] ~= q[i]) then
      error(string.format('%s: element %d is %.9g, expected exactly %.9g', what, i + 1, p[i], q[i]), 2)
    end
  end
end

local function numel(s)
  local n = 1
  for _, v in ipairs(s) do n = n * v end
  return n
end

op.describe_gpu('CUDA kernels against the CPU', function()

  local function needs(...)
    for _, name in ipairs({ ... }) do
      if not entry(name) then pending(name .. ' is not in this build') return false end
    end
    return true
  end

  before_each(function() fa.manualSeed(20240611) end)

  ------------------------------------------------------------------------------------------ softmax
  describe('softmax and log-softmax', function()
    local cases = {
      { { 1 }, 1 }, { { 7 }, 1 }, { { 3, 1 }, 2 }, { { 5, 33 }, 2 }, { { 13, 256 }, 2 }, { { 2, 1000 }, 2 },
      { { 4, 1031 }, 2 }, { { 3, 2048 }, 2 }, { { 2, 4099 }, 2 }, { { 2, 3, 5, 7 }, 2 }, { { 2, 3, 5, 7 }, 3 },
      { { 2, 3, 5, 7 }, 1 }, { { 37, 64 }, 1 }, { { 3001, 37 }, 2 }, { { 1, 1, 1 }, 3 },
    }
    for _, dt in ipairs(DTYPES) do
      for _, c in ipairs(cases) do
        local shape, dim = c[1], c[2]
        for _, lg in ipairs({ 0, 1 }) do
          local strided = #shape >= 2 and (dim + lg) % 2 == 0
          it(string.format('%s %s over dim %d, %s%s', lg == 1 and 'log_softmax' or 'softmax', shape_str(shape), dim, dt,
            strided and ', strided views' or ''), function()
            if not needs('fa_softmax_forward', 'fa_softmax_backward') then return end
            local xr, xg = rand(shape, dt, { scale = 3, transpose = strided and { 1, 2 } or nil })
            local y64 = cpu_out(shape)
            call('fa_softmax_forward', y64.desc, xr.desc, dim - 1, lg)
            local y = gpu_out(shape, dt, strided)
            call('fa_softmax_forward', y.desc, xg.desc, dim - 1, lg)
            close(y, y64, TOL[dt], 'forward')
            -- backward from the GPU's own output, the same values on both sides
            local gr, gg = rand(shape, dt, { narrow = strided })
            local yr = y:to('float64', 'cpu'):contiguous()
            local gx64 = cpu_out(shape)
            call('fa_softmax_backward', gx64.desc, gr.desc, yr.desc, dim - 1, lg)
            local gx = gpu_out(shape, dt, strided)
            call('fa_softmax_backward', gx.desc, gg.desc, y.desc, dim - 1, lg)
            close(gx, gx64, TOL[dt], 'backward')
          end)
        end
      end
    end
    it('keeps -inf entries at probability 0 and vector loads off misaligned rows', function()
      if not needs('fa_softmax_forward') then return end
      local xr, xg = rand({ 9, 16 }, 'float32', { narrow = true }) -- rows start 4 bytes into 16-byte words
      xr:select(2, 3):fill(-math.huge)
      xg:select(2, 3):fill(-math.huge)
      local y64, y = cpu_out({ 9, 16 }), gpu_out({ 9, 16 }, 'float32')
      call('fa_softmax_forward', y64.desc, xr.desc, 1, 0)
      call('fa_softmax_forward', y.desc, xg.desc, 1, 0)
      close(y, y64, TOL.float32, 'softmax')
      assert.are.equal(0, y:select(2, 3):to('float64', 'cpu'):abs():max())
    end)
  end)

  ------------------------------------------------------------------------------------------ layer norm
  describe('layer norm', function()
    -- shape, norm_size, affine ('wb', 'w', '')
    local cases = {
      { { 1, 1 }, 1, 'wb' }, { { 3, 7 }, 7, 'wb' }, { { 17, 64 }, 64, '' }, { { 9, 512 }, 512, 'wb' },
      { { 5, 1000 }, 1000, 'w' }, { { 3, 1536 }, 1536, 'wb' }, { { 2, 3000 }, 3000, 'wb' }, { { 3001, 96 }, 96, 'wb' },
      { { 4, 5, 6 }, 30, 'wb' }, { { 4, 5, 6 }, 6, '' }, { { 2, 2053 }, 2053, 'w' },
    }
    for _, dt in ipairs(DTYPES) do
      for ci, c in ipairs(cases) do
        local shape, n, aff = c[1], c[2], c[3]
        local strided = ci % 3 == 2
        it(string.format('%s over %d, %s, affine "%s"%s', shape_str(shape), n, dt, aff, strided and ', strided views' or ''), function()
          if not needs('fa_layernorm_forward', 'fa_layernorm_backward') then return end
          local rows = numel(shape) / n
          local xr, xg = rand(shape, dt, { scale = 2, shift = 0.5, transpose = strided and { #shape - 1, #shape } or nil })
          local wr, wg, br, bg
          if aff:find('w') then wr, wg = rand({ n }, dt, { shift = 1 }) end
          if aff:find('b') then br, bg = rand({ n }, dt) end
          local y64, m64, r64 = cpu_out(shape), cpu_out({ rows }), cpu_out({ rows })
          call('fa_layernorm_forward', y64.desc, m64.desc, r64.desc, xr.desc, d(wr), d(br), n, 1e-5)
          local y = gpu_out(shape, dt, strided)
          local m = fa.empty({ rows }, { dtype = 'float32', device = DEV }):fill(NAN)
          local r = fa.empty({ rows }, { dtype = 'float32', device = DEV }):fill(NAN)
          call('fa_layernorm_forward', y.desc, m.desc, r.desc, xg.desc, d(wg), d(bg), n, 1e-5)
          close(y, y64, TOL[dt], 'out')
          close(m, m64, 1e-4, 'mean')
          close(r, r64, 1e-4, 'rstd')
          -- backward with the GPU's saved statistics on both sides; parameter grads accumulate onto random values
          local gr, gg = rand(shape, dt, { narrow = strided })
          local gx64 = cpu_out(shape)
          local gw64, gwg, gb64, gbg
          if wr then gw64, gwg = rand({ n }, dt) end
          if br then gb64, gbg = rand({ n }, dt) end
          local m64, r64 = m:to('float64', 'cpu'), r:to('float64', 'cpu') -- locals keep the temporaries alive
          call('fa_layernorm_backward', gx64.desc, d(gw64), d(gb64), gr.desc, xr.desc, m64.desc, r64.desc, d(wr), n)
          local gx = gpu_out(shape, dt, strided)
          call('fa_layernorm_backward', gx.desc, d(gwg), d(gbg), gg.desc, xg.desc, m.desc, r.desc, d(wg), n)
          close(gx, gx64, TOL[dt], 'grad_x')
          if gwg then close(gwg, gw64, TOL[dt], 'grad_weight') end
          if gbg then close(gbg, gb64, TOL[dt], 'grad_bias') end
        end)
      end
    end
    it('gives the same weight gradient twice (deterministic reduction)', function()
      if not needs('fa_layernorm_forward', 'fa_layernorm_backward') then return end
      local _, x = rand({ 4099, 128 }, 'float32')
      local _, w = rand({ 128 }, 'float32')
      local _, g = rand({ 4099, 128 }, 'float32')
      local y, m, r = gpu_out({ 4099, 128 }, 'float32'), gpu_out({ 4099 }, 'float32'), gpu_out({ 4099 }, 'float32')
      call('fa_layernorm_forward', y.desc, m.desc, r.desc, x.desc, w.desc, nil, 128, 1e-5)
      local res = {}
      for k = 1, 2 do
        local gw = fa.zeros({ 128 }, { dtype = 'float32', device = DEV })
        call('fa_layernorm_backward', nil, gw.desc, nil, g.desc, x.desc, m.desc, r.desc, w.desc, 128)
        res[k] = gw
      end
      same(res[1], res[2], 'grad_weight, second run')
    end)
  end)

  ------------------------------------------------------------------------------------------ dropout
  describe('dropout', function()
    local seed, offset = 0x123456789ab, 2 ^ 33 + 5
    for _, p in ipairs({ 0, 0.2, 0.5, 1 }) do
      for _, shape in ipairs({ { 1 }, { 7, 13 }, { 300007 } }) do
        it(string.format('draws the CPU mask and output bit for bit, p = %g, %s, float32', p, shape_str(shape)), function()
          if not needs('fa_dropout_forward', 'fa_dropout_backward') then return end
          local xr, xg = rand(shape, 'float32')
          local x32 = xg:cpu()
          local y_c, m_c = fa.empty(shape, 'float32'), fa.empty(shape, 'bool')
          call('fa_dropout_forward', y_c.desc, m_c.desc, x32.desc, p, seed, offset)
          local y, m = gpu_out(shape, 'float32'), fa.empty(shape, { dtype = 'bool', device = DEV })
          call('fa_dropout_forward', y.desc, m.desc, xg.desc, p, seed, offset)
          same(m, m_c, 'mask')
          same(y, y_c, 'out')
          local _, gg = rand(shape, 'float32')
          local gx_c = fa.empty(shape, 'float32')
          local gg_c = gg:cpu()
          call('fa_dropout_backward', gx_c.desc, gg_c.desc, m_c.desc, p)
          local gx = gpu_out(shape, 'float32')
          call('fa_dropout_backward', gx.desc, gg.desc, m.desc, p)
          same(gx, gx_c, 'grad_x')
        end)
      end
    end
    for _, dt in ipairs(DTYPES) do
      it('draws the mask by element index whatever the strides, ' .. dt, function()
        if not needs('fa_dropout_forward', 'fa_dropout_backward') then return end
        local shape = { 37, 29 }
        local xr, xg = rand(shape, dt, { transpose = { 1, 2 } })
        local y_c, m_c = fa.empty(shape, 'float64'), fa.empty(shape, 'bool')
        call('fa_dropout_forward', y_c.desc, m_c.desc, xr.desc, 0.3, 77, 1000)
        local y = gpu_out(shape, dt, true)
        local m = fa.empty({ 29, 37 }, { dtype = 'bool', device = DEV }):t() -- a strided mask
        call('fa_dropout_forward', y.desc, m.desc, xg.desc, 0.3, 77, 1000)
        same(m, m_c, 'mask')
        close(y, y_c, TOL[dt], 'out')
        local gr, gg = rand(shape, dt, { narrow = true })
        local gx_c = fa.empty(shape, 'float64')
        call('fa_dropout_backward', gx_c.desc, gr.desc, m_c.desc, 0.3)
        local gx = gpu_out(shape, dt)
        call('fa_dropout_backward', gx.desc, gg.desc, m.desc, 0.3)
        close(gx, gx_c, TOL[dt], 'grad_x')
        -- without a mask the output is the same
        local y2 = gpu_out(shape, dt)
        call('fa_dropout_forward', y2.desc, nil, xg.desc, 0.3, 77, 1000)
        same(y2, y, 'out without mask')
      end)
    end
  end)

  ------------------------------------------------------------------------------------------ grid sampling
  describe('grid sampling', function()
    -- N, C, H, W, Ho, Wo
    local cases = {
      { 2, 3, 5, 7, 4, 6 }, { 1, 1, 1, 1, 3, 2 }, { 3, 17, 9, 4, 11, 13 }, { 1, 64, 16, 16, 32, 32 }, { 2, 5, 8, 8, 1, 1 },
      { 1, 300, 6, 5, 3, 4 },
      -- enough points that each thread takes 10 channels: the unrolled channel groups and their tail
      { 1, 37, 12, 10, 300, 300 },
    }
    for _, dt in ipairs(DTYPES) do
      for ci, c in ipairs(cases) do
        for _, pad in ipairs({ 0, 1 }) do
          for _, align in ipairs({ 0, 1 }) do
            local strided = (ci + pad + align) % 2 == 1
            local N, Cc, H, W, Ho, Wo = unpack(c)
            it(string.format('%s into %dx%d, %s, align_corners %d, %s%s', shape_str({ N, Cc, H, W }), Ho, Wo,
              pad == 0 and 'zeros' or 'border', align, dt, strided and ', strided views' or ''), function()
              if not needs('fa_grid_sample_forward', 'fa_grid_sample_backward') then return end
              local ir, ig = rand({ N, Cc, H, W }, dt, { narrow = strided })
              -- a grid past the borders on every side; strided: a permuted (N, 2, Ho, Wo) layout
              local gr, gg
              if strided then
                local g0r, g0g = rand({ N, 2, Ho, Wo }, dt, { lo = -1.25, hi = 1.25 })
                gr, gg = g0r:permute(1, 3, 4, 2):contiguous(), g0g:permute(1, 3, 4, 2)
              else
                gr, gg = rand({ N, Ho, Wo, 2 }, dt, { lo = -1.25, hi = 1.25 })
              end
              local o64 = cpu_out({ N, Cc, Ho, Wo })
              call('fa_grid_sample_forward', o64.desc, ir.desc, gr.desc, pad, align)
              local o = gpu_out({ N, Cc, Ho, Wo }, dt, strided)
              call('fa_grid_sample_forward', o.desc, ig.desc, gg.desc, pad, align)
              close(o, o64, TOL[dt], 'out')
              local gor, gog = rand({ N, Cc, Ho, Wo }, dt, { transpose = strided and { 3, 4 } or nil })
              local gi64, gg64 = cpu_out({ N, Cc, H, W }), cpu_out({ N, Ho, Wo, 2 })
              call('fa_grid_sample_backward', gi64.desc, gg64.desc, gor.desc, ir.desc, gr.desc, pad, align)
              local gi, ggr = gpu_out({ N, Cc, H, W }, dt, strided), gpu_out({ N, Ho, Wo, 2 }, dt)
              call('fa_grid_sample_backward', gi.desc, ggr.desc, gog.desc, ig.desc, gg.desc, pad, align)
              close(gi, gi64, TOL[dt], 'grad_input')
              close(ggr, gg64, TOL[dt], 'grad_grid')
              -- each gradient alone
              local gi2 = gpu_out({ N, Cc, H, W }, dt)
              call('fa_grid_sample_backward', gi2.desc, nil, gog.desc, ig.desc, gg.desc, pad, align)
              close(gi2, gi64, TOL[dt], 'grad_input alone')
              local gg2 = gpu_out({ N, Ho, Wo, 2 }, dt, true)
              call('fa_grid_sample_backward', nil, gg2.desc, gog.desc, ig.desc, gg.desc, pad, align)
              close(gg2, gg64, TOL[dt], 'grad_grid alone')
            end)
          end
        end
      end
    end
  end)

  describe('grid sampling, taps outside the image', function()
    -- the 32-bit kernel reads a stand-in element for taps outside the image and selects 0 instead: an
    -- infinite value there must not turn points outside into NaN (0 * inf)
    for _, dt in ipairs(DTYPES) do
      it('an infinite first element does not reach points outside the image, ' .. dt, function()
        if not needs('fa_grid_sample_forward') then return end
        local N, Cc, H, W, Ho, Wo = 2, 11, 6, 7, 5, 8
        local ir = fa.randn({ N, Cc, H, W }, 'float64')
        for n = 1, N do
          for c = 1, Cc do ir[n][c][1][1] = 1 / 0 end
        end
        ir = ir:to(dt):double()
        local ig = ir:to(dt):to(DEV)
        -- even columns of the grid: far outside (left of and above the image); odd: inside, away from (0, 0)
        local gr = fa.empty({ N, Ho, Wo, 2 }, 'float64')
        for n = 1, N do
          for h = 1, Ho do
            for w = 1, Wo do
              local out_ = w % 2 == 0
              gr[n][h][w][1] = out_ and -1.5 - 0.1 * h or 0.1 + 0.05 * w
              gr[n][h][w][2] = out_ and -1.7 or 0.2 + 0.1 * h
            end
          end
        end
        gr = gr:to(dt):double()
        local gg = gr:to(dt):to(DEV)
        for pad = 0, 0 do
          local o64 = cpu_out({ N, Cc, Ho, Wo })
          call('fa_grid_sample_forward', o64.desc, ir.desc, gr.desc, pad, 0)
          local o = gpu_out({ N, Cc, Ho, Wo }, dt)
          call('fa_grid_sample_forward', o.desc, ig.desc, gg.desc, pad, 0)
          close(o, o64, TOL[dt], 'out')
          local oc = o:to('float64', 'cpu'):contiguous()
          assert.are.equal(0, oc[1][1][1][2]) -- an outside point: exactly 0
        end
      end)
    end
  end)

  ------------------------------------------------------------------------------------------ criterions
  describe('MSE', function()
    for _, dt in ipairs(DTYPES) do
      for _, shape in ipairs({ { 1 }, { 7, 3 }, { 2, 3, 5 }, { 300001 } }) do
        for red = 0, 2 do
          local strided = #shape > 1 and red == 1
          it(string.format('%s, reduction %s, %s%s', shape_str(shape), ({ 'none', 'mean', 'sum' })[red + 1], dt,
            strided and ', strided views' or ''), function()
            if not needs('fa_mse_forward', 'fa_mse_backward') then return end
            -- small values: a float16 sum of 300001 squares stays finite
            local xr, xg = rand(shape, dt, { scale = 0.2, transpose = strided and { 1, 2 } or nil })
            local tr, tg = rand(shape, dt, { scale = 0.2, narrow = strided })
            local lshape = red == 0 and shape or { 1 }
            local l64 = cpu_out(lshape)
            call('fa_mse_forward', l64.desc, xr.desc, tr.desc, red)
            local l = gpu_out(lshape, dt, strided and red == 0)
            call('fa_mse_forward', l.desc, xg.desc, tg.desc, red)
            close(l, l64, TOL[dt], 'loss')
            local glr, glg = rand(lshape, dt)
            local gx64 = cpu_out(shape)
            call('fa_mse_backward', gx64.desc, glr.desc, xr.desc, tr.desc, red)
            local gx = gpu_out(shape, dt, strided)
            call('fa_mse_backward', gx.desc, glg.desc, xg.desc, tg.desc, red)
            close(gx, gx64, TOL[dt], 'grad_x')
          end)
        end
      end
    end
  end)

  describe('cross-entropy', function()
    -- logits shape, ignore_index, label smoothing
    local cases = {
      { { 1, 1 }, -100, 0 }, { { 7, 5 }, -100, 0.1 }, { { 37, 1000 }, 3, 0 }, { { 3, 4097 }, -100, 0.2 },
      { { 2, 5, 3, 4 }, 2, 0.1 }, { { 3, 7, 5 }, -100, 0 }, { { 513, 10 }, -1, 0.05 },
    }
    for _, dt in ipairs(DTYPES) do
      for ci, c in ipairs(cases) do
        local shape, ignore, ls = c[1], c[2], c[3]
        for red = 0, 2 do
          local strided = (ci + red) % 3 == 0
          it(string.format('%s, ignore_index %d, smoothing %g, reduction %s, %s%s', shape_str(shape), ignore, ls,
            ({ 'none', 'mean', 'sum' })[red + 1], dt, strided and ', strided views' or ''), function()
            if not needs('fa_cross_entropy_forward', 'fa_cross_entropy_backward') then return end
            local N, Cn = shape[1], shape[2]
            local tshape = { N }
            for k = 3, #shape do tshape[#tshape + 1] = shape[k] end
            local xr, xg = rand(shape, dt, { scale = 2, narrow = strided })
            -- targets: random classes, about a quarter of them ignore_index
            local u = fa.rand(tshape, 'float64')
            local t = fa.empty(tshape, 'int64')
            local tf = t:view(-1)
            local uf = u:view(-1)
            for i = 1, tf:numel() do
              local v = uf:get(i)
              tf:set(i, v < 0.25 and ignore or math.floor(v * 4 * Cn) % Cn)
            end
            local tg = t:to(DEV)
            if strided and #tshape >= 2 then
              tg = t:transpose(1, 2):contiguous():to(DEV):transpose(1, 2)
            end
            local lshape = red == 0 and tshape or { 1 }
            local l64 = cpu_out(lshape)
            call('fa_cross_entropy_forward', l64.desc, xr.desc, t.desc, ignore, ls, red)
            local l = gpu_out(lshape, dt, strided and red == 0)
            call('fa_cross_entropy_forward', l.desc, xg.desc, tg.desc, ignore, ls, red)
            close(l, l64, TOL[dt], 'loss')
            local glr, glg = rand(lshape, dt)
            local gx64 = cpu_out(shape)
            call('fa_cross_entropy_backward', gx64.desc, glr.desc, xr.desc, t.desc, ignore, ls, red)
            local gx = gpu_out(shape, dt, strided)
            call('fa_cross_entropy_backward', gx.desc, glg.desc, xg.desc, tg.desc, ignore, ls, red)
            close(gx, gx64, TOL[dt], 'grad_logits')
          end)
        end
      end
    end
    it('rejects a target outside [0, C) before writing anything, and gives NaN for a mean over nothing', function()
      if not needs('fa_cross_entropy_forward') then return end
      local _, x = rand({ 4, 3 }, 'float32')
      local t = fa.tensor({ 0, 2, 3, 1 }, 'int64'):to(DEV)
      local l = fa.full({ 1 }, 7, { dtype = 'float32', device = DEV })
      assert.are.equal(1, C.fa_cross_entropy_forward(l.desc, x.desc, t.desc, -100, 0, 1))
      assert.matches('class index 3 at position 2 is out of range %[0, 3%)', ffi.string(C.fa_last_error()))
      assert.are.equal(7, l:item())
      local ti = fa.tensor({ -100, -100, -100, -100 }, 'int64'):to(DEV)
      call('fa_cross_entropy_forward', l.desc, x.desc, ti.desc, -100, 0, 1)
      assert.is_true(l:item() ~= l:item())
    end)
  end)

  ------------------------------------------------------------------------------------------ conv2d
  describe('conv2d', function()
    -- N, C, H, W, O, kh, kw, sh, sw, ph, pw, dh, dw, groups, bias, what
    local cases = {
      { 2, 6, 5, 7, 4, 1, 1, 1, 1, 0, 0, 1, 1, 1, true, '1x1 (GEMM)' },
      { 3, 6, 5, 7, 9, 1, 1, 1, 1, 0, 0, 1, 1, 3, false, 'grouped 1x1' },
      { 2, 5, 9, 11, 7, 3, 3, 1, 1, 1, 1, 1, 1, 1, true, '3x3' },
      { 2, 4, 10, 9, 6, 3, 3, 2, 2, 1, 1, 1, 1, 2, true, 'grouped 3x3 stride 2' },
      { 1, 3, 11, 13, 5, 2, 3, 1, 2, 0, 1, 2, 1, 1, false, '2x3 dilated, mixed strides' },
      { 2, 3, 13, 11, 4, 5, 5, 3, 3, 2, 2, 1, 1, 1, true, '5x5 stride 3' },
      { 1, 2, 3, 3, 3, 1, 1, 2, 2, 1, 1, 1, 1, 1, true, '1x1 stride 2 padded' },
      { 4, 1, 6, 6, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, true, 'one input channel' },
      { 2, 8, 1, 1, 4, 1, 1, 1, 1, 0, 0, 1, 1, 1, true, '1x1 image' },
      { 2, 5, 9, 8, 5, 3, 3, 1, 1, 1, 1, 1, 1, 5, true, 'depthwise 3x3' },
      { 1, 7, 17, 18, 7, 6, 6, 4, 4, 1, 1, 1, 1, 7, true, 'depthwise 6x6 stride 4' },
      { 2, 3, 10, 9, 6, 3, 3, 2, 1, 2, 1, 2, 1, 3, true, 'depthwise, multiplier 2, dilated' },
      { 1, 3, 20, 70, 3, 9, 9, 1, 1, 4, 4, 1, 1, 3, false, 'depthwise 9x9 (81 taps), several tiles' },
      { 1, 2, 112, 112, 2, 12, 12, 1, 1, 0, 0, 10, 10, 2, true, 'depthwise, patch too big for shared memory' },
      { 2, 64, 16, 16, 64, 6, 6, 4, 4, 1, 1, 1, 1, 64, true, 'depthwise 6x6/4, 64 channels' },
      -- odd-numbered cases have dense x: those whose W is a multiple of 8 take the 16-byte patch loads
      -- (several tiles, tiles cut inside a 16-byte chunk, padding rows/columns, strides 1/2/4, dilation)
      { 1, 3, 24, 40, 3, 3, 3, 1, 1, 1, 1, 1, 1, 3, true, 'depthwise 3x3' },
      { 2, 4, 21, 72, 4, 3, 3, 1, 1, 1, 1, 1, 1, 4, true, 'depthwise 3x3, W = 72 (3 tile columns, 3 tile rows)' },
      { 1, 2, 9, 16, 2, 3, 3, 1, 1, 1, 1, 1, 1, 2, false, 'depthwise 3x3, W = 16' },
      { 2, 3, 33, 64, 6, 5, 5, 2, 2, 2, 2, 1, 1, 3, true, 'depthwise 5x5 stride 2, multiplier 2, W = 64' },
      { 1, 2, 16, 32, 2, 6, 6, 4, 4, 2, 2, 1, 1, 2, false, 'depthwise 6x6 stride 4, padding 2' },
      { 1, 2, 12, 48, 2, 3, 3, 1, 1, 2, 2, 2, 2, 2, true, 'depthwise 3x3 dilated 2, W = 48 (2 tile columns)' },
      { 1, 5, 64, 64, 5, 6, 6, 4, 4, 1, 1, 1, 1, 5, false, 'depthwise 6x6 stride 4 (the offset network)' },
      { 1, 4, 64, 64, 4, 6, 6, 4, 4, 1, 1, 1, 1, 4, true, 'depthwise 6x6 stride 4 (the offset network)' },
      -- 1x1 with a bias: the cuBLASLt bias epilogue over the images; with 3 groups of 3 channels the bias of
      -- groups 1 and 2 is not 16-byte aligned, so those take the fallback (bias written first, GEMM beta = 1)
      { 3, 6, 5, 7, 9, 1, 1, 1, 1, 0, 0, 1, 1, 3, true, 'grouped 1x1 with bias' },
      { 5, 16, 12, 20, 24, 1, 1, 1, 1, 0, 0, 1, 1, 1, true, '1x1 with bias, 5 images' },
      -- more (plane, tile) items than the device holds blocks: the pipelined 16-byte kernel walks several
      -- items per block, prefetching the next (odd cases: dense x; even: the same shape strided)
      { 4, 320, 32, 32, 320, 6, 6, 4, 4, 1, 1, 1, 1, 320, true, 'depthwise 6x6/4, 1280 planes' },
      { 4, 320, 32, 32, 320, 6, 6, 4, 4, 1, 1, 1, 1, 320, true, 'depthwise 6x6/4, 1280 planes' },
      { 3, 200, 24, 72, 200, 3, 3, 1, 1, 1, 1, 1, 1, 200, false, 'depthwise 3x3, 600 planes of 9 tiles' },
      { 3, 200, 24, 72, 200, 3, 3, 1, 1, 1, 1, 1, 1, 200, false, 'depthwise 3x3, 600 planes of 9 tiles' },
      { 2, 100, 40, 64, 200, 5, 5, 2, 2, 2, 2, 1, 1, 100, true, 'depthwise 5x5/2, multiplier 2, 400 planes of 3 tiles' },
      { 2, 100, 40, 64, 200, 5, 5, 2, 2, 2, 2, 1, 1, 100, true, 'depthwise 5x5/2, multiplier 2, 400 planes of 3 tiles' },
    }
    for _, dt in ipairs(DTYPES) do
      for ci, c in ipairs(cases) do
        local N, Cc, H, W, O, kh, kw, sh, sw, ph, pw, dh, dw, G, bias, what = unpack(c)
        local strided = ci % 2 == 0 and not ON_CPU -- the CPU conv wants dense outputs
        it(string.format('%s: x %s, weight %s, %s%s', what, shape_str({ N, Cc, H, W }), shape_str({ O, Cc / G, kh, kw }), dt,
          strided and ', strided views' or ''), function()
          if not needs('fa_conv2d_forward', 'fa_conv2d_backward') then return end
          local p = ffi.new('fa_conv2d_params', sh, sw, ph, pw, dh, dw, G)
          local Ho = math.floor((H + 2 * ph - dh * (kh - 1) - 1) / sh) + 1
          local Wo = math.floor((W + 2 * pw - dw * (kw - 1) - 1) / sw) + 1
          local xr, xg = rand({ N, Cc, H, W }, dt, { transpose = strided and { 3, 4 } or nil })
          local wr, wg = rand({ O, Cc / G, kh, kw }, dt, { scale = 1 / math.sqrt(Cc / G * kh * kw), narrow = strided })
          local br, bg
          if bias then br, bg = rand({ O }, dt) end
          local o64 = cpu_out({ N, O, Ho, Wo })
          call('fa_conv2d_forward', o64.desc, xr.desc, wr.desc, d(br), p)
          local o = gpu_out({ N, O, Ho, Wo }, dt, strided)
          call('fa_conv2d_forward', o.desc, xg.desc, wg.desc, d(bg), p)
          close(o, o64, TOL[dt], 'out')
          local gor, gog = rand({ N, O, Ho, Wo }, dt, { narrow = strided })
          local gx64 = cpu_out({ N, Cc, H, W })
          local gw64, gwg = rand({ O, Cc / G, kh, kw }, dt)
          local gb64, gbg
          if bias then gb64, gbg = rand({ O }, dt) end
          if strided then -- accumulate into strided views
            local big = fa.empty({ O, Cc / G, kh, kw + 2 }, { dtype = dt, device = DEV }):fill(NAN)
            gwg = big:narrow(4, 2, kw):copy(gwg)
          end
          call('fa_conv2d_backward', gx64.desc, gw64.desc, d(gb64), gor.desc, xr.desc, wr.desc, p)
          local gx = gpu_out({ N, Cc, H, W }, dt, strided)
          call('fa_conv2d_backward', gx.desc, gwg.desc, d(gbg), gog.desc, xg.desc, wg.desc, p)
          close(gx, gx64, TOL[dt], 'grad_x')
          close(gwg, gw64, TOL[dt], 'grad_weight')
          if bias then close(gbg, gb64, TOL[dt], 'grad_bias') end
          -- grad_x alone
          local gx2 = gpu_out({ N, Cc, H, W }, dt)
          call('fa_conv2d_backward', gx2.desc, nil, nil, gog.desc, xg.desc, wg.desc, p)
          close(gx2, gx64, TOL[dt], 'grad_x alone')
        end)
      end
    end
    it('gives the same weight and bias gradients twice (deterministic reductions)', function()
      if not needs('fa_conv2d_backward') then return end
      for _, c in ipairs({ { 8, 6, 3, 1, 1 }, { 8, 8, 6, 4, 8 } }) do -- C, O, k, stride, groups
        local Cc, O, k, s, G = unpack(c)
        local p = ffi.new('fa_conv2d_params', s, s, 1, 1, 1, 1, G)
        local _, x = rand({ 4, Cc, 33, 35 }, 'float32')
        local _, w = rand({ O, Cc / G, k, k }, 'float32')
        local Ho = math.floor((33 + 2 - k) / s) + 1
        local Wo = math.floor((35 + 2 - k) / s) + 1
        local _, go = rand({ 4, O, Ho, Wo }, 'float32')
        local res = {}
        for r = 1, 2 do
          local gw = fa.zeros({ O, Cc / G, k, k }, { dtype = 'float32', device = DEV })
          local gb = fa.zeros({ O }, { dtype = 'float32', device = DEV })
          call('fa_conv2d_backward', nil, gw.desc, gb.desc, go.desc, x.desc, w.desc, p)
          res[r] = { gw, gb }
        end
        same(res[1][1], res[2][1], 'grad_weight, second run')
        same(res[1][2], res[2][2], 'grad_bias, second run')
      end
    end)
    it('1x1 with bias over 6 images: every dtype, TF32 on and off, aligned and unaligned (fallback) bias', function()
      if not needs('fa_conv2d_forward') then return end
      local N, Cc, H, W, O = 6, 64, 14, 15, 48
      local p = ffi.new('fa_conv2d_params', 1, 1, 0, 0, 1, 1, 1)
      for _, dt in ipairs(DTYPES) do
        local xr, xg = rand({ N, Cc, H, W }, dt)
        local wr, wg = rand({ O, Cc, 1, 1 }, dt, { scale = 1 / math.sqrt(Cc) })
        for _, unaligned in ipairs({ false, true }) do
          -- narrow: a view one element into a wider tensor, so the bias is not 16-byte aligned
          local br, bg = rand({ O }, dt, { narrow = unaligned })
          local what = dt .. (unaligned and ', unaligned bias' or '')
          local o64 = cpu_out({ N, O, H, W })
          call('fa_conv2d_forward', o64.desc, xr.desc, wr.desc, br.desc, p)
          local o = gpu_out({ N, O, H, W }, dt)
          call('fa_conv2d_forward', o.desc, xg.desc, wg.desc, bg.desc, p)
          close(o, o64, TOL[dt], what)
          if dt == 'float32' and not ON_CPU then
            local ot = gpu_out({ N, O, H, W }, dt)
            C.fa_cuda_allow_tf32(1)
            local ok, err = pcall(call, 'fa_conv2d_forward', ot.desc, xg.desc, wg.desc, bg.desc, p)
            C.fa_cuda_allow_tf32(0)
            assert(ok, err)
            close(ot, o64, 5e-3, what .. ', TF32 (10-bit mantissa inputs)')
          end
        end
      end
    end)
    -- 1x1 with tensor cores (TF32 or 16-bit, one group): x (grad_out in the backward) is transposed to
    -- channels-last with bias columns and one strided-batched GEMM runs on K-major operands; grad_weight is one
    -- batched GEMM into per-image products added in order. Channel counts off multiples of 8 and 32 (padding
    -- of the packed rows and tiles), positions over several 32-wide tiles, batch 1 and several, bias or not,
    -- x dense, transposed (H, W), channels-last and narrowed (misaligned).
    describe('1x1 on tensor cores (channels-last packed operands)', function()
      -- N, C, H, W, O, bias, layout of x
      local pcases = {
        { 1, 40, 6, 7, 24, true, 'dense' },
        { 4, 37, 5, 9, 19, false, 'transposed' },
        { 3, 16, 4, 8, 33, true, 'channels-last' },
        { 2, 24, 5, 6, 16, true, 'narrowed' },
        { 2, 70, 9, 10, 66, true, 'dense' },
        { 5, 8, 1, 3, 8, false, 'channels-last' },
      }
      for _, dt in ipairs(DTYPES) do
        local tf32 = dt == 'float32' and not ON_CPU
        local tol = tf32 and 5e-3 or TOL[dt]
        for _, c in ipairs(pcases) do
          local N, Cc, H, W, O, bias, layout = unpack(c)
          it(string.format('x %s (%s), %d -> %d channels, %s%s, %s', shape_str({ N, Cc, H, W }), layout, Cc, O,
            tf32 and 'float32 with TF32' or dt, bias and ', bias' or '', 'forward and backward'), function()
            if not needs('fa_conv2d_forward', 'fa_conv2d_backward') then return end
            local p = ffi.new('fa_conv2d_params', 1, 1, 0, 0, 1, 1, 1)
            local xo = {}
            if layout == 'transposed' then xo.transpose = { 3, 4 }
            elseif layout == 'channels-last' then xo.transpose = { 2, 4 }
            elseif layout == 'narrowed' then xo.narrow = true end
            local xr, xg = rand({ N, Cc, H, W }, dt, xo)
            local wr, wg = rand({ O, Cc, 1, 1 }, dt, { scale = 1 / math.sqrt(Cc) })
            local br, bg
            if bias then br, bg = rand({ O }, dt) end
            local gor, gog = rand({ N, O, H, W }, dt)
            local o64, gx64 = cpu_out({ N, O, H, W }), cpu_out({ N, Cc, H, W })
            local gw64, gwg = rand({ O, Cc, 1, 1 }, dt)
            local gb64, gbg
            if bias then gb64, gbg = rand({ O }, dt) end
            call('fa_conv2d_forward', o64.desc, xr.desc, wr.desc, d(br), p)
            call('fa_conv2d_backward', gx64.desc, gw64.desc, d(gb64), gor.desc, xr.desc, wr.desc, p)
            local o, gx = gpu_out({ N, O, H, W }, dt), gpu_out({ N, Cc, H, W }, dt)
            if tf32 then C.fa_cuda_allow_tf32(1) end
            local ok, err = pcall(function()
              call('fa_conv2d_forward', o.desc, xg.desc, wg.desc, d(bg), p)
              call('fa_conv2d_backward', gx.desc, gwg.desc, d(gbg), gog.desc, xg.desc, wg.desc, p)
            end)
            if tf32 then C.fa_cuda_allow_tf32(0) end
            assert(ok, err)
            close(o, o64, tol, 'out')
            close(gx, gx64, tol, 'grad_x')
            close(gwg, gw64, tol, 'grad_weight')
            if bias then close(gbg, gb64, tol, 'grad_bias') end
          end)
        end
      end
      it('keeps the float32 bias to 2^-20 under TF32 (split into two TF32 columns)', function()
        if not needs('fa_conv2d_forward') then return end
        local N, Cc, H, W, O = 2, 24, 3, 5, 16
        local p = ffi.new('fa_conv2d_params', 1, 1, 0, 0, 1, 1, 1)
        local _, xg = rand({ N, Cc, H, W }, 'float32')
        local wg = fa.zeros({ O, Cc, 1, 1 }, { dtype = 'float32', device = DEV })
        -- biases with all 24 mantissa bits in use: one TF32 column (10 bits) would be off by up to 2^-10
        local br, bg = rand({ O }, 'float32', { scale = 1000 })
        local o = gpu_out({ N, O, H, W }, 'float32')
        if not ON_CPU then C.fa_cuda_allow_tf32(1) end
        local ok, err = pcall(call, 'fa_conv2d_forward', o.desc, xg.desc, wg.desc, bg.desc, p)
        if not ON_CPU then C.fa_cuda_allow_tf32(0) end
        assert(ok, err)
        local oc = o:to('float64', 'cpu'):contiguous()
        local bp = ffi.cast('double*', br.desc.data)
        local op_ = ffi.cast('double*', oc.desc.data)
        for n = 0, N - 1 do
          for k = 0, O - 1 do
            for q = 0, H * W - 1 do
              local got, want = op_[(n * O + k) * H * W + q], bp[k]
              assert(math.abs(got - want) <= 2 ^ -20 * math.abs(want),
                string.format('out[%d][%d][%d] = %.9g, bias %.9g', n, k, q, got, want))
            end
          end
        end
      end)
    end)
    it('names the argument on another device', function()
      if ON_CPU then return end
      if not needs('fa_conv2d_forward') then return end
      local _, x = rand({ 1, 2, 5, 5 }, 'float32')
      local w = fa.randn(3, 2, 3, 3)
      local o = gpu_out({ 1, 3, 3, 3 }, 'float32')
      local p = ffi.new('fa_conv2d_params', 1, 1, 0, 0, 1, 1, 1)
      assert.are_not.equal(0, C.fa_conv2d_forward(o.desc, x.desc, w.desc, nil, p))
      assert.matches("argument 'weight'", ffi.string(C.fa_last_error()))
    end)
  end)
end, ON_CPU)
